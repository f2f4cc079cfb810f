# The two commands of the README:
#   make demo  - set up .venv if needed, run the pipeline offline on the built-in data set (dvc repro)
#   make test  - set up .venv if needed, run the test suite
# Both are idempotent; the second run skips the install (a stamp file tracks pyproject.toml).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.yolofps-installed
# The CPU wheel by default. A GPU user installs their CUDA torch into $(VENV) first; it is kept.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

export PATH := $(abspath $(BIN)):$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: demo test install clean-outputs

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# One pipeline-run id per `make demo`, so the MLflow runs of its stages share a tag.
demo: $(STAMP)
	YOLOFPS_PIPELINE_RUN_ID=demo-$$(date -u +%Y%m%dT%H%M%S) $(BIN)/dvc repro
	@echo
	@echo "Outputs:"
	@echo "  prepared data set   data/prepared/ (data.yaml, images/, labels/)"
	@echo "  augmented data set  data/augmented/"
	@echo "  validation report   reports/data_validation.json"
	@echo "  trained model       models/train/{best,last}/ (arch.json, weights.safetensors, meta.json)"
	@echo "  optimized models    models/prune/prune-*/, models/distill/, models/quantize/*.onnx"
	@echo "  benchmark           metrics/bench.json (every variant; selected), reports/bench/{bench.md,pareto.png}"
	@echo "  metrics             metrics/*.json   (dvc metrics show)"
	@echo "  plots               plots/train.csv, plots/bench.csv, plots/train/*.png   (dvc plots show)"
	@echo "  MLflow runs         $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db   (http://127.0.0.1:5000)"
	@echo
	@cat reports/bench/bench.md

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean-outputs:
	rm -rf data/prepared data/augmented reports models checkpoints plots metrics/bench.json

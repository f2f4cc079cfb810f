# The two commands of the README:
#   make demo  - set up .venv if needed, run the short demo pipeline offline on the built-in data set (dvc repro)
#   make demo-full - the hour-long full profile (profiles/full.yaml) as a DVC experiment
#   make test  - set up .venv if needed, run the test suite
#   make test-xla - set up .venv-xla (torch 2.9.0 + torch-xla 2.9.0) if needed, run the XLA tests on PJRT_DEVICE=CPU
# Both are idempotent; the second run skips the install (a stamp file tracks pyproject.toml).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.yolofps-installed
# The CPU wheel by default. A GPU user installs their CUDA torch into $(VENV) first; it is kept.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# torch-xla needs its own environment: it pins torch==2.9.0, the main one runs a newer torch.
VENV_XLA ?= .venv-xla
XLA_STAMP := $(VENV_XLA)/.yolofps-xla-installed
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

export PATH := $(abspath $(BIN)):$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: demo demo-full test test-xla lint install install-xla clean-outputs

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# One pipeline-run id per `make demo`, so the MLflow runs of its stages share a tag.
# What a run leaves behind, printed after `make demo` and `make demo-full`.
define OUTPUTS_SUMMARY
	@echo
	@echo "Outputs:"
	@echo "  prepared data set   data/prepared/ (data.yaml, images/, labels/)"
	@echo "  augmented data set  data/augmented/"
	@echo "  validation report   reports/data_validation.json"
	@echo "  trained model       models/train/{best,last}/ (arch.json, weights.safetensors, meta.json)"
	@echo "  optimized models    models/prune/prune-*/, models/distill/, models/quantize/ (ONNX INT8, OpenVINO INT8 IR)"
	@echo "  benchmark           metrics/bench.json (every variant; selected), reports/bench/{bench.md,pareto.png}"
	@echo "  metrics             metrics/*.json   (dvc metrics show)"
	@echo "  plots               plots/train.csv, plots/bench.csv, plots/train/*.png   (dvc plots show)"
	@echo "  MLflow runs         $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db   (http://127.0.0.1:5000)"
	@echo
	@cat reports/bench/bench.md
endef

demo: $(STAMP)
	@date +%s > .demo-started
	YOLOFPS_PIPELINE_RUN_ID=demo-$$(date -u +%Y%m%dT%H%M%S) $(BIN)/dvc repro
	$(OUTPUTS_SUMMARY)
	@echo
	@echo "make demo: the pipeline took $$(( $$(date +%s) - $$(cat .demo-started) )) s wall (install excluded)"

# The full profile's keys (profiles/full.yaml) over params.yaml, as one `dvc exp run`; ~52 min on 2 CPU cores
# before issue 17's control and QAT, which add a 60-epoch fine-tune and 3 QAT epochs.
demo-full: $(STAMP)
	YOLOFPS_PIPELINE_RUN_ID=full-$$(date -u +%Y%m%dT%H%M%S) $(BIN)/python -m yolofps.profiles full
	$(OUTPUTS_SUMMARY)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# ruff over the whole repository, rules in pyproject.toml [tool.ruff]; .ci/run calls it after the tests.
lint: $(STAMP)
	$(BIN)/ruff check .

install-xla: $(XLA_STAMP)

# The CPU wheel of torch 2.9.0 when its index answers (~200 MB); otherwise PyPI's build, which brings the CUDA
# libraries (~7 GB). Either way `.[tpu]` then pins torch==2.9.0 and adds torch-xla 2.9.0.
$(XLA_STAMP): pyproject.toml
	test -x $(VENV_XLA)/bin/python || $(PYTHON) -m venv $(VENV_XLA)
	$(VENV_XLA)/bin/python -m pip install -q --upgrade pip
	if $(VENV_XLA)/bin/python -c "import urllib.request as u; u.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=10)" \
	  2>/dev/null; then $(VENV_XLA)/bin/python -m pip install -q torch==2.9.0 --index-url $(TORCH_CPU_INDEX); fi
	$(VENV_XLA)/bin/python -m pip install -q -e ".[tpu,dev]"
	$(VENV_XLA)/bin/python -c "import torch, torch_xla; print('torch', torch.__version__, 'torch_xla', torch_xla.__version__)"
	touch $(XLA_STAMP)

# PJRT_DEVICE=CPU runs the real XLA compiler and runtime on the host (no TPU needed); the main suite skips these.
test-xla: $(XLA_STAMP)
	PJRT_DEVICE=CPU $(VENV_XLA)/bin/python -m pytest -m xla $(PYTEST_ARGS)

clean-outputs:
	rm -rf data/prepared data/augmented reports models checkpoints plots metrics/bench.json

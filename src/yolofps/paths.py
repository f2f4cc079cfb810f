"""Every artifact path of the pipeline, defined once.

Stages, the CLI, tests and the dvc.yaml contract test all read these, so a path changes in one place.
Paths are relative to the project root (the folder holding params.yaml and dvc.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# the equal-budget control: the baseline trained on for prune.finetune_epochs (models/prune/control)
CONTROL = "control"


@dataclass(frozen=True)
class Paths:
    """Artifact locations under one project root."""

    root: Path = Path(".")

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def weights(self) -> Path:
        """Models brought in (official yolov5 `.pt` files, yolofps model folders): `train.weights` lives here, and
        the DVC train stage depends on the folder, so a new or changed file reruns training."""
        return self.root / "weights"

    @property
    def prepared_data(self) -> Path:
        """`data` stage output: the normalized data set in YOLO layout."""
        return self.root / "data" / "prepared"

    @property
    def augmented_data(self) -> Path:
        """`augment` stage output: prepared data + augmented train copies."""
        return self.root / "data" / "augmented"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def data_report(self) -> Path:
        """Validation report of the `data` stage (every fault, file and action)."""
        return self.reports / "data_validation.json"

    def models(self, stage: str) -> Path:
        """Published model artifacts of a stage (`best/`, `last/`, ...): arch.json + weights + meta."""
        return self.root / "models" / stage

    def checkpoints(self, stage: str) -> Path:
        """Resume state of a stage; DVC keeps it between runs (`persist: true`) so a rerun resumes."""
        return self.root / "checkpoints" / stage

    @property
    def plots(self) -> Path:
        """Per-epoch CSVs and PNGs (DVC `plots`)."""
        return self.root / "plots"

    def metrics(self, stage: str) -> Path:
        """Flat metrics JSON of a stage (DVC `metrics`, `cache: false`)."""
        return self.root / "metrics" / f"{stage}.json"

    def model_folder(self, name: str) -> Path:
        """The torch model folder of a model name: train, control, distill or prune-<ratio>."""
        if name == "train":
            return self.models("train") / "best"
        if name == "distill":
            return self.models("distill")
        if name.startswith("prune-") or name == CONTROL:
            return self.models("prune") / name
        raise ValueError(f"a model name is train, {CONTROL}, distill or prune-<ratio>, got {name!r}")


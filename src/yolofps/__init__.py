"""yolofps: make YOLOv5 detectors fast without losing accuracy, as a DVC + Prefect + MLflow pipeline."""

__version__ = "0.1.0"

"""The one spelling of every accuracy metric: in metrics/*.json, bench.json, MLflow metrics, version tags, reports.

ultralytics names its box metrics `metrics/precision(B)`, `metrics/recall(B)`, `metrics/mAP50(B)` and
`metrics/mAP50-95(B)`. MLflow refuses parentheses in metric and tag keys, so ultralytics' own MLflow callback logs
them without (`metrics/mAP50-95B`); so does yolofps, everywhere, so a user of ultralytics reads them without a
glossary and one key finds a figure in every store. A figure of one model among several is scoped by it:
`prune-0.5/metrics/mAP50-95B`.
"""

from __future__ import annotations

PRECISION = "metrics/precisionB"
RECALL = "metrics/recallB"
MAP50 = "metrics/mAP50B"
MAP50_95 = "metrics/mAP50-95B"
BOX = (PRECISION, RECALL, MAP50, MAP50_95)


def scoped(scope: str, name: str) -> str:
    """`prune-0.5` + `metrics/mAP50-95B` -> `prune-0.5/metrics/mAP50-95B`."""
    return f"{scope}/{name}"

"""The only package that imports mlflow (besides the pyfunc model file): tracking, and the model registry.

Tracking (`tracking`) must never cost a training run: it degrades to warnings. Registration (`versions`) and
promotion (`promotion`) are the opposite: they retry with backoff (`common`) and then fail with a clear error.
"""

from __future__ import annotations

from yolofps.registry.card import CardFacts, model_chain, render_card
from yolofps.registry.common import (
    CHALLENGER,
    CHAMPION,
    HISTORY_PREFIX,
    RegistryError,
    RegistryUnavailable,
    with_retries,
)
from yolofps.registry.promotion import (
    FpsPair,
    Gate,
    Judge,
    Promotion,
    PromotionRequest,
    champion_history,
    check_gates,
    promote,
)
from yolofps.registry.tracking import TrackingRun, flatten, log_to_parent_run, pipeline_parent_run, resolve_tracking_uri
from yolofps.registry.versions import (
    Registration,
    Submission,
    aliases,
    describe_version,
    load_detector,
    register_model,
    set_version_tags,
)

__all__ = ["CHALLENGER", "CHAMPION", "HISTORY_PREFIX", "CardFacts", "FpsPair", "Gate", "Judge", "Promotion",
           "PromotionRequest", "Registration", "RegistryError", "RegistryUnavailable", "Submission", "TrackingRun",
           "aliases", "champion_history",
           "check_gates", "describe_version", "flatten", "load_detector", "log_to_parent_run", "model_chain",
           "pipeline_parent_run", "promote", "register_model", "render_card", "resolve_tracking_uri",
           "set_version_tags", "with_retries"]

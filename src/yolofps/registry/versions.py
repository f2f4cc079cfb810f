"""Registered versions: register once per content (and set @challenger), read aliases, load, tag.

Registration is the stage's purpose: it retries with backoff, then fails with a clear error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yolofps.config import MLflowConfig
from yolofps.lineage import PARENT_RUN_ENV
from yolofps.registry.common import CHALLENGER, _quiet_http_retries, log, with_retries


@dataclass(frozen=True)
class Registration:
    """What the register stage did: the version, its run, and whether that content was already registered."""

    name: str
    version: int
    run_id: str
    model_uri: str
    reused: bool


@dataclass(frozen=True)
class Submission:
    """What one registration logs: its content's hash, the model, and the tags, metrics and artifacts of its run.

    `log_model` holds the keyword arguments of mlflow.pyfunc.log_model (python_model, artifacts, ...); `refresh`
    names the version tags a reused version takes from this submission (the latest benchmark figures).
    """

    content_hash: str
    log_model: dict[str, Any]
    version_tags: dict[str, str]
    run_tags: dict[str, str]
    run_metrics: dict[str, float]
    run_artifacts: list[tuple[Path, str]]
    refresh: tuple[str, ...] = ()


def register_model(cfg: MLflowConfig, model_name: str, submission: Submission, *, retries: int,
                   backoff_s: float) -> Registration:
    """Log the pyfunc (models-from-code), register it as a new version tagged with lineage, alias @challenger.

    Idempotent: a version whose `content_hash` tag matches is reused (alias moved to it), never duplicated; its
    `refresh` tags are updated, its lineage tags stay those of its registration.
    """
    _quiet_http_retries()
    s = submission
    import mlflow
    from mlflow import MlflowClient

    def attempt() -> Registration:
        client = MlflowClient(tracking_uri=cfg.tracking_uri)  # inside the retries: opening a store can fail too
        try:
            client.get_registered_model(model_name)
        except mlflow.exceptions.MlflowException as err:
            if "RESOURCE_DOES_NOT_EXIST" not in str(err.error_code):
                raise
            try:
                client.create_registered_model(model_name, description="YOLOv5 detectors registered by yolofps: "
                                               "pre-processing, model and NMS in one pyfunc. @champion serves.")
            except mlflow.exceptions.MlflowException as race:  # a concurrent registration created it first
                if "RESOURCE_ALREADY_EXISTS" not in str(race.error_code):
                    raise
        existing = client.search_model_versions(f"name = '{model_name}' and tags.content_hash = '{s.content_hash}'")
        if existing:
            found = max(existing, key=lambda v: int(v.version))
            for key in s.refresh:
                if key in s.version_tags:
                    client.set_model_version_tag(model_name, found.version, key, s.version_tags[key])
            client.set_registered_model_alias(model_name, CHALLENGER, found.version)
            return Registration(model_name, int(found.version), found.run_id, f"models:/{model_name}/{found.version}",
                                reused=True)
        mlflow.set_tracking_uri(cfg.tracking_uri)
        mlflow.set_experiment(cfg.experiment)
        with mlflow.start_run(run_name="register", tags=s.run_tags,
                              parent_run_id=os.environ.get(PARENT_RUN_ENV) or None):
            info = mlflow.pyfunc.log_model(name="model", **s.log_model)
            mlflow.log_metrics(s.run_metrics)
            for path, artifact_path in s.run_artifacts:
                if path.is_dir():
                    mlflow.log_artifacts(str(path), artifact_path)
                elif path.is_file():
                    mlflow.log_artifact(str(path), artifact_path)
            version = mlflow.register_model(info.model_uri, model_name, tags=s.version_tags | {
                "content_hash": s.content_hash})
        kept = _keep_first(client, model_name, s.content_hash, version)
        client.set_registered_model_alias(model_name, CHALLENGER, kept.version)
        return Registration(model_name, int(kept.version), kept.run_id, f"models:/{model_name}/{kept.version}",
                            reused=kept.version != version.version)

    return with_retries(f"registering {model_name}", attempt, uri=cfg.tracking_uri, retries=retries,
                        backoff_s=backoff_s, then="rerun the stage when the tracking server is back (the same model "
                        "content is registered once)")


def _keep_first(client, model_name: str, content_hash: str, own):
    """Settle a race of two registrations of the same content: the lowest version wins, a later twin is deleted.

    The check-then-create above is not atomic. Each racer looks again after creating its version: the later one
    always sees both and removes its own, so exactly one version per content remains and @challenger points at it.
    """
    twins = client.search_model_versions(f"name = '{model_name}' and tags.content_hash = '{content_hash}'")
    first = min(twins, key=lambda v: int(v.version), default=own)
    if int(first.version) < int(own.version):
        log.warning("%s v%s duplicates v%s (registered at the same time); deleting v%s", model_name, own.version,
                    first.version, own.version)
        client.delete_model_version(model_name, own.version)
        return first
    return own


def aliases(cfg: MLflowConfig, model_name: str) -> dict[str, int]:
    """alias -> version of a registered model ({} when the model is not registered yet)."""
    from mlflow import MlflowClient

    try:
        model = MlflowClient(tracking_uri=cfg.tracking_uri).get_registered_model(model_name)
    except Exception as err:
        if "RESOURCE_DOES_NOT_EXIST" in str(getattr(err, "error_code", "")):
            return {}
        raise
    return {alias: int(version) for alias, version in model.aliases.items()}


def load_detector(cfg: MLflowConfig, model_name: str, alias: str = "", *, version: int | None = None,
                  retries: int = 3, backoff_s: float = 2.0):
    """A registered version by alias (or by number), loaded the way a caller loads it: (version, tags, Detector)."""
    if bool(alias) == (version is not None):
        raise ValueError("load_detector takes an alias or a version, not both and not neither")
    _quiet_http_retries()
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking_uri)

    def attempt():
        found = (client.get_model_version_by_alias(model_name, alias) if alias
                 else client.get_model_version(model_name, str(version)))
        mlflow.set_tracking_uri(cfg.tracking_uri)  # models:/ URIs resolve against the global tracking URI
        model = mlflow.pyfunc.load_model(f"models:/{model_name}/{found.version}")
        return int(found.version), dict(found.tags), model.unwrap_python_model().detector

    which = f"@{alias}" if alias else f" v{version}"
    return with_retries(f"loading {model_name}{which}", attempt, uri=cfg.tracking_uri, retries=retries,
                        backoff_s=backoff_s)


def set_version_tags(cfg: MLflowConfig, model_name: str, version: int, tags: dict[str, str], *, retries: int = 3,
                     backoff_s: float = 2.0) -> None:
    """Set tags on a registered version (e.g. benchmark figures re-measured on another device)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking_uri)

    def attempt() -> None:
        for key, value in tags.items():
            client.set_model_version_tag(model_name, str(version), key, value)

    with_retries(f"tagging {model_name} v{version}", attempt, uri=cfg.tracking_uri, retries=retries,
                 backoff_s=backoff_s)


def describe_version(cfg: MLflowConfig, model_name: str, version: int, description: str, *, retries: int = 3,
                     backoff_s: float = 2.0) -> None:
    """Set a registered version's description (the model card the MLflow UI shows on the version page)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    with_retries(f"describing {model_name} v{version}",
                 lambda: client.update_model_version(model_name, str(version), description=description),
                 uri=cfg.tracking_uri, retries=retries, backoff_s=backoff_s)

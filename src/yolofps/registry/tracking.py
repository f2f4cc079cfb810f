"""MLflow tracking for the stages: one run per stage, nested under the pipeline's parent run.

Tracking must never cost a training run: every call degrades to a logged warning when the tracking store
fails, and the stage's own outputs on disk stay the source of truth.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from yolofps.config import MLflowConfig, flatten
from yolofps.lineage import PARENT_RUN_ENV
from yolofps.redact import redact, redact_uri
from yolofps.registry.common import _quiet_http_retries, _short, log


def resolve_tracking_uri(uri: str, root: Path) -> str:
    """Make a relative `sqlite:///file.db` URI absolute against the project root (other URIs unchanged)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((root / uri[len(prefix):]).resolve())
    return uri


@contextlib.contextmanager
def pipeline_parent_run(cfg: MLflowConfig, root: Path, *, name: str, tags: dict[str, str],
                        params: dict[str, Any] | None = None) -> Iterator[str | None]:
    """An MLflow parent run for one pipeline execution; yields its id (None when tracking is unavailable).

    `params` records what the run changed (the flow's params overrides, as `override.<key>`).
    Stage runs started while it is open (in subprocesses, through DVC) nest under it via PARENT_RUN_ENV.
    """
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=resolve_tracking_uri(cfg.tracking_uri, root))
        experiment = client.get_experiment_by_name(cfg.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.experiment)
        run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
        for key, value in (params or {}).items():
            client.log_param(run_id, key, str(value)[:6000])
    except Exception as err:
        log.warning("MLflow tracking unavailable at %s (%s); stage runs will not be grouped",
                    redact_uri(cfg.tracking_uri), _short(err))
        yield None
        return
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    finally:
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, status)


def log_to_parent_run(cfg: MLflowConfig, path: Path, artifact_path: str) -> None:
    """Also log a file or folder to the pipeline's parent run (when a flow opened one); best-effort, like tracking."""
    parent = os.environ.get(PARENT_RUN_ENV)
    if not parent or not path.exists():
        return
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=cfg.tracking_uri)
        if path.is_dir():
            client.log_artifacts(parent, str(path), artifact_path)
        else:
            client.log_artifact(parent, str(path), artifact_path)
    except Exception as err:
        log.warning("MLflow: logging %s to the pipeline run failed (%s); continuing", path, _short(err))


class TrackingRun:
    """One MLflow run for a stage: params and tags at start, metrics per epoch, artifacts at the end.

    The first failed call (the server went down mid-run) turns tracking off for the rest of the run with one
    warning: a dead server then costs seconds once, not a stall every epoch.
    """

    def __init__(self, cfg: MLflowConfig, *, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        self.run_id: str | None = None
        self.failed = False
        self.tracking_uri = cfg.tracking_uri
        _quiet_http_retries()  # MLflow's own HTTP retries held training ~4 minutes when the server was down
        try:
            import mlflow

            mlflow.set_tracking_uri(cfg.tracking_uri)
            mlflow.set_experiment(cfg.experiment)
            run = mlflow.start_run(run_name=run_name, tags=redact(tags),
                                   parent_run_id=os.environ.get(PARENT_RUN_ENV) or None,
                                   log_system_metrics=cfg.system_metrics)
            self.run_id = run.info.run_id
            items = list(redact(flatten(params)).items())
            for start in range(0, len(items), 100):  # MLflow caps params per batch call
                mlflow.log_params(dict(items[start:start + 100]))
        except Exception as err:  # tracking is best-effort: the stage's files are the record
            log.warning("MLflow tracking unavailable at %s (%s); continuing without it",
                        redact_uri(cfg.tracking_uri), _short(err))
            self.failed = True

    @property
    def active(self) -> bool:
        return self.run_id is not None and not self.failed

    def _call(self, what: str, fn, *args, **kwargs) -> None:
        if not self.active:
            return
        try:
            fn(*args, **kwargs)
        except Exception as err:
            log.warning("MLflow %s failed at %s (%s); tracking is off for the rest of this run, the stage's files "
                        "on disk are its record", what, redact_uri(self.tracking_uri), _short(err))
            self.failed = True

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log numeric metrics at a step (called per epoch, never per batch)."""
        import mlflow

        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self._call("log_metrics", mlflow.log_metrics, clean, step=step)

    def log_artifacts(self, path: Path, artifact_path: str | None = None) -> None:
        """Log a file or a folder as run artifacts."""
        import mlflow

        if path.is_dir():
            self._call("log_artifacts", mlflow.log_artifacts, str(path), artifact_path)
        elif path.is_file():
            self._call("log_artifact", mlflow.log_artifact, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        import mlflow

        self._call("set_tags", mlflow.set_tags, redact(tags))

    def end(self, status: str = "FINISHED") -> None:
        """Close the run (FINISHED or FAILED); tried even after a failure, so this process's run stack is clean."""
        import mlflow

        if self.run_id is None:
            return
        try:
            mlflow.end_run(status=status)
        except Exception as err:
            log.warning("MLflow end_run failed (%s); the run stays RUNNING in the store", _short(err))

    def __enter__(self) -> TrackingRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end("FAILED" if exc_type else "FINISHED")

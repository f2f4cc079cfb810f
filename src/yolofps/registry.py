"""The only module that imports mlflow (besides the pyfunc model file): tracking, and the model registry.

Tracking must never cost a training run: every call degrades to a logged warning when the tracking
store fails, and the stage's own outputs on disk stay the source of truth. Registration and promotion are
the opposite: they retry with backoff and then fail with a clear error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from yolofps.config import GatesConfig, MLflowConfig
from yolofps.errors import TransientError, YolofpsError
from yolofps.lineage import PARENT_RUN_ENV
from yolofps.redact import redact, redact_text, redact_uri

log = logging.getLogger(__name__)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr0': 0.01}} -> {'train.lr0': 0.01}; lists are kept as one value."""
    if not isinstance(data, dict):
        return {prefix.rstrip("."): data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat |= flatten(value, f"{prefix}{key}.")
    return flat


def _short(err: Exception) -> str:
    """An exception for a log line or message: its type and the start of its text, URIs redacted."""
    return redact_text(f"{type(err).__name__}: {str(err)[:300]}")


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


# --------------------------------------------------------------------------------------------- model registry
# Unlike tracking, registration is the stage's purpose: it retries with backoff, then fails with a clear error.

CHALLENGER, CHAMPION = "challenger", "champion"
HISTORY_PREFIX = "champion_history."  # registered-model tags, one per @champion move: what was champion when


class RegistryError(YolofpsError):
    """The model registry could not be reached or refused; the message says what is safe to do next."""


class RegistryUnavailable(RegistryError, TransientError):
    """The tracking server stayed unreachable through every retry: a later run may succeed."""


@dataclass(frozen=True)
class Registration:
    """What the register stage did: the version, its run, and whether that content was already registered."""

    name: str
    version: int
    run_id: str
    model_uri: str
    reused: bool


_PERMANENT = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "PERMISSION_DENIED")


def with_retries(what: str, fn: Callable[[], Any], *, uri: str, retries: int, backoff_s: float,
                 then: str = "rerun when the tracking server is back") -> Any:
    """Call `fn` up to `retries` times, waiting backoff_s * 2**n between tries; then a RegistryError.

    Answers that retrying cannot change (a missing model or version, a bad argument) fail at once.
    """
    for attempt in range(1, retries + 1):
        try:
            return fn()
        except YolofpsError:
            raise
        except Exception as err:  # MLflow raises MlflowException, requests errors, SQLAlchemy errors...
            if str(getattr(err, "error_code", "")) in _PERMANENT:
                raise RegistryError(f"{what}: {_short(err)} (tracking URI {redact_uri(uri)})") from None
            if attempt == retries:
                raise RegistryUnavailable(
                    f"{what} failed after {retries} attempts at {redact_uri(uri)}: {_short(err)}. "
                    f"Every file on disk is intact; {then}") from None
            wait = backoff_s * 2 ** (attempt - 1)
            log.warning("%s failed (%s); retry %d/%d in %.1f s", what, _short(err), attempt, retries - 1, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def _quiet_http_retries() -> None:
    """MLflow's REST client retries for minutes by itself; keep its retries short so ours (with a message) lead."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def register_model(cfg: MLflowConfig, model_name: str, *, content_hash: str, log_model: dict[str, Any],
                   version_tags: dict[str, str], run_tags: dict[str, str], run_metrics: dict[str, float],
                   run_artifacts: list[tuple[Path, str]], retries: int, backoff_s: float,
                   refresh: tuple[str, ...] = ()) -> Registration:
    """Log the pyfunc (models-from-code), register it as a new version tagged with lineage, alias @challenger.

    Idempotent: a version whose `content_hash` tag matches is reused (alias moved to it), never duplicated; its
    `refresh` tags (the latest benchmark figures) are updated, its lineage tags stay those of its registration.
    `log_model` holds the keyword arguments of mlflow.pyfunc.log_model (python_model, artifacts, ...).
    """
    _quiet_http_retries()
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
        existing = client.search_model_versions(f"name = '{model_name}' and tags.content_hash = '{content_hash}'")
        if existing:
            found = max(existing, key=lambda v: int(v.version))
            for key in refresh:
                if key in version_tags:
                    client.set_model_version_tag(model_name, found.version, key, version_tags[key])
            client.set_registered_model_alias(model_name, CHALLENGER, found.version)
            return Registration(model_name, int(found.version), found.run_id, f"models:/{model_name}/{found.version}",
                                reused=True)
        mlflow.set_tracking_uri(cfg.tracking_uri)
        mlflow.set_experiment(cfg.experiment)
        with mlflow.start_run(run_name="register", tags=run_tags,
                              parent_run_id=os.environ.get(PARENT_RUN_ENV) or None):
            info = mlflow.pyfunc.log_model(name="model", **log_model)
            mlflow.log_metrics(run_metrics)
            for path, artifact_path in run_artifacts:
                if path.is_dir():
                    mlflow.log_artifacts(str(path), artifact_path)
                elif path.is_file():
                    mlflow.log_artifact(str(path), artifact_path)
            version = mlflow.register_model(info.model_uri, model_name, tags=version_tags | {
                "content_hash": content_hash})
        kept = _keep_first(client, model_name, content_hash, version)
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


@dataclass(frozen=True)
class Gate:
    """One promotion check and what it compared."""

    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class Promotion:
    """The outcome of `promote`: the candidate, the champion it was compared with, the gates, and what happened."""

    model_name: str
    candidate: int
    champion: int | None
    gates: list[Gate]
    moved: bool
    forced: bool

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def table(self) -> str:
        lines = [f"{self.model_name}: candidate v{self.candidate} vs champion "
                 f"{'v' + str(self.champion) if self.champion else '(none)'}"]
        lines += [f"  [{'pass' if g.passed else 'FAIL'}] {g.name}: {g.detail}" for g in self.gates]
        verdict = "moved @champion" if self.moved else "did not move @champion"
        lines.append(f"  -> {verdict}{' (forced)' if self.forced else ''}")
        return "\n".join(lines)


def check_gates(candidate: dict[str, str], champion: dict[str, str] | None, gates: GatesConfig) -> list[Gate]:
    """The promotion gates on two versions' tags (map50_95, fps_b1, device)."""
    cand_map, cand_fps = float(candidate.get("map50_95", "nan")), float(candidate.get("fps_b1", "nan"))
    checks = [Gate("mAP50-95 floor", cand_map >= gates.min_map50_95, f"{cand_map:.4f} >= {gates.min_map50_95}"),
              Gate("FPS floor", cand_fps >= gates.min_fps_b1, f"{cand_fps:.1f} >= {gates.min_fps_b1}")]
    if champion is None:
        return checks
    champ_map, champ_fps = float(champion.get("map50_95", "nan")), float(champion.get("fps_b1", "nan"))
    checks.append(Gate("mAP50-95 vs champion", cand_map >= champ_map - gates.map_tolerance,
                       f"{cand_map:.4f} >= {champ_map:.4f} - {gates.map_tolerance}"))
    same_device = candidate.get("bench_device_name") == champion.get("bench_device_name")
    if same_device:
        need = champ_fps * (1 + gates.min_fps_gain)
        checks.append(Gate("FPS vs champion", cand_fps >= need, f"{cand_fps:.1f} >= {champ_fps:.1f} x "
                                                                 f"(1 + {gates.min_fps_gain}) = {need:.1f}"))
    else:
        checks.append(Gate("FPS vs champion", False, "measured on different devices "
                           f"({candidate.get('bench_device_name')} vs {champion.get('bench_device_name')}): "
                           "re-benchmark both on one device, or --force with a reason"))
    return checks


def promote(cfg: MLflowConfig, model_name: str, gates: GatesConfig, *, version: int | None = None,
            alias: str = CHALLENGER, dry_run: bool = False, force: bool = False, reason: str = "",
            user: str = "", retries: int = 3, backoff_s: float = 2.0) -> Promotion:
    """Move @champion to a version when the gates pass against the current champion (or when forced)."""
    _quiet_http_retries()
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking_uri)

    def attempt() -> Promotion:
        candidate = (client.get_model_version(model_name, str(version)) if version is not None
                     else client.get_model_version_by_alias(model_name, alias))
        champion = _version_by_alias(client, model_name, CHAMPION)
        if champion is not None and champion.version == candidate.version:
            return Promotion(model_name, int(candidate.version), int(champion.version),
                             [Gate("already champion", True, f"v{candidate.version} holds @champion")], False, False)
        checks = check_gates(candidate.tags, champion.tags if champion else None, gates)
        promo = Promotion(model_name, int(candidate.version), int(champion.version) if champion else None, checks,
                          moved=False, forced=force and not all(g.passed for g in checks))
        if dry_run or not (promo.passed or force):
            return promo
        now = dt.datetime.now(dt.timezone.utc)
        record = {"version": int(candidate.version), "previous": int(champion.version) if champion else None,
                  "at": now.isoformat(timespec="seconds"), "by": user, "reason": reason, "forced": promo.forced,
                  "gates": {g.name: g.passed for g in checks}}
        # history and version tags first, the alias last: a failure in between leaves @champion where it was
        key = f"{HISTORY_PREFIX}{now.strftime('%Y%m%dT%H%M%S.%fZ')}.v{candidate.version}"  # unique per move
        client.set_registered_model_tag(model_name, key, json.dumps(record))
        promotion = {"promoted_at": record["at"], "promoted_by": user, "promotion_reason": reason or "gates passed",
                     "promotion_forced": str(promo.forced).lower()}
        for key, value in promotion.items():
            client.set_model_version_tag(model_name, candidate.version, key, value)
        client.set_registered_model_alias(model_name, CHAMPION, candidate.version)
        return dataclasses.replace(promo, moved=True)

    return with_retries(f"promoting {model_name}", attempt, uri=cfg.tracking_uri, retries=retries,
                        backoff_s=backoff_s)


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


def load_detector(cfg: MLflowConfig, model_name: str, alias: str, *, retries: int = 3, backoff_s: float = 2.0):
    """A registered version by alias, loaded the way a caller loads it: (version, tags, serving Detector)."""
    _quiet_http_retries()
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking_uri)

    def attempt():
        version = client.get_model_version_by_alias(model_name, alias)
        mlflow.set_tracking_uri(cfg.tracking_uri)  # models:/ URIs resolve against the global tracking URI
        model = mlflow.pyfunc.load_model(f"models:/{model_name}/{version.version}")
        return int(version.version), dict(version.tags), model.unwrap_python_model().detector

    return with_retries(f"loading {model_name}@{alias}", attempt, uri=cfg.tracking_uri, retries=retries,
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


def champion_history(cfg: MLflowConfig, model_name: str) -> list[dict[str, Any]]:
    """Every @champion move, oldest first (answers "what was champion on date X")."""
    from mlflow import MlflowClient

    tags = MlflowClient(tracking_uri=cfg.tracking_uri).get_registered_model(model_name).tags
    moves = sorted((k, v) for k, v in tags.items() if k.startswith(HISTORY_PREFIX))  # keys sort by time
    return [json.loads(v) for _, v in moves]


def _version_by_alias(client, model_name: str, alias: str):
    import mlflow

    try:
        return client.get_model_version_by_alias(model_name, alias)
    except mlflow.exceptions.MlflowException as err:
        if "RESOURCE_DOES_NOT_EXIST" in str(err.error_code) or "INVALID_PARAMETER_VALUE" in str(err.error_code):
            return None
        raise

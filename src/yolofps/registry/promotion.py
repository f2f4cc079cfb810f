"""Promotion: the gates a version must pass against @champion, moving the alias, and the history of moves."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from yolofps.config import GatesConfig, MLflowConfig
from yolofps.errors import YolofpsError
from yolofps.metric_names import MAP50_95
from yolofps.registry.common import CHALLENGER, CHAMPION, HISTORY_PREFIX, _quiet_http_retries, with_retries


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


class SameRunFps(Protocol):
    """Two versions' batch-1 FPS from one measuring run on one device (what yolofps.history.PairedFps holds)."""

    run_id: str
    source: str  # bench | rebench ...
    measured_at: dt.datetime
    device_name: str
    fps: dict[int, float]  # version -> images/s


# (model name, (candidate version, champion version)) -> their figures from one run, or None when no run has both
FpsSource = Callable[[str, tuple[int, int]], "SameRunFps | None"]


@dataclass(frozen=True)
class FpsPair:
    """The candidate's and the champion's FPS from one measuring run, and which run (the gate's detail says it)."""

    candidate: float
    champion: float
    source: str


@dataclass(frozen=True)
class Judge:
    """How a candidate is judged against @champion: the gate thresholds, and where comparable FPS comes from.

    With `same_run` (the benchmark store's `paired_fps`), the FPS gate compares the two versions' most recent
    figures from one measuring run on one device; without it, or when no run measured both, their version tags.
    """

    gates: GatesConfig
    same_run: FpsSource | None = None

    def check(self, model_name: str, candidate: Any, champion: Any | None) -> list[Gate]:
        """The gates for two registered versions (MLflow ModelVersion objects; champion None when there is none)."""
        pair, why = self._same_run(model_name, candidate, champion) if champion is not None else (None, "")
        return check_gates(candidate.tags, champion.tags if champion else None, self.gates, same_run=pair,
                           why_tags=why)

    def _same_run(self, model_name: str, candidate: Any, champion: Any) -> tuple[FpsPair | None, str]:
        """The two versions' FPS from the newest run that measured both on one device, or why there is none."""
        if self.same_run is None:
            return None, ""
        versions = (int(candidate.version), int(champion.version))
        try:
            figures = self.same_run(model_name, versions)
        except YolofpsError as err:  # a failing store costs the comparison its best figures, not the decision
            return None, f"the benchmark store failed: {err}"
        if figures is None:
            return None, f"the benchmark store has no run that measured v{versions[0]} and v{versions[1]} on one device"
        return FpsPair(figures.fps[versions[0]], figures.fps[versions[1]],
                       f"from the benchmark store, {figures.source} run {figures.run_id} at "
                       f"{figures.measured_at:%Y-%m-%d %H:%M} UTC on {figures.device_name}"), ""


def check_gates(candidate: dict[str, str], champion: dict[str, str] | None, gates: GatesConfig, *,
                same_run: FpsPair | None = None, why_tags: str = "") -> list[Gate]:
    """The promotion gates on two versions' tags (metrics/mAP50-95B, fps_b1, device); the FPS comparison on
    `same_run` figures when given, else on the tags (`why_tags`: why the tags, for the gate's detail)."""
    cand_map, cand_fps = _map50_95(candidate), float(candidate.get("fps_b1", "nan"))
    checks = [Gate("mAP50-95 floor", cand_map >= gates.min_map50_95, f"{cand_map:.4f} >= {gates.min_map50_95}"),
              Gate("FPS floor", cand_fps >= gates.min_fps_b1, f"{cand_fps:.1f} >= {gates.min_fps_b1}")]
    if champion is None:
        return checks
    champ_map = _map50_95(champion)
    checks.append(Gate("mAP50-95 vs champion", cand_map >= champ_map - gates.map_tolerance,
                       f"{cand_map:.4f} >= {champ_map:.4f} - {gates.map_tolerance}"))
    if same_run is not None:
        return checks + [_fps_gate(same_run.candidate, same_run.champion, gates, same_run.source)]
    source = f"from version tags ({why_tags})" if why_tags else "from version tags"
    if candidate.get("bench_device_name") == champion.get("bench_device_name"):
        return checks + [_fps_gate(cand_fps, float(champion.get("fps_b1", "nan")), gates, source)]
    return checks + [Gate("FPS vs champion", False, f"measured on different devices "
                          f"({candidate.get('bench_device_name')} vs {champion.get('bench_device_name')}), {source}: "
                          "re-benchmark both on one device (python -m flows.bench), or --force with a reason")]


def _fps_gate(cand_fps: float, champ_fps: float, gates: GatesConfig, source: str) -> Gate:
    """Candidate FPS at least (1 + min_fps_gain) x the champion's; the detail names where the figures come from."""
    need = champ_fps * (1 + gates.min_fps_gain)
    return Gate("FPS vs champion", cand_fps >= need,
                f"{cand_fps:.1f} >= {champ_fps:.1f} x (1 + {gates.min_fps_gain}) = {need:.1f}, {source}")


def _map50_95(tags: dict[str, str]) -> float:
    """A version's mAP50-95 tag; versions registered before the one vocabulary (2026-12) spelled it `map50_95`."""
    return float(tags.get(MAP50_95, tags.get("map50_95", "nan")))


@dataclass(frozen=True)
class PromotionRequest:
    """Which version to judge (`version`, else the one `alias` points at) and how: dry run or forced, by whom, why."""

    version: int | None = None
    alias: str = CHALLENGER
    dry_run: bool = False
    force: bool = False
    reason: str = ""
    user: str = ""


def promote(cfg: MLflowConfig, model_name: str, judge: Judge, request: PromotionRequest = PromotionRequest(), *,
            retries: int = 3, backoff_s: float = 2.0) -> Promotion:
    """Move @champion to a version when `judge`'s gates pass against the current champion (or when forced)."""
    _quiet_http_retries()
    version, alias, force, reason, user = request.version, request.alias, request.force, request.reason, request.user
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking_uri)

    def attempt() -> Promotion:
        candidate = (client.get_model_version(model_name, str(version)) if version is not None
                     else client.get_model_version_by_alias(model_name, alias))
        champion = _version_by_alias(client, model_name, CHAMPION)
        if champion is not None and champion.version == candidate.version:
            return Promotion(model_name, int(candidate.version), int(champion.version),
                             [Gate("already champion", True, f"v{candidate.version} holds @champion")], False, False)
        checks = judge.check(model_name, candidate, champion)
        promo = Promotion(model_name, int(candidate.version), int(champion.version) if champion else None, checks,
                          moved=False, forced=force and not all(g.passed for g in checks))
        if request.dry_run or not (promo.passed or force):
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

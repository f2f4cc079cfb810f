"""What a benchmark concludes: speed-ups, the Pareto front, the selection policy, and the reports people read."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from yolofps.bench.rows import BenchRow
from yolofps.fileio import write_text
from yolofps.metric_names import MAP50, MAP50_95


def reference_row(rows: Sequence[BenchRow]) -> BenchRow | None:
    """The bar the optimizations must clear: the unpruned model's fastest row on any runtime, mode, float dtype and
    thread setting (OpenVINO bf16 included). What a runtime switch alone gives is not credited to pruning,
    distillation or quantization; INT8 of the unpruned model would be a yolofps optimization, so it is not a bar."""
    plain = [r for r in rows if r.model == "train" and r.dtype != "int8" and r.timed]
    return max(plain, key=lambda r: r.fps_b1, default=None)


def add_speedups(rows: Sequence[BenchRow]) -> None:
    """`speedup_b1` against the torch fp32 eager baseline and `speedup_vs_reference_b1` against `reference_row`."""
    baseline = next((r for r in rows if r.baseline and r.timed), None)
    reference = reference_row(rows)
    for row in rows:
        fps = row.fps_b1
        row.speedup_b1 = round(fps / baseline.fps_b1, 3) if fps and baseline else None
        row.speedup_vs_reference_b1 = round(fps / reference.fps_b1, 3) if fps and reference else None


CONTROL_ROW = "control/eager-fp32"


def accuracy_reference(rows: Sequence[BenchRow]) -> BenchRow | None:
    """The accuracy bar: the equal-budget control (the baseline trained on for the fine-tune epochs, torch fp32) when
    the prune stage made one, else the baseline. Every pruned or distilled model had that many epochs in all, so a
    variant is never credited with accuracy that only more training gave."""
    ok = [r for r in rows if r.status == "ok" and r.map50_95 is not None]
    return next((r for r in ok if r.name == CONTROL_ROW), None) or next((r for r in ok if r.baseline), None)


def judge_accuracy(rows: Sequence[BenchRow], max_map_drop: float) -> None:
    """Rows that ran but lose more than `max_map_drop` mAP50-95 against `accuracy_reference` become `rejected`."""
    reference = accuracy_reference(rows)
    for row in rows:
        if reference is None or row.map50_95 is None:
            continue
        row.map_drop = round(reference.map50_95 - row.map50_95, 5)
        if row.status == "ok" and row.map_drop > max_map_drop:
            row.reject(f"mAP50-95 {row.map50_95:.4f} is {row.map_drop:.4f} below {reference.name} "
                       f"(bench.max_map_drop {max_map_drop})")


def pareto_front(rows: Sequence[BenchRow]) -> list[str]:
    """Names of the rows no other row beats on both FPS and mAP50-95 (failed rows excluded), fastest first."""
    alive = [r for r in rows if r.timed]
    front = [r for r in alive
             if not any(o.fps_b1 >= r.fps_b1 and o.map50_95 >= r.map50_95
                        and (o.fps_b1 > r.fps_b1 or o.map50_95 > r.map50_95) for o in alive)]
    return [r.name for r in sorted(front, key=lambda r: -r.fps_b1)]


def select(rows: Sequence[BenchRow], policy: str, max_map_drop: float, fps_tie: float = 0.05) -> dict[str, Any]:
    """The variant to register: the fastest `ok` row (within `max_map_drop` of the baseline), with the reason.

    Rows within `fps_tie` (a fraction) of the fastest count as tied and the most accurate of them wins: two runs
    of one architecture (a pruned model with and without distillation) must not be told apart by noise.
    Policy `pareto` selects the same row and also lists the Pareto front for a registry that holds several.
    """
    ok = [r for r in rows if r.status == "ok" and r.fps_b1]
    if not ok:
        return {"name": None, "reason": "no variant ran successfully within the accuracy budget"}
    top = max(r.fps_b1 for r in ok)
    tied = [r for r in ok if r.fps_b1 >= top * (1 - fps_tie)]
    best = max(tied, key=lambda r: (r.map50_95, r.fps_b1))
    versus = f", {best.speedup_vs_reference_b1:.2f}x the unpruned model's fastest runtime" if (
        best.speedup_vs_reference_b1) else ""
    ties = f"; the most accurate of {len(tied)} variants within {fps_tie:.0%} of the top FPS" if len(tied) > 1 else ""
    bar = getattr(accuracy_reference(rows), "name", "the baseline")
    reason = (f"fastest variant within {max_map_drop} mAP50-95 of {bar}{ties}: {best.fps_b1:.1f} FPS end "
              f"to end at batch 1 ({best.speedup_b1 or 0.0:.2f}x the torch fp32 eager baseline{versus}), "
              f"mAP50-95 {best.map50_95:.4f} (drop {best.map_drop or 0.0:.4f})")
    selected = {"name": best.name, "reason": reason, "accuracy_reference": bar}
    if policy == "pareto":
        selected["front"] = pareto_front(rows)
    return selected


def markdown_table(rows: Sequence[BenchRow], environment: dict[str, Any], deployment: dict[str, Any],
                   selected: dict[str, Any]) -> str:
    """ultralytics-style benchmark table: one line per variant, end-to-end ms/img and FPS at batch 1."""
    where = environment.get("gpu") or f"{environment.get('cpu')} ({environment.get('cpu_cores')} cores)"
    reference = getattr(reference_row(rows), "name", None)
    lines = [f"Benchmark on {where}, torch {environment.get('torch')}, onnxruntime {environment.get('onnxruntime')}, "
             f"openvino {environment.get('openvino')}; imgsz {deployment['imgsz']}, batch 1, end to end (decode + "
             f"letterbox + model + NMS at conf {deployment['conf']}, IoU {deployment['iou']}, max_det "
             f"{deployment['max_det']}). vs torch eager: train/eager-fp32; vs fastest unpruned: {reference} (the "
             "unpruned model's fastest float row on any runtime). mAP50-95 drops are against "
             f"{getattr(accuracy_reference(rows), 'name', None)} (the equal-budget control: the baseline trained as "
             "many epochs as the pruned and distilled models).", "",
             f"| Variant | Status | Size (MB) | {MAP50_95} | {MAP50} | ms/img (pre+model+post) | FPS | vs torch eager "
             "| vs fastest unpruned |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lat = r.latency_ms_b1 or {}
        split = f"{lat['p50']:.1f} ({lat['pre']:.1f}+{lat['model']:.1f}+{lat['post']:.1f})" if lat else "-"
        mark = " **(selected)**" if r.name == selected.get("name") else ""
        lines.append(f"| {r.name}{mark} | {r.status} | {_num(r.size_mb, 2)} | {_num(r.map50_95, 4)} | "
                     f"{_num(r.map50, 4)} | {split} | {_num(r.fps_b1, 1)} | {_num(r.speedup_b1, 2, 'x')} | "
                     f"{_num(r.speedup_vs_reference_b1, 2, 'x')} |")
    failed = [r for r in rows if r.status != "ok" and r.reason]
    if failed:
        lines += ["", "Not selectable:"] + [f"- {r.name}: {r.reason}" for r in failed]
    lines += ["", f"Selected: {selected.get('name')} — {selected.get('reason')}"]
    return "\n".join(lines) + "\n"


def _num(value: Any, digits: int, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def write_csv(path: Path, rows: Sequence[BenchRow]) -> None:
    """One line per variant that ran (DVC plots: FPS vs mAP50-95)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = ["name", "status", "fps_b1", MAP50_95, MAP50, "size_mb"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(r.to_json() for r in rows if r.fps_b1)


def pareto_plot(path: Path, rows: Sequence[BenchRow]) -> None:
    """FPS (batch 1, end to end) against mAP50-95; the Pareto front joined and highlighted."""
    from matplotlib.figure import Figure  # rendered by Agg on save; no pyplot global state (as engine/plots.py)

    front = pareto_front(rows)
    by_name = {r.name: r for r in rows}
    fig = Figure(figsize=(8, 5.5))
    ax = fig.subplots()
    for r in (r for r in rows if r.timed):
        on_front = r.name in front
        ax.scatter(r.fps_b1, r.map50_95, s=50 if on_front else 25, marker="o" if r.status == "ok" else "x",
                   color="tab:red" if on_front else "tab:gray", zorder=3)
        ax.annotate(r.name, (r.fps_b1, r.map50_95), fontsize=7, xytext=(4, 3), textcoords="offset points")
    if front:
        points = sorted((by_name[n].fps_b1, by_name[n].map50_95) for n in front)
        ax.plot(*zip(*points), color="tab:red", linewidth=1, label="Pareto front")
        ax.legend(loc="lower left")
    ax.set(xlabel="FPS, batch 1, end to end", ylabel=MAP50_95, title="Speed vs accuracy (x = rejected)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def write_markdown(path: Path, text: str) -> None:
    write_text(path, text)

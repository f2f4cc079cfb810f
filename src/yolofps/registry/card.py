"""The model card: the description a registered version shows in the MLflow UI, written for a person.

What it is, how it was made (the chain of model folders it came from), how fast it ran on which device, and how
accurate it is against the baseline — all read from the files the pipeline wrote (metrics/bench.json and the
model folders' meta.json), so the card says what the bench measured and nothing else. Markdown: MLflow renders a
version's description as markdown.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from yolofps.metric_names import MAP50, MAP50_95
from yolofps.paths import Paths

MAX_CHARS = 5000  # MLflow stores a version description in a 5000-character column
QUANTIZERS = {"openvino": "OpenVINO NNCF post-training INT8", "onnxruntime": "ONNX Runtime static INT8 (QDQ)"}


@dataclass(frozen=True)
class CardFacts:
    """Everything the card says, gathered from the pipeline's files (see `card_facts`)."""

    model_name: str
    version: int
    row: dict[str, Any]  # the registered variant's metrics/bench.json row
    bench: dict[str, Any]  # the whole metrics/bench.json
    chain: list[dict[str, Any]]  # meta.json of each model folder, from the baseline to the registered model
    names: list[str]  # class names
    lineage: dict[str, str]  # git commit, params hash, pipeline run id (the version's lineage tags)


def model_chain(paths: Paths, model: str) -> list[dict[str, Any]]:
    """meta.json of `model`'s folder and of each `source` it names, baseline first (train <- prune-0.5 <- ...)."""
    chain, seen = [], set()
    name: str | None = model
    while name and name not in seen:  # a cycle would be a corrupt folder: stop rather than loop
        seen.add(name)
        folder = paths.models("quantize") if name == "quantize" else paths.model_folder(name)
        meta_file = folder / "meta.json"
        if not meta_file.is_file():
            break
        meta = json.loads(meta_file.read_text())
        chain.append({"name": name} | meta)
        name = meta.get("source")
    return chain[::-1]


def render_card(facts: CardFacts) -> str:
    """The markdown description, cut to MLflow's limit."""
    sections = [_what(facts), _made(facts), _speed(facts), _accuracy(facts), _use(facts)]
    text = "\n\n".join(sections)
    return text if len(text) <= MAX_CHARS else text[: MAX_CHARS - 20] + "\n\n(cut to fit)"


def _what(facts: CardFacts) -> str:
    row, deployment = facts.row, facts.bench["environment"]["deployment"]
    threads = f", {row['threads']} intra-op thread(s)" if row.get("threads") else ""
    return (f"## {facts.model_name} v{facts.version}: `{row['name']}`\n\n"
            f"A YOLOv5 detector with its pre-processing (letterbox to {row['imgsz']} px) and NMS (conf "
            f"{deployment['conf']}, IoU {deployment['iou']}, at most {deployment['max_det']} boxes) inside one MLflow "
            f"pyfunc: image files in, boxes in original pixels out. Runs on **{row['runtime']} {row['dtype']}**"
            f"{threads}; {row['params_m']} M parameters, {row['gflops']} GFLOPs at {row['imgsz']} px, "
            f"{row.get('size_mb')} MB on disk. Classes ({len(facts.names)}): {', '.join(facts.names)}.")


def _made(facts: CardFacts) -> str:
    steps = [_step(meta, facts.row) for meta in facts.chain] or [f"`{facts.row['model']}`"]
    lineage = ", ".join(f"{key} `{value}`" for key, value in facts.lineage.items() if value)
    selected = facts.bench["selected"]
    why = (f"\n\nThe bench selected it: {selected['reason']}." if selected.get("name") == facts.row["name"]
           else f"\n\nRegistered by name (`register.variant`); the bench selected `{selected.get('name')}`.")
    return f"### How it was made\n\n{' → '.join(steps)}.{why}" + (f"\n\nLineage: {lineage}." if lineage else "")


def _step(meta: dict[str, Any], row: dict[str, Any]) -> str:
    """One link of the chain, in words."""
    name, job = meta["name"], meta.get("job", meta["name"])
    if name == "quantize":
        return f"{QUANTIZERS.get(row['runtime'], 'INT8')} of `{meta.get('source')}`"
    epochs = f", {meta['epoch']} epochs" if meta.get("epoch") is not None else ""
    if job == "train":
        return f"`train`: YOLOv5{meta.get('model', '')} trained from the data set{epochs} ({meta.get('optimizer', '')})"
    if job == "distill":
        return f"`distill`: `{meta.get('source')}` distilled from the baseline{epochs}"
    if name.startswith("prune-"):
        tuned = f", fine-tuned {meta['epoch']} epochs" if meta.get("epoch") is not None else ""
        return f"`{name}`: structured channel pruning of `{meta.get('source')}` (torch-pruning){tuned}"
    return f"`{name}`{epochs}"


def _speed(facts: CardFacts) -> str:
    row, env = facts.row, facts.bench["environment"]
    latency = row.get("latency_ms_b1") or {}
    device = env.get("gpu") or f"{env.get('cpu')} x{env.get('cpu_cores')} ({' '.join(env.get('cpu_flags', []))})"
    throughput = ", ".join(f"batch {batch}: {fps} img/s" for batch, fps in (row.get("throughput") or {}).items())
    speedups = (f"{row.get('speedup_b1')}x the baseline (torch fp32 eager), "
                f"{row.get('speedup_vs_reference_b1')}x the unpruned model's fastest runtime")
    return (f"### Speed on {device}\n\nMeasured end to end (file decode, letterbox, model, NMS) by the bench stage "
            f"at {env.get('time_utc')}, {env.get('threads')} torch threads, {row['imgsz']} px:\n\n"
            "| batch-1 FPS | p50 ms | p95 ms | p99 ms | pre ms | model ms | post ms |\n|---|---|---|---|---|---|---|\n"
            f"| {row.get('fps_b1')} | {latency.get('p50')} | {latency.get('p95')} | {latency.get('p99')} | "
            f"{latency.get('pre')} | {latency.get('model')} | {latency.get('post')} |\n\n"
            f"Throughput: {throughput}. Speed-up: {speedups}. These figures belong to this device; "
            "`python -m flows.bench` re-measures versions side by side on another one.")


def _accuracy(facts: CardFacts) -> str:
    row, evaluation = facts.row, facts.bench["environment"]["evaluation"]
    baseline = next((v for v in facts.bench["variants"] if v.get("baseline")), {})
    drop = row.get("map_drop")
    versus = (f" The baseline (`{baseline.get('name')}`) scores {baseline.get(MAP50_95)}: a drop of {drop}."
              if baseline else "")
    return (f"### Accuracy\n\nmAP50-95 **{row.get(MAP50_95)}**, mAP50 {row.get(MAP50)} on {evaluation['images']} "
            f"validation images (conf {evaluation['conf']}, IoU {evaluation['iou']}).{versus} Bench status: "
            f"{row['status']}{' (' + row['reason'] + ')' if row.get('reason') else ''}. The run's artifacts hold the "
            "whole bench table (`bench/bench.md`, `bench/bench.json`) and the speed/accuracy Pareto plot "
            "(`bench/pareto.png`).")


def _use(facts: CardFacts) -> str:
    uri = f"models:/{facts.model_name}/{facts.version}"
    return (f"### Use\n\n```\nyolofps predict images/ --model {uri}\n"
            f"mlflow.pyfunc.load_model(\"{uri}\").predict(pandas.DataFrame({{\"image\": [\"photo.jpg\"]}}))\n```")

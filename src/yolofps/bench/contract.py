"""The `metrics/bench.json` contract as a JSON Schema: the bench stage checks what it writes, readers what they read."""

from __future__ import annotations

from typing import Any

import jsonschema

from yolofps.errors import YolofpsError
from yolofps.metric_names import MAP50, MAP50_95

_NUMBER = {"type": ["number", "null"]}
_LATENCY = {"type": ["object", "null"], "required": ["p50", "p95", "p99", "pre", "model", "post"],
            "properties": {k: {"type": "number", "minimum": 0} for k in ("p50", "p95", "p99", "pre", "model", "post")}}

VARIANT = {
    "type": "object",
    "required": ["name", "baseline", "model", "runtime", "mode", "status", "device", "dtype", "imgsz", "fps_b1",
                 "latency_ms_b1", "throughput", MAP50_95, MAP50, "size_mb", "params_m", "gflops", "speedup_b1"],
    "properties": {
        "name": {"type": "string"},
        "baseline": {"type": "boolean"},
        "model": {"type": "string"},
        "runtime": {"enum": ["torch", "onnxruntime", "openvino", "xla"]},
        "mode": {"enum": ["eager", "channels_last", "trace", "compile", "cudagraph"]},
        "status": {"enum": ["ok", "failed", "rejected"]},
        "device": {"type": "string"},
        "dtype": {"enum": ["fp32", "fp16", "bf16", "int8"]},
        "imgsz": {"type": "integer", "minimum": 32},
        "fps_b1": _NUMBER,
        "latency_ms_b1": _LATENCY,
        "throughput": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0}},
        MAP50_95: {"type": ["number", "null"], "minimum": 0, "maximum": 1},
        MAP50: {"type": ["number", "null"], "minimum": 0, "maximum": 1},
        "size_mb": _NUMBER,
        "params_m": _NUMBER,
        "gflops": _NUMBER,
        "speedup_b1": _NUMBER,
        "speedup_vs_reference_b1": _NUMBER,  # against the unpruned model's fastest float row, any runtime
        "threads": {"type": "integer", "minimum": 0},  # ONNX Runtime / OpenVINO threads; 0 = environment.threads
        "reason": {"type": "string"},
        "artifact": {"type": "string"},
    },
    "allOf": [{"if": {"properties": {"status": {"const": "failed"}}}, "then": {"required": ["reason"]}},
              {"if": {"properties": {"status": {"const": "ok"}}},
               "then": {"properties": {"fps_b1": {"type": "number", "exclusiveMinimum": 0},
                                       "latency_ms_b1": {"type": "object"}, MAP50_95: {"type": "number"}}}}],
}

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["environment", "variants", "selected"],
    "properties": {
        "environment": {"type": "object", "required": ["cpu", "cpu_cores", "torch", "onnxruntime", "device", "imgsz"]},
        "variants": {"type": "array", "items": VARIANT, "minItems": 1},
        "selected": {"type": "object", "required": ["name", "reason"],
                     "properties": {"name": {"type": ["string", "null"]}, "reason": {"type": "string"},
                                    "front": {"type": "array", "items": {"type": "string"}}}},
    },
}


class BenchContractError(YolofpsError):
    """A bench.json that does not follow the contract (the message says where)."""


def validate(result: dict[str, Any], source: str = "metrics/bench.json") -> None:
    """Raise BenchContractError naming the first violation; also checks percentiles are ordered."""
    try:
        jsonschema.validate(result, SCHEMA)
    except jsonschema.ValidationError as err:
        where = "/".join(str(p) for p in err.absolute_path) or "top level"
        raise BenchContractError(f"{source}: {where}: {err.message}") from None
    names = [v["name"] for v in result["variants"]]
    if len(set(names)) != len(names):
        raise BenchContractError(f"{source}: variant names repeat")
    for variant in result["variants"]:
        lat = variant["latency_ms_b1"]
        if lat and not lat["p50"] <= lat["p95"] <= lat["p99"]:
            raise BenchContractError(f"{source}: {variant['name']}: percentiles out of order {lat}")
    if result["selected"]["name"] is not None and result["selected"]["name"] not in names:
        raise BenchContractError(f"{source}: selected {result['selected']['name']!r} is not a variant")

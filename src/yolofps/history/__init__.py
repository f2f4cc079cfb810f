"""The benchmark history: every measurement (bench stage, re-bench, load test) in a SQLAlchemy store.

    from yolofps.history import Measurement, open_store
    store = open_store("sqlite:///benchmarks.db")      # any SQLAlchemy URL; migrates to the Alembic head
    store.append(rows); store.query(device="EPYC", model="yolofps-detector/3", limit=20)

`bench.store` in params.yaml says where; the schema lives in `schema.py` and changes only through a revision
in `migrations/versions/`.
"""

from __future__ import annotations

from yolofps.history.measurement import Measurement, MeasuringRun, bench_measurements, content_hash, table
from yolofps.history.store import PairedFps, Store, append_or_warn, mark_or_warn, open_store, same_run_fps, store_url

__all__ = ["Measurement", "MeasuringRun", "PairedFps", "Store", "append_or_warn", "bench_measurements", "content_hash",
           "mark_or_warn", "open_store", "same_run_fps", "store_url", "table"]

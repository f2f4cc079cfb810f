"""The benchmark store's tables (SQLAlchemy 2 ORM). Schema changes go through an Alembic revision in migrations/.

Names carry a `bench_` prefix, the Alembic version table too: at scale the store may share one PostgreSQL
database with MLflow, whose own Alembic table is `alembic_version`.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, DateTime, Float, Index, Integer, String
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

TABLE = "bench_measurements"
VERSION_TABLE = "bench_alembic_version"


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC datetime on every backend (SQLite keeps no zone: it is stored as UTC and read back so)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"measured_at must be timezone-aware (UTC), got naive {value}")
        utc = value.astimezone(dt.timezone.utc)
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


class Base(DeclarativeBase):
    """The store's declarative base: its metadata is what the migrations must produce (a test compares them)."""


class MeasurementRecord(Base):
    """One measurement: who was measured (model hash, version, variant, how it ran), where, and the figures."""

    __tablename__ = TABLE
    __table_args__ = (Index("ix_bench_measurements_model", "model_name", "model_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    measured_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    run_id: Mapped[str] = mapped_column(String(64), index=True)  # one per measuring run
    source: Mapped[str] = mapped_column(String(64))  # bench | rebench | serve:yolofps | serve:mlflow ...
    model_hash: Mapped[str | None] = mapped_column(String(64), index=True)  # the registry's content hash
    model_name: Mapped[str | None] = mapped_column(String(256))
    model_version: Mapped[int | None] = mapped_column(Integer)
    variant: Mapped[str | None] = mapped_column(String(256))
    runtime: Mapped[str | None] = mapped_column(String(32))
    mode: Mapped[str | None] = mapped_column(String(32))
    dtype: Mapped[str | None] = mapped_column(String(16))
    batch: Mapped[int] = mapped_column(Integer)
    imgsz: Mapped[int | None] = mapped_column(Integer)
    device_name: Mapped[str] = mapped_column(String(256), index=True)
    cpu_flags: Mapped[str | None] = mapped_column(String(512))  # comma-separated, bench.environment.DECISIVE_FLAGS
    threads: Mapped[int | None] = mapped_column(Integer)
    p50_ms: Mapped[float | None] = mapped_column(Float)
    p95_ms: Mapped[float | None] = mapped_column(Float)
    p99_ms: Mapped[float | None] = mapped_column(Float)
    throughput: Mapped[float | None] = mapped_column(Float)  # images/s
    map50_95: Mapped[float | None] = mapped_column(Float)
    git_commit: Mapped[str | None] = mapped_column(String(64))
    params_hash: Mapped[str | None] = mapped_column(String(64))
    extra: Mapped[dict[str, Any]] = mapped_column(JSON)

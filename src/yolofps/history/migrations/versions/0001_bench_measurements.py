"""bench_measurements: one row per measurement (bench stage, re-bench, load test).

Revision ID: 0001
Revises:
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TABLE = "bench_measurements"


def upgrade() -> None:
    """Create the measurements table and the indexes the history queries use."""
    op.create_table(
        TABLE,
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("measured_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("model_hash", sa.String(64), nullable=True),
        sa.Column("model_name", sa.String(256), nullable=True),
        sa.Column("model_version", sa.Integer(), nullable=True),
        sa.Column("variant", sa.String(256), nullable=True),
        sa.Column("runtime", sa.String(32), nullable=True),
        sa.Column("mode", sa.String(32), nullable=True),
        sa.Column("dtype", sa.String(16), nullable=True),
        sa.Column("batch", sa.Integer(), nullable=False),
        sa.Column("imgsz", sa.Integer(), nullable=True),
        sa.Column("device_name", sa.String(256), nullable=False),
        sa.Column("cpu_flags", sa.String(512), nullable=True),
        sa.Column("threads", sa.Integer(), nullable=True),
        sa.Column("p50_ms", sa.Float(), nullable=True),
        sa.Column("p95_ms", sa.Float(), nullable=True),
        sa.Column("p99_ms", sa.Float(), nullable=True),
        sa.Column("throughput", sa.Float(), nullable=True),
        sa.Column("map50_95", sa.Float(), nullable=True),
        sa.Column("git_commit", sa.String(64), nullable=True),
        sa.Column("params_hash", sa.String(64), nullable=True),
        sa.Column("extra", sa.JSON(), nullable=False),
    )
    for column in ("measured_at", "run_id", "model_hash", "device_name"):
        op.create_index(f"ix_{TABLE}_{column}", TABLE, [column])
    op.create_index(f"ix_{TABLE}_model", TABLE, ["model_name", "model_version"])


def downgrade() -> None:
    """Drop the table (its indexes go with it)."""
    op.drop_table(TABLE)

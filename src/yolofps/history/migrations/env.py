"""Alembic environment of the benchmark store, run by `yolofps.history.store.upgrade` (no alembic.ini).

The store hands over its connection (`config.attributes["connection"]`, Alembic's connection-sharing recipe),
so a migration runs in the store's transaction.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from yolofps.history.schema import VERSION_TABLE, Base

# any constant: concurrent first opens of one PostgreSQL store wait for each other instead of racing the DDL
ADVISORY_LOCK = 7_205_119


def run_migrations() -> None:
    """Migrate over the connection the store opened."""
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("the benchmark store migrates through yolofps.history.open_store(url), which passes its "
                           "connection in config.attributes['connection']")
    # render_as_batch: SQLite cannot ALTER most things; batch mode copies the table instead (a no-op elsewhere)
    context.configure(connection=connection, target_metadata=Base.metadata, version_table=VERSION_TABLE,
                      render_as_batch=True)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text(f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK})"))
        context.run_migrations()


run_migrations()

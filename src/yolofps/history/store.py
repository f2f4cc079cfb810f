"""The benchmark store: any SQLAlchemy URL (`sqlite:///benchmarks.db` by default, PostgreSQL at scale), its schema
kept at the Alembic head on open, as `mlflow db upgrade` keeps MLflow's.

Credentials never sit in the URL (params.yaml is committed): `YOLOFPS_BENCH_STORE_PASSWORD` is set on the URL
when present, and PostgreSQL's drivers also read `PGPASSWORD` and `~/.pgpass` themselves (libpq).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, and_, create_engine, desc, distinct, func, or_, select, update
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from yolofps.errors import StoreError, StoreUnavailable
from yolofps.history.measurement import Measurement
from yolofps.history.schema import VERSION_TABLE, MeasurementRecord
from yolofps.redact import redact_text

MIGRATIONS = Path(__file__).parent / "migrations"
PASSWORD_ENV = "YOLOFPS_BENCH_STORE_PASSWORD"
CONNECT_TIMEOUT_S = 10  # a server that does not answer: fail in seconds, not after the OS's TCP timeout
FIELDS = [f.name for f in dataclasses.fields(Measurement)]


@dataclass(frozen=True)
class PairedFps:
    """Two versions' batch-1 FPS from one measuring run on one device: the newest such run in the store."""

    run_id: str
    source: str
    measured_at: dt.datetime
    device_name: str
    fps: dict[int, float]  # version -> images/s at batch 1


def store_url(url: str, root: Path | None = None) -> URL:
    """The URL parsed, a relative SQLite path made absolute against `root` (the project), the password env applied."""
    try:
        parsed = make_url(url)
    except ArgumentError as err:
        raise StoreError(f"bench.store {url!r} is not a SQLAlchemy URL ({err}); e.g. sqlite:///benchmarks.db or "
                         "postgresql://user@host:5432/db") from None
    if _sqlite_file(parsed) and not Path(parsed.database).is_absolute():
        parsed = parsed.set(database=str((Path(root or ".") / parsed.database).resolve()))
    if os.environ.get(PASSWORD_ENV):
        parsed = parsed.set(password=os.environ[PASSWORD_ENV])
    return parsed


def _sqlite_file(url: URL) -> bool:
    """A SQLite file named by path (not in memory, not a `file:` URI filename, which SQLite resolves itself)."""
    database = url.database or ""
    return url.get_backend_name() == "sqlite" and database not in ("", ":memory:") and not database.startswith("file:")


def postgres_driver() -> str | None:
    """The PostgreSQL driver installed: psycopg (3, SQLAlchemy 2.1's default) or psycopg2 (2.0's), else None."""
    import importlib.util

    return next((name for name in ("psycopg", "psycopg2") if importlib.util.find_spec(name)), None)


def _engine(url: URL) -> Engine:
    """An engine for the URL; an unknown dialect or a missing driver is a StoreError naming the fix."""
    if url.drivername == "postgresql" and postgres_driver():  # a plain postgresql:// means whichever is installed
        url = url.set(drivername=f"postgresql+{postgres_driver()}")
    connect_args = {"connect_timeout": CONNECT_TIMEOUT_S} if url.get_backend_name() == "postgresql" else {}
    try:
        return create_engine(url, pool_pre_ping=True, connect_args=connect_args)
    except NoSuchModuleError as err:
        raise StoreError(f"bench.store {_shown(url)}: unknown database dialect ({err})") from None
    except ImportError as err:  # the dialect's driver is not installed (psycopg2 for postgresql://)
        raise StoreError(f"bench.store {_shown(url)}: its database driver is not installed ({err}); "
                         "`pip install yolofps[scale]` brings the PostgreSQL drivers") from None


def _shown(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def _alembic_config(connection=None):
    """Alembic's Config without an ini file: the packaged migrations, and the connection to migrate over."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))  # ini interpolation escapes %
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest revision the packaged migrations know."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None before the first migration)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE}).get_current_revision()


def upgrade(engine: Engine) -> None:
    """`alembic upgrade head` over the engine; a no-op when the schema is already at head."""
    from alembic import command
    from alembic.util import CommandError

    head, current = head_revision(), current_revision(engine)
    if current == head:
        return
    try:
        with engine.begin() as connection:
            command.upgrade(_alembic_config(connection), "head")
    except CommandError as err:  # e.g. a store migrated by a newer yolofps: a revision this one does not know
        raise StoreError(f"the benchmark store {_shown(engine.url)} is at schema revision {current}, which this "
                         f"yolofps (head {head}) cannot migrate ({err}): upgrade yolofps, or use another store"
                         ) from None
    except SQLAlchemyError:
        if current_revision(engine) != head:  # not a twin process that migrated it first
            raise


def _failure(url: URL, err: Exception) -> StoreError:
    """A database error as the named error: a server that does not answer is transient, the rest is not."""
    message = redact_text(f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err) else ''}")
    if isinstance(err, OperationalError) and url.get_backend_name() != "sqlite":
        return StoreUnavailable(f"the benchmark store {_shown(url)} did not answer ({message}); check that the "
                                "server is up and bench.store points at it")
    return StoreError(f"the benchmark store {_shown(url)} cannot be used ({message})")


def open_store(url: str = "sqlite:///benchmarks.db", *, root: Path | None = None) -> Store:
    """Connect to the store at `url` (relative SQLite paths against `root`) and migrate it to the Alembic head."""
    parsed = store_url(url, root)
    if _sqlite_file(parsed):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = _engine(parsed)
    try:
        upgrade(engine)
    except SQLAlchemyError as err:
        engine.dispose()
        raise _failure(parsed, err) from None
    return Store(engine)


class Store:
    """Append and read measurements; mark the registered version on the rows of its content hash."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def url(self) -> str:
        """The store's URL, password hidden."""
        return _shown(self.engine.url)

    def append(self, rows: Sequence[Measurement]) -> int:
        """Insert the rows in one transaction; returns how many."""
        records = [MeasurementRecord(**{name: getattr(m, name) for name in FIELDS} | {
            "cpu_flags": ",".join(m.cpu_flags), "extra": dict(m.extra)}) for m in rows]
        with self._session() as session, session.begin():
            session.add_all(records)
        return len(records)

    def query(self, device: str | None = None, model: str | None = None, limit: int = 50) -> list[Measurement]:
        """The newest `limit` measurements, newest first; `device` matches part of the device name, `model` a
        registered name, `name/version` (as in models:/name/version), a variant or the start of a content hash."""
        statement = select(MeasurementRecord)
        if device:
            name = func.lower(MeasurementRecord.device_name)
            statement = statement.where(name.contains(device.lower(), autoescape=True))
        if model:
            statement = statement.where(_model_filter(model))
        statement = statement.order_by(desc(MeasurementRecord.measured_at), desc(MeasurementRecord.id)).limit(limit)
        with self._session() as session:
            return [_measurement(record) for record in session.scalars(statement)]

    def mark_version(self, model_hash: str, model_name: str, version: int) -> int:
        """Name a registered version on every row of its content; returns how many rows carry it now.

        A version number names one content: rows of another content that still carry it (a registry started
        afresh reuses numbers) lose it, so a comparison by version never mixes two models.
        """
        record = MeasurementRecord
        stale = and_(record.model_name == model_name, record.model_version == version, record.model_hash != model_hash)
        mine = and_(record.model_hash == model_hash, or_(record.model_name.is_(None), record.model_name == model_name))
        with self._session() as session, session.begin():
            session.execute(update(record).where(stale).values(model_name=None, model_version=None))
            return session.execute(update(record).where(mine).values(model_name=model_name,
                                                                      model_version=version)).rowcount

    def paired_fps(self, model_name: str, versions: tuple[int, int]) -> PairedFps | None:
        """Both versions' batch-1 FPS from the newest run that measured both on one device (None if none did)."""
        record = MeasurementRecord
        timed = and_(record.model_name == model_name, record.model_version.in_(versions), record.batch == 1,
                     record.throughput.is_not(None))
        at = func.max(record.measured_at).label("at")
        newest = (select(record.run_id, record.device_name, at).where(timed)
                  .group_by(record.run_id, record.device_name)
                  .having(func.count(distinct(record.model_version)) == len(set(versions)))
                  .order_by(desc(at)).limit(1))
        with self._session() as session:
            found = session.execute(newest).first()
            if found is None:
                return None
            rows = session.scalars(select(record).where(timed, record.run_id == found.run_id,
                                                        record.device_name == found.device_name)
                                   .order_by(record.measured_at, record.id)).all()
        fps = {row.model_version: row.throughput for row in rows}  # the run's latest row of each version wins
        return PairedFps(found.run_id, rows[-1].source, rows[-1].measured_at, found.device_name, fps)

    def close(self) -> None:
        """Release the connections."""
        self.engine.dispose()

    @contextlib.contextmanager
    def _session(self) -> Iterator[Session]:
        """A session whose database errors come out as the named store errors."""
        try:
            with Session(self.engine, expire_on_commit=False) as session:
                yield session
        except SQLAlchemyError as err:
            raise _failure(self.engine.url, err) from None


def _model_filter(text: str):
    """`name`, `name/version` (models:/ prefix optional), a variant, or a content-hash prefix."""
    text = text.removeprefix("models:/")
    record = MeasurementRecord
    name, _, version = text.rpartition("/")
    if name and version.isdigit():
        return and_(record.model_name == name, record.model_version == int(version))
    return or_(record.model_name == text, record.variant == text, record.model_hash.startswith(text, autoescape=True))


def _measurement(record: MeasurementRecord) -> Measurement:
    values = {name: getattr(record, name) for name in FIELDS}
    values["cpu_flags"] = tuple(flag for flag in (record.cpu_flags or "").split(",") if flag)
    values["extra"] = dict(record.extra or {})
    return Measurement(**values)


def append_or_warn(store: Store, rows: Sequence[Measurement]) -> str:
    """Append the rows and say so; a store failure is printed as a warning and returned, never raised.

    For writers whose own outputs are already on disk (the bench stage's metrics/bench.json holds every figure
    of these rows): a store that fails after the work must not discard it.
    """
    run_ids = sorted({m.run_id for m in rows})
    try:
        count = store.append(rows)
    except StoreError as err:
        note = f"not recorded in the benchmark store: {err}"
        print(f"warning: {len(rows)} measurements (run {', '.join(run_ids)}) {note}", file=sys.stderr, flush=True)
        return note
    note = f"{count} measurements (run {', '.join(run_ids)}) -> {store.url}"
    print(f"history: {note}", flush=True)
    return note


def mark_or_warn(store: Store, model_hash: str, model_name: str, version: int) -> int | None:
    """Name a registered version on the rows of its content; a store failure is a warning (None), never raised."""
    try:
        marked = store.mark_version(model_hash, model_name, version)
    except StoreError as err:
        print(f"warning: the benchmark rows of {model_name} v{version} keep no version: {err}", file=sys.stderr,
              flush=True)
        return None
    print(f"history: {model_name} v{version} named on {marked} measurements of its content", flush=True)
    return marked


def same_run_fps(url: str, root: Path | None = None) -> Callable[[str, tuple[int, int]], PairedFps | None]:
    """The promotion gate's FPS source over the store at `url`, opened when asked (failures: StoreError)."""
    def figures(model_name: str, versions: tuple[int, int]) -> PairedFps | None:
        store = open_store(url, root=root)
        try:
            return store.paired_fps(model_name, versions)
        finally:
            store.close()

    return figures

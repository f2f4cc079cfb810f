"""Real servers for the scale-out test: PostgreSQL from Debian's `postgresql` package and a Prefect server on it.

`running_postgres(...)` runs `initdb` + `pg_ctl` on a throwaway data folder and a free loopback port, as the
`postgres` system user when the tests run as root (PostgreSQL refuses root). URLs never carry the password:
libpq (psycopg2) and asyncpg both read it from `PGPASSWORD`, which `Postgres.env()` gives the processes that
connect, so nothing written to params.yaml, a command line or a log holds it.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from helpers import free_port, tool_env, wait_for_url

SERVER_USER = "postgres"  # the system user Debian's package creates; it runs the server when we are root
PG_TOOLS = ("initdb", "pg_ctl")


def postgres_bin() -> Path | None:
    """The folder holding initdb and pg_ctl: Debian's newest /usr/lib/postgresql/N/bin, else PATH; None if none."""
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
                      if Path(p).parent.name.isdigit() else 0)
    for folder in [*reversed(versions), *(str(Path(found).resolve().parent) for found in [shutil.which("initdb")]
                                          if found)]:
        if all(os.access(Path(folder) / tool, os.X_OK) for tool in PG_TOOLS):
            return Path(folder)
    return None


@dataclass(frozen=True)
class Postgres:
    """A running PostgreSQL server: where it listens and the one login the stores use."""

    data_dir: Path
    port: int
    user: str
    password: str
    pid: int
    host: str = "127.0.0.1"

    def url(self, database: str, driver: str = "psycopg2") -> str:
        """An SQLAlchemy URL without the password (the client reads PGPASSWORD from env())."""
        return f"postgresql+{driver}://{self.user}@{self.host}:{self.port}/{database}"

    def env(self) -> dict[str, str]:
        """What a process that connects needs in its environment."""
        return {"PGPASSWORD": self.password}

    def query(self, database: str, statement: str, params: Sequence[object] = ()) -> list[tuple]:
        """The rows of one SQL statement, as the stores' user over TCP with its password."""
        import psycopg2

        connection = psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                                      dbname=database)
        try:
            with connection.cursor() as cursor:
                cursor.execute(statement, params)
                return cursor.fetchall()
        finally:
            connection.close()


def _as_server_user(command: Sequence[str]) -> list[str]:
    """The command as the `postgres` user when we are root (postgres refuses to run as root), else as is."""
    return ["runuser", "-u", SERVER_USER, "--", *command] if os.geteuid() == 0 else list(command)


def _run(command: Sequence[str]) -> None:
    result = subprocess.run(_as_server_user(command), capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")


def _make_folder() -> Path:
    """A private temp folder the server user owns (pytest's tmp_path is root-only, so not there)."""
    folder = Path(tempfile.mkdtemp(prefix="yolofps-pg-"))  # short: the unix socket path must stay < 108 bytes
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam(SERVER_USER)
        except KeyError:
            folder.rmdir()
            raise RuntimeError(f"running as root, PostgreSQL needs the {SERVER_USER!r} system user to run as "
                               "(Debian's postgresql package creates it)") from None
        os.chown(folder, account.pw_uid, account.pw_gid)
    return folder


def _create_stores(socket_dir: Path, port: int, user: str, password: str, databases: Sequence[str]) -> None:
    """The login role and one database per store, owned by it (Prefect then creates its pg_trgm extension)."""
    import psycopg2
    from psycopg2 import sql

    admin = psycopg2.connect(host=str(socket_dir), port=port, user=SERVER_USER, dbname="postgres")  # local: trust
    admin.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    try:
        with admin.cursor() as cursor:
            cursor.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(user)), [password])
            for name in databases:
                cursor.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name),
                                                                            sql.Identifier(user)))
    finally:
        admin.close()


@contextmanager
def running_postgres(databases: Sequence[str], user: str = "yolofps") -> Iterator[Postgres]:
    """A PostgreSQL server on a free loopback port with `databases` owned by a password login `user`."""
    tools = postgres_bin()
    if tools is None:
        raise FileNotFoundError("no PostgreSQL server binaries (initdb, pg_ctl): apt-get install postgresql")
    folder = _make_folder()
    data, port, password = folder / "data", free_port(), secrets.token_urlsafe(18)
    try:
        # trust on the unix socket (in the private folder) for setup; TCP logins need a password (scram-sha-256)
        _run([str(tools / "initdb"), "-D", str(data), "-U", SERVER_USER, "-E", "UTF8", "--locale=C", "--no-sync",
              "--auth-local=trust", "--auth-host=scram-sha-256"])
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"  # fsync off: a throwaway
        _run([str(tools / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-o", options, "-w",
              "-t", "90", "start"])
        pid = int((data / "postmaster.pid").read_text().split()[0])
        try:
            _create_stores(folder, port, user, password, databases)
            yield Postgres(data, port, user, password, pid)
        finally:
            _stop_postgres(tools, data, pid)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _stop_postgres(tools: Path, data: Path, pid: int) -> None:
    """`pg_ctl stop -m fast` (it signals the postmaster by the PID in its pid file); SIGKILL that PID if it fails."""
    try:
        _run([str(tools / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop"])
    except (RuntimeError, subprocess.TimeoutExpired):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop_process(process: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a server started with start_new_session=True: SIGTERM its process group, SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)


def prefect_env(api_url: str, home: Path) -> dict[str, str]:
    """Environment for a Prefect client process of that server: its API, a private PREFECT_HOME, analytics off."""
    return tool_env() | {"PREFECT_API_URL": api_url, "PREFECT_HOME": str(home),
                         "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


@contextmanager
def running_prefect_server(database_url: str, folder: Path, extra_env: dict[str, str]) -> Iterator[str]:
    """`prefect server start` on a free port over `database_url` (postgresql+asyncpg://...); yields the API URL.

    PREFECT_HOME and the server's log are in `folder`. `--no-scheduler`: deployments keep their cron schedules,
    but no scheduled run comes due during a test and reaches its worker first.
    """
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = prefect_env(api_url, folder / "prefect-home") | extra_env
    env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
    env.pop("PREFECT_API_URL")  # the server serves it
    with open(folder / "prefect-server.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                    "--port", str(port), "--no-ui", "--no-scheduler"], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_url(f"{api_url}/health", process, timeout=240)  # the first start runs Prefect's migrations
            yield api_url
        finally:
            stop_process(process)

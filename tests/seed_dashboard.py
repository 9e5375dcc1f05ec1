"""The studio's seed dashboard for contract tests: its tables in a real PostgreSQL server, and a
faithful port of its `handleWebhook`.

Use from a test module (or conftest.py):

    import seed_dashboard
    from seed_dashboard import handle_webhook

    @pytest.fixture(scope="session")
    def postgres():
        yield from seed_dashboard.postgres_server()

    @pytest.fixture
    def dashboard_db(postgres):
        yield from seed_dashboard.fresh_database(postgres)

    def test_x(dashboard_db):
        handle_webhook(dashboard_db.conn, {"job_id": dashboard_db.job_id, "status": "training"})

`postgres_server()` (one per session) runs a server from Debian's `postgresql` package (`initdb`/`pg_ctl` under
/usr/lib/postgresql/*/bin, as the `postgres` user when the tests run as root), listening only on a
unix socket in a temporary folder. `fresh_database()` gives each test a fresh database holding the
contract file's tables, with stand-ins for what Supabase provides (`auth.users`, `training_files`,
`uuid_generate_v4()`), and one `queued` training job whose id is the worker's `job_id`.

The tables come from the contract file at test time (its ```sql blocks), so the tests follow it.
Without PostgreSQL the tests are skipped, except in CI (`CI` set), where they fail: `.ci/run`
installs the package.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
# The contract as the studio keeps it beside the repository, else the copy vendored with the tests.
SHARED_CONTRACT = REPO.parent / "shared" / "reference" / "seed-dashboard-contract.md"
VENDORED_CONTRACT = Path(__file__).resolve().parent / "data" / "seed-dashboard-contract.md"

# What Supabase provides and the contract's tables reference; created first, in plain PostgreSQL.
STAND_INS = """
CREATE SCHEMA IF NOT EXISTS auth;
CREATE TABLE auth.users (id UUID PRIMARY KEY DEFAULT gen_random_uuid(), email TEXT);
CREATE TABLE training_files (id UUID PRIMARY KEY DEFAULT gen_random_uuid(), name TEXT NOT NULL);
"""
# uuid_generate_v4() without the uuid-ossp extension (not every PostgreSQL build ships it).
UUID_FUNCTION = "CREATE FUNCTION uuid_generate_v4() RETURNS uuid LANGUAGE sql AS 'SELECT gen_random_uuid()';"


class PostgrestError(Exception):
    """What PostgREST answers before running SQL (e.g. PGRST204: a column not in its schema cache)."""


# ------------------------------------------------------------------------------------- the contract


def contract_path() -> Path:
    env = os.environ.get("SEED_DASHBOARD_CONTRACT")
    if env:
        return Path(env)
    return SHARED_CONTRACT if SHARED_CONTRACT.is_file() else VENDORED_CONTRACT


def contract_sql(path: Path | None = None) -> list[str]:
    """The contract's ```sql blocks, in order (each run as one script)."""
    text = (path or contract_path()).read_text(encoding="utf-8")
    blocks = re.findall(r"```sql\n(.*?)```", text, flags=re.DOTALL)
    if not blocks:
        raise AssertionError(f"{path or contract_path()}: no ```sql block found")
    return blocks


# ------------------------------------------------------------------------------------- the server


def pg_bin_dir() -> Path | None:
    """The newest PostgreSQL server binaries: Debian's layout, else `initdb` on PATH."""
    found = sorted(
        (Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin") if Path(p, "pg_ctl").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1]
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def require_psycopg():
    """psycopg (pinned in builder/requirements-dev.txt): skipped without it, except in CI."""
    if os.environ.get("CI"):
        import psycopg

        return psycopg
    return pytest.importorskip("psycopg", reason="psycopg (builder/requirements-dev.txt) is not installed")


def require_pg_bin_dir() -> Path:
    bin_dir = pg_bin_dir()
    if bin_dir is None:
        message = (
            "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin); "
            "install them with `apt-get install -y --no-install-recommends postgresql`"
        )
        if os.environ.get("CI"):
            pytest.fail(message + " (CI must run the contract test: .ci/run installs the package)")
        pytest.skip(message)
    return bin_dir


class PostgresServer:
    """A throw-away PostgreSQL server on a unix socket in its own temporary folder."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="pg-contract-"))
        self.data, self.socket_dir = self.root / "data", self.root / "sock"
        self.socket_dir.mkdir()
        self._as_user: list[str] = []
        if os.geteuid() == 0:  # the server refuses to run as root
            shutil.chown(self.root, "postgres")
            shutil.chown(self.socket_dir, "postgres")
            self._as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> None:
        result = subprocess.run([*self._as_user, *args], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{Path(args[0]).name} failed: {result.stderr.strip()}\n{tail}")

    def start(self) -> None:
        self._run(
            str(self.bin_dir / "initdb"),
            "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
            "--no-locale", "--no-sync", "--no-instructions",
        )  # fmt: skip
        options = (
            f"-c listen_addresses='' -c unix_socket_directories='{self.socket_dir}' "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=20"
        )
        self._run(
            str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"),
            "-o", options, "-w", "-t", "60", "start",
        )  # fmt: skip

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def connect(self, dbname: str = "postgres"):
        import psycopg

        return psycopg.connect(host=str(self.socket_dir), user="postgres", dbname=dbname, autocommit=True)


def create_template(server: PostgresServer, name: str = "dashboard_template") -> str:
    """A database with the stand-ins and the contract's tables, to copy per test."""
    import psycopg

    with server.connect() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    with server.connect(name) as conn:
        try:
            conn.execute('CREATE EXTENSION IF NOT EXISTS "uuid-ossp"')
        except psycopg.errors.UndefinedFile:  # the extension's files are not installed
            conn.execute(UUID_FUNCTION)
        conn.execute(STAND_INS)
        for block in contract_sql():
            conn.execute(block)
    return name


@dataclass
class DashboardDB:
    conn: Any  # psycopg.Connection, autocommit
    job_id: str  # a training_jobs row in status 'queued', as the dashboard creates it
    dbname: str


def postgres_server() -> Iterator[tuple[PostgresServer, str]]:
    """A running server and the name of its template database; stopped and removed afterwards."""
    require_psycopg()
    server = PostgresServer(require_pg_bin_dir())
    try:
        server.start()
        yield server, create_template(server)
    finally:
        server.stop()


_counter = itertools.count(1)


def fresh_database(postgres: tuple[PostgresServer, str]) -> Iterator[DashboardDB]:
    """A database copied from the template, with one queued training job; dropped afterwards."""
    server, template = postgres
    name = f"dashboard_{os.getpid()}_{next(_counter)}"
    with server.connect() as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    conn = server.connect(name)
    try:
        (file_id,) = conn.execute(
            "INSERT INTO training_files (name) VALUES ('export.json') RETURNING id"
        ).fetchone()
        (job_id,) = conn.execute(
            "INSERT INTO training_jobs (training_file_id, status) VALUES (%s, 'queued') RETURNING id",
            (file_id,),
        ).fetchone()
        yield DashboardDB(conn, str(job_id), name)
    finally:
        conn.close()
        with server.connect() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}"')


# ------------------------------------------------------------------------------------- the handler


def js_truthy(value: Any) -> bool:
    """JavaScript's truthiness of a parsed JSON value: every object and array is true, even empty."""
    if value is None or value is False:
        return False
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value != 0
    if isinstance(value, str):
        return value != ""
    return True


def _iso_now() -> str:
    # new Date().toISOString(): UTC, milliseconds, Z
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def handle_webhook(conn, payload: Mapping[str, Any], *, now: str | None = None) -> None:
    """The seed dashboard's `handleWebhook`, line for line, against PostgreSQL through PostgREST's SQL.

    `payload` is the parsed JSON body. A key absent from it is JavaScript's `undefined`; a JSON
    null is present. Where supabase-js would return an error (which the seed code ignores), this
    raises it: psycopg's error for a constraint or range violation, PostgrestError for an unknown
    column.
    """
    now = now or _iso_now()
    updates: dict[str, Any] = {"updated_at": now}
    if "status" in payload:  # JSON.stringify drops an undefined status from the PATCH body
        updates["status"] = payload["status"]
    if "step" in payload:
        updates["current_step"] = payload["step"]
    if "total_steps" in payload:
        updates["total_steps"] = payload["total_steps"]
    if js_truthy(payload.get("metrics")):
        updates["metrics"] = payload["metrics"]
    if js_truthy(payload.get("lora_artifact_path")):
        updates["lora_artifact_path"] = payload["lora_artifact_path"]
    if js_truthy(payload.get("error_message")):
        updates["error_message"] = payload["error_message"]
    if payload.get("status") in ("completed", "failed"):
        updates["completed_at"] = now

    postgrest_update(conn, "training_jobs", updates, id_eq=payload.get("job_id"))

    if js_truthy(payload.get("metrics")) and js_truthy(payload.get("step")):
        postgrest_insert(
            conn,
            "training_metrics_history",
            {"training_job_id": payload.get("job_id"), "step": payload["step"], **payload["metrics"]},
        )


def _columns(conn, table: str) -> set[str]:
    rows = conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = 'public' AND table_name = %s",
        (table,),
    ).fetchall()
    return {name for (name,) in rows}


def _check_columns(conn, table: str, body: Mapping[str, Any]) -> list[str]:
    known = _columns(conn, table)
    for key in body:
        if key not in known:
            raise PostgrestError(
                f"PGRST204: Could not find the '{key}' column of '{table}' in the schema cache"
            )
    return list(body)


def postgrest_update(conn, table: str, body: Mapping[str, Any], *, id_eq: Any) -> None:
    """`supabase.from(table).update(body).eq('id', id_eq)`: PostgREST's PATCH, in its own SQL form
    (the JSON body read by json_populate_record, so values convert exactly as they would there)."""
    from psycopg import sql

    cols = _check_columns(conn, table, body)
    query = sql.SQL(
        "UPDATE {table} SET {sets} FROM (SELECT * FROM json_populate_record(null::{table}, %s::json)) AS pgrst_body "
        "WHERE {table}.id = %s"
    ).format(
        table=sql.Identifier(table),
        sets=sql.SQL(", ").join(sql.SQL("{c} = pgrst_body.{c}").format(c=sql.Identifier(c)) for c in cols),
    )
    conn.execute(query, (json.dumps(dict(body)), None if id_eq is None else str(id_eq)))


def postgrest_insert(conn, table: str, body: Mapping[str, Any]) -> None:
    """`supabase.from(table).insert(body)`: PostgREST's POST, columns taken from the body's keys."""
    from psycopg import sql

    cols = _check_columns(conn, table, body)
    names = sql.SQL(", ").join(sql.Identifier(c) for c in cols)
    query = sql.SQL(
        "INSERT INTO {table} ({names}) SELECT {names} FROM json_populate_record(null::{table}, %s::json)"
    ).format(table=sql.Identifier(table), names=names)
    conn.execute(query, (json.dumps(dict(body)),))

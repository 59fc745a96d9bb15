"""Shared fixtures: a real SQLite file per test and a private PostgreSQL database per session.

Postgres tests need the server at DUCTWORK_TEST_PG (default postgresql://postgres@127.0.0.1:5432/test).
On a laptop without it they skip with the reason; in CI (CI=true) a missing server fails them.
The pooler tests need pgbouncer too (tests/pgbouncer.py, .ci/install-pgbouncer.sh), likewise.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pgbouncer import PgBouncer, unavailable_reason  # noqa: E402

import ductwork  # noqa: E402

PG_ADMIN_URL = os.environ.get("DUCTWORK_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
# (the minute sample's tables first: a runtime of the test before, still stopping, may be taking a sample, which
# locks them before it reads the steps and runs; TRUNCATE locks in this order, so neither waits for the other)
TABLES = ["ductwork_queue_samples", "ductwork_minute_stats", "ductwork_processes", "ductwork_definitions",
          "ductwork_runs", "ductwork_branches", "ductwork_steps", "ductwork_executions", "ductwork_context",
          "ductwork_counters", "ductwork_signals", "ductwork_schedules"]
FAST = {
    "job_worker": {"retry_delay": 0, "polling_timeout": 0.05, "count": 2, "shutdown_timeout": 2},
    "pipeline_advancer": {"polling_timeout": 0.05, "shutdown_timeout": 2},
    "supervisor": {"heartbeat_interval": 0.2, "shutdown_timeout": 5},
}


# CREATE and DROP DATABASE wait for an immediate checkpoint of the whole shared server, whose
# fsyncs take as long as the disk is busy (8.3 s seen with other sessions' tests running), and
# DROP first waits up to 5 s for terminated sessions to end: the connection doing them must
# not give up first (nor may any other admin statement of a test). 5 s still bounds the probe of
# whether a server is there at all.
DDL_TIMEOUT = 60


def _pg_connect(url: str, timeout: float = DDL_TIMEOUT):
    import pg8000.dbapi
    info = ductwork.parse_database_url(url)
    conn = pg8000.dbapi.connect(user=info.user, password=info.password, host=info.host, port=info.port,
                                database=info.database, timeout=timeout)
    conn.autocommit = True
    return conn


def _pg_unavailable_reason() -> str | None:
    try:
        _pg_connect(PG_ADMIN_URL, timeout=5).close()   # is a server there at all: answer fast
        return None
    except Exception as exc:  # pragma: no cover - depends on the machine
        return f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}"


@pytest.fixture(scope="session")
def pg_server_url():
    """A fresh database for this test session on the shared server, dropped at the end."""
    reason = _pg_unavailable_reason()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    name = f"ductwork_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = _pg_connect(PG_ADMIN_URL, timeout=DDL_TIMEOUT)
    admin.cursor().execute(f"CREATE DATABASE {name}")
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    drop_database(admin, name)
    admin.close()


def drop_database(admin, name: str) -> None:
    """End the sessions of database ``name``, then drop it (``admin``: a connection to another one)."""
    admin.cursor().execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
        (name,))
    admin.cursor().execute(f"DROP DATABASE IF EXISTS {name}")


def concurrent_migrates(url: str, n: int = 3, timeout: float = 120) -> list[list[int]]:
    """``n`` migrate_store() calls at once, each with its own Store: what each applied, sorted (any error raised)."""
    results, errors = [], []

    def migrate():
        store = ductwork.Store(url)
        try:
            results.append(ductwork.migrate_store(store))
        except Exception as exc:   # raised below, in the test's thread
            errors.append(exc)
        finally:
            store.close()
    threads = [threading.Thread(target=migrate) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    if errors:
        raise errors[0]
    return sorted(results)


def truncate_pg(url: str) -> None:
    conn = _pg_connect(url)
    cur = conn.cursor()
    cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename LIKE 'ductwork%%'")
    existing = {r[0] for r in cur.fetchall()}
    present = [t for t in TABLES if t in existing]
    for attempt in range(5):   # (a runtime of the test before, still stopping, may hold the tables in another
        try:                   # order than TABLES: Postgres breaks that deadlock, and the TRUNCATE goes again)
            if present:
                cur.execute(f"TRUNCATE {', '.join(present)} RESTART IDENTITY")
            break
        except Exception as exc:
            if "40P01" not in str(exc) or attempt == 4:
                raise
    if "ductwork_rollup" in existing:   # the ids start again: so do the counts' marks
        cur.execute("UPDATE ductwork_rollup SET mark = 0")
    conn.close()


# The databases a test that takes ``db_url`` runs on; a module with THROUGH_POOLER = True runs on the
# session's Postgres database through a real PgBouncer in transaction mode too, with wake-ups by
# polling only ("pgbouncer") and with listen_url (DUCTWORK_LISTEN_URL) to the direct URL.
DB_VARIANTS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
POOLER_VARIANTS = [pytest.param("pgbouncer", marks=pytest.mark.postgres),
                   pytest.param("pgbouncer-listen", marks=pytest.mark.postgres)]


def pytest_generate_tests(metafunc):
    chosen = any("db_url" in str(m.args[0]) for m in metafunc.definition.iter_markers("parametrize"))
    if "db_url" in metafunc.fixturenames and not chosen:   # (a test may choose its databases itself)
        variants = list(DB_VARIANTS)
        if getattr(metafunc.module, "THROUGH_POOLER", False):
            wakeups = metafunc.definition.get_closest_marker("wakeups") is not None
            variants += [v for v in POOLER_VARIANTS if not (wakeups and v.values == ("pgbouncer",))]
        metafunc.parametrize("db_url", variants, indirect=True)


@pytest.fixture
def db_url(request, tmp_path, monkeypatch):
    """The same test on a real SQLite file and on a real PostgreSQL database (and through PgBouncer)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/ductwork.sqlite3"
    url = request.getfixturevalue("pg_server_url")
    truncate_pg(url)
    if request.param == "postgres":
        return url
    bouncer = request.getfixturevalue("pgbouncer_server")
    if request.param == "pgbouncer-listen":
        monkeypatch.setenv("DUCTWORK_LISTEN_URL", url)
    else:
        monkeypatch.delenv("DUCTWORK_LISTEN_URL", raising=False)
    info = ductwork.parse_database_url(url)
    return bouncer.url(info.database, user=info.user, password=info.password, pgbouncer="true")


def direct_url(url: str) -> str:
    """The URL of the same database without the pooler (for the tests' own admin statements)."""
    info = ductwork.parse_database_url(url)
    if not info.pgbouncer:
        return url
    return f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{info.database}"


@pytest.fixture
def fresh_db_url(db_url):
    """A database that has never been migrated: the sqlite file, or a new Postgres database."""
    if db_url.startswith("sqlite"):
        yield db_url
        return
    name = f"ductwork_fresh_{uuid.uuid4().hex[:10]}"
    admin = _pg_connect(PG_ADMIN_URL)
    admin.cursor().execute(f"CREATE DATABASE {name}")
    try:
        yield f"{db_url.rsplit('/', 1)[0]}/{name}"
    finally:
        drop_database(admin, name)
        admin.close()


@pytest.fixture
def engine(db_url):
    """App-level configuration pointing at the test database; returns the Engine."""
    ductwork.configure(database_url=db_url, config=FAST)
    eng = ductwork._app_engine()
    yield eng
    eng.store.close()


class RuntimeHandle:
    def __init__(self, runtime: ductwork.Runtime):
        self.runtime = runtime
        self.code = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        self.code = self.runtime.serve()

    def stop(self, timeout: float = 10) -> int | None:
        self.runtime.signals.put(signal.SIGTERM)
        self.thread.join(timeout)
        return self.code


@pytest.fixture
def start_runtime(engine):
    """Start an in-process runtime (worker + advancer threads, as `forking: none`)."""
    handles: list[RuntimeHandle] = []

    def start(pipelines: list[str], role: str = "combined", **overrides) -> RuntimeHandle:
        config = ductwork.load_config(data=FAST, overrides={"database_url": engine.store.url, **overrides})
        handle = RuntimeHandle(ductwork.Runtime(config, role, pipelines))
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        handle.stop()


def run_cli(*args: str, env: dict | None = None, timeout: float = 60,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """Run `python ductwork.py ARGS` for real and capture its output."""
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    return subprocess.run([sys.executable, str(ROOT / "ductwork.py"), *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=str(cwd or ROOT))


@pytest.fixture
def app_db(db_url):
    """App code (trigger, Run.get) pointed at the test database, schema created."""
    ductwork.configure(database_url=db_url)
    ductwork.migrate()
    return db_url


@pytest.fixture
def procs():
    """Real `python ductwork.py` subprocesses started by a test; killed at teardown if still running."""
    started: list = []
    yield started
    for p in started:
        p.close()


# -- PgBouncer (transaction pooling) in front of the test server: tests/pgbouncer.py ----------

def _require_pgbouncer() -> None:
    """Skip (fail under CI=true) unless both the test server and a startable pgbouncer are here."""
    reason = _pg_unavailable_reason() or unavailable_reason()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)


def _new_pgbouncer(**settings) -> PgBouncer:
    """A started PgBouncer forwarding to the server of DUCTWORK_TEST_PG, its user in the auth file."""
    info = ductwork.parse_database_url(PG_ADMIN_URL)
    users = {info.user: info.password or "", **settings.pop("users", {})}
    return PgBouncer(server_host=info.host, server_port=info.port, users=users, **settings).start()


@pytest.fixture(scope="session")
def pgbouncer_server():
    """One PgBouncer for the test session with tests/pgbouncer.py's defaults (transaction pooling, pool of 5)."""
    _require_pgbouncer()
    bouncer = _new_pgbouncer()
    yield bouncer
    bouncer.stop()


@pytest.fixture
def start_pgbouncer():
    """``start(**settings) -> PgBouncer``: a private pooler with a test's own settings
    (default_pool_size=1, query_wait_timeout=2, ...), stopped at teardown."""
    _require_pgbouncer()
    started: list[PgBouncer] = []

    def start(**settings) -> PgBouncer:
        bouncer = _new_pgbouncer(**settings)
        started.append(bouncer)
        return bouncer

    yield start
    for bouncer in started:
        bouncer.stop()


@dataclass
class PooledDb:
    """A fresh database: ``url`` through the pooler, ``direct_url`` to the server itself."""
    name: str
    url: str
    direct_url: str
    bouncer: PgBouncer


@pytest.fixture
def pgbouncer_db(pgbouncer_server):
    """A new, never migrated database (created on the server directly), dropped at teardown;
    ``bouncer.url(name, pgbouncer="true")`` and the like give other spellings of the pooled URL."""
    info = ductwork.parse_database_url(PG_ADMIN_URL)
    name = f"ductwork_pooled_{uuid.uuid4().hex[:10]}"
    admin = _pg_connect(PG_ADMIN_URL)
    admin.cursor().execute(f"CREATE DATABASE {name}")
    try:
        yield PooledDb(name=name, url=pgbouncer_server.url(name, user=info.user, password=info.password),
                       direct_url=f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}", bouncer=pgbouncer_server)
    finally:
        drop_database(admin, name)
        admin.close()

"""`python ductwork.py doctor`: one line per check, on good and broken setups (real CLI subprocesses on SQLite
and PostgreSQL), and the arithmetic behind the lines (in-process)."""
from __future__ import annotations

import logging
import os
import re
import sqlite3
import sys
import time
from types import SimpleNamespace

import pytest
import yaml
from conftest import ROOT, run_cli, truncate_pg
from procs import APP, Proc

import ductwork

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "apps"))
import sup_app  # noqa: E402,F401

SQLITE_CHECKS = ["database", "schema", "drain", "processes", "queue"]
POSTGRES_CHECKS = ["database", "schema", "clock", "connections", "pooler", "drain", "processes", "queue", "storage"]
LINE = re.compile(r"^(ok|warn|fail) {1,4}([a-z]+): (.*)$")


def write_config(tmp_path, db_url, name="doctor.yml", **extra) -> str:
    """A config of the test app with the default timeouts (reaper_timeout 60 s: a row a test inserts stays live)."""
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"app": str(APP), "database_url": db_url, **extra}))
    return str(path)


class Doctor:
    """One `doctor` run: its exit code, and its lines by check name."""

    def __init__(self, *args: str, env: dict | None = None):
        self.result = run_cli("doctor", *args, env=env, timeout=30)
        self.code = self.result.returncode
        self.lines = self.result.stdout.splitlines()
        self.checks: dict[str, str] = {}
        for line in self.lines:
            match = LINE.match(line)
            assert match, f"not a doctor line: {line!r}\n{self.result.stdout}{self.result.stderr}"
            assert line.startswith(f"{match.group(1):<6}{match.group(2)}: "), line   # the columns line up
            self.checks[match.group(2)] = line
        assert "Traceback" not in self.result.stderr, self.result.stderr

    def __getitem__(self, check: str) -> str:
        return self.checks[check]

    def levels(self) -> dict[str, str]:
        return {check: line.split()[0] for check, line in self.checks.items()}

    def __repr__(self) -> str:
        return f"exit {self.code}\n{self.result.stdout}{self.result.stderr}"


@pytest.fixture
def pg_db(pg_server_url):
    """The session's PostgreSQL database, migrated, its tables empty."""
    truncate_pg(pg_server_url)
    ductwork.migrate(pg_server_url)
    return pg_server_url


def store_of(db_url: str) -> ductwork.Store:
    return ductwork.Store(db_url)


def insert_process(db_url: str, machine: str, role: str = "worker", age: float = 0, pipelines: str = "SupNap",
                   count: int = 1) -> None:
    """``count`` process rows of ``machine`` whose last heartbeat was ``age`` seconds ago (database clock)."""
    store = store_of(db_url)
    try:
        with store.tx() as t:
            for _ in range(count):
                t.run("INSERT INTO ductwork_processes (pid, machine_identifier, role, pipelines, started_at, "
                      "last_heartbeat_at) VALUES (:pid, :machine, :role, :pipelines, {now} - :age, {now} - :age)",
                      {"pid": 4321, "machine": machine, "role": role, "pipelines": pipelines, "age": age})
    finally:
        store.close()


def pg_setting(db_url: str, name: str) -> int:
    store = store_of(db_url)
    try:
        with store.tx(write=False) as t:
            return int(t.one("SELECT setting FROM pg_settings WHERE name = :name", {"name": name})[0])
    finally:
        store.close()


def levels_but_storage(out: Doctor, db_url: str) -> dict[str, str]:
    """The levels of the other checks, once the storage line (Postgres) is the server's autovacuum verdict."""
    levels = out.levels()
    if db_url.startswith("postgres"):
        autovacuum, naptime = (pg_text(db_url, name) for name in ("autovacuum", "autovacuum_naptime"))
        if autovacuum == "off":   # the shared test server may run without it: doctor must say so
            assert out["storage"].startswith("warn  storage: autovacuum is off: "), out
        else:
            assert out["storage"].startswith(f"ok    storage: autovacuum on, naptime {naptime}s, indexes valid"), out
        levels.pop("storage")
    return levels


def pg_text(db_url: str, name: str) -> str:
    store = store_of(db_url)
    try:
        with store.tx(write=False) as t:
            return t.one("SELECT setting FROM pg_settings WHERE name = :name", {"name": name})[0]
    finally:
        store.close()


# -- good setups -------------------------------------------------------------------------------

def test_good_setup_has_only_ok_lines(tmp_path, app_db):
    out = Doctor("-c", write_config(tmp_path, app_db), "--grace", "60")
    assert out.code == 0, out
    expected = ["app", *(POSTGRES_CHECKS if app_db.startswith("postgres") else SQLITE_CHECKS)]
    assert list(out.checks) == expected, out
    assert set(levels_but_storage(out, app_db).values()) == {"ok"}, out
    assert out["app"] == "ok    app: 2 pipeline(s) configured (SupMixed, SupNap)"
    assert out["schema"] == f"ok    schema: version {ductwork.SCHEMA_VERSION} (current)"
    assert out["drain"] == ("ok    drain: --grace 60s >= 35s needed (job workers get 20s < the supervisor waits 30s "
                            "< 35s)")
    assert out["processes"] == "ok    processes: none registered"
    assert out["queue"] == "ok    queue: no claimable step waiting"
    if app_db.startswith("postgres"):
        assert out["database"].startswith("ok    database: postgresql://postgres@127.0.0.1:5432/")
        assert out["clock"].startswith("ok    clock: this host and the database agree within ")
        assert out["clock"].endswith("(warn above 1s, fail above 55s)")
        # the supervisor 1, its advancer and one worker per pipeline (2) pool_size 2 + 1 LISTEN each
        assert re.match(r"ok    connections: 1 host\(s\) x \(1 \+ 3 x 3\) = 10 of \d+ available "
                        r"\(max_connections \d+ - \d+ reserved", out["connections"]), out
        assert out["pooler"] == "ok    pooler: none in database_url (a direct connection)"
    else:
        assert out["database"].startswith(f"ok    database: {app_db} answers (SQLite ")


def test_running_supervisors_on_two_machines(procs, tmp_path, app_db):
    for machine in ("host-a", "host-b"):
        procs.append(Proc(tmp_path, app_db, name=machine, machine=machine))
    for proc in procs:
        proc.wait_log("worker started", count=2)
    out = Doctor("-c", write_config(tmp_path, app_db))
    assert out.code == 0, out
    assert set(levels_but_storage(out, app_db).values()) == {"ok"}, out
    assert out["processes"] == "ok    processes: 8 live on 2 machine(s), none stale"
    if app_db.startswith("postgres"):   # the config's processes x the machines its supervisors run on
        assert out["connections"].startswith("ok    connections: 2 host(s) x (1 + 3 x 3) = 20 of "), out


# -- broken setups -----------------------------------------------------------------------------

def test_schema_not_created(tmp_path, fresh_db_url):
    if fresh_db_url.startswith("sqlite"):   # an empty file: a database without tables
        sqlite3.connect(ductwork.parse_database_url(fresh_db_url).path).close()
    out = Doctor("-c", write_config(tmp_path, fresh_db_url))
    assert out.code == 1, out
    assert out["database"].startswith("ok    database: ")
    after = "processes, queue, storage" if fresh_db_url.startswith("postgres") else "processes, queue"
    assert out["schema"] == f"fail  schema: not created: run migrate (not checked: {after})"
    assert "processes" not in out.checks and "queue" not in out.checks and "storage" not in out.checks


def test_sqlite_file_missing(tmp_path):
    url = f"sqlite:///{tmp_path}/nothing-here.sqlite3"
    out = Doctor("--database-url", url)
    assert out.code == 1, out
    assert out["database"] == (f"fail  database: {url}: no such file (run migrate to create it, or fix "
                               "database_url) (not checked: schema, processes, queue)")
    assert not os.path.exists(f"{tmp_path}/nothing-here.sqlite3")   # doctor never creates it


@pytest.mark.parametrize("version, expected", [
    (0, f"fail  schema: version 0, this ductwork needs {ductwork.SCHEMA_VERSION}: run migrate"),
    (ductwork.SCHEMA_VERSION + 1, f"fail  schema: version {ductwork.SCHEMA_VERSION + 1} is newer than this "
                                  f"ductwork's {ductwork.SCHEMA_VERSION}: this ductwork is older than the schema"),
])
def test_schema_older_or_newer(tmp_path, fresh_db_url, version, expected):
    ductwork.migrate(fresh_db_url)   # a database of its own: the next test's migrate must not meet this version
    store = store_of(fresh_db_url)
    with store.tx() as t:
        t.run("DELETE FROM ductwork_schema_migrations")
        t.run("INSERT INTO ductwork_schema_migrations (version, applied_at) VALUES (:version, 'then')",
              {"version": version})
    store.close()
    out = Doctor("-c", write_config(tmp_path, fresh_db_url))
    assert out.code == 1, out
    assert out["schema"].startswith(expected), out


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_an_invalid_index_fails_storage(tmp_path, fresh_db_url):
    ductwork.migrate(fresh_db_url)
    store = store_of(fresh_db_url)
    with store.tx() as t:   # what an interrupted CREATE INDEX CONCURRENTLY leaves
        t.run("UPDATE pg_index SET indisvalid = false WHERE indexrelid = CAST('ductwork_runs_finished' AS regclass)")
    store.close()
    out = Doctor("-c", write_config(tmp_path, fresh_db_url))
    assert out.code == 1, out
    assert out["storage"] == ("fail  storage: index(es) missing or invalid (an interrupted build): "
                              "ductwork_runs_finished: run migrate"), out
    assert ductwork.migrate(fresh_db_url) == []
    assert Doctor("-c", write_config(tmp_path, fresh_db_url))["storage"].split()[0] in ("ok", "warn")


@pytest.mark.postgres
def test_database_unreachable_masks_the_password(tmp_path):
    url = "postgresql://ductwork:sekrit@127.0.0.1:1/nowhere?connect_timeout=2"
    out = Doctor(env={"DUCTWORK_DATABASE_URL": url})
    assert out.code == 1, out
    assert out["database"].startswith("fail  database: cannot connect to postgresql://ductwork:***@127.0.0.1:1/nowhere")
    assert out["database"].endswith("(not checked: schema, clock, connections, processes, queue, storage)")
    assert "sekrit" not in out.result.stdout + out.result.stderr
    assert out["pooler"].startswith("ok    pooler: ")   # the checks of the config alone still run
    assert out["drain"].startswith("ok    drain: ")


def test_pooled_looking_url_without_pgbouncer_true(tmp_path):
    out = Doctor("--database-url", "postgresql://postgres@127.0.0.1:6432/test?connect_timeout=2")
    assert out.code == 1, out
    assert out["pooler"] == ("fail  pooler: port 6432 looks like PgBouncer but the URL has no pgbouncer=true: "
                             "add ?pgbouncer=true to database_url")


def test_pgbouncer_true_without_and_with_listen_url(tmp_path):
    url = "postgresql://postgres@127.0.0.1:6432/test?pgbouncer=true&connect_timeout=2"
    out = Doctor("--database-url", url)
    assert out["pooler"].startswith("warn  pooler: pgbouncer=true and no listen_url: wake-ups poll, so new work "
                                    "waits up to the polling timeout"), out
    out = Doctor("--database-url", url, env={"DUCTWORK_LISTEN_URL": "postgresql://postgres@127.0.0.1:5432/test"})
    assert out["pooler"] == "ok    pooler: pgbouncer=true, LISTEN on listen_url postgresql://postgres@127.0.0.1:5432/test"
    out = Doctor("--database-url", url, env={"DUCTWORK_LISTEN_URL": "postgresql://postgres@127.0.0.1:6432/test"})
    assert out["pooler"].startswith("warn  pooler: listen_url: port 6432 looks like PgBouncer: LISTEN needs a "
                                    "session of its own"), out


def test_through_a_real_pgbouncer_names_the_pooler_settings(tmp_path, pgbouncer_db):
    """Only what does not depend on ductwork working through the pooler (the storage rewrite's): the pooler line,
    and no traceback whatever the database checks meet."""
    url = pgbouncer_db.bouncer.url(pgbouncer_db.name, pgbouncer="true")
    out = Doctor("--database-url", url, env={"DUCTWORK_LISTEN_URL": pgbouncer_db.direct_url})
    assert out.code in (0, 1), out
    assert out["pooler"].startswith("ok    pooler: pgbouncer=true, LISTEN on listen_url "), out


@pytest.mark.postgres
def test_config_demand_over_max_connections(tmp_path, pg_db):
    pipelines = [f"P{n}" for n in range(40)]   # listed: counted without importing an app
    cfg = tmp_path / "big.yml"
    cfg.write_text(yaml.safe_dump({"database_url": pg_db, "pool_size": 30, "pipelines": pipelines}))
    out = Doctor("-c", str(cfg))
    assert out.code == 1, out
    assert re.match(r"fail  connections: 1 host\(s\) x \(1 \+ 41 x 31\) = 1272 of \d+ available \(max_connections "
                    r"\d+ - \d+ reserved.*\): lower pool_size or the number of processes", out["connections"]), out


@pytest.mark.postgres
def test_live_rows_over_max_connections(tmp_path, pg_db):
    rows = pg_setting(pg_db, "max_connections") // 2   # x (pool_size 2 + LISTEN 1) is above max_connections
    insert_process(pg_db, "host-w", count=rows)
    out = Doctor("--database-url", pg_db)   # pipelines "*" and no app: the live rows are all there is to count
    assert out.code == 1, out
    assert out["connections"].startswith(f"fail  connections: live rows: {rows} x 3 = {3 * rows} of "), out


@pytest.mark.postgres
def test_ductwork_connections_without_a_process_row_count_as_taken(tmp_path, pg_db):
    """App code that triggers (a web server's processes) holds ductwork connections that no process row explains."""
    stores = [store_of(pg_db) for _ in range(5)]
    try:
        for store in stores:
            with store.tx(write=False) as t:
                t.one("SELECT 1")
        out = Doctor("--database-url", pg_db)
    finally:
        for store in stores:
            store.close()
    rowless = re.search(r" - (\d+) more held by ductwork than its live processes account for \(app code, "
                        r"dashboards\)", out["connections"])
    assert rowless and int(rowless.group(1)) >= 5, out


def test_grace_too_short(tmp_path):
    url = f"sqlite:///{tmp_path}/ductwork.sqlite3"   # the drain is config only: one database is enough
    ductwork.migrate(url)
    cfg = write_config(tmp_path, url)
    out = Doctor("-c", cfg, "--grace", "34")
    assert out.code == 1, out
    assert out["drain"] == ("fail  drain: --grace 34s is below the 35s the supervisor needs (supervisor.shutdown_"
                            "timeout 30s + 5s to hand back and exit): it is SIGKILLed mid-drain; raise the grace "
                            "period or lower supervisor.shutdown_timeout")
    assert Doctor("-c", cfg, "--grace", "35").code == 0
    out = Doctor("-c", cfg, "--role", "worker", "--grace", "24.5")   # a foreground worker: its own budget
    assert out["drain"].startswith("fail  drain: --grace 24.5s is below the 25s this worker needs "
                                   "(job_worker.shutdown_timeout 20s"), out
    out = Doctor("-c", write_config(tmp_path, url, name="inverted.yml", job_worker={"shutdown_timeout": 40}))
    assert out["drain"].startswith("warn  drain: a child drains up to 40s, not below supervisor.shutdown_timeout "
                                   "30s"), out


@pytest.mark.parametrize("args", [["--grace", "-1"], ["--grace", "nan"], ["--grace", "soon"], ["--grace", "inf"],
                                  ["--grace"], ["--frobnicate"]])
def test_usage_errors_exit_2(tmp_path, args):
    result = run_cli("doctor", "--database-url", f"sqlite:///{tmp_path}/x.sqlite3", *args, timeout=30)
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert result.stderr.startswith("ductwork: error: ") and len(result.stderr.splitlines()) == 1, result.stderr


@pytest.mark.parametrize("config", [{"pool_size": 0}, {"job_wroker": {"count": 1}}, "not: [valid"])
def test_config_errors_exit_2(tmp_path, config):
    cfg = tmp_path / "bad.yml"
    cfg.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    result = run_cli("doctor", "-c", str(cfg), timeout=30)
    assert result.returncode == 2, result
    assert result.stderr.startswith("ductwork: error: ") and "Traceback" not in result.stderr, result.stderr


def test_app_that_does_not_import_is_a_warning(tmp_path, app_db):
    broken = tmp_path / "broken_app.py"
    broken.write_text("raise RuntimeError('no such service here')\n")
    out = Doctor("--database-url", app_db, "--app", str(broken))
    assert out.code == 0, out
    assert out["app"].startswith(f"warn  app: cannot import app {broken}: RuntimeError: no such service here: "
                                 "pipelines counted from the live process rows"), out


def test_stale_process_row(tmp_path, app_db):
    cfg = write_config(tmp_path, app_db)
    insert_process(app_db, "host-gone", age=1000)
    out = Doctor("-c", cfg)
    assert out.code == 0, out   # a warning
    assert out["processes"] == ("warn  processes: 1 stale row(s) (no heartbeat for supervisor.reaper_timeout 60s) "
                                "of host-gone; no live process: nobody will reap them; their claimed steps wait "
                                "until a ductwork process starts")
    insert_process(app_db, "host-here")
    out = Doctor("-c", cfg)
    assert out["processes"] == ("warn  processes: 1 stale row(s) (no heartbeat for supervisor.reaper_timeout 60s) "
                                "of host-gone; 1 live on 1 machine(s): a live peer reaps them and hands their steps "
                                "back")


def test_old_claimable_step(tmp_path, app_db):
    cfg = write_config(tmp_path, app_db)
    ductwork.trigger("SupNap", 0)   # nobody serves SupNap: its first step waits
    out = Doctor("-c", cfg)
    assert out["queue"].startswith("ok    queue: 1 claimable step(s), the oldest "), out
    store = store_of(app_db)
    with store.tx() as t:
        # (an hour in the queue: queued an hour ago, claimable since; available_at alone is its run's start)
        t.run("UPDATE ductwork_steps SET available_at = available_at - 3600, created_at = created_at - 3600 "
              "WHERE status = 'queued'")
    store.close()
    out = Doctor("-c", cfg)
    assert out.code == 0, out
    assert re.match(r"warn  queue: the oldest claimable step is 360\ds old \(warn above 60s\): SupNap 360\ds old, "
                    r"1 waiting: no live worker serves it$", out["queue"]), out
    insert_process(app_db, "host-busy", pipelines="SupNap")   # a live worker of SupNap that claims nothing
    out = Doctor("-c", cfg)
    assert out["queue"].endswith("1 waiting: its workers are saturated or stuck (add workers or raise "
                                 "job_worker.count)"), out


# -- the arithmetic, in-process ---------------------------------------------------------------

def config_of(**data) -> ductwork.Config:
    return ductwork.load_config(data={"database_url": "postgresql://u@db:5432/app", **data}, environ={})


DEMO = [f"Demo{n}" for n in range(5)]


@pytest.mark.parametrize("data, hosts, server, pooler, arithmetic", [
    ({}, 1, 19, 0, "1 host(s) x (1 + 6 x 3) = 19"),
    ({}, 2, 38, 0, "2 host(s) x (1 + 6 x 3) = 38"),
    ({"pool_size": 5}, 3, 111, 0, "3 host(s) x (1 + 6 x 6) = 111"),
    ({"forking": "none"}, 4, 12, 0, "4 host(s) x 1 x 3 = 12"),
    ({"role": "worker"}, 10, 30, 0, "10 host(s) x 1 x 3 = 30"),
    ({"database_url": "postgresql://u@db:6432/app?pgbouncer=true"}, 2, 0, 26, "2 host(s) x 6 x 0 = 0"),
    ({"database_url": "postgresql://u@db:6432/app?pgbouncer=true", "listen_url": "postgresql://u@db:5432/app"},
     2, 12, 26, "2 host(s) x 6 x 1 = 12"),
    ({"database_url": "sqlite:///x.db"}, 1, 13, 0, "1 host(s) x (1 + 6 x 2) = 13"),
])
def test_connection_demand(data, hosts, server, pooler, arithmetic):
    demand = ductwork.connection_demand(config_of(pipelines=DEMO, **data), len(DEMO), hosts)
    assert (demand.server, demand.pooler, demand.arithmetic()) == (server, pooler, arithmetic)


def test_pooler_arithmetic_and_live_rows():
    demand = ductwork.connection_demand(config_of(database_url="postgresql://u@db:6432/app?pgbouncer=true"), 5, 2)
    assert demand.arithmetic(pooler=True) == "2 host(s) x (1 + 6 x 2) = 26"
    live = ductwork.ConnectionDemand(1, 2, 12, 2, 1, False, source="live rows")
    assert live.arithmetic() == "live rows: 2 + 12 x 3 = 38"


def test_readme_worked_example_is_the_arithmetic():
    readme = (ROOT / "README.md").read_text()
    demand = ductwork.connection_demand(config_of(pipelines=DEMO), len(DEMO), hosts=3)
    assert f"{demand.arithmetic()} of 97 available (max_connections 100 - 3 reserved)" in readme


@pytest.mark.parametrize("demand, available, level", [(77, 97, "ok"), (78, 97, "warn"), (97, 97, "warn"),
                                                      (98, 97, "fail"), (1, 0, "fail"), (1, -3, "fail")])
def test_budget_levels(demand, available, level):
    assert ductwork._budget_level(demand, ductwork.ConnectionBudget(available, "")) == level


@pytest.mark.parametrize("url, pooled", [
    ("postgresql://u@db:5432/app", None),
    ("postgresql://u@db:6432/app", "port 6432 looks like PgBouncer"),
    ("postgresql://u@ep-cool-darkness-123456-pooler.us-east-2.aws.neon.tech/app", "looks like a pooler"),
    ("postgresql://u@aws-0-eu-central-1.pooler.supabase.com:6543/postgres", "looks like a pooler"),
    ("postgresql://u@myproxy.proxy-abcdefghijkl.us-east-1.rds.amazonaws.com/app", "looks like RDS Proxy"),
    ("postgresql://u@db.example.com:5432/app", None),
])
def test_looks_pooled(url, pooled):
    found = ductwork.looks_pooled(ductwork.parse_database_url(url))
    assert (found is None) if pooled is None else (pooled in found)


class SkewedStore:
    """A Store stand-in whose database clock is ``skew`` seconds off this host's."""
    dialect = "postgres"

    def __init__(self, skew: float):
        self.skew = skew

    def now(self) -> float:
        return time.time() + self.skew


@pytest.mark.parametrize("skew, level", [(0.2, "ok"), (-0.9, "ok"), (3, "warn"), (-30, "warn"), (56, "fail"),
                                         (-120, "fail")])
def test_clock_skew_levels(skew, level):
    config = config_of()
    finding = ductwork._doctor_clock(ductwork.DoctorContext(config, SkewedStore(skew), None, None))
    assert finding.level == level, finding
    if level != "ok":
        assert f"{abs(skew):.1f}s {'behind' if skew > 0 else 'ahead of'} the database's" in finding.text
    warn, fail = ductwork.clock_limits(config_of(supervisor={"reaper_timeout": 10, "heartbeat_interval": 2}))
    assert (warn, fail) == (1.0, 8.0)


def test_queue_limit():
    assert ductwork.queue_limit(config_of()) == 60
    config = config_of(job_worker={"polling_timeout": {"default": 1, "Slow": 30}})
    assert (ductwork.queue_limit(config, "Fast"), ductwork.queue_limit(config, "Slow")) == (60, 300)


class Lines(logging.Handler):
    """The messages of the ductwork logger while it is attached."""

    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_drain_arithmetic_and_the_log_lines_it_makes():
    """doctor's numbers are the ones the supervisor and a foreground role log at start, in the same lines as before."""
    config = config_of(supervisor={"shutdown_timeout": 31.5})
    drain = ductwork.drain_arithmetic(config, ductwork.ROLE_MODES["supervisor"])
    assert (drain.worker, drain.budget, drain.grace) == (20, 31.5, 36)
    worker = ductwork.drain_arithmetic(config, ductwork.ROLE_MODES["worker"])
    assert (worker.role, worker.key, worker.budget, worker.grace) == ("worker", "job_worker.shutdown_timeout", 20, 25)
    lines = Lines()
    ductwork.log.addHandler(lines)
    level = ductwork.log.level
    ductwork.log.setLevel(logging.INFO)
    try:
        ductwork.Supervisor.log_drain_arithmetic(SimpleNamespace(config=config, role=ductwork.ROLE_MODES["supervisor"]))
        ductwork.Runtime.log_drain_arithmetic(SimpleNamespace(config=config, spec=ductwork.ROLE_MODES["worker"],
                                                              row_role="worker"))
    finally:
        ductwork.log.removeHandler(lines)
        ductwork.log.setLevel(level)
    assert lines.messages[0] == ("drain: job workers get 20s for in-flight steps < supervisor waits 31.5s < give the "
                                 "process manager at least 36s (e.g. Kubernetes terminationGracePeriodSeconds, systemd "
                                 "TimeoutStopSec)")
    assert lines.messages[-1] == ("drain: this worker gets 20s (job_worker.shutdown_timeout) after SIGTERM; give the "
                                  "orchestrator at least 25s (terminationGracePeriodSeconds / stop_grace_period)")

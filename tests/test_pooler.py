"""Postgres behind a real PgBouncer in transaction mode (SPEC §13): every command works through it
with ``?pgbouncer=true``; a pooled URL without it is one clear line naming the fix."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request

import pytest
from conftest import ROOT, run_cli
from procs import BASE_CONFIG, LOAD_SLACK, Proc, dashboard_port, wait_until

import ductwork

pytestmark = pytest.mark.postgres
APP = str(ROOT / "tests" / "apps" / "sup_app.py")
DONE = 60 * BASE_CONFIG["supervisor"]["heartbeat_interval"] + LOAD_SLACK


def cli(*args: str, url: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli(*args, "--database-url", url, "--app", APP,
                   env={"DUCTWORK_MACHINE_ID": "host-pooled", "DUCTWORK_LISTEN_URL": "", **(env or {})})


def run_status(url: str, run_id: int) -> str:
    store = ductwork.Store(url)
    try:
        with store.tx(write=False) as t:
            return t.one("SELECT status FROM ductwork_runs WHERE id = :id", {"id": run_id})[0]
    finally:
        store.close()


def _start(procs, tmp_path, url: str, name: str, *args: str) -> Proc:
    p = Proc(tmp_path, url, name=name, machine="host-pooled", args=args, config={"pipelines": ["SupMixed"]},
             env={"DUCTWORK_LISTEN_URL": ""})   # wake-ups by polling: no listen_url
    procs.append(p)
    return p


def _healthy(url: str, role: str) -> None:
    health = cli("healthcheck", "--role", role, url=url)
    assert (health.returncode, health.stdout.strip()) == (0, "healthy"), health.stdout + health.stderr


def test_every_command_works_through_the_pooler(procs, tmp_path, pgbouncer_db):
    url = pgbouncer_db.bouncer.url(pgbouncer_db.name, pgbouncer="true")
    assert cli("migrate", url=url).returncode == 0
    triggered = cli("trigger", "SupMixed", "3", url=url)
    assert triggered.returncode == 0, triggered.stderr
    # the supervisor
    sup = _start(procs, tmp_path, url, "pooled-sup", "run")
    sup.wait_log("worker started")
    _healthy(url, "all")
    first = int(triggered.stdout)
    wait_until(lambda: run_status(url, first) == "completed", timeout=DONE, what="run completed")
    sup.signal(signal.SIGTERM)
    assert sup.wait() == 0, sup.log()[-2000:]
    # each role on its own, as containers run them
    roles = [_start(procs, tmp_path, url, f"pooled-{role}", "run", "--role", role) for role in ("advancer", "worker")]
    for role, p in zip(("advancer", "worker"), roles, strict=True):
        p.wait_log(f"{role} started")
        _healthy(url, role)
    second = int(cli("trigger", "SupMixed", "2", url=url).stdout)
    wait_until(lambda: run_status(url, second) == "completed", timeout=DONE, what="run completed")
    for p in roles:
        p.signal(signal.SIGTERM)
        assert p.wait() == 0, p.log()[-2000:]
    status = cli("status", "--json", url=url)
    assert status.returncode == 0 and json.loads(status.stdout)["runs"]["SupMixed"] == {"completed": 2}
    doctor = cli("doctor", url=url)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "ok    connections: behind a transaction pooler (pgbouncer=true)" in doctor.stdout, doctor.stdout
    assert "warn  pooler: pgbouncer=true and no listen_url" in doctor.stdout, doctor.stdout
    assert "Traceback" not in "".join(p.log() for p in procs)


def test_the_dashboard_works_through_the_pooler(tmp_path, pgbouncer_db):
    url = pgbouncer_db.bouncer.url(pgbouncer_db.name, pgbouncer="true")
    assert cli("migrate", url=url).returncode == 0
    assert cli("trigger", "SupMixed", "2", url=url).returncode == 0
    proc = subprocess.Popen([sys.executable, str(ROOT / "ductwork.py"), "dashboard", "--port", "0",
                             "--database-url", url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, env={**os.environ, "DUCTWORK_LISTEN_URL": ""})
    try:
        port = dashboard_port(proc)
        for path in ("/api/overview", "/metrics", "/"):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
                assert reply.status == 200
                body = reply.read().decode()
        overview = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/overview", timeout=10).read())
        assert overview and "ductwork" in body.lower()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def _alternating_pooler(start_pgbouncer, pg_server_url):
    """A pooler of two server connections that lends them in turn (server_round_robin): a client's
    next exchange goes to the other one, so a statement prepared on one is run on the other at once.
    Returns (the pooled URL without pgbouncer=true, with it)."""
    import pg8000.native
    bouncer = start_pgbouncer(default_pool_size=2, server_round_robin=1)
    info = ductwork.parse_database_url(pg_server_url)
    both = [pg8000.native.Connection(user=info.user, host=bouncer.host, port=bouncer.port, database=info.database)
            for _ in range(2)]
    for conn in both:   # two transactions at once: both server connections are made
        conn.run("BEGIN")
        conn.run("SELECT 1")
    for conn in both:
        conn.run("COMMIT")
        conn.close()
    return bouncer.url(info.database, user=info.user), bouncer.url(info.database, user=info.user, pgbouncer="true")


def test_a_pooled_url_without_pgbouncer_true_is_one_clear_line(procs, tmp_path, start_pgbouncer, pg_server_url):
    """One-shot commands prepare what they run inside their own transactions (which the pooler keeps on one
    server connection): they work. A process that runs a statement again in a later transaction meets the
    other server connection, where it does not exist: one line naming the fix, exit 2."""
    url, _ = _alternating_pooler(start_pgbouncer, pg_server_url)
    for command in (("migrate",), ("trigger", "SupMixed", "2"), ("status",)):
        out = cli(*command, url=url)
        assert out.returncode == 0 and not out.stderr, (command, out.returncode, out.stderr)
    out = cli("run", url=url)
    assert out.returncode == 2, (out.returncode, out.stdout[-2000:], out.stderr)
    assert "add ?pgbouncer=true to database_url" in out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr


def test_a_pooled_url_without_pgbouncer_true_stops_the_deployment_when_it_shows(procs, tmp_path, start_pgbouncer,
                                                                                pg_server_url):
    """Whenever the mistake shows (at the supervisor's boot, or once its children's statements meet
    other server connections): the deployment stops, exit 2, the fix named, no traceback anywhere."""
    url, flagged = _alternating_pooler(start_pgbouncer, pg_server_url)
    assert cli("migrate", url=flagged).returncode == 0
    sup = Proc(tmp_path, url, machine="host-pooled", config={"pipelines": ["SupMixed", "SupNap"]},
               env={"DUCTWORK_LISTEN_URL": ""})
    procs.append(sup)
    for n in range(2, 12):   # work for every thread
        cli("trigger", "SupMixed", str(n % 5), url=flagged)
    assert sup.wait(DONE) == 2, sup.log()[-3000:]
    log = sup.log()
    assert "add ?pgbouncer=true to database_url" in log and "Traceback" not in log, log[-3000:]

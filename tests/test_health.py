"""`python ductwork.py healthcheck` and `status` against real databases and real processes."""
from __future__ import annotations

import json
import os
import signal
import sys

import yaml
from conftest import run_cli
from procs import BASE_CONFIG, Proc, database_outage, wait_until

import ductwork

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "apps"))
import sup_app  # noqa: E402,F401


def write_config(tmp_path, db_url, name="probe.yml", **extra):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({**BASE_CONFIG, "database_url": db_url, **extra}))
    return str(path)


def health(*args, machine="host-a", env=None):
    return run_cli("healthcheck", *args, env={"DUCTWORK_MACHINE_ID": machine, **(env or {})}, timeout=20)


def insert_row(machine, role, age):
    engine = ductwork._app_engine()
    with engine.store.tx() as t:
        t.run("INSERT INTO ductwork_processes (pid, machine_identifier, role, started_at, last_heartbeat_at) "
              "VALUES (?, ?, ?, {now} - ?, {now} - ?)", (4321, machine, role, age, age))


def test_healthy_then_dead_after_stop(procs, tmp_path, app_db):
    cfg = write_config(tmp_path, app_db)
    sup = Proc(tmp_path, app_db)
    procs.append(sup)
    sup.wait_log("worker started", count=2)
    wait_until(lambda: health("-c", cfg).returncode == 0, what="healthy")
    out = health("-c", cfg, "-v")
    assert out.returncode == 0 and out.stdout.splitlines()[0] == "healthy"
    assert "role supervisor" in out.stdout
    assert health("-c", cfg, "--role", "worker").returncode == 0
    assert health("-c", cfg, "--pid", str(sup.pid)).returncode == 0
    sup.signal(signal.SIGTERM)
    assert sup.wait() == 0
    out = health("-c", cfg)
    assert (out.returncode, out.stdout.strip()) == (1, "dead: no process")


def test_stale_heartbeat_is_unhealthy_and_max_age_applies(tmp_path, app_db):
    cfg = write_config(tmp_path, app_db)
    insert_row("host-stale", "supervisor", 1000)
    out = health("-c", cfg, machine="host-stale")
    assert out.returncode == 1
    assert out.stdout.strip().startswith("unhealthy: heartbeat 1000s old") or "heartbeat 100" in out.stdout
    assert health("-c", cfg, "--max-age", "5000", machine="host-stale").returncode == 0
    cfg2 = write_config(tmp_path, app_db, name="long.yml", healthcheck={"max_age": 5000})
    assert health("-c", cfg2, machine="host-stale").returncode == 0


def test_another_machines_row_does_not_count(tmp_path, app_db):
    cfg = write_config(tmp_path, app_db)
    insert_row("host-other", "supervisor", 0)
    assert health("-c", cfg, machine="host-mine").stdout.strip() == "dead: no process"
    assert health("-c", cfg, machine="host-other").returncode == 0


def test_foreground_worker_is_checked_by_role(procs, tmp_path, app_db):
    cfg = write_config(tmp_path, app_db, role="worker")
    w = Proc(tmp_path, app_db, name="w", args=("run", "--role", "worker"))
    procs.append(w)
    w.wait_log("worker started")
    assert health("-c", cfg).returncode == 0
    assert health("-c", cfg, env={"DUCTWORK_ROLE": "advancer"}).returncode == 1  # env picks the role to check
    assert health("-c", cfg, "--role", "all").stdout.strip() == "dead: no process"
    w.signal(signal.SIGTERM)
    assert w.wait() == 0


def _unreachable_url(db_url, tmp_path):
    if db_url.startswith("sqlite"):
        return f"sqlite:///{tmp_path}/missing/nowhere.sqlite3"
    return "postgresql://postgres:secret-pw@127.0.0.1:1/test"


def test_database_outage_with_a_live_process_is_degraded_healthy(procs, tmp_path, app_db):
    """The database of a live deployment stops answering: its local proof of life keeps the probe healthy."""
    sup = Proc(tmp_path, app_db, machine="host-outage")
    procs.append(sup)
    sup.wait_log("worker started", count=2)
    cfg = write_config(tmp_path, app_db)
    with database_outage(app_db):
        out = health("-c", cfg, machine="host-outage")
        assert (out.returncode, out.stdout.strip()) == (0, "healthy (database unreachable)"), out.stdout + out.stderr
    wait_until(lambda: health("-c", cfg, machine="host-outage").stdout.strip() == "healthy", what="healthy again")
    sup.signal(signal.SIGTERM)
    assert sup.wait() == 0
    with database_outage(app_db):
        out = health("-c", cfg, machine="host-outage")
    assert out.returncode == 3
    assert "database unreachable" in out.stdout


def test_another_databases_proof_of_life_proves_nothing(procs, tmp_path, app_db):
    """A live deployment on one database is no proof for a health check of another, unreachable one
    (same machine id, same user): the local proof is scoped to the database."""
    sup = Proc(tmp_path, app_db, machine="host-scoped")
    procs.append(sup)
    sup.wait_log("worker started", count=2)
    assert health("-c", write_config(tmp_path, app_db), machine="host-scoped").returncode == 0
    cfg = write_config(tmp_path, _unreachable_url(app_db, tmp_path), name="down.yml")
    out = health("-c", cfg, machine="host-scoped")
    assert (out.returncode, out.stdout.strip()) == (3, "unhealthy: database unreachable and no local proof of life")
    assert "secret-pw" not in out.stdout + out.stderr


def test_database_unreachable_and_no_process_exits_3(tmp_path, app_db):
    cfg = write_config(tmp_path, _unreachable_url(app_db, tmp_path), name="down.yml")
    out = health("-c", cfg, machine="host-nobody")
    assert out.returncode == 3


def test_bad_config_exits_2(tmp_path, app_db):
    bad = tmp_path / "bad.yml"
    bad.write_text("job_worker: {count: 0}\n")
    out = health("-c", str(bad))
    assert out.returncode == 2
    assert out.stderr.startswith("ductwork: error:") and "Traceback" not in out.stderr
    assert health("-c", str(tmp_path / "nope.yml")).returncode == 2
    assert health("--max-age", "-1", "-c", write_config(tmp_path, app_db)).returncode == 2


def test_healthy_api_for_app_code(tmp_path, app_db, monkeypatch):
    monkeypatch.setenv("DUCTWORK_MACHINE_ID", "host-api")
    assert ductwork.healthy() is False
    insert_row("host-api", "worker", 0)
    assert ductwork.healthy(role="worker") is True
    assert ductwork.healthy(role="advancer") is False


def test_status_shows_two_supervisors(procs, tmp_path, app_db):
    a = Proc(tmp_path, app_db, name="a", machine="host-a")
    b = Proc(tmp_path, app_db, name="b", machine="host-b")
    procs.extend([a, b])
    for p in (a, b):
        p.wait_log("worker started", count=2)
    run = sup_app.SupMixed.trigger(2)
    assert run.wait(15) == "completed"
    cfg = write_config(tmp_path, app_db)
    out = run_cli("status", "--json", "-c", cfg)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    machines = {(p["machine"], p["role"]) for p in report["processes"]}
    assert {("host-a", "supervisor"), ("host-b", "supervisor"), ("host-a", "worker"),
            ("host-b", "advancer")} <= machines
    assert all(p["heartbeat_age"] < 5 for p in report["processes"])
    assert report["runs"]["SupMixed"]["completed"] >= 1
    text = run_cli("status", "-c", cfg)
    assert text.returncode == 0 and "host-a" in text.stdout and "host-b" in text.stdout and "SupMixed" in text.stdout
    for p in (a, b):
        p.signal(signal.SIGTERM)
        assert p.wait() == 0

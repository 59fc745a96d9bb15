"""Log lines: text and JSON formats, fields, no per-poll noise, passwords masked everywhere."""
from __future__ import annotations

import json
import os
import signal
import sys

import pytest
from conftest import run_cli, truncate_pg
from procs import Proc, pause

import ductwork

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "apps"))
import sup_app  # noqa: E402

SECRET = "s3cr3t-pw-do-not-log"


@pytest.fixture
def pg_with_password(pg_server_url):
    """The test database, reached with a password in the URL (trust auth ignores it)."""
    truncate_pg(pg_server_url)
    url = pg_server_url.replace("postgresql://postgres@", f"postgresql://postgres:{SECRET}@")
    assert SECRET in url
    ductwork.configure(database_url=url)
    ductwork.migrate()
    return url


@pytest.mark.postgres
def test_json_logs_have_fields_and_never_the_password(tmp_path, pg_with_password):
    sup = Proc(tmp_path, pg_with_password, config={"logger": {"format": "json"}, "pipelines": ["SupMixed"]})
    try:
        sup.wait_log('"message": "worker started')
        run = sup_app.SupMixed.trigger(3)
        assert run.wait(15) == "completed"
        sup.signal(signal.SIGTERM)
        assert sup.wait() == 0
    finally:
        sup.close()
    lines = sup.log().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert {"@timestamp", "log.level", "severity", "process.pid", "ductwork.role", "process.thread.name", "message",
            "log.logger", "ecs.version"} <= set(records[0])
    roles = {r["ductwork.role"] for r in records}
    assert {"supervisor", "worker", "advancer"} <= roles
    assert any(r["message"].startswith("drain:") for r in records)
    assert all(SECRET not in line for line in lines)
    started = next(r["message"] for r in records if r["message"].startswith("supervisor started"))
    assert "postgresql://postgres:***@" in started  # the URL is shown, its password masked


@pytest.mark.postgres
def test_password_is_masked_in_errors_and_outage_lines(tmp_path, pg_server_url):
    bad = f"postgresql://postgres:{SECRET}@127.0.0.1:1/nowhere"
    out = run_cli("migrate", "--database-url", bad)
    assert out.returncode == 1
    assert SECRET not in out.stdout + out.stderr
    assert "***" in out.stderr
    out = run_cli("status", "--database-url", bad, "--debug")
    assert SECRET not in out.stdout + out.stderr


def test_text_logs_are_quiet_while_idle(tmp_path):
    url = f"sqlite:///{tmp_path}/quiet.sqlite3"
    sup = Proc(tmp_path, url, config={"job_worker": {"polling_timeout": 0.05},
                                      "pipeline_advancer": {"polling_timeout": 0.05}})
    try:
        sup.wait_log("advancer started")
        sup.wait_log("worker started", count=2)
        before = len(sup.log().splitlines())
        pause(1.5)  # ~30 idle polls per thread at info level: none may log
        after = len(sup.log().splitlines())
        assert after == before
        first = sup.log().splitlines()[0]
        # text format: ISO time, level, [pid role thread], message
        assert first[:4].isdigit() and "INFO" in first and "supervisor MainThread]" in first
        sup.signal(signal.SIGTERM)
        assert sup.wait() == 0
    finally:
        sup.close()

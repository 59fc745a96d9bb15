"""Delayed runs (SPEC §16): trigger(delay=) / at= and the CLI's --delay / --at. The first step is not claimable
before the start (the database clock); status and the dashboard show the runs still to start. Real runtimes on
real SQLite and PostgreSQL."""
from __future__ import annotations

import datetime
import json

import pytest
from conftest import run_cli
from procs import LOAD_SLACK

import ductwork


def plus_one(x):
    return x + 1


class DelayOne(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(plus_one)


def first_execution(engine, run_id):
    with engine.store.tx(write=False) as t:
        return t.one("SELECT started_at FROM ductwork_executions WHERE run_id = :r ORDER BY id", {"r": run_id})


def test_a_delayed_run_starts_no_sooner_than_its_delay_on_the_database_clock(engine, start_runtime):
    start_runtime(["DelayOne"])
    delay = 1.0
    run = DelayOne.trigger(1, delay=delay)
    now = run.created_at   # the database's clock, when it was triggered
    assert run.status == "in_progress" and abs(run.scheduled_at - (now + delay)) < 0.05
    assert ductwork.status_report(engine)["scheduled"] == {"DelayOne": {"runs": 1, "first": run.scheduled_at}}
    soon = DelayOne.trigger(2)   # an undelayed run goes first
    assert soon.wait(timeout=LOAD_SLACK) == "completed" and soon.scheduled_at is None
    assert first_execution(engine, run.id) is None
    assert run.wait(timeout=delay + LOAD_SLACK) == "completed" and run.output == 2
    (started,) = first_execution(engine, run.id)
    assert started >= run.scheduled_at   # claimable only from its start on
    assert ductwork.status_report(engine)["scheduled"] == {}


def test_a_start_time_in_the_past_runs_at_once_and_one_in_the_future_waits(engine, start_runtime):
    start_runtime(["DelayOne"])
    past = DelayOne.trigger(1, at=datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc))
    assert past.scheduled_at == datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc).timestamp()
    assert past.wait(timeout=LOAD_SLACK) == "completed"
    later = DelayOne.trigger(1, at=past.created_at + 3600)
    assert later.scheduled_at == past.created_at + 3600
    report = ductwork.status_report(engine)["scheduled"]
    assert report == {"DelayOne": {"runs": 1, "first": later.scheduled_at}}
    assert later.refresh().status == "in_progress" and first_execution(engine, later.id) is None
    # the dashboard: the overview's table of runs still to start, and the run's page
    overview = ductwork.render_overview(ductwork.dashboard_overview(engine))
    assert '<h2>Scheduled</h2><div id="scheduled">' in overview and ductwork._ts(later.scheduled_at) in overview
    page = ductwork.render_run(ductwork.dashboard_run(engine.store, later.id))
    assert f'id="scheduled-at">scheduled to start at {ductwork._when(later.scheduled_at)}</p>' in page
    assert later.cancel() and later.refresh().status == "cancelled"   # a scheduled run can be cancelled
    assert ductwork.status_report(engine)["scheduled"] == {}
    assert "<h2>Scheduled</h2>" not in ductwork.render_overview(ductwork.dashboard_overview(engine))


@pytest.mark.parametrize("kwargs, problem", [
    ({"delay": -1}, "a trigger delay must be seconds from 0 to 31536000, got -1"),
    ({"delay": True}, "a trigger delay must be seconds from 0 to 31536000, got True"),
    ({"delay": float("nan")}, "a trigger delay must be seconds from 0 to 31536000, got nan"),
    ({"delay": "5"}, "a trigger delay must be seconds from 0 to 31536000, got '5'"),
    ({"delay": 1, "at": 5}, "give a trigger delay or at, not both"),
    ({"at": datetime.datetime(2030, 1, 1)}, "a trigger time must be timezone-aware, got 2030-01-01T00:00:00"),
    ({"at": "tomorrow"}, "a trigger time must be an aware datetime or epoch seconds, got 'tomorrow'"),
])
def test_a_bad_delay_or_time_is_refused_before_anything_is_stored(engine, kwargs, problem):
    with pytest.raises(ductwork.DuctworkError) as err:
        DelayOne.trigger(1, **kwargs)
    assert str(err.value).startswith(problem)
    with engine.store.tx(write=False) as t:
        assert t.one("SELECT count(*) FROM ductwork_runs")[0] == 0


APP_TEXT = '''
import ductwork


def plus_one(x):
    return x + 1


class CliDelay(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(plus_one)
'''


def test_the_cli_triggers_delayed_runs_and_status_shows_them(tmp_path, db_url):
    (tmp_path / "delay_app.py").write_text(APP_TEXT)
    env = {"DUCTWORK_DATABASE_URL": db_url, "DUCTWORK_APP": str(tmp_path / "delay_app.py")}
    assert run_cli("migrate", env=env).returncode == 0
    later = run_cli("trigger", "CliDelay", "1", "--delay", "600", env=env)
    assert later.returncode == 0, later.stderr
    at = run_cli("trigger", "CliDelay", "2", "--at", "2030-01-01T00:00:00Z", env=env)
    assert at.returncode == 0, at.stderr
    status = run_cli("status", env=env)
    assert status.returncode == 0, status.stderr
    assert "scheduled (delayed runs still to start):" in status.stdout
    assert "CliDelay                     2 run(s), the first at " in status.stdout
    report = json.loads(run_cli("status", "--json", env=env).stdout)
    assert report["scheduled"]["CliDelay"]["runs"] == 2
    ductwork.configure(database_url=db_url)
    run = ductwork.Run.get(int(at.stdout))
    assert run.scheduled_at == datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc).timestamp()
    keyed = [run_cli("trigger", "CliDelay", "3", "--key", "nightly-2030", env=env) for _ in range(2)]
    assert [k.returncode for k in keyed] == [0, 0] and keyed[0].stdout == keyed[1].stdout   # one run per key
    for argv, problem in [
        (["--key", ""], "ductwork: error: a trigger key must be a non-empty string"),
        (["--at", "2030-01-01T00:00:00"], "ductwork: error: --at '2030-01-01T00:00:00' has no UTC offset"),
        (["--at", "soon"], "ductwork: error: --at 'soon' is not an ISO 8601 time"),
        (["--delay", "-3"], "ductwork: error: a trigger delay must be seconds from 0"),
        (["--delay", "1", "--at", "2030-01-01T00:00:00Z"], "not allowed with argument"),
    ]:
        bad = run_cli("trigger", "CliDelay", "1", *argv, env=env)
        assert bad.returncode == 2 and problem in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) <= 2, bad.stderr   # (argparse adds its usage line)

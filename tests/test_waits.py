"""Durable sleeps and signals (SPEC §16): `.sleep(S)` and `.wait_for(NAME, timeout)` as transitions, run.signal()
and the CLI's `signal`. Real runtimes on real SQLite and PostgreSQL; a real supervisor SIGKILLed mid-sleep."""
from __future__ import annotations

import json
import signal
import time

import pytest
from conftest import run_cli
from procs import LOAD_SLACK, Proc, wait_until

import ductwork

NAP = 1.0   # the sleeps' seconds: long enough to tell from none, short enough for the suite


def first(x):
    return x + 1


def then(x):
    return {"got": x}


def fan(n):
    return list(range(n))


def each(x):
    return x * 10


def total(values):
    return values


class WaitSleep(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(first).sleep(NAP).chain(to=then)


class WaitSleepFan(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(fan).sleep(NAP).expand(to=each).collapse(into=total)


class WaitSignal(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(first).wait_for("approved").chain(to=then)


class WaitTimeout(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(first).wait_for("approved", timeout=NAP).chain(to=then)


class WaitInFan(ductwork.Pipeline):
    """Each child branch waits for the run's one signal."""
    @staticmethod
    def define(p):
        p.start(fan).expand(to=each).wait_for("go").chain(to=first).collapse(into=total)


def steps_of(engine, run_id) -> list[tuple]:
    with engine.store.tx(write=False) as t:
        return t.all("SELECT name, status, available_at, created_at, finished_at, input FROM ductwork_steps "
                     "WHERE run_id = :r ORDER BY id", {"r": run_id})


def executions_of(engine, run_id) -> list[tuple]:
    with engine.store.tx(write=False) as t:
        return t.all("SELECT s.name, e.started_at, e.finished_at FROM ductwork_executions e JOIN ductwork_steps s "
                     "ON s.id = e.step_id WHERE e.run_id = :r ORDER BY e.id", {"r": run_id})


def parked(engine, run_id) -> list[tuple]:
    with engine.store.tx(write=False) as t:
        return t.all("SELECT waiting_for, wait_until, status FROM ductwork_branches WHERE run_id = :r "
                     "AND waiting_for IS NOT NULL ORDER BY id", {"r": run_id})


def test_a_sleep_holds_the_next_step_back_and_passes_the_output_on(engine, start_runtime):
    start_runtime(["WaitSleep", "WaitSleepFan"])
    run = WaitSleep.trigger(1)
    assert run.wait(timeout=NAP + LOAD_SLACK) == "completed" and run.output == {"got": 2}
    (_, a_started, a_finished), (name, b_started, _) = executions_of(engine, run.id)
    assert name == "then" and b_started >= a_finished + NAP   # the database's clock: not a moment sooner
    fan_run = WaitSleepFan.trigger(3)
    assert fan_run.wait(timeout=NAP + LOAD_SLACK) == "completed" and fan_run.output == [0, 10, 20]
    runs = executions_of(engine, fan_run.id)
    fanned = runs[0][2]
    assert [r[0] for r in runs[1:4]] == ["each"] * 3 and all(r[1] >= fanned + NAP for r in runs[1:4])


def test_status_and_the_dashboard_show_the_sleeping_and_the_parked(engine, start_runtime):
    start_runtime(["WaitSleep", "WaitSignal"])
    sleeper = WaitSleep.trigger(1)
    waiter = WaitSignal.trigger(1)
    wait_until(lambda: parked(engine, waiter.id), LOAD_SLACK, what="the parked branch")
    wait_until(lambda: len(steps_of(engine, sleeper.id)) == 2, LOAD_SLACK, what="the sleeping step")
    report = ductwork.status_report(engine)
    assert report["waiting"]["WaitSignal"]["signal"] == 1 and report["waiting"]["WaitSignal"]["first_timeout"] is None
    assert report["waiting"]["WaitSleep"]["sleeping"] == 1
    assert report["waits"] == [{"run": waiter.id, "branch": report["waits"][0]["branch"], "pipeline": "WaitSignal",
                                "signal": "approved", "until": None}]
    lines = "\n".join(ductwork._status_lines(report))
    assert "WaitSignal                   1 branch(es) for a signal (no timeout)" in lines
    assert "WaitSleep                    1 step(s) asleep (the first wakes at " in lines
    assert f"run {waiter.id} branch " in lines and "signal 'approved' (no timeout)" in lines
    page = ductwork.render_run(ductwork.dashboard_run(engine.store, waiter.id))
    assert "waits for signal &#x27;approved&#x27; (no timeout)" in page
    page = ductwork.render_run(ductwork.dashboard_run(engine.store, sleeper.id))
    assert page.count('class="muted waits">not before ') == 1
    assert waiter.signal("approved", "yes") and waiter.wait(timeout=LOAD_SLACK) == "completed"
    assert sleeper.wait(timeout=NAP + LOAD_SLACK) == "completed"
    assert ductwork.status_report(engine)["waiting"] == {}


def test_a_signal_wakes_the_parked_branch_with_its_payload_and_the_first_one_wins(engine, start_runtime):
    start_runtime(["WaitSignal"])
    run = WaitSignal.trigger(1)
    wait_until(lambda: parked(engine, run.id), LOAD_SLACK, what="the parked branch")
    assert parked(engine, run.id) == [("approved", None, "advance")]
    assert run.refresh().status == "in_progress"
    assert run.signal("approved", {"by": "ana"}) is True
    assert run.signal("approved", {"by": "bob"}) is False   # the first of a name wins
    assert run.wait(timeout=LOAD_SLACK) == "completed" and run.output == {"got": {"by": "ana"}}
    assert parked(engine, run.id) == []
    assert run.signal("other") is False   # a finished run keeps no signal


def test_a_signal_sent_before_the_wait_is_reached_is_kept(engine, start_runtime):
    run = WaitSignal.trigger(1)   # no runtime yet: the first step has not even run
    assert run.signal("approved", [1, 2]) is True
    start_runtime(["WaitSignal"])
    assert run.wait(timeout=LOAD_SLACK) == "completed" and run.output == {"got": [1, 2]}
    assert parked(engine, run.id) == []   # it never parked


def test_past_its_timeout_the_branch_halts_and_revive_waits_again_afresh(engine, start_runtime):
    start_runtime(["WaitTimeout"])
    run = WaitTimeout.trigger(1)
    assert run.wait(timeout=NAP + LOAD_SLACK) == "halted" and run.halt_reasons == ["signal_timeout"]
    assert parked(engine, run.id) == []
    assert run.signal("approved", "late") is False   # the run is halted: nothing is kept
    revived_at = time.time()
    assert run.revive()
    wait_until(lambda: parked(engine, run.id), LOAD_SLACK, what="the branch parked again")
    [(name, until, _)] = parked(engine, run.id)
    assert name == "approved" and until >= revived_at + NAP - 0.5   # a fresh timeout, from the revive
    assert run.wait(timeout=NAP + LOAD_SLACK) == "halted" and run.halt_reasons == ["signal_timeout"]
    assert run.revive()
    wait_until(lambda: parked(engine, run.id), LOAD_SLACK, what="the branch parked once more")
    assert run.signal("approved", "in time")
    assert run.wait(timeout=LOAD_SLACK) == "completed" and run.output == {"got": "in time"}


def test_every_waiting_branch_of_a_fan_out_gets_the_run_s_signal(engine, start_runtime):
    start_runtime(["WaitInFan"])
    run = WaitInFan.trigger(3)
    wait_until(lambda: len(parked(engine, run.id)) == 3, LOAD_SLACK, what="three parked children")
    assert run.signal("go", 5)
    assert run.wait(timeout=LOAD_SLACK) == "completed" and run.output == [6, 6, 6]


def test_a_cancel_of_a_parked_run_and_its_revive(engine, start_runtime):
    start_runtime(["WaitSignal"])
    run = WaitSignal.trigger(1)
    wait_until(lambda: parked(engine, run.id), LOAD_SLACK, what="the parked branch")
    assert run.cancel() and parked(engine, run.id) == []
    assert run.revive()
    wait_until(lambda: parked(engine, run.id), LOAD_SLACK, what="parked again after the revive")
    assert run.signal("approved", 1) and run.wait(timeout=LOAD_SLACK) == "completed"


@pytest.mark.parametrize("define, problem", [
    (lambda p: p.start(first).sleep(0).chain(to=then), "sleep needs seconds above 0"),
    (lambda p: p.start(first).sleep(-1).chain(to=then), "sleep needs seconds above 0"),
    (lambda p: p.start(first).sleep(True).chain(to=then), "sleep needs seconds above 0"),
    (lambda p: p.start(first).sleep(float("inf")).chain(to=then), "sleep needs seconds above 0"),
    (lambda p: p.start(first).wait_for("").chain(to=then), "wait_for needs a signal name"),
    (lambda p: p.start(first).wait_for(7).chain(to=then), "wait_for needs a signal name"),
    (lambda p: p.start(first).wait_for("x", timeout=0).chain(to=then), "wait_for timeout must be seconds above 0"),
    (lambda p: p.start(first).sleep(1).wait_for("x").chain(to=then), "wait_for after another sleep/wait_for"),
    (lambda p: p.start(first).sleep(1), "sleep/wait_for at the end of a line"),
    (lambda p: p.start(fan).expand(to=each).sleep(1).collapse(into=total), "sleep/wait_for before collapse"),
])
def test_misused_waits_are_definition_errors(define, problem):
    with pytest.raises(ductwork.DefinitionError) as err:
        type("BadWait", (ductwork.Pipeline,), {"define": staticmethod(define)})
    assert problem in str(err.value)


def test_waits_are_stored_in_the_run_s_definition():
    # wrapped in a transition kind of their own: a process of the version before halts there (transition_invalid)
    after = WaitTimeout.definition.nodes[0]["after"]
    assert after == {"kind": "wait", "wait": {"signal": "approved", "timeout": NAP},
                     "then": {"kind": "chain", "next": 1}}
    assert WaitSleep.definition.nodes[0]["after"]["wait"] == {"sleep": NAP}
    assert WaitSleep.definition.nodes[1]["after"] == {"kind": "end"}
    fan = WaitSleepFan.definition.nodes[0]["after"]
    assert fan == {"kind": "wait", "wait": {"sleep": NAP}, "then": {"kind": "expand", "child": 1, "join": 2},
                   "join": 2}
    before = ductwork.decide(ductwork.Situation(0, WaitTimeout.definition.nodes,
                                                ductwork.StepState(1, "succeeded", "2", None), now=100.0))
    assert (before.status, before.park) == ("advance", ("approved", 100.0 + NAP))
    # what the version before makes of it: an unknown transition (its decide() never saw a "wait" kind)
    assert ductwork.DECISIONS.get("wait") is None


APP_TEXT = '''
import ductwork


def first(x):
    return x + 1


def then(x):
    return {"got": x}


class CliWait(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(first).wait_for("approved").chain(to=then)


class CliSleep(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(first).sleep(%(nap)s).chain(to=then)
'''


def test_the_cli_sends_signals_with_clear_exit_codes(tmp_path, db_url):
    (tmp_path / "wait_app.py").write_text(APP_TEXT % {"nap": NAP})
    env = {"DUCTWORK_DATABASE_URL": db_url, "DUCTWORK_APP": str(tmp_path / "wait_app.py")}
    assert run_cli("migrate", env=env).returncode == 0
    run_id = int(run_cli("trigger", "CliWait", "1", env=env).stdout)
    sent = run_cli("signal", str(run_id), "approved", '{"ok": true}', env=env)
    assert sent.returncode == 0 and sent.stdout.strip() == f"signal 'approved' sent to run {run_id}", sent.stderr
    again = run_cli("signal", str(run_id), "approved", env=env)
    assert again.returncode == 1 and again.stderr.strip() == (
        f"ductwork: error: run {run_id} is not in progress, or had its signal 'approved' already")
    missing = run_cli("signal", "999999", "approved", env=env)
    assert missing.returncode == 1 and missing.stderr.strip() == "ductwork: error: run 999999 not found"
    bad = run_cli("signal", str(run_id), "approved", "{nope", env=env)
    assert bad.returncode == 2 and "is not valid JSON" in bad.stderr and "Traceback" not in bad.stderr
    ductwork.configure(database_url=db_url)
    with ductwork._app_engine().store.tx(write=False) as t:
        assert t.all("SELECT name, payload FROM ductwork_signals WHERE run_id = :r", {"r": run_id}) == [
            ("approved", '{"ok":true}')]


def test_a_sleep_outlives_a_sigkilled_deployment_and_is_not_shortened(tmp_path, procs, db_url):
    nap = 3.0
    (tmp_path / "wait_app.py").write_text(APP_TEXT % {"nap": nap})
    config = {"app": str(tmp_path / "wait_app.py"), "pipelines": ["CliSleep"]}
    ductwork.configure(database_url=db_url)
    ductwork.migrate()
    first_sup = Proc(tmp_path, db_url, name="first", config=config)
    procs.append(first_sup)
    first_sup.wait_log(r"started worker:CliSleep")
    run_id = int(run_cli("trigger", "CliSleep", "1", "--database-url", db_url,
                         env={"DUCTWORK_APP": config["app"]}).stdout)
    engine = ductwork._app_engine()
    wait_until(lambda: len(steps_of(engine, run_id)) == 2, LOAD_SLACK, what="the step after the sleep")
    first_sup.kill_group()   # SIGKILL: the supervisor and its children, mid-sleep
    second = Proc(tmp_path, db_url, name="second", config=config)
    procs.append(second)
    run = ductwork.Run.get(run_id)
    assert run.wait(timeout=nap + 2 * LOAD_SLACK) == "completed" and run.output == {"got": 2}
    (_, _, a_finished), (_, b_started, _) = executions_of(engine, run_id)
    assert b_started >= a_finished + nap
    second.signal(signal.SIGTERM)
    assert second.wait() == 0
    assert json.loads(run_cli("status", "--json", "--database-url", db_url,
                              env={"DUCTWORK_APP": config["app"]}).stdout)["waiting"] == {}

"""Cancelling runs (SPEC §14) on real SQLite and PostgreSQL: the engine in one process, then real deployments
(supervisors, foreground roles, `forking: none`) of three worker processes."""
from __future__ import annotations

import collections
import json
import os
import sys
import threading
import time

import pytest
from conftest import FAST, run_cli
from procs import LOAD_SLACK, Proc, wait_until

import ductwork

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "apps"))
import control_app  # noqa: E402

CALLS: collections.Counter = collections.Counter()
STOPPED: list[int] = []
HALTS: list[int] = []
TERMINAL = ("succeeded", "failed", "cancelled")


# -- pipelines of the in-process tests -----------------------------------------------------------
def fan(n):
    return list(range(n))


def slow(x):
    """Runs up to 10 s, in slices; returns early once told to stop (and says so)."""
    step = ductwork.current_step()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if step.should_stop:
            STOPPED.append(step.step_id)
            return "late"
        time.sleep(0.01)
    return x


def brief(x):
    time.sleep(0.05)
    CALLS["brief", x] += 1
    return x


def quick(x):
    return x + 1


def flaky_once(x):
    CALLS["flaky", x] += 1
    if CALLS["flaky", x] == 1:
        raise RuntimeError("first attempt fails")
    return x


def add_up(values):
    return sum(values)


class CtlSlowFan(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(fan).expand(to=slow).collapse(into=add_up)


class CtlBriefFan(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(fan).expand(to=brief).collapse(into=add_up)


class CtlSolo(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(slow)


class CtlQuick(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(quick).chain(to=quick).chain(to=quick).chain(to=quick)


class CtlRetry(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(flaky_once).chain(to=quick)


class CtlHalting(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(slow)
        p.on_halt(lambda run, reasons: HALTS.append(run.id))


@pytest.fixture(autouse=True)
def _reset():
    CALLS.clear()
    STOPPED.clear()
    HALTS.clear()


# -- what the rows say ------------------------------------------------------------------------------
def rows(engine, sql, params=()):
    with engine.store.tx(write=False) as t:
        return t.all(sql, params)


def step_statuses(engine, run_id) -> collections.Counter:
    return collections.Counter(s.status for s in ductwork.Run.get(run_id).steps)


def executions(engine, run_id) -> list[tuple]:
    """(step id, outcome, started_at, finished_at) of every execution of the run."""
    return rows(engine, "SELECT step_id, outcome, started_at, finished_at FROM ductwork_executions "
                        "WHERE run_id = :run_id ORDER BY id", {"run_id": run_id})


def settled(engine, run_id) -> bool:
    """Every step of the run is in a final status (nothing running, stopping or waiting for an answer)."""
    return all(status in TERMINAL for status in step_statuses(engine, run_id))


def assert_nothing_started_after(engine, run_ids, returned_at: float) -> None:
    """No execution of these runs started after cancel() returned (database clock), no step of theirs was queued
    after it, and none is left claimable."""
    for run_id in run_ids:
        for step_id, outcome, started, _ in executions(engine, run_id):
            assert started is not None and started <= returned_at, (run_id, step_id, outcome, started, returned_at)
        for s in ductwork.Run.get(run_id).steps:
            assert s.created_at <= returned_at, (run_id, s.name, s.status, s.created_at, returned_at)
            assert s.status != "queued", (run_id, s.name)


def wait_started(engine, run_id, n: int, timeout: float = 20) -> None:
    wait_until(lambda: step_statuses(engine, run_id)["running"] >= n, timeout, what=f"{n} steps running")


def settle_deadline() -> float:
    """A step that was running when its run was cancelled has stopped by then: the holder looks every
    CANCEL_POLL at the latest (a hint makes it at once), the step looks at should_stop every 10 ms."""
    return ductwork.CANCEL_POLL + LOAD_SLACK


# -- the API -----------------------------------------------------------------------------------------
def test_a_run_cancelled_before_any_worker_is_cancelled_everywhere(engine):
    run = CtlBriefFan.trigger(3)
    assert run.cancel(reason="ordered by mistake") is True
    assert run.status == "cancelled" and run.cancel_reason == "ordered by mistake"
    assert run.finished_at is not None
    assert run.wait(timeout=1) == "cancelled"
    assert ductwork.Run.get(run.id).status == "cancelled"
    assert [(s.name, s.status) for s in run.steps] == [("fan", "cancelled")]
    assert run.cancel() is False   # finished already
    assert [r.id for r in ductwork.Run.list(status="cancelled")] == [run.id]
    report = ductwork.status_report(engine)
    assert report["runs"]["CtlBriefFan"] == {"cancelled": 1}
    metrics = ductwork.dashboard_metrics(engine)
    assert 'ductwork_runs_finished_total{pipeline="CtlBriefFan",status="cancelled"} 1' in metrics
    assert 'ductwork_runs_finished_total{pipeline="CtlBriefFan",status="completed"} 0' in metrics
    assert 'ductwork_runs{pipeline="CtlBriefFan",status="cancelled"} 1' in metrics
    assert 'ductwork_runs_in_progress{pipeline="CtlBriefFan"} 0' in metrics


def test_unknown_and_finished_runs_are_not_cancelled(engine, start_runtime):
    assert ductwork.Run(987654, engine).cancel() is False
    assert ductwork.cancel(987654) == 0
    start_runtime(["CtlQuick"])
    run = CtlQuick.trigger(1)
    assert run.wait(timeout=20) == "completed"
    assert run.cancel() is False and run.status == "completed"
    with pytest.raises(ductwork.DuctworkError, match="never cancels everything"):
        ductwork.cancel()
    with pytest.raises(ductwork.DuctworkError, match="older_than"):
        ductwork.cancel(pipeline="CtlQuick", older_than=-1)
    with pytest.raises(ductwork.DuctworkError, match="reason"):
        run.cancel(reason=42)


def test_a_claimed_step_that_had_not_started_never_starts_and_a_running_one_is_discarded(engine):
    """The holder's answer, step by step: a cancel waits for it; a claim not started yet is dropped (run_step
    does not run it), one running is told to stop, and what it returns later is discarded."""
    config = ductwork.load_config(data=FAST, overrides={"database_url": engine.store.url})
    runtime = ductwork.Runtime(config, "worker", ["CtlSolo"])
    runtime.register()
    try:
        runs = [CtlSolo.trigger(i) for i in range(3)]
        claims = runtime.engine.claim_steps("CtlSolo", runtime.process_id, 3)
        assert len(claims) == 3
        runtime._track(claims)
        first = claims[0]
        runtime.in_flight[first.step_id] = (first, True)   # run_step began this one
        first.mark_started()
        done: list[list[int]] = []
        cancelling = threading.Thread(target=lambda: done.append(engine.cancel([r.id for r in runs])))
        cancelling.start()
        wait_until(lambda: sum(step_statuses(engine, r.id)["cancelling"] for r in runs) == 3, 10,
                   what="the claimed steps told")
        assert cancelling.is_alive()   # cancel() waits for the holder's answer
        assert runtime.look_for_cancels() == 3
        cancelling.join(ductwork.CANCEL_ACK_TIMEOUT)
        assert not cancelling.is_alive() and sorted(done[0]) == sorted(r.id for r in runs)
        assert first.stop_requested and not first.dropped
        assert all(c.dropped and not c.stop_requested for c in claims[1:])
        assert step_statuses(engine, runs[0].id) == {"stopping": 1}
        assert step_statuses(engine, runs[1].id) == {"cancelled": 1}
        assert runtime.run_step(claims[1]) is None          # it never starts
        assert executions(engine, runs[1].id) == []
        result = ductwork.StepResult(first, True, json.dumps("too late"))
        committed = runtime.engine.commit([result])
        assert committed.accepted == [False] and committed.discarded == {first.step_id}
        assert step_statuses(engine, runs[0].id) == {"cancelled": 1}
        assert [e[1] for e in executions(engine, runs[0].id)] == ["cancelled"]
        assert ductwork.Run.get(runs[0].id).output is None
    finally:
        runtime._unregister()


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_a_commit_waits_while_a_cancel_holds_its_run(engine):
    """The order of a commit and a cancel (Postgres): a commit of a success takes its run's lock (shared) before
    it writes anything; while a cancel holds it exclusively, the commit waits, then finds its step cancelled."""
    import pg8000.native
    run = CtlQuick.trigger(1)
    [claim] = engine.claim_steps("CtlQuick", 777, 1)
    info = ductwork.parse_database_url(engine.store.url)
    other = pg8000.native.Connection(info.user, host=info.host, port=info.port, database=info.database)
    try:
        other.run("BEGIN")
        other.run("SELECT pg_advisory_xact_lock(:c, :k)", c=ductwork.SQL.RUN_LOCK_CLASS, k=run.id)
        done: list = []
        committing = threading.Thread(target=lambda: done.append(
            engine.commit([ductwork.StepResult(claim, True, "2")])))
        committing.start()
        wait_until(lambda: rows(engine, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                                        "AND classid = :c AND objid = :k",
                                {"c": ductwork.SQL.RUN_LOCK_CLASS, "k": run.id})[0][0] == 1, 10,
                   what="the commit waiting for the run's lock")
        assert step_statuses(engine, run.id) == {"running": 1}   # it wrote nothing yet
        other.run("UPDATE ductwork_steps SET status = 'stopping' WHERE run_id = :r", r=run.id)   # as a cancel
        other.run("UPDATE ductwork_runs SET status = 'cancelled' WHERE id = :r", r=run.id)
        other.run("COMMIT")
        committing.join(10)
        assert done and done[0].discarded == {claim.step_id} and done[0].accepted == [False]
        assert [s.name for s in ductwork.Run.get(run.id).steps] == ["quick"]   # nothing advanced
    finally:
        other.close()


def test_claims_nobody_answers_for_are_taken_after_the_timeout(engine, monkeypatch):
    """A frozen holder (here: a process row whose owner never looks) cannot hold up cancel() for longer than
    CANCEL_ACK_TIMEOUT: its claims are taken, and its late commit is discarded."""
    monkeypatch.setattr(ductwork, "CANCEL_ACK_TIMEOUT", 0.5)
    config = ductwork.load_config(data=FAST, overrides={"database_url": engine.store.url})
    runtime = ductwork.Runtime(config, "worker", ["CtlSolo"])
    runtime.register()
    try:
        run = CtlSolo.trigger(1)
        [claim] = runtime.engine.claim_steps("CtlSolo", runtime.process_id, 1)
        started = time.monotonic()
        assert run.cancel() is True
        assert 0.5 <= time.monotonic() - started < 0.5 + LOAD_SLACK
        assert step_statuses(engine, run.id) == {"cancelled": 1}
        committed = runtime.engine.commit([ductwork.StepResult(claim, True, "1")])
        assert committed.accepted == [False] and not committed.discarded   # the claim is gone
        assert executions(engine, run.id) == []
        # the frozen holder wakes up: a claim that waited past CANCEL_LEASE is checked before it starts
        other = CtlSolo.trigger(2)
        [late] = runtime.engine.claim_steps("CtlSolo", runtime.process_id, 1)
        assert other.cancel() is True   # (nobody answers: taken after the timeout)
        runtime._track([late])
        late.confirmed -= ductwork.CANCEL_LEASE + 1
        assert runtime.run_step(late) is None and STOPPED == []
        assert executions(engine, other.id) == [] and step_statuses(engine, other.id) == {"cancelled": 1}
    finally:
        runtime._unregister()


def test_a_revive_while_a_discarded_result_commits_leaves_the_step_queued(engine, monkeypatch):
    """The review's race (Postgres): the holder's late commit discards its stopping step while revive() runs;
    whichever is first, the revived run's step ends queued (not cancelled in a run in progress, stalled)."""
    run = CtlSolo.trigger(1)
    [claim] = engine.claim_steps("CtlSolo", 4242, 1)
    claim.mark_started()

    def answer():   # the holder answers as for a running step
        wait_until(lambda: step_statuses(engine, run.id) == {"cancelling": 1}, 10, what="the step told")
        with engine.store.tx() as t:
            t.run("UPDATE ductwork_steps SET status = 'stopping' WHERE id = :i AND status = 'cancelling'",
                  {"i": claim.step_id})
    answering = threading.Thread(target=answer)
    answering.start()
    assert run.cancel() is True
    answering.join()
    original = ductwork.Engine._record_executions
    recorded = threading.Event()

    def slow_record(self, t, results, discarded=()):   # the commit goes on after its discard (as a longer one does)
        original(self, t, results, discarded)
        recorded.set()
        time.sleep(0.5)
    monkeypatch.setattr(ductwork.Engine, "_record_executions", slow_record)
    out: list = []
    committing = threading.Thread(target=lambda: out.append(engine.commit([ductwork.StepResult(claim, True, "1")])))
    committing.start()
    assert recorded.wait(10)
    assert run.revive() is True
    committing.join(10)
    assert out[0].discarded == {claim.step_id}
    assert ductwork.Run.get(run.id).status == "in_progress" and step_statuses(engine, run.id) == {"queued": 1}


def test_revive_reruns_a_failed_step_of_a_branch_the_cancel_took_from_the_advancer(engine):
    """A branch queued for the advancer with a failed step (its crash budget spent) when its run was cancelled:
    revive() runs the step again, as for a halted run, instead of letting the advancer halt the run at once."""
    config = ductwork.load_config(data={**FAST, "job_worker": {**FAST["job_worker"], "max_crash": 0}},
                                  overrides={"database_url": engine.store.url})
    crashing = ductwork.Engine(engine.store, config)
    run = CtlSolo.trigger(1)
    crashing.claim_steps("CtlSolo", 31, 1)
    assert crashing.hand_back(31, None, "killed") == 1   # failed for good, its branch waits for the advancer
    assert step_statuses(engine, run.id) == {"failed": 1}
    assert run.cancel() is True
    assert run.revive() is True
    assert step_statuses(engine, run.id) == {"queued": 1}
    with engine.store.tx(write=False) as t:
        assert t.all("SELECT status FROM ductwork_branches WHERE run_id = :r", {"r": run.id}) == [("running",)]


def test_a_fan_out_bigger_than_a_statement_is_cancelled_whole(engine, monkeypatch):
    monkeypatch.setattr(ductwork, "CANCEL_ROWS", 700)
    run = CtlBriefFan.trigger(2000)
    [claim] = engine.claim_steps("CtlBriefFan", 55, 1)
    assert engine.commit([ductwork.StepResult(claim, True, json.dumps(list(range(2000))))]).accepted == [True]
    assert step_statuses(engine, run.id) == {"succeeded": 1, "queued": 2000}
    assert run.cancel() is True
    assert step_statuses(engine, run.id) == {"succeeded": 1, "cancelled": 2000}


@pytest.mark.parametrize("db_url", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres),
                                    pytest.param("pgbouncer", marks=pytest.mark.postgres)], indirect=True)
def test_running_steps_see_should_stop_and_nothing_starts_after_cancel(engine, start_runtime):
    """Also behind a transaction pooler without listen_url: no hint reaches the workers, their look every
    CANCEL_POLL does."""
    start_runtime(["CtlSlowFan"], job_worker={"count": 4, "polling_timeout": 0.05})
    run = CtlSlowFan.trigger(20)
    wait_started(engine, run.id, 4)
    assert run.cancel() is True
    returned_at = engine.store.now()
    assert run.status == "cancelled"
    wait_until(lambda: settled(engine, run.id), settle_deadline(), what="the running steps stopped")
    assert_nothing_started_after(engine, [run.id], returned_at)
    outcomes = collections.Counter(e[1] for e in executions(engine, run.id))
    # each running step saw should_stop (they run 10 s), and what it returned was discarded
    assert outcomes == {"succeeded": 1, "cancelled": len(STOPPED)} and len(STOPPED) >= 4, (outcomes, STOPPED)
    assert "add_up" not in {s.name for s in run.steps}
    assert run.wait(timeout=1) == "cancelled"


def test_a_run_waiting_for_a_retry_is_cancelled_and_revive_runs_it_again(engine, start_runtime):
    start_runtime(["CtlRetry"], job_worker={"retry_delay": {"CtlRetry": 60}})
    run = CtlRetry.trigger(7)
    wait_until(lambda: [e[1] for e in executions(engine, run.id)] == ["failed"], 20, what="the first failure")
    assert step_statuses(engine, run.id) == {"queued": 1}   # waits 60 s for its retry
    assert run.cancel() is True
    assert step_statuses(engine, run.id) == {"cancelled": 1}
    assert run.revive() is True and run.status == "in_progress"
    assert run.wait(timeout=20) == "completed" and run.output == 8
    assert CALLS["flaky", 7] == 2


def test_cancel_then_revive_reruns_only_what_had_not_completed(engine, start_runtime):
    start_runtime(["CtlBriefFan"], job_worker={"count": 1})
    run = CtlBriefFan.trigger(12)
    wait_until(lambda: step_statuses(engine, run.id)["succeeded"] >= 4, 20, what="a few steps done")
    assert run.cancel() is True
    wait_until(lambda: settled(engine, run.id), settle_deadline(), what="the cancel settled")
    done_before = {s.input for s in run.steps if s.name == "brief" and s.status == "succeeded"}
    assert 3 <= len(done_before) < 12
    assert run.revive() is True
    assert run.wait(timeout=30) == "completed" and run.output == sum(range(12))
    for x in done_before:
        assert CALLS["brief", x] == 1   # completed work is kept
    assert all(CALLS["brief", x] >= 1 for x in range(12))


def test_a_commit_racing_a_cancel_never_advances_the_cancelled_run(engine, start_runtime):
    """Runs of a chain of quick steps cancelled at random moments: a commit at the same instant either lands
    before the cancel (which then cancels what it queued) or is discarded; nothing of a cancelled run is left
    claimable, queued after the cancel, or started after it."""
    start_runtime(["CtlQuick"], job_worker={"count": 3})
    runs, cancelled, returned = [], [], []
    for i in range(40):
        run = CtlQuick.trigger(i)
        runs.append(run)
        time.sleep(i * 0.0003)   # from before its first claim (0) to after its last commit (12 ms)
        if run.cancel():
            cancelled.append(run.id)
            returned.append(engine.store.now())
    assert cancelled, "every run finished before its cancel: the race was not exercised"
    for run in runs:
        assert run.wait(timeout=30) in ("completed", "cancelled")
    for run_id, returned_at in zip(cancelled, returned, strict=True):
        wait_until(lambda r=run_id: settled(engine, r), settle_deadline(), what=f"run {run_id} settled")
        assert_nothing_started_after(engine, [run_id], returned_at)
        assert ductwork.Run.get(run_id).status == "cancelled"
    completed = [r for r in runs if r.refresh().status == "completed"]
    assert all(r.output == r.input[0] + 4 for r in completed)


def test_bulk_cancel_by_pipeline_and_age(engine):
    old = [CtlBriefFan.trigger(1) for _ in range(5)]
    with engine.store.tx() as t:   # triggered an hour ago (database clock)
        t.run("UPDATE ductwork_runs SET created_at = created_at - 3600 WHERE id <= :last", {"last": old[-1].id})
    new = [CtlBriefFan.trigger(1) for _ in range(240)]
    other = CtlSolo.trigger(1)
    assert ductwork.cancel(pipeline="CtlBriefFan", older_than=1800, reason="stale") == 5
    assert {r.refresh().status for r in old} == {"cancelled"}
    assert {r.refresh().status for r in new} == {"in_progress"}
    assert ductwork.cancel(pipeline="CtlBriefFan") == 240
    assert {r.refresh().status for r in new} == {"cancelled"}
    assert other.refresh().status == "in_progress"
    assert ductwork.cancel(other.id, pipeline="CtlBriefFan") == 0   # a filter narrows the ids given
    assert ductwork.status_report(engine)["runs"]["CtlBriefFan"] == {"cancelled": 245}


def test_the_cancel_command(engine, tmp_path):
    runs = [CtlBriefFan.trigger(1) for _ in range(3)]
    env = {"DUCTWORK_DATABASE_URL": engine.store.url}
    one = run_cli("cancel", str(runs[0].id), "--reason", "by hand", env=env)
    assert (one.returncode, one.stdout, one.stderr) == (0, "cancelled 1 run\n", "")
    assert runs[0].refresh().cancel_reason == "by hand"
    missing = run_cli("cancel", str(runs[1].id), "987654", env=env)
    assert missing.returncode == 1 and missing.stdout == "cancelled 1 run\n"
    assert missing.stderr == "ductwork: error: run 987654 not found\n"
    bulk = run_cli("cancel", "--pipeline", "CtlBriefFan", env=env)
    assert (bulk.returncode, bulk.stdout) == (0, "cancelled 1 run\n")
    nothing = run_cli("cancel", env=env)
    assert nothing.returncode == 2 and nothing.stderr.count("\n") == 1 and "RUN_ID" in nothing.stderr
    bad = run_cli("cancel", "abc", env=env)
    assert bad.returncode == 2 and "run id" in bad.stderr and bad.stderr.count("\n") == 1
    revived = run_cli("revive", str(runs[2].id), "987654", env=env)
    assert revived.returncode == 1 and revived.stdout == f"revived run {runs[2].id}\n"
    assert revived.stderr == "ductwork: error: run 987654 not found\n"
    assert runs[2].refresh().status == "in_progress"


def test_on_halt_does_not_fire_for_a_cancel(engine, start_runtime):
    start_runtime(["CtlHalting"])
    run = CtlHalting.trigger(1)
    wait_started(engine, run.id, 1)
    assert run.cancel() is True
    wait_until(lambda: settled(engine, run.id), settle_deadline(), what="the step stopped")
    assert STOPPED and HALTS == []
    assert ductwork.Run.get(run.id).halt_reasons == []


# -- real deployments: three worker processes --------------------------------------------------------
CONTROL_APP = os.path.join(os.path.dirname(__file__), "apps", "control_app.py")
DEPLOY = {"app": CONTROL_APP, "job_worker": {"count": 4, "polling_timeout": 0.2}}
LAYOUTS = {
    # name: ([(process name, its config)], the row role of a process that runs steps); three such processes each
    "supervisors": ([(f"sup{i}", {}) for i in range(3)], "worker"),
    "roles": ([("advancer", {"role": "advancer"})] + [(f"worker{i}", {"role": "worker"}) for i in range(3)],
              "worker"),
    "forking-none": ([(f"solo{i}", {"forking": "none"}) for i in range(3)], "supervisor"),
}


def marks(tmp_path) -> list[str]:
    path = tmp_path / "marks.log"
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cancel_during_a_fan_out_of_100_on_three_worker_processes(layout, app_db, tmp_path, procs):
    engine = ductwork._app_engine()
    layout_procs, worker_role = LAYOUTS[layout]
    for name, config in layout_procs:
        procs.append(Proc(tmp_path, app_db, name=name, machine=f"host-{name}",
                          config={**DEPLOY, **config}, env={"DW_STEP_SECONDS": "0.4"}))
    wait_until(lambda: rows(engine, "SELECT count(DISTINCT machine_identifier) FROM ductwork_processes "
                                    "WHERE role = :role", {"role": worker_role})[0][0] == 3, 30,
               what="three worker processes")
    waiting = control_app.RetryLater.trigger(5)   # fails once, then waits 60 s for its retry
    run = control_app.CancelFan.trigger(100)
    wait_until(lambda: len({e[0] for e in executions(engine, run.id)}) >= 20, 30, what="20 steps done")
    assert run.cancel(reason="a fan-out started by mistake") is True
    returned_at = engine.store.now()
    wait_until(lambda: settled(engine, run.id), settle_deadline(), what="the running steps stopped")
    assert_nothing_started_after(engine, [run.id], returned_at)
    discarded = {e[0] for e in executions(engine, run.id) if e[1] == "cancelled"}
    stopped = {int(line.split()[2]) for line in marks(tmp_path) if line.startswith(f"stopped {run.id} ")}
    # every step that saw should_stop was discarded (one that finished as the cancel came is discarded too)
    assert stopped and stopped <= discarded, (stopped, discarded)
    statuses = step_statuses(engine, run.id)
    assert statuses["succeeded"] + statuses["cancelled"] == 101 and "total" not in {s.name for s in run.steps}
    hosts = {row[0] for row in rows(engine, "SELECT DISTINCT p.machine_identifier FROM ductwork_executions e "
                                            "JOIN ductwork_processes p ON p.id = e.process_id "
                                            "WHERE e.run_id = :r", {"r": run.id})}
    assert len(hosts) == 3   # the fan-out ran on all three
    assert run.wait(timeout=1) == "cancelled"
    # revive: what had not completed runs, what had is kept
    done_before = {s.id for s in run.steps if s.status == "succeeded"}
    assert run.revive() is True
    assert run.wait(timeout=60) == "completed" and run.output == sum(range(100))
    succeeded = collections.Counter(e[0] for e in executions(engine, run.id) if e[1] == "succeeded")
    assert all(succeeded[step_id] == 1 for step_id in done_before)
    # a run waiting for its retry: cancelled, nothing of it runs; revived, it completes at once
    assert [e[1] for e in executions(engine, waiting.id)] == ["failed"]
    assert waiting.cancel() is True and step_statuses(engine, waiting.id) == {"cancelled": 1}
    assert waiting.revive() is True and waiting.wait(timeout=30) == "completed" and waiting.output == 6
    # the commit race, across these processes: quick chains cancelled from before their first claim to after
    # their last commit
    # (which of them a cancel catches is a race: 20 chains at least, more until two were caught, 200 at most)
    chains, cancelled = [], []
    for i in range(200):
        if i >= 20 and len(cancelled) >= 2:
            break
        chain = control_app.QuickChain.trigger(i)
        chains.append(chain)
        time.sleep(i % 20 * 0.001)
        if chain.cancel():
            cancelled.append((chain.id, engine.store.now()))
    assert cancelled
    for chain in chains:
        assert chain.wait(timeout=30) in ("completed", "cancelled")
    for chain_id, at in cancelled:
        wait_until(lambda c=chain_id: settled(engine, c), settle_deadline(), what=f"run {chain_id} settled")
        assert_nothing_started_after(engine, [chain_id], at)
    assert all(c.output == c.input[0] + 4 for c in chains if c.refresh().status == "completed")
    for p in procs:
        p.signal(15)
    assert all(p.wait() == 0 for p in procs)

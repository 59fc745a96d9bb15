"""Step timeouts (SPEC §15): an attempt still running at its deadline fails with StepTimeout at the deadline, its
retry policy goes on, and a step that ignores it does not keep its worker slot or hold up a drain. Real
runtimes on real SQLite and PostgreSQL."""
from __future__ import annotations

import collections
import threading
import time

import pytest
from procs import LOAD_SLACK, wait_until

import ductwork

CALLS: collections.Counter = collections.Counter()
SEEN: dict[str, object] = {}
RELEASE = threading.Event()   # set at the end of each test: the stuck steps' threads end


class Stuck(ductwork.Step):
    """Ignores its deadline: blocks (as in C, a socket, a sleep) until the test lets it go."""
    timeout = 0.5
    retry = ductwork.Retry(max=1, delay=0)

    def execute(self, x):
        CALLS["Stuck"] += 1
        RELEASE.wait(60)
        return "too late"


class Polite(ductwork.Step):
    """Looks at should_stop and its deadline, and stops when told (its attempt still fails: StepTimeout)."""
    timeout = 0.4
    retry = ductwork.Retry(max=0)

    def execute(self, x):
        SEEN["deadline"], SEEN["started"] = self.deadline, time.time()
        while not self.should_stop:
            time.sleep(0.01)
        SEEN["stopped"] = time.time()
        return "partial"


def configured(x):
    """No timeout of its own: job_worker.timeout (an override map) gives it one."""
    CALLS["configured"] += 1
    RELEASE.wait(60)
    return x


def quick(x):
    return x + 1


class TmoStuck(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(Stuck)


class TmoPolite(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(Polite)


class TmoConfigured(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(configured)


class TmoQuick(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(quick).chain(to=quick)


@pytest.fixture(autouse=True)
def _reset():
    CALLS.clear()
    SEEN.clear()
    RELEASE.clear()
    yield
    RELEASE.set()


def executions(engine, run_id):
    with engine.store.tx(write=False) as t:
        return t.all("SELECT outcome, started_at, finished_at, error FROM ductwork_executions WHERE run_id = :r "
                     "ORDER BY id", {"r": run_id})


def test_a_step_past_its_deadline_fails_at_the_deadline_and_does_not_keep_its_slot(engine, start_runtime):
    handle = start_runtime(["TmoStuck", "TmoQuick"], job_worker={"count": 1})
    runtime = handle.runtime
    run = TmoStuck.trigger(1)
    # two attempts of 0.5 s each, both stuck: failed at their deadlines, on two threads (the first is abandoned)
    assert run.wait(timeout=2 * 0.5 + LOAD_SLACK) == "halted"
    assert run.halt_reasons == ["job_retries_exhausted"] and CALLS["Stuck"] == 2
    rows = executions(engine, run.id)
    assert [r[0] for r in rows] == ["failed", "failed"]
    for _, started, finished, error in rows:
        assert 0.5 <= finished - started + 0.01 < 0.5 + LOAD_SLACK   # recorded at the deadline, not at return
        assert error.startswith("StepTimeout: step Stuck ran past its timeout of 0.5s")
        assert "where it was at the deadline" in error and "RELEASE.wait" in error
    # the pipeline still has its one worker thread: another pipeline's runs go on, the stuck threads do not count
    assert runtime.abandoned_alive() == 2
    assert TmoQuick.trigger(1).wait(timeout=10) == "completed"
    wait_until(lambda: '"abandoned_threads":2' in rows_info(engine), 10, what="the abandoned threads in the row")
    metrics = ductwork.dashboard_metrics(engine)
    assert 'ductwork_abandoned_threads{role="supervisor"} 2' in metrics
    # the drain does not wait for them
    started = time.monotonic()
    assert handle.stop(timeout=10) == 0 and time.monotonic() - started < 5


def rows_info(engine) -> str:
    with engine.store.tx(write=False) as t:
        return " ".join(info for (info,) in t.all("SELECT info FROM ductwork_processes"))


def test_a_polite_step_sees_its_deadline_and_should_stop(engine, start_runtime):
    start_runtime(["TmoPolite"])
    run = TmoPolite.trigger(1)
    assert run.wait(timeout=10) == "halted" and run.halt_reasons == ["job_retries_exhausted"]
    assert abs(SEEN["deadline"] - SEEN["started"] - 0.4) < 0.1
    # the run halts when the timekeeper commits the attempt; the step's thread sees should_stop on its next
    # look (every 10 ms), which may come after run.wait returned: wait for it, up to the bound asserted
    while "stopped" not in SEEN and time.time() < SEEN["deadline"] + 1:
        time.sleep(0.01)
    assert SEEN["deadline"] <= SEEN["stopped"] < SEEN["deadline"] + 1
    [(outcome, _, _, error)] = executions(engine, run.id)
    assert outcome == "failed" and error.startswith("StepTimeout")
    assert run.steps[0].output is None   # what it returned after its deadline does not count


def test_job_worker_timeout_gives_a_function_step_its_deadline(engine, start_runtime):
    start_runtime(["TmoConfigured"], job_worker={"timeout": {"default": -1, "TmoConfigured": 0.3},
                                                 "max_retry": 0})
    run = TmoConfigured.trigger(1)
    assert run.wait(timeout=0.3 + LOAD_SLACK) == "halted"
    assert executions(engine, run.id)[0][3].startswith("StepTimeout: step configured ran past its timeout of 0.3s")


def test_bad_timeouts_are_definition_errors():
    for value in (0, -1, "5", True):
        with pytest.raises(ductwork.DefinitionError, match="timeout must be seconds above 0"):
            class Bad(ductwork.Step):
                timeout = value

                def execute(self, x):
                    return x
        with pytest.raises(ductwork.DefinitionError, match="timeout must be seconds above 0"):
            ductwork.step(timeout=value)
    assert ductwork.step(timeout=2)(quick).timeout == 2
    with pytest.raises(ductwork.ConfigError, match="timeout"):
        ductwork.load_config(data={"job_worker": {"timeout": 0}})

"""Hostile steps: steps that raise BaseException, raise exceptions that cannot be rendered, or fork; a worker
thread that dies anyway; a worker child that cannot start its threads. Real threads, real processes."""
from __future__ import annotations

import logging
import os
import signal
import sys

import pytest
from conftest import FAST
from procs import BASE_CONFIG, Proc, alive, wait_until

import ductwork

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "apps"))
import hostile_app  # noqa: E402

# -- hostile steps -------------------------------------------------------------------------------------
# Every wait is bounded by a deadline derived from the configured intervals (FAST: polling 0.05 s,
# heartbeat 0.2 s): many polling and heartbeat rounds, with room for a busy 2-core machine.
DEADLINE = 200 * FAST["job_worker"]["polling_timeout"] + 50 * FAST["supervisor"]["heartbeat_interval"]


class HsBoom(BaseException):
    """A BaseException of the step's own, neither Exception, SystemExit nor KeyboardInterrupt."""


class HsBadStr(Exception):
    def __str__(self):
        raise RuntimeError("__str__ exploded")


class HsBadBoth(Exception):
    def __str__(self):
        raise RuntimeError("__str__ exploded")

    def __repr__(self):
        raise RuntimeError("__repr__ exploded")


RAISES = {"exit": lambda: SystemExit(3), "interrupt": KeyboardInterrupt, "base": lambda: HsBoom("boom"),
          "badstr": HsBadStr, "badboth": HsBadBoth}


def hostile_step(kind):
    if kind == "ok":
        return "fine"
    raise RAISES[kind]()


class HsRaise(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(hostile_step)


def plain(x):
    return x


class HsPlain(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(plain).chain(to=plain)


class Lines(logging.Handler):
    """The ductwork logger's records, as formatted messages (the logger does not propagate)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.tracebacks: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())
        if record.exc_info:
            self.tracebacks.append(logging.Formatter().formatException(record.exc_info))


@pytest.fixture
def log_lines():
    handler = Lines()
    ductwork.log.addHandler(handler)
    yield handler
    ductwork.log.removeHandler(handler)


@pytest.mark.parametrize("kind, expected", [
    ("exit", "SystemExit: 3"), ("interrupt", "KeyboardInterrupt: "), ("base", "HsBoom: boom")])
def test_a_step_raising_a_base_exception_is_a_failed_attempt_and_the_thread_survives(
        engine, start_runtime, kind, expected):
    start_runtime(["HsRaise"], role="combined", job_worker={"count": 1, "max_retry": 1})
    bad = HsRaise.trigger(kind)
    assert bad.wait(DEADLINE) == "halted"
    step = bad.steps[0]
    assert (step.status, step.attempts, step.halt_reason) == ("failed", 2, ductwork.JOB_RETRIES_EXHAUSTED)
    assert step.error.startswith(expected), step.error
    assert "Traceback" in step.error and "in hostile_step" in step.error
    # the pipeline's only worker thread is still there: later runs complete
    good = [HsRaise.trigger("ok") for _ in range(3)]
    assert [run.wait(DEADLINE) for run in good] == ["completed"] * 3


@pytest.mark.parametrize("kind, expected", [
    ("badstr", "HsBadStr: HsBadStr()"), ("badboth", "HsBadBoth: <test_hostile.HsBadBoth object at 0x")])
def test_an_exception_that_cannot_be_rendered_is_recorded_with_its_class_and_traceback(
        engine, start_runtime, kind, expected):
    start_runtime(["HsRaise"], role="combined", job_worker={"count": 1, "max_retry": 0})
    bad = HsRaise.trigger(kind)
    assert bad.wait(DEADLINE) == "halted"
    step = bad.steps[0]
    assert (step.status, step.attempts, step.crashes, step.halt_reason) == (
        "failed", 1, 0, ductwork.JOB_RETRIES_EXHAUSTED)
    assert step.error.startswith(expected), step.error
    assert "Traceback" in step.error and "in hostile_step" in step.error
    assert HsRaise.trigger("ok").wait(DEADLINE) == "completed"


def _info(engine, process_id):
    with engine.store.tx(write=False) as t:
        row = t.one("SELECT info FROM ductwork_processes WHERE id = :id", {"id": process_id})
    return ductwork._loads(row[0]) if row else {}


@pytest.mark.parametrize("point, name", [("after_claim", "worker"), ("after_branch_claim", "advancer")])
def test_a_worker_or_advancer_thread_that_dies_is_logged_replaced_counted_and_its_claims_handed_back(
        engine, start_runtime, log_lines, tmp_path, point, name):
    handle = start_runtime(["HsPlain"], role="combined", job_worker={"count": 1})
    runtime = handle.runtime
    # a BaseException from the machinery around a step (a bug), raised once in one thread
    runtime.fault = ductwork.Fault(f"{point}:die", once=str(tmp_path / "once"))
    runtime.engine.inline = name == "worker"   # the advancer case: branches advance in the advancer thread
    run = HsPlain.trigger(7)
    assert run.wait(DEADLINE) == "completed"
    assert run.output == 7
    died = [line for line in log_lines.lines if " died " in line]
    assert len(died) == 1 and died[0].startswith(f"thread ductwork.{name}.HsPlain.0 died (_ThreadDeath)"), died
    assert any("_ThreadDeath: fault injected" in tb for tb in log_lines.tracebacks)
    first = run.steps[0]
    if name == "worker":   # it was running when its thread died: handed back as a crash, run again
        assert (first.attempts, first.crashes) == (1, 1)
    else:
        assert (first.attempts, first.crashes) == (1, 0)
    assert runtime.thread_restarts == 1
    assert sum(t.is_alive() and t.name == f"ductwork.{name}.HsPlain.0" for t in runtime.threads) == 1
    wait_until(lambda: _info(engine, runtime.process_id).get("thread_restarts") == 1, DEADLINE,
               what="thread_restarts in the process row")
    assert HsPlain.trigger(8).wait(DEADLINE) == "completed"


def test_job_worker_count_is_bounded_in_the_config():
    for key in ("job_worker", "pipeline_advancer"):
        with pytest.raises(ductwork.ConfigError, match=rf"'{key}.count' must be at most 256"):
            ductwork.load_config(data={key: {"count": 257}})
        with pytest.raises(ductwork.ConfigError, match=rf"'{key}.count.HsPlain' must be at most 256"):
            ductwork.load_config(data={key: {"count": {"HsPlain": 100000}}})
        assert ductwork.load_config(data={key: {"count": 256}}).get(f"{key}.count") == 256


# -- hostile steps: real processes ----------------------------------------------------------------------
APP = {"app": hostile_app.__file__}


def _marks(tmp_path) -> list[list[str]]:
    path = tmp_path / "marks.log"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def test_a_forked_copy_of_a_worker_never_commits_claims_or_ignores_sigterm(procs, tmp_path, app_db):
    sup = Proc(tmp_path, app_db, config=APP)
    procs.append(sup)
    worker = sup.child_pid("worker:HsFork")
    runs = [hostile_app.HsFork.trigger(mode) for mode in ("return", "linger", "return")]
    budget = 60 * BASE_CONFIG["supervisor"]["heartbeat_interval"]
    assert [run.wait(budget) for run in runs] == ["completed"] * 3
    assert [run.output for run in runs] == ["from the parent"] * 3
    marks = _marks(tmp_path)
    copies = {int(m[1]) for m in marks if m[0] == "copy"}
    reaped = sorted(" ".join(m[2:]) for m in marks if m[0] == "reaped")
    # the copy that returned from the step ended quietly; the lingering one died of the SIGTERM it was sent
    assert reaped == ["linger signal 15", "return exit 0", "return exit 0"], marks
    assert len(copies) == 3 and not any(alive(pid) for pid in copies)
    # every later step ran in the worker itself, never in a copy
    assert {int(m[1]) for m in marks if m[0] == "where"} == {worker}
    assert all(step.attempts == 1 and step.crashes == 0 for run in runs for step in run.steps)
    sup.signal(signal.SIGTERM)
    assert sup.wait() == 0
    assert not any(alive(pid) for pid in copies)


def test_a_worker_that_cannot_start_its_threads_fails_its_boot_and_claims_nothing(procs, tmp_path, app_db):
    run = hostile_app.HsQuick.trigger("x")
    config = {**APP, "pipelines": ["HsQuick"], "job_worker": {"count": 8}}
    sup = Proc(tmp_path, app_db, config=config, env={"DW_THREAD_LIMIT": "1"})
    procs.append(sup)
    # max_boot_failures 3 with backoffs of 0.5 s and 1 s: well within the deadline
    assert sup.wait(30) == 1
    log = sup.log()
    assert "worker:HsQuick failed to boot 3 times in a row; giving up" in log, log[-3000:]
    assert "could not start thread" in log
    assert " crashed " not in log
    step = run.refresh().steps[0]
    assert (step.status, step.attempts, step.crashes) == ("queued", 0, 0)

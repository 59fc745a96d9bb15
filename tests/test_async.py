"""Async steps (SPEC §19): ``async def execute`` and ``async def`` function steps run on one event loop per worker
process, up to job_worker.async_count at once beside the worker threads, mixed with sync steps in one pipeline;
current_step() is each task's own; a cancel and a timeout cancel the task; a step that blocks the loop is logged
by name; a drain lets them finish; run_inline runs them too. Real runtimes on real SQLite and PostgreSQL."""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from procs import Proc, wait_until

import ductwork

sys.path.insert(0, str(Path(__file__).parent / "apps"))
import async_app  # noqa: E402

MARKS: dict[str, list] = {"started": [], "cancelled": []}
PEAK = {"now": 0, "max": 0}
LOCK = threading.Lock()


@pytest.fixture(autouse=True)
def fresh_marks():
    for value in MARKS.values():
        value.clear()
    PEAK.update(now=0, max=0)


def split(n):
    return list(range(n))


class AsyncDouble(ductwork.Step):
    async def execute(self, x):
        await asyncio.sleep(0.01 * (3 - x % 3))   # (they finish out of order, and interleave)
        return {"x": 2 * x, "run": self.run_id, "seen": ductwork.current_step().step_id, "step": self.step_id}


async def async_total(values):
    step = ductwork.current_step()
    await asyncio.sleep(0)
    return {"sum": sum(v["x"] for v in values), "own": all(v["seen"] == v["step"] for v in values),
            "step": step.step}


class AsyncMixed(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(split).expand(to=AsyncDouble).collapse(into=async_total)


async def crowd(x):
    with LOCK:
        PEAK["now"] += 1
        PEAK["max"] = max(PEAK["max"], PEAK["now"])
    try:
        await asyncio.sleep(1.0)
    finally:
        with LOCK:
            PEAK["now"] -= 1
    return x


class AsyncCrowd(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(crowd)


async def marked_wait(mark, clean_up: float = 0.0):
    """Wait a minute, marking the start and the cancel (after ``clean_up`` seconds of the step's own)."""
    MARKS["started"].append(mark)
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        await asyncio.sleep(clean_up)
        MARKS["cancelled"].append(mark)
        raise


class AsyncStuck(ductwork.Step):
    timeout = 0.3

    async def execute(self, x):
        await marked_wait(self.step_id)
        return x


class AsyncTimesOut(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(AsyncStuck)


async def waits_long(x):
    await marked_wait(x)
    return x


class AsyncCancel(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(waits_long)


async def blocker(x):
    time.sleep(1.2)   # the mistake the lane must name
    return x


class AsyncBlocks(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(blocker)


class TimedBlocker(ductwork.Step):
    timeout = 30   # (a deadline: the step still runs in its own task, found on the loop's stack)

    async def execute(self, x):
        time.sleep(1.2)
        return x


class AsyncBlocksTimed(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(TimedBlocker)


async def cleans_up(x):
    await marked_wait(x, clean_up=0.3)   # its own clean-up, after the cancel: not cancelled again
    return x


class AsyncCleanUp(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(cleans_up)


class LateReturner(ductwork.Step):
    timeout = 0.5

    async def execute(self, x):
        time.sleep(1.0)   # (blocks the loop: the deadline's timer cannot fire before it returns)
        return x


class AsyncLate(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(LateReturner)


async def half_second(x):
    MARKS["started"].append(x)
    await asyncio.sleep(0.5)
    return x + 1


class AsyncDrain(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(half_second)


def test_async_and_sync_steps_mix_in_one_pipeline_each_task_sees_its_own_step(engine, start_runtime):
    start_runtime(["AsyncMixed"])
    runs = [AsyncMixed.trigger(n) for n in (1, 4, 7)]
    assert [run.wait(timeout=30) for run in runs] == ["completed"] * 3
    assert [run.refresh().output for run in runs] == [
        {"sum": 2 * sum(range(n)), "own": True, "step": "async_total"} for n in (1, 4, 7)]


def test_up_to_async_count_run_at_once_whatever_the_thread_count(engine, start_runtime):
    start_runtime(["AsyncCrowd"], job_worker={"count": 1, "async_count": 8})
    runs = [AsyncCrowd.trigger(i) for i in range(24)]
    assert all(run.wait(timeout=60) == "completed" for run in runs)
    assert PEAK["max"] == 8   # one thread, eight at once: never more


def test_a_timeout_cancels_the_task_and_fails_the_attempt(engine, start_runtime, db_url):
    ductwork.configure(database_url=db_url, config={"job_worker": {"max_retry": 0}})
    start_runtime(["AsyncTimesOut"], job_worker={"max_retry": 0})
    run = AsyncTimesOut.trigger(1)
    assert run.wait(timeout=30) == "halted"
    assert run.halt_reasons == ["job_retries_exhausted"]
    assert MARKS["cancelled"] == MARKS["started"] and len(MARKS["started"]) == 1
    with engine.store.tx(write=False) as t:
        (error,) = t.one("SELECT error FROM ductwork_executions WHERE run_id = :r", {"r": run.id})
    assert error.startswith("StepTimeout: step AsyncStuck ran past its timeout of 0.3s"), error


def test_a_step_that_returns_past_its_deadline_timed_out(engine, start_runtime, db_url):
    ductwork.configure(database_url=db_url, config={"job_worker": {"max_retry": 0}})
    start_runtime(["AsyncLate"], job_worker={"max_retry": 0})
    run = AsyncLate.trigger(1)
    assert run.wait(timeout=30) == "halted"
    with engine.store.tx(write=False) as t:
        (error,) = t.one("SELECT error FROM ductwork_executions WHERE run_id = :r", {"r": run.id})
    assert error.startswith("StepTimeout: step LateReturner ran past its timeout of 0.5s"), error


def test_a_cancel_cancels_the_running_task(engine, start_runtime):
    start_runtime(["AsyncCancel"])
    run = AsyncCancel.trigger(5)
    wait_until(lambda: MARKS["started"], 20, what="started")
    assert MARKS["started"] == [5]
    assert ductwork.cancel(run.id) == 1
    assert run.wait(timeout=20) == "cancelled"
    # the answer to a cancel comes within about a second (the cancel watch), then the next tick
    wait_until(lambda: MARKS["cancelled"], 20, what="cancelled")
    assert MARKS["cancelled"] == [5]


def test_a_cancelled_task_is_cancelled_once_its_clean_up_runs_to_its_end(engine, start_runtime):
    start_runtime(["AsyncCleanUp"])
    run = AsyncCleanUp.trigger(8)
    wait_until(lambda: MARKS["started"], 20, what="started")
    assert ductwork.cancel(run.id) == 1
    wait_until(lambda: MARKS["cancelled"], 20, what="cancelled")
    assert MARKS["cancelled"] == [8]   # (cancelled again at the next tick, its clean-up would never finish)
    assert run.wait(timeout=20) == "cancelled"


@pytest.mark.parametrize("pipeline, name", [(AsyncBlocks, "blocker"), (AsyncBlocksTimed, "TimedBlocker")])
def test_a_step_that_blocks_the_loop_is_logged_by_name(engine, start_runtime, pipeline, name):
    lines: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())
    handler = Catch(level=logging.WARNING)
    logging.getLogger("ductwork").addHandler(handler)
    try:
        start_runtime([pipeline.__name__])
        run = pipeline.trigger(3)
        assert run.wait(timeout=30) == "completed"
    finally:
        logging.getLogger("ductwork").removeHandler(handler)
    assert any(line.startswith(f"async step {name} blocks the event loop") for line in lines), lines


def test_a_drain_lets_the_async_steps_in_flight_finish(engine, start_runtime):
    handle = start_runtime(["AsyncDrain"])
    runs = [AsyncDrain.trigger(i) for i in range(5)]
    wait_until(lambda: len(MARKS["started"]) >= 5, 20, what="5 started")
    assert sorted(MARKS["started"]) == list(range(5))
    assert handle.stop(timeout=20) == ductwork.EXIT_OK
    assert [run.refresh().status for run in runs] == ["completed"] * 5
    assert [run.output for run in runs] == [i + 1 for i in range(5)]


def test_run_inline_runs_async_steps_too(engine):
    run = ductwork.run_inline(AsyncMixed, 3)
    assert (run.status, run.output) == ("completed", {"sum": 6, "own": True, "step": "async_total"})


@pytest.mark.parametrize("value", [0, -1, 1.5, "many"])
def test_a_bad_async_count_is_a_config_error(value):
    with pytest.raises(ductwork.ConfigError, match="async_count"):
        ductwork.load_config(data={"job_worker": {"async_count": value}})


def test_a_real_supervisors_worker_runs_async_steps_at_once_and_drains_them(procs, tmp_path, app_db):
    """`python ductwork.py run` (forking): its worker child, one thread, runs 12 half-second async steps at once
    (their executions overlap in the database), and a SIGTERM while 4 more run lets them commit."""
    sup = Proc(tmp_path, app_db, config={"app": async_app.__file__, "job_worker": {"count": 1, "async_count": 12,
                                                                                 "shutdown_timeout": 10},
                                         "supervisor": {"shutdown_timeout": 15}})
    procs.append(sup)
    sup.wait_log(r"worker started")
    runs = [async_app.SupAsync.trigger(0.5) for _ in range(12)]
    assert all(run.wait(timeout=30) == "completed" for run in runs)
    with ductwork._app_engine().store.tx(write=False) as t:
        spans = t.all("SELECT started_at, finished_at FROM ductwork_executions ORDER BY started_at")
    assert len(spans) == 12
    overlap = max(sum(1 for s, f in spans if s <= start < f) for start, _ in spans)
    assert overlap >= 6, spans   # (one thread: one at a time without the loop)
    late = [async_app.SupAsync.trigger(2.0) for _ in range(4)]
    def running() -> int:
        with ductwork._app_engine().store.tx(write=False) as t:
            return t.one("SELECT count(*) FROM ductwork_steps WHERE status = 'running'")[0]
    wait_until(lambda: running() == 4, 20, what="4 async steps running")
    sup.signal(signal.SIGTERM)
    assert sup.wait(30) == 0
    assert [run.refresh().status for run in late] == ["completed"] * 4

"""Retry policies (ductwork.Retry, NonRetryable, RetryAfter, @ductwork.step) and on_complete (SPEC §14), on real
SQLite and PostgreSQL with a real runtime in this process."""
from __future__ import annotations

import collections
import logging

import pytest
from procs import LOAD_SLACK, wait_until

import ductwork

CALLS: collections.Counter = collections.Counter()
COMPLETED: list[tuple[str, int]] = []


class Flaky(ductwork.Step):
    retry = ductwork.Retry(max=3, delay=0.2, backoff=2)

    def execute(self, x):
        CALLS["Flaky"] += 1
        raise RuntimeError(f"attempt {self.attempt} fails")


class Picky(ductwork.Step):
    retry = ductwork.Retry(max=5, delay=0, give_up_on=KeyError, retry_on=(ValueError, KeyError))

    def execute(self, kind):
        CALLS["Picky", kind] += 1
        if CALLS["Picky", kind] >= 3:
            return kind
        raise {"key": KeyError, "value": ValueError, "type": TypeError}[kind](kind)


@ductwork.step(retry=ductwork.Retry(max=5, delay=0))
def refuse(x):
    CALLS["refuse"] += 1
    raise ductwork.NonRetryable(f"order {x} cannot be shipped")


@ductwork.step(retry=ductwork.Retry(max=1, delay=0))
def busy_vendor(x):
    CALLS["busy_vendor"] += 1
    raise ductwork.RetryAfter(0.6, "vendor says: retry in 0.6 s")


@ductwork.step
def plain(x):
    CALLS["plain"] += 1
    raise RuntimeError("no policy: the config's budget")


@ductwork.step(retry=ductwork.Retry(backoff=2))
def half_policy(x):
    CALLS["half_policy"] += 1
    raise RuntimeError("max and delay from the config")


def ok(x):
    return x


class Sly(Exception):
    @property
    def __class__(self):   # isinstance() falls back to __class__ when the type check fails
        raise RuntimeError("no class for you")


class Hostile(type):
    def __instancecheck__(cls, obj):
        raise SystemExit(3)


class GiveUp(Exception, metaclass=Hostile):
    pass


class LazyRetryAfter(ductwork.RetryAfter):
    def __init__(self):   # forgets super().__init__: no seconds
        Exception.__init__(self, "lazy")


@ductwork.step(retry=ductwork.Retry(max=1, delay=0, give_up_on=GiveUp))
def hostile(kind):
    CALLS["hostile", kind] += 1
    if kind == "nan":
        error = ductwork.RetryAfter(1)
        error.seconds = float("nan")
        raise error
    raise {"sly": Sly("sly"), "meta": RuntimeError("meta"), "lazy": LazyRetryAfter()}[kind]


class PolHostile(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(hostile)


class PolFlaky(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(Flaky)


class PolPicky(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(Picky)


class PolRefuse(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(refuse)


class PolBusy(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(busy_vendor)


class PolPlain(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(plain)


class PolHalf(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(half_policy)


def explode(run):
    raise RuntimeError("a broken on_complete handler")


class PolDone(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(ok).expand(to=ok).collapse(into=ok)
        p.on_complete(explode)   # raises: logged, the next still runs
        p.on_complete(lambda run: COMPLETED.append(("PolDone", run.id, run.status, run.output)))


class PolDoneHalts(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(refuse)
        p.on_complete(lambda run: COMPLETED.append(("PolDoneHalts", run.id)))


@pytest.fixture(autouse=True)
def _reset():
    CALLS.clear()
    COMPLETED.clear()


def executions(engine, run_id):
    """(outcome, started_at, finished_at, error) per execution, in order."""
    with engine.store.tx(write=False) as t:
        return t.all("SELECT outcome, started_at, finished_at, error FROM ductwork_executions WHERE run_id = :r "
                     "ORDER BY id", {"r": run_id})


# -- definitions ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, words", [
    ({"max": -1}, "max"), ({"max": 1.5}, "max"), ({"max": True}, "max"), ({"delay": -1}, "delay"),
    ({"backoff": 0.5}, "backoff"), ({"max_delay": -1}, "max_delay"), ({"jitter": 1.5}, "jitter"),
    ({"give_up_on": (int,)}, "give_up_on"), ({"retry_on": "ValueError"}, "retry_on"),
])
def test_a_bad_retry_policy_is_a_definition_error(kwargs, words):
    with pytest.raises(ductwork.DefinitionError, match=words):
        ductwork.Retry(**kwargs)


def test_bad_retry_attributes_and_options_are_definition_errors():
    with pytest.raises(ductwork.DefinitionError, match="BadStep: retry must be a ductwork.Retry"):
        class BadStep(ductwork.Step):
            retry = 3

            def execute(self, x):
                return x
    with pytest.raises(ductwork.DefinitionError, match="needs a ductwork.Retry"):
        ductwork.step(retry={"max": 3})
    for option, bad in (("concurrency", 0), ("concurrency_key", 5)):   # (timeout: tests/test_timeouts.py;
        with pytest.raises(ductwork.DefinitionError, match=f"{option} must be"):   # caps: tests/test_flow.py)
            ductwork.step(**{option: bad})
    with pytest.raises(ductwork.DefinitionError, match="decorates a function step"):
        ductwork.step(Flaky)
    assert ductwork.step(ok) is ok and ductwork.retry_policy(ok) is None
    assert ductwork.retry_policy(refuse) == ductwork.Retry(max=5, delay=0)


def test_delays_back_off_up_to_max_delay_and_jitter_stays_in_bounds():
    policy = ductwork.Retry(delay=2, backoff=3, max_delay=50)
    assert [policy.delay_after(n, 10) for n in (1, 2, 3, 4, 5)] == [2, 6, 18, 50, 50]
    assert policy.delay_after(10**9, 10) == 50                     # no overflow however many failures
    assert ductwork.Retry(backoff=1000, max_delay=7).delay_after(10**6, 1) == 7
    assert ductwork.Retry(backoff=2).delay_after(3, 10) == 40        # delay left out: the config's
    assert ductwork.Retry(delay=0, backoff=2).delay_after(5, 10) == 0
    spread = [ductwork.Retry(delay=10, jitter=0.25).delay_after(1, 0) for _ in range(2000)]
    assert all(7.5 <= d <= 12.5 for d in spread) and min(spread) < 8 and max(spread) > 12
    capped = [ductwork.Retry(delay=100, max_delay=20, jitter=0.5).delay_after(1, 0) for _ in range(500)]
    assert all(10 <= d <= 30 for d in capped)                        # the cap, then the spread (SPEC §14)


# -- behaviour ----------------------------------------------------------------------------------------
def test_retries_back_off_as_the_policy_says(engine, start_runtime):
    start_runtime(["PolFlaky"], job_worker={"polling_timeout": 0.05})
    run = PolFlaky.trigger(1)
    assert run.wait(timeout=30) == "halted"
    assert run.halt_reasons == ["job_retries_exhausted"] and CALLS["Flaky"] == 4   # max=3: three retries
    rows = executions(engine, run.id)
    assert [r[0] for r in rows] == ["failed"] * 4
    for n, (before, after) in enumerate(zip(rows, rows[1:], strict=False), start=1):
        gap, delay = after[1] - before[2], 0.2 * 2 ** (n - 1)
        assert delay <= gap + 0.01 < delay + LOAD_SLACK, (n, gap, delay)


def test_give_up_on_and_retry_on(engine, start_runtime):
    start_runtime(["PolPicky"])
    key, value, kind = PolPicky.trigger("key"), PolPicky.trigger("value"), PolPicky.trigger("type")
    assert key.wait(timeout=30) == "halted" and key.halt_reasons == ["job_non_retryable"]
    assert kind.wait(timeout=30) == "halted" and kind.halt_reasons == ["job_non_retryable"]
    assert value.wait(timeout=30) == "completed" and value.output == "value"
    assert CALLS["Picky", "key"] == 1 and CALLS["Picky", "type"] == 1 and CALLS["Picky", "value"] == 3


def test_non_retryable_fails_at_once(engine, start_runtime):
    start_runtime(["PolRefuse"])
    run = PolRefuse.trigger(42)
    assert run.wait(timeout=30) == "halted" and run.halt_reasons == ["job_non_retryable"]
    assert CALLS["refuse"] == 1
    [step] = run.steps
    assert step.status == "failed" and step.halt_reason == "job_non_retryable"
    assert "NonRetryable: order 42 cannot be shipped" in step.error


def test_retry_after_delays_the_next_attempt_and_counts_as_one(engine, start_runtime):
    start_runtime(["PolBusy"], job_worker={"polling_timeout": 0.05})
    run = PolBusy.trigger(1)
    assert run.wait(timeout=30) == "halted" and run.halt_reasons == ["job_retries_exhausted"]
    rows = executions(engine, run.id)
    assert [r[0] for r in rows] == ["failed", "failed"] and CALLS["busy_vendor"] == 2   # max=1
    assert 0.6 <= rows[1][1] - rows[0][2] + 0.01 < 0.6 + LOAD_SLACK
    assert "vendor says: retry in 0.6 s" in rows[0][3]


def test_without_a_policy_or_with_part_of_one_the_config_decides(engine, start_runtime):
    start_runtime(["PolPlain", "PolHalf"], job_worker={"max_retry": {"default": 1, "PolHalf": 2},
                                                       "retry_delay": 0})
    plain_run, half = PolPlain.trigger(1), PolHalf.trigger(1)
    assert plain_run.wait(timeout=30) == "halted" and half.wait(timeout=30) == "halted"
    assert CALLS["plain"] == 2 and CALLS["half_policy"] == 3


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_on_complete_fires_once_per_completed_run(engine, start_runtime):
    records = Records()
    logging.getLogger("ductwork").addHandler(records)
    try:
        start_runtime(["PolDone", "PolDoneHalts"])
        runs = [PolDone.trigger([1, 2, 3]), PolDone.trigger([4])]
        halting = PolDoneHalts.trigger(1)
        assert [r.wait(timeout=30) for r in runs] == ["completed", "completed"]
        assert halting.wait(timeout=30) == "halted"
        # the handlers run right after the commit that completed the run, in the worker that made it
        wait_until(lambda: len(COMPLETED) >= 2 and sum("explode" in m for m in records.messages) >= 2, 10,
                   what="the on_complete handlers")
    finally:
        logging.getLogger("ductwork").removeHandler(records)
    assert sorted(COMPLETED) == sorted([("PolDone", runs[0].id, "completed", [1, 2, 3]),
                                        ("PolDone", runs[1].id, "completed", [4])])
    assert sum("on_complete handler explode of PolDone raised" in m for m in records.messages) == 2


@pytest.mark.parametrize("kind", ["sly", "meta", "lazy", "nan"])
def test_hostile_errors_are_plain_failures_not_crashes(engine, start_runtime, kind):
    """An error class that raises in isinstance(), a RetryAfter without (or with NaN) seconds: a failed attempt
    (the config's budget: max_retry 1), never a worker error spending the crash budget."""
    start_runtime(["PolHostile"], job_worker={"max_retry": 1, "retry_delay": 0, "max_crash": 1})
    run = PolHostile.trigger(kind)
    assert run.wait(timeout=30) == "halted" and run.halt_reasons == ["job_retries_exhausted"]
    [step] = run.steps
    assert (step.attempts, step.crashes) == (2, 0) and CALLS["hostile", kind] == 2

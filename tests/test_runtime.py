"""The runners section: one process runtime's job worker, in process, on real SQLite and real PostgreSQL.

Adaptive batches (quick steps are claimed and committed many at a time, slow ones singly) and the
regressions of the worker loop and the runtime's lifecycle (drain, lost replies).
"""
from __future__ import annotations

import threading
import time

import pytest
from test_engine import EngSingle  # the engine tests' one-step pipeline
from test_regressions import RvOne  # shared with the engine-level regression of hand_back

import ductwork


# -- adaptive batches: quick steps are claimed and committed many at a time, slow ones singly ---------
def nap_20ms(x):
    threading.Event().wait(0.02)
    return x


class EngSlow(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(nap_20ms)


def _hold(engine):
    with engine.store.tx() as t:  # queued steps held back until the worker is up and observed
        t.run("UPDATE ductwork_steps SET available_at = available_at + 3600")


def _release_held(engine, runs):
    """Make the held steps of these runs claimable in one transaction (with its wake-up); wait for the runs."""
    ids = ", ".join(str(run.id) for run in runs)
    with engine.store.tx() as t:
        t.run(f"UPDATE ductwork_steps SET available_at = {{now}} WHERE status = 'queued' AND run_id IN ({ids})")
        t.notify(ductwork.CH_JOBS, runs[0].pipeline)
    for run in runs:
        assert run.wait(30) == "completed"


def _observed_worker(start_runtime, pipeline, commit_delay=0.0):
    """One worker thread whose commits are recorded: the inputs of each commit's results."""
    commits: list[list[str]] = []
    handle = start_runtime([pipeline], role="worker", job_worker={"count": 1, "polling_timeout": 0.05})
    real = handle.runtime.engine.commit

    def commit(results, claim_limit=0):
        commits.append([r.claim.input for r in results])
        threading.Event().wait(commit_delay)   # a slow database: the commit's round trips take longer
        return real(results, claim_limit)
    handle.runtime.engine.commit = commit
    return commits


def _batches(engine, start_runtime, pipeline, runs, commit_delay=0.0):
    """Release ``runs`` (already triggered) at once to one worker thread; the sizes of its commits."""
    _hold(engine)
    commits = _observed_worker(start_runtime, pipeline, commit_delay)
    _release_held(engine, runs)
    return [len(c) for c in commits]


def test_quick_steps_are_committed_in_growing_batches(engine, start_runtime):
    runs = [EngSingle.trigger(i) for i in range(120)]
    sizes = _batches(engine, start_runtime, "EngSingle", runs)
    assert sum(sizes) == 120 and max(sizes) == ductwork.MAX_BATCH and len(sizes) < 120 / 4, sizes


def test_a_slow_commit_does_not_shrink_batches_of_quick_steps(engine, start_runtime):
    runs = [EngSingle.trigger(i) for i in range(120)]
    sizes = _batches(engine, start_runtime, "EngSingle", runs, commit_delay=0.01)   # 2x QUICK_STEP per commit
    assert sum(sizes) == 120 and max(sizes) == ductwork.MAX_BATCH, sizes


def test_slow_steps_are_claimed_one_at_a_time(engine, start_runtime):
    runs = [EngSlow.trigger(i) for i in range(6)]
    sizes = _batches(engine, start_runtime, "EngSlow", runs)
    assert sizes == [1] * 6


def nap_input(seconds):
    threading.Event().wait(seconds)
    return seconds


class EngNapMix(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(nap_input)


def test_a_slow_step_gives_the_rest_of_its_batch_back(engine, start_runtime):
    slow = 0.012  # slower than QUICK_STEP, quicker than QUICK_COMMIT (which would end its batch anyway)
    runs = ([EngNapMix.trigger(0) for _ in range(30)] + [EngNapMix.trigger(slow)]
            + [EngNapMix.trigger(0) for _ in range(20)])
    _hold(engine)
    commits = _observed_worker(start_runtime, "EngNapMix")
    _release_held(engine, runs)
    [batch] = [c for c in commits if f"[{slow}]" in c]
    assert batch[-1] == f"[{slow}]", commits       # nothing ran behind it in its batch: the rest went back
    assert max(len(c) for c in commits) == ductwork.MAX_BATCH
    assert all((s.attempts, s.crashes) == (1, 0) for r in runs for s in r.steps)   # given back, not crashed


def test_the_batch_size_survives_an_idle_spell(engine, start_runtime):
    first, second = [EngSingle.trigger(i) for i in range(40)], [EngSingle.trigger(i) for i in range(40)]
    _hold(engine)
    commits = _observed_worker(start_runtime, "EngSingle")
    _release_held(engine, first)
    threading.Event().wait(0.3)                      # idle: several empty polls
    seen = len(commits)
    _release_held(engine, second)
    assert len(commits[seen]) > 1, commits[seen:]    # the burst after the pause is claimed in a batch at once


# -- regressions: the worker loop and the runtime's lifecycle ------------------------------------------
def rv_bad_error(x):
    raise ValueError("cannot decode \udcff byte")   # e.g. a surrogateescape'd filename/bytes in a message


class RvBadError(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(rv_bad_error)


def rv_nul_error(x):
    raise ValueError("bad\x00byte")   # Postgres TEXT rejects NUL


class RvNulError(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(rv_nul_error)


# regression: an error text Postgres cannot store (lone surrogate, NUL) killed the worker thread and
# stranded its claim (independent review, dc54200, 2026-11-28)
@pytest.mark.parametrize("pipeline", [RvBadError, RvNulError], ids=["lone-surrogate", "nul"])
def test_an_unstorable_error_text_still_fails_the_step(start_runtime, pipeline):
    """Such a text once killed the worker thread and stranded its claim; now it is stored sanitised."""
    start_runtime([pipeline.__name__], job_worker={"max_retry": 0, "count": 1, "polling_timeout": 0.05})
    status = pipeline.trigger(1).wait(5)
    assert status == "halted"


_FIRST = []
_NEVER = threading.Event()


def rv_slow(x):
    if not _FIRST:               # the first execution "dies with its process" (never returns here)
        _FIRST.append(1)
        _NEVER.wait(30)
    return x


class RvSlow(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(rv_slow)


# regression: a hand-back that failed at the drain deadline, followed by the delete of the process row,
# orphaned the running step for good (independent review, dc54200, 2026-11-28)
def test_failed_hand_back_at_drain_then_row_deleted_orphans_the_step(start_runtime):
    import time
    _FIRST.clear()
    _NEVER.clear()
    h = start_runtime(["RvSlow"], job_worker={"count": 1, "shutdown_timeout": 0.2, "polling_timeout": 0.05})
    run = RvSlow.trigger(1)
    for _ in range(100):
        if run.steps[0].status == "running":
            break
        time.sleep(0.02)
    real = h.runtime.engine.hand_back
    calls = []

    def flaky(*a, **k):   # a DB blip exactly at the drain deadline
        calls.append(a)
        raise ductwork.DatabaseUnavailable("connection reset")
    h.runtime.engine.hand_back = flaky
    assert h.stop() == 0
    h.runtime.engine.hand_back = real
    assert calls
    # a fresh peer with a short reaper timeout: should recover the step "later", as the log promises
    start_runtime(["RvSlow"], supervisor={"heartbeat_interval": 0.1, "reaper_timeout": 0.5})
    status = run.wait(6)
    _NEVER.set()  # let the abandoned first execution's thread end
    assert status == "completed"


# regression: a claim whose COMMIT reply was lost stayed running as long as its process lived
# (independent review, dc54200, 2026-11-28)
def test_claim_whose_commit_ack_is_lost_is_stranded_while_the_process_lives(start_runtime, monkeypatch):
    original = ductwork.Engine.claim_steps
    lost = []

    def claim(self, pipeline, process_id, limit=1):
        got = original(self, pipeline, process_id, limit)
        if got and not lost:      # COMMIT reached the server, the connection died before the reply
            lost.append(got)
            raise ductwork.DatabaseUnavailable("server closed the connection unexpectedly")
        return got
    monkeypatch.setattr(ductwork.Engine, "claim_steps", claim)
    start_runtime(["RvOne"], supervisor={"heartbeat_interval": 0.1, "reaper_timeout": 0.5})
    run = RvOne.trigger(1)
    status = run.wait(5)
    assert status == "completed"


def test_idle_threads_of_a_pipeline_poll_once_a_timeout_between_them():
    """Five idle threads, a 50 ms poll: one look at the database per 50 ms between them, not five (a hint
    still wakes one at once: tests/test_supervisor.py, test_idle_processes_are_woken_by_a_trigger...)."""
    wakeups, timeout, threads, rounds = ductwork.Wakeups(), 0.05, 5, 20
    looks: list[tuple[float, int]] = []
    stop = threading.Event()

    def idle(i: int) -> None:
        ev = wakeups.event()
        while not stop.is_set():
            wakeups.wait(ductwork.CH_JOBS, "P", ev, timeout)
            looks.append((time.monotonic(), i))
    workers = [threading.Thread(target=idle, args=(i,)) for i in range(threads)]
    started = time.monotonic()
    for w in workers:
        w.start()
    threading.Event().wait(rounds * timeout)
    stop.set()
    wakeups.all()
    for w in workers:
        w.join(10)
    polls = [t for t, _ in looks if t < started + rounds * timeout]
    assert len(polls) <= rounds + threads, len(polls)   # one a timeout, plus each thread's first wait
    assert len({i for _, i in looks}) > 1               # the look moves between the threads

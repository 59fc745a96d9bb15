"""Delayed runs, sleeps and signals (SPEC §16) on every database ductwork runs on, PgBouncer in transaction mode
included (its unnamed statements: a NULL cast, INSERT ... SELECT ... ON CONFLICT ... RETURNING): revive keeps a
start and a sleep still to come, and signals racing the advancement all wake their branches. Real runtimes."""
from __future__ import annotations

import time

from procs import LOAD_SLACK, wait_until

import ductwork

THROUGH_POOLER = True
NAP = 1.5


def first(x):
    return x + 1


def then(x):
    return {"got": x}


class PooledSleep(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(first).sleep(NAP).chain(to=then)


class PooledSignal(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(first).wait_for("go").chain(to=then)


class PooledOne(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(then)


def steps_of(engine, run_id):
    with engine.store.tx(write=False) as t:
        return t.all("SELECT name, status, available_at FROM ductwork_steps WHERE run_id = :r ORDER BY id",
                     {"r": run_id})


def started_at(engine, run_id, name):
    with engine.store.tx(write=False) as t:
        row = t.one("SELECT min(e.started_at) FROM ductwork_executions e JOIN ductwork_steps s ON s.id = e.step_id "
                    "WHERE e.run_id = :r AND s.name = :n", {"r": run_id, "n": name})
    return row[0]


def db_now(engine):
    with engine.store.tx(write=False) as t:
        return float(t.one(ductwork.StoreSQL.now)[0])


def test_delayed_runs_and_signals_through_every_database(engine, start_runtime):
    """delay= and at= (each leaves the other parameter NULL) and a signal, also through PgBouncer."""
    start_runtime(["PooledOne", "PooledSignal"])
    a = PooledOne.trigger(1, delay=0.5)
    b = PooledOne.trigger(2, at=time.time() + 0.5)
    c = PooledSignal.trigger(3)
    assert a.wait(timeout=LOAD_SLACK) == "completed" and b.wait(timeout=LOAD_SLACK) == "completed"
    wait_until(lambda: len(steps_of(engine, c.id)) == 1 and steps_of(engine, c.id)[0][1] == "succeeded",
               LOAD_SLACK, what="first step")
    assert c.signal("go", 7) and c.wait(timeout=LOAD_SLACK) == "completed" and c.output == {"got": 7}


def test_a_revived_delayed_run_does_not_start_before_its_time(engine, start_runtime):
    """SPEC §16: with delay/at "the run's first step is not claimable before that time", a revive included."""
    start_runtime(["PooledOne"])
    run = PooledOne.trigger(1, delay=NAP)
    assert run.cancel()
    assert run.revive()
    assert run.wait(timeout=NAP + LOAD_SLACK) == "completed"
    begun = started_at(engine, run.id, "then")
    assert begun >= run.refresh().scheduled_at, (
        f"the first step started {run.scheduled_at - begun:.2f}s before the run's scheduled start")


def test_a_revived_sleeping_run_sleeps_out_its_sleep(engine, start_runtime):
    """SPEC §16: nothing shortens a sleep, a cancel and a revive included."""
    start_runtime(["PooledSleep"])
    run = PooledSleep.trigger(1)
    wait_until(lambda: len(steps_of(engine, run.id)) == 2, LOAD_SLACK, what="the sleeping step")
    wake = steps_of(engine, run.id)[1][2]
    assert run.cancel() and run.revive()
    assert run.wait(timeout=NAP + LOAD_SLACK) == "completed"
    begun = started_at(engine, run.id, "then")
    assert begun >= wake, f"the step after the sleep started {wake - begun:.2f}s before its sleep ended"


def test_many_signals_racing_the_advancement_all_wake(engine, start_runtime):
    """A signal sent while the branch's step commits and the advancer decides: no wake-up lost."""
    start_runtime(["PooledSignal"], **{"pipeline_advancer": {"count": 3}})
    runs = [PooledSignal.trigger(i) for i in range(60)]
    for i, run in enumerate(runs):
        if i % 3 == 0:
            time.sleep(0.005)
        assert run.signal("go", i)
    deadline = time.monotonic() + 4 * LOAD_SLACK
    for run in runs:
        assert run.wait(timeout=max(0.1, deadline - time.monotonic())) == "completed", run
    assert sorted(r.output["got"] for r in runs) == list(range(60))

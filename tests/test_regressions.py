"""Engine-level regressions found by an independent review: each test reproduced its bug before the fix.

The runners' regressions (worker loop, drain, lost replies) are in test_runtime.py."""
from __future__ import annotations

import threading

import pytest
from conftest import truncate_pg

import ductwork


def rv_list(n):
    return list(range(n))


def rv_inc(x):
    return x + 1


def rv_sum(values):
    return values


class RvFan(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(rv_list).expand(to=rv_inc).collapse(into=rv_sum)


def run_all(engine, pipeline, pid=4242):
    """Drive steps to completion by hand (inline advancement in the commit)."""
    for _ in range(100):
        claims = engine.claim_steps(pipeline, pid, 100)
        if not claims:
            return
        results = []
        for c in claims:
            fn = ductwork._REGISTRY[pipeline].steps[c.name]
            args = ductwork._loads(c.input)
            value = fn(*args) if c.node == 0 else fn(args)
            results.append(ductwork.StepResult(c, True, ductwork._dumps(value)))
        engine.commit(results)


def test_revive_after_definition_changed_at_a_join_refans_out(engine):
    run = RvFan.trigger(3)
    removed = RvFan.steps.pop("rv_sum")        # a deploy dropped the join step
    try:
        run_all(engine, "RvFan")
    finally:
        RvFan.steps["rv_sum"] = removed        # the next deploy brings it back
    assert run.refresh().status == "halted" and run.halt_reasons == ["definition_changed"]
    assert run.revive() is True
    # the advancer re-advances the reopened join branch
    for _ in range(5):
        for b in engine.claim_branches("RvFan", 4242, 10):
            engine.advance(b)
        run_all(engine, "RvFan")
    run.refresh()
    assert run.status == "completed"
    names = [s.name for s in run.steps]
    print("OUTPUT", run.output, names)
    assert names.count("rv_inc") == 3, names      # expanded children must not re-run
    assert run.output == [1, 2, 3]


class RvOne(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(rv_inc)


@pytest.mark.postgres
def test_hand_back_ignores_that_the_step_was_committed_meanwhile(pg_server_url, monkeypatch):
    """Needs concurrent writers (Postgres): the claimer commits between hand-back's SELECT and UPDATE."""
    truncate_pg(pg_server_url)
    ductwork.configure(database_url=pg_server_url)
    engine = ductwork._app_engine()
    config = ductwork.load_config(data={"job_worker": {"max_crash": 1, "max_retry": 5, "retry_delay": 0}},
                                  overrides={"database_url": engine.store.url})
    eng = ductwork.Engine(engine.store, config)
    run = RvOne.trigger(1)
    [c] = eng.claim_steps("RvOne", 555_001)
    eng.hand_back(555_001, why="first crash")                 # crashes = 1 (= max_crash)
    [c] = eng.claim_steps("RvOne", 555_002)
    original = ductwork.Tx.all

    def all_(self, sql, params=()):
        rows = original(self, sql, params)
        if sql is ductwork.SQL.steps_held_by:
            # the (paused, now resumed) worker commits a retryable failure between the SELECT and the UPDATE
            th = threading.Thread(target=lambda: eng.commit_failure(c, "transient app error"))
            th.start()
            th.join()
        return rows
    monkeypatch.setattr(ductwork.Tx, "all", all_)
    handed = eng.hand_back(555_002, why="reaped")
    monkeypatch.setattr(ductwork.Tx, "all", original)
    assert run.steps[0].status == "queued"  # the retry the claimer committed stands
    for b in eng.claim_branches("RvOne", 555_003, 10):
        eng.advance(b)
    run.refresh()
    assert handed == 0
    assert run.status == "in_progress"      # the step is queued for its retry: nothing is finished

"""Flow control (SPEC §17): priorities (lower first, FIFO within one, every step of the run), runs finishing in the
order they started, and concurrency caps across processes and hosts (a slot held with the claim, freed with it;
never above the cap, under SIGKILL too; a hot key does not starve a cold one; a step waiting for a slot is woken
when one frees). Real engines, runtimes and supervisors on real SQLite and PostgreSQL."""
from __future__ import annotations

import collections
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST, run_cli
from procs import LOAD_SLACK, Proc, reap_deadline, wait_until

import ductwork

sys.path.insert(0, str(Path(__file__).parent / "apps"))
import flow_app  # noqa: E402


def plus_one(x):
    return x + 1


class FlowOne(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(plus_one)


class FlowChain(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(plus_one).chain(to=plus_one).chain(to=plus_one)


@ductwork.step(concurrency=2, concurrency_key=lambda tenant: f"t-{tenant}")
def per_tenant(tenant):
    return tenant


class FlowKeyed(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(per_tenant)


class OneAtATime(ductwork.Step):
    concurrency = 1

    def execute(self, seconds):
        time.sleep(seconds)
        return seconds


class FlowSerial(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(OneAtATime)


@ductwork.step(concurrency=1)
def removable(x):
    return x


class FlowRemovable(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(removable)


class BadKey(ductwork.Step):
    concurrency = 3

    def concurrency_key(self, x):
        return x   # a number, not a string

    def execute(self, x):
        return x


class FlowBadKey(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(BadKey)


def rows(engine, sql, params=None):
    with engine.store.tx(write=False) as t:
        return t.all(sql, params or {})


def drain(engine, pipeline, limit=4, threads=1, process_id=1, steps=10_000, cap=None):
    """Worker threads' loop, in the test: ``threads`` claims of up to ``limit`` steps outstanding, the oldest
    committed (succeeded) before the next claim; returns the run ids in the order their steps were claimed. With
    a ``cap``: never more outstanding claims holding a key than that."""
    order: list[int] = []
    outstanding: collections.deque = collections.deque()
    for _ in range(steps):
        while len(outstanding) < threads:
            claims = engine.claim_steps(pipeline, process_id, limit)
            if not claims:
                break
            outstanding.append(claims)
            order += [c.run_id for c in claims]
            if cap is not None:
                holders = collections.Counter(key for held in outstanding for key in {c.concurrency_key for c in held})
                assert max(holders.values()) <= cap and None not in holders, holders
        if not outstanding:
            return order
        done = outstanding.popleft()
        engine.commit([ductwork.StepResult(c, True, json.dumps(c.run_id)) for c in done])
    raise AssertionError("the queue did not drain")


# -- priorities ---------------------------------------------------------------------------------
def test_a_claim_looks_below_the_priority_it_claimed_at_last_first_and_still_finds_every_other(engine):
    """Each process remembers the priority it claimed at last and looks below it first (one read of that
    priority's busy index head instead of two): a lower priority queued since still comes first, and a drained
    one sends the claim on to what is left, above or below."""
    def claim() -> list[int]:
        return [c.priority for c in engine.claim_steps("FlowOne", 1, 1)]
    FlowOne.trigger(1, priority=5)
    assert claim() == [5]
    FlowOne.trigger(2, priority=5)
    FlowOne.trigger(3, priority=-1)
    assert claim() == [-1]
    assert claim() == [5]    # (none left at -1, where it claimed last)
    FlowOne.trigger(4, priority=9)
    FlowOne.trigger(5, priority=7)
    assert claim() == [7]
    assert claim() == [9]
    assert claim() == []


def test_a_claim_of_too_few_looks_further_only_when_a_higher_priority_is_queued(engine, monkeypatch):
    """The claim says the highest priority queued: one that got too few at it asks nothing more (a chain's every
    hop, a burst's tail), one with a higher priority queued goes on to it."""
    asked: list[dict] = []
    one = ductwork.Tx.one
    def spy(t, sql, params=None):
        if sql == ductwork.SQL.next_priority:
            asked.append(params)
        return one(t, sql, params)
    monkeypatch.setattr(ductwork.Tx, "one", spy)
    first = [FlowOne.trigger(i).id for i in range(2)]
    later = FlowOne.trigger(9, priority=5).id
    assert [c.run_id for c in engine.claim_steps("FlowOne", 1, 10)] == [*first, later]
    assert [params["lowest"] for params in asked] == [1]
    asked.clear()
    again = [FlowOne.trigger(i).id for i in range(2)]
    assert [c.run_id for c in engine.claim_steps("FlowOne", 1, 10)] == again
    assert asked == []
    FlowOne.trigger(0, priority=3, delay=3600)   # (a higher one queued but asleep: looked at, nothing claimed)
    FlowOne.trigger(0)
    assert [c.priority for c in engine.claim_steps("FlowOne", 1, 10)] == [0]
    assert [params["lowest"] for params in asked] == [1, 4]   # (3 had none claimable: what is above it?)


def test_lower_priority_runs_first_fifo_within_a_priority_negatives_allowed(engine):
    triggered = [(FlowOne.trigger(i, priority=p).id, p) for i, p in enumerate([5, 0, -3, 0, 5, -3, 0])]
    claimed = [c.run_id for _ in triggered for c in engine.claim_steps("FlowOne", 1, 1)]
    assert claimed == [run_id for run_id, _ in sorted(triggered, key=lambda item: (item[1], item[0]))]
    assert ductwork.Run.get(triggered[2][0]).priority == -3


def test_a_batch_claim_goes_on_to_the_next_priority_past_steps_that_wait(engine):
    asleep = [FlowOne.trigger(i, delay=3600).id for i in range(3)]          # priority 0, not claimable yet
    later = [FlowOne.trigger(i, priority=7).id for i in range(2)]
    urgent = FlowOne.trigger(0, priority=-1).id
    claimed = engine.claim_steps("FlowOne", 1, 10)
    assert [c.run_id for c in claimed] == [urgent, *later]
    assert not set(asleep) & {c.run_id for c in claimed}


def test_a_claim_past_many_priorities_of_waiting_steps_still_finds_the_claimable_ones(engine):
    for priority in range(ductwork.PRIORITY_WALK * 2):   # each priority: one step asleep, none claimable
        FlowOne.trigger(priority, delay=3600, priority=priority)
    later = [FlowOne.trigger(i, priority=100 + i).id for i in range(3)]
    assert [c.run_id for c in engine.claim_steps("FlowOne", 1, 10)] == later


def test_every_step_of_a_run_has_its_priority(engine, start_runtime):
    start_runtime(["FlowChain"])
    run = FlowChain.trigger(1, priority=-2)
    assert run.wait(timeout=LOAD_SLACK) == "completed" and run.output == 4
    assert [p for (p,) in rows(engine, "SELECT priority FROM ductwork_steps WHERE run_id = :r", {"r": run.id})] \
        == [-2, -2, -2]


@pytest.mark.parametrize("bad", ["1", 1.5, True, 2 ** 31, -2 ** 31 - 1, None])
def test_a_priority_that_is_not_a_whole_number_in_range_is_refused_before_anything_is_written(engine, bad):
    with pytest.raises(ductwork.DuctworkError, match="priority must be a whole number"):
        FlowOne.trigger(1, priority=bad)
    assert rows(engine, "SELECT count(*) FROM ductwork_runs")[0][0] == 0


def test_cli_trigger_priority(engine, tmp_path):
    app = tmp_path / "app.py"
    app.write_text("import ductwork\n\ndef plus_one(x):\n    return x + 1\n\n"
                   "class CliPrio(ductwork.Pipeline):\n    @staticmethod\n    def define(p):\n"
                   "        p.start(plus_one)\n")
    env = {"DUCTWORK_DATABASE_URL": engine.store.url, "DUCTWORK_APP": str(app)}
    done = run_cli("trigger", "CliPrio", "1", "--priority", "-4", env=env)
    assert done.returncode == 0, done.stderr
    assert ductwork.Run.get(int(done.stdout)).priority == -4
    for bad in ("2147483648", "x"):
        refused = run_cli("trigger", "CliPrio", "1", "--priority", bad, env=env)
        assert refused.returncode == 2 and "priority" in refused.stderr and "Traceback" not in refused.stderr
    assert rows(engine, "SELECT count(*) FROM ductwork_runs")[0][0] == 1


# -- runs finish in the order they started -------------------------------------------------------------
def test_a_runs_later_steps_come_before_the_first_steps_of_runs_that_started_after_it(engine):
    runs = [FlowChain.trigger(i).id for i in range(4)]
    order = drain(engine, "FlowChain", limit=1)
    assert order == [run_id for run_id in runs for _ in range(3)]   # each run whole, in start order


def test_new_steps_get_their_ids_in_the_order_they_were_written_however_many_runs_a_batch_names(engine):
    runs = [FlowOne.trigger(i).id for i in range(1000)]
    batch = [(run_id, 0, "FlowOne", 1, "plus_one", json.dumps([run_id, k]), 0.0) for run_id in runs for k in range(5)]
    with engine.store.tx(kind=ductwork._EngineTx) as t:
        t.run("ANALYZE")   # (the planner knows the runs: a join it may turn around)
        engine._insert_steps(t, batch)
    written = rows(engine, "SELECT input FROM ductwork_steps WHERE node = 1 ORDER BY id")
    assert [json.loads(i) for (i,) in written] == [[run_id, k] for run_id in runs for k in range(5)]


def test_a_delayed_runs_later_steps_queue_from_its_start(engine):
    early = FlowChain.trigger(1, delay=0.3)
    wait_until(lambda: engine.store.now() >= early.scheduled_at, timeout=LOAD_SLACK)
    late = FlowChain.trigger(2)   # started after the delayed one did
    assert drain(engine, "FlowChain", limit=1) == [early.id] * 3 + [late.id] * 3


# -- concurrency caps: definitions and config -----------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -1, True, "5", 2.0])
def test_a_concurrency_that_is_not_a_whole_number_above_zero_is_a_definition_error(bad):
    with pytest.raises(ductwork.DefinitionError, match="concurrency must be a whole number above 0"):
        type("BadCap", (ductwork.Step,), {"concurrency": bad, "execute": lambda self: 1})
    with pytest.raises(ductwork.DefinitionError, match="concurrency must be a whole number above 0"):
        ductwork.step(concurrency=bad)


def test_a_concurrency_key_that_is_not_callable_is_a_definition_error():
    with pytest.raises(ductwork.DefinitionError, match="concurrency_key must be a method"):
        type("BadKeyed", (ductwork.Step,), {"concurrency": 2, "concurrency_key": "tenant", "execute": lambda s: 1})
    with pytest.raises(ductwork.DefinitionError, match="concurrency_key must be a method"):
        ductwork.step(concurrency=2, concurrency_key=7)


def test_config_concurrency_is_validated_and_wins_over_the_steps_own(engine):
    with pytest.raises(ductwork.ConfigError, match="concurrency"):
        ductwork.load_config(data={"job_worker": {"concurrency": {"FlowKeyed": 0}}})
    config = ductwork.load_config(data={"job_worker": {"concurrency": {"FlowKeyed": {"per_tenant": 1}}}})
    caps = ductwork.StepCaps(config)
    assert caps.cap("FlowKeyed", "per_tenant") == 1 and caps.cap("FlowSerial", "OneAtATime") == 1
    assert ductwork.StepCaps(ductwork.load_config(data={})).cap("FlowKeyed", "per_tenant") == 2
    assert ductwork.StepCaps(ductwork.load_config(data={})).cap("FlowOne", "plus_one") is None


# -- concurrency caps: slots held with the claim ---------------------------------------------------------
def slots(engine, pipeline):
    """(status, key) -> steps."""
    found = rows(engine, "SELECT status, concurrency_key, count(*) FROM ductwork_steps WHERE pipeline = :p "
                         "GROUP BY status, concurrency_key", {"p": pipeline})
    return {(status, key): n for status, key, n in found}


def claim_one(engine, process_id, limit=1):
    """One claim (its own token: a worker thread's) of FlowKeyed steps: their (key, run) pairs."""
    return [(c.concurrency_key, c.run_id) for c in engine.claim_steps("FlowKeyed", process_id, limit)]


def test_a_claim_takes_a_slot_of_its_key_only_while_one_is_free(engine):
    runs = [FlowKeyed.trigger(tenant).id for tenant in "ababab"]
    # claims of one step each (threads): two slots per key, then the other steps of the keys wait
    assert [claim_one(engine, 1) for _ in range(4)] == [[("t-a", runs[0])], [("t-b", runs[1])],
                                                        [("t-a", runs[2])], [("t-b", runs[3])]]
    assert claim_one(engine, 2, limit=10) == []   # another process: nothing (the blocked wait, unread)
    assert slots(engine, "FlowKeyed") == {("running", "t-a"): 2, ("running", "t-b"): 2,
                                          ("blocked", "t-a"): 1, ("blocked", "t-b"): 1}
    with engine.store.tx(write=False) as t:
        tokens = [token for (token,) in t.all("SELECT claim_token FROM ductwork_steps WHERE status = 'running'")]
    assert len(set(tokens)) == 4   # four claims, four slots
    # each way a claim is let go frees its slot and unblocks a step of its key: a hand-back, a release
    steps = {run_id: step_id for run_id, step_id in rows(
        engine, "SELECT run_id, id FROM ductwork_steps WHERE pipeline = 'FlowKeyed'")}
    assert engine.hand_back(1, [steps[runs[1]]], "test crash") == 1      # b's first claim: its process died
    assert ("blocked", "t-b") not in slots(engine, "FlowKeyed")
    assert engine.release(1, [steps[runs[3]]], "FlowKeyed") == 1         # b's second: given back unstarted
    assert engine.hand_back(1, [steps[runs[0]]], "test crash") == 1      # a's first
    assert ("blocked", "t-a") not in slots(engine, "FlowKeyed")
    # (the crashed ones queued again last: behind the one given back and the ones unblocked, and blocked again)
    again = [claim_one(engine, 3) for _ in range(4)]
    assert again == [[("t-b", runs[3])], [("t-a", runs[4])], [("t-b", runs[5])], []]
    assert slots(engine, "FlowKeyed") == {("running", "t-a"): 2, ("running", "t-b"): 2, ("blocked", "t-a"): 1,
                                          ("blocked", "t-b"): 1}


def test_one_claim_holds_one_slot_however_many_steps_of_the_key_it_takes(engine):
    runs = [FlowKeyed.trigger("c").id for _ in range(5)]
    batch = claim_one(engine, 1, limit=3)   # a thread's batch: they run one after another
    assert batch == [("t-c", run_id) for run_id in runs[:3]]
    assert claim_one(engine, 2, limit=1) == [("t-c", runs[3])]   # the second slot
    assert claim_one(engine, 3, limit=1) == []                    # none left: the last one waits
    assert slots(engine, "FlowKeyed") == {("running", "t-c"): 4, ("blocked", "t-c"): 1}


def test_a_slot_a_commit_frees_goes_to_the_step_it_unblocks_not_to_a_newer_one_its_claim_found(engine, monkeypatch):
    """A commit passes its slots on after its claim statement (their locks held the least time; on Postgres, a key
    freed and claimed again in one round trip): the claim found only the newer queued step, yet the older one
    blocked takes the slot freed, and the newer waits behind it."""
    runs = [FlowKeyed.trigger("e").id for _ in range(3)]
    first = engine.claim_steps("FlowKeyed", 1, 1)
    assert [c.run_id for c in first] == runs[:1] and claim_one(engine, 1) == [("t-e", runs[1])]
    assert claim_one(engine, 1) == []                                    # both slots held: the third waits
    newer = FlowKeyed.trigger("e").id                                    # queued, behind the one blocked
    ran: list[str] = []
    every = ductwork.Tx.all   # (Tx.one and Tx.all both come here)
    def spy(t, sql, params=()):
        ran.append(sql)
        return every(t, sql, params)
    monkeypatch.setattr(ductwork.Tx, "all", spy)
    done = engine.commit([ductwork.StepResult(c, True, "1") for c in first], claim_limit=1)
    monkeypatch.undo()
    names = {getattr(ductwork.SQL, name): name for name in ("locked_unblock_held", "locked_unblock",
                                                            "locked_slots_held", "unblock_steps", "slots_held")}
    assert [names[sql] for sql in ran if sql in names] == (
        ["locked_unblock_held"] if engine.store.dialect == "postgres" else ["unblock_steps", "slots_held"])
    assert done.accepted == [True] and [c.run_id for c in done.claims] == [runs[2]]
    found = rows(engine, "SELECT run_id, status FROM ductwork_steps WHERE run_id IN (:a, :b) ORDER BY run_id",
                 {"a": runs[2], "b": newer})
    assert [tuple(row) for row in found] == [(runs[2], "running"), (newer, "blocked")]
    assert slots(engine, "FlowKeyed") == {("succeeded", "t-e"): 1, ("running", "t-e"): 2, ("blocked", "t-e"): 1}
    assert claim_one(engine, 2, limit=5) == []


def step_states(engine, runs):
    return {run_id: status for run_id, status in rows(
        engine, "SELECT run_id, status FROM ductwork_steps WHERE pipeline = 'FlowKeyed' ORDER BY run_id")
        if run_id in runs}


def running_holders(engine):
    return rows(engine, "SELECT count(DISTINCT claim_token) FROM ductwork_steps WHERE pipeline = 'FlowKeyed' "
                        "AND status = 'running'")[0][0]


def test_a_commit_passes_on_one_turn_per_claim_and_a_step_queued_with_its_turn_keeps_it(engine):
    """A claim of two steps of a key holds one slot: its commit passes on one turn, not two, so the step an
    earlier let-go queued (older) keeps the other slot, and the newer ones run in their order."""
    runs = [FlowKeyed.trigger("f").id for _ in range(6)]
    holder = engine.claim_steps("FlowKeyed", 1, 2)                       # runs 0 and 1: one claim, one slot
    other = engine.claim_steps("FlowKeyed", 1, 1)                        # run 2: the other slot
    assert engine.claim_steps("FlowKeyed", 1, 5) == []                   # runs 3, 4, 5 wait
    engine.commit([ductwork.StepResult(other[0], True, "1")])            # run 3 queued: its turn
    done = engine.commit([ductwork.StepResult(c, True, "1") for c in holder], claim_limit=1)
    assert [c.run_id for c in done.claims] == [runs[3]]
    assert [c.run_id for c in engine.claim_steps("FlowKeyed", 2, 5)] == [runs[4]]
    assert step_states(engine, runs[3:]) == {runs[3]: "running", runs[4]: "running", runs[5]: "blocked"}


def test_a_commit_that_frees_a_slot_claims_the_step_it_unblocked_itself(engine):
    """A key's whole backlog waiting (none queued): the commit that frees a slot runs the next step of the key on
    its own thread, as before it passed slots on after its claim statement (no wake-up, no second claim)."""
    runs = [FlowKeyed.trigger("g").id for _ in range(5)]
    first = engine.claim_steps("FlowKeyed", 1, 1)
    engine.claim_steps("FlowKeyed", 1, 1)
    assert engine.claim_steps("FlowKeyed", 1, 5) == []                   # runs 2, 3, 4 wait, none queued
    done = engine.commit([ductwork.StepResult(c, True, "1") for c in first], claim_limit=4)
    assert [c.run_id for c in done.claims] == [runs[2]]
    assert step_states(engine, runs) == {runs[0]: "succeeded", runs[1]: "running", runs[2]: "running",
                                         runs[3]: "blocked", runs[4]: "blocked"}


def test_a_step_unblocked_by_a_commit_never_takes_a_slot_a_lower_cap_or_a_partial_commit_left_held(engine):
    """The steps a commit unblocks have the first right to the slots it freed, never to more than are free: with
    the cap lowered below the holders (an operator, in an incident), and after a commit of one of a claim's two
    steps (its slot still held), the holders stay at the cap."""
    runs = [FlowKeyed.trigger("h").id for _ in range(4)]
    pair = engine.claim_steps("FlowKeyed", 1, 2)                         # one slot, two steps
    engine.claim_steps("FlowKeyed", 1, 1)                                # the second slot
    assert engine.claim_steps("FlowKeyed", 1, 1) == []                   # run 3 waits
    FlowKeyed.trigger("h")                                               # a newer one, queued
    done = engine.commit([ductwork.StepResult(pair[0], True, "1")], claim_limit=1)   # its other step still runs
    assert done.claims == [] and running_holders(engine) == 2
    assert step_states(engine, runs)[runs[3]] == "blocked"
    lowered = ductwork.Engine(engine.store, ductwork.load_config(data=FAST, overrides={
        "database_url": engine.store.url, "job_worker": {"concurrency": {"FlowKeyed": {"per_tenant": 1}}}}))
    assert lowered.caps.cap("FlowKeyed", "per_tenant") == 1
    done = lowered.commit([ductwork.StepResult(pair[1], True, "1")], claim_limit=1)
    assert done.claims == [] and running_holders(engine) == 1
    newer = max(step_states(engine, range(runs[3] + 1, runs[3] + 10)))
    # (run 3 unblocked and claimed by the commit itself, but with no slot free for it: it waits again, first)
    assert step_states(engine, [runs[3], newer]) == {runs[3]: "blocked", newer: "blocked"}


def test_status_and_metrics_count_the_steps_waiting_for_a_slot(engine):
    for tenant in "ddd":
        FlowKeyed.trigger(tenant)
    assert [len(claim_one(engine, 1)) for _ in range(3)] == [1, 1, 0]
    report = ductwork.status_report(engine)
    assert report["waiting"]["FlowKeyed"]["for_slot"] == 1
    assert "1 step(s) waiting for a slot (concurrency cap)" in "\n".join(ductwork._waiting_lines(report))
    metrics = ductwork.dashboard_metrics(engine)
    assert 'ductwork_steps_waiting_for_slot{pipeline="FlowKeyed"} 1' in metrics
    assert 'ductwork_queue_depth{pipeline="FlowKeyed"} 0' in metrics   # the blocked step is not claimable


def test_the_queue_age_is_how_long_a_step_has_waited_not_how_old_its_run_is(engine):
    run = FlowChain.trigger(1)
    (claim,) = engine.claim_steps("FlowChain", 1, 1)
    wait_until(lambda: engine.store.now() - run.created_at >= 1.0, timeout=LOAD_SLACK)
    engine.commit([ductwork.StepResult(claim, True, "2")])   # its second step queues now, in its run's place
    metrics = ductwork.dashboard_metrics(engine)
    (age,) = [float(line.split()[-1]) for line in metrics.splitlines()
              if line.startswith('ductwork_queue_oldest_age_seconds{pipeline="FlowChain"}')]
    assert 0 <= age < 1.0, metrics


def test_a_cancelled_run_waiting_for_a_slot_is_cancelled_and_a_cancelled_holder_frees_its_slot(engine):
    holders = [FlowKeyed.trigger("c").id for _ in range(2)]
    waiting = FlowKeyed.trigger("c").id
    assert [len(claim_one(engine, 1)) for _ in range(3)] == [1, 1, 0]
    assert slots(engine, "FlowKeyed")[("blocked", "t-c")] == 1
    assert ductwork.cancel(waiting) == 1
    assert rows(engine, "SELECT status FROM ductwork_steps WHERE run_id = :r", {"r": waiting}) == [("cancelled",)]
    follower = FlowKeyed.trigger("c").id
    assert claim_one(engine, 1) == []   # blocked: both slots held
    ductwork.cancel(holders[0])   # its holder never answers (this test): the cancel takes the claim, and the slot
    assert rows(engine, "SELECT status FROM ductwork_steps WHERE run_id = :r", {"r": follower}) == [("queued",)]
    assert claim_one(engine, 1, limit=10) == [("t-c", follower)]


def statuses(engine, run_ids):
    return [rows(engine, "SELECT status FROM ductwork_steps WHERE run_id = :r", {"r": r})[0][0] for r in run_ids]


def test_a_cancelled_step_that_an_unblock_queued_passes_its_turn_on(engine):
    first, second, third = (FlowSerial.trigger(0).id for _ in range(3))
    (holder,) = engine.claim_steps("FlowSerial", 1, 1)
    assert engine.claim_steps("FlowSerial", 2, 1) == []   # cap 1: both others wait
    engine.commit([ductwork.StepResult(holder, True, "0")])   # the slot freed: the second queued, its turn
    assert statuses(engine, [first, second, third]) == ["succeeded", "queued", "blocked"]
    assert ductwork.cancel(second) == 1
    assert statuses(engine, [second, third]) == ["cancelled", "queued"]   # the turn went on, not lost


def test_the_sweep_queues_steps_whose_turn_was_lost_when_a_cap_is_raised_or_removed(engine):
    tight = ductwork.load_config(data={"job_worker": {"concurrency": {"FlowKeyed": {"per_tenant": 1}}}})
    engine.caps = ductwork.StepCaps(tight)
    runs = [FlowKeyed.trigger("e").id for _ in range(6)]
    assert [len(claim_one(engine, 1)) for _ in range(2)] == [1, 0]
    assert engine.sweep_blocked("FlowKeyed") == 0   # at its cap: nothing to pass on
    engine.caps = ductwork.StepCaps(ductwork.load_config(data={}))   # deployed again: its own cap, 2
    assert engine.sweep_blocked("FlowKeyed") == 1
    assert [len(claim_one(engine, 1)) for _ in range(2)] == [1, 0]
    assert statuses(engine, runs).count("running") == 2
    # a cap removed from the code: its blocked steps all go
    removed = [FlowRemovable.trigger(i).id for i in range(4)]
    assert [len(engine.claim_steps("FlowRemovable", 1, 1)) for _ in range(2)] == [1, 0]
    del removable.concurrency
    try:
        engine.caps = ductwork.StepCaps(ductwork.load_config(data={}))
        assert engine.sweep_blocked("FlowRemovable") == 3
        assert statuses(engine, removed) == ["running", "queued", "queued", "queued"]
    finally:
        removable.concurrency = 1


def test_a_hot_key_with_a_long_backlog_does_not_starve_a_key_queued_behind_it(engine):
    hot = [FlowKeyed.trigger("hot").id for _ in range(1000)]
    cold = [FlowKeyed.trigger("cold").id for _ in range(10)]
    order = drain(engine, "FlowKeyed", limit=4, threads=3, cap=2)   # three threads: the hot key's 2 slots held
    assert sorted(order) == sorted(hot + cold)
    last_cold = max(order.index(run_id) for run_id in cold)
    assert last_cold < 40, order[:60]   # the cold key's steps run beside the hot key's, not after them
    assert slots(engine, "FlowKeyed") == {("succeeded", "t-hot"): 1000, ("succeeded", "t-cold"): 10}


def test_a_concurrency_key_that_does_not_return_a_string_fails_the_step_without_running_it(engine, start_runtime):
    start_runtime(["FlowBadKey"])
    run = FlowBadKey.trigger(42)
    assert run.wait(timeout=LOAD_SLACK) == "halted"
    assert run.halt_reasons == [ductwork.JOB_NON_RETRYABLE]
    (error,) = [s.error for s in run.steps]
    assert "concurrency_key of step BadKey must return a string" in error and "got 42 (int)" in error


def test_a_step_waiting_for_a_slot_is_woken_when_the_slot_frees_not_at_the_next_poll(engine, start_runtime):
    idle = 30.0   # a poll this slow would show
    start_runtime(["FlowSerial"], job_worker={"polling_timeout": idle, "count": 4})
    first, second = FlowSerial.trigger(0.5), FlowSerial.trigger(0.5)
    started = time.monotonic()
    # (either may run first: two claims racing for the key's lock, the one that finds it busy gives its step back)
    assert first.wait(timeout=idle / 2) == "completed" and second.wait(timeout=idle / 2) == "completed"
    assert time.monotonic() - started < 1.0 + LOAD_SLACK
    executions = rows(engine, "SELECT started_at, finished_at FROM ductwork_executions ORDER BY started_at")
    assert len(executions) == 2 and executions[1][0] >= executions[0][1] - 0.002   # one at a time


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_the_postgres_slot_functions_run_the_statements_the_code_has(engine):
    """Migration 6's functions take their bodies from SQL.slots_held and SQL.unblock_steps as they were when it
    ran: a later change to those statements needs a migration that replaces the functions (this says so)."""
    for text in ductwork.SQL.slot_functions():
        name, body = text.split("FUNCTION ")[1].split("(")[0], text.split("$$")[1]
        assert rows(engine, "SELECT prosrc FROM pg_proc WHERE proname = :n", {"n": name}) == [(body,)], name


# -- concurrency caps across hosts, under SIGKILL ----------------------------------------------------------
def most_at_once(intervals):
    """The most intervals (start, end) open at one moment."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
                   key=lambda edge: (edge[0], edge[1]))   # an end before a start at the same instant
    most = running = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


def executions_marked(marks: Path, killed: dict[int, float]) -> dict[str, list[tuple[float, float]]]:
    """Per tenant, the (start, end) of every execution the steps marked; one whose process was killed before it
    ended ends at the kill (``killed``: pid -> when)."""
    starts, ends = {}, {}
    for line in marks.read_text().splitlines():
        what, tenant, run_id, attempt, pid, at = line.split()
        (starts if what == "start" else ends)[tenant, run_id, attempt, int(pid)] = float(at)
    out: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    for (tenant, *rest, pid), began in starts.items():
        ended = ends.get((tenant, *rest, pid), killed.get(pid))
        assert ended is not None, f"an execution in pid {pid} neither ended nor was killed"
        out[f"tenant-{tenant}"].append((began, ended))
    return out


def test_a_cap_holds_across_hosts_and_sigkills_and_no_slot_leaks(procs, tmp_path, app_db):
    cap, per_tenant = flow_app.TENANT_CAP, 16
    config = {"app": str(Path(__file__).parent / "apps" / "flow_app.py"), "pipelines": ["FlowTenant"],
              "job_worker": {"count": 4}, "supervisor": {"reaper_timeout": 1.5}}
    a = Proc(tmp_path, app_db, name="a", machine="host-a", config=config)
    b = Proc(tmp_path, app_db, name="b", machine="host-b", config=config)
    procs += [a, b]
    for p in (a, b):
        p.wait_log("worker started")
    runs = [flow_app.FlowTenant.trigger(tenant, 0.3) for _ in range(per_tenant) for tenant in ("x", "y")]
    marks = tmp_path / "marks.log"

    def started() -> int:
        return sum(line.startswith("start") for line in marks.read_text().splitlines()) if marks.exists() else 0
    wait_until(lambda: started() >= 6, timeout=LOAD_SLACK, what="steps started")
    killed = {a.child_pid("worker:FlowTenant"): time.time()}   # a worker dies holding slots: its supervisor
    os.kill(next(iter(killed)), signal.SIGKILL)                # hands its claims back, and starts another
    wait_until(lambda: started() >= 14, timeout=LOAD_SLACK * 2, what="more steps")
    b_pids = [b.pid, b.child_pid("worker:FlowTenant")]
    b.kill_group()                                             # a whole host dies: host-a reaps it
    killed |= dict.fromkeys(b_pids, time.time())
    deadline = per_tenant * 0.3 + reap_deadline(config) + LOAD_SLACK * 2
    for run in runs:
        assert run.wait(timeout=deadline) == "completed", a.log()[-3000:]
    engine = ductwork._app_engine()
    crashed = rows(engine, "SELECT count(*) FROM ductwork_executions WHERE outcome = 'crashed'")[0][0]
    assert crashed, "no step was running when its process was killed"
    for key, intervals in executions_marked(marks, killed).items():
        assert most_at_once(intervals) == cap, (key, sorted(intervals))   # never above, and the cap was reached
    assert rows(engine, "SELECT count(*) FROM ductwork_steps WHERE status <> 'succeeded'")[0][0] == 0
    a.signal(signal.SIGTERM)
    assert a.wait() == 0

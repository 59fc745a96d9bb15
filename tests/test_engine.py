"""The engine end to end, in one process, on real SQLite and real PostgreSQL."""
from __future__ import annotations

import collections
import threading

import pytest

import ductwork

THROUGH_POOLER = True   # every engine test also runs through a real PgBouncer (conftest)

CALLS: collections.Counter = collections.Counter()
FLAGS: dict[str, bool] = {}
HALTS: list[tuple[int, list[str]]] = []


# -- steps ---------------------------------------------------------------------------------
def add_one(x):
    return x + 1


def double(x):
    return x * 2


def to_list(n):
    return list(range(n))


def total(values):
    return sum(values)


def ident(x):
    return x


def pair(values):
    return {"first": values[0], "second": values[1]}


class Start(ductwork.Step):
    def execute(self, a, b=0):
        return a + b


class Split(ductwork.Step):
    def execute(self, n):
        return [[i, i + 1] for i in range(n)]


class Describe(ductwork.Step):
    def execute(self, x):
        return f"value:{x}"


def kind_of(x):
    return x


def on_true(x):
    return "was-true"


def on_none(x):
    return "was-none"


def on_three(x):
    return "was-three"


def fallback(x):
    return f"other:{x}"


def tagged(x):
    return {"chosen": x}


class Flaky(ductwork.Step):
    """Fails until FLAGS['flaky-ok'] is set; records the idempotency keys it saw."""
    keys: list[str] = []

    def execute(self, x):
        CALLS["flaky"] += 1
        Flaky.keys.append(self.idempotency_key)
        if not FLAGS.get("flaky-ok"):
            raise RuntimeError(f"boom on attempt {self.attempt}")
        return x * 10


class SetsContext(ductwork.Step):
    def execute(self, x):
        self.context.set("source", "crm")
        self.context.set("source", "crm")  # same value again: fine (re-runs are safe)
        self.context.set("count", 1)
        self.context.set("count", 2, overwrite=True)
        return self.context.get("source")


class ConflictsContext(ductwork.Step):
    def execute(self, x):
        self.context.set("k", 1)
        self.context.set("k", 2)
        return x


def fn_sees_current(x):
    cur = ductwork.current_step()
    return {"run": cur.run_id, "attempt": cur.attempt, "key": cur.idempotency_key}


def not_json(x):
    return {1, 2}


def counted(x):
    CALLS["counted"] += 1
    return x


# -- pipelines -----------------------------------------------------------------------------
class EngChain(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(Start).chain(to=add_one).chain(to=double)


class EngExpand(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(to_list).expand(to=double).chain(to=add_one).collapse(into=total)


class EngExpandList(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(to_list).expand(to=Describe).collapse(into=ident)


class EngDivideFluent(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(ident).divide(to=[add_one, double]).combine(into=ident)


class EngDivideUnpacked(ductwork.Pipeline):
    @staticmethod
    def define(p):
        a, b = p.start(ident).divide(to=[add_one, double])
        a.chain(to=Describe)
        b.combine(a, into=pair)  # argument order does not matter: fan-in follows the divide's order


class EngDivert(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(kind_of).divert(to={True: on_true, "None": on_none, 3: on_three,
                                    "otherwise": fallback}).converge(into=tagged)


class EngNested(ductwork.Pipeline):
    """expand -> expand -> collapse -> collapse"""
    @staticmethod
    def define(p):
        p.start(Split).expand(to=ident).expand(to=double).collapse(into=total).collapse(into=ident)


class EngDivideInExpand(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(to_list).expand(to=ident).divide(to=[add_one, double]).combine(into=total).collapse(into=ident)


class EngExpandInBranch(ductwork.Pipeline):
    @staticmethod
    def define(p):
        a, b = p.start(ident).divide(to=[to_list, add_one])
        a.expand(to=double).collapse(into=total)
        b.chain(to=double)
        a.combine(b, into=ident)


class EngOpenEnd(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(to_list).expand(to=add_one)


class EngFlaky(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(counted).divide(to=[Flaky, add_one]).combine(into=ident)
        p.on_halt(lambda run, reasons: HALTS.append((run.id, reasons)))


class EngContext(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(SetsContext).chain(to=fn_sees_current)


class EngContextConflict(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(ConflictsContext)


class EngNotJson(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(not_json)


class EngSingle(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(ident)


@pytest.fixture(autouse=True)
def _reset():
    CALLS.clear()
    FLAGS.clear()
    HALTS.clear()
    Flaky.keys = []


def finished(run, timeout=20):
    status = run.wait(timeout)
    assert status != "in_progress", f"run {run.id} did not finish"
    return status


# -- transitions ----------------------------------------------------------------------------
def test_chain_passes_outputs_along(start_runtime):
    start_runtime(["EngChain"])
    run = EngChain.trigger(3, 4)
    assert finished(run) == "completed"
    assert run.output == 16
    assert [(s.name, s.input, s.output) for s in run.steps] == [
        ("Start", [3, 4], 7), ("add_one", 7, 8), ("double", 8, 16)]


def test_expand_collapse_keeps_element_order(start_runtime):
    start_runtime(["EngExpand", "EngExpandList"])
    run = EngExpand.trigger(5)
    listed = EngExpandList.trigger(4)
    assert finished(run) == "completed" and run.output == sum(2 * i + 1 for i in range(5))
    assert finished(listed) == "completed"
    assert listed.output == ["value:0", "value:1", "value:2", "value:3"]


def test_expand_of_empty_list_collapses_to_empty_list(start_runtime):
    start_runtime(["EngExpandList"])
    run = EngExpandList.trigger(0)
    assert finished(run) == "completed"
    assert run.output == []


def test_divide_combine_fluent_and_unpacked(start_runtime):
    start_runtime(["EngDivideFluent", "EngDivideUnpacked"])
    fluent = EngDivideFluent.trigger(5)
    unpacked = EngDivideUnpacked.trigger(5)
    assert finished(fluent) == "completed" and fluent.output == [6, 10]
    assert finished(unpacked) == "completed" and unpacked.output == {"first": "value:6", "second": 10}


@pytest.mark.parametrize("value,expected", [
    (True, {"chosen": "was-true"}),
    (None, {"chosen": "was-none"}),
    (3, {"chosen": "was-three"}),
    ("zzz", {"chosen": "other:zzz"}),
    (3.5, {"chosen": "other:3.5"}),
])
def test_divert_converge_chooses_by_str_of_output(start_runtime, value, expected):
    start_runtime(["EngDivert"])
    run = EngDivert.trigger(value)
    assert finished(run) == "completed"
    assert run.output == expected


def test_nested_expand_expand_collapse_collapse(start_runtime):
    start_runtime(["EngNested"])
    run = EngNested.trigger(3)  # [[0,1],[1,2],[2,3]] -> doubled and summed per inner list
    assert finished(run) == "completed"
    assert run.output == [2, 6, 10]


def test_divide_combine_inside_expand(start_runtime):
    start_runtime(["EngDivideInExpand"])
    run = EngDivideInExpand.trigger(3)
    assert finished(run) == "completed"
    assert run.output == [(i + 1) + 2 * i for i in range(3)]


def test_expand_inside_a_divided_branch(start_runtime):
    start_runtime(["EngExpandInBranch"])
    run = EngExpandInBranch.trigger(4)
    assert finished(run) == "completed"
    assert run.output == [sum(2 * i for i in range(4)), (4 + 1) * 2]


def test_open_fan_out_at_the_end_is_the_run_output(start_runtime):
    start_runtime(["EngOpenEnd"])
    run = EngOpenEnd.trigger(3)
    assert finished(run) == "completed"
    assert run.output == [1, 2, 3]


# -- failures, retries, crashes --------------------------------------------------------------
def test_retries_then_halt_and_on_halt_once(start_runtime):
    start_runtime(["EngFlaky"], job_worker={"max_retry": 2, "retry_delay": 0, "polling_timeout": 0.05})
    run = EngFlaky.trigger(1)
    assert finished(run) == "halted"
    assert run.halt_reasons == ["job_retries_exhausted"]
    flaky = next(s for s in run.steps if s.name == "Flaky")
    assert flaky.status == "failed" and flaky.attempts == 3 and flaky.crashes == 0
    assert "RuntimeError: boom on attempt 3" in flaky.error
    assert CALLS["flaky"] == 3
    assert len(set(Flaky.keys)) == 1  # the idempotency key is stable across retries
    other = next(s for s in run.steps if s.name == "add_one")
    assert other.status == "succeeded"  # the sibling branch ran to its end
    deadline = threading.Event()
    for _ in range(50):
        if HALTS:
            break
        deadline.wait(0.05)
    assert HALTS == [(run.id, ["job_retries_exhausted"])]


def test_revive_reruns_only_what_failed(start_runtime):
    start_runtime(["EngFlaky"], job_worker={"max_retry": 0, "retry_delay": 0, "polling_timeout": 0.05})
    run = EngFlaky.trigger(2)
    assert finished(run) == "halted"
    assert CALLS["counted"] == 1
    FLAGS["flaky-ok"] = True
    assert run.revive() is True
    assert finished(run) == "completed"
    assert run.output == [20, 3]
    assert CALLS["counted"] == 1  # completed work is kept, not re-run
    assert run.revive() is False  # only halted runs revive


def test_crash_rerun_does_not_consume_retries(engine, start_runtime):
    run = EngSingle.trigger("x")
    claims = engine.claim_steps("EngSingle", process_id=999_001)
    assert [c.step_id for c in claims] == [run.steps[0].id]
    assert engine.hand_back(999_001, why="test crash") == 1
    step = run.steps[0]
    assert (step.status, step.crashes, step.attempts) == ("queued", 1, 0)
    start_runtime(["EngSingle"], job_worker={"max_retry": 0, "polling_timeout": 0.05})
    assert finished(run) == "completed"
    step = run.steps[0]
    assert (step.attempts, step.crashes) == (1, 1)


def test_crash_budget_exhausted_halts(engine, start_runtime):
    config = ductwork.load_config(data={"job_worker": {"max_crash": 1}}, overrides={"database_url": engine.store.url})
    eng = ductwork.Engine(engine.store, config)
    run = EngSingle.trigger("x")
    for fake_process in (999_101, 999_102):
        assert len(eng.claim_steps("EngSingle", fake_process)) == 1
        eng.hand_back(fake_process)
    step = run.steps[0]
    assert (step.status, step.crashes, step.halt_reason) == ("failed", 2, "job_crashes_exhausted")
    start_runtime(["EngSingle"])
    assert finished(run) == "halted"
    assert run.halt_reasons == ["job_crashes_exhausted"]


def test_non_json_output_fails_the_attempt_with_a_clear_error(start_runtime):
    start_runtime(["EngNotJson"], job_worker={"max_retry": 0, "polling_timeout": 0.05})
    run = EngNotJson.trigger(1)
    assert finished(run) == "halted"
    assert "step not_json returned a non-JSON value of type set" in run.steps[0].error


def test_context_write_once_and_overwrite(start_runtime):
    start_runtime(["EngContext", "EngContextConflict"], job_worker={"max_retry": 0, "polling_timeout": 0.05})
    run = EngContext.trigger(1)
    assert finished(run) == "completed"
    assert run.context == {"source": "crm", "count": 2}
    assert run.output["run"] == run.id and run.output["attempt"] == 1
    assert run.output["key"] == f"EngContext:{run.id}:{run.steps[1].id}"
    bad = EngContextConflict.trigger(1)
    assert finished(bad) == "halted"
    assert "ContextError" in bad.steps[0].error and "'k'" in bad.steps[0].error
    assert bad.context == {"k": 1}


def test_max_fanout_and_invalid_transition_halt(engine, start_runtime):
    start_runtime(["EngExpandList", "EngDivideInExpand"],
                  pipeline_advancer={"steps": {"max_depth": {"EngExpandList": 2}}})
    wide = EngExpandList.trigger(3)
    ok = EngDivideInExpand.trigger(2)
    assert finished(wide) == "halted" and wide.halt_reasons == ["max_fanout_exceeded"]
    assert finished(ok) == "completed"


class EngNotAList(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(ident).expand(to=ident)


def test_expand_of_non_list_is_transition_invalid(start_runtime):
    start_runtime(["EngNotAList"])
    run = EngNotAList.trigger({"a": 1})
    assert finished(run) == "halted"
    assert run.halt_reasons == ["transition_invalid"]


def test_step_removed_by_a_deploy_halts_with_definition_changed(engine, start_runtime):
    run = EngChain.trigger(1, 1)
    removed = EngChain.steps.pop("double")
    try:
        start_runtime(["EngChain"])
        assert finished(run) == "halted"
        assert run.halt_reasons == ["definition_changed"]
        assert [s.name for s in run.steps] == ["Start", "add_one"]
    finally:
        EngChain.steps["double"] = removed


# -- claims and fencing ----------------------------------------------------------------------
def test_zombie_commit_is_rejected(engine):
    run = EngSingle.trigger(5)
    [zombie] = engine.claim_steps("EngSingle", process_id=777_001)
    engine.hand_back(777_001, why="reaped")            # the zombie's process lost its claim
    [live] = engine.claim_steps("EngSingle", process_id=777_002)
    assert live.step_id == zombie.step_id
    assert engine.commit_success(zombie, '"zombie"') is False
    assert engine.commit_success(live, '"live"') is True
    assert engine.commit_success(live, '"again"') is False  # never committed twice
    step = run.steps[0]
    assert (step.status, step.output, step.attempts, step.crashes) == ("succeeded", "live", 1, 1)
    with engine.store.tx(write=False) as t:
        outcomes = t.all("SELECT outcome FROM ductwork_executions WHERE step_id = ? ORDER BY id", (step.id,))
    assert [o for (o,) in outcomes] == ["crashed", "succeeded"]


def test_advancement_with_a_lost_branch_claim_is_rejected(engine):
    engine.inline = False  # leave the advancement to an advancer claim, which is what this test fences
    run = EngChain.trigger(1, 2)
    [c] = engine.claim_steps("EngChain", 555_001)
    assert engine.commit_success(c, "3")
    [b] = engine.claim_branches("EngChain", 555_002)
    engine.hand_back(555_002)  # its advancer died: the branch claim is released
    [b2] = engine.claim_branches("EngChain", 555_003)
    with pytest.raises(ductwork._Rejected):
        engine.advance(b)
    engine.advance(b2)
    assert [s.name for s in run.steps] == ["Start", "add_one"]  # exactly one next step


def test_concurrent_claimers_never_share_a_step(engine):
    runs = [EngSingle.trigger(i) for i in range(60)]
    claimed: list[int] = []
    lock = threading.Lock()

    def claimer(n):
        store = ductwork.Store(engine.store.url)
        eng = ductwork.Engine(store, engine.config)
        while True:
            got = eng.claim_steps("EngSingle", 10_000 + n, 3)
            if not got:
                break
            for c in got:
                assert eng.commit_success(c, c.input)
            with lock:
                claimed.extend(c.step_id for c in got)
        store.close()

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(claimed) == sorted(r.steps[0].id for r in runs)
    assert len(claimed) == len(set(claimed)) == 60


def _claim_in_child(url, conn, n):
    store = ductwork.Store(url)
    eng = ductwork.Engine(store, ductwork.load_config(data={}, overrides={"database_url": url}))
    ids = []
    while True:
        got = eng.claim_steps("EngSingle", 20_000 + n, 2)
        if not got:
            break
        for c in got:
            if eng.commit_success(c, c.input):
                ids.append(c.step_id)
    conn.send(ids)
    conn.close()


def test_concurrent_claiming_processes_never_share_a_step(engine):
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    runs = [EngSingle.trigger(i) for i in range(40)]
    engine.store.close()
    pipes, procs = [], []
    for n in range(3):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_claim_in_child, args=(engine.store.url, child, n))
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    committed = [i for p in pipes for i in p.recv()]
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    assert sorted(committed) == sorted(r.steps[0].id for r in runs)


def test_reaping_a_stale_process_hands_back_its_work(engine):
    run = EngSingle.trigger(1)
    with engine.store.tx() as t:
        row = t.one(ductwork.SQL.register_process, _process(4242, "elsewhere", "EngSingle"))[0]
        t.run("UPDATE ductwork_processes SET last_heartbeat_at = last_heartbeat_at - 1000 WHERE id = ?", (row,))
    [c] = engine.claim_steps("EngSingle", row)
    assert engine.reap(row, 60) is True
    assert engine.reap(row, 60) is False  # idempotent
    step = run.steps[0]
    assert (step.status, step.crashes, step.attempts) == ("queued", 1, 0)
    assert engine.commit_success(c, '"late"') is False


def _process(pid, machine, pipelines):
    """SQL.register_process's parameters for a worker row."""
    return {"pid": pid, "machine": machine, "role": "worker", "pipelines": pipelines, "parent_id": None,
            "state": "running", "restarts": 0, "info": "{}"}


def _register(engine, pid=4343):
    with engine.store.tx() as t:
        return t.one(ductwork.SQL.register_process, _process(pid, "here", "[]"))[0]


def test_fenced_claims_need_the_claimers_live_process_row(engine):
    """The liveness fence is part of each claim statement: steps, branches and the claim that
    rides on a commit all come back empty for a claimer whose row is gone."""
    engine.fence_claims = True
    engine.inline = False
    run = EngChain.trigger(1, 2)
    assert engine.claim_steps("EngChain", 919_191) == []          # no such process row
    row = _register(engine)
    [c] = engine.claim_steps("EngChain", row)
    assert engine.commit_success(c, "3")
    assert engine.claim_branches("EngChain", 919_191) == []
    [b] = engine.claim_branches("EngChain", row)
    engine.advance(b)
    [c2] = engine.claim_steps("EngChain", row)
    EngSingle.trigger(7)
    with engine.store.tx() as t:
        t.run(ductwork.SQL.delete_process, {"id": row})             # reaped while it ran c2
    hints: list[tuple[str, str]] = []
    engine.store.notify_hook = lambda channel, payload: hints.append((channel, payload))
    engine.inline = True                                           # this commit queues the next step itself
    done = engine.commit([ductwork.StepResult(c2, True, "4")], claim_limit=5)
    assert done.accepted == [True] and done.claims == []           # its result counts, no new claims
    assert (ductwork.CH_JOBS, "EngChain") in hints                 # so the step it queued needs someone else
    assert [s.status for s in run.steps] == ["succeeded", "succeeded", "queued"]


def test_wake_up_hint_is_dropped_only_when_the_commit_claims_every_step_it_queued(engine):
    hints: list[tuple[str, str]] = []
    engine.store.notify_hook = lambda channel, payload: hints.append((channel, payload))
    EngChain.trigger(1, 2)
    [c] = engine.claim_steps("EngChain", 31_001)
    hints.clear()
    done = engine.commit([ductwork.StepResult(c, True, "3")], claim_limit=4)
    assert [x.name for x in done.claims] == ["add_one"] and hints == []   # it took its own next step
    done = engine.commit([ductwork.StepResult(done.claims[0], True, "4")], claim_limit=0)
    assert hints == [(ductwork.CH_JOBS, "EngChain")]                       # claimed nothing: others are woken
    hints.clear()
    run = EngExpand.trigger(3)
    [c] = engine.claim_steps("EngExpand", 31_001)
    hints.clear()
    done = engine.commit([ductwork.StepResult(c, True, "[0, 1, 2]")], claim_limit=2)
    assert len(done.claims) == 2 and hints == [(ductwork.CH_JOBS, "EngExpand")]  # one child is left for others
    assert len(run.steps) == 4


# -- plans: a batch's statements find their rows by index, whatever the size of the tables ---------
def test_batch_statements_use_indexes_on_big_tables(engine):
    """Postgres guesses 100 rows for a JSON row source; without the id condition it chose a
    sequential scan of the whole table for every batch (cost growing with the table)."""
    B, dialect = ductwork.BulkSQL, engine.store.dialect
    with engine.store.tx(kind=ductwork._EngineTx) as t:
        for table, columns, values in (
                ("ductwork_runs", "pipeline, definition, status, input, created_at, updated_at",
                 "'P', 'd', 'in_progress', '[]', 0, 0"),
                ("ductwork_branches",
                 "run_id, pipeline, definition, node, status, available_at, created_at, updated_at",
                 "1, 'P', 'd', 0, 'running', 0, 0, 0"),
                ("ductwork_steps", "run_id, branch_id, pipeline, node, name, status, input, available_at, created_at",
                 "1, 1, 'P', 0, 's', 'succeeded', '[]', 0, 0")):
            t.run(f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000) "
                  f"INSERT INTO {table} ({columns}) SELECT {values} FROM n")
        t.run("ANALYZE")
        batch = range(5000, 5016)
        plans = {
            "steps_succeeded": (B.steps_succeeded(dialect),
                                {**t.keyed(B.STEP, [(i, "1") for i in batch]), "process_id": 1, "token": "x",
                                 **({"lock_ids": t.ids(batch), "lock_class": 1} if dialect == "postgres" else {})}),
            **({"steps_succeeded_logged": (B.steps_succeeded(dialect),
                                           {**t.keyed(B.STEP_RAN, [(i, "1", 0.001) for i in batch]), "process_id": 1,
                                            "token": "x", "lock_ids": t.ids(batch), "lock_class": 1})}
               if dialect == "postgres" else {}),
            "lock_branches": (B.lock_branches(dialect), {"ids": t.ids(batch)}),
            "apply_branches": (B.apply_branches(dialect),
                               t.keyed(B.BRANCH, [(i, "running", "", "completed", 0, 0, 0, "1", None) for i in batch])),
            "runs_completed": (B.runs_completed(dialect), t.keyed(B.STEP, [(i, "1") for i in batch])),
        }
        for name, (sql, params) in plans.items():
            explain = "EXPLAIN " if dialect == "postgres" else "EXPLAIN QUERY PLAN "
            plan = " | ".join(str(row[-1]) for row in t.all(explain + sql, params))
            assert "Seq Scan on ductwork_" not in plan and "SCAN ductwork_" not in plan, f"{name}: {plan}"


def test_periodic_queries_read_index_ranges_not_the_rows_that_wait(engine):
    """What every process asks every poll or heartbeat (claims, lost claims) and what status asks, on tables full
    of steps asleep and branches parked for a signal: an index range each, never a scan of the waiting rows (a
    claim that filtered available_at row by row read all of them at every idle poll; the lost-claims look at
    'cancelling' steps scanned the whole steps table on SQLite)."""
    dialect = engine.store.dialect
    with engine.store.tx(kind=ductwork._EngineTx) as t:
        for table, columns, values in (   # finished rows, the many, and 1 in 5 waiting: asleep, parked, to start
                ("ductwork_steps", "run_id, branch_id, pipeline, node, name, status, input, available_at, created_at",
                 "i, i, 'P', 1, 's', CASE WHEN i % 5 = 0 THEN 'queued' ELSE 'succeeded' END, '[]', 4000000000, 0"),
                ("ductwork_branches", "run_id, pipeline, definition, node, status, available_at, created_at, "
                 "updated_at, waiting_for", "i, 'P', 'd', 0, CASE WHEN i % 5 = 0 THEN 'advance' ELSE 'completed' "
                 "END, 4000000000, 0, 0, CASE WHEN i % 5 = 0 THEN 'go' END"),
                ("ductwork_runs", "pipeline, definition, status, input, created_at, updated_at, scheduled_at",
                 "'P', 'd', CASE WHEN i % 5 = 0 THEN 'in_progress' ELSE 'completed' END, '[]', 0, 0, "
                 "CASE WHEN i % 5 = 0 THEN 4000000000 END")):
            t.run(f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000) "
                  f"INSERT INTO {table} ({columns}) SELECT {values} FROM n")
        # ... and a claimable backlog in three priorities, and steps waiting for a slot
        t.run("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 6000) "
              "INSERT INTO ductwork_steps (run_id, branch_id, pipeline, node, name, status, input, priority, "
              "concurrency_key, available_at, created_at) SELECT i, i, 'P', 1, 's', CASE WHEN i % 3 = 0 "
              "THEN 'blocked' ELSE 'queued' END, '[]', i % 3 - 1, CASE WHEN i % 3 = 0 THEN 'k' END, 1, 0 FROM n")
        t.run("ANALYZE")
        mine = {"process_id": 1, "grace": 60}
        claim = {"process_id": 1, "token": "x", "pipeline": "P", "limit": 8}
        lowest = {"pipeline": "P", "lowest": ductwork.PRIORITY_RANGE[0]}
        slot = {"pipeline": "P", "name": "s", "key": "k"}
        fenced = ductwork.SQL.fenced
        highest, cached = {"below": ductwork.PRIORITY_RANGE[1]}, {"below": 0}   # (below: where it looks first)
        plans = {"claim_steps": (fenced(ductwork.SQL.claim_steps, True), {**claim, **lowest, **highest}),
                 "claim_steps_cached": (fenced(ductwork.SQL.claim_steps, True), {**claim, **lowest, **cached}),
                 "claim_keyed": (fenced(ductwork.SQL.claim_keyed(False, dialect), True),
                                 {**claim, **lowest, **highest, "statics": '["s"]'}),
                 "next_priority": (ductwork.SQL.next_priority, lowest),
                 "slots_held": (ductwork.SQL.slots_held, {**slot, "token": "x"}),
                 "unblock_steps": (ductwork.SQL.unblock_steps, {**slot, "limit": 1}),
                 "claim_branches": (fenced(ductwork.SQL.claim_branches, True), claim),
                 "orphaned_steps": (ductwork.SQL.orphaned_steps, mine),
                 "orphaned_branches": (ductwork.SQL.orphaned_branches, mine),
                 "sleeping_steps": (ductwork.SQL.sleeping_steps, {"pipeline": "P", "priority": 0}),
                 "blocked_keys": (ductwork.SQL.blocked_keys, {"pipeline": "P"}),
                 "held_keys": (ductwork.SQL.held_keys, {"pipeline": "P"}),
                 "parked_list": (ductwork.SQL.parked_list, {"limit": 10}),
                 "scheduled_runs": (ductwork.SQL.scheduled_runs, {})}
        explain = "EXPLAIN " if dialect == "postgres" else "EXPLAIN QUERY PLAN "
        for name, (sql, params) in plans.items():
            lines = [str(row[-1]) for row in t.all(explain + sql, params)]
            plan = " | ".join(lines)
            scans = [line for line in lines   # whole tables (the live processes aside: a handful of rows, the fence's)
                     if ("Seq Scan on ductwork_" in line or ("SCAN ductwork_" in line and "USING" not in line))
                     and "ductwork_processes" not in line]
            assert not scans, f"{name}: {plan}"
            assert not any("Filter:" in line and "available_at" in line for line in lines), f"{name}: {plan}"


# -- executions record when a step ran -----------------------------------------------------------
def test_an_execution_records_when_its_step_started_not_when_it_was_claimed(engine):
    """A batch's later steps start well after their claim: their execution rows said the claim time."""
    runs = [EngSingle.trigger(i) for i in range(2)]
    first, second = engine.claim_steps("EngSingle", 777, 2)
    first.mark_started()
    threading.Event().wait(0.05)                    # the second waits behind the first in its batch
    second.mark_started()
    done = engine.commit([ductwork.StepResult(first, True, "1"), ductwork.StepResult(second, True, "2")])
    assert done.accepted == [True, True]
    with engine.store.tx(write=False) as t:
        rows = t.all("SELECT s.run_id, s.claimed_at, e.started_at, e.finished_at FROM ductwork_executions e "
                     "JOIN ductwork_steps s ON s.id = e.step_id ORDER BY s.run_id")
    assert [r[0] for r in rows] == [run.id for run in runs]
    assert all(claimed <= started <= finished for _, claimed, started, finished in rows), rows
    # 50 ms apart, less SQLite's millisecond clock
    assert rows[1][2] - rows[0][2] >= 0.05 - 0.002, rows


def test_execution_rows_say_step_run_pipeline_process_attempt_and_outcome(engine):
    """Each committed attempt is one execution row (on Postgres a success's row is written by the statement that
    marks its step succeeded): what it ran, for whom, which attempt, how it ended."""
    run = EngSingle.trigger(1)
    [c] = engine.claim_steps("EngSingle", 4100, 1)
    c.mark_started()
    assert engine.commit([ductwork.StepResult(c, False, "boom", delay=0)]).accepted == [True]
    [again] = engine.claim_steps("EngSingle", 4200, 1)
    again.mark_started()
    assert engine.commit([ductwork.StepResult(again, True, "2")]).accepted == [True]
    lost = EngSingle.trigger(2)
    [stale] = engine.claim_steps("EngSingle", 4300, 1)
    with engine.store.tx() as t:   # (its claim lost: no execution row for its result)
        t.run("UPDATE ductwork_steps SET claim_token = 'other' WHERE id = ?", (stale.step_id,))
    stale.mark_started()
    assert engine.commit([ductwork.StepResult(stale, True, "3")]).accepted == [False]
    with engine.store.tx(write=False) as t:
        rows = t.all("SELECT step_id, run_id, pipeline, process_id, attempt, outcome, error, started_at, finished_at "
                     "FROM ductwork_executions ORDER BY id")
    assert [tuple(row[:7]) for row in rows] == [(c.step_id, run.id, "EngSingle", 4100, 1, "failed", "boom"),
                                                (c.step_id, run.id, "EngSingle", 4200, 2, "succeeded", None)]
    assert all(claim.claimed_at <= row[7] <= row[8] for claim, row in zip((c, again), rows, strict=True)), rows
    assert lost.refresh().status == "in_progress"


def test_run_list_newest_first_by_pipeline_and_status(engine, start_runtime):
    done = [EngChain.trigger(n, 1) for n in range(3)]
    start_runtime(["EngChain"])
    assert [finished(run) for run in done] == ["completed"] * 3
    waiting = [EngExpand.trigger(2) for _ in range(2)]   # nobody serves EngExpand here: in progress
    every = ductwork.Run.list()
    assert [r.id for r in every] == sorted((r.id for r in done + waiting), reverse=True)
    assert {r.id: (r.pipeline, r.status) for r in every} == {
        **{r.id: ("EngChain", "completed") for r in done}, **{r.id: ("EngExpand", "in_progress") for r in waiting}}
    assert [r.output for r in ductwork.Run.list(pipeline="EngChain")] == [4 * 2, 3 * 2, 2 * 2]
    assert [r.id for r in ductwork.Run.list(status="in_progress")] == [waiting[1].id, waiting[0].id]
    assert [r.id for r in ductwork.Run.list(pipeline="EngChain", status="in_progress")] == []
    assert [r.id for r in ductwork.Run.list(limit=2)] == [waiting[1].id, waiting[0].id]
    assert ductwork.Run.list(pipeline="NoSuchPipeline") == []
    for bad in ({"status": "done"}, {"limit": 0}, {"limit": True}, {"limit": 10**6}):
        with pytest.raises(ductwork.DuctworkError):
            ductwork.Run.list(**bad)
    missing = max(r.id for r in every) + 1000
    with pytest.raises(ductwork.DuctworkError, match=f"run {missing} not found"):
        ductwork.Run.get(missing)

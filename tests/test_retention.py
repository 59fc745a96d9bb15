"""Data lifecycle (SPEC §18): counters kept by triggers, retention and pruning, the prune command, and
migration 2 on a database in use. Real SQLite and Postgres (and through PgBouncer), real subprocesses."""
from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest
import yaml
from conftest import DB_VARIANTS, POOLER_VARIANTS, ROOT, concurrent_migrates, run_cli
from procs import Proc, wait_until

import ductwork

# The pruning and counting statements also run through a real PgBouncer (one test); the rest on SQLite and Postgres.
EVERY_DATABASE = pytest.mark.parametrize("db_url", DB_VARIANTS + POOLER_VARIANTS, indirect=True)

FLAGS: dict[str, bool] = {}


def passes(x):
    return x + 1


def pieces(n):
    return list(range(n))


def total(values):
    return sum(values)


def fails_until_allowed(x):
    if not FLAGS.get("allowed"):
        raise RuntimeError("not yet")
    return x


class RetChain(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(passes).chain(to=passes)


class RetFan(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(pieces).expand(to=passes).collapse(into=total)


class RetIdle(ductwork.Pipeline):   # no test serves it: its runs stay in progress
    @staticmethod
    def define(p):
        p.start(passes)


class RetHalts(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(passes).chain(to=fails_until_allowed)


@pytest.fixture(autouse=True)
def _reset():
    FLAGS.clear()


def finished(run, timeout=20):
    status = run.wait(timeout)
    assert status != "in_progress", f"run {run.id} did not finish"
    return status


def rows_by(t, sql):
    return {tuple(row[:-1]): int(row[-1]) for row in t.all(sql)}


def counted(engine) -> ductwork.Counts:
    with engine.store.tx(write=False) as t:
        return ductwork.Counts.read(t)


def assert_counters_match_rows(engine, pruned_before=None):
    """The counters agree with a count of the rows themselves (the slow way they replace)."""
    with engine.store.tx(write=False) as t:
        runs = rows_by(t, "SELECT pipeline, status, count(*) FROM ductwork_runs GROUP BY pipeline, status")
        executed = rows_by(t, "SELECT s.pipeline, e.outcome, count(*) FROM ductwork_executions e "
                              "JOIN ductwork_steps s ON s.id = e.step_id GROUP BY s.pipeline, e.outcome")
    counts = counted(engine)
    assert {k: v for k, v in counts.runs.items() if v} == runs
    if pruned_before is None:   # nothing pruned: every execution is still there to count
        assert counts.executed == executed
    return counts


def age_runs(engine, ids, seconds):
    """Make runs look finished ``seconds`` ago on the database clock."""
    with engine.store.tx() as t:
        for run_id in ids:
            t.run("UPDATE ductwork_runs SET finished_at = finished_at - :s WHERE id = :id",
                  {"s": seconds, "id": run_id})


def rows_of(engine, run_id):
    """How many rows each table holds for a run."""
    with engine.store.tx(write=False) as t:
        return {
            "runs": t.one("SELECT count(*) FROM ductwork_runs WHERE id = :id", {"id": run_id})[0],
            "branches": t.one("SELECT count(*) FROM ductwork_branches WHERE run_id = :id", {"id": run_id})[0],
            "steps": t.one("SELECT count(*) FROM ductwork_steps WHERE run_id = :id", {"id": run_id})[0],
            "executions": t.one("SELECT count(*) FROM ductwork_executions WHERE run_id = :id", {"id": run_id})[0],
            "context": t.one("SELECT count(*) FROM ductwork_context WHERE run_id = :id", {"id": run_id})[0],
        }


# -- counters ---------------------------------------------------------------------------------------------


def counter_samples(text: str) -> dict[str, float]:
    """Every sample of a Prometheus counter family in ``text`` (/metrics), by its line's name and labels."""
    counters = set(re.findall(r"^# TYPE (\S+) counter$", text, re.M))
    return {key: float(value) for key, value in re.findall(r"^(\S+\{.*\}) (\S+)$", text, re.M)
            if key.partition("{")[0] in counters}


@pytest.mark.parametrize("db_url", DB_VARIANTS, indirect=True)
def test_counters_never_go_down_across_revive_and_prune(engine, start_runtime):
    """Issue 20: a counter that went down read as a reset (increase() made 6.38 halts of 5). Halt, revive, halt
    again, revive to completion, cancel, revive, prune everything: no counter sample ever goes down, and the
    finished counts are the events (two halts, one cancel, one completion), whatever was pruned or revived."""
    start_runtime(["RetHalts", "RetIdle"], job_worker={"max_retry": 0, "retry_delay": 0})
    snapshots = []

    def snapshot() -> dict[str, float]:
        samples = counter_samples(ductwork.dashboard_metrics(engine))
        for before in snapshots:
            went_down = {k: (before[k], v) for k, v in samples.items() if k in before and v < before[k]}
            assert not went_down, went_down
        assert all(k in samples for k in (snapshots[-1] if snapshots else ())), "a counter series vanished"
        snapshots.append(samples)
        return samples

    def finished_total(samples, status):
        return samples[f'ductwork_runs_finished_total{{pipeline="RetHalts",status="{status}"}}']

    run = RetHalts.trigger(1)
    assert finished(run) == "halted"
    assert finished_total(snapshot(), "halted") == 1
    assert run.revive() and finished(run) == "halted"            # the same run halts a second time
    assert finished_total(snapshot(), "halted") == 2
    FLAGS["allowed"] = True
    assert run.revive() and finished(run) == "completed"
    samples = snapshot()
    assert (finished_total(samples, "halted"), finished_total(samples, "completed")) == (2, 1)
    idle = RetIdle.trigger(1)   # (RetIdle is served here: it completes; a cancelled one of RetHalts is below)
    assert finished(idle) == "completed"
    other = RetHalts.trigger(1)
    FLAGS["allowed"] = False
    assert finished(other) == "halted"
    assert other.cancel() is False   # (a halted run is finished: cancel leaves it)
    unserved = RetChain.trigger(1)   # not served here: cancelled, revived (in progress again), cancelled again
    assert unserved.cancel() is True
    assert snapshot()['ductwork_runs_finished_total{pipeline="RetChain",status="cancelled"}'] == 1
    assert unserved.revive() is True and ductwork.Run.get(unserved.id).status == "in_progress"
    assert snapshot()['ductwork_runs_finished_total{pipeline="RetChain",status="cancelled"}'] == 1
    assert unserved.cancel() is True
    assert snapshot()['ductwork_runs_finished_total{pipeline="RetChain",status="cancelled"}'] == 2
    with engine.store.tx(write=False) as t:
        reopened = rows_by(t, "SELECT pipeline, label, value FROM ductwork_tallies WHERE name = 'reopened' "
                              "AND pipeline IN ('RetHalts', 'RetChain')")
    assert reopened == {("RetHalts", "halted"): 2, ("RetChain", "cancelled"): 1}
    age_runs(engine, [run.id, other.id, idle.id], 100)
    assert engine.prune({"completed": 50, "halted": 50}) == {("RetHalts", "completed"): 1,
                                                               ("RetHalts", "halted"): 1, ("RetIdle", "completed"): 1}
    samples = snapshot()
    assert (finished_total(samples, "halted"), finished_total(samples, "completed")) == (3, 1)
    assert samples['ductwork_runs_triggered_total{pipeline="RetHalts"}'] == 2
    assert samples['ductwork_runs_pruned_total{pipeline="RetHalts",status="halted"}'] == 1
    assert engine.roll_up() is True
    assert snapshot() == samples   # rolled up: the same numbers, read another way


@EVERY_DATABASE
def test_counters_follow_every_transition_and_survive_pruning(engine, start_runtime):
    start_runtime(["RetChain", "RetFan", "RetHalts"], job_worker={"max_retry": 1, "retry_delay": 0})
    chains = [RetChain.trigger(i) for i in range(3)]
    fan = RetFan.trigger(4)
    halts = RetHalts.trigger(1)
    assert [finished(r) for r in chains] == ["completed"] * 3 and finished(fan) == "completed"
    assert finished(halts) == "halted"
    counts = assert_counters_match_rows(engine)
    assert counts.runs[("RetHalts", "halted")] == 1
    assert counts.executed[("RetHalts", "failed")] == 2 and counts.executed[("RetChain", "succeeded")] == 6

    FLAGS["allowed"] = True
    assert halts.revive() is True           # halted -> in_progress -> completed: moved twice
    assert finished(halts) == "completed"
    counts = assert_counters_match_rows(engine)
    assert ("RetHalts", "halted") not in counts.runs and counts.runs[("RetHalts", "completed")] == 1
    assert engine.roll_up() is True                # the totals rolled up: the same counts, read another way
    assert counted(engine) == counts
    with engine.store.tx(write=False) as t:
        assert t.one("SELECT count(*) FROM ductwork_counters WHERE name IN ('triggered', 'executed')")[0] == 7

    metrics_before = ductwork.dashboard_metrics(engine)
    age_runs(engine, [r.id for r in chains], 100)
    pruned = engine.prune({"completed": 50})
    assert pruned == {("RetChain", "completed"): 3}
    counts = assert_counters_match_rows(engine, pruned_before=True)
    assert counts.pruned == {("RetChain", "completed"): 3}
    assert counts.executed[("RetChain", "succeeded")] == 6     # a total: pruning does not lower it
    metrics = ductwork.dashboard_metrics(engine)
    for line in ('ductwork_runs_finished_total{pipeline="RetChain",status="completed"} 3',
                 'ductwork_runs{pipeline="RetChain",status="completed"} 0',
                 'ductwork_runs_triggered_total{pipeline="RetChain"} 3',
                 'ductwork_runs_pruned_total{pipeline="RetChain",status="completed"} 3',
                 'ductwork_runs_pruned_total{pipeline="RetFan",status="completed"} 0',
                 'ductwork_steps_executed_total{pipeline="RetChain",outcome="succeeded"} 6'):
        assert line in metrics
    assert 'ductwork_runs_pruned_total{pipeline="RetChain",status="completed"} 0' in metrics_before
    report = ductwork.status_report(engine)
    assert "RetChain" not in report["runs"] and report["runs"]["RetFan"] == {"completed": 1}


def test_counters_count_rows_written_by_hand_or_by_an_older_version(engine):
    """Triggers, not the engine, keep the counters: a write that bypasses the engine is counted too."""
    run = RetChain.trigger(1)
    with engine.store.tx() as t:
        t.run("UPDATE ductwork_runs SET status = 'halted', finished_at = 0 WHERE id = :id", {"id": run.id})
        step_id = t.one("SELECT id FROM ductwork_steps WHERE run_id = :id", {"id": run.id})[0]
        for attempt in (1, 2):   # as the version before writes them: no pipeline
            t.run("INSERT INTO ductwork_executions (step_id, run_id, attempt, outcome, finished_at) "
                  "VALUES (:s, :r, :a, 'crashed', 0)", {"s": step_id, "r": run.id, "a": attempt})
        t.run("INSERT INTO ductwork_executions (step_id, run_id, pipeline, attempt, outcome, finished_at) "
              "VALUES (:s, :r, 'RetChain', 3, 'crashed', 0)", {"s": step_id, "r": run.id})
    counts = assert_counters_match_rows(engine)
    assert counts.runs[("RetChain", "halted")] == 1 and counts.executed == {("RetChain", "crashed"): 3}
    assert engine.roll_up() is True    # both kinds of row, one total
    assert counted(engine) == counts


# -- pruning ----------------------------------------------------------------------------------------------


def test_prune_deletes_old_finished_runs_with_every_row_and_nothing_else(engine, start_runtime):
    start_runtime(["RetChain", "RetFan", "RetHalts"], job_worker={"max_retry": 0, "retry_delay": 0})
    old_done, young_done, old_fan = RetChain.trigger(1), RetChain.trigger(2), RetFan.trigger(3)
    halted = RetHalts.trigger(1)
    for run in (old_done, young_done, old_fan):
        assert finished(run) == "completed"
    assert finished(halted) == "halted"
    engine.context_set(old_done.id, "note", "kept with its run", overwrite=False)
    stuck = RetIdle.trigger(9)   # in progress for ever: nobody serves it
    age_runs(engine, [old_done.id, old_fan.id, halted.id], 1000)
    with engine.store.tx() as t:   # ancient, but in progress: never pruned
        t.run("UPDATE ductwork_runs SET created_at = created_at - 100000, updated_at = updated_at - 100000 "
              "WHERE id = :id", {"id": stuck.id})
    assert rows_of(engine, old_done.id) == {"runs": 1, "branches": 1, "steps": 2, "executions": 2, "context": 1}
    assert rows_of(engine, old_fan.id)["branches"] == 4

    assert engine.prunable({"completed": 500, "halted": 2000}) == {("RetChain", "completed"): 1,
                                                                    ("RetFan", "completed"): 1}
    assert engine.prune({"completed": 500, "halted": 2000}) == {("RetChain", "completed"): 1,
                                                                 ("RetFan", "completed"): 1}
    for gone in (old_done, old_fan):
        assert rows_of(engine, gone.id) == dict.fromkeys(("runs", "branches", "steps", "executions", "context"), 0)
        with pytest.raises(ductwork.DuctworkError, match=rf"run {gone.id} not found"):
            ductwork.Run.get(gone.id)
    with pytest.raises(ductwork.DuctworkError, match=rf"run {old_done.id} not found"):   # no orphan context row
        engine.context_set(old_done.id, "late", 1, overwrite=True)
    assert rows_of(engine, old_done.id)["context"] == 0
    assert ductwork.Run.get(young_done.id).status == "completed"
    assert ductwork.Run.get(halted.id).status == "halted"     # halted: kept longer (2000 s here)
    assert ductwork.Run.get(stuck.id).status == "in_progress"
    assert {r.id for r in ductwork.Run.list()} == {young_done.id, halted.id, stuck.id}
    assert engine.prune({"completed": 500, "halted": 500}) == {("RetHalts", "halted"): 1}
    assert engine.prune({"completed": 500, "halted": 500}) == {}
    assert_counters_match_rows(engine, pruned_before=True)


@pytest.mark.parametrize("rows, batches", [(10_000, [3, 3, 1]),   # by runs
                                            (2, [2, 2, 2, 1]),      # cut at 2 steps (one each)
                                            (0, [1] * 7)])          # a run bigger than the bound still goes
def test_prune_goes_in_batches_until_nothing_is_left(engine, monkeypatch, rows, batches):
    runs = [RetChain.trigger(i) for i in range(7)]
    with engine.store.tx() as t:
        t.run("UPDATE ductwork_runs SET status = 'completed', finished_at = 0")
    monkeypatch.setattr(ductwork, "PRUNE_ROWS", rows)
    seen = []
    original = engine._prune_batch

    def spy(status, age, limit, wait):
        got = original(status, age, limit, wait)
        seen.append(sum(got[0].values()))
        return got
    engine._prune_batch = spy
    assert engine.prune({"completed": 10}, batch=3) == {("RetChain", "completed"): 7}
    assert seen == batches
    assert ductwork.Run.list() == [] and len(runs) == 7


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_a_batch_another_transaction_holds_is_skipped_never_waited_for_or_pruned_twice(db_url):
    pg_url = db_url
    ductwork.configure(database_url=pg_url)
    ductwork.migrate()
    engine = ductwork._app_engine()
    ids = [RetChain.trigger(i).id for i in range(6)]
    with engine.store.tx() as t:
        t.run("UPDATE ductwork_runs SET status = 'completed', finished_at = 0")
    holder = ductwork.Store(pg_url)
    with holder.tx() as t:   # another pruner's batch: the two oldest, row-locked until this block ends
        t.all("SELECT id FROM ductwork_runs WHERE id IN (:a, :b) FOR UPDATE", {"a": ids[0], "b": ids[1]})
        got: list = []
        pruner = threading.Thread(target=lambda: got.append(engine.prune({"completed": 10}, wait=True)), daemon=True)
        pruner.start()
        pruner.join(30)    # a pruner that waited for the held rows would still be waiting here
        assert got == [{("RetChain", "completed"): 4}]
    assert [r.id for r in ductwork.Run.list()] == [ids[1], ids[0]]
    holder.close()


@pytest.mark.parametrize("db_url", ["postgres", "pgbouncer"], indirect=True)
def test_concurrent_pruners_delete_each_run_once(db_url):
    pg_url = db_url
    ductwork.configure(database_url=pg_url)
    ductwork.migrate()
    engine = ductwork._app_engine()
    for i in range(60):
        RetChain.trigger(i)
    with engine.store.tx() as t:
        t.run("UPDATE ductwork_runs SET status = 'completed', finished_at = 0")
    totals: list = []
    errors: list = []

    def pruner(wait):
        store = ductwork.Store(pg_url)
        try:
            mine = ductwork.Engine(store, engine.config)
            for _ in range(20):
                got = mine.prune({"completed": 10}, wait=wait, batch=5)
                totals.append(got or collections.Counter())
        except Exception as exc:   # reported below
            errors.append(exc)
        finally:
            store.close()
    threads = [threading.Thread(target=pruner, args=(n % 2 == 0,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert sum(sum(c.values()) for c in totals) == 60
    assert counted(engine).pruned == {("RetChain", "completed"): 60}


def test_the_advancer_prunes_on_its_interval(engine, start_runtime):
    interval = 0.2
    start_runtime(["RetChain"], retention={"completed": 0}, pipeline_advancer={"prune_interval": interval})
    runs = [RetChain.trigger(i) for i in range(3)]
    # a run is pruned within one interval (jittered by up to 20 %) of finishing; a loaded machine adds slack
    wait_until(lambda: counted(engine).pruned.get(("RetChain", "completed")) == 3, timeout=10 + 3 * interval,
               what="three pruned runs")
    for run in runs:
        assert rows_of(engine, run.id)["steps"] == 0


# -- config and the prune command -------------------------------------------------------------------------


def test_retention_config_is_validated():
    assert ductwork.load_config(data={}).retention() == {"completed": 604800.0, "halted": 2592000.0,
                                                         "cancelled": 604800.0}
    assert ductwork.load_config(data={"retention": {"halted": -1}}).retention() == {"completed": 604800.0,
                                                                                    "cancelled": 604800.0}
    with pytest.raises(ductwork.ConfigError, match=r"retention.completed' must be >= 0 or -1, got -5"):
        ductwork.load_config(data={"retention": {"completed": -5}})
    with pytest.raises(ductwork.ConfigError, match=r"unknown config key 'retention.complete' "
                                                   r"\(did you mean 'retention.completed'\?\)"):
        ductwork.load_config(data={"retention": {"complete": 5}})
    with pytest.raises(ductwork.ConfigError, match=r"unknown config key 'retention.in_progress'"):
        ductwork.load_config(data={"retention": {"in_progress": 5}})


def test_prune_command_dry_run_then_prune_with_overrides(db_url, tmp_path):
    ductwork.configure(database_url=db_url)
    ductwork.migrate()
    engine = ductwork._app_engine()
    done = [RetChain.trigger(i) for i in range(3)]
    RetHalts.trigger(1)
    with engine.store.tx() as t:
        t.run("UPDATE ductwork_runs SET status = 'completed', finished_at = {now} - 100 WHERE pipeline = 'RetChain'")
        t.run("UPDATE ductwork_runs SET status = 'halted', finished_at = {now} - 100 WHERE pipeline = 'RetHalts'")
    config = tmp_path / "ductwork.yml"
    config.write_text(yaml.safe_dump({"database_url": db_url, "retention": {"completed": 50, "halted": -1}}))
    base = ["-c", str(config), "prune"]

    dry = run_cli(*base, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert re.match(r"would prune 3 runs \(RetChain completed 3\) from \S+ \(prunes completed after 50s, "
                    r"cancelled after 604800s\)$", dry.stdout.strip()), dry.stdout
    assert len(ductwork.Run.list()) == 4

    pruned = run_cli(*base, "--halted", "0", "--completed", "-1")
    assert pruned.returncode == 0, pruned.stderr
    assert pruned.stdout.startswith("pruned 1 run (RetHalts halted 1) from "), pruned.stdout
    assert [r.id for r in ductwork.Run.list()] == [r.id for r in reversed(done)]
    pruned = run_cli(*base)
    assert pruned.stdout.startswith("pruned 3 runs (RetChain completed 3)"), pruned.stdout
    assert ductwork.Run.list() == []

    bad = run_cli(*base, "--completed", "-2")
    assert bad.returncode == 2 and "argument --completed: must be seconds >= 0 or -1 (keep forever), got '-2'" \
        in bad.stderr and "Traceback" not in bad.stderr
    config.write_text(yaml.safe_dump({"database_url": db_url, "retention": {"done": 5}}))
    bad = run_cli(*base)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "ductwork: error: unknown config key 'retention.done'"), bad.stderr


# -- migration 2 on a database in use ----------------------------------------------------------------------

SCHEMA_1_REVISION = "a3cb1e3"   # the last commit whose ductwork.py creates schema 1 (before counters)


@pytest.fixture
def schema_1_ductwork(tmp_path):
    """ductwork.py as it was at schema 1, from this repository's history."""
    if not (ROOT / ".git").exists():
        if os.environ.get("CI") == "true":
            pytest.fail("the repository's history is needed for the schema-1 ductwork.py")
        pytest.skip("not a git checkout: no schema-1 ductwork.py to run")
    folder = tmp_path / "schema1"
    folder.mkdir()
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{SCHEMA_1_REVISION}:ductwork.py"], capture_output=True,
                          text=True, check=True).stdout
    assert "MIGRATIONS: list[tuple[int, list[str]]]" in text and "ductwork_counters" not in text
    (folder / "ductwork.py").write_text(text)
    return folder / "ductwork.py"


PRODUCER = """
import os, sys, threading
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import ductwork, sup_app
ductwork.configure(database_url=sys.argv[3])
n = 0
while n < 30 or not os.path.exists(sys.argv[4]):   # until told to stop (after the upgrade), 30 runs at least
    sup_app.SupMixed.trigger(3)
    n += 1
    threading.Event().wait(0.01)
print("triggered", n, flush=True)
"""


def test_migration_2_upgrades_a_populated_schema_1_database_under_a_running_schema_1_deployment(
        fresh_db_url, tmp_path, schema_1_ductwork):
    old = schema_1_ductwork
    migrated = subprocess.run([sys.executable, str(old), "--database-url", fresh_db_url, "migrate"],
                              capture_output=True, text=True, cwd=str(ROOT))
    assert migrated.returncode == 0 and "applied 1" in migrated.stdout, migrated.stderr
    deployment = Proc(tmp_path, fresh_db_url, name="old", script=old)
    try:
        deployment.wait_log(r"worker started")
        enough = tmp_path / "enough"
        producer = subprocess.Popen([sys.executable, "-c", PRODUCER, str(old.parent), str(ROOT / "tests" / "apps"),
                                     fresh_db_url, str(enough)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
        store = ductwork.Store(fresh_db_url)

        def completed():
            with store.tx(write=False) as t:
                return t.one("SELECT count(*) FROM ductwork_runs WHERE status = 'completed'")[0]
        wait_until(lambda: completed() >= 20, timeout=30, what="schema-1 runs completed before the upgrade")
        upgrade = run_cli("--database-url", fresh_db_url, "migrate")    # while the old deployment works
        assert upgrade.returncode == 0 and "applied 2" in upgrade.stdout, upgrade.stderr
        after_upgrade = completed()

        def triggered():
            with store.tx(write=False) as t:
                return t.one("SELECT count(*) FROM ductwork_runs")[0]
        at_upgrade = triggered()
        wait_until(lambda: triggered() >= at_upgrade + 10, timeout=30, what="runs triggered after the upgrade")
        enough.touch()
        out, err = producer.communicate(timeout=60)
        assert producer.returncode == 0 and out.startswith("triggered"), err
        total = int(out.split()[1])
        wait_until(lambda: completed() == total, timeout=60, what="every run completed")
        assert completed() > after_upgrade          # the old deployment kept working on schema 2
        with store.tx(write=False) as t:
            assert t.one("SELECT max(version) FROM ductwork_schema_migrations")[0] == ductwork.SCHEMA_VERSION
        engine = ductwork.Engine(store, ductwork.load_config(data={"database_url": fresh_db_url}))
        counts = assert_counters_match_rows(engine)
        assert counts.runs[("SupMixed", "completed")] == total
        assert counts.executed[("SupMixed", "succeeded")] == total * 8   # fan, 3 squares, sum, 2 divided, sum
        assert ductwork.run_doctor(engine.config)[1].text == f"version {ductwork.SCHEMA_VERSION} (current)"
        if store.dialect == "postgres":
            with store.tx(write=False) as t:
                assert t.all("SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                             "WHERE c.relname LIKE 'ductwork%' AND NOT i.indisvalid") == []
                names = {name for (name,) in t.all("SELECT indexname FROM pg_indexes WHERE tablename LIKE 'ductwork%'")}
            assert {"ductwork_runs_finished", "ductwork_executions_errors"} <= names
            assert "ductwork_runs_pipeline_status" not in names
        assert "Traceback" not in deployment.log() and "ERROR" not in deployment.log(), deployment.log()[-3000:]
        store.close()
    finally:
        deployment.close()

    # and a schema-1 process started on schema 2 keeps working too (the migration is additive)
    again = Proc(tmp_path, fresh_db_url, name="old-again", script=old)
    try:
        again.wait_log(r"worker started")
        trig = subprocess.run([sys.executable, str(old), "-c", str(again.config_path), "trigger", "SupMixed", "2"],
                              capture_output=True, text=True, cwd=str(ROOT))
        assert trig.returncode == 0, trig.stderr
        run_id = json.loads(trig.stdout)["id"] if trig.stdout.strip().startswith("{") else int(
            re.search(r"\d+", trig.stdout).group())
        ductwork.configure(database_url=fresh_db_url)
        assert ductwork.Run.get(run_id).wait(20) == "completed"
    finally:
        again.close()


def test_a_rollup_goes_in_chunks(engine, monkeypatch):
    runs = [RetChain.trigger(i) for i in range(7)]
    monkeypatch.setattr(ductwork, "ROLLUP_CHUNK", 2)
    before = assert_counters_match_rows(engine)
    assert engine.roll_up() is True
    with engine.store.tx(write=False) as t:
        assert t.one("SELECT mark FROM ductwork_rollup WHERE name = 'runs'")[0] == max(r.id for r in runs)
        assert t.one("SELECT value FROM ductwork_counters WHERE name = 'triggered'")[0] == 7
    assert counted(engine) == before == assert_counters_match_rows(engine)


def test_rollups_while_work_goes_on_count_every_row_once(engine, start_runtime):
    start_runtime(["RetChain", "RetFan"])
    stop, rolled = threading.Event(), []

    def roller():   # a pruner's rollups, as often as they can go, while steps commit
        while not stop.is_set():
            rolled.append(engine.roll_up())
            stop.wait(0.005)
    thread = threading.Thread(target=roller)
    thread.start()
    chains: list = []
    fans: list = []
    try:   # waves of work until at least three rollups went through while it went on (and 50 runs at least)
        deadline = time.monotonic() + 60
        while rolled.count(True) < 3 or len(chains) + len(fans) < 50:
            assert time.monotonic() < deadline, rolled
            chains += [RetChain.trigger(i) for i in range(4)]
            fans.append(RetFan.trigger(5))
            finished(fans[-1])
        assert {finished(run) for run in chains + fans} == {"completed"}
    finally:
        stop.set()
        thread.join(30)
    assert engine.roll_up() is True
    counts = assert_counters_match_rows(engine)
    assert counts.runs == {("RetChain", "completed"): len(chains), ("RetFan", "completed"): len(fans)}
    assert counts.executed == {("RetChain", "succeeded"): 2 * len(chains), ("RetFan", "succeeded"): 7 * len(fans)}


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_a_rollup_during_a_commit_that_completes_a_run_waits_for_it_and_goes_through(engine):
    """A success's commit writes its execution row first and its run's completion later; a rollup that starts in
    between waits for the executions table, never holding the runs table meanwhile (that cycle only ended at the
    rollup's lock timeout: the rollup gave up and the commit stalled)."""
    run = RetIdle.trigger(1)
    [claim] = engine.claim_steps("RetIdle", 5100, 1)
    claim.mark_started()
    rolled: list = []
    rollers: list[threading.Thread] = []
    watcher = ductwork.Store(engine.store.url)   # (the commit's own thread is inside its transaction)

    def paused(point, step=None):   # the commit holds its execution row, its run not completed yet
        if point != "after_branch_claim":
            return
        roller = threading.Thread(target=lambda: rolled.append(engine.roll_up()))
        roller.start()
        deadline = time.monotonic() + 10
        while not rolled and time.monotonic() < deadline:   # until the rollup waits for a lock (or is done)
            with watcher.tx(write=False) as t:
                if t.one("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                         "AND wait_event_type = 'Lock' AND query LIKE '%LOCK TABLE ductwork_%'")[0]:
                    break
        rollers.append(roller)
    engine.fault = paused
    assert engine.commit([ductwork.StepResult(claim, True, "1")]).accepted == [True]
    [roller] = rollers
    roller.join(10)
    watcher.close()
    assert rolled == [True]
    assert run.refresh().status == "completed"
    assert_counters_match_rows(engine)


def schema_1_with_runs(url: str, runs: int) -> ductwork.Store:
    """A database at schema 1 (this ductwork's first migration only) holding finished runs."""
    store = ductwork.Store(url)
    with store.tx() as t:
        t.run(ductwork.StoreSQL.create_migrations)
        ductwork._apply_in(t, ductwork.MIGRATIONS[0], in_tx=True)
        t.run("WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < :n) "
              "INSERT INTO ductwork_runs (pipeline, definition, status, input, created_at, updated_at, finished_at) "
              "SELECT 'RetChain', 'd', CASE WHEN n % 3 = 0 THEN 'halted' ELSE 'completed' END, '1', 0, 0, 0 FROM c",
              {"n": runs})
        t.run("INSERT INTO ductwork_steps (run_id, branch_id, pipeline, node, name, status, input, available_at, "
              "created_at) SELECT id, id, pipeline, 0, 'passes', 'succeeded', '1', 0, 0 FROM ductwork_runs")
        t.run("INSERT INTO ductwork_executions (step_id, run_id, attempt, outcome, finished_at) "
              "SELECT id, run_id, 1, 'succeeded', 0 FROM ductwork_steps")
    return store


def test_concurrent_migrates_of_a_populated_schema_1_database_apply_it_once(fresh_db_url):
    schema_1_with_runs(fresh_db_url, 3000).close()
    # each migration applied by exactly one of them (on Postgres a populated schema is migrated a migration per
    # transaction, its indexes built concurrently in between, so two migrators may share the versions out)
    applied = concurrent_migrates(fresh_db_url)
    assert sorted(v for versions in applied for v in versions) == list(range(2, ductwork.SCHEMA_VERSION + 1)), applied
    assert all(versions == sorted(versions) for versions in applied), applied
    store = ductwork.Store(fresh_db_url)
    engine = ductwork.Engine(store, ductwork.load_config(data={"database_url": fresh_db_url}))
    counts = assert_counters_match_rows(engine)
    assert counts.runs == {("RetChain", "completed"): 2000, ("RetChain", "halted"): 1000}
    assert counts.executed == {("RetChain", "succeeded"): 3000}
    if store.dialect == "postgres":
        with store.tx(write=False) as t:
            built = dict(t.all("SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c "
                               "ON c.oid = i.indexrelid WHERE c.relname LIKE 'ductwork%'"))
        wanted = {ductwork._index_name(s) for s in ductwork.MIGRATIONS[1].indexes}
        assert {name: built.get(name) for name in wanted} == dict.fromkeys(wanted, True)
        assert "ductwork_runs_pipeline_status" not in built
    store.close()


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_an_interrupted_concurrent_index_build_is_rebuilt_by_the_next_migrate(fresh_db_url):
    store = ductwork.Store(fresh_db_url)
    ductwork.migrate_store(store)
    with store.tx() as t:    # what a CREATE INDEX CONCURRENTLY killed half-way leaves: an invalid index
        t.run("UPDATE pg_index SET indisvalid = false WHERE indexrelid = CAST('ductwork_runs_finished' AS regclass)")
    assert ductwork.migrate_store(store) == []
    with store.tx(write=False) as t:
        assert t.one("SELECT indisvalid FROM pg_index WHERE indexrelid = CAST('ductwork_runs_finished' AS regclass)") \
            == (True,)
    store.close()


@pytest.mark.parametrize("db_url", DB_VARIANTS, indirect=True)
def test_a_run_reopened_by_hand_or_by_an_older_version_is_still_counted(engine, start_runtime):
    """The finished count's "taken out of it" part is migration 8's trigger, not revive()'s code: an UPDATE that
    reopens a halted run (the version before's revive, a hand-written fix) keeps the count where it was."""
    start_runtime(["RetHalts"], job_worker={"max_retry": 0, "retry_delay": 0})
    run = RetHalts.trigger(1)
    assert finished(run) == "halted"
    before = counter_samples(ductwork.dashboard_metrics(engine))
    with engine.store.tx() as t:
        t.run("UPDATE ductwork_runs SET status = 'in_progress', finished_at = NULL WHERE id = :id", {"id": run.id})
        t.run("UPDATE ductwork_runs SET updated_at = updated_at + 1 WHERE id = :id", {"id": run.id})  # (no tally)
    after = counter_samples(ductwork.dashboard_metrics(engine))
    key = 'ductwork_runs_finished_total{pipeline="RetHalts",status="halted"}'
    assert after[key] == before[key] >= 1   # (the database may hold other tests' runs of RetHalts)

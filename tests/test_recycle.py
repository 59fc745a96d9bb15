"""Recycling (SPEC §15, job_worker.recycle): a worker process that started N steps, passed M MB of resident
memory or holds too many threads stuck past a step's deadline drains and is replaced at once, without a crash,
a failed boot or a restart counted; a foreground role replaces itself in place (same pid). Real supervisors and
foreground roles of `python ductwork.py`, on real SQLite and PostgreSQL."""
from __future__ import annotations

import collections
import json
import os
import random
import signal
import sys
import time
import uuid

import pytest
from procs import LOAD_SLACK, Proc, alive, settings, wait_until
from test_systemd import FakeSystemd

import ductwork

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "apps"))
import recycle_app  # noqa: E402

APP = os.path.join(os.path.dirname(__file__), "apps", "recycle_app.py")


def start(procs, tmp_path, db_url, **kw) -> Proc:
    proc = Proc(tmp_path, db_url, **kw)
    procs.append(proc)
    return proc


def marks(tmp_path, kind: str) -> list[list[str]]:
    path = tmp_path / "marks.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return [line.split() for line in lines if line.startswith(kind + " ")]


def rows(role: str | None = None) -> list[tuple[int, int, str, dict]]:
    """(id, pid, role, info) of the live process rows."""
    with ductwork._app_engine().store.tx(write=False) as t:
        found = t.all("SELECT id, pid, role, info FROM ductwork_processes ORDER BY id")
    return [(i, pid, r, json.loads(info or "{}")) for i, pid, r, info in found if role is None or r == role]


def outcomes() -> collections.Counter:
    with ductwork._app_engine().store.tx(write=False) as t:
        return collections.Counter(o for (o,) in t.all("SELECT outcome FROM ductwork_executions"))


def test_a_worker_that_started_its_steps_is_replaced_at_once_and_no_restart_is_counted(procs, tmp_path, app_db):
    steps, count = 10, 2
    sup = start(procs, tmp_path, app_db, config={
        "app": APP, "pipelines": ["RecCount"], "job_worker": {"count": count, "recycle": {"steps": steps}}})
    first = sup.child_pid("worker:RecCount")
    runs = [recycle_app.RecCount.trigger(i) for i in range(40)]
    for run in runs:
        assert run.wait(60) == "completed"
    # every step ran once: a recycle finishes what it started and gives back what it had not started
    done = marks(tmp_path, "step")
    assert sorted(int(m[1]) for m in done) == sorted(r.id for r in runs)
    assert outcomes() == {"succeeded": 40}
    per_pid = collections.Counter(m[2] for m in done)
    order = list(dict.fromkeys(m[2] for m in done))   # the worker processes, oldest first
    assert order[0] == str(first) and len(order) >= 40 // (steps + steps // 10 + count - 1), per_pid
    # at most its (jittered) threshold, and the steps its other threads had started as it was reached
    assert max(per_pid.values()) <= steps + steps // 10 + count - 1, per_pid
    assert all(per_pid[pid] >= steps for pid in order[:-1]), per_pid
    recycled = sup.wait_log(r"worker:RecCount \(pid (\d+)\) recycles \(it started (\d+) steps", count=len(order) - 1)
    # every worker but the newest recycled (the newest too, when its last step reached its threshold)
    assert [m.group(1) for m in recycled][:len(order) - 1] == order[:-1]
    assert all(int(m.group(2)) >= steps for m in recycled)
    sup.wait_log(r"worker:RecCount \(pid \d+\) exited \(recycled\): exit 0", count=len(order) - 1)
    log = sup.log()
    assert "crashed" not in log and "failed to boot" not in log and "retrying in" not in log, log[-3000:]

    def recycles_agree() -> int | None:
        """The recycles the supervisor logged, once its row and its newest worker's row say the same."""
        logged = len(sup.wait_log(r"recycles \(it started", count=len(order) - 1))
        child = rows("supervisor")[0][3]["children"]["worker:RecCount"]
        newest = rows("worker")[-1:]
        return logged if child["recycles"] == logged and newest and newest[0][3]["recycles"] == logged else None
    recycles = wait_until(recycles_agree, LOAD_SLACK, what="the recycles in the process rows")
    assert recycles in (len(order) - 1, len(order))
    child = rows("supervisor")[0][3]["children"]["worker:RecCount"]
    assert child["restarts"] == 0 and child["boot_failures"] == 0, child   # no restart, no budget used
    sup.signal(signal.SIGTERM)
    assert sup.wait() == 0


def test_a_foreground_worker_past_its_memory_limit_reexecutes_itself_with_the_same_pid(procs, tmp_path):
    url = f"sqlite:///{tmp_path}/ductwork.sqlite3"
    ductwork.configure(database_url=url)
    ductwork.migrate()
    limit, leak = 300, 100
    systemd = FakeSystemd(f"@ductwork-test-{uuid.uuid4().hex}")
    try:
        start(procs, tmp_path, url, name="advancer", config={"app": APP, "role": "advancer"})
        worker = start(procs, tmp_path, url, name="worker", env={"NOTIFY_SOCKET": systemd.address}, config={
            "app": APP, "role": "worker", "pipelines": ["RecLeak"],
            "job_worker": {"count": 1, "recycle": {"memory_mb": limit}}})
        systemd.wait_for("READY", timeout=30)
        (row_id, pid, _, info), = wait_until(lambda: rows("worker"), LOAD_SLACK, what="the worker's row")
        assert pid == worker.pid and info["recycles"] == 0
        runs = [recycle_app.RecLeak.trigger(leak) for _ in range(4)]
        for run in runs:
            assert run.wait(60) == "completed"
        found = worker.wait_log(r"worker recycles: its resident memory is (\d+) MB \(job_worker.recycle.memory_mb "
                                rf"{limit}, jittered to (\d+)\)")
        assert int(found[0].group(2)) >= limit * 0.9 and int(found[0].group(1)) >= int(found[0].group(2))
        # the same process, a new program: systemd was told RELOADING=1, then READY=1, by the same pid
        reloading = systemd.wait_for("RELOADING")
        systemd.wait_for("READY", after=reloading, timeout=30)
        assert {m.get("_PID") for _, m in systemd.messages} == {str(worker.pid)}
        assert worker.popen.poll() is None
        (new_row, new_pid, _, new_info), = wait_until(
            lambda: [r for r in rows("worker") if r[0] != row_id], LOAD_SLACK, what="the re-executed worker's row")
        assert new_pid == worker.pid and new_info["recycles"] == 1
        assert [r[0] for r in rows("worker")] == [new_row]   # the old row went with its drain
        # its memory is back: a fresh program, with the leak gone
        with open(f"/proc/{worker.pid}/statm") as fh:
            assert int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") < limit * 0.9 * 2 ** 20
        assert len(marks(tmp_path, "leak")) == 4 and outcomes() == {"succeeded": 4}
        more = recycle_app.RecLeak.trigger(1)
        assert more.wait(30) == "completed"   # the new program serves the pipeline
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0
        assert "Traceback" not in worker.log()
    finally:
        systemd.close()


def test_a_worker_holding_too_many_stuck_threads_is_recycled_without_waiting_for_them(procs, tmp_path):
    url = f"sqlite:///{tmp_path}/ductwork.sqlite3"
    ductwork.configure(database_url=url)
    ductwork.migrate()
    sup = start(procs, tmp_path, url, config={
        "app": APP, "pipelines": ["RecStuck"], "job_worker": {"count": 2, "recycle": {"abandoned_threads": 1}}})
    old = sup.child_pid("worker:RecStuck")
    runs = [recycle_app.RecStuck.trigger(i) for i in range(2)]
    for run in runs:
        assert run.wait(30) == "halted"
        assert run.steps[0].error.startswith("StepTimeout")
    sup.wait_log(rf"worker:RecStuck \(pid {old}\) recycles \(2 of its threads are stuck in steps past their timeout "
                 r"\(job_worker.recycle.abandoned_threads 1\)\)")
    new = sup.child_pid("worker:RecStuck", nth=2)
    # its drain did not wait for the stuck threads (they would block for an hour): gone within its budget
    budget = float(settings()["job_worker"]["shutdown_timeout"])
    wait_until(lambda: not alive(old), budget + LOAD_SLACK, what="the recycled worker's exit")
    assert new != old and alive(new)
    assert {m[2] for m in marks(tmp_path, "stuck")} == {str(old)}
    child = rows("supervisor")[0][3]["children"]["worker:RecStuck"]
    assert child["restarts"] == 0
    sup.signal(signal.SIGTERM)
    assert sup.wait() == 0


def test_thresholds_are_jittered_per_process_within_a_tenth():
    config = ductwork.load_config(data={"job_worker": {"recycle": {"steps": 1000, "memory_mb": 500}}}, environ={})
    policies = [ductwork.RecyclePolicy.of(config, random.Random(seed)) for seed in range(200)]
    steps = [p.steps for p in policies]
    memory = [p.memory for p in policies]
    assert min(steps) >= 1000 and max(steps) <= 1100 and len(set(steps)) > 50
    assert min(memory) >= 450 * 2 ** 20 and max(memory) <= 500 * 2 ** 20 and len(set(memory)) > 50
    assert all(p.abandoned == 3 for p in policies)   # the default
    never = ductwork.RecyclePolicy.of(ductwork.load_config(data={}, environ={}))
    assert (never.steps, never.memory) == (None, None)


@pytest.mark.parametrize("recycle, problem", [
    ({"steps": 0}, "config key 'job_worker.recycle.steps' must be >= 1 or -1, got 0"),
    ({"memory_mb": "1G"}, "config key 'job_worker.recycle.memory_mb' must be a number >= 1 or -1, got '1G'"),
    ({"abandoned_threads": -2}, "config key 'job_worker.recycle.abandoned_threads' must be >= 0 or -1, got -2"),
    ({"every": 5}, "unknown config key 'job_worker.recycle.every'"),
])
def test_a_bad_recycle_setting_is_one_clear_line(recycle, problem):
    with pytest.raises(ductwork.ConfigError) as err:
        ductwork.load_config(data={"job_worker": {"recycle": recycle}}, environ={})
    assert str(err.value).startswith(problem)


def test_a_memory_limit_below_the_booted_size_is_switched_off_not_looped(procs, tmp_path):
    url = f"sqlite:///{tmp_path}/ductwork.sqlite3"
    ductwork.configure(database_url=url)
    ductwork.migrate()
    worker = start(procs, tmp_path, url, name="worker", config={
        "app": APP, "role": "worker", "pipelines": ["RecCount"], "job_worker": {"recycle": {"memory_mb": 1}}})
    worker.wait_log(r"job_worker.recycle.memory_mb \(1\) is below this worker's own size once booted \(\d+ MB\): "
                    r"recycling on memory is off")
    worker.wait_log(r"worker started")
    time.sleep(3 * float(settings()["supervisor"]["heartbeat_interval"]))   # ticks in which it would recycle
    assert "recycles" not in worker.log()
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0


def test_a_recycle_s_drain_longer_than_hang_timeout_is_not_killed_as_hung(procs, tmp_path):
    url = f"sqlite:///{tmp_path}/ductwork.sqlite3"
    ductwork.configure(database_url=url)
    ductwork.migrate()
    hang = 1.0
    sup = start(procs, tmp_path, url, config={
        "app": APP, "pipelines": ["RecSlow"], "supervisor": {"hang_timeout": hang},
        "job_worker": {"count": 1, "shutdown_timeout": 10, "recycle": {"steps": 1}}})
    old = sup.child_pid("worker:RecSlow")
    run = recycle_app.RecSlow.trigger(3 * hang)   # it starts, the worker recycles, its drain waits for it
    assert run.wait(3 * hang + 2 * LOAD_SLACK) == "completed"
    sup.wait_log(rf"worker:RecSlow \(pid {old}\) exited \(recycled\): exit 0")
    assert "killed" not in sup.log() and outcomes() == {"succeeded": 1}
    assert [m[1] for m in marks(tmp_path, "slow")] == [str(run.id)]   # it ran once, to its end
    sup.signal(signal.SIGTERM)
    assert sup.wait() == 0

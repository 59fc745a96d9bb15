"""The process manager for real: `python ductwork.py` subprocesses, real fork, real signals."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from procs import Proc, alive, children_of, stop_outside_transaction, wait_until

import ductwork

THROUGH_POOLER = True   # the kill and restart tests also run through a real PgBouncer (conftest)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "apps"))
import sup_app  # noqa: E402


def start(procs, tmp_path, db_url, **kw) -> Proc:
    p = Proc(tmp_path, db_url, **kw)
    procs.append(p)
    return p


def process_rows(machine: str | None = None) -> list[tuple]:
    engine = ductwork._app_engine()
    with engine.store.tx(write=False) as t:
        rows = t.all("SELECT id, pid, role, machine_identifier FROM ductwork_processes ORDER BY id")
    return [r for r in rows if machine is None or r[3] == machine]


def marks(tmp_path) -> list[list[str]]:
    path = tmp_path / "marks.log"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def test_sigkill_of_a_worker_mid_step_is_replaced_at_once(procs, tmp_path, app_db):
    sup = start(procs, tmp_path, app_db)
    old = sup.child_pid("worker:SupNap")
    run = sup_app.SupNap.trigger(1.5)
    wait_until(lambda: any(m[0] == "start" for m in marks(tmp_path)), what="step start")
    killed_at = time.monotonic()
    os.kill(old, signal.SIGKILL)
    new = sup.child_pid("worker:SupNap", nth=2)
    sup.wait_log(r"worker:SupNap \(pid \d+\) crashed .*1 step\(s\) handed back")
    replaced_after = time.monotonic() - killed_at
    assert new != old and alive(new)
    assert replaced_after < 1.0, f"replacement took {replaced_after:.2f}s"
    assert run.wait(15) == "completed"
    assert run.output == 2.5
    step = run.steps[0]
    assert (step.attempts, step.crashes) == (1, 1)  # committed once; the crash did not use a retry
    assert [m[0] for m in marks(tmp_path)].count("end") == 1
    sup.signal(signal.SIGTERM)
    assert sup.wait() == 0


def test_a_stopped_child_is_killed_and_replaced_after_hang_timeout(procs, tmp_path, app_db):
    sup = start(procs, tmp_path, app_db, config={"supervisor": {"hang_timeout": 1.5}})
    old = sup.child_pid("advancer")
    sup.wait_log(r"advancer started")
    stop_outside_transaction(old, app_db)   # stopped holding the SQLite lock, it would stall the supervisor's heartbeat
    stopped_at = time.monotonic()
    new = sup.child_pid("advancer", nth=2)
    took = time.monotonic() - stopped_at
    assert new != old
    # silence counts from the child's last report, up to one tick (0.3 s here) before the SIGSTOP
    assert 1.5 - 0.3 <= took < 1.5 + 1.0, f"hang noticed after {took:.2f}s"
    assert "was silent for" in sup.log()
    wait_until(lambda: not alive(old), what="old advancer gone")
    run = sup_app.SupMixed.trigger(3)
    assert run.wait(15) == "completed" and run.output == (5 + 1) + 50
    sup.signal(signal.SIGTERM)
    assert sup.wait() == 0


def test_a_start_hook_that_raises_backs_off_then_exits_1(procs, tmp_path, app_db):
    sup = start(procs, tmp_path, app_db, env={"DW_FAIL_WORKER_HOOK": "1"},
                config={"supervisor": {"max_boot_failures": 3}})
    code = sup.wait(30)
    log = sup.log()
    assert code == 1
    giving_up = [line for line in log.splitlines() if "giving up" in line]
    assert len(giving_up) == 1
    assert "worker:SupMixed" in giving_up[0] or "worker:SupNap" in giving_up[0]
    assert "hook exploded on purpose" in giving_up[0]
    delays = [float(x) for x in __import__("re").findall(r"retrying in ([\d.]+)s", log)]
    assert delays[:2] == [0.5, 1.0] or sorted(set(delays))[:2] == [0.5, 1.0]  # exponential backoff
    assert not [r for r in process_rows("host-a")]


def test_idle_sigterm_exits_fast_and_leaves_no_rows(procs, tmp_path, app_db):
    sup = start(procs, tmp_path, app_db)
    sup.wait_log(r"worker started", count=2)
    sup.wait_log(r"advancer started")
    wait_until(lambda: len(process_rows("host-a")) == 4, what="4 process rows")
    kids = children_of(sup.pid)
    assert len(kids) == 3
    t0 = time.monotonic()
    sup.signal(signal.SIGTERM)
    assert sup.wait(10) == 0
    took = time.monotonic() - t0
    assert took < 1.5, f"idle shutdown took {took:.2f}s"
    assert process_rows("host-a") == []
    assert not any(alive(k) for k in kids)


def test_sigterm_during_a_short_step_lets_it_commit(procs, tmp_path, app_db):
    sup = start(procs, tmp_path, app_db)
    sup.child_pid("worker:SupNap")
    run = sup_app.SupNap.trigger(0.8)
    wait_until(lambda: any(m[0] == "start" for m in marks(tmp_path)), what="step start")
    sup.signal(signal.SIGTERM)
    assert sup.wait(10) == 0
    step = run.refresh().steps[0]
    assert (step.status, step.attempts, step.crashes) == ("succeeded", 1, 0)


def test_sigterm_during_a_long_step_hands_it_back_for_immediate_rerun(procs, tmp_path, app_db):
    sup = start(procs, tmp_path, app_db,
                config={"job_worker": {"shutdown_timeout": 1}, "supervisor": {"shutdown_timeout": 3}})
    sup.child_pid("worker:SupNap")
    run = sup_app.SupNap.trigger(30)
    wait_until(lambda: any(m[0] == "start" for m in marks(tmp_path)), what="step start")
    t0 = time.monotonic()
    sup.signal(signal.SIGTERM)
    assert sup.wait(10) == 0
    assert time.monotonic() - t0 < 3 + 1
    step = run.refresh().steps[0]
    assert (step.status, step.crashes, step.attempts) == ("queued", 1, 0)
    # A fresh worker re-runs it at once (not after a reaper timeout); make that run short.
    engine = ductwork._app_engine()
    with engine.store.tx() as t:
        t.run("UPDATE ductwork_steps SET input = '[0.1]' WHERE id = ?", (step.id,))
    again = start(procs, tmp_path, app_db, name="again")
    assert run.wait(10) == "completed"
    assert (run.steps[0].crashes, run.steps[0].attempts) == (1, 1)
    again.signal(signal.SIGTERM)
    assert again.wait() == 0


def test_a_dead_host_is_reaped_by_its_peer(procs, tmp_path, app_db):
    a = start(procs, tmp_path, app_db, name="a", machine="host-a", config={"job_worker": {"count": 1}})
    b_config = {"pipelines": ["SupMixed"], "supervisor": {"reaper_timeout": 2}}
    a.wait_log("worker started", count=2)
    runs = [sup_app.SupNap.trigger(1.0) for _ in range(2)]
    wait_until(lambda: sum(m[0] == "start" for m in marks(tmp_path)) >= 1, what="a step running on host-a")
    a.kill_group()  # the whole host dies: supervisor and children, no chance to hand back
    assert any(r[3] == "host-a" for r in process_rows())
    b = start(procs, tmp_path, app_db, name="b", machine="host-b", config=b_config)
    wait_until(lambda: not any(r[3] == "host-a" for r in process_rows()), timeout=15, what="host-a reaped")
    # host-b only serves SupMixed; a worker for SupNap comes up on host-c and finishes the reaped work
    c = start(procs, tmp_path, app_db, name="c", machine="host-c")
    for run in runs:
        assert run.wait(20) == "completed"
        assert run.steps[0].crashes <= 1 and run.steps[0].attempts == 1
    assert "reaped process row" in b.log() + c.log()
    for p in (b, c):
        p.signal(signal.SIGTERM)
        assert p.wait() == 0


def test_quit_hands_back_and_exits_now(procs, tmp_path, app_db):
    sup = start(procs, tmp_path, app_db)
    sup.child_pid("worker:SupNap")
    run = sup_app.SupNap.trigger(30)
    wait_until(lambda: any(m[0] == "start" for m in marks(tmp_path)), what="step start")
    kids = children_of(sup.pid)
    t0 = time.monotonic()
    sup.signal(signal.SIGQUIT)
    assert sup.wait(5) == 0
    assert time.monotonic() - t0 < 2
    assert not any(alive(k) for k in kids)
    step = run.refresh().steps[0]
    assert (step.status, step.crashes) == ("queued", 1)
    assert process_rows("host-a") == []


def test_ttin_prints_labelled_thread_stacks(procs, tmp_path, app_db):
    sup = start(procs, tmp_path, app_db)
    sup.wait_log("worker started", count=2)
    sup.wait_log("advancer started")
    sup.signal(signal.SIGTTIN)
    sup.wait_log(r"thread dump: pid \d+ role worker", count=2)
    sup.wait_log(r"thread dump: pid \d+ role advancer")
    log = sup.log()
    assert "--- ductwork.worker.SupNap.0" in log and "--- ductwork.worker.SupNap.1" in log
    assert "--- ductwork.advancer.SupMixed.0" in log
    sup.signal(signal.SIGTERM)
    assert sup.wait() == 0


def test_hup_restarts_children_and_keeps_the_supervisor(procs, tmp_path, app_db):
    sup = start(procs, tmp_path, app_db)
    first = sup.child_pid("worker:SupNap")
    sup.wait_log("worker started", count=2)
    sup.signal(signal.SIGHUP)
    second = sup.child_pid("worker:SupNap", nth=2)
    assert second != first
    wait_until(lambda: not alive(first), what="old worker drained")
    assert alive(sup.pid)
    run = sup_app.SupMixed.trigger(2)
    assert run.wait(15) == "completed"
    sup.signal(signal.SIGTERM)
    assert sup.wait() == 0


def test_lifecycle_hooks_run_in_each_process(procs, tmp_path, app_db):
    sup = start(procs, tmp_path, app_db, env={"DW_HOOK_LOG": "1"})
    sup.wait_log("worker started", count=2)
    sup.wait_log("advancer started")
    sup.signal(signal.SIGTERM)
    assert sup.wait() == 0
    hooks = [(m[1], int(m[2])) for m in marks(tmp_path) if m[0] == "hook"]
    names = [h for h, _ in hooks]
    assert names.count("supervisor_start") == 1 and names.count("supervisor_stop") == 1
    assert names.count("worker_start") == 2 and names.count("worker_stop") == 2
    assert names.count("advancer_start") == 1 and names.count("advancer_stop") == 1
    sup_pid = dict(hooks)["supervisor_start"]
    assert sup_pid == sup.pid
    assert all(pid != sup.pid for h, pid in hooks if h.startswith(("worker", "advancer")))
    assert names[0] == "supervisor_start" and names[-1] == "supervisor_stop"


@pytest.mark.parametrize("env_role,flag_role,expected",
                         [("worker", None, "worker"), ("worker", "advancer", "advancer")])
def test_foreground_roles_and_precedence(procs, tmp_path, app_db, env_role, flag_role, expected):
    args = ("run", "--role", flag_role) if flag_role else ("run",)
    p = start(procs, tmp_path, app_db, env={"DUCTWORK_ROLE": env_role}, args=args)
    p.wait_log(rf"{expected} started")
    rows = wait_until(lambda: process_rows("host-a"), what="process row")
    assert [r[2] for r in rows] == [expected]
    assert children_of(p.pid) == []  # no fork in the foreground roles
    p.signal(signal.SIGTERM)
    assert p.wait(10) == 0
    assert process_rows("host-a") == []


def test_foreground_worker_and_advancer_run_pipelines_and_reap(procs, tmp_path, app_db):
    w = start(procs, tmp_path, app_db, name="w", args=("run", "--role", "worker"))
    a = start(procs, tmp_path, app_db, name="adv", args=("run", "--role", "advancer"))
    run = sup_app.SupMixed.trigger(4)
    assert run.wait(15) == "completed"
    assert run.output == (14 + 1) + 140
    # a dead peer's row (another pod) is reaped by the foreground processes
    engine = ductwork._app_engine()
    with engine.store.tx() as t:
        t.run("INSERT INTO ductwork_processes (pid, machine_identifier, role, started_at, last_heartbeat_at) "
              "VALUES (1, 'dead-pod', 'worker', 0, 0)")
    wait_until(lambda: not any(r[3] == "dead-pod" for r in process_rows()), timeout=10, what="dead pod reaped")
    for p in (w, a):
        p.signal(signal.SIGTERM)
        assert p.wait(10) == 0


@pytest.mark.wakeups
def test_idle_processes_are_woken_by_a_trigger_not_by_their_poll(procs, tmp_path, app_db):
    """Postgres: LISTEN/NOTIFY; SQLite: datagrams to each process's socket (LocalWakeups).
    Idle threads poll only every 30 s here, so every hop of these runs is a wake-up."""
    slow_poll = {"job_worker": {"polling_timeout": 30}, "pipeline_advancer": {"polling_timeout": 30}}
    w = start(procs, tmp_path, app_db, name="w", args=("run", "--role", "worker"), config=slow_poll)
    a = start(procs, tmp_path, app_db, name="adv", args=("run", "--role", "advancer"), config=slow_poll)
    w.wait_log("worker started")
    a.wait_log("advancer started")
    time.sleep(0.5)  # every thread has claimed nothing and is in its 30 s wait
    started = time.monotonic()
    runs = [sup_app.SupMixed.trigger(n) for n in (2, 3)]
    assert [r.wait(20) for r in runs] == ["completed", "completed"]
    assert time.monotonic() - started < 30 / 6, "the runs waited for a poll"
    assert [r.output for r in runs] == [(1 + 1) + 10, (5 + 1) + 50]
    for p in (w, a):
        p.signal(signal.SIGTERM)
        assert p.wait(10) == 0


def test_local_wakeups_drop_the_socket_of_a_dead_process(tmp_path):
    import socket
    db = str(tmp_path / "x.sqlite3")
    folder = ductwork.LocalWakeups.folder(db)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    dead = os.path.join(folder, "999999-1.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(dead)
    s.close()                                   # its process is gone; the file stays
    live = ductwork.LocalWakeups.listen(db)
    try:
        ductwork.LocalWakeups.send(db, [(ductwork.CH_JOBS, "P")], skip_own=True)  # got it in-process already
        assert not os.path.exists(dead)
        assert ductwork.LocalWakeups.receive(live) is None
        ductwork.LocalWakeups.send(db, [(ductwork.CH_JOBS, "Q")], skip_own=False)  # e.g. app code's own Store
        assert ductwork.LocalWakeups.receive(live) == (ductwork.CH_JOBS, "Q")
        child = os.fork()
        if child == 0:
            ductwork.LocalWakeups.send(db, [(ductwork.CH_JOBS, "P")], skip_own=True)
            os._exit(0)
        os.waitpid(child, 0)
        assert ductwork.LocalWakeups.receive(live) == (ductwork.CH_JOBS, "P")
    finally:
        ductwork.LocalWakeups.close(live)
    assert not os.path.exists(folder)   # the last socket took its folder with it


def test_local_wakeups_refuse_a_folder_others_can_touch(tmp_path):
    """Another local user who made the folder first (or a symlink in its place) gets nothing:
    the process falls back to polling rather than share its hints."""
    import socket
    db = str(tmp_path / "y.sqlite3")
    folder = ductwork.LocalWakeups.folder(db)
    os.makedirs(folder)
    os.chmod(folder, 0o777)
    try:
        assert ductwork.LocalWakeups.listen(db) is None
        planted = os.path.join(folder, "1-1.sock")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(planted)
        ductwork.LocalWakeups.send(db, [(ductwork.CH_JOBS, "Secret")], skip_own=False)
        s.settimeout(0.2)
        with pytest.raises(socket.timeout):
            s.recv(100)                      # nothing was sent into a folder we do not trust
        s.close()
    finally:
        shutil.rmtree(folder)
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    os.symlink(target, folder)
    try:
        assert ductwork.LocalWakeups.listen(db) is None and list(target.iterdir()) == []
    finally:
        os.unlink(folder)


def test_forking_none_runs_everything_in_one_process(procs, tmp_path, app_db):
    p = start(procs, tmp_path, app_db, config={"forking": "none"})
    run = sup_app.SupMixed.trigger(3)
    assert run.wait(15) == "completed" and run.output == 56
    assert children_of(p.pid) == []
    assert [r[2] for r in process_rows("host-a")] == ["supervisor"]
    p.signal(signal.SIGTERM)
    assert p.wait(10) == 0


def test_supervisor_as_pid_1_in_a_pid_namespace(procs, tmp_path, app_db):
    if not shutil.which("unshare") or os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("unshare as root is required in CI")
        pytest.skip("needs unshare and root")
    p = start(procs, tmp_path, app_db, prefix=("unshare", "--pid", "--fork", "--mount-proc"))
    p.wait_log(r"supervisor started \(pid 1,")
    p.wait_log("worker started", count=2)
    run = sup_app.SupMixed.trigger(2)
    assert run.wait(15) == "completed"
    # unshare forwards nothing: signal the supervisor (pid 1 inside) through its host pid
    inner = wait_until(lambda: children_of(p.pid), what="unshare's child")[0]
    os.kill(inner, signal.SIGTERM)
    assert p.wait(15) == 0
    assert "supervisor stopped (exit 0)" in p.log()
    assert process_rows("host-a") == []
    assert subprocess.run(["pgrep", "-f", str(p.config_path)], capture_output=True).stdout == b""

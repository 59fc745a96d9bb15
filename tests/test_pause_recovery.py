"""A paused process whose row a peer reaped registers again, once, and carries on (§6), and
never leaves work claimed under its dead row id.

Both were found by the soak test (tests/test_soak.py)."""
from __future__ import annotations

import os
import re
import signal
import sys

from procs import LOAD_SLACK, Proc, pause, reap_deadline, settings, stop_outside_transaction, wait_until

import ductwork

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "apps"))
import sup_app  # noqa: E402


def test_paused_supervisor_registers_again_once(procs, tmp_path, db_url):
    ductwork.configure(database_url=db_url)
    ductwork.migrate()
    config = {"pipelines": ["SupNap"], "supervisor": {"reaper_timeout": 1.5, "hang_timeout": 60}}
    a = Proc(tmp_path, db_url, name="a", machine="host-a", config=config)
    b = Proc(tmp_path, db_url, name="b", machine="host-b", config=config)
    procs += [a, b]
    for p in (a, b):
        p.wait_log("supervisor started")
        p.wait_log("worker started")

    def sup_rows():
        with ductwork._app_engine().store.tx(write=False) as t:
            return t.all("SELECT id FROM ductwork_processes WHERE role = 'supervisor' AND pid = ?", (a.pid,))
    first = sup_rows()
    assert len(first) == 1

    stop_outside_transaction(a.pid, db_url)   # the supervisor only: its children keep their heartbeats
    wait_until(lambda: not sup_rows(), timeout=reap_deadline(config), what="a peer reaping the paused supervisor's row")
    assert re.search(rf"reaped process row {first[0][0]} \(host-a pid {a.pid}, supervisor\)", a.log() + b.log())
    a.signal(signal.SIGCONT)
    # resumed, its heartbeat is overdue: the next turn of its loop finds the row gone and registers again
    beat = settings(config)["supervisor"]["heartbeat_interval"]
    a.wait_log(r"supervisor row \d+ was reaped while paused; registering again", timeout=beat + LOAD_SLACK)

    again = wait_until(sup_rows, timeout=beat + LOAD_SLACK, what="a new supervisor row for host-a")
    assert len(again) == 1 and again[0][0] != first[0][0]
    # as long as a reap takes: a new row that were not heartbeated would be gone by then, a second
    # re-registration logged; neither may happen
    pause(reap_deadline(config, slack=0))
    assert sup_rows() == again
    log = a.log()
    assert len(re.findall(r"registering again", log)) == 1, log[-3000:]
    assert "database unavailable" not in log, log[-3000:]
    for p in (a, b):
        p.signal(signal.SIGTERM)
        assert p.wait() == 0


def test_claim_by_a_reaped_process_is_not_lost(procs, tmp_path, db_url):
    """A process that was paused and reaped must not claim work under its dead row id: if it
    dies before registering again, nobody would ever hand that step back (no row to reap)."""
    ductwork.configure(database_url=db_url)
    ductwork.migrate()
    # host-a's heartbeat (5 s) is slower than host-b's reaper timeout (1.5 s): host-a's rows are reaped
    # between its heartbeats, exactly as if it had been paused (GC pause, SIGSTOP, frozen VM) each time
    slow = {"pipelines": ["SupNap"], "job_worker": {"count": 1},
            "supervisor": {"heartbeat_interval": 5, "reaper_timeout": 60, "hang_timeout": 60}}
    a = Proc(tmp_path, db_url, name="a", machine="host-a", config=slow)
    b_config = {"pipelines": ["SupMixed"], "supervisor": {"reaper_timeout": 1.5}}
    b = Proc(tmp_path, db_url, name="b", machine="host-b", config=b_config)
    procs += [a, b]
    a.wait_log("worker started")
    worker_row = int(a.wait_log(r"worker started \(pid \d+, row (\d+)\)")[0].group(1))
    wait_until(lambda: re.search(rf"reaped process row {worker_row} \(host-a", b.log()),
               timeout=reap_deadline(slow, b_config), what="host-b reaping host-a's worker row")
    run = sup_app.SupNap.trigger(3)
    # host-a's worker claims only under a live row: from its next heartbeat (re-registration) on
    claimable = settings(slow)["supervisor"]["heartbeat_interval"] + settings(slow)["job_worker"]["polling_timeout"]
    wait_until(lambda: (tmp_path / "marks.log").exists(), timeout=claimable + LOAD_SLACK,
               what="the step running on host-a")
    a.kill_group()                     # host-a dies before its next heartbeat
    with ductwork._app_engine().store.tx(write=False) as t:
        claimed = t.one("SELECT claimed_by FROM ductwork_steps WHERE run_id = ?", (run.id,))[0]
        rows = t.all("SELECT id FROM ductwork_processes WHERE id = ?", (claimed,))
    # the step must be held by a row a peer can reap; then host-a's replacement runs it again
    assert rows, f"step claimed by process row {claimed}, which no longer exists: it can never be handed back"
    a2 = Proc(tmp_path, db_url, name="a2", machine="host-a", config={"pipelines": ["SupNap"]})
    procs.append(a2)
    assert run.wait(30) == "completed", f"{run.refresh()} steps={run.steps}"
    assert run.output == 4 and run.steps[0].attempts == 1


def test_claims_whose_reply_was_lost_are_released(tmp_path, app_db):
    """A claim committed in the database that no thread knows of (its reply was lost) goes back
    to the queue once older than reaper_timeout, without counting a crash."""
    config = ductwork.load_config(data={"supervisor": {"reaper_timeout": 0.5, "heartbeat_interval": 0.1},
                                        "job_worker": {"polling_timeout": 0.05}},
                                  overrides={"database_url": app_db})
    runtime = ductwork.Runtime(config, "worker", ["SupMixed"])
    runtime.register()
    run = sup_app.SupMixed.trigger(2)
    [lost] = runtime.engine.claim_steps("SupMixed", runtime.process_id, 1)  # nobody tracks this claim
    assert run.steps[0].status == "running"
    pause(0.7)
    assert runtime.release_orphans() == 1
    step = run.steps[0]
    assert (step.status, step.crashes, step.attempts) == ("queued", 0, 0)
    assert runtime.engine.commit_success(lost, "[0, 1]") is False  # the lost claim can no longer commit
    runtime.store.close()

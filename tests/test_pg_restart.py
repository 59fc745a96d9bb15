"""Database faults on PostgreSQL: the server itself is restarted while runs are in flight.

A private cluster is created for this test (initdb + pg_ctl on a free port, owned by the
`postgres` OS user when we run as root), so the shared test server is never stopped.
Processes must log the outage once, back off, reconnect, and every run must complete with
each step committed exactly once.
"""
from __future__ import annotations

import os
import re
import signal
import sys
import time

import pytest
from pgcluster import PrivateCluster
from procs import Proc, children_of, pause, wait_until

import ductwork

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "apps"))
import sup_app  # noqa: E402

pytestmark = pytest.mark.postgres

EXPECTED = {n: sum(i * i for i in range(n)) + 1 + 10 * sum(i * i for i in range(n)) for n in range(8)}


def retry_db(fn, timeout: float = 30):
    """The test's own queries also meet the outage: retry them like an app would."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except ductwork.DatabaseUnavailable:
            if time.monotonic() > deadline:
                raise
            pause(0.2)


def query(sql, params=()):
    def go():
        with ductwork._app_engine().store.tx(write=False) as t:
            return t.all(sql, params)
    return retry_db(go)


def started_pids(log: str) -> dict[str, list[int]]:
    pids: dict[str, list[int]] = {}
    for key, pid in re.findall(r"started (\S+) \(pid (\d+)\)", log):
        pids.setdefault(key, []).append(int(pid))
    return pids


@pytest.fixture
def cluster(tmp_path):
    """A private, running PostgreSQL cluster; stopped and removed whatever happens."""
    pg = PrivateCluster()
    try:
        pg.create()
        pg.start()
        ductwork.configure(database_url=pg.url)
        ductwork.migrate()
        yield pg
    finally:
        engine = ductwork._APP.engine
        if engine is not None:
            engine.store.close()
        ductwork.configure(database_url=f"sqlite:///{tmp_path}/after.sqlite3")
        pg.remove()


def test_postgres_server_restart_mid_run_loses_nothing(tmp_path, cluster, procs):
    # reaper_timeout above the outage: a restart of the server is not a death of every process
    sup = Proc(tmp_path, cluster.url, config={"pipelines": ["SupMixed", "SupNap"],
                                               "supervisor": {"reaper_timeout": 15, "hang_timeout": 5}})
    procs.append(sup)
    sup.wait_log("worker started", count=2)
    sup.wait_log("advancer started")
    before = started_pids(sup.log())
    processes = 1 + len(children_of(sup.pid))
    assert processes == 4, sup.log()[-2000:]

    # in flight when the server goes down: naps that outlive the outage's start, and a burst of mixed runs
    naps = [sup_app.SupNap.trigger(1.0) for _ in range(3)]
    mixed = [sup_app.SupMixed.trigger(n) for n in (2, 3, 4, 5, 6, 7) * 2]
    wait_until(lambda: (tmp_path / "marks.log").exists() and "start" in (tmp_path / "marks.log").read_text(),
               timeout=10, what="a nap step running")
    ductwork._app_engine().store.close()
    cluster.stop("fast")
    down_at = time.monotonic()
    pause(2.0)
    assert sup.popen.poll() is None, "the supervisor exited while the database was down"
    cluster.start()
    outage = time.monotonic() - down_at

    # more work after the server is back
    later = retry_db(lambda: [sup_app.SupMixed.trigger(n) for n in (3, 5)] + [sup_app.SupNap.trigger(0.1)])
    runs = naps + mixed + later
    for run in runs:
        assert retry_db(lambda r=run: r.wait(25)) == "completed", f"{run} not completed; log:\n{sup.log()[-4000:]}"
    mixed_after = later[:2]
    assert [r.output for r in mixed] == [EXPECTED[n] for n in (2, 3, 4, 5, 6, 7) * 2]
    assert [r.output for r in mixed_after] == [EXPECTED[3], EXPECTED[5]]
    assert [r.output for r in naps] == [2.0] * 3 and later[2].output == 1.1

    # every step committed exactly once, no application retry spent, nothing left claimed
    ids = tuple(r.id for r in runs)
    marks = ",".join("?" * len(ids))
    per_step = query(f"SELECT s.id, s.name, s.status, s.attempts, "
                     f"(SELECT count(*) FROM ductwork_executions e WHERE e.step_id = s.id AND e.outcome = 'succeeded') "
                     f"FROM ductwork_steps s WHERE s.run_id IN ({marks}) ORDER BY s.id", ids)
    assert len(per_step) >= len(runs) * 2
    bad = [row for row in per_step if tuple(row[2:]) != ("succeeded", 1, 1)]
    assert not bad, f"steps not committed exactly once: {bad}"
    assert query("SELECT count(*) FROM ductwork_steps WHERE claimed_by IS NOT NULL "
                 "OR status IN ('queued', 'running')") == [(0,)]
    assert query("SELECT count(*) FROM ductwork_branches WHERE claimed_by IS NOT NULL "
                 "OR status IN ('advancing', 'advance')") == [(0,)]

    # the supervisor never exited; children kept running (a restart would be logged with its reason)
    assert sup.popen.poll() is None
    log = sup.log()
    after = started_pids(log)
    assert "failed to boot" not in log and "giving up" not in log, log[-4000:]
    assert after == before, f"children were replaced during the outage: {before} -> {after}\n{log[-4000:]}"
    for key, pids in after.items():
        assert all(p in children_of(sup.pid) for p in pids[-1:]), f"{key} is not running"
    assert "Traceback" not in log, log[-4000:]

    # the outage is logged once per process (not once per poll), and the recovery too
    unavailable = log.count("database unavailable")
    assert 1 <= unavailable <= processes * 2, \
        f"{unavailable} 'database unavailable' lines for one {outage:.1f}s outage:\n{log}"
    assert "database reachable again" in log
    assert log.count("database reachable again") <= processes * 2

    sup.signal(signal.SIGTERM)
    assert sup.wait() == 0
    assert "Traceback" not in sup.log()


def test_foreground_worker_drains_after_a_server_restart(tmp_path, cluster, procs):
    """A server restart earlier in a process's life must not break its drain: on SIGTERM the
    in-flight step is handed back at once (guarantee 4) and the process row is deleted."""
    config = {"pipelines": ["SupNap"], "job_worker": {"count": 1, "shutdown_timeout": 1},
              "supervisor": {"reaper_timeout": 60}}
    adv = Proc(tmp_path, cluster.url, name="adv", machine="host-fg", config=config, args=("run", "--role", "advancer"))
    worker = Proc(tmp_path, cluster.url, name="w", machine="host-fg", config=config, args=("run", "--role", "worker"))
    procs += [adv, worker]
    adv.wait_log("advancer started")
    worker.wait_log("worker started")
    ductwork._app_engine().store.close()
    cluster.stop("fast")
    pause(1.0)
    cluster.start()
    worker.wait_log("database reachable again", timeout=20)
    adv.wait_log("database reachable again", timeout=20)

    run = retry_db(lambda: sup_app.SupNap.trigger(30))
    wait_until(lambda: (tmp_path / "marks.log").exists(), timeout=10, what="the nap step running")
    worker_row = query("SELECT id FROM ductwork_processes WHERE role = 'worker'")[0][0]
    worker.signal(signal.SIGTERM)
    assert worker.wait(10) == 0
    log = worker.log()
    assert "could not" not in log, f"the drain could not reach the database after the restart:\n{log[-3000:]}"
    assert re.search(r"drained in [\d.]+s \(1 step\(s\) handed back\)", log), log[-3000:]
    # handed back at once: claimable again now, not after reaper_timeout (60 s)
    step = query("SELECT status, claimed_by, crashes, attempts FROM ductwork_steps WHERE run_id = ?", (run.id,))
    assert step == [("queued", None, 1, 0)] or step == [("queued", None, 1, 1)], step
    assert query("SELECT count(*) FROM ductwork_processes WHERE id = ?", (worker_row,)) == [(0,)]
    adv.signal(signal.SIGTERM)
    assert adv.wait(10) == 0
    assert "could not" not in adv.log(), adv.log()[-3000:]

"""Time figures (SPEC §16): 10,000 branches asleep until the same second resume within seconds of it, and a
deployment holding 10,000 waiting runs idles at the CPU cost of an empty one.

    python bench/waits.py [--runs N] [--engines sqlite,postgres] [--idle S]

Resume: N runs of BenchSleep (noop, sleep(3600), noop) are started and run to their sleep by a real supervisor,
which is then stopped; the steps after the sleeps (queued, claimable an hour from now) are moved to wake at one
and the same second a few seconds ahead (one UPDATE of their available_at: the state N sleeps ending in that
second leave), and a supervisor is started again. The figure: from that second until the last of the N runs has
completed, and each step's lateness (its start minus its wake time).

Idle: a real supervisor with N runs waiting (N/2 asleep, N/2 parked for a signal that never comes) against the
same supervisor on an empty database, each for --idle seconds after a settling pause: the CPU seconds of the
process tree, and on Postgres of the server's client backends of that database too (not autovacuum, which
visits the freshly written tables once), measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import bench_app  # noqa: F401  (registers the pipelines)
from common import Database, children_of, pause, start, stop, table, wait_for, write_config

import ductwork

TICKS = os.sysconf("SC_CLK_TCK")
SETTLE = 10.0   # seconds an idle deployment runs before its CPU is counted


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (and of their threads), in seconds."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / TICKS


def tree(pid: int) -> list[int]:
    return [pid, *children_of(pid)]


def backends(db: Database) -> list[int]:
    """The Postgres server processes serving this database."""
    if db.kind != "postgres":
        return []
    store = ductwork.Store(db.url)
    try:
        with store.tx(write=False) as t:
            return [int(pid) for (pid,) in t.all("SELECT pid FROM pg_stat_activity WHERE datname = :name "
                                                   "AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
                                                   {"name": db.name})]
    finally:
        store.close()


def count(url: str, sql: str) -> int:
    store = ductwork.Store(url)
    try:
        with store.tx(write=False) as t:
            return int(t.one(sql)[0])
    finally:
        store.close()


def trigger_many(url: str, pipeline: str, n: int) -> None:
    engine = ductwork.Engine(ductwork.Store(url), ductwork.load_config(data={"database_url": url}))
    for _ in range(n):
        engine.trigger(pipeline, [1])
    engine.store.close()


def settle(url: str, runs: int) -> None:
    """Wait until every first step has run and every run is at its wait."""
    wait_for(lambda: count(url, "SELECT count(*) FROM ductwork_steps WHERE status = 'succeeded'") >= runs, 600, 0.2)
    wait_for(lambda: count(url, "SELECT count(*) FROM ductwork_steps WHERE status = 'queued' AND node = 1")
             + count(url, "SELECT count(*) FROM ductwork_branches WHERE waiting_for IS NOT NULL") >= runs, 600, 0.2)


def resume(kind: str, runs: int, tmp: Path) -> list[str]:
    db = Database(kind)
    try:
        config = write_config(tmp / f"resume-{kind}.yml", db.url, job_worker={"count": 8, "polling_timeout": 1})
        trigger_many(db.url, "BenchSleep", runs)
        sup = start(config)
        try:
            settle(db.url, runs)
        finally:
            stop(sup)
        store = ductwork.Store(db.url)
        with store.tx() as t:
            wake = float(t.one("SELECT " + ("CAST(strftime('%s','now') AS REAL)" if kind == "sqlite"
                                            else "floor(extract(epoch from now()))"))[0]) + 8
            moved = t.run("UPDATE ductwork_steps SET available_at = :wake WHERE status = 'queued' AND node = 1",
                          {"wake": wake})
        store.close()
        assert moved == runs, (moved, runs)
        sup = start(config)
        try:
            wait_for(lambda: count(db.url, "SELECT count(*) FROM ductwork_runs WHERE status = 'completed'") >= runs,
                     600, 0.05)
            done = time.time()
        finally:
            stop(sup)
        store = ductwork.Store(db.url)
        with store.tx(write=False) as t:
            late = [float(v) for (v,) in t.all("SELECT e.started_at - s.available_at FROM ductwork_executions e "
                                               "JOIN ductwork_steps s ON s.id = e.step_id WHERE s.node = 1")]
            last = float(t.one("SELECT max(finished_at) FROM ductwork_runs")[0])
        store.close()
        late.sort()
        assert done >= wake
        return [kind, f"{runs} sleeps ending in one second", f"all completed {last - wake:.2f} s after it",
                f"lateness p50 {statistics.median(late):.2f} s, p99 {late[int(0.99 * (len(late) - 1))]:.2f} s, "
                f"max {late[-1]:.2f} s"]
    finally:
        db.drop()


def idle_cpu(db: Database, config: Path, seconds: float) -> tuple[float, float]:
    """CPU seconds over ``seconds`` of an idle supervisor's process tree, and of the database's backends."""
    sup = start(config)
    try:
        pause(SETTLE)   # booted, its first polls done (and the server's caches warm)
        procs, server = tree(sup.pid), backends(db)
        before = cpu_seconds(procs), cpu_seconds(server)
        pause(seconds)
        after = cpu_seconds(procs), cpu_seconds(server)
        return after[0] - before[0], after[1] - before[1]
    finally:
        stop(sup)


def idle(kind: str, runs: int, seconds: float, tmp: Path) -> list[str]:
    empty, full = Database(kind), Database(kind)
    try:
        trigger_many(full.url, "BenchSleep", runs // 2)
        trigger_many(full.url, "BenchGate", runs - runs // 2)
        config = write_config(tmp / f"idle-full-{kind}.yml", full.url)
        sup = start(config)
        try:
            settle(full.url, runs)
        finally:
            stop(sup)
        waiting = count(full.url, "SELECT count(*) FROM ductwork_runs WHERE status = 'in_progress'")
        baseline = idle_cpu(empty, write_config(tmp / f"idle-empty-{kind}.yml", empty.url), seconds)
        loaded = idle_cpu(full, config, seconds)
        server = (f"; server {loaded[1]:.2f} s vs {baseline[1]:.2f} s" if kind == "postgres" else "")
        return [kind, f"idle {seconds:.0f} s with {waiting} runs waiting (asleep / for a signal)",
                f"process tree {loaded[0]:.2f} CPU s{server}",
                f"empty database: {baseline[0]:.2f} CPU s; waiting / empty: "
                f"{(loaded[0] + loaded[1]) / max(baseline[0] + baseline[1], 0.01):.2f}"]
    finally:
        empty.drop()
        full.drop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--idle", type=float, default=20.0)
    parser.add_argument("--engines", default="sqlite,postgres")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ductwork-bench-waits-"))
    out = []
    for kind in args.engines.split(","):
        out.append(resume(kind, args.runs, tmp))
        out.append(idle(kind, args.runs, args.idle, tmp))
    table("time: sleeps resuming together, and the idle cost of waiting runs",
          ["engine", "what", "figure", "baseline (same run)"], out)


if __name__ == "__main__":
    main()

"""Backlog scaling: does claiming cost grow with the queue? And two supervisors on one database.

    python bench/scale.py [--repeat 3] [--engines postgres,sqlite] [--big 100000] [--small 1000]

Fills a backlog of single-step runs with set-based SQL, starts 2 worker processes and an
advancer, and times how long the first 2000 steps take. Ratio big/small near 1.0 = flat.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import Database, fmt, start, stop, table, wait_for, write_config
from throughput import Cluster

import ductwork

SAMPLE = 2000


def fill_backlog(db: Database, n: int) -> None:
    import bench_app  # noqa: F401 - registers the pipelines
    ductwork.configure(database_url=db.url)
    engine = ductwork._app_engine()
    first = engine.trigger("BenchSingle", [None])  # stores the definition
    store = engine.store
    with store.tx() as t:
        digest = t.one("SELECT definition FROM ductwork_runs WHERE id = ?", (first,))[0]
        t.run("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?) "
              "INSERT INTO ductwork_runs (pipeline, definition, status, input, created_at, updated_at) "
              "SELECT 'BenchSingle', ?, 'in_progress', '[null]', {now}, {now} "
              "FROM c", (n - 1, digest))
        t.run("INSERT INTO ductwork_branches "
              "(run_id, pipeline, definition, node, status, available_at, created_at, updated_at) "
              "SELECT id, pipeline, definition, 0, 'running', {now}, {now}, {now} "
              "FROM ductwork_runs "
              "WHERE id > ?", (first,))
        t.run("INSERT INTO ductwork_steps "
              "(run_id, branch_id, pipeline, node, name, status, input, available_at, created_at) "
              "SELECT run_id, id, pipeline, 0, 'noop', 'queued', '[null]', {now}, {now} "
              "FROM ductwork_branches "
              "WHERE run_id > ?", (first,))
    if db.kind == "postgres":
        with store.tx() as t:
            t.run("ANALYZE ductwork_steps")
    store.close()


def steps_per_second(db: Database, tmp: Path, backlog: int) -> float:
    """From the first claim to the SAMPLE-th finished run, on the database clock."""
    fill_backlog(db, backlog)
    cluster = Cluster(db, tmp)
    wait_for(lambda: cluster.count("SELECT count(*) FROM ductwork_runs WHERE status = 'completed'") >= SAMPLE,
             300, 0.01)
    with cluster.store.tx(write=False) as t:
        first = t.one("SELECT min(started_at) FROM ductwork_executions")[0]
        nth = t.one("SELECT finished_at FROM ductwork_runs WHERE status = 'completed' ORDER BY finished_at "
                    "LIMIT 1 OFFSET ?", (SAMPLE - 1,))[0]
    cluster.stop()
    return SAMPLE / (nth - first)


def two_supervisors(db: Database, tmp: Path) -> float:
    fill_backlog(db, SAMPLE)
    cfg = write_config(tmp / f"two-{db.kind}.yml", db.url)
    procs = [start(cfg, env={"DUCTWORK_MACHINE_ID": f"host-{i}"}) for i in range(2)]
    store = ductwork.Store(db.url)

    def done() -> int:
        with store.tx(write=False) as t:
            return int(t.one("SELECT count(*) FROM ductwork_runs WHERE status = 'completed'")[0])
    wait_for(lambda: done() >= SAMPLE, 300, 0.01)
    with store.tx(write=False) as t:
        first = t.one("SELECT min(started_at) FROM ductwork_executions")[0]
        last = t.one("SELECT max(finished_at) FROM ductwork_runs")[0]
    for p in procs:
        stop(p)
    store.close()
    return SAMPLE / (last - first)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--engines", default="postgres,sqlite")
    parser.add_argument("--big", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=1_000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ductwork-scale-"))
    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeat):
        for kind in args.engines.split(","):
            for label, backlog in (("small", max(args.small, SAMPLE)), ("big", args.big)):
                db = Database(kind)
                try:
                    results.setdefault((kind, f"{label} backlog {backlog}: steps/s (first {SAMPLE})"), []).append(
                        steps_per_second(db, tmp, backlog))
                finally:
                    db.drop()
            db = Database(kind)
            try:
                results.setdefault((kind, f"2 supervisors, {SAMPLE} single-step runs: steps/s"), []).append(
                    two_supervisors(db, tmp))
            finally:
                db.drop()
    rows = [[k, f, fmt(v)] for (k, f), v in results.items()]
    for kind in args.engines.split(","):
        small = [x for (k, f), v in results.items() if k == kind and f.startswith("small") for x in v]
        big = [x for (k, f), v in results.items() if k == kind and f.startswith("big") for x in v]
        if small and big:
            ratio = sum(big) / len(big) / (sum(small) / len(small))
            rows.append([kind, "ratio big/small (1.0 = flat)", f"{ratio:.2f}"])
    table("backlog scaling (median [min–max])", ["engine", "figure", "value"], rows)


if __name__ == "__main__":
    main()

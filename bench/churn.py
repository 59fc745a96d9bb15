"""Churn without bloat (SPEC §18): process and prune many steps; does the database stay the same size?

    python bench/churn.py [--engines postgres,sqlite] [--steps 1000000] [--round 50000]

A cluster (2 worker processes, an advancer) runs with retention 0 for completed runs and a 1 s prune
interval. Each round queues ROUND single-step runs (set-based SQL), waits until they are processed and
pruned, and records the database's size: on Postgres the tables with their indexes and TOAST
(pg_total_relation_size, what autovacuum leaves reusable is counted as used); on SQLite the file, the
largest -wal seen during the round, and the free pages. Prints the size after the first round, the
largest after any later round and the last, and the ratio last / first (the bound: <= 2).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import threading
from pathlib import Path

from common import Database, table, wait_for
from scale import fill_backlog
from throughput import Cluster

import ductwork

MB = 1024 * 1024

SIZE = {"postgres": """SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c
                       WHERE c.relkind = 'r' AND c.relname LIKE 'ductwork%'""",
        "sqlite": "SELECT page_count * page_size, freelist_count * page_size FROM pragma_page_count, "
                  "pragma_page_size, pragma_freelist_count"}


def size(db: Database, store: ductwork.Store) -> tuple[float, float]:
    """(bytes used, bytes free inside the file: SQLite's free pages, 0 on Postgres)."""
    with store.tx(write=False) as t:
        row = t.one(SIZE[db.kind])
    return (float(row[0]), float(row[1])) if db.kind == "sqlite" else (float(row[0]), 0.0)


class WalWatch:
    """The largest -wal file seen while it runs (SQLite)."""

    def __init__(self, db: Database):
        self.path = db.url.removeprefix("sqlite:///") + "-wal"
        self.largest = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stop.wait(0.05):
            try:
                self.largest = max(self.largest, os.path.getsize(self.path))
            except OSError:
                pass

    def done(self) -> int:
        self.stop.set()
        self.thread.join()
        return self.largest


def churn(kind: str, steps: int, per_round: int, tmp: Path) -> list[list[str]]:
    db = Database(kind)
    try:
        cluster = Cluster(db, tmp, retention={"completed": 0}, pipeline_advancer={"prune_interval": 1})
        store = cluster.store
        sizes, wals = [], []
        for _ in range(max(1, steps // per_round)):
            watch = WalWatch(db) if kind == "sqlite" else None
            fill_backlog(db, per_round)
            wait_for(lambda: cluster.count("SELECT count(*) FROM ductwork_runs") == 0, 1200, 0.2)
            if watch:
                wals.append(watch.done())
            sizes.append(size(db, store))
        pruned = cluster.count("SELECT sum(value) FROM ductwork_counters WHERE name = 'pruned'")
        cluster.stop()
    finally:
        db.drop()
    first, last, largest = sizes[0][0], sizes[-1][0], max(s[0] for s in sizes[1:] or sizes)
    rows = [[kind, f"{len(sizes) * per_round} steps processed, {pruned} runs pruned", "", ""],
            [kind, "database size after round 1 / largest later / last, MB",
             f"{first / MB:.1f} / {largest / MB:.1f} / {last / MB:.1f}", f"{last / first:.2f} (<= 2)"]]
    if kind == "sqlite":
        rows.append([kind, "free pages in the file after the last round, MB", f"{sizes[-1][1] / MB:.1f}", ""])
        rows.append([kind, "largest -wal seen, MB", f"{max(wals) / MB:.1f}", ""])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engines", default="postgres,sqlite")
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--round", type=int, default=50_000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ductwork-churn-"))
    rows = []
    for kind in args.engines.split(","):
        rows += churn(kind, args.steps, args.round, tmp)
    table("churn: processed and pruned, rounds of single-step runs (retention 0)", ["engine", "figure", "value",
                                                                                    "ratio"], rows)


if __name__ == "__main__":
    main()

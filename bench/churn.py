"""Churn without bloat (SPEC §18): process and prune many steps; does the database stay the same size?

    python bench/churn.py [--engines postgres,sqlite] [--steps 1000000] [--round 50000]

Postgres runs in a private cluster of its own (initdb, autovacuum on with its defaults: the shared test
server may have it off), once with migration 2's per-table storage settings and once with them reset to
the server's defaults, for comparison. A ductwork cluster (2 worker processes, an advancer) runs with
retention 0 for completed runs and a 1 s prune interval. Each round queues ROUND single-step runs
(set-based SQL), waits until they are processed and pruned, and records the database's size: on Postgres
the tables with their indexes and TOAST (pg_total_relation_size; what autovacuum leaves reusable counts as
used); on SQLite the file, the largest -wal seen during the round, and the free pages. Prints the size
after the first round, the largest after any later round and the last, the ratio last / first, and the
size along the way (a plateau, not a line, is what bounded means here).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import uuid
from pathlib import Path

from common import Database, table, wait_for
from scale import fill_backlog
from throughput import Cluster

import ductwork

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pgcluster import PrivateCluster  # noqa: E402

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


class ClusterDatabase(Database):
    """A database in a private Postgres cluster (with autovacuum on)."""

    def __init__(self, server: PrivateCluster, defaults: bool):
        self.kind = "postgres"
        self.name = f"churn_{uuid.uuid4().hex[:8]}"
        import pg8000.dbapi
        admin = pg8000.dbapi.connect(user="postgres", host="127.0.0.1", port=server.port, database="postgres")
        admin.autocommit = True
        admin.cursor().execute(f"CREATE DATABASE {self.name}")
        admin.close()
        self.url = f"postgresql://postgres@127.0.0.1:{server.port}/{self.name}"
        store = ductwork.Store(self.url)
        ductwork.migrate_store(store)
        if defaults:   # the comparison: the server's storage defaults instead of migration 2's
            with store.tx() as t:
                for table in STORAGE_KEYS:
                    t.run(f"ALTER TABLE {table} RESET ({', '.join(STORAGE_KEYS[table])})")
        store.close()

    def drop(self) -> None:
        pass   # the whole private cluster goes


STORAGE_KEYS = {table: [item.split("=")[0].strip() for item in settings.split(",")]
                for table, settings in ductwork._STORAGE.items()}


def churn(kind: str, steps: int, per_round: int, tmp: Path, db: Database | None = None,
          label: str = "") -> list[list[str]]:
    kind_label = kind + label
    db = db or Database(kind)
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
    every = max(1, len(sizes) // 5)
    along = " ".join(f"{s[0] / MB:.0f}" for s in sizes[every - 1::every])
    kind = kind_label
    rows = [[kind, f"{len(sizes) * per_round} steps processed, {pruned} runs pruned", "", ""],
            [kind, "database size after round 1 / largest later / last, MB",
             f"{first / MB:.1f} / {largest / MB:.1f} / {last / MB:.1f}", f"{last / first:.2f}"],
            [kind, f"size after every {every * per_round} steps, MB", along, ""]]
    if kind.startswith("sqlite"):
        rows.append([kind, "free pages in the file after the last round, MB", f"{sizes[-1][1] / MB:.1f}", ""])
        rows.append([kind, "largest -wal seen, MB", f"{max(wals) / MB:.1f}", ""])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engines", default="postgres,sqlite")
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--round", type=int, default=50_000)
    parser.add_argument("--naptime", type=int, default=60, help="the private cluster's autovacuum_naptime, s")
    parser.add_argument("--settings", default="ours,defaults", help="ours, defaults or both (Postgres)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ductwork-churn-"))
    rows = []
    for kind in args.engines.split(","):
        if kind != "postgres":
            rows += churn(kind, args.steps, args.round, tmp)
            continue
        server = PrivateCluster()
        try:
            server.create()
            with open(server.data / "postgresql.conf", "a") as fh:
                fh.write(f"autovacuum_naptime = {args.naptime}\n")
            server.start()
            for defaults in [choice == "defaults" for choice in args.settings.split(",")]:
                rows += churn(kind, args.steps, args.round, tmp, ClusterDatabase(server, defaults),
                              f" ({'server defaults' if defaults else 'migration 2'}, naptime {args.naptime} s)")
        finally:
            server.remove()
    table("churn: processed and pruned, rounds of single-step runs (retention 0)", ["engine", "figure", "value",
                                                                                    "ratio"], rows)


if __name__ == "__main__":
    main()

"""The physical floor on this Postgres: a raw pg8000 claim+complete loop, no ductwork.

    python bench/floor.py [--jobs 4000] [--clients 2]

One job per transaction (SKIP LOCKED claim and completion in one commit), and 10 per
transaction. Same connection settings (pg8000.native, prepared statements) as ductwork.
"""
from __future__ import annotations

import argparse
import threading
import time

from common import Database, record, table

import ductwork


def run(db: Database, jobs: int, clients: int, batch: int) -> float:
    store = ductwork.Store(db.url)
    with store.tx() as t:
        t.run("CREATE TABLE floor_jobs (id BIGSERIAL PRIMARY KEY, status TEXT NOT NULL DEFAULT 'queued', payload TEXT)")
        t.run("CREATE INDEX floor_jobs_queued ON floor_jobs (id) WHERE status = 'queued'")
        t.run("INSERT INTO floor_jobs (payload) SELECT 'x' FROM generate_series(1, ?)", (jobs,))
    store.close()

    def worker() -> None:
        s = ductwork.Store(db.url)
        while True:
            with s.tx() as t:
                done = t.all("UPDATE floor_jobs SET status = 'done' "
                             "WHERE id IN (SELECT id FROM floor_jobs "
                             "WHERE status = 'queued' ORDER BY id LIMIT ? FOR UPDATE SKIP LOCKED) "
                             "RETURNING id", (batch,))
            if not done:
                break
        s.close()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    took = time.perf_counter() - t0
    with ductwork.Store(db.url).tx() as t:
        t.run("DROP TABLE floor_jobs")
    return jobs / took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=4000)
    parser.add_argument("--clients", type=int, default=2)
    args = parser.parse_args()
    db = Database("postgres")
    try:
        one, ten = run(db, args.jobs, args.clients, 1), run(db, args.jobs, args.clients, 10)
    finally:
        db.drop()
    table(f"physical floor ({args.clients} clients)", ["loop", "value"],
          [["raw pg8000, 1 job per commit", f"{one:.0f} jobs/s"],
           ["raw pg8000, 10 jobs per commit", f"{ten:.0f} jobs/s"]])
    record("raw pg8000", "1 job per commit", [one])


if __name__ == "__main__":
    main()

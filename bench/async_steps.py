"""Async steps (SPEC §19): STEPS steps of `await asyncio.sleep(0.1)` on one worker process, against the same
number of sync steps of a 0.1 s wait on that process's worker threads, in the same run.

    python bench/async_steps.py [--engines sqlite,postgres] [--steps 1000] [--nap 0.1] [--repeat 3]

One foreground worker (`run --role worker`, job_worker.count 4, async_count 1000 / 100) and an advancer; the
backlog is written first, held back, then released at once. Printed: seconds from the release until every run
completed, steps/s, and the ratios. The sync figure is bound by its threads (count x 1 / nap steps/s); the async
one by the loop's capacity (async_count at once) and by the claims and commits around it.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import bench_app  # noqa: F401 - the pipelines
from common import RUNS_LEFT, Database, pause, stop, table, wait_for, write_config

import ductwork

COUNT = 4   # worker threads (job_worker.count)


def backlog(url: str, pipeline: str, steps: int, nap: float) -> None:
    ductwork.configure(database_url=url)
    engine = ductwork._app_engine()
    for _ in range(steps):
        engine.trigger(pipeline, [nap])
    with engine.store.tx() as t:
        t.run("UPDATE ductwork_steps SET available_at = available_at + 3600")
    engine.store.close()


def measure(kind: str, tmp: Path, pipeline: str, steps: int, nap: float, async_count: int) -> float:
    """Seconds from the release of the backlog until its last run completed."""
    db = Database(kind)
    try:
        backlog(db.url, pipeline, steps, nap)
        cfg = write_config(tmp / f"{pipeline}.yml", db.url, job_worker={"count": COUNT, "async_count": async_count})
        procs = [subprocess.Popen([sys.executable, str(Path(ductwork.__file__)), "run", "--role", role, "-c",
                                   str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True) for role in ("worker", "advancer")]
        store = ductwork.Store(db.url)
        try:
            wait_for(lambda: one(store, "SELECT count(*) FROM ductwork_processes") >= 2, 60, 0.05)
            pause(0.5)
            with store.tx() as t:
                released = float(t.one("SELECT {now}")[0])
                t.run("UPDATE ductwork_steps SET available_at = available_at - 3600 WHERE status = 'queued'")
                t.notify(ductwork.CH_JOBS, pipeline)
            wait_for(lambda: one(store, RUNS_LEFT) == 0,
                     1800, 0.02)
            last = one(store, "SELECT max(finished_at) FROM ductwork_runs")
            return float(last) - released
        finally:
            for p in procs:
                stop(p)
            store.close()
    finally:
        db.drop()


def one(store: ductwork.Store, sql: str):
    with store.tx(write=False) as t:
        return t.one(sql)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="sqlite,postgres")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--nap", type=float, default=0.1)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ductwork-bench-async-"))
    for kind in args.engines.split(","):
        cases = {f"sync, {COUNT} threads": ("BenchNap", 100), "async, async_count 100": ("BenchAsyncNap", 100),
                 f"async, async_count {args.steps}": ("BenchAsyncNap", args.steps)}
        took = {label: statistics.median(measure(kind, tmp, pipeline, args.steps, args.nap, capacity)
                                         for _ in range(args.repeat))
                for label, (pipeline, capacity) in cases.items()}
        base = took[f"sync, {COUNT} threads"]
        table(f"{kind}: {args.steps} steps of a {args.nap:g}s wait on one worker process (medians of {args.repeat})",
              ["steps", "seconds", "steps/s", "speed-up over sync"],
              [[label, f"{s:.2f}", f"{args.steps / s:.0f}", f"{base / s:.1f}x"] for label, s in took.items()])
        ideal = args.steps * args.nap / args.steps   # (every step at once: one nap)
        print(f"{kind}: async with room for all: {took[f'async, async_count {args.steps}']:.2f}s "
              f"(one nap alone: {ideal:.2f}s; the rest is claims and commits)")


if __name__ == "__main__":
    main()

"""Run control figures (SPEC §14): a bulk cancel of 10,000 runs against cancelling them one by one, and what
the cancel's run lock costs the commit path (quick steps per second with it, and with it taken out).

    python bench/cancel.py [--runs N] [--engines sqlite,postgres] [--repeat N]
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time

import bench_app  # noqa: F401  (registers the pipelines)
from common import Database, fmt, record, table

import ductwork


def trigger_many(engine: ductwork.Engine, n: int) -> list[int]:
    """n runs of BenchFan in progress, each with its first step queued (no worker runs)."""
    return [engine.trigger("BenchFan", [3]) for _ in range(n)]


def bulk_vs_one_by_one(kind: str, runs: int) -> list[list[str]]:
    db = Database(kind)
    try:
        engine = ductwork.Engine(ductwork.Store(db.url), ductwork.load_config(data={"database_url": db.url}))
        trigger_many(engine, runs)
        t0 = time.perf_counter()
        cancelled = engine.cancel(pipeline="BenchFan", reason="bench")
        bulk = time.perf_counter() - t0
        assert len(cancelled) == runs, (len(cancelled), runs)
        sample = max(runs // 10, 1)   # one by one: a tenth of them, scaled up
        ids = trigger_many(engine, sample)
        t0 = time.perf_counter()
        for run_id in ids:
            assert engine.cancel([run_id])
        single = (time.perf_counter() - t0) * runs / sample
        record(f"ductwork ({kind})", f"bulk cancel of {runs} runs, s", [bulk])
        return [[kind, f"cancel {runs} runs in progress", f"{bulk:.2f} s ({runs / bulk:.0f} runs/s)",
                 f"one by one: {single:.1f} s; bulk / one by one: {bulk / single:.3f}"]]
    finally:
        db.drop()


def left_in_progress(url: str) -> int:
    store = ductwork.Store(url)
    try:
        with store.tx(write=False) as t:
            return int(t.one("SELECT count(*) FROM ductwork_runs WHERE status = 'in_progress'")[0])
    finally:
        store.close()


def throughput(url: str, steps: int, threads: int) -> float:
    """Quick single-step runs through one in-process runtime (forking: none) of ``threads`` workers: per s."""
    engine = ductwork.Engine(ductwork.Store(url), ductwork.load_config(data={"database_url": url}))
    for _ in range(steps):
        engine.trigger("BenchSingle", [1])
    engine.store.close()
    config = ductwork.load_config(data={"database_url": url, "job_worker": {"count": threads, "polling_timeout": 0.05},
                                        "pipeline_advancer": {"polling_timeout": 0.05}})
    runtime = ductwork.Runtime(config, "combined", ["BenchSingle"])
    serving = threading.Thread(target=runtime.serve, daemon=True)
    t0 = time.perf_counter()
    serving.start()
    while left_in_progress(url):
        time.sleep(0.02)
    elapsed = time.perf_counter() - t0
    runtime.signals.put(15)
    serving.join(30)
    return steps / elapsed


def without_run_locks(patched: bool) -> None:
    """Take the run locks out of the commit path (its first statement's, and the statement of their own that a
    commit without a success takes), or put them back."""
    ductwork.BulkSQL.SHARE_RUNS["postgres"] = "" if patched else SHARE_RUNS
    ductwork.Engine._share_runs = staticmethod(lambda t, run_ids: None) if patched else SHARE_STATEMENT
    ductwork.BulkSQL.steps_succeeded.cache_clear()


SHARE_RUNS = ductwork.BulkSQL.SHARE_RUNS["postgres"]
SHARE_STATEMENT = ductwork.Engine.__dict__["_share_runs"]   # (the staticmethod itself)


def lock_cost(kind: str, steps: int, repeat: int) -> list[list[str]]:
    """The commit path with the run locks and with them taken out, alternating."""
    with_lock, without = [], []
    for _ in range(repeat):
        for patched, into in ((False, with_lock), (True, without)):
            db = Database(kind)
            try:
                without_run_locks(patched)
                into.append(throughput(db.url, steps, 8))
            finally:
                without_run_locks(False)
                db.drop()
    record(f"ductwork ({kind})", "quick steps per s with the cancel lock", with_lock)
    ratio = statistics.median(with_lock) / statistics.median(without)
    return [[kind, f"{steps} quick steps, 8 worker threads, per s", fmt(with_lock),
             f"without the run lock: {fmt(without)}; with / without: {ratio:.2f}"]]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--engines", default="sqlite,postgres")
    args = parser.parse_args()
    out: list[list[str]] = []
    for kind in args.engines.split(","):
        out += bulk_vs_one_by_one(kind, args.runs)
        if kind == "postgres":   # (SQLite takes no run lock: one writer at a time orders commits and cancels)
            out += lock_cost(kind, args.steps, args.repeat)
    table("run control: bulk cancel, and the cancel lock's cost on the commit path (medians)",
          ["engine", "what", "figure", "baseline (same run)"], out)


if __name__ == "__main__":
    main()

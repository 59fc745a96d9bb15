"""The connection pool against one connection per thread (SPEC §13), in the same run:

    python bench/pool.py [--repeat 3] [--engines postgres] [--steps 2000]

Each figure of bench/throughput.py (2 worker processes of 4 threads and one advancer of 2
threads, real processes) runs with the default pool (pool_size 2: at most 3 connections per
process with the listener) and with a pool as large as the process's threads (pool_size 8: every
thread keeps a connection of its own, as before the pool), interleaved; the ratios are pool /
per-thread (above 1 is better for per s, below 1 for ms and s). The target: >= 0.97 (per s),
<= 1.03 (ms, s).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import Database, compiled_copy, fmt, table
from throughput import Cluster, chain_latency, fan_in, throughput_single, throughput_warm

SETTINGS = {"pool 2 (default)": {"pool_size": 2}, "one per thread": {"pool_size": 8}}


def figures(db: Database, tmp: Path, steps: int, only: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    if "single" in only:
        out[f"{steps} single-step runs, steps/s"] = throughput_single(db, tmp, steps)
    if "warm" in only:
        out[f"{steps} single-step runs, warm workers, steps/s"] = throughput_warm(db, tmp, steps)
    if "chain" in only:
        out["10-step chain median, ms"] = statistics.median(chain_latency(db, tmp, n=60))
    if "fan" in only:
        out["fan-out 1000 + fan-in, s"] = fan_in(db, tmp)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--engines", default="postgres")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--only", default="single,warm,chain,fan")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ductwork-pool-"))
    Cluster.compiled = compiled_copy(tmp)
    results: dict[tuple[str, str, str], list[float]] = {}
    for _ in range(args.repeat):   # interleaved: both settings see the same machine
        for kind in args.engines.split(","):
            for name, settings in SETTINGS.items():
                Cluster.settings = settings
                for figure in args.only.split(","):   # each figure on a fresh database of its own
                    db = Database(kind)
                    try:
                        for key, value in figures(db, tmp, args.steps, [figure]).items():
                            results.setdefault((kind, key, name), []).append(value)
                    finally:
                        db.drop()
    pooled, per_thread = SETTINGS
    rows = []
    for kind, figure in dict.fromkeys((k, f) for k, f, _ in results):
        a, b = results[(kind, figure, pooled)], results[(kind, figure, per_thread)]
        ratio = statistics.median(a) / statistics.median(b)
        rows.append([kind, figure, fmt(a, digits=1), fmt(b, digits=1), f"{ratio:.2f}"])
    table("the pool against one connection per thread (median [min-max]; ratio of medians = pool / per thread)",
          ["engine", "figure", pooled, per_thread, "ratio"], rows)


if __name__ == "__main__":
    main()

"""Work figures: steps/s, 10-step chain latency, fan-out/fan-in, backlog scaling.

    python bench/throughput.py [--repeat 3] [--engines postgres,sqlite] [--steps 2000]

Each figure runs real processes: 2 foreground job workers (`--role worker`, 4 threads each)
and one advancer (`--role advancer`) on a fresh database, started as the deployment files
start them (`python -m ductwork` on compiled bytecode; `--form script` for `python ductwork.py`).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import RUNS_LEFT, Database, compiled_copy, fmt, pause, record, start, stop, table, wait_for, write_config

import ductwork


class Cluster:
    """2 worker processes + 1 advancer process against one database."""

    compiled: Path | None = None   # the folder of a compiled copy (python -m ductwork), or None: the script
    settings: dict = {}            # config of every cluster of this run (bench/pool.py sets pool_size)

    def __init__(self, db: Database, tmp: Path, workers: int = 2, **config):
        self.cfg = write_config(tmp / f"cluster-{db.kind}.yml", db.url, **{**self.settings, **config})
        self.procs = [start(self.cfg, "run", "--role", "worker", compiled=self.compiled) for _ in range(workers)]
        self.procs.append(start(self.cfg, "run", "--role", "advancer", compiled=self.compiled))
        store = ductwork.Store(db.url)
        self.store = store
        wait_for(lambda: self.count("SELECT count(*) FROM ductwork_processes") == workers + 1, 30)
        pause(0.5)

    def count(self, sql: str, params=()) -> int:
        with self.store.tx(write=False) as t:
            return int(t.one(sql, params)[0])

    def stop(self) -> None:
        for p in self.procs:
            stop(p)
        self.store.close()


def unfinished(cluster: Cluster) -> int:
    """1 while a run is in progress, 0 once none is (common.RUNS_LEFT: the probe must not load what it times)."""
    return cluster.count(RUNS_LEFT)


def throughput_single(db: Database, tmp: Path, steps: int) -> float:
    """A backlog of single-step runs, then the cluster starts: steps/s from the first claim to
    the last run finished, both read off the database clock."""
    import bench_app  # noqa: F401 - registers the pipelines
    ductwork.configure(database_url=db.url)
    engine = ductwork._app_engine()
    for _ in range(steps):
        engine.trigger("BenchSingle", [None])
    cluster = Cluster(db, tmp)
    wait_for(lambda: unfinished(cluster) == 0, 300, 0.01)
    with cluster.store.tx(write=False) as t:
        first = t.one("SELECT min(started_at) FROM ductwork_executions")[0]
        last = t.one("SELECT max(finished_at) FROM ductwork_runs")[0]
    cluster.stop()
    return steps / (last - first)


def throughput_warm(db: Database, tmp: Path, steps: int) -> float:
    """The same backlog, released at once to a cluster already running and idle: steps/s from
    the release (one transaction, with its wake-up) to the last run seen finished, wall clock.
    What a running deployment sustains, without the processes' boot in the figure."""
    import bench_app  # noqa: F401 - registers the pipelines
    ductwork.configure(database_url=db.url)
    engine = ductwork._app_engine()
    for _ in range(steps):
        engine.trigger("BenchSingle", [None])
    with engine.store.tx() as t:  # held back while the cluster boots
        t.run("UPDATE ductwork_steps SET available_at = available_at + 3600")
    cluster = Cluster(db, tmp)
    t0 = time.perf_counter()
    with engine.store.tx() as t:
        t.run("UPDATE ductwork_steps SET available_at = {now} WHERE status = 'queued'")
        t.notify(ductwork.CH_JOBS, "BenchSingle")
    wait_for(lambda: unfinished(cluster) == 0, 300, 0.002)
    took = time.perf_counter() - t0
    cluster.stop()
    return steps / took


def throughput_expand(db: Database, tmp: Path, steps: int) -> float:
    return (steps + 2) / fan_in(db, tmp, steps)  # the fan, its `steps` children and the collapse


def chain_latency(db: Database, tmp: Path, n: int = 20) -> list[float]:
    import bench_app
    ductwork.configure(database_url=db.url)
    cluster = Cluster(db, tmp)
    engine = ductwork._app_engine()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        run_id = engine.trigger("BenchChain", [1])
        wait_for(lambda r=run_id: cluster.count("SELECT count(*) FROM ductwork_runs "
                                                "WHERE id = ? AND status = 'completed'", (r,)),
                 30, 0.0005)
        out.append((time.perf_counter() - t0) * 1000)
    cluster.stop()
    del bench_app
    return out


def fan_in(db: Database, tmp: Path, width: int = 1000) -> float:
    import bench_app
    ductwork.configure(database_url=db.url)
    cluster = Cluster(db, tmp)
    t0 = time.perf_counter()
    run = bench_app.BenchFan.trigger(width)
    wait_for(lambda: unfinished(cluster) == 0, 300, 0.002)
    took = time.perf_counter() - t0
    assert run.refresh().output == width
    cluster.stop()
    return took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--engines", default="postgres,sqlite")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--only", default="single,warm,expand,chain,fan")
    parser.add_argument("--form", choices=["module", "script"], default="module")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ductwork-tp-"))
    Cluster.compiled = compiled_copy(tmp) if args.form == "module" else None
    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeat):  # interleaved repetitions
        for kind in args.engines.split(","):
            for figure in args.only.split(","):
                db = Database(kind)
                try:
                    if figure == "single":
                        results.setdefault((kind, f"{args.steps} single-step runs, steps/s"), []).append(
                            throughput_single(db, tmp, args.steps))
                    elif figure == "warm":
                        results.setdefault((kind, f"{args.steps} single-step runs, warm workers, steps/s"), []).append(
                            throughput_warm(db, tmp, args.steps))
                    elif figure == "expand":
                        results.setdefault((kind, f"expand {args.steps} + collapse, steps/s"), []).append(
                            throughput_expand(db, tmp, args.steps))
                    elif figure == "chain":
                        lat = chain_latency(db, tmp)
                        results.setdefault((kind, "10-step chain median, ms"), []).append(statistics.median(lat))
                        results.setdefault((kind, "10-step chain p90, ms"), []).append(
                            sorted(lat)[int(len(lat) * 0.9) - 1])
                    elif figure == "fan":
                        results.setdefault((kind, "fan-out 1000 + fan-in, s"), []).append(fan_in(db, tmp))
                finally:
                    db.drop()
    table("work (median [min–max] over repetitions)", ["engine", "figure", "value"],
          [[k, f, fmt(v, digits=2 if "s" == f[-1] else 1)] for (k, f), v in results.items()])
    for (kind, figure), values in results.items():
        record(f"ductwork ({kind})", figure, values)


if __name__ == "__main__":
    main()

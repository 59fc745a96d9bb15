"""A big database stays fast (SPEC §18): a million finished runs kept, then the same figures as on an
empty database, measured in the same run.

    python bench/bigdb.py [--engines postgres,sqlite] [--runs 1000000] [--sqlite-runs 200000] [--repeat 3]

For each engine: build the finished runs with set-based SQL (3 steps and 3 executions each; 1 % halted, whose
last step failed), VACUUM ANALYZE as autovacuum would have, then on the empty and on the big database:
  - claim throughput: a backlog of 5000 single-step runs, 2 worker processes and an advancer, steps/s from
    the first claim to the last finished run (database clock);
  - status (the report, in process; and the `status` command, whole process);
  - every dashboard page (data + HTML, in process) and a /metrics scrape.
Then claim throughput again while `prune` deletes the big database's runs (retention 0), against the same
figure without it. Targets at 1M runs on Postgres: each page and /metrics <= 150 ms, status <= 300 ms,
claim ratios >= 0.9. First, on empty databases, what the counts cost the claim path: the rollups (target
<= 3 %).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, Database, fmt, table, wait_for, write_config
from scale import fill_backlog
from throughput import Cluster

import ductwork

SAMPLE = 5000   # steps per claim-throughput figure (a second or so of work: boot skew and noise stay small)
CALLS = 7      # timings: the median of this many calls, after one warm-up call
DAY = 86400.0
CHUNK = 100_000   # runs built per transaction

# A finished run's rows, set-based: :n runs finished over the last six days (inside the default retention
# of seven), one branch and three steps and executions each, every hundredth run halted on its last step.
SERIES = {"postgres": "SELECT g AS n FROM generate_series(1, :n) AS g",
          "sqlite": "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < :n) SELECT n FROM c"}
BUILD = [
    """INSERT INTO ductwork_runs (pipeline, definition, status, input, output, halt_reasons, created_at, updated_at,
                                  finished_at)
       SELECT 'BenchThree', :digest, CASE WHEN s.n % 100 = 0 THEN 'halted' ELSE 'completed' END, '[1]',
              CASE WHEN s.n % 100 = 0 THEN NULL ELSE '1' END,
              CASE WHEN s.n % 100 = 0 THEN '["job_retries_exhausted"]' ELSE '[]' END,
              s.t, s.t + 0.05, s.t + 0.05
       FROM (SELECT n, CAST(:start AS DOUBLE PRECISION) + n * CAST(:spacing AS DOUBLE PRECISION) AS t
             FROM ({series}) AS g) AS s""",
    """INSERT INTO ductwork_branches (run_id, pipeline, definition, node, status, output, halt_reason, available_at,
                                      created_at, updated_at)
       SELECT id, pipeline, definition, 2, status, output,
              CASE WHEN status = 'halted' THEN 'job_retries_exhausted' END, finished_at, created_at, finished_at
       FROM ductwork_runs
       WHERE id > :mark""",
    """INSERT INTO ductwork_steps (run_id, branch_id, pipeline, node, name, status, input, output, attempts, error,
                                   halt_reason, available_at, created_at, finished_at)
       SELECT b.run_id, b.id, b.pipeline, k.node, 'noop',
              CASE WHEN b.status = 'halted' AND k.node = 2 THEN 'failed' ELSE 'succeeded' END, '[1]', '1', 1,
              CASE WHEN b.status = 'halted' AND k.node = 2 THEN 'RuntimeError: the vendor said no' END,
              CASE WHEN b.status = 'halted' AND k.node = 2 THEN 'job_retries_exhausted' END,
              b.created_at, b.created_at + k.node * 0.01, b.created_at + k.node * 0.01 + 0.01
       FROM ductwork_branches b
       CROSS JOIN (SELECT 0 AS node UNION ALL SELECT 1 UNION ALL SELECT 2) AS k
       WHERE b.run_id > :mark""",
    """INSERT INTO ductwork_executions (step_id, run_id, attempt, outcome, error, started_at, finished_at)
       SELECT id, run_id, 1, CASE WHEN status = 'failed' THEN 'failed' ELSE 'succeeded' END, error,
              finished_at - 0.005, finished_at
       FROM ductwork_steps
       WHERE run_id > :mark""",
]


def build(db: Database, runs: int) -> float:
    """Add ``runs`` finished runs; returns the seconds it took (vacuum and analyze included)."""
    import bench_app  # noqa: F401 - registers the pipelines
    ductwork.configure(database_url=db.url)
    engine = ductwork._app_engine()
    started = time.monotonic()
    first = engine.trigger("BenchThree", [1])    # stores the definition; left in progress (a live run)
    with engine.store.tx() as t:
        digest = t.one("SELECT definition FROM ductwork_runs WHERE id = :id", {"id": first})[0]
        now = float(t.one("SELECT {now}")[0])
    spacing = 6 * DAY / runs
    for done in range(0, runs, CHUNK):   # a transaction per chunk: each statement well inside a socket timeout
        n = min(CHUNK, runs - done)
        with engine.store.tx() as t:
            mark = int(t.one("SELECT max(id) FROM ductwork_runs")[0])
            params = {"n": n, "digest": digest, "start": now - 6 * DAY + done * spacing, "spacing": spacing,
                      "mark": mark}
            for statement in BUILD:
                t.run(statement.replace("{series}", SERIES[db.kind]), params)
    ductwork.roll_up_counts(engine.store, wait=True)   # what an advancer does within prune_interval
    maintain(db)
    engine.store.close()
    return time.monotonic() - started


def maintain(db: Database) -> None:
    """What autovacuum (or, on SQLite, the planner's statistics) would have done by now."""
    if db.kind == "postgres":
        import pg8000.dbapi
        info = ductwork.parse_database_url(db.url)
        conn = pg8000.dbapi.connect(user=info.user, password=info.password, host=info.host, port=info.port,
                                    database=info.database)
        conn.autocommit = True
        conn.cursor().execute("VACUUM ANALYZE")
        conn.close()
    else:
        store = ductwork.Store(db.url)
        with store.tx() as t:
            t.run("ANALYZE")
        store.close()


def claim_rate(db: Database, tmp: Path, **config) -> float:
    """Steps/s of a fresh backlog of SAMPLE single-step runs, from its first claim to its last finished run."""
    store = ductwork.Store(db.url)
    with store.tx(write=False) as t:
        run_mark = int(t.one("SELECT coalesce(max(id), 0) FROM ductwork_runs")[0])
        execution_mark = int(t.one("SELECT coalesce(max(id), 0) FROM ductwork_executions")[0])
    fill_backlog(db, SAMPLE)
    cluster = Cluster(db, tmp, **config)
    done = "SELECT count(*) FROM ductwork_runs WHERE status = 'completed' AND pipeline = 'BenchSingle' AND id > ?"
    wait_for(lambda: cluster.count(done, (run_mark,)) >= SAMPLE, 300, 0.01)
    with store.tx(write=False) as t:
        first = t.one("SELECT min(started_at) FROM ductwork_executions WHERE id > ?", (execution_mark,))[0]
        last = t.one("SELECT max(finished_at) FROM ductwork_runs WHERE pipeline = 'BenchSingle' AND id > ?",
                     (run_mark,))[0]
    cluster.stop()
    store.close()
    return SAMPLE / (last - first)


def timed(fn) -> float:
    """The median milliseconds of CALLS calls of ``fn`` (after a warm-up call)."""
    fn()
    times = []
    for _ in range(CALLS):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def page(engine: ductwork.Engine, path: str, **query: str):
    def render() -> str:
        title, data, renderer = ductwork.dashboard_route(engine, path, query)
        return renderer(data)
    return render


def status_command(db: Database, tmp: Path):
    config = write_config(tmp / f"status-{db.kind}.yml", db.url)

    def run() -> None:
        subprocess.run([sys.executable, "-m", "ductwork", "-c", str(config), "status"], check=True, cwd=str(ROOT),
                       stdout=subprocess.DEVNULL)
    return run


def figures(db: Database, tmp: Path) -> dict[str, float]:
    """Milliseconds of status, of each dashboard page and of a /metrics scrape."""
    import bench_app  # noqa: F401
    config = ductwork.load_config(data={"database_url": db.url})
    store = ductwork.Store(db.url)
    engine = ductwork.Engine(store, config)
    with store.tx(write=False) as t:
        middle = t.one("SELECT id FROM ductwork_runs ORDER BY id LIMIT 1 OFFSET "
                       "(SELECT count(*) / 2 FROM ductwork_runs)")[0]
    out = {
        "status report (in process), ms": timed(lambda: ductwork.status_report(engine)),
        "status command (whole process, -m), ms": timed(status_command(db, tmp)),
        "dashboard overview, ms": timed(page(engine, "/")),
        "dashboard runs, ms": timed(page(engine, "/runs")),
        "dashboard runs ?status=halted, ms": timed(page(engine, "/runs", status="halted")),
        "dashboard runs ?pipeline&status, ms": timed(page(engine, "/runs", pipeline="BenchThree",
                                                          status="completed")),
        "dashboard runs, page 20, ms": timed(page(engine, "/runs", page="20")),
        "dashboard errors, ms": timed(page(engine, "/errors")),
        "dashboard errors ?pipeline, ms": timed(page(engine, "/errors", pipeline="BenchThree")),
        "dashboard run page, ms": timed(page(engine, f"/runs/{middle}")),
        "/metrics scrape, ms": timed(lambda: ductwork.dashboard_metrics(engine)),
    }
    store.close()
    return out


def claim_rate_while_pruning(db: Database, tmp: Path) -> float:
    """claim_rate() while `prune --completed 0 --halted 0` deletes the big database's runs."""
    config = write_config(tmp / f"prune-{db.kind}.yml", db.url)
    pruner = subprocess.Popen([sys.executable, "-m", "ductwork", "-c", str(config), "prune", "--completed", "0",
                               "--halted", "0"], cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    store = ductwork.Store(db.url)
    with store.tx(write=False) as t:
        before = int(t.one("SELECT sum(value) FROM ductwork_counters WHERE name = 'pruned'")[0] or 0)

    def pruning() -> bool:
        with store.tx(write=False) as t:
            return int(t.one("SELECT sum(value) FROM ductwork_counters WHERE name = 'pruned'")[0] or 0) > before
    wait_for(pruning, 60, 0.05)
    try:
        rate = claim_rate(db, tmp)
        assert pruner.poll() is None, "the prune ended before the measurement did: build more runs"
    finally:
        pruner.terminate()
        pruner.wait(30)
        store.close()
    return rate


# The counts cost the commit path nothing (they are read from rows and rolled up); what they cost is the
# rollup's brief lock, every prune_interval: measured with a rollup twice a second against none at all.
ROLLUPS = {"with": {"pipeline_advancer": {"prune_interval": 0.5}},
           "without": {"pipeline_advancer": {"prune_interval": 3600}}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engines", default="postgres,sqlite")
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--sqlite-runs", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--counting-only", action="store_true", help="only what the counts' rollups cost")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ductwork-bigdb-"))
    for kind in args.engines.split(","):
        counting: dict[str, list[float]] = {"with": [], "without": []}
        for _ in range(args.repeat):
            for label in counting:
                db = Database(kind)
                try:
                    counting[label].append(claim_rate(db, tmp, **ROLLUPS[label]))
                finally:
                    db.drop()
        cost = 1 - statistics.median(counting["with"]) / statistics.median(counting["without"])
        table(f"{kind}: the counts' rollups (twice a second, against none) on the claim path ({SAMPLE} "
              "single-step runs, empty databases)",
              ["figure", "with rollups", "without", "cost"],
              [["claim throughput, steps/s", fmt(counting["with"]), fmt(counting["without"]), f"{cost:.1%}"]])
        if args.counting_only:
            continue
        runs = args.runs if kind == "postgres" else args.sqlite_runs
        empty, big = Database(kind), Database(kind)
        try:
            seconds = build(big, runs)
            print(f"{kind}: built {runs} finished runs ({3 * runs} steps, {3 * runs} executions) in {seconds:.0f} s",
                  flush=True)
            rates: dict[str, list[float]] = {"empty": [], "big": []}
            for _ in range(args.repeat):   # interleaved: the machine's load drifts alike for both
                rates["empty"].append(claim_rate(empty, tmp))
                rates["big"].append(claim_rate(big, tmp))
            on_empty, on_big = figures(empty, tmp), figures(big, tmp)
            pruning = [claim_rate_while_pruning(big, tmp) for _ in range(args.repeat)]
            without = [claim_rate(big, tmp) for _ in range(args.repeat)]
        finally:
            empty.drop()
            big.drop()
        ratio = statistics.median(rates["big"]) / statistics.median(rates["empty"])
        rows = [["claim throughput, steps/s", fmt(rates["empty"]), fmt(rates["big"]), f"{ratio:.2f}", ">= 0.9"]]
        target = {"postgres": 150.0, "sqlite": None}[kind]
        for name, ms in on_big.items():
            goal = "<= 300" if name.startswith("status report") and kind == "postgres" else (
                f"<= {target:.0f}" if target and not name.startswith("status") else "")
            rows.append([name, f"{on_empty[name]:.1f}", f"{ms:.1f}", f"{ms / on_empty[name]:.2f}", goal])
        prune_ratio = statistics.median(pruning) / statistics.median(without)
        rows.append(["claim throughput while prune runs / without, steps/s", fmt(without), fmt(pruning),
                     f"{prune_ratio:.2f}", ">= 0.9"])
        table(f"{kind}: empty database vs {runs} finished runs kept (medians; ratio = big / empty)",
              ["figure", "empty", f"{runs} runs", "ratio", "target"], rows)


if __name__ == "__main__":
    main()

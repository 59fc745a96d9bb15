"""Operations figures: health check wall time, restart latency, idle shutdown, drain overhead, memory.

    python bench/ops.py [--repeat N] [--engines sqlite,postgres]
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    ROOT,
    Database,
    children_of,
    command,
    compiled_copy,
    fmt,
    memory_kb,
    pause,
    start,
    stop,
    table,
    wait_for,
    write_config,
)

import ductwork

_STORES: dict[str, ductwork.Store] = {}
sys.path.insert(0, str(ROOT / "bench"))
import bench_app  # noqa: E402 - the pipelines a supervisor of the bench config serves: a worker child each

WORKERS = len([name for name in ductwork._REGISTRY if hasattr(bench_app, name)])

# The health check's baseline: the least a Python program that asks Postgres anything does (import pg8000, connect,
# SELECT 1, close), with the database URL as its argument; without TLS (pg8000 by itself loads the CA bundle and
# asks the server for TLS at every connect, which the health check does only with a server that agrees to it).
BARE_PG8000 = """
import sys
from urllib.parse import unquote, urlsplit
import pg8000.native
u = urlsplit(sys.argv[1])
conn = pg8000.native.Connection(unquote(u.username or "postgres"), host=u.hostname or "127.0.0.1", port=u.port or 5432,
                                database=u.path.lstrip("/"), password=unquote(u.password) if u.password else None,
                                ssl_context=False)
conn.run("SELECT 1")
conn.close()
"""


def rows(url: str, role: str | None = None) -> list[tuple]:
    store = _STORES.setdefault(url, ductwork.Store(url))  # one connection: polling must not cost a connect
    with store.tx(write=False) as t:
        found = t.all("SELECT id, pid, role FROM ductwork_processes ORDER BY id")
    return [r for r in found if role is None or r[2] == role]


def timed(cmd: list[str], cwd: Path | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd, check=False)
    return (time.perf_counter() - t0) * 1000


def supervisor_rss(cfg: Path, url: str, compiled: Path | None) -> float:
    """RSS of an idle supervisor with its children registered, MB."""
    sup = start(cfg, compiled=compiled)
    wait_for(lambda: len(rows(url)) == 2 + WORKERS, 30)
    pause(1.0)
    rss, _ = memory_kb(sup.pid)
    stop(sup)
    wait_for(lambda: not rows(url), 30)
    return rss / 1024


def bench_engine(kind: str, repeat: int, tmp: Path, cached: Path) -> list[list[str]]:
    db = Database(kind)
    out = []
    try:
        cfg = write_config(tmp / f"{kind}.yml", db.url, supervisor={"heartbeat_interval": 0.5})
        sup = start(cfg)
        wait_for(lambda: len(rows(db.url)) == 2 + WORKERS, 30)  # supervisor + advancer + a worker per pipeline
        # health check: the whole process, interpreter start included, against `python -c pass` and (Postgres) a bare
        # script that imports pg8000, connects and runs SELECT 1: interleaved, one of each per round
        forms = {"floor": ([sys.executable, "-c", "pass"], None)}
        if kind == "postgres":
            forms["bare"] = ([sys.executable, "-c", BARE_PG8000, db.url], None)
        for label, compiled in (("python ductwork.py", None), ("python -m ductwork, bytecode cached", cached)):
            cmd, cwd = command(compiled)
            forms[label] = ([*cmd, "healthcheck", "-c", str(cfg)], cwd)
        took: dict[str, list[float]] = {form: [] for form in forms}
        for _ in range(repeat * 4):
            for form, (cmd, cwd) in forms.items():
                took[form].append(timed(cmd, cwd))
        floor, bare = took.pop("floor"), took.pop("bare", None)
        for label, health in took.items():
            over = statistics.median(health) - statistics.median(floor)
            note = f"python -c pass: {fmt(floor, ' ms')}; over it: {over:.0f} ms"
            if bare:
                note += (f"; bare pg8000 SELECT 1 script: {fmt(bare, ' ms')}, ratio "
                         f"{statistics.median(health) / statistics.median(bare):.2f} (target <= 1.2 for -m)")
            out.append([kind, f"healthcheck wall time ({label})", fmt(health, " ms"), note])
        # restart latency after SIGKILL of a worker child: until its replacement has registered
        latencies = []
        for _ in range(repeat):
            victim = next(r for r in rows(db.url, "worker"))
            t0 = time.perf_counter()
            os.kill(victim[1], signal.SIGKILL)
            wait_for(lambda v=victim: len(rows(db.url, "worker")) == WORKERS
                     and all(r[1] != v[1] for r in rows(db.url, "worker")), 10)
            latencies.append((time.perf_counter() - t0) * 1000)
        out.append([kind, "restart after SIGKILL of a child (to new row)", fmt(latencies, " ms"), ""])
        # memory
        kids = [memory_kb(pid) for pid in children_of(sup.pid)]
        out.append([kind, "per-child unique memory (USS)", fmt([u / 1024 for _, u in kids], " MB"),
                    f"child RSS {fmt([r / 1024 for r, _ in kids], ' MB')}"])
        stop(sup)
        wait_for(lambda: not rows(db.url), 30)
        for label, compiled in (("python ductwork.py", None), ("python -m ductwork, bytecode cached", cached)):
            rss = [supervisor_rss(cfg, db.url, compiled) for _ in range(max(1, repeat // 2))]
            out.append([kind, f"supervisor RSS ({label})", fmt(rss, " MB"),
                        f"idle, {WORKERS} workers + 1 advancer registered"])
        # idle shutdown: SIGTERM to exit
        shutdowns = []
        for _ in range(repeat):
            sup = start(cfg)
            wait_for(lambda: len(rows(db.url)) == 2 + WORKERS, 30)
            pause(1.0)  # idle: every thread has connected and is waiting for work
            t0 = time.perf_counter()
            os.kill(sup.pid, signal.SIGTERM)
            sup.wait(30)
            shutdowns.append((time.perf_counter() - t0) * 1000)
        out.append([kind, "idle SIGTERM to exit", fmt(shutdowns, " ms"), ""])
        # drain overhead: SIGTERM with a 0.5 s step in flight; overhead = exit time - the step's remaining time
        overheads = []
        ductwork.configure(database_url=db.url)
        for _ in range(repeat):
            sup = start(cfg)
            wait_for(lambda: len(rows(db.url)) == 2 + WORKERS, 30)
            run = bench_app.BenchNap.trigger(0.5)
            wait_for(lambda r=run: r.steps[0].status == "running", 10)
            claimed = time.perf_counter()
            pause(0.1)  # the step has surely started (a claim not yet started would be released, not drained)
            os.kill(sup.pid, signal.SIGTERM)
            sup.wait(30)
            # the step ends about 0.5 s after its claim; exit time beyond that is the drain overhead
            overheads.append((time.perf_counter() - claimed) * 1000 - 500)
            assert run.refresh().steps[0].status == "succeeded"
        out.append([kind, "drain overhead (exit - step end)", fmt(overheads, " ms"), "0.5 s step in flight at SIGTERM"])
    finally:
        db.drop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--engines", default="sqlite,postgres")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ductwork-ops-"))
    cached = compiled_copy(tmp)
    result = []
    for kind in args.engines.split(","):
        result += bench_engine(kind, args.repeat, tmp, cached)
    table("operations (median [min–max])", ["engine", "figure", "value", "baseline / note"], result)


if __name__ == "__main__":
    main()

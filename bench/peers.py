"""Peer figures: pgqueuer and procrastinate doing the same work as bench/throughput.py.

    python bench/peers.py [--repeat 3] [--peers pgqueuer,procrastinate] [--jobs 2000]

Needs the `bench` extra (`pip install -e .[bench]`): pgqueuer + asyncpg, procrastinate + psycopg.
A peer that cannot be imported is skipped with the reason printed.

Every figure runs on a fresh PostgreSQL database (created and dropped here) with 2 worker
processes (this script re-run with `--worker`), each at the library's defaults except:
pgqueuer batch_size=10 (its default), procrastinate concurrency=4 (ductwork's workers run 4
threads each). Figures:

- throughput: N no-op jobs enqueued before the workers start; jobs/s from the first job body
  run (wall clock, written once by each worker) to the moment the queue is seen empty
  (polled every 10 ms);
- warm throughput: the same N jobs enqueued in one call to workers already running and idle;
  jobs/s from the enqueue to the queue seen empty (polled every 2 ms);
- 10-step chain: each job enqueues the next, the last writes a row; trigger -> row seen,
  median of 20 runs, in ms;
- fan-out 1000 + fan-in: 1000 no-op jobs each bump a counter row; the one that reaches 1000
  enqueues the fan-in job, which writes a row; enqueue -> row seen, in s.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PG_ADMIN = os.environ.get("DUCTWORK_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
FAN_WIDTH = 1000
CHAIN_STEPS = 10
CHAIN_RUNS = 20

BENCH_TABLES = """
CREATE TABLE IF NOT EXISTS bench_done (run text PRIMARY KEY, at timestamptz DEFAULT now());
CREATE TABLE IF NOT EXISTS bench_counter (run text PRIMARY KEY, n int NOT NULL DEFAULT 0, width int NOT NULL);
CREATE TABLE IF NOT EXISTS bench_ready (worker text PRIMARY KEY);
"""


from common import LEFT_OVER, fmt, pause, record, table, wait_for  # noqa: E402 - shared with the other benches


def _connect(url: str):
    from urllib.parse import unquote, urlsplit

    import pg8000.dbapi
    u = urlsplit(url)
    conn = pg8000.dbapi.connect(user=unquote(u.username or "postgres"),
                                password=unquote(u.password) if u.password else None,
                                host=u.hostname or "127.0.0.1", port=u.port or 5432,
                                database=u.path.lstrip("/") or "postgres")
    conn.autocommit = True
    return conn


class Database:
    """A throwaway PostgreSQL database with the bench_* bookkeeping tables."""

    def __init__(self):
        self.name = f"peers_bench_{uuid.uuid4().hex[:8]}"
        admin = _connect(PG_ADMIN)
        admin.cursor().execute(f"CREATE DATABASE {self.name}")
        admin.close()
        self.url = PG_ADMIN.rsplit("/", 1)[0] + "/" + self.name
        self.conn = _connect(self.url)
        for stmt in filter(str.strip, BENCH_TABLES.split(";")):
            self.conn.cursor().execute(stmt)

    def value(self, sql: str, params=()):
        cur = self.conn.cursor()
        cur.execute(sql, params)
        return cur.fetchone()[0]

    def drop(self) -> None:
        try:
            self.conn.close()
        except Exception:
            pass
        admin = _connect(PG_ADMIN)
        admin.cursor().execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                               "AND pid <> pg_backend_pid()", (self.name,))
        admin.cursor().execute(f"DROP DATABASE IF EXISTS {self.name}")
        admin.close()


def start_worker(peer: str, url: str, mark: Path, name: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", peer, "--url", url,
                             "--mark", str(mark), "--name", name],
                            stdout=subprocess.DEVNULL, stderr=open(str(mark) + ".err", "w"),
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)


def stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---------------------------------------------------------------- worker side

class FirstRun:
    """Writes the wall-clock time of the first job body run to a file, once."""

    def __init__(self, path: str):
        self.path, self.done = path, False

    def __call__(self) -> None:
        if not self.done:
            self.done = True
            Path(self.path).write_text(repr(time.time()))


async def pgqueuer_worker(url: str, mark: str, name: str) -> None:
    import asyncpg
    from pgqueuer import PgQueuer, Queries

    first = FirstRun(mark)
    pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
    queries = Queries.from_asyncpg_pool(pool)
    pgq = PgQueuer.from_asyncpg_connection(await asyncpg.connect(url))

    @pgq.entrypoint("noop")
    async def noop(job) -> None:
        first()

    @pgq.entrypoint("chain")
    async def chain(job) -> None:
        run, n = job.payload.decode().split(":")
        if int(n) > 1:
            await queries.enqueue("chain", f"{run}:{int(n) - 1}".encode())
        else:
            await pool.execute("INSERT INTO bench_done (run) VALUES ($1)", run)

    @pgq.entrypoint("fan")
    async def fan(job) -> None:
        run = job.payload.decode()
        if await pool.fetchval("UPDATE bench_counter SET n = n + 1 WHERE run = $1 RETURNING n = width", run):
            await queries.enqueue("fanin", run.encode())

    @pgq.entrypoint("fanin")
    async def fanin(job) -> None:
        await pool.execute("INSERT INTO bench_done (run) VALUES ($1)", job.payload.decode())

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, pgq.shutdown.set)
    await pool.execute("INSERT INTO bench_ready (worker) VALUES ($1)", name)
    await pgq.run(batch_size=10)


def procrastinate_app(url: str, mark: str = ""):
    import logging

    import procrastinate
    logging.getLogger("procrastinate").setLevel(logging.ERROR)  # the "App in __main__" warning

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))
    first = FirstRun(mark)

    @app.task(name="noop")
    async def noop() -> None:
        first()

    @app.task(name="chain")
    async def chain(run: str, n: int) -> None:
        if n > 1:
            await chain.defer_async(run=run, n=n - 1)
        else:
            await app.connector.execute_query_async("INSERT INTO bench_done (run) VALUES (%(run)s)", run=run)

    @app.task(name="fan")
    async def fan(run: str) -> None:
        row = await app.connector.execute_query_one_async(
            "UPDATE bench_counter SET n = n + 1 WHERE run = %(run)s RETURNING n = width AS last", run=run)
        if row["last"]:
            await fanin.defer_async(run=run)

    @app.task(name="fanin")
    async def fanin(run: str) -> None:
        await app.connector.execute_query_async("INSERT INTO bench_done (run) VALUES (%(run)s)", run=run)

    return app, {"noop": noop, "chain": chain, "fan": fan, "fanin": fanin}


async def procrastinate_worker(url: str, mark: str, name: str) -> None:
    app, _ = procrastinate_app(url, mark)
    async with app.open_async():
        await app.connector.execute_query_async("INSERT INTO bench_ready (worker) VALUES (%(w)s)", w=name)
        await app.run_worker_async(concurrency=4, wait=True, install_signal_handlers=True)


# ---------------------------------------------------------------- driver side, per peer

class Peer:
    name = ""
    version_of = ""

    def install(self, url: str) -> None: ...
    def enqueue_noop(self, url: str, n: int) -> None: ...
    def enqueue_noop_open(self, n: int) -> None: ...
    def enqueue_chain(self, url: str, run: str) -> None: ...
    def enqueue_fan(self, url: str, run: str, width: int) -> None: ...
    def pending(self, db: Database) -> int: ...

    def label(self) -> str:
        from importlib.metadata import version
        return f"{self.name} {version(self.name)}"


class PgQueuerPeer(Peer):
    name = "pgqueuer"

    def __init__(self):
        import asyncpg  # noqa: F401
        import pgqueuer  # noqa: F401

    @staticmethod
    async def _with_queries(url: str, fn) -> None:
        import asyncpg
        from pgqueuer import Queries
        conn = await asyncpg.connect(url)
        try:
            await fn(Queries.from_asyncpg_connection(conn))
        finally:
            await conn.close()

    def install(self, url: str) -> None:
        asyncio.run(self._with_queries(url, lambda q: q.install()))

    def enqueue_noop(self, url: str, n: int) -> None:
        asyncio.run(self._with_queries(url, lambda q: q.enqueue(["noop"] * n, [None] * n, [0] * n)))

    def open(self, url: str) -> None:
        """A persistent connection for the timed enqueues (chain, fan)."""
        import asyncpg
        from pgqueuer import Queries
        self.loop = asyncio.new_event_loop()
        self.conn = self.loop.run_until_complete(asyncpg.connect(url))
        self.q = Queries.from_asyncpg_connection(self.conn)

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.close())
        self.loop.close()

    def enqueue_noop_open(self, n: int) -> None:
        self.loop.run_until_complete(self.q.enqueue(["noop"] * n, [None] * n, [0] * n))

    def enqueue_chain(self, url: str, run: str) -> None:
        self.loop.run_until_complete(self.q.enqueue("chain", f"{run}:{CHAIN_STEPS}".encode()))

    def enqueue_fan(self, url: str, run: str, width: int) -> None:
        payload = run.encode()
        self.loop.run_until_complete(self.q.enqueue(["fan"] * width, [payload] * width, [0] * width))

    def pending(self, db: Database) -> int:
        return db.value(LEFT_OVER.format(table="pgqueuer", condition="true"))


class ProcrastinatePeer(Peer):
    name = "procrastinate"

    def __init__(self):
        import procrastinate  # noqa: F401
        import psycopg  # noqa: F401

    def install(self, url: str) -> None:
        async def go():
            app, _ = procrastinate_app(url)
            async with app.open_async():
                await app.schema_manager.apply_schema_async()
        asyncio.run(go())

    def enqueue_noop(self, url: str, n: int) -> None:
        async def go():
            app, tasks = procrastinate_app(url)
            async with app.open_async():
                await tasks["noop"].batch_defer_async(*[{} for _ in range(n)])
        asyncio.run(go())

    def open(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.app, self.tasks = procrastinate_app(url)
        self.ctx = self.app.open_async()
        self.loop.run_until_complete(self.ctx.__aenter__())

    def close(self) -> None:
        self.loop.run_until_complete(self.ctx.__aexit__(None, None, None))
        self.loop.close()

    def enqueue_noop_open(self, n: int) -> None:
        self.loop.run_until_complete(self.tasks["noop"].batch_defer_async(*[{} for _ in range(n)]))

    def enqueue_chain(self, url: str, run: str) -> None:
        self.loop.run_until_complete(self.tasks["chain"].defer_async(run=run, n=CHAIN_STEPS))

    def enqueue_fan(self, url: str, run: str, width: int) -> None:
        self.loop.run_until_complete(self.tasks["fan"].batch_defer_async(*[{"run": run} for _ in range(width)]))

    def pending(self, db: Database) -> int:
        return db.value(LEFT_OVER.format(table="procrastinate_jobs", condition="status IN ('todo', 'doing')"))


PEERS = {"pgqueuer": PgQueuerPeer, "procrastinate": ProcrastinatePeer}


class Cluster:
    """2 worker processes of one peer against one database."""

    def __init__(self, peer: Peer, db: Database, tmp: Path, workers: int = 2, wait_ready: bool = True):
        self.marks = [tmp / f"{peer.name}-{db.name}-{i}.first" for i in range(workers)]
        self.procs = [start_worker(peer.name, db.url, m, f"w{i}") for i, m in enumerate(self.marks)]
        if wait_ready:
            self.wait_ready(db, workers)

    def wait_ready(self, db: Database, workers: int) -> None:
        def ready():
            for p, m in zip(self.procs, self.marks, strict=True):
                if p.poll() is not None:
                    raise RuntimeError(f"worker exited {p.returncode}: {Path(str(m) + '.err').read_text()[-2000:]}")
            return db.value("SELECT count(*) FROM bench_ready") == workers
        wait_for(ready, 60, 0.01)
        pause(0.5)  # let the listeners settle, as throughput.py does

    def first_run(self) -> float:
        return min(float(m.read_text()) for m in self.marks if m.exists())

    def stop(self) -> None:
        for p in self.procs:
            stop(p)


def throughput(peer: Peer, db: Database, tmp: Path, n: int) -> float:
    peer.enqueue_noop(db.url, n)
    cluster = Cluster(peer, db, tmp, wait_ready=False)
    try:
        wait_for(lambda: peer.pending(db) == 0, 300, 0.01)
        done = time.time()
        return n / (done - cluster.first_run())
    finally:
        cluster.stop()


def throughput_warm(peer: Peer, db: Database, tmp: Path, n: int) -> float:
    """N jobs enqueued in one call to workers already running and idle: jobs/s from the
    enqueue to the queue seen empty (polled every 2 ms), as bench/throughput.py's warm figure."""
    cluster = Cluster(peer, db, tmp)
    peer.open(db.url)
    try:
        t0 = time.perf_counter()
        peer.enqueue_noop_open(n)
        wait_for(lambda: peer.pending(db) == 0, 300, 0.002)
        return n / (time.perf_counter() - t0)
    finally:
        peer.close()
        cluster.stop()


def chain_latency(peer: Peer, db: Database, tmp: Path) -> list[float]:
    cluster = Cluster(peer, db, tmp)
    peer.open(db.url)
    out = []
    try:
        for _ in range(CHAIN_RUNS):
            run = uuid.uuid4().hex
            t0 = time.perf_counter()
            peer.enqueue_chain(db.url, run)
            wait_for(lambda r=run: db.value("SELECT count(*) FROM bench_done WHERE run = %s", (r,)), 30, 0.0005)
            out.append((time.perf_counter() - t0) * 1000)
    finally:
        peer.close()
        cluster.stop()
    return out


def fan_in(peer: Peer, db: Database, tmp: Path, width: int = FAN_WIDTH) -> float:
    cluster = Cluster(peer, db, tmp)
    peer.open(db.url)
    run = uuid.uuid4().hex
    db.conn.cursor().execute("INSERT INTO bench_counter (run, width) VALUES (%s, %s)", (run, width))
    try:
        t0 = time.perf_counter()
        peer.enqueue_fan(db.url, run, width)
        wait_for(lambda: db.value("SELECT count(*) FROM bench_done WHERE run = %s", (run,)), 300, 0.002)
        took = time.perf_counter() - t0
        assert db.value("SELECT n FROM bench_counter WHERE run = %s", (run,)) == width
    finally:
        peer.close()
        cluster.stop()
    return took


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--peers", default="pgqueuer,procrastinate")
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--only", default="throughput,warm,chain,fan")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--mark", help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    return parser.parse_args()


def run_worker(args: argparse.Namespace) -> None:
    """The `--worker` mode: one worker process of the named peer, started by Cluster."""
    worker = {"pgqueuer": pgqueuer_worker, "procrastinate": procrastinate_worker}[args.worker]
    if args.worker == "pgqueuer":  # pgqueuer's own CLI runs on uvloop when available
        try:
            import uvloop
            uvloop.install()
        except ImportError:
            pass
    asyncio.run(worker(args.url, args.mark, args.name))


def importable_peers(names: str) -> list[Peer]:
    """The peers named (comma-separated) whose libraries import; the others are skipped with the reason."""
    peers: list[Peer] = []
    for name in names.split(","):
        try:
            peers.append(PEERS[name]())
        except ImportError as exc:
            print(f"skipping {name}: cannot import ({exc}); install the `bench` extra", flush=True)
    return peers


def measure_figure(results: dict[tuple[str, str], list[float]], peer: Peer, figure: str, db: Database, tmp: Path,
                   jobs: int) -> None:
    """Run one figure for one peer on db and append its value(s) to results."""
    if figure == "throughput":
        key = f"{jobs} no-op jobs, jobs/s"
        results.setdefault((peer.label(), key), []).append(throughput(peer, db, tmp, jobs))
    elif figure == "warm":
        key = f"{jobs} no-op jobs, warm workers, jobs/s"
        results.setdefault((peer.label(), key), []).append(throughput_warm(peer, db, tmp, jobs))
    elif figure == "chain":
        lat = chain_latency(peer, db, tmp)
        results.setdefault((peer.label(), "10-step chain median, ms"), []).append(statistics.median(lat))
        results.setdefault((peer.label(), "10-step chain p90, ms"), []).append(sorted(lat)[int(len(lat) * 0.9) - 1])
    elif figure == "fan":
        results.setdefault((peer.label(), f"fan-out {FAN_WIDTH} + fan-in, s"), []).append(fan_in(peer, db, tmp))


def measure_all(peers: list[Peer], args: argparse.Namespace, tmp: Path) -> dict[tuple[str, str], list[float]]:
    """Every figure for every peer, each on a fresh database, repetitions interleaved; a failed figure is reported."""
    results: dict[tuple[str, str], list[float]] = {}
    for rep in range(args.repeat):  # interleaved repetitions
        for peer in peers:
            for figure in args.only.split(","):
                db = Database()
                try:
                    peer.install(db.url)
                    measure_figure(results, peer, figure, db, tmp, args.jobs)
                    print(f"  rep {rep + 1}: {peer.name} {figure} done", file=sys.stderr, flush=True)
                except Exception as exc:  # report and carry on with the other figures
                    print(f"  rep {rep + 1}: {peer.name} {figure} FAILED: {exc!r}", file=sys.stderr, flush=True)
                finally:
                    db.drop()
    return results


def report(results: dict[tuple[str, str], list[float]], repeat: int) -> None:
    """Print the table and record every figure for bench/run.py's side-by-side."""
    table(f"peers (median [min–max] over {repeat} repetitions)", ["library", "figure", "value"],
          [[lib, f, fmt(v, digits=2 if f.endswith(", s") else 1)] for (lib, f), v in results.items()])
    for (lib, figure), values in results.items():
        record(lib.split()[0], figure, values)


def main() -> None:
    args = parse_args()
    if args.worker:
        run_worker(args)
        return
    peers = importable_peers(args.peers)
    if not peers:
        return
    tmp = Path(tempfile.mkdtemp(prefix="peers-bench-"))
    results = measure_all(peers, args, tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    report(results, args.repeat)


if __name__ == "__main__":
    main()

"""Shared helpers for the benchmark scripts: databases, real supervisors, statistics."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import ductwork  # noqa: E402

PG_ADMIN = os.environ.get("DUCTWORK_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
BENCH_APP = ROOT / "bench" / "bench_app.py"

# The stop condition of every "until nothing is left" figure, ours and the peers' alike: whether one row is left,
# not how many (a count of a 20,000-run table polled every 2 ms took a third of Postgres's CPU from the cluster
# it timed). 1 while anything is left, 0 once nothing is; the same shape on both sides (bench/peers.py).
LEFT_OVER = "SELECT count(*) FROM (SELECT 1 FROM {table} WHERE {condition} LIMIT 1) AS left_over"
RUNS_LEFT = LEFT_OVER.format(table="ductwork_runs", condition="status = 'in_progress'")


def pause(seconds: float) -> None:
    threading.Event().wait(seconds)


def pg_admin():
    import pg8000.dbapi
    info = ductwork.parse_database_url(PG_ADMIN)
    conn = pg8000.dbapi.connect(user=info.user, password=info.password, host=info.host, port=info.port,
                                database=info.database)
    conn.autocommit = True
    return conn


class Database:
    """A throwaway database: a fresh Postgres database or a SQLite file."""

    def __init__(self, kind: str, migrate: bool = True):
        self.kind = kind
        if kind == "postgres":
            self.name = f"ductwork_bench_{uuid.uuid4().hex[:8]}"
            admin = pg_admin()
            admin.cursor().execute(f"CREATE DATABASE {self.name}")
            admin.close()
            self.url = PG_ADMIN.rsplit("/", 1)[0] + "/" + self.name
        else:
            self.dir = tempfile.mkdtemp(prefix="ductwork-bench-")
            self.url = f"sqlite:///{self.dir}/bench.sqlite3"
        if migrate:   # (else the caller migrates it: another version of ductwork, bench/flow.py)
            ductwork.migrate_store(ductwork.Store(self.url))

    def drop(self) -> None:
        if self.kind == "postgres":
            admin = pg_admin()
            admin.cursor().execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                                   "AND pid <> pg_backend_pid()", (self.name,))
            admin.cursor().execute(f"DROP DATABASE IF EXISTS {self.name}")
            admin.close()


def write_config(path: Path, url: str, **extra) -> Path:
    base = {"app": str(BENCH_APP), "database_url": url, "logger": {"level": "warning"},
            "job_worker": {"polling_timeout": 1, "count": 4, "retry_delay": 0},
            "pipeline_advancer": {"polling_timeout": 1, "count": 2},
            "supervisor": {"heartbeat_interval": 1}}
    for key, value in extra.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    path.write_text(yaml.safe_dump(base))
    return path


def compiled_copy(tmp: Path) -> Path:
    """A folder holding ductwork.py with its bytecode compiled, as a built image has it (see
    examples/deploy/Dockerfile): `python -m ductwork` run there skips compiling the module."""
    import py_compile
    import shutil
    folder = tmp / "compiled"
    folder.mkdir(exist_ok=True)
    shutil.copy(ROOT / "ductwork.py", folder / "ductwork.py")
    py_compile.compile(str(folder / "ductwork.py"), doraise=True)
    return folder


def command(compiled: Path | None = None) -> tuple[list[str], Path | None]:
    """How to run ductwork: the script (`python ductwork.py`), or the module from a compiled copy."""
    if compiled is None:
        return [sys.executable, str(ROOT / "ductwork.py")], None
    return [sys.executable, "-m", "ductwork"], compiled


def start(config: Path, *args: str, env: dict | None = None, compiled: Path | None = None) -> subprocess.Popen:
    cmd, cwd = command(compiled)
    return subprocess.Popen([*cmd, *args, "-c", str(config)], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True)


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def wait_for(predicate, timeout: float = 60, interval: float = 0.002):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark condition not reached")
        pause(interval)
    return value


def summary(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def fmt(values: list[float], unit: str = "", digits: int = 1) -> str:
    med, lo, hi = summary(values)
    return f"{med:.{digits}f}{unit} [{lo:.{digits}f}–{hi:.{digits}f}]"


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    out = [f"\n### {title}", line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
    text = "\n".join(out)
    print(text, flush=True)
    return text


# The figures bench/run.py puts side by side, by what each script calls them.
SIDE_BY_SIDE = {
    "single-step runs, steps/s": "throughput, backlog then start, per s",
    "no-op jobs, jobs/s": "throughput, backlog then start, per s",
    "warm workers": "throughput, released to running workers, per s",
    "10-step chain median, ms": "10-step chain, median ms",
    "fan-out 1000 + fan-in, s": "fan-out 1000 + fan-in, s",
    "1 job per commit": "physical floor: 1 job per commit, per s",
}


def record(who: str, label: str, values: list[float]) -> None:
    """Keep a figure for bench/run.py's side-by-side table, when it asked for them
    (DUCTWORK_BENCH_RESULTS names the file; DUCTWORK_BENCH_SCALE, when set, is added to the figure's name:
    the same rows at another size are rows of their own)."""
    path = os.environ.get("DUCTWORK_BENCH_RESULTS")
    figure = next((v for k, v in reversed(SIDE_BY_SIDE.items()) if k in label), None)
    if figure and os.environ.get("DUCTWORK_BENCH_SCALE"):
        figure += f" ({os.environ['DUCTWORK_BENCH_SCALE']})"
    if path and figure:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"who": who, "figure": figure, "median": statistics.median(values)}) + "\n")


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return sorted(out)


def memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, unique = private clean + private dirty) in kB, from /proc/PID/smaps_rollup."""
    rss = uss = 0
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key == "Rss":
                rss = int(rest.split()[0])
            elif key in ("Private_Clean", "Private_Dirty"):
                uss += int(rest.split()[0])
    return rss, uss

"""Helpers that run the real `python ductwork.py` as subprocesses and watch them."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "tests" / "apps" / "sup_app.py"
BASE_CONFIG = {
    "app": str(APP),
    "job_worker": {"polling_timeout": 0.1, "shutdown_timeout": 2, "retry_delay": 0, "count": 2},
    "pipeline_advancer": {"polling_timeout": 0.1, "shutdown_timeout": 2},
    "supervisor": {"polling_timeout": 0.2, "heartbeat_interval": 0.3, "hang_timeout": 2, "reaper_timeout": 3,
                   "shutdown_timeout": 4, "max_boot_failures": 3},
}


def merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def pause(seconds: float) -> None:
    threading.Event().wait(seconds)


def settings(config: dict | None = None) -> dict:
    """What a Proc started with ``config`` runs with: BASE_CONFIG under the test's own values."""
    return merge(BASE_CONFIG, config or {})


# What a loaded machine (2 cores, one kept busy, other test sessions on the same disk and
# Postgres server) adds on top of the configured intervals to anything a process does:
# being scheduled, a commit's fsync, a child's start. Added once to deadlines derived
# from the intervals; it never decides whether a test passes, only how long a wait may take.
LOAD_SLACK = 5.0


def reap_deadline(stopped: dict | None = None, reaper: dict | None = None, slack: float = LOAD_SLACK) -> float:
    """Seconds from the moment a process stops heartbeating (``stopped``: its config) until a
    peer (``reaper``: its config, default the same) has certainly deleted its row: the last
    heartbeat is up to one heartbeat_interval old, the row is stale reaper_timeout later, and
    the peer reaps every min(2 * heartbeat_interval, reaper_timeout / 2) right after a heartbeat
    of its own (Runtime.heartbeat_loop). ``slack=0``: the bound itself, for checks of absence."""
    beat = float(settings(stopped)["supervisor"]["heartbeat_interval"])
    peer = settings(reaper if reaper is not None else stopped)["supervisor"]
    interval, timeout = float(peer["heartbeat_interval"]), float(peer["reaper_timeout"])
    return beat + timeout + min(2 * interval, timeout / 2) + interval + slack


def wait_until(predicate, timeout: float = 10, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        pause(interval)


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid and fields[0] != "Z":
                    out.append(int(entry))
            except (OSError, IndexError):
                pass
    return sorted(out)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stopped(pid: int) -> bool:
    """Every thread of ``pid`` is in the stopped state (a SIGSTOP has taken effect)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        states = []
        for task in tasks:
            with open(f"/proc/{pid}/task/{task}/stat") as fh:
                states.append(fh.read().rsplit(")", 1)[1].split()[0])
    except OSError:
        return False
    return bool(states) and all(state in ("T", "t") for state in states)


def _sqlite_write_locks(pid: int) -> list[str]:
    """POSIX write locks ``pid`` holds (SQLite's WAL write lock, a checkpoint, a read-mark update)."""
    with open("/proc/locks") as fh:
        return [line for line in fh if "->" not in line.split()
                and line.split()[1:5] == ["POSIX", "ADVISORY", "WRITE", str(pid)]]


def client_ports(pid: int) -> set[int]:
    """The local TCP ports of ``pid``'s sockets (its sessions' client ports, as the server sees them)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as fh:
            for line in list(fh)[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _pg_transactions(pid: int, db_url: str) -> list[tuple]:
    """Open transactions of ``pid``'s Postgres sessions (found by the client ports of its sockets)."""
    ports = client_ports(pid)
    if not ports:
        return []
    import ductwork
    info = ductwork.parse_database_url(db_url)
    if info.pgbouncer:   # through the pooler: its clients that hold a server connection (in a transaction)
        return [client for client in _pooler_clients(info) if client["port"] in ports and client["link"]]
    store = ductwork.Store(db_url)
    try:
        with store.tx(write=False) as t:
            return t.all(f"SELECT pid, state, query FROM pg_stat_activity WHERE xact_start IS NOT NULL "
                         f"AND client_port IN ({', '.join(map(str, sorted(ports)))})")
    finally:
        store.close()


def _pooler_clients(info) -> list[dict]:
    """PgBouncer's clients (SHOW CLIENTS on its admin console: the simple query protocol only)."""
    import pg8000.native
    conn = pg8000.native.Connection(user=info.user, password=info.password, host=info.host, port=info.port,
                                    database="pgbouncer", timeout=10)
    try:
        context = conn.execute_simple("SHOW CLIENTS")
        names = [c["name"] for c in context.columns or ()]
        return [dict(zip(names, row, strict=True)) for row in context.rows or ()]
    finally:
        conn.close()


def stop_outside_transaction(pid: int, db_url: str, timeout: float = LOAD_SLACK) -> None:
    """SIGSTOP ``pid`` at a moment it holds no database lock, as a paused process (GC pause,
    frozen VM, SIGSTOP) between two of its transactions.

    Stopped inside one, it is a different case, which no peer can resolve: on SQLite it keeps
    the write lock (every other process waits busy_timeout for it, nobody reaps anything), on
    Postgres its row lock (a peer's reap blocks on it). So a stop that lands inside a
    transaction is undone at once (SIGCONT, after a few ms: far below any reaper_timeout) and
    made again."""
    deadline = time.monotonic() + timeout
    while True:
        os.kill(pid, signal.SIGSTOP)
        wait_until(lambda: stopped(pid), timeout=LOAD_SLACK, interval=0.001, what=f"pid {pid} stopped")
        held = _sqlite_write_locks(pid) if db_url.startswith("sqlite") else _pg_transactions(pid, db_url)
        if not held:
            return
        os.kill(pid, signal.SIGCONT)
        if time.monotonic() > deadline:
            raise AssertionError(f"pid {pid} was inside a transaction at every stop for {timeout}s: {held}")
        pause(0.005)


@contextlib.contextmanager
def database_outage(db_url: str):
    """The database becomes unreachable for new connections, and comes back at the end: the
    SQLite file moves away (and back), or the Postgres database stops accepting connections
    (sessions already open keep theirs, as when a server's connection slots are all taken)."""
    import ductwork
    info = ductwork.parse_database_url(db_url)
    if info.dialect == "sqlite":
        away = info.path + ".away"
        os.rename(info.path, away)
        try:
            yield
        finally:
            os.rename(away, info.path)
        return
    admin = ductwork.Store(db_url.rsplit("/", 1)[0] + "/postgres")
    try:
        with admin.tx() as t:
            t.run(f'ALTER DATABASE "{info.database}" ALLOW_CONNECTIONS false')
        try:
            yield
        finally:
            with admin.tx() as t:
                t.run(f'ALTER DATABASE "{info.database}" ALLOW_CONNECTIONS true')
    finally:
        admin.close()


def dashboard_port(proc: subprocess.Popen) -> int:
    """The port a `ductwork dashboard --port 0` subprocess (stdout piped, text) serves on, read off its
    "dashboard on http://127.0.0.1:PORT/" line."""
    for line in proc.stdout:
        found = re.search(r"dashboard on http://127\.0\.0\.1:(\d+)/", line)
        if found:
            return int(found.group(1))
    raise AssertionError("the dashboard did not start")


class Proc:
    """A running `python ductwork.py ...` with its log in a file."""

    def __init__(self, tmp_path: Path, db_url: str, *, name: str = "sup", machine: str = "host-a",
                 config: dict | None = None, env: dict | None = None, args: tuple = (), prefix: tuple = (),
                 script: Path = ROOT / "ductwork.py"):
        self.name = name
        self.config_path = tmp_path / f"{name}.yml"
        self.config_path.write_text(yaml.safe_dump(merge({**BASE_CONFIG, "database_url": db_url}, config or {})))
        self.log_path = tmp_path / f"{name}.log"
        full_env = {**os.environ, "DUCTWORK_MACHINE_ID": machine, "DW_TEST_DIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
        full_env.pop("DUCTWORK_ROLE", None)
        full_env.update(env or {})
        self.log_file = open(self.log_path, "w")
        self.started = time.monotonic()
        argv = [*prefix, sys.executable, str(script), *args, "-c", str(self.config_path)]
        self.popen = subprocess.Popen(argv, stdout=self.log_file, stderr=subprocess.STDOUT, env=full_env, cwd=str(ROOT),
                                      start_new_session=True)
        self.pid = self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_log(self, pattern: str, timeout: float = 15, count: int = 1) -> list[re.Match]:
        rx = re.compile(pattern)

        def found():
            matches = list(rx.finditer(self.log()))
            return matches if len(matches) >= count else None
        try:
            return wait_until(found, timeout, what=f"{pattern!r} x{count} in {self.name}.log")
        except AssertionError:
            raise AssertionError(f"timed out waiting for {pattern!r} x{count}; log:\n{self.log()[-4000:]}") from None

    def child_pid(self, key: str, nth: int = 1) -> int:
        return int(self.wait_log(rf"started {re.escape(key)} \(pid (\d+)\)", count=nth)[nth - 1].group(1))

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float = 20) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit within {timeout}s; log:\n{self.log()[-4000:]}") from None

    def kill_group(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(10)

    def close(self) -> None:
        if self.popen.poll() is None:
            self.kill_group()
        self.log_file.close()

"""Helpers that run the real `python ductwork.py` as subprocesses and watch them."""
from __future__ import annotations

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


class Proc:
    """A running `python ductwork.py ...` with its log in a file."""

    def __init__(self, tmp_path: Path, db_url: str, *, name: str = "sup", machine: str = "host-a",
                 config: dict | None = None, env: dict | None = None, args: tuple = (), prefix: tuple = ()):
        self.name = name
        self.config_path = tmp_path / f"{name}.yml"
        self.config_path.write_text(yaml.safe_dump(merge({**BASE_CONFIG, "database_url": db_url}, config or {})))
        self.log_path = tmp_path / f"{name}.log"
        full_env = {**os.environ, "DUCTWORK_MACHINE_ID": machine, "DW_TEST_DIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
        full_env.pop("DUCTWORK_ROLE", None)
        full_env.update(env or {})
        self.log_file = open(self.log_path, "w")
        self.started = time.monotonic()
        self.popen = subprocess.Popen([*prefix, sys.executable, str(ROOT / "ductwork.py"), *args, "-c", str(self.config_path)],
                                      stdout=self.log_file, stderr=subprocess.STDOUT, env=full_env, cwd=str(ROOT),
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

"""systemd's notify protocol (SPEC §15): a real datagram socket in the test plays systemd's, and real
`python ductwork.py` processes (the supervisor, a foreground role) talk to it."""
from __future__ import annotations

import os
import signal
import socket
import struct
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from procs import LOAD_SLACK, Proc, wait_until

import ductwork

WATCHDOG_USEC = 600_000   # WATCHDOG=1 every 0.3 s


class FakeSystemd:
    """systemd's end of NOTIFY_SOCKET: every datagram, with when it came."""

    def __init__(self, address: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(("\0" + address[1:]) if address.startswith("@") else address)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)   # the sender's pid, as systemd sees it
        self.sock.settimeout(0.2)
        self.address = address
        self.messages: list[tuple[float, dict[str, str]]] = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while not self.closed:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(struct.calcsize("3i")))
            except OSError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    fields["_PID"] = str(struct.unpack("3i", value[:struct.calcsize("3i")])[0])
            with self.lock:
                self.messages.append((time.monotonic(), fields))

    def having(self, key: str, after: float = 0.0) -> list[tuple[float, dict[str, str]]]:
        with self.lock:
            return [(at, m) for at, m in self.messages if key in m and at > after]

    def wait_for(self, key: str, after: float = 0.0, count: int = 1, timeout: float = 20) -> float:
        """When the count-th message with ``key`` after ``after`` came."""
        found = wait_until(lambda: len(self.having(key, after)) >= count and self.having(key, after), timeout,
                           what=f"{count} x {key} from the service")
        return found[count - 1][0]

    def close(self) -> None:
        self.closed = True
        self.sock.close()


def process_rows(url: str) -> list[tuple[str, int]]:
    store = ductwork.Store(url)
    try:
        with store.tx(write=False) as t:
            return t.all("SELECT role, pid FROM ductwork_processes ORDER BY id")
    finally:
        store.close()


def test_the_supervisor_tells_systemd_ready_status_watchdog_reloading_and_stopping(tmp_path, procs):
    url = f"sqlite:///{tmp_path}/ductwork.sqlite3"
    systemd = FakeSystemd(str(tmp_path / "notify.sock"))
    try:
        env = {"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
        sup = Proc(tmp_path, url, env=env)
        procs.append(sup)
        ready_at = systemd.wait_for("READY", timeout=30)
        # READY=1 came once every child had booted: each has its process row already
        roles = sorted(role for role, _ in process_rows(url))
        assert roles == ["advancer", "supervisor", "worker", "worker"], roles
        first = systemd.having("READY")[0][1]
        assert first["STATUS"].startswith("3/3 children ready"), first
        # the watchdog: at half of WATCHDOG_USEC, from the main loop
        interval = WATCHDOG_USEC / 1e6 / 2
        fourth = systemd.wait_for("WATCHDOG", after=ready_at, count=4, timeout=4 * interval + LOAD_SLACK)
        assert fourth - ready_at >= 3 * interval * 0.8
        # HUP: RELOADING=1, then READY=1 again once the new children booted
        hup_at = time.monotonic()
        sup.signal(signal.SIGHUP)
        reloading = systemd.wait_for("RELOADING", after=hup_at)
        assert "MONOTONIC_USEC" in systemd.having("RELOADING", after=hup_at)[0][1]
        systemd.wait_for("READY", after=reloading, timeout=30)
        # TERM: STOPPING=1, then a clean exit
        term_at = time.monotonic()
        sup.signal(signal.SIGTERM)
        systemd.wait_for("STOPPING", after=term_at)
        assert sup.wait() == 0
        # only the supervisor spoke (NotifyAccess=main): its children do not have the variables
        assert {m.get("_PID") for _, m in systemd.messages} == {str(sup.pid)}
    finally:
        systemd.close()


@pytest.mark.parametrize("role", ["worker", "advancer"])
def test_a_foreground_role_tells_systemd_too_on_an_abstract_socket(tmp_path, procs, role):
    url = f"sqlite:///{tmp_path}/ductwork.sqlite3"
    systemd = FakeSystemd(f"@ductwork-test-{uuid.uuid4().hex}")
    try:
        env = {"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
        proc = Proc(tmp_path, url, name=role, config={"role": role}, env=env)
        procs.append(proc)
        ready_at = systemd.wait_for("READY", timeout=30)
        assert [r for r, _ in process_rows(url)] == [role]
        status = systemd.having("READY")[0][1]["STATUS"]
        assert status.startswith(f"{role} for ") and "step(s) in flight" in status
        systemd.wait_for("WATCHDOG", after=ready_at, count=2, timeout=2 * WATCHDOG_USEC / 2e6 + LOAD_SLACK)
        term_at = time.monotonic()
        proc.signal(signal.SIGTERM)
        systemd.wait_for("STOPPING", after=term_at)
        assert proc.wait() == 0
    finally:
        systemd.close()


def test_the_notifier_reads_and_takes_the_variables():
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
    notifier = ductwork.SystemdNotifier(env)
    assert notifier.address == "\0x" and notifier.watchdog == 0.5 and env == {}
    other = ductwork.SystemdNotifier({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert other.watchdog is None   # the watchdog is another process's
    silent = ductwork.SystemdNotifier({})
    silent.ready("x")
    silent.ping()
    assert silent.sock is None and silent.until_ping() == float("inf")


def test_the_watchdog_is_fed_while_a_foreground_role_drains_its_steps(tmp_path, procs):
    sys.path.insert(0, str(Path(__file__).parent / "apps"))
    import sup_app
    url = f"sqlite:///{tmp_path}/ductwork.sqlite3"
    ductwork.configure(database_url=url)
    ductwork.migrate()
    systemd = FakeSystemd(f"@ductwork-test-{uuid.uuid4().hex}")
    nap = 2.0   # the step the drain waits for: several watchdog intervals long
    try:
        env = {"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
        proc = Proc(tmp_path, url, name="worker", env=env, config={"role": "worker", "pipelines": ["SupNap"],
                                                                  "job_worker": {"shutdown_timeout": 10}})
        procs.append(proc)
        systemd.wait_for("READY", timeout=30)
        sup_app.SupNap.trigger(nap)
        wait_until(lambda: (tmp_path / "marks.log").exists(), 10 + LOAD_SLACK, what="the step's start")
        proc.signal(signal.SIGTERM)
        stopping = systemd.wait_for("STOPPING")
        assert proc.wait(nap + LOAD_SLACK) == 0
        assert "end" in (tmp_path / "marks.log").read_text()   # the drain waited for the step
        fed = [at for at, _ in systemd.having("WATCHDOG", after=stopping)]
        interval = WATCHDOG_USEC / 1e6 / 2
        assert len(fed) >= int(nap * 0.5 / interval), fed   # (the step had up to half its nap left)
    finally:
        systemd.close()

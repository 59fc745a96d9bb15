"""A private, throwaway PostgreSQL cluster for tests that must restart the server or change its
authentication (initdb + pg_ctl on a free port, owned by the `postgres` OS user when we run as
root), so the shared test server is never touched."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for path in sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True):
        return path
    return None


def _require_pg_tools() -> tuple[str, str]:
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    missing = [n for n, p in (("initdb", initdb), ("pg_ctl", pg_ctl)) if not p]
    if os.geteuid() == 0 and not missing:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            missing.append("the `postgres` OS user (PostgreSQL refuses to run as root)")
        if not shutil.which("runuser"):
            missing.append("runuser")
    if missing:
        reason = f"a private PostgreSQL cluster needs {', '.join(missing)}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    return initdb, pg_ctl  # type: ignore[return-value]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateCluster:
    """A throwaway PostgreSQL cluster in a temp dir: initdb, start, stop, restart, remove."""

    def __init__(self) -> None:
        self.initdb, self.pg_ctl = _require_pg_tools()
        self.root = Path(tempfile.mkdtemp(prefix="ductwork-pg-"))
        self.data = self.root / "data"
        self.logfile = self.root / "server.log"
        self.port = _free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        os.chmod(self.root, 0o755)
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres?connect_timeout=2"

    def _run(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [*(["runuser", "-u", "postgres", "--"] if self.as_root else []), *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(self.root))
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(args[:2])} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}\n"
                                 f"{self.server_log()[-2000:]}")
        return out

    def server_log(self) -> str:
        try:
            return self.logfile.read_text()
        except OSError:
            return ""

    def create(self, password: str | None = None, tls: bool = False) -> None:
        """initdb; with ``password`` the superuser has it and every login must use SCRAM-SHA-256;
        with ``tls`` the server offers TLS with a fresh self-signed certificate (CN=localhost)."""
        auth = ["--auth=trust"]
        if password is not None:
            pwfile = self.root / "pwfile"
            pwfile.write_text(password + "\n")
            os.chmod(pwfile, 0o644)
            auth = ["--auth=scram-sha-256", f"--pwfile={pwfile}"]
            self.url = self.url.replace("postgres@", f"postgres:{password}@")
        self._run(self.initdb, "-D", str(self.data), "-U", "postgres", *auth, "-E", "UTF8",
                  "--no-sync", "--no-instructions")
        with open(self.data / "postgresql.conf", "a") as fh:
            fh.write(f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.root}'\n"
                     "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 100\n")
            if tls:
                fh.write("ssl = on\n")
        if tls:
            openssl = shutil.which("openssl")
            if not openssl:
                reason = "a TLS cluster needs the openssl command"
                if os.environ.get("CI") == "true":
                    pytest.fail(f"CI=true but {reason}")
                pytest.skip(reason)
            self._run(openssl, "req", "-new", "-x509", "-days", "2", "-nodes", "-subj", "/CN=localhost",
                      "-keyout", str(self.data / "server.key"), "-out", str(self.data / "server.crt"))
            os.chmod(self.data / "server.key", 0o600)

    def start(self) -> None:
        self._run(self.pg_ctl, "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(self.pg_ctl, "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")

    def running(self) -> bool:
        return self._run(self.pg_ctl, "-D", str(self.data), "status", check=False).returncode == 0

    def remove(self) -> None:
        try:
            if self.data.exists() and self.running():
                self._run(self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop", check=False)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

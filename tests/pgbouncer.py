"""A private PgBouncer for tests: the real pooler (Debian package pgbouncer, installed by
.ci/install-pgbouncer.sh) on a free port of 127.0.0.1, in transaction pooling mode by default,
in front of the test PostgreSQL server. Everything it has (ini, auth file, pid file, log) lives in
its own temp dir; no unix socket. PgBouncer refuses to run as root: as root it is started through
``setpriv`` as the `postgres` OS user (``nobody`` where there is none), which also gives it a
parent-death signal so that a killed test session leaves no pooler behind.

    with pgbouncer(default_pool_size=1) as bouncer:
        conn = pg8000.native.Connection(user="postgres", host="127.0.0.1", port=bouncer.port, database="test")
        url = bouncer.url("test", pgbouncer="true")  # postgresql://postgres@127.0.0.1:PORT/test?pgbouncer=true
"""
from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class PgBouncerUnavailable(Exception):
    """This machine cannot run pgbouncer (no binary, no user to run it as): skip, or fail in CI."""


def pgbouncer_binary() -> str | None:
    """The pgbouncer executable: on PATH, else Debian's /usr/sbin/pgbouncer (not on a user's PATH)."""
    found = shutil.which("pgbouncer")
    if found:
        return found
    return "/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None


def unavailable_reason() -> str | None:
    """Why pgbouncer cannot be started here, or None when it can."""
    if not pgbouncer_binary():
        return "pgbouncer is not installed (bash .ci/install-pgbouncer.sh installs it)"
    if os.geteuid() == 0 and _run_as_user() is None:
        return "pgbouncer refuses to run as root and there is no `postgres` or `nobody` OS user to run it as"
    return None


def _run_as_user() -> pwd.struct_passwd | None:
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quote_auth(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


class PgBouncer:
    """One pgbouncer process. ``start()`` returns once it accepts TCP connections; ``stop()`` ends
    it (SIGTERM, then SIGKILL) and removes its temp dir, keeping its log for ``log()``.

    ``max_client_conn``, ``default_pool_size`` and ``query_wait_timeout`` (seconds a client may
    wait for a server connection before pgbouncer fails it) are pgbouncer's own settings;
    ``extra`` takes any other [pgbouncer] setting (``ignore_startup_parameters="extra_float_digits"``,
    ``server_idle_timeout=1``, ...). Every database name passes through to the server (``* =``).
    Client auth is ``trust`` by default: a user must be listed in the auth file (``users``, or
    ``add_user()`` later), with its password if the server or another ``auth_type`` asks for one.
    """

    def __init__(self, max_client_conn: int = 100, default_pool_size: int = 5, query_wait_timeout: float = 15,
                 *, pool_mode: str = "transaction", server_host: str = "127.0.0.1", server_port: int = 5432,
                 auth_type: str = "trust", users: dict[str, str] | None = None, start_timeout: float = 10,
                 **extra: Any) -> None:
        self.binary = pgbouncer_binary()
        reason = unavailable_reason()
        if reason:
            raise PgBouncerUnavailable(reason)
        self.host = "127.0.0.1"
        self.port = 0
        self.server_host, self.server_port = server_host, server_port
        self.start_timeout = start_timeout
        self.users: dict[str, str] = {"postgres": ""}
        self.users.update(users or {})
        self.settings: dict[str, Any] = {
            "pool_mode": pool_mode, "auth_type": auth_type, "max_client_conn": max_client_conn,
            "default_pool_size": default_pool_size, "query_wait_timeout": query_wait_timeout, **extra}
        self.root = Path(tempfile.mkdtemp(prefix="ductwork-pgbouncer-"))
        self.ini = self.root / "pgbouncer.ini"
        self.auth_file = self.root / "userlist.txt"
        self.pidfile = self.root / "pgbouncer.pid"
        self.logfile = self.root / "pgbouncer.log"
        self.proc: subprocess.Popen | None = None
        self._log_kept: str | None = None
        self._owner = _run_as_user() if os.geteuid() == 0 else None
        if self._owner:
            os.chown(self.root, self._owner.pw_uid, self._owner.pw_gid)
        os.chmod(self.root, 0o755)

    # -- files ----------------------------------------------------------------------------------
    def _write(self, path: Path, text: str) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        if self._owner:
            os.chown(tmp, self._owner.pw_uid, self._owner.pw_gid)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)

    def _write_auth_file(self) -> None:
        self._write(self.auth_file, "".join(f"{_quote_auth(u)} {_quote_auth(p)}\n" for u, p in self.users.items()))

    def _write_ini(self) -> None:
        settings = {
            "listen_addr": self.host, "listen_port": self.port, "unix_socket_dir": "",
            "auth_file": str(self.auth_file), "pidfile": str(self.pidfile),
            "admin_users": "postgres", "stats_users": "postgres", **self.settings}
        lines = ["[databases]", f"* = host={self.server_host} port={self.server_port}", "", "[pgbouncer]"]
        lines += [f"{key} = {'' if value is None else value}" for key, value in settings.items()]
        self._write(self.ini, "\n".join(lines) + "\n")

    # -- process --------------------------------------------------------------------------------
    def _command(self) -> list[str]:
        setpriv = shutil.which("setpriv")
        if not setpriv:   # no parent-death signal; as root pgbouncer's own `user` setting drops root
            return [self.binary, str(self.ini)]   # type: ignore[list-item]
        prefix = [setpriv, "--pdeathsig", "TERM"]
        if self._owner:
            prefix += [f"--reuid={self._owner.pw_uid}", f"--regid={self._owner.pw_gid}", "--init-groups"]
        return [*prefix, "--", self.binary, str(self.ini)]   # type: ignore[list-item]

    def start(self) -> PgBouncer:
        """Start on a free port (a few tries should another process take the port first) and wait,
        up to ``start_timeout`` seconds, until it accepts connections."""
        self._write_auth_file()
        if self._owner and not shutil.which("setpriv"):
            self.settings["user"] = self._owner.pw_name
        for _attempt in range(3):
            self.port = _free_port()
            self._write_ini()
            with open(self.logfile, "ab") as log:   # our fd: pgbouncer logs to stderr, whatever its user
                # its own session: a Ctrl-C in the terminal reaches pytest, and stop() ends pgbouncer
                self.proc = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                             cwd=str(self.root), start_new_session=True)
            if self._wait_ready():
                return self
            if "Address already in use" not in self.log():
                break
        text = self.log()
        self.stop()
        raise RuntimeError(f"pgbouncer did not start within {self.start_timeout}s:\n{text[-3000:]}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.5):
                return True
            time.sleep(0.02)
        return False

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 5) -> None:
        """SIGTERM (pgbouncer's immediate shutdown), SIGKILL if it is still there after ``timeout``
        seconds; then the temp dir goes. Safe to call twice."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if self._log_kept is None and self.root.exists():
            self._log_kept = self.log()
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgBouncer:
        return self if self.running() else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what tests use -------------------------------------------------------------------------
    def url(self, database: str, user: str = "postgres", password: str | None = None, **params: Any) -> str:
        """``postgresql://USER[:PASSWORD]@127.0.0.1:PORT/DATABASE[?params]``; the caller chooses the
        query parameters (``pgbouncer="true"``, ``sslmode="disable"``, ...), none by default."""
        auth = urllib.parse.quote(user, safe="")
        if password is not None:
            auth += ":" + urllib.parse.quote(password, safe="")
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        return f"postgresql://{auth}@{self.host}:{self.port}/{urllib.parse.quote(database, safe='')}{query}"

    def log(self) -> str:
        """Everything pgbouncer logged so far (also after stop())."""
        if self._log_kept is not None:
            return self._log_kept
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def admin(self, command: str) -> list[dict[str, Any]]:
        """A command on pgbouncer's admin console (SHOW POOLS, SHOW SERVERS, RELOAD, KILL db, ...):
        its rows as dicts. The console speaks the simple query protocol only."""
        import pg8000.native
        conn = pg8000.native.Connection(user="postgres", password=self.users.get("postgres") or None,
                                        host=self.host, port=self.port, database="pgbouncer", timeout=10)
        try:
            context = conn.execute_simple(command)
            names = [c["name"] for c in context.columns or ()]
            return [dict(zip(names, row, strict=True)) for row in context.rows or ()]
        finally:
            conn.close()

    def add_user(self, user: str, password: str = "") -> None:
        """Let ``user`` log in through the pooler too (for a role a test created on the server):
        the auth file gets it and pgbouncer reloads it before this returns."""
        self.users[user] = password
        self._write_auth_file()
        if self.running():
            self.admin("RELOAD")


@contextlib.contextmanager
def pgbouncer(**settings: Any) -> Iterator[PgBouncer]:
    """A started PgBouncer (arguments as PgBouncer's), stopped when the block ends."""
    bouncer = PgBouncer(**settings)
    try:
        yield bouncer.start()
    finally:
        bouncer.stop()

"""Soak test: many runs of mixed pipelines on several "hosts" while a chaos loop kills and
pauses children and whole supervisors. Run with `make soak` (marked slow, not in `make test`).

DUCTWORK_SOAK_SECONDS (default 180) sets the chaos time per backend; DUCTWORK_SOAK_SEED
replays a chaos sequence. The figures are printed and written to bench/soak-report.txt.
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import truncate_pg
from procs import Proc, alive, children_of, pause

import ductwork

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "apps"))
import sup_app  # noqa: E402

SOAK_SECONDS = float(os.environ.get("DUCTWORK_SOAK_SECONDS", "180"))
SETTLE_SECONDS = 120          # after chaos stops: time allowed for every run to finish
BACKLOG = 30                  # the trigger loop waits while this many runs are in progress
REPORT = Path(__file__).resolve().parents[1] / "bench" / "soak-report.txt"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(int(SOAK_SECONDS + SETTLE_SECONDS + 180))]

HOST_CONFIG = {
    "pipelines": ["SupMixed", "SupNap"],
    "job_worker": {"count": 2, "max_crash": 100, "max_retry": 3},
    "supervisor": {"reaper_timeout": 3, "hang_timeout": 3, "heartbeat_interval": 0.3, "max_boot_failures": 10},
}


def mixed_expected(n: int) -> int:
    squares = sum(i * i for i in range(n))
    return (squares + 1) + squares * 10


class Host:
    """One "host": a supervisor (and its children) with its own machine id, restarted by name generation."""

    def __init__(self, idx: int, tmp_path: Path, url: str):
        self.idx, self.tmp_path, self.url = idx, tmp_path, url
        self.procs: list[Proc] = []
        self.proc: Proc | None = None
        self.killed = False             # by the chaos loop (an exit we caused)
        self.stopped = False            # SIGSTOPped as a whole
        self.unexpected_exits: list[str] = []

    def start(self) -> None:
        self.proc = Proc(self.tmp_path, self.url, name=f"h{self.idx}-{len(self.procs) + 1}",
                         machine=f"soak-host-{self.idx}", config=HOST_CONFIG)
        self.procs.append(self.proc)
        self.killed = self.stopped = False

    def up(self) -> bool:
        return self.proc is not None and self.proc.popen.poll() is None

    def active(self) -> bool:
        return self.up() and not self.stopped

    def children(self) -> list[int]:
        return children_of(self.proc.pid) if self.up() else []

    def signal_group(self, sig: int) -> None:
        if self.up():
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.killed = True
        self.proc.kill_group()

    def logs(self) -> str:
        return "".join(p.log() for p in self.procs)

    def close(self) -> None:
        self.signal_group(signal.SIGCONT)
        for p in self.procs:
            p.close()


class Triggerer(threading.Thread):
    """Keeps a bounded backlog of SupMixed and SupNap runs flowing."""

    def __init__(self, rng: random.Random):
        super().__init__(daemon=True, name="soak-trigger")
        self.rng = rng
        self.stop = threading.Event()
        self.runs: list[tuple[int, str, object]] = []   # (run id, pipeline, expected output)
        self.errors: list[str] = []     # triggers that failed even after retrying for 60 s
        self.retries: list[str] = []    # "database is locked" / unavailable, retried like an app would

    def trigger(self, pipeline, arg):
        deadline = time.monotonic() + 60
        while True:
            try:
                return pipeline.trigger(arg)
            except (sqlite3.OperationalError, ductwork.DatabaseUnavailable) as exc:
                self.retries.append(f"{time.strftime('%H:%M:%S')} {type(exc).__name__}: {exc}")
                if time.monotonic() > deadline:
                    raise
                self.stop.wait(0.2)

    def in_progress(self) -> int:
        with ductwork._app_engine().store.tx(write=False) as t:
            return t.one("SELECT count(*) FROM ductwork_runs WHERE status = 'in_progress'")[0]

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                if self.in_progress() >= BACKLOG:
                    self.stop.wait(0.1)
                    continue
                if self.rng.random() < 0.6:
                    n = self.rng.randint(1, 6)
                    self.runs.append((self.trigger(sup_app.SupMixed, n).id, "SupMixed", mixed_expected(n)))
                else:
                    nap = round(self.rng.uniform(0.05, 0.3), 3)
                    self.runs.append((self.trigger(sup_app.SupNap, nap).id, "SupNap", nap + 1))
            except Exception as exc:  # recorded and reported: a trigger must not fail either
                self.errors.append(f"{type(exc).__name__}: {exc}")
                self.stop.wait(0.2)
            self.stop.wait(self.rng.uniform(0.01, 0.1))


class Chaos:
    """Random SIGKILL / SIGSTOP of children and whole hosts; every pause is undone, every host restarted."""

    def __init__(self, hosts: list[Host], rng: random.Random):
        self.hosts, self.rng = hosts, rng
        self.actions: Counter[str] = Counter()
        self.later: list[tuple[float, str, object]] = []   # (when, what, target)

    def due(self, now: float, everything: bool = False) -> None:
        keep = []
        for when, what, target in self.later:
            if not everything and when > now:
                keep.append((when, what, target))
            elif what == "cont_child":
                host, pid = target
                if pid in host.children():       # not killed as hung and replaced meanwhile
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)
            elif what == "cont_host":
                target.signal_group(signal.SIGCONT)
                target.stopped = False
            elif what == "start_host" and not target.up():
                target.start()
                self.actions["host restarted"] += 1
        self.later = keep

    def notice_exits(self) -> None:
        """A supervisor that exits without being killed by us is a finding; restart it and count it."""
        for host in self.hosts:
            if host.proc is not None and not host.up() and not host.killed:
                host.unexpected_exits.append(
                    f"{host.proc.name} exit {host.proc.popen.returncode}:\n{host.proc.log()[-2000:]}")
                host.killed = True
                self.later.append((time.monotonic() + 0.5, "start_host", host))

    def strike(self) -> None:
        active = [h for h in self.hosts if h.active()]
        if not active:
            return
        action = self.rng.choices(["kill_child", "stop_child", "kill_host", "stop_host"], weights=[6, 3, 1, 1])[0]
        if action in ("kill_host", "stop_host") and len(active) < 2:
            action = "kill_child"   # keep at least one host making progress
        host = self.rng.choice(active)
        now = time.monotonic()
        if action in ("kill_child", "stop_child"):
            kids = host.children()
            if not kids:
                return
            pid = self.rng.choice(kids)
            try:
                os.kill(pid, signal.SIGKILL if action == "kill_child" else signal.SIGSTOP)
            except ProcessLookupError:          # it exited since we listed it
                return
            if action == "stop_child":
                self.later.append((now + self.rng.uniform(0.5, 5.0), "cont_child", (host, pid)))
        elif action == "kill_host":
            host.kill()
            self.later.append((now + self.rng.uniform(0.5, 5.0), "start_host", host))
        else:
            host.signal_group(signal.SIGSTOP)
            host.stopped = True
            self.later.append((now + self.rng.uniform(1.0, 6.0), "cont_host", host))
        self.actions[action] += 1

    def calm(self) -> None:
        """Undo every pause, restart every host that is down."""
        self.notice_exits()
        self.due(time.monotonic(), everything=True)
        for host in self.hosts:
            if not host.up():
                host.start()
                self.actions["host restarted"] += 1


def query(sql, params=()):
    with ductwork._app_engine().store.tx(write=False) as t:
        return t.all(sql, params)


def write_report(backend: str, text: str) -> None:
    REPORT.parent.mkdir(exist_ok=True)
    sections: dict[str, str] = {}
    if REPORT.exists():
        for chunk in re.split(r"(?m)^(?=== )", REPORT.read_text()):
            m = re.match(r"== (\S+)", chunk)
            if m:
                sections[m.group(1)] = chunk.rstrip() + "\n"
    sections[backend] = text.rstrip() + "\n"
    head = ("ductwork soak report (make soak; tests/test_soak.py)\n"
            "chaos: SIGKILL / SIGSTOP of random children and whole supervisors of several hosts "
            "sharing one database\n\n")
    REPORT.write_text(head + "\n".join(sections[k] for k in sorted(sections)))


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.postgres), "sqlite",
                        pytest.param("pgbouncer", marks=pytest.mark.postgres),
                        pytest.param("pgbouncer-listen", marks=pytest.mark.postgres)])
def soak_db(request, monkeypatch):
    """sqlite, postgres, or postgres through a real PgBouncer in transaction mode, wake-ups by polling
    ("pgbouncer") or from listen_url ("pgbouncer-listen")."""
    if request.param == "sqlite":
        return "sqlite", None, 2   # the test puts the file in its own work dir
    url = request.getfixturevalue("pg_server_url")
    truncate_pg(url)
    if request.param == "postgres":
        return "postgres", url, 3
    # server connections for the hosts' transactions at once: a queue at the pooler only delays them
    bouncer = request.getfixturevalue("start_pgbouncer")(default_pool_size=20)
    if request.param == "pgbouncer-listen":
        monkeypatch.setenv("DUCTWORK_LISTEN_URL", url)
    else:
        monkeypatch.delenv("DUCTWORK_LISTEN_URL", raising=False)
    info = ductwork.parse_database_url(url)
    return request.param, bouncer.url(info.database, user=info.user, password=info.password, pgbouncer="true"), 3


def test_soak_under_chaos(soak_db, capsys):
    backend, url, n_hosts = soak_db
    # logs, marks and the SQLite file live here; kept when the soak fails (or DUCTWORK_SOAK_KEEP=1)
    workdir = Path(tempfile.mkdtemp(prefix=f"ductwork-soak-{backend}-"))
    if backend == "sqlite":
        url = f"sqlite:///{workdir}/soak.sqlite3"
    passed = False
    tracebacks = 0
    seed = int(os.environ.get("DUCTWORK_SOAK_SEED", str(int(time.time()))))
    rng = random.Random(seed)
    ductwork.configure(database_url=url)
    ductwork.migrate()
    hosts = [Host(i + 1, workdir, url) for i in range(n_hosts)]
    chaos = Chaos(hosts, rng)
    trigger = Triggerer(random.Random(seed + 1))
    try:
        for host in hosts:
            host.start()
        for host in hosts:
            host.proc.wait_log("worker started", count=2, timeout=30)
        started = time.monotonic()
        trigger.start()
        while time.monotonic() - started < SOAK_SECONDS:
            chaos.notice_exits()
            chaos.due(time.monotonic())
            chaos.strike()
            pause(rng.uniform(0.2, 1.2))
        trigger.stop.set()
        trigger.join(30)
        chaos_end = time.monotonic()
        chaos.calm()

        # every run must finish now that the chaos has stopped
        deadline = time.monotonic() + SETTLE_SECONDS
        while (query("SELECT count(*) FROM ductwork_runs WHERE status = 'in_progress'")[0][0]
               and time.monotonic() < deadline):
            chaos.notice_exits()
            chaos.due(time.monotonic(), everything=True)
            pause(0.5)
        settle = time.monotonic() - chaos_end

        def rowless() -> list[tuple[str, int]]:
            """Live processes of the hosts that have no process row (a reaped row must be re-registered)."""
            rows = {(pid, machine) for pid, machine in query("SELECT pid, machine_identifier FROM ductwork_processes")}
            return [(h.proc.name, pid) for h in hosts if h.up() for pid in [h.proc.pid, *h.children()]
                    if (pid, f"soak-host-{h.idx}") not in rows]
        deadline = time.monotonic() + 10
        while rowless() and time.monotonic() < deadline:
            pause(0.2)
        missing_rows = rowless()

        # -- the figures -----------------------------------------------------------------
        ids = {run_id for run_id, _, _ in trigger.runs}
        status = {r[0]: (r[1], r[2]) for r in query("SELECT id, status, output FROM ductwork_runs")}
        completed = sum(1 for i in ids if status.get(i, ("",))[0] == "completed")
        halted = sum(1 for i in ids if status.get(i, ("",))[0] == "halted")
        unfinished = sorted(i for i in ids if status.get(i, ("",))[0] not in ("completed", "halted"))
        wrong = [(run_id, pipeline, expected, status[run_id][1]) for run_id, pipeline, expected in trigger.runs
                 if status.get(run_id, ("",))[0] == "completed" and ductwork._loads(status[run_id][1]) != expected]
        committed = query("SELECT count(*) FROM ductwork_executions WHERE outcome = 'succeeded'")[0][0]
        duplicates = query("SELECT step_id, count(*) FROM ductwork_executions WHERE outcome = 'succeeded' "
                           "GROUP BY step_id HAVING count(*) > 1")
        succeeded_without_commit = query(
            "SELECT count(*) FROM ductwork_steps s WHERE s.status = 'succeeded' AND NOT EXISTS "
            "(SELECT 1 FROM ductwork_executions e WHERE e.step_id = s.id AND e.outcome = 'succeeded')")[0][0]
        stuck = query("SELECT s.id, s.status, s.claimed_by FROM ductwork_steps s "
                      "WHERE s.status IN ('queued', 'running')")
        stuck_unclaimed = [r for r in stuck if r[1] == "queued" or r[2] not in
                           {p for (p,) in query("SELECT id FROM ductwork_processes")}]
        lost = len(unfinished) + len(stuck_unclaimed) + succeeded_without_commit
        crashed = query("SELECT c.started_at, c.finished_at, (SELECT min(n.started_at) FROM ductwork_executions n "
                        "WHERE n.step_id = c.step_id AND n.id > c.id) "
                        "FROM ductwork_executions c WHERE c.outcome = 'crashed'")
        handback_waits = [nxt - fin for _, fin, nxt in crashed if nxt is not None and fin is not None]
        recovery_waits = [nxt - start for start, _, nxt in crashed if nxt is not None and start is not None]
        logs = "".join(h.logs() for h in hosts)
        restarts = len(re.findall(r"; restarting", logs))
        boot_failures = len(re.findall(r"failed to boot", logs))
        reaps = len(re.findall(r"reaped process row", logs))
        rejected = len(re.findall(r"commit of step \S+ rejected|advancement of branch \d+ rejected", logs))
        reregistered = len(re.findall(r"registering again", logs))
        tracebacks = logs.count("Traceback")
        most_crashes = query("SELECT coalesce(max(crashes), 0) FROM ductwork_steps")[0][0]
        unexpected = [e for h in hosts for e in h.unexpected_exits]
        figures = [
            ("backend", f"{backend}, {n_hosts} hosts x (supervisor + advancer + 2 job workers x 2 threads)"),
            ("chaos time", f"{SOAK_SECONDS:.0f} s (seed {seed})"),
            ("chaos actions", ", ".join(f"{k} {v}" for k, v in sorted(chaos.actions.items()))),
            ("runs triggered", len(ids)),
            ("runs completed", completed),
            ("runs halted", halted),
            ("runs unfinished", len(unfinished)),
            ("wrong outputs", len(wrong)),
            ("steps committed", committed),
            ("duplicate commits", len(duplicates)),
            ("lost steps", lost),
            ("crashed executions handed back", len(crashed)),
            ("most crashes of one step", most_crashes),
            ("zombie commits rejected", rejected),
            ("rows re-registered after a pause", reregistered),
            ("child restarts", restarts),
            ("failed boots", boot_failures),
            ("reaps", reaps),
            ("unexpected supervisor exits", len(unexpected)),
            ("live processes without a row", len(missing_rows)),
            ("trigger retries (locked/unavailable)", len(trigger.retries)),
            ("trigger errors", len(trigger.errors)),
            ("tracebacks in logs", tracebacks),
            ("longest recovery wait",
             f"{max(recovery_waits, default=0):.2f} s (crashed attempt's claim -> next claim)"),
            ("longest hand-back -> re-claim", f"{max(handback_waits, default=0):.2f} s"),
            ("settle after chaos", f"{settle:.1f} s"),
        ]
        report = (f"== {backend} ({time.strftime('%Y-%m-%d %H:%M:%S')})\n"
                  + "\n".join(f"  {k:<38} {v}" for k, v in figures))
        with capsys.disabled():
            print(f"\n{report}\n  {'logs':<38} {workdir}", flush=True)
        write_report(backend, report)

        assert not unexpected, "supervisors exited on their own:\n" + "\n".join(unexpected)
        assert not missing_rows, \
            f"live processes without a process row (reaped, never registered again): {missing_rows}"
        assert not duplicates, f"steps committed more than once: {duplicates[:20]}"
        assert lost == 0, f"unfinished runs {unfinished[:20]}, stuck steps {stuck_unclaimed[:20]}, " \
                          f"succeeded without a commit {succeeded_without_commit}"
        assert halted == 0, query("SELECT id, halt_reasons FROM ductwork_runs WHERE status = 'halted' LIMIT 20")
        assert not wrong, f"wrong outputs: {wrong[:20]}"
        assert not trigger.errors, f"triggers failed: {trigger.errors[:10]}"
        assert len(ids) > SOAK_SECONDS, "the soak ran too few runs to mean anything"
        assert sum(chaos.actions.values()) > SOAK_SECONDS / 2

        # chaos over: every host still drains cleanly
        for host in hosts:
            host.proc.signal(signal.SIGTERM)
        for host in hosts:
            assert host.proc.wait(30) == 0, host.proc.log()[-3000:]
        assert query("SELECT count(*) FROM ductwork_steps WHERE status IN ('queued', 'running')") == [(0,)]
        assert all(not alive(h.proc.pid) for h in hosts)
        passed = True
    finally:
        trigger.stop.set()
        for host in hosts:
            host.close()
        ductwork._app_engine().store.close()
        if passed and not tracebacks and not os.environ.get("DUCTWORK_SOAK_KEEP"):
            shutil.rmtree(workdir, ignore_errors=True)   # kept when a log holds a traceback, to read it

"""The connection pool (SPEC §13): one small pool per process, shared by its threads; a thread
holds a connection only while a transaction runs. Real SQLite files, real Postgres sessions,
real `python ductwork.py` processes."""
from __future__ import annotations

import os
import re
import signal
import sys
import threading
import uuid

import pytest
from conftest import _pg_connect, run_cli, truncate_pg
from procs import BASE_CONFIG, LOAD_SLACK, Proc, client_ports, pause, wait_until

import ductwork

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "apps"))
import sup_app  # noqa: E402


def test_threads_share_a_pool_of_one_and_none_starves(db_url):
    store = ductwork.Store(db_url, pool_size=1)
    rounds, threads = 25, 8
    done = [0] * threads
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(rounds):
                with store.tx(write=False) as t:
                    t.one("SELECT 1")
                done[i] += 1
        except BaseException as exc:   # noqa: BLE001  (reported by the assertion below)
            errors.append(exc)
    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert not errors and done == [rounds] * threads
    assert store._pool.opened == 1 and len(store._pool.idle) == 1   # one connection served them all
    store.close()
    assert store._pool.opened == 0


def test_the_heartbeat_thread_goes_first_when_it_waits(tmp_path):
    """A pool of one held by a transaction, five threads waiting, then the urgent one: it is next."""
    store = ductwork.Store(f"sqlite:///{tmp_path}/p.sqlite3", pool_size=1)
    holding, release = threading.Event(), threading.Event()
    order: list[str] = []

    def hold() -> None:
        with store.tx(write=False):
            holding.set()
            release.wait(30)

    def queue(name: str, urgent: bool = False) -> None:
        if urgent:
            store.mark_urgent()
        with store.tx(write=False):
            order.append(name)
    threads = [threading.Thread(target=hold)]
    threads[0].start()
    assert holding.wait(10)
    for i in range(5):
        threads.append(threading.Thread(target=queue, args=(f"step commit {i}",)))
        threads[-1].start()
        wait_until(lambda n=i + 1: len(store._pool.waiting) == n, what=f"{i + 1} waiting")
    threads.append(threading.Thread(target=queue, args=("heartbeat", True)))
    threads[-1].start()
    wait_until(lambda: len(store._pool.waiting) == 6, what="the heartbeat waiting")
    release.set()
    for t in threads:
        t.join(30)
    assert order == ["heartbeat"] + [f"step commit {i}" for i in range(5)]
    store.close()


def test_a_transaction_inside_a_transaction_is_refused_not_a_deadlock(tmp_path):
    store = ductwork.Store(f"sqlite:///{tmp_path}/n.sqlite3", pool_size=1)
    with store.tx(write=False), pytest.raises(RuntimeError, match="inside a transaction"):
        with store.tx(write=False):
            pass
    with store.tx(write=False) as t:   # the pool is whole again
        assert t.one("SELECT 1") == (1,)
    store.close()


@pytest.mark.postgres
def test_a_broken_connection_is_dropped_not_handed_out_again(pg_server_url):
    store = ductwork.Store(pg_server_url, pool_size=2)
    backends = set()
    barrier = threading.Barrier(2)

    def both() -> None:   # two transactions at once: two connections in the pool
        with store.tx(write=False) as t:
            barrier.wait(10)
            backends.add(t.one("SELECT pg_backend_pid()")[0])
    pair = [threading.Thread(target=both) for _ in range(2)]
    for t in pair:
        t.start()
    for t in pair:
        t.join(30)
    assert len(backends) == 2 and store._pool.opened == 2
    admin = _pg_connect(pg_server_url)
    for backend in backends:
        admin.cursor().execute("SELECT pg_terminate_backend(%s)", (backend,))
    admin.close()
    failures = 0
    seen = set()
    for _ in range(4):   # each dead connection fails one transaction at most, then it is gone for good
        try:
            with store.tx(write=False) as t:
                seen.add(t.one("SELECT pg_backend_pid()")[0])
        except ductwork.DatabaseUnavailable:
            failures += 1
    assert failures <= 2 and seen and not (seen & backends)
    assert store._pool.opened <= 2
    store.close()


# -- connections per process, whatever the thread counts --------------------------------------------

def _sessions_of(pid: int, db_url: str) -> int:
    """Postgres sessions of process ``pid`` (found by the client ports of its sockets)."""
    ports = client_ports(pid)
    if not ports:
        return 0
    admin = _pg_connect(db_url)
    try:
        cur = admin.cursor()
        cur.execute(f"SELECT count(*) FROM pg_stat_activity WHERE client_port IN ({', '.join(map(str, ports))})")
        return cur.fetchone()[0]
    finally:
        admin.close()


@pytest.mark.postgres
def test_connections_per_process_do_not_grow_with_thread_counts(procs, tmp_path, pg_server_url):
    truncate_pg(pg_server_url)
    ductwork.configure(database_url=pg_server_url)
    ductwork.migrate()
    config = {"pipelines": ["SupMixed", "SupNap"], "job_worker": {"count": 12}, "pipeline_advancer": {"count": 6}}
    sup = Proc(tmp_path, pg_server_url, config=config)
    procs.append(sup)
    children = {key: sup.child_pid(key) for key in ("advancer", "worker:SupMixed", "worker:SupNap")}
    sup.wait_log("worker started", count=2)
    sup.wait_log("advancer started")
    # busy: every thread wants a connection at once
    runs = [sup_app.SupMixed.trigger(n) for n in range(2, 30)] + [sup_app.SupNap.trigger(0.01) for _ in range(30)]
    most = {key: 0 for key in children}
    most["supervisor"] = 0

    def sample() -> bool:
        for key, pid in (*children.items(), ("supervisor", sup.pid)):
            most[key] = max(most[key], _sessions_of(pid, pg_server_url))
        return all(run.refresh().status == "completed" for run in runs)
    wait_until(sample, timeout=60 + LOAD_SLACK, interval=0.02, what="every run completed")
    ductwork._app_engine().store.close()
    # pool_size 2 + the LISTEN connection; the supervisor: one
    assert most["supervisor"] == 1, most
    for key in children:
        assert 1 <= most[key] <= 3, most
    assert most["worker:SupMixed"] == 3 or most["worker:SupNap"] == 3 or most["advancer"] == 3, most
    sup.signal(signal.SIGTERM)
    assert sup.wait() == 0


# -- refused connections ------------------------------------------------------------------------------

@pytest.fixture
def limited_role_db(pg_server_url):
    """A new role with CONNECTION LIMIT 2 and a database of its own: (its URL, an admin connection)."""
    name = f"dw_limited_{uuid.uuid4().hex[:8]}"
    admin = _pg_connect(pg_server_url)
    admin.cursor().execute(f"CREATE ROLE {name} LOGIN CONNECTION LIMIT 2")
    admin.cursor().execute(f"CREATE DATABASE {name} OWNER {name}")
    try:
        info = ductwork.parse_database_url(pg_server_url)
        yield f"postgresql://{name}@{info.host}:{info.port}/{name}", admin, name
    finally:
        admin.cursor().execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        admin.cursor().execute(f"DROP DATABASE IF EXISTS {name}")
        admin.cursor().execute(f"DROP ROLE IF EXISTS {name}")
        admin.close()


@pytest.mark.postgres
def test_a_role_out_of_connections_is_an_outage_nothing_lost(procs, tmp_path, limited_role_db):
    """The deployment wants 1 + 3 + 3 connections and the role may hold 2: the processes that get none
    wait (one line each per outage), the supervisor stays up, no boot counts as failed, no child is killed
    as hung; once the limit is lifted every run completes, exactly once."""
    url, admin, role = limited_role_db
    ductwork.configure(database_url=url)
    ductwork.migrate()
    runs = [sup_app.SupMixed.trigger(n) for n in (2, 3, 4)]
    ductwork._app_engine().store.close()
    config = {"pipelines": ["SupMixed"]}
    sup = Proc(tmp_path, url, config=config)
    procs.append(sup)
    sup.wait_log(rf"database unavailable, retrying with backoff: .*too many connections for role \"{role}\"")
    # several hang timeouts and boot backoffs long: nothing gave up on anything
    settings = BASE_CONFIG["supervisor"]
    pause(2 * settings["hang_timeout"] + settings["heartbeat_interval"])
    assert sup.popen.poll() is None
    log = sup.log()
    assert "failed to boot" not in log and "hung" not in log and "Traceback" not in log, log[-3000:]
    # (which two processes hold the role's connections changes as they free and retry them: runs may
    # already progress through those two; the others wait their turn)
    admin.cursor().execute(f"ALTER ROLE {role} CONNECTION LIMIT -1")
    deadline = 60 * settings["heartbeat_interval"] + LOAD_SLACK
    assert [run.wait(deadline) for run in runs] == ["completed"] * 3, sup.log()[-3000:]
    assert [run.output for run in runs] == [sup_app_output(n) for n in (2, 3, 4)]
    # one line per outage: a process that was out of connections again after it got one back (a sibling freed
    # it, then took it) says so again, but never twice within one outage
    for pid in {int(m) for m in re.findall(r"\[(\d+) \w+ [^]]*\] database unavailable", sup.log())}:
        said = "".join("U" if m.group(1) else "R" for m in re.finditer(
            rf"\[{pid} [^]]*\] (?:(database unavailable)|database reachable again)", sup.log()))
        assert said.startswith("U") and "UU" not in said, (said, sup.log()[-3000:])
    ductwork._app_engine().store.close()
    sup.signal(signal.SIGTERM)
    assert sup.wait() == 0


def sup_app_output(n: int) -> int:
    """SupMixed's output for n: sum of squares below n, then (+1) + (*10), summed."""
    total = sum(i * i for i in range(n))
    return (total + 1) + total * 10


@pytest.fixture
def small_server(tmp_path):
    """A private cluster with max_connections = 20 (17 for roles that are not superusers) and a database
    of a role ``app`` that is not one: its URL."""
    from pgcluster import PrivateCluster
    pg = PrivateCluster()
    try:
        pg.create()
        with open(pg.data / "postgresql.conf", "a") as fh:
            fh.write("max_connections = 20\n")
        pg.start()
        admin = _pg_connect(pg.url)
        admin.cursor().execute("CREATE ROLE app LOGIN")
        admin.cursor().execute("CREATE DATABASE app OWNER app")
        admin.close()
        yield f"postgresql://app@127.0.0.1:{pg.port}/app?connect_timeout=2"
    finally:
        pg.remove()


@pytest.mark.postgres
def test_two_hosts_leave_room_for_the_cli_on_a_small_server(procs, tmp_path, small_server):
    """Two supervisors (a pipeline, 5 worker threads) on a server with 17 connections for the role:
    7 each with the pool (11 each, 22 in all, with one connection per thread: the CLI was locked out).
    Under load, trigger, status and migrate still get in, and nobody had to wait for a connection."""
    url = small_server
    ductwork.configure(database_url=url)
    ductwork.migrate()
    ductwork._app_engine().store.close()
    config = {"pipelines": ["SupMixed"], "job_worker": {"count": 5}}
    hosts = [Proc(tmp_path, url, name=f"host{i}", machine=f"small-{i}", config=config) for i in (1, 2)]
    procs.extend(hosts)
    for host in hosts:
        host.wait_log("worker started")
        host.wait_log("advancer started")
    env = {"DUCTWORK_MACHINE_ID": "small-cli"}
    for n in range(2, 40):   # load: every thread of both hosts busy
        out = run_cli("trigger", "SupMixed", str(n % 6), "--database-url", url, "--app", sup_app.__file__, env=env)
        assert out.returncode == 0, out.stderr
    for args in (("status",), ("migrate",)):
        out = run_cli(*args, "--database-url", url, "--app", sup_app.__file__, env=env)
        assert out.returncode == 0, out.stderr
    watcher = ductwork.Store(url)

    def finished() -> bool:
        with watcher.tx(write=False) as t:
            return t.one("SELECT count(*) FROM ductwork_runs WHERE status <> 'completed'")[0] == 0
    wait_until(finished, timeout=60 + LOAD_SLACK, what="every run completed")
    watcher.close()
    for host in hosts:
        assert "database unavailable" not in host.log(), host.log()[-3000:]
        host.signal(signal.SIGTERM)
        assert host.wait() == 0


def test_a_wait_for_a_connection_cut_short_gives_its_place_back(tmp_path):
    """Ctrl-C (or SystemExit from a signal handler) while waiting for the pool's one connection: the waiter
    leaves the line, and the connection its holder gives back goes to the next transaction, not to nobody."""
    store = ductwork.Store(f"sqlite:///{tmp_path}/w.sqlite3", pool_size=1)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with store.tx(write=False):
            holding.set()
            release.wait(30)
    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(10)

    def interrupt(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(KeyboardInterrupt), store.tx(write=False):
            pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert len(store._pool.waiting) == 0
    release.set()
    holder.join(10)
    done = threading.Event()

    def use() -> None:
        with store.tx(write=False) as t:
            t.one("SELECT 1")
        done.set()
    threading.Thread(target=use, daemon=True).start()
    assert done.wait(10), "the pool lost its connection to the interrupted waiter"
    assert store._pool.opened == 1
    store.close()


SPAWN_APP = '''
import ductwork

def spawn(n):
    run = ductwork.trigger("P13Child", n)      # app code inside a step: the worker's own pool
    return run.refresh().id

def child(n):
    return n

class P13Spawn(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(spawn)

class P13Child(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(child)
'''


@pytest.mark.postgres
def test_a_step_that_triggers_uses_its_process_pool(procs, tmp_path, pg_server_url):
    truncate_pg(pg_server_url)
    app = tmp_path / "spawn_app.py"
    app.write_text(SPAWN_APP)
    config = {"app": str(app), "pipelines": ["P13Spawn", "P13Child"], "job_worker": {"count": 6}}
    sup = Proc(tmp_path, pg_server_url, config=config)
    procs.append(sup)
    spawner = sup.child_pid("worker:P13Spawn")
    sup.wait_log("worker started", count=2)
    most = 0
    for n in range(12):
        out = run_cli("trigger", "P13Spawn", str(n), "--database-url", pg_server_url, "--app", str(app))
        assert out.returncode == 0, out.stderr
        most = max(most, _sessions_of(spawner, pg_server_url))
    store = ductwork.Store(pg_server_url)

    def done() -> bool:
        nonlocal most
        most = max(most, _sessions_of(spawner, pg_server_url))
        with store.tx(write=False) as t:
            return t.one("SELECT count(*) FROM ductwork_runs WHERE status = 'completed'")[0] == 24
    wait_until(done, timeout=60 + LOAD_SLACK, interval=0.02, what="every run and its child run completed")
    store.close()
    assert 1 <= most <= 3, most   # pool_size 2 + LISTEN, the steps' triggers included
    sup.signal(signal.SIGTERM)
    assert sup.wait() == 0

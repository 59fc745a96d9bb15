"""The storage section: database URLs, connections, Store and Tx, migrations, on real SQLite and PostgreSQL.

Postgres logins that need a password (SCRAM) and TLS, against private clusters, are in test_pg_auth.py.
"""
from __future__ import annotations

import multiprocessing
import ssl
import time

import pytest
from conftest import TABLES, _pg_connect, concurrent_migrates

import ductwork

EMPTY_ENV: dict = {}


def config_error(**kwargs) -> str:
    kwargs.setdefault("environ", EMPTY_ENV)
    with pytest.raises(ductwork.ConfigError) as info:
        ductwork.load_config(**kwargs)
    return str(info.value)


# -- database URLs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("url, fragment", [
    ("mysql://u:pw@h/db", "mysql"),
    ("sqlite://relative.db", "sqlite:///"),
    ("sqlite:///", "sqlite:///"),
    ("not a url", "database_url"),
    ("postgresql://u@h:99999/db", "port"),
    ("postgresql://u@h/db?sslmode=sometimes", "sslmode"),
    ("postgresql://u@h/db?connect_timeout=abc", "connect_timeout"),
    ("postgresql://u@h/db?connect_timeout=-1", "connect_timeout"),
])
def test_bad_database_url(url, fragment):
    message = config_error(data={"database_url": url})
    assert fragment in message


@pytest.mark.parametrize("url, expected", [
    ("sqlite:///relative.db", {"dialect": "sqlite", "path": "relative.db"}),
    ("sqlite:////abs/dir/x.db", {"dialect": "sqlite", "path": "/abs/dir/x.db"}),
    ("postgres://bob@db.example/app", {"dialect": "postgres", "host": "db.example", "port": 5432,
                                       "user": "bob", "database": "app", "sslmode": "prefer"}),
    ("postgresql://bob:pw@db.example:6543/app?sslmode=require&connect_timeout=2",
     {"dialect": "postgres", "host": "db.example", "port": 6543, "user": "bob", "password": "pw",
      "database": "app", "sslmode": "require", "connect_timeout": 2.0}),
])
def test_good_database_urls(url, expected):
    info = ductwork.parse_database_url(url)
    for field, value in expected.items():
        assert getattr(info, field) == value


@pytest.mark.parametrize("url, timeout", [
    ("sqlite:///x.db", 30.0),
    ("sqlite:///x.db?busy_timeout=0.25", 0.25),
    ("sqlite:////abs/x.db?busy_timeout=10", 10.0),
])
def test_a_sqlite_urls_busy_timeout_is_its_connect_timeout(url, timeout):
    info = ductwork.parse_database_url(url)
    assert (info.dialect, info.path.endswith("x.db"), info.connect_timeout) == ("sqlite", True, timeout)
    assert "?" not in info.path and info.display == f"sqlite:///{info.path}"


@pytest.mark.parametrize("url, fragment", [
    ("sqlite:///x.db?busy_timeout=soon", "busy_timeout in a SQLite URL must be a number"),
    ("sqlite:///x.db?journal=wal", "unknown SQLite URL option 'journal'"),
])
def test_bad_sqlite_url_options(url, fragment):
    with pytest.raises(ductwork.ConfigError, match=fragment):
        ductwork.parse_database_url(url)


def test_a_postgres_url_without_user_or_password_takes_pguser_and_pgpassword(monkeypatch):
    monkeypatch.setenv("PGUSER", "envuser")
    monkeypatch.setenv("PGPASSWORD", "EnvPassw0rdXyz")
    info = ductwork.parse_database_url("postgresql://db.example/app")
    assert (info.user, info.password, info.host, info.database) == ("envuser", "EnvPassw0rdXyz", "db.example", "app")
    assert info.display == "postgresql://envuser:***@db.example:5432/app"
    assert ductwork.mask("login EnvPassw0rdXyz failed") == "login *** failed"   # remembered as a secret
    named = ductwork.parse_database_url("postgresql://bob:own@db.example")  # the URL's own wins; no path: postgres
    assert (named.user, named.password, named.database) == ("bob", "own", "postgres")


# -- passwords -----------------------------------------------------------------------------------------


def test_password_not_in_display_or_repr():
    info = ductwork.parse_database_url("postgresql://bob:Sup3rS3cretPw@db.example:5432/app")
    assert info.password == "Sup3rS3cretPw"
    assert "Sup3rS3cretPw" not in info.display
    assert "***" in info.display
    assert "bob" in info.display and "db.example" in info.display
    assert "Sup3rS3cretPw" not in repr(info)


def test_url_encoded_password_is_masked_both_ways():
    url = "postgresql://bob:p%40ss%2FW0rdXyz@db.example/app"
    info = ductwork.parse_database_url(url)
    assert info.password == "p@ss/W0rdXyz"
    assert "p@ss/W0rdXyz" not in info.display
    assert "p%40ss%2FW0rdXyz" not in info.display
    masked = ductwork.mask(f"cannot connect to {url}: password p@ss/W0rdXyz rejected")
    assert "p@ss/W0rdXyz" not in masked
    assert "p%40ss%2FW0rdXyz" not in masked
    assert "***" in masked


def test_password_not_in_bad_url_errors():
    for url in ("postgresql://u:Hidden9Secret@h:99999/db", "postgresql://u:Hidden9Secret@h/db?sslmode=nope"):
        message = config_error(data={"database_url": url})
        assert "Hidden9Secret" not in message
        assert "Hidden9Secret" not in ductwork.mask(message)


# -- connections ------------------------------------------------------------------------------------


def test_an_unreachable_postgres_server_is_database_unavailable_without_the_password():
    store = ductwork.Store("postgresql://bob:Unre4chablePw@127.0.0.1:1/app?connect_timeout=2")
    with pytest.raises(ductwork.DatabaseUnavailable) as info:
        store.now()
    text = str(info.value)
    assert text.startswith("cannot connect to postgresql://bob:***@127.0.0.1:1/app: ") and "Unre4chablePw" not in text
    with pytest.raises(ductwork.DatabaseUnavailable):
        ductwork.schema_is_current(store)   # unreachable is not "no schema": it raises


def test_a_sqlite_file_in_a_missing_directory_is_a_config_error(tmp_path):
    store = ductwork.Store(f"sqlite:///{tmp_path}/no/such/dir/x.sqlite3")
    with pytest.raises(ductwork.ConfigError, match="cannot open SQLite database .*is the directory writable"):
        store.now()


def test_a_read_only_sqlite_store_never_creates_the_file(tmp_path):
    path = tmp_path / "probe.sqlite3"
    with pytest.raises(ductwork.DatabaseUnavailable, match="cannot open sqlite:///"):
        ductwork.Store(f"sqlite:///{path}", read_only=True).now()
    assert not path.exists()
    ductwork.migrate_store(ductwork.Store(f"sqlite:///{path}"))
    probe = ductwork.Store(f"sqlite:///{path}", read_only=True)
    assert ductwork.schema_is_current(probe) is True and abs(probe.now() - time.time()) < 5


def test_now_is_the_database_clock_in_epoch_seconds(db_url):
    store = ductwork.Store(db_url)
    before = time.time()
    now = store.now()
    assert isinstance(now, float) and before - 5 < now < time.time() + 5
    store.close()


def _backend(store):
    """An id of the session behind the pool's connection (Postgres: its backend pid)."""
    with store.tx(write=False) as t:
        return id(t.conn.conn) if store.dialect == "sqlite" else t.one("SELECT pg_backend_pid()")[0]


def _use_in_child(store, conn):
    try:
        conn.send(abs(store.now() - time.time()) < 5)
        store.close()
    finally:
        conn.close()


def test_a_forked_child_opens_its_own_connection_and_leaves_the_parents_alone(db_url):
    store = ductwork.Store(db_url)
    parent = _backend(store)
    ctx = multiprocessing.get_context("fork")
    mine, theirs = ctx.Pipe()
    child = ctx.Process(target=_use_in_child, args=(store, theirs))
    child.start()
    assert mine.recv() is True
    child.join(30)
    assert child.exitcode == 0
    assert _backend(store) == parent   # the child closed its own connection, not the parent's session
    store.close()


@pytest.mark.postgres
def test_a_connection_the_server_ended_is_unavailable_once_then_reopened(pg_server_url):
    store = ductwork.Store(pg_server_url)
    backend = _backend(store)
    admin = _pg_connect(pg_server_url)
    admin.cursor().execute("SELECT pg_terminate_backend(%s)", (backend,))
    admin.close()
    with pytest.raises(ductwork.DatabaseUnavailable):
        store.now()
    assert _backend(store) != backend      # the broken connection was dropped; the next one is new
    store.close()


@pytest.mark.postgres
def test_postgres_keeps_a_bounded_number_of_prepared_statements(pg_server_url):
    store = ductwork.Store(pg_server_url)
    limit = ductwork._PgConnection.MAX_PREPARED
    with store.tx(write=False) as t:
        values = [t.one(f"SELECT {i} + ?", (1,))[0] for i in range(limit + 40)]   # distinct texts
        held = t.one("SELECT count(*) FROM pg_prepared_statements")[0]
    assert values == [i + 1 for i in range(limit + 40)]
    assert 0 < held <= limit, held
    with store.tx(write=False) as t:   # the statements that fill the cache, then one that empties it, first in its
        for i in range(limit - held):  # transaction (its BEGIN not answered yet when the closes are sent)
            t.one(f"SELECT {i} + 1000")
    with store.tx(write=False) as t:
        assert t.one("SELECT -1 + ?", (2,))[0] == 1
        assert t.one("SELECT xact_start < statement_timestamp() FROM pg_stat_activity "
                     "WHERE pid = pg_backend_pid()")[0] is True   # (still one transaction since before it)
        assert t.one("SELECT count(*) FROM pg_prepared_statements")[0] <= 3
    store.close()


@pytest.mark.postgres
def test_postgres_begin_goes_with_the_first_statement_and_a_transaction_is_still_one(pg_server_url):
    """BEGIN is written, and sent with the transaction's first statement (one round trip fewer): an empty
    transaction, one that fails before its first statement, and one rolled back all leave the connection in step
    with the server, and a transaction's writes are still all or nothing."""
    store = ductwork.Store(pg_server_url)
    with store.tx() as t:
        t.run("CREATE TABLE IF NOT EXISTS begin_probe (n INTEGER)")
        t.run("DELETE FROM begin_probe")
    backend = _backend(store)
    with store.tx():
        pass
    assert _backend(store) == backend   # (an empty transaction: its BEGIN answered at the COMMIT, in step)
    with pytest.raises(ZeroDivisionError), store.tx():
        raise ZeroDivisionError("before any statement")
    with pytest.raises(RuntimeError), store.tx() as t:
        t.run("INSERT INTO begin_probe (n) VALUES (1)")
        assert t.one("SELECT count(*) FROM begin_probe")[0] == 1
        raise RuntimeError("rolled back")
    with store.tx(write=False) as t:
        assert t.one("SELECT count(*) FROM begin_probe")[0] == 0
        first = t.one("SELECT txid_current()")[0]
        assert t.one("SELECT txid_current()")[0] == first   # (both statements in one transaction)
    with pytest.raises(Exception, match="no_such_table"), store.tx() as t:
        t.run("INSERT INTO begin_probe (n) VALUES (2)")
        t.run("INSERT INTO no_such_table (n) VALUES (3)")
    with store.tx() as t:
        assert t.one("SELECT count(*) FROM begin_probe")[0] == 0
        t.run("DROP TABLE begin_probe")
        assert t.one("SELECT count(*) FROM pg_stat_activity WHERE pid = pg_backend_pid() "
                     "AND state = 'active'")[0] == 1
    store.close()


def test_tls_contexts_follow_libpq_sslmodes():
    contexts = {mode: ductwork._TLS.context(mode) for mode in ("prefer", "require", "verify-ca", "verify-full")}
    seen = {mode: (ctx.verify_mode, ctx.check_hostname) for mode, ctx in contexts.items()}
    assert seen == {"prefer": (ssl.CERT_NONE, False), "require": (ssl.CERT_NONE, False),
                    "verify-ca": (ssl.CERT_REQUIRED, False), "verify-full": (ssl.CERT_REQUIRED, True)}
    assert all(ductwork._TLS.context(mode) is ctx for mode, ctx in contexts.items())   # one per process and mode


# -- Store and Tx ----------------------------------------------------------------------------------


@pytest.fixture
def store(db_url):
    """A Store on the test database, schema created (ductwork_context as a scratch table)."""
    store = ductwork.Store(db_url)
    ductwork.migrate_store(store)
    yield store
    store.close()


def _context_rows(store):
    with store.tx(write=False) as t:
        return t.all("SELECT run_id, key, value FROM ductwork_context ORDER BY run_id, key")


def test_question_mark_and_named_parameters_on_both_databases(store):
    with store.tx() as t:
        assert t.run("INSERT INTO ductwork_context (run_id, key, value) VALUES (?, ?, ?)", (1, "a", "x")) == 1
        assert t.run("INSERT INTO ductwork_context (run_id, key, value) VALUES (?, ?, ?)", [1, "b", "y"]) == 1
        # a name may appear more than once
        assert t.run("INSERT INTO ductwork_context (run_id, key, value) VALUES (:run, :key, :key)",
                     {"run": 2, "key": "c"}) == 1
        assert t.one("SELECT value FROM ductwork_context WHERE run_id = ? AND key = ?", (1, "b")) == ("y",)
        assert t.one("SELECT value FROM ductwork_context WHERE run_id = :run AND key = :key",
                     {"run": 2, "key": "c"}) == ("c",)
        assert t.one("SELECT value FROM ductwork_context WHERE key = :key", {"key": "none"}) is None
        assert t.run("UPDATE ductwork_context SET value = :value WHERE run_id = :run", {"value": "z", "run": 1}) == 2
        assert t.all("SELECT count(*) FROM ductwork_context") == [(3,)]
    assert _context_rows(store) == [(1, "a", "z"), (1, "b", "z"), (2, "c", "c")]


def test_a_transaction_rolls_back_when_its_body_raises(store):
    hints = []
    store.notify_hook = lambda channel, payload: hints.append((channel, payload))
    with pytest.raises(ValueError, match="the body failed"), store.tx() as t:
        t.run("INSERT INTO ductwork_context (run_id, key, value) VALUES (?, ?, ?)", (1, "a", "x"))
        t.notify(ductwork.CH_JOBS, "P")
        raise ValueError("the body failed")
    assert _context_rows(store) == [] and hints == []    # nothing written, no wake-up sent
    with store.tx() as t:                                 # and the store goes on working
        t.run("INSERT INTO ductwork_context (run_id, key, value) VALUES (?, ?, ?)", (1, "a", "x"))
    assert _context_rows(store) == [(1, "a", "x")]


def test_a_failed_statement_rolls_back_the_whole_transaction(store):
    with pytest.raises(Exception) as info, store.tx() as t:
        t.run("INSERT INTO ductwork_context (run_id, key, value) VALUES (?, ?, ?)", (1, "a", "x"))
        t.run("INSERT INTO ductwork_context (run_id, key, value) VALUES (?, ?, ?)", (2, "b", "y"))
        t.run("INSERT INTO ductwork_context (run_id, key, value) VALUES (?, ?, ?)", (1, "a", "again"))
    assert not isinstance(info.value, ductwork.DatabaseUnavailable), info.value   # a constraint is not an outage
    assert _context_rows(store) == []


def test_wake_up_hints_go_out_once_each_after_the_commit(store):
    hints = []
    store.notify_hook = lambda channel, payload: hints.append((channel, payload))
    with store.tx() as t:
        t.notify(ductwork.CH_JOBS, "P")
        t.notify(ductwork.CH_ADVANCE, "P")
        t.notify(ductwork.CH_JOBS, "P")
        t.notify(ductwork.CH_JOBS, "Q")
        assert hints == []                                # nothing before the commit
    assert hints == [(ductwork.CH_JOBS, "P"), (ductwork.CH_ADVANCE, "P"), (ductwork.CH_JOBS, "Q")]


def test_store_sql_fills_the_placeholders_for_each_database():
    text = "SELECT {now} FROM t WHERE a = ? AND b = ? AND c = :c {skip_locked}"
    pg, lite = ductwork.Store("postgresql://u@h/db"), ductwork.Store("sqlite:///unused.sqlite3")   # no connection
    assert pg.sql(text) == ("SELECT (extract(epoch from clock_timestamp())::float8) FROM t "
                            "WHERE a = :p0 AND b = :p1 AND c = :c FOR UPDATE SKIP LOCKED")
    assert lite.sql(text) == ("SELECT ((julianday('now') - 2440587.5) * 86400.0) FROM t "
                              "WHERE a = ? AND b = ? AND c = :c ")
    assert pg.sql("x {for_update} {key_share}") == "x FOR UPDATE FOR KEY SHARE"
    assert lite.sql("x {for_update} {key_share}") == "x  "
    assert pg.sql(text) is pg.sql(text)                   # filled once per text
    assert pg.sql("SELECT 1") == lite.sql("SELECT 1") == "SELECT 1"


# -- migrations ------------------------------------------------------------------------------------


ALL_VERSIONS = [m.version for m in ductwork.MIGRATIONS]


def test_migrate_store_is_idempotent_and_schema_is_current_follows(fresh_db_url):
    store = ductwork.Store(fresh_db_url)
    assert ductwork.schema_is_current(store) is False     # no schema at all
    assert ductwork.migrate_store(store) == ALL_VERSIONS == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert ductwork.schema_is_current(store) is True
    assert ductwork.migrate_store(store) == []
    with store.tx() as t:
        assert [t.one(f"SELECT count(*) FROM {table}")[0] for table in TABLES] == [0] * len(TABLES)
        assert t.all("SELECT version FROM ductwork_schema_migrations ORDER BY version") == [(v,) for v in ALL_VERSIONS]
        t.run("DELETE FROM ductwork_schema_migrations")
    assert ductwork.schema_is_current(store) is False     # an older (here: unrecorded) schema
    store.close()


def test_concurrent_migrate_store_applies_each_version_once(fresh_db_url):
    assert concurrent_migrates(fresh_db_url) == [[], [], ALL_VERSIONS]
    assert ductwork.schema_is_current(ductwork.Store(fresh_db_url))

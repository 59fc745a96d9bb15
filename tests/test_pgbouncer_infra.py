"""The PgBouncer test helper itself (tests/pgbouncer.py), with pg8000.native and no ductwork: it
really pools in transaction mode, and it really breaks what ductwork does today (one named
server-side prepared statement per SQL text and client connection)."""
from __future__ import annotations

import time
import urllib.parse

import pg8000.native
import pytest
from conftest import PG_ADMIN_URL

pytestmark = pytest.mark.postgres

DATABASE = urllib.parse.urlsplit(PG_ADMIN_URL).path.lstrip("/") or "postgres"


def connect(url: str) -> pg8000.native.Connection:
    parts = urllib.parse.urlsplit(url)
    return pg8000.native.Connection(user=urllib.parse.unquote(parts.username or "postgres"),
                                    password=urllib.parse.unquote(parts.password) if parts.password else None,
                                    host=parts.hostname, port=parts.port, database=parts.path.lstrip("/"),
                                    timeout=10, application_name="ductwork-test")


def backend_pid(conn: pg8000.native.Connection) -> int:
    return conn.run("SELECT pg_backend_pid()")[0][0]


def test_select_1_through_the_pooler(pgbouncer_db):
    conn = connect(pgbouncer_db.url)
    try:
        assert conn.run("SELECT 1") == [[1]]
        assert conn.run("SELECT current_database()") == [[pgbouncer_db.name]]
    finally:
        conn.close()
    pools = {p["database"]: p for p in pgbouncer_db.bouncer.admin("SHOW POOLS")}
    assert pools[pgbouncer_db.name]["pool_mode"] == "transaction"
    assert pgbouncer_db.bouncer.admin("SHOW VERSION")[0]["version"].startswith("PgBouncer 1.")
    assert f":{pgbouncer_db.bouncer.port}/" in pgbouncer_db.url
    assert pgbouncer_db.bouncer.url("x", pgbouncer="true").endswith(f":{pgbouncer_db.bouncer.port}/x?pgbouncer=true")


def test_two_open_clients_share_one_server_connection(start_pgbouncer):
    """default_pool_size=1: both clients stay connected and get the same backend, so what one
    client SETs outside a transaction is seen by the other: the pooler does not keep sessions."""
    bouncer = start_pgbouncer(default_pool_size=1)
    a, b = connect(bouncer.url(DATABASE)), connect(bouncer.url(DATABASE))
    try:
        assert backend_pid(a) == backend_pid(b)
        a.run("SET ductwork.pooler_marker = 'set by a'")
        assert b.run("SELECT current_setting('ductwork.pooler_marker', true)") == [["set by a"]]
    finally:
        a.close()
        b.close()


def test_a_transaction_holds_the_server_and_query_wait_timeout_applies(start_pgbouncer):
    bouncer = start_pgbouncer(default_pool_size=1, query_wait_timeout=1)
    a, b = connect(bouncer.url(DATABASE)), connect(bouncer.url(DATABASE))
    try:
        a.run("BEGIN")
        backend_pid(a)
        started = time.monotonic()
        with pytest.raises((pg8000.native.DatabaseError, pg8000.native.InterfaceError)):
            b.run("SELECT 1")   # waits for the one server connection, which A's transaction holds
        assert time.monotonic() - started < 8
        assert "query_wait_timeout" in bouncer.log()
        a.run("COMMIT")
    finally:
        a.close()
        b.close()


def test_named_prepared_statements_collide_on_a_shared_server_connection(start_pgbouncer):
    """What ductwork hits behind a transaction pooler today: pg8000 names every client's first
    prepared statement pg8000_statement_0, and the server connection is shared."""
    bouncer = start_pgbouncer(default_pool_size=1)
    a, b = connect(bouncer.url(DATABASE)), connect(bouncer.url(DATABASE))
    try:
        statement = a.prepare("SELECT 1")
        with pytest.raises(pg8000.native.DatabaseError) as caught:
            b.prepare("SELECT 2")
        assert caught.value.args[0]["C"] == "42P05", caught.value   # duplicate_prepared_statement
        assert 'prepared statement "pg8000_statement_0" already exists' in str(caught.value)
        assert statement.run() == [[1]]
    finally:
        a.close()
        b.close()


def test_a_prepared_statement_is_missing_on_another_server_connection(start_pgbouncer):
    """A prepares on server connection X; while C's transaction holds X, A's next execution
    gets a new server connection Y, where the statement does not exist."""
    bouncer = start_pgbouncer(default_pool_size=2)
    a, c = connect(bouncer.url(DATABASE)), connect(bouncer.url(DATABASE))
    try:
        a.run("BEGIN")
        prepared_on = backend_pid(a)
        statement = a.prepare("SELECT 1")
        a.run("COMMIT")
        c.run("BEGIN")
        assert backend_pid(c) == prepared_on   # the only server connection so far, idle again
        with pytest.raises(pg8000.native.DatabaseError) as caught:
            statement.run()
        assert caught.value.args[0]["C"] == "26000", caught.value   # invalid_sql_statement_name
        assert 'prepared statement "pg8000_statement_0" does not exist' in str(caught.value)
        c.run("ROLLBACK")
    finally:
        a.close()
        c.close()


def test_add_user_lets_a_new_role_log_in(start_pgbouncer):
    bouncer = start_pgbouncer()
    role = "ductwork_pooler_role"
    admin = connect(PG_ADMIN_URL)
    try:
        admin.run(f"DROP ROLE IF EXISTS {role}")
        admin.run(f"CREATE ROLE {role} LOGIN")
        with pytest.raises(pg8000.native.DatabaseError):   # trust still needs the user in the auth file
            connect(bouncer.url(DATABASE, user=role))
        bouncer.add_user(role)
        conn = connect(bouncer.url(DATABASE, user=role))
        assert conn.run("SELECT current_user") == [[role]]
        conn.close()
    finally:
        bouncer.stop()   # its server connection as that role must end before DROP ROLE
        admin.run(f"DROP ROLE IF EXISTS {role}")
        admin.close()


def test_stop_ends_the_process_and_keeps_the_log(start_pgbouncer):
    bouncer = start_pgbouncer()
    proc, root = bouncer.proc, bouncer.root
    bouncer.stop()
    assert proc.poll() is not None
    assert not root.exists()
    assert "got SIGTERM" in bouncer.log()
    bouncer.stop()   # twice is fine

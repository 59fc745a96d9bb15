"""trigger(connection=) (SPEC §19): the run written on the caller's own DB-API connection, inside the caller's
transaction, on every driver we name (sqlite3, pg8000 native and DB-API, psycopg 3, psycopg2): it exists only if
that transaction commits, nobody else sees it before, and on Postgres the workers' wake-up follows the commit."""
from __future__ import annotations

import sqlite3

import pytest

import ductwork


def double(x):
    return 2 * x


class OutboxPipe(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(double)


def pg_params(url: str) -> dict:
    info = ductwork.parse_database_url(url)
    return {"host": info.host, "port": info.port, "user": info.user, "database": info.database}


def open_connection(driver: str, url: str):
    """The caller's own connection, as the app would open it, a transaction to be begun by its first statement."""
    if driver == "sqlite3":
        return sqlite3.connect(ductwork.parse_database_url(url).path)
    p = pg_params(url)
    if driver == "pg8000.native":
        import pg8000.native
        conn = pg8000.native.Connection(**p)
        conn.run("BEGIN")
        return conn
    if driver == "pg8000.dbapi":
        import pg8000.dbapi
        return pg8000.dbapi.connect(**p)
    if driver == "psycopg":
        import psycopg  # a test dependency (pyproject's test extra), as is psycopg2
        return psycopg.connect(host=p["host"], port=p["port"], user=p["user"], dbname=p["database"])
    import psycopg2
    return psycopg2.connect(host=p["host"], port=p["port"], user=p["user"], dbname=p["database"])


def end(conn, driver: str, commit: bool) -> None:
    if driver == "pg8000.native":
        conn.run("COMMIT" if commit else "ROLLBACK")
    elif commit:
        conn.commit()
    else:
        conn.rollback()


def app_write(conn, driver: str, note: str) -> None:
    """The app's own write in the same transaction (the outbox pattern's business row)."""
    sql = "INSERT INTO outbox_orders (note) VALUES ('" + note + "')"
    if driver == "pg8000.native":
        conn.run(sql)
    else:
        cur = conn.cursor()
        cur.execute(sql)
        cur.close()


def rows(url: str, sql: str) -> int:
    store = ductwork.Store(url)
    try:
        with store.tx(write=False) as t:
            return t.one(sql)[0]
    finally:
        store.close()


def drivers_for(db_url: str) -> list[str]:
    return ["sqlite3"] if db_url.startswith("sqlite") else ["pg8000.native", "pg8000.dbapi", "psycopg", "psycopg2"]


@pytest.fixture
def outbox(engine, db_url):
    store = ductwork.Store(db_url)
    with store.tx() as t:
        t.run("CREATE TABLE IF NOT EXISTS outbox_orders (note TEXT)")
        t.run("DELETE FROM outbox_orders")
    store.close()
    return db_url


def test_the_run_exists_only_if_the_callers_transaction_commits_on_every_driver(outbox):
    for driver in drivers_for(outbox):
        for commit in (True, False):
            conn = open_connection(driver, outbox)
            try:
                app_write(conn, driver, f"{driver}-{commit}")
                run = OutboxPipe.trigger(21, connection=conn)
                assert (run.status, run.input, run.new) == ("in_progress", [21], True), driver
                again = ductwork.trigger("OutboxPipe", 21, key=f"k-{driver}-{commit}", connection=conn)
                same = ductwork.trigger("OutboxPipe", 21, key=f"k-{driver}-{commit}", connection=conn)
                assert (same.id, same.new) == (again.id, False), driver
                with pytest.raises(ductwork.DuctworkError, match="not found"):
                    ductwork.Run.get(run.id)   # another connection does not see it before the commit
                end(conn, driver, commit)
            finally:
                conn.close()
            seen = rows(outbox, f"SELECT count(*) FROM ductwork_runs WHERE id IN ({run.id}, {again.id})")
            steps = rows(outbox, f"SELECT count(*) FROM ductwork_steps WHERE run_id IN ({run.id}, {again.id})")
            orders = rows(outbox, f"SELECT count(*) FROM outbox_orders WHERE note = '{driver}-{commit}'")
            assert (seen, steps, orders) == ((2, 2, 1) if commit else (0, 0, 0)), (driver, commit)
            if commit:
                assert ductwork.Run.get(run.id).status == "in_progress"


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)   # (SQLite: the workers' poll finds it)
@pytest.mark.parametrize("driver", ["psycopg", "pg8000.native"])
def test_on_postgres_the_workers_wake_up_follows_the_commit(outbox, start_runtime, driver):
    # polling every 60 s: a run done well within that was woken by the commit's NOTIFY
    handle = start_runtime(["OutboxPipe"], job_worker={"polling_timeout": 60},
                           pipeline_advancer={"polling_timeout": 60})
    assert handle.runtime.booted.wait(20)
    assert OutboxPipe.trigger(1).wait(timeout=20) == "completed"   # (now every worker thread waits, idle)
    conn = open_connection(driver, outbox)
    try:
        run = OutboxPipe.trigger(5, connection=conn)
        end(conn, driver, True)
    finally:
        conn.close()
    assert run.wait(timeout=20) == "completed"
    assert run.refresh().output == 10


def test_a_connection_to_another_database_or_of_an_unknown_kind_is_refused(outbox, tmp_path):
    if outbox.startswith("sqlite"):
        other = sqlite3.connect(str(tmp_path / "other.sqlite3"))
        memory = sqlite3.connect(":memory:")
        for conn, where in ((other, "other.sqlite3"), (memory, "in-memory")):
            with pytest.raises(ductwork.DuctworkError, match=f"the connection is to .*{where}"):
                OutboxPipe.trigger(1, connection=conn)
            conn.close()
    else:
        import pg8000.native
        conn = pg8000.native.Connection(**{**pg_params(outbox), "database": "postgres"})
        conn.run("BEGIN")
        with pytest.raises(ductwork.DuctworkError, match="the connection is to postgres, but the configured"):
            OutboxPipe.trigger(1, connection=conn)
        conn.close()
        lite = sqlite3.connect(str(tmp_path / "x.sqlite3"))
        with pytest.raises(ductwork.DuctworkError, match="a sqlite connection, but the configured database"):
            OutboxPipe.trigger(1, connection=lite)
        lite.close()
    with pytest.raises(ductwork.DuctworkError, match="is not a connection ductwork can write on"):
        OutboxPipe.trigger(1, connection=object())
    assert rows(outbox, "SELECT count(*) FROM ductwork_runs") == 0


def test_an_autocommitting_or_asynchronous_connection_is_refused(outbox):
    """The run would not be part of the caller's transaction: refused before anything is written."""
    if outbox.startswith("sqlite"):
        conn = sqlite3.connect(ductwork.parse_database_url(outbox).path, isolation_level=None)
        with pytest.raises(ductwork.DuctworkError, match="autocommit"):
            OutboxPipe.trigger(1, connection=conn)
        conn.close()
    else:
        import asyncio

        import pg8000.native
        import psycopg
        p = pg_params(outbox)
        native = pg8000.native.Connection(**p)   # no BEGIN: each statement would commit alone
        with pytest.raises(ductwork.DuctworkError, match="autocommit mode.*run BEGIN first"):
            OutboxPipe.trigger(1, connection=native)
        native.close()
        auto = psycopg.connect(host=p["host"], port=p["port"], user=p["user"], dbname=p["database"], autocommit=True)
        with pytest.raises(ductwork.DuctworkError, match="autocommit mode"):
            OutboxPipe.trigger(1, connection=auto)
        auto.close()

        async def refused() -> str:
            conn = await psycopg.AsyncConnection.connect(host=p["host"], port=p["port"], user=p["user"],
                                                         dbname=p["database"])
            try:
                with pytest.raises(ductwork.DuctworkError, match="is asynchronous") as caught:
                    OutboxPipe.trigger(1, connection=conn)
                return str(caught.value)
            finally:
                await conn.close()
        assert "AsyncConnection" in asyncio.run(refused())
    assert rows(outbox, "SELECT count(*) FROM ductwork_runs") == 0


def test_a_connection_that_gives_rows_as_dicts_works(outbox):
    if outbox.startswith("sqlite"):
        conn = sqlite3.connect(ductwork.parse_database_url(outbox).path)
        conn.row_factory = sqlite3.Row
    else:
        import psycopg
        import psycopg.rows
        p = pg_params(outbox)
        conn = psycopg.connect(host=p["host"], port=p["port"], user=p["user"], dbname=p["database"],
                               row_factory=psycopg.rows.dict_row)
    try:
        run = OutboxPipe.trigger(4, connection=conn)
        assert (run.status, run.input, run.pipeline) == ("in_progress", [4], "OutboxPipe")
        conn.commit()
    finally:
        conn.close()
    assert ductwork.Run.get(run.id).input == [4]


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_an_autocommit_connection_inside_a_transaction_it_began_is_accepted(outbox):
    """psycopg's documented pattern: autocommit=True, and conn.transaction() for the writes that go together."""
    import psycopg
    p = pg_params(outbox)
    conn = psycopg.connect(host=p["host"], port=p["port"], user=p["user"], dbname=p["database"], autocommit=True)
    try:
        with pytest.raises(RuntimeError, match="rolled back"), conn.transaction():
            dropped = OutboxPipe.trigger(2, connection=conn)
            raise RuntimeError("rolled back")
        with conn.transaction():
            kept = OutboxPipe.trigger(3, connection=conn)
    finally:
        conn.close()
    assert rows(outbox, f"SELECT count(*) FROM ductwork_runs WHERE id = {dropped.id}") == 0
    assert ductwork.Run.get(kept.id).input == [3]

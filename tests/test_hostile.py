"""Hostile input at the command line: one `ductwork: error:` line, a documented exit code, nothing stored lost."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
from conftest import PG_ADMIN_URL, ROOT, _pg_connect

import ductwork

# -- hostile input -------------------------------------------------------------------------------
# Every call runs the real CLI (`python ductwork.py ...`) in the test's tmp_path with the DUCTWORK_*
# variables blanked. Exit 2: usage and config errors; exit 1: runtime errors; never a traceback.

HOSTILE_ENV = {"DUCTWORK_ENV": "", "DUCTWORK_ROLE": "", "DUCTWORK_DATABASE_URL": "", "DATABASE_URL": "",
               "DUCTWORK_APP": "", "DUCTWORK_MACHINE_ID": "host-hostile", "PGPASSWORD": ""}

HOSTILE_APP = """
import ductwork

def hostile_echo(*args):
    return list(args)

class HostileEcho(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(hostile_echo)
"""


def hostile_cli(cwd, *args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "ductwork.py"), *args], capture_output=True, text=True,
                          env={**os.environ, **HOSTILE_ENV, **(env or {})}, cwd=str(cwd), timeout=timeout)


def one_error(result: subprocess.CompletedProcess, code: int, fragment: str = "") -> str:
    """Exit ``code``, exactly one stderr line `ductwork: error: ...` (holding ``fragment``), no traceback."""
    assert result.returncode == code, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("ductwork: warning:")]
    assert len(lines) == 1 and lines[0].startswith("ductwork: error: "), result.stderr
    assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def hostile_app(tmp_path):
    path = tmp_path / "hostile_app.py"
    path.write_text(HOSTILE_APP)
    return str(path)


def stored_runs(url: str) -> list:
    store = ductwork.Store(url)
    try:
        with store.tx(write=False) as t:
            return t.all("SELECT id, pipeline, status, input FROM ductwork_runs ORDER BY id")
    finally:
        store.close()


@pytest.fixture
def one_run(tmp_path, db_url, hostile_app):
    """The test database, migrated, holding one run: (url, its rows)."""
    ok = hostile_cli(tmp_path, "trigger", "HostileEcho", '"kept"', "--app", hostile_app, "--database-url", db_url)
    assert ok.returncode == 0, ok.stderr
    return db_url, stored_runs(db_url)


@pytest.mark.parametrize("argument", ["NaN", "Infinity", "[1, -Infinity]", "1e999", "{\"a\": -1e400}",
                                      "[" * 5000 + "]" * 5000, "{\"a\": " * 3000 + "1" + "}" * 3000])
def test_trigger_refuses_non_json_numbers_and_deep_nesting(tmp_path, one_run, hostile_app, argument):
    url, before = one_run
    out = hostile_cli(tmp_path, "trigger", "HostileEcho", argument, "--app", hostile_app, "--database-url", url)
    line = one_error(out, 2, "argument ")
    assert "not valid JSON" in line or "nested too deeply" in line
    assert stored_runs(url) == before


def test_trigger_still_takes_ordinary_json(tmp_path, one_run, hostile_app):
    url, before = one_run
    out = hostile_cli(tmp_path, "trigger", "HostileEcho", "1.5e3", '{"a": [1, null, "x"]}', "--app", hostile_app,
                      "--database-url", url)
    assert out.returncode == 0, out.stderr
    assert json.loads(stored_runs(url)[-1][3]) == [1500.0, {"a": [1, None, "x"]}]


@pytest.mark.parametrize("content, fragment", [
    (b"database_url: \xff\xfe\n", "is not UTF-8 text"),
    (b"job_worker: " + b"[" * 20000 + b"]" * 20000 + b"\n", "nested too deeply"),
    (b'database_url: "sqlite:///a\\0b"\n', "contains a NUL character"),
    (b'database_url: "postgresql://[::1/x"\n', "invalid database_url: Invalid IPv6 URL"),
    (b'database_url: "postgresql://postgres@127.0.0.1:0/postgres"\n', "port in database_url: must be 1 to 65535"),
    (b'database_url: "sqlite:///x.db?busy_timeout=nan"\n', "busy_timeout"),
    (b'database_url: "postgresql://h/x?connect_timeout=inf"\n', "connect_timeout"),
])
@pytest.mark.parametrize("command", ["status", "migrate", "healthcheck"])
def test_hostile_config_files_are_one_line_exit_2(tmp_path, content, fragment, command):
    cfg = tmp_path / "hostile.yml"
    cfg.write_bytes(content)
    one_error(hostile_cli(tmp_path, command, "-c", str(cfg)), 2, fragment)
    assert not (tmp_path / "a").exists() and not (tmp_path / "x.db").exists()


@pytest.mark.postgres
def test_port_0_is_refused_not_taken_for_5432(tmp_path, pg_server_url):
    """Before: port 0 became 5432 and migrate created tables. The target is a database of this test's own."""
    name = f"ductwork_port0_{uuid.uuid4().hex[:8]}"
    admin = _pg_connect(PG_ADMIN_URL)
    admin.cursor().execute(f"CREATE DATABASE {name}")
    try:
        url = f"{pg_server_url.rsplit('/', 1)[0]}/{name}"
        assert "127.0.0.1:5432/" in url
        one_error(hostile_cli(tmp_path, "migrate", "--database-url", url.replace(":5432/", ":0/")), 2,
                  "invalid port in database_url: must be 1 to 65535")
        conn = _pg_connect(url)
        cur = conn.cursor()
        cur.execute("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'ductwork%%'")
        assert cur.fetchone()[0] == 0
        conn.close()
    finally:
        admin.cursor().execute(f"DROP DATABASE IF EXISTS {name}")
        admin.close()


@pytest.mark.parametrize("key, value", [
    (key, value) for key in ("job_worker.polling_timeout", "job_worker.retry_delay", "job_worker.shutdown_timeout",
                             "pipeline_advancer.polling_timeout", "pipeline_advancer.unknown_pipeline_grace",
                             "supervisor.reaper_timeout", "supervisor.heartbeat_interval", "supervisor.hang_timeout",
                             "healthcheck.max_age")
    for value in (".nan", ".inf", "-.inf", "1.0e+300")] + [("job_worker.count", "99999999999999999999")])
def test_numeric_config_keys_must_be_finite_and_bounded(tmp_path, key, value):
    section, name = key.split(".")
    cfg = tmp_path / "numbers.yml"
    cfg.write_text(f"{section}:\n  {name}: {value}\n")
    line = one_error(hostile_cli(tmp_path, "status", "-c", str(cfg)), 2, f"config key '{key}'")
    assert "finite" in line or "must be <=" in line
    assert not (tmp_path / "ductwork.sqlite3").exists()


def test_per_pipeline_override_must_be_finite(tmp_path):
    cfg = tmp_path / "override.yml"
    cfg.write_text("job_worker:\n  retry_delay: {default: 1, HostileEcho: {hostile_echo: .nan}}\n")
    one_error(hostile_cli(tmp_path, "status", "-c", str(cfg)), 2, "job_worker.retry_delay.HostileEcho.hostile_echo")


def test_max_age_flag_must_be_finite(tmp_path):
    for value in ("nan", "inf"):
        one_error(hostile_cli(tmp_path, "healthcheck", "--database-url", f"sqlite:///{tmp_path}/h.db",
                              "--max-age", value), 2, "--max-age")


def test_not_a_sqlite_file_is_refused_and_left_alone(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_bytes(b"my notes, not a database\n" * 50)
    url = f"sqlite:///{target}"
    for command in ("migrate", "status"):
        one_error(hostile_cli(tmp_path, command, "--database-url", url), 2, "file is not a database")
    out = hostile_cli(tmp_path, "healthcheck", "--database-url", url)
    assert (out.returncode, out.stdout.strip()) == (1, f"dead: no process ({target} is not a SQLite database)")
    assert target.read_bytes() == b"my notes, not a database\n" * 50
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_app_that_is_a_directory_or_exits_at_import(tmp_path):
    (tmp_path / "pkgdir").mkdir()
    (tmp_path / "exits.py").write_text("import sys\nsys.exit(3)\n")
    url = f"sqlite:///{tmp_path}/d.db"
    one_error(hostile_cli(tmp_path, "validate", "--app", "pkgdir/", "--database-url", url), 2,
              "app pkgdir/ is not a Python file")
    one_error(hostile_cli(tmp_path, "validate", "--app", "exits.py", "--database-url", url), 2,
              "cannot import app exits.py: it called sys.exit(3)")


def test_status_escapes_control_characters_in_text_but_not_in_json(tmp_path, db_url):
    ductwork.configure(database_url=db_url)
    ductwork.migrate()
    nasty = "boom\x1b[2J\x1b[H\x07\x9b31m\u202egone"
    store = ductwork._app_engine().store
    with store.tx() as t:
        t.run("INSERT INTO ductwork_steps (run_id, branch_id, pipeline, node, name, status, input, error, "
              "available_at, created_at, finished_at) VALUES (7, 7, ?, 0, ?, 'failed', '[]', ?, 0, 0, 1)",
              ("Pipe\x1b]0;x\x07", "step\r", nasty))
        step_id = t.one("SELECT max(id) FROM ductwork_steps")[0]
        t.run("INSERT INTO ductwork_executions (step_id, run_id, attempt, outcome, error, finished_at) "
              "VALUES (?, 7, 1, 'failed', ?, {now})", (step_id, nasty))
    text = hostile_cli(tmp_path, "status", "--database-url", db_url)
    assert text.returncode == 0, text.stderr
    assert not any(ch in text.stdout for ch in "\x1b\x07\x9b\r\u202e")
    assert "boom\\x1b[2J\\x1b[H\\x07\\x9b31m\\u202egone" in text.stdout
    raw = hostile_cli(tmp_path, "status", "--json", "--database-url", db_url)
    assert raw.returncode == 0, raw.stderr
    errors = json.loads(raw.stdout)["recent_errors"]
    assert any(e["error"] == nasty and e["pipeline"] == "Pipe\x1b]0;x\x07" for e in errors), errors


def test_error_lines_escape_control_characters(tmp_path):
    (tmp_path / "noisy.py").write_text("raise RuntimeError('line one\\n\\x1b[2Jline two')\n")
    line = one_error(hostile_cli(tmp_path, "validate", "--app", "noisy.py", "--database-url",
                                 f"sqlite:///{tmp_path}/d.db"), 2, "RuntimeError: line one\\n\\x1b[2Jline two")
    assert "\x1b" not in line


# -- healthcheck: say what is wrong with the database ---------------------------------------------

@pytest.mark.postgres
def test_healthcheck_names_a_missing_database_or_role(tmp_path, pg_server_url):
    base = pg_server_url.rsplit("/", 1)[0]
    missing = f"{base}/ductwork_no_such_db_{uuid.uuid4().hex[:6]}"
    out = hostile_cli(tmp_path, "healthcheck", "--database-url", missing)
    name = missing.rsplit("/", 1)[1]
    assert (out.returncode, out.stdout.strip()) == (1, f"dead: no process (database {name!r} does not exist)")
    url = pg_server_url.replace("postgres@", "ductwork_no_such_role@")
    out = hostile_cli(tmp_path, "healthcheck", "--database-url", url)
    assert (out.returncode, out.stdout.strip()) == (
        1, "dead: no process (cannot log in as 'ductwork_no_such_role': role does not exist)")


def test_healthcheck_names_a_missing_schema(tmp_path, fresh_db_url):
    if fresh_db_url.startswith("sqlite"):
        ductwork.Store(fresh_db_url).now()   # the file exists, with no tables
    out = hostile_cli(tmp_path, "healthcheck", "--database-url", fresh_db_url)
    assert (out.returncode, out.stdout.strip()) == (1, "dead: no process (schema not created: run migrate)")
    assert out.stderr == ""


# -- a password on the command line ---------------------------------------------------------------

def test_a_password_on_argv_is_warned_about(tmp_path):
    url = "postgresql://someone:Argv5ecretPw@127.0.0.1:1/nowhere?connect_timeout=1"
    out = hostile_cli(tmp_path, "status", "--database-url", url)
    assert "ductwork: warning: the password in --database-url is visible to other users in ps; use " \
           "DUCTWORK_DATABASE_URL or DATABASE_URL instead" in out.stderr
    assert "Argv5ecretPw" not in out.stdout + out.stderr
    out = hostile_cli(tmp_path, "dashboard", "--auth", "admin:Argv5ecretPw", "--refresh", "inf",
                      "--database-url", f"sqlite:///{tmp_path}/d.db")
    assert "ductwork: warning: the password in --auth is visible" in out.stderr
    one_error(out, 2, "--refresh")
    quiet = hostile_cli(tmp_path, "status", "--database-url", "postgresql://someone@127.0.0.1:1/x?connect_timeout=1",
                        env={"DUCTWORK_DATABASE_URL": url})
    assert "warning" not in quiet.stderr


# -- SCRAM without a password (a private cluster that demands one) --------------------------------

@pytest.fixture(scope="module")
def hostile_scram_cluster():
    from pgcluster import PrivateCluster
    pg = PrivateCluster()
    try:
        pg.create(password="Scr4mH0stilePw")
        pg.start()
        yield pg
    finally:
        pg.remove()


@pytest.mark.postgres
def test_scram_login_without_a_password_is_one_clear_line(tmp_path, hostile_scram_cluster):
    url = hostile_scram_cluster.url.replace(":Scr4mH0stilePw@", "@")
    assert "Scr4mH0stilePw" not in url
    one_error(hostile_cli(tmp_path, "status", "--database-url", url), 1,
              "the server asks for a password and none was given (put it in the URL or PGPASSWORD)")
    out = hostile_cli(tmp_path, "healthcheck", "--database-url", url)
    assert out.returncode == 1 and out.stdout.startswith("dead: no process (cannot log in as"), out.stdout


# -- a full disk (a small tmpfs: root only) -------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and mount -t tmpfs")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_trigger_on_a_full_disk_is_one_line_exit_1(tmp_path, small_disk, hostile_app):
    url = f"sqlite:///{small_disk}/d.sqlite3"
    assert hostile_cli(tmp_path, "trigger", "HostileEcho", "1", "--app", hostile_app, "--database-url", url
                       ).returncode == 0
    before = stored_runs(url)
    fd = os.open(small_disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    big = json.dumps("x" * 100_000)
    out = hostile_cli(tmp_path, "trigger", "HostileEcho", big, big, big, "--app", hostile_app, "--database-url", url)
    one_error(out, 1, "ductwork: error: database error: ")
    os.unlink(small_disk / "filler")
    assert stored_runs(url) == before
    store = ductwork.Store(url)
    with store.tx(write=False) as t:
        assert t.one("PRAGMA integrity_check")[0] == "ok"
    store.close()

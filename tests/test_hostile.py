"""Hostile input and hostile steps (what an adversarial review broke).

Input: at the command line, one `ductwork: error:` line, a documented exit code, nothing stored lost.
Steps: steps that raise BaseException, raise exceptions that cannot be rendered, or fork; a worker
thread that dies anyway; a worker child that cannot start its threads. Real threads, real processes."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import uuid

import pytest
from conftest import FAST, PG_ADMIN_URL, ROOT, _pg_connect
from procs import BASE_CONFIG, Proc, alive, pause, wait_until

import ductwork

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "apps"))
import hostile_app as hostile_steps_app  # noqa: E402  (tests/apps/hostile_app.py: the hostile steps)

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


def fill(disk) -> None:
    """Write a file on ``disk`` until it is full (ENOSPC); remove ``disk / "filler"`` to free it."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)


def test_trigger_on_a_full_disk_is_one_line_exit_1(tmp_path, small_disk, hostile_app):
    url = f"sqlite:///{small_disk}/d.sqlite3"
    assert hostile_cli(tmp_path, "trigger", "HostileEcho", "1", "--app", hostile_app, "--database-url", url
                       ).returncode == 0
    before = stored_runs(url)
    fill(small_disk)
    big = json.dumps("x" * 100_000)
    out = hostile_cli(tmp_path, "trigger", "HostileEcho", big, big, big, "--app", hostile_app, "--database-url", url)
    one_error(out, 1, "ductwork: error: database error: ")
    os.unlink(small_disk / "filler")
    assert stored_runs(url) == before
    store = ductwork.Store(url)
    with store.tx(write=False) as t:
        assert t.one("PRAGMA integrity_check")[0] == "ok"
    store.close()


# -- hostile steps -------------------------------------------------------------------------------------
# Every wait is bounded by a deadline derived from the configured intervals (FAST: polling 0.05 s,
# heartbeat 0.2 s): many polling and heartbeat rounds, with room for a busy 2-core machine.
DEADLINE = 200 * FAST["job_worker"]["polling_timeout"] + 50 * FAST["supervisor"]["heartbeat_interval"]


class HsBoom(BaseException):
    """A BaseException of the step's own, neither Exception, SystemExit nor KeyboardInterrupt."""


class HsBadStr(Exception):
    def __str__(self):
        raise RuntimeError("__str__ exploded")


class HsBadBoth(Exception):
    def __str__(self):
        raise RuntimeError("__str__ exploded")

    def __repr__(self):
        raise RuntimeError("__repr__ exploded")


RAISES = {"exit": lambda: SystemExit(3), "interrupt": KeyboardInterrupt, "base": lambda: HsBoom("boom"),
          "badstr": HsBadStr, "badboth": HsBadBoth, "huge": lambda: RuntimeError("x" * 20_000_000)}


def hostile_step(kind):
    if kind == "ok":
        return "fine"
    raise RAISES[kind]()


class HsRaise(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(hostile_step)


def plain(x):
    return x


class HsPlain(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(plain).chain(to=plain)


class Lines(logging.Handler):
    """The ductwork logger's records, as formatted messages (the logger does not propagate)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.tracebacks: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())
        if record.exc_info:
            self.tracebacks.append(logging.Formatter().formatException(record.exc_info))


@pytest.fixture
def log_lines():
    handler = Lines()
    ductwork.log.addHandler(handler)
    yield handler
    ductwork.log.removeHandler(handler)


@pytest.mark.parametrize("kind, expected", [
    ("exit", "SystemExit: 3"), ("interrupt", "KeyboardInterrupt: "), ("base", "HsBoom: boom")])
def test_a_step_raising_a_base_exception_is_a_failed_attempt_and_the_thread_survives(
        engine, start_runtime, kind, expected):
    start_runtime(["HsRaise"], role="combined", job_worker={"count": 1, "max_retry": 1})
    bad = HsRaise.trigger(kind)
    assert bad.wait(DEADLINE) == "halted"
    step = bad.steps[0]
    assert (step.status, step.attempts, step.halt_reason) == ("failed", 2, ductwork.JOB_RETRIES_EXHAUSTED)
    assert step.error.startswith(expected), step.error
    assert "Traceback" in step.error and "in hostile_step" in step.error
    # the pipeline's only worker thread is still there: later runs complete
    good = [HsRaise.trigger("ok") for _ in range(3)]
    assert [run.wait(DEADLINE) for run in good] == ["completed"] * 3


@pytest.mark.parametrize("kind, expected", [
    ("badstr", "HsBadStr: HsBadStr()"), ("badboth", "HsBadBoth: <test_hostile.HsBadBoth object at 0x")])
def test_an_exception_that_cannot_be_rendered_is_recorded_with_its_class_and_traceback(
        engine, start_runtime, kind, expected):
    start_runtime(["HsRaise"], role="combined", job_worker={"count": 1, "max_retry": 0})
    bad = HsRaise.trigger(kind)
    assert bad.wait(DEADLINE) == "halted"
    step = bad.steps[0]
    assert (step.status, step.attempts, step.crashes, step.halt_reason) == (
        "failed", 1, 0, ductwork.JOB_RETRIES_EXHAUSTED)
    assert step.error.startswith(expected), step.error
    assert "Traceback" in step.error and "in hostile_step" in step.error
    assert HsRaise.trigger("ok").wait(DEADLINE) == "completed"


def test_a_huge_error_message_is_stored_and_shown_bounded(engine, start_runtime):
    start_runtime(["HsRaise"], role="combined", job_worker={"count": 1, "max_retry": 0})
    bad = HsRaise.trigger("huge")
    assert bad.wait(DEADLINE) == "halted"
    error = bad.steps[0].error
    assert error.startswith("RuntimeError: xxx") and "... (19996000 more characters)" in error, error[:200]
    assert len(error) <= ductwork.MAX_ERROR_MESSAGE + ductwork.MAX_TRACEBACK + 100
    # rows stored before the bound (megabytes of error text) are shown bounded too
    with engine.store.tx() as t:
        huge = {"error": "y" * 5_000_000 + "\nline two"}
        t.run("UPDATE ductwork_executions SET error = :error", huge)
        t.run("UPDATE ductwork_steps SET error = :error", huge)
    assert len(json.dumps(ductwork.status_report(engine))) < 50_000
    assert len(ductwork.render_overview(ductwork.dashboard_overview(engine))) < 100_000
    for path in (f"/runs/{bad.id}", "/errors"):
        _, data, render = ductwork.dashboard_route(engine, path, {})
        assert len(render(data)) < 100_000 and len(json.dumps(data)) < 100_000, path


def test_an_honest_re_run_may_set_the_same_context_value_again(engine):
    """Write-once context compared the stored value after its JSON round trip with the new one before it."""
    run = HsPlain.trigger(1)
    values = {"pair": (1, 2), "keys": {1: "a", "b": (3,)}, "plain": [1.5, None, "x"]}
    for key, value in values.items():
        engine.context_set(run.id, key, value, False)
        engine.context_set(run.id, key, value, False)        # the re-run sets it again: no error
    assert engine.context_all(run.id) == {"pair": [1, 2], "keys": {"1": "a", "b": [3]}, "plain": [1.5, None, "x"]}
    with pytest.raises(ductwork.ContextError):
        engine.context_set(run.id, "pair", (1, 3), False)     # a different value still needs overwrite=True


def _info(engine, process_id):
    with engine.store.tx(write=False) as t:
        row = t.one("SELECT info FROM ductwork_processes WHERE id = :id", {"id": process_id})
    return ductwork._loads(row[0]) if row else {}


@pytest.mark.parametrize("point, name", [("after_claim", "worker"), ("after_branch_claim", "advancer")])
def test_a_worker_or_advancer_thread_that_dies_is_logged_replaced_counted_and_its_claims_handed_back(
        engine, start_runtime, log_lines, tmp_path, point, name):
    handle = start_runtime(["HsPlain"], role="combined", job_worker={"count": 1})
    runtime = handle.runtime
    # a BaseException from the machinery around a step (a bug), raised once in one thread
    runtime.fault = ductwork.Fault(f"{point}:die", once=str(tmp_path / "once"))
    runtime.engine.inline = name == "worker"   # the advancer case: branches advance in the advancer thread
    run = HsPlain.trigger(7)
    assert run.wait(DEADLINE) == "completed"
    assert run.output == 7
    died = [line for line in log_lines.lines if " died " in line]
    assert len(died) == 1 and died[0].startswith(f"thread ductwork.{name}.HsPlain.0 died (_ThreadDeath)"), died
    assert any("_ThreadDeath: fault injected" in tb for tb in log_lines.tracebacks)
    first = run.steps[0]
    if name == "worker":   # it was running when its thread died: handed back as a crash, run again
        assert (first.attempts, first.crashes) == (1, 1)
    else:
        assert (first.attempts, first.crashes) == (1, 0)
    assert runtime.thread_restarts == 1
    assert sum(t.is_alive() and t.name == f"ductwork.{name}.HsPlain.0" for t in runtime.threads) == 1
    wait_until(lambda: _info(engine, runtime.process_id).get("thread_restarts") == 1, DEADLINE,
               what="thread_restarts in the process row")
    assert HsPlain.trigger(8).wait(DEADLINE) == "completed"


def test_job_worker_count_is_bounded_in_the_config():
    for key in ("job_worker", "pipeline_advancer"):
        with pytest.raises(ductwork.ConfigError, match=rf"'{key}.count' must be at most 256"):
            ductwork.load_config(data={key: {"count": 257}})
        with pytest.raises(ductwork.ConfigError, match=rf"'{key}.count.HsPlain' must be at most 256"):
            ductwork.load_config(data={key: {"count": {"HsPlain": 100000}}})
        assert ductwork.load_config(data={key: {"count": 256}}).get(f"{key}.count") == 256


# -- hostile steps: real processes ----------------------------------------------------------------------
APP = {"app": hostile_steps_app.__file__}


def _marks(tmp_path) -> list[list[str]]:
    path = tmp_path / "marks.log"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def test_a_forked_copy_of_a_worker_never_commits_claims_or_ignores_sigterm(procs, tmp_path, app_db):
    sup = Proc(tmp_path, app_db, config=APP)
    procs.append(sup)
    worker = sup.child_pid("worker:HsFork")
    runs = [hostile_steps_app.HsFork.trigger(mode) for mode in ("return", "linger", "return")]
    budget = 60 * BASE_CONFIG["supervisor"]["heartbeat_interval"]
    assert [run.wait(budget) for run in runs] == ["completed"] * 3
    assert [run.output for run in runs] == ["from the parent"] * 3
    marks = _marks(tmp_path)
    copies = {int(m[1]) for m in marks if m[0] == "copy"}
    reaped = sorted(" ".join(m[2:]) for m in marks if m[0] == "reaped")
    # the copy that returned from the step ended quietly; the lingering one died of the SIGTERM it was sent
    assert reaped == ["linger signal 15", "return exit 0", "return exit 0"], marks
    assert len(copies) == 3 and not any(alive(pid) for pid in copies)
    # every later step ran in the worker itself, never in a copy
    assert {int(m[1]) for m in marks if m[0] == "where"} == {worker}
    assert all(step.attempts == 1 and step.crashes == 0 for run in runs for step in run.steps)
    sup.signal(signal.SIGTERM)
    assert sup.wait() == 0
    assert not any(alive(pid) for pid in copies)


def test_a_worker_that_cannot_start_its_threads_fails_its_boot_and_claims_nothing(procs, tmp_path, app_db):
    run = hostile_steps_app.HsQuick.trigger("x")
    config = {**APP, "pipelines": ["HsQuick"], "job_worker": {"count": 8}}
    sup = Proc(tmp_path, app_db, config=config, env={"DW_THREAD_LIMIT": "1"})
    procs.append(sup)
    # max_boot_failures 3 with backoffs of 0.5 s and 1 s: well within the deadline
    assert sup.wait(30) == 1
    log = sup.log()
    assert "worker:HsQuick failed to boot 3 times in a row; giving up" in log, log[-3000:]
    assert "could not start thread" in log
    assert " crashed " not in log
    step = run.refresh().steps[0]
    assert (step.status, step.attempts, step.crashes) == ("queued", 0, 0)


# -- hostile network -----------------------------------------------------------------------------------
# A database that refuses every connection from the start (nothing listens on port 1): the boot waits
# for it with a backoff capped at OUTAGE_CAP seconds; a stop signal must end that wait at once.
OUTAGE_CAP = 2.0
REFUSING_DB = "postgresql://postgres@127.0.0.1:1/ductwork_nowhere"


@pytest.mark.parametrize("args, stop", [
    (("run", "--role", "worker"), signal.SIGTERM),
    (("run", "--role", "advancer"), signal.SIGINT),
    (("run",), signal.SIGTERM),                       # the supervisor itself, before it forks anything
])
def test_a_stop_signal_ends_the_boot_time_wait_for_the_database(procs, tmp_path, args, stop):
    p = Proc(tmp_path, REFUSING_DB, args=args)
    procs.append(p)
    p.wait_log("database unavailable, retrying with backoff")
    p.signal(stop)
    # one backoff pause at most (the signal cuts it short), then a clean exit
    assert p.wait(timeout=OUTAGE_CAP * 1.2 + 5) == 0, p.log()[-2000:]
    assert re.search(r"stopped while it waited for the database to boot", p.log()), p.log()[-2000:]
    assert "Traceback" not in p.log()


# -- hostile host ------------------------------------------------------------------------------------
# The local heartbeat files (the health check's proof of life while the database is unreachable) live
# only in a private folder of this user: another local user could otherwise make a ductwork running as
# root create files through a symlink, or fake proof of life with a file of their own.
def _proof() -> ductwork.LocalProof:
    return ductwork.LocalProof(f"hostile-host-{uuid.uuid4().hex[:8]}", "sqlite:/nowhere/hostile.db")


def test_local_proof_is_not_written_through_a_symlinked_folder(tmp_path):
    proof, elsewhere = _proof(), tmp_path / "elsewhere"
    elsewhere.mkdir()
    folder = proof.folder
    os.symlink(elsewhere, folder)
    try:
        proof.touch("supervisor")
        assert list(elsewhere.iterdir()) == []
        health = proof.health("supervisor", None, 60)
        assert health.code == ductwork.EXIT_UNREACHABLE, health.line
    finally:
        os.unlink(folder)


def test_local_proof_in_a_folder_of_another_user_proves_nothing(tmp_path):
    proof = _proof()
    folder = proof.folder
    os.mkdir(folder, 0o700)
    try:
        open(os.path.join(folder, f"supervisor.{os.getpid()}"), "w").close()   # fresh, and this pid is alive
        assert proof.health("supervisor", None, 60).code == ductwork.EXIT_OK
        if os.getuid() == 0:
            os.chown(folder, 65534, 65534)      # now another user's (nobody's) folder
        else:
            os.chmod(folder, 0o777)             # now a folder anyone may write
        health = proof.health("supervisor", None, 60)
        assert health.code == ductwork.EXIT_UNREACHABLE, health.line
    finally:
        for name in os.listdir(folder):
            os.unlink(os.path.join(folder, name))
        os.rmdir(folder)


def test_local_proof_folder_of_an_older_version_is_made_private(tmp_path):
    proof = _proof()
    folder = proof.folder
    os.mkdir(folder)
    os.chmod(folder, 0o755)                     # as makedirs left it before
    try:
        proof.touch("worker")
        assert os.stat(folder).st_mode & 0o777 == 0o700
        assert os.listdir(folder) == [f"worker.{os.getpid()}"]
        assert proof.health("worker", None, 60).code == ductwork.EXIT_OK
        proof.remove("worker")
        assert os.listdir(folder) == []
    finally:
        for name in os.listdir(folder):
            os.unlink(os.path.join(folder, name))
        os.rmdir(folder)


# -- SQLite files that change under a running deployment --------------------------------------------
# As root, file modes bind nobody: the deployment runs without the capabilities that override them
# (setpriv drops them), as an ordinary user's would. Each process checks the file under its
# connections at most every Store.FILE_CHECK_EVERY seconds, at its next transaction: a heartbeat
# at the latest.
NO_OVERRIDE = ("setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner") if os.geteuid() == 0 else ()
FILE_CONFIG = {**APP, "pipelines": ["HsQuick"], "job_worker": {"count": 1}}
NOTICED = ductwork.Store.FILE_CHECK_EVERY + BASE_CONFIG["supervisor"]["heartbeat_interval"] + 10


def _sqlite_deployment(procs, tmp_path):
    """A supervisor on a new SQLite file, and one completed run: (url, path, the supervisor)."""
    path = tmp_path / "file.sqlite3"
    url = f"sqlite:///{path}"
    sup = Proc(tmp_path, url, config=FILE_CONFIG, prefix=NO_OVERRIDE)
    procs.append(sup)
    sup.child_pid("worker:HsQuick")
    sup.wait_log(r"worker started")
    _trigger_and_wait(tmp_path, url)
    return url, path, sup


def _trigger_and_wait(tmp_path, url, deadline: float = 60) -> int:
    """Trigger HsQuick from a new process (the CLI) and wait until the run completed: its id."""
    out = hostile_cli(tmp_path, "trigger", "HsQuick", '"x"', "--app", APP["app"], "--database-url", url)
    assert out.returncode == 0, out.stderr
    run_id = int(out.stdout.strip())

    def completed():
        with contextlib.suppress(Exception):
            return dict((r[0], r[2]) for r in stored_runs(url)).get(run_id) == "completed"
    wait_until(completed, timeout=deadline, what=f"run {run_id} completed")
    return run_id


def _outage_lines(sup: Proc) -> list[str]:
    return [line for line in sup.log().splitlines() if "database unavailable" in line]


def test_a_database_made_read_only_while_running_recovers_once_writable(procs, tmp_path):
    url, path, sup = _sqlite_deployment(procs, tmp_path)
    os.chmod(path, 0o444)
    # a worker that starts now opens the file read-only (SQLite falls back to that silently)
    old = sup.child_pid("worker:HsQuick")
    os.kill(old, signal.SIGKILL)
    new = sup.child_pid("worker:HsQuick", nth=2)
    sup.wait_log(rf"\[{new} worker [^]]*\] database unavailable, retrying with backoff: .*readonly database")
    os.chmod(path, 0o644)
    _trigger_and_wait(tmp_path, url)            # the same process writes again: it did not keep that connection
    sup.wait_log(rf"\[{new} worker [^]]*\] worker started")
    assert len([line for line in _outage_lines(sup) if f"[{new} " in line]) == 1, sup.log()[-3000:]
    sup.signal(signal.SIGTERM)
    assert sup.wait() == 0


def test_a_deleted_database_file_is_noticed_and_a_new_one_taken_up(procs, tmp_path):
    url, path, sup = _sqlite_deployment(procs, tmp_path)
    pids = [sup.pid, sup.child_pid("worker:HsQuick"), sup.child_pid("advancer")]
    for name in (path.name, path.name + "-wal", path.name + "-shm"):   # rm file.sqlite3*
        os.unlink(tmp_path / name)
    # every process says so (one line each), instead of going on with the unlinked file, and lets go of it
    gone = rf"database unavailable, retrying with backoff: the SQLite database file {re.escape(str(path))} was " \
           r"deleted or moved while in use"
    for pid in pids:
        sup.wait_log(rf"\[{pid} [^]]*\] {gone}", timeout=NOTICED)
    for pid in pids:
        wait_until(lambda pid=pid: not _open_deleted_files(pid), timeout=NOTICED, what=f"pid {pid} closed the file")
    # nobody made an empty file meanwhile: the processes wait, they do not create one
    assert not path.exists()
    assert hostile_cli(tmp_path, "migrate", "--database-url", url).returncode == 0
    _trigger_and_wait(tmp_path, url)            # the new file's run is done by the same processes
    for pid in pids:
        # the outage's end (the new file may have got the old one's inode number, so "a new SQLite
        # database file is at" is not always said: it is the same to the process)
        sup.wait_log(rf"\[{pid} [^]]*\] database reachable again", timeout=NOTICED)
        assert len([line for line in _outage_lines(sup) if f"[{pid} " in line]) == 1, sup.log()[-3000:]
    sup.signal(signal.SIGTERM)
    assert sup.wait() == 0


def _open_deleted_files(pid: int) -> list[str]:
    """The deleted files ``pid`` still has open."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.endswith(" (deleted)") and ".sqlite3" in target:
                out.append(target)
    return out


def test_a_database_moved_away_is_never_replaced_by_an_empty_one_and_comes_back(procs, tmp_path):
    """Moved away (a botched backup, say): the processes wait for it; a child restarted meanwhile does not
    create an empty file in its place (a later move back would then lose the real one)."""
    url, path, sup = _sqlite_deployment(procs, tmp_path)
    first = stored_runs(url)
    away = tmp_path / "away.sqlite3"
    os.rename(path, away)
    old = sup.child_pid("worker:HsQuick")
    sup.wait_log(rf"\[{old} [^]]*\] database unavailable", timeout=NOTICED)
    os.kill(old, signal.SIGKILL)
    new = sup.child_pid("worker:HsQuick", nth=2)
    sup.wait_log(rf"\[{new} [^]]*\] database unavailable, retrying with backoff: the SQLite database file")
    assert not path.exists()
    os.rename(away, path)
    _trigger_and_wait(tmp_path, url)
    assert stored_runs(url)[:len(first)] == first
    sup.signal(signal.SIGTERM)
    assert sup.wait() == 0


def test_a_database_file_replaced_while_open_stops_the_deployment(procs, tmp_path):
    """A restore over a running deployment: SQLite would pair the new file with the old one's -wal, so the
    processes stop (one clear line each, exit 1) instead of writing on."""
    url, path, sup = _sqlite_deployment(procs, tmp_path)
    copy = tmp_path / "copy.sqlite3"
    import sqlite3
    source = sqlite3.connect(str(path))
    source.execute(f"VACUUM INTO '{copy}'")   # a consistent copy, as a backup tool makes
    source.close()
    pids = [sup.pid, sup.child_pid("worker:HsQuick"), sup.child_pid("advancer")]
    os.rename(copy, path)
    assert sup.wait(NOTICED + 2 * BASE_CONFIG["supervisor"]["shutdown_timeout"]) == 1, sup.log()[-3000:]
    replaced = rf"the SQLite database file {re.escape(str(path))} was replaced while in use"
    for pid in pids:
        assert len(re.findall(rf"\[{pid} [^]]*\] {replaced}", sup.log())) == 1, sup.log()[-3000:]
    after = sup.log().split(f"the SQLite database file {path} was replaced while in use", 1)[1]
    assert "started worker:HsQuick (pid" not in after   # stopped, not restarted


def test_an_absolute_path_that_starts_with_two_slashes_works_after_boot(procs, tmp_path):
    """sqlite://///abs: the path //tmp/... (a child opens it without creating it, as an SQLite URI)."""
    url = f"sqlite:////{tmp_path}/slashes.sqlite3"
    assert ductwork.parse_database_url(url).path.startswith("//")
    sup = Proc(tmp_path, url, config=FILE_CONFIG)
    procs.append(sup)
    sup.wait_log(r"worker started")
    _trigger_and_wait(tmp_path, url)
    assert "database unavailable" not in sup.log()
    sup.signal(signal.SIGTERM)
    assert sup.wait() == 0


def test_a_full_disk_is_one_outage_in_the_log_not_one_a_second(procs, tmp_path, small_disk):
    url = f"sqlite:///{small_disk}/d.sqlite3"
    sup = Proc(tmp_path, url, config=FILE_CONFIG)
    procs.append(sup)
    worker = sup.child_pid("worker:HsQuick")
    sup.wait_log(r"worker started")
    fill(small_disk)
    # heartbeats fail (writes), empty claims go through (reads): one line, for longer than a reaper_timeout
    # (a peer may reap a row meanwhile: its process says so once, however often registering fails)
    sup.wait_log(rf"\[{worker} [^]]*\] database unavailable")
    pause(BASE_CONFIG["supervisor"]["reaper_timeout"] + 5 * BASE_CONFIG["supervisor"]["heartbeat_interval"])
    worker_lines = [line for line in sup.log().splitlines() if f"[{worker} " in line and "database " in line]
    assert len(worker_lines) == 1, worker_lines
    for pid in (sup.pid, worker):
        assert len(re.findall(rf"\[{pid} [^]]*\] .*reaped while", sup.log())) <= 1, sup.log()[-3000:]
    os.unlink(small_disk / "filler")
    sup.wait_log(rf"\[{worker} [^]]*\] database reachable again")
    _trigger_and_wait(tmp_path, url)
    sup.signal(signal.SIGTERM)
    assert sup.wait() == 0

"""The command line (SPEC §3), run for real: `python ductwork.py ...` in a subprocess.

Every call runs in the test's tmp_path with the DUCTWORK_* / DATABASE_URL variables blanked,
so nothing from the machine's environment or the repository leaks in.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import ROOT, run_cli

import ductwork

CLEAN_ENV = {"DUCTWORK_ENV": "", "DUCTWORK_ROLE": "", "DUCTWORK_DATABASE_URL": "", "DATABASE_URL": "",
             "DUCTWORK_APP": "", "DUCTWORK_MACHINE_ID": ""}

APP = """
import ductwork

class CliFetch(ductwork.Step):
    def execute(self, payload):
        return [1, 2, 3]

def cli_double(x):
    return x * 2

def cli_total(values):
    return sum(values)

class CliEcho(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(CliFetch)

class CliFanout(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(CliFetch).expand(to=cli_double).collapse(into=cli_total)
"""

OTHER_APP = """
import ductwork

def cli_other_step(x):
    return x

class CliOther(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(cli_other_step)
"""


def cli(tmp_path, *args, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return run_cli(*args, env={**CLEAN_ENV, **(env or {})}, cwd=tmp_path, timeout=timeout)


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return str(path)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"


def assert_usage_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, exactly one stderr line `ductwork: error: ...`, no traceback; returns the line."""
    assert result.returncode == 2, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got: {result.stderr!r}"
    assert lines[0].startswith("ductwork: error: "), lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture
def app(tmp_path) -> str:
    return write(tmp_path, "cli_app.py", APP)


@pytest.fixture
def app_engine(db_url):
    """Point this test process at the same database the subprocesses use."""
    ductwork.configure(database_url=db_url)
    yield db_url
    engine = ductwork._APP.engine
    if engine is not None:
        engine.store.close()


# -- --version, --help, usage errors -----------------------------------------------------------


def test_version(tmp_path):
    result = cli(tmp_path, "--version")
    assert_ok(result)
    assert result.stdout.strip() == f"ductwork {ductwork.__version__}"


def test_version_via_python_dash_m():
    result = subprocess.run([sys.executable, "-m", "ductwork", "--version"], capture_output=True, text=True,
                            cwd=str(ROOT), env={**os.environ, **CLEAN_ENV}, timeout=30)
    assert_ok(result)
    assert result.stdout.strip() == f"ductwork {ductwork.__version__}"


def test_help(tmp_path):
    result = cli(tmp_path, "--help")
    assert_ok(result)
    for word in ("usage", "run", "migrate", "trigger", "status", "validate", "healthcheck", "--config", "--app"):
        assert word in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize("args", [["trigger", "--help"], ["validate", "-h"], ["status", "--help"]])
def test_command_help(tmp_path, args):
    result = cli(tmp_path, *args)
    assert_ok(result)
    assert "usage" in result.stdout


@pytest.mark.parametrize("args", [
    ["--nope"],
    ["validate", "--nope"],
    ["--role", "boss", "validate"],
    ["validate", "--role", "boss"],
    ["frobnicate"],
    ["trigger"],
])
def test_bad_flag(tmp_path, args):
    assert_usage_error(cli(tmp_path, *args))
    assert not (tmp_path / "ductwork.sqlite3").exists(), "a usage error must not touch the database"


def test_a_named_command_parses_as_with_the_whole_parser():
    """main() builds only the named commands' parsers (the health check runs every few seconds): what they
    parse, and every usage error's text, are the whole parser's."""
    for argv in (["healthcheck", "-c", "x.yml", "--max-age", "5"], ["-c", "status", "healthcheck", "-v"],
                 ["trigger", "status", '{"a": 1}', "--key", "healthcheck"], ["health", "--role", "worker"]):
        named = [a for a in argv if a in ductwork.COMMANDS_BY_NAME]
        assert ductwork.build_parser(named).parse_args(argv) == ductwork.build_parser().parse_args(argv), argv
    built = {a.dest: a for a in ductwork.build_parser(["healthcheck"])._actions}
    assert sorted(built["command"].choices) == ["health", "healthcheck"]
    for argv in (["frobnicate", "status"], ["status", "--nope"], ["healthcheck", "--max-age"]):
        with pytest.raises(ductwork.ConfigError) as partial:
            ductwork._parse_arguments(argv, [a for a in argv if a in ductwork.COMMANDS_BY_NAME])
        with pytest.raises(ductwork.ConfigError) as whole:
            ductwork.build_parser().parse_args(argv)
        assert str(partial.value) == str(whole.value), argv
        if argv[0] == "frobnicate":   # the commands to choose from: all of them
            assert all(repr(c.name) in str(partial.value) for c in ductwork.COMMANDS), partial.value


def test_bad_yaml(tmp_path):
    cfg = write(tmp_path, "bad.yml", "default:\n  role: [worker\n")
    assert_usage_error(cli(tmp_path, "-c", cfg, "validate"), "YAML", "bad.yml")


def test_unknown_key(tmp_path):
    cfg = write(tmp_path, "unknown.yml", "default:\n  job_worker:\n    max_retries: 3\n")
    assert_usage_error(cli(tmp_path, "validate", "-c", cfg), "job_worker.max_retries", "job_worker.max_retry")


def test_invalid_value(tmp_path):
    cfg = write(tmp_path, "invalid.yml", "default:\n  job_worker:\n    count: 0\n")
    assert_usage_error(cli(tmp_path, "validate", "-c", cfg), "job_worker.count", ">= 1")


def test_invalid_value_from_environment(tmp_path):
    assert_usage_error(cli(tmp_path, "validate", env={"DUCTWORK_ROLE": "captain"}), "role", "captain")


def test_missing_config_file(tmp_path):
    assert_usage_error(cli(tmp_path, "-c", str(tmp_path / "missing.yml"), "validate"), "missing.yml")


def test_debug_shows_a_traceback(tmp_path):
    cfg = write(tmp_path, "invalid.yml", "default:\n  job_worker:\n    count: 0\n")
    result = cli(tmp_path, "--debug", "-c", cfg, "validate")
    assert result.returncode == 2
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("ductwork: error: ")
    after = cli(tmp_path, "validate", "-c", cfg, "--debug")
    assert after.returncode == 2
    assert "Traceback" in after.stderr


def test_password_not_printed_when_the_database_is_unreachable(tmp_path):
    url = "postgresql://someone:Un1queS3cretPw@127.0.0.1:1/nowhere?connect_timeout=2"
    result = cli(tmp_path, "migrate", "--database-url", url)
    assert result.returncode != 0
    assert "Un1queS3cretPw" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("ductwork: error: ")


# -- -c before and after the command ------------------------------------------------------------


@pytest.mark.parametrize("position", ["before", "after", "equals"])
def test_config_flag_before_and_after_the_command(tmp_path, app, position):
    cfg = write(tmp_path, "conf.yml", f"""
        default:
          app: {app}
          pipelines: [CliFanout]
    """)
    args = {"before": ["-c", cfg, "validate"], "after": ["validate", "-c", cfg],
            "equals": ["validate", f"--config={cfg}"]}[position]
    result = cli(tmp_path, *args)
    assert_ok(result)
    assert "CliEcho" in result.stdout and "CliFanout" in result.stdout


@pytest.mark.parametrize("position", ["before", "after"])
def test_config_flag_selects_the_database(tmp_path, position):
    db = tmp_path / "from_config.sqlite3"
    cfg = write(tmp_path, "conf.yml", f"default:\n  database_url: sqlite:///{db}\n")
    args = ["-c", cfg, "migrate"] if position == "before" else ["migrate", "-c", cfg]
    result = cli(tmp_path, *args)
    assert_ok(result)
    assert str(db) in result.stdout
    assert db.exists()
    assert not (tmp_path / "ductwork.sqlite3").exists()


def test_default_config_path_is_read(tmp_path, app):
    (tmp_path / "config").mkdir()
    write(tmp_path, "config/ductwork.yml", f"default:\n  app: {app}\n")
    result = cli(tmp_path, "validate")
    assert_ok(result)
    assert "CliEcho" in result.stdout


def test_flag_beats_environment_beats_file(tmp_path):
    cfg = write(tmp_path, "conf.yml", f"default:\n  database_url: sqlite:///{tmp_path}/file.db\n")
    env = {"DUCTWORK_DATABASE_URL": f"sqlite:///{tmp_path}/env.db", "DATABASE_URL": f"sqlite:///{tmp_path}/plain.db"}
    result = cli(tmp_path, "migrate", "-c", cfg, env=env)
    assert_ok(result)
    assert "env.db" in result.stdout
    result = cli(tmp_path, "migrate", "-c", cfg, "--database-url", f"sqlite:///{tmp_path}/flag.db", env=env)
    assert_ok(result)
    assert "flag.db" in result.stdout
    result = cli(tmp_path, "migrate", "-c", cfg, env={"DATABASE_URL": f"sqlite:///{tmp_path}/plain.db"})
    assert_ok(result)
    assert "plain.db" in result.stdout
    result = cli(tmp_path, "migrate", "-c", cfg)
    assert_ok(result)
    assert "file.db" in result.stdout


# -- migrate ------------------------------------------------------------------------------------


def test_migrate_prints_and_is_idempotent(tmp_path, db_url):
    first = cli(tmp_path, "migrate", "--database-url", db_url)
    assert_ok(first)
    assert first.stdout.startswith("migrated ")
    if db_url.startswith("sqlite"):
        assert "applied 1" in first.stdout        # a fresh file
    second = cli(tmp_path, "migrate", "--database-url", db_url)
    assert_ok(second)
    assert "up to date" in second.stdout
    assert ductwork.schema_is_current(ductwork.Store(db_url))


def test_concurrent_migrate(tmp_path, fresh_db_url):
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda _: cli(tmp_path, "migrate", "--database-url", fresh_db_url), range(3)))
    for result in results:
        assert_ok(result)
        assert "Traceback" not in result.stderr
    applied = [r for r in results if "applied 1" in r.stdout]
    assert len(applied) == 1, [r.stdout for r in results]
    assert sum("up to date" in r.stdout for r in results) == 2
    assert ductwork.schema_is_current(ductwork.Store(fresh_db_url))


# -- validate and --app ----------------------------------------------------------------------------


def test_validate_app_file(tmp_path, app):
    result = cli(tmp_path, "validate", "--app", app)
    assert_ok(result)
    assert result.stdout.startswith("ok: 2 pipeline(s)")
    assert "CliEcho" in result.stdout and "CliFanout" in result.stdout


def test_validate_app_relative_file_and_module_name(tmp_path, app):
    for target in ("cli_app.py", "cli_app"):
        result = cli(tmp_path, "validate", "--app", target)
        assert_ok(result)
        assert "CliEcho" in result.stdout


def test_validate_app_from_environment(tmp_path, app):
    other = write(tmp_path, "cli_other.py", OTHER_APP)
    result = cli(tmp_path, "validate", env={"DUCTWORK_APP": f"{app},{other}"})
    assert_ok(result)
    assert "ok: 3 pipeline(s)" in result.stdout


def test_app_flag_is_repeatable(tmp_path, app):
    other = write(tmp_path, "cli_other.py", OTHER_APP)
    result = cli(tmp_path, "validate", "--app", app, "--app", other)
    assert_ok(result)
    assert "CliEcho" in result.stdout and "CliOther" in result.stdout


def test_app_flag_repeated_before_and_after_the_command(tmp_path, app):
    # options may come before or after the command (SPEC §3): both --app values count
    other = write(tmp_path, "cli_other.py", OTHER_APP)
    result = cli(tmp_path, "--app", app, "validate", "--app", other)
    assert_ok(result)
    assert "CliEcho" in result.stdout, result.stdout
    assert "CliOther" in result.stdout, result.stdout


def test_app_with_a_definition_error(tmp_path):
    broken = write(tmp_path, "cli_broken.py", """
        import ductwork

        class CliStep(ductwork.Step):
            def execute(self, x):
                return x

        class CliBroken(ductwork.Pipeline):
            @staticmethod
            def define(p):
                p.start(CliStep).collapse(into=CliStep)
    """)
    assert_usage_error(cli(tmp_path, "validate", "--app", broken), "CliBroken", "collapse")


def test_app_with_an_import_error(tmp_path):
    bad = write(tmp_path, "cli_bad_import.py", "import ductwork\nimport no_such_module_for_ductwork_tests\n")
    assert_usage_error(cli(tmp_path, "validate", "--app", bad), "cli_bad_import", "no_such_module_for_ductwork_tests")


def test_app_that_raises_at_import(tmp_path):
    bad = write(tmp_path, "cli_raises.py", "raise RuntimeError('boom at import')\n")
    assert_usage_error(cli(tmp_path, "validate", "--app", bad), "boom at import")


def test_app_with_a_syntax_error(tmp_path):
    bad = write(tmp_path, "cli_syntax.py", "def broken(:\n")
    assert_usage_error(cli(tmp_path, "validate", "--app", bad), "cli_syntax")


@pytest.mark.parametrize("target", ["no_such_app_module_xyz", "missing_app_file.py"])
def test_app_that_does_not_exist(tmp_path, target):
    assert_usage_error(cli(tmp_path, "validate", "--app", target), target)


def test_validate_without_app(tmp_path):
    result = cli(tmp_path, "validate")
    assert_ok(result)
    assert "no pipelines" in result.stdout


@pytest.mark.parametrize("command", ["validate", "run"])
def test_configured_pipeline_not_found(tmp_path, app, command):
    cfg = write(tmp_path, "conf.yml", f"""
        default:
          app: {app}
          pipelines: [CliEcho, CliMissing]
          forking: none
          database_url: sqlite:///{tmp_path}/pipes.db
    """)
    assert_usage_error(cli(tmp_path, command, "-c", cfg, timeout=20), "CliMissing")


def test_configured_pipeline_list_that_exists(tmp_path, app):
    cfg = write(tmp_path, "conf.yml", f"default:\n  app: {app}\n  pipelines: [CliEcho]\n")
    assert_ok(cli(tmp_path, "validate", "-c", cfg))


# -- trigger -----------------------------------------------------------------------------------------


def test_trigger_prints_a_run_id_and_writes_the_run(tmp_path, app, app_engine):
    db_url = app_engine
    result = cli(tmp_path, "trigger", "CliEcho", '{"a": [1, 2], "b": null}', "--app", app, "--database-url", db_url)
    assert_ok(result)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].isdigit(), result.stdout
    run = ductwork.Run.get(int(lines[0]))
    assert run.pipeline == "CliEcho"
    assert run.status == "in_progress"
    assert run.input == [{"a": [1, 2], "b": None}]
    steps = run.steps
    assert [(s.name, s.status) for s in steps] == [("CliFetch", "queued")]
    assert steps[0].input == [{"a": [1, 2], "b": None}]


def test_trigger_with_several_and_no_arguments(tmp_path, app, app_engine):
    db_url = app_engine
    several = cli(tmp_path, "--app", app, "--database-url", db_url, "trigger", "CliFanout", "1", '"two"', "[3]")
    assert_ok(several)
    none = cli(tmp_path, "trigger", "CliEcho", "--app", app, "--database-url", db_url)
    assert_ok(none)
    first, second = int(several.stdout.strip()), int(none.stdout.strip())
    assert first != second
    assert ductwork.Run.get(first).input == [1, "two", [3]]
    assert ductwork.Run.get(first).pipeline == "CliFanout"
    assert ductwork.Run.get(second).input == []


def test_trigger_unknown_pipeline(tmp_path, app, db_url):
    result = cli(tmp_path, "trigger", "CliNoSuchPipeline", "{}", "--app", app, "--database-url", db_url)
    assert_usage_error(result, "CliNoSuchPipeline")
    status = cli(tmp_path, "status", "--json", "--database-url", db_url)
    assert_ok(status)
    assert json.loads(status.stdout)["runs"] == {}


@pytest.mark.parametrize("arg", ["{not json", "undefined", "'single'"])
def test_trigger_invalid_json(tmp_path, app, db_url, arg):
    result = cli(tmp_path, "trigger", "CliEcho", arg, "--app", app, "--database-url", db_url)
    assert_usage_error(result, "JSON")


# -- status --------------------------------------------------------------------------------------------


def test_status_json(tmp_path, app, db_url):
    for _ in range(2):
        assert_ok(cli(tmp_path, "trigger", "CliEcho", "1", "--app", app, "--database-url", db_url))
    assert_ok(cli(tmp_path, "trigger", "CliFanout", "1", "--app", app, "--database-url", db_url))
    result = cli(tmp_path, "status", "--json", "--database-url", db_url)
    assert_ok(result)
    report = json.loads(result.stdout)
    assert {"processes", "runs"} <= set(report)
    assert report["processes"] == []
    assert report["runs"] == {"CliEcho": {"in_progress": 2}, "CliFanout": {"in_progress": 1}}


def test_status_text(tmp_path, app, db_url):
    assert_ok(cli(tmp_path, "trigger", "CliEcho", "1", "--app", app, "--database-url", db_url))
    result = cli(tmp_path, "status", "--database-url", db_url)
    assert_ok(result)
    assert "processes" in result.stdout
    assert "CliEcho" in result.stdout
    assert "in_progress 1" in result.stdout


def test_status_on_a_fresh_database(tmp_path, db_url):
    result = cli(tmp_path, "status", "--json", "--database-url", db_url)
    assert_ok(result)
    report = json.loads(result.stdout)
    assert report["processes"] == [] and report["runs"] == {}

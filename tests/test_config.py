"""Configuration (SPEC §3 precedence, §4 file format, keys, defaults and validation).

Every test passes ``environ=`` explicitly so the machine's environment cannot leak in.
"""
from __future__ import annotations

import textwrap

import pytest

import ductwork

EMPTY_ENV: dict = {}


def write(tmp_path, text: str, name: str = "ductwork.yml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return str(path)


def config_error(**kwargs) -> str:
    kwargs.setdefault("environ", EMPTY_ENV)
    with pytest.raises(ductwork.ConfigError) as info:
        ductwork.load_config(**kwargs)
    return str(info.value)


# -- defaults (SPEC §4) ---------------------------------------------------------------------

DEFAULTS = {
    "app": None,
    "database_url": "sqlite:///ductwork.sqlite3",
    "pool_size": 2,
    "listen_url": None,
    "role": "all",
    "pipelines": "*",
    "forking": "default",
    "logger.level": "info",
    "logger.format": "text",
    "job_worker.count": 5,
    "job_worker.max_retry": 3,
    "job_worker.retry_delay": 10,
    "job_worker.max_crash": 10,
    "job_worker.polling_timeout": 1,
    "job_worker.shutdown_timeout": 20,
    "pipeline_advancer.count": 1,
    "pipeline_advancer.max_retry": 10,
    "pipeline_advancer.polling_timeout": 1,
    "pipeline_advancer.shutdown_timeout": 20,
    "pipeline_advancer.steps.max_depth": -1,
    "supervisor.polling_timeout": 1,
    "supervisor.shutdown_timeout": 30,
    "supervisor.heartbeat_interval": 5,
    "supervisor.hang_timeout": 60,
    "supervisor.reaper_timeout": 60,
    "supervisor.max_boot_failures": 10,
    "healthcheck.max_age": 300,
}


@pytest.mark.parametrize("key", list(DEFAULTS))
def test_every_default(key):
    config = ductwork.load_config(data={}, environ=EMPTY_ENV)
    assert config.get(key) == DEFAULTS[key]
    assert config.get(key, "AnyPipeline", "AnyStep") == DEFAULTS[key]


def test_defaults_are_consistent_and_role_all():
    config = ductwork.load_config(data={}, environ=EMPTY_ENV)
    assert config.role == "all"
    assert config.environment == "development"
    assert config.warnings() == []


def test_empty_file_means_defaults(tmp_path):
    config = ductwork.load_config(path=write(tmp_path, ""), environ=EMPTY_ENV)
    assert config.get("job_worker.count") == 5
    assert config.get("database_url") == "sqlite:///ductwork.sqlite3"


def test_default_config_path_is_used_when_present(tmp_path, monkeypatch):
    (tmp_path / "config").mkdir()
    write(tmp_path, "default:\n  job_worker:\n    count: 7\n", "config/ductwork.yml")
    monkeypatch.chdir(tmp_path)
    config = ductwork.load_config(environ=EMPTY_ENV)
    assert config.get("job_worker.count") == 7
    assert config.path == "config/ductwork.yml"


# -- sections, anchors, flat files -----------------------------------------------------------

SECTIONS = """
    default: &default
      role: worker
      job_worker: &jw
        count: 2
        max_retry: 4
    production:
      <<: *default
      database_url: postgresql://app@db.internal/prod
      job_worker:
        <<: *jw
        count: 8
    staging:
      <<: *default
      role: advancer
"""


def test_environment_section_selected_by_ductwork_env(tmp_path):
    path = write(tmp_path, SECTIONS)
    config = ductwork.load_config(path=path, environ={"DUCTWORK_ENV": "production"})
    assert config.environment == "production"
    assert config.get("database_url") == "postgresql://app@db.internal/prod"
    assert config.get("job_worker.count") == 8          # overridden in the section
    assert config.get("job_worker.max_retry") == 4      # from the anchored mapping via <<:
    assert config.get("role") == "worker"               # from the default section via <<:
    assert config.get("job_worker.retry_delay") == 10   # built-in default


def test_merge_key_then_local_override(tmp_path):
    config = ductwork.load_config(path=write(tmp_path, SECTIONS), environ={"DUCTWORK_ENV": "staging"})
    assert config.get("role") == "advancer"
    assert config.get("job_worker.count") == 2


def test_missing_section_falls_back_to_default(tmp_path):
    path = write(tmp_path, SECTIONS)
    config = ductwork.load_config(path=path, environ={})   # DUCTWORK_ENV unset -> development
    assert config.environment == "development"
    assert config.get("role") == "worker"
    assert config.get("job_worker.count") == 2
    config = ductwork.load_config(path=path, environ={"DUCTWORK_ENV": "qa"})
    assert config.get("job_worker.count") == 2


def test_development_section_is_the_default_environment(tmp_path):
    path = write(tmp_path, """
        default:
          job_worker: {count: 2}
        development:
          job_worker: {count: 3}
    """)
    assert ductwork.load_config(path=path, environ={}).get("job_worker.count") == 3
    assert ductwork.load_config(path=path, environ={"DUCTWORK_ENV": "production"}).get("job_worker.count") == 2


def test_no_matching_section_and_no_default_is_an_error(tmp_path):
    path = write(tmp_path, """
        production:
          role: worker
    """)
    message = config_error(path=path, environ={"DUCTWORK_ENV": "staging"})
    assert "staging" in message
    assert "default" in message


def test_flat_file_is_used_as_is(tmp_path):
    path = write(tmp_path, """
        role: advancer
        job_worker:
          count: 9
        supervisor:
          shutdown_timeout: 40
    """)
    for env in ({}, {"DUCTWORK_ENV": "production"}):
        config = ductwork.load_config(path=path, environ=env)
        assert config.get("role") == "advancer"
        assert config.get("job_worker.count") == 9
        assert config.get("supervisor.shutdown_timeout") == 40
        assert config.get("supervisor.hang_timeout") == 60


def test_empty_section_means_defaults(tmp_path):
    path = write(tmp_path, """
        default:
          role: worker
        development:
    """)
    config = ductwork.load_config(path=path, environ={})
    assert config.get("role") == "all"


def test_top_level_that_is_not_a_mapping(tmp_path):
    message = config_error(path=write(tmp_path, "- role\n- worker\n"))
    assert "mapping" in message


def test_section_that_is_not_a_mapping(tmp_path):
    message = config_error(path=write(tmp_path, "default: 5\n"))
    assert "mapping" in message


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "default:\n  role: [worker\n")
    message = config_error(path=path)
    assert path in message
    assert "YAML" in message
    assert "line" in message


def test_yaml_tags_are_not_executed(tmp_path):
    # safe_load only: a python tag is an error, not code
    path = write(tmp_path, "default:\n  app: !!python/object/apply:os.getcwd []\n")
    message = config_error(path=path)
    assert "YAML" in message


def test_missing_config_file(tmp_path):
    message = config_error(path=str(tmp_path / "nope.yml"))
    assert "nope.yml" in message


# -- per-pipeline / per-step overrides ---------------------------------------------------------


def test_override_map_lookup(tmp_path):
    path = write(tmp_path, """
        job_worker:
          max_retry:
            default: 5
            Billing: 1
            Import:
              default: 2
              Fetch: 7
              Parse: 0
          count: {default: 3, Billing: 10}
        pipeline_advancer:
          steps:
            max_depth: {Import: {Fetch: 100}}
    """)
    config = ductwork.load_config(path=path, environ={})
    get = config.get
    assert get("job_worker.max_retry") == 5
    assert get("job_worker.max_retry", "Other") == 5
    assert get("job_worker.max_retry", "Other", "Step") == 5
    assert get("job_worker.max_retry", "Billing") == 1
    assert get("job_worker.max_retry", "Billing", "AnyStep") == 1
    assert get("job_worker.max_retry", "Import") == 2
    assert get("job_worker.max_retry", "Import", "Other") == 2
    assert get("job_worker.max_retry", "Import", "Fetch") == 7
    assert get("job_worker.max_retry", "Import", "Parse") == 0      # zero is a value, not "unset"
    assert get("job_worker.count", "Billing") == 10
    assert get("job_worker.count", "Import") == 3
    # a map without a default falls back to the built-in default
    assert get("pipeline_advancer.steps.max_depth", "Import", "Fetch") == 100
    assert get("pipeline_advancer.steps.max_depth", "Import", "Parse") == -1
    assert get("pipeline_advancer.steps.max_depth", "Other") == -1


@pytest.mark.parametrize("key", ["job_worker.max_retry", "job_worker.retry_delay", "job_worker.max_crash",
                                 "pipeline_advancer.max_retry", "pipeline_advancer.steps.max_depth"])
def test_zero_is_a_real_value(key):
    *parents, leaf = key.split(".")

    def nest(value):
        out = {leaf: value}
        for part in reversed(parents):
            out = {part: out}
        return out

    scalar = ductwork.load_config(data=nest(0), environ={})
    assert scalar.get(key) == 0
    assert scalar.get(key, "Pipe", "Step") == 0
    default_zero = ductwork.load_config(data=nest({"default": 0, "Pipe": 4}), environ={})
    assert default_zero.get(key, "Other") == 0
    assert default_zero.get(key, "Pipe") == 4
    per_pipe = ductwork.load_config(data=nest({"default": 4, "Pipe": 0}), environ={})
    assert per_pipe.get(key, "Pipe") == 0
    assert per_pipe.get(key, "Pipe", "Step") == 0
    per_step = ductwork.load_config(data=nest({"default": 4, "Pipe": {"default": 5, "Step": 0}}), environ={})
    assert per_step.get(key, "Pipe", "Step") == 0
    assert per_step.get(key, "Pipe", "Other") == 5
    pipe_default_zero = ductwork.load_config(data=nest({"default": 4, "Pipe": {"default": 0, "Step": 6}}), environ={})
    assert pipe_default_zero.get(key, "Pipe", "Other") == 0
    assert pipe_default_zero.get(key, "Pipe", "Step") == 6


def test_per_pipeline_polling_timeout_and_count():
    config = ductwork.load_config(data={"job_worker": {"polling_timeout": {"default": 2, "Fast": 0.05}},
                                        "pipeline_advancer": {"count": {"Busy": 4}}}, environ={})
    assert config.get("job_worker.polling_timeout", "Fast") == 0.05
    assert config.get("job_worker.polling_timeout", "Slow") == 2
    assert config.get("pipeline_advancer.count", "Busy") == 4
    assert config.get("pipeline_advancer.count", "Idle") == 1


def test_count_takes_no_per_step_map():
    message = config_error(data={"job_worker": {"count": {"Pipe": {"Step": 2}}}})
    assert "job_worker.count.Pipe" in message


def test_invalid_value_inside_an_override_map_names_the_full_path():
    message = config_error(data={"job_worker": {"max_retry": {"Pipe": {"Step": -1}}}})
    assert "job_worker.max_retry.Pipe.Step" in message
    assert ">= 0" in message


# -- precedence: flag > environment > file > default ------------------------------------------


def test_precedence_role(tmp_path):
    path = write(tmp_path, "default:\n  role: advancer\n")
    assert ductwork.load_config(data={}, environ={}).get("role") == "all"
    assert ductwork.load_config(path=path, environ={}).get("role") == "advancer"
    assert ductwork.load_config(path=path, environ={"DUCTWORK_ROLE": "worker"}).get("role") == "worker"
    flag = ductwork.load_config(path=path, environ={"DUCTWORK_ROLE": "worker"}, overrides={"role": "all"})
    assert flag.get("role") == "all"
    # a flag that was not given (None) does not override
    unset = ductwork.load_config(path=path, environ={"DUCTWORK_ROLE": "worker"}, overrides={"role": None})
    assert unset.get("role") == "worker"


def test_role_supervisor_is_an_alias_of_all():
    config = ductwork.load_config(data={"role": "supervisor"}, environ={})
    assert config.role == "all"


def test_precedence_database_url(tmp_path):
    path = write(tmp_path, "default:\n  database_url: sqlite:///from_file.db\n")
    env_both = {"DUCTWORK_DATABASE_URL": "sqlite:///from_ductwork_env.db", "DATABASE_URL": "sqlite:///from_env.db"}
    assert ductwork.load_config(path=path, environ={}).get("database_url") == "sqlite:///from_file.db"
    assert ductwork.load_config(path=path, environ={"DATABASE_URL": "sqlite:///from_env.db"}).get(
        "database_url") == "sqlite:///from_env.db"
    assert ductwork.load_config(path=path, environ=env_both).get("database_url") == "sqlite:///from_ductwork_env.db"
    flag = ductwork.load_config(path=path, environ=env_both, overrides={"database_url": "sqlite:///from_flag.db"})
    assert flag.get("database_url") == "sqlite:///from_flag.db"


def test_precedence_app(tmp_path):
    path = write(tmp_path, "default:\n  app: from_file\n")
    assert ductwork.load_config(path=path, environ={}).get("app") == ["from_file"]
    env = {"DUCTWORK_APP": "one.pipelines, two.pipelines three.py"}
    assert ductwork.load_config(path=path, environ=env).get("app") == ["one.pipelines", "two.pipelines", "three.py"]
    flag = ductwork.load_config(path=path, environ=env, overrides={"app": ["flag_app.py"]})
    assert flag.get("app") == ["flag_app.py"]


def test_app_list_in_file(tmp_path):
    path = write(tmp_path, "app: [a.pipelines, b/pipes.py]\n")
    assert ductwork.load_config(path=path, environ={}).get("app") == ["a.pipelines", "b/pipes.py"]


def test_environment_values_are_validated():
    message = config_error(data={}, environ={"DUCTWORK_ROLE": "boss"})
    assert "role" in message
    assert "boss" in message
    message = config_error(data={}, environ={"DUCTWORK_DATABASE_URL": "mysql://u@h/db"})
    assert "mysql" in message


def test_flag_values_are_validated():
    message = config_error(data={}, overrides={"role": "captain"})
    assert "role" in message
    assert "advancer" in message


# -- validation errors --------------------------------------------------------------------------


@pytest.mark.parametrize("data, path, nearest", [
    ({"job_worker": {"max_retries": 3}}, "job_worker.max_retries", "job_worker.max_retry"),
    ({"supervisor": {"shutdown_timout": 3}}, "supervisor.shutdown_timout", "supervisor.shutdown_timeout"),
    ({"pipeline_advancer": {"steps": {"max_dept": 3}}}, "pipeline_advancer.steps.max_dept",
     "pipeline_advancer.steps.max_depth"),
    ({"role": "worker", "jobworker": {"count": 1}}, "jobworker", "job_worker"),
    ({"logger": {"levle": "info"}}, "logger.levle", "logger.level"),
])
def test_unknown_key_names_the_path_and_the_nearest_key(data, path, nearest):
    message = config_error(data=data)
    assert f"'{path}'" in message
    assert f"'{nearest}'" in message


def test_unknown_key_in_a_section_file(tmp_path):
    path = write(tmp_path, """
        default:
          job_worker:
            polling_timeuot: 1
    """)
    message = config_error(path=path)
    assert "job_worker.polling_timeuot" in message
    assert "job_worker.polling_timeout" in message


def test_misspelled_only_key_of_a_flat_file_suggests_the_valid_key(tmp_path):
    # A flat file whose only key is a typo of a config key must not be reported as a missing
    # environment section: the user wants to hear about the key (SPEC §4).
    path = write(tmp_path, "job_workr:\n  count: 3\n")
    message = config_error(path=path)
    assert "job_workr" in message
    assert "job_worker" in message


@pytest.mark.parametrize("data, key, fragment", [
    ({"job_worker": {"count": "5"}}, "job_worker.count", ">= 1"),
    ({"job_worker": {"count": 2.5}}, "job_worker.count", "whole number"),
    ({"job_worker": {"count": True}}, "job_worker.count", "whole number"),
    ({"job_worker": {"retry_delay": "soon"}}, "job_worker.retry_delay", "number"),
    ({"job_worker": {"max_retry": [1]}}, "job_worker.max_retry", "whole number"),
    ({"logger": {"format": "xml"}}, "logger.format", "json"),
    ({"logger": {"level": "loud"}}, "logger.level", "debug"),
    ({"logger": "info"}, "logger", "mapping"),
    ({"forking": "sometimes"}, "forking", "none"),
    ({"pipelines": "all"}, "pipelines", "*"),
    ({"pipelines": []}, "pipelines", "list"),
    ({"pipelines": [1, 2]}, "pipelines", "list"),
    ({"app": 5}, "app", "string"),
    ({"database_url": 5}, "database_url", "string"),
])
def test_wrong_types(data, key, fragment):
    message = config_error(data=data)
    assert f"'{key}'" in message
    assert fragment in message


@pytest.mark.parametrize("key", [
    "job_worker.shutdown_timeout", "job_worker.retry_delay", "pipeline_advancer.shutdown_timeout",
    "supervisor.shutdown_timeout", "supervisor.polling_timeout", "supervisor.hang_timeout",
    "supervisor.reaper_timeout", "supervisor.heartbeat_interval", "job_worker.polling_timeout",
    "pipeline_advancer.polling_timeout", "healthcheck.max_age",
])
def test_negative_timeouts(key):
    section, leaf = key.split(".")
    message = config_error(data={section: {leaf: -1}})
    assert f"'{key}'" in message
    assert ">=" in message


@pytest.mark.parametrize("key", [
    "job_worker.count", "pipeline_advancer.count", "job_worker.polling_timeout",
    "supervisor.heartbeat_interval", "supervisor.polling_timeout", "healthcheck.max_age",
])
def test_zero_counts_and_zero_intervals(key):
    section, leaf = key.split(".")
    message = config_error(data={section: {leaf: 0}})
    assert f"'{key}'" in message
    assert ">=" in message


def test_max_depth_allows_minus_one_only():
    assert ductwork.load_config(data={"pipeline_advancer": {"steps": {"max_depth": -1}}}, environ={}).get(
        "pipeline_advancer.steps.max_depth") == -1
    message = config_error(data={"pipeline_advancer": {"steps": {"max_depth": -2}}})
    assert "pipeline_advancer.steps.max_depth" in message
    assert "-1" in message


def test_zero_max_boot_failures_means_never_and_is_valid():
    config = ductwork.load_config(data={"supervisor": {"max_boot_failures": 0}}, environ={})
    assert config.get("supervisor.max_boot_failures") == 0


@pytest.mark.parametrize("role", ["boss", "", "ALL", 3])
def test_bad_role(role):
    message = config_error(data={"role": role})
    assert "'role'" in message
    assert "all, supervisor, advancer, worker" in message


# -- warnings -------------------------------------------------------------------------------------


def test_worker_shutdown_timeout_not_below_supervisor_warns():
    for worker in (30, 45):
        config = ductwork.load_config(data={"job_worker": {"shutdown_timeout": worker},
                                            "supervisor": {"shutdown_timeout": 30}}, environ={})
        warnings = config.warnings()
        assert any("job_worker.shutdown_timeout" in w and "supervisor.shutdown_timeout" in w
                   for w in warnings), warnings


def test_worker_shutdown_timeout_below_supervisor_does_not_warn():
    config = ductwork.load_config(data={"job_worker": {"shutdown_timeout": 29},
                                        "supervisor": {"shutdown_timeout": 30}}, environ={})
    assert not any("job_worker.shutdown_timeout" in w for w in config.warnings())


def test_warnings_are_not_errors():
    config = ductwork.load_config(data={"job_worker": {"shutdown_timeout": 100}}, environ={})
    assert config.get("job_worker.shutdown_timeout") == 100


# -- passwords --------------------------------------------------------------------------------------


def test_mask_after_load_config():
    config = ductwork.load_config(data={}, environ={"DATABASE_URL": "postgresql://app:An0therSecretPw@h/db"})
    assert ductwork.mask(config.get("database_url")) == "postgresql://app:***@h/db"
    assert "An0therSecretPw" not in ductwork.mask(repr(config))


# -- connections (SPEC §13) --------------------------------------------------------------------

PG = "postgresql://app@db.internal/app"


@pytest.mark.parametrize("data, fragment", [
    ({"pool_size": 0}, "config key 'pool_size' must be >= 1, got 0"),
    ({"pool_size": -3}, "config key 'pool_size' must be >= 1, got -3"),
    ({"pool_size": 1.5}, "config key 'pool_size' must be a whole number"),
    ({"pool_size": 100_000}, "config key 'pool_size' must be <= 256"),
    ({"database_url": PG + "?pgbouncer=maybe"}, "invalid pgbouncer='maybe' in database_url: use pgbouncer=true"),
    ({"listen_url": PG}, "listen_url is for a Postgres database_url"),                      # with SQLite
    ({"database_url": PG + "?pgbouncer=true", "listen_url": "sqlite:///x.db"}, "listen_url must be a Postgres URL"),
    ({"database_url": PG + "?pgbouncer=true", "listen_url": "postgresql://app@db:99999/app"},
     "invalid listen_url: invalid port in listen_url"),
    ({"database_url": PG + "?pgbouncer=true", "listen_url": PG + "?pgbouncer=true"},
     "listen_url must not go through a transaction pooler"),
    ({"database_url": PG + "?pgbouncer=true", "listen_url": ""}, "config key 'listen_url' must be a non-empty string"),
])
def test_connection_settings_are_validated(data, fragment):
    assert fragment in config_error(data=data)


def test_connection_settings_from_file_url_and_environment():
    config = ductwork.load_config(data={"database_url": PG + "?pgbouncer=true", "pool_size": 4},
                                  environ={"DUCTWORK_LISTEN_URL": PG + "?sslmode=require"})
    assert config.data["pool_size"] == 4 and config.data["listen_url"] == PG + "?sslmode=require"
    assert ductwork.parse_database_url(config.data["database_url"]).pgbouncer is True
    assert ductwork.parse_database_url(PG + "?pgbouncer=false").pgbouncer is False
    assert ductwork.parse_database_url(PG).pgbouncer is False

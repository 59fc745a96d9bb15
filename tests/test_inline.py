"""run_inline (SPEC §19): a pipeline run to its end on the calling thread through the real engine and SQL, on
SQLite and PostgreSQL; retry delays, sleeps and delayed starts skipped; a wait_for left waiting until its signal;
steps swapped by name; only the run's own rows touched; a private temporary SQLite database when nothing is
configured; and a pytest suite built on it (examples/testing) that needs no fixture."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ductwork

ROOT = Path(__file__).resolve().parents[1]


def numbers(n):
    return list(range(n))


def square(x):
    return x * x


def total(values):
    return sum(values)


class InlineFan(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(numbers).expand(to=square).collapse(into=total)


def words(text):
    return text.split()


def shout(text):
    return text.upper()


def tidy(text):
    return " ".join(text.split())


def pair(parts):
    return parts


class InlineDivide(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(tidy).divide(to=[words, shout]).combine(into=pair)


class FlakyOnce(ductwork.Step):
    def execute(self, x):
        if self.attempt == 1:
            raise RuntimeError("the first attempt fails")
        return {"x": x, "attempt": self.attempt}


class InlineRetry(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(FlakyOnce)


def plus_one(x):
    return x + 1


class InlineSleep(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(plus_one).sleep(3600).chain(to=plus_one)


def echo(x):
    return x


class InlineSignal(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(plus_one).wait_for("approved").chain(to=echo)


def refuse(x):
    raise ductwork.NonRetryable(f"no {x}")


class InlineHalt(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(plus_one).chain(to=refuse)


def count(url: str, sql: str, params: tuple = ()) -> int:
    store = ductwork.Store(url)
    try:
        with store.tx(write=False) as t:
            return t.one(sql, dict(params))[0]
    finally:
        store.close()


# -- the real engine, both databases ---------------------------------------------------------
def test_runs_every_kind_of_transition_to_its_end_through_the_engine(engine, db_url):
    run = ductwork.run_inline(InlineFan, 4)
    assert (run.status, run.output) == ("completed", 0 + 1 + 4 + 9)
    # the engine's own rows: 1 + 4 + 1 steps succeeded, an execution each, no process row left behind
    assert count(db_url, "SELECT count(*) FROM ductwork_steps WHERE run_id = :r AND status = 'succeeded'",
                 (("r", run.id),)) == 6
    assert count(db_url, "SELECT count(*) FROM ductwork_executions WHERE run_id = :r AND outcome = 'succeeded'",
                 (("r", run.id),)) == 6
    assert count(db_url, "SELECT count(*) FROM ductwork_processes") == 0
    run = ductwork.run_inline(InlineDivide, "a b")
    assert (run.status, run.output) == ("completed", [["a", "b"], "A B"])


def test_retry_delays_sleeps_and_delayed_starts_are_skipped(engine, db_url):
    ductwork.configure(database_url=db_url, config={"job_worker": {"retry_delay": 3600, "max_retry": 3}})
    run = ductwork.run_inline(InlineRetry, 7)
    assert (run.status, run.output) == ("completed", {"x": 7, "attempt": 2})
    assert count(db_url, "SELECT count(*) FROM ductwork_executions WHERE run_id = :r", (("r", run.id),)) == 2
    run = ductwork.run_inline(InlineSleep, 1)
    assert (run.status, run.output) == ("completed", 3)
    delayed = InlineSleep.trigger(10, delay=3600)
    assert ductwork.run_inline(delayed).output == 12


def test_wait_for_returns_in_progress_and_a_signal_lets_run_inline_go_on(engine):
    run = ductwork.run_inline(InlineSignal, 1)
    assert run.status == "in_progress"
    assert run.signal("approved", {"by": "ada"}) is True
    run = ductwork.run_inline(run)
    assert (run.status, run.output) == ("completed", {"by": "ada"})


def test_a_halting_step_returns_the_run_halted(engine):
    run = ductwork.run_inline(InlineHalt, 1)
    assert run.status == "halted"
    assert run.halt_reasons == ["job_non_retryable"]


def test_steps_are_swapped_by_name_with_a_function_or_a_step_class(engine):
    class Cube(ductwork.Step):
        def execute(self, x):
            return x ** 3
    assert ductwork.run_inline(InlineFan, 3, steps={"square": Cube}).output == 0 + 1 + 8
    seen = []
    run = ductwork.run_inline(InlineFan, 3, steps={"square": lambda x: seen.append(x) or 0, "total": len})
    assert (run.output, sorted(seen)) == (3, [0, 1, 2])
    assert ductwork.run_inline(InlineFan, 3).output == 5   # the pipeline itself is unchanged


def test_only_the_runs_own_rows_are_claimed(engine, db_url):
    other = InlineFan.trigger(2)   # for the pipeline's real workers: run_inline must leave it alone
    run = ductwork.run_inline(InlineFan, 2)
    assert run.status == "completed"
    assert other.refresh().status == "in_progress"
    assert count(db_url, "SELECT count(*) FROM ductwork_steps WHERE run_id = :r AND status = 'queued'",
                 (("r", other.id),)) == 1


@pytest.mark.parametrize("role", ["combined", "advancer"])
def test_refused_while_live_workers_serve_the_pipeline_they_would_run_its_real_steps(engine, start_runtime, role):
    handle = start_runtime(["InlineFan"], role=role)
    assert handle.runtime.booted.wait(20)
    with pytest.raises(ductwork.DuctworkError, match="live process.*serve pipeline InlineFan"):
        ductwork.run_inline(InlineFan, 2, steps={"square": lambda x: 0})
    assert ductwork.run_inline(InlineDivide, "a").status == "completed"   # (a pipeline nobody serves: fine)


def test_ctrl_c_in_a_step_is_the_callers_not_a_failed_attempt(engine):
    def interrupted(x):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        ductwork.run_inline(InlineFan, 2, steps={"square": interrupted})


async def async_square(x):
    await asyncio.sleep(0)
    return x * x + 0 * ductwork.current_step().step_id


def test_async_steps_inline_inside_a_running_event_loop_see_their_step(engine):
    async def main():   # (an async test: this thread runs a loop already)
        return ductwork.run_inline(InlineFan, 3, steps={"square": async_square})
    run = asyncio.run(main())
    assert (run.status, run.output) == ("completed", 5)


@pytest.mark.parametrize("call, message", [
    (lambda: ductwork.run_inline(dict), "needs a Pipeline subclass"),
    (lambda: ductwork.run_inline(ductwork.Pipeline), "needs a Pipeline subclass"),
    (lambda: ductwork.run_inline(InlineFan, 2, steps={"cube": square}), "has no step 'cube'"),
    (lambda: ductwork.run_inline(InlineFan, 2, steps={"square": 3}), "is not callable"),
    (lambda: ductwork.run_inline(InlineFan, 2, steps=[square]), "must be a dict"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(engine, db_url, call, message):
    with pytest.raises(ductwork.DuctworkError, match=message):
        call()
    assert count(db_url, "SELECT count(*) FROM ductwork_runs") == 0


# -- nothing configured: a private temporary SQLite database ---------------------------------
def clean_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DUCTWORK_DATABASE_URL", "DATABASE_URL", "DUCTWORK_ENV", "DUCTWORK_LISTEN_URL")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "examples")])
    return env


def test_with_nothing_configured_a_private_temporary_database_is_used_and_removed(tmp_path):
    code = ("import os, ductwork, demo_app\n"
            "run = ductwork.run_inline(demo_app.Squares, 3)\n"
            "path = ductwork._app_engine().store.url.split('///', 1)[1]\n"
            "print(run.status, run.output, os.path.exists(path), path)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=clean_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("completed [0, 1, 4] True "), done.stdout
    path = done.stdout.strip().rsplit(" ", 1)[1]
    assert "ductwork-inline-" in path and not os.path.exists(path)   # removed at exit
    assert list(tmp_path.iterdir()) == []   # nothing written where the test ran (no ductwork.sqlite3)


def test_the_example_test_suite_passes_under_plain_pytest(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(ROOT / "examples" / "testing")], cwd=tmp_path, env=clean_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert " passed" in done.stdout and "failed" not in done.stdout

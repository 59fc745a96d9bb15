"""Observability (issue 20): /metrics from real worker processes (histograms, per-process counters, checked by
promtool), JSON logs of everything on stdout. Real subprocesses of `python ductwork.py`, SQLite and Postgres."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from procs import Proc, wait_until

import ductwork

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "apps"))
import observe_app  # noqa: E402

OBSERVE = {"app": observe_app.__file__, "job_worker": {"count": 2, "max_retry": 2, "retry_delay": 0}}


def promtool() -> str:
    """promtool's path (Debian's prometheus package); skipped with the reason where it is not installed (CI
    installs it: .ci/run)."""
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is not installed (.ci/run installs the prometheus package)")
        pytest.skip("promtool is not installed: apt-get install prometheus")
    return path


def samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def worker_metrics(text: str, family: str, pipeline: str) -> float:
    """The sum over every process of a family's series of ``pipeline``."""
    return sum(v for k, v in samples(text).items() if k.startswith(family + "{") and f'pipeline="{pipeline}"' in k)


def test_metrics_of_real_workers_histograms_and_counters_pass_promtool(procs, tmp_path, app_db):
    """A real supervisor runs 6 runs of a 3-step chain whose first step fails once and whose second times out
    once: /metrics has each histogram's counts (the executions that ran, the completed runs), the retries and
    timeouts counted by the process that ran them, a child's restarts, and promtool finds nothing wrong."""
    sup = Proc(tmp_path, app_db, config=OBSERVE)
    procs.append(sup)
    sup.wait_log(r"worker started")
    runs = [observe_app.Observed.trigger(i) for i in range(6)]
    assert all(run.wait(timeout=40) == "completed" for run in runs)
    engine = ductwork._app_engine()
    # 6 x (Flaky twice, Slow twice, Chatty once): their counts reach the rows at the workers' next heartbeat
    deadline = 3 * float(ductwork.load_config(path=str(sup.config_path)).get("supervisor.heartbeat_interval")) + 10

    def exported():
        text = ductwork.dashboard_metrics(engine)
        done = worker_metrics(text, "ductwork_step_duration_seconds_count", "Observed") == 30
        return text if done and worker_metrics(text, "ductwork_run_duration_seconds_count", "Observed") == 6 else None
    text = wait_until(exported, deadline, interval=0.2, what="the workers' metrics in their rows")
    assert worker_metrics(text, "ductwork_queue_wait_seconds_count", "Observed") == 30
    assert worker_metrics(text, "ductwork_step_retries_total", "Observed") == 12
    assert worker_metrics(text, "ductwork_step_timeouts_total", "Observed") == 6
    assert worker_metrics(text, 'ductwork_step_duration_seconds_bucket{le="+Inf"', "Observed") == 0  # (label order)
    s = samples(text)
    infinite = [k for k in s if k.startswith("ductwork_step_duration_seconds_bucket{") and 'le="+Inf"' in k]
    assert infinite and all(re.search(r'process="host-a:\d+/\d+"', k) and 'role="worker"' in k for k in infinite)
    assert sum(s[k] for k in infinite if 'pipeline="Observed"' in k) == 30
    # the timed-out attempts ran 0.3 s at least: 6 of the 30 above 0.25 s
    slow = sum(v for k, v in s.items() if k.startswith("ductwork_step_duration_seconds_bucket{")
               and 'pipeline="Observed"' in k and 'le="0.25"' in k)
    assert slow <= 24
    assert s['ductwork_steps_executed_total{pipeline="Observed",outcome="failed"}'] == 12
    assert s['ductwork_runs_finished_total{pipeline="Observed",status="completed"}'] == 6
    restarts = [k for k in s if k.startswith("ductwork_child_restarts_total{")]
    assert restarts and all(s[k] == 0 for k in restarts)
    checked = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == "" and checked.stderr.strip() == "", checked.stdout + checked.stderr


def test_json_mode_every_stdout_line_is_one_ecs_object(procs, tmp_path, app_db):
    """In JSON mode, a real supervisor's stdout is JSON objects only: ductwork's lines, the app's logger (its
    .info() too), print(), warnings; a failed attempt at warning with its traceback, the last one at error; the
    lines logged inside a step carry its pipeline, run, step and attempt."""
    sup = Proc(tmp_path, app_db, config={**OBSERVE, "logger": {"format": "json"},
                                         "job_worker": {**OBSERVE["job_worker"], "max_retry": 1}})
    procs.append(sup)
    sup.wait_log(r'"message": "worker started')
    run = observe_app.Observed.trigger(7)
    doomed = observe_app.AlwaysFails.trigger(8)
    assert run.wait(timeout=30) == "completed" and doomed.wait(timeout=30) == "halted"
    sup.wait_log(r"warned 7")
    sup.signal(15)
    assert sup.wait(20) == 0
    records = [json.loads(line) for line in sup.log().splitlines()]   # (a line that is not JSON fails here)
    assert all({"@timestamp", "log.level", "severity", "message", "ecs.version"} <= set(r) for r in records)

    def one(predicate):
        found = [r for r in records if predicate(r)]
        assert len(found) == 1, (found, records[-20:])
        return found[0]
    step_of = {"ductwork.pipeline": "Observed", "ductwork.run_id": run.id}
    app_line = one(lambda r: r["message"] == "chatty step got 7")
    assert app_line["log.logger"] == "observe_app" and app_line["log.level"] == "info"
    assert app_line.items() >= {**step_of, "ductwork.attempt": 1}.items() and app_line["ductwork.step_id"]
    printed = one(lambda r: r["message"] == "printed 7")
    assert printed["log.logger"] == "ductwork.app.stdout" and printed.items() >= step_of.items()
    warned = one(lambda r: "warned 7" in r["message"])
    assert warned["log.logger"] == "py.warnings" and warned["log.level"] == "warning"
    first = one(lambda r: r["message"].startswith("step Flaky failed (attempt 1)"))
    assert first["log.level"] == "warning" and first["error.type"] == "ValueError"
    assert "Traceback" in first["error.stack_trace"] and first["ductwork.attempt"] == 1
    final = one(lambda r: r["message"].startswith("step never failed (attempt 2, the last)"))
    assert final["log.level"] == "error" and final["severity"] == "ERROR" and final["error.type"] == "RuntimeError"
    assert final["ductwork.run_id"] == doomed.id


def test_text_mode_shows_the_apps_lines_with_their_step(procs, tmp_path, app_db):
    sup = Proc(tmp_path, app_db, config=OBSERVE)
    procs.append(sup)
    sup.wait_log(r"worker started")
    run = observe_app.Observed.trigger(5)
    assert run.wait(timeout=30) == "completed"
    line = sup.wait_log(r".*chatty step got 5.*")[0].group(0)
    assert " INFO " in line and f"run={run.id}" in line and "logger=observe_app" in line and "attempt=1" in line
    assert "printed 5" in sup.log()   # (text mode: print() goes out as printed)


TRIGGER_IN_A_REQUEST = """
import sys
sys.path.insert(0, {apps!r})
import traced_app, ductwork
from opentelemetry import trace
traced_app.set_provider()
ductwork.configure(database_url={url!r})
with trace.get_tracer("web").start_as_current_span("web request"):
    run = traced_app.Traced.trigger(1)
traced_app.dump_spans()
print(run.id)
"""


def test_one_trace_from_the_request_through_the_worker_processes(procs, tmp_path, app_db):
    """SPEC §19 with the SDK's in-memory exporter: a process triggers a run inside a "web request" span; a real
    supervisor's worker runs its steps (one fails once). Every span is in the request's trace: the run span under
    the request's, each step execution under the run span, with run, step and attempt, the failure recorded."""
    pytest.importorskip("opentelemetry.sdk")
    apps = os.path.dirname(observe_app.__file__)   # (traced_app is never imported here: its hooks would be ours)
    sup = Proc(tmp_path, app_db, config={"app": os.path.join(apps, "traced_app.py"), "job_worker": {"retry_delay": 0}})
    procs.append(sup)
    sup.wait_log(r"worker started")
    env = {**os.environ, "DW_TEST_DIR": str(tmp_path)}
    script = TRIGGER_IN_A_REQUEST.format(apps=apps, url=app_db)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    run = ductwork.Run.get(int(out.stdout.strip().splitlines()[-1]))
    assert run.wait(timeout=30) == "completed" and run.output == 4
    sup.signal(15)
    assert sup.wait(20) == 0
    spans = [span for path in tmp_path.glob("spans-*.json") for span in json.loads(path.read_text())]
    by_name: dict[str, list[dict]] = {}
    for span in spans:
        by_name.setdefault(span["name"], []).append(span)
    (request,), (run_span,) = by_name["web request"], by_name["ductwork.run Traced"]
    assert {s["trace_id"] for s in spans} == {request["trace_id"]}   # one trace
    assert run_span["parent"] == request["span_id"] and run_span["attributes"]["ductwork.run_id"] == run.id
    first, flaky = by_name["ductwork.step Traced.traced_first"], by_name["ductwork.step Traced.TracedFlaky"]
    assert len(first) == 1 and len(flaky) == 2
    assert all(s["parent"] == run_span["span_id"] for s in first + flaky)
    assert {s["pid"] for s in first + flaky} != {request["pid"]}   # (they ran in the worker process)
    assert [(s["attributes"]["ductwork.attempt"], s["status"], s["attributes"]["ductwork.outcome"])
            for s in sorted(flaky, key=lambda s: s["attributes"]["ductwork.attempt"])] == \
        [(1, "ERROR", "failed"), (2, "UNSET", "succeeded")]
    assert "exception" in sorted(flaky, key=lambda s: s["attributes"]["ductwork.attempt"])[0]["events"]
    assert all(s["attributes"]["ductwork.run_id"] == run.id and s["attributes"]["ductwork.step_id"] for s in flaky)


def test_without_a_tracer_provider_nothing_is_traced_or_stored(engine):
    """The API without a provider set (this test process): no trace context is stored with a run."""
    run = observe_app.Observed.trigger(1)
    with engine.store.tx(write=False) as t:
        assert t.one("SELECT trace_context FROM ductwork_runs WHERE id = :id", {"id": run.id}) == (None,)


def test_without_opentelemetry_installed_runs_trace_nothing(tmp_path):
    """opentelemetry-api not importable (hidden): trigger, a worker's steps and log lines work, and nothing of it
    is imported."""
    script = f"""
import sys
sys.modules["opentelemetry"] = None   # as if not installed
sys.path.insert(0, {os.path.dirname(observe_app.__file__)!r})
import ductwork, observe_app
ductwork.configure(database_url="sqlite:///{tmp_path}/hidden.sqlite3")
run = ductwork.run_inline(observe_app.Observed, 3, steps={{"Slow": lambda x: x}})
assert run.status == "completed", run.status
assert sys.modules["opentelemetry"] is None and not any(m.startswith("opentelemetry.") for m in sys.modules)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.splitlines()[-1] == "ok", out.stderr


def test_printed_lines_are_kept_per_thread():
    """Two threads printing parts of their lines at once: each line is one record of its own thread (the JSON
    mode's stdout, ductwork._OutputLines, on a logger of its own here)."""
    import io
    import logging
    import threading
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append((record.threadName, record.getMessage()))
    out = ductwork._OutputLines("stdout-test", io.StringIO(), logging.INFO)
    out.logger.addHandler(handler)
    out.logger.propagate = False
    out.logger.setLevel(logging.INFO)
    a_wrote, b_done = threading.Event(), threading.Event()

    def a():
        out.write("A: fetching...")
        a_wrote.set()
        b_done.wait(5)
        out.write(" done\n")

    def b():
        a_wrote.wait(5)
        out.write("B: all at once\n")
        b_done.set()
    threads = [threading.Thread(target=a, name="A"), threading.Thread(target=b, name="B")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(records) == [("A", "A: fetching... done"), ("B", "B: all at once")]
    assert out.encoding and out.closed is False and out.writable()

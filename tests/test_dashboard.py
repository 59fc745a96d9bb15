"""The dashboard on real SQLite and PostgreSQL with a real in-process runtime: JSON twins,
/metrics, html escaping, auth, the bind refusal, the command, and a real headless Chromium."""
from __future__ import annotations

import base64
import datetime
import http.client
import json
import logging
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from conftest import FAST, ROOT
from procs import dashboard_port

import ductwork

dash = ductwork  # the dashboard is a section of ductwork.py
DASHBOARD_CMD = [sys.executable, str(ROOT / "ductwork.py"), "dashboard"]


def dash_list(n):
    ductwork.current_step().context.set("source", "<i>crm</i>")
    return list(range(n))


def dash_html(x):
    return f"<script>alert({x})</script>"


def dash_ident(x):
    return x


def dash_add(x):
    return x + 1


def dash_double(x):
    return x * 2


def dash_boom(x):
    raise ValueError(f"<b>bad</b> input {x}")


class DashFan(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(dash_list).expand(to=dash_html).collapse(into=dash_ident)


class DashSplit(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(dash_ident).divide(to=[dash_add, dash_double]).combine(into=dash_ident)


class DashFail(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(dash_boom)


def dash_wide_one(x):
    if x in (3, 30):
        raise ValueError(f"bad {x}")
    return x


class DashWide(ductwork.Pipeline):   # wider than a run page shows: its branches are grouped and paged
    @staticmethod
    def define(p):
        p.start(dash_ident).expand(to=dash_wide_one).collapse(into=dash_ident)


def dash_grid(n):
    return [list(range(n)) for _ in range(n)]


def dash_total(xs):
    return sum(xs)


class DashNested(ductwork.Pipeline):   # a fan-out in each branch of a fan-out
    @staticmethod
    def define(p):
        p.start(dash_grid).expand(to=dash_ident).expand(to=dash_add).collapse(into=dash_total).collapse(
            into=dash_ident)


class DashWaits(ductwork.Pipeline):   # parks for a signal; its schedule is listed (hourly: it never fires here)
    schedule = [ductwork.Schedule(every=3600)]

    @staticmethod
    def define(p):
        p.start(dash_ident).wait_for("go").chain(to=dash_ident)


class DashIdle(ductwork.Pipeline):  # no runtime serves it: its steps stay queued
    @staticmethod
    def define(p):
        p.start(dash_ident)


SERVED = ["DashFan", "DashSplit", "DashFail"]
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(url: str, auth: str | None = None, headers: dict | None = None) -> tuple[int, dict, str]:
    request = urllib.request.Request(url, headers=headers or {})
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with _NO_PROXY.open(request, timeout=15) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


def get_json(url: str) -> dict:
    code, headers, body = get(url)
    assert code == 200, body
    assert headers["Content-Type"].startswith("application/json")
    return json.loads(body)


@pytest.fixture
def runs(start_runtime):
    """A runtime serving three pipelines and one finished run of each."""
    start_runtime(SERVED)
    made = {"fan": DashFan.trigger(3), "split": DashSplit.trigger(5), "fail": DashFail.trigger(1)}
    for run in made.values():
        assert run.wait(30) != "in_progress", f"{run} did not finish"
    return made


@pytest.fixture
def serve(engine):
    """Start make_dashboard_server() on a free loopback port in a thread; returns its base URL."""
    servers = []

    def start(**kwargs) -> str:
        server = dash.make_dashboard_server(engine.config, "127.0.0.1", 0, **kwargs)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """Samples of the Prometheus text format; every sample's family has # HELP and # TYPE before it."""
    declared: dict[str, set] = {}
    samples = {}
    for line in text.splitlines():
        if line.startswith("# "):
            kind, name = line.split()[1:3]
            declared.setdefault(name, set()).add(kind)
            continue
        match = re.fullmatch(r'([a-z_]+)\{(.*)\} (\S+)', line)
        assert match, f"bad sample line {line!r}"
        name, labels, value = match.groups()
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in declared else name
        assert declared.get(family) == {"HELP", "TYPE"}, f"{name} lacks HELP/TYPE"
        pairs = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels))
        samples[name, pairs] = float(value)
    return samples


def m(samples: dict, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


# -- JSON twins --------------------------------------------------------------------------------
def test_json_twins_overview_runs_tree_errors(runs, serve):
    fan, split, fail = runs["fan"], runs["split"], runs["fail"]
    base = serve()

    overview = get_json(base + "/api/overview")
    assert overview["runs"] == {"DashFan": {"completed": 1}, "DashSplit": {"completed": 1}, "DashFail": {"halted": 1}}
    assert [p["role"] for p in overview["processes"]] == ["supervisor"]  # the combined runtime's row
    assert overview["processes"][0]["heartbeat_age"] < 5 and overview["processes"][0]["restarts"] == 0
    assert sum(overview["throughput"]["runs_completed"]) == 2
    assert sum(overview["throughput"]["steps_finished"]) == 5 + 4 + 1  # fan 5, split 4, the failed step 1
    assert overview["throughput"]["runs_completed"][0] == 2  # all in the last minute
    assert [(h["run"], h["reasons"]) for h in overview["recent_halts"]] == [(fail.id, ["job_retries_exhausted"])]

    listed = get_json(base + "/api/runs")
    assert [r["id"] for r in listed["runs"]] == [fail.id, split.id, fan.id] and not listed["has_next"]
    assert listed["pipelines"] == ["DashFail", "DashFan", "DashSplit"]
    assert [r["id"] for r in get_json(base + "/api/runs?pipeline=DashFan")["runs"]] == [fan.id]
    halted = get_json(base + "/api/runs?status=halted")["runs"]
    assert [(r["id"], r["halt_reasons"]) for r in halted] == [(fail.id, ["job_retries_exhausted"])]
    assert get_json(base + "/api/runs?status=halted&pipeline=DashFan")["runs"] == []
    page1, page2 = get_json(base + "/api/runs?per_page=2"), get_json(base + "/api/runs?per_page=2&page=2")
    assert [r["id"] for r in page1["runs"]] == [fail.id, split.id] and page1["has_next"]
    assert [r["id"] for r in page2["runs"]] == [fan.id] and not page2["has_next"]

    detail = get_json(base + f"/api/runs/{fan.id}")
    assert detail["run"]["status"] == "completed" and detail["run"]["context"] == {"source": "<i>crm</i>"}
    tree = detail["tree"]
    assert tree["parent_id"] is None and [s["name"] for s in tree["steps"]] == ["dash_list", "dash_ident"]
    start, join = tree["steps"]
    assert (start["input"], start["output"]) == ([3], [0, 1, 2])
    expected = [f"<script>alert({i})</script>" for i in range(3)]
    children = start["branches"]
    assert [b["position"] for b in children] == [0, 1, 2]
    assert [(b["steps"][0]["name"], b["steps"][0]["input"], b["steps"][0]["output"]) for b in children] == \
        [("dash_html", i, expected[i]) for i in range(3)]
    assert (join["input"], join["output"]) == (expected, expected) and detail["steps"] == 5
    for step in [start, join, *(b["steps"][0] for b in children)]:
        assert (step["status"], step["attempts"], step["crashes"]) == ("succeeded", 1, 0)
        assert [e["outcome"] for e in step["executions"]] == ["succeeded"]
        assert step["created_at"] <= step["started_at"] <= step["finished_at"] and step["duration"] >= 0

    split_tree = get_json(base + f"/api/runs/{split.id}")["tree"]
    divided = split_tree["steps"][0]["branches"]
    assert [(b["steps"][0]["name"], b["steps"][0]["output"]) for b in divided] == [("dash_add", 6), ("dash_double", 10)]
    assert split_tree["steps"][1]["input"] == [6, 10]

    failed = get_json(base + f"/api/runs/{fail.id}")["tree"]["steps"][0]
    assert (failed["status"], failed["attempts"], failed["halt_reason"]) == ("failed", 4, "job_retries_exhausted")
    assert failed["error"].startswith("ValueError: <b>bad</b> input 1") and "Traceback" in failed["error"]
    assert [(e["attempt"], e["outcome"]) for e in failed["executions"]] == [(i, "failed") for i in (1, 2, 3, 4)]
    assert all("Traceback" in e["error"] for e in failed["executions"])

    errors = get_json(base + "/api/errors")
    assert [(e["run"], e["name"], e["outcome"], e["attempt"]) for e in errors["errors"]] == \
        [(fail.id, "dash_boom", "failed", i) for i in (4, 3, 2, 1)]
    assert get_json(base + "/api/errors?pipeline=DashFan")["errors"] == []
    assert [e["attempt"] for e in get_json(base + "/api/errors?per_page=3&page=2")["errors"]] == [1]

    for path, code in (("/api/runs/999999", 404), ("/api/runs?page=x", 400), ("/api/runs?per_page=0", 400),
                       ("/api/nope", 404)):
        status, headers, body = get(base + path)
        assert status == code and headers["Content-Type"].startswith("application/json") and "error" in json.loads(body)


# -- /metrics ------------------------------------------------------------------------------------
def test_metrics_values(runs, serve, engine):
    idle = [DashIdle.trigger(i) for i in range(2)]
    claimed = engine.claim_steps("DashIdle", process_id=424242)  # a process that takes a step and dies:
    assert len(claimed) == 1 and engine.hand_back(424242) == 1   # the supervisor hands its work back
    time.sleep(0.3)
    code, headers, text = get(serve() + "/metrics")
    assert code == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    s = parse_metrics(text)
    assert m(s, "ductwork_runs_triggered_total", pipeline="DashFan") == 1
    assert m(s, "ductwork_runs_finished_total", pipeline="DashFan", status="completed") == 1
    assert m(s, "ductwork_runs", pipeline="DashFan", status="completed") == 1
    assert m(s, "ductwork_runs_finished_total", pipeline="DashFail", status="halted") == 1
    assert m(s, "ductwork_runs", pipeline="DashFail", status="halted") == 1
    assert m(s, "ductwork_runs_finished_total", pipeline="DashFail", status="completed") == 0
    assert m(s, "ductwork_runs_triggered_total", pipeline="DashIdle") == len(idle)
    assert m(s, "ductwork_runs", pipeline="DashIdle", status="in_progress") == 2
    assert m(s, "ductwork_runs_in_progress", pipeline="DashIdle") == 2
    assert m(s, "ductwork_steps_executed_total", pipeline="DashFan", outcome="succeeded") == 5
    assert m(s, "ductwork_steps_executed_total", pipeline="DashFail", outcome="failed") == 4
    assert m(s, "ductwork_steps_executed_total", pipeline="DashIdle", outcome="crashed") == 1
    assert m(s, "ductwork_queue_depth", pipeline="DashIdle") == 2
    assert m(s, "ductwork_queue_depth", pipeline="DashFan") == 0
    assert 0.25 <= m(s, "ductwork_queue_oldest_age_seconds", pipeline="DashIdle") < 60
    assert m(s, "ductwork_queue_oldest_age_seconds", pipeline="DashSplit") == 0
    assert m(s, "ductwork_processes", role="supervisor") == 1
    assert m(s, "ductwork_processes", role="worker") == 0
    assert m(s, "ductwork_build_info", version=ductwork.__version__, python=platform.python_version(),
             dialect=engine.store.dialect, schema=str(ductwork.SCHEMA_VERSION)) == 1
    assert "# TYPE ductwork_runs_finished_total counter" in text and "# TYPE ductwork_runs gauge" in text
    assert "# TYPE ductwork_queue_depth gauge" in text and "# TYPE ductwork_step_duration_seconds histogram" in text
    assert "ductwork_runs_total" not in text   # (a "counter" that went down: replaced by the two above)


# -- escaping, fragments, headers -------------------------------------------------------------------
def test_html_escapes_everything_stored(runs, serve):
    base = serve()
    fan = runs["fan"]
    code, headers, page = get(base + f"/runs/{fan.id}")
    assert code == 200 and headers["Content-Type"].startswith("text/html")
    assert "<script>alert(" not in page and "&lt;script&gt;alert(0)&lt;/script&gt;" in page
    assert "<i>crm" not in page and "&lt;i&gt;crm&lt;/i&gt;" in page
    nonce = re.search(r"script-src 'nonce-([^']+)'", headers["Content-Security-Policy"]).group(1)
    assert page.count("<script") == 1 and f'<script nonce="{nonce}">' in page
    assert f'data-api="/api/runs/{fan.id}"' in page
    etag = get(base + f"/api/runs/{fan.id}")[1]["ETag"]  # the page and its twin: same data, same ETag
    assert headers["ETag"] == etag and f'data-etag="{etag.replace(chr(34), "&quot;")}"' in page
    assert get(base + f"/api/runs/{fan.id}", headers={"If-None-Match": etag})[0] == 304
    for path in ("/errors", "/", f"/runs/{runs['fail'].id}"):
        code, _, page = get(base + path)
        assert code == 200 and "<b>bad" not in page and "&lt;b&gt;bad&lt;/b&gt;" in page, path
        assert page.count("<script") == 1
    code, _, fragment = get(base + f"/runs/{fan.id}", headers={"X-Ductwork-Fragment": "1"})
    assert code == 200 and fragment.startswith("<h2>Run") and "<html" not in fragment and "dash_html" in fragment
    code, _, listed = get(base + "/runs?pipeline=%3Cx%3E&status=halted")
    assert code == 200 and "<x>" not in listed and "no runs" in listed
    assert get(base + "/", headers={"Host": "evil.example:80"})[0] == 403  # DNS rebinding onto a loopback dashboard


# -- auth and binding -------------------------------------------------------------------------------
def test_basic_auth(engine, serve):
    base = serve(auth="admin:s3cret")
    for path in ("/", "/api/overview", "/runs", "/metrics"):
        code, headers, _ = get(base + path)
        assert code == 401 and headers["WWW-Authenticate"].startswith("Basic realm=")
        assert get(base + path, auth="admin:wrong")[0] == 401
        assert get(base + path, auth="admin:s3cret")[0] == 200
    assert get(base + "/api/overview", auth="admin:s3cret", headers={"Host": "dashboard.example"})[0] == 200
    with pytest.raises(ductwork.ConfigError, match="user:password"):
        dash.make_dashboard_server(engine.config, "127.0.0.1", 0, auth="no-password-here")


def test_refuses_public_bind_without_auth(engine, monkeypatch):
    with pytest.raises(ductwork.ConfigError, match="refusing to serve the dashboard on 0.0.0.0 without auth"):
        dash.make_dashboard_server(engine.config, "0.0.0.0", 0)
    # a short password would mask every "b" in later logs
    for allowed in ({"auth": "admin:Adm1nS3cret"}, {"insecure": True}):
        dash.make_dashboard_server(engine.config, "0.0.0.0", 0, **allowed).server_close()
    dash.make_dashboard_server(engine.config, "localhost", 0).server_close()
    parser = ductwork._Parser(prog="ductwork")
    dash.COMMANDS_BY_NAME["dashboard"].add_to(parser.add_subparsers(dest="command", parser_class=ductwork._Parser))
    args = parser.parse_args(["dashboard", "--host", "0.0.0.0", "--port", "0"])
    assert (args.host, args.port, args.auth, args.insecure) == ("0.0.0.0", 0, None, False)
    monkeypatch.delenv("DUCTWORK_DASHBOARD_AUTH", raising=False)
    with pytest.raises(ductwork.ConfigError, match="refusing"):
        dash.cmd_dashboard(args, engine.config)
    with pytest.raises(ductwork.ConfigError):
        parser.parse_args(["dashboard", "--port", "eighty"])
    with pytest.raises(ductwork.ConfigError, match="--port"):
        dash.cmd_dashboard(parser.parse_args(["dashboard", "--port", "70000"]), engine.config)


def test_command_serves_until_sigterm(engine, db_url):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("DUCTWORK_DASHBOARD_AUTH", None)
    refused = subprocess.run([*DASHBOARD_CMD, "--host", "0.0.0.0", "--port", "0", "--database-url", db_url],
                             capture_output=True, text=True, env=env, cwd=ROOT, timeout=30)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert refused.stderr.startswith("ductwork: error: refusing to serve the dashboard on 0.0.0.0 without auth")
    env["DUCTWORK_DASHBOARD_AUTH"] = "ops:pa55"
    proc = subprocess.Popen([*DASHBOARD_CMD, "--host", "0.0.0.0", "--port", "0", "--database-url", db_url],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "dashboard on http://" in line:
                break
        found = re.search(r"dashboard on http://0\.0\.0\.0:(\d+)/", "".join(lines))
        assert found, "".join(lines)
        port = int(found.group(1))
        assert get(f"http://127.0.0.1:{port}/metrics")[0] == 401
        code, _, text = get(f"http://127.0.0.1:{port}/metrics", auth="ops:pa55")
        assert code == 200 and "ductwork_queue_depth" in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert "pa55" not in "".join(lines) + proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- a real browser -------------------------------------------------------------------------------
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"


class WebDriver:
    """The W3C WebDriver protocol over HTTP to chromedriver, with urllib only."""

    def __init__(self, chromium: str, driver: str, tmp_path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.log = open(tmp_path / "chromedriver.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen([driver, f"--port={port}"], stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                if self.call("GET", "/status")["ready"]:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "chromedriver did not start"
            time.sleep(0.1)
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                "--window-size=1280,2000", "--lang=en-US", f"--user-data-dir={tmp_path / 'chromium-profile'}"]
        caps = {"capabilities": {"alwaysMatch": {"goog:chromeOptions": {"binary": chromium, "args": args}}}}
        self.session = "/session/" + self.call("POST", "/session", caps)["sessionId"]

    def call(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with _NO_PROXY.open(request, timeout=60) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as exc:
            message = json.loads(exc.read())["value"].get("message", "")[:300]
            raise AssertionError(f"webdriver {method} {path}: {message}") from None

    def do(self, method: str, path: str, body: dict | None = None):
        return self.call(method, self.session + path, body)

    def find_all(self, css: str) -> list[str]:
        return [e[ELEMENT] for e in self.do("POST", "/elements", {"using": "css selector", "value": css})]

    def wait_for(self, css: str, timeout: float = 15) -> list[str]:
        deadline = time.monotonic() + timeout
        while not (found := self.find_all(css)):
            assert time.monotonic() < deadline, f"no element matches {css!r} on {self.do('GET', '/url')}"
            time.sleep(0.1)
        return found

    def text(self, element: str) -> str:
        return self.do("GET", f"/element/{element}/text")

    def close(self) -> None:
        try:
            self.call("DELETE", self.session)
        finally:
            self.proc.terminate()
            self.proc.wait(10)
            self.log.close()


SVG_NODES = """return [...document.querySelectorAll('svg.graph g.node')].map(g => {const r = g.getBBox();
  return {step: g.dataset.step, count: g.dataset.count, status: g.dataset.status,
          width: r.width, height: r.height};});"""
BACKGROUND = "return getComputedStyle(document.body).backgroundColor;"
CHARTS = """return [...document.querySelectorAll('svg.chart')].map(s => ({chart: s.dataset.chart,
  series: [...new Set([...s.querySelectorAll('polyline.series')].map(p => p.dataset.series))].sort(),
  dots: s.querySelectorAll('circle').length, width: s.getBBox().width}));"""
ACTIVE = """const a = document.activeElement; return {id: a.id, cls: a.className, tag: a.tagName,
  outline: getComputedStyle(a).outlineStyle};"""
# WCAG 2 contrast of every element's own visible text (outside SVG and aria-hidden) against its effective
# background (the first ancestor's that is not transparent): the ones under 4.5:1, and how many were checked.
CONTRAST = """const lum = c => { const [r, g, b] = c.match(/[\\d.]+/g).slice(0, 3).map(Number).map(v => {
    v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); });
  return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
const opaque = c => { const m = c.match(/[\\d.]+/g); return m.length < 4 || Number(m[3]) > 0; };
const under = el => { for (; el; el = el.parentElement) { const c = getComputedStyle(el).backgroundColor;
    if (opaque(c)) return c; } return 'rgb(255, 255, 255)'; };
const bad = []; let checked = 0;
for (const el of document.querySelectorAll('body *')) {
  if (el.closest('svg, [aria-hidden=true], script, style')) continue;
  if (![...el.childNodes].some(n => n.nodeType === 3 && n.textContent.trim())) continue;
  const box = el.getBoundingClientRect(); if (!box.width || !box.height) continue;
  const fg = getComputedStyle(el).color, bg = under(el);
  const [hi, lo] = [lum(fg), lum(bg)].sort((a, b) => b - a), ratio = (hi + 0.05) / (lo + 0.05);
  checked++; if (ratio < 4.5) bad.push({text: el.textContent.trim().slice(0, 40), tag: el.tagName,
                                        cls: String(el.className), fg, bg, ratio: ratio.toFixed(2)});
}
return {checked, bad};"""
TIMES = """return [...document.querySelectorAll('main time')].map(t => ({datetime: t.dateTime, text: t.textContent,
  title: t.title}));"""
SVG_BARS = """return [...document.querySelectorAll('svg.timeline rect.bar-x')].map(b => ({outcome: b.dataset.outcome,
  attempt: b.dataset.attempt, width: b.getBBox().width}));"""


def test_run_page_draws_the_pipeline_graph_and_the_timeline(runs, serve):
    """The run page's SVGs, as served: a node per definition node coloured by its steps (with the fan-out's count),
    arrows for the chain, the fan-out and (dashed) its join, and a timeline bar per execution."""
    base = serve()
    _, _, page = get(base + f"/runs/{runs['fan'].id}")
    graph = re.search(r'<svg class="graph".*?</svg>', page, re.S).group(0)
    nodes = re.findall(r'<g class="node st-(\w+)" data-node="(\d+)" data-step="(\w+)" data-count="(\d+)"', graph)
    assert nodes == [("succeeded", "0", "dash_list", "1"), ("succeeded", "1", "dash_html", "3"),
                     ("succeeded", "2", "dash_ident", "1")]
    assert "dash_html \u00d73" in graph
    assert re.findall(r'class="edge edge-(\w+)"', graph) == ["child", "join"]
    timeline = re.search(r'<svg class="timeline".*?</svg>', page, re.S).group(0)
    assert re.findall(r'data-outcome="(\w+)"', timeline) == ["succeeded"] * 5
    _, _, failed = get(base + f"/runs/{runs['fail'].id}")
    timeline = re.search(r'<svg class="timeline".*?</svg>', failed, re.S).group(0)
    attempts = re.findall(r'data-attempt="(\d)" data-outcome="(\w+)"', timeline)
    assert attempts == [(str(i), "failed") for i in (1, 2, 3, 4)]
    assert re.search(r'<g class="node st-failed" data-node="0" data-step="dash_boom" data-count="1"', failed)
    waits = ductwork.render_graph([{"id": 0, "step": "a", "after": {"kind": "wait", "wait": {"sleep": 60},
                                                                     "then": {"kind": "chain", "next": 1}}},
                                   {"id": 1, "step": "b", "after": {"kind": "end"}}], {0: {"succeeded": 1}})
    assert "sleep 60s" in waits and 'st-none" data-node="1"' in waits   # (b not reached: no steps)


def test_wide_fan_out_is_grouped_paged_and_filtered(start_runtime, serve):
    """A 45-way expand (two branches halt): the run page shows the first DASHBOARD_BRANCHES branches under a
    summary counting all 45 by status, pages through the rest, filters by status, and reads only the steps it
    shows; the graph still counts every step."""
    width, shown = 45, ductwork.DASHBOARD_BRANCHES
    start_runtime(["DashWide"])
    run = DashWide.trigger(list(range(width)))
    assert run.wait(60) == "halted"
    base = serve()
    data = get_json(base + f"/api/runs/{run.id}")
    expand = data["tree"]["steps"][0]
    assert expand["fanout"] == {"run": run.id, "step": expand["id"], "branches": width, "status": None, "page": 1,
                                "by_status": {"completed": width - 2, "halted": 2}, "first": 0, "matching": width,
                                "has_next": True}
    assert [b["position"] for b in expand["branches"]] == list(range(shown))
    assert data["steps"] == 1 + shown   # the expand's step and one step per shown branch
    assert data["node_counts"] == {"0": {"succeeded": 1}, "1": {"failed": 2, "succeeded": width - 2}}
    _, _, page = get(base + f"/runs/{run.id}")
    assert f'<li class="fanout" id="fanout-{expand["id"]}"><b>fan-out of {width} branches</b>' in page
    assert f"showing 1&ndash;{shown} of {width}" in page
    assert page.count('<li class="branch">') == 1 + shown
    assert re.search(rf'data-step="dash_wide_one" data-count="{width}"', page)
    assert f'href="/runs/{run.id}?fanout={expand["id"]}&amp;fpage=2#fanout-{expand["id"]}">next' in page

    last = get_json(base + f"/api/runs/{run.id}?fanout={expand['id']}&fpage=3")["tree"]["steps"][0]
    assert [b["position"] for b in last["branches"]] == list(range(2 * shown, width))
    assert last["fanout"]["has_next"] is False
    halted = get_json(base + f"/api/runs/{run.id}?fanout={expand['id']}&fstatus=halted")["tree"]["steps"][0]
    assert [(b["position"], b["status"]) for b in halted["branches"]] == [(3, "halted"), (30, "halted")]
    assert [s["executions"][-1]["outcome"] for b in halted["branches"] for s in b["steps"]] == ["failed", "failed"]
    _, _, page = get(base + f"/runs/{run.id}?fanout={expand['id']}&fstatus=halted")
    assert "bad 30" in page and "<b>halted 2</b>" in page and "(showing 1&ndash;2 of 2 halted)" in page
    code, _, body = get(base + f"/runs/{run.id}?fanout=x")
    assert code == 400 and "fanout must be an integer" in body


def test_errors_grouped_by_class_and_message(runs, serve, engine):
    """The errors page groups failed and crashed executions by class and message: counts, the steps, first and
    last seen, the latest run as the example; over a bounded sample that the page names."""
    again, other = DashFail.trigger(1), DashFail.trigger(2)
    assert again.wait(30) == other.wait(30) == "halted"
    base = serve()
    data = get_json(base + "/api/errors")
    groups = {(g["class"], g["message"]): g for g in data["groups"]}
    assert set(groups) == {("ValueError", "<b>bad</b> input 1"), ("ValueError", "<b>bad</b> input 2")}
    one, two = groups["ValueError", "<b>bad</b> input 1"], groups["ValueError", "<b>bad</b> input 2"]
    assert (one["count"], two["count"]) == (8, 4)   # four attempts a run
    assert [g["count"] for g in data["groups"]] == [8, 4]   # the most frequent first
    assert one["steps"] == ["DashFail.dash_boom"] and one["outcomes"] == ["failed"]
    assert one["example"]["run"] == again.id and two["example"]["run"] == other.id
    assert one["first_seen"] < one["last_seen"] and data["sampled"] == 12
    code, _, page = get(base + "/errors")
    assert code == 200 and '<div id="error-groups">' in page and "of every failed or crashed execution" in page
    assert "&lt;b&gt;bad&lt;/b&gt; input 1</td><td>8</td>" in page
    assert f'<a href="/runs/{again.id}#step-' in page
    bounded = ductwork.dashboard_errors(engine.store, sample=5)
    assert bounded["sampled"] == 5 and sum(g["count"] for g in bounded["groups"]) == 5
    assert "of the latest 5 failed or crashed executions" in ductwork.render_errors(bounded)
    assert "groups" not in get_json(base + "/api/errors?page=2")   # the first page groups, the others list
    assert get_json(base + "/api/errors?pipeline=DashFan")["groups"] == []


def test_nested_fan_out_paged_inside_a_later_page(engine, serve):
    """The inner fan-out of the outer fan-out's 22nd branch (on the outer's second page) pages too: the branches
    down to it are shown with the outer's first page."""
    width = ductwork.DASHBOARD_BRANCHES + 2
    run = ductwork.run_inline(DashNested, width)
    assert run.status == "completed" and run.output == [sum(range(1, width + 1))] * width
    base = serve()
    outer = get_json(base + f"/api/runs/{run.id}")["tree"]["steps"][0]
    page2 = get_json(base + f"/api/runs/{run.id}?fanout={outer['id']}&fpage=2")["tree"]["steps"][0]
    assert [b["position"] for b in page2["branches"]] == [width - 2, width - 1]
    inner = page2["branches"][-1]["steps"][0]
    assert inner["fanout"]["branches"] == width and len(inner["branches"]) == ductwork.DASHBOARD_BRANCHES
    data = get_json(base + f"/api/runs/{run.id}?fanout={inner['id']}&fpage=2")
    shown = data["tree"]["steps"][0]["branches"]
    assert [b["position"] for b in shown] == [*range(ductwork.DASHBOARD_BRANCHES), width - 1]
    deep = shown[-1]["steps"][0]
    assert deep["id"] == inner["id"] and deep["fanout"]["page"] == 2
    assert [(b["position"], b["steps"][0]["input"]) for b in deep["branches"]] == [(width - 2, width - 2),
                                                                                  (width - 1, width - 1)]
    _, _, page = get(base + f"/runs/{run.id}?fanout={inner['id']}&fpage=9")   # past the end: said so
    assert f"none on this page, of {width}" in page


def queue_samples(engine) -> list[tuple]:
    with engine.store.tx(write=False) as t:
        return t.all("SELECT minute, pipeline, depth, oldest_age FROM ductwork_queue_samples ORDER BY minute, pipeline")


def test_queue_sampled_once_a_minute_for_the_charts(engine, start_runtime, serve):
    """An advancer process samples the queue once a minute of the database's clock (the first to ask takes
    it, the others take nothing), drops the samples older than QUEUE_SAMPLE_MINUTES, and the overview charts
    them per pipeline."""
    for i in range(3):
        DashIdle.trigger(i)   # nobody serves DashIdle: three claimable steps
    start_runtime(["DashFan"])   # its advancer samples at its first heartbeat (FAST: 0.2 s)
    deadline = time.monotonic() + 150 * FAST["supervisor"]["heartbeat_interval"]
    while not any(row[1] == "DashIdle" for row in queue_samples(engine)):
        assert time.monotonic() < deadline, queue_samples(engine)
        time.sleep(0.05)
    taken = queue_samples(engine)
    minute = max(row[0] for row in taken)
    assert [(p, d) for m, p, d, _ in taken if m == minute] == [("", 0), ("DashIdle", 3)]
    assert 0 <= [a for m, p, _, a in taken if m == minute and p == "DashIdle"][0] < 60
    left = engine.sample_queue()   # asked again within the minute: another process had taken it
    assert 0 < left <= 60
    assert [row for row in queue_samples(engine) if row[0] == minute] == [r for r in taken if r[0] == minute]
    old = minute - ductwork.QUEUE_SAMPLE_MINUTES - 1
    with engine.store.tx() as t:   # a sample older than kept, and this minute as if nobody had sampled it yet
        t.run("INSERT INTO ductwork_queue_samples VALUES (:m, 'DashIdle', 9, 1.5)", {"m": old})
        t.run("DELETE FROM ductwork_queue_samples WHERE minute = :m", {"m": minute})
        assert ductwork.Engine.take_sample(t, minute)
    after = queue_samples(engine)
    assert all(m > old for m, *_ in after)
    assert [(p, d) for m, p, d, _ in after if m == minute] == [("", 0), ("DashIdle", 3)]
    base = serve()
    queue = get_json(base + "/api/overview?window=15m")["queue"]
    assert next(d for d in queue["depth"]["DashIdle"] if d is not None) == 3
    assert queue["sampled"][0] or queue["sampled"][1]   # this minute's, or (a minute began) the one before


def test_minute_stats_count_finished_work_and_the_overview_charts_them(runs, engine, serve):
    """The sample STATS_LAG minutes after a minute counts its steps finished and runs completed per pipeline
    and duration bin, exactly as the rows say; the overview charts a counted minute at its point."""
    import bisect
    import collections
    with engine.store.tx(write=False) as t:
        steps = t.all("SELECT pipeline, finished_at, finished_at - claimed_at FROM ductwork_steps "
                      "WHERE status IN ('succeeded', 'failed')")
        done = t.all("SELECT pipeline, finished_at, finished_at - created_at FROM ductwork_runs "
                     "WHERE status = 'completed'")
    expected = collections.Counter(
        (int(at // 60), pipeline, kind, bisect.bisect_left(ductwork.DURATION_BINS, took))
        for kind, rows in (("step", steps), ("run", done)) for pipeline, at, took in rows)
    assert sum(expected.values()) == 10 + 2
    minute = int(engine.store.now() // 60)
    earliest = min(k[0] for k in expected)
    with engine.store.tx() as t:   # a sample that counted up to the minute before the fixture's, then (a
        # minute or two missed) the one that catches up to STATS_LAG minutes before this one
        t.run("DELETE FROM ductwork_queue_samples")
        t.run("INSERT INTO ductwork_queue_samples VALUES (:m, '', 0, 0)", {"m": earliest - 1 + ductwork.STATS_LAG})
        assert ductwork.Engine.take_sample(t, minute + ductwork.STATS_LAG)
        stats = t.all("SELECT minute, pipeline, kind, bin, count FROM ductwork_minute_stats")
    assert max(k[0] for k in expected) <= minute
    assert collections.Counter({tuple(row[:4]): row[4] for row in stats}) == expected
    half = bisect.bisect_left(ductwork.DURATION_BINS, 0.5)
    with engine.store.tx() as t:   # a minute counted five minutes ago: seven steps of about half a second; and
        # this minute's sample (as the runtime's advancer takes it), so that minute is read from the stats
        t.run("INSERT INTO ductwork_minute_stats VALUES (:m, 'DashFan', 'step', :b, 7)", {"m": minute - 5, "b": half})
        t.run("INSERT INTO ductwork_queue_samples VALUES (:m, '', 0, 0) ON CONFLICT DO NOTHING", {"m": minute})
    data = get_json(serve() + "/api/overview?window=15m")
    point = data["window"]["minute"] - (minute - 5)   # (a minute may have begun since)
    assert data["throughput"]["steps_finished"][point] == 7 and data["throughput"]["runs_completed"][point] == 0
    p50 = data["durations"]["step"]["p50"][point]
    assert ductwork.DURATION_BINS[half - 1] <= p50 <= ductwork.DURATION_BINS[half]
    assert sum(data["throughput"]["steps_finished"]) == 7 + 10   # and the fixture's, read from the rows


@pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)
def test_duration_bins_in_sql_and_their_quantiles(engine):
    """The CASE tree puts a duration in the same bin on both databases as a binary search does, and a quantile
    read off the bins lies in the bin of the exact one."""
    import bisect
    values = [0.0, 0.0004, 0.001, 0.00101, 0.0123, 0.2, 0.25, 1.0, 3.7, 59.9, 61.0, 3600.0, 86400.0, 10 ** 6]
    case = ductwork.duration_bin_sql("x")
    with engine.store.tx(write=False) as t:
        got = [int(t.one(f"SELECT {case} FROM (SELECT CAST(:x AS DOUBLE PRECISION) AS x) v"
                         if t.dialect == "postgres" else f"SELECT {case} FROM (SELECT :x AS x) v", {"x": v})[0])
               for v in values]
    assert got == [bisect.bisect_left(ductwork.DURATION_BINS, v) for v in values]
    durations = [0.01 * 1.07 ** i for i in range(100)]   # 10 ms to 8 s
    bins: dict[int, int] = {}
    for d in durations:
        b = bisect.bisect_left(ductwork.DURATION_BINS, d)
        bins[b] = bins.get(b, 0) + 1
    for q in (0.5, 0.95):
        exact = sorted(durations)[int(q * len(durations)) - 1]
        estimate = ductwork._quantile(bins, q)
        assert bisect.bisect_left(ductwork.DURATION_BINS, estimate) == bisect.bisect_left(ductwork.DURATION_BINS,
                                                                                            exact), (q, estimate)
    assert ductwork._quantile({}, 0.5) is None


def test_overview_charts_waits_and_schedules(runs, serve, start_runtime, engine):
    """The overview over a chosen window: throughput, step and run durations (p50, p95) from the rows, what
    waits (a branch parked for a signal) and the schedules; the charts drawn as SVG; a bad window is a 400."""
    start_runtime(["DashWaits"])
    parked = DashWaits.trigger(1)
    base = serve()
    deadline = time.monotonic() + 30
    # (parked: in both the list and the counts, two statements that on Postgres read committed rows each)
    while not ((data := get_json(base + "/api/overview?window=15m"))["waits"] and "DashWaits" in data["waiting"]):
        assert time.monotonic() < deadline, "the run did not park"
        time.sleep(ductwork.DASHBOARD_CACHE_SECONDS / 4)
    assert data["window"] == {"name": "15m", "seconds": 900, "bucket": 60, "points": 15,
                              "choices": ["15m", "1h", "6h", "24h"], "minute": data["window"]["minute"]}
    assert sum(data["throughput"]["runs_completed"]) == 2 and sum(data["throughput"]["steps_finished"]) == 11
    with engine.store.tx(write=False) as t:
        took = [d for (d,) in t.all("SELECT finished_at - claimed_at FROM ductwork_steps "
                                    "WHERE status IN ('succeeded', 'failed')")]
        ran = [d for (d,) in t.all("SELECT finished_at - created_at FROM ductwork_runs WHERE status = 'completed'")]
    for kind, durations in (("step", took), ("run", ran)):
        series = data["durations"][kind]
        p50, p95 = (next(v for v in series[q] if v is not None) for q in ("p50", "p95"))
        low = max([b for b in ductwork.DURATION_BINS if b < min(durations)] or [0])
        high = min(b for b in ductwork.DURATION_BINS if b >= max(durations))
        assert low <= p50 <= p95 <= high, (kind, p50, p95, durations)
    assert data["waiting"]["DashWaits"]["signal"] == 1
    assert [(w["run"], w["signal"]) for w in data["waits"]] == [(parked.id, "go")]
    mine = [(s["schedule"], s["on"], s["last_run"]) for s in data["schedules"] if s["pipeline"] == "DashWaits"]
    assert mine == [(ductwork.Schedule(every=3600).describe(), True, None)]   # (every registered pipeline's listed)
    code, _, page = get(base + "/?window=15m")
    assert code == 200 and '<b aria-current="page">15m</b>' in page and '<a href="/?window=6h">6h</a>' in page
    charts = re.findall(r'<svg class="chart" data-chart="([\w-]+)" data-points="(\d+)"', page)
    assert charts == [(name, "15") for name in ("throughput", "step-duration", "run-duration", "queue-depth",
                                                 "queue-age")]
    throughput = re.search(r'data-chart="throughput".*?</svg>', page, re.S).group(0)
    assert sorted(set(re.findall(r'<polyline class="series s\d" data-series="([\w ]+)"', throughput))) == \
        ["runs completed", "steps finished"]
    assert len(re.findall(r'<circle class="s\d" data-series="runs completed"', throughput)) == 15
    assert '<div id="waiting">' in page and f'<a href="/runs/{parked.id}">run {parked.id}</a>' in page
    assert '<div id="schedules">' in page and ductwork._esc(ductwork.Schedule(every=3600).describe()) in page
    assert get_json(base + "/api/overview?window=24h")["window"]["points"] == 48
    code, _, body = get(base + "/?window=2d")
    assert code == 400 and "window must be one of 15m, 1h, 6h, 24h" in body


def location_of(url: str) -> tuple[int, str | None]:
    """The status and Location of a GET, not followed."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=15)
    try:
        conn.request("GET", parts.path + "?" + parts.query)
        response = conn.getresponse()
        response.read()
        return response.status, response.getheader("Location")
    finally:
        conn.close()


def test_search_by_run_id_trigger_key_and_pipeline(runs, serve):
    """Search: a run id or a pipeline name that is the only match opens its page (303), a trigger key shared by
    two pipelines lists both runs, a part of several pipelines' names lists them, no match says so."""
    keyed = [DashFan.trigger(2, key="order <b>7</b>"), DashSplit.trigger(2, key="order <b>7</b>")]
    assert all(run.wait(30) == "completed" for run in keyed)
    base = serve()
    fan = runs["fan"].id
    assert location_of(base + f"/search?q={fan}") == (303, f"/runs/{fan}")
    assert location_of(base + "/search?q=%20dashfail%20") == (303, "/runs?pipeline=DashFail")
    found = get_json(base + "/api/search?q=" + urllib.parse.quote("order <b>7</b>"))
    assert sorted((r["id"], r["pipeline"], r["trigger_key"]) for r in found["keyed"]) == \
        sorted((r.id, r.pipeline, "order <b>7</b>") for r in keyed)
    assert found["run"] is None and found["pipelines"] == [] and found["go"] is None
    code, _, page = get(base + "/search?q=" + urllib.parse.quote("order <b>7</b>"))
    assert code == 200 and "<h3>Runs with that trigger key</h3>" in page
    assert "order &lt;b&gt;7&lt;/b&gt;" in page and "<b>7</b>" not in page
    assert all(f'<a href="/runs/{r.id}">' in page for r in keyed)
    found = get_json(base + "/api/search?q=Dash")
    assert found["pipelines"] == ["DashFail", "DashFan", "DashSplit"] and found["go"] is None
    code, _, page = get(base + "/search?q=Dash")
    assert code == 200 and '<a href="/runs?pipeline=DashSplit">DashSplit</a>' in page
    code, _, page = get(base + "/search?q=99999999")
    assert code == 200 and 'id="no-match"' in page
    assert 'action="/search" role="search"' in get(base + "/")[2]   # in every page's nav


def press(browser: WebDriver, *keys: str) -> None:
    """Each key pressed and released, in order (WebDriver actions: the browser's own keyboard events)."""
    actions = [a for k in keys for a in ({"type": "keyDown", "value": k}, {"type": "keyUp", "value": k})]
    browser.do("POST", "/actions", {"actions": [{"type": "key", "id": "keyboard", "actions": actions}]})


def run_script(browser: WebDriver, script: str):
    return browser.do("POST", "/execute/sync", {"script": script, "args": []})


def color_scheme(browser: WebDriver, scheme: str) -> None:
    browser.call("POST", browser.session + "/goog/cdp/execute", {"cmd": "Emulation.setEmulatedMedia", "params": {
        "features": [{"name": "prefers-color-scheme", "value": scheme}]}})


TAB, ENTER = "\ue004", "\ue007"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_browser_follows_a_run_and_sees_live_updates(runs, serve, start_runtime, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("chromium and chromedriver are not installed (.ci/install-chromium.sh installs them)")
    base = serve(refresh=0.3)
    browser = WebDriver(chromium, driver, tmp_path)
    try:
        browser.do("POST", "/url", {"url": base + "/"})
        assert "Processes" in browser.text(browser.wait_for("main")[0])
        runs_link, fan_link = 'nav a[href="/runs"]', f'a[href="/runs/{runs["fan"].id}"]'
        browser.do("POST", f"/element/{browser.wait_for(runs_link)[0]}/click", {})
        browser.wait_for(fan_link)
        # the page refreshes itself (no reload): a run triggered now appears while our marker survives
        browser.do("POST", "/execute/sync", {"script": "window.dashboardMarker = 42;", "args": []})
        newer = DashSplit.trigger(1)
        assert newer.wait(30) == "completed"
        browser.wait_for(f'a[href="/runs/{newer.id}"]')
        assert browser.do("POST", "/execute/sync", {"script": "return window.dashboardMarker;", "args": []}) == 42
        browser.do("POST", f"/element/{browser.find_all(fan_link)[0]}/click", {})
        steps = browser.wait_for("li.step")
        assert browser.do("GET", "/url") == f"{base}/runs/{runs['fan'].id}"
        names = [browser.text(browser.do("POST", f"/element/{s}/element",
                                         {"using": "css selector", "value": "b"})[ELEMENT])
                 for s in steps]
        assert names == ["dash_list", "dash_html", "dash_html", "dash_html", "dash_ident"]
        summaries = [browser.text(e) for e in browser.find_all("li.branch li.branch li.step details summary")]
        assert 'output "<script>alert(0)</script>"' in summaries  # shown as text, never run
        assert browser.do("POST", "/execute/sync", {"script": "return document.title;", "args": []}).startswith("run ")
        # the pictures, as the browser laid them out: a node per definition node (the fan-out's with its count),
        # a bar per execution, each of them drawn (a box of real size)
        nodes = browser.do("POST", "/execute/sync", {"script": SVG_NODES, "args": []})
        assert [(n["step"], n["count"], n["status"]) for n in nodes] == \
            [("dash_list", "1", "succeeded"), ("dash_html", "3", "succeeded"), ("dash_ident", "1", "succeeded")]
        assert all(n["width"] > 100 and n["height"] > 20 for n in nodes)
        bars = browser.do("POST", "/execute/sync", {"script": SVG_BARS, "args": []})
        assert len(bars) == 5 and all(b["outcome"] == "succeeded" and b["width"] >= 1 for b in bars)
        light = browser.do("POST", "/execute/sync", {"script": BACKGROUND, "args": []})
        browser.call("POST", browser.session + "/goog/cdp/execute", {"cmd": "Emulation.setEmulatedMedia", "params": {
            "features": [{"name": "prefers-color-scheme", "value": "dark"}]}})
        dark = browser.do("POST", "/execute/sync", {"script": BACKGROUND, "args": []})
        assert light == "rgb(247, 247, 249)" and dark == "rgb(21, 23, 28)", (light, dark)   # prefers-color-scheme
        shot = tmp_path / "dashboard-run-dark.png"
        shot.write_bytes(base64.b64decode(browser.do("GET", "/screenshot")))
        browser.call("POST", browser.session + "/goog/cdp/execute", {"cmd": "Emulation.setEmulatedMedia", "params": {
            "features": [{"name": "prefers-color-scheme", "value": "light"}]}})
        # times in the browser's zone (Asia/Kolkata: +05:30, no daylight saving time), UTC on hover
        browser.call("POST", browser.session + "/goog/cdp/execute", {"cmd": "Emulation.setTimezoneOverride",
                                                                      "params": {"timezoneId": "Asia/Kolkata"}})
        browser.do("POST", "/url", {"url": base + f"/runs/{runs['fan'].id}"})
        browser.wait_for("main time")
        shown = browser.do("POST", "/execute/sync", {"script": TIMES, "args": []})
        assert len(shown) >= 5
        for t in shown:
            utc = datetime.datetime.fromisoformat(t["datetime"].replace("Z", "+00:00"))
            local = (utc + datetime.timedelta(hours=5, minutes=30)).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
            assert t["text"] == f"{local} GMT+5:30", t
            assert t["title"] == utc.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC", t

        # the keyboard: Tab first reaches the skip link (its focus drawn), Enter moves to the content, "/" to the
        # search box, where a pipeline's name and Enter open its runs
        browser.do("POST", "/url", {"url": base + "/"})
        browser.wait_for("svg.chart")
        press(browser, TAB)
        assert run_script(browser, ACTIVE) == {"id": "", "cls": "skip", "tag": "A", "outline": "solid"}
        press(browser, ENTER)
        assert run_script(browser, ACTIVE)["id"] == "main"
        press(browser, "/")
        assert run_script(browser, ACTIVE)["id"] == "search"
        browser.do("POST", f"/element/{browser.find_all('#search')[0]}/value", {"text": "DashFan" + ENTER})
        browser.wait_for('form[action="/runs"]')
        assert browser.do("GET", "/url") == f"{base}/runs?pipeline=DashFan"

        # a 45-way fan-out: a summary, the first branches, a click on "halted 2" shows those two alone
        start_runtime(["DashWide"])
        wide = DashWide.trigger(list(range(45)))
        assert wide.wait(60) == "halted"
        browser.do("POST", "/url", {"url": base + f"/runs/{wide.id}"})
        summary = browser.text(browser.wait_for("li.fanout")[0])
        assert summary.startswith("fan-out of 45 branches: all completed 43 halted 2"), summary
        assert len(browser.find_all("li.branch")) == 1 + ductwork.DASHBOARD_BRANCHES
        halted_link = browser.find_all('li.fanout a[href*="fstatus=halted"]')[0]
        browser.do("POST", f"/element/{halted_link}/click", {})
        deadline = time.monotonic() + 15
        while "fstatus=halted" not in browser.do("GET", "/url"):
            assert time.monotonic() < deadline, browser.do("GET", "/url")
            time.sleep(0.1)
        browser.wait_for("li.fanout")
        assert len(browser.find_all("li.branch")) == 3

        # every page, light and dark: a screenshot each, its text readable (WCAG AA: 4.5:1), its pictures drawn
        pages = ["/", "/?window=24h", "/runs", "/errors", "/search?q=Dash", "/runs/confirm-cancel?pipeline=DashFan",
                 f"/runs/{runs['fail'].id}", f"/runs/{runs['fan'].id}", f"/runs/{wide.id}"]
        for scheme in ("light", "dark"):
            color_scheme(browser, scheme)
            for path in pages:
                browser.do("POST", "/url", {"url": base + path})
                browser.wait_for("main")
                name = re.sub(r"[^\w]+", "-", path).strip("-") or "overview"
                shot = tmp_path / f"dashboard-{name}-{scheme}.png"
                shot.write_bytes(base64.b64decode(browser.do("GET", "/screenshot")))
                assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000
                contrast = run_script(browser, CONTRAST)
                assert contrast["checked"] > 5 and contrast["bad"] == [], (path, scheme, contrast["bad"][:5])
                if path in ("/", "/?window=24h"):   # five charts of the window's points, each drawn
                    charts = run_script(browser, CHARTS)
                    points = 30 if path == "/" else 48
                    assert [c["chart"] for c in charts] == ["throughput", "step-duration", "run-duration",
                                                            "queue-depth", "queue-age"]
                    assert charts[0]["series"] == ["runs completed", "steps finished"]
                    assert charts[0]["dots"] == 2 * points and charts[1]["series"] == ["p50", "p95"]
                    assert all(c["width"] > 300 for c in charts)
                if path == f"/runs/{runs['fail'].id}":   # four failed attempts: four red bars, the node failed
                    bars = run_script(browser, SVG_BARS)
                    assert [b["outcome"] for b in bars] == ["failed"] * 4
                    assert [n["status"] for n in run_script(browser, SVG_NODES)] == ["failed"]
                if path == f"/runs/{wide.id}":   # every step counted on the graph, the shown ones' bars drawn
                    nodes = {n["step"]: (n["count"], n["status"]) for n in run_script(browser, SVG_NODES)}
                    assert nodes["dash_wide_one"] == ("45", "failed")
                    bars = run_script(browser, SVG_BARS)
                    assert len(bars) == 1 + (ductwork.DASHBOARD_BRANCHES - 1) + 4   # item 3: four attempts
    finally:
        browser.close()


# -- load, abuse and odd text (review findings 13-15) -------------------------------------------------
HALF_OPEN = 200  # half-open connections a test opens: bounded, all to 127.0.0.1


def open_half(port: int, count: int = HALF_OPEN) -> list[socket.socket]:
    """``count`` connections that each send the start of a request and then nothing (slowloris)."""
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        socks.append(s)
    return socks


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


def most_threads(count, seconds: float) -> int:
    """The largest of ``count()`` sampled for ``seconds``."""
    deadline, most = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        most = max(most, count())
        time.sleep(0.05)
    return most


def test_half_open_connections_use_no_threads(engine, serve):
    base = serve()
    before = threading.active_count()
    socks = open_half(int(base.rsplit(":", 1)[1]))
    try:
        # a fixed pool of handler threads, however many connections are open
        assert most_threads(threading.active_count, 1.0) <= before + dash.DASHBOARD_THREADS + 1
        started = time.monotonic()
        code, _, body = get(base + "/api/overview")
        assert code == 200 and "throughput" in json.loads(body) and time.monotonic() - started < 5
    finally:
        close_all(socks)
    # half-open requests that end never render anything: no thread appears for them
    assert most_threads(threading.active_count, 0.5) <= before + dash.DASHBOARD_THREADS + 1
    assert get(base + "/api/overview")[0] == 200


def test_request_read_deadline_closes_slow_clients(engine, serve):
    timeout, limit = 0.5, 10
    base = serve(request_timeout=timeout, max_connections=limit)
    started = time.monotonic()
    socks = open_half(int(base.rsplit(":", 1)[1]), 2 * limit)  # the second ten wait in the listen backlog
    try:
        for s in socks:  # the deadline counts from the connection: trickling bytes would not help
            s.settimeout(2 * timeout + 3)
            assert s.recv(100).startswith(b"HTTP/1.0 408")
        assert time.monotonic() - started >= 2 * timeout  # two rounds of ten: never more than ten at once
        assert get(base + "/api/overview")[0] == 200
    finally:
        close_all(socks)


def test_overview_shares_one_computation(engine, serve):
    base = serve()
    bodies = []
    threads = [threading.Thread(target=lambda: bodies.append(get(base + "/api/overview")[2])) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(bodies) == 8 and len(set(bodies)) == 1
    time.sleep(dash.DASHBOARD_CACHE_SECONDS)  # the next request computes afresh
    started = time.monotonic()
    first = get_json(base + "/api/overview")
    DashIdle.trigger(1)
    second = get_json(base + "/api/overview")
    if time.monotonic() - started < dash.DASHBOARD_CACHE_SECONDS:  # one computation within the second
        assert second == first and "DashIdle" not in second["runs"]
    time.sleep(dash.DASHBOARD_CACHE_SECONDS)
    assert get_json(base + "/api/overview")["runs"]["DashIdle"] == {"in_progress": 1}


def test_command_stops_promptly_with_half_open_connections(engine, db_url):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("DUCTWORK_DASHBOARD_AUTH", None)
    proc = subprocess.Popen([*DASHBOARD_CMD, "--port", "0", "--database-url", db_url], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    socks = []
    try:
        port = dashboard_port(proc)
        socks = open_half(port)

        def threads() -> int:
            with open(f"/proc/{proc.pid}/status") as status:
                return int(re.search(r"^Threads:\s+(\d+)", status.read(), re.M).group(1))

        most = most_threads(threads, 1.0)
        assert get(f"http://127.0.0.1:{port}/api/overview")[0] == 200
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # the main thread's tick (1 s), the accept loop's poll (0.2 s), the pool's grace, interpreter exit
        assert proc.wait(1.0 + 0.2 + dash.DASHBOARD_STOP_GRACE + 2) == 0
        assert time.monotonic() - started < 1.0 + 0.2 + dash.DASHBOARD_STOP_GRACE + 2
        assert most <= dash.DASHBOARD_THREADS + 4  # main, the accept loop, the pool, a spare
    finally:
        close_all(socks)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class LogLines(logging.Handler):
    """A real logging handler that keeps ductwork's formatted lines."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(f"{record.levelname} {record.getMessage()}")


def basic(user_password: str, scheme: str = "Basic") -> dict:
    return {"Authorization": f"{scheme} " + base64.b64encode(user_password.encode()).decode()}


def test_auth_scheme_is_case_insensitive(engine, serve):
    base = serve(auth="admin:s3cret")
    for scheme in ("basic", "BASIC", "Basic"):  # RFC 7617
        assert get(base + "/api/overview", headers=basic("admin:s3cret", scheme))[0] == 200
    assert get(base + "/api/overview", headers=basic("admin:s3cre"))[0] == 401
    assert get(base + "/api/overview", headers=basic("admin"))[0] == 401
    assert get(base + "/api/overview", headers={"Authorization": "Basic %%%"})[0] == 401
    assert get(base + "/api/overview", headers={"Authorization": "Bearer " + basic("admin:s3cret")[
        "Authorization"].split()[1]})[0] == 401


def test_failed_logins_back_off_and_are_logged(engine, serve):
    base = serve(auth="admin:s3cret")
    lines = LogLines()
    dash.log.addHandler(lines)
    try:
        assert get(base + "/api/overview")[0] == 401  # no credentials sent: not a failed login
        for _ in range(dash.DASHBOARD_AUTH_FAILURES):
            assert get(base + "/api/overview", headers=basic("admin:guess-xyz"))[0] == 401
        code, headers, _ = get(base + "/api/overview", headers=basic("admin:s3cret"))  # even the right password
        assert code == 429 and headers["Retry-After"] == "1"
        time.sleep(float(headers["Retry-After"]) + 0.1)
        assert get(base + "/api/overview", headers=basic("admin:s3cret"))[0] == 200
        for _ in range(dash.DASHBOARD_AUTH_FAILURES):
            assert get(base + "/api/overview", headers=basic("admin:guess-xyz"))[0] == 401
        code, headers, _ = get(base + "/api/overview", headers=basic("admin:guess-xyz"))
        assert code == 429 and headers["Retry-After"] == "2"  # the delay grows with each block
        assert get(base + "/api/overview")[0] == 429
    finally:
        dash.log.removeHandler(lines)
    warnings = [line for line in lines.lines if line.startswith("WARNING")]
    assert len(warnings) == 1 and "127.0.0.1" in warnings[0], lines.lines  # one line per client per window
    assert not any("guess-xyz" in line or "s3cre" in line for line in lines.lines)


def dash_surrogate(x):
    ductwork.current_step().context.set("odd", "\udfff")
    return "\ud800" + x


class DashOdd(ductwork.Pipeline):  # a lone surrogate: JSON allows it, UTF-8 cannot encode it
    @staticmethod
    def define(p):
        p.start(dash_surrogate)


def test_lone_surrogates_render(start_runtime, serve):
    start_runtime(["DashOdd"])
    run = DashOdd.trigger("<x>")
    assert run.wait(30) == "completed"
    base = serve()
    detail = get_json(base + f"/api/runs/{run.id}")
    assert detail["run"]["output"] == "\ud800<x>" and detail["run"]["context"] == {"odd": "\udfff"}
    code, _, page = get(base + f"/runs/{run.id}")
    assert code == 200 and "\\ud800&lt;x&gt;" in page and "\\udfff" in page
    code, _, fragment = get(base + f"/runs/{run.id}", headers={"X-Ductwork-Fragment": "1"})
    assert code == 200 and "\\ud800" in fragment
    for path in ("/", "/runs", "/errors", "/metrics"):
        assert get(base + path)[0] == 200, path

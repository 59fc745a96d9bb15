"""The dashboard's actions (SPEC §14) on real SQLite and PostgreSQL: cancel and revive a run, bulk cancel a
pipeline's runs after a confirmation, and what refuses a POST (the CSRF token, the Origin check, GET, bad
bodies, --read-only, an unauthenticated public bind); then a real headless Chromium clicking Cancel on a run
that a real runtime is executing, and a page of another origin whose form POST the dashboard refuses."""
from __future__ import annotations

import dataclasses
import html
import http.client
import http.server
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest
from conftest import ROOT, run_cli
from procs import dashboard_port, wait_until
from test_dashboard import LogLines, WebDriver, basic, get

import ductwork

dash = ductwork  # the dashboard is a section of ductwork.py
DEADLINE = 30


# -- pipelines ----------------------------------------------------------------------------------------
def act_slow(x):
    """Runs up to 30 s in slices of 10 ms, unless told to stop."""
    step = ductwork.current_step()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if step.should_stop:
            return "stopped"
        time.sleep(0.01)
    return x


def act_ident(x):
    return x


def act_boom(x):
    raise ductwork.NonRetryable(f"no {x}")


class ActSlow(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(act_slow)


class ActIdle(ductwork.Pipeline):  # no runtime serves it: its runs stay in progress, their steps queued
    @staticmethod
    def define(p):
        p.start(act_ident)


class ActOther(ductwork.Pipeline):  # another pipeline nobody serves
    @staticmethod
    def define(p):
        p.start(act_ident)


class ActFail(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(act_boom)


# -- the dashboard, a client of it, the rows ---------------------------------------------------------------
@dataclasses.dataclass
class Dashboard:
    base: str
    server: object

    @property
    def port(self) -> int:
        return int(self.base.rsplit(":", 1)[1])


@pytest.fixture
def serve(engine):
    """Start make_dashboard_server() in a thread (host 127.0.0.1 unless given); reached at 127.0.0.1."""
    servers = []

    def start(host: str = "127.0.0.1", **kwargs) -> Dashboard:
        server = dash.make_dashboard_server(engine.config, host, 0, **kwargs)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return Dashboard(f"http://127.0.0.1:{server.server_address[1]}", server)

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def lines():
    """ductwork's log lines (info and up) while the test runs."""
    handler, level = LogLines(), dash.log.level
    dash.log.addHandler(handler)
    dash.log.setLevel(logging.INFO)
    yield handler
    dash.log.removeHandler(handler)
    dash.log.setLevel(level)


def action_lines(lines: LogLines) -> list[str]:
    return [line for line in lines.lines if line.startswith("INFO dashboard: ")]


def run_row(engine, run_id: int) -> tuple[str, str | None]:
    with engine.store.tx(write=False) as t:
        return tuple(t.one("SELECT status, cancel_reason FROM ductwork_runs WHERE id = :id", {"id": run_id}))


def statuses(engine, run_ids) -> dict[int, str]:
    return {run_id: run_row(engine, run_id)[0] for run_id in run_ids}


def post(base: str, path: str, fields: dict | None = None, headers: dict | None = None,
         body: bytes | None = None) -> tuple[int, dict, str]:
    """One POST with http.client (no redirect followed): status, headers, body text."""
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        data = urllib.parse.urlencode(fields or {}).encode() if body is None else body
        conn.request("POST", path, body=data,
                     headers={"Content-Type": "application/x-www-form-urlencoded", **(headers or {})})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        conn.close()


def raw(port: int, data: bytes, then: bytes = b"", pause: float = 0.0, timeout: float = 15) -> bytes:
    """Send ``data`` on a fresh connection (then, after ``pause``, ``then``) and read the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if then:
            time.sleep(pause)   # the rest of the body comes later: what is tested, not a wait for an outcome
            s.sendall(then)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


class Client:
    """What a browser is to one dashboard: a session cookie (the one the dashboard set), its credentials, and
    its pages' own origin on every POST unless told otherwise."""

    def __init__(self, base: str, auth: str | None = None):
        self.base, self.auth, self.cookie = base, auth, ""

    def headers(self, **more: str) -> dict:
        out = dict(basic(self.auth)) if self.auth else {}
        if self.cookie:
            out["Cookie"] = self.cookie
        return {**out, **more}

    def get(self, path: str, **headers: str) -> tuple[int, dict, str]:
        code, got, body = get(self.base + path, headers=self.headers(**headers))
        if "Set-Cookie" in got:
            self.cookie = got["Set-Cookie"].split(";")[0]
        return code, got, body

    def token(self, path: str) -> str:
        """The CSRF token of the forms on the page at ``path``."""
        code, _, page = self.get(path)
        assert code == 200, page
        found = set(re.findall(r'<input type="hidden" name="csrf" value="([0-9a-f]{64})">', page))
        assert len(found) == 1, f"no form on {path}: {page[-2000:]}"
        return found.pop()

    def post(self, path: str, fields: dict, origin: str | None = "own", **headers: str) -> tuple[int, dict, str]:
        if origin == "own":
            origin = self.base
        extra = {"Origin": origin} if origin is not None else {}
        return post(self.base, path, fields, self.headers(**extra, **headers))


def forms(page: str) -> list[str]:
    """The actions of the POST forms on a page."""
    return re.findall(r'<form method="post" action="([^"]+)">', page)


# -- who may act ------------------------------------------------------------------------------------------
def test_actions_are_offered_on_loopback_or_with_auth_only():
    offered = dash.dashboard_actions_offered
    assert offered(loopback=True, authenticated=False, read_only=False)
    assert offered(loopback=True, authenticated=True, read_only=False)
    assert offered(loopback=False, authenticated=True, read_only=False)
    assert not offered(loopback=False, authenticated=False, read_only=False)   # --insecure: read-only
    for loopback, authenticated in ((True, False), (True, True), (False, True), (False, False)):
        assert not offered(loopback=loopback, authenticated=authenticated, read_only=True)


def test_same_origin_as_the_host_header_names_it():
    same = dash._same_origin
    assert same("http://127.0.0.1:8080", "127.0.0.1:8080")
    assert same("http://localhost:8080", "LOCALHOST:8080")
    assert same("http://[::1]:8080", "[::1]:8080")
    assert same("http://dash.example", "dash.example") and same("http://dash.example:80", "dash.example")
    assert same("https://dash.example", "dash.example")   # a TLS-terminating proxy that keeps the Host header
    assert same("http://127.0.0.1:8080/runs/5?x=1", "127.0.0.1:8080")   # a Referer
    assert same("https://127.0.0.1:8080", "127.0.0.1:8080")   # only this server (plain HTTP) is at that port
    assert not same("https://dash.example", "dash.example:80") and not same("http://dash.example", "dash.example:443")
    for foreign in ("http://127.0.0.1:8081", "http://localhost:8080", "http://127.0.0.1", "null", "",
                    "ftp://127.0.0.1:8080", "http://127.0.0.1:x", "http://[::1", "//127.0.0.1:8080",
                    "http://evil.example@127.0.0.2:8080"):
        assert not same(foreign, "127.0.0.1:8080"), foreign
    assert not same("http://127.0.0.1:8080", "") and not same("http://127.0.0.1:8080", "127.0.0.1:8080:9")


# -- cancel, revive, refusals -------------------------------------------------------------------------------
def test_cancel_from_a_run_page_and_every_refusal_changes_nothing(engine, serve, lines):
    run, other = ActIdle.trigger(1), ActIdle.trigger(2)
    d = serve()
    me, someone = Client(d.base), Client(d.base)
    token, theirs = me.token(f"/runs/{run.id}"), someone.token(f"/runs/{run.id}")
    assert me.cookie.startswith("ductwork_session=") and token != theirs
    code, headers, page = get(d.base + f"/runs/{run.id}")
    assert headers["Set-Cookie"].endswith("; Path=/; HttpOnly; SameSite=Strict") and "Secure" not in headers[
        "Set-Cookie"]
    assert forms(page) == [f"/runs/{run.id}/cancel"]   # in progress: cancel, not revive
    assert get(d.base + f"/runs/{run.id}", headers={"Cookie": me.cookie})[1].get("Set-Cookie") is None
    twin = get(d.base + f"/api/runs/{run.id}")
    assert twin[0] == 200 and '"actions": {"cancel": true, "revive": false}' in twin[2]
    assert "Set-Cookie" not in twin[1]   # a JSON twin renders no form

    path = f"/runs/{run.id}/cancel"
    refusals = {
        "no token": me.post(path, {}),
        "an empty token": me.post(path, {"csrf": ""}),
        "another session's token": me.post(path, {"csrf": theirs}),
        "a token without its cookie": post(d.base, path, {"csrf": token}, {"Origin": d.base}),
        "a token altered": me.post(path, {"csrf": token[:-1] + ("0" if token[-1] != "0" else "1")}),
        "a token that is not ASCII": me.post(path, {"csrf": "é" * 64}),
        "a foreign Origin": me.post(path, {"csrf": token}, origin="http://evil.example"),
        "another port's Origin": me.post(path, {"csrf": token}, origin=f"http://127.0.0.1:{d.port + 1}"),
        "an opaque Origin": me.post(path, {"csrf": token}, origin="null"),
        "neither Origin nor Referer": me.post(path, {"csrf": token}, origin=None),
        "a foreign Referer": me.post(path, {"csrf": token}, origin=None, Referer="http://evil.example/x"),
        "a Host other than the Origin": me.post(path, {"csrf": token}, origin=f"http://localhost:{d.port}"),
    }
    for what, (code, _, body) in refusals.items():
        assert code == 403 and body.startswith("refused: ") and "\n" not in body, (what, code, body)
    assert "not this dashboard's origin" in refusals["a foreign Origin"][2]
    assert "not this session's" in refusals["another session's token"][2]
    assert "no session cookie" in refusals["a token without its cookie"][2]
    # a token of another dashboard (or of this one before a restart): its secret is another
    d2 = serve()
    assert post(d2.base, path, {"csrf": token}, {"Origin": d2.base, "Cookie": me.cookie})[0] == 403
    assert statuses(engine, [run.id, other.id]) == {run.id: "in_progress", other.id: "in_progress"}
    warnings = [line for line in lines.lines if line.startswith("WARNING")]
    assert len(warnings) == 2, lines.lines   # one a minute per address and server, however many
    assert f"refused a POST to /runs/{run.id}/cancel from 127.0.0.1" in warnings[0]
    assert not action_lines(lines) and token not in "".join(lines.lines)

    code, headers, body = me.post(path, {"csrf": token})
    assert (code, headers["Location"]) == (303, f"/runs/{run.id}?done=cancelled"), body
    assert run_row(engine, run.id) == ("cancelled", "cancelled from the dashboard by loopback")
    assert run_row(engine, other.id)[0] == "in_progress"
    assert action_lines(lines) == [f"INFO dashboard: loopback from 127.0.0.1: cancel run {run.id}: cancelled"]
    code, _, page = me.get(headers["Location"])
    assert code == 200 and '<p class="notice" id="notice">Run cancelled' in page
    assert "cancel reason: cancelled from the dashboard by loopback" in page
    assert forms(page) == [f"/runs/{run.id}/revive"]   # cancelled: revive, not cancel
    code, headers, _ = me.post(path, {"csrf": token})   # again: nothing to do
    assert (code, headers["Location"]) == (303, f"/runs/{run.id}?done=not-cancelled")
    assert action_lines(lines)[-1].endswith(f"cancel run {run.id}: nothing changed (it was not in progress)")
    assert "Nothing changed" in me.get(headers["Location"])[2]
    assert me.post("/runs/999999999/cancel", {"csrf": token})[0] == 404


def test_get_on_an_action_is_405_and_a_post_elsewhere_too(engine, serve):
    run = ActIdle.trigger(1)
    d = serve()
    me = Client(d.base)
    token = me.token(f"/runs/{run.id}")
    for path in (f"/runs/{run.id}/cancel", f"/runs/{run.id}/revive", "/runs/cancel", f"/api/runs/{run.id}/cancel"):
        code, headers, _ = me.get(path + f"?csrf={token}")
        assert (code, headers.get("Allow")) == (405, "POST"), path
    for path in ("/runs", f"/runs/{run.id}", "/", "/api/runs", "/metrics", "/nope"):
        code, headers, _ = me.post(path, {"csrf": token})
        assert (code, headers.get("Allow")) == (405, "GET"), path
    assert run_row(engine, run.id)[0] == "in_progress"


def test_bad_bodies_get_one_line_and_change_nothing(engine, serve):
    run = ActIdle.trigger(1)
    d = serve(request_timeout=2.0)
    me = Client(d.base)
    token = me.token(f"/runs/{run.id}")
    path = f"/runs/{run.id}/cancel"
    form = urllib.parse.urlencode({"csrf": token}).encode()

    def request(*extra: str, body: bytes = form) -> bytes:
        """A POST with this session's cookie and origin and the ``extra`` header lines (no Content-Length but
        theirs)."""
        head = [f"Host: 127.0.0.1:{d.port}", f"Origin: {d.base}", f"Cookie: {me.cookie}",
                "Content-Type: application/x-www-form-urlencoded", *extra]
        return f"POST {path} HTTP/1.1\r\n".encode() + "".join(line + "\r\n" for line in head).encode() + b"\r\n" + body

    def status(answer: bytes) -> int:
        return int(answer.split(b" ", 2)[1])

    cases = {
        "text/plain": (post(d.base, path, body=form, headers={**me.headers(Origin=d.base),
                                                              "Content-Type": "text/plain"}), 415),
        "too large": (post(d.base, path, body=b"a=" + b"x" * dash.DASHBOARD_MAX_BODY,
                           headers=me.headers(Origin=d.base)), 413),
        "a field without =": (post(d.base, path, body=b"csrf", headers=me.headers(Origin=d.base)), 400),
        "a repeated field": (post(d.base, path, body=form + b"&" + form, headers=me.headers(Origin=d.base)), 400),
        "not UTF-8": (post(d.base, path, body=b"csrf=%ff", headers=me.headers(Origin=d.base)), 400),
        "too many fields": (post(d.base, path, body=b"&".join(b"f%d=1" % i for i in range(40)),
                                 headers=me.headers(Origin=d.base)), 400),
    }
    for what, ((code, _, body), expected) in cases.items():
        assert code == expected and body and "\n" not in body and "Traceback" not in body, (what, code, body)
    length = f"Content-Length: {len(form)}"
    assert status(raw(d.port, request())) == 411   # no Content-Length
    assert status(raw(d.port, request("Transfer-Encoding: chunked", length))) == 411
    assert status(raw(d.port, request("Content-Length: 12abc"))) == 400
    assert status(raw(d.port, request("Content-Length: ٤٢"))) == 400   # digits, but not ASCII ones
    assert status(raw(d.port, request(length, f"Content-Length: {len(form) + 1}"))) == 400   # which one?
    # a body that does not arrive within the request timeout: 408; one whose client goes away: no answer
    started = time.monotonic()
    late = raw(d.port, request(f"Content-Length: {len(form) + 10}"))
    assert status(late) == 408 and time.monotonic() - started >= 2.0
    with socket.create_connection(("127.0.0.1", d.port), timeout=15) as s:
        s.sendall(request(f"Content-Length: {len(form) + 10}"))
        s.shutdown(socket.SHUT_WR)
        assert s.recv(100) == b""
    assert run_row(engine, run.id)[0] == "in_progress"
    # the rest of a body that comes after its header (and within the timeout) is read off the socket
    head, _, body = request(length).partition(b"\r\n\r\n")
    answer = raw(d.port, head + b"\r\n\r\n" + body[:10], then=body[10:], pause=0.3)
    assert status(answer) == 303 and f"Location: /runs/{run.id}?done=cancelled".encode() in answer
    assert run_row(engine, run.id)[0] == "cancelled"
    assert get(d.base + "/api/overview")[0] == 200


def test_revive_from_the_dashboard(engine, serve, start_runtime, lines):
    cancelled = ActIdle.trigger(1)
    handle = start_runtime(["ActFail"])
    halted = ActFail.trigger("luck")
    assert halted.wait(DEADLINE) == "halted"
    handle.stop()   # nothing runs the revived step again: the run stays in progress
    d = serve()
    me = Client(d.base)
    token = me.token(f"/runs/{cancelled.id}")
    assert me.post(f"/runs/{cancelled.id}/cancel", {"csrf": token})[0] == 303
    for run in (cancelled, halted):
        code, _, page = me.get(f"/runs/{run.id}")
        assert forms(page) == [f"/runs/{run.id}/revive"]
        code, headers, _ = me.post(f"/runs/{run.id}/revive", {"csrf": token})
        assert (code, headers["Location"]) == (303, f"/runs/{run.id}?done=revived")
        assert run_row(engine, run.id) == ("in_progress", None)
        assert forms(me.get(headers["Location"])[2]) == [f"/runs/{run.id}/cancel"]
        code, headers, _ = me.post(f"/runs/{run.id}/revive", {"csrf": token})   # in progress: not revived
        assert headers["Location"] == f"/runs/{run.id}?done=not-revived"
    assert [line.split(": ", 2)[2] for line in action_lines(lines)] == [
        f"cancel run {cancelled.id}: cancelled", f"revive run {cancelled.id}: revived",
        f"revive run {cancelled.id}: nothing changed (it is neither halted nor cancelled)",
        f"revive run {halted.id}: revived",
        f"revive run {halted.id}: nothing changed (it is neither halted nor cancelled)"]
    assert all(line.startswith("INFO dashboard: loopback from 127.0.0.1: ") for line in action_lines(lines))
    steps = {s.status for s in ductwork.Run.get(halted.id).steps}
    assert steps == {"queued"}   # its failed step waits to run again


def test_bulk_cancel_confirms_the_count_then_cancels_those_runs(engine, serve, lines):
    idle = [ActIdle.trigger(i) for i in range(3)]
    others = [ActOther.trigger(i) for i in range(2)]
    gone = ActIdle.trigger(9)
    engine.cancel([gone.id])
    d = serve()
    me = Client(d.base)
    code, _, page = me.get("/runs?pipeline=ActIdle")
    assert code == 200 and 'href="/runs/confirm-cancel?pipeline=ActIdle"' in page
    for path in ("/runs", "/runs?pipeline=ActIdle&status=completed", "/errors", "/"):
        assert "confirm-cancel" not in me.get(path)[2], path
    assert '"actions": {"bulk_cancel": true}' in get(d.base + "/api/runs?pipeline=ActIdle")[2]
    assert '"actions": {"bulk_cancel": false}' in get(d.base + "/api/runs")[2]

    code, _, page = me.get("/runs/confirm-cancel?pipeline=ActIdle")
    assert code == 200 and '<b id="bulk-count">3 runs</b> of <b>ActIdle</b> are in progress' in page
    assert forms(page) == ["/runs/cancel"] and '<input type="hidden" name="expected" value="3">' in page
    assert '<input type="hidden" name="pipeline" value="ActIdle">' in page and "Cancel 3 runs" in page
    twin = get(d.base + "/api/runs/confirm-cancel?pipeline=ActIdle")[2]
    assert '"in_progress": 3' in twin and '"bulk_cancel": true' in twin
    assert statuses(engine, [r.id for r in idle]) == {r.id: "in_progress" for r in idle}   # a GET changes nothing
    token = me.token("/runs/confirm-cancel?pipeline=ActIdle")
    assert me.get("/runs/confirm-cancel")[0] == 400
    assert me.post("/runs/cancel", {"csrf": token, "expected": "3"})[0] == 400   # which pipeline?
    assert me.post("/runs/cancel", {"csrf": token, "pipeline": "ActIdle"})[0] == 400   # not confirmed
    assert me.post("/runs/cancel", {"pipeline": "ActIdle", "expected": "3"})[0] == 403
    assert statuses(engine, [r.id for r in idle]) == {r.id: "in_progress" for r in idle}

    code, headers, _ = me.post("/runs/cancel", {"csrf": token, "pipeline": "ActIdle", "expected": "3"})
    assert (code, headers["Location"]) == (303, "/runs?pipeline=ActIdle&done=bulk-cancelled&count=3")
    assert statuses(engine, [r.id for r in idle]) == {r.id: "cancelled" for r in idle}
    assert statuses(engine, [r.id for r in others]) == {r.id: "in_progress" for r in others}
    assert run_row(engine, gone.id) == ("cancelled", None)   # cancelled before: untouched
    assert action_lines(lines) == [
        "INFO dashboard: loopback from 127.0.0.1 cancelled 3 run(s) of pipeline ActIdle (the confirmation showed 3)"]
    assert "Cancelled 3 run(s) of ActIdle." in me.get(headers["Location"])[2]
    code, _, page = me.get("/runs/confirm-cancel?pipeline=ActIdle")
    assert "nothing to cancel" in page and not forms(page)
    code, _, page = me.get("/runs/confirm-cancel?pipeline=%3Cscript%3Ex")
    assert code == 200 and "<script>x" not in page and "&lt;script&gt;x" in page and not forms(page)
    for count in ("%C2%B2", "-1", "9" * 40):   # a notice's query is anybody's: never more than a number shown
        code, _, page = me.get(f"/runs?pipeline=%3Cb%3E&done=bulk-cancelled&count={count}")
        assert code == 200 and "Cancelled 0 run(s) of &lt;b&gt;." in page, count


def test_with_auth_on_a_public_bind_the_user_acts(engine, serve, lines):
    run = ActIdle.trigger(1)
    try:
        d = serve(host="0.0.0.0", auth="admin:s3cret-pass")
    except ductwork.ConfigError as exc:   # no public address in this sandbox: the decision alone
        assert dash.dashboard_actions_offered(loopback=False, authenticated=True, read_only=False)
        pytest.skip(f"cannot bind 0.0.0.0 here: {exc}")
    assert d.server.actions
    anonymous, me = Client(d.base), Client(d.base, auth="admin:s3cret-pass")
    assert anonymous.get(f"/runs/{run.id}")[0] == 401 and not anonymous.cookie
    token = me.token(f"/runs/{run.id}")
    assert anonymous.post(f"/runs/{run.id}/cancel", {"csrf": token}, Cookie=me.cookie)[0] == 401
    wrong = Client(d.base, auth="admin:guess")
    wrong.cookie = me.cookie
    assert wrong.post(f"/runs/{run.id}/cancel", {"csrf": token})[0] == 401
    assert run_row(engine, run.id)[0] == "in_progress"
    code, headers, _ = me.post(f"/runs/{run.id}/cancel", {"csrf": token})
    assert (code, headers["Location"]) == (303, f"/runs/{run.id}?done=cancelled")
    assert run_row(engine, run.id) == ("cancelled", "cancelled from the dashboard by admin")
    assert action_lines(lines) == [f"INFO dashboard: admin from 127.0.0.1: cancel run {run.id}: cancelled"]
    assert "s3cret" not in "".join(lines.lines)


@pytest.mark.parametrize("how", ["insecure public bind", "--read-only"])
def test_read_only_dashboards_render_no_form_and_refuse_every_post(engine, serve, how):
    run = ActIdle.trigger(1)
    try:
        d = serve(host="0.0.0.0", insecure=True) if how == "insecure public bind" else serve(read_only=True)
    except ductwork.ConfigError as exc:
        assert not dash.dashboard_actions_offered(loopback=False, authenticated=False, read_only=False)
        pytest.skip(f"cannot bind 0.0.0.0 here: {exc}")
    assert not d.server.actions
    me = Client(d.base)
    for path in (f"/runs/{run.id}", "/runs?pipeline=ActIdle", "/"):
        code, headers, page = me.get(path)
        assert code == 200 and not forms(page) and "csrf" not in page and "confirm-cancel" not in page, path
        assert "Set-Cookie" not in headers
    assert '"actions": {"cancel": false, "revive": false}' in get(d.base + f"/api/runs/{run.id}")[2]
    code, _, body = me.get("/runs/confirm-cancel?pipeline=ActIdle")
    assert code == 403 and "read-only" in body
    session = "ductwork_session=" + "a" * 43
    for path, fields in ((f"/runs/{run.id}/cancel", {"csrf": "0" * 64}),
                         ("/runs/cancel", {"csrf": "0" * 64, "pipeline": "ActIdle", "expected": "1"})):
        code, _, body = me.post(path, fields, Cookie=session)
        assert code == 403 and body.startswith("this dashboard is read-only"), body
    assert ("--read-only" in body) == (how == "--read-only")
    assert me.get(f"/runs/{run.id}/cancel")[0] == 405
    assert run_row(engine, run.id)[0] == "in_progress"


def test_the_command_takes_read_only(engine, db_url):
    assert "--read-only" in run_cli("dashboard", "--help").stdout
    run = ActIdle.trigger(1)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("DUCTWORK_DASHBOARD_AUTH", None)
    for flags, offered in ((["--read-only"], False), ([], True)):
        proc = subprocess.Popen([sys.executable, str(ROOT / "ductwork.py"), "dashboard", "--port", "0",
                                 "--database-url", db_url, *flags],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        try:
            base = f"http://127.0.0.1:{dashboard_port(proc)}"
            page = get(base + f"/runs/{run.id}")[2]
            assert bool(forms(page)) == offered, flags
            if not offered:
                code, _, body = post(base, f"/runs/{run.id}/cancel", {"csrf": "0" * 64}, {"Origin": base})
                assert code == 403 and "--read-only" in body
            proc.terminate()
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert run_row(engine, run.id)[0] == "in_progress"


def test_a_page_refreshed_in_place_keeps_its_forms(engine, serve):
    run = ActIdle.trigger(1)
    d = serve()
    me = Client(d.base)
    token = me.token(f"/runs/{run.id}")
    code, _, fragment = me.get(f"/runs/{run.id}", **{"X-Ductwork-Fragment": "1"})
    assert code == 200 and fragment.startswith("<h2>Run") and token in fragment
    engine.cancel([run.id])   # cancelled elsewhere (the CLI): the next refresh offers revive
    _, _, fragment = me.get(f"/runs/{run.id}", **{"X-Ductwork-Fragment": "1"})
    assert forms(fragment) == [f"/runs/{run.id}/revive"] and token in fragment


# -- a real browser ---------------------------------------------------------------------------------------
def _page_of_another_origin(html_text: str):
    """An HTTP server on another port of 127.0.0.1 (another origin) serving one page; (its base URL, server)."""
    body = html_text.encode()

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


def _wait_text(browser: WebDriver, css: str, needle: str, timeout: float = 15) -> str:
    """The text of the first element matching ``css`` once it contains ``needle``."""
    deadline = time.monotonic() + timeout
    while True:
        found = browser.find_all(css)
        text = browser.text(found[0]) if found else ""
        if needle in text:
            return text
        assert time.monotonic() < deadline, f"{needle!r} not in {css} of {browser.do('GET', '/url')}: {text[:500]!r}"
        time.sleep(0.1)


def _click(browser: WebDriver, css: str) -> None:
    browser.do("POST", f"/element/{browser.wait_for(css)[0]}/click", {})


def _step_running(engine, run_id: int) -> bool:
    return [s.status for s in ductwork.Run.get(run_id).steps] == ["running"]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_browser_cancels_a_running_run_and_a_cross_origin_post_is_refused(engine, start_runtime, serve, lines,
                                                                        tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("chromium and chromedriver are not installed (.ci/install-chromium.sh installs them)")
    start_runtime(["ActSlow"])
    target, bystander = ActSlow.trigger(1), ActSlow.trigger(2)
    for run in (target, bystander):   # two workers: both steps run, each checking should_stop every 10 ms
        wait_until(lambda r=run: _step_running(engine, r.id), DEADLINE, what=f"run {run.id}'s step running")
    d = serve(refresh=0.5)
    browser = WebDriver(chromium, driver, tmp_path)
    attacker = None
    try:
        browser.do("POST", "/url", {"url": f"{d.base}/runs/{target.id}"})
        _wait_text(browser, "main table", "in_progress")
        assert not browser.find_all(f'form[action="/runs/{target.id}/revive"]')
        _click(browser, f'form[action="/runs/{target.id}/cancel"] button')
        notice = _wait_text(browser, "#notice", "Run cancelled")
        assert browser.do("GET", "/url") == f"{d.base}/runs/{target.id}?done=cancelled", notice
        assert "cancelled" in _wait_text(browser, "main table", "cancelled")
        assert "by loopback" in browser.text(browser.wait_for("#cancel-reason")[0])
        browser.wait_for(f'form[action="/runs/{target.id}/revive"]')
        assert run_row(engine, target.id) == ("cancelled", "cancelled from the dashboard by loopback")
        assert action_lines(lines) == [f"INFO dashboard: loopback from 127.0.0.1: cancel run {target.id}: cancelled"]
        wait_until(lambda: [s.status for s in ductwork.Run.get(target.id).steps] == ["cancelled"], DEADLINE,
                   what="the cancelled run's step stopped")
        assert run_row(engine, bystander.id)[0] == "in_progress" and _step_running(engine, bystander.id)

        # Another origin (another port) makes the browser POST to the cancel URL of the run still in progress,
        # even with a valid token of the browser's own session (read here as no page can): refused (403) by the
        # Origin check, and nothing changes.
        session = browser.do("GET", "/cookie/ductwork_session")
        assert session["httpOnly"] and session["sameSite"] == "Strict"
        me = Client(d.base)
        me.cookie = f"ductwork_session={session['value']}"
        token = me.token(f"/runs/{bystander.id}")
        evil, attacker = _page_of_another_origin(
            f'<!doctype html><title>prize</title><form id="f" method="post" '
            f'action="{html.escape(d.base)}/runs/{bystander.id}/cancel"><input type="hidden" name="csrf" '
            f'value="{token}"></form><script>document.getElementById("f").submit()</script>')
        browser.do("POST", "/url", {"url": evil + "/"})
        refused = _wait_text(browser, "body", "refused")
        assert browser.do("GET", "/url") == f"{d.base}/runs/{bystander.id}/cancel"
        assert refused.startswith(f"refused: Origin '{evil}' is not this dashboard's origin"), refused
        warnings = [line for line in lines.lines if line.startswith("WARNING")]
        assert len(warnings) == 1 and f"refused a POST to /runs/{bystander.id}/cancel from 127.0.0.1" in warnings[0]
        assert run_row(engine, bystander.id) == ("in_progress", None) and _step_running(engine, bystander.id)
        assert len(action_lines(lines)) == 1

        # the bulk cancel in the browser: the runs page's link, the confirmation with its count, the button
        browser.do("POST", "/url", {"url": f"{d.base}/runs?pipeline=ActSlow"})
        _click(browser, 'a[href="/runs/confirm-cancel?pipeline=ActSlow"]')
        assert browser.text(browser.wait_for("#bulk-count")[0]) == "1 run"
        _click(browser, 'form[action="/runs/cancel"] button')
        _wait_text(browser, "#notice", "Cancelled 1 run(s) of ActSlow.")
        assert run_row(engine, bystander.id) == ("cancelled", "cancelled from the dashboard by loopback")
        assert action_lines(lines)[-1] == ("INFO dashboard: loopback from 127.0.0.1 cancelled 1 run(s) of pipeline "
                                           "ActSlow (the confirmation showed 1)")
    finally:
        browser.close()
        if attacker is not None:
            attacker.shutdown()
            attacker.server_close()

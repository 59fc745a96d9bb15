"""Postgres logins that need a password (SCRAM-SHA-256), on a private cluster.

The shared test server trusts every local login, so SCRAM (and ductwork's deferred import
of scramp, see ``_defer_scramp``) is exercised here against a server that demands it."""
from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import PG_ADMIN_URL, ROOT, run_cli
from pgcluster import PrivateCluster

pytestmark = pytest.mark.postgres

PASSWORD = "Scr4mS3cretPw"
PROBE = ("import sys, ductwork; ductwork.Store(sys.argv[1]).now(); "
         "print(type(sys.modules['scramp'].__dict__.get('ScramClient')).__name__, 'asn1crypto' in sys.modules)")


def running_cluster(**create):
    pg = PrivateCluster()
    try:
        pg.create(**create)
        pg.start()
        yield pg
    finally:
        pg.remove()


@pytest.fixture(scope="module")
def scram_cluster():
    yield from running_cluster(password=PASSWORD)


def probe(url: str) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE, url], capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_scram_login_works_and_the_password_never_shows(scram_cluster):
    migrated = run_cli("migrate", "--database-url", scram_cluster.url)
    assert migrated.returncode == 0, migrated.stderr
    assert "applied 1" in migrated.stdout and PASSWORD not in migrated.stdout + migrated.stderr
    status = run_cli("status", "--json", "--database-url", scram_cluster.url)
    assert status.returncode == 0 and '"processes": []' in status.stdout
    assert probe(scram_cluster.url) == "type True"   # scramp was loaded, for the SCRAM exchange


def test_a_wrong_password_is_one_masked_line(scram_cluster):
    url = scram_cluster.url.replace(PASSWORD, "Wr0ngPassw0rd")
    out = run_cli("status", "--database-url", url)
    assert out.returncode != 0
    lines = [line for line in out.stderr.strip().splitlines() if not line.startswith("ductwork: warning:")]
    assert len(lines) == 1 and lines[0].startswith("ductwork: error:") and "password" in lines[0], out.stderr
    assert "Wr0ngPassw0rd" not in out.stderr and "Traceback" not in out.stderr


def test_a_trusted_login_never_loads_the_scram_stack():
    """pg8000 imports scramp eagerly (11 MB of X.509 parsing); ductwork defers it to the first SCRAM login."""
    assert probe(PG_ADMIN_URL) == "NoneType False"


# -- TLS: sslmode as libpq means it; the context is built once per process, on first use ----------
TLS_PROBE = ("import socket, sys\n"
             "opened = []  # every TCP connect: one per connection, whatever the server says to TLS\n"
             "connect = socket.create_connection\n"
             "socket.create_connection = lambda *a, **k: opened.append(a) or connect(*a, **k)\n"
             "import ductwork\n"
             "store = ductwork.Store(sys.argv[1])\n"
             "for _ in range(3):  # several connections: one context, made when the server said yes\n"
             "    with store.tx(write=False) as t:\n"
             "        ssl = t.one('SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()')[0]\n"
             "    store.close()\n"
             "print(ssl, sorted(ductwork._TLS.contexts), 'ssl' in sys.modules, len(opened))")


@pytest.fixture(scope="module")
def tls_cluster():
    yield from running_cluster(tls=True)


def tls_probe(url: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", TLS_PROBE, url], capture_output=True, text=True, timeout=60,
                          cwd=str(ROOT))


@pytest.mark.parametrize("mode, expected", [("prefer", "True ['prefer'] True 3"),
                                            ("require", "True ['require'] True 3"), ("disable", "False [] False 3")])
def test_sslmode_against_a_tls_server(tls_cluster, mode, expected):
    out = tls_probe(f"{tls_cluster.url.split('?')[0]}?sslmode={mode}")
    assert out.returncode == 0 and out.stdout.strip() == expected, out.stderr


def test_verify_full_rejects_a_self_signed_certificate(tls_cluster):
    out = run_cli("status", "--database-url", f"{tls_cluster.url.split('?')[0]}?sslmode=verify-full")
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "certificate verify failed" in out.stderr, out.stderr


def test_sslmode_against_a_server_without_tls():
    plain = PG_ADMIN_URL.split("?")[0]
    out = tls_probe(f"{plain}?sslmode=prefer")       # plain after the server's no: no context, not even the module
    assert out.returncode == 0 and out.stdout.strip() == "False [] False 3", out.stderr
    out = run_cli("status", "--database-url", f"{plain}?sslmode=require")
    assert out.returncode == 1 and "refuses SSL" in out.stderr and out.stderr.count("\n") == 1, out.stderr

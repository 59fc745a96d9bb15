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


@pytest.fixture(scope="module")
def scram_cluster():
    pg = PrivateCluster()
    try:
        pg.create(password=PASSWORD)
        pg.start()
        yield pg
    finally:
        pg.remove()


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
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ductwork: error:") and "password" in lines[0], out.stderr
    assert "Wr0ngPassw0rd" not in out.stderr and "Traceback" not in out.stderr


def test_a_trusted_login_never_loads_the_scram_stack():
    """pg8000 imports scramp eagerly (11 MB of X.509 parsing); ductwork defers it to the first SCRAM login."""
    assert probe(PG_ADMIN_URL) == "NoneType False"

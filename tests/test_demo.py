"""`make demo` works: examples/demo.py runs the real supervisor end to end and exits 0."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ["EnrichUsers", "Orders", "TextStats", "Triage", "Squares"]


def run_demo(timeout: float = 120) -> tuple[int, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for key in ("DUCTWORK_DATABASE_URL", "DATABASE_URL", "DUCTWORK_ROLE", "DUCTWORK_APP", "DUCTWORK_ENV"):
        env.pop(key, None)
    proc = subprocess.Popen([sys.executable, "examples/demo.py"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM lets the demo stop the ductwork process it started instead of orphaning it.
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=45)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        raise AssertionError(f"examples/demo.py did not finish within {timeout}s:\n{out}") from None
    return proc.returncode, out


def test_demo_runs_every_pipeline_to_completion():
    code, out = run_demo()
    assert code == 0, out
    for name in PIPELINES:
        row = re.search(rf"^{name}\s+(\d+)/(\d+)\s+(\d+)\s", out, re.MULTILINE)
        assert row, f"{name} missing from the summary:\n{out}"
        completed, total, halted = map(int, row.groups())
        assert completed == total and total > 0 and halted == 0, f"{name}: {row.group(0)}\n{out}"
        assert re.search(rf"^  {name}\.trigger\(.*\) -> run \d+ completed: ", out, re.MULTILINE), out
    assert "SIGTERM -> ductwork exited 0" in out, out
    assert "demo: OK" in out, out

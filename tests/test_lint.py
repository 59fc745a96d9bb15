"""The code stays as the project's ruff rules say (pyproject.toml: lines within 120 columns, no
function over complexity 12, pyflakes, bugbear, import order), so the suite fails on a lapse."""
from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_ruff_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "ductwork.py", "tests", "examples",
                             "bench"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr

"""Packaging: the sdist and the wheel really build, pass `twine check --strict`, and the sdist runs tests.

The build runs on a copy of the project's files in a temporary directory (`git ls-files`, or the
tree itself when this is not a git checkout, e.g. an unpacked sdist), so no build/ or *.egg-info
lands in the repository. Build isolation installs setuptools from PyPI (pip's cache makes it quick).
Without `build` or `twine` (the `test` extra) these tests skip, or fail when CI=true, as the
Postgres tests do.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Junk a developer's tree may hold; MANIFEST.in must keep it out of the sdist.
JUNK = ["tests/__pycache__/conftest.cpython-311.pyc", "bench/__pycache__/run.cpython-311.pyc",
        "examples/ductwork.sqlite3", "examples/ductwork.sqlite3-wal", ".make-installed"]
SUBSET = ["tests/test_definitions.py", "tests/test_config.py"]


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        reason = f"`{module}` is not installed (pip install -e '.[test]' brings it in)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)


def _copy_project(dest: Path) -> None:
    """The files git knows about (tracked, or new and not ignored) that exist in the work tree."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=ROOT, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        listed = None
    if listed is None or listed.returncode != 0 or not (ROOT / ".git").exists():
        shutil.copytree(ROOT, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".git", "__pycache__", "*.py[cod]", "*.sqlite3*", ".make-installed", "build", "dist",
            "*.egg-info", ".pytest_cache", ".ruff_cache"))
        return
    for name in filter(None, listed.stdout.split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def _run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    """Build the sdist and the wheel once for this module; returns {"sdist": path, "wheel": path}."""
    _require("build")
    _require("twine")
    base = tmp_path_factory.mktemp("packaging")
    src, out = base / "src", base / "dist"
    src.mkdir()
    _copy_project(src)
    for name in JUNK:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(b"junk")
    built = _run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(out), str(src)],
                 cwd=base, timeout=110)
    assert built.returncode == 0, f"python -m build failed:\n{built.stdout[-3000:]}\n{built.stderr[-3000:]}"
    sdists, wheels = sorted(out.glob("*.tar.gz")), sorted(out.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(p.name for p in out.iterdir())
    return {"sdist": sdists[0], "wheel": wheels[0], "base": base}


def test_twine_check_strict_passes(dists):
    checked = _run([sys.executable, "-m", "twine", "check", "--strict", str(dists["sdist"]), str(dists["wheel"])],
                   cwd=dists["base"], timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count("PASSED") == 2, checked.stdout


def test_sdist_carries_the_tests_and_no_junk(dists):
    with tarfile.open(dists["sdist"]) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    top = {n.split("/", 1)[0] for n in names}
    assert top == {dists["sdist"].name.removesuffix(".tar.gz")}, top
    files = {n.split("/", 1)[1] for n in names}
    for wanted in ["LICENSE", "README.md", "Makefile", "pyproject.toml", "ductwork.py", "tests/conftest.py",
                   "tests/apps/sup_app.py", "examples/demo.py", "examples/deploy/Dockerfile", "bench/run.py",
                   "bench/soak-report.txt", ".ci/run"]:
        assert wanted in files, f"{wanted} missing from the sdist"
    assert set(SUBSET) <= files
    junk = sorted(f for f in files if "__pycache__" in f or f.endswith(".pyc") or ".sqlite3" in f
                  or f.endswith(".make-installed"))
    assert junk == [], junk


def test_wheel_holds_only_the_module_and_an_spdx_license(dists):
    with zipfile.ZipFile(dists["wheel"]) as whl:
        names = whl.namelist()
        info = next(n.split("/", 1)[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = whl.read(f"{info}/METADATA").decode()
    assert [n for n in names if not n.startswith(f"{info}/")] == ["ductwork.py"], names
    assert f"{info}/licenses/LICENSE" in names
    headers = metadata.split("\n\n", 1)[0].splitlines()
    assert "License-Expression: MIT" in headers
    assert "License-File: LICENSE" in headers
    assert not [h for h in headers if h.startswith("Classifier: License ::") or h.startswith("License:")], headers
    assert "Project-URL: Source, https://github.com/ductwork-py/ductwork" in headers
    assert "Requires-Dist: PyYAML>=5.4" in headers


def test_tests_run_from_the_unpacked_sdist(dists):
    unpacked = dists["base"] / "unpacked"
    with tarfile.open(dists["sdist"]) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(unpacked, filter="data")
        else:  # pragma: no cover - Python without PEP 706
            tar.extractall(unpacked)
    (tree,) = unpacked.iterdir()
    # pytest.main, then report which ductwork.py the tests imported (conftest puts the tree first).
    code = ("import sys, pytest; rc = pytest.main(sys.argv[1:]); import ductwork; "
            "print('DUCTWORK_FILE=' + ductwork.__file__); sys.exit(rc)")
    ran = _run([sys.executable, "-c", code, "-q", "-p", "no:cacheprovider", *SUBSET], cwd=tree, timeout=100)
    assert ran.returncode == 0, ran.stdout[-4000:] + ran.stderr[-2000:]
    lines = ran.stdout.splitlines()
    used = next(line for line in lines if line.startswith("DUCTWORK_FILE=")).split("=", 1)[1]
    assert Path(used).resolve() == (tree / "ductwork.py").resolve()
    summary = next(line for line in reversed(lines) if " passed" in line)
    assert int(summary.split()[0]) >= 100, summary
    assert "failed" not in summary and "error" not in summary and "skipped" not in summary, summary

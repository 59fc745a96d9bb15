#!/usr/bin/env python3
"""`make demo`: run the demo app on the real `python ductwork.py run`, end to end.

1. a fresh SQLite database in a temporary directory (DUCTWORK_DATABASE_URL);
2. `python ductwork.py migrate -c examples/config/ductwork.yml`;
3. `python ductwork.py run -c examples/config/ductwork.yml` as a subprocess
   (DUCTWORK_ENV=development), its log lines captured to a file in the temp dir;
4. trigger a few runs of every demo pipeline from this script and wait for them;
5. SIGTERM the subprocess and check it drains and exits 0;
6. print a summary and the outputs of one run per pipeline.

Exit 0 only if every run completed with the expected output and the shutdown was
clean (the temp dir is then removed, unless --keep-running); otherwise exit 1, print
the tail of the log and keep the temp dir for a look.

    python examples/demo.py                 # from the repository root
    python examples/demo.py --keep-running  # leave ductwork running until Ctrl-C
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "examples/config/ductwork.yml"          # relative to ROOT, where the subprocesses run
RUN_TIMEOUT = 60.0                               # all runs must finish within this
SHUTDOWN_TIMEOUT = 35.0                          # the subprocess must exit 0 within this after SIGTERM

sys.path.insert(0, str(ROOT))                    # ductwork.py, even without `pip install -e .`
sys.path.insert(0, str(ROOT / "examples"))       # demo_app

import ductwork  # noqa: E402

# Trigger arguments and the exact output each run must produce, per pipeline.
CASES: dict[str, list[tuple[tuple, object]]] = {
    "EnrichUsers": [
        ((3,), {"source": "crm", "users": ["user-1", "user-2", "user-3"], "total_score": 60}),
        ((1,), {"source": "crm", "users": ["user-1"], "total_score": 10}),
        ((5,), {"source": "crm", "users": ["user-1", "user-2", "user-3", "user-4", "user-5"], "total_score": 150}),
    ],
    "Orders": [
        ((1,), {"total_cents": 2273, "in_stock": False, "missing": ["bread"], "status": "backorder"}),
        ((2,), {"total_cents": 2471, "in_stock": True, "missing": [], "status": "ready"}),
        ((3,), {"total_cents": 480, "in_stock": True, "missing": [], "status": "ready"}),
    ],
    "TextStats": [
        (("The quick brown fox jumps over the lazy dog",), {"words": 9, "vowels": 11, "longest": "quick"}),
        (("  Ductwork moves   WORK through pipes ",), {"words": 5, "vowels": 9, "longest": "ductwork"}),
        (("a",), {"words": 1, "vowels": 1, "longest": "a"}),
    ],
    "Triage": [
        ((42,), "approved by auto"),              # "small"
        ((250,), "review by reviewer-1"),         # "large", then a chained step
        ((-1,), "rejected by auto"),              # "invalid": the otherwise branch
    ],
    "Squares": [
        ((4,), [0, 1, 4, 9]),
        ((1,), [0]),
        ((6,), [0, 1, 4, 9, 16, 25]),
    ],
}


class Stop(Exception):
    """SIGTERM/SIGINT to this script: stop ductwork cleanly, then leave."""


def _raise_stop(signum, frame):
    raise Stop(signal.Signals(signum).name)


def highlights(path: Path, limit: int = 14) -> None:
    """A few telling lines of ductwork's own log: start, drain arithmetic, a retry, warnings, stop."""
    keys = ("drain:", "supervisor started", "shutting down", "supervisor stopped", "failed (attempt", "halted")
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return
    picked, seen_retry, retries = [], False, 0
    for line in lines:
        if "failed (attempt" in line:
            retries += 1
            if seen_retry:
                continue
            seen_retry = True
        if any(k in line for k in keys) or " WARNING " in line or " ERROR " in line:
            picked.append(line)
    if not picked:
        return
    print(f"\nfrom the log ({len(lines)} lines; {retries} step attempt(s) failed and were retried):")
    for line in picked[:limit]:
        print(f"  {line if len(line) <= 200 else line[:197] + '...'}")
    if len(picked) > limit:
        print(f"  ... {len(picked) - limit} more")


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "ductwork.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def stop(proc: subprocess.Popen, timeout: float) -> tuple[int | None, float]:
    """SIGTERM the ductwork process; returns (exit code or None if it had to be killed, seconds)."""
    started = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)     # it and any children it forked
        proc.wait()
        return None, time.monotonic() - started
    return code, time.monotonic() - started


def trigger_all(pipelines: dict) -> list[tuple[str, tuple, object, object]]:
    runs = []
    for name, cases in CASES.items():
        for args, expected in cases:
            runs.append((name, args, expected, pipelines[name].trigger(*args)))
    return runs


def wait_all(runs: list, proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for every run to finish; False on timeout or when ductwork died meanwhile."""
    deadline = time.monotonic() + timeout
    for _, _, _, run in runs:
        while run.refresh().status == "in_progress":
            if proc.poll() is not None:
                print(f"demo: ductwork exited early with code {proc.returncode}")
                return False
            if time.monotonic() >= deadline:
                print(f"demo: runs still in progress after {timeout:.0f}s")
                return False
            time.sleep(0.05)
    return True


def summarize(runs: list) -> tuple[bool, list[str]]:
    """Print the summary table; returns (all good, problems)."""
    problems: list[str] = []
    rows = []
    for name in CASES:
        mine = [r for r in runs if r[0] == name]
        done = sum(1 for *_, run in mine if run.status == "completed")
        halted = sum(1 for *_, run in mine if run.status == "halted")
        steps = [s for *_, run in mine for s in run.steps]
        retries = sum(max(0, s.attempts - 1) for s in steps)
        starts = [run.created_at for *_, run in mine]
        ends = [run.finished_at for *_, run in mine if run.finished_at is not None]
        wall = (max(ends) - min(starts)) if ends and len(ends) == len(mine) else None
        rows.append((name, f"{done}/{len(mine)}", str(halted), str(len(steps)), str(retries),
                     f"{wall:.2f}s" if wall is not None else "-"))
        for _, args, expected, run in mine:
            if run.status != "completed":
                problems.append(f"{name}{args}: run {run.id} is {run.status}"
                                + (f" ({', '.join(run.halt_reasons)})" if run.halt_reasons else ""))
            elif run.output != expected:
                problems.append(f"{name}{args}: run {run.id} output {json.dumps(run.output)} "
                                f"!= expected {json.dumps(expected)}")
    header = ("pipeline", "completed", "halted", "steps", "retries", "wall time")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

    print(line(header))
    print(line(["-" * w for w in widths]))
    for row in rows:
        print(line(row))
    return not problems, problems


def show_outputs(runs: list) -> None:
    print("\noutputs (one run per pipeline):")
    for name in CASES:
        _, args, _, run = next(r for r in runs if r[0] == name)
        shown_args = ", ".join(json.dumps(a) for a in args)
        print(f"  {name}.trigger({shown_args}) -> run {run.id} {run.status}: {json.dumps(run.output)}")
    enrich = next(run for name, _, _, run in runs if name == "EnrichUsers")
    print(f"  EnrichUsers run {enrich.id} context: {json.dumps(enrich.context, sort_keys=True)}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep-running", action="store_true",
                        help="leave `ductwork.py run` running in the foreground until Ctrl-C")
    return parser.parse_args(argv)


def demo_env(db_url: str) -> dict:
    """The subprocesses' environment: the demo database, development mode, none of the caller's ductwork settings."""
    env = {**os.environ, "DUCTWORK_DATABASE_URL": db_url, "DUCTWORK_ENV": "development", "PYTHONUNBUFFERED": "1"}
    env.pop("DATABASE_URL", None)
    env.pop("DUCTWORK_ROLE", None)
    env.pop("DUCTWORK_APP", None)
    return env


def migrate(env: dict) -> bool:
    """`python ductwork.py migrate`; False, after saying why, if it failed or this script was interrupted."""
    try:
        migrated = cli("migrate", "-c", CONFIG, env=env)
    except Stop as why:
        print(f"demo: interrupted ({why})")
        return False
    if migrated.returncode != 0:
        print(f"demo: migrate failed (exit {migrated.returncode}):\n{migrated.stdout}{migrated.stderr}")
        return False
    print(f"demo: {migrated.stdout.strip()}")
    return True


def start_ductwork(env: dict, log_file) -> subprocess.Popen:
    """`python ductwork.py run` in the background, its output to log_file."""
    # A session of its own: our Ctrl-C reaches only this script, which then stops ductwork
    # with one SIGTERM (a second signal would mean "stop now" to the supervisor).
    proc = subprocess.Popen([sys.executable, "ductwork.py", "run", "-c", CONFIG], cwd=ROOT, env=env,
                            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    print(f"demo: started `python ductwork.py run -c {CONFIG}` (pid {proc.pid})")
    return proc


def run_pipelines(proc: subprocess.Popen, db_url: str) -> bool:
    """Trigger every case, wait for the runs, print the summary and outputs; True if all finished as expected."""
    os.environ["DUCTWORK_ENV"] = "development"
    ductwork.configure(database_url=db_url, config=str(ROOT / CONFIG))
    import demo_app

    pipelines = {name: getattr(demo_app, name) for name in CASES}
    started = time.monotonic()
    runs = trigger_all(pipelines)
    print(f"demo: triggered {len(runs)} runs of {len(pipelines)} pipelines; waiting up to {RUN_TIMEOUT:.0f}s")
    finished = wait_all(runs, proc, RUN_TIMEOUT)
    elapsed = time.monotonic() - started
    print(f"demo: {'all runs finished' if finished else 'NOT all runs finished'} after {elapsed:.2f}s\n")
    good, problems = summarize(runs)
    show_outputs(runs)
    for problem in problems:
        print(f"demo: FAIL {problem}")
    return finished and good


def follow_log(proc: subprocess.Popen, db_url: str, log_path: Path) -> None:
    """--keep-running: show how to poke the running ductwork, then echo its log until it exits or Ctrl-C."""
    print(f"\ndemo: ductwork keeps running (pid {proc.pid}); try, from {ROOT}:")
    print(f"  DUCTWORK_DATABASE_URL={db_url} python ductwork.py trigger Squares 3 -c {CONFIG}")
    print(f"  DUCTWORK_DATABASE_URL={db_url} python ductwork.py status -c {CONFIG}")
    print("demo: its log follows; press Ctrl-C to stop it\n")
    with open(log_path, "rb") as follow:
        follow.seek(0, os.SEEK_END)
        try:
            while proc.poll() is None:
                chunk = follow.read()
                if chunk:
                    sys.stdout.write(chunk.decode(errors="replace"))
                    sys.stdout.flush()
                else:
                    time.sleep(0.2)
        except Stop:
            print()


def shut_down(proc: subprocess.Popen, log_file) -> tuple[int | None, float]:
    """Stop ductwork with signals to this script ignored meanwhile; returns stop()'s (exit code, seconds)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    code, took = stop(proc, SHUTDOWN_TIMEOUT)
    log_file.close()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return code, took


def clean_exit(code: int | None, took: float) -> bool:
    """Report how ductwork took the SIGTERM; True if it exited 0."""
    if code == 0:
        print(f"\ndemo: SIGTERM -> ductwork exited 0 after {took:.2f}s")
        return True
    what = "did not exit and was killed" if code is None else f"exited {code}"
    print(f"\ndemo: FAIL SIGTERM -> ductwork {what} after {took:.2f}s")
    return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="ductwork-demo-"))
    db_url = f"sqlite:///{tmp / 'ductwork.sqlite3'}"       # absolute path: sqlite:////tmp/...
    log_path = tmp / "ductwork.log"
    env = demo_env(db_url)
    print(f"demo: database {db_url}")
    print(f"demo: log      {log_path}  (the directory is removed when the demo succeeds)")

    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    if not migrate(env):
        return 1

    log_file = open(log_path, "wb")
    proc = start_ductwork(env, log_file)
    ok = False
    try:
        ok = run_pipelines(proc, db_url)
        if args.keep_running and proc.poll() is None:
            follow_log(proc, db_url, log_path)
    except Stop as why:
        print(f"\ndemo: interrupted ({why}); stopping ductwork")
    except Exception as exc:  # report it, still shut ductwork down below
        print(f"demo: error: {type(exc).__name__}: {exc}")
        ok = False
    finally:
        code, took = shut_down(proc, log_file)

    if not clean_exit(code, took):
        ok = False
    if not ok:
        print(f"\ndemo: FAILED; last lines of {log_path}:\n{tail(log_path)}")
        return 1
    highlights(log_path)
    print("demo: OK, every run completed with the expected output")
    if not args.keep_running:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Migration 2 on a big live database (SPEC §18): a schema-1 deployment works through a backlog while this
version's `migrate` upgrades its database under it.

    python bench/upgrade.py [--runs 1000000] [--backlog 400000]

Builds a schema-1 Postgres database with the ductwork.py of SCHEMA_1_REVISION (from git): ``--runs``
finished runs (bench/bigdb.py's rows) and a backlog of single-step runs. Starts that version's worker and
advancer processes, lets them work, runs `migrate` (this version), and prints: how long migrate took, the
longest pause between two consecutive finished steps before and during it, the steps finished per second
before and during it, and whether the old deployment kept working after it.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bigdb import BUILD, DAY, SERIES, maintain
from common import ROOT, Database, pause, table, wait_for, write_config

import ductwork

SCHEMA_1_REVISION = "a3cb1e3"


def old_ductwork(tmp: Path) -> Path:
    folder = tmp / "schema1"
    folder.mkdir(exist_ok=True)
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{SCHEMA_1_REVISION}:ductwork.py"], check=True,
                          capture_output=True, text=True).stdout
    (folder / "ductwork.py").write_text(text)
    return folder / "ductwork.py"


class SchemaOneDatabase(Database):
    """A fresh Postgres database migrated by the schema-1 ductwork.py (not this one)."""

    def __init__(self, old: Path):
        import uuid

        from common import pg_admin
        self.kind = "postgres"
        self.name = f"ductwork_bench_{uuid.uuid4().hex[:8]}"
        admin = pg_admin()
        admin.cursor().execute(f"CREATE DATABASE {self.name}")
        admin.close()
        from common import PG_ADMIN
        self.url = PG_ADMIN.rsplit("/", 1)[0] + "/" + self.name
        subprocess.run([sys.executable, str(old), "--database-url", self.url, "migrate"], check=True,
                       capture_output=True)


def build(db: Database, old: Path, config: Path, runs: int, backlog: int) -> None:
    """``runs`` finished runs and a backlog of single-step runs, with the definitions the old version stores."""
    for pipeline in ("BenchThree", "BenchSingle"):   # each stores its definition, the old version's way
        subprocess.run([sys.executable, str(old), "-c", str(config), "trigger", pipeline, "1"], check=True,
                       capture_output=True)
    store = ductwork.Store(db.url)
    with store.tx() as t:
        digests = dict(t.all("SELECT pipeline, definition FROM ductwork_runs"))
        now = float(t.one("SELECT {now}")[0])
    spacing = 6 * DAY / runs
    for done in range(0, runs, 100_000):
        with store.tx() as t:
            mark = int(t.one("SELECT max(id) FROM ductwork_runs")[0])
            params = {"n": min(100_000, runs - done), "digest": digests["BenchThree"], "mark": mark,
                      "start": now - 6 * DAY + done * spacing, "spacing": spacing}
            for statement in BUILD:
                t.run(statement.replace("{series}", SERIES["postgres"]), params)
    with store.tx() as t:   # the backlog (as bench/scale.py's, by hand: this version's trigger would migrate)
        mark = int(t.one("SELECT max(id) FROM ductwork_runs")[0])
        t.run("INSERT INTO ductwork_runs (pipeline, definition, status, input, created_at, updated_at) "
              "SELECT 'BenchSingle', :d, 'in_progress', '[null]', {now}, {now} FROM generate_series(1, :n)",
              {"d": digests["BenchSingle"], "n": backlog})
        t.run("INSERT INTO ductwork_branches (run_id, pipeline, definition, node, status, available_at, created_at, "
              "updated_at) SELECT id, pipeline, definition, 0, 'running', {now}, {now}, {now} FROM ductwork_runs "
              "WHERE id > :mark", {"mark": mark})
        t.run("INSERT INTO ductwork_steps (run_id, branch_id, pipeline, node, name, status, input, available_at, "
              "created_at) SELECT run_id, id, pipeline, 0, 'noop', 'queued', '[null]', {now}, {now} "
              "FROM ductwork_branches WHERE run_id > :mark", {"mark": mark})
    store.close()
    maintain(db)


def finished_between(store: ductwork.Store, start: float, end: float) -> list[float]:
    with store.tx(write=False) as t:
        return [float(r[0]) for r in t.all("SELECT finished_at FROM ductwork_executions "
                                           "WHERE finished_at BETWEEN :a AND :b ORDER BY finished_at",
                                           {"a": start, "b": end})]


def longest_pause(times: list[float]) -> float:
    return max((b - a for a, b in zip(times, times[1:], strict=False)), default=float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--backlog", type=int, default=400_000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ductwork-upgrade-"))
    old = old_ductwork(tmp)
    db = SchemaOneDatabase(old)
    procs = []
    try:
        config = write_config(tmp / "old.yml", db.url)
        started = time.monotonic()
        build(db, old, config, args.runs, args.backlog)
        print(f"built a schema-1 database: {args.runs} finished runs and a backlog of {args.backlog} "
              f"single-step runs in {time.monotonic() - started:.0f} s", flush=True)
        for role in ("worker", "worker", "advancer"):
            procs.append(subprocess.Popen([sys.executable, str(old), "run", "--role", role, "-c", str(config)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        store = ductwork.Store(db.url)
        wait_for(lambda: bool(finished_between(store, 0, float("inf"))[-1:]), 60, 0.1)
        pause(2)   # the old deployment at its pace
        before_start = store.now()
        pause(3)
        migrate_start = store.now()
        began = time.monotonic()
        out = subprocess.run([sys.executable, str(ROOT / "ductwork.py"), "--database-url", db.url, "migrate"],
                             capture_output=True, text=True)
        took = time.monotonic() - began
        migrate_end = store.now()
        pause(3)
        after_end = store.now()
        alive = all(p.poll() is None for p in procs)
        before = finished_between(store, before_start, migrate_start)
        during = finished_between(store, migrate_start, migrate_end)
        after = finished_between(store, migrate_end, after_end)
        with store.tx(write=False) as t:
            remaining = t.one("SELECT count(*) FROM ductwork_steps WHERE status = 'queued'")[0]
        store.close()
    finally:
        for p in procs:
            p.terminate()
        errors = [p.communicate(timeout=30)[1] for p in procs]
        db.drop()
    rate = lambda times, span: len(times) / span if span > 0 else float("nan")  # noqa: E731
    table(f"migrate (schema 1 -> 2) on {args.runs} finished runs under a working schema-1 deployment",
          ["figure", "value"],
          [["migrate", f"{out.stdout.strip() or out.stderr.strip()[-200:]} (exit {out.returncode}), {took:.1f} s"],
           ["steps finished per s: the 3 s before / during migrate / the 3 s after",
            f"{rate(before, migrate_start - before_start):.0f} / {rate(during, migrate_end - migrate_start):.0f} / "
            f"{rate(after, after_end - migrate_end):.0f}"],
           ["longest pause between two finished steps: before / during / after, s",
            f"{longest_pause(before):.3f} / {longest_pause(during):.3f} / {longest_pause(after):.3f}"],
           ["the old deployment still running after it; errors in its output",
            f"{'yes' if alive else 'NO'}; {sum('Traceback' in e or 'ERROR' in e for e in errors)}"],
           ["backlog steps left when stopped (the backlog outlasted the measurement if > 0)", str(remaining)]])


if __name__ == "__main__":
    main()

"""Flow control's costs and its claim order (SPEC §17), against the version before it, in the same run.

    python bench/flow.py [--repeat 3] [--engines postgres] [--baseline dc53223] [--runs 2000] [--width 50]
                         [--steps 5000]

Three figures, each on a fresh database per version and repeat, real processes (2 foreground job workers of 4
threads and an advancer, as bench/throughput.py starts them):

1. Run order: a backlog of RUNS runs of a WIDTH-way fan-out (start, expand, collapse), released at once to the
   running cluster: when the first, the median and the last run completed (seconds after the release), and the
   steps/s of the whole backlog. Before, the claim order was the steps' age: every expanded child ran before any
   collapse, so no run completed until the end. Goal: the median run by about half the total time, throughput
   ratio >= 0.97.
2. Claim throughput, no caps and no priorities: a backlog of STEPS single-step runs released at once; steps/s,
   ratio now / before >= 0.97.
3. A cap of 50 on that no-op step (config job_worker.concurrency): steps/s, ratio capped / uncapped >= 0.8.

The version before is ductwork.py at --baseline (a git revision), run as its own script on a database it migrated.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import BENCH_APP, ROOT, RUNS_LEFT, Database, pause, record, stop, table, wait_for, write_config

import ductwork

BASELINE = "dc53223"   # the last commit before flow control (trigger keys aside)
CAP = 50


class Version:
    """A ductwork.py to run: this checkout's, or one at a git revision (a folder of its own)."""

    def __init__(self, tmp: Path, revision: str | None):
        self.label = "now" if revision is None else f"before ({revision})"
        if revision is None:
            self.script = ROOT / "ductwork.py"
        else:
            folder = tmp / f"rev-{revision}"
            folder.mkdir(exist_ok=True)
            text = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:ductwork.py"], check=True,
                                  capture_output=True, text=True).stdout
            self.script = folder / "ductwork.py"
            self.script.write_text(text)

    def python(self, code: str, *args: str) -> str:
        """Run ``code`` in a fresh interpreter that imports this version as ``ductwork`` (and the bench app)."""
        prelude = (f"import sys; sys.path[:0] = [{str(self.script.parent)!r}, {str(BENCH_APP.parent)!r}]; "
                   "import ductwork, bench_app\n")
        done = subprocess.run([sys.executable, "-c", prelude + code, *args], capture_output=True, text=True,
                              check=True, timeout=600)
        return done.stdout

    def database(self, kind: str) -> Database:
        """A fresh database migrated by this version."""
        db = Database(kind, migrate=False)
        subprocess.run([sys.executable, str(self.script), "--database-url", db.url, "migrate"], check=True,
                       capture_output=True, timeout=300)
        return db

    def backlog(self, url: str, pipeline: str, count: int, arg: int | None) -> None:
        """``count`` runs of ``pipeline``, held back an hour (the cluster boots meanwhile)."""
        self.python("ductwork.configure(database_url=sys.argv[1]); e = ductwork._app_engine()\n"
                    "for _ in range(int(sys.argv[3])): e.trigger(sys.argv[2], [None if sys.argv[4] == '-' "
                    "else int(sys.argv[4])])\n"
                    "with e.store.tx() as t: t.run('UPDATE ductwork_steps SET available_at = available_at + 3600')",
                    url, pipeline, str(count), "-" if arg is None else str(arg))

    def cluster(self, tmp: Path, url: str, **config) -> list[subprocess.Popen]:
        cfg = write_config(tmp / f"{self.label.split()[0]}.yml", url, **config)
        procs = [subprocess.Popen([sys.executable, str(self.script), "run", "--role", role, "-c", str(cfg)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
                 for role in ("worker", "worker", "advancer")]
        store = ductwork.Store(url)
        wait_for(lambda: one(store, "SELECT count(*) FROM ductwork_processes") >= 3, 60, 0.05)
        store.close()
        pause(0.5)
        return procs


def one(store: ductwork.Store, sql: str):
    with store.tx(write=False) as t:
        return t.one(sql)[0]


def release(store: ductwork.Store, pipeline: str) -> float:
    """The held-back backlog claimable now, workers woken; the database time of the release."""
    with store.tx() as t:
        now = t.one("SELECT {now}")[0]
        t.run("UPDATE ductwork_steps SET available_at = available_at - 3600 WHERE status = 'queued'")
        t.notify(ductwork.CH_JOBS, pipeline)
    return float(now)


def drained(store: ductwork.Store) -> bool:
    return one(store, RUNS_LEFT) == 0


def finish_times(store: ductwork.Store, released: float) -> list[float]:
    with store.tx(write=False) as t:
        return sorted(float(f) - released for (f,) in t.all("SELECT finished_at FROM ductwork_runs"))


def measure(version: Version, kind: str, tmp: Path, pipeline: str, runs: int, arg: int | None,
            steps_per_run: int, **config) -> tuple[list[float], float]:
    """A backlog released to a running cluster: each run's completion (seconds after the release) and steps/s."""
    db = version.database(kind)
    try:
        version.backlog(db.url, pipeline, runs, arg)
        procs = version.cluster(tmp, db.url, **config)
        store = ductwork.Store(db.url)
        try:
            released = release(store, pipeline)
            wait_for(lambda: drained(store), 1800, 0.05)
            done = finish_times(store, released)
        finally:
            for p in procs:
                stop(p)
            store.close()
        return done, runs * steps_per_run / done[-1]
    finally:
        db.drop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--engines", default="postgres")
    parser.add_argument("--baseline", default=BASELINE)
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--width", type=int, default=50)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--figures", default="order,claims", help="order (figure 1), claims (figures 2 and 3)")
    args = parser.parse_args()
    figures = set(args.figures.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="ductwork-bench-flow-"))
    before, now = Version(tmp, args.baseline), Version(tmp, None)
    capped = {"job_worker": {"concurrency": {"BenchSingle": {"noop": CAP}}}}
    for kind in args.engines.split(","):
        order: dict[str, list[tuple[float, float, float, float]]] = {before.label: [], now.label: []}
        single: dict[str, list[float]] = {before.label: [], now.label: [], f"now, cap {CAP}": []}
        for i in range(args.repeat):
            for version in (before, now) if i % 2 == 0 else (now, before):   # alternated: drift shared alike
                if "order" in figures:
                    done, rate = measure(version, kind, tmp, "BenchFan", args.runs, args.width, args.width + 2)
                    order[version.label].append((done[0], statistics.median(done), done[-1], rate))
                if "claims" in figures:
                    single[version.label].append(measure(version, kind, tmp, "BenchSingle", args.steps, None, 1)[1])
            if "claims" in figures:
                single[f"now, cap {CAP}"].append(
                    measure(now, kind, tmp, "BenchSingle", args.steps, None, 1, **capped)[1])

        if "order" in figures:
            report_order(kind, args, order, before, now)
        if "claims" in figures:
            report_claims(kind, args, single, before, now)


def report_order(kind: str, args: argparse.Namespace, order: dict, before: Version, now: Version) -> None:
    """Figure 1: the fan-out backlog's completions, and the throughput ratio."""
    def med(label: str, field: int) -> float:
        return statistics.median(row[field] for row in order[label])
    rows = [[label, f"{med(label, 0):.1f}", f"{med(label, 1):.1f}", f"{med(label, 2):.1f}",
             f"{med(label, 1) / med(label, 2):.2f}", f"{med(label, 3):.0f}"] for label in order]
    table(f"{kind}: {args.runs} runs x {args.width}-way fan-out, released at once (medians of {args.repeat}; "
          "seconds after the release)",
          ["version", "first run done", "median run done", "last run done", "median / last", "steps/s"], rows)
    print(f"run-order throughput ratio now / before: {med(now.label, 3) / med(before.label, 3):.2f}"
          f"{paired([row[3] for row in order[now.label]], [row[3] for row in order[before.label]])} (goal >= 0.97)")
    record(f"ductwork ({kind})", "fan-out backlog, median run done / last",
           [row[1] / row[2] for row in order[now.label]])


def report_claims(kind: str, args: argparse.Namespace, single: dict, before: Version, now: Version) -> None:
    """Figures 2 and 3: claim throughput, before and now, capped and not."""
    rates = {label: statistics.median(values) for label, values in single.items()}
    table(f"{kind}: {args.steps} single no-op steps, released at once (steps/s, medians of {args.repeat})",
          ["version", "steps/s"], [[label, f"{rate:.0f}"] for label, rate in rates.items()])
    print(f"claim throughput ratio now / before (no caps, no priorities): "
          f"{rates[now.label] / rates[before.label]:.2f}{paired(single[now.label], single[before.label])} "
          "(goal >= 0.97)")
    print(f"claim throughput ratio cap {CAP} / uncapped: {rates[f'now, cap {CAP}'] / rates[now.label]:.2f}"
          f"{paired(single[f'now, cap {CAP}'], single[now.label])} (goal >= 0.8)")


def paired(ours: list[float], theirs: list[float]) -> str:
    """The ratios of the runs of one repeat (measured back to back, so a slow spell of the machine is in both):
    their median and range, steadier than the ratio of the medians on a shared machine."""
    if len(ours) < 2:
        return ""
    ratios = sorted(a / b for a, b in zip(ours, theirs, strict=True))
    return f"; per repeat: median {statistics.median(ratios):.2f}, {ratios[0]:.2f}-{ratios[-1]:.2f}"


if __name__ == "__main__":
    main()

"""`make bench`: every benchmark, in one run, printed as tables (copy them into the README),
then the headline figures side by side with the ratios ours / theirs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import SIDE_BY_SIDE, table  # noqa: E402

OURS = "ductwork (postgres)"


def number(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def side_by_side(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    value = {(r["who"], r["figure"]): r["median"] for r in rows}
    peers = sorted({r["who"] for r in rows} - {OURS, "ductwork (sqlite)", "raw pg8000"})
    out = []
    for figure in dict.fromkeys(r["figure"] for r in rows):   # (in the order they ran: each size's rows together)
        ours = value.get((OURS, figure))
        if ours is None:
            continue
        cells = [figure, number(ours)]
        for peer in peers:
            theirs = value.get((peer, figure))
            cells += [number(theirs) if theirs else "—", f"{ours / theirs:.2f}" if theirs else "—"]
        out.append(cells)
    floor = value.get(("raw pg8000", SIDE_BY_SIDE["1 job per commit"]))
    for figure in ("throughput, backlog then start, per s", "throughput, released to running workers, per s"):
        if floor and (OURS, figure) in value:
            out.append([f"{figure} / physical floor (1 job per commit)", f"{value[(OURS, figure)] / floor:.2f}"]
                       + ["", ""] * len(peers))
    table("side by side on Postgres, medians (ratio = ours / theirs: above 1 is better for per s, "
          "below 1 for ms and s)",
          ["figure", "ductwork"] + [c for p in peers for c in (p, f"ours / {p}")], out)


results = Path(tempfile.mkstemp(prefix="ductwork-bench-", suffix=".jsonl")[1])
env = {**os.environ, "DUCTWORK_BENCH_RESULTS": str(results)}
# The throughput rows once more at N = 20,000 (issue 21: a 2,000-step burst is over in about half a second), with
# pgqueuer only: procrastinate does about 860 jobs/s here, so 20,000 of them three times would add minutes.
LARGE = {"DUCTWORK_BENCH_SCALE": "N = 20000"}
try:
    for script, args, more in (
            ("floor.py", [], {}), ("throughput.py", [], {}), ("peers.py", [], {}),
            ("throughput.py", ["--steps", "20000", "--only", "single,warm"], LARGE),
            ("peers.py", ["--jobs", "20000", "--peers", "pgqueuer", "--only", "throughput,warm"], LARGE),
            ("scale.py", [], {}), ("ops.py", [], {}), ("bigdb.py", [], {}), ("cancel.py", [], {}), ("waits.py", [], {}),
            ("flow.py", [], {}), ("async_steps.py", [], {})):
        print(f"\n## bench/{script} {' '.join(args)}", flush=True)
        subprocess.run([sys.executable, str(HERE / script), *args], check=True, env={**env, **more})
    side_by_side(results)
finally:
    results.unlink()

"""`make bench`: every benchmark, in one run, printed as tables (copy them into the README)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

for script, args in (("floor.py", []), ("throughput.py", []), ("peers.py", []), ("scale.py", []), ("ops.py", [])):
    print(f"\n## bench/{script} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, str(HERE / script), *args], check=True)

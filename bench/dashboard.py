"""The dashboard's run page for a wide fan-out (issue 20: a 1,000-way fan-out's page renders in under a second).

    python bench/dashboard.py [--width N] [--engines sqlite,postgres] [--repeat K]

One run of BenchWide (a list of N items, expand to two chained steps per item, one item failing its first
attempt, collapse) is run to its end with run_inline, then a real dashboard server (make_dashboard_server, in
this process, on a loopback port) is asked for the run's page K times over HTTP. Printed per engine: the
median and worst seconds of a whole response (its data read, its html rendered, sent), the page's size and its
list items (what a browser lays out), against the overview's page measured in the same run as the baseline
(served from its one-second cache after the first), and the overview's data computed afresh for two windows.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import threading
import time
import urllib.request

from common import Database, table

import ductwork


def wide_items(n):
    return list(range(n))


def wide_first(x):
    if x == 7 and ductwork.current_step().attempt == 1:
        raise ValueError("item 7 fails its first attempt")
    return x


def wide_second(x):
    return x * 2


def wide_sum(xs):
    return sum(xs)


class BenchWide(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(wide_items).expand(to=wide_first).chain(wide_second).collapse(into=wide_sum)


def fetch(url: str) -> tuple[float, str]:
    began = time.perf_counter()
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=60) as response:
        body = response.read().decode()
    return time.perf_counter() - began, body


def timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def measure(kind: str, width: int, repeat: int) -> list:
    db = Database(kind)
    try:
        os.environ["DUCTWORK_DATABASE_URL"] = db.url
        ductwork.configure(database_url=db.url)
        run = ductwork.run_inline(BenchWide, width)
        assert run.status == "completed", run.status
        config = ductwork.load_config()
        server = ductwork.make_dashboard_server(config, "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            fetch(base + f"/runs/{run.id}")   # (a first request opens the pool's connection)
            page = [fetch(base + f"/runs/{run.id}") for _ in range(repeat)]
            overview = [fetch(base + "/") for _ in range(repeat)]   # (within a second: shared, see _Shared)
            engine = ductwork._app_engine()
            computed = {w: statistics.median(timed(lambda w=w: ductwork.dashboard_overview(engine, w))
                                             for _ in range(repeat)) for w in ("1h", "24h")}
        finally:
            server.shutdown()
            server.server_close()
        body = page[-1][1]
        times = [t for t, _ in page]
        base_times = [t for t, _ in overview]
        median, base_median = statistics.median(times), statistics.median(base_times)
        return [kind, width, f"{median:.3f}", f"{max(times):.3f}", f"{base_median:.3f}", f"{median / base_median:.1f}",
                f"{len(body) // 1024} KiB", len(re.findall(r"<li", body)), f"{computed['1h']:.3f}",
                f"{computed['24h']:.3f}"]
    finally:
        ductwork._APP.engine = None
        db.drop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--engines", default="sqlite,postgres")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rows = [measure(kind, args.width, args.repeat) for kind in args.engines.split(",")]
    header = ["engine", "fan-out", "run page median s", "worst s", "overview median s", "page/overview",
              "page size", "<li> items", "overview data 1h s", "overview data 24h s"]
    table(f"dashboard: the run page of a {args.width}-way fan-out", header, rows)
    print("goal: the run page of a 1,000-way fan-out in under 1 s")


if __name__ == "__main__":
    main()

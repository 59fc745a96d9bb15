"""No-op pipelines for the benchmarks."""
import ductwork


def noop(x=None):
    return x


def fan(n):
    return list(range(n))


def count(values):
    return len(values)


class BenchSingle(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(noop)


class BenchFan(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(fan).expand(to=noop).collapse(into=count)


class BenchThree(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(noop).chain(to=noop).chain(to=noop)


class BenchChain(ductwork.Pipeline):
    @staticmethod
    def define(p):
        h = p.start(noop)
        for _ in range(9):
            h = h.chain(to=noop)


def nap(seconds):
    import threading
    threading.Event().wait(seconds)
    return seconds


class BenchNap(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(nap)


class BenchSleep(ductwork.Pipeline):
    """A durable sleep between two no-op steps (bench/waits.py aligns the sleeps' ends)."""
    @staticmethod
    def define(p):
        p.start(noop).sleep(3600).chain(to=noop)


class BenchGate(ductwork.Pipeline):
    """Waits for a signal that never comes (no timeout): a run parked for good."""
    @staticmethod
    def define(p):
        p.start(noop).wait_for("never").chain(to=noop)


async def async_nap(seconds):
    import asyncio
    await asyncio.sleep(seconds)
    return seconds


class BenchAsyncNap(ductwork.Pipeline):
    """One async step that awaits (bench/async_steps.py): BenchNap's twin on the event loop."""
    @staticmethod
    def define(p):
        p.start(async_nap)

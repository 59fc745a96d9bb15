"""Pipelines for the recycling tests (SPEC §15): every step marks its pid in $DW_TEST_DIR/marks.log."""
import os
import threading

from marks import mark

import ductwork

LEAKED: list[bytes] = []   # what Leak allocates stays here: a leak, as a step with a module-level cache has


class Count(ductwork.Step):
    """Marks which process ran it."""

    def execute(self, n):
        mark(f"step {self.run_id} {os.getpid()}")
        return n


class Leak(ductwork.Step):
    """Keeps ``mb`` MB of written (resident) memory for the life of its process."""

    def execute(self, mb):
        LEAKED.append(b"\x01" * (mb * 2 ** 20))
        mark(f"leak {self.run_id} {os.getpid()}")
        return mb


class Stuck(ductwork.Step):
    """Ignores its deadline: blocks as a C call would, for longer than any test runs."""
    timeout = 0.3
    retry = ductwork.Retry(max=0)

    def execute(self, x):
        mark(f"stuck {self.run_id} {os.getpid()}")
        threading.Event().wait(3600)
        return x


class RecCount(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(Count)


class RecLeak(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(Leak)


class RecStuck(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(Stuck)


class Slow(ductwork.Step):
    """Takes its time: a recycle's drain waits for it longer than supervisor.hang_timeout."""

    def execute(self, seconds):
        mark(f"slow {self.run_id} {os.getpid()}")
        threading.Event().wait(seconds)
        return seconds


class RecSlow(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(Slow)

"""Pipelines for the process-manager tests. Steps log to $DW_TEST_DIR so tests can count runs."""
import os
import threading

from marks import mark

import ductwork


class Nap(ductwork.Step):
    """Sleeps for `seconds`, marking start and end (attempt and pid) in marks.log."""

    def execute(self, seconds):
        mark(f"start {self.run_id} {self.attempt} {os.getpid()}")
        threading.Event().wait(seconds)
        mark(f"end {self.run_id} {self.attempt} {os.getpid()}")
        return seconds


def fan(n):
    return list(range(n))


def square(x):
    return x * x


def add_all(values):
    return sum(values)


def plus_one(x):
    return x + 1


def times_ten(x):
    return x * 10


class SupNap(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(Nap).chain(to=plus_one)


class SupMixed(ductwork.Pipeline):
    """chain, expand/collapse and divide/combine in one pipeline."""

    @staticmethod
    def define(p):
        p.start(fan).expand(to=square).collapse(into=add_all).divide(to=[plus_one, times_ten]).combine(into=add_all)


if os.environ.get("DW_FAIL_WORKER_HOOK"):
    @ductwork.on_worker_start
    def exploding_hook():
        raise RuntimeError("hook exploded on purpose")


if os.environ.get("DW_HOOK_LOG"):
    def _hook(name):
        def fn():
            mark(f"hook {name} {os.getpid()}")
        fn.__name__ = f"log_{name}"
        return fn
    for _kind in ("supervisor_start", "supervisor_stop", "advancer_start", "advancer_stop",
                  "worker_start", "worker_stop"):
        getattr(ductwork, f"on_{_kind}")(_hook(_kind))

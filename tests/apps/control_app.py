"""Pipelines for the run-control tests (cancel, revive, retry policies, on_complete). Steps mark what they did in
$DW_TEST_DIR/marks.log so that tests can see it from any process."""
import os
import time

from marks import mark

import ductwork

STEP_SECONDS = float(os.environ.get("DW_STEP_SECONDS", "0.3"))


def spread(n):
    return list(range(n))


def work_patiently(x, step):
    """Works for STEP_SECONDS in small slices; stops early (marking it) once ``step.should_stop``."""
    deadline = time.monotonic() + STEP_SECONDS
    while time.monotonic() < deadline:
        if step.should_stop:
            mark(f"stopped {step.run_id} {step.step_id}")
            return "late"
        time.sleep(0.01)
    return x


class Patient(ductwork.Step):
    def execute(self, x):
        return work_patiently(x, self)


def patient(x):
    """Patient as a function step: it reads should_stop through current_step()."""
    return work_patiently(x, ductwork.current_step())


def total(values):
    return sum(values)


class CancelFan(ductwork.Pipeline):
    """A fan-out of n Patient steps, collapsed."""

    @staticmethod
    def define(p):
        p.start(spread).expand(to=Patient).collapse(into=total)


class CancelChain(ductwork.Pipeline):
    """patient (a function step), then Patient."""

    @staticmethod
    def define(p):
        p.start(patient).chain(to=Patient)


def plus_one(x):
    return x + 1


class QuickChain(ductwork.Pipeline):
    """Four quick steps: cancels race their commits."""

    @staticmethod
    def define(p):
        p.start(plus_one).chain(to=plus_one).chain(to=plus_one).chain(to=plus_one)


@ductwork.step(retry=ductwork.Retry(max=3, delay=60))
def fails_once(x):
    """Fails its first attempt ever (then waits 60 s for its retry), succeeds after (a revive too)."""
    context = ductwork.current_step().context
    if not context.get("failed"):
        context.set("failed", True)
        raise RuntimeError("first attempt fails")
    return x


class RetryLater(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(fails_once).chain(to=plus_one)

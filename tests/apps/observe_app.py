"""Pipelines for the observability tests (issue 20): a step that fails its first attempt, one that runs past its
timeout on its first attempt, and a step that logs through the app's own logger and prints."""
import logging
import threading
import warnings

import ductwork

app_log = logging.getLogger("observe_app")


class Flaky(ductwork.Step):
    """Fails its first attempt (a retry follows), then passes its input on."""

    def execute(self, x):
        if self.attempt == 1:
            raise ValueError(f"first attempt of {x} fails")
        return x


class Slow(ductwork.Step):
    """Runs past its timeout on its first attempt (a StepTimeout, then a retry)."""

    timeout = 0.3

    def execute(self, x):
        if self.attempt == 1:
            threading.Event().wait(0.6)
        return x


class Chatty(ductwork.Step):
    """Logs through the app's logger, prints, warns: each a JSON line of its own in JSON mode."""

    def execute(self, x):
        app_log.info("chatty step got %s", x)
        print(f"printed {x}")
        warnings.warn(f"warned {x}", UserWarning, stacklevel=1)
        return x


class Observed(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(Flaky).chain(to=Slow).chain(to=Chatty)


def never(x):
    raise RuntimeError(f"never {x}")


class AlwaysFails(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(never)

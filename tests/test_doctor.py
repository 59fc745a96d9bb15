"""`python ductwork.py doctor` and the arithmetic behind its lines."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import ductwork


def config_of(**data) -> ductwork.Config:
    return ductwork.load_config(data={"database_url": "postgresql://u@db:5432/app", **data}, environ={})



class Lines(logging.Handler):
    """The messages of the ductwork logger while it is attached."""

    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_drain_arithmetic_and_the_log_lines_it_makes():
    """doctor's numbers are the ones the supervisor and a foreground role log at start, in the same lines as before."""
    config = config_of(supervisor={"shutdown_timeout": 31.5})
    drain = ductwork.drain_arithmetic(config, ductwork.ROLE_MODES["supervisor"])
    assert (drain.worker, drain.budget, drain.grace) == (20, 31.5, 36)
    worker = ductwork.drain_arithmetic(config, ductwork.ROLE_MODES["worker"])
    assert (worker.role, worker.key, worker.budget, worker.grace) == ("worker", "job_worker.shutdown_timeout", 20, 25)
    lines = Lines()
    ductwork.log.addHandler(lines)
    level = ductwork.log.level
    ductwork.log.setLevel(logging.INFO)
    try:
        ductwork.Supervisor.log_drain_arithmetic(SimpleNamespace(config=config, role=ductwork.ROLE_MODES["supervisor"]))
        ductwork.Runtime.log_drain_arithmetic(SimpleNamespace(config=config, spec=ductwork.ROLE_MODES["worker"],
                                                              row_role="worker"))
    finally:
        ductwork.log.removeHandler(lines)
        ductwork.log.setLevel(level)
    assert lines.messages[0] == ("drain: job workers get 20s for in-flight steps < supervisor waits 31.5s < give the "
                                 "process manager at least 36s (e.g. Kubernetes terminationGracePeriodSeconds, systemd "
                                 "TimeoutStopSec)")
    assert lines.messages[-1] == ("drain: this worker gets 20s (job_worker.shutdown_timeout) after SIGTERM; give the "
                                  "orchestrator at least 25s (terminationGracePeriodSeconds / stop_grace_period)")

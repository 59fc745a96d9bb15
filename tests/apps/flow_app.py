"""Pipelines for the flow-control tests (SPEC §17): capped steps, per tenant. Steps log to $DW_TEST_DIR."""
import os
import threading
import time

from marks import mark

import ductwork

# the cap of TenantCall: its tests read it from here (a config's job_worker.concurrency may lower it)
TENANT_CAP = 2


class TenantCall(ductwork.Step):
    """A vendor call: at most TENANT_CAP at once per tenant, across every process and host."""

    concurrency = TENANT_CAP

    def concurrency_key(self, tenant, seconds):
        return f"tenant-{tenant}"

    def execute(self, tenant, seconds):
        """Marks when it starts and ends (wall clock, this host's: the tests' processes share it)."""
        mark(f"start {tenant} {self.run_id} {self.attempt} {os.getpid()} {time.time()!r}")
        threading.Event().wait(seconds)
        mark(f"end {tenant} {self.run_id} {self.attempt} {os.getpid()} {time.time()!r}")
        return tenant


class FlowTenant(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(TenantCall)

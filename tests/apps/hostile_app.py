"""Pipelines for the hostile-step tests: steps that fork without exec, a worker that cannot start its threads.

Steps mark what happened in $DW_TEST_DIR/marks.log (one line each, written with O_APPEND).
"""
import os
import signal
import threading
import time

from marks import mark

import ductwork


def _reap(pid: int, timeout: float) -> str:
    """How the forked copy ended: "exit N", "signal N", or "alive" (then it is killed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return f"exit {os.WEXITSTATUS(status)}" if os.WIFEXITED(status) else f"signal {os.WTERMSIG(status)}"
        threading.Event().wait(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "alive"


def forks(mode):
    """Fork without exec, as a library might. "return": the copy returns from the step at once;
    "linger": the copy waits (a helper that outlives the call) until the step sends it SIGTERM."""
    pid = os.fork()
    if pid == 0:
        mark(f"copy {os.getpid()} {mode}")
        if mode == "linger":
            threading.Event().wait(30)
        return "from the copy"     # back into ductwork's worker: it must neither commit nor claim
    mark(f"parent {os.getpid()} {pid} {mode}")
    if mode == "linger":
        threading.Event().wait(0.3)
        os.kill(pid, signal.SIGTERM)
    mark(f"reaped {pid} {mode} {_reap(pid, 5)}")
    return "from the parent"


def where(value):
    mark(f"where {os.getpid()} {value.replace(' ', '_')}")
    return value


class HsFork(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(forks).chain(to=where)


class HsQuick(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(where)


if os.environ.get("DW_THREAD_LIMIT"):
    @ductwork.on_worker_start
    def limit_threads():
        """Leave room for only about three more thread stacks: the worker cannot start all its threads."""
        import resource
        stack = 256 * 2**20
        threading.stack_size(stack)
        with open("/proc/self/status") as fh:
            size = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (size + 3 * stack + 2**28, resource.RLIM_INFINITY))

#!/usr/bin/env python3
"""ductwork.py: durable multi-step pipelines on SQLite or PostgreSQL, in one file.

A map of this module, top to bottom (search for the ``# ===`` banners):

    errors & constants   exception classes, exit codes, halt reasons, wake-up channels, backoff(), record() (the
                         dataclass decorator of the module's records)
    logging              text/JSON log lines (ECS fields; in a serving process the app's loggers, warnings, prints and
                         uncaught exceptions too), password masking; this process's metrics (ProcessMetrics: the
                         histograms and counters its row carries to /metrics); OpenTelemetry tracing (_Tracing)
    config               YAML sections, strict validation, override maps
    storage              database URLs, SQLite / pg8000 connections (prepared, or pooler-safe unnamed), TLS,
                         the connection pool, Store and Tx (and the SQLite file under them), StoreSQL, migrations
    definitions          Step, Pipeline, the definition builder and its graph (waits: sleep, wait_for), and
                         schedules (Schedule: the cron parser and fire times, pure arithmetic)
    engine               records (one per row shape), SQL by table, BulkSQL, decide() and its rules,
                         Engine: trigger, claim, commit, advance, hand back, reap, revive, context
    app API              Run, run and step contexts, configure(), trigger(), run_inline(), lifecycle hooks
    wake-ups             in-process hints (Wakeups) and SQLite's cross-process ones (LocalWakeups)
    runners              the role table (ROLE_SPECS), the child pipe protocol, Fault, Outage, SystemdNotifier,
                         recycling (RecyclePolicy, re-exec), AsyncLane (async steps), and one process
                         Runtime: process row, job worker (step timeouts, answers to a cancel, recycling),
                         advancer, schedules, heartbeat & reaper, listeners, lifecycle; InlineRunner (run_inline's,
                         on the caller's thread)
    supervisor           the pre-fork process manager (single-threaded selectors loop, signal table)
    health & status      the liveness verdict (heartbeat rows, local fallback), the status report, doctor's
                         checks (DOCTOR_CHECKS) and the arithmetic they share (drain, connection demand)
    dashboard            web pages, their JSON twins, Prometheus /metrics (a table of families), and the
                         actions (cancel, revive, bulk cancel: POST only, CSRF token and Origin check)
    cli                  the table of commands (COMMANDS), argument parsing, main()

Every unit of work is a database row. A worker claims a step row, runs it, and commits
its result only if it still holds the claim (fencing); an advancer claims a branch row
whose step finished and writes the next step rows in one transaction.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import contextlib
import contextvars
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import io
import json
import logging
import os
import queue
import re
import selectors
import signal
import sqlite3
import sys
import threading
import time
import traceback
import urllib.parse
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from typing import Any

__version__ = "0.1.0"

if __name__ == "__main__":
    # `python ductwork.py` runs this file as __main__; app code that does `import ductwork`
    # must get this very module (one registry of pipelines and hooks), not a second copy.
    sys.modules.setdefault("ductwork", sys.modules[__name__])

__all__ = [
    "Step", "Pipeline", "Run", "StepRecord", "RunContext", "StepContext",
    "DuctworkError", "DefinitionError", "ConfigError", "ContextError", "StepOutputError",
    "configure", "validate", "current_step", "healthy", "migrate", "main", "cancel", "Retry", "step",
    "NonRetryable", "RetryAfter", "StepTimeout", "Schedule",
    "on_supervisor_start", "on_supervisor_stop", "on_advancer_start", "on_advancer_stop",
    "on_worker_start", "on_worker_stop", "run_inline", "__version__",
]


# =====================================================================================
# errors & constants: the exceptions ductwork raises, exit codes, halt reasons, channels
# =====================================================================================


class DuctworkError(Exception):
    """Base class of every error ductwork raises on purpose."""


class DefinitionError(DuctworkError):
    """A pipeline definition is wrong (raised at import/define time)."""


class ConfigError(DuctworkError):
    """Configuration or usage is wrong; the CLI prints it on one line and exits 2."""


class ContextError(DuctworkError):
    """A write-once context key was set again with a different value."""


class StepOutputError(DuctworkError):
    """A step returned something that is not JSON."""


class NonRetryable(Exception):  # noqa: N818 - the name users know (Hatchet's NonRetryableException)
    """Raise in a step: it fails at once, whatever its retries left (halt reason ``job_non_retryable``)."""


class RetryAfter(Exception):  # noqa: N818 - the name users know (Inngest's RetryAfterError)
    """Raise in a step: this attempt failed and the next one is claimable no sooner than ``seconds`` from now
    (instead of the retry policy's delay). It counts as an attempt: with none left, the step fails."""

    def __init__(self, seconds: float, message: str = ""):
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= MAX_DURATION:
            raise ValueError(f"RetryAfter needs seconds from 0 to {MAX_DURATION}, got {seconds!r}")
        self.seconds = float(seconds)
        super().__init__(message or f"retry after {self.seconds:g}s")


class StepTimeout(Exception):  # noqa: N818 - the error class SPEC §15 names
    """The error of an attempt still running at its step's deadline (``timeout``): recorded at the deadline,
    retried as the step's retry policy says."""


class FaultInjected(DuctworkError):
    """Raised by the fault hook's ``raise`` action (tests only)."""


class DatabaseUnavailable(DuctworkError):
    """The database could not be reached (connection refused, dropped, timed out)."""


class DatabaseReplaced(DatabaseUnavailable):
    """Another SQLite file took the database's path while this process had it open: it stops."""


class HookFailed(DuctworkError):
    """A start hook (on_supervisor_start, ...) raised: the boot fails."""


class _CorruptInput(DuctworkError):
    """A step row whose stored input is not JSON (written by hand or by an older version)."""


class _Rejected(DuctworkError):
    """An advancement whose branch claim was lost (fencing)."""


class _BadRequest(DuctworkError):
    """A query parameter or form field the dashboard cannot use (answered with 400)."""
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3

# Halt reasons (SPEC §9).
JOB_RETRIES_EXHAUSTED = "job_retries_exhausted"
JOB_CRASHES_EXHAUSTED = "job_crashes_exhausted"
CONDITION_UNMATCHED = "condition_unmatched"
MAX_FANOUT_EXCEEDED = "max_fanout_exceeded"
ADVANCER_RETRIES_EXHAUSTED = "advancer_retries_exhausted"
TRANSITION_INVALID = "transition_invalid"
DEFINITION_CHANGED = "definition_changed"
PIPELINE_NOT_CONFIGURED = "pipeline_not_configured"
JOB_NON_RETRYABLE = "job_non_retryable"     # NonRetryable raised, or the step's Retry policy gave up on the error
SIGNAL_TIMEOUT = "signal_timeout"           # a wait_for's timeout passed before its signal came
# A branch parked for a signal without a timeout waits in the advance queue at this available_at (year 36812).
PARKED_FOREVER = float(2 ** 40)

# A run's statuses; a finished one is kept for its status's retention (SPEC §18), then pruned.
RUN_STATUSES = ("in_progress", "completed", "halted", "cancelled")
FINISHED_STATUSES = ("completed", "halted", "cancelled")
# The statuses whose runs are counted off an index range (few rows each); completed runs, the many, are what
# the others leave of every run ever triggered (see "Counts (migration 2)").
COUNTED_STATUSES = tuple(status for status in RUN_STATUSES if status != "completed")
# Config `retention` (seconds; -1 keeps forever). Halted runs are kept longest: revive() can run them again.
RETENTION_DEFAULTS = {"completed": 604800, "halted": 2592000, "cancelled": 604800}
# Pruning: runs per transaction; after each, a pause of PRUNE_YIELD times what the batch took (at least
# PRUNE_PAUSE). A batch costs the machine what it costs the claims (CPU on the database host, and on SQLite
# its one writer): pruning takes a quarter of the time on Postgres, a tenth on SQLite, and still deletes
# thousands of runs a second (bench/bigdb.py).
PRUNE_BATCH = 200
PRUNE_ROWS = 5000   # steps per batch at most (a batch stops before the run that would pass it, keeps one at least)
PRUNE_PAUSE = 0.02
PRUNE_YIELD = {"postgres": 3.0, "sqlite": 9.0}
ROLLUP_CHUNK = 200_000   # ids a rollup transaction counts at most (each statement well inside a socket timeout)
# The history the dashboard charts (migration 9): once a minute by the database's clock, the first advancer
# process to ask writes each pipeline's claimable steps and the age of its oldest, and the steps finished and
# runs completed two minutes before (STATS_LAG: a transaction that began before that minute ended has
# committed), counted by duration bin; it deletes the rows older than QUEUE_SAMPLE_MINUTES (two days: the
# dashboard's longest window is one). The overview reads those, and the rows of the last minutes itself.
QUEUE_SAMPLE_MINUTES = 2880
STATS_LAG = 2
# Minutes a sample counts at most: those since the sample before (the first ever counts its own): a catch-up
# after an outage reads that many minutes of rows in one transaction, once.
STATS_CATCH_UP = 15
STATS_LIVE = 10       # minutes of rows the overview reads at most (when no sample counted them)
# Durations are counted in log-spaced bins (three per doubling, from 1 ms to 37 hours: SQL only counts, on both
# databases) and a percentile is read off them as Prometheus's histogram_quantile does, by linear interpolation
# inside its bin: the estimate and the exact value share a bin (at most 26 % apart), whatever the number of rows.
DURATION_BINS = tuple(0.001 * 2 ** (i / 3) for i in range(82))


# What the charts count, per kind: the table, its finished rows, their duration (a delayed run's from its start).
FINISHED_KINDS = {"step": ("ductwork_steps", "status IN ('succeeded', 'failed') AND claimed_at IS NOT NULL",
                           "finished_at - claimed_at"),
                  "run": ("ductwork_runs", "status = 'completed'", "finished_at - COALESCE(scheduled_at, created_at)")}


def finished_by_minute(kind: str) -> str:
    """The rows of a FINISHED_KINDS kind finished in [:start, :end), counted per minute of their finish (epoch
    minutes; integer division truncates alike on both databases), pipeline and duration bin: what the minute
    stats store and what the overview reads of the minutes not stored yet, one statement text for both."""
    table, finished, duration = FINISHED_KINDS[kind]
    return f"""
        SELECT CAST(finished_at * 1000 AS BIGINT) / 60000 AS minute, pipeline,
               {duration_bin_sql(f"({duration})")} AS bin, count(*) AS n
        FROM {table}
        WHERE {finished}
          AND finished_at >= :start AND finished_at < :end
        GROUP BY 1, 2, 3"""


def duration_bin_sql(expr: str, low: int = 0, high: int = len(DURATION_BINS)) -> str:
    """SQL giving the DURATION_BINS bin of ``expr`` (the first bin whose bound it does not pass; past the last:
    len(DURATION_BINS)): a tree of CASEs, seven comparisons a row, the same on both databases."""
    if low == high:
        return str(low)
    mid = (low + high) // 2
    return (f"CASE WHEN {expr} <= {DURATION_BINS[mid]!r} THEN {duration_bin_sql(expr, low, mid)} "
            f"ELSE {duration_bin_sql(expr, mid + 1, high)} END")

CH_JOBS, CH_ADVANCE = "ductwork_jobs", "ductwork_advance"
# A cancel's wake-up hint (payload: a pipeline): the worker processes look at once whether a step they hold was
# cancelled, instead of at their next look (CANCEL_POLL). See "Cancelling a run".
CH_CANCEL = "ductwork_cancel"
MAX_ID = 2 ** 63 - 1   # the largest id a BIGINT holds (a bigger one names no run)


def run_lock_order(run_ids: Iterable[int]) -> list[int]:
    """Run ids in the order of their lock keys (SQL.lock_runs): every transaction that takes several takes them
    in this order, so none waits for another in a circle."""
    return sorted(set(run_ids), key=lambda run_id: (run_id % SQL.RUN_LOCK_MODULUS, run_id))


# cancel()'s filters beyond the run ids (SQL.runs_to_cancel's {where}: fixed text per filter)
CANCEL_FILTERS = {"pipeline": "\n          AND pipeline = :pipeline",
                  "older_than": "\n          AND created_at < (SELECT {now}) - :older_than"}
DISCARDED_TEXT = "run cancelled: what the step returned was discarded"
CANCEL_POLL = 1.0            # seconds between a busy worker process's looks for cancelled steps it holds
CANCEL_ACK_TIMEOUT = 5.0     # how long cancel() waits for the holders of claimed steps to acknowledge
CANCEL_BATCH = 1000          # runs per cancel transaction (a bulk cancel is a few set-based statements per batch)
CANCEL_ROWS = 5000           # steps one statement of a cancel changes at most (a big fan-out takes several)
CANCEL_LEASE = CANCEL_ACK_TIMEOUT / 2   # a claim not started this long after its last confirmation is checked first

# Flow control (SPEC §17). A claim that finds a capped key's slots all held blocks those steps and claims further,
# twice as many as it blocked a round (CAP_SCAN at most), CAP_ROUNDS rounds at most: a hot key with a long backlog
# is set aside in a few claims, so the keys queued behind it are reached.
CAP_SCAN = 100
# A claim walks this many priorities one at a time (an index range each) before it takes the rest in one go.
PRIORITY_WALK = 4
# The priorities a run may have: a 32-bit column's (SQLite would take any integer; Postgres's INTEGER would not).
PRIORITY_RANGE = (-2 ** 31, 2 ** 31 - 1)
CAP_ROUNDS = 12
MAX_CONCURRENCY_KEY = 500   # characters of a concurrency key (indexed with its pipeline and step)


def _slot_lock_key(pipeline: str, name: str, key: str) -> int:
    """The second key of a concurrency key's transaction lock on Postgres (SQL.locked_slots_held): 32 bits of its
    names' CRC (two keys that share one only wait for each other)."""
    import zlib
    return zlib.crc32(f"{pipeline}\0{name}\0{key}".encode()) - 2 ** 31


def backoff(attempt: int, base: float, cap: float, jitter: float = 0.0) -> float:
    """The one backoff formula: ``base`` doubled for every attempt after the first, at most
    ``cap``, spread by up to ``jitter`` (a fraction) either way so that peers drift apart."""
    delay = min(base * 2 ** min(max(attempt - 1, 0), 62), cap)
    if jitter:
        import random  # only where peers must not retry in step
        delay *= random.uniform(1 - jitter, 1 + jitter)
    return delay


# The module's records are dataclasses with one __repr__, __eq__ and (frozen) __hash__ shared by all of them:
# before Python 3.13, dataclasses compiles each generated method apart, and with those three generated for each
# of forty classes, 172 methods cost 25 ms at every start of the module (a health check, run every few seconds,
# pays it each time; now 76 are compiled).
def _record_values(obj: Any) -> tuple:
    return tuple(getattr(obj, f.name) for f in dataclasses.fields(obj) if f.compare)


def _record_repr(self: Any) -> str:
    shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.repr)
    return f"{type(self).__qualname__}({shown})"


def _record_eq(self: Any, other: object) -> bool:
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _record_values(self) == _record_values(other)


def _record_hash(self: Any) -> int:
    return hash(_record_values(self))


def record(cls: type | None = None, /, *, frozen: bool = False, eq: bool = True) -> Any:
    """``dataclasses.dataclass`` (``frozen``; ``eq=False``: compared by identity) with the shared methods
    above: what dataclass would generate (equal when of one class with equal fields; frozen ones hash
    their fields, mutable ones are unhashable), made once for the module."""
    def wrap(cls: type) -> type:
        methods = {"__repr__": _record_repr}
        if eq:
            methods.update(__eq__=_record_eq, __hash__=_record_hash if frozen else None)
        for name, method in methods.items():
            if name not in cls.__dict__:   # a class's own method stays (Schedule's __eq__ and __hash__)
                setattr(cls, name, method)
        return dataclasses.dataclass(cls, frozen=frozen, repr=False, eq=False)
    return wrap if cls is None else wrap(cls)


# =====================================================================================
# logging: one line per event, text or JSON, with pid/role/pipeline; secrets masked; metrics; tracing
# =====================================================================================

log = logging.getLogger("ductwork")
_SECRETS: set[str] = set()
_PROCESS_ROLE = {"role": "app"}


def _remember_secret(secret: str | None) -> None:
    if secret:
        _SECRETS.add(secret)
        _SECRETS.add(urllib.parse.quote(secret, safe=""))


def mask(text: str) -> str:
    """Replace every known password in ``text`` with ``***``."""
    for secret in _SECRETS:
        if secret and secret in text:
            text = text.replace(secret, "***")
    return text


# JSON lines follow the Elastic Common Schema (ECS 8): "@timestamp", "log.level", "message", "log.logger",
# "process.pid", "process.thread.name", "error.type" / "error.message" / "error.stack_trace", "trace.id" /
# "span.id" (OpenTelemetry on), and ductwork's own under "ductwork." (role, pipeline, run_id, step_id, attempt).
# Keys are dotted, not nested (Filebeat's ndjson parser expands them; Loki and Vector take them as they are).
# "severity" repeats the level upper-case: Google Cloud Logging reads that key, and shows DEFAULT without it.
ECS_VERSION = "8.11"
# The record attributes a line shows (extra={...} of ductwork's own calls; else the step running on that thread
# or task, see _CURRENT): record attribute (the text format's key) -> JSON key.
LOG_FIELDS = {"pipeline": "ductwork.pipeline", "run": "ductwork.run_id", "step": "ductwork.step_id",
              "attempt": "ductwork.attempt"}


class _Formatter(logging.Formatter):
    """One line per record: text (``ts LEVEL [pid role thread] message k=v``) or a JSON object (ECS fields)."""

    def __init__(self, fmt: str):
        super().__init__()
        self.json = fmt == "json"

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        error = record.exc_info[1] if record.exc_info else None
        trace = self.formatException(record.exc_info) if record.exc_info and not isinstance(error, ConfigError) else ""
        kind, about = (type(error).__name__, _safe_text(error)) if error is not None else ("", "")
        failure = getattr(record, "failure", None)   # a failed attempt's stored error text: "Class: message\n..."
        if failure:
            head, _, trace = failure.partition("\n")
            kind, _, about = head.partition(": ")
        fields = _record_fields(record)
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        role = _PROCESS_ROLE["role"]
        if self.json:
            out = {"@timestamp": ts, "log.level": record.levelname.lower(), "severity": record.levelname,
                   "message": message, "log.logger": record.name, "process.pid": record.process,
                   "process.thread.name": record.threadName, "ductwork.role": role, "ecs.version": ECS_VERSION,
                   **{LOG_FIELDS.get(k, k): v for k, v in fields.items()}}
            if kind:
                out |= {"error.type": kind, "error.message": about}
                if trace:
                    out["error.stack_trace"] = trace
            if isinstance(error, ConfigError):   # a setting to fix: the fix in the message too
                out["message"] = f"{message}: {about}"
            return mask(json.dumps(out, default=str))
        if isinstance(error, ConfigError):   # a setting to fix: one line, the fix
            message += f": {about}"
        elif trace.strip():
            message += "\n" + trace.rstrip("\n")
        extra = "".join(f" {k}={v}" for k, v in fields.items())
        if not record.name.startswith("ductwork") or record.name.startswith("ductwork.app"):
            extra += f" logger={record.name}"
        return mask(f"{ts} {record.levelname:<7} [{record.process} {role} {record.threadName}] {message}{extra}")


def _safe_text(error: BaseException) -> str:
    """str() of an exception that may raise in its __str__ (a hostile step's): then its class's name."""
    try:
        return str(error)
    except Exception:
        return f"<unprintable {type(error).__name__}>"


def _record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """A record's run, step, pipeline and attempt: what its call gave (extra=), else the step running in that
    thread or task (so the app's own log lines inside a step say which), plus the trace ids when tracing is on."""
    fields = {key: getattr(record, key) for key in LOG_FIELDS if getattr(record, key, None) is not None}
    if "run" not in fields:
        current = _CURRENT.get()
        if current is not None:
            fields |= {"pipeline": current.pipeline, "run": current.run_id, "step": current.step_id,
                       "attempt": current.attempt}
    fields |= _trace_fields()
    return fields


def _trace_fields() -> dict[str, str]:
    """The current span's trace and span ids (hex), when OpenTelemetry traces this process (see "tracing")."""
    span = _Tracing.current_span()
    return {} if span is None else {"trace.id": span[0], "span.id": span[1]}


class _OutputLines(io.TextIOBase):
    """sys.stdout / sys.stderr of a serving process in JSON mode: each line written (print(), a library's
    writes, a traceback printed by hand) becomes a log record of logger ``ductwork.app.<name>``, so every line on
    stdout is one JSON object. A line is kept per thread until its newline (two steps printing at once never
    share a record). Bytes written to ``.buffer``, a write from inside logging itself (an error of a handler) and
    every other attribute of a stream go to the real one."""

    def __init__(self, name: str, stream: Any, level: int):
        super().__init__()
        self.logger, self.stream, self.level = logging.getLogger(f"ductwork.app.{name}"), stream, level
        self.local = threading.local()   # .partial: this thread's line so far; .inside: in a log call

    def write(self, text: str) -> int:
        if getattr(self.local, "inside", False):
            return self.stream.write(text)
        lines = (getattr(self.local, "partial", "") + text).split("\n")
        self.local.partial = lines.pop()
        self._emit(lines)
        return len(text)

    def _emit(self, lines: list[str]) -> None:
        self.local.inside = True
        try:
            for line in lines:
                if line.strip():
                    self.logger.log(self.level, line)
        finally:
            self.local.inside = False

    def flush(self) -> None:
        """The real stream's flush (a partial line waits for its newline: a progress bar's updates are one line)."""
        with contextlib.suppress(Exception):
            self.stream.flush()

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:   # type: ignore[override]
        return getattr(self.stream, "encoding", None) or "utf-8"

    @property
    def errors(self) -> str | None:   # type: ignore[override]
        return getattr(self.stream, "errors", None)

    def __getattr__(self, name: str) -> Any:   # buffer, reconfigure, mode, name, line_buffering...
        if name in ("stream", "local", "logger", "level"):
            raise AttributeError(name)
        return getattr(self.stream, name)


def _log_uncaught(kind: str) -> Callable[..., None]:
    """sys.excepthook / threading.excepthook: an uncaught exception as one error record (its traceback in it)."""
    def hook(*args: Any) -> None:
        if kind == "thread":
            (info,) = args
            if info.exc_type is SystemExit:
                return
            where, exc_info = f"thread {info.thread.name if info.thread else '?'}", (
                info.exc_type, info.exc_value, info.exc_traceback)
        else:
            where, exc_info = "main thread", args
        logging.getLogger("ductwork.app.uncaught").error("uncaught exception in %s", where, exc_info=exc_info)
    return hook


def setup_logging(level: str = "info", fmt: str = "text", capture: bool = False) -> None:
    """Send ductwork's log lines to stdout in the configured format (idempotent). ``capture`` (a serving process,
    config ``logger.capture``): the app's loggers (the root logger's handlers), Python warnings and uncaught
    exceptions of threads too, in the same format; in JSON mode, what is printed as well."""
    stream = sys.stdout.stream if isinstance(sys.stdout, _OutputLines) else sys.stdout
    handler = logging.StreamHandler(stream)
    handler._ductwork = True  # type: ignore[attr-defined]
    handler.setFormatter(_Formatter(fmt))
    loggers = [log, logging.getLogger()] if capture else [log]
    consoles = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    for logger in (log, logging.getLogger()):
        for old in list(logger.handlers):
            # ours (a second call), and, captured, the app's own to stdout or stderr: each line would go out twice
            if getattr(old, "_ductwork", False) or (capture and logger is not log and type(old) is logging.StreamHandler
                                                    and getattr(old, "stream", None) in consoles):
                logger.removeHandler(old)
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(level.upper())
    log.propagate = False
    if capture:
        logging.captureWarnings(True)
        sys.excepthook, threading.excepthook = _log_uncaught("main"), _log_uncaught("thread")
        if fmt == "json" and not isinstance(sys.stdout, _OutputLines):
            sys.stdout = _OutputLines("stdout", sys.stdout, logging.INFO)
            sys.stderr = _OutputLines("stderr", sys.stderr, logging.WARNING)


# -------------------------------------------------------------------------------------
# This process's histograms and counters (/metrics, see "Metrics" in the README). Kept in memory, cheap to
# add to (a bisect and a lock per observation), written to the process's row with every heartbeat (its info's
# "metrics") and exported from there by the dashboard with a label naming the process, so that a scrape of one
# endpoint gives every process's series: each only goes up while its process lives (a restart is a reset, as
# when Prometheus scrapes a restarted target), and sum(rate(...)) over them is right.
# -------------------------------------------------------------------------------------

# Upper bounds (seconds) of each histogram's buckets, +Inf implied: a no-op step takes milliseconds, a call to
# a vendor seconds, a batch job an hour; a run of a chain takes tens of milliseconds to days (sleeps, waits).
HISTOGRAM_BOUNDS = {
    "step_duration": (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
    "queue_wait": (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
    "run_duration": (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400),
}


class ProcessMetrics:
    """Per pipeline: each histogram's bucket counts (not cumulative; the last, +Inf) and sum, and counters."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.histograms: dict[str, dict[str, list[float]]] = {name: {} for name in HISTOGRAM_BOUNDS}
        self.counters: dict[str, dict[str, int]] = {}

    def observe(self, name: str, pipeline: str, value: float) -> None:
        """One observation of histogram ``name``."""
        with self.lock:
            self._observe(name, pipeline, value)

    def _observe(self, name: str, pipeline: str, value: float) -> None:
        """observe(), under the lock (a value above every bound goes to +Inf; a negative one, a clock's step back,
        to the first bucket)."""
        bounds = HISTOGRAM_BOUNDS[name]
        counts = self.histograms[name].get(pipeline)
        if counts is None:
            counts = self.histograms[name][pipeline] = [0] * (len(bounds) + 1) + [0.0]
        counts[bisect.bisect_left(bounds, value)] += 1
        counts[-1] += max(0.0, value)

    def execution(self, pipeline: str, ran_for: float, waited: float, retry: bool, timed_out: bool) -> None:
        """One step execution: its duration and queue wait, and whether it was a retry or timed out (one lock)."""
        with self.lock:
            self._observe("step_duration", pipeline, ran_for)
            self._observe("queue_wait", pipeline, waited)
            for name, happened in (("retries", retry), ("timeouts", timed_out)):
                if happened:
                    by_pipeline = self.counters.setdefault(name, {})
                    by_pipeline[pipeline] = by_pipeline.get(pipeline, 0) + 1

    def snapshot(self) -> dict:
        """What the process row's info carries: {"histograms": {name: {pipeline: [counts..., sum]}}, "counters":
        {name: {pipeline: n}}}, only what was observed."""
        with self.lock:
            return {"histograms": {name: {p: list(c) for p, c in by_pipeline.items()}
                                   for name, by_pipeline in self.histograms.items() if by_pipeline},
                    "counters": {name: dict(by_pipeline) for name, by_pipeline in self.counters.items()}}


METRICS = ProcessMetrics()   # this process's; a forked child starts its own (_after_fork_in_child)


# -------------------------------------------------------------------------------------
# Tracing (SPEC §19): OpenTelemetry, only when the opentelemetry-api package is importable and the app set a
# tracer provider (the API's default provider records nothing: then nothing is read or written for it either).
# trigger() starts and ends a span "ductwork.run <Pipeline>", child of the span current there (the web request
# that triggered the run), and stores its W3C trace context with the run (runs.trace_context, migration 8);
# each step execution, in whatever worker process, is a span "ductwork.step <Pipeline>.<Step>", child of the
# run's span, current while the step runs (the app's own spans and log lines inside it belong to it). One trace
# goes from the request through every process that ran a step. (The run span is the trigger's moment: a span
# cannot be ended by another process; the run's duration is a histogram, see ProcessMetrics.)
# -------------------------------------------------------------------------------------

TRACE_CACHE = 1000   # the runs' trace contexts a worker process keeps (one read per run, not per step)
_NO_SPAN = contextlib.nullcontext()   # step_span's when not tracing (reentrant: every thread and task shares it)


class _Tracing:
    """OpenTelemetry's modules (imported once, on first use; False when not importable) and the spans."""

    api: Any = None
    contexts: dict[int, Any] = {}   # run id -> its trace context (a carrier dict, or None: not traced)

    @classmethod
    def tracer(cls) -> Any:
        """ductwork's tracer, or None: no opentelemetry-api, or no tracer provider set by the app."""
        if cls.api is None:
            try:
                if importlib.util.find_spec("opentelemetry") is None:
                    raise ImportError("opentelemetry")
                from opentelemetry import propagate, trace
                cls.api = (trace, propagate)
            except (ImportError, ValueError):
                cls.api = False
        if not cls.api:
            return None
        trace = cls.api[0]
        if type(trace.get_tracer_provider()).__name__ in ("ProxyTracerProvider", "NoOpTracerProvider"):
            return None
        return trace.get_tracer("ductwork", __version__)

    @classmethod
    def current_span(cls) -> tuple[str, str] | None:
        """The current span's (trace id, span id) in hex, or None (never imports: a log line must not)."""
        if not cls.api:
            return None
        span_context = cls.api[0].get_current_span().get_span_context()
        if not span_context.is_valid:
            return None
        return format(span_context.trace_id, "032x"), format(span_context.span_id, "016x")

    @classmethod
    def run_span(cls, pipeline: str) -> tuple[Any, str] | None:
        """trigger(): the run's span (started, child of the current one) and its trace context as stored."""
        tracer = cls.tracer()
        if tracer is None:
            return None
        trace, propagate = cls.api
        span = tracer.start_span(f"ductwork.run {pipeline}", kind=trace.SpanKind.PRODUCER,
                                 attributes={"ductwork.pipeline": pipeline})
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        return span, _dumps(carrier)

    @classmethod
    def step_span(cls, engine: Any, c: Any) -> Any:
        """A step execution's span, current inside (None: not traced; no generator made per step for that); the
        caller records its outcome."""
        tracer = cls.tracer()
        return _NO_SPAN if tracer is None else cls._step_span(tracer, engine, c)

    @classmethod
    @contextlib.contextmanager
    def _step_span(cls, tracer: Any, engine: Any, c: Any) -> Iterator[Any]:
        trace = cls.api[0]
        try:
            parent = cls._parent(engine, c.run_id)
        except Exception as exc:   # (the database, a corrupt context: the step runs all the same, its span a root)
            log.debug("trace context of run %s unread: %s", c.run_id, exc)
            parent = None
        attributes = {"ductwork.pipeline": c.pipeline, "ductwork.run_id": c.run_id, "ductwork.step_id": c.step_id,
                      "ductwork.step": c.name, "ductwork.attempt": c.attempt}
        with tracer.start_as_current_span(f"ductwork.step {c.pipeline}.{c.name}", context=parent,
                                          kind=trace.SpanKind.CONSUMER, attributes=attributes,
                                          record_exception=False, set_status_on_exception=False) as span:
            yield span

    @classmethod
    def _parent(cls, engine: Any, run_id: int) -> Any:
        """The context of a run's span (read once per run), or None when its trigger was not traced."""
        carrier = cls.contexts.get(run_id, False)
        if carrier is False:
            if len(cls.contexts) >= TRACE_CACHE:
                cls.contexts.clear()
            with engine.store.tx(write=False) as t:
                row = t.one(SQL.run_trace_context, {"id": run_id})
            carrier = cls.contexts[run_id] = _loads(row[0]) if row and row[0] else None
        return cls.api[1].extract(carrier) if isinstance(carrier, dict) else None

    @classmethod
    def outcome(cls, span: Any, c: Any, ok: bool, text: str, error: BaseException | None) -> None:
        """A step span's outcome: the attribute, and a failure's exception and error status (an attempt past its
        deadline failed, whatever its thread returned later). Never raises: tracing never changes a result."""
        if span is None:
            return
        try:
            if c.timed_out:
                ok, text, error = False, f"{StepTimeout.__name__}: step {c.name} ran past its timeout", None
            span.set_attribute("ductwork.outcome", "succeeded" if ok else "failed")
            if not ok:
                if error is not None:
                    span.record_exception(error)
                span.set_status(cls.api[0].Status(cls.api[0].StatusCode.ERROR, text.split("\n")[0]))
        except Exception as exc:
            log.debug("span of step %s: %s", c.step_id, exc)


# =====================================================================================
# config: YAML environment sections, strict validation, per-pipeline/per-step overrides
# =====================================================================================

DEFAULT_CONFIG_PATH = "config/ductwork.yml"
DEFAULT_DATABASE_URL = "sqlite:///ductwork.sqlite3"
ROLES = ("all", "supervisor", "advancer", "worker")


def _close_matches(word: Any, choices: Iterable[str]) -> list[str]:
    import difflib  # only for error messages: not loaded on the healthy path
    return difflib.get_close_matches(str(word), list(choices), n=1)


def _fail(path: str, problem: str) -> None:
    raise ConfigError(f"config key '{path}' {problem}")


# The largest value of a duration key (seconds): one year. An infinite or absurd wait is never meant,
# and past threading.TIMEOUT_MAX a wait raises (polling_timeout: .inf would kill every worker thread).
MAX_DURATION = 365 * 86400
MAX_COUNT = 2 ** 31 - 1    # a whole-number key: it fits the INTEGER columns and parameters it is compared with


def _number(minimum: float, *, integer: bool = False, allow: tuple = (),
            maximum: float | None = None) -> Callable[[str, Any], Any]:
    """A validator for a finite number in [minimum, maximum] (or one of ``allow``); bools are not numbers.
    ``maximum`` defaults to MAX_COUNT for whole numbers and MAX_DURATION (seconds) for the others."""
    kind = "a whole number" if integer else "a number"
    also = " or " + ", ".join(map(str, allow)) if allow else ""
    top = maximum if maximum is not None else (MAX_COUNT if integer else MAX_DURATION)

    def check(path: str, value: Any) -> Any:
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type:
            _fail(path, f"must be {kind} >= {minimum}{also}, got {value!r}")
        if value != value or value in (float("inf"), float("-inf")):   # NaN compares false to everything
            _fail(path, f"must be a finite number, got {value!r}")
        if value < minimum and value not in allow:
            _fail(path, f"must be >= {minimum}{also}, got {value!r}")
        if value > top:
            _fail(path, f"must be <= {top}, got {value!r}")
        return value
    return check


def _choice(*choices: str) -> Callable[[str, Any], Any]:
    def check(path: str, value: Any) -> Any:
        if value not in choices:
            _fail(path, f"must be one of {', '.join(choices)}, got {value!r}")
        return value
    return check


def _boolean(path: str, value: Any) -> Any:
    if not isinstance(value, bool):
        _fail(path, f"must be true or false, got {value!r}")
    return value


def _string(path: str, value: Any) -> Any:
    if not isinstance(value, str) or not value:
        _fail(path, f"must be a non-empty string, got {value!r}")
    return value


def _names(path: str, value: Any) -> Any:
    """A string or a list of strings (``app``)."""
    if isinstance(value, str) and value:
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return value
    _fail(path, f"must be a string or a list of strings, got {value!r}")


def _pipelines(path: str, value: Any) -> Any:
    if value == "*":
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return value
    _fail(path, f"must be \"*\" or a list of pipeline names, got {value!r}")


class _Override:
    """A value that may be a scalar or a map ``{default: v, Pipeline: v | {default: v, Step: v}}``."""

    def __init__(self, check: Callable[[str, Any], Any], default: Any, per_step: bool = True):
        self.check, self.default, self.per_step = check, default, per_step

    def validate(self, path: str, value: Any) -> Any:
        if not isinstance(value, dict):
            return self.check(path, value)
        for key, sub in value.items():
            if not isinstance(key, str):
                _fail(f"{path}.{key}", "must be named by a string (default or a pipeline name)")
            if isinstance(sub, dict) and key != "default":
                if not self.per_step:
                    _fail(f"{path}.{key}", "takes one value per pipeline, not per step")
                for step, v in sub.items():
                    self.check(f"{path}.{key}.{step}", v)
            else:
                self.check(f"{path}.{key}", sub)
        return value


def _switches(path: str, value: Any) -> Any:
    """A mapping of names to true/false (``schedules``)."""
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, bool) for k, v in value.items()):
        _fail(path, f"must map pipeline names to true or false, got {value!r}")
    return value


MAX_THREADS_PER_PIPELINE = 256
MAX_POOL_SIZE = 256


def _optional_string(path: str, value: Any) -> Any:
    """A non-empty string, or null (not given)."""
    return value if value is None else _string(path, value)


def _thread_count(path: str, value: Any) -> Any:
    """A thread count (job_worker.count, pipeline_advancer.count): a whole number from 1 to 256."""
    _number(1, integer=True)(path, value)
    if value > MAX_THREADS_PER_PIPELINE:
        _fail(path, f"must be at most {MAX_THREADS_PER_PIPELINE} (threads per pipeline), got {value!r}")
    return value


SCHEMA: dict[str, Any] = {
    "app": (_names, None),
    "database_url": (_string, DEFAULT_DATABASE_URL),
    # connections per process (threads share them, one per running transaction); the supervisor uses one
    "pool_size": (_number(1, integer=True, maximum=MAX_POOL_SIZE), 2),
    # a direct (not pooled) Postgres URL for LISTEN when database_url goes through a transaction pooler
    "listen_url": (_optional_string, None),
    "role": (_choice(*ROLES), "all"),
    "pipelines": (_pipelines, "*"),
    "forking": (_choice("default", "none"), "default"),
    "logger": {
        "level": (_choice("debug", "info", "warning", "error"), "info"),
        "format": (_choice("text", "json"), "text"),
        # a serving process's stdout carries the app's log lines, warnings, uncaught exceptions (and, in JSON
        # mode, what it prints) in the same format; false leaves the root logger, stdout and stderr alone
        "capture": (_boolean, True),
    },
    "job_worker": {
        "count": _Override(_thread_count, 5, per_step=False),
        # async steps of a worker process running at once on its event loop (beside its ``count`` threads)
        "async_count": (_number(1, integer=True, maximum=MAX_COUNT), 100),
        "max_retry": _Override(_number(0, integer=True), 3),
        "retry_delay": _Override(_number(0), 10),
        "max_crash": _Override(_number(0, integer=True), 10),
        "polling_timeout": _Override(_number(0.001), 1, per_step=False),
        "shutdown_timeout": (_number(0), 20),
        # seconds an attempt may run (-1: no limit); a step's own ``timeout`` wins
        "timeout": _Override(_number(0.001, allow=(-1,)), -1),
        # executions of a step running at once across every process and host, per concurrency key (-1: the
        # step's own ``concurrency``, or no cap); this wins over the step's: an operator's change needs no deploy
        "concurrency": _Override(_number(1, integer=True, allow=(-1,), maximum=MAX_COUNT), -1),
        # a worker process drains and is replaced (in place, in a foreground role) once it started this many
        # steps, once its resident memory passes this many MB, or once more of its threads than this are left
        # behind by steps past their timeout (-1: never; see "Recycling")
        "recycle": {
            "steps": (_number(1, integer=True, allow=(-1,)), -1),
            "memory_mb": (_number(1, allow=(-1,), maximum=MAX_COUNT), -1),
            "abandoned_threads": (_number(0, integer=True, allow=(-1,)), 3),
        },
    },
    "pipeline_advancer": {
        "count": _Override(_thread_count, 1, per_step=False),
        "max_retry": _Override(_number(0, integer=True), 10),
        "polling_timeout": _Override(_number(0.001), 1, per_step=False),
        "shutdown_timeout": (_number(0), 20),
        "steps": {"max_depth": _Override(_number(0, integer=True, allow=(-1,)), -1)},
        # halt runs of a pipeline that neither this app nor any live process knows, once they
        # are this old (seconds); -1 = never (rolling deploys and scaled-to-zero workers wait)
        "unknown_pipeline_grace": (_number(0, allow=(-1,)), -1),
        # how often (seconds, jittered) each advancer process prunes runs past their retention
        "prune_interval": (_number(0.01), 30),
    },
    "supervisor": {
        "polling_timeout": (_number(0.001), 1),
        "shutdown_timeout": (_number(0), 30),
        "heartbeat_interval": (_number(0.01), 5),
        "hang_timeout": (_number(0.1), 60),
        "reaper_timeout": (_number(0.1), 60),
        "max_boot_failures": (_number(0, integer=True), 10),
    },
    "healthcheck": {"max_age": (_number(0.001), 300)},
    # a pipeline's schedules switched off (false) or on (true, the default) without a code change
    "schedules": (_switches, {}),
    # seconds a finished run is kept after it finished, per status; -1 keeps it forever (SPEC §18)
    "retention": {status: (_number(0, allow=(-1,), maximum=MAX_COUNT), age)
                  for status, age in RETENTION_DEFAULTS.items()},
}


def _schema_defaults(schema: dict) -> dict:
    """The default value of every key of ``schema``."""
    out: dict[str, Any] = {}
    for key, spec in schema.items():
        if isinstance(spec, dict):
            out[key] = _schema_defaults(spec)
        elif isinstance(spec, _Override):
            out[key] = spec.default
        else:
            out[key] = spec[1]
    return out


def _validate_tree(schema: dict, data: Any, prefix: str = "") -> dict:
    """Check ``data`` against ``schema`` (unknown keys get a did-you-mean); returns the checked values."""
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '(top level)'}' must be a mapping, got {data!r}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in schema:
            near = _close_matches(key, schema)
            hint = f" (did you mean '{prefix}{near[0]}'?)" if near else f" (valid keys: {', '.join(schema)})"
            raise ConfigError(f"unknown config key '{path}'{hint}")
        spec = schema[key]
        if isinstance(spec, dict):
            out[key] = _validate_tree(spec, value, path + ".")
        elif isinstance(spec, _Override):
            out[key] = spec.validate(path, value)
        else:
            out[key] = spec[0](path, value)
    return out


def _deep_merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``, mapping by mapping (an override map is replaced whole)."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not isinstance(SCHEMA.get(key), _Override):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


@record
class Config:
    """Validated configuration: ``get("job_worker.max_retry", pipeline, step)``."""

    data: dict
    path: str | None = None
    environment: str = "development"

    def get(self, key: str, pipeline: str | None = None, step: str | None = None) -> Any:
        """A setting, with the pipeline's and the step's overrides applied (zero is a value; None is not)."""
        node: Any = self.data
        spec: Any = SCHEMA
        for part in key.split("."):
            node, spec = node[part], spec[part]
        if not isinstance(node, dict) or not isinstance(spec, _Override):
            return node
        candidates = []
        per_pipeline = node.get(pipeline) if pipeline is not None else None
        if isinstance(per_pipeline, dict):
            if step is not None:
                candidates.append(per_pipeline.get(step))
            candidates.append(per_pipeline.get("default"))
        else:
            candidates.append(per_pipeline)
        candidates.append(node.get("default"))
        for value in candidates:
            if value is not None:  # zero is a real value, None means "not given here"
                return value
        return spec.default

    @property
    def role(self) -> str:
        """The configured role, with ``supervisor`` spelled ``all``."""
        return "all" if self.data["role"] == "supervisor" else self.data["role"]

    def retention(self, overrides: dict[str, float] | None = None) -> dict[str, float]:
        """The statuses whose finished runs are pruned, each with its age in seconds (-1, keep forever: left out)."""
        ages = {**self.data["retention"], **(overrides or {})}
        return {status: float(age) for status, age in ages.items() if age >= 0}

    def warnings(self) -> list[str]:
        """Settings that are valid alone but do not fit together (logged at start)."""
        out = []
        worker, sup = self.get("job_worker.shutdown_timeout"), self.get("supervisor.shutdown_timeout")
        if worker >= sup:
            out.append(f"job_worker.shutdown_timeout ({worker}s) should be below supervisor.shutdown_timeout ({sup}s)")
        if self.get("pipeline_advancer.shutdown_timeout") >= sup:
            out.append("pipeline_advancer.shutdown_timeout should be below supervisor.shutdown_timeout")
        if self.get("supervisor.reaper_timeout") <= self.get("supervisor.heartbeat_interval"):
            out.append("supervisor.reaper_timeout should be several heartbeat_interval long")
        if self.get("healthcheck.max_age") <= self.get("supervisor.heartbeat_interval"):
            out.append("healthcheck.max_age should be longer than supervisor.heartbeat_interval")
        if self.get("supervisor.heartbeat_interval") >= 60:
            out.append("supervisor.heartbeat_interval >= 60s: the health check's outage fallback accepts local proof "
                       "of life up to 60s old")
        return out


def _read_yaml(path: str) -> Any:
    """The YAML document of a config file (safe_load), or a ConfigError saying where it is wrong."""
    import yaml  # PyYAML; only safe_load is ever used
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except RecursionError:
        raise ConfigError(f"invalid YAML in {path}: nested too deeply") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"invalid YAML in {path}{at}: {problem}") from None


def _select_section(doc: Any, path: str, env_name: str) -> dict:
    """The section of this environment (DUCTWORK_ENV), the ``default`` one, or a flat file as it is."""
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    if any(key in SCHEMA for key in doc):  # a flat file: config keys at the top
        return doc
    if env_name in doc:
        section = doc[env_name]
    elif "default" in doc:
        section = doc["default"]
    else:
        typos = [(k, _close_matches(k, SCHEMA)) for k in doc]
        hint = "".join(f"; '{k}' is not a config key (did you mean '{near[0]}'?)" for k, near in typos if near)
        raise ConfigError(f"config file {path} has no section '{env_name}' and no 'default' section "
                          f"(sections: {', '.join(map(str, doc))}){hint}")
    return section or {}


def load_config(path: str | None = None, overrides: dict | None = None,
                environ: dict | None = None, data: dict | None = None) -> Config:
    """Build the configuration: flag ``overrides`` > environment > file (or ``data``) > defaults."""
    env = os.environ if environ is None else environ
    env_name = env.get("DUCTWORK_ENV") or "development"
    if path is None and data is None and os.path.exists(DEFAULT_CONFIG_PATH):
        path = DEFAULT_CONFIG_PATH
    file_data = _select_section(_read_yaml(path), path, env_name) if path else (data or {})
    merged = _deep_merge(_schema_defaults(SCHEMA), _validate_tree(SCHEMA, file_data))
    from_env: dict[str, Any] = {}
    if env.get("DUCTWORK_ROLE"):
        from_env["role"] = env["DUCTWORK_ROLE"].strip()
    url = env.get("DUCTWORK_DATABASE_URL") or env.get("DATABASE_URL")
    if url:
        from_env["database_url"] = url
    if env.get("DUCTWORK_LISTEN_URL"):
        from_env["listen_url"] = env["DUCTWORK_LISTEN_URL"]
    if env.get("DUCTWORK_APP"):
        from_env["app"] = [a for a in re.split(r"[,\s]+", env["DUCTWORK_APP"]) if a]
    for source in (from_env, {k: v for k, v in (overrides or {}).items() if v is not None}):
        merged = _deep_merge(merged, _validate_tree(SCHEMA, source))
    config = Config(merged, path, env_name)
    database = parse_database_url(config.data["database_url"])  # fail early on a bad URL
    if config.data["listen_url"] is not None:
        _check_listen_url(database, config.data["listen_url"])
    return config


def _check_listen_url(database: DatabaseInfo, url: str) -> None:
    """``listen_url``: a direct Postgres URL (LISTEN needs a session of its own), for a Postgres database."""
    if database.dialect != "postgres":
        raise ConfigError("listen_url is for a Postgres database_url behind a transaction pooler; "
                          "SQLite needs none (its wake-ups are local)")
    try:
        listen = parse_database_url(url)
    except ConfigError as exc:
        raise ConfigError(f"invalid listen_url: {str(exc).replace('database_url', 'listen_url')}") from None
    if listen.dialect != "postgres":
        raise ConfigError("listen_url must be a Postgres URL (postgresql://...): the direct URL of the database")
    if listen.pgbouncer:
        raise ConfigError("listen_url must not go through a transaction pooler (pgbouncer=true): "
                          "LISTEN needs a session of its own; give the database's direct URL")


# =====================================================================================
# storage: database URLs, connections (SQLite or pg8000), TLS, the pool, the Store, migrations
# =====================================================================================


@record(frozen=True)
class DatabaseInfo:
    """A parsed database URL (the password never shows in ``repr`` or ``display``)."""
    dialect: str                # "sqlite" | "postgres"
    path: str = ""              # sqlite file
    host: str = "localhost"
    port: int = 5432
    user: str = "postgres"
    password: str | None = dataclasses.field(default=None, repr=False)
    database: str = "postgres"
    sslmode: str = "prefer"
    connect_timeout: float = 5.0
    pgbouncer: bool = False     # behind a transaction pooler: no named prepared statements, no session state

    @property
    def display(self) -> str:
        """The URL as logs and messages show it (password masked)."""
        if self.dialect == "sqlite":
            return f"sqlite:///{self.path}"
        return f"postgresql://{self.user}{':***' if self.password else ''}@{self.host}:{self.port}/{self.database}"


def _parse_sqlite_url(url: str) -> DatabaseInfo:
    """``sqlite:///rel.db`` or ``sqlite:////abs.db``, with an optional ``?busy_timeout=S``."""
    path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
    path, _, query = path.partition("?")
    if not path:
        raise ConfigError(f"invalid SQLite URL {url!r}: use sqlite:///relative.db or sqlite:////absolute.db")
    options = dict(urllib.parse.parse_qsl(query))
    try:
        busy = float(options.pop("busy_timeout", 30))
    except ValueError:
        busy = -1.0
    if not 0 <= busy <= MAX_DURATION:   # NaN fails this too
        raise ConfigError(f"busy_timeout in a SQLite URL must be a number of seconds (0 to {MAX_DURATION})")
    if options:
        raise ConfigError(f"unknown SQLite URL option {next(iter(options))!r} (known: busy_timeout)")
    return DatabaseInfo("sqlite", path=path, connect_timeout=busy)


def _url_port(parsed: urllib.parse.SplitResult) -> int:
    """The port of a Postgres URL: 1 to 65535 (5432 when none is given; 0 is refused, not the default)."""
    try:
        port = parsed.port
    except ValueError:   # not a number, or above 65535
        port = 0
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError("invalid port in database_url: must be 1 to 65535")
    return port or 5432


def parse_database_url(url: str) -> DatabaseInfo:
    """Parse ``sqlite:///rel.db``, ``sqlite:////abs.db`` or ``postgres[ql]://user:pass@host:port/db?sslmode=...``."""
    if "\x00" in url:
        raise ConfigError("invalid database_url: it contains a NUL character")
    try:
        parsed = urllib.parse.urlsplit(url)
    except ValueError as exc:   # e.g. "Invalid IPv6 URL" for postgresql://[::1/x
        raise ConfigError(mask(f"invalid database_url: {exc}")) from None
    if parsed.scheme == "sqlite":
        return _parse_sqlite_url(url)
    if parsed.scheme in ("postgres", "postgresql"):
        password = urllib.parse.unquote(parsed.password) if parsed.password else os.environ.get("PGPASSWORD") or None
        _remember_secret(password)
        query = dict(urllib.parse.parse_qsl(parsed.query))
        sslmode = query.pop("sslmode", "prefer")
        if sslmode not in ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"):
            raise ConfigError(f"invalid sslmode {sslmode!r} in database_url")
        try:
            timeout = float(query.pop("connect_timeout", 5))
        except ValueError:
            timeout = -1.0
        if not 0 < timeout <= MAX_DURATION:   # NaN and infinity fail this too
            raise ConfigError(f"invalid connect_timeout in database_url: must be a number of seconds > 0 "
                              f"(at most {MAX_DURATION})")
        pooled = query.pop("pgbouncer", "false")
        if pooled not in ("true", "false"):
            raise ConfigError(f"invalid pgbouncer={pooled!r} in database_url: use pgbouncer=true (a transaction "
                              "pooler: PgBouncer, Supavisor, RDS Proxy) or leave it out")
        return DatabaseInfo("postgres", host=parsed.hostname or "localhost", port=_url_port(parsed),
                            user=urllib.parse.unquote(parsed.username or "") or os.environ.get("PGUSER", "postgres"),
                            password=password, database=(parsed.path or "/").lstrip("/") or "postgres",
                            sslmode=sslmode, connect_timeout=timeout, pgbouncer=pooled == "true")
    raise ConfigError(f"unsupported database_url scheme {parsed.scheme!r} (use sqlite:/// or postgresql://)")


# SQLite errors of the connection rather than of the statement (see _is_connection_error)
_SQLITE_CONNECTION_ERRORS = ("readonly database", "disk I/O error", "unable to open database file")


def _is_connection_error(exc: BaseException) -> bool:
    """Did this error come from a lost or refused connection (as opposed to a bad statement)?"""
    if isinstance(exc, (OSError, DatabaseUnavailable)):
        return True
    name = type(exc).__name__
    if name == "InterfaceError":
        return True
    text = str(exc)
    if isinstance(exc, sqlite3.OperationalError):
        # a connection opened while the file was read-only stays read-only (SQLite falls back to it
        # silently), one whose file went away fails its I/O: a new connection is the cure, or the test
        return any(sign in text for sign in _SQLITE_CONNECTION_ERRORS)
    # 57P01 admin shutdown / terminate_backend, 57P02/57P03 crash or startup, 53300 too many
    # connections, 08xxx connection class
    return any(code in text for code in ("57P01", "57P02", "57P03", "53300", "'08")) or "network error" in text


def _db_error_text(exc: BaseException) -> str:
    """pg8000 errors carry a dict of fields; show its message (and code), not the raw dict."""
    first = exc.args[0] if exc.args else None
    if isinstance(first, dict) and "M" in first:
        return f"{first['M']} ({first.get('C', '?')})"
    return str(exc)


# A statement's parameters: a sequence for ``?`` placeholders, or a dict for ``:name`` ones
# (sqlite3 and pg8000.native both take names natively; a name may appear more than once).
Params = Sequence[Any] | dict[str, Any]


class _SqliteConnection:
    """sqlite3 behind the same small interface as the Postgres connection."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn
        self.generation = 0   # Store._generation when it was opened (a newer one: the file changed)

    def execute(self, sql: str, params: Params) -> tuple[list[tuple], int]:
        cur = self.conn.execute(sql, params if isinstance(params, dict) else tuple(params))
        return (cur.fetchall() if cur.description else []), cur.rowcount

    def begin(self, write: bool) -> None:
        # IMMEDIATE takes the write lock up front: no deadlocking lock upgrades.
        self.conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def commit(self) -> None:
        self.conn.commit()

    def rollback(self) -> None:
        self.conn.rollback()

    def close(self) -> None:
        self.conn.close()


class _PgConnection:
    """pg8000.native, one round trip per statement either way:

    - direct: one server-side prepared statement per distinct SQL text (pg8000's own unnamed
      execution costs three round trips: parse, describe, execute);
    - behind a transaction pooler (``pgbouncer=true``): no named statements, which would live on
      whichever server connection the pooler lent at the time, but the unnamed statement, its
      bind, describe and execute sent together and answered by one Sync, so the pooler cannot
      hand the client another server connection in between (as libpq's PQexecParams does)."""

    MAX_PREPARED = 256

    def __init__(self, conn: Any, pooled: bool = False):
        import secrets

        from pg8000 import core, native
        self.core, self.native = core, native   # looked up once here, not at each statement
        self.conn = conn
        self.pooled = pooled
        # direct: SQL text -> (statement name, parameter maker, columns, decoders); the names are this
        # connection's own (pg8000's are pg8000_statement_0, _1... on every connection): through a
        # transaction pooler by mistake, another server connection never has a statement of that name
        # holding other SQL, so the mistake is an error ("does not exist"), never another client's SQL run
        self.prepared: dict[str, tuple] = {}
        self.prefix = f"dw_{secrets.token_hex(4)}_"
        self.named = 0
        self.parsed: dict[str, Any] = {}     # pooled: SQL text -> ($n statement, its parameter maker)
        self.generation = 0
        self.begun = False   # a BEGIN written but not yet answered (it goes with the transaction's first statement)

    def execute(self, sql: str, params: Params) -> tuple[list[tuple], int]:
        named = params if isinstance(params, dict) else {f"p{i}": value for i, value in enumerate(params)}
        if self.pooled:
            return self._execute_unnamed(sql, named)
        try:
            return self._execute_prepared(sql, named)
        except Exception as exc:
            text = _db_error_text(exc)
            if f'prepared statement "{self.prefix}' in text:   # 26000 does not exist (42P05: already exists)
                raise ConfigError(f"the database URL goes through a transaction pooler (PgBouncer, Supavisor, RDS "
                                  f"Proxy...): {text}; add ?pgbouncer=true to database_url (and set listen_url to "
                                  "the database's direct URL for wake-ups)") from None
            raise

    def _execute_prepared(self, sql: str, params: dict[str, Any]) -> tuple[list[tuple], int]:
        c, core = self.conn, self.core
        prepared = self.prepared.get(sql)
        if prepared is None:
            if len(self.prepared) >= self.MAX_PREPARED:
                if self.begun:   # (pg8000's close reads its own answer: the BEGIN's must be read first)
                    core._flush(c._sock)
                    self._answer_begin()
                for name_bin, *_ in self.prepared.values():
                    c.close_prepared_statement(name_bin)
                self.prepared.clear()
            statement, make_vals = self.native.to_statement(sql)
            name_bin = f"{self.prefix}{self.named}".encode("ascii") + core.NULL_BYTE
            self.named += 1
            c._statement_nums.add(name_bin)   # pg8000's close_prepared_statement forgets it there
            c.send_PARSE(name_bin, statement)
            c.send_DESCRIBE_STATEMENT(name_bin)
            core._write(c._sock, core.SYNC_MSG)
            core._flush(c._sock)
            described = core.Context(statement)
            self._answered(described)
            prepared = self.prepared[sql] = (name_bin, make_vals, described.columns, described.input_funcs, statement)
        name_bin, make_vals, columns, input_funcs, statement = prepared
        # (pg8000's execute_named, with the BEGIN's answer read before the statement's)
        context = core.Context(columns=columns, input_funcs=input_funcs, statement=statement)
        c.send_BIND(name_bin, core.make_params(c.py_types, make_vals(params)))
        c.send_EXECUTE()
        core._write(c._sock, core.SYNC_MSG)
        core._flush(c._sock)
        self._answered(context)
        return [tuple(r) for r in context.rows or ()], context.row_count

    def _execute_unnamed(self, sql: str, params: dict[str, Any]) -> tuple[list[tuple], int]:
        parsed = self.parsed.get(sql)
        if parsed is None:
            if len(self.parsed) >= self.MAX_PREPARED:
                self.parsed.clear()
            parsed = self.parsed[sql] = self.native.to_statement(sql)
        statement, make_vals = parsed
        c, core = self.conn, self.core
        context = core.Context(statement)
        c.send_PARSE(core.NULL_BYTE, statement)
        c.send_BIND(core.NULL_BYTE, core.make_params(c.py_types, make_vals(params)))
        c._send_message(core.DESCRIBE, core.PORTAL + core.NULL_BYTE)
        c.send_EXECUTE()
        core._write(c._sock, core.SYNC_MSG)
        core._flush(c._sock)
        self._answered(context)
        return [tuple(r) for r in context.rows or ()], context.row_count

    def _answered(self, context: Any) -> None:
        """Read the answer to what was just sent into ``context``, after a BEGIN's sent before it: a failed BEGIN's
        error is raised once both are read (the connection stays in step with the server)."""
        if self.begun:
            try:
                self._answer_begin()
            except Exception:
                with contextlib.suppress(Exception):
                    self.conn.handle_messages(context)
                raise
        self.conn.handle_messages(context)

    def _answer_begin(self) -> None:
        """Read the answer to the BEGIN written before (and sent by the flush since)."""
        self.begun = False
        self.conn.handle_messages(self.core.Context("BEGIN"))

    def _simple(self, sql: str) -> None:
        self.conn.send_QUERY(sql)
        self.core._flush(self.conn._sock)
        self._answered(self.core.Context(sql))

    def begin(self, write: bool) -> None:
        # written, not sent: it goes with the transaction's first statement, one round trip fewer per transaction
        self.conn.send_QUERY("BEGIN")
        self.begun = True

    def commit(self) -> None:
        self._simple("COMMIT")

    def rollback(self) -> None:
        self._simple("ROLLBACK")

    def close(self) -> None:
        self.conn.close()


class _Pool:
    """The connections of one process to one database, shared by its threads: a thread holds one
    only while a transaction runs, and at most ``size`` are open. A thread that finds none idle
    waits its turn: first come, first served, except that an urgent thread (the heartbeat and the
    reaper) goes to the head of the line, so it waits for one transaction to end at most, never
    behind a queue of step commits. A connection that breaks is closed and its place handed on;
    the Store opens connections (outside the pool's lock), the pool only hands out places."""

    def __init__(self, size: int):
        self.size = size
        self.lock = threading.Lock()
        self.idle: list[Any] = []        # the most recently used last: it is taken first (warm caches)
        self.opened = 0                  # connections open or being opened
        self.waiting: collections.deque[_PoolWaiter] = collections.deque()

    def acquire(self, urgent: bool = False) -> Any:
        """An idle connection, or None: a place to open one (the caller must open it, or ``give_back`` the place)."""
        with self.lock:
            if not self.waiting:
                if self.idle:
                    return self.idle.pop()
                if self.opened < self.size:
                    self.opened += 1
                    return None
            waiter = _PoolWaiter()
            if urgent:
                self.waiting.appendleft(waiter)
            else:
                self.waiting.append(waiter)
        try:
            waiter.handed.wait()
        except BaseException:   # KeyboardInterrupt, SystemExit from a signal handler: leave the line cleanly
            self._abandon(waiter)
            raise
        return waiter.conn

    def _abandon(self, waiter: "_PoolWaiter") -> None:
        """A waiter gave up: out of the line, or (handed something meanwhile) what it was handed passed on."""
        with self.lock:
            if waiter in self.waiting:
                self.waiting.remove(waiter)
                return
        if waiter.conn is not None:
            self.release(waiter.conn)
        else:
            self.give_back()

    def release(self, conn: Any) -> None:
        """A transaction is over: its connection goes to the first waiter, or back to the idle ones."""
        with self.lock:
            if self.waiting:
                waiter = self.waiting.popleft()
                waiter.conn = conn
                waiter.handed.set()
            else:
                self.idle.append(conn)

    def give_back(self) -> None:
        """A connection is gone (broken and closed, or never opened): its place goes to the first waiter."""
        with self.lock:
            if self.waiting:
                waiter = self.waiting.popleft()   # keeps the place: it opens a connection of its own
                waiter.conn = None
                waiter.handed.set()
            else:
                self.opened -= 1

    def take_idle(self) -> list[Any]:
        """Every idle connection, out of the pool (to be closed): their places are free again."""
        with self.lock:
            idle, self.idle = self.idle, []
            self.opened -= len(idle)
        return idle


class _PoolWaiter:
    """A thread waiting for a connection: handed one (``conn``), or None (a place to open one)."""
    __slots__ = ("handed", "conn")

    def __init__(self) -> None:
        self.handed = threading.Event()
        self.conn: Any = None


class _TLS:
    """The SSL contexts of this process, one per sslmode, each made when a server first agrees to
    TLS in that mode (left to itself, pg8000 builds a default context for every connection, loading
    the system CA bundle, about 17 ms of CPU, even when the server has no TLS or verification is off)."""

    contexts: dict[str, Any] = {}

    @classmethod
    def context(cls, mode: str) -> Any:
        ctx = cls.contexts.get(mode)
        if ctx is None:
            import ssl
            if mode in ("verify-ca", "verify-full"):   # the server's certificate must chain to a trusted CA
                ctx = ssl.create_default_context()
                ctx.check_hostname = mode == "verify-full"
            else:                                      # prefer, allow, require: encrypted, not verified (as libpq)
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            cls.contexts[mode] = ctx
        return ctx


# The protocol's SSLRequest (its length, 8, then the request code 80877103), answered by one byte: S or N.
_SSL_REQUEST = (8).to_bytes(4, "big") + (80877103).to_bytes(4, "big")
_SSLMODES_PLAIN_OK = ("disable", "allow", "prefer")


def _pg_socket(info: DatabaseInfo) -> Any:
    """A socket connected to ``info``'s server with TLS settled as libpq's sslmode says, for pg8000
    to log in on. A server without TLS answers the request with N and the login goes on plain on
    the same socket (prefer, allow), as libpq does: pg8000 by itself either builds a default context
    first or fails, and a second connect cost every process a TCP handshake and a backend's refusal.
    Its timeout (``connect_timeout``) stays the socket's, as pg8000 sets it."""
    import socket
    sock = socket.create_connection((info.host, info.port), info.connect_timeout)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)   # as pg8000 does: a vanished peer is found
        if info.sslmode == "disable":
            return sock
        sock.sendall(_SSL_REQUEST)
        answer = sock.recv(1)
        if answer == b"S":
            return _TLS.context(info.sslmode).wrap_socket(sock, server_hostname=info.host)
        if answer == b"N" and info.sslmode in _SSLMODES_PLAIN_OK:
            return sock
        raise DatabaseUnavailable(f"the server refuses SSL (sslmode={info.sslmode})" if answer == b"N"
                                  else "network error: no answer to the SSL request")
    except BaseException:
        sock.close()
        raise


def _defer_scramp() -> None:
    """pg8000 imports scramp eagerly, and scramp loads asn1crypto's X.509 parser: about 11 MB
    and 20 ms in every process that talks to Postgres (the supervisor, each child, every
    health check), needed only when the server asks for SCRAM authentication. Stand in for
    the module until pg8000 first uses it (``scramp.ScramClient`` during a SCRAM login)."""
    if "scramp" in sys.modules:
        return
    import types
    proxy = types.ModuleType("scramp", "deferred: the real scramp is imported on first use")

    def load(name: str) -> Any:
        if sys.modules.get("scramp") is proxy:
            del sys.modules["scramp"]
        real = importlib.import_module("scramp")
        proxy.__dict__.update({k: v for k, v in vars(real).items() if not k.startswith("__")})
        return getattr(real, name)

    proxy.__getattr__ = load  # type: ignore[method-assign]
    sys.modules["scramp"] = proxy


class _ForeignConnection:
    """trigger(connection=) (SPEC §19): the caller's own connection (sqlite3, pg8000.native or pg8000's DB-API,
    psycopg 3, psycopg2) behind the interface of _SqliteConnection / _PgConnection. ductwork's statements run in
    whatever transaction it has open; ductwork never begins, commits or rolls it back (the DB-API drivers begin
    one by themselves at the first statement, when the caller has not). The ``:name`` parameters of ductwork's
    SQL become the driver's own style; a ``%`` in a statement is doubled for the drivers that format."""

    DRIVERS = {"sqlite3": ("sqlite", "sqlite3"), "pg8000.native": ("postgres", "native"),
               "pg8000.dbapi": ("postgres", "pg8000"), "pg8000.legacy": ("postgres", "pg8000"),
               "psycopg": ("postgres", "pyformat"), "psycopg2": ("postgres", "pyformat")}
    PARAMETER = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")   # :name, never a ::cast

    TEXTS: dict[tuple[str, str], tuple[str, list[str]]] = {}   # (driver, ductwork's SQL) -> the driver's, its names

    def __init__(self, conn: Any, driver: str):
        self.conn, self.driver = conn, driver

    @classmethod
    def of(cls, conn: Any, info: DatabaseInfo) -> "_ForeignConnection":
        """The adapter of ``conn``, checked: a driver ductwork knows, on the configured database (DuctworkError)."""
        module = type(conn).__module__
        known = next((v for k, v in cls.DRIVERS.items() if module == k or module.startswith(k + ".")), None)
        if known is None:
            raise DuctworkError(f"trigger(connection=): a {module}.{type(conn).__name__} is not a connection "
                                "ductwork can write on (sqlite3, pg8000, psycopg 3, psycopg2)")
        dialect, driver = known
        if "Async" in type(conn).__name__:
            raise DuctworkError(f"trigger(connection=): {type(conn).__name__} is asynchronous; give a synchronous "
                                "connection (its transaction is what the run joins)")
        if dialect != info.dialect:
            raise DuctworkError(f"trigger(connection=): a {dialect} connection, but the configured database is "
                                f"{info.display}")
        if cls.autocommits(conn, driver):
            raise DuctworkError("trigger(connection=): the connection is in autocommit mode, so the run would not "
                                "be part of a transaction of yours (pg8000.native: run BEGIN first)")
        adapter = cls(conn, driver)
        adapter.check_database(info)
        return adapter

    @staticmethod
    def autocommits(conn: Any, driver: str) -> bool:
        """Would each statement commit by itself: a connection in autocommit mode (pg8000.native always is;
        sqlite3 also with isolation_level None) outside a transaction it began (BEGIN, psycopg's transaction())?"""
        module = type(conn).__module__
        if driver == "sqlite3":
            autocommit = getattr(conn, "autocommit", None) is True or conn.isolation_level is None
            return autocommit and not conn.in_transaction
        if driver != "native" and getattr(conn, "autocommit", False) is not True:
            return False   # (the driver begins a transaction at the first statement)
        if module.startswith("psycopg2"):
            import psycopg2.extensions
            return conn.get_transaction_status() != psycopg2.extensions.TRANSACTION_STATUS_INTRANS
        if module.startswith("psycopg"):
            import psycopg.pq
            return conn.info.transaction_status != psycopg.pq.TransactionStatus.INTRANS
        return getattr(conn, "_transaction_status", None) != b"T"   # (pg8000: its last ReadyForQuery)

    def _cursor(self) -> Any:
        """A cursor of the caller's connection that gives rows as tuples, whatever row factory the connection
        has (psycopg's dict_row, psycopg2's RealDictCursor, a sqlite3 row_factory)."""
        module = type(self.conn).__module__
        if module.startswith("psycopg2"):
            import psycopg2.extensions
            return self.conn.cursor(cursor_factory=psycopg2.extensions.cursor)
        if module.startswith("psycopg"):
            import psycopg.rows
            return self.conn.cursor(row_factory=psycopg.rows.tuple_row)
        cur = self.conn.cursor()
        if self.driver == "sqlite3":
            cur.row_factory = None
        return cur

    def check_database(self, info: DatabaseInfo) -> None:
        """The connection's database is the configured one: the same SQLite file, or a Postgres database of the
        same name (its host cannot be told apart from behind a pooler or a proxy)."""
        if info.dialect == "sqlite":
            files = {name: path for _, name, path in self.execute(StoreSQL.database_files, ())[0]}
            same = bool(files.get("main")) and os.path.realpath(files["main"]) == os.path.realpath(info.path)
            where = files.get("main") or "an in-memory database"
        else:
            where = self.execute(StoreSQL.database_name, ())[0][0][0]
            same = where == info.database
        if not same:
            raise DuctworkError(f"trigger(connection=): the connection is to {where}, but the configured database "
                                f"is {info.display}")

    def execute(self, sql: str, params: Params) -> tuple[list[tuple], int]:
        named = params if isinstance(params, dict) else {f"p{i}": value for i, value in enumerate(params)}
        if self.driver == "native":
            rows = self.conn.run(sql, **named)
            return [tuple(row) for row in rows or []], self.conn.row_count
        cur = self._cursor()
        try:
            if self.driver == "sqlite3":
                cur.execute(sql, params if isinstance(params, dict) else tuple(params))
            elif self.driver == "pg8000" and self._pg8000_style() == "named":
                cur.execute(sql, named)
            else:   # format (pg8000's default: %s and a sequence) or pyformat (psycopg: %(name)s and a mapping)
                text, names = self._formatted(sql)
                cur.execute(text, tuple(named[n] for n in names) if self.driver == "pg8000" else named)
            rows = [tuple(row) for row in cur.fetchall()] if cur.description else []
            return rows, cur.rowcount
        finally:
            cur.close()

    @staticmethod
    def _pg8000_style() -> str:
        import pg8000.dbapi
        style = pg8000.dbapi.paramstyle
        if style not in ("format", "pyformat", "named"):
            raise DuctworkError(f"trigger(connection=): pg8000.dbapi.paramstyle {style!r}: ductwork writes with "
                                "format, pyformat or named")
        return style

    def _formatted(self, sql: str) -> tuple[str, list[str]]:
        """``sql`` in the format style (%s, the parameters' names in order) or the pyformat one (%(name)s)."""
        done = self.TEXTS.get((self.driver, sql))
        if done is None:
            names: list[str] = []
            pyformat = self.driver == "pyformat"

            def placeholder(m: re.Match) -> str:
                names.append(m.group(1))
                return f"%({m.group(1)})s" if pyformat else "%s"
            done = self.PARAMETER.sub(placeholder, sql.replace("%", "%%")), names
            self.TEXTS[(self.driver, sql)] = done
        return done


class Tx:
    """One open transaction: ``all``/``one``/``run`` statements with ``?`` or ``:name``
    parameters and the placeholders of ``Store.sql``; wake-up hints go out after it commits."""

    def __init__(self, store: "Store", conn: Any):
        self.store, self.conn = store, conn
        self.pending: list[tuple[str, str]] = []   # wake-up hints (channel, payload) to deliver after commit
        self.measured: list[tuple[str, str, float]] = []   # (histogram, pipeline, value): METRICS, once committed
        self.slot_locks: set[int] = set()   # Postgres: the concurrency keys' locks it holds (Engine._slots_held)
        self.slots_freed: list[tuple[str, str, str]] = []   # slots its writes let go of (Engine.free_slots)

    @property
    def dialect(self) -> str:
        """"sqlite" or "postgres"."""
        return self.store.dialect

    def all(self, sql: str, params: Params = ()) -> list[tuple]:
        """Execute; return every row."""
        return self.conn.execute(self.store.sql(sql), params)[0]

    def one(self, sql: str, params: Params = ()) -> tuple | None:
        """Execute; return the first row, or None."""
        rows = self.all(sql, params)
        return rows[0] if rows else None

    def run(self, sql: str, params: Params = ()) -> int:
        """Execute; return the affected row count."""
        return self.conn.execute(self.store.sql(sql), params)[1]

    def notify(self, channel: str, payload: str = "") -> None:
        """A wake-up hint, delivered once this transaction commits (once per channel and payload)."""
        if (channel, payload) not in self.pending:
            self.pending.append((channel, payload))


class StoreSQL:
    """The storage layer's own statements: notifications, the clock, the migrations' bookkeeping."""

    # Deliver a wake-up hint (Postgres: at commit, to every LISTENing session).
    notify = """
        SELECT pg_notify(:channel, :payload)"""

    # trigger(connection=): the files of a caller's SQLite connection ((seq, name, file) rows; "main" is its
    # database), and the database of a caller's Postgres one.
    database_files = """
        PRAGMA database_list"""
    database_name = """
        SELECT current_database()"""

    # Subscribe this session to a wake-up channel (a constant name: LISTEN takes no parameter).
    listen = """
        LISTEN {channel}"""

    # A round trip that delivers the notifications waiting for a LISTENing session.
    ping = """
        SELECT 1"""

    # The database server's clock.
    now = """
        SELECT {now}"""

    # One migrator at a time (Postgres; SQLite's write lock does it there). The key spells "ductw".
    migration_lock = """
        SELECT pg_advisory_xact_lock(:key)"""
    MIGRATION_LOCK_KEY = 0x6475637477

    # The migrations' own table.
    create_migrations = """
        CREATE TABLE IF NOT EXISTS ductwork_schema_migrations (
            version INTEGER PRIMARY KEY,
            applied_at TEXT NOT NULL)"""

    # The versions applied so far.
    applied_versions = """
        SELECT version
        FROM ductwork_schema_migrations"""

    # The newest version applied.
    schema_version = """
        SELECT max(version)
        FROM ductwork_schema_migrations"""

    # Is this version recorded?
    version_applied = """
        SELECT 1
        FROM ductwork_schema_migrations
        WHERE version = :version"""

    # Postgres: which of these indexes (:names, an array literal) exist, and whether each is valid.
    index_validity = """
        SELECT c.relname, i.indisvalid
        FROM pg_index i
        JOIN pg_class c ON c.oid = i.indexrelid
        WHERE c.relname = ANY(CAST(:names AS TEXT[]))
          AND c.relnamespace = CAST(current_schema() AS regnamespace)"""

    # Postgres: an index by name, valid or not, and whether something may be building it now: a CREATE INDEX
    # CONCURRENTLY holds SHARE UPDATE EXCLUSIVE on the table until the index is valid (so does a vacuum: then
    # the caller merely waits a little longer before it drops a leftover).
    index_state = """
        SELECT i.indisvalid,
               EXISTS (SELECT 1 FROM pg_locks l
                       WHERE l.relation = i.indrelid AND l.mode = 'ShareUpdateExclusiveLock' AND l.granted)
        FROM pg_index i
        JOIN pg_class c ON c.oid = i.indexrelid
        WHERE c.relname = :name
          AND c.relnamespace = CAST(current_schema() AS regnamespace)"""

    # A migration was applied.
    record_version = """
        INSERT INTO ductwork_schema_migrations (version, applied_at)
        VALUES (:version, :applied_at)"""


# SQLite checkpoints the -wal into the database file every 1000 pages, then writes it again from its start; the
# -wal file keeps the largest size it ever reached (a burst, or a checkpoint held back by long readers) unless
# this limit (bytes) truncates it after a checkpoint.
SQLITE_WAL_LIMIT = 64 * 1024 * 1024

# The SQLite files this process (or, inherited at fork, its supervisor) has had open: once a
# file was there, a missing one is an outage to wait out, never a new empty database to create
# (a child restarted while the file was moved away would create one, and a move back would then
# lose the real one). Only a process that never opened it may create it: migrate, a first boot.
_SQLITE_OPENED: set[str] = set()


def _sqlite_opened(path: str) -> bool:
    """Has this process (or the supervisor it was forked from) had the SQLite file at ``path`` open?"""
    return os.path.realpath(path) in _SQLITE_OPENED


class Store:
    """Connections to one database: a pool shared by the threads of this process (``pool_size``), new
    after fork, a broken connection replaced by a new one."""

    # What the placeholders of a statement become on each database.
    NOW = {"sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
           "postgres": "(extract(epoch from clock_timestamp())::float8)"}
    LOCKS = {"postgres": {"{skip_locked}": "FOR UPDATE SKIP LOCKED", "{for_update}": "FOR UPDATE",
                          "{key_share}": "FOR KEY SHARE"},
             "sqlite": {"{skip_locked}": "", "{for_update}": "", "{key_share}": ""}}  # one writer at a time

    def __init__(self, url: str, connect_timeout: float | None = None, read_only: bool = False,
                 pool_size: int = 1, listen_url: str | None = None):
        self.url = url
        self.info = parse_database_url(url)
        if connect_timeout is not None:
            self.info = dataclasses.replace(self.info, connect_timeout=connect_timeout)
        # where Postgres wake-ups are listened for: LISTEN is session state, which a transaction
        # pooler does not keep, so behind one only listen_url (a direct URL) serves; none: polling
        self.listen_info: DatabaseInfo | None = None
        if listen_url is not None:
            self.listen_info = parse_database_url(listen_url)
        elif self.info.dialect == "postgres" and not self.info.pgbouncer:
            self.listen_info = self.info
        self.read_only = read_only
        self.dialect = self.info.dialect
        self.pool_size = pool_size
        self._pool = _Pool(pool_size)
        self._holding = threading.local()   # .tx: inside a transaction; .urgent: first in line
        self._pid = os.getpid()
        self._sql: dict[str, str] = {}
        self.notify_hook: Callable[[str, str], None] | None = None  # in-process wake-ups
        # SQLite: the file the connections have open, (st_dev, st_ino) once one has; a new
        # generation makes every thread drop its connection at its next transaction
        self._file_id: tuple[int, int] | None = None
        self._file_lock = threading.Lock()
        # an error that ends this process (Runtime and Supervisor look at it): the SQLite file replaced
        # under it (DatabaseReplaced), or a transaction pooler behind a URL without pgbouncer=true (ConfigError)
        self.fatal: DuctworkError | None = None
        self._file_missing = False
        self._next_file_check = 0.0
        self._generation = 0

    # -- connections ------------------------------------------------------------------
    def _connect_sqlite(self) -> Any:
        """A new SQLite connection of this thread (WAL; read-only for a probe)."""
        if self.read_only:  # a probe must not create the file or wait on locks for long
            try:
                return _SqliteConnection(sqlite3.connect(self._sqlite_uri("ro"), uri=True,
                                                         timeout=self.info.connect_timeout, isolation_level=None))
            except sqlite3.Error as exc:
                raise DatabaseUnavailable(f"cannot open {self.info.display}: {exc}") from None
        if self._file_id is not None or _sqlite_opened(self.info.path):   # never an empty file in its place
            try:
                conn = sqlite3.connect(self._sqlite_uri("rw"), uri=True,
                                       timeout=self.info.connect_timeout, isolation_level=None,
                                       check_same_thread=False)
                self._use_wal(conn)
            except sqlite3.Error as exc:
                if not os.path.exists(self.info.path):   # what is still open of the old file goes too
                    with self._file_lock:
                        self._file_gone()
                    raise DatabaseUnavailable(self._missing_file_text()) from None
                raise DatabaseUnavailable(f"cannot open {self.info.display}: {exc}") from None
            with contextlib.suppress(OSError):
                self._file_id = self._file_id or self._file_identity()
            _SQLITE_OPENED.add(os.path.realpath(self.info.path))
            return _SqliteConnection(conn)
        # busy_timeout: how long a writer waits for the lock before the caller backs off and retries
        try:
            conn = sqlite3.connect(self.info.path, timeout=self.info.connect_timeout, isolation_level=None,
                                   check_same_thread=False)
            self._use_wal(conn)
            with contextlib.suppress(OSError):
                self._file_id = self._file_identity()
            _SQLITE_OPENED.add(os.path.realpath(self.info.path))
        except sqlite3.OperationalError as exc:
            if "unable to open" in str(exc):
                raise ConfigError(f"cannot open SQLite database {self.info.path} ({exc}; is the directory "
                                  "writable?); set database_url or DATABASE_URL") from None
            raise
        except sqlite3.DatabaseError as exc:   # "file is not a database": nothing was written to it
            raise ConfigError(f"cannot open SQLite database {self.info.path}: {exc}; "
                              "check database_url or DATABASE_URL") from None
        return _SqliteConnection(conn)

    # -- SQLite: the file under the connections ------------------------------------------
    # A connection keeps the file it opened: deleted or moved, the file lives on unlinked, and
    # commits go where nobody will read them; replaced (a restore), the connections still see the
    # old one. So the path is checked against the file opened (device and inode), once a second at
    # most, at the start of a transaction.
    FILE_CHECK_EVERY = 1.0

    def _use_wal(self, conn: sqlite3.Connection) -> None:
        """Put the file in WAL mode (it stays so: later connections find it there). Switching needs the
        file to itself for a moment, and SQLite answers "database is locked" at once, without its busy
        timeout, when another connection is opening a new file at the same time: retried within it."""
        deadline = time.monotonic() + self.info.connect_timeout
        while True:
            try:
                if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(f"PRAGMA journal_size_limit = {SQLITE_WAL_LIMIT}")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
            threading.Event().wait(0.005)

    def _sqlite_uri(self, mode: str) -> str:
        """The file as an SQLite URI opened in ``mode`` (ro, rw): never created. An absolute path goes after
        an empty authority, so one that starts with // is not read as a host name."""
        path = urllib.parse.quote(self.info.path)
        return f"file://{path}?mode={mode}" if self.info.path.startswith("/") else f"file:{path}?mode={mode}"

    def _file_identity(self) -> tuple[int, int]:
        st = os.stat(self.info.path)
        return st.st_dev, st.st_ino

    def _missing_file_text(self) -> str:
        return (f"the SQLite database file {self.info.path} was deleted or moved while in use; waiting for it "
                "to come back (restore it, or run migrate for a new one)")

    def _check_file(self) -> None:
        """Is the file at the path still the one this process opened? Gone: every connection is
        dropped and DatabaseUnavailable raised until it is back, or until a new file is (the process
        goes on with that: nothing of the old one is open any more). Another file there while the
        old one was open (a restore while running): SQLite would pair it with the old file's -wal
        (by name), and what this process does next would mix the two; so nothing more is done
        (DatabaseReplaced, a kind of DatabaseUnavailable, from now on) and the process stops
        (Runtime and Supervisor look at ``fatal``): a restart opens the new file cleanly."""
        with self._file_lock:
            self._next_file_check = time.monotonic() + self.FILE_CHECK_EVERY
            if isinstance(self.fatal, DatabaseReplaced):
                raise DatabaseReplaced(self._replaced_text())
            try:
                found: tuple[int, int] | None = self._file_identity()
            except FileNotFoundError:
                found = None
            except OSError:   # e.g. a directory made unreadable: the connection's own errors tell
                return
            if found == self._file_id:   # (a new file may get the old one's inode number: then it is taken as is)
                self._file_missing = False
                return
            if found is None:
                self._file_gone()
                raise DatabaseUnavailable(self._missing_file_text())
            self._drop_connections()
            if self._file_missing:   # its connections went when the old file did: the new one is safe to use
                log.warning("a new SQLite database file is at %s: this process goes on with it", self.info.path)
                self._file_id, self._file_missing = found, False
                return
            self.fatal = DatabaseReplaced(self._replaced_text())
            log.error("%s", self._replaced_text())
            raise self.fatal

    def _drop_connections(self) -> None:
        """Every connection of the file opened so far goes: the idle ones now, the busy ones when their
        transaction ends (a new generation)."""
        self._generation += 1
        self.close()

    def _file_gone(self) -> None:
        """The file is not at its path: its connections go; the next file there is a new one."""
        self._drop_connections()
        self._file_missing = True

    def _replaced_text(self) -> str:
        return (f"the SQLite database file {self.info.path} was replaced while in use (another file has its path "
                "now): stopping; start again once the new file is in place (with the old file's -wal and -shm "
                "moved away)")

    def _connect(self) -> Any:
        """A new connection for the pool: SQLite (WAL) or pg8000 (TLS as the sslmode says)."""
        if self.dialect == "sqlite":
            return self._connect_sqlite()
        return self._connect_pg(self.info)

    def listen_connection(self) -> Any:
        """A raw pg8000 connection for LISTEN, outside the pool and never through a transaction pooler:
        to ``listen_url`` when given, else to the database (see ``listen_info``)."""
        assert self.listen_info is not None
        return self._connect_pg(self.listen_info).conn

    @staticmethod
    def _connect_pg(info: DatabaseInfo) -> Any:
        """A new pg8000 connection to ``info``'s database, on a socket whose TLS is settled (``_pg_socket``)."""
        try:
            _defer_scramp()
            import pg8000.native
        except ImportError:
            raise ConfigError("PostgreSQL URLs need pg8000: pip install pg8000") from None
        try:
            sock = _pg_socket(info)
            try:
                return _PgConnection(pg8000.native.Connection(
                    user=info.user, password=info.password, database=info.database, sock=sock, ssl_context=False,
                    application_name="ductwork"), pooled=info.pgbouncer)
            except BaseException:
                sock.close()
                raise
        except Exception as exc:
            if info.password is None and isinstance(exc, AttributeError):   # pg8000 on a password request
                raise DatabaseUnavailable(f"cannot connect to {info.display}: the server asks for a password and "
                                          "none was given (put it in the URL or PGPASSWORD)") from None
            raise DatabaseUnavailable(mask(f"cannot connect to {info.display}: {_db_error_text(exc)}")) from None

    def _forked(self) -> bool:
        """In a child forked since the pool was made: the parent's connections are forgotten, never
        touched (closing a Postgres one would end the parent's session); the child opens its own."""
        if os.getpid() == self._pid:
            return False
        self._pool = _Pool(self.pool_size)
        self._pid = os.getpid()
        return True

    def _acquire(self, urgent: bool) -> Any:
        """A connection of the pool for one transaction: idle, or opened in a free place."""
        self._forked()
        if self._file_id is not None and time.monotonic() >= self._next_file_check:
            self._check_file()
        conn = self._pool.acquire(urgent)
        if conn is not None and conn.generation != self._generation:   # opened on a file since gone
            with contextlib.suppress(Exception):
                conn.close()
            conn = None
        if conn is None:
            generation = self._generation
            try:
                conn = self._connect()
            except BaseException:
                self._pool.give_back()
                raise
            conn.generation = generation
        return conn

    def mark_urgent(self) -> None:
        """This thread goes first whenever it waits for a connection (the heartbeat thread: a healthy process
        must never look dead because its heartbeat waited behind a queue of step commits)."""
        self._holding.urgent = True

    def close(self) -> None:
        """Close the idle connections of this process (those of running transactions go when they end);
        after fork, forget the parent's. The pool opens new ones as they are needed."""
        if self._forked():
            return
        for conn in self._pool.take_idle():
            with contextlib.suppress(Exception):
                conn.close()

    @contextlib.contextmanager
    def tx(self, write: bool = True, single: bool = False, kind: type[Tx] = Tx) -> Iterator[Any]:
        """A transaction (a ``kind``, Tx or a subclass) on a connection of the pool, held until it ends.
        ``single``: the body runs exactly one statement, which Postgres runs as its own transaction
        (one round trip instead of BEGIN, statement, COMMIT); SQLite still opens it with BEGIN IMMEDIATE
        (a read that upgrades to a write in autocommit could fail on a busy snapshot), which costs
        nothing there. A thread marked ``urgent`` is first in line for the connection."""
        if getattr(self._holding, "tx", False):   # it would wait for a second connection of a full pool forever
            raise RuntimeError("a transaction inside a transaction of the same thread")
        conn = self._acquire(getattr(self._holding, "urgent", False))
        self._holding.tx = True
        explicit = not (single and self.dialect == "postgres")
        broken = False
        try:
            if explicit:
                conn.begin(write)
            t = kind(self, conn)
            yield t
            if self.dialect == "postgres":  # NOTIFY is delivered at commit; sent last so hints can be dropped
                for channel, payload in t.pending:
                    t.run(StoreSQL.notify, {"channel": channel, "payload": payload})
            if explicit:
                conn.commit()
        except BaseException as exc:
            try:
                conn.rollback()
                rolled_back = True
            except Exception:   # a connection that cannot roll back is not handed out again
                rolled_back = False
            broken = (not rolled_back or _is_connection_error(exc) or isinstance(exc, ConfigError)
                      or (self.dialect == "postgres" and not isinstance(exc, DuctworkError)))
            if broken:
                self._next_file_check = 0.0   # SQLite: is the file still there? (at the next transaction)
            if isinstance(exc, ConfigError):   # a pooler's mix-up: this process must stop (see fatal)
                self.fatal = self.fatal or exc
            if _is_connection_error(exc) and not isinstance(exc, DatabaseUnavailable):
                raise DatabaseUnavailable(mask(f"database error: {_db_error_text(exc)}")) from exc
            raise
        finally:
            self._holding.tx = False
            self._release(conn, broken)
        self._committed(t)

    def _committed(self, t: Tx) -> None:
        """After ``t`` committed: its wake-up hints out, its measurements into this process's metrics."""
        if t.pending:
            self._deliver(t.pending)
        for name, pipeline, value in t.measured:
            METRICS.observe(name, pipeline, value)

    @contextlib.contextmanager
    def borrowed(self, connection: Any, kind: type[Tx] = Tx) -> Iterator[Any]:
        """A transaction of the caller's (trigger(connection=)): statements on ``connection``, inside whatever
        transaction it has open, never begun, committed or rolled back here. Postgres: the wake-up hints go as
        NOTIFY in it, delivered if it commits, dropped if it rolls back; SQLite: none (a commit here cannot be
        seen: the workers find the rows at their next poll)."""
        t = kind(self, _ForeignConnection.of(connection, self.info))
        yield t
        if self.dialect == "postgres":
            for channel, payload in t.pending:
                t.run(StoreSQL.notify, {"channel": channel, "payload": payload})

    def _release(self, conn: Any, broken: bool) -> None:
        """A transaction ended: its connection back to the pool; one that may be broken is closed instead,
        never handed out again."""
        if not broken and conn.generation == self._generation:
            self._pool.release(conn)
            return
        with contextlib.suppress(Exception):
            conn.close()
        self._pool.give_back()

    def _deliver(self, pending: list[tuple[str, str]]) -> None:
        """After a commit: its wake-up hints to other processes (SQLite; Postgres sent NOTIFY) and this one."""
        if self.dialect == "sqlite":
            LocalWakeups.send(self.info.path, pending, skip_own=self.notify_hook is not None)
        if self.notify_hook:
            for channel, payload in pending:
                self.notify_hook(channel, payload)

    def sql(self, text: str) -> str:
        """The statement as this database runs it: placeholders filled in (once per text)."""
        out = self._sql.get(text)
        if out is None:
            out = text.replace("{now}", self.NOW[self.dialect])
            for placeholder, lock in self.LOCKS[self.dialect].items():
                out = out.replace(placeholder, lock)
            if self.dialect == "postgres" and "?" in out:  # pg8000.native names every parameter
                counter = iter(range(1 << 16))
                out = re.sub(r"\?", lambda _: f":p{next(counter)}", out)
            self._sql[text] = out
        return out

    def now(self) -> float:
        """The database server's clock, epoch seconds."""
        with self.tx(write=False) as t:
            return float(t.one(StoreSQL.now)[0])


def _retry_conflicts(fn: Callable[[], Any], attempts: int = 5, lock_timeouts: bool = False) -> Any:
    """Re-run a transaction that Postgres aborted as a deadlock or serialization failure (``lock_timeouts``:
    or as a lock timeout, for a transaction that sets one)."""
    codes = ("40P01", "40001", "55P03") if lock_timeouts else ("40P01", "40001")
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:
            text = str(exc)
            if attempt == attempts - 1 or not any(code in text for code in codes):
                raise
            threading.Event().wait(backoff(attempt + 1, 0.005, 0.05, jitter=0.8))


# -- migrations ------------------------------------------------------------------------
# A migration is additive (new tables, columns, indexes, triggers; never "drop and recreate"), so a process
# of the version before keeps working on the schema after it: an upgrade is migrate, then a rolling restart.
# Its parts run in this order:
#   indexes     on tables that may already hold data. Postgres builds them CONCURRENTLY, each outside any
#               transaction, so claims and commits go on while a big table is read; an interrupted build
#               leaves an invalid index, which the next migrate drops and builds again. (SQLite, and a new
#               Postgres database, build them in the transaction below.)
#   statements  one transaction under the migration lock (advisory lock / SQLite write lock), which records
#               the version: concurrent migrates are safe. {pk}/{float} are type placeholders; a dict holds
#               one text per dialect (a dialect it does not name runs nothing).
#   dropped     indexes the new ones replace, dropped (concurrently) once the version is recorded.
#   after       what an existing database needs once the version is there (run outside the transaction).
@record(frozen=True)
class Migration:
    """One schema version: its statements, the indexes built before them, those dropped after (see above)."""

    version: int
    statements: tuple[str | dict[str, str] | Callable[[str], str], ...]
    indexes: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    after: Callable[[Store], Any] | None = None


# Counts (migration 2) that a scrape reads in milliseconds at a million runs, exact whoever writes (this
# version, the one before it during a rolling upgrade, a hand-written fix), and that cost the commit path
# nothing. Two kinds:
#   - counted from the rows, read off an index range: runs in progress and halted, per pipeline;
#   - rolled up: runs triggered and executions per outcome are only ever inserted, so a total is the rollup
#     (ductwork_counters, every row up to a mark in ductwork_rollup) plus a count of the rows past the mark.
#     The pruners move the marks (roll_up_counts): the newest ids read under a SHARE lock of the two tables,
#     held for that read alone (it waits for the transactions inserting, so every row up to those ids is
#     committed), then the rows up to them counted under the pruners' lock, in chunks, exactly once.
#     Pruning adds what it deletes past a mark, and the runs it deletes (by status), to the counters.
# Completed runs are what is left: triggered - pruned - in progress - halted. Every count is one statement,
# one snapshot (SQL.counters): a rollup or a prune commits wholly before or after it.

# Postgres storage settings of the tables each step updates (migration 2). A row updated without a change
# to an indexed column is rewritten in place on its page (a HOT update, no index entry) when the page has
# room: heartbeats and counters are, so their pages keep half free. Steps, branches and runs change an
# indexed status on every update (no HOT possible); a page kept 10 % free still takes the new version of a
# row next to the old. Autovacuum's default (20 % of the table dead) lets a million-row table carry 200 000
# dead rows between vacuums: these tables are vacuumed at 2 % (1 % for the queue), and the small hot ones
# at every thousand dead rows whatever their size.
_STORAGE = {
    "ductwork_processes": "fillfactor = 50, autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000",
    "ductwork_counters": "fillfactor = 50, autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000",
    "ductwork_rollup": "fillfactor = 50, autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000",
    "ductwork_steps": "fillfactor = 90, autovacuum_vacuum_scale_factor = 0.01, "
                      "autovacuum_vacuum_insert_scale_factor = 0.01, autovacuum_analyze_scale_factor = 0.02",
    "ductwork_branches": "fillfactor = 90, autovacuum_vacuum_scale_factor = 0.02, "
                         "autovacuum_vacuum_insert_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02",
    "ductwork_runs": "fillfactor = 90, autovacuum_vacuum_scale_factor = 0.02, "
                     "autovacuum_vacuum_insert_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02",
    "ductwork_executions": "autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_insert_scale_factor = 0.02, "
                           "autovacuum_analyze_scale_factor = 0.02",
    "ductwork_context": "autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_insert_scale_factor = 0.02",
}

MIGRATIONS: list[Migration] = [
    Migration(1, (
        """CREATE TABLE ductwork_processes (
            id {pk}, pid INTEGER NOT NULL, machine_identifier TEXT NOT NULL, role TEXT NOT NULL,
            pipelines TEXT NOT NULL DEFAULT '', parent_id BIGINT, state TEXT NOT NULL DEFAULT 'running',
            restarts INTEGER NOT NULL DEFAULT 0, info TEXT NOT NULL DEFAULT '{}',
            started_at {float} NOT NULL, last_heartbeat_at {float} NOT NULL)""",
        "CREATE INDEX ductwork_processes_machine ON ductwork_processes (machine_identifier, role)",
        """CREATE TABLE ductwork_definitions (
            hash TEXT PRIMARY KEY, pipeline TEXT NOT NULL, body TEXT NOT NULL, created_at {float} NOT NULL)""",
        """CREATE TABLE ductwork_runs (
            id {pk}, pipeline TEXT NOT NULL, definition TEXT NOT NULL, status TEXT NOT NULL,
            input TEXT NOT NULL, output TEXT, halt_reasons TEXT NOT NULL DEFAULT '[]',
            halt_epoch INTEGER NOT NULL DEFAULT 0, halt_notified INTEGER NOT NULL DEFAULT 0,
            created_at {float} NOT NULL, updated_at {float} NOT NULL, finished_at {float})""",
        "CREATE INDEX ductwork_runs_pipeline_status ON ductwork_runs (pipeline, status)",
        """CREATE TABLE ductwork_branches (
            id {pk}, run_id BIGINT NOT NULL, pipeline TEXT NOT NULL, definition TEXT NOT NULL,
            parent_id BIGINT, origin_step_id BIGINT, position INTEGER NOT NULL DEFAULT 0,
            node INTEGER NOT NULL, status TEXT NOT NULL, expected INTEGER NOT NULL DEFAULT 0,
            arrived INTEGER NOT NULL DEFAULT 0, output TEXT, halt_reason TEXT,
            claimed_by BIGINT, claim_token TEXT, claimed_at {float},
            advance_failures INTEGER NOT NULL DEFAULT 0, available_at {float} NOT NULL,
            created_at {float} NOT NULL, updated_at {float} NOT NULL)""",
        "CREATE INDEX ductwork_branches_advance ON ductwork_branches (pipeline, available_at, id) "
        "WHERE status = 'advance'",
        "CREATE INDEX ductwork_branches_claimed ON ductwork_branches (claimed_by) WHERE status = 'advancing'",
        "CREATE INDEX ductwork_branches_origin ON ductwork_branches (origin_step_id, position)",
        "CREATE INDEX ductwork_branches_run ON ductwork_branches (run_id)",
        """CREATE TABLE ductwork_steps (
            id {pk}, run_id BIGINT NOT NULL, branch_id BIGINT NOT NULL, pipeline TEXT NOT NULL,
            node INTEGER NOT NULL, name TEXT NOT NULL, status TEXT NOT NULL, input TEXT NOT NULL,
            output TEXT, attempts INTEGER NOT NULL DEFAULT 0, crashes INTEGER NOT NULL DEFAULT 0,
            error TEXT, halt_reason TEXT, claimed_by BIGINT, claim_token TEXT, claimed_at {float},
            available_at {float} NOT NULL, created_at {float} NOT NULL, finished_at {float})""",
        # (pipeline, available_at, id): the claim's ORDER BY is read off the index, so its cost
        # stays flat however long the backlog is
        "CREATE INDEX ductwork_steps_queue ON ductwork_steps (pipeline, available_at, id) WHERE status = 'queued'",
        "CREATE INDEX ductwork_steps_claimed ON ductwork_steps (claimed_by) WHERE status = 'running'",
        "CREATE INDEX ductwork_steps_branch ON ductwork_steps (branch_id, id)",
        "CREATE INDEX ductwork_steps_run ON ductwork_steps (run_id)",
        """CREATE TABLE ductwork_executions (
            id {pk}, step_id BIGINT NOT NULL, run_id BIGINT NOT NULL, process_id BIGINT,
            attempt INTEGER NOT NULL, outcome TEXT NOT NULL, error TEXT,
            started_at {float}, finished_at {float} NOT NULL)""",
        "CREATE INDEX ductwork_executions_step ON ductwork_executions (step_id)",
        """CREATE TABLE ductwork_context (
            run_id BIGINT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (run_id, key))""",
    )),
    # 2: a database that stays fast at a million runs (SPEC §18): counters, the indexes that bound the
    # dashboard's, status's and retention's queries by an index range, and lean tables on Postgres.
    Migration(2, (
        # an execution names its pipeline: counting it needs no join to its step (the version before leaves
        # it NULL; a count looks such rows up)
        "ALTER TABLE ductwork_executions ADD COLUMN pipeline TEXT",
        """CREATE TABLE ductwork_counters (
            pipeline TEXT NOT NULL, name TEXT NOT NULL, label TEXT NOT NULL, value BIGINT NOT NULL,
            PRIMARY KEY (pipeline, name, label))""",
        """CREATE TABLE ductwork_rollup (
            name TEXT PRIMARY KEY, mark BIGINT NOT NULL)""",
        "INSERT INTO ductwork_rollup (name, mark) VALUES ('runs', 0), ('executions', 0)",
        *({"postgres": f"ALTER TABLE {table} SET ({settings})"} for table, settings in _STORAGE.items()),
    ), indexes=(
        # retention (oldest first), status's latest halts, the overview's runs per minute
        "CREATE INDEX ductwork_runs_finished ON ductwork_runs (status, finished_at)",
        # the runs page and Run.list, newest first: unfiltered (the primary key), by status (with the
        # pipeline, so that the counts of runs in progress and halted per pipeline read the index alone),
        # by pipeline, by both (this one also replaces migration 1's (pipeline, status))
        "CREATE INDEX ductwork_runs_status_id ON ductwork_runs (status, id, pipeline)",
        "CREATE INDEX ductwork_runs_pipeline_id ON ductwork_runs (pipeline, id)",
        "CREATE INDEX ductwork_runs_pipeline_status_id ON ductwork_runs (pipeline, status, id)",
        # the overview's steps per minute (a finished step enters it once)
        "CREATE INDEX ductwork_steps_finished ON ductwork_steps (finished_at) WHERE status IN ('succeeded', 'failed')",
        # the errors page and status's recent errors, newest first (only failed and crashed attempts)
        "CREATE INDEX ductwork_executions_errors ON ductwork_executions (id) WHERE outcome IN ('failed', 'crashed')",
    ), dropped=("ductwork_runs_pipeline_status",),
        # what an existing database holds, counted once now (migrate's own rollup: see roll_up_counts)
        after=lambda store: roll_up_counts(store, wait=True)),
    # 3: run control (SPEC §14): a cancelled run keeps why; the steps of cancelled runs that a process still
    # holds (told, or stopping) are found by their holder like its running ones (hand-back, reaping).
    Migration(3, (
        "ALTER TABLE ductwork_runs ADD COLUMN cancel_reason TEXT",
    ), indexes=(
        "CREATE INDEX ductwork_steps_stopping ON ductwork_steps (claimed_by) "
        "WHERE status IN ('cancelling', 'stopping')",
    )),
    # 4: time (SPEC §16). A run triggered with a delay (or a time) says when it starts; its first step waits on its
    # own available_at, so a process of the version before claims it at the right time too (as it does the steps
    # after a sleep: a sleep needs nothing new). A run's signals, the first of each name kept (one sent before its
    # wait_for waits for it there); a branch that waits for one is parked in the advance queue until its timeout
    # (or far away) and says what it waits for.
    Migration(4, (
        "ALTER TABLE ductwork_runs ADD COLUMN scheduled_at {float}",
        "ALTER TABLE ductwork_branches ADD COLUMN waiting_for TEXT",
        "ALTER TABLE ductwork_branches ADD COLUMN wait_until {float}",
        """CREATE TABLE ductwork_signals (
            run_id BIGINT NOT NULL, name TEXT NOT NULL, payload TEXT, created_at {float} NOT NULL,
            PRIMARY KEY (run_id, name))""",
        # trigger(key=...) and each schedule's ticks: one run per key and pipeline (the unique index, migration 5)
        "ALTER TABLE ductwork_runs ADD COLUMN trigger_key TEXT",
        # each schedule's last tick fired (or first seen), and its run: what the scheduler compares with
        """CREATE TABLE ductwork_schedules (
            pipeline TEXT NOT NULL, ident TEXT NOT NULL, last_fire {float} NOT NULL, last_run_id BIGINT,
            updated_at {float} NOT NULL, PRIMARY KEY (pipeline, ident))""",
    )),
    # 5: ... and the indexes of migration 4's columns (built concurrently on Postgres: a migration's indexes come
    # before its statements, so they need the columns of the migration before): the scheduled runs still to
    # start, the parked branches (status, the dashboard), and one run per trigger key.
    Migration(5, (), indexes=(
        "CREATE INDEX ductwork_runs_scheduled ON ductwork_runs (pipeline, scheduled_at) "
        "WHERE status = 'in_progress' AND scheduled_at IS NOT NULL",
        "CREATE INDEX ductwork_branches_waiting ON ductwork_branches (id) WHERE waiting_for IS NOT NULL",
        "CREATE UNIQUE INDEX ductwork_runs_key ON ductwork_runs (pipeline, trigger_key) WHERE trigger_key IS NOT NULL",
    )),
    # 6: flow control (SPEC §17). A run's priority, copied to each of its steps (lower first); a capped step's
    # concurrency key, written by the process that claims it (its code computes it): a step running (or told of a
    # cancel, or stopping) with a key holds one of that key's slots, and one claimed while they are all held waits
    # "blocked", out of the claim queue, until a holder lets go of its slot (Engine._free_slots).
    Migration(6, (
        "ALTER TABLE ductwork_runs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE ductwork_steps ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE ductwork_steps ADD COLUMN concurrency_key TEXT",
        # Postgres: a concurrency key's lock and what needs it, in one round trip (SQL.slot_functions)
        lambda dialect: SQL.slot_functions()[0] if dialect == "postgres" else "",
        lambda dialect: SQL.slot_functions()[1] if dialect == "postgres" else "",
    )),
    # 7: ... and their indexes: the claim queue by priority, then age (it replaces migration 1's: one index per
    # queued row is what a claim costs to keep up), the steps waiting for a slot per key in claim order, and the
    # slots held per key (what a claim of a capped step counts).
    Migration(7, (), indexes=(
        "CREATE INDEX ductwork_steps_ready ON ductwork_steps (pipeline, priority, available_at, run_id, id) "
        "WHERE status = 'queued'",
        "CREATE INDEX ductwork_steps_blocked ON ductwork_steps (pipeline, name, concurrency_key, priority, "
        "available_at, id) WHERE status = 'blocked'",
        "CREATE INDEX ductwork_steps_slots ON ductwork_steps (pipeline, name, concurrency_key) "
        "WHERE status IN ('running', 'cancelling', 'stopping') AND concurrency_key IS NOT NULL",
    ), dropped=("ductwork_steps_queue",)),
    # 8: observability (issue 20). Totals that are no rollup, in a table of their own: the version before reads
    # every row of ductwork_counters and knows none but its names. A trigger adds there each run taken out of a
    # finished status (revive(), whichever version runs it, or a hand-written fix), so a finished status's count
    # (the runs in it now, pruned from it, taken out of it) never goes down (see "Metrics" in the README). It
    # fires on those rare updates only: a run's other updates fail its WHEN at the cost of a comparison.
    Migration(8, (
        """CREATE TABLE ductwork_tallies (
            pipeline TEXT NOT NULL, name TEXT NOT NULL, label TEXT NOT NULL, value BIGINT NOT NULL,
            PRIMARY KEY (pipeline, name, label))""",
        {"postgres": f"ALTER TABLE ductwork_tallies SET ({_STORAGE['ductwork_counters']})"},
        {"postgres": """CREATE OR REPLACE FUNCTION ductwork_tally_reopened() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                INSERT INTO ductwork_tallies (pipeline, name, label, value)
                VALUES (OLD.pipeline, 'reopened', OLD.status, 1)
                ON CONFLICT (pipeline, name, label) DO UPDATE SET value = ductwork_tallies.value + 1;
                RETURN NULL;
            END $$""",
         "sqlite": ""},
        {"postgres": """CREATE TRIGGER ductwork_runs_reopened
            AFTER UPDATE OF status ON ductwork_runs
            FOR EACH ROW
            WHEN (OLD.status IN ('completed', 'halted', 'cancelled') AND NEW.status <> OLD.status)
            EXECUTE FUNCTION ductwork_tally_reopened()""",
         "sqlite": """CREATE TRIGGER ductwork_runs_reopened
            AFTER UPDATE OF status ON ductwork_runs
            WHEN OLD.status IN ('completed', 'halted', 'cancelled') AND NEW.status <> OLD.status
            BEGIN
                INSERT INTO ductwork_tallies (pipeline, name, label, value)
                VALUES (OLD.pipeline, 'reopened', OLD.status, 1)
                ON CONFLICT (pipeline, name, label) DO UPDATE SET value = ductwork_tallies.value + 1;
            END"""},
        # the W3C trace context of the run's span (SPEC §19, see "Tracing"), NULL when not traced
        "ALTER TABLE ductwork_runs ADD COLUMN trace_context TEXT",
    )),
    # 9: the queue's history for the dashboard's charts (issue 20): per minute of the database's clock and
    # pipeline, the claimable steps and the age of the oldest; the row of pipeline '' says the minute was
    # sampled (a minute without it: no advancer was up). See QUEUE_SAMPLE_MINUTES and Engine.sample_queue.
    # ... and per minute, pipeline and kind ('step': steps finished, 'run': runs completed), their counts by
    # duration bin (DURATION_BINS; STATS_LAG).
    Migration(9, (
        """CREATE TABLE ductwork_queue_samples (
            minute BIGINT NOT NULL, pipeline TEXT NOT NULL, depth BIGINT NOT NULL, oldest_age {float} NOT NULL,
            PRIMARY KEY (minute, pipeline))""",
        """CREATE TABLE ductwork_minute_stats (
            minute BIGINT NOT NULL, pipeline TEXT NOT NULL, kind TEXT NOT NULL, bin INTEGER NOT NULL,
            count BIGINT NOT NULL, PRIMARY KEY (minute, pipeline, kind, bin))""",
    )),
]
SCHEMA_VERSION = MIGRATIONS[-1].version
_TYPES = {"sqlite": {"pk": "INTEGER PRIMARY KEY AUTOINCREMENT", "float": "REAL"},
          "postgres": {"pk": "BIGSERIAL PRIMARY KEY", "float": "DOUBLE PRECISION"}}
# How often a migrate that found another migrate's index build in progress looks again.
INDEX_BUILD_POLL = 0.5


def _statement_text(statement: str | dict[str, str] | Callable[[str], str], dialect: str) -> str:
    """A migration statement as ``dialect`` runs it ("" when it is the other dialect's; a callable gives it, for
    a text built from statements defined further down)."""
    if callable(statement):
        statement = statement(dialect)
    text = statement.get(dialect, "") if isinstance(statement, dict) else statement
    types = _TYPES[dialect]
    return text.replace("{pk}", types["pk"]).replace("{float}", types["float"])


def _index_name(statement: str) -> str:
    """The name a migration's ``CREATE [UNIQUE] INDEX name ON ...`` gives its index."""
    words = statement.split()
    return words[3] if words[1] == "UNIQUE" else words[2]


def migrate_store(store: Store) -> list[int]:
    """Apply pending migrations; returns the versions applied (empty when up to date). On Postgres an index
    of a migration that is missing or invalid (an interrupted build) is built again, concurrently."""
    with store.tx() as t:   # one transaction, unless an index must be built concurrently
        if store.dialect == "postgres":
            t.run(StoreSQL.migration_lock, {"key": StoreSQL.MIGRATION_LOCK_KEY})
        t.run(StoreSQL.create_migrations)
        done = {row[0] for row in t.all(StoreSQL.applied_versions)}
        concurrently = store.dialect == "postgres" and bool(done)   # (SQLite, a new database: no rows to keep
        if not concurrently:                                         # flowing while indexes are built)
            applied = [m.version for m in MIGRATIONS if m.version not in done and _apply_in(t, m, in_tx=True)]
        else:
            applied, unbuilt = [], _unbuilt_indexes(t)
    if concurrently and (unbuilt or any(m.version not in done for m in MIGRATIONS)):
        for migration in MIGRATIONS:
            for statement in migration.indexes:
                if _index_name(statement) in unbuilt:
                    _build_index_concurrently(store, statement)
            if migration.version not in done and _retry_conflicts(lambda m=migration: _apply(store, m)):
                applied.append(migration.version)
            for name in migration.dropped:
                if name in unbuilt:
                    with store.tx(single=True) as t:
                        t.run(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
    for migration in MIGRATIONS:
        if migration.version in applied and migration.after is not None and done:   # (a new database is empty)
            migration.after(store)
    return applied


def _unbuilt_indexes(t: Tx) -> set[str]:
    """Postgres: the migrations' indexes that are missing or invalid, and the dropped ones still there."""
    wanted = [_index_name(s) for m in MIGRATIONS for s in m.indexes]
    dropped = [name for m in MIGRATIONS for name in m.dropped]
    there = dict(t.all(StoreSQL.index_validity, {"names": "{" + ",".join(wanted + dropped) + "}"}))
    return {name for name in wanted if not there.get(name)} | {name for name in dropped if name in there}


def _apply(store: Store, migration: Migration) -> bool:
    """One migration's own transaction (its indexes were built concurrently before it)."""
    with store.tx() as t:
        t.run(StoreSQL.migration_lock, {"key": StoreSQL.MIGRATION_LOCK_KEY})
        return _apply_in(t, migration, in_tx=False)


def _apply_in(t: Tx, migration: Migration, in_tx: bool) -> bool:
    """A migration's statements (and, ``in_tx``, its indexes and drops) in ``t``, and its version recorded;
    False when another migrate recorded it first."""
    if t.one(StoreSQL.version_applied, {"version": migration.version}):
        return False
    statements = [_statement_text(s, t.dialect) for s in migration.statements]
    if in_tx:
        statements += [*migration.indexes, *(f"DROP INDEX IF EXISTS {name}" for name in migration.dropped)]
    for statement in statements:
        if statement:
            t.run(statement)
    t.run(StoreSQL.record_version,
          {"version": migration.version, "applied_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return True


def _build_index_concurrently(store: Store, statement: str) -> None:
    """Postgres: the index exists and is valid when this returns, built without blocking writes. An invalid
    one is another migrate's build in progress (waited for) or an interrupted build's leftover (dropped)."""
    name = _index_name(statement)
    while True:
        with store.tx(write=False) as t:
            row = t.one(StoreSQL.index_state, {"name": name})
        if row is not None and row[0]:
            return
        if row is None:
            text = statement.replace(" INDEX ", " INDEX CONCURRENTLY IF NOT EXISTS ", 1)
        elif row[1]:
            threading.Event().wait(INDEX_BUILD_POLL)
            continue
        else:
            text = f"DROP INDEX CONCURRENTLY IF EXISTS {name}"
        try:
            with store.tx(single=True) as t:
                t.run(text)
        except DuctworkError:
            raise
        except Exception as exc:   # two migrates raced to the same name (or deadlocked on its table, or updated
            # its table's catalog row at the same instant: "tuple concurrently updated"): look again
            if not any(code in str(exc) for code in ("23505", "42P07", "40P01", "tuple concurrently updated")):
                raise


def schema_is_current(store: Store) -> bool:
    """Is the schema at SCHEMA_VERSION? (False when it is missing or older; raises when unreachable.)"""
    try:
        with store.tx(write=False) as t:
            row = t.one(StoreSQL.schema_version)
        return bool(row and row[0] == SCHEMA_VERSION)
    except DuctworkError:   # unreachable, or a pooler's mix-up: not "no schema"
        raise
    except Exception:
        return False


# =====================================================================================
# definitions: Step, Pipeline and the builder that turns define(p) into a graph
# =====================================================================================
# The graph is a list of nodes; node 0 is the start step. Each node names its step and
# what happens after it ("after"):
#   {"kind": "chain",  "next": n}
#   {"kind": "expand", "child": n, "join": n | None}      one child branch per element
#   {"kind": "divide", "children": [n, ...], "join": ...}  same input to every child
#   {"kind": "divert", "cases": {"key": n, ..., "otherwise": n}, "join": ...}
#   {"kind": "end"}                                        the branch is finished
# A chain or fan-out may have a wait before it, set by .sleep() / .wait_for() (SPEC §16), which wraps it:
#   {"kind": "wait", "wait": {"sleep": seconds}, "then": {...}}   the steps it starts are claimable that much later
#   {"kind": "wait", "wait": {"signal": name, "timeout": s}, "then": {...}}
#                                                  the branch parks until run.signal(name) (or halts at the timeout)
# (a wrapped fan-out's "join" is on the wrapper too: see _waited).
# A branch is one line of steps. A fan-out parks the branch and starts child branches;
# when every child has finished, the join step (collapse/combine/converge) runs on the
# parked branch with the children's outputs, or, with no join (a fan-out left open at
# the end of the pipeline), the branch finishes with that list as its output.


class Step:
    """Subclass and implement ``execute(self, input)``; the return value must be JSON. Class attribute
    ``retry = ductwork.Retry(...)`` sets its retry policy."""

    context: "RunContext"
    run_id: int
    attempt: int
    idempotency_key: str
    step_id: int
    pipeline: str

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A retry policy that is not a Retry is a definition mistake, found when the class is defined."""
        super().__init_subclass__(**kwargs)
        policy = cls.__dict__.get("retry")
        if policy is not None and not isinstance(policy, Retry):
            raise DefinitionError(f"step {cls.__name__}: retry must be a ductwork.Retry, got {policy!r}")
        _check_timeout(f"step {cls.__name__}", cls.__dict__.get("timeout"))
        _check_concurrency(f"step {cls.__name__}", cls.__dict__.get("concurrency"),
                           cls.__dict__.get("concurrency_key"))

    def execute(self, *args: Any) -> Any:  # pragma: no cover - always overridden
        raise NotImplementedError(f"{type(self).__name__}.execute is not implemented")

    @property
    def should_stop(self) -> bool:
        """True once the step should stop early: its run was cancelled (within about a second of the cancel), or
        its deadline passed. What it returns then is discarded (cancel) or a failed attempt (StepTimeout)."""
        claim = getattr(self, "_ductwork_claim", None)
        return bool(claim is not None and claim.should_stop)

    @property
    def deadline(self) -> float | None:
        """When this attempt times out (epoch seconds), None without a timeout."""
        claim = getattr(self, "_ductwork_claim", None)
        return None if claim is None else claim.deadline


def _exception_classes(name: str, value: Any) -> tuple[type[BaseException], ...]:
    """A Retry's give_up_on / retry_on as a tuple of exception classes (one class alone is fine)."""
    classes = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    for cls in classes:
        if not (inspect.isclass(cls) and issubclass(cls, BaseException)):
            raise DefinitionError(f"Retry({name}=...) needs exception classes, got {cls!r}")
    return classes


@record(frozen=True)
class Retry:
    """A step's retry policy: a Step class attribute ``retry = ductwork.Retry(...)``, or
    ``@ductwork.step(retry=...)`` on a function step. After failed attempt n the next is claimable
    min(delay * backoff ** (n - 1), max_delay) seconds later, spread by +/- ``jitter`` (a fraction), up to
    ``max`` retries. An error of a class in ``give_up_on``, or of none in ``retry_on``, fails the step at once
    (``job_non_retryable``). ``max`` and ``delay`` left out are the config's ``job_worker.max_retry`` and
    ``retry_delay`` for the step (3 and 10 out of the box)."""

    max: int | None = None
    delay: float | None = None
    backoff: float = 1.0
    max_delay: float = 3600
    jitter: float = 0.0
    give_up_on: Any = ()
    retry_on: Any = (Exception,)

    def __post_init__(self) -> None:
        def number(name: str, low: float, high: float, whole: bool = False, none: bool = False) -> None:
            value = getattr(self, name)
            if value is None and none:
                return
            kinds = (int,) if whole else (int, float)
            if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
                kind = "a whole number" if whole else "a number"
                raise DefinitionError(f"Retry({name}=...) must be {kind} from {low:g} to {high:g}, got {value!r}")
        number("max", 0, MAX_COUNT, whole=True, none=True)
        number("delay", 0, MAX_DURATION, none=True)
        number("backoff", 1, 1000)
        number("max_delay", 0, MAX_DURATION)
        number("jitter", 0, 1)
        object.__setattr__(self, "give_up_on", _exception_classes("give_up_on", self.give_up_on))
        object.__setattr__(self, "retry_on", _exception_classes("retry_on", self.retry_on))

    def retries(self, exc: BaseException) -> bool:
        """Is an attempt that raised ``exc`` retried (budget permitting)?"""
        try:
            return isinstance(exc, self.retry_on) and not isinstance(exc, self.give_up_on)
        except BaseException:  # noqa: B036 - a hostile __instancecheck__: the default, retried
            return True

    def delay_after(self, failures: int, default_delay: float) -> float:
        """Seconds before the attempt that follows failed attempt number ``failures`` (1 for the first)."""
        import math
        import random
        base = default_delay if self.delay is None else self.delay
        exponent = max(failures - 1, 0)
        if base <= 0:
            delay = 0.0
        elif self.backoff > 1 and exponent * math.log(self.backoff) >= math.log(max(self.max_delay, 1e-9) / base):
            delay = float(self.max_delay)
        else:
            delay = min(base * self.backoff ** exponent, self.max_delay)
        return delay * random.uniform(1 - self.jitter, 1 + self.jitter) if self.jitter else delay


def step_timeout(step: Any, config: Config, pipeline: str, name: str) -> float | None:
    """Seconds an attempt of ``step`` may run: its own ``timeout`` (class attribute or ``@ductwork.step``), else
    the config's job_worker.timeout for it; None for no limit."""
    own = getattr(step, "timeout", None)
    if isinstance(own, (int, float)) and not isinstance(own, bool) and own > 0:
        return float(own)
    configured = float(config.get("job_worker.timeout", pipeline, name))
    return None if configured < 0 else configured


def retry_policy(step: Any) -> Retry | None:
    """The Retry policy a step sets (class attribute, or ``@ductwork.step(retry=...)``), None for the config's."""
    policy = getattr(step, "retry", None)
    return policy if isinstance(policy, Retry) else None


def _check_concurrency(where: str, cap: Any, key: Any) -> None:
    """A step's ``concurrency`` (a whole number above 0, or None) and ``concurrency_key`` (callable, or None)."""
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or not 0 < cap <= MAX_COUNT):
        raise DefinitionError(f"{where}: concurrency must be a whole number above 0, got {cap!r}")
    if key is not None and not callable(key):
        raise DefinitionError(f"{where}: concurrency_key must be a method (or, for a function step, a function) "
                              f"of the step's input, got {key!r}")


def _check_timeout(where: str, value: Any) -> None:
    """A step's ``timeout``: seconds above 0 (None: the config's job_worker.timeout)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not 0 < value <= MAX_DURATION):
        raise DefinitionError(f"{where}: timeout must be seconds above 0 (at most {MAX_DURATION}), got {value!r}")


def step(fn: Callable | None = None, *, retry: Retry | None = None, timeout: float | None = None,
         concurrency: int | None = None, concurrency_key: Callable | None = None) -> Any:
    """Options for a function step: ``@ductwork.step(retry=ductwork.Retry(max=5, backoff=2))`` (also bare:
    ``@ductwork.step``). The function is returned as it is, carrying them (a Step class sets class attributes)."""
    _check_timeout("@ductwork.step", timeout)
    _check_concurrency("@ductwork.step", concurrency, concurrency_key)
    if retry is not None and not isinstance(retry, Retry):
        raise DefinitionError(f"@ductwork.step(retry=...) needs a ductwork.Retry, got {retry!r}")

    def decorate(f: Callable) -> Callable:
        if inspect.isclass(f) or not callable(f):
            raise DefinitionError(f"@ductwork.step decorates a function step, not {f!r} (a Step class sets "
                                  "class attributes: retry = ductwork.Retry(...))")
        for name, value in (("retry", retry), ("timeout", timeout), ("concurrency", concurrency),
                            ("concurrency_key", concurrency_key)):
            if value is not None:
                try:
                    setattr(f, name, value)
                except (AttributeError, TypeError):   # a builtin, a bound method: nowhere to keep it
                    raise DefinitionError(f"@ductwork.step({name}=...) needs a plain function, not {f!r}") from None
        return f
    return decorate if fn is None else decorate(fn)


def _step_name(step: Any, pipeline: str) -> str:
    if inspect.isclass(step):
        if not issubclass(step, Step):
            raise DefinitionError(f"pipeline {pipeline}: {step.__name__} is a class but not a ductwork.Step subclass")
        if step.execute is Step.execute:
            raise DefinitionError(f"pipeline {pipeline}: step {step.__name__} does not define execute()")
        return step.__name__
    if callable(step) and hasattr(step, "__name__"):
        if step.__name__ == "<lambda>":
            raise DefinitionError(f"pipeline {pipeline}: a lambda cannot be a step (it has no stable name); use a def")
        return step.__name__
    raise DefinitionError(f"pipeline {pipeline}: {step!r} is not a ductwork.Step subclass or a function")


@record
class _Frame:
    """An open fan-out on a builder handle's stack."""
    kind: str          # expand | divide | divert
    node: int          # the node whose step fans out


class Handle:
    """The tip of one line of a definition; transitions move it forward and return it."""

    def __init__(self, builder: "Builder", tip: int, stack: list[_Frame]):
        self._b, self._tip, self._stack = builder, tip, stack
        self._group: Group | None = None   # set on the handles of a divide/divert
        self._closed = False
        self._wait: dict | None = None     # a sleep() / wait_for() for the transition that comes next

    def sleep(self, seconds: float) -> "Handle":
        """Wait ``seconds`` (durably: in the database, no thread) before the next transition's steps start; they
        get this step's output."""
        self._live("sleep")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds <= MAX_DURATION:
            raise DefinitionError(f"pipeline {self._b.name}: sleep needs seconds above 0 (at most {MAX_DURATION}), "
                                  f"got {seconds!r}")
        return self._waits({"sleep": seconds}, "sleep")

    def wait_for(self, name: str, timeout: float | None = None) -> "Handle":
        """Wait for ``run.signal(name, payload)`` before the next transition, which goes on with the payload;
        past ``timeout`` seconds (None: forever) the branch halts with signal_timeout."""
        self._live("wait_for")
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_SIGNAL_NAME:
            raise DefinitionError(f"pipeline {self._b.name}: wait_for needs a signal name (a non-empty string of "
                                  f"at most {MAX_SIGNAL_NAME} characters), got {name!r}")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not 0 < timeout <= MAX_DURATION):
            raise DefinitionError(f"pipeline {self._b.name}: wait_for timeout must be seconds above 0 (at most "
                                  f"{MAX_DURATION}) or None, got {timeout!r}")
        return self._waits({"signal": name, "timeout": timeout}, "wait_for")

    def _waits(self, wait: dict, what: str) -> "Handle":
        if self._wait is not None:
            raise DefinitionError(f"pipeline {self._b.name}: {what} after another sleep/wait_for: one wait per "
                                  "transition")
        self._wait = wait
        self._b.waiting.append(self)
        return self

    def _take_wait(self, verb: str) -> dict | None:
        """The wait set for the transition ``verb`` is making (a join or the end cannot take one)."""
        wait, self._wait = self._wait, None
        if wait is not None and verb in ("collapse", "combine", "converge"):
            raise DefinitionError(f"pipeline {self._b.name}: sleep/wait_for before {verb}: a wait must be followed "
                                  "by chain, expand, divide or divert")
        return wait

    def _live(self, what: str) -> None:
        if self._closed:
            raise DefinitionError(f"pipeline {self._b.name}: {what} on a branch that was already "
                                  "combined/converged or divided")

    def chain(self, to: Any) -> "Handle":
        """The next step runs on this step's output."""
        self._live("chain")
        self._tip = self._b.link(self._tip, _waited({"kind": "chain"}, self._take_wait("chain")), to, "next")
        return self

    def expand(self, to: Any) -> "Handle":
        """One branch per element of this step's output (a list), each running ``to``."""
        self._live("expand")
        parent = self._tip
        after = _waited({"kind": "expand", "join": None}, self._take_wait("expand"))
        self._tip = self._b.link(parent, after, to, "child")
        self._stack = self._stack + [_Frame("expand", parent)]
        return self

    def collapse(self, into: Any) -> "Handle":
        """Close the innermost expand: ``into`` runs on the list of the branches' outputs."""
        self._live("collapse")
        self._take_wait("collapse")
        if not self._stack or self._stack[-1].kind != "expand":
            raise DefinitionError(f"pipeline {self._b.name}: collapse without a matching expand")
        frame = self._stack[-1]
        self._b.end(self._tip)
        self._tip = self._b.join(frame.node, into)
        self._stack = self._stack[:-1]
        return self

    def divide(self, to: Sequence[Any]) -> "Group":
        """Every step of ``to`` runs on this step's output, one branch each."""
        self._live("divide")
        if not isinstance(to, (list, tuple)) or len(to) < 1:
            raise DefinitionError(f"pipeline {self._b.name}: divide(to=...) needs a non-empty list of steps")
        parent = self._tip
        children = [self._b.add(step) for step in to]
        self._b.nodes[parent]["after"] = _waited({"kind": "divide", "children": children, "join": None},
                                                 self._take_wait("divide"))
        return self._fan_out("divide", parent, children, [str(i) for i in range(len(children))])

    def divert(self, to: dict) -> "Group":
        """One branch, chosen by str() of this step's output among the keys of ``to`` (or otherwise)."""
        self._live("divert")
        if not isinstance(to, dict) or not to:
            raise DefinitionError(f"pipeline {self._b.name}: divert(to=...) needs a mapping of keys to steps")
        if "otherwise" not in to:
            raise DefinitionError(f"pipeline {self._b.name}: divert without an 'otherwise' branch")
        parent = self._tip
        cases = {str(key): self._b.add(step) for key, step in to.items()}
        if len(cases) != len(to):
            raise DefinitionError(f"pipeline {self._b.name}: divert keys collide once turned into strings")
        self._b.nodes[parent]["after"] = _waited({"kind": "divert", "cases": cases, "join": None},
                                                 self._take_wait("divert"))
        return self._fan_out("divert", parent, list(cases.values()), list(cases))

    def _fan_out(self, kind: str, parent: int, children: list[int], keys: list[str]) -> "Group":
        group = Group(self, kind, parent, keys)
        stack = self._stack + [_Frame(kind, parent)]
        for child in children:
            handle = Handle(self._b, child, list(stack))
            handle._group = group
            group.handles.append(handle)
        self._closed = True
        return group

    def combine(self, *others: "Handle", into: Any) -> "Handle":
        """Close the divide: ``into`` runs on the branches' outputs, in divide order."""
        self._live("combine")
        if self._group is None or self._group.kind != "divide":
            raise DefinitionError(f"pipeline {self._b.name}: combine without a matching divide")
        return self._group.close("combine", [self, *others], into)

    def converge(self, *others: "Handle", into: Any) -> "Handle":
        """Close the divert: ``into`` runs on the chosen branch's output."""
        self._live("converge")
        if self._group is None or self._group.kind != "divert":
            raise DefinitionError(f"pipeline {self._b.name}: converge without a matching divert")
        return self._group.close("converge", [self, *others], into)


def _waited(after: dict, wait: dict | None) -> dict:
    """A transition with the wait before it (none: as it is, so a pipeline without waits keeps its hash): wrapped
    in a transition of its own kind, which a process of the version before does not know, so it halts the
    branch there (transition_invalid, revivable) instead of going past the wait; a fan-out's join is named on
    the wrapper too, for such a process's join of children started after the wait."""
    if wait is None:
        return after
    return {"kind": "wait", "wait": wait, "then": after, **({"join": after["join"]} if "join" in after else {})}


def _transition(after: dict) -> dict:
    """The transition a node's ``after`` makes (a wait's wrapped one)."""
    return after["then"] if after["kind"] == "wait" else after


# The longest signal name (it is stored with each signal and each branch waiting for one).
MAX_SIGNAL_NAME = 200


class Group:
    """The branches of a divide or divert: unpack them (``a, b = ...``) or close them all."""

    def __init__(self, parent: Handle, kind: str, node: int, keys: list[str]):
        self.parent, self.kind, self.node, self.keys = parent, kind, node, keys
        self.handles: list[Handle] = []

    def __iter__(self) -> Iterator[Handle]:
        return iter(self.handles)

    def __len__(self) -> int:
        return len(self.handles)

    def __getitem__(self, key: int | str) -> Handle:
        return self.handles[self.keys.index(str(key)) if isinstance(key, str) else key]

    def combine(self, into: Any) -> Handle:
        """Close the divide over all its branches."""
        if self.kind != "divide":
            raise DefinitionError(f"pipeline {self.parent._b.name}: combine without a matching divide "
                                  "(this is a divert; use converge)")
        return self.close("combine", list(self.handles), into)

    def converge(self, into: Any) -> Handle:
        """Close the divert over all its branches."""
        if self.kind != "divert":
            raise DefinitionError(f"pipeline {self.parent._b.name}: converge without a matching divert "
                                  "(this is a divide; use combine)")
        return self.close("converge", list(self.handles), into)

    def close(self, verb: str, handles: list[Handle], into: Any) -> Handle:
        """Join every branch of the group into the step ``into`` on the parent line."""
        b = self.parent._b
        if any(h._group is not self for h in handles) or len({id(h) for h in handles}) != len(self.handles):
            raise DefinitionError(f"pipeline {b.name}: {verb} must name every branch of its {self.kind} exactly once")
        for h in handles:
            h._live(verb)
            h._take_wait(verb)
            if h._stack[-1].node != self.node:
                raise DefinitionError(f"pipeline {b.name}: a branch has an expand that is not collapsed before {verb}")
            b.end(h._tip)
            h._closed = True
        parent = self.parent
        parent._tip = b.join(self.node, into)
        parent._closed = False
        return parent


class Builder:
    """What ``define(p)`` receives: ``p.start(Step)``, ``p.on_halt(handler)`` and ``p.on_complete(handler)``."""

    def __init__(self, name: str):
        self.name = name
        self.nodes: list[dict] = []
        self.steps: dict[str, Any] = {}
        self.halt_handlers: list[Callable] = []
        self.complete_handlers: list[Callable] = []
        self.waiting: list[Handle] = []    # handles given a sleep/wait_for (one left unused is a mistake)
        self._started = False

    def start(self, step: Any) -> Handle:
        """The first step of the pipeline (it gets the trigger's arguments)."""
        if self._started:
            raise DefinitionError(f"pipeline {self.name}: start called twice")
        self._started = True
        return Handle(self, self.add(step), [])

    def on_halt(self, handler: Callable) -> Callable:
        """Register ``handler(run, reasons)``, called once per halt of a run."""
        if not callable(handler):
            raise DefinitionError(f"pipeline {self.name}: on_halt needs a callable")
        self.halt_handlers.append(handler)
        return handler

    def on_complete(self, handler: Callable) -> Callable:
        """Register ``handler(run)``, called once per completed run (like on_halt: after the commit, outside
        any transaction, by the process that completed it; its exceptions are logged)."""
        if not callable(handler):
            raise DefinitionError(f"pipeline {self.name}: on_complete needs a callable")
        self.complete_handlers.append(handler)
        return handler

    def add(self, step: Any) -> int:
        """A new node for ``step`` (one name, one step object per pipeline)."""
        name = _step_name(step, self.name)
        known = self.steps.get(name)
        if known is not None and known is not step:
            raise DefinitionError(f"pipeline {self.name}: two different steps are named {name}")
        self.steps[name] = step
        self.nodes.append({"id": len(self.nodes), "step": name, "after": {"kind": "end"}})
        return len(self.nodes) - 1

    def link(self, src: int, after: dict, step: Any, field: str) -> int:
        dst = self.add(step)
        _transition(after)[field] = dst
        self.nodes[src]["after"] = after
        return dst

    def end(self, node: int) -> None:
        self.nodes[node]["after"] = {"kind": "end"}

    def join(self, fan_out_node: int, step: Any) -> int:
        dst = self.add(step)
        after = self.nodes[fan_out_node]["after"]
        after["join"] = dst
        if after["kind"] == "wait":   # (the wrapped fan-out's own, and the wrapper's: see _waited)
            after["then"]["join"] = dst
        return dst


@record
class Definition:
    """A compiled pipeline graph (what each run stores)."""

    pipeline: str
    nodes: list[dict]

    @property
    def body(self) -> str:
        """The graph as canonical JSON (what is stored and hashed)."""
        return json.dumps({"pipeline": self.pipeline, "nodes": self.nodes}, sort_keys=True, separators=(",", ":"))

    @property
    def hash(self) -> str:
        """The graph's identity: a run keeps the definition it was triggered with."""
        import hashlib
        return hashlib.sha256(self.body.encode()).hexdigest()[:32]

    @classmethod
    def from_body(cls, body: str) -> "Definition":
        """A definition read back from its stored body."""
        data = json.loads(body)
        return cls(data["pipeline"], data["nodes"])


_REGISTRY: dict[str, type["Pipeline"]] = {}


class Pipeline:
    """Subclass with ``@staticmethod define(p)``; the class name is the pipeline name."""

    definition: Definition
    schedules: list["Schedule"]       # from the class attribute ``schedule`` (a Schedule or a list of them)
    steps: dict[str, Any]
    halt_handlers: list[Callable]
    complete_handlers: list[Callable]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Build and register the definition of each subclass as it is created."""
        super().__init_subclass__(**kwargs)
        name = cls.__name__
        if "define" not in cls.__dict__:
            raise DefinitionError(f"pipeline {name}: define(p) is missing")
        builder = Builder(name)
        try:
            cls.define(builder)
        except DefinitionError:
            raise
        except TypeError as exc:
            raise DefinitionError(f"pipeline {name}: {exc}") from None
        if not builder.nodes:
            raise DefinitionError(f"pipeline {name}: define(p) never called p.start(...)")
        if any(handle._wait is not None for handle in builder.waiting):
            raise DefinitionError(f"pipeline {name}: sleep/wait_for at the end of a line: a wait must be followed "
                                  "by chain, expand, divide or divert")
        cls.definition = Definition(name, builder.nodes)
        cls.schedules = schedules_of(name, cls.__dict__.get("schedule"))
        cls.steps = builder.steps
        cls.halt_handlers = builder.halt_handlers
        cls.complete_handlers = builder.complete_handlers
        known = _REGISTRY.get(name)
        if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__) \
                and inspect.getsourcefile(known) != inspect.getsourcefile(cls):
            raise DefinitionError(f"pipeline {name}: defined twice ({known.__module__} and {cls.__module__}); "
                                  "names must be unique")
        _REGISTRY[name] = cls

    @classmethod
    def trigger(cls, *args: Any, delay: float | None = None, at: Any = None, key: str | None = None,
                priority: int = 0, connection: Any = None) -> "Run":
        """Start a run in one transaction; the arguments go to the start step. ``delay`` (seconds) or ``at`` (an
        aware datetime, or epoch seconds): its first step is not claimable before then (the database clock).
        ``key``: the run of this pipeline with that key, if there is one, instead of a new run. ``priority``:
        its steps are claimed before those of runs with a higher number (default 0, negatives allowed).
        ``connection``: written in the caller's own transaction on that DB-API connection (see trigger())."""
        return trigger(cls.__name__, *args, delay=delay, at=at, key=key, priority=priority, connection=connection)


def registered_pipelines() -> dict[str, type[Pipeline]]:
    """Every pipeline class defined so far, by name."""
    return dict(_REGISTRY)


def validate() -> list[str]:
    """Check every registered pipeline; raises DefinitionError, returns the names checked."""
    for name, cls in _REGISTRY.items():
        nodes = cls.definition.nodes
        for node in nodes:
            if node["step"] not in cls.steps:
                raise DefinitionError(f"pipeline {name}: node {node['id']} names unknown step {node['step']}")
            _step_name(cls.steps[node["step"]], name)
        json.loads(cls.definition.body)
    return sorted(_REGISTRY)


# -- schedules: cron expressions and fire times (SPEC §16) -----------------------------
# A Schedule names when a pipeline fires by itself: ``cron`` (5 fields, in its time zone) or ``every`` (seconds).
# This part is pure arithmetic (no database): which instants are fire times. Every host computes the same
# ones without talking to the others, so a unique key per (pipeline, Schedule.ident, fire time) makes each
# tick one run however many processes fire it.
#   every=S   the fire times are the multiples of S seconds since the Unix epoch (UTC; no time zone).
#   cron      the fire times are whole minutes of the schedule's local wall clock. Fields are Vixie cron's:
#             lists, ranges, steps (``a/s`` is ``a-max/s``), month and day names, day-of-week 0 or 7 for
#             Sunday, the @ aliases. When day-of-month and day-of-week are both restricted (neither starts
#             with "*") a day matches either ("0 0 13 * FRI": every 13th and every Friday); otherwise both
#             must match, so "0 0 13 * *" is the 13ths only and "0 0 */2 * MON" the Mondays on odd days.
# Daylight saving time (Vixie cron's rule, which tells fixed-time jobs from wildcard ones):
#   fixed-time (the minute and hour fields both start with a digit: "30 2 * * *", @daily) fires once for each
#             matching local date and time. A time the clocks skip (02:30 when they jump 02:00 -> 03:00)
#             fires at the instant the gap ends (03:00 local); a time they show twice (01:30 when they fall
#             back 02:00 -> 01:00) fires at its first occurrence only. Skipped times that match fire
#             once between them ("0,30 2 * * *" on that day: once, at 03:00). As in Vixie cron it is the
#             field's text that counts: "0-59 1 * * *" is fixed-time, "* 1 * * *" a wildcard.
#   wildcard  (the minute or the hour field starts with "*": "*/5 * * * *", "30 * * * *", @hourly) follows the
#             clock as it is shown, keeping its rhythm in elapsed time: skipped minutes do not fire (no clock
#             shows them) and minutes shown twice fire twice (once in each occurrence of the repeated hour).
# Searches go field by field (month, then day, hour, minute), so a yearly cron costs a few steps, not minutes
# by the million. The Gregorian calendar repeats every 400 years (146097 days, whole weeks), so a cron that
# fires at all fires within any 401 calendar years (the year a search starts in, then a whole cycle): that
# bounds every search, and a cron that can never fire (Feb 30) is a DefinitionError when it is made.

CRON_HORIZON_YEARS = 401
CRON_FIELDS = (   # name, lowest, highest, the names of its values from the lowest up
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day-of-month", 1, 31, ()),
    ("month", 1, 12, ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")),
    ("day-of-week", 0, 7, ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")),
)
CRON_ALIASES = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
                "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *"}
_MONTH_MOST_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)   # February: in a leap year
# A local wall-clock minute: (year, month, day, hour, minute). A search may hold one a step past its field's
# end (minute 60, hour 24, day 32, month 13, or -1 / 0 going back): the next look-up finds nothing there and
# carries into the field above, so no step needs its own carry.
Wall = tuple[int, int, int, int, int]


def _month_days(year: int, month: int) -> int:
    if month == 2:
        return 29 if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0) else 28
    return 30 if month in (4, 6, 9, 11) else 31


def _weekday(year: int, month: int, day: int) -> int:
    """Day of the week, 0 = Sunday (Sakamoto's method: no datetime needed in the searches)."""
    if month < 3:
        year -= 1
    return (year + year // 4 - year // 100 + year // 400 + (0, 3, 2, 5, 0, 3, 5, 1, 4, 6, 2, 4)[month - 1] + day) % 7


def _at_or_after(values: tuple[int, ...], low: int) -> int | None:
    return next((v for v in values if v >= low), None)


def _at_or_before(values: tuple[int, ...], high: int) -> int | None:
    return next((v for v in reversed(values) if v <= high), None)


@record(frozen=True)
class Cron:
    """A parsed 5-field cron expression (``parse_cron``): the values each field allows, sorted."""

    text: str                       # as written (whitespace collapsed; an alias stays an alias)
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: tuple[int, ...]
    months: tuple[int, ...]
    weekdays: tuple[int, ...]       # 0 = Sunday (a 7 is stored as 0)
    days_restricted: bool           # day-of-month does not start with "*"
    weekdays_restricted: bool       # day-of-week does not start with "*"
    wildcard: bool                  # minute or hour starts with "*" (the DST rule above)

    def days_of(self, year: int, month: int) -> tuple[int, ...]:
        """The days of a month that match (day-of-month and day-of-week, by Vixie's either/both rule)."""
        first = _weekday(year, month, 1)
        either = self.days_restricted and self.weekdays_restricted
        found = []
        for day in range(1, _month_days(year, month) + 1):
            by_day, by_weekday = day in self.days, (first + day - 1) % 7 in self.weekdays
            if (by_day or by_weekday) if either else (by_day and by_weekday):
                found.append(day)
        return tuple(found)

    def next_wall(self, wall: Wall) -> Wall | None:
        """The first matching local minute at or after ``wall`` (None past the search horizon)."""
        year, month, day, hour, minute = wall
        while year <= min(wall[0] + CRON_HORIZON_YEARS, 9999):
            if month > 12 or month not in self.months:
                year, month = (year + 1, 1) if month >= 12 else (year, month + 1)
                day, hour, minute = 1, 0, 0
                continue
            found = _at_or_after(self.days_of(year, month), day)
            if found is None:
                month, day, hour, minute = month + 1, 1, 0, 0
                continue
            if found != day:
                day, hour, minute = found, 0, 0
            found = _at_or_after(self.hours, hour)
            if found is None:
                day, hour, minute = day + 1, 0, 0
                continue
            if found != hour:
                hour, minute = found, 0
            found = _at_or_after(self.minutes, minute)
            if found is None:
                hour, minute = hour + 1, 0
                continue
            return year, month, day, hour, found
        return None

    def previous_wall(self, wall: Wall) -> Wall | None:
        """The last matching local minute at or before ``wall`` (None past the search horizon)."""
        year, month, day, hour, minute = wall
        while year >= max(wall[0] - CRON_HORIZON_YEARS, 1):
            if month < 1 or month not in self.months:
                year, month = (year - 1, 12) if month <= 1 else (year, month - 1)
                day, hour, minute = 31, 23, 59
                continue
            found = _at_or_before(self.days_of(year, month), day)
            if found is None:
                month, day, hour, minute = month - 1, 31, 23, 59
                continue
            if found != day:
                day, hour, minute = found, 23, 59
            found = _at_or_before(self.hours, hour)
            if found is None:
                day, hour, minute = day - 1, 23, 59
                continue
            if found != hour:
                hour, minute = found, 59
            found = _at_or_before(self.minutes, minute)
            if found is None:
                hour, minute = hour - 1, 59
                continue
            return year, month, day, hour, found
        return None


def parse_cron(text: str) -> Cron:
    """A cron expression (5 fields, or an @ alias) parsed; DefinitionError names the field and the value."""
    written = spec = " ".join(text.split())
    where = f'cron "{written}"'
    if spec.startswith("@"):
        if spec.lower() == "@reboot":
            raise DefinitionError(f"{where}: @reboot is not supported (a schedule fires at times of day; for work "
                                  "at start-up use a hook such as ductwork.on_supervisor_start)")
        if spec.lower() not in CRON_ALIASES:
            raise DefinitionError(f"{where}: unknown alias {spec} (known: {' '.join(CRON_ALIASES)})")
        spec = CRON_ALIASES[spec.lower()]
    fields = spec.split()
    if len(fields) != 5:
        extra = ": a seconds field is not supported" if len(fields) == 6 else ""
        raise DefinitionError(f"{where}: expected 5 fields (minute hour day-of-month month day-of-week), "
                              f"got {len(fields)}{extra}")
    values = [sorted(_cron_field(where, field, *form)) for field, form in zip(fields, CRON_FIELDS, strict=True)]
    cron = Cron(text=written, minutes=tuple(values[0]), hours=tuple(values[1]), days=tuple(values[2]),
                months=tuple(values[3]), weekdays=tuple(sorted({v % 7 for v in values[4]})),
                days_restricted=not fields[2].startswith("*"), weekdays_restricted=not fields[4].startswith("*"),
                wildcard=fields[0].startswith("*") or fields[1].startswith("*"))
    # Both restricted: the weekdays match in every month. Otherwise a day must be in day-of-month, and some
    # allowed month must have it (each date of the 400-year cycle falls on every day of the week).
    if not (cron.days_restricted and cron.weekdays_restricted) and \
            not any(day <= _MONTH_MOST_DAYS[month - 1] for month in cron.months for day in cron.days):
        raise DefinitionError(f"{where}: never fires (day-of-month {fields[2]} never falls in month {fields[3]})")
    return cron


def _cron_field(where: str, text: str, name: str, low: int, high: int, names: tuple[str, ...]) -> set[int]:
    """One field's values: a comma list of ``*``, ``a``, ``a-b``, each with an optional ``/step``."""
    values: set[int] = set()
    for item in text.split(","):
        if not item:
            raise DefinitionError(f"{where}: {name} has an empty item in {text!r}")
        base, slash, step_text = item.partition("/")
        if base == "*":
            start, end = low, high
        else:
            first, dash, last = base.partition("-")
            start = _cron_value(where, first or item, name, low, high, names)
            end = _cron_value(where, last or item, name, low, high, names) if dash else high if slash else start
            if dash and name == "day-of-week" and end == 0 < start:
                end = 7   # FRI-SUN, 5-0: Sunday as 7 (not a backwards range)
            if end < start:
                raise DefinitionError(f"{where}: {name} range {first}-{last} is backwards "
                                      f"(write {start}-{high},{low}-{end})")
        step = _cron_value(where, step_text or item, f"{name} step", 1, high, ()) if slash else 1
        values.update(range(start, end + 1, step))
    return values


def _cron_value(where: str, token: str, name: str, low: int, high: int, names: tuple[str, ...]) -> int:
    """One number (or month / day name) of a field, in range."""
    if names and token.upper() in names:
        return names.index(token.upper()) + low
    if not (token.isascii() and token.isdigit()):
        noun = "month" if name == "month" else "day"
        kind = f" or a {noun} name ({names[0]}-{names[-1]})" if names else ""
        raise DefinitionError(f"{where}: {name} {token!r} is not a number{kind}")
    value = int(token)
    if not low <= value <= high:
        raise DefinitionError(f"{where}: {name} {value} is out of range {low}-{high}")
    return value


def _zone(timezone: str) -> Any:
    """The tzinfo of an IANA zone name. UTC needs no tz database (zoneinfo is imported only for the others)."""
    import datetime
    if timezone == "UTC":
        return datetime.timezone.utc
    import zoneinfo
    try:
        return zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, TypeError, OSError):
        raise DefinitionError(f"Schedule(timezone={timezone!r}): unknown time zone (an IANA name such as "
                              "'Europe/Berlin', or 'UTC')") from None


def _local(zone: Any, t: float) -> tuple[Wall, int, float]:
    """The local minute an instant shows, its fold (1: the second showing of a repeated time), and how far
    the clocks fall back there (0 unless that time is shown twice)."""
    import datetime
    local = datetime.datetime.fromtimestamp(t, zone)
    shift = abs((local.utcoffset() - local.replace(fold=1 - local.fold).utcoffset()).total_seconds())
    return (local.year, local.month, local.day, local.hour, local.minute), local.fold, shift


def _instants(zone: Any, wall: Wall, wildcard: bool) -> list[float]:
    """The fire instants of a matching local minute by the DST rule above, sorted (none for a wildcard
    schedule's minute that the clocks skip)."""
    import datetime
    import math
    local = datetime.datetime(*wall)
    first, second = (local.replace(tzinfo=zone, fold=fold).timestamp() for fold in (0, 1))
    if first == second:
        return [first]
    early, late = sorted((first, second))
    if _local(zone, early)[0] == wall:    # shown twice: fold 0 is the first showing, the earlier instant
        return [early, late] if wildcard else [early]
    if wildcard:                           # skipped: early and late are the two offsets' readings of it
        return []
    offset = datetime.datetime.fromtimestamp(late, zone).utcoffset()
    low, high = math.floor(early), math.ceil(late)   # the gap ends at the second the offset changes
    while high - low > 1:
        middle = (low + high) // 2
        if datetime.datetime.fromtimestamp(middle, zone).utcoffset() == offset:
            high = middle
        else:
            low = middle
    return [float(high)]


def _every_count(every: float, t: float) -> int:
    """How many ``every`` seconds fit in ``t``: the last tick at or before t is that many times ``every``
    (the float division checked both ways, so every host gets the same tick)."""
    import math
    count = math.floor(t / every)
    while count * every > t:
        count -= 1
    while (count + 1) * every <= t:
        count += 1
    return count


def _schedule_args(args: Any) -> tuple:
    """A schedule's arguments as its runs get them: through JSON (tuples become lists, keys strings)."""
    if not isinstance(args, (tuple, list)):
        raise DefinitionError(f"Schedule(args=...) must be a tuple or list of JSON values, got {args!r}")
    try:
        return tuple(json.loads(json.dumps(list(args), allow_nan=False)))
    except (TypeError, ValueError) as exc:
        raise DefinitionError(f"Schedule(args=...) must be JSON: {exc}") from None


def _schedule_every(every: Any, timezone: str) -> float:
    if isinstance(every, bool) or not isinstance(every, (int, float)) or not 1 <= every <= MAX_DURATION:
        raise DefinitionError(f"Schedule(every=...) must be seconds from 1 to {MAX_DURATION}, got {every!r}")
    if timezone != "UTC":
        raise DefinitionError(f"Schedule(every=..., timezone={timezone!r}): every ticks at multiples of its "
                              "seconds since the Unix epoch; timezone applies to cron only")
    return float(every)


@record(frozen=True, eq=False)
class Schedule:
    """When a pipeline fires by itself: a Pipeline class attribute ``schedule = ductwork.Schedule(...)`` (or a
    list of them). Exactly one of ``cron`` (5 fields or an @ alias, read in ``timezone``) and ``every``
    (seconds: ticks at its multiples since the Unix epoch); each run gets ``args`` (JSON). A mistake is a
    DefinitionError raised here, so when the Pipeline class is defined. Equal when their ``ident`` is."""

    cron: str | None = None
    every: float | None = None
    args: tuple | list = ()
    timezone: str = "UTC"
    _cron: Cron | None = dataclasses.field(default=None, init=False, repr=False)
    _zone: Any = dataclasses.field(default=None, init=False, repr=False)
    _ident: str = dataclasses.field(default="", init=False, repr=False)

    def __post_init__(self) -> None:
        import hashlib
        put = functools.partial(object.__setattr__, self)
        if (self.cron is None) == (self.every is None):
            raise DefinitionError("Schedule needs exactly one of cron= and every=, got "
                                  + ("neither" if self.cron is None else "both"))
        if not isinstance(self.timezone, str):
            raise DefinitionError(f"Schedule(timezone=...) must be an IANA zone name, got {self.timezone!r}")
        put("args", _schedule_args(self.args))
        if self.every is not None:
            put("every", _schedule_every(self.every, self.timezone))
        elif not isinstance(self.cron, str):
            raise DefinitionError(f"Schedule(cron=...) must be a string, got {self.cron!r}")
        else:
            put("_cron", parse_cron(self.cron))
            put("_zone", _zone(self.timezone))
            put("cron", self._cron.text)
        canonical = json.dumps({"cron": self.cron, "every": self.every, "args": list(self.args),
                                "timezone": self.timezone}, sort_keys=True, separators=(",", ":"))
        put("_ident", hashlib.sha1(canonical.encode()).hexdigest()[:12])

    @property
    def ident(self) -> str:
        """12 hex digits naming this schedule within its pipeline, the same in every process and Python run
        (sha1 of its canonical JSON, not hash()): part of the unique key of each tick."""
        return self._ident

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and other.ident == self.ident

    def __hash__(self) -> int:
        return hash(self._ident)

    def describe(self) -> str:
        """One line for listings: ``cron "0 3 * * *" (Europe/Berlin)`` or ``every 60s``, then any args."""
        if self.every is not None:
            every = self.every
            what = f"every {int(every) if every.is_integer() else every}s"
        else:
            what = f'cron "{self.cron}" ({self.timezone})'
        return f"{what} with args {json.dumps(list(self.args))}" if self.args else what

    __str__ = describe

    def next_after(self, t: float) -> float:
        """The first fire time strictly after ``t`` (epoch seconds)."""
        cron, zone = self._cron, self._zone
        if cron is None:
            return float((_every_count(self.every, t) + 1) * self.every)
        wall, fold, shift = _local(zone, t)
        if fold == 0 and shift:   # t is in the first showing of a repeated hour: the second showings of the
            wall = _local(zone, t - shift)[0]   # minutes before it are still to come
        best = None
        for _ in range(3 * 1440):   # the minutes passed over here span at most one clock change (< a day)
            wall = cron.next_wall(wall)
            if wall is None:
                break
            instants = _instants(zone, wall, cron.wildcard)
            later = [x for x in instants if x > t]
            if later and (best is None or later[0] < best):
                best = later[0]
            if instants and instants[0] > t:   # a later minute's first instant is no earlier: done
                return best
            wall = (*wall[:4], wall[4] + 1)
        raise ValueError(f"{self}: no fire time after {t!r} within {CRON_HORIZON_YEARS} years")

    def latest_at_or_before(self, t: float) -> float | None:
        """The last fire time at or before ``t`` (epoch seconds); None if there is none within
        CRON_HORIZON_YEARS (only near the ends of the calendar: a cron that never fires is refused)."""
        cron, zone = self._cron, self._zone
        if cron is None:
            return float(_every_count(self.every, t) * self.every)
        wall, fold, shift = _local(zone, t)
        if fold == 1:   # t is in the second showing of a repeated hour: the first showings of the minutes
            wall = _local(zone, t + shift)[0]   # after it are already past
        best = None
        for _ in range(3 * 1440):
            wall = cron.previous_wall(wall)
            if wall is None:
                return None
            instants = _instants(zone, wall, cron.wildcard)
            earlier = [x for x in instants if x <= t]
            if earlier and (best is None or earlier[-1] > best):
                best = earlier[-1]
            if instants and instants[-1] <= t:   # an earlier minute's last instant is no later: done
                return best
            wall = (*wall[:4], wall[4] - 1)
        return None


def schedules_of(pipeline_name: str, value: Any) -> list[Schedule]:
    """A Pipeline class attribute ``schedule`` as a list: None, a Schedule, or a list or tuple of Schedules, no
    two alike (they would share their ticks' unique keys)."""
    if value is None:
        return []
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    seen: set[str] = set()
    for item in items:
        if not isinstance(item, Schedule):
            raise DefinitionError(f"pipeline {pipeline_name}: schedule must be a ductwork.Schedule or a list of "
                                  f"them, got {item!r}")
        if item.ident in seen:
            raise DefinitionError(f"pipeline {pipeline_name}: schedule {item} is listed twice")
        seen.add(item.ident)
    return items


# =====================================================================================
# engine: every state change of runs, branches and steps; its records, its SQL, its decisions
# =====================================================================================
# Step rows are the job queue (status queued -> running -> succeeded | failed). A claim
# stamps claimed_by (the process row id: one per incarnation) and a random claim_token;
# every later write about that claim repeats both in its WHERE clause, so a process that
# lost its claim (reaped, handed back) cannot commit. Branch rows are the advancement
# queue (status running -> advance -> advancing -> running | waiting | completed | halted),
# fenced the same way.

# -- records: one per row shape ------------------------------------------------------------
# A record read from the database names its select list in COLUMNS, one item per field
# ("expression AS field", or a plain column named like the field), and is built by name
# from it (from_row): the statement and the field order cannot drift apart.

class _Row:
    """Mixin of the records read from SQL: ``COLUMNS`` is their select list."""

    COLUMNS: tuple[str, ...] = ()

    @classmethod
    def select_list(cls) -> str:
        """The ``COLUMNS`` as a select list (for SELECT and RETURNING)."""
        return ",\n    ".join(cls.COLUMNS)

    @classmethod
    @functools.cache
    def field_names(cls) -> tuple[str, ...]:
        """The field each COLUMNS item fills, in order."""
        return tuple(item.rsplit(" AS ", 1)[-1].split(".")[-1] for item in cls.COLUMNS)

    @classmethod
    def from_row(cls, row: Sequence[Any], **extra: Any) -> Any:
        """The record of one row of a statement that selected ``select_list()``."""
        return cls(**dict(zip(cls.field_names(), row, strict=True)), **extra)


@record
class JobClaim(_Row):
    """A step this process claimed to run (a row of ``SQL.claim_steps``)."""

    COLUMNS = ("id AS step_id", "run_id", "branch_id", "node", "name", "input", "attempts", "crashes",
               "claimed_at", "priority", "concurrency_key AS stored_key",
               "CASE WHEN available_at > created_at THEN available_at ELSE created_at END AS claimable_at")
    step_id: int
    run_id: int
    branch_id: int
    node: int                  # the step's node in the run's definition (0: the start step)
    name: str                  # the step's name
    input: str                 # its input, JSON as stored
    attempts: int              # failed attempts so far (the retry budget)
    crashes: int               # crashed executions so far (the crash budget)
    claimed_at: float          # database clock, epoch seconds
    priority: int              # its run's (trigger(priority=))
    stored_key: str | None     # the concurrency key its row has (a capped step claimed before, then let go)
    claimable_at: float        # since when it could be claimed: queued, or its delay's end (queue wait's start)
    pipeline: str
    process_id: int            # the claimer's process row: every write about the claim is fenced on it
    token: str                 # the claim token: ... and on this
    concurrency_key: str | None = None   # a capped step's key: it holds one of the key's slots ("" without a key)
    refused: str | None = None           # why its concurrency_key could not be computed: it fails without running
    started: float | None = None   # time.monotonic() when it began running (set by the runner)
    ended: float | None = None     # ... and when it returned, raised or reached its deadline (its duration's end)
    # its run was cancelled (Runtime.look_for_cancels): it must not start (``dropped``), or, running, should stop
    dropped: bool = False
    stop_requested: bool = False
    confirmed: float = 0.0   # time.monotonic() when it was last known to be this claimer's (claim, a look)
    timeout: float | None = None    # its step's timeout, seconds (None: none)
    deadline: float | None = None   # its attempt's timeout, epoch seconds (self.deadline), None for none
    expires: float | None = None    # ... on the monotonic clock (the timekeeper's)
    timed_out: bool = False          # past its deadline: a StepTimeout failure is (being) committed for it
    returned: bool = False           # its step returned before its deadline: its own result counts

    @property
    def should_stop(self) -> bool:
        """Cancelled (stop_requested) or past its deadline."""
        return self.stop_requested or (self.expires is not None and time.monotonic() >= self.expires)

    @property
    def attempt(self) -> int:
        """1 for the first execution; every failed attempt and every crash adds one."""
        return self.attempts + self.crashes + 1

    def mark_started(self) -> None:
        """It begins running now (a batch's later steps start well after their claim)."""
        self.started = time.monotonic()

    def ran_for(self) -> float | None:
        """Seconds since it began running (None: it never did): its execution row's start is
        the commit's database time less this, so start and finish share one clock."""
        return None if self.started is None else time.monotonic() - self.started


# Where a claim row has its priority (Engine._claim_queue: the priority of a claim's rows, one, the lowest).
JOB_CLAIM_PRIORITY = JobClaim.field_names().index("priority")


@record
class StepResult:
    """A finished execution waiting to be committed (several are committed in one transaction)."""
    claim: JobClaim
    ok: bool
    value: str                       # output JSON, or the error text
    permanent: str | None = None     # a halt reason that makes retrying pointless
    delay: float | None = None       # a failure: seconds before the retry (None: config job_worker.retry_delay)
    max_retry: int | None = None     # a failure: the step's retry budget (None: config job_worker.max_retry)


@record
class Committed:
    """What one commit of results did."""
    accepted: list[bool]             # per result: still held, so written
    halted: list[int]                # runs that halted in this commit (on_halt to fire)
    claims: list[JobClaim]           # claimed in the same transaction
    discarded: set[int] = dataclasses.field(default_factory=set)    # steps of cancelled runs: results dropped
    completed: list[int] = dataclasses.field(default_factory=list)  # runs that completed here (on_complete)


@record
class BranchClaim(_Row):
    """A branch held for advancement: claimed (``SQL.claim_branches``) or row-locked by the
    transaction that commits its step (``BulkSQL.lock_branches``)."""

    COLUMNS = ("id", "run_id", "pipeline", "definition", "parent_id", "node", "expected", "arrived",
               "advance_failures", "waiting_for", "wait_until")
    id: int
    run_id: int
    pipeline: str
    definition: str          # the hash of the run's definition
    parent_id: int | None    # the branch this one is a child of (a fan-out), None for the root
    node: int                # the node of its current step
    expected: int            # children of its open fan-out (0: none)
    arrived: int             # ... of which this many have finished
    advance_failures: int    # failed advancements so far (the advancer's retry budget)
    waiting_for: str | None  # the signal it is parked for (wait_for), None when it waits for none
    wait_until: float | None  # ... and until when (None: no timeout)
    process_id: int
    token: str               # "" for a branch locked (not claimed) by the transaction that advances it
    held: str = "advancing"  # the status it is held in: "running" when locked by a step's own commit


@record
class StepState(_Row):
    """The latest step of a branch, as an advancement reads it (``SQL.current_step``)."""

    COLUMNS = ("id AS step_id", "status", "output", "halt_reason")
    step_id: int
    status: str
    output: str | None       # JSON as stored
    halt_reason: str | None


@record
class HeldStep(_Row):
    """A running step held by a process that is being retired or reaped (``SQL.steps_held_by``)."""

    COLUMNS = ("id AS step_id", "run_id", "branch_id", "pipeline", "name", "attempts", "crashes", "claimed_at",
               "concurrency_key")
    step_id: int
    run_id: int
    branch_id: int
    pipeline: str
    name: str
    attempts: int
    crashes: int
    claimed_at: float
    concurrency_key: str | None   # the slot it holds (a capped step's key)


@record
class StepRecord(_Row):
    """One step of a run, as stored (``Run.steps``; input and output decoded)."""

    COLUMNS = ("id", "name", "node", "status", "input", "output", "attempts", "crashes", "error", "halt_reason",
               "branch_id", "created_at", "finished_at")
    id: int
    name: str
    node: int
    status: str              # queued | running | succeeded | failed; cancelled runs: cancelling | stopping | cancelled
    input: Any
    output: Any
    attempts: int
    crashes: int
    error: str | None        # the last failure's text (class, message, traceback)
    halt_reason: str | None
    branch_id: int
    created_at: float
    finished_at: float | None


@record
class RunRow(_Row):
    """A run row as stored (``SQL.select_run``); JSON columns still encoded."""

    COLUMNS = ("id", "pipeline", "status", "input", "output", "halt_reasons", "created_at", "finished_at",
               "definition", "cancel_reason", "scheduled_at", "priority")
    id: int
    pipeline: str
    status: str              # in_progress | completed | halted | cancelled
    input: str
    output: str | None
    halt_reasons: str        # a JSON list
    created_at: float
    finished_at: float | None
    definition: str          # the hash of its definition
    cancel_reason: str | None   # what cancel(reason=...) said
    scheduled_at: float | None  # a delayed run: when its first step became (or becomes) claimable
    priority: int               # trigger(priority=): lower first


@record
class ProcessRow(_Row):
    """A process row with its ages on the database clock (``SQL.processes``)."""

    COLUMNS = ("id", "pid", "machine_identifier AS machine", "role", "pipelines", "parent_id", "state", "restarts",
               "info", "started_at", "last_heartbeat_at", "{now} - last_heartbeat_at AS heartbeat_age",
               "{now} - started_at AS age")
    id: int
    pid: int
    machine: str
    role: str                # supervisor | advancer | worker
    pipelines: str           # comma-separated
    parent_id: int | None    # the supervisor's row, for a forked child
    state: str               # running | draining
    restarts: int
    info: str                # JSON: children (supervisor), in-flight count (runtime)
    started_at: float
    last_heartbeat_at: float
    heartbeat_age: float     # seconds since the last heartbeat
    age: float               # seconds since it registered

    def liveness(self) -> dict:
        """What the health check reads of the row (``info`` is not decoded: never its failure)."""
        return {"id": self.id, "pid": self.pid, "role": self.role, "state": self.state, "restarts": self.restarts,
                "heartbeat_age": round(float(self.heartbeat_age), 3), "age": round(float(self.age), 3)}

    def report(self) -> dict:
        """The row as status and the dashboard show it (pipelines as a list, info decoded, ages rounded)."""
        return {"id": self.id, "pid": self.pid, "machine": self.machine, "role": self.role,
                "pipelines": [p for p in self.pipelines.split(",") if p], "parent_id": self.parent_id,
                "state": self.state, "restarts": self.restarts, "info": _loads(self.info),
                "heartbeat_age": round(float(self.heartbeat_age), 3), "age": round(float(self.age), 3)}


@record
class _Outcome:
    """What an advancement decided for a branch (computed before any write)."""
    status: str
    node: int
    expected: int = 0
    arrived: int = 0         # a join that halts keeps its counts, so revive() can reopen it
    output: str | None = None
    halt_reason: str | None = None
    new_step: tuple[int, str] | None = None               # (node, input json) on this branch
    children: list[tuple[int, int, str]] = dataclasses.field(default_factory=list)  # (position, node, input json)
    warning: str | None = None   # why it halted, for the log
    delay: float = 0.0       # a sleep before the transition: its new steps are claimable this much later
    park: tuple[str, float | None] | None = None   # wait_for: parked for this signal, until then (None: no timeout)


# -- SQL, grouped by table ---------------------------------------------------------------
# Placeholders: ``:name`` parameters; ``{now}`` the database clock (epoch seconds; on Postgres the volatile
# clock_timestamp(), which compared with an indexed column is read per row and bounds no index range: a
# condition that must be an index range writes ``(SELECT {now})``, read once);
# ``{skip_locked}``, ``{for_update}``, ``{key_share}`` row locks (Postgres only); ``{fence}``
# the claimer-liveness condition (SQL.FENCE). Store.sql() fills them in once per text.

class SQL:
    """One place for each SQL statement of the engine and the runners."""

    # -- ductwork_definitions: one row per distinct pipeline graph, keyed by its hash ---------

    # Store a definition the first time a run of it is triggered.
    insert_definition = """
        INSERT INTO ductwork_definitions (hash, pipeline, body, created_at)
        VALUES (:hash, :pipeline, :body, {now})
        ON CONFLICT (hash) DO NOTHING"""

    # The graph a run was triggered with.
    select_definition = """
        SELECT body
        FROM ductwork_definitions
        WHERE hash = :hash"""

    # -- ductwork_runs: one row per run ----------------------------------------------------------

    # A new run.
    insert_run = """
        INSERT INTO ductwork_runs (pipeline, definition, status, input, priority, created_at, updated_at)
        VALUES (:pipeline, :definition, 'in_progress', :input, :priority, {now}, {now})
        RETURNING id"""

    # Tracing: a run's trace context (set by its trigger), and what a worker reads of it.
    run_traced = """
        UPDATE ductwork_runs
        SET trace_context = :trace_context
        WHERE id = :id"""
    run_trace_context = """
        SELECT trace_context
        FROM ductwork_runs
        WHERE id = :id"""

    # trigger(key=...): a run with a key, unless its pipeline has a run with that key already (then nothing).
    insert_keyed_run = """
        INSERT INTO ductwork_runs (pipeline, definition, status, input, priority, trigger_key, created_at,
                                   updated_at)
        VALUES (:pipeline, :definition, 'in_progress', :input, :priority, :key, {now}, {now})
        ON CONFLICT (pipeline, trigger_key) WHERE trigger_key IS NOT NULL DO NOTHING
        RETURNING id"""

    # ... and that run.
    run_of_key = """
        SELECT id
        FROM ductwork_runs
        WHERE pipeline = :pipeline
          AND trigger_key = :key"""

    # A delayed run (trigger(delay=, at=)): when it starts, :at (epoch seconds) or :delay seconds from now on
    # the database clock; then its first step waits until then (delay_first_step).
    schedule_run = """
        UPDATE ductwork_runs
        SET scheduled_at = COALESCE(CAST(:at AS DOUBLE PRECISION), {now} + :delay)
        WHERE id = :id
        RETURNING scheduled_at"""

    delay_first_step = """
        UPDATE ductwork_steps
        SET available_at = :start
        WHERE branch_id = :branch_id"""

    # status: the branches parked for a signal, per pipeline, with the first deadline (a partial index's rows) ...
    parked_branches = """
        SELECT pipeline, count(*), min(wait_until)
        FROM ductwork_branches
        WHERE waiting_for IS NOT NULL
          AND status = 'advance'
        GROUP BY pipeline"""

    # ... the first of them, each with what it waits for and until when ...
    parked_list = """
        SELECT run_id, id, pipeline, waiting_for, wait_until
        FROM ductwork_branches
        WHERE waiting_for IS NOT NULL
          AND status = 'advance'
        ORDER BY id
        LIMIT :limit"""

    # ... and a pipeline's steps asleep (after a sleep: not a retry's delay, nor a delayed run's start), with the
    # first to wake (an index range of the queue).
    # ... and the steps of capped steps waiting for a free slot of their key, per pipeline (the blocked ones: a
    # partial index's rows).
    blocked_steps = """
        SELECT pipeline, count(*)
        FROM ductwork_steps
        WHERE status = 'blocked'
        GROUP BY pipeline"""

    sleeping_steps = """
        SELECT count(*), min(available_at)
        FROM ductwork_steps
        WHERE pipeline = :pipeline
          AND status = 'queued'
          AND priority = :priority
          AND available_at > (SELECT {now})
          AND node > 0
          AND attempts = 0
          AND crashes = 0"""

    # -- ductwork_queue_samples: the queue's history (migration 9) ----------------------------------------
    # The claimable steps per pipeline now, and the seconds the oldest of them has waited: since it was queued,
    # or since its delay ended (its available_at alone is its run's start: the claim order, see insert_steps).
    # /metrics reads it as is, the samples below copy it.
    claimable = """
        SELECT pipeline, count(*), max({now} - CASE WHEN available_at > created_at THEN available_at
                                                    ELSE created_at END)
        FROM ductwork_steps
        WHERE status = 'queued' AND available_at <= (SELECT {now})
        GROUP BY pipeline"""

    # A minute's sample taken by this transaction (its marker row; no row back: another process took it).
    queue_sample_taken = """
        INSERT INTO ductwork_queue_samples (minute, pipeline, depth, oldest_age)
        VALUES (:minute, '', 0, 0)
        ON CONFLICT (minute, pipeline) DO NOTHING
        RETURNING minute"""

    queue_sample = f"""
        INSERT INTO ductwork_queue_samples (minute, pipeline, depth, oldest_age)
        SELECT CAST(:minute AS BIGINT), q.*
        FROM ({claimable}) q"""

    # The sample before :minute (its minute; none: no row): what it counted (see STATS_LAG).
    queue_sample_before = """
        SELECT max(minute)
        FROM ductwork_queue_samples
        WHERE pipeline = ''
          AND minute < :minute"""

    # Whether a minute's sample was taken: a look before a write transaction that would wait for the taker's.
    queue_sample_seen = """
        SELECT 1
        FROM ductwork_queue_samples
        WHERE minute = :minute
          AND pipeline = ''"""

    # The steps finished (runs completed) in the minutes [:start, :end), by minute, pipeline and duration bin
    # (WHERE true: SQLite parses ON CONFLICT after a SELECT only behind a WHERE).
    minute_stats = {kind: f"""
        INSERT INTO ductwork_minute_stats (minute, pipeline, kind, bin, count)
        SELECT minute, pipeline, '{kind}', bin, n
        FROM ({finished_by_minute(kind)}) f
        WHERE true
        ON CONFLICT (minute, pipeline, kind, bin) DO NOTHING""" for kind in FINISHED_KINDS}

    queue_samples_pruned = """
        DELETE FROM ductwork_queue_samples
        WHERE minute < :before"""

    minute_stats_pruned = """
        DELETE FROM ductwork_minute_stats
        WHERE minute < :before"""

    # -- ductwork_schedules: each schedule's last tick (SPEC §16) --------------------------------------
    # The tick a schedule fired last (or was first seen at), locked for the firing transaction.
    schedule_state = """
        SELECT last_fire
        FROM ductwork_schedules
        WHERE pipeline = :pipeline
          AND ident = :ident
        {for_update}"""

    # A schedule seen for the first time: its latest tick counts as fired (a new schedule waits for its next).
    schedule_seen = """
        INSERT INTO ductwork_schedules (pipeline, ident, last_fire, last_run_id, updated_at)
        VALUES (:pipeline, :ident, :last_fire, NULL, {now})
        ON CONFLICT (pipeline, ident) DO NOTHING"""

    # ... a tick of a schedule switched off in config: passed, not fired.
    schedule_skipped = """
        UPDATE ductwork_schedules
        SET last_fire = :last_fire, updated_at = {now}
        WHERE pipeline = :pipeline
          AND ident = :ident
          AND last_fire < :last_fire"""

    schedule_fired = """
        UPDATE ductwork_schedules
        SET last_fire = :last_fire, last_run_id = :run_id, updated_at = {now}
        WHERE pipeline = :pipeline
          AND ident = :ident
          AND last_fire < :last_fire"""

    # `schedules`: every schedule's last tick and run.
    schedule_states = """
        SELECT pipeline, ident, last_fire, last_run_id
        FROM ductwork_schedules"""

    # The scheduled runs still to start, per pipeline, and the first start (an index range per pipeline).
    scheduled_runs = """
        SELECT pipeline, count(*), min(scheduled_at)
        FROM ductwork_runs
        WHERE status = 'in_progress'
          AND scheduled_at IS NOT NULL
          AND scheduled_at > {now}
        GROUP BY pipeline"""

    # One run, as stored.
    select_run = f"""
        SELECT {RunRow.select_list()}
        FROM ductwork_runs
        WHERE id = :id"""

    # Runs newest first, of one pipeline and/or status when given (Run.list). {where} is fixed text per filter
    # ("AND pipeline = :pipeline", ...): one statement per combination, each with a plan that reads the index
    # for it (a single "(:p IS NULL OR pipeline = :p)" text gets one generic plan for all of them).
    list_runs = f"""
        SELECT {RunRow.select_list()}
        FROM ductwork_runs
        WHERE 1 = 1{{where}}
        ORDER BY id DESC
        LIMIT :limit"""

    # A run halts once (its branch halted); the epoch lets on_halt fire once per halt.
    run_halted = """
        UPDATE ductwork_runs
        SET status = 'halted', halt_reasons = :halt_reasons, halt_epoch = halt_epoch + 1,
            finished_at = {now}, updated_at = {now}
        WHERE id = :id
          AND status = 'in_progress'"""

    # Take the right to run a halted run's on_halt handlers (one process wins per halt).
    claim_halt_notice = """
        UPDATE ductwork_runs
        SET halt_notified = halt_epoch
        WHERE id = :id
          AND status = 'halted'
          AND halt_notified < halt_epoch"""

    # revive(): a halted or cancelled run is in progress again.
    run_reopened = """
        UPDATE ductwork_runs
        SET status = 'in_progress', halt_reasons = '[]', cancel_reason = NULL, finished_at = NULL, updated_at = {now}
        WHERE id = :id
          AND status IN ('halted', 'cancelled')"""

    # -- cancelling a run (Engine.cancel; see "Cancelling a run") --

    # Which of some run ids ({ids}) name a run (the cancel and revive commands).
    existing_runs = """
        SELECT id
        FROM ductwork_runs
        WHERE {ids}"""

    # The runs a cancel selects, a batch at a time in id order; {where} is fixed text per filter (the run ids,
    # the pipeline, the age: see Engine.cancel).
    runs_to_cancel = """
        SELECT id
        FROM ductwork_runs
        WHERE status = 'in_progress'
          AND id > :after
          AND id <= :upto{where}
        ORDER BY id
        LIMIT :limit"""

    # The newest run (a bulk cancel stops there: runs triggered while it works are not its own).
    newest_run = """
        SELECT coalesce(max(id), 0)
        FROM ductwork_runs"""

    # Postgres: the locks of a batch of runs (:ids, in the order of their keys: run_lock_order), exclusive for a
    # cancel or a revive, shared for a transaction that may write about their progress (from its first
    # statement: a commit, an advancement, a hand-back, a release). A cancel waits for those in flight; one after
    # it waits for it, then finds its steps cancelled. Key: (RUN_LOCK_CLASS, id mod 2^31 - 1): two runs that
    # share one only wait for each other.
    lock_runs = """
        SELECT pg_advisory_xact_lock(:class, CAST(id % 2147483647 AS INTEGER))
        FROM unnest(CAST(:ids AS BIGINT[])) AS id"""
    share_runs = """
        SELECT pg_advisory_xact_lock_shared(:class, CAST(id % 2147483647 AS INTEGER))
        FROM unnest(CAST(:ids AS BIGINT[])) AS id"""
    # ... and the shared locks of the runs of some steps ({steps}: a condition on them), found by the statement.
    share_runs_of_steps = """
        SELECT pg_advisory_xact_lock_shared(:class, key)
        FROM (SELECT DISTINCT CAST(run_id % 2147483647 AS INTEGER) AS key
              FROM ductwork_steps
              WHERE {steps}
              ORDER BY key) AS keys"""
    RUN_LOCK_CLASS = 0x64776374   # "dwct"
    RUN_LOCK_MODULUS = 2147483647
    # A cancel gives up on a lock held longer than this (a transaction of a frozen process, say): the batch
    # is tried again (Engine.cancel), the server releases what it took, and the client's socket timeout never
    # fires first.
    cancel_lock_timeout = """
        SET LOCAL lock_timeout = '2s'"""

    # The runs of a batch that are still in progress are cancelled ({ids}: the id is one of :ids).
    runs_cancelled = """
        UPDATE ductwork_runs
        SET status = 'cancelled', cancel_reason = :reason, finished_at = {now}, updated_at = {now}
        WHERE {ids}
          AND status = 'in_progress'
        RETURNING id, pipeline"""

    # The executions past their mark, per pipeline and outcome ({where}: more conditions). Rows of the version
    # before migration 2 name no pipeline: their steps do (a join, only for those; the new rows need none).
    EXECUTIONS_PAST_MARK = """
            SELECT e.pipeline, e.outcome, count(*) AS n
            FROM ductwork_executions e
            WHERE e.id > (SELECT mark FROM ductwork_rollup WHERE name = 'executions')
              AND e.pipeline IS NOT NULL{where}
            GROUP BY e.pipeline, e.outcome
            UNION ALL
            SELECT s.pipeline, e.outcome, count(*)
            FROM ductwork_executions e
            JOIN ductwork_steps s ON s.id = e.step_id
            WHERE e.id > (SELECT mark FROM ductwork_rollup WHERE name = 'executions')
              AND e.pipeline IS NULL{where}
            GROUP BY s.pipeline, e.outcome"""

    # status, the overview and /metrics: every count in one statement (one snapshot; see "Counts (migration 2)"):
    # the rolled-up totals, the rows past the marks, and the runs in progress and halted.
    counters = f"""
        SELECT pipeline, name, label, sum(n)
        FROM (SELECT pipeline, name, label, value AS n
              FROM ductwork_counters
              UNION ALL
              SELECT pipeline, name, label, value
              FROM ductwork_tallies
              UNION ALL
              SELECT pipeline, 'triggered', '', count(*)
              FROM ductwork_runs
              WHERE id > (SELECT mark FROM ductwork_rollup WHERE name = 'runs')
              GROUP BY pipeline
              UNION ALL
              SELECT pipeline, 'executed', outcome, n
              FROM ({EXECUTIONS_PAST_MARK.replace("{where}", "")}) AS executions
              UNION ALL
              SELECT pipeline, 'runs', status, count(*)
              FROM ductwork_runs
              WHERE status IN ({", ".join(f"'{status}'" for status in COUNTED_STATUSES)})
              GROUP BY pipeline, status) AS parts
        GROUP BY pipeline, name, label
        ORDER BY pipeline, name, label"""

    # Postgres, before a statement that reads past the marks (counts, rollups, prune batches): the planner
    # cannot know the marks (a subquery), guesses that a third of each table lies past them, and plans
    # parallel workers and JIT compilation (100 ms at a million runs) for what is an index range of a few
    # rows. The transaction goes without either.
    plain_plans = """
        SELECT set_config('max_parallel_workers_per_gather', '0', true), set_config('jit', 'off', true)"""

    # Add to a rolled-up total (:pipeline, :name, :label, :n).
    add_count = """
        INSERT INTO ductwork_counters (pipeline, name, label, value)
        VALUES (:pipeline, :name, :label, :n)
        ON CONFLICT (pipeline, name, label) DO UPDATE SET value = ductwork_counters.value + excluded.value"""

    # Roll up (roll_up_counts). First, each table's newest id under a lock that waits for the transactions
    # inserting into it, so that every row up to it is committed (a later insert gets a higher id); the lock is
    # held for that one read, one table per transaction. A commit takes the two tables in either order (a
    # success's execution row is its first write and a completed run's row comes later; a fan-in's join the other
    # way round): holding one while waiting for the other would close a cycle with it that only the timeout ends,
    # the commit stalled for it. A writer (or a vacuum) that holds a table longer than the timeout makes this
    # turn give up, never the writers wait.
    roll_up_timeout = """
        SET LOCAL lock_timeout = '200ms'"""
    ROLL_UP_BARRIERS = {   # each mark's table (ROLLED_UP's names): its lock, then its newest id
        "runs": ("""
        LOCK TABLE ductwork_runs IN SHARE MODE""", """
        SELECT coalesce(max(id), 0) FROM ductwork_runs"""),
        "executions": ("""
        LOCK TABLE ductwork_executions IN SHARE MODE""", """
        SELECT coalesce(max(id), 0) FROM ductwork_executions"""),
    }
    # Then, under the pruners' lock alone (no prune deletes meanwhile), the rows past the marks up to those ids
    # join the totals and the marks move there.
    roll_up_runs = """
        INSERT INTO ductwork_counters (pipeline, name, label, value)
        SELECT pipeline, 'triggered', '', count(*)
        FROM ductwork_runs
        WHERE id > (SELECT mark FROM ductwork_rollup WHERE name = 'runs')
          AND id <= :upto
        GROUP BY pipeline
        ON CONFLICT (pipeline, name, label) DO UPDATE SET value = ductwork_counters.value + excluded.value"""
    roll_up_executions = f"""
        INSERT INTO ductwork_counters (pipeline, name, label, value)
        SELECT pipeline, 'executed', outcome, sum(n)
        FROM ({EXECUTIONS_PAST_MARK.replace("{where}", " AND e.id <= :upto")}) AS executions
        WHERE true
        GROUP BY pipeline, outcome
        ON CONFLICT (pipeline, name, label) DO UPDATE SET value = ductwork_counters.value + excluded.value"""
    mark_of = """
        SELECT mark
        FROM ductwork_rollup
        WHERE name = :name"""
    move_mark = """
        UPDATE ductwork_rollup
        SET mark = :upto
        WHERE name = :name
          AND mark < :upto"""
    # each mark and the statement that rolls its rows up
    ROLLED_UP = {"runs": roll_up_runs, "executions": roll_up_executions}

    # status: the latest halts.
    recent_halts = """
        SELECT id, pipeline, halt_reasons, finished_at
        FROM ductwork_runs
        WHERE status = 'halted'
        ORDER BY finished_at DESC
        LIMIT :limit"""

    # Pipelines with runs in progress older than the grace (candidates for pipeline_not_configured).
    stale_pipelines = """
        SELECT DISTINCT pipeline
        FROM ductwork_runs
        WHERE status = 'in_progress'
          AND created_at < {now} - :grace"""

    # -- ductwork_branches: the advancement queue (running -> advance -> advancing -> ...) -------

    # The root branch of a new run.
    insert_branch = """
        INSERT INTO ductwork_branches (run_id, pipeline, definition, node, status, available_at, created_at,
                                       updated_at)
        VALUES (:run_id, :pipeline, :definition, 0, 'running', {now}, {now}, {now})
        RETURNING id"""

    # A branch whose step finished waits for an advancer.
    branch_ready = """
        UPDATE ductwork_branches
        SET status = 'advance', available_at = {now}, updated_at = {now}
        WHERE id = :id
          AND status = 'running'"""

    # Claim up to :limit branches to advance, oldest first (fenced on the claimer's row).
    claim_branches = f"""
        UPDATE ductwork_branches
        SET status = 'advancing', claimed_by = :process_id, claim_token = :token, claimed_at = {{now}}
        WHERE id IN (SELECT id
                     FROM ductwork_branches
                     WHERE pipeline = :pipeline
                       AND status = 'advance'
                       AND available_at <= (SELECT {{now}})
                     ORDER BY available_at, id
                     LIMIT :limit
                     {{skip_locked}}){{fence}}
        RETURNING {BranchClaim.select_list()}"""

    # run_inline (SPEC §19): a branch of one run to advance, at once whatever its backoff says; one parked for a
    # signal only once the signal made it claimable (else the run is left waiting, in progress).
    claim_run_branches = f"""
        UPDATE ductwork_branches
        SET status = 'advancing', claimed_by = :process_id, claim_token = :token, claimed_at = {{now}}
        WHERE id IN (SELECT id
                     FROM ductwork_branches
                     WHERE run_id = :run_id
                       AND status = 'advance'
                       AND (waiting_for IS NULL OR available_at <= (SELECT {{now}}))
                     ORDER BY id
                     LIMIT :limit
                     {{skip_locked}}){{fence}}
        RETURNING {BranchClaim.select_list()}"""

    # Claim one branch by id in a known status (a join whose last child arrived here).
    claim_branch = f"""
        UPDATE ductwork_branches
        SET status = 'advancing', claimed_by = :process_id, claim_token = :token, claimed_at = {{now}}
        WHERE id = :id
          AND status = :status
        RETURNING {BranchClaim.select_list()}"""

    # -- wait_for (SPEC §16): signals and the branches parked for them ----------------------------
    # A run's signal of a name (its payload, JSON), if it was sent.
    signal_of = """
        SELECT payload
        FROM ductwork_signals
        WHERE run_id = :run_id
          AND name = :name"""

    # A branch parks for a signal: in the advance queue (status advance, set by apply_branches) until its
    # timeout, or PARKED_FOREVER; the signal that comes makes it claimable at once (wake_waiting).
    park_branch = """
        UPDATE ductwork_branches
        SET waiting_for = :name, wait_until = :until, available_at = :available_at
        WHERE id = :id"""

    unpark_branch = """
        UPDATE ductwork_branches
        SET waiting_for = NULL, wait_until = NULL
        WHERE id = :id"""

    # run.signal(): the first signal of a name is kept (a later one changes nothing), for a run in progress.
    insert_signal = """
        INSERT INTO ductwork_signals (run_id, name, payload, created_at)
        SELECT id, :name, :payload, {now}
        FROM ductwork_runs
        WHERE id = :run_id
          AND status = 'in_progress'
        ON CONFLICT (run_id, name) DO NOTHING
        RETURNING run_id"""

    # ... and the run's branches parked for it are claimable now.
    wake_waiting = """
        UPDATE ductwork_branches
        SET available_at = {now}
        WHERE run_id = :run_id
          AND status = 'advance'
          AND waiting_for = :name
        RETURNING pipeline"""

    # The children of a fan-out, in position order (their outputs feed the join).
    children_of = """
        SELECT status, output
        FROM ductwork_branches
        WHERE origin_step_id = :origin_step_id
        ORDER BY position"""

    # Count finished children on their parent; the last one makes the parent ready for its join.
    child_arrived = """
        UPDATE ductwork_branches
        SET arrived = arrived + :count,
            status = CASE WHEN arrived + :count >= expected THEN 'advance' ELSE status END,
            available_at = {now}, updated_at = {now}
        WHERE id = :id
          AND status = 'waiting'
        RETURNING status, pipeline"""

    # Give a claimed branch back (after an error: counted, and later by :delay seconds).
    release_branch = """
        UPDATE ductwork_branches
        SET status = 'advance', claimed_by = NULL, claim_token = NULL,
            advance_failures = advance_failures + :failure, available_at = {now} + :delay, updated_at = {now}
        WHERE id = :id
          AND status = 'advancing'
          AND claim_token = :token
        RETURNING advance_failures"""

    # Give back every branch a retired process held.
    release_branches_of = """
        UPDATE ductwork_branches
        SET status = 'advance', claimed_by = NULL, claim_token = NULL, available_at = {now}
        WHERE claimed_by = :process_id
          AND status = 'advancing'
        RETURNING pipeline"""

    # A run's halt reasons, from its halted branches.
    halt_reasons = """
        SELECT halt_reason
        FROM ductwork_branches
        WHERE run_id = :run_id
          AND halt_reason IS NOT NULL
        ORDER BY id"""

    # revive(): the branches whose halt halted the run.
    halted_leaves = """
        SELECT id, parent_id
        FROM ductwork_branches
        WHERE run_id = :run_id
          AND status = 'halted'
          AND halt_reason IS NOT NULL
        ORDER BY id"""

    # revive(): a halted branch runs (its failed step again) or advances again (a wait_for waits afresh).
    reopen_leaf = """
        UPDATE ductwork_branches
        SET status = :status, halt_reason = NULL, advance_failures = 0, available_at = {now}, updated_at = {now},
            waiting_for = NULL, wait_until = NULL
        WHERE id = :id"""

    # revive(): a parent of a reopened branch.
    branch_parent = """
        SELECT status, parent_id
        FROM ductwork_branches
        WHERE id = :id"""

    # revive(): the parent waits for the reopened child again.
    reopen_parent = """
        UPDATE ductwork_branches
        SET status = 'waiting', arrived = arrived - 1, updated_at = {now}
        WHERE id = :id"""

    # Cancel: the branches of cancelled runs ({runs}: the run is one of :ids) that wait for an advancer leave its
    # queue; revive() puts them back.
    branches_cancelled = """
        UPDATE ductwork_branches
        SET status = 'cancelled', claimed_by = NULL, claim_token = NULL, updated_at = {now},
            waiting_for = NULL, wait_until = NULL
        WHERE {runs}
          AND status IN ('advance', 'advancing')"""

    # revive(): ... which go back in the advancer's queue (SQL.reopen_leaf), or run their failed step again.
    cancelled_branches = """
        SELECT id
        FROM ductwork_branches
        WHERE run_id = :run_id
          AND status = 'cancelled'
        ORDER BY id"""

    # Branch claims of this process older than the grace (lost replies: no thread holds them).
    orphaned_branches = """
        SELECT id
        FROM ductwork_branches
        WHERE claimed_by = :process_id
          AND status = 'advancing'
          AND claimed_at < {now} - :grace"""

    # ... given back.
    release_orphaned_branches = """
        UPDATE ductwork_branches
        SET status = 'advance', claimed_by = NULL, claim_token = NULL, available_at = {now}
        WHERE claimed_by = :process_id
          AND status = 'advancing'
          AND claimed_at < {now} - :grace
        RETURNING pipeline"""

    # -- ductwork_steps: the job queue (queued -> running -> succeeded | failed) -----------------

    # Claim up to :limit claimable steps of the lowest priority queued from :lowest on, oldest first (runs started
    # in one tick of the clock: by run), fenced on the claimer's row. One priority at a time: with the priority as
    # its equality, the queue index's available_at is a range, so the steps that wait (a retry's delay, a sleep)
    # are never read; Engine._claim_queue goes on to the next priority (SQL.next_priority) when this one has too
    # few. The lowest priority is looked for below :below only (the priority this process claimed at last, else
    # the highest), :below itself when none is queued there: the head of that priority's index range, where
    # claims and new steps churn, is read once (by the claim), not twice ...
    CLAIM_STEPS = f"""
        UPDATE ductwork_steps
        SET status = 'running', claimed_by = :process_id, claim_token = :token, claimed_at = {{now}}{{keyed}}
        WHERE id IN (SELECT id
                     FROM ductwork_steps
                     WHERE pipeline = :pipeline
                       AND status = 'queued'
                       AND {{priorities}}
                       AND available_at <= (SELECT {{now}})
                     ORDER BY {{order}}
                     LIMIT :limit
                     {{skip_locked}}){{fence}}
        RETURNING {JobClaim.select_list()}{{top}}"""
    # ... each row also says the highest priority queued (the statement's snapshot: evaluated once, an index's
    # last entry), so that a claim of too few at the highest one (a chain's every hop, a burst's tail) knows it
    # need not look further (SQL.next_priority) without asking
    CLAIM_TOP = """,
                  (SELECT max(priority)
                   FROM ductwork_steps
                   WHERE pipeline = :pipeline
                     AND status = 'queued') AS top"""
    CLAIM_AT = """priority = COALESCE((SELECT min(priority)
                                                FROM ductwork_steps
                                                WHERE pipeline = :pipeline
                                                  AND status = 'queued'
                                                  AND priority >= :lowest
                                                  AND priority < :below),
                                               :below)"""
    CLAIM_STEPS_AT = CLAIM_STEPS.replace("{top}", CLAIM_TOP).replace("{priorities}", CLAIM_AT).replace(
        "{order}", "available_at, run_id, id")
    claim_steps = CLAIM_STEPS_AT.replace("{keyed}", "")

    # ... and, once PRIORITY_WALK priorities were walked with too few, the rest of them in one statement: the steps
    # that wait in those priorities are read too (filtered), which a claim of few priorities never does.
    CLAIM_STEPS_REST = CLAIM_STEPS.replace("{top}", "").replace("{priorities}", "priority >= :lowest").replace(
        "{order}", "priority, available_at, run_id, id")
    claim_steps_rest = CLAIM_STEPS_REST.replace("{keyed}", "")

    # A claim of a pipeline with capped steps also writes the key of those without a concurrency_key (:statics,
    # their names: the key is "" whatever their input), so that keeping them needs no second write.
    KEYED = (",\n            concurrency_key = CASE WHEN name IN (SELECT {names}) THEN '' "
             "ELSE concurrency_key END")
    STATIC_NAMES = {"postgres": "json_array_elements_text(CAST(:statics AS JSON))",
                    "sqlite": "value FROM json_each(:statics)"}

    @classmethod
    @functools.cache
    def claim_keyed(cls, rest: bool, dialect: str) -> str:
        """claim_steps (or, ``rest``, claim_steps_rest) for a capped pipeline: writing the static keys too."""
        keyed = cls.KEYED.replace("{names}", cls.STATIC_NAMES[dialect])
        return (cls.CLAIM_STEPS_REST if rest else cls.CLAIM_STEPS_AT).replace("{keyed}", keyed)

    # run_inline (SPEC §19): a queued step of one run, at once whatever it waits for (a retry's delay, a sleep,
    # a delayed start), oldest first; no caps, no priorities (one step at a time, on the caller's thread).
    claim_run_steps = f"""
        UPDATE ductwork_steps
        SET status = 'running', claimed_by = :process_id, claim_token = :token, claimed_at = {{now}}
        WHERE id IN (SELECT id
                     FROM ductwork_steps
                     WHERE run_id = :run_id
                       AND status = 'queued'
                     ORDER BY id
                     LIMIT :limit
                     {{skip_locked}}){{fence}}
        RETURNING {JobClaim.select_list()}"""

    # The lowest priority of a pipeline's queued steps from :lowest on (NULL: none).
    next_priority = """
        SELECT min(priority)
        FROM ductwork_steps
        WHERE pipeline = :pipeline
          AND status = 'queued'
          AND priority >= :lowest"""

    # -- concurrency caps (SPEC §17): a slot is a claim that holds steps of the key --------------
    # A claim holding steps of a capped key (running, told of a cancel, or stopping) holds one of the key's slots:
    # its steps run one after another on one thread, so it is one execution at a time however many it holds. The
    # claim takes the slot, and whatever lets go of the claim (commit, hand-back, reaping, a cancel's let-go)
    # frees it, so a dead holder's slot is freed with its claim, and none can leak. Postgres: a claim of a capped
    # step counts the slots of its key under the key's transaction lock (Engine._slots_held: waited for in lock
    # order, else only tried, and the step given back when it is busy); whatever frees slots takes the same lock,
    # then unblocks, so a step blocked by a claim that has not committed yet is seen once it has.
    SLOT_LOCK_CLASS = 0x5107   # the first key of the slot locks (run locks: RUN_LOCK_CLASS)

    # The slots of a key held: by the claims (tokens) before this one, each one slot however many steps of the key
    # it holds (a claim's steps run one after another on one thread). (This and unblock_steps are also the bodies
    # of migration 6's Postgres functions, SQL.slot_functions: a change here needs a migration that replaces them;
    # tests/test_flow.py compares.)
    slots_held = """
        SELECT count(DISTINCT claim_token)
        FROM ductwork_steps
        WHERE pipeline = :pipeline
          AND name = :name
          AND concurrency_key = :key
          AND status IN ('running', 'cancelling', 'stopping')
          AND concurrency_key IS NOT NULL
          AND claim_token <> :token"""

    # Engine.sweep_blocked: a pipeline's keys with steps waiting for a slot, and the slots each holds (what is let go
    # of without a turn passed on: a cap raised or removed, a step re-keyed or renamed, a queued step whose turn was
    # lost, a process of the version before caps that let go of a slot).
    blocked_keys = """
        SELECT name, concurrency_key
        FROM ductwork_steps
        WHERE pipeline = :pipeline
          AND status = 'blocked'
        GROUP BY name, concurrency_key"""

    held_keys = """
        SELECT name, concurrency_key, count(DISTINCT claim_token)
        FROM ductwork_steps
        WHERE pipeline = :pipeline
          AND status IN ('running', 'cancelling', 'stopping')
          AND concurrency_key IS NOT NULL
        GROUP BY name, concurrency_key"""

    # Steps waiting for a slot of a key, in claim order, queued again: one per slot freed (a claim that finds the
    # slots held again blocks it again; one queued too many costs a claim, one too few would leak the slot). Not
    # those of cancelled runs (a cancel by a process of the version before caps leaves them blocked).
    unblock_steps = """
        UPDATE ductwork_steps
        SET status = 'queued'
        WHERE id IN (SELECT id
                     FROM ductwork_steps
                     WHERE pipeline = :pipeline
                       AND name = :name
                       AND concurrency_key = :key
                       AND status = 'blocked'
                       AND (SELECT status FROM ductwork_runs WHERE id = ductwork_steps.run_id) <> 'cancelled'
                     ORDER BY priority, available_at, id
                     LIMIT :limit
                     {skip_locked})
        RETURNING id"""

    # Postgres: a key's lock and the statement that needs it, in one round trip (functions of migration 6; a
    # VOLATILE function's statements each take a fresh snapshot, so what committed before the lock was granted is
    # seen). locked_slots_held waits for the lock (:wait) or tries it (-1: busy); locked_unblock waits.
    locked_slots_held = "SELECT ductwork_locked_slots_held(:class, :key, :wait, :pipeline, :name, :ckey, :token)"
    locked_unblock = "SELECT id FROM ductwork_locked_unblock(:class, :key, :pipeline, :name, :ckey, :limit) AS id"
    # ... both, for a key a commit let go of and its claim takes steps of again (Engine.unblock_freed): one round
    # trip under the key's lock, not two (the two read and write disjoint rows: which runs first makes no odds).
    locked_unblock_held = """
        SELECT ARRAY(SELECT id FROM ductwork_locked_unblock(:class, :key, :pipeline, :name, :ckey, :limit) AS id),
               ductwork_locked_slots_held(:class, :key, TRUE, :pipeline, :name, :ckey, :token)"""

    @classmethod
    def slot_functions(cls) -> tuple[str, str]:
        """The CREATE FUNCTION statements of locked_slots_held and locked_unblock (their bodies: slots_held and
        unblock_steps, with the functions' arguments for parameters)."""
        def body(statement: str) -> str:
            for param in ("pipeline", "name", "key", "token", "limit"):
                statement = statement.replace(f":{param}", f"p_{param}")
            return statement.replace("{skip_locked}", "FOR UPDATE SKIP LOCKED").strip()
        held = ("CREATE OR REPLACE FUNCTION ductwork_locked_slots_held(lock_class integer, lock_key integer, "
                "wait boolean, p_pipeline text, p_name text, p_key text, p_token text) RETURNS bigint "
                "LANGUAGE plpgsql VOLATILE AS $$\nBEGIN\n    IF wait THEN\n"
                "        PERFORM pg_advisory_xact_lock(lock_class, lock_key);\n"
                "    ELSIF NOT pg_try_advisory_xact_lock(lock_class, lock_key) THEN\n        RETURN -1;\n"
                f"    END IF;\n    RETURN ({body(cls.slots_held)});\nEND\n$$")
        unblock = ("CREATE OR REPLACE FUNCTION ductwork_locked_unblock(lock_class integer, lock_key integer, "
                   "p_pipeline text, p_name text, p_key text, p_limit integer) RETURNS SETOF bigint "
                   "LANGUAGE plpgsql VOLATILE AS $$\nBEGIN\n    PERFORM pg_advisory_xact_lock(lock_class, lock_key);"
                   f"\n    RETURN QUERY {body(cls.unblock_steps)};\nEND\n$$")
        return held, unblock

    # A failed attempt: queued again after :delay, or failed for good (fenced on the claim).
    step_failed = """
        UPDATE ductwork_steps
        SET status = :status, error = :error, halt_reason = :halt_reason, attempts = attempts + 1,
            available_at = {now} + :delay, finished_at = {now}, claimed_by = NULL, claim_token = NULL
        WHERE id = :id
          AND status = 'running'
          AND claimed_by = :process_id
          AND claim_token = :token"""

    # The running steps a process holds (hand-back).
    steps_held_by = f"""
        SELECT {HeldStep.select_list()}
        FROM ductwork_steps
        WHERE claimed_by = :process_id
          AND status = 'running'
        ORDER BY id"""

    # A crashed execution: queued again after :delay, or failed when the crash budget is spent.
    step_crashed = """
        UPDATE ductwork_steps
        SET status = :status, crashes = crashes + 1, halt_reason = :halt_reason, error = COALESCE(:error, error),
            available_at = {now} + :delay, claimed_by = NULL, claim_token = NULL
        WHERE id = :id
          AND status = 'running'
          AND claimed_by = :process_id"""

    # Step claims of this process older than the grace (lost replies: no thread holds them), running or told of a
    # cancel (they are let go like any claim not started: Engine.release). (The second part names the partial
    # index's own condition: SQLite uses a partial index only for a query that says it.)
    orphaned_steps = """
        SELECT id, pipeline
        FROM ductwork_steps
        WHERE claimed_by = :process_id
          AND status = 'running'
          AND claimed_at < {now} - :grace
        UNION ALL
        SELECT id, pipeline
        FROM ductwork_steps
        WHERE claimed_by = :process_id
          AND status IN ('cancelling', 'stopping')
          AND status = 'cancelling'
          AND claimed_at < {now} - :grace"""

    # A branch's latest step.
    current_step = f"""
        SELECT {StepState.select_list()}
        FROM ductwork_steps
        WHERE branch_id = :branch_id
        ORDER BY id DESC
        LIMIT 1"""

    # Run.steps: every step of a run.
    select_steps = f"""
        SELECT {StepRecord.select_list()}
        FROM ductwork_steps
        WHERE run_id = :run_id
        ORDER BY id"""

    # revive(): a failed step runs again with fresh budgets.
    requeue_step = """
        UPDATE ductwork_steps
        SET status = 'queued', attempts = 0, crashes = 0, halt_reason = NULL, available_at = {now}
        WHERE id = :id"""

    # revive(): the steps a cancel stopped run again (fresh budgets, as after a halt).
    # (A step that never ran keeps a start still to come: a delayed run's, or the step after a sleep.)
    steps_uncancelled = """
        UPDATE ductwork_steps
        SET status = 'queued', attempts = 0, crashes = 0, halt_reason = NULL,
            available_at = CASE WHEN attempts = 0 AND crashes = 0 AND available_at > {now}
                                THEN available_at ELSE {now} END
        WHERE run_id = :run_id
          AND status = 'cancelled'
        RETURNING pipeline"""

    # Cancel: the steps of cancelled runs ({runs}). Queued ones (retries waiting too) are cancelled; claimed ones
    # are "cancelling" until their holder acknowledges: it drops those it had not started and marks "stopping"
    # those it runs (their results are discarded). One statement for both: a step that a concurrent hand-back or
    # release puts back in the queue is read again in its new status, and cancelled.
    # CANCEL_ROWS at a time in id order (each statement well inside a socket timeout however big a fan-out; the
    # order of every other statement that locks several steps, so none deadlocks with it).
    steps_cancelled = """
        UPDATE ductwork_steps
        SET status = CASE WHEN status = 'running' THEN 'cancelling' ELSE 'cancelled' END,
            finished_at = CASE WHEN status = 'running' THEN finished_at ELSE {now} END
        WHERE id IN (SELECT id
                     FROM ductwork_steps
                     WHERE {runs}
                       AND status IN ('queued', 'running', 'blocked')
                     ORDER BY id
                     LIMIT :limit
                     {for_update})
          AND status IN ('queued', 'running', 'blocked')
        RETURNING id, status, pipeline, name, concurrency_key"""

    # A cancel of runs already cancelled: their claimed steps still waiting for an answer (it waits for them too).
    still_cancelling = """
        SELECT id
        FROM ductwork_steps
        WHERE {runs}
          AND status = 'cancelling'"""

    # A worker's look (Runtime.look_for_cancels): which of the steps it holds ({ids}) were cancelled: told
    # (cancelling), or already let go for it (cancelled: it did not answer in time) ...
    cancelled_claims = """
        SELECT id, status
        FROM ductwork_steps
        WHERE {ids}
          AND status IN ('cancelling', 'cancelled')"""

    # Before a claim that waited long to start (a frozen process, a busy one) starts: is it still this one's?
    claim_still_held = """
        SELECT 1
        FROM ductwork_steps
        WHERE id = :id
          AND status = 'running'
          AND claim_token = :token"""

    # ... and its answer for those it runs: stopping (``should_stop`` is true in them; what they return is
    # discarded). Those it had not started it lets go (SQL.unclaimed_cancelled "acknowledged").
    claims_stopping = """
        UPDATE ductwork_steps
        SET status = 'stopping'
        WHERE {ids}
          AND status = 'cancelling'
          AND claimed_by = :process_id"""

    # cancel(): the claimed steps of the runs it cancelled ({ids}) that their holders have not acknowledged yet.
    unacknowledged = """
        SELECT id
        FROM ductwork_steps
        WHERE {ids}
          AND status = 'cancelling'"""

    # Claimed steps of cancelled runs let go: cancelled, or queued again when revive() reopened the run meanwhile.
    # One statement, four occasions (UNCLAIMED), each its condition on the steps: a holder that acknowledges
    # the ones it had not started, a commit of results that come too late (discarded), a hand-back of a dead
    # holder's, and cancel() taking those nobody acknowledged within CANCEL_ACK_TIMEOUT (a frozen holder: what it
    # does with them is discarded).
    unclaimed_cancelled = """
        UPDATE ductwork_steps
        SET status = CASE WHEN (SELECT status FROM ductwork_runs WHERE id = ductwork_steps.run_id) = 'in_progress'
                          THEN 'queued' ELSE 'cancelled' END,
            claimed_by = NULL, claim_token = NULL, available_at = {now}, finished_at = {now}
        WHERE {unclaimed}
        RETURNING id, status, pipeline, name, concurrency_key"""
    UNCLAIMED = {
        "acknowledged": "{ids} AND status = 'cancelling' AND claimed_by = :process_id",
        "discarded": "{ids} AND status IN ('cancelling', 'stopping') AND claimed_by = :process_id "
                     "AND claim_token = :token",
        "handed back": "claimed_by = :process_id AND status IN ('cancelling', 'stopping'){only}",
        "revoked": "{ids} AND status = 'cancelling'",
    }

    # -- ductwork_executions: one row per attempt (succeeded, failed, crashed, cancelled) --------

    # status: the latest failed and crashed executions.
    recent_errors = """
        SELECT e.step_id, e.run_id, s.pipeline, s.name, e.outcome, e.error, e.finished_at
        FROM ductwork_executions e
        JOIN ductwork_steps s ON s.id = e.step_id
        WHERE e.outcome IN ('failed', 'crashed')
        ORDER BY e.id DESC
        LIMIT :limit"""

    # -- ductwork_context: a run's key/value store -----------------------------------------------

    # The run a context write belongs to, held (KEY SHARE) until the write commits: a pruner skips the run
    # meanwhile (FOR UPDATE SKIP LOCKED), or, having locked it first, deletes it and the write finds no run.
    run_kept = """
        SELECT 1
        FROM ductwork_runs
        WHERE id = :run_id
        {key_share}"""

    # Every key of a run.
    context_all = """
        SELECT key, value
        FROM ductwork_context
        WHERE run_id = :run_id
        ORDER BY key"""

    # One key.
    context_get = """
        SELECT value
        FROM ductwork_context
        WHERE run_id = :run_id
          AND key = :key"""

    # A write-once key (a second write changes nothing: the caller compares).
    context_insert = """
        INSERT INTO ductwork_context (run_id, key, value)
        VALUES (:run_id, :key, :value)
        ON CONFLICT (run_id, key) DO NOTHING"""

    # overwrite=True.
    context_upsert = """
        INSERT INTO ductwork_context (run_id, key, value)
        VALUES (:run_id, :key, :value)
        ON CONFLICT (run_id, key) DO UPDATE SET value = excluded.value"""

    # -- retention: finished runs past their status's age, deleted with every row they own (SPEC §18) --

    # One pruner at a time across every host (Postgres; SQLite's write lock does it there): an advancer that
    # finds the lock taken skips its turn, the prune command waits for it. The key spells "dprun".
    try_prune_lock = """
        SELECT pg_try_advisory_xact_lock(:key)"""
    prune_lock = """
        SELECT pg_advisory_xact_lock(:key)"""
    PRUNE_LOCK_KEY = 0x647072756E

    # A batch of runs to prune, oldest finish first (read off ductwork_runs_finished), row-locked: a revive()
    # of one of them waits, then finds it gone; another pruner skips them.
    prunable_runs = """
        SELECT id
        FROM ductwork_runs
        WHERE status = :status
          AND finished_at < (SELECT {now}) - :age
        ORDER BY finished_at
        LIMIT :limit
        {skip_locked}"""

    # A batch's runs and executions past the marks, counted before they go (the rollup will never see them).
    unrolled_runs = """
        SELECT pipeline, count(*)
        FROM ductwork_runs
        WHERE {ids}
          AND id > (SELECT mark FROM ductwork_rollup WHERE name = 'runs')
        GROUP BY pipeline"""
    unrolled_executions = EXECUTIONS_PAST_MARK.replace(
        "{where}", "\n                AND e.step_id IN (SELECT id FROM ductwork_steps WHERE {runs})")

    # prune --dry-run: how many runs each pipeline would lose.
    prunable_counts = """
        SELECT pipeline, count(*)
        FROM ductwork_runs
        WHERE status = :status
          AND finished_at < (SELECT {now}) - :age
        GROUP BY pipeline
        ORDER BY pipeline"""

    # How many steps each run of a batch has (a batch is cut short at PRUNE_ROWS of them).
    prune_sizes = """
        SELECT run_id, count(*)
        FROM ductwork_steps
        WHERE {runs}
        GROUP BY run_id"""

    # The rows a pruned batch of runs (:ids, see BulkSQL.id_list) owns, children first; {runs} is the
    # condition "run_id is one of :ids". A table that later holds rows of a run gets its line here.
    PRUNE_OWNED = (
        """
        DELETE FROM ductwork_signals
        WHERE {runs}""",
        """
        DELETE FROM ductwork_executions
        WHERE step_id IN (SELECT id FROM ductwork_steps WHERE {runs})""",
        """
        DELETE FROM ductwork_steps
        WHERE {runs}""",
        """
        DELETE FROM ductwork_branches
        WHERE {runs}""",
        """
        DELETE FROM ductwork_context
        WHERE {runs}""",
    )

    # ... and the runs themselves (Engine._count_pruned adds them to the "pruned" totals).
    prune_runs = """
        DELETE FROM ductwork_runs
        WHERE {ids}
        RETURNING pipeline, status"""

    # -- ductwork_processes: one row per live process (heartbeats, reaping, fencing) -------------

    # A process starts.
    register_process = """
        INSERT INTO ductwork_processes (pid, machine_identifier, role, pipelines, parent_id, state, restarts, info,
                                        started_at, last_heartbeat_at)
        VALUES (:pid, :machine, :role, :pipelines, :parent_id, :state, :restarts, :info, {now}, {now})
        RETURNING id"""

    # run_inline: the pipelines of the live processes that claim steps or branches (run_inline's own aside).
    live_workers = """
        SELECT pipelines
        FROM ductwork_processes
        WHERE role IN ('worker', 'advancer', 'supervisor')
          AND last_heartbeat_at > {now} - :stale"""

    # Proof of life (0 rows: the row was reaped meanwhile).
    heartbeat = """
        UPDATE ductwork_processes
        SET last_heartbeat_at = {now}, state = :state, restarts = :restarts, info = :info
        WHERE id = :id"""

    # A process exits (or is retired after its death).
    delete_process = """
        DELETE FROM ductwork_processes
        WHERE id = :id"""

    # The rows a dead child registered (it may have registered again under a new id).
    rows_of_child = """
        SELECT id
        FROM ductwork_processes
        WHERE parent_id = :parent_id
          AND pid = :pid"""

    # Every process, for status and the dashboard.
    processes = f"""
        SELECT {ProcessRow.select_list()}
        FROM ductwork_processes
        ORDER BY machine_identifier, parent_id, id"""

    # The processes of one machine, for its health check.
    machine_processes = f"""
        SELECT {ProcessRow.select_list()}
        FROM ductwork_processes
        WHERE machine_identifier = :machine
        ORDER BY id"""

    # Rows whose heartbeat is older than :timeout (reap candidates), not our own.
    stale_processes = """
        SELECT id
        FROM ductwork_processes
        WHERE last_heartbeat_at < {now} - :timeout
          AND id <> :own_id
        ORDER BY id"""

    # Reap one stale row (still stale: a peer may have reaped it, or it beat, meanwhile).
    reap_process = """
        DELETE FROM ductwork_processes
        WHERE id = :id
          AND last_heartbeat_at < {now} - :timeout
        RETURNING id, machine_identifier, pid, role"""

    # The pipelines live processes serve.
    live_pipelines = """
        SELECT pipelines
        FROM ductwork_processes
        WHERE last_heartbeat_at >= {now} - :window"""

    # A fenced claim holds its claimer's row (KEY SHARE: heartbeats still pass), so a concurrent
    # reap or hand-back, which deletes the row first, waits for the claim and then sees it; a
    # claimer whose row is gone (reaped while paused) claims nothing. Part of the claim statement
    # itself: no extra round trip.
    FENCE = """
          AND EXISTS (SELECT 1 FROM ductwork_processes WHERE id = :process_id {key_share})"""

    @classmethod
    @functools.cache
    def fenced(cls, statement: str, fence: bool) -> str:
        """``statement`` with its ``{fence}`` filled in (or removed)."""
        return statement.replace("{fence}", cls.FENCE if fence else "")


class BulkSQL:
    """Statements over a batch of rows. The rows travel as one JSON document (an array of
    objects, ``:rows``): one parameter and one statement text whatever the batch size, so each
    statement is prepared once per connection, and pg8000 encodes one value instead of seven per
    row (per-parameter cost dominates there: a 1000-way expand is 2 statements with 2 big
    parameters, not 14 000 small ones). They keep the claim fencing of their one-row versions."""

    JSON_ROWS = {
        "postgres": "json_to_recordset(CAST(:rows AS JSON)) AS r({columns})",
        "sqlite": "(SELECT {extract} FROM json_each(:rows)) AS r",
    }
    # Joined to a big table, the rows also name their ids in a condition the planner can put on
    # the table's primary key: Postgres guesses 100 rows for any JSON row source, and for that
    # many a hash join over a sequential scan of the whole table looks cheaper than 100 index
    # lookups (it is not: its cost grows with the table). The parameter is an id list (Tx.ids).
    IDS = {"postgres": "{column} = ANY(CAST(:ids AS BIGINT[]))",
           "sqlite": "{column} IN (SELECT value FROM json_each(:ids))"}
    STEP = [("id", "BIGINT"), ("output", "TEXT")]
    BRANCH = [("id", "BIGINT"), ("held", "TEXT"), ("token", "TEXT"), ("status", "TEXT"), ("node", "INTEGER"),
              ("expected", "INTEGER"), ("arrived", "INTEGER"), ("output", "TEXT"), ("halt_reason", "TEXT")]
    NEW_STEP = [("run_id", "BIGINT"), ("branch_id", "BIGINT"), ("pipeline", "TEXT"), ("node", "INTEGER"),
                ("name", "TEXT"), ("input", "TEXT"), ("delay", "DOUBLE PRECISION"), ("pos", "INTEGER")]
    CHILD_BRANCH = [("position", "INTEGER"), ("node", "INTEGER")]
    EXECUTION = [("step_id", "BIGINT"), ("run_id", "BIGINT"), ("pipeline", "TEXT"), ("process_id", "BIGINT"),
                 ("attempt", "INTEGER"), ("outcome", "TEXT"), ("error", "TEXT"), ("claimed_at", "DOUBLE PRECISION"),
                 ("ran_for", "DOUBLE PRECISION")]

    @classmethod
    def ids(cls, dialect: str, table: str, column: str = "id") -> str:
        """The condition ``table.column`` is one of ``:ids``."""
        return cls.IDS[dialect].replace("{column}", f"{table}.{column}" if table else column)

    @staticmethod
    def id_list(dialect: str, ids: Iterable[int]) -> str:
        """The ``:ids`` parameter: an array literal on Postgres, a JSON array on SQLite."""
        ids = [int(i) for i in ids]
        return "{" + ",".join(map(str, ids)) + "}" if dialect == "postgres" else json.dumps(ids)

    @classmethod
    def keyed(cls, dialect: str, columns: list[tuple[str, str]], rows: list[tuple]) -> dict[str, str]:
        """The ``:rows`` and ``:ids`` parameters of a statement over ``rows``, keyed by their first column."""
        return {"rows": _document(columns, rows), "ids": cls.id_list(dialect, (row[0] for row in rows))}

    @classmethod
    def rows(cls, dialect: str, columns: list[tuple[str, str]]) -> str:
        """A row source ``r`` over a JSON array of objects with these (name, SQL type) columns."""
        if dialect == "postgres":
            return cls.JSON_ROWS["postgres"].replace("{columns}", ", ".join(f"{n} {t}" for n, t in columns))
        extract = ", ".join(f"json_extract(value, '$.{n}') AS {n}" for n, _ in columns)
        return cls.JSON_ROWS["sqlite"].replace("{extract}", extract)

    @classmethod
    def update(cls, dialect: str, table: str, assignments: str, columns: list[tuple[str, str]], fence: str,
               returning: str = "") -> str:
        """UPDATE ``table`` from the rows ``r`` (matched on id; parameters: Tx.keyed's ``rows``
        and ``ids``, and the fence's), only where ``fence`` still holds."""
        return (f"\n        UPDATE {table}\n        SET {assignments}\n        FROM {cls.rows(dialect, columns)}"
                f"\n        WHERE {table}.id = r.id\n          AND {cls.ids(dialect, table)}\n          AND {fence}"
                + (f"\n        RETURNING {returning}" if returning else ""))

    # Postgres: the run locks of a commit (SQL.share_runs) taken inside its first statement, steps_succeeded:
    # an uncorrelated condition is a one-time filter, evaluated before the statement reads (or locks) any row,
    # so the locks come first, without a round trip of their own (:lock_ids "{}" takes none).
    SHARE_RUNS = {"postgres": " AND (SELECT count(*) FROM unnest(CAST(:lock_ids AS BIGINT[])) AS lock_id, LATERAL "
                              "pg_advisory_xact_lock_shared(:lock_class, CAST(lock_id % 2147483647 AS INTEGER))) >= 0",
                  "sqlite": ""}

    # Steps that succeeded, with their outputs (fenced on their claim; on Postgres their runs locked first), and
    # their execution rows: Postgres in the same statement (a data-modifying WITH: a round trip and a read of the
    # rows fewer per commit; attempt, claim time and pipeline are the step row's own, the start :ran_for, the
    # runner's measure, before now and never before the claim, as in insert_executions), SQLite in the next one
    # (Engine._write_successes: it has no round trips to save). The rows are STEP_RAN's on both.
    STEP_RAN = STEP + [("ran_for", "DOUBLE PRECISION")]

    @classmethod
    @functools.cache
    def steps_succeeded(cls, dialect: str) -> str:
        set_succeeded = ("status = 'succeeded', output = r.output, attempts = attempts + 1, finished_at = {now}, "
                         "claimed_by = NULL, claim_token = NULL")
        held = ("ductwork_steps.status = 'running' AND ductwork_steps.claimed_by = :process_id "
                "AND ductwork_steps.claim_token = :token" + cls.SHARE_RUNS[dialect])
        if dialect == "sqlite":
            return cls.update(dialect, "ductwork_steps", set_succeeded, cls.STEP, held, "ductwork_steps.id")
        done = cls.update(dialect, "ductwork_steps", set_succeeded, cls.STEP_RAN, held,
                          "ductwork_steps.id, ductwork_steps.run_id, ductwork_steps.pipeline, "
                          "ductwork_steps.attempts + ductwork_steps.crashes AS attempt, ductwork_steps.claimed_at, "
                          "r.ran_for")
        return ("\n        WITH done AS (" + done.replace("\n", "\n    ") + "\n        ),"
                "\n        logged AS (INSERT INTO ductwork_executions (step_id, run_id, pipeline, process_id, attempt, "
                "outcome, error, started_at, finished_at)\n            SELECT id, run_id, pipeline, :process_id, "
                "attempt, 'succeeded', NULL,\n                   CASE WHEN {now} - ran_for > claimed_at "
                "THEN {now} - ran_for ELSE claimed_at END,\n                   {now}\n            FROM done)"
                "\n        SELECT id\n        FROM done")

    # Release claimed steps that never started: queued again, no crash counted.
    @classmethod
    @functools.cache
    def release_steps(cls, dialect: str) -> str:
        return ("\n        UPDATE ductwork_steps\n        SET status = 'queued', claimed_by = NULL, claim_token = NULL"
                "\n        WHERE claimed_by = :process_id\n          AND status = 'running'"
                "\n          AND " + cls.ids(dialect, "ductwork_steps")
                + "\n        RETURNING pipeline, name, concurrency_key")

    # A claim's capped steps decided (Engine._within_caps): kept with their key written (running), blocked (their
    # key's slots all held), or queued again; the two let go lose the claim (fenced on it).
    CAPPED = [("id", "BIGINT"), ("status", "TEXT"), ("key", "TEXT")]

    @classmethod
    @functools.cache
    def capped_claims(cls, dialect: str) -> str:
        held = "CASE WHEN r.status = 'running' THEN ductwork_steps.{0} END"
        return cls.update(dialect, "ductwork_steps",
                          "status = r.status, concurrency_key = COALESCE(r.key, ductwork_steps.concurrency_key), "
                          + ", ".join(f"{column} = {held.format(column)}"
                                      for column in ("claimed_by", "claim_token", "claimed_at")), cls.CAPPED,
                          "ductwork_steps.status = 'running' AND ductwork_steps.claim_token = :token")

    # The running branches of steps committed in this transaction, row-locked (not claimed: they
    # are advanced before this transaction ends, so no second row version is written).
    @classmethod
    @functools.cache
    def lock_branches(cls, dialect: str) -> str:
        return (f"\n        SELECT {BranchClaim.select_list()}\n        FROM ductwork_branches"
                "\n        WHERE status = 'running'\n          AND " + cls.ids(dialect, "ductwork_branches")
                + "\n        ORDER BY id\n        {for_update}")

    # Write advancement decisions (fenced: the status the branch is held in, and its claim token).
    @classmethod
    @functools.cache
    def apply_branches(cls, dialect: str) -> str:
        return cls.update(dialect, "ductwork_branches",
                          "status = r.status, node = r.node, expected = r.expected, arrived = r.arrived, "
                          "output = r.output, halt_reason = r.halt_reason, claimed_by = NULL, claim_token = NULL, "
                          "advance_failures = 0, updated_at = {now}", cls.BRANCH,
                          "ductwork_branches.status = r.held AND COALESCE(ductwork_branches.claim_token, '') = r.token",
                          "ductwork_branches.id")

    # Runs whose root branch completed, with their outputs.
    @classmethod
    @functools.cache
    def runs_completed(cls, dialect: str) -> str:
        return cls.update(dialect, "ductwork_runs", "status = 'completed', output = r.output, finished_at = {now}, "
                          "updated_at = {now}", cls.STEP, "ductwork_runs.status = 'in_progress'",
                          "ductwork_runs.pipeline, ductwork_runs.finished_at - ductwork_runs.created_at")

    # Queue new steps, with their run's priority. A step not delayed (by a sleep) is claimable since its run
    # started: the claim queue's order within a priority is (available_at, run_id, id), so a run's later steps come
    # before the first steps of runs that started after it, and runs finish about in the order they started
    # (SPEC §17; a step queued "now" went behind the whole backlog at every hop). Each run is read once (its ids
    # named on the primary key: Postgres guesses 100 rows for the JSON row source, see IDS; SQLite reads the rows
    # first, CROSS JOIN). The steps get their ids in the rows' order (pos): a fan-out's children in element order.
    @classmethod
    @functools.cache
    def insert_steps(cls, dialect: str) -> str:
        return ("\n        INSERT INTO ductwork_steps (run_id, branch_id, pipeline, node, name, status, input, "
                "priority, available_at, created_at)\n        SELECT r.run_id, r.branch_id, r.pipeline, r.node, "
                "r.name, 'queued', r.input, u.priority,\n               CASE WHEN r.delay > 0 THEN {now} + r.delay "
                "ELSE COALESCE(u.scheduled_at, u.created_at) END, {now}\n        FROM "
                + cls.rows(dialect, cls.NEW_STEP) + "\n        CROSS JOIN ductwork_runs u"
                "\n        WHERE u.id = r.run_id\n          AND " + cls.ids(dialect, "u").replace(":ids", ":run_ids")
                + "\n        ORDER BY r.pos\n        RETURNING id, pipeline")

    # The child branches of a fan-out (one per position).
    @classmethod
    @functools.cache
    def insert_child_branches(cls, dialect: str) -> str:
        return ("\n        INSERT INTO ductwork_branches (run_id, pipeline, definition, parent_id, origin_step_id, "
                "position, node, status, available_at, created_at, updated_at)"
                "\n        SELECT CAST(:run_id AS BIGINT), CAST(:pipeline AS TEXT), CAST(:definition AS TEXT), "
                "CAST(:parent_id AS BIGINT), CAST(:origin_step_id AS BIGINT), r.position, r.node, 'running', "
                "{now}, {now}, {now}\n        FROM " + cls.rows(dialect, cls.CHILD_BRANCH)
                + "\n        RETURNING id, position")

    # One execution row per finished (or crashed) attempt. It started :ran_for seconds before now
    # (measured by the runner), never before its claim; a crash's start is unknown: its claim time.
    @classmethod
    @functools.cache
    def insert_executions(cls, dialect: str) -> str:
        return ("\n        INSERT INTO ductwork_executions (step_id, run_id, pipeline, process_id, attempt, outcome, "
                "error, started_at, finished_at)\n        SELECT r.step_id, r.run_id, r.pipeline, r.process_id, "
                "r.attempt, r.outcome, r.error,\n               CASE WHEN {now} - r.ran_for > r.claimed_at "
                "THEN {now} - r.ran_for ELSE r.claimed_at END,\n               {now}\n        FROM "
                + cls.rows(dialect, cls.EXECUTION))


def _document(columns: list[tuple[str, str]], rows: Iterable[Sequence[Any]]) -> str:
    """Rows (tuples in ``columns`` order) as the JSON document a BulkSQL statement reads."""
    names = [name for name, _ in columns]
    return _dumps([dict(zip(names, row, strict=True)) for row in rows])


def _token() -> str:
    """A random claim token (128 bits, hex): fences every write about one claim."""
    return os.urandom(16).hex()


def _dumps(value: Any) -> str:
    """Compact JSON; NaN and infinities are refused (not JSON)."""
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


def _loads(text: str | None) -> Any:
    """JSON text as stored (None stays None)."""
    return None if text is None else json.loads(text)


def _loads_for_display(text: str | None) -> Any:
    """Records shown to people never fail on a corrupt stored value: they show its raw text."""
    try:
        return _loads(text)
    except ValueError:
        return text


class _EngineTx(Tx):
    """An engine transaction: a Tx plus what its writes gather for the end of the transaction
    (arrivals on fan-in parents, completed and halted runs) and the wake-ups it may drop."""

    def __init__(self, store: Store, conn: Any):
        super().__init__(store, conn)
        self.arrivals: dict[int, int] = {}          # parent branch id -> children that finished here
        self.halted: list[int] = []                 # runs halted here (on_halt fires after commit)
        self.completed: list[tuple] = []            # (run id, output) pairs, written in bulk
        self.completions: list[int] = []            # runs completed here (on_complete fires after commit)
        # pipeline -> ids of the steps this transaction made claimable (None: not all known); when
        # its own claim takes them all, nobody else needs waking for them
        self.new_steps: dict[str, set[int] | None] = {}

    def ids(self, ids: Iterable[int]) -> str:
        """The ``:ids`` parameter of a BulkSQL id condition."""
        return BulkSQL.id_list(self.dialect, ids)

    def keyed(self, columns: list[tuple[str, str]], rows: list[tuple]) -> dict[str, str]:
        """The ``:rows`` and ``:ids`` of a BulkSQL statement over ``rows`` keyed by their first column."""
        return BulkSQL.keyed(self.dialect, columns, rows)

    def notify(self, channel: str, payload: str = "") -> None:
        if channel == CH_JOBS:
            self.new_steps[payload] = None  # a hint about steps we cannot name: it must go out
        super().notify(channel, payload)

    def queued(self, pipeline: str, step_ids: Iterable[int]) -> None:
        """These steps became claimable here: wake a worker for them (unless this transaction claims them all)."""
        known = self.new_steps.get(pipeline, set())
        super().notify(CH_JOBS, pipeline)
        self.new_steps[pipeline] = None if known is None else known | set(step_ids)

    def claimed(self, pipeline: str, step_ids: set[int]) -> None:
        """This transaction claimed these steps: drop the wake-up when every step it made
        claimable is among them (nothing of its own is left for others)."""
        mine = self.new_steps.get(pipeline)
        if mine is not None and mine <= step_ids and (CH_JOBS, pipeline) in self.pending:
            self.pending.remove((CH_JOBS, pipeline))


# -- decisions: what an advancement does, as a pure function -----------------------------

FAN_OUTS = ("expand", "divide", "divert")
BOUNDED_FAN_OUTS = ("expand", "divide")   # pipeline_advancer.steps.max_depth bounds these (a divert starts one)


@record
class Situation:
    """Everything one advancement decides on, read before deciding: ``decide()`` reads no
    database and writes nothing, so each rule is a plain function of this record."""
    node: int                            # the node of the branch's current step
    nodes: list[dict]                    # the run's definition graph
    step: StepState | None               # the branch's latest step
    expected: int = 0                    # children of the branch's open fan-out (0: none)
    children: list[tuple[str, str | None]] = dataclasses.field(default_factory=list)  # (status, output) by position
    max_depth: int = -1                  # pipeline_advancer.steps.max_depth for this step (-1: no limit)
    defined: Any = None                  # the step names this process defines for the pipeline (None: unknown here)
    # a wait_for after the current step (read only then): the signal's payload (JSON; None: not sent yet), the
    # database clock, and what the branch is parked for already (and until when)
    signal: str | None = None
    now: float = 0.0
    waiting_for: str | None = None
    wait_until: float | None = None

    @property
    def after(self) -> dict:
        """The transition that follows the current step (after its wait, if it has one)."""
        return _transition(self.nodes[self.node]["after"])

    def halt(self, reason: str | None, warning: str | None = None) -> _Outcome:
        """The branch halts at its current node."""
        return _Outcome("halted", self.node, halt_reason=reason, warning=warning)

    def runs(self, node: int) -> bool:
        """Can the step of ``node`` run? (Unknown to this process: the worker decides.)"""
        return self.defined is None or self.nodes[node]["step"] in self.defined


def decide(s: Situation) -> _Outcome:
    """The next state of a branch whose step finished (or whose fan-out's children all did)."""
    if s.expected > 0:
        return _decide_join(s)
    if s.step is None:
        return s.halt(TRANSITION_INVALID)
    if s.step.status == "failed":
        return s.halt(s.step.halt_reason or JOB_RETRIES_EXHAUSTED)
    wait = s.nodes[s.node]["after"].get("wait")
    if wait is not None and "signal" in wait:
        return _decide_signal(s, wait)
    outcome = DECISIONS.get(s.after["kind"], _decide_unknown)(s)
    if wait is not None and "sleep" in wait:   # (the steps it starts, on this branch or its children, wait)
        outcome.delay = float(wait["sleep"])
    return outcome


def _decide_signal(s: Situation, wait: dict) -> _Outcome:
    """wait_for: with its signal sent the transition goes on with the payload (not the step's output); without,
    the branch parks until it comes, or halts with signal_timeout once its own deadline passed (an advancement
    before it, a branch handed back early, parks it again until the same deadline)."""
    if s.signal is not None:
        assert s.step is not None
        given = dataclasses.replace(s, step=dataclasses.replace(s.step, output=s.signal))
        return DECISIONS.get(s.after["kind"], _decide_unknown)(given)
    name, timeout = wait["signal"], wait.get("timeout")
    if s.waiting_for == name:
        until = s.wait_until
    else:
        until = None if timeout is None else s.now + float(timeout)
    if until is not None and s.now >= until:
        return s.halt(SIGNAL_TIMEOUT, f"no signal {name!r} within {timeout:g}s")
    return _Outcome("advance", s.node, park=(name, until))


def _decide_end(s: Situation) -> _Outcome:
    """The last step of a line: the branch completes with its output."""
    return _Outcome("completed", s.node, output=s.step.output)


def _decide_chain(s: Situation) -> _Outcome:
    """The next step runs on the output."""
    return _continue(s, s.after["next"], s.step.output)


def _decide_expand(s: Situation) -> _Outcome:
    """One child branch per element of the output (a list)."""
    value, step = _loads(s.step.output), s.nodes[s.node]["step"]
    if not isinstance(value, list):
        return s.halt(TRANSITION_INVALID, f"expand after {step} needs a list, got {type(value).__name__}")
    if 0 <= s.max_depth < len(value):
        return s.halt(MAX_FANOUT_EXCEEDED,
                      f"expand after {step} has {len(value)} elements, more than max_depth {s.max_depth}")
    if not value:
        return _join_outcome(s, [])
    return _fan_out(s, [(i, s.after["child"], _dumps(v)) for i, v in enumerate(value)])


def _decide_divide(s: Situation) -> _Outcome:
    """Every child branch gets the same output."""
    children = s.after["children"]
    if 0 <= s.max_depth < len(children):
        return s.halt(MAX_FANOUT_EXCEEDED)
    return _fan_out(s, [(i, child, s.step.output) for i, child in enumerate(children)])


def _decide_divert(s: Situation) -> _Outcome:
    """One child branch, chosen by str() of the output after its JSON round trip:
    "abc" -> "abc", True -> "True", None -> "None", 3 -> "3", 2.5 -> "2.5"."""
    key, cases = str(_loads(s.step.output)), s.after["cases"]
    chosen = key if key in cases else "otherwise" if "otherwise" in cases else None
    if chosen is None:
        return s.halt(CONDITION_UNMATCHED)
    return _fan_out(s, [(list(cases).index(chosen), cases[chosen], s.step.output)])


def _decide_unknown(s: Situation) -> _Outcome:
    """A transition this version does not know."""
    return s.halt(TRANSITION_INVALID)


def _decide_join(s: Situation) -> _Outcome:
    """Every child of the fan-out finished: the join runs on their outputs (a divert's one
    output as it is), or the branch halts when a child did not complete. A join that halts
    keeps its counts, so revive() reopens the join, not the fan-out."""
    if len(s.children) != s.expected:   # rows missing (edited by hand): nothing to join
        return _Outcome("halted", s.node, expected=s.expected, arrived=s.expected, halt_reason=TRANSITION_INVALID)
    if any(status != "completed" for status, _ in s.children):
        return _Outcome("halted", s.node, expected=s.expected, arrived=s.expected)
    values = [_loads(output) for _, output in s.children]
    joined = _join_outcome(s, values[0] if s.after["kind"] == "divert" else values)
    if joined.status == "halted":
        joined.expected = joined.arrived = s.expected
    return joined


def _join_outcome(s: Situation, value: Any) -> _Outcome:
    """The join step runs on ``value``; with no join (a fan-out left open at the end of the
    pipeline) the branch completes with it."""
    if s.after.get("join") is None:
        return _Outcome("completed", s.node, output=_dumps(value))
    return _continue(s, s.after["join"], _dumps(value))


def _continue(s: Situation, node: int, value_json: str) -> _Outcome:
    """The branch goes on with the step of ``node``."""
    if not s.runs(node):
        return s.halt(DEFINITION_CHANGED)
    return _Outcome("running", node, new_step=(node, value_json))


def _fan_out(s: Situation, children: list[tuple[int, int, str]]) -> _Outcome:
    """The branch waits for these (position, node, input) children."""
    if not all(s.runs(child) for _, child, _ in children):
        return s.halt(DEFINITION_CHANGED)
    return _Outcome("waiting", s.node, expected=len(children), children=children)


DECISIONS: dict[str, Callable[[Situation], _Outcome]] = {
    "end": _decide_end,
    "chain": _decide_chain,
    "expand": _decide_expand,
    "divide": _decide_divide,
    "divert": _decide_divert,
}


# -- the engine ----------------------------------------------------------------------------

def _prune_lock(t: Tx, wait: bool) -> bool:
    """Take the pruners' lock for this transaction (Postgres; SQLite's write lock is it): False when another
    process holds it and ``wait`` is not set."""
    if t.dialect == "postgres":
        if wait:
            t.run(SQL.prune_lock, {"key": SQL.PRUNE_LOCK_KEY})
        elif not t.one(SQL.try_prune_lock, {"key": SQL.PRUNE_LOCK_KEY})[0]:
            return False
    return True


def roll_up_counts(store: Store, wait: bool = False) -> bool | None:
    """Move the counts' marks to the newest runs and executions (see "Counts (migration 2)"), ROLLUP_CHUNK ids
    per transaction (the first rollup of a big database counts it all): True when it did, False when a writer
    held the tables past the lock timeout (the next turn tries again), None when another process holds the
    pruners' lock (``wait``: wait for it)."""
    try:
        newest = []
        for name in SQL.ROLLED_UP:   # (one table at a time: see SQL.ROLL_UP_BARRIERS)
            lock, newest_id = SQL.ROLL_UP_BARRIERS[name]
            with store.tx() as t:   # (SQLite: this write transaction keeps every writer out already)
                if t.dialect == "postgres":
                    t.run(SQL.roll_up_timeout)
                    t.run(lock)
                newest.append(t.one(newest_id)[0])
        for (name, statement), newest_id in zip(SQL.ROLLED_UP.items(), newest, strict=True):
            upto = None
            while upto != int(newest_id):
                with store.tx() as t:
                    if not _prune_lock(t, wait):
                        return None
                    if t.dialect == "postgres":
                        t.run(SQL.plain_plans)
                    mark = int(t.one(SQL.mark_of, {"name": name})[0])
                    upto = min(int(newest_id), mark + ROLLUP_CHUNK)   # (newest_id once the mark is there)
                    if upto > mark:
                        t.run(statement, {"upto": upto})
                        t.run(SQL.move_mark, {"name": name, "upto": upto})
    except DuctworkError:
        raise
    except Exception as exc:
        if "55P03" not in str(exc) and "40P01" not in str(exc):   # lock timeout, deadlock: not this turn
            raise
        return False
    return True


class StepCaps:
    """The concurrency caps this process's code and config give the steps it claims (SPEC §17), cached per step:
    config ``job_worker.concurrency`` (when set), else the step's own ``concurrency``; the key of a claimed step
    comes from its ``concurrency_key`` (called with the step's arguments, as ``execute`` is; "" without one)."""

    def __init__(self, config: Config):
        self.config = config
        self._caps: dict[tuple[str, str], int | None] = {}
        self._capped: dict[str, bool] = {}
        self._statics: dict[str, list[str] | None] = {}

    @staticmethod
    def _step(pipeline: str, name: str) -> Any:
        cls = _REGISTRY.get(pipeline)
        return None if cls is None else cls.steps.get(name)

    def cap(self, pipeline: str, name: str) -> int | None:
        """The step's cap (None: none)."""
        found = self._caps.get((pipeline, name), -1)
        if found == -1:
            configured = int(self.config.get("job_worker.concurrency", pipeline, name))
            own = getattr(self._step(pipeline, name), "concurrency", None)
            found = configured if configured > 0 else own
            if pipeline in _REGISTRY:   # (a pipeline not imported yet may be later)
                self._caps[(pipeline, name)] = found
        return found

    def capped(self, pipeline: str) -> bool:
        """Whether any step of the pipeline has a cap (a claim of one that has none needs no look at slots)."""
        found = self._capped.get(pipeline)
        if found is None:
            cls = _REGISTRY.get(pipeline)
            found = cls is not None and any(self.cap(pipeline, n) for n in cls.steps)
            if cls is not None:
                self._capped[pipeline] = found
        return found

    def static_names(self, pipeline: str) -> list[str] | None:
        """A capped pipeline's capped steps whose key is always "" (no concurrency_key); None: not capped."""
        found = self._statics.get(pipeline, ())
        if found == ():
            found = None if not self.capped(pipeline) else sorted(
                name for name in _REGISTRY[pipeline].steps if self.cap(pipeline, name) is not None
                and getattr(self._step(pipeline, name), "concurrency_key", None) is None)
            if pipeline in _REGISTRY:
                self._statics[pipeline] = found
        return found

    def key(self, c: JobClaim) -> str | None:
        """The concurrency key of a claimed step (None: uncapped; or its concurrency_key failed, saying why in
        ``c.refused``: the step fails without running, not retried)."""
        if self.cap(c.pipeline, c.name) is None:
            return None
        fn = self._step(c.pipeline, c.name)
        if getattr(fn, "concurrency_key", None) is None:
            return ""
        try:
            args = _step_arguments(c)
            value = fn().concurrency_key(*args) if inspect.isclass(fn) else fn.concurrency_key(*args)
        except BaseException as exc:  # noqa: B036 - user code: whatever it raises refuses this step only
            c.refused = f"DefinitionError: concurrency_key of step {c.name} raised {type(exc).__name__}: {exc}"
            return None
        if not isinstance(value, str) or len(value) > MAX_CONCURRENCY_KEY:
            c.refused = (f"DefinitionError: concurrency_key of step {c.name} must return a string of at most "
                         f"{MAX_CONCURRENCY_KEY} characters, got {clip(repr(value), 80)} "
                         f"({type(value).__name__})")
            return None
        return value


def _step_arguments(c: JobClaim) -> list:
    """What a claimed step is called with: the trigger's arguments (the start step), else the one input."""
    try:
        value = _loads(c.input)
    except ValueError as exc:
        raise _CorruptInput(f"stored input of step {c.name} is not valid JSON: {exc}") from None
    return value if c.node == 0 else [value]


@record
class _ClaimSlots:
    """One claim's view of the slots of its capped steps' keys, kept across its rounds (Engine._claim_steps_in)."""
    reserved: dict[tuple[str, str], set[int]]   # (step, key) -> the steps this transaction unblocked: theirs first
    keys: dict[int, str | None] = dataclasses.field(default_factory=dict)   # step id -> its key (None: uncapped)
    # (step, key) -> slots free to this claim's other steps, counted once (None: its lock was busy; -1: this claim
    # holds one, and its other steps of the key run after the first, in that one slot)
    free: dict[tuple[str, str], int | None] = dataclasses.field(default_factory=dict)
    turns: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)   # ... and kept for the reserved

    def count(self, group: tuple[str, str], cap: int, held: int) -> None:
        """A key's slots counted: the cap less those other claims hold, the reserved steps' first (one each, at
        most all there are), and the rest free."""
        room = max(0, cap - held)
        self.turns[group] = min(len(self.reserved.get(group, ())), room)
        self.free[group] = room - self.turns[group]


class Engine:
    """The state machine over one Store, with the configuration's budgets."""

    def __init__(self, store: Store, config: Config, inline: bool = True):
        self.store, self.config = store, config
        # inline: a worker advances the branch of the step it commits in that same transaction
        # (the advancer then only handles what is left: recovery, retries of failed advancements)
        self.inline = inline
        self.fault: Callable[..., None] = lambda point, step=None: None   # the runtime's fault hook (tests)
        self._definitions: dict[str, Definition] = {}
        self._stored_definitions: set[str] = set()
        # fence_claims: every claim holds the claimer's process row (KEY SHARE) and claims nothing when
        # it is gone (reaped while paused, handed back after death); set by Runtime, off for bare Engine use
        self.fence_claims = False
        self.caps = StepCaps(config)
        self._claimed_at: dict[str, int] = {}   # pipeline -> the priority this process claimed its steps at last

    def _tx(self, write: bool = True, single: bool = False) -> Any:
        """An engine transaction (_EngineTx)."""
        return self.store.tx(write, single, kind=_EngineTx)

    def _claim_rows(self, t: Tx, statement: str, pipeline: str, process_id: int, token: str, limit: int,
                    **more: Any) -> list[tuple]:
        """Run a claim statement (SQL.claim_steps / claim_branches), fenced when fence_claims is on."""
        params = {"process_id": process_id, "token": token, "pipeline": pipeline, "limit": limit, **more}
        return sorted(t.all(SQL.fenced(statement, self.fence_claims), params))

    def _claim_at(self, t: Tx, claim: str, pipeline: str, process_id: int, token: str, limit: int, lowest: int,
                  below: int, keyed: dict) -> tuple[list[tuple], int | None]:
        """SQL.claim_steps (or claim_keyed): its rows (the JobClaim columns), and the highest priority queued as it
        claimed (None: unknown, it claimed none). SQLite's RETURNING sees the claim's own writes: none left queued
        is none above the priority claimed."""
        rows = self._claim_rows(t, claim, pipeline, process_id, token, limit, lowest=lowest, below=below, **keyed)
        if not rows:
            return rows, None
        top = rows[0][-1]
        return [row[:-1] for row in rows], (rows[0][JOB_CLAIM_PRIORITY] if top is None else top)

    def _claim_steps_in(self, t: Tx, pipeline: str, process_id: int, token: str, limit: int) -> list[JobClaim]:
        """Claim up to ``limit`` steps: lowest priority first, oldest run first within one (SQL.claim_steps), those
        of capped steps only as far as their keys have free slots (the others wait blocked: _within_caps)."""
        claims = self._claim_queue(t, pipeline, process_id, token, limit)
        capped = self.caps.capped(pipeline)
        keys = {c.step_id: self.caps.key(c) for c in claims} if capped else {}
        # The slots this transaction let go of (a commit's) are passed on after the claim statement, not before:
        # their keys' locks, which every claim and let-go of those keys waits for, are held for the fewest round
        # trips (a key freed and claimed again: one, which also counts its slots). The steps that unblocks have
        # the first right to the slots freed (_ClaimSlots.count), and this claim takes them on if it has room.
        unblocked, counted = self.unblock_freed(
            t, {(pipeline, c.name, key) for c in claims if (key := keys[c.step_id]) is not None} if capped else (),
            token)
        reserved = {(name, key): set(ids) for (of, name, key), ids in unblocked.items() if of == pipeline}
        if reserved and len(claims) < limit:
            claims += self._claim_queue(t, pipeline, process_id, token, limit - len(claims))
        if not claims or not capped:
            return claims
        slots = _ClaimSlots(reserved, keys)
        for (_, name, key), held in counted.items():
            slots.count((name, key), self.caps.cap(pipeline, name), held)
        kept: list[JobClaim] = []
        for round_ in range(1, CAP_ROUNDS + 1):   # a key's slots all held: claim further, past the steps blocked
            got, blocked, returned = self._within_caps(t, pipeline, claims, limit - len(kept), token, slots)
            kept += got
            if returned:   # (given back to the queue: others may claim them, at once)
                t.notify(CH_JOBS, pipeline)
            if not blocked or len(kept) >= limit:
                break
            if round_ == CAP_ROUNDS:   # (a hot key blocking many at once: a worker goes on past them, at once)
                t.notify(CH_JOBS, pipeline)
                break
            # (as many as were blocked, twice: a hot key's backlog is set aside in a few rounds, a few in one)
            claims = self._claim_queue(t, pipeline, process_id, token,
                                       min(CAP_SCAN, max(limit - len(kept), 2 * blocked)))
            if not claims:
                break
        return kept

    def _claim_queue(self, t: Tx, pipeline: str, process_id: int, token: str, limit: int) -> list[JobClaim]:
        """Claim up to ``limit`` queued steps, a priority at a time (lowest first) while too few were claimed:
        one statement for a claim the lowest priority fills (SQL.claim_steps), SQL.next_priority to go on."""
        lowest, highest = PRIORITY_RANGE
        statics = self.caps.static_names(pipeline)
        keyed = {} if statics is None else {"statics": _dumps(statics)}
        claim, rest = ((SQL.claim_steps, SQL.claim_steps_rest) if statics is None
                       else (SQL.claim_keyed(False, t.dialect), SQL.claim_keyed(True, t.dialect)))
        below = self._claimed_at.get(pipeline, highest)
        rows, top = self._claim_at(t, claim, pipeline, process_id, token, limit, lowest, below, keyed)
        at = JOB_CLAIM_PRIORITY
        tried = rows[-1][at] if rows else None
        if not rows and below != highest:   # (none where this process claimed last: which priority was tried)
            self._claimed_at.pop(pipeline, None)
            tried = t.one(SQL.next_priority, {"pipeline": pipeline, "lowest": lowest})[0]
            if tried is None:
                return []
            if tried > below:   # (the lowest queued is above where it looked: not tried yet)
                rows, top = self._claim_at(t, claim, pipeline, process_id, token, limit, tried, highest, keyed)
                tried = rows[-1][at] if rows else tried
        for walked in range(1, PRIORITY_WALK + 1):
            if len(rows) >= limit or (tried is not None and top is not None and tried >= top):
                break   # (full, or nothing is queued above the priority tried)
            if tried is None:   # the lowest priority queued had no claimable step: which it was
                tried = t.one(SQL.next_priority, {"pipeline": pipeline, "lowest": lowest})[0]
            if tried is None or tried >= PRIORITY_RANGE[1]:
                break
            if walked == PRIORITY_WALK:   # (many priorities with too few: the rest at once)
                rows += self._claim_rows(t, rest, pipeline, process_id, token, limit - len(rows),
                                         lowest=tried + 1, **keyed)
                break
            tried = t.one(SQL.next_priority, {"pipeline": pipeline, "lowest": tried + 1})[0]
            if tried is None:
                break
            more, top = self._claim_at(t, claim, pipeline, process_id, token, limit - len(rows), tried, highest,
                                       keyed)
            rows += more
            tried = more[-1][at] if more else tried
        if rows:   # (where the next claim looks first; a stale value costs a statement, never a step's turn)
            self._claimed_at[pipeline] = min(row[at] for row in rows)
        now = time.monotonic()
        return [JobClaim.from_row(row, pipeline=pipeline, process_id=process_id, token=token, confirmed=now)
                for row in rows]

    def _within_caps(self, t: Tx, pipeline: str, claims: list[JobClaim], need: int, token: str,
                     slots: _ClaimSlots) -> tuple[list[JobClaim], int, int]:
        """Of just-claimed steps, those to run: at most ``need``, and a capped step only if this claim holds a slot
        of its key, or takes a free one (``slots``, kept across the rounds of one claim: a key's slots are counted
        once, Postgres under the key's lock). A claim's steps run one after another on one thread, so they take
        one slot together however many of a key it holds. A step this transaction unblocked takes a slot kept for
        it (one with none kept for it is as any other). The others let go in one statement: blocked (their key's
        slots all held by other claims, or kept for the steps unblocked), or queued again (more than ``need``,
        their key's lock busy, or one unblocked here once this claim holds a slot: its turn stays its own).
        Returns the steps kept, and how many were blocked and given back."""
        keys, free = slots.keys, slots.free
        keys.update({c.step_id: self.caps.key(c) for c in claims if c.step_id not in keys})
        groups = {(c.name, keys[c.step_id]) for c in claims if keys[c.step_id] is not None} - free.keys()
        for name, key in sorted(groups, key=lambda group: _slot_lock_key(pipeline, *group)):
            held = self._slots_held(t, pipeline, name, key, token)
            if held is None:
                free[(name, key)] = None   # another claim (or a let-go) of the key is in flight: not this one's turn
                continue
            slots.count((name, key), self.caps.cap(pipeline, name), held)
        kept: list[JobClaim] = []
        let_go: list[tuple[int, str, str | None]] = []   # (step id, status, key)
        for c in claims:
            key = keys[c.step_id]
            group = (c.name, key)
            slot = None if key is None else free[group]
            if c.step_id in slots.reserved.get(group, ()):   # (unblocked here: a slot kept for it, or its turn kept)
                if slot == -1:
                    slot = None
                elif slot is not None and slots.turns[group]:
                    slots.turns[group] -= 1
                    slot = 1
            if key is not None and slot == 0:
                let_go.append((c.step_id, "blocked", key))
            elif len(kept) >= need or (key is not None and slot is None):
                let_go.append((c.step_id, "queued", None))
            else:
                if key is not None:
                    free[group] = -1   # (this claim's slot: its other steps of the key run after this one)
                    c.concurrency_key = key
                    if c.stored_key != key:   # (kept: the key written, the claim kept)
                        let_go.append((c.step_id, "running", key))
                kept.append(c)
        if let_go:
            t.run(BulkSQL.capped_claims(t.dialect), {**BulkSQL.keyed(t.dialect, BulkSQL.CAPPED, let_go),
                                                      "token": token})
        blocked = sum(1 for _, status, _ in let_go if status == "blocked")
        return kept, blocked, sum(1 for _, status, _ in let_go if status == "queued")

    @staticmethod
    def free_slots(t: Tx, freed: Iterable[tuple[str, str, str | None]]) -> None:
        """Steps of capped keys (pipeline, name, key; key None: uncapped) let go of their slots (or, queued, of
        the turn an unblock gave them) in this transaction: unblocked by unblock_freed, once for all of them."""
        t.slots_freed += [item for item in freed if item[2] is not None]

    @staticmethod
    def unblock_freed(t: Tx, counting: Collection[tuple[str, str, str]] = (), token: str = "",
                      ) -> tuple[dict[tuple[str, str, str], list[int]], dict[tuple[str, str, str], int]]:
        """The slots this transaction let go of (free_slots): as many steps blocked on each key queued again
        (SQL.unblock_steps; Postgres: under the key's lock, waited for, the keys in lock order and all at once, so
        no two transactions wait for each other's keys, and the steps a claim blocked before it committed are
        seen). Called after a transaction's claim statement (Engine._claim_steps_in), or at its end. Returns the
        steps it queued again per key (pipeline, name, key), and, Postgres, for the keys also ``counting`` (those
        the claim of ``token`` holds steps of), their slots held by other claims, counted in the same round trip
        (what _slots_held would count)."""
        if not t.slots_freed:   # (uncapped steps: nothing to do, at every commit)
            return {}, {}
        done: dict[tuple[str, str, str], list[int]] = {}
        counted: dict[tuple[str, str, str], int] = {}
        counts = collections.Counter(t.slots_freed)
        t.slots_freed = []
        for (pipeline, name, key), n in sorted(counts.items(), key=lambda item: _slot_lock_key(*item[0])):
            params = {"pipeline": pipeline, "name": name, "limit": n, "ckey": key}
            if t.dialect == "postgres":   # (the lock and the unblock in one round trip)
                lock = _slot_lock_key(pipeline, name, key)
                params.update({"class": SQL.SLOT_LOCK_CLASS, "key": lock})
                if (pipeline, name, key) in counting:
                    ids, held = t.one(SQL.locked_unblock_held, {**params, "token": token})
                    unblocked, counted[(pipeline, name, key)] = list(ids or ()), int(held)
                else:
                    unblocked = [step_id for (step_id,) in t.all(SQL.locked_unblock, params)]
                t.slot_locks.add(lock)
            else:
                unblocked = [step_id for (step_id,) in t.all(SQL.unblock_steps, {**params, "key": key})]
            if unblocked:
                done[(pipeline, name, key)] = unblocked
            if unblocked and isinstance(t, _EngineTx):   # (a commit that claims them itself wakes nobody for them)
                t.queued(pipeline, unblocked)
            elif unblocked:
                t.notify(CH_JOBS, pipeline)
        return done, counted

    def sweep_blocked(self, pipeline: str) -> int:
        """The safety net of the slots' hand-over, run by each worker process at its reaping cadence (from the
        heartbeat thread: it only tries the keys' locks, never waits): for each key of the pipeline with steps
        blocked and slots free (by this process's caps; all of them when its code caps the step no more), as many
        blocked steps queued again as slots are free. Returns how many. (Nothing is let go of: a slot is a claim,
        freed with it; this only passes on turns that were lost.)"""
        with self._tx() as t:
            blocked = t.all(SQL.blocked_keys, {"pipeline": pipeline})
            if not blocked:
                return 0
            held = {(name, key): int(n) for name, key, n in t.all(SQL.held_keys, {"pipeline": pipeline})}
            queued = 0
            for name, key in sorted(blocked, key=lambda item: _slot_lock_key(pipeline, *item)):
                cap = self.caps.cap(pipeline, name)
                if cap is not None and held.get((name, key), 0) >= cap:
                    continue   # (its holders pass their turns on when they let go)
                now_held = self._slots_held(t, pipeline, name, key, "", may_wait=False)
                if now_held is None:
                    continue   # (busy: a claim or a let-go of the key is in flight; looked at again next time)
                free = CANCEL_ROWS if cap is None else cap - now_held
                if free > 0:
                    queued += len(t.all(SQL.unblock_steps, {"pipeline": pipeline, "name": name, "key": key,
                                                            "limit": free}))
            if queued:
                t.notify(CH_JOBS, pipeline)
        if queued:
            log.warning("%d step(s) of %s waiting for a slot were queued again by the sweep (their turn was lost: "
                        "a cap raised or removed, a step re-keyed, or a process of an older version)", queued,
                        pipeline)
        return queued

    @staticmethod
    def _slots_held(t: Tx, pipeline: str, name: str, key: str, token: str, may_wait: bool = True) -> int | None:
        """The slots of a key held by claims other than ``token``'s, counted under the key's lock (held to the end
        of the transaction; Postgres, in the same round trip: SQL.locked_slots_held); None when the lock was
        busy. It is waited for (``may_wait``) when no key after it in lock order is held already (every
        transaction that waits takes them in that order, so none waits in a circle), else only tried."""
        params = {"pipeline": pipeline, "name": name, "token": token}
        if t.dialect != "postgres":   # (SQLite: one writer at a time)
            return int(t.one(SQL.slots_held, {**params, "key": key})[0])
        lock = _slot_lock_key(pipeline, name, key)
        wait = lock in t.slot_locks or (may_wait and (not t.slot_locks or lock > max(t.slot_locks)))
        held = int(t.one(SQL.locked_slots_held, {**params, "class": SQL.SLOT_LOCK_CLASS, "key": lock,
                                                  "wait": wait, "ckey": key})[0])
        if held < 0:
            return None
        t.slot_locks.add(lock)
        return held

    # -- definitions --------------------------------------------------------------------
    def definition(self, digest: str, t: Tx | None = None) -> Definition:
        """The definition a run was triggered with (cached: a digest never changes)."""
        found = self._definitions.get(digest)
        if found is None:
            if t is None:
                with self.store.tx(write=False) as t2:
                    row = t2.one(SQL.select_definition, {"hash": digest})
            else:
                row = t.one(SQL.select_definition, {"hash": digest})
            if row is None:
                raise DuctworkError(f"definition {digest} is missing")
            found = self._definitions[digest] = Definition.from_body(row[0])
        return found

    # -- trigger ------------------------------------------------------------------------
    def trigger(self, name: str, args: Sequence[Any], delay: float | None = None, at: float | None = None,
                key: str | None = None, priority: int = 0) -> int:
        """Start a run of pipeline ``name``: its run, root branch and first step, in one transaction; with a
        ``delay`` (seconds, database clock) or a start time ``at`` (epoch seconds) its first step is not
        claimable before then (trigger_start has checked them); with a ``key``, the run of the pipeline that
        has that key already, if there is one (any status, until pruned), instead of a new one; its steps have
        its ``priority`` (check_priority has checked it)."""
        return self.trigger_run(name, args, delay, at, key, priority)[0]

    def trigger_run(self, name: str, args: Sequence[Any], delay: float | None = None, at: float | None = None,
                    key: str | None = None, priority: int = 0) -> tuple[int, bool]:
        """trigger(), and whether the run is new (False: the run of that key, there already)."""
        cls, args_json = self._trigger_input(name, args)
        with self._tx() as t:
            run_id, new = self._trigger_in(t, cls, args_json, delay, at, key, priority)
        self._stored_definitions.add(cls.definition.hash)
        return run_id, new

    def trigger_on(self, connection: Any, name: str, args: Sequence[Any], delay: float | None = None,
                   at: float | None = None, key: str | None = None, priority: int = 0) -> tuple[bool, "RunRow"]:
        """trigger(connection=): the run written in the caller's transaction on ``connection`` (Store.borrowed),
        whether it is new, and its row as that transaction sees it (no other connection sees it before the
        commit). The definition is not noted as stored: the caller may roll it back."""
        cls, args_json = self._trigger_input(name, args)
        with self.store.borrowed(connection, kind=_EngineTx) as t:
            run_id, new = self._trigger_in(t, cls, args_json, delay, at, key, priority)
            row = t.one(SQL.select_run, {"id": run_id})
        return new, RunRow.from_row(row)

    @staticmethod
    def _trigger_input(name: str, args: Sequence[Any]) -> tuple[type["Pipeline"], str]:
        """The pipeline class of ``name`` and the trigger's arguments as JSON (checked before any write)."""
        cls = _REGISTRY.get(name)
        if cls is None:
            raise ConfigError(f"pipeline {name!r} not found (registered: {', '.join(sorted(_REGISTRY)) or 'none'})")
        try:
            return cls, _dumps(list(args))
        except (TypeError, ValueError) as exc:
            raise DuctworkError(f"trigger arguments of {name} must be JSON: {exc}") from None

    def _trigger_in(self, t: _EngineTx, cls: type["Pipeline"], args_json: str, delay: float | None,
                    at: float | None, key: str | None, priority: int = 0) -> tuple[int, bool]:
        """trigger() inside ``t``: the run's id, and True when it is new (with a key that is taken: the run that
        has it, and False)."""
        name, d = cls.__name__, cls.definition
        digest = d.hash
        self._definitions.setdefault(digest, d)
        if digest not in self._stored_definitions:
            t.run(SQL.insert_definition, {"hash": digest, "pipeline": name, "body": d.body})
        run = {"pipeline": name, "definition": digest, "input": args_json, "priority": priority}
        traced = _Tracing.run_span(name)
        try:
            return self._insert_run(t, run, d, key, delay, at, traced)
        finally:
            if traced is not None:
                traced[0].end()

    def _insert_run(self, t: _EngineTx, run: dict, d: Any, key: str | None, delay: float | None, at: float | None,
                    traced: tuple[Any, str] | None) -> tuple[int, bool]:
        """_trigger_in's rows: the run (unless its key is taken), its root branch, its first step."""
        name, digest, args_json = run["pipeline"], run["definition"], run["input"]
        if key is None:
            run_id = t.one(SQL.insert_run, run)[0]
        else:
            while True:   # (Postgres: after the transaction that inserted it ended, it committed; a run pruned
                row = t.one(SQL.insert_keyed_run, {**run, "key": key})   # between the two statements frees it)
                if row is not None:
                    break
                holder = t.one(SQL.run_of_key, {"pipeline": name, "key": key})
                if holder is not None:
                    return int(holder[0]), False
            run_id = row[0]
        if traced is not None:
            traced[0].set_attribute("ductwork.run_id", int(run_id))
            t.run(SQL.run_traced, {"id": run_id, "trace_context": traced[1]})
        branch_id = t.one(SQL.insert_branch, {"run_id": run_id, "pipeline": name, "definition": digest})[0]
        self._insert_steps(t, [(run_id, branch_id, name, 0, d.nodes[0]["step"], args_json, 0.0)])
        if delay is not None or at is not None:
            start = t.one(SQL.schedule_run, {"id": run_id, "at": at, "delay": delay or 0.0})[0]
            t.run(SQL.delay_first_step, {"start": start, "branch_id": branch_id})
        return int(run_id), True

    def fire_schedule(self, name: str, schedule: "Schedule", tick: float, fire: bool = True) -> int | None:
        """A schedule's ``tick`` (its latest fire time now): the run of that tick, triggered once however many
        processes fire it (its key: pipeline, schedule, tick); None when that tick (or a later one) was fired,
        or when the schedule is seen for the first time (a new schedule waits for its next tick). Not ``fire``
        (switched off in config): the tick counts as fired, without a run, so switching it on fires none of the
        ticks it was off for. Postgres: a process that holds the schedule's row and does not end its
        transaction (paused) makes this one give up after CANCEL's lock timeout (55P03), not wait."""
        cls, args_json = self._trigger_input(name, schedule.args)
        state = {"pipeline": name, "ident": schedule.ident}
        with self._tx() as t:
            if t.dialect == "postgres":
                t.run(SQL.cancel_lock_timeout)
            row = t.one(SQL.schedule_state, state)
            if row is None:
                t.run(SQL.schedule_seen, {**state, "last_fire": tick})
                return None
            if float(row[0]) >= tick:
                return None
            if not fire:
                t.run(SQL.schedule_skipped, {**state, "last_fire": tick})
                return None
            run_id, _ = self._trigger_in(t, cls, args_json, None, None, f"schedule:{schedule.ident}:{tick:.3f}")
            t.run(SQL.schedule_fired, {**state, "last_fire": tick, "run_id": run_id})
        self._stored_definitions.add(cls.definition.hash)
        return run_id

    def signal(self, run_id: int, name: str, payload_json: str) -> bool:
        """Send the run its signal ``name``: kept if it is the first of its name and the run is in progress (else
        False), and the branches parked for it are woken. On Postgres under the run's lock, exclusively: an
        advancement of the run that found no signal parks before this looks for parked branches."""
        def work() -> bool:
            with self._tx() as t:
                if t.dialect == "postgres":
                    self._lock_runs(t, [run_id])
                if t.one(SQL.insert_signal, {"run_id": run_id, "name": name, "payload": payload_json}) is None:
                    return False
                for pipeline in sorted({p for (p,) in t.all(SQL.wake_waiting, {"run_id": run_id, "name": name})}):
                    t.notify(CH_ADVANCE, pipeline)
            return True
        return _retry_conflicts(work)

    # -- job claims and commits ---------------------------------------------------------
    def claim_steps(self, pipeline: str, process_id: int, limit: int = 1) -> list[JobClaim]:
        """Claim up to ``limit`` claimable steps of ``pipeline`` for ``process_id``. (A statement at a time, each its
        own transaction on Postgres, unless a step of the pipeline is capped: its slots are counted under a lock
        held to the end of the transaction.)"""
        with self.store.tx(single=not self.caps.capped(pipeline)) as t:
            return self._claim_steps_in(t, pipeline, process_id, _token(), limit)

    def commit_success(self, c: JobClaim, output_json: str) -> bool:
        """Commit one successful execution; False when the claim was lost."""
        return self.commit([StepResult(c, True, output_json)]).accepted[0]

    def commit_failure(self, c: JobClaim, error: str, permanent_reason: str | None = None) -> bool:
        """Commit one failed execution; False when the claim was lost."""
        return self.commit([StepResult(c, False, error, permanent_reason)]).accepted[0]

    def commit(self, results: list[StepResult], claim_limit: int = 0) -> Committed:
        """Commit finished executions in one transaction (fenced: only claims still held),
        advance their branches inline, and claim up to ``claim_limit`` more steps."""
        try:
            return _retry_conflicts(lambda: self._commit(results, claim_limit, self.inline))
        except (DatabaseUnavailable, sqlite3.OperationalError):
            raise
        except Exception:
            if not self.inline:
                raise
            log.exception("inline advancement failed; committing without it (the advancer takes over)")
            return _retry_conflicts(lambda: self._commit(results, claim_limit, False))

    def _commit(self, results: list[StepResult], claim_limit: int, inline: bool) -> Committed:
        """One attempt of commit() in one transaction."""
        token = _token()
        finished: list[tuple[StepResult, StepState]] = []    # the steps that are done, with their states
        with self._tx() as t:
            runs, successes = {r.claim.run_id for r in results}, [r for r in results if r.ok]
            if not successes:   # (else the first statement of _write_successes takes the run locks)
                self._share_runs(t, runs)
            succeeded = self._write_successes(t, successes, runs)
            accepted = [self._settle(t, r, succeeded, finished) for r in results]
            rejected = [r for r, ok in zip(results, accepted, strict=True) if not ok]
            discarded = self._discard_cancelled(t, rejected) if rejected else set()
            if finished:
                self._advance_finished(t, finished, inline)
            # (the successes' execution rows were written with them: _write_successes)
            self._record_executions(t, [r for r, ok in zip(results, accepted, strict=True) if ok and not r.ok],
                                    [r for r in rejected if r.claim.step_id in discarded])
            # (the slots let go last: their keys' locks are held to the commit, so the least time; one per claim,
            # however many of its steps of the key it commits; the claim passes them on after its statement, else
            # the unblock below does)
            self.free_slots(t, [freed[:3] for freed in {
                (r.claim.pipeline, r.claim.name, r.claim.concurrency_key, r.claim.token)
                for r, ok in zip(results, accepted, strict=True) if ok}])
            claims = self._claim_next(t, results, claim_limit, token)
            self.unblock_freed(t)
            if results:
                self._flush_arrivals(t, results[0].claim.process_id, token)
        return Committed(accepted, t.halted, claims, discarded, t.completions)

    @staticmethod
    def _share_runs(t: Tx, run_ids: Iterable[int]) -> None:
        """Postgres: this transaction may write about these runs: a cancel of one of them waits for it, or it for
        the cancel (SQL.lock_runs). SQLite needs none: one writer at a time."""
        if t.dialect == "postgres" and run_ids:
            ordered = BulkSQL.id_list(t.dialect, run_lock_order(run_ids))
            t.all(SQL.share_runs, {"class": SQL.RUN_LOCK_CLASS, "ids": ordered})

    @staticmethod
    def share_runs_of_steps(t: Tx, condition: str, params: dict) -> None:
        """Postgres: _share_runs for the runs of the steps ``condition`` (with ``params``) names, before this
        transaction's statements about those steps read them."""
        if t.dialect == "postgres":
            where = condition.replace("{ids}", BulkSQL.ids(t.dialect, "ductwork_steps")).replace("{only}", "")
            t.all(SQL.share_runs_of_steps.replace("{steps}", where), {**params, "class": SQL.RUN_LOCK_CLASS})

    @staticmethod
    def unclaim_cancelled(t: Tx, occasion: str, params: dict, only: str = "") -> list[tuple]:
        """Let go claimed steps of cancelled runs (SQL.unclaimed_cancelled, on ``occasion``): (id, status,
        pipeline) of each; those queued again (their run was revived meanwhile) wake a worker."""
        where = SQL.UNCLAIMED[occasion].replace("{only}", only)
        where = where.replace("{ids}", BulkSQL.ids(t.dialect, "ductwork_steps"))
        rows = t.all(SQL.unclaimed_cancelled.replace("{unclaimed}", where), params)
        for pipeline in {pipeline for _, status, pipeline, _, _ in rows if status == "queued"}:
            t.notify(CH_JOBS, pipeline)
        Engine.free_slots(t, [(pipeline, name, key) for _, _, pipeline, name, key in rows])
        return rows

    def _discard_cancelled(self, t: _EngineTx, rejected: list[StepResult]) -> set[int]:
        """Results whose run was cancelled while they ran (their steps cancelling or stopping, still held): dropped,
        their steps let go. The ids of those steps (the other rejected results lost their claim)."""
        discarded: set[int] = set()
        groups: dict[tuple[int, str], list[int]] = {}
        for r in rejected:
            groups.setdefault((r.claim.process_id, r.claim.token), []).append(r.claim.step_id)
        for (process_id, token), ids in groups.items():
            params = {"ids": t.ids(ids), "process_id": process_id, "token": token}
            discarded |= {row[0] for row in self.unclaim_cancelled(t, "discarded", params)}
        return discarded

    def _write_successes(self, t: _EngineTx, results: list[StepResult], runs: set[int]) -> set[int]:
        """Mark succeeded steps in one statement per claim, the first of them taking the locks of ``runs`` on
        Postgres (BulkSQL.SHARE_RUNS), with the execution rows of those still held (BulkSQL.steps_succeeded);
        returns their step ids."""
        accepted: set[int] = set()
        groups: dict[tuple[int, str], list[StepResult]] = {}
        for r in results:
            groups.setdefault((r.claim.process_id, r.claim.token), []).append(r)
        locks = run_lock_order(runs)
        for (process_id, token), group in groups.items():
            params = {**t.keyed(BulkSQL.STEP_RAN, [(r.claim.step_id, r.value, r.claim.ran_for()) for r in group]),
                      "process_id": process_id, "token": token}
            if t.dialect == "postgres":
                params |= {"lock_ids": t.ids(locks), "lock_class": SQL.RUN_LOCK_CLASS}
                locks = []
            held = {row[0] for row in t.all(BulkSQL.steps_succeeded(t.dialect), params)}
            if t.dialect == "sqlite":   # (Postgres wrote their execution rows in that statement)
                self._record_executions(t, [r for r in group if r.claim.step_id in held])
            accepted |= held
        return accepted

    def gives_up(self, r: StepResult) -> bool:
        """A failed attempt's result: is it the step's last (a halt reason, or its retry budget spent)?"""
        c = r.claim
        max_retry = self.config.get("job_worker.max_retry", c.pipeline, c.name) if r.max_retry is None else r.max_retry
        return r.permanent is not None or c.attempts + 1 > max_retry

    def _settle(self, t: _EngineTx, r: StepResult, succeeded: set[int],
                finished: list[tuple[StepResult, StepState]]) -> bool:
        """One result's step row: succeeded (written in bulk before), failed for good, or queued
        for a retry. A step that is done joins ``finished``. False when the claim was lost."""
        c = r.claim
        if r.ok:
            if c.step_id in succeeded:
                finished.append((r, StepState(c.step_id, "succeeded", r.value, None)))
            return c.step_id in succeeded
        failed = self.gives_up(r)
        reason = r.permanent or (JOB_RETRIES_EXHAUSTED if failed else None)
        delay = 0 if failed else float(self.config.get("job_worker.retry_delay", c.pipeline, c.name)
                                       if r.delay is None else r.delay)
        if t.run(SQL.step_failed, {"status": "failed" if failed else "queued", "error": r.value, "halt_reason": reason,
                                   "delay": delay, "id": c.step_id, "process_id": c.process_id,
                                   "token": c.token}) != 1:
            return False
        if failed:
            finished.append((r, StepState(c.step_id, "failed", None, reason)))
        else:
            t.queued(c.pipeline, [c.step_id])  # a retry, claimable after retry_delay
        return True

    def _record_executions(self, t: Tx, results: list[StepResult], discarded: list[StepResult] = ()) -> None:
        """One execution row per committed result, with its real start time; a discarded one (its run was
        cancelled) is an execution cancelled."""
        rows = [(r.claim, "succeeded" if r.ok else "failed", None if r.ok else r.value) for r in results]
        rows += [(r.claim, "cancelled", DISCARDED_TEXT if r.ok else f"{DISCARDED_TEXT}; it had failed: {r.value}")
                 for r in discarded]
        if rows:
            self._insert_executions(t, [(c.step_id, c.run_id, c.pipeline, c.process_id, c.attempt, outcome, error,
                                         c.claimed_at, c.ran_for()) for c, outcome, error in rows])

    def _claim_next(self, t: _EngineTx, results: list[StepResult], limit: int, token: str) -> list[JobClaim]:
        """The next steps for the committing thread, claimed in the same transaction."""
        if not (limit and results):
            return []
        pipeline, process_id = results[0].claim.pipeline, results[0].claim.process_id
        claims = self._claim_steps_in(t, pipeline, process_id, token, limit)
        t.claimed(pipeline, {c.step_id for c in claims})
        return claims

    @staticmethod
    def _insert_executions(t: Tx, rows: list[tuple]) -> None:
        """Execution rows (BulkSQL.EXECUTION tuples)."""
        t.run(BulkSQL.insert_executions(t.dialect), {"rows": _document(BulkSQL.EXECUTION, rows)})

    def _advance_finished(self, t: _EngineTx, finished: list[tuple[StepResult, StepState]], inline: bool) -> None:
        """The branches of just-finished steps: advanced here (inline) or queued for an advancer."""
        by_branch = {r.claim.branch_id: (r, step) for r, step in finished}
        locked: list[tuple[BranchClaim, StepState | None]] = []
        # Locked, not claimed (nor fenced on the process row): advanced before this transaction ends.
        if inline:
            process_id = finished[0][0].claim.process_id
            for row in t.all(BulkSQL.lock_branches(t.dialect), {"ids": t.ids(by_branch)}):
                b = BranchClaim.from_row(row, process_id=process_id, token="", held="running")
                locked.append((b, by_branch.pop(b.id)[1]))
            if locked:
                self.fault("after_branch_claim")
        for branch_id, (r, _) in by_branch.items():  # not advanced here: the advancer's job
            t.run(SQL.branch_ready, {"id": branch_id})
            t.notify(CH_ADVANCE, r.claim.pipeline)
        if locked:
            self._advance_many(t, locked)

    def release(self, process_id: int, step_ids: list[int], pipeline: str) -> int:
        """Give back claims that never started: queued again, no crash counted."""
        if not step_ids:
            return 0
        def work() -> int:
            with self._tx() as t:
                params = {"process_id": process_id, "ids": t.ids(step_ids)}
                self.share_runs_of_steps(t, "{ids}", params)
                released = t.all(BulkSQL.release_steps(t.dialect), params)
                self.free_slots(t, released)
                n = len(released)
                if n < len(step_ids):   # some were cancelled meanwhile: let go (they never started)
                    n += len(self.unclaim_cancelled(t, "acknowledged", params))
                self.unblock_freed(t)
                t.notify(CH_JOBS, pipeline)
            return n
        return _retry_conflicts(work)

    def hand_back(self, process_id: int, step_ids: Iterable[int] | None = None, why: str = "process crashed") -> int:
        """Close a process's in-flight executions as crashes and re-enqueue them (immediately
        claimable); with no ``step_ids`` also release its branch claims. Crashes never touch
        the retry budget; after ``max_crash`` the step fails."""
        def work() -> int:
            with self._tx() as t:
                return self._hand_back(t, process_id, step_ids, why)
        return _retry_conflicts(work)

    def reap(self, process_id: int, timeout: float) -> bool:
        """Delete a process row whose heartbeat is stale and hand back its work, in one
        transaction; idempotent and safe when several peers reap at once."""
        def work() -> tuple | None:
            with self._tx() as t:
                row = t.one(SQL.reap_process, {"id": process_id, "timeout": timeout})
                return None if row is None else (row, self._hand_back(t, process_id, None,
                                                                      "process reaped: heartbeat stale"))
        reaped = _retry_conflicts(work)
        if reaped is None:
            return False
        (row_id, machine, pid, role), count = reaped
        log.warning("reaped process row %s (%s pid %s, %s); %d step(s) handed back", row_id, machine, pid, role, count)
        return True

    def retire(self, process_id: int, why: str) -> int:
        """Delete a process row and hand back everything it still holds, in one transaction.

        The row goes first: a claim in flight under it (which holds the row with KEY SHARE)
        finishes before, and is seen by the hand-back; one made after finds no row and claims
        nothing. Used when a child dies, when a process exits, and (fenced on staleness) by reap."""
        def work() -> int:
            with self._tx() as t:
                t.run(SQL.delete_process, {"id": process_id})
                return self._hand_back(t, process_id, None, why)
        return _retry_conflicts(work)

    def _hand_back(self, t: _EngineTx, process_id: int, step_ids: Iterable[int] | None, why: str) -> int:
        """Crash the running steps ``process_id`` holds (those of ``step_ids``, or all of them and
        its branch claims too); returns how many were handed back."""
        wanted = None if step_ids is None else set(step_ids)
        # first, the steps of cancelled runs it held are let go (nothing of theirs runs again, unless revived meanwhile:
        # their runs' locks first, so that a revive is wholly before or after)
        only, params = ("", {"process_id": process_id}) if wanted is None else (
            " AND " + BulkSQL.ids(t.dialect, "ductwork_steps"), {"process_id": process_id, "ids": t.ids(wanted)})
        self.share_runs_of_steps(t, SQL.UNCLAIMED["handed back"].replace("{only}", only), params)
        count = len(self.unclaim_cancelled(t, "handed back", params, only))
        held = [HeldStep.from_row(row) for row in t.all(SQL.steps_held_by, {"process_id": process_id})]
        crashed = [s for s in held
                   if (wanted is None or s.step_id in wanted) and self._crash_step(t, s, process_id, why)]
        self.free_slots(t, [(s.pipeline, s.name, s.concurrency_key) for s in crashed])
        self.unblock_freed(t)
        count += len(crashed)
        if wanted is None:
            for (pipeline,) in set(t.all(SQL.release_branches_of, {"process_id": process_id})):
                t.notify(CH_ADVANCE, pipeline)
        return count

    def _crash_step(self, t: _EngineTx, s: HeldStep, process_id: int, why: str) -> bool:
        """Close one running step as a crashed execution: queued again (at once for the first two
        crashes, then backing off) or failed once ``max_crash`` is spent."""
        crashes = s.crashes + 1
        exhausted = crashes > self.config.get("job_worker.max_crash", s.pipeline, s.name)
        delay = 0.0 if crashes <= 2 else backoff(crashes - 2, 1.0, 30.0)  # the first two re-runs at once
        changed = t.run(SQL.step_crashed, {
            "status": "failed" if exhausted else "queued", "halt_reason": JOB_CRASHES_EXHAUSTED if exhausted else None,
            "error": f"crashed: {why}" if exhausted else None, "delay": delay, "id": s.step_id,
            "process_id": process_id})
        if changed != 1:
            return False  # committed by its (resumed) claimer since the SELECT: nothing to hand back
        self._insert_executions(t, [(s.step_id, s.run_id, s.pipeline, process_id, s.attempts + crashes, "crashed",
                                     why, s.claimed_at, None)])
        t.notify(CH_ADVANCE if exhausted else CH_JOBS, s.pipeline)
        if exhausted:
            t.run(SQL.branch_ready, {"id": s.branch_id})
        return True

    # -- advancement ----------------------------------------------------------------------
    def claim_branches(self, pipeline: str, process_id: int, limit: int = 1) -> list[BranchClaim]:
        """Claim up to ``limit`` branches of ``pipeline`` that wait for advancement."""
        token = _token()
        with self.store.tx(single=True) as t:
            rows = self._claim_rows(t, SQL.claim_branches, pipeline, process_id, token, limit)
        return [BranchClaim.from_row(row, process_id=process_id, token=token) for row in rows]

    def claim_run(self, run_id: int, pipeline: str, process_id: int) -> tuple[list[JobClaim], list[BranchClaim]]:
        """run_inline: a queued step of the run (claimed at once, whatever it waits for) or, with none, a branch of
        it to advance (SQL.claim_run_steps, SQL.claim_run_branches); ([], []) when the run can go no further."""
        token = _token()
        params = {"process_id": process_id, "token": token, "run_id": run_id, "limit": 1}
        with self.store.tx(single=True) as t:
            rows = t.all(SQL.fenced(SQL.claim_run_steps, self.fence_claims), params)
        if rows:
            return [JobClaim.from_row(row, pipeline=pipeline, process_id=process_id, token=token,
                                      confirmed=time.monotonic()) for row in rows], []
        with self.store.tx(single=True) as t:
            rows = t.all(SQL.fenced(SQL.claim_run_branches, self.fence_claims), params)
        return [], [BranchClaim.from_row(row, process_id=process_id, token=token) for row in rows]

    def advance(self, b: BranchClaim) -> tuple[list[int], list[int]]:
        """Apply one advancement; returns the runs that halted (for on_halt) and completed (for on_complete)."""
        def work() -> tuple[list[int], list[int]]:
            with self._tx() as t:
                self._share_runs(t, [b.run_id])
                self._advance_many(t, [(b, None)])
                self._flush_arrivals(t, b.process_id, b.token)
            return t.halted, t.completions
        return _retry_conflicts(work)

    def _advance_many(self, t: _EngineTx, items: list[tuple[BranchClaim, StepState | None]]) -> None:
        """Advance held branches inside ``t``: decide each, then write in bulk (fenced by the
        claim token); ``step`` (when given) saves re-reading the step just committed."""
        decided = []
        for b, step in items:
            d = self.definition(b.definition, t)
            situation = self._situation(t, b, d, step)
            outcome = decide(situation)
            if outcome.warning:
                log.warning(outcome.warning, extra={"run": b.run_id})
            decided.append((b, d, situation.step, outcome))
        self._apply_outcomes(t, [(b, o) for b, _, _, o in decided])
        new_steps: list[tuple] = []
        for b, d, step, o in decided:
            if o.park is not None or b.waiting_for is not None:   # (wait_for: parks, or leaves the park)
                self._park(t, b, o)
            if o.new_step is not None:
                node, value = o.new_step
                new_steps.append((b.run_id, b.id, b.pipeline, node, d.nodes[node]["step"], value, o.delay))
            if o.children:
                self._insert_children(t, b, d, step.step_id, o.children, o.delay)
            if o.status in ("completed", "halted"):
                self._branch_finished(t, b, o.status, o.output)
        if new_steps:
            self._insert_steps(t, new_steps)
        if t.completed:
            for pipeline, took in t.all(BulkSQL.runs_completed(t.dialect), t.keyed(BulkSQL.STEP, t.completed)):
                t.measured.append(("run_duration", pipeline, float(took)))
            t.completed = []

    def _situation(self, t: Tx, b: BranchClaim, d: Definition, step: StepState | None) -> Situation:
        """Read what deciding the branch's advancement needs."""
        if step is None:
            row = t.one(SQL.current_step, {"branch_id": b.id})
            step = StepState.from_row(row) if row else None
        node = d.nodes[b.node]
        children = (t.all(SQL.children_of, {"origin_step_id": step.step_id})
                    if b.expected > 0 and step is not None else [])
        max_depth = (self.config.get("pipeline_advancer.steps.max_depth", b.pipeline, node["step"])
                     if _transition(node["after"])["kind"] in BOUNDED_FAN_OUTS else -1)
        cls = _REGISTRY.get(b.pipeline)
        situation = Situation(b.node, d.nodes, step, b.expected, children, max_depth, cls.steps if cls else None,
                              waiting_for=b.waiting_for, wait_until=b.wait_until)
        wait = node["after"].get("wait")
        if wait is not None and "signal" in wait and b.expected == 0:   # (a wait_for: its signal, and the clock)
            row = t.one(SQL.signal_of, {"run_id": b.run_id, "name": wait["signal"]})
            situation.signal = None if row is None else (row[0] if row[0] is not None else "null")
            situation.now = float(t.one(StoreSQL.now)[0])
        return situation

    @staticmethod
    def _apply_outcomes(t: _EngineTx, decided: list[tuple[BranchClaim, _Outcome]]) -> None:
        """Write the decisions in one statement, fenced on each branch's hold; a lost one
        rejects the whole advancement."""
        rows = [(b.id, b.held, b.token, o.status, o.node, o.expected, o.arrived, o.output, o.halt_reason)
                for b, o in decided]
        applied = {row[0] for row in t.all(BulkSQL.apply_branches(t.dialect), t.keyed(BulkSQL.BRANCH, rows))}
        if len(applied) != len(decided):
            lost = [b.id for b, _ in decided if b.id not in applied]
            log.warning("advancement of branch(es) %s rejected: the claim was lost", lost)
            raise _Rejected()

    @staticmethod
    def _insert_steps(t: _EngineTx, rows: list[tuple]) -> None:
        """Queue new steps (BulkSQL.NEW_STEP rows); a worker is woken for them after commit."""
        by_pipeline: dict[str, list[int]] = {}
        params = {"rows": _document(BulkSQL.NEW_STEP, [(*row, pos) for pos, row in enumerate(rows)]),
                  "run_ids": t.ids({row[0] for row in rows})}
        for step_id, pipeline in t.all(BulkSQL.insert_steps(t.dialect), params):
            by_pipeline.setdefault(pipeline, []).append(step_id)
        for pipeline, ids in by_pipeline.items():
            t.queued(pipeline, ids)

    @staticmethod
    def _park(t: _EngineTx, b: BranchClaim, o: _Outcome) -> None:
        """wait_for: park the branch in the advance queue until its signal's deadline (PARKED_FOREVER without
        one), saying what it waits for; or, once it goes on (or halts), say it waits for nothing any more."""
        if o.park is None:
            t.run(SQL.unpark_branch, {"id": b.id})
            return
        name, until = o.park
        t.run(SQL.park_branch, {"id": b.id, "name": name, "until": until,
                                "available_at": PARKED_FOREVER if until is None else until})

    def _insert_children(self, t: _EngineTx, b: BranchClaim, d: Definition, origin_step: int,
                         children: list[tuple[int, int, str]], delay: float = 0.0) -> None:
        """The child branches of a fan-out, each with its first step (claimable ``delay`` seconds from now)."""
        params = {"run_id": b.run_id, "pipeline": b.pipeline, "definition": b.definition, "parent_id": b.id,
                  "origin_step_id": origin_step,
                  "rows": _document(BulkSQL.CHILD_BRANCH, [(position, node) for position, node, _ in children])}
        ids = {pos: bid for bid, pos in t.all(BulkSQL.insert_child_branches(t.dialect), params)}
        self._insert_steps(t, [(b.run_id, ids[position], b.pipeline, node, d.nodes[node]["step"], value, delay)
                               for position, node, value in children])

    def _branch_finished(self, t: _EngineTx, b: BranchClaim, status: str, output: str | None) -> None:
        """A branch completed or halted: counted on its parent, or it ends its run."""
        run_id = b.run_id
        if b.parent_id is not None:
            # Counted on the parent at the end of the transaction (_flush_arrivals): the parent
            # row is the one hot row a fan-in shares, so its lock is held as briefly as possible.
            t.arrivals[b.parent_id] = t.arrivals.get(b.parent_id, 0) + 1
        elif status == "completed":
            t.completed.append((run_id, output))
            t.completions.append(run_id)
            log.debug("run %s completed", run_id, extra={"run": run_id})
        else:
            reasons = [r for (r,) in t.all(SQL.halt_reasons, {"run_id": run_id})]
            t.run(SQL.run_halted, {"halt_reasons": _dumps(reasons), "id": run_id})
            log.warning("run %s halted: %s", run_id, ", ".join(reasons) or "halted", extra={"run": run_id})
            t.halted.append(run_id)

    def _flush_arrivals(self, t: _EngineTx, process_id: int, token: str) -> None:
        """Count finished children on their parents (in id order: no lock-order deadlocks between
        transactions); a parent whose last child arrived is advanced right here (its join)."""
        while t.arrivals:
            parent_id = min(t.arrivals)
            count = t.arrivals.pop(parent_id)
            row = t.one(SQL.child_arrived, {"count": count, "id": parent_id})
            if not row or row[0] != "advance":
                continue
            parent = (t.one(SQL.claim_branch, {"process_id": process_id, "token": token, "id": parent_id,
                                               "status": "advance"}) if self.inline else None)
            if parent is None:
                t.notify(CH_ADVANCE, row[1])
                continue
            self._advance_many(t, [(BranchClaim.from_row(parent, process_id=process_id, token=token), None)])

    def release_branch(self, b: BranchClaim, count_failure: bool, delay: float = 0.0) -> int:
        """Give a claimed branch back (``count_failure``: an advancement error); returns its failure count."""
        with self._tx() as t:
            row = t.one(SQL.release_branch, {"failure": 1 if count_failure else 0, "delay": delay, "id": b.id,
                                             "token": b.token})
            t.notify(CH_ADVANCE, b.pipeline)
        return int(row[0]) if row else 0

    def halt_branch(self, b: BranchClaim, reason: str) -> list[int]:
        """Halt a claimed branch outright (advancer retries exhausted)."""
        with self._tx() as t:
            self._share_runs(t, [b.run_id])
            row = (b.id, b.held, b.token, "halted", b.node, b.expected, b.arrived, None, reason)
            if not t.all(BulkSQL.apply_branches(t.dialect), t.keyed(BulkSQL.BRANCH, [row])):
                return []
            self._branch_finished(t, b, "halted", None)
            self._flush_arrivals(t, b.process_id, b.token)
        return t.halted

    def notify_halt(self, run_id: int) -> None:
        """Run the pipeline's on_halt handlers, at most once per halt, outside any transaction."""
        with self.store.tx() as t:
            if t.run(SQL.claim_halt_notice, {"id": run_id}) != 1:
                return
        run = Run.load(run_id, self)
        cls = _REGISTRY.get(run.pipeline)
        self._call_handlers("on_halt", cls.halt_handlers if cls else [], run, list(run.halt_reasons))

    def notify_complete(self, run_id: int, pipeline: str) -> None:
        """Run the pipeline's on_complete handlers (the caller completed the run: once), outside any transaction.
        Nothing is read when the pipeline has none."""
        cls = _REGISTRY.get(pipeline)
        if cls is not None and cls.complete_handlers:
            self._call_handlers("on_complete", cls.complete_handlers, Run.load(run_id, self))

    @staticmethod
    def _call_handlers(kind: str, handlers: list[Callable], run: "Run", *args: Any) -> None:
        """Call each handler with the run (and ``args``); one that raises is logged, the others still run."""
        for handler in handlers:
            try:
                handler(run, *args)
            except Exception:
                log.exception("%s handler %s of %s raised", kind, getattr(handler, "__name__", handler), run.pipeline,
                              extra={"run": run.id})

    # -- the queue's history (the dashboard's charts) --------------------------------------
    def sample_queue(self) -> float:
        """This minute's sample of the database's clock, unless another process took it (see
        QUEUE_SAMPLE_MINUTES): a look first, a write transaction only when it was not; returns the seconds
        until the next minute begins, by that clock."""
        with self.store.tx(write=False) as t:
            now = float(t.one(StoreSQL.now)[0])
            seen = t.one(SQL.queue_sample_seen, {"minute": int(now // 60)})
        if seen is None:
            with self.store.tx() as t:
                self.take_sample(t, int(now // 60))
        return (int(now // 60) + 1) * 60 - now

    @staticmethod
    def take_sample(t: Tx, minute: int) -> bool:
        """The sample of ``minute`` unless taken (whether this transaction took it): the queue now, and the
        stats of the minutes up to STATS_LAG before it that the sample before it had not counted (at most
        STATS_CATCH_UP), so a minute nobody sampled is counted by the next sample (the first ever: its own)."""
        if not t.all(SQL.queue_sample_taken, {"minute": minute}):
            return False
        t.run(SQL.queue_sample, {"minute": minute})
        (before,) = t.one(SQL.queue_sample_before, {"minute": minute})
        last = minute - STATS_LAG
        first = max(last - STATS_CATCH_UP + 1, int(before) - STATS_LAG + 1) if before is not None else last
        for kind in FINISHED_KINDS:
            t.run(SQL.minute_stats[kind], {"start": first * 60, "end": (last + 1) * 60})
        t.run(SQL.queue_samples_pruned, {"before": minute - QUEUE_SAMPLE_MINUTES})
        t.run(SQL.minute_stats_pruned, {"before": minute - QUEUE_SAMPLE_MINUTES})
        return True

    # -- retention ----------------------------------------------------------------------
    def prune(self, ages: dict[str, float], wait: bool = False, stop: threading.Event | None = None,
              batch: int = PRUNE_BATCH) -> collections.Counter | None:
        """Delete the finished runs older than their status's age (``ages``: status -> seconds, database
        clock) with every row they own: a batch per transaction, each followed by a pause (PRUNE_YIELD), so
        claims and commits never queue behind one long delete. Returns the runs
        deleted per (pipeline, status); None when another process was pruning (``wait``: wait for it). It
        first rolls the counts up (roll_up)."""
        pruned: collections.Counter = collections.Counter()
        pause = stop or threading.Event()
        if self.roll_up(wait) is None:
            return None
        for status, age in ages.items():
            while not pause.is_set():
                started = time.monotonic()
                got = _retry_conflicts(lambda s=status, a=age: self._prune_batch(s, a, batch, wait))
                if got is None:   # another process prunes now: what this one did so far, if anything
                    return pruned or None
                deleted, more = got
                pruned.update(deleted)
                if not more:
                    break
                pause.wait(max(PRUNE_PAUSE, (time.monotonic() - started) * PRUNE_YIELD[self.store.dialect]))
        return pruned

    def roll_up(self, wait: bool = False) -> bool | None:
        """Move the counts' marks to the newest runs and executions (roll_up_counts)."""
        return roll_up_counts(self.store, wait)

    @staticmethod
    def _count_pruned(t: Tx, unrolled: dict[str, list[tuple]], gone: list[tuple]) -> None:
        """Add to the totals what a prune batch deleted that no rollup had counted (its rows past the marks:
        ``unrolled``), and the runs it deleted (``gone``: pipeline and status) as pruned."""
        adds = [(pipeline, "triggered", "", n) for pipeline, n in unrolled["runs"]]
        adds += [(pipeline, "executed", outcome, n) for pipeline, outcome, n in unrolled["executions"]]
        adds += [(pipeline, "pruned", status, n) for (pipeline, status), n in collections.Counter(gone).items()]
        for pipeline, name, label, n in sorted(adds):
            t.run(SQL.add_count, {"pipeline": pipeline, "name": name, "label": label, "n": int(n)})

    def _prune_batch(self, status: str, age: float, limit: int,
                     wait: bool) -> tuple[collections.Counter, bool] | None:
        """One transaction of prune(): up to ``limit`` runs with their rows, cut short after PRUNE_ROWS steps (a
        run with a 10 000-way expand is 10 000 runs' worth of rows); what it deleted, and whether more may be
        waiting. None when another process holds the pruners' lock."""
        with self._tx() as t:
            if not _prune_lock(t, wait):
                return None
            if t.dialect == "postgres":
                t.run(SQL.plain_plans)
            ids = [row[0] for row in t.all(SQL.prunable_runs, {"status": status, "age": age, "limit": limit})]
            if not ids:
                return collections.Counter(), False
            owned_by = BulkSQL.ids(t.dialect, "", "run_id")
            more = len(ids) == limit
            sizes = dict(t.all(SQL.prune_sizes.replace("{runs}", owned_by), {"ids": BulkSQL.id_list(t.dialect, ids)}))
            kept, rows = [], 0
            for run_id in ids:   # oldest first, until PRUNE_ROWS steps (at least one run)
                rows += int(sizes.get(run_id, 0))
                if kept and rows > PRUNE_ROWS:
                    more = True
                    break
                kept.append(run_id)
            params, by_id = {"ids": BulkSQL.id_list(t.dialect, kept)}, BulkSQL.ids(t.dialect, "", "id")
            unrolled = {"runs": t.all(SQL.unrolled_runs.replace("{ids}", by_id), params),
                        "executions": t.all(SQL.unrolled_executions.replace("{runs}", owned_by), params)}
            for statement in SQL.PRUNE_OWNED:
                t.run(statement.replace("{runs}", owned_by), params)
            gone = [tuple(row) for row in t.all(SQL.prune_runs.replace("{ids}", by_id), params)]
            self._count_pruned(t, unrolled, gone)
        return collections.Counter(gone), more

    def prunable(self, ages: dict[str, float]) -> collections.Counter:
        """What prune(ages) would delete now, per (pipeline, status)."""
        out: collections.Counter = collections.Counter()
        with self.store.tx(write=False) as t:
            for status, age in ages.items():
                for pipeline, n in t.all(SQL.prunable_counts, {"status": status, "age": age}):
                    out[pipeline, status] = int(n)
        return out

    # -- cancel ---------------------------------------------------------------------------
    # Cancelling a run. One transaction per batch of runs: the run becomes cancelled, its branches waiting for
    # an advancer leave the queue, its queued steps are cancelled and its claimed ones become "cancelling"
    # (SQL.steps_cancelled). Nothing claims a step that is not queued, so no new claim starts. A claimed step may
    # not have started yet (the later steps of a batch): cancel() waits until each holder has answered
    # (Runtime.look_for_cancels, at once on the CH_CANCEL hint, else within CANCEL_POLL): a claim it had not
    # started is dropped, under the lock run_step takes to start one, and let go; one running is "stopping", its
    # should_stop turns true, and what it returns is discarded (an execution "cancelled"). A holder that does not
    # answer within CANCEL_ACK_TIMEOUT (frozen, cut off) loses the claim; whatever it does then is discarded.
    # A commit at the same instant: on Postgres every transaction that writes about a run's progress (a commit,
    # an advancement) holds the run's lock in shared mode from its first statement and the cancel holds it
    # exclusively (SQL.lock_runs), so a commit lands wholly before the cancel (which then cancels what it queued)
    # or after it, when its steps are no longer "running" and the commit is discarded. On SQLite one writer at a
    # time gives the same order. A hand-back or release that requeues a step while the cancel runs is read
    # again by the cancel's update (its new status matches too) and cancelled.
    def cancel(self, run_ids: Iterable[int] = (), pipeline: str | None = None, older_than: float | None = None,
               reason: str | None = None) -> list[int]:
        """Cancel the runs in progress among ``run_ids`` (every run, when none is given) of ``pipeline`` and older
        than ``older_than`` seconds (those given), CANCEL_BATCH per transaction; returns their ids. Returns once
        no step of theirs can start any more (see "Cancelling a run"): the holders of their claimed steps have
        acknowledged, or CANCEL_ACK_TIMEOUT passed and the claims were taken from them."""
        ids = sorted({int(i) for i in run_ids if 0 < int(i) <= MAX_ID})
        filters = {name: value for name, value in (("pipeline", pipeline), ("older_than", older_than))
                   if value is not None}
        if not ids and not filters:
            if run_ids:   # only ids that cannot name a run
                return []
            raise DuctworkError("cancel needs run ids, a pipeline or older_than (it never cancels everything)")
        cancelled: list[int] = []
        told: list[int] = []   # claimed steps of theirs, "cancelling" until their holders answer
        with self._tx(write=False) as t:   # (given ids bound the cancel themselves; filters stop at the newest run)
            after, upto = 0, MAX_ID if ids else int(t.one(SQL.newest_run)[0])
            if ids:   # a cancel again (after one that failed, or by a second operator) waits for the answers too
                told += [row[0] for row in t.all(SQL.still_cancelling.replace("{runs}", BulkSQL.ids(t.dialect, "",
                                                                                                  "run_id")),
                                                 {"ids": t.ids(ids)})]
        while True:
            with self._tx(write=False) as t:
                where = "".join(CANCEL_FILTERS[name] for name in filters)
                params = {**filters, "after": after, "upto": upto, "limit": CANCEL_BATCH}
                if ids:
                    where += "\n          AND " + BulkSQL.ids(t.dialect, "", "id")
                    params["ids"] = t.ids(ids)
                batch = [row[0] for row in t.all(SQL.runs_to_cancel.replace("{where}", where), params)]
            if not batch:
                break
            after = batch[-1]
            try:
                done, claimed = _retry_conflicts(lambda b=batch: self._cancel_batch(b, reason), lock_timeouts=True)
            except DuctworkError:
                raise
            except Exception as exc:
                if "55P03" not in str(exc):
                    raise
                raise DuctworkError(f"cancel: a transaction about runs {batch[0]}..{batch[-1]} does not end (a frozen "
                                    f"process?); {len(cancelled)} run(s) cancelled so far; try again") from None
            cancelled += done
            told += claimed
        self._await_acknowledgements(told)
        return cancelled

    def _cancel_batch(self, run_ids: list[int], reason: str | None) -> tuple[list[int], list[int]]:
        """One transaction of cancel(): the runs (sorted ids), their waiting branches and their steps; returns the
        runs cancelled and their claimed steps (cancelling: the holders are told after commit)."""
        with self._tx() as t:
            if t.dialect == "postgres":   # waits for the transactions in flight about these runs (SQL.lock_runs)
                t.run(SQL.cancel_lock_timeout)
                self._lock_runs(t, run_ids)
            runs = t.all(SQL.runs_cancelled.replace("{ids}", BulkSQL.ids(t.dialect, "", "id")),
                         {"ids": t.ids(run_ids), "reason": reason})
            if not runs:
                return [], []
            of_runs = {"ids": t.ids(sorted(run_id for run_id, _ in runs))}
            owned_by = BulkSQL.ids(t.dialect, "", "run_id")
            steps: list[tuple] = []
            while True:   # CANCEL_ROWS steps a statement, until none is left queued or running
                chunk = t.all(SQL.steps_cancelled.replace("{runs}", owned_by), {**of_runs, "limit": CANCEL_ROWS})
                steps += chunk
                if len(chunk) < CANCEL_ROWS:
                    break
            # (after the steps: a hand-back that queued a branch for the advancer meanwhile is seen)
            t.run(SQL.branches_cancelled.replace("{runs}", owned_by), of_runs)
            told = [step_id for step_id, status, *_ in steps if status == "cancelling"]
            for pipeline in sorted({pipeline for _, status, pipeline, *_ in steps if status == "cancelling"}):
                t.notify(CH_CANCEL, pipeline)
            # (a queued step with a key may be one an unblock queued: its turn goes to the next one blocked; the
            # blocked ones cancelled too are not told apart, so at most a cap's worth per key: one too many costs
            # a claim)
            turns = collections.Counter((pipeline, name, key) for _, status, pipeline, name, key in steps
                                        if status == "cancelled" and key is not None)
            self.free_slots(t, [item for item, n in turns.items()
                                for _ in range(min(n, self.caps.cap(item[0], item[1]) or 1))])
            self.unblock_freed(t)
        return [run_id for run_id, _ in runs], told

    @staticmethod
    def _lock_runs(t: Tx, run_ids: Iterable[int]) -> None:
        """Postgres: hold these runs' locks exclusively (a cancel, a revive: see SQL.lock_runs)."""
        t.all(SQL.lock_runs, {"class": SQL.RUN_LOCK_CLASS, "ids": BulkSQL.id_list(t.dialect, run_lock_order(run_ids))})

    def _await_acknowledgements(self, told: list[int]) -> None:
        """Wait until the holders of these claimed steps of cancelled runs answered (Runtime.look_for_cancels),
        CANCEL_ACK_TIMEOUT at most; then take the claims nobody answered for from their holders."""
        deadline, pause, waiting = time.monotonic() + CANCEL_ACK_TIMEOUT, 0.005, threading.Event()
        while told:
            with self._tx(write=False) as t:
                told = [row[0] for row in t.all(SQL.unacknowledged.replace("{ids}", BulkSQL.ids(t.dialect, "")),
                                                {"ids": t.ids(told)})]
            if not told or time.monotonic() >= deadline:
                break
            waiting.wait(pause)
            pause = min(pause * 2, 0.05)
        if told:
            with self._tx() as t:
                self.share_runs_of_steps(t, "{ids}", {"ids": t.ids(told)})
                revoked = self.unclaim_cancelled(t, "revoked", {"ids": t.ids(told)})
                self.unblock_freed(t)
            if revoked:
                log.warning("%d claimed step(s) of cancelled runs were not acknowledged by their holders within "
                            "%gs (a process frozen or cut off): their claims were taken; whatever they return is "
                            "discarded", len(revoked), CANCEL_ACK_TIMEOUT)

    # -- revive ---------------------------------------------------------------------------
    def revive(self, run_id: int) -> bool:
        """halted or cancelled -> in_progress: re-run only what did not complete (failed and cancelled steps,
        with fresh budgets), keep completed work."""
        with self._tx() as t:
            if t.dialect == "postgres":   # a step of it let go meanwhile is let go wholly before or after this
                self._lock_runs(t, [run_id])
            if t.run(SQL.run_reopened, {"id": run_id}) != 1:   # (migration 8's trigger tallies it)
                return False
            for branch_id, parent_id in t.all(SQL.halted_leaves, {"run_id": run_id}):
                self._reopen_leaf(t, branch_id)
                self._reopen_ancestors(t, parent_id)
            t.run(SQL.steps_uncancelled, {"run_id": run_id})
            for (branch_id,) in t.all(SQL.cancelled_branches, {"run_id": run_id}):
                self._reopen_leaf(t, branch_id)   # (its step failed meanwhile: it runs again, as a halted one's)
            pipeline = RunRow.from_row(t.one(SQL.select_run, {"id": run_id})).pipeline
            t.notify(CH_JOBS, pipeline)
            t.notify(CH_ADVANCE, pipeline)
        return True

    @staticmethod
    def _reopen_leaf(t: Tx, branch_id: int) -> None:
        """A halted branch: its failed step runs again, or it is advanced again."""
        row = t.one(SQL.current_step, {"branch_id": branch_id})
        step = StepState.from_row(row) if row else None
        if step is not None and step.status == "failed":
            t.run(SQL.requeue_step, {"id": step.step_id})
            t.run(SQL.reopen_leaf, {"status": "running", "id": branch_id})
        else:
            t.run(SQL.reopen_leaf, {"status": "advance", "id": branch_id})

    @staticmethod
    def _reopen_ancestors(t: Tx, parent_id: int | None) -> None:
        """Un-finish the ancestors this halt had finished: each waits for its child again."""
        while parent_id is not None:
            status, grandparent = t.one(SQL.branch_parent, {"id": parent_id})
            t.run(SQL.reopen_parent, {"id": parent_id})
            parent_id = grandparent if status == "halted" else None

    # -- context --------------------------------------------------------------------------
    def context_set(self, run_id: int, key: str, value: Any, overwrite: bool) -> None:
        """Set a run's context key (write-once unless ``overwrite``)."""
        text = _dumps(value)
        params = {"run_id": run_id, "key": key, "value": text}
        with self.store.tx() as t:
            if t.one(SQL.run_kept, {"run_id": run_id}) is None:   # pruned (or never there): no orphan rows
                raise DuctworkError(f"run {run_id} not found")
            if overwrite:
                t.run(SQL.context_upsert, params)
            elif t.run(SQL.context_insert, params) != 1:
                current = t.one(SQL.context_get, params)[0]
                # the same value again (a re-run) is fine: both sides compared as stored (after JSON a
                # tuple is a list and a dict's keys are strings)
                if json.loads(current) != json.loads(text):
                    raise ContextError(f"context key {key!r} of run {run_id} is already set; "
                                       "pass overwrite=True to replace it")

    def context_get(self, run_id: int, key: str, default: Any = None) -> Any:
        """A run's context key, or ``default``."""
        with self.store.tx(write=False) as t:
            row = t.one(SQL.context_get, {"run_id": run_id, "key": key})
        return default if row is None else json.loads(row[0])

    def context_all(self, run_id: int) -> dict:
        """A run's whole context."""
        with self.store.tx(write=False) as t:
            return {k: json.loads(v) for k, v in t.all(SQL.context_all, {"run_id": run_id})}


# =====================================================================================
# app API: Run, contexts, configure(), trigger(), run_inline(), lifecycle hooks
# =====================================================================================


class RunContext:
    """The run-wide key/value store: keys are write-once unless ``overwrite=True``."""

    def __init__(self, engine: Engine, run_id: int):
        self._engine, self.run_id = engine, run_id

    def set(self, key: str, value: Any, overwrite: bool = False) -> None:
        """Set ``key`` (write-once unless ``overwrite``; the same value again is fine)."""
        self._engine.context_set(self.run_id, key, value, overwrite)

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, or ``default``."""
        return self._engine.context_get(self.run_id, key, default)

    def to_dict(self) -> dict:
        """Every key of the run's context."""
        return self._engine.context_all(self.run_id)


@record
class StepContext:
    """What a running step sees (also ``ductwork.current_step()`` for function steps)."""
    context: RunContext
    run_id: int
    step_id: int
    attempt: int
    idempotency_key: str
    pipeline: str
    step: str
    claim: Any = dataclasses.field(default=None, repr=False)   # the JobClaim it runs under

    @property
    def should_stop(self) -> bool:
        """True once the step should stop early: its run was cancelled, or its deadline passed."""
        return bool(self.claim is not None and self.claim.should_stop)

    @property
    def deadline(self) -> float | None:
        """When this attempt times out (epoch seconds), None without a timeout."""
        return None if self.claim is None else self.claim.deadline


# The step running here: a context variable, so that a thread's step and each task of the async lane's event loop
# see their own (asyncio copies the context into every task).
_CURRENT: contextvars.ContextVar[StepContext | None] = contextvars.ContextVar("ductwork_step", default=None)


def current_step() -> StepContext:
    """The step running in this thread or task (for plain-function steps)."""
    found = _CURRENT.get()
    if found is None:
        raise DuctworkError("current_step() called outside a running step")
    return found


class Run:
    """A pipeline run. ``Run.get(id)``, ``Run.list(...)``, ``refresh()``, ``wait()``, ``revive()``."""

    def __init__(self, run_id: int, engine: Engine | None = None):
        self.id = int(run_id)
        self._engine = engine
        self.pipeline = ""
        self.status = ""
        self.input: Any = None
        self.output: Any = None
        self.halt_reasons: list[str] = []
        self.cancel_reason: str | None = None
        self.scheduled_at: float | None = None   # a delayed run: when it starts (or started), epoch seconds
        self.new: bool | None = None   # from trigger(): True when it started this run, False when its key found one
        self.priority = 0              # trigger(priority=): its steps are claimed before those of higher numbers
        self.created_at = 0.0
        self.finished_at: float | None = None

    @property
    def engine(self) -> Engine:
        """The engine this run reads through (the app's, unless given)."""
        return self._engine or _app_engine()

    @classmethod
    def get(cls, run_id: int) -> "Run":
        """The run with this id, through the app's configuration."""
        return cls.load(run_id, _app_engine())

    @classmethod
    def load(cls, run_id: int, engine: Engine) -> "Run":
        """The run with this id, through ``engine``."""
        return cls(run_id, engine).refresh()

    LIST_LIMIT = 10_000   # the most runs one Run.list() returns

    @classmethod
    def list(cls, pipeline: str | None = None, status: str | None = None, limit: int = 100) -> "list[Run]":
        """Runs newest first (by id), of ``pipeline`` and/or ``status`` when given, at most ``limit``."""
        if status is not None and status not in RUN_STATUSES:
            raise DuctworkError(f"unknown run status {status!r} (one of {', '.join(RUN_STATUSES)})")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= cls.LIST_LIMIT:
            raise DuctworkError(f"limit must be a whole number from 1 to {cls.LIST_LIMIT}, got {limit!r}")
        engine = _app_engine()
        given = {name: value for name, value in (("pipeline", pipeline), ("status", status)) if value is not None}
        where = "".join(f" AND {name} = :{name}" for name in given)   # names from code only
        with engine.store.tx(write=False) as t:
            rows = t.all(SQL.list_runs.replace("{where}", where), {**given, "limit": limit})
        return [cls(row[0], engine)._fill(RunRow.from_row(row)) for row in rows]

    def refresh(self) -> "Run":
        """Read the run's row again (DuctworkError "run N not found" when there is none, or no more)."""
        with self.engine.store.tx(write=False) as t:
            row = t.one(SQL.select_run, {"id": self.id})
        if row is None:
            raise DuctworkError(f"run {self.id} not found")
        return self._fill(RunRow.from_row(row))

    def _fill(self, r: RunRow) -> "Run":
        """Take the values of a run row."""
        self.pipeline, self.status = r.pipeline, r.status
        self.created_at, self.finished_at = r.created_at, r.finished_at
        self.input, self.output, self.halt_reasons = _loads(r.input), _loads(r.output), _loads(r.halt_reasons)
        self.cancel_reason, self.scheduled_at, self.priority = r.cancel_reason, r.scheduled_at, r.priority
        return self

    def wait(self, timeout: float | None = None, poll: float = 0.02) -> str:
        """Poll until the run is finished: completed, halted or cancelled (or ``timeout`` passes); returns the
        status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = threading.Event()
        while self.refresh().status == "in_progress":
            if deadline is not None and time.monotonic() >= deadline:
                break
            pause.wait(poll)
            poll = min(poll * 1.5, 0.25)
        return self.status

    @property
    def steps(self) -> list[StepRecord]:
        """Every step of the run, in the order they were queued."""
        with self.engine.store.tx(write=False) as t:
            rows = t.all(SQL.select_steps, {"run_id": self.id})
        records = [StepRecord.from_row(row) for row in rows]
        for r in records:
            r.input, r.output = _loads_for_display(r.input), _loads_for_display(r.output)
        return records

    @property
    def context(self) -> dict:
        """The run's context, as a dict."""
        return self.engine.context_all(self.id)

    def revive(self) -> bool:
        """Re-run what did not complete of a halted or cancelled run (its failed and cancelled steps); returns
        False when it was neither."""
        revived = self.engine.revive(self.id)
        self.refresh()
        return revived

    def cancel(self, reason: str | None = None) -> bool:
        """Cancel the run: no step of it starts once this returns, steps running see ``should_stop`` and what they
        return is discarded. False when it had already finished (or does not exist)."""
        _check_reason(reason)
        cancelled = bool(self.engine.cancel([self.id], reason=reason))
        with contextlib.suppress(DuctworkError):
            self.refresh()
        return cancelled

    def signal(self, name: str, payload: Any = None) -> bool:
        """Send the run the signal ``name`` with a JSON ``payload``: a branch waiting for it (wait_for) goes on with
        the payload, and one that reaches its wait_for later finds it. True when it was kept: False when the run
        is not in progress (or unknown) or a signal of that name came first (the first one wins)."""
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_SIGNAL_NAME:
            raise DuctworkError(f"a signal name must be a non-empty string of at most {MAX_SIGNAL_NAME} characters, "
                                f"got {name!r}")
        try:
            payload_json = _dumps(payload)
        except (TypeError, ValueError) as exc:
            raise DuctworkError(f"a signal payload must be JSON: {exc}") from None
        return self.engine.signal(self.id, name, payload_json)

    def __repr__(self) -> str:
        return f"<Run {self.id} {self.pipeline} {self.status}>"


# -- module-level app state: configure(), the engine app code uses -------------------------
class _AppState:
    """What app code's module-level calls share: the configuration, the engine, migrated URLs."""

    def __init__(self) -> None:
        self.config: Config | None = None
        self.engine: Engine | None = None
        self.migrated: set[str] = set()
        self.lock = threading.Lock()


_APP = _AppState()


def configure(database_url: str | None = None, config: str | dict | None = None, **overrides: Any) -> Config:
    """Set the configuration app code uses: a config file path or a dict, plus overrides."""
    if database_url is not None:
        overrides["database_url"] = database_url
    path, data = (config, None) if isinstance(config, str) else (None, config)
    cfg = load_config(path, overrides=overrides, data=data)
    with _APP.lock:
        old = _APP.engine
        _APP.config, _APP.engine = cfg, None
    if old is not None:
        old.store.close()
    return cfg


def _app_engine() -> Engine:
    """The engine app code uses (configured on first use; migrated once per URL)."""
    with _APP.lock:
        if _APP.config is None:
            _APP.config = load_config()
        if _APP.engine is None:
            url = _APP.config.data["database_url"]
            serving = _SERVING_STORE.get(os.getpid())
            # a step that triggers runs uses the pool of the process it runs in: no second pool per process
            store = serving if serving is not None and serving.url == url else Store(
                url, pool_size=_APP.config.data["pool_size"])
            _APP.engine = Engine(store, _APP.config)
        engine = _APP.engine
    if engine.store.url not in _APP.migrated:
        ensure_schema(engine.store)
        _APP.migrated.add(engine.store.url)
    return engine


def ensure_schema(store: Store) -> None:
    """Migrate when the schema is missing or older than this version."""
    if not schema_is_current(store):
        migrate_store(store)


def migrate(database_url: str | None = None) -> list[int]:
    """Create or upgrade the schema (idempotent)."""
    store = Store(database_url) if database_url else _app_engine().store
    return migrate_store(store)


def trigger(name: str, *args: Any, delay: float | None = None, at: Any = None, key: str | None = None,
            priority: int = 0, connection: Any = None) -> Run:
    """Start a run of the pipeline ``name`` with these arguments for its start step; ``delay`` (seconds) or
    ``at`` (an aware datetime, or epoch seconds): not before then (the database's clock); ``key``: if the
    pipeline has a run with that key (any status, until pruned), that run instead of a new one; ``priority``:
    lower runs first (default 0, negatives allowed; every step of the run has it), in start order within one.
    ``connection``: the caller's own DB-API connection (sqlite3, pg8000, psycopg 3, psycopg2) to the configured
    database: the run is written inside its open transaction and exists only if that transaction commits."""
    delay, start = trigger_start(delay, at)
    check_trigger_key(key)
    check_priority(priority)
    engine = _app_engine()
    if connection is not None:
        new, row = engine.trigger_on(connection, name, args, delay, start, key, priority)
        run = Run(row.id, engine)._fill(row)
    else:
        run_id, new = engine.trigger_run(name, args, delay, start, key, priority)
        run = Run(run_id, engine).refresh()
    run.new = new
    return run


MAX_TRIGGER_KEY = 500   # characters of a trigger key (it is indexed with its pipeline)


def check_trigger_key(key: Any) -> None:
    """A trigger key: None, or a non-empty string of at most MAX_TRIGGER_KEY characters (DuctworkError)."""
    if key is not None and (not isinstance(key, str) or not key or len(key) > MAX_TRIGGER_KEY):
        raise DuctworkError(f"a trigger key must be a non-empty string of at most {MAX_TRIGGER_KEY} characters, "
                            f"got {key!r}")


def check_priority(priority: Any) -> None:
    """A run's priority: a whole number in PRIORITY_RANGE (DuctworkError)."""
    low, high = PRIORITY_RANGE
    if isinstance(priority, bool) or not isinstance(priority, int) or not low <= priority <= high:
        raise DuctworkError(f"a priority must be a whole number from {low} to {high}, got {priority!r}")


def run_inline(pipeline: "type[Pipeline] | Run", *args: Any, steps: dict[str, Any] | None = None) -> Run:
    """Run a pipeline to its end on this thread, without a supervisor (tests): trigger it with ``args`` and run its
    steps and advancements here, through the real engine and SQL, one at a time, on the configured database or,
    with none configured, a private temporary SQLite one. Retry delays, ``sleep`` and delays are skipped.
    ``steps={"StepName": replacement}`` runs a stand-in (a Step class, a function, any callable) in place of a
    step. Returns the run, refreshed: completed or halted, or in_progress when it waits for a signal that was not
    sent (``run.signal(...)``, then ``run_inline(run)`` goes on with it)."""
    if isinstance(pipeline, Run):
        if args:
            raise DuctworkError("run_inline(run) goes on with a run: it takes no arguments")
        cls, run_id = _inline_pipeline(pipeline.refresh().pipeline), pipeline.id
    else:
        cls, run_id = _inline_pipeline(pipeline), None
    replaced = _inline_replacements(cls, steps or {})
    engine = _app_engine_for_inline()
    _refuse_served(engine, cls.__name__)
    if run_id is None:
        run_id, _ = engine.trigger_run(cls.__name__, args)
    InlineRunner(engine.config, cls.__name__, replaced).drive(run_id)
    return Run(run_id, engine).refresh()


def _inline_pipeline(pipeline: Any) -> "type[Pipeline]":
    """The registered Pipeline class run_inline runs (a class, or the name of one: a Run's pipeline)."""
    if isinstance(pipeline, str):
        cls = _REGISTRY.get(pipeline)
        if cls is None:
            raise DuctworkError(f"run_inline: pipeline {pipeline} is not defined in this process")
        return cls
    if not (inspect.isclass(pipeline) and issubclass(pipeline, Pipeline) and pipeline is not Pipeline):
        raise DuctworkError(f"run_inline needs a Pipeline subclass (or a Run), got {pipeline!r}")
    if _REGISTRY.get(pipeline.__name__) is not pipeline:
        raise DuctworkError(f"run_inline: pipeline {pipeline.__name__} is not the registered class of that name")
    return pipeline


def _refuse_served(engine: Engine, pipeline: str) -> None:
    """run_inline's run would be claimed by the live workers of its pipeline too (running its real steps, not the
    stand-ins): refused when a live process on this database serves it (DuctworkError)."""
    stale = float(engine.config.get("supervisor.reaper_timeout"))
    with engine.store.tx(write=False) as t:
        serving = [row for row in t.all(SQL.live_workers, {"stale": stale})
                   if pipeline in (row[0] or "").split(",")]
    if serving:
        raise DuctworkError(f"run_inline: {len(serving)} live process(es) on this database serve pipeline {pipeline} "
                            "and would run its steps too; use a database of the test's own, or stop them")


def _inline_replacements(cls: "type[Pipeline]", steps: Any) -> dict[str, Any]:
    """run_inline's ``steps=``, checked: names of the pipeline's steps, each to a callable."""
    if not isinstance(steps, dict):
        raise DuctworkError(f"run_inline: steps= must be a dict of step name to replacement, got {steps!r}")
    for name, replacement in steps.items():
        if name not in cls.steps:
            raise DuctworkError(f"run_inline: pipeline {cls.__name__} has no step {name!r} "
                                f"(its steps: {', '.join(sorted(cls.steps))})")
        if not callable(replacement):
            raise DuctworkError(f"run_inline: the replacement of step {name} is not callable: {replacement!r}")
    return dict(steps)


def _app_engine_for_inline() -> Engine:
    """The app's engine, configured (configure(), a config file, DUCTWORK_DATABASE_URL / DATABASE_URL) or else,
    once per process, on a private temporary SQLite database (removed at exit)."""
    with _APP.lock:
        configured = _APP.config is not None
    if not configured:
        config = load_config()
        if config.path is None and config.data["database_url"] == DEFAULT_DATABASE_URL:
            import atexit
            import shutil
            import tempfile
            folder = tempfile.mkdtemp(prefix="ductwork-inline-")
            atexit.register(shutil.rmtree, folder, True)
            configure(database_url=f"sqlite:///{folder}/ductwork.sqlite3")
    return _app_engine()


def trigger_start(delay: Any, at: Any) -> tuple[float | None, float | None]:
    """The checked (delay, at) of a trigger: seconds from now, or epoch seconds (DuctworkError when wrong)."""
    import datetime
    if delay is not None and at is not None:
        raise DuctworkError("give a trigger delay or at, not both")
    if delay is not None:
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not 0 <= delay <= MAX_DURATION:
            raise DuctworkError(f"a trigger delay must be seconds from 0 to {MAX_DURATION}, got {delay!r}")
        return float(delay), None
    if isinstance(at, datetime.datetime):
        if at.tzinfo is None or at.utcoffset() is None:
            raise DuctworkError(f"a trigger time must be timezone-aware, got {at.isoformat()} (no timezone)")
        return None, at.timestamp()
    if at is not None:
        if isinstance(at, bool) or not isinstance(at, (int, float)) or not 0 <= at < 2 ** 40:
            raise DuctworkError(f"a trigger time must be an aware datetime or epoch seconds, got {at!r}")
        return None, float(at)
    return None, None


def _check_reason(reason: Any) -> None:
    if reason is not None and not isinstance(reason, str):
        raise DuctworkError(f"a cancel reason must be a string, got {type(reason).__name__}")


def cancel(*run_ids: int, pipeline: str | None = None, older_than: float | None = None,
           reason: str | None = None) -> int:
    """Cancel runs in progress, in set-based batches: these ``run_ids``, or (with none) every run of ``pipeline``
    and/or older than ``older_than`` seconds (both filters also narrow given ids). Returns how many were
    cancelled; returns once no step of theirs can start any more."""
    if any(isinstance(i, bool) or not isinstance(i, int) for i in run_ids):
        raise DuctworkError(f"run ids must be integers, got {', '.join(repr(i) for i in run_ids)}")
    if older_than is not None and (isinstance(older_than, bool) or not isinstance(older_than, (int, float))
                                   or not 0 <= older_than <= MAX_DURATION):
        raise DuctworkError(f"older_than must be seconds >= 0, got {older_than!r}")
    if pipeline is not None and not isinstance(pipeline, str):
        raise DuctworkError(f"pipeline must be a pipeline name, got {pipeline!r}")
    _check_reason(reason)
    return len(_app_engine().cancel(run_ids, pipeline, older_than, reason))


_HOOKS: dict[str, list[Callable[[], Any]]] = {k: [] for k in (
    "supervisor_start", "supervisor_stop", "advancer_start", "advancer_stop", "worker_start", "worker_stop")}


def _hook_registrar(kind: str) -> Callable[[Callable], Callable]:
    def register(fn: Callable[[], Any]) -> Callable[[], Any]:
        if not callable(fn):
            raise TypeError(f"on_{kind} needs a callable")
        _HOOKS[kind].append(fn)
        return fn
    register.__name__ = f"on_{kind}"
    register.__doc__ = f"Register a hook run at {kind.replace('_', ' ')} (decorator or call)."
    return register


on_supervisor_start = _hook_registrar("supervisor_start")
on_supervisor_stop = _hook_registrar("supervisor_stop")
on_advancer_start = _hook_registrar("advancer_start")
on_advancer_stop = _hook_registrar("advancer_stop")
on_worker_start = _hook_registrar("worker_start")
on_worker_stop = _hook_registrar("worker_stop")


def run_hooks(kind: str) -> None:
    """Start hooks: the first that raises fails the boot. Stop hooks: log and go on."""
    for fn in _HOOKS[kind]:
        try:
            fn()
        except Exception as exc:
            name = getattr(fn, "__name__", repr(fn))
            if kind.endswith("_start"):
                raise HookFailed(f"on_{kind} hook {name} raised {type(exc).__name__}: {exc}") from exc
            log.exception("on_%s hook %s raised; shutdown goes on", kind, name)


# =====================================================================================
# wake-ups: hints that end an idle wait early, inside a process and across SQLite processes
# =====================================================================================
# Postgres carries them as NOTIFY (Runtime.listen_loop); polling is always the fallback.


def private_folder(path: str, create: bool = False, tighten: bool = False) -> bool:
    """Is ``path`` a real directory (not a symlink) of this user that nobody else may read or write?
    ``create``: make it (mode 0700) when missing; ``tighten``: one of ours with looser permissions
    (made by an older version) is set to 0700. The wake-up sockets and the local heartbeat files
    live only in such folders."""
    import stat
    if create:
        with contextlib.suppress(OSError):
            os.mkdir(path, 0o700)
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        return False
    if st.st_mode & 0o077 and tighten:
        with contextlib.suppress(OSError):   # a directory, not a symlink (lstat): in the sticky temp dir it stays so
            os.chmod(path, 0o700)
            st = os.lstat(path)
    return stat.S_ISDIR(st.st_mode) and not st.st_mode & 0o077


class Wakeups:
    """Wake-up hints inside one process: one idle thread per hint (no thundering herd).

    A thread whose claim came back full (there is likely more) wakes every idle sibling, so a
    burst reaches all threads at once. A hint that finds nobody idle is kept, so a thread
    about to wait does not miss it. ``all()`` wakes everybody (shutdown)."""

    def __init__(self) -> None:
        """Nobody waits yet, no hint pending."""
        self.lock = threading.Lock()
        self.everyone: list[threading.Event] = []                         # every thread's event (all())
        self.idle: dict[tuple[str, str], list[threading.Event]] = {}      # (channel, pipeline) -> waiting threads
        self.pending: set[tuple[str, str]] = set()                        # hints that found nobody idle
        self.looked: dict[tuple[str, str], float] = {}                    # when a thread last left wait() to claim

    def event(self) -> threading.Event:
        """A new thread's own event: it waits on it in wait(); all() sets it."""
        ev = threading.Event()
        with self.lock:
            self.everyone.append(ev)
        return ev

    def wait(self, channel: str, pipeline: str, ev: threading.Event, timeout: float) -> None:
        """Idle until a hint for this channel and pipeline, all(), or the poll (at once when a hint is pending).

        The poll is the fallback for lost hints, and one look a ``timeout`` per channel and pipeline
        is enough for the whole process: a thread whose wait times out while a sibling looked less
        than ``timeout`` ago waits on, until that look is a ``timeout`` old. Idle, five threads of a
        pipeline ask the database once a polling_timeout, not five times (and take no connection
        of the pool from a thread that has work)."""
        key = (channel, pipeline)
        with self.lock:
            if key in self.pending:
                self.pending.discard(key)
                return
            self.idle.setdefault(key, []).append(ev)
        deadline = time.monotonic() + timeout
        while not ev.wait(max(0.0, deadline - time.monotonic())):
            with self.lock:
                looked = self.looked.get(key, 0.0)
                if time.monotonic() - looked >= timeout:
                    break
            deadline = looked + timeout
        with self.lock:
            with contextlib.suppress(ValueError):
                self.idle.get(key, []).remove(ev)
            self.looked[key] = time.monotonic()   # this thread looks now (claims)
        ev.clear()

    def notify(self, channel: str, pipeline: str, every_idle: bool = False) -> None:
        """Wake one idle thread (``every_idle``: all of them) of this channel and pipeline."""
        key = (channel, pipeline)
        with self.lock:
            waiting = self.idle.get(key)
            if not waiting:
                self.pending.add(key)
                return
            for ev in waiting[:] if every_idle else waiting[:1]:
                waiting.remove(ev)
                ev.set()

    def all(self) -> None:
        """Wake every thread, idle or not (shutdown, or hints missed while Postgres reconnected)."""
        with self.lock:
            for ev in self.everyone:
                ev.set()


class LocalWakeups:
    """NOTIFY for SQLite: every process of a SQLite database runs on one machine, so a commit
    with wake-up hints sends them as datagrams to the Unix sockets that the database's worker
    and advancer processes listen on (one folder of sockets per database file, private to the
    user: $XDG_RUNTIME_DIR, else the temp dir). A hint only shortens an idle wait; polling
    stays the fallback, so a lost datagram (a full socket buffer, a process that just died)
    costs nothing but time, and a folder we cannot trust means polling only."""

    _serial = iter(range(1 << 62))   # socket names: pid-serial (short: sun_path holds ~100 bytes)

    @staticmethod
    @functools.cache
    def folder(db_path: str) -> str:
        """The socket folder of this database file for this user."""
        import hashlib
        import tempfile
        base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
        digest = hashlib.sha1(os.path.realpath(db_path).encode()).hexdigest()[:12]
        return os.path.join(base, f"ductwork-wake-{os.getuid()}-{digest}")

    @staticmethod
    def _trusted(folder: str) -> bool:
        """A private folder (see private_folder): another local user could otherwise read pipeline
        names, or silence and redirect the hints."""
        return private_folder(folder)

    @classmethod
    def listen(cls, db_path: str) -> Any:
        """A bound datagram socket of this process; None where that is impossible (no Unix
        sockets, a folder we cannot create or trust): the process then only polls."""
        import socket
        if not hasattr(socket, "AF_UNIX"):
            return None
        folder = cls.folder(db_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            for attempt in range(3):  # the last process of another generation may remove the folder meanwhile
                with contextlib.suppress(FileExistsError):
                    os.mkdir(folder, 0o700)
                if not cls._trusted(folder):
                    raise OSError(f"{folder} is not a private directory of this user")
                try:
                    sock.bind(os.path.join(folder, f"{os.getpid()}-{next(cls._serial)}.sock"))
                    break
                except FileNotFoundError:
                    if attempt == 2:
                        raise
        except OSError as exc:
            sock.close()
            log.warning("no cross-process wake-ups for SQLite (%s): idle threads poll", exc)
            return None
        sock.settimeout(1.0)
        return sock

    @classmethod
    def send(cls, db_path: str, hints: list[tuple[str, str]], skip_own: bool) -> None:
        """Send the hints to every listening process (``skip_own``: not to this one's sockets,
        when this process already got them in-process)."""
        import socket
        import stat
        folder = cls.folder(db_path)
        if not hasattr(socket, "AF_UNIX") or not cls._trusted(folder):
            return  # nobody listens yet, or the folder is not ours
        own = f"{os.getpid()}-"
        messages = [f"{channel}\n{payload}".encode() for channel, payload in hints]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            for name in os.listdir(folder):
                if (skip_own and name.startswith(own)) or not name.endswith(".sock"):
                    continue
                path = os.path.join(folder, name)
                for message in messages:
                    try:
                        sock.sendto(message, path)
                    except (ConnectionRefusedError, FileNotFoundError):
                        with contextlib.suppress(OSError):
                            if stat.S_ISSOCK(os.lstat(path).st_mode):
                                os.unlink(path)   # its process is gone
                        break
                    except OSError:
                        break                     # a full buffer: that process is busy anyway

    @staticmethod
    def receive(sock: Any) -> tuple[str, str] | None:
        """The next hint, or None after a second without one (or once the socket is closed)."""
        try:
            channel, _, payload = sock.recv(4096).decode().partition("\n")
        except (OSError, UnicodeDecodeError):  # OSError includes the timeout
            return None
        return channel, payload

    @staticmethod
    def close(sock: Any) -> None:
        """Close and remove this process's socket (and the folder, when it was the last one)."""
        with contextlib.suppress(OSError):
            path = sock.getsockname()
            os.unlink(path)
            os.rmdir(os.path.dirname(path))
        sock.close()


# =====================================================================================
# runners: job worker and advancer threads, heartbeats and reaping, one process runtime
# =====================================================================================

# The threads a drain does not wait for: they run until the process is dead, serving the others (the look for
# cancelled steps too: a step may be cancelled while the process drains).
SERVICE_THREADS = ("heartbeat.0", "listener.0", "cancels.0", "timekeeper.0")
ABANDONED: Any = object()   # run_step's answer when its step overran its deadline and the timekeeper failed it
MAX_BATCH = 16          # most steps a worker thread claims at once (only while steps are quick)
QUICK_STEP = 0.005      # a step faster than this lets the batch grow
QUICK_COMMIT = 0.02     # a finished result waits at most this long for its batch before committing


@record(frozen=True)
class RoleSpec:
    """One kind of ductwork process, named in each vocabulary, and what it runs."""
    mode: str                      # what runs: Supervisor, or Runtime(role=mode): combined | advancer | worker
    config_roles: tuple[str, ...]  # the ``role:`` / --role values that start it (supervisor is an alias of all)
    forks: bool                    # forks children (only under ``forking: default``) instead of running threads
    row_role: str                  # its process row's role: log lines, local heartbeat files, the health check
    hook_kinds: tuple[str, ...]    # its lifecycle hooks in start order (stop hooks run in reverse)
    workers: bool                  # runs job worker threads
    advancers: bool                # runs advancer threads (and halts runs of pipelines that nobody serves)
    shutdown_timeout: str          # the config key of its drain budget


ROLE_SPECS = (
    # role all, forking default: forks the advancer and one job worker per pipeline and keeps them alive
    RoleSpec(mode="supervisor", config_roles=("all", "supervisor"), forks=True, row_role="supervisor",
             hook_kinds=("supervisor",), workers=False, advancers=False,
             shutdown_timeout="supervisor.shutdown_timeout"),
    # role all, forking none: the supervisor's children as threads of one process
    RoleSpec(mode="combined", config_roles=("all", "supervisor"), forks=False, row_role="supervisor",
             hook_kinds=("supervisor", "advancer", "worker"), workers=True, advancers=True,
             shutdown_timeout="job_worker.shutdown_timeout"),
    RoleSpec(mode="advancer", config_roles=("advancer",), forks=False, row_role="advancer",
             hook_kinds=("advancer",), workers=False, advancers=True,
             shutdown_timeout="pipeline_advancer.shutdown_timeout"),
    RoleSpec(mode="worker", config_roles=("worker",), forks=False, row_role="worker",
             hook_kinds=("worker",), workers=True, advancers=False,
             shutdown_timeout="job_worker.shutdown_timeout"),
)
ROLE_MODES = {spec.mode: spec for spec in ROLE_SPECS}


def role_spec(role: str, forking: str = "default") -> RoleSpec:
    """What a ``role:`` value starts: ``all`` is the supervisor, or under ``forking: none`` one combined runtime."""
    for spec in ROLE_SPECS:
        if role in spec.config_roles and not (spec.forks and forking != "default"):
            return spec
    raise KeyError(role)


# The child -> supervisor pipe: one line per message, a kind, then a space and its text if it has one.
PIPE_READY = "R"   # booted, its process row id follows: from here on a death is a crash, not a failed boot
PIPE_ERROR = "E"   # the boot failed, the (masked) error follows; the child exits next
PIPE_ALIVE = "."   # a tick of its control loop, or of a wait for the database: no line for hang_timeout is a hang
PIPE_RECYCLE = "C"   # it drains to be recycled (why follows): start its replacement now; its exit is no crash


def pipe_encode(kind: str, text: str = "") -> bytes:
    """One pipe message as a line (of a text, its first line only: the supervisor reads line by line)."""
    line = f"{kind} {text}" if text else kind
    return line.partition("\n")[0].encode() + b"\n"


def pipe_decode(line: bytes) -> tuple[str, str]:
    """A pipe line as (kind, text)."""
    kind, _, text = line.decode(errors="replace").partition(" ")
    return kind, text


def machine_identifier() -> str:
    """DUCTWORK_MACHINE_ID, else the host name (unique per container/pod, unlike /etc/machine-id)."""
    return os.environ.get("DUCTWORK_MACHINE_ID") or os.uname().nodename


class Fault:
    """Test-only fault injection: ``DUCTWORK_FAULT=checkpoint:action[:arg][@Step],...``.

    Checkpoints: after_claim, before_commit (the step returned, nothing committed),
    after_branch_claim, after_advance, boot. Actions: kill (SIGKILL self), exit (os._exit 1),
    raise, die (raise _ThreadDeath, a BaseException nothing catches: the thread dies),
    sleep:SECONDS, stop (SIGSTOP self). With DUCTWORK_FAULT_ONCE=path each fault fires
    once across all processes (the first to create ``path.<checkpoint>`` wins)."""

    def __init__(self, spec: str | None = None, once: str | None = None):
        """Parse the fault spec (default: the environment's)."""
        spec = os.environ.get("DUCTWORK_FAULT", "") if spec is None else spec
        self.once = os.environ.get("DUCTWORK_FAULT_ONCE") if once is None else once
        self.points: dict[str, list[tuple[str, str, str | None]]] = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            item, _, step = item.partition("@")
            point, _, rest = item.partition(":")
            action, _, arg = rest.partition(":")
            self.points.setdefault(point, []).append((action or "raise", arg, step or None))

    def __call__(self, point: str, step: str | None = None) -> None:
        """Fire the faults configured for this checkpoint (and this step, if they name one)."""
        for action, arg, only in self.points.get(point, ()):
            if only and only != step:
                continue
            if self.once:
                try:
                    os.close(os.open(f"{self.once}.{point}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    continue
            log.warning("fault injected at %s: %s", point, action)
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif action == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            elif action == "exit":
                os._exit(int(arg or 1))
            elif action == "sleep":
                threading.Event().wait(float(arg or 1))
            elif action == "die":
                raise _ThreadDeath(f"fault injected at {point}: thread death")
            else:
                raise FaultInjected(f"fault injected at {point}")


class _ThreadDeath(BaseException):
    """Raised by the fault hook's ``die`` action (tests only): stands for a bug that kills a thread."""


# A forked copy of a serving Runtime (a step that called os.fork() without exec) must never run ductwork
# code: its signal handlers only fed the parent's queue (so the copy ignored TERM), and the step's own thread,
# the only one the copy has, must not return into the worker loop. _SERVING_PID is the pid of the process
# whose Runtime serves; a fork of it resets the signals, and Runtime.inert_if_forked ends the copy.
_SERVING_PID: dict[str, int | None] = {"pid": None}
# The Store of the Runtime that serves in this process (by pid): app code run by its steps uses it
_SERVING_STORE: dict[int, "Store"] = {}
# What one failed attempt stores of its exception (a 20 MB message is stored as 4 000 characters).
MAX_ERROR_MESSAGE, MAX_TRACEBACK = 4000, 8000
RUNTIME_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGTTIN, signal.SIGHUP)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)   # they also end a boot's wait for the database


def _after_fork_in_child() -> None:
    """os.register_at_fork hook: a child counts its own metrics (a fresh lock: another thread may have held the
    parent's); in a forked copy of a serving Runtime, Python's default signal handling."""
    METRICS.__init__()
    if _SERVING_PID["pid"] not in (None, os.getpid()):
        for sig in RUNTIME_SIGNALS:
            with contextlib.suppress(ValueError, OSError):
                signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)


os.register_at_fork(after_in_child=_after_fork_in_child)


def first_line(exc: BaseException) -> str:
    """An error for a one-line log message: its first line, passwords masked (its type if it has no text)."""
    return mask(_db_error_text(exc)).partition("\n")[0] or type(exc).__name__


def fatal_exit_code(exc: DuctworkError) -> int:
    """The exit code of a process ended by Store.fatal: 2 for a configuration error (a transaction pooler
    behind a URL without pgbouncer=true), 1 otherwise (a replaced SQLite file)."""
    return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_FAILURE


def _exception_text(exc: BaseException) -> str:
    """``str(exc)`` of any exception: its ``repr`` when ``__str__`` raises, then ``object.__repr__``."""
    for render in (str, repr, object.__repr__):
        try:
            return render(exc)
        except BaseException:  # noqa: B036, S112 - an exception's own rendering may raise anything
            continue
    return ""  # pragma: no cover - object.__repr__ does not raise


def _traceback_text(exc: BaseException) -> str:
    """The exception's traceback (at most 20 frames), its frames only when rendering the whole raises."""
    try:
        return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=20))
    except BaseException:  # noqa: B036 - e.g. a __str__ or __notes__ that raises
        try:
            return "Traceback (most recent call last):\n" + "".join(traceback.format_tb(exc.__traceback__, limit=20))
        except BaseException:  # noqa: B036
            return ""


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


def _step_output(c: JobClaim, result: Any) -> str:
    """A step's result as stored (StepOutputError when it is not JSON)."""
    try:
        return _dumps(result)
    except (TypeError, ValueError):
        raise StepOutputError(f"step {c.name} returned a non-JSON value of type {type(result).__name__}") from None


def _run_coroutine(coro: Any) -> Any:
    """An async step's coroutine run to its end here, on an event loop of its own (in a thread of its own when
    this thread runs a loop already: a test's)."""
    import asyncio
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}
    context = contextvars.copy_context()   # (current_step() there too)

    def run() -> None:
        try:
            box["value"] = context.run(asyncio.run, coro)
        except BaseException as exc:  # noqa: B036 - handed to the caller as the step's own error
            box["error"] = exc
    thread = threading.Thread(target=run, name="ductwork.inline-async", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def is_async_step(step: Any) -> bool:
    """An ``async def`` step: a function, or a Step class whose ``execute`` is one."""
    target = getattr(step, "execute", None) if inspect.isclass(step) else step
    return inspect.iscoroutinefunction(target)


def step_error_text(exc: BaseException) -> str:
    """What a failed attempt records: class name, message (see _exception_text) of at most
    MAX_ERROR_MESSAGE characters, the last MAX_TRACEBACK characters of the traceback; storable
    everywhere: no lone surrogates (UTF-8), no NUL (Postgres TEXT)."""
    message = clip(_exception_text(exc), MAX_ERROR_MESSAGE)
    text = f"{type(exc).__name__}: {message}\n{_traceback_text(exc)[-MAX_TRACEBACK:]}"
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


class Outage:
    """Logs a database outage once when it starts and once when it ends; gives the backoff; retries.

    An outage ends when calls have gone through for ``settle`` seconds with no failure: a
    partial one (a full disk, a read-only file: reads and empty claims go through, writes fail)
    is one outage, not a line a second. The backoff restarts at every call that goes through."""

    def __init__(self, settle: float = 0.0) -> None:
        """No outage yet; ``settle``: seconds without a failure that end one (the processes use two heartbeats:
        a heartbeat is a write, so a write has gone through by then)."""
        self.lock = threading.Lock()
        self.settle = settle
        self.down_since: float | None = None
        self.last_failure = 0.0
        self.failures = 0

    def failed(self, exc: BaseException) -> float:
        """Count a failed call (logging the outage's start); the pause before the next try."""
        with self.lock:
            self.failures += 1
            self.last_failure = time.monotonic()
            if self.down_since is None:
                self.down_since = self.last_failure
                log.warning("database unavailable, retrying with backoff: %s", first_line(exc))
            # capped at 2 s: a returning database is noticed within about 2 s, without a busy loop
            return backoff(self.failures + 1, 0.05, 2.0, jitter=0.2)

    def ok(self) -> None:
        """A call went through: log the outage's end, if there was one and it has settled."""
        if self.down_since is None:
            return
        with self.lock:
            self.failures = 0
            now = time.monotonic()
            if self.down_since is not None and now - self.last_failure >= self.settle:
                log.info("database reachable again after %.1fs", now - self.down_since)
                self.down_since = None

    def retry(self, fn: Callable[[], Any], *, forever: bool = True, give_up: threading.Event | None = None,
              waiting: Callable[[], None] | None = None,
              on_error: Callable[[Exception], None] | None = None) -> Any:
        """Run ``fn`` until the database answers; its result. An outage (DatabaseUnavailable, SQLite locked past
        its busy timeout) is logged once, then: not ``forever``, None at once; else ``waiting()`` and a backoff
        pause, DatabaseUnavailable if ``give_up`` gets set meanwhile. Other errors: raised, or to ``on_error``
        and None."""
        while True:
            try:
                result = fn()
                self.ok()
                return result
            except (DatabaseUnavailable, sqlite3.OperationalError) as exc:
                pause = self.failed(exc)
            except Exception as exc:
                if on_error is None:
                    raise
                on_error(exc)
                return None
            if not forever:
                return None
            if waiting is not None:
                waiting()
            if (give_up or threading.Event()).wait(pause):
                raise DatabaseUnavailable("gave up waiting for the database")


class SystemdNotifier:
    """sd_notify(3) without libsystemd, for ``Type=notify`` units: datagrams to ``$NOTIFY_SOCKET`` (a path, or
    ``@name`` in the abstract namespace) saying READY=1, STATUS=..., STOPPING=1, RELOADING=1, and WATCHDOG=1 at
    half of ``$WATCHDOG_USEC`` (when ``$WATCHDOG_PID`` is unset or names this process). Taking the variables out
    of the environment keeps the forked children from speaking for the service (``NotifyAccess=main``). Without
    ``NOTIFY_SOCKET`` every method does nothing; a send that fails is dropped (systemd is only told, never
    waited for)."""

    def __init__(self, environ: dict | None = None):
        env = os.environ if environ is None else environ
        # (given back to a recycled foreground process that re-executes itself: see reexecute)
        self.inherited = {key: env.pop(key) for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
                          if key in env}
        address = self.inherited.get("NOTIFY_SOCKET", "")
        usec, watchdog_pid = self.inherited.get("WATCHDOG_USEC", ""), self.inherited.get("WATCHDOG_PID", "")
        self.address = ("\0" + address[1:]) if address.startswith("@") else address
        self.watchdog: float | None = None   # seconds between WATCHDOG=1
        if self.address and usec.isdigit() and int(usec) > 0 and watchdog_pid in ("", str(os.getpid())):
            self.watchdog = int(usec) / 1e6 / 2
        self.next_ping = 0.0
        self.status_text = ""
        self.sock: Any = None

    def send(self, *fields: str) -> None:
        """One datagram of ``KEY=value`` lines."""
        if not self.address:
            return
        import socket
        try:
            if self.sock is None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self.sock.setblocking(False)
            self.sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            log.debug("systemd notify: %s", exc)

    def ready(self, status: str) -> None:
        self.status_text = status
        self.send("READY=1", f"STATUS={status}")

    def status(self, text: str) -> None:
        """A STATUS= line, sent when it changed."""
        if text != self.status_text:
            self.status_text = text
            self.send(f"STATUS={text}")

    def reloading(self, why: str = "restarting the children") -> None:
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}",
                  f"STATUS=reloading: {why}")

    def stopping(self, why: str) -> None:
        self.send("STOPPING=1", f"STATUS=stopping: {why}")

    def ping(self) -> None:
        """WATCHDOG=1 when due (the main loop calls this every turn)."""
        if self.watchdog is not None and time.monotonic() >= self.next_ping:
            self.next_ping = time.monotonic() + self.watchdog
            self.send("WATCHDOG=1")

    def until_ping(self) -> float:
        """Seconds until the next WATCHDOG=1 is due (the main loop sleeps no longer); infinity without one."""
        return float("inf") if self.watchdog is None else max(0.0, self.next_ping - time.monotonic())

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None


# -- recycling (SPEC §15) ----------------------------------------------------------------
# A worker process that leaks (memory, descriptors, threads left behind by steps past their timeout) is replaced
# before it hurts, as Celery's worker_max_tasks_per_child / worker_max_memory_per_child and gunicorn's
# max_requests do: job_worker.recycle. Once it started ``steps`` steps, once its resident memory passes
# ``memory_mb`` (looked at every tick of its main loop), or once more than ``abandoned_threads`` of its threads
# are stuck in steps past their deadline, it drains as on SIGTERM (stops claiming, gives its in-flight steps
# the drain budget) and a fresh process takes its place:
#   - a supervisor's child says so on its pipe as its drain begins (PIPE_RECYCLE); the supervisor starts the
#     replacement at once, beside it, and counts no restart, no failed boot, no backoff;
#   - a foreground role (and forking: none) re-executes itself once drained: same pid, same command line, same
#     environment (the systemd variables given back), so an orchestrator sees no restart. systemd is told
#     RELOADING=1, and READY=1 again by the new program.
# The thresholds are jittered per process (steps up to RECYCLE_JITTER more, memory up to RECYCLE_JITTER less)
# so that siblings started together do not all drain together. A memory limit the process already passes
# once booted would recycle it forever: it is switched off, with an error line.
RECYCLE_JITTER = 0.1
# Schedules (Runtime.schedule_loop): the longest wait between two looks, the shortest (past a tick, by the
# database clock), and the pause after a failed look.
SCHEDULE_LOOK, SCHEDULE_MIN_WAIT, SCHEDULE_RETRY = 60.0, 0.005, 1.0
RECYCLE_WAKE = 0   # not a signal: the item on a Runtime's signal queue that makes its main loop drain to recycle
RECYCLED_ENV = "DUCTWORK_RECYCLED"   # in a re-executed foreground process: how often it recycled itself


@record(frozen=True)
class RecyclePolicy:
    """When a worker process is recycled (job_worker.recycle, jittered for this process); None: never."""
    steps: int | None = None        # once it started this many steps
    memory: int | None = None       # once its resident memory passes this many bytes
    abandoned: int | None = None    # once more of its threads than this are stuck past a step's deadline

    @classmethod
    def of(cls, config: Config, rng: Any = None) -> "RecyclePolicy":
        """The configured policy, jittered by ``rng`` (a random.Random; by default a fresh one)."""
        import random
        rng = rng or random.Random()
        steps, mb, abandoned = (config.get(f"job_worker.recycle.{key}")
                                for key in ("steps", "memory_mb", "abandoned_threads"))
        return cls(steps=None if steps < 0 else steps + rng.randint(0, int(steps * RECYCLE_JITTER)),
                   memory=None if mb < 0 else int(mb * (1 - rng.random() * RECYCLE_JITTER) * 2 ** 20),
                   abandoned=None if abandoned < 0 else abandoned)


NEVER_RECYCLE = RecyclePolicy()   # an advancer's: it runs no steps


def resident_memory() -> int:
    """This process's resident set size in bytes (Linux: now, from /proc; elsewhere the peak, getrusage)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def recycled_count() -> int:
    """How often this foreground process re-executed itself to recycle (RECYCLED_ENV; 0 when not)."""
    text = os.environ.get(RECYCLED_ENV, "")
    return int(text) if text.isdigit() else 0


def reexecute(environment: dict[str, str]) -> int:
    """A recycled foreground process: run its own command line again in this process (same pid), the
    environment plus ``environment``. Returns only when the exec failed (EXIT_FAILURE: the orchestrator
    restarts it)."""
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, {**os.environ, **environment})
    except OSError as exc:
        log.error("could not re-execute %s to recycle: %s; exiting", " ".join(sys.orig_argv), exc)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, RUNTIME_SIGNALS)
    return EXIT_FAILURE


# -- async steps (SPEC §19) ------------------------------------------------------------------
# A worker process that works a pipeline with an ``async def`` step runs one event loop (AsyncLane) beside its
# worker threads. The threads claim as ever; a claimed async step is handed to the loop (run_step -> dispatch)
# and the thread goes on to its next claim, so up to job_worker.async_count async steps run at once whatever
# ``count`` is. The database is never touched on the loop (pg8000 is synchronous): a commit thread commits the
# results in batches through the worker's own commit (Runtime._commit_results). current_step() is a context
# variable, its own in every task. A cancel (should_stop) or a timeout cancels the task; the loop ticks every
# ASYNC_TICK, and a tick later than ASYNC_BLOCKED means a step blocks the loop (time.sleep, blocking I/O): the
# commit thread logs the step that does, found on the loop thread's stack.
INLINE_ROLE = "inline"   # run_inline's process row (it claims, but only its own run's rows)
ASYNC_TICK = 0.05      # seconds between the loop's ticks (and its look at cancels)
ASYNC_BLOCKED = 0.5    # a tick this late: the step running on the loop is blocking it


class AsyncLane:
    """One worker process's event loop for its async steps, and the thread that commits their results."""

    def __init__(self, runtime: "Runtime"):
        self.rt = runtime
        import asyncio  # (here: asyncio imports ssl, which a process with no async step never needs)
        self.asyncio = asyncio
        self.slots = threading.BoundedSemaphore(int(runtime.config.get("job_worker.async_count")))
        self.loop = asyncio.new_event_loop()
        self.results: "queue.SimpleQueue[StepResult]" = queue.SimpleQueue()
        self.tasks: dict[int, tuple[JobClaim, Any]] = {}   # step id -> its task (the loop's thread only)
        self.cancelled: set[int] = set()   # the steps whose task was told to stop (once each)
        self.running = 0      # dispatched, not yet committed (under the runtime's in_flight_lock) ...
        self.closed = False   # ... and, once the loop ended (decided under that lock), none is taken any more
        self.ticked = time.monotonic()
        self.loop_ident: int | None = None
        self.ended = threading.Event()   # the loop stopped: the commit thread ends once it committed the rest
        self.known: dict[Any, bool] = {}

    def takes(self, fn: Any) -> bool:
        """Is ``fn`` an async step (looked at once per step)?"""
        known = self.known.get(fn)
        if known is None:
            known = self.known[fn] = is_async_step(fn)
        return known

    def close(self) -> None:
        """The loop of a lane that never ran (run_inline's runtime, a failed boot)."""
        if not self.loop.is_closed():
            self.loop.close()

    # -- a worker thread hands a step over -----------------------------------------------------
    def dispatch(self, c: JobClaim, fn: Any) -> None:
        """Start ``c``'s step on the loop (waiting for a free place among async_count); once the loop ended (a
        drain that began meanwhile), the claim goes back to the queue, never run."""
        while not self.slots.acquire(timeout=ASYNC_TICK * 4):
            if self.rt.stopping.is_set():   # (a drain: a step that has not begun goes back)
                self.rt._release([c])
                return
        with self.rt.in_flight_lock:
            taken = not self.closed
            if taken:
                self.running += 1
                if self.loop_ident is not None:   # (a worker thread that dies does not take it with it)
                    self.rt.owners[c.step_id] = self.loop_ident
        try:
            if not taken:
                raise RuntimeError("the event loop of async steps ended")
            self.rt._give_deadline(c, fn)
            self.loop.call_soon_threadsafe(self._start, c, fn)
        except RuntimeError:   # (the loop ended meanwhile: closed, or its thread died)
            if taken:
                with self.rt.in_flight_lock:
                    self.running -= 1
            self.slots.release()
            self.rt._release([c])

    def _start(self, c: JobClaim, fn: Any) -> None:
        """On the loop: the step's task, its deadline, and what follows its end (_done)."""
        task = self.loop.create_task(self._run(c, fn), name=f"ductwork.step.{c.name}")
        timer = None if c.expires is None else self.loop.call_later(
            max(0.0, c.expires - time.monotonic()), self._expire, c)
        self.tasks[c.step_id] = (c, task)
        task.add_done_callback(functools.partial(self._done, c, fn, timer))

    def _expire(self, c: JobClaim) -> None:
        """The attempt's deadline: its task is cancelled (in the task itself: its stack stays the loop's)."""
        entry = self.tasks.get(c.step_id)
        if entry is not None and not entry[1].done():
            c.timed_out = True
            entry[1].cancel()

    async def _run(self, c: JobClaim, fn: Any) -> StepResult:
        """One async step on the loop: its result, or its failure."""
        rt = self.rt
        ctx = rt._step_context(c)
        _CURRENT.set(ctx)   # (this task's own context)
        with _Tracing.step_span(rt.engine, c) as span:
            result = await self._attempt(c, fn, ctx)
            c.ended = c.ended or time.monotonic()
            _Tracing.outcome(span, c, result.ok, result.value, None)
        return result

    async def _attempt(self, c: JobClaim, fn: Any, ctx: StepContext) -> StepResult:
        """_run inside the step's span."""
        rt = self.rt
        try:
            value = await rt._invoke(c, fn, ctx)
            if c.expires is not None and time.monotonic() >= c.expires:
                c.timed_out = True   # (returned past its deadline: it blocked the loop, the timer could not fire)
            if not c.timed_out:
                return StepResult(c, True, _step_output(c, value))
        except self.asyncio.CancelledError:
            if not (c.timed_out or c.stop_requested):
                raise   # (the step's own, or the loop's end after a drain handed the claim back: _done)
        except BaseException as exc:  # noqa: B036 - whatever a step raises is a failed attempt
            if not c.timed_out:
                _, text, error = rt._raised(exc)
                return rt._failed_attempt(c, fn, text, error)
        if c.timed_out:   # (cancelled at its deadline, or done after it: the attempt timed out)
            return rt._timeout_result(c, fn, None)
        return self._cancelled(c)

    @staticmethod
    def _cancelled(c: JobClaim) -> StepResult:
        """The failure of a step whose task was cancelled (its run's cancel: discarded at the commit)."""
        why = ": its run was cancelled" if c.stop_requested else ""
        return StepResult(c, False, f"CancelledError: step {c.name} was cancelled{why}")

    def _done(self, c: JobClaim, fn: Any, timer: Any, task: Any) -> None:
        """A step's task ended (also one cancelled before it began): its place freed, its result to commit."""
        if timer is not None:
            timer.cancel()
        self.tasks.pop(c.step_id, None)
        self.cancelled.discard(c.step_id)
        self.slots.release()
        if self.rt.dead.is_set():   # (the process ends: its claims were handed back)
            return
        if task.cancelled():
            result = self.rt._timeout_result(c, fn, None) if c.timed_out else self._cancelled(c)
        else:
            result = task.result()
        self.results.put(result)

    # -- the loop's thread -------------------------------------------------------------------
    def loop_thread(self) -> None:
        """Run the loop until the process drains with no async step in flight, or dies."""
        if not self.rt.wait_booted():
            self.close()
            return
        self.loop_ident = threading.get_ident()
        self.asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._watch())
        finally:
            with self.rt.in_flight_lock:   # (however it ended: no step is handed to it any more)
                self.closed = True
            for _, task in list(self.tasks.values()):
                task.cancel()
            with contextlib.suppress(Exception):
                self.loop.run_until_complete(self.asyncio.sleep(0))
            self.loop.close()
            self.ended.set()

    async def _watch(self) -> None:
        """Tick; cancel (once) the tasks whose run was cancelled; end when nothing is left to do."""
        while not self.rt.dead.is_set():
            self.ticked = time.monotonic()
            for c, task in list(self.tasks.values()):
                if c.stop_requested and c.step_id not in self.cancelled and not task.done():
                    self.cancelled.add(c.step_id)
                    task.cancel()
            if self.rt.stopping.is_set():
                with self.rt.in_flight_lock:
                    self.closed = self.running == 0
                if self.closed:
                    return
            await self.asyncio.sleep(ASYNC_TICK)

    # -- the commit thread -------------------------------------------------------------------
    def commit_thread(self) -> None:
        """Commit the results of async steps in batches (the worker's own commit), and watch the loop's ticks.
        An error in a commit is logged, never the end of this thread (its claims: handed back by the commit, or
        at the drain)."""
        if not self.rt.wait_booted():
            return
        blocked = False
        while not (self.ended.is_set() and self.results.empty()):
            batch = self._take(ASYNC_TICK * 2)
            if batch:
                try:
                    self.rt._commit_results(batch, 0)
                except Exception:
                    log.exception("committing %d async step result(s) failed", len(batch))
                finally:
                    with self.rt.in_flight_lock:
                        self.running -= len(batch)
            late = time.monotonic() - self.ticked
            if late > ASYNC_BLOCKED and not self.ended.is_set():
                if not blocked:
                    self._log_blocker(late)
                blocked = True
            else:
                blocked = False

    def _take(self, wait: float) -> list[StepResult]:
        """The results waiting (up to MAX_BATCH), after waiting up to ``wait`` for the first."""
        try:
            batch = [self.results.get(timeout=wait)]
        except queue.Empty:
            return []
        while len(batch) < MAX_BATCH:
            try:
                batch.append(self.results.get_nowait())
            except queue.Empty:
                break
        return batch

    def _log_blocker(self, late: float) -> None:
        """The loop has not ticked for ``late`` seconds: say which step holds it (from the loop thread's stack)."""
        frame = sys._current_frames().get(self.loop_ident or -1)
        claim = None
        while frame is not None and claim is None:
            if frame.f_code is AsyncLane._run.__code__:
                claim = frame.f_locals.get("c")
            frame = frame.f_back
        if claim is None:
            log.warning("the event loop of async steps has not run for %.1fs", late)
            return
        log.warning("async step %s blocks the event loop (no tick for %.1fs): it calls something blocking "
                    "(time.sleep, blocking I/O); await asyncio.sleep / asyncio.to_thread instead", claim.name, late,
                    extra={"run": claim.run_id, "step": claim.step_id, "pipeline": claim.pipeline})


class Runtime:
    """One process's job worker and/or advancer threads plus its heartbeat/reaper thread.

    Used by ``forking: none`` (both roles), the foreground roles, and every forked child."""

    def __init__(self, config: Config, role: str, pipelines: list[str], *,
                 worker_pipelines: list[str] | None = None, parent_row: int | None = None,
                 report_fd: int | None = None, restarts: int = 0, recycles: int | None = None):
        """A runtime of mode ``role`` for ``pipelines``; a forked child also gets its pipe and its supervisor's row
        (and how often its predecessors were restarted and recycled)."""
        self.config = config
        self.role = role                        # advancer | worker | combined: a mode of ROLE_SPECS
        self.spec = ROLE_MODES[role]
        self.pipelines = pipelines              # advanced pipelines
        self.worker_pipelines = pipelines if worker_pipelines is None else worker_pipelines
        self.parent_row, self.report_fd, self.restarts = parent_row, report_fd, restarts
        self.parent_pid = os.getppid() if report_fd is not None else None
        self.store = Store(config.data["database_url"], pool_size=config.data["pool_size"],
                           listen_url=config.data["listen_url"])
        self.engine = Engine(self.store, config)
        self.engine.fence_claims = True  # claims only under this process's live row (section 6)
        self.wakeups = Wakeups()
        self.cancel_hint = threading.Event()    # a cancel's hint: look for cancelled steps now (look_for_cancels)
        self.store.notify_hook = self.hint
        self.outage = Outage(settle=2 * float(config.get("supervisor.heartbeat_interval")))
        self.wake_socket: Any = None   # SQLite: this process's LocalWakeups socket
        self.fault = Fault()
        self.engine.fault = self.fault
        self.pid = os.getpid()                  # a forked copy (another pid) must never run ductwork code
        self.stopping = threading.Event()       # stop claiming
        self.dead = threading.Event()           # exit now, nothing more to commit
        self.booted = threading.Event()         # every thread started: only now may any claim
        self.thread_restarts = 0                # worker/advancer threads that died (a bug) and were replaced
        self.advancing: dict[int, BranchClaim] = {}   # thread ident -> the branch it is advancing
        self.process_id = 0
        self.in_flight: dict[int, tuple[JobClaim, bool]] = {}   # step id -> (claim, started)
        self.owners: dict[int, int] = {}        # step id -> ident of the thread that holds it
        self.in_flight_lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.signals: "queue.SimpleQueue[int]" = queue.SimpleQueue()
        self.stop_requested = threading.Event()  # a STOP_SIGNALS arrived: a boot waiting for the database gives up
        self.machine = machine_identifier()
        self.proof = LocalProof.of(self.machine, self.store.info)
        self.reaped_row = 0   # the row id last found reaped (logged once, however often registering fails)
        self.systemd = SystemdNotifier()   # a foreground role under systemd (a forked child finds no socket)
        # step timeouts (SPEC §15): the running steps with a deadline, the timekeeper that fails them at it, and
        # the worker threads left behind by steps that ignored it (each replaced at once: see expire_deadlines)
        self.deadlines: dict[int, tuple[JobClaim, Any, int]] = {}   # step id -> (claim, step, thread ident)
        self.timekeeper_wake = threading.Event()
        self.abandoned: set[int] = set()
        self.timeouts: dict[tuple[str, str], float | None] = {}    # (pipeline, step) -> seconds (step_timeout)
        # recycling (job_worker.recycle): when this process drains to be replaced, and why it did
        self.recycle = RecyclePolicy.of(config) if self.spec.workers else NEVER_RECYCLE
        self.recycles = recycled_count() if recycles is None else recycles
        self.started_steps = 0
        self.recycled = ""
        self.replaced: dict[str, Any] = {}   # run_inline(steps=): step name -> what runs in its place
        self.caller_thread = False   # run_inline's: steps run on the caller's thread (its Ctrl-C is its own)
        # async steps (SPEC §19): the event loop they run on, when a pipeline this process works has one
        self.lane: AsyncLane | None = AsyncLane(self) if self.spec.workers and any(
            is_async_step(fn) for name in self.worker_pipelines
            for fn in getattr(_REGISTRY.get(name), "steps", {}).values()) else None

    # -- process row -------------------------------------------------------------------
    @property
    def row_role(self) -> str:
        """This process's role in its row, its log lines and its local heartbeat file (run_inline's: inline)."""
        return INLINE_ROLE if self.caller_thread else self.spec.row_role

    def register(self) -> None:
        """Insert this process's row (its id fences every claim this process makes)."""
        pipes = ",".join(self.pipelines if self.spec.advancers else self.worker_pipelines)
        with self.store.tx() as t:   # the id is this process's only once the row is committed
            row_id = int(t.one(SQL.register_process, {
                "pid": os.getpid(), "machine": self.machine, "role": self.row_role, "pipelines": pipes,
                "parent_id": self.parent_row, "state": "running", "restarts": self.restarts,
                "info": self.info_json()})[0])
        self.process_id = row_id
        log.debug("registered process row %s", self.process_id)

    def thread_plan(self) -> list[tuple[str, Callable, Any]]:
        """The threads this process runs, as (name, target, argument): its workers and advancers, the
        heartbeat and the listener."""
        plan: list[tuple[str, Callable, Any]] = []
        if self.spec.workers:
            plan += [(f"ductwork.worker.{pipeline}.{n}", self.worker_loop, pipeline)
                     for pipeline in self.worker_pipelines
                     for n in range(int(self.config.get("job_worker.count", pipeline)))]
        if self.spec.advancers:
            plan += [(f"ductwork.advancer.{pipeline}.{n}", self.advancer_loop, pipeline)
                     for pipeline in self.pipelines
                     for n in range(int(self.config.get("pipeline_advancer.count", pipeline)))]
        plan.append((f"ductwork.{self.row_role}.heartbeat.0", self.heartbeat_loop, None))
        if self.spec.workers:
            plan.append((f"ductwork.{self.row_role}.cancels.0", self.cancel_watch_loop, None))
            plan.append((f"ductwork.{self.row_role}.timekeeper.0", self.timekeeper_loop, None))
        if self.lane is not None:   # (drained like the workers: they end once no async step is in flight)
            plan.append((f"ductwork.{self.row_role}.async.0", self.lane.loop_thread, None))
            plan.append((f"ductwork.{self.row_role}.async-commit.0", self.lane.commit_thread, None))
        if self.spec.advancers:   # (with every status kept forever it still rolls the counts up, see prune)
            plan.append((f"ductwork.{self.row_role}.pruner.0", self.prune_loop, None))
        if self.spec.advancers and self.schedules(switched_off=True):
            plan.append((f"ductwork.{self.row_role}.scheduler.0", self.schedule_loop, None))
        if self.store.dialect == "sqlite":
            plan.append((f"ductwork.{self.row_role}.listener.0", self.local_listen_loop, None))
        elif self.store.listen_info is not None:   # else (behind a pooler, no listen_url) polling alone
            plan.append((f"ductwork.{self.row_role}.listener.0", self.listen_loop, None))
        return plan

    def planned_threads(self) -> int:
        """How many threads this process runs (thread_plan)."""
        return len(self.thread_plan())

    def info_json(self) -> str:
        """The row's ``info``: the threads (alive once started, else planned), the steps in flight and how many
        worker/advancer threads died and were replaced."""
        alive = sum(thread.is_alive() for thread in self.threads) if self.threads else self.planned_threads()
        return _dumps({"threads": alive, "in_flight": len(self.in_flight), "thread_restarts": self.thread_restarts,
                       "abandoned_threads": self.abandoned_alive(), "recycles": self.recycles,
                       "steps_started": self.started_steps, "metrics": METRICS.snapshot()})

    def _unregister(self) -> None:
        """Close the wake-up socket, hand back what the row still holds, delete the row and the heartbeat file."""
        if self.wake_socket is not None:   # gone with the process, not a second later with its listener
            LocalWakeups.close(self.wake_socket)
        if not self.process_id:
            return
        self.store.close()
        try:
            # whatever the row still holds (a hand-back that failed, a claim made after the in-flight
            # snapshot) goes back with it: nobody could reap it once the row is gone
            self.engine.retire(self.process_id, "process exited holding it")
        except Exception as exc:
            log.warning("could not delete process row %s: %s", self.process_id, exc)
        self.proof.remove(self.row_role)

    # -- database retries --------------------------------------------------------------
    def _db_retry(self, fn: Callable[[], Any], give_up: threading.Event | None = None) -> Any:
        """Outage.retry for this process: forever, reporting alive while it waits (waiting for the database
        is not a hang, and a booting child has no loop yet); DatabaseUnavailable once ``give_up`` (by default
        ``dead``) is set."""
        return self.outage.retry(fn, give_up=give_up or self.dead, waiting=lambda: self._report(PIPE_ALIVE))

    def _claim(self, claim: Callable[[], list], what: str, pipeline: str) -> list | None:
        """A claim through the outage retry: its claims; [] after an error (logged, then a
        second's pause); None once the database is given up on (stopping) or the boot failed."""
        if not self.wait_booted():
            return None
        self.inert_if_forked(1)
        try:
            return self._db_retry(claim, self.stopping)
        except DatabaseUnavailable:
            return None
        except ConfigError:   # the Store keeps it as fatal: the main loop stops the process
            return None
        except Exception:
            log.exception("claiming %s of %s failed", what, pipeline)
            self.stopping.wait(1)
            return []

    # -- job worker --------------------------------------------------------------------
    def worker_loop(self, pipeline: str) -> None:
        """Claim, run, commit. Quick steps are claimed and committed in growing batches (one
        transaction for a batch's results, its branches' advancement and the next claim);
        slow steps go one at a time so other threads and processes share them. The batch size
        survives an idle spell (a burst is claimed in full batches at once): a step that turns
        out slow gives the rest of its batch back to the queue instead of holding it."""
        wake = self.wakeups.event()
        idle = float(self.config.get("job_worker.polling_timeout", pipeline))
        limit = 1
        claims: list[JobClaim] = []
        while not self.stopping.is_set():
            if not claims:
                got = self._claim(lambda n=limit: self.engine.claim_steps(pipeline, self.process_id, n),
                                  "steps", pipeline)
                if got is None:
                    break
                claims = got
                if not claims:
                    if not self.stopping.is_set():  # stopping is set before the wake-ups fire
                        self.wakeups.wait(CH_JOBS, pipeline, wake, idle)
                    continue
                # A batch that came back full: there may be more, let the idle siblings look too. (One step
                # asked for and got is no sign of a burst: waking them all for it sent every sibling to the
                # database for nothing, at each hop of a chain, holding connections the hop needed.)
                if len(claims) == limit > 1:
                    self.wakeups.notify(CH_JOBS, pipeline, every_idle=True)
            claims, per_step = self.run_batch(claims, limit)
            if threading.get_ident() in self.abandoned:   # a replacement serves the pipeline now
                with self.in_flight_lock:   # its ident goes with it: a thread started later may be given it again
                    self.abandoned.discard(threading.get_ident())
                return
            # Sized by the steps' own run time: a slow commit (a busy database) is a reason to
            # batch more, never less; slow steps go one at a time so siblings share them.
            limit = min(limit * 4, MAX_BATCH) if per_step < QUICK_STEP else 1
        if claims:
            self._release(claims)

    def run_batch(self, claims: list[JobClaim], next_limit: int) -> tuple[list[JobClaim], float]:
        """Run the claimed steps in order; commit their results (early when a result has waited
        QUICK_COMMIT seconds). Returns the steps claimed in the final commit's transaction and
        the mean run time of the steps it ran (commits excluded)."""
        self._track(claims)
        results: list[StepResult] = []
        waiting_since = running = 0.0
        for i, c in enumerate(claims):
            more = i < len(claims) - 1
            if self.stopping.is_set():
                self._commit_results(results, 0)
                self._release(claims[i:])
                return [], running / max(i, 1)
            started = time.monotonic()
            result = self.run_step(c)
            took = time.monotonic() - started
            running += took
            if result is ABANDONED:   # its step overran its deadline: the timekeeper failed it; this thread ends
                self._commit_results(results, 0)
                self._release(claims[i + 1:])
                return [], running / (i + 1)
            if result is not None:
                results.append(result)
                waiting_since = waiting_since or time.monotonic()
            if more and took >= QUICK_STEP:
                # A slow step: the steps still waiting behind it go back to the queue, for idle
                # threads and processes, instead of waiting for it (and for each other).
                self._commit_results(results, 0)
                self._release(claims[i + 1:])
                return [], running / (i + 1)
            if results and more and time.monotonic() - waiting_since > QUICK_COMMIT:
                self._commit_results(results, 0)
                results, waiting_since = [], 0.0
        return self._commit_results(results, 0 if self.stopping.is_set() else next_limit), running / len(claims)

    def run_step(self, c: JobClaim) -> StepResult | None:
        """Execute one claimed step; None when it was handed back instead (machinery failure), or must not start
        (its run was cancelled: look_for_cancels let it go)."""
        if time.monotonic() - c.confirmed > CANCEL_LEASE and not self._still_held(c):
            self._untrack([c])   # (a cancel took it while this process could not answer: it must not start)
            return None
        with self.in_flight_lock:   # (look_for_cancels decides under this lock: started, or dropped)
            if c.dropped:
                self.in_flight.pop(c.step_id, None)
                self.owners.pop(c.step_id, None)
                return None
            c.mark_started()
            self.in_flight[c.step_id] = (c, True)
            self.owners[c.step_id] = threading.get_ident()
            self.started_steps += 1
            if self.started_steps == self.recycle.steps:
                self.begin_recycle(f"it started {self.started_steps} steps (job_worker.recycle.steps "
                                   f"{self.config.get('job_worker.recycle.steps')}, jittered)")
        try:
            self.fault("after_claim", c.name)
            cls = _REGISTRY.get(c.pipeline)
            fn = cls.steps.get(c.name) if cls else None
            if self.replaced:   # (run_inline's steps=: a test's stand-ins)
                fn = self.replaced.get(c.name, fn)
            if fn is None:
                why = f"step {c.name} is not defined in pipeline {c.pipeline} any more"
                log.warning(why, extra={"run": c.run_id, "step": c.step_id, "pipeline": c.pipeline})
                return StepResult(c, False, why, DEFINITION_CHANGED)
            if c.refused is not None:   # (its concurrency_key failed at the claim: it must not run uncapped)
                log.warning(c.refused, extra={"run": c.run_id, "step": c.step_id, "pipeline": c.pipeline})
                return StepResult(c, False, c.refused, JOB_NON_RETRYABLE)
            if self.lane is not None and self.lane.takes(fn):   # an async step: on the event loop, not here
                self.lane.dispatch(c, fn)
                return None
            self._arm_deadline(c, fn)
            ok, value, error = self._call(c, fn)
            self.inert_if_forked(0 if ok else 1)
            if c.expires is not None:
                late = self._returned(c, fn)
                if late is not None:
                    return late
            self.fault("before_commit", c.name)
        except Exception as exc:  # the machinery around the step failed, not the step
            with self.in_flight_lock:
                self.deadlines.pop(c.step_id, None)
            log.error("worker error around step %s: %s; handing it back", c.name, exc,
                      extra={"run": c.run_id, "step": c.step_id, "pipeline": c.pipeline})
            with contextlib.suppress(DatabaseUnavailable):
                self._db_retry(lambda why=str(exc): self.engine.hand_back(c.process_id, [c.step_id], why),
                               self.dead)
            self._untrack([c])
            return None
        if not ok:
            return self._failed_attempt(c, fn, value, error)
        return StepResult(c, True, value)

    def _failed_attempt(self, c: JobClaim, fn: Any, text: str, error: BaseException | None) -> StepResult:
        """A step's attempt failed (on a worker thread, or on the async lane's loop): logged, and what follows."""
        result = self._failure(c, fn, text, error)
        final = self.engine.gives_up(result)
        # the stored error text, not the exception (a hostile one may raise in whatever formats it); a corrupt row's
        # traceback is ductwork's own, not the step's: one line
        failure = None if type(error) is _CorruptInput else text   # (type(): a hostile __class__ may raise)
        log.log(logging.ERROR if final else logging.WARNING, "step %s failed (attempt %d%s): %s", c.name, c.attempt,
                ", the last" if final else "", text.splitlines()[0],
                extra={"run": c.run_id, "step": c.step_id, "pipeline": c.pipeline, "attempt": c.attempt,
                       "failure": failure})
        return result

    # -- step timeouts (SPEC §15) --------------------------------------------------------
    # A step with a timeout gets a deadline as it starts (self.deadline; should_stop turns true at it). At the
    # deadline the timekeeper thread commits the attempt as failed (StepTimeout, with where the step was), so
    # the retry policy goes on at once, not when the step returns; the worker thread it ran on is abandoned (it
    # ends when the step returns, its result dropped) and a new one takes its place: the pipeline keeps its
    # full job_worker.count, and a drain does not wait for abandoned threads. A step that returns after its
    # deadline but before the timekeeper saw it is a StepTimeout too (the worker commits it itself).
    def _arm_deadline(self, c: JobClaim, fn: Any) -> None:
        """Give the attempt its deadline, if its step has a timeout, and the timekeeper the claim."""
        if not self._give_deadline(c, fn):
            return
        with self.in_flight_lock:
            self.deadlines[c.step_id] = (c, fn, threading.get_ident())
        self.timekeeper_wake.set()

    def _give_deadline(self, c: JobClaim, fn: Any) -> bool:
        """The attempt's deadline from now (step_timeout, cached per step); False when its step has none."""
        key = (c.pipeline, c.name)
        if key not in self.timeouts:
            self.timeouts[key] = step_timeout(fn, self.config, c.pipeline, c.name)
        seconds = self.timeouts[key]
        if seconds is None:
            return False
        c.timeout, c.deadline, c.expires = seconds, time.time() + seconds, time.monotonic() + seconds
        return True

    def _returned(self, c: JobClaim, fn: Any) -> Any:
        """The step of a claim with a deadline returned: None when in time (its result counts); ABANDONED when
        the timekeeper failed it already (this thread ends); else, late, its StepTimeout failure."""
        with self.in_flight_lock:
            self.deadlines.pop(c.step_id, None)
            if c.timed_out:
                return ABANDONED
            if time.monotonic() < c.expires:
                c.returned = True
                return None
            c.timed_out = True
        return self._timeout_result(c, fn, None)

    def _timeout_result(self, c: JobClaim, fn: Any, ident: int | None) -> StepResult:
        """The StepTimeout failure of an attempt past its deadline (with the stack of its thread, when it still
        runs), and what follows it by the step's retry policy."""
        message = f"step {c.name} ran past its timeout of {c.timeout:g}s (attempt {c.attempt})"
        c.ended = c.ended or time.monotonic()
        frame = sys._current_frames().get(ident) if ident is not None else None
        where = "" if frame is None else "\nwhere it was at the deadline:\n" + clip(
            "".join(traceback.format_stack(frame)[-12:]), MAX_TRACEBACK)
        log.warning("%s: failed (StepTimeout)%s", message, "; its thread is left to finish and replaced"
                    if ident is not None else "", extra={"run": c.run_id, "step": c.step_id, "pipeline": c.pipeline})
        return self._failure(c, fn, f"StepTimeout: {message}{where}", StepTimeout(message))

    def timekeeper_loop(self) -> None:
        """Worker processes: fail the attempts that reach their deadline (expire_deadlines), until the end."""
        if not self.wait_booted():
            return
        while not self.dead.is_set():
            with self.in_flight_lock:
                soonest = min((c.expires for c, _, _ in self.deadlines.values()), default=None)
            self.timekeeper_wake.wait(1.0 if soonest is None else max(0.0, min(1.0, soonest - time.monotonic())))
            self.timekeeper_wake.clear()
            try:
                self.expire_deadlines()
            except Exception:
                log.exception("failing the steps past their deadline failed")

    def expire_deadlines(self) -> int:
        """Commit the attempts past their deadline as failed (StepTimeout), abandon their threads and start a
        replacement for each (not while draining). Returns how many."""
        now = time.monotonic()
        with self.in_flight_lock:
            due = [(step_id, entry) for step_id, entry in self.deadlines.items() if entry[0].expires <= now]
            for step_id, (c, _, ident) in due:
                del self.deadlines[step_id]
                c.timed_out = True
                self.abandoned.add(ident)
        for _, (c, fn, ident) in due:
            self._commit_results([self._timeout_result(c, fn, ident)], 0)
            if not self.stopping.is_set():
                old = next((t.name for t in self.threads if t.ident == ident), f"ductwork.worker.{c.pipeline}")
                self._spawn(f"{old.split('+')[0]}+{len(self.abandoned)}", self.worker_loop, c.pipeline)
        return len(due)

    def abandoned_alive(self) -> int:
        """Worker threads left behind by steps past their deadline that still run."""
        return sum(t.ident in self.abandoned and t.is_alive() for t in self.threads)

    # -- recycling (see "recycling" above Runtime) ---------------------------------------
    def begin_recycle(self, why: str) -> None:
        """Stop claiming and have the main loop drain this process to be replaced (the first reason wins)."""
        if self.recycled or self.stopping.is_set():
            return
        self.recycled = why
        log.info("%s recycles: %s; draining", self.row_role, why)
        self.stopping.set()
        self.wakeups.all()
        self.signals.put(RECYCLE_WAKE)

    def recycle_reason(self) -> str:
        """Each tick of the main loop: why this process must be recycled now (its memory, its stuck threads),
        or ""."""
        policy = self.recycle
        if policy.abandoned is not None and self.abandoned:
            stuck = self.abandoned_alive()
            if stuck > policy.abandoned:
                return (f"{stuck} of its threads are stuck in steps past their timeout "
                        f"(job_worker.recycle.abandoned_threads {policy.abandoned})")
        if policy.memory is not None:
            rss = resident_memory()
            if rss >= policy.memory:
                limit = self.config.get("job_worker.recycle.memory_mb")
                return (f"its resident memory is {rss / 2 ** 20:.0f} MB (job_worker.recycle.memory_mb {limit}, "
                        f"jittered to {policy.memory / 2 ** 20:.0f})")
        return ""

    def check_memory_limit(self) -> None:
        """Once booted: a memory limit this process passes already would recycle it forever; switch it off."""
        if self.recycle.memory is not None and resident_memory() >= self.recycle.memory:
            log.error("job_worker.recycle.memory_mb (%s) is below this %s's own size once booted (%.0f MB): "
                      "recycling on memory is off", self.config.get("job_worker.recycle.memory_mb"), self.row_role,
                      resident_memory() / 2 ** 20)
            self.recycle = dataclasses.replace(self.recycle, memory=None)

    def recycle_environment(self) -> dict[str, str]:
        """What a re-executed foreground process needs in its environment: the systemd variables this one took
        out, and its recycle count."""
        return {**self.systemd.inherited, RECYCLED_ENV: str(self.recycles + 1)}

    def _still_held(self, c: JobClaim) -> bool:
        """A claim that waited longer than CANCEL_LEASE to start (this process was frozen or busy; a cancel may
        have taken it without an answer): is it still this one's? One primary-key read; False on any error."""
        looked = time.monotonic()
        try:
            with self.store.tx(write=False) as t:
                held = t.one(SQL.claim_still_held, {"id": c.step_id, "token": c.token}) is not None
        except Exception as exc:   # (DatabaseUnavailable too: it could not commit anyway)
            log.info("step %s not started: its claim could not be checked (%s)", c.name, first_line(exc),
                     extra={"run": c.run_id, "step": c.step_id, "pipeline": c.pipeline})
            return False
        if held:
            c.confirmed = looked
        else:
            log.info("step %s not started: its claim was taken while it waited (its run was cancelled)", c.name,
                     extra={"run": c.run_id, "step": c.step_id, "pipeline": c.pipeline})
        return held

    def _failure(self, c: JobClaim, fn: Any, text: str, error: BaseException) -> StepResult:
        """What follows a failed attempt (_classify_failure); an error in classifying it (a hostile exception
        class: an __instancecheck__ that raises, a RetryAfter without seconds) makes it a plain failure, which
        the config's retry budget and delay follow."""
        try:
            return self._classify_failure(c, fn, text, error)
        except BaseException:  # noqa: B036 - whatever the step's error class does, the attempt is a failure
            self.inert_if_forked(1)
            return StepResult(c, False, text)

    def _classify_failure(self, c: JobClaim, fn: Any, text: str, error: BaseException) -> StepResult:
        """A failed attempt and what follows it: failed at once (corrupt input, NonRetryable, an error its retry
        policy gives up on), or retried after the delay that RetryAfter or the policy says (None: the config's)."""
        if isinstance(error, _CorruptInput):
            return StepResult(c, False, text, TRANSITION_INVALID)
        if isinstance(error, NonRetryable):
            return StepResult(c, False, text, JOB_NON_RETRYABLE)
        policy = retry_policy(fn)
        budget = None if policy is None else policy.max
        if isinstance(error, RetryAfter):
            seconds = error.seconds   # (checked again: a subclass or a caller may have changed it)
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= MAX_DURATION:
                raise ValueError(f"RetryAfter.seconds {seconds!r} is not a number of seconds")
            return StepResult(c, False, text, delay=float(seconds), max_retry=budget)
        if policy is None:
            return StepResult(c, False, text)
        if not policy.retries(error):
            return StepResult(c, False, text, JOB_NON_RETRYABLE)
        default = float(self.config.get("job_worker.retry_delay", c.pipeline, c.name))
        return StepResult(c, False, text, delay=policy.delay_after(c.attempts + 1, default), max_retry=budget)

    def _call(self, c: JobClaim, fn: Any) -> tuple[bool, str, BaseException | None]:
        """Run the step; (True, output json, None) or (False, error text with a bounded traceback, the error). An
        async step that comes here (run_inline; a worker without the async lane) runs on an event loop of its own."""
        ctx = self._step_context(c)
        token = _CURRENT.set(ctx)
        try:
            with _Tracing.step_span(self.engine, c) as span:
                outcome = self._traced_call(c, fn, ctx)
                c.ended = time.monotonic()
                _Tracing.outcome(span, c, *outcome)
            return outcome
        finally:
            _CURRENT.reset(token)

    def _traced_call(self, c: JobClaim, fn: Any, ctx: StepContext) -> tuple[bool, str, BaseException | None]:
        """_call inside the step's span."""
        try:
            result = self._invoke(c, fn, ctx)
            if inspect.iscoroutine(result):
                result = _run_coroutine(result)
            return True, _step_output(c, result), None
        except BaseException as exc:  # noqa: B036 - whatever a step raises is a failed attempt, never a dead thread
            if self.caller_thread and not isinstance(exc, (Exception, SystemExit)):
                raise   # (run_inline: Ctrl-C, or a test's pytest.fail() in a stand-in, is the caller's)
            return self._raised(exc)

    def _step_context(self, c: JobClaim) -> StepContext:
        """What the step sees of itself (self.* and current_step())."""
        return StepContext(RunContext(self.engine, c.run_id), c.run_id, c.step_id, c.attempt,
                           f"{c.pipeline}:{c.run_id}:{c.step_id}", c.pipeline, c.name, c)

    @staticmethod
    def _invoke(c: JobClaim, fn: Any, ctx: StepContext) -> Any:
        """Call the step with its input: what it returns (an async step: its coroutine)."""
        args = _step_arguments(c)
        if inspect.isclass(fn):
            obj = fn()
            obj.context, obj.run_id, obj.attempt = ctx.context, c.run_id, c.attempt
            obj.idempotency_key = ctx.idempotency_key
            obj.step_id, obj.pipeline, obj._ductwork_claim = c.step_id, c.pipeline, c
            return obj.execute(*args)
        return fn(*args)

    def _raised(self, exc: BaseException) -> tuple[bool, str, BaseException]:
        """A step raised ``exc``: a failed attempt (a forked copy of this process exits here)."""
        try:
            code = exc.code if isinstance(exc, SystemExit) else 1
        except BaseException:  # noqa: B036 - an exception whose __class__ raises: still just a failure
            code = 1
        self.inert_if_forked(code)
        return False, step_error_text(exc), exc

    def _commit_results(self, results: list[StepResult], claim_limit: int) -> list[JobClaim]:
        """Commit finished steps (and claim up to ``claim_limit`` more in the same transaction): the new claims."""
        if not results:
            return []
        self.inert_if_forked(1)
        self._measure(results)
        try:
            done: Committed = self._db_retry(lambda: self.engine.commit(results, claim_limit), self.dead)
        except DatabaseUnavailable:
            return []
        except Exception:  # never let a commit error kill the thread and strand its claims
            log.exception("commit of %d result(s) failed; handing them back", len(results))
            with contextlib.suppress(Exception):
                self.engine.hand_back(results[0].claim.process_id, [r.claim.step_id for r in results], "commit failed")
            return []
        finally:
            self._untrack([r.claim for r in results])
        for r, accepted in zip(results, done.accepted, strict=True):
            c = r.claim
            if c.step_id in done.discarded:
                log.info("step %s of cancelled run %s: what it returned was discarded", c.name, c.run_id,
                         extra={"run": c.run_id, "step": c.step_id, "pipeline": c.pipeline})
            elif not accepted:
                log.warning("commit of step %s rejected: this process no longer holds its claim", c.name,
                            extra={"run": c.run_id, "step": c.step_id, "pipeline": c.pipeline})
        self._track(done.claims)
        if claim_limit and len(done.claims) == claim_limit:
            self.wakeups.notify(CH_JOBS, results[0].claim.pipeline, every_idle=True)
        for run_id in done.halted:
            self.engine.notify_halt(run_id)
        for run_id in done.completed:
            self.engine.notify_complete(run_id, results[0].claim.pipeline)
        if any(done.accepted):
            try:
                self.fault("after_advance")  # committed: the steps' results and their branches' advancement
            except FaultInjected as exc:
                log.warning("%s (after the commit: nothing to undo)", exc)
        return done.claims

    @staticmethod
    def _measure(results: list[StepResult]) -> None:
        """The executions of ``results`` in this process's metrics (executions that ran: whether their commit goes
        through or not): their durations and queue waits, the retries (an attempt after a failed one) and
        timeouts among them."""
        for r in results:
            c = r.claim
            if c.started is None:
                continue
            METRICS.execution(c.pipeline, (c.ended or time.monotonic()) - c.started,   # (not the wait for this commit)
                              c.claimed_at - c.claimable_at, c.attempts > 0,
                              not r.ok and r.value.startswith(f"{StepTimeout.__name__}:"))

    def _track(self, claims: list[JobClaim]) -> None:
        """Note claims as in flight, not started yet (a drain releases them without counting a crash)."""
        with self.in_flight_lock:
            for c in claims:
                self.in_flight[c.step_id] = (c, False)
                self.owners[c.step_id] = threading.get_ident()

    def _untrack(self, claims: list[JobClaim]) -> None:
        """Claims this process no longer holds (committed, handed back or released)."""
        with self.in_flight_lock:
            for c in claims:
                self.in_flight.pop(c.step_id, None)
                self.owners.pop(c.step_id, None)

    def _release(self, claims: list[JobClaim]) -> None:
        """Claims that never started go back to the queue without counting a crash."""
        if not claims:
            return
        self.inert_if_forked(1)
        with contextlib.suppress(DatabaseUnavailable):
            self._db_retry(lambda: self.engine.release(claims[0].process_id, [c.step_id for c in claims],
                                                       claims[0].pipeline), self.dead)
        self._untrack(claims)

    # -- advancer ----------------------------------------------------------------------
    def advancer_loop(self, pipeline: str) -> None:
        """Claim a branch whose step finished and advance it, one at a time, until stopping."""
        wake = self.wakeups.event()
        idle = float(self.config.get("pipeline_advancer.polling_timeout", pipeline))
        while not self.stopping.is_set():
            claims = self._claim(lambda: self.engine.claim_branches(pipeline, self.process_id, 1), "branches", pipeline)
            if claims is None:
                break
            if claims:
                self.wakeups.notify(CH_ADVANCE, pipeline)  # there may be more: let an idle sibling look too
            for claim in claims:
                self.advancing[threading.get_ident()] = claim
                self.advance(claim)
                self.advancing.pop(threading.get_ident(), None)
            if not claims and not self.stopping.is_set():  # stopping is set before the wake-ups fire
                self.wakeups.wait(CH_ADVANCE, pipeline, wake, idle)

    def advance(self, b: BranchClaim) -> None:
        """Advance one claimed branch; infrastructure failures hand it back, other errors spend its retries."""
        halted: list[int] = []
        completed: list[int] = []
        try:
            self.fault("after_branch_claim")
            halted, completed = self.engine.advance(b)
            self.fault("after_advance")
        except _Rejected:
            return
        except (DatabaseUnavailable, sqlite3.OperationalError, FaultInjected) as exc:
            # Infrastructure: hand the claim back without spending the advancer budget.
            if isinstance(exc, FaultInjected):
                log.warning("advancement of branch %s interrupted: %s", b.id, exc)
            else:
                self.outage.failed(exc)
            with contextlib.suppress(DatabaseUnavailable):
                self._db_retry(lambda: self.engine.release_branch(b, False), self.dead)
            return
        except Exception:
            log.exception("advancing branch %s of run %s failed", b.id, b.run_id,
                          extra={"run": b.run_id, "pipeline": b.pipeline})
            failures = b.advance_failures + 1
            if failures > int(self.config.get("pipeline_advancer.max_retry", b.pipeline)):
                halted = self.engine.halt_branch(b, ADVANCER_RETRIES_EXHAUSTED)
            else:
                self.engine.release_branch(b, True, backoff(failures + 1, 0.1, 30.0))
        for run_id in halted:
            self.engine.notify_halt(run_id)
        for run_id in completed:
            self.engine.notify_complete(run_id, b.pipeline)

    # -- heartbeat & reaper ------------------------------------------------------------
    def heartbeat_loop(self) -> None:
        """Heartbeat every interval; now and then reap dead peers, release orphaned claims and (advancers)
        halt runs of pipelines nobody serves."""
        if not self.wait_booted():   # reaping halts runs (claims): not before the boot is complete
            return
        self.store.mark_urgent()
        interval = float(self.config.get("supervisor.heartbeat_interval"))
        reap_every = min(interval * 2, float(self.config.get("supervisor.reaper_timeout")) / 2)
        next_reap = next_sample = 0.0
        while not self.dead.wait(interval):
            try:
                self.heartbeat()
                if self.spec.advancers and time.monotonic() >= next_sample:   # the charts' history, once a minute
                    next_sample = time.monotonic() + self.sample_history(interval)
                if time.monotonic() >= next_reap:
                    self.reap()
                    self.release_orphans()
                    if self.spec.advancers:
                        self.halt_unknown_pipelines()
                    if self.spec.workers:
                        for pipeline in self.worker_pipelines:
                            self.engine.sweep_blocked(pipeline)
                    next_reap = time.monotonic() + reap_every
                self.outage.ok()
            except (DatabaseUnavailable, sqlite3.OperationalError) as exc:
                self.outage.failed(exc)
            except Exception:
                log.exception("heartbeat failed")

    def sample_history(self, retry: float) -> float:
        """Advancer processes: this minute's sample of the queue and stats (Engine.sample_queue); the seconds
        until the next is due (``retry`` after an outage; a minute after an error, logged: a sample that
        fails never holds up the heartbeat's reaping)."""
        try:
            return self.engine.sample_queue()
        except (DatabaseUnavailable, sqlite3.OperationalError) as exc:   # the heartbeat reports outages
            log.debug("queue sample skipped: %s", first_line(exc))
            return retry
        except Exception:
            log.exception("queue sample failed")
            return 60.0

    def prune_loop(self) -> None:
        """Advancer processes: every prune_interval (jittered, so that peers drift apart), delete the finished
        runs past their retention and roll the counts up. One process prunes at a time (Engine.prune); the others
        skip their turn."""
        if not self.wait_booted():
            return
        interval = float(self.config.get("pipeline_advancer.prune_interval"))
        ages = self.config.retention()
        while not self.stopping.wait(backoff(1, interval, interval, jitter=0.2)):
            try:
                pruned = self.engine.prune(ages, stop=self.stopping)
            except (DatabaseUnavailable, sqlite3.OperationalError) as exc:   # the heartbeat reports outages
                log.debug("pruning skipped: %s", first_line(exc))
                continue
            except Exception:
                log.exception("pruning failed")
                continue
            if pruned:
                log.info("pruned %s", pruned_text(pruned))

    # -- schedules (SPEC §16) --------------------------------------------------------------
    # Every advancer process fires the schedules of the pipelines it advances: no leader. At each tick every one
    # of them asks (Engine.fire_schedule); the schedule's row, locked, and the tick's trigger key let one run
    # through. A process asks about the latest tick at or before the database's clock, so a deployment that was
    # down fires the latest tick it missed, once, and none before it; then it waits until the next tick by the
    # same clock (a host clock ahead or behind shifts nothing).
    def schedules(self, switched_off: bool = False) -> list[tuple[str, "Schedule"]]:
        """The (pipeline, schedule) pairs this process fires: of the pipelines it advances, not switched off in
        config ``schedules`` (``switched_off``: those too, whose ticks it passes without a run)."""
        switches = self.config.data["schedules"]
        return [(name, schedule) for name in self.pipelines if switched_off or switches.get(name, True)
                for schedule in getattr(_REGISTRY.get(name), "schedules", [])]

    def schedule_loop(self) -> None:
        """Advancer processes with schedules: fire each one's due tick, then wait for the next, until stopping."""
        if not self.wait_booted():
            return
        asked: dict[tuple[str, str], float] = {}   # the tick this process asked about last, per schedule
        while not self.stopping.is_set():
            try:
                wait = self.fire_due_schedules(asked)
            except (DatabaseUnavailable, sqlite3.OperationalError) as exc:   # the heartbeat reports outages
                log.debug("schedules skipped: %s", first_line(exc))
                wait = SCHEDULE_RETRY
            except Exception:
                log.exception("firing schedules failed")
                wait = SCHEDULE_RETRY
            self.stopping.wait(wait)

    def fire_due_schedules(self, asked: dict[tuple[str, str], float]) -> float:
        """Fire every schedule whose latest tick this process has not asked about (pass the ticks of those switched
        off); seconds until the next tick (at most SCHEDULE_LOOK: a schedule edited by a deploy, a clock step,
        are seen within it; SCHEDULE_RETRY after one that failed, which the others do not wait for)."""
        now = self.store.now()
        soonest = SCHEDULE_LOOK
        switches = self.config.data["schedules"]
        for name, schedule in self.schedules(switched_off=True):
            tick = schedule.latest_at_or_before(now)
            if tick is not None and asked.get((name, schedule.ident), -1.0) < tick:
                try:
                    run_id = self.engine.fire_schedule(name, schedule, tick, fire=switches.get(name, True))
                except (DatabaseUnavailable, sqlite3.OperationalError):
                    raise   # (an outage: the heartbeat reports it; the loop looks again)
                except Exception as exc:   # (its row held by a paused process past the lock timeout, ...)
                    log.warning("schedule %s of %s: tick %s UTC not fired yet: %s", schedule, name, _ts(tick),
                                first_line(exc), extra={"pipeline": name})
                    soonest = min(soonest, SCHEDULE_RETRY)
                    continue
                asked[(name, schedule.ident)] = tick
                if run_id is not None:
                    log.info("schedule %s of %s fired run %s (tick %s UTC)", schedule, name, run_id, _ts(tick),
                             extra={"run": run_id, "pipeline": name})
            soonest = min(soonest, schedule.next_after(now) - now)
        return max(SCHEDULE_MIN_WAIT, soonest)

    def cancel_watch_loop(self) -> None:
        """Worker processes: look for cancelled runs among the steps this process holds, at once on a cancel's hint
        and every CANCEL_POLL while it holds any (hints can be lost), until the process ends."""
        if not self.wait_booted():
            return
        while not self.dead.is_set():
            self.cancel_hint.wait(CANCEL_POLL)
            self.cancel_hint.clear()
            try:
                self.look_for_cancels()
            except (DatabaseUnavailable, sqlite3.OperationalError) as exc:   # the heartbeat reports outages
                log.debug("looking for cancelled steps failed: %s", first_line(exc))
            except Exception:
                log.exception("looking for cancelled steps failed")

    def look_for_cancels(self) -> int:
        """Answer a cancel about the steps this process holds (see "Cancelling a run"): one not started is
        dropped (it never starts: run_step checks under the same lock) and let go; one running is marked
        stopping and its ``should_stop`` turns true. Returns how many steps it answered for."""
        with self.in_flight_lock:
            held = list(self.in_flight)
        if not held:
            return 0
        mine = {"process_id": self.process_id}
        looked = time.monotonic()
        with self.store.tx(write=False) as t:
            found = dict(t.all(SQL.cancelled_claims.replace("{ids}", BulkSQL.ids(t.dialect, "")),
                               {"ids": BulkSQL.id_list(t.dialect, held)}))
        running, dropped, answer = [], [], []   # answer: those still waiting for this process's answer
        with self.in_flight_lock:
            for step_id, (claim, started) in self.in_flight.items():
                if step_id not in found:
                    if step_id in held:   # still its own as of the look
                        claim.confirmed = max(claim.confirmed, looked)
                    continue
                if started:
                    claim.stop_requested = True
                    running.append(step_id)
                else:
                    claim.dropped = True
                    dropped.append(step_id)
                if found[step_id] == "cancelling":   # (cancelled: taken already, nobody waits for an answer)
                    answer.append(step_id)
        if not found:
            return 0
        if answer:
            with self.store.tx() as t:
                self.engine.share_runs_of_steps(t, "{ids}", {"ids": BulkSQL.id_list(t.dialect, answer)})
                stopping = [step_id for step_id in answer if step_id in running]
                if stopping:
                    t.run(SQL.claims_stopping.replace("{ids}", BulkSQL.ids(t.dialect, "")),
                          {**mine, "ids": BulkSQL.id_list(t.dialect, stopping)})
                let_go = [step_id for step_id in answer if step_id in dropped]
                if let_go:
                    self.engine.unclaim_cancelled(t, "acknowledged",
                                                  {**mine, "ids": BulkSQL.id_list(t.dialect, let_go)})
                    self.engine.unblock_freed(t)
        log.info("cancelled: %d step(s) of cancelled runs stopping, %d not started dropped", len(running),
                 len(dropped))
        return len(running) + len(dropped)

    def heartbeat(self) -> None:
        """Refresh this process's row; register again if a peer reaped it while this process was paused."""
        state = "draining" if self.stopping.is_set() else "running"
        with self.store.tx() as t:
            alive = t.run(SQL.heartbeat, {"state": state, "restarts": self.restarts, "info": self.info_json(),
                                          "id": self.process_id})
        if alive != 1:
            if self.reaped_row != self.process_id:   # once: a registration that fails is tried at every heartbeat
                log.warning("process row %s was reaped while this process was paused; registering again",
                            self.process_id)
                self.reaped_row = self.process_id
            self.register()

    def reap(self) -> int:
        """Reap peers whose heartbeat is older than the reaper timeout: how many."""
        timeout = float(self.config.get("supervisor.reaper_timeout"))
        with self.store.tx(write=False) as t:
            stale = [r[0] for r in t.all(SQL.stale_processes, {"timeout": timeout, "own_id": self.process_id})]
        reaped = 0
        for pid_row in stale:
            if self.engine.reap(pid_row, timeout):
                reaped += 1
        return reaped

    def release_orphans(self) -> int:
        """Claims this process holds that no thread knows of (a claim whose commit reached the
        database but whose reply was lost): old ones go back to the queue, no crash counted."""
        grace = float(self.config.get("supervisor.reaper_timeout"))
        with self.in_flight_lock:
            tracked = set(self.in_flight)
        with self.store.tx(write=False) as t:
            mine = {"process_id": self.process_id, "grace": grace}
            rows = [r for r in t.all(SQL.orphaned_steps, mine) if r[0] not in tracked]
            stuck = t.all(SQL.orphaned_branches, mine)
        released = 0
        for pipeline in {p for _, p in rows}:
            released += self.engine.release(self.process_id, [sid for sid, p in rows if p == pipeline], pipeline)
        branches: list[tuple] = []
        if stuck:
            with self.store.tx() as t:
                branches = t.all(SQL.release_orphaned_branches, mine)
                for pipeline in {p for (p,) in branches}:
                    t.notify(CH_ADVANCE, pipeline)
        if released or branches:
            log.warning("released %d step claim(s) and %d branch claim(s) that no thread held (lost replies)",
                        released, len(branches))
        return released + len(branches)

    def halt_unknown_pipelines(self) -> int:
        """Runs of a pipeline that no live process serves and this app does not define, older
        than ``pipeline_advancer.unknown_pipeline_grace``: their queued steps fail with
        ``pipeline_not_configured`` and the runs halt (revive() re-runs them once it is served)."""
        grace = float(self.config.get("pipeline_advancer.unknown_pipeline_grace"))
        if grace < 0:
            return 0
        reaper = float(self.config.get("supervisor.reaper_timeout"))
        with self.store.tx(write=False) as t:
            candidates = {r[0] for r in t.all(SQL.stale_pipelines, {"grace": grace})}
            served = {p for (row,) in t.all(SQL.live_pipelines, {"window": reaper}) for p in row.split(",") if p}
        halted = 0
        for pipeline in sorted(candidates - served - set(_REGISTRY)):
            claims = self.engine.claim_steps(pipeline, self.process_id, 100)
            why = f"pipeline {pipeline} is not configured in any running process"
            if claims:
                done = self.engine.commit([StepResult(c, False, why, PIPELINE_NOT_CONFIGURED) for c in claims])
                halted += len(done.halted)
                for run_id in done.halted:
                    self.engine.notify_halt(run_id)
                log.warning("%s: halted %d run(s)", why, len(done.halted))
        return halted

    # -- listeners ---------------------------------------------------------------------
    def hint(self, channel: str, payload: str) -> None:
        """A wake-up hint (this process's own commits, LISTEN, LocalWakeups): a cancel's wakes the look for cancelled
        steps, the others an idle thread."""
        if channel == CH_CANCEL:
            self.cancel_hint.set()
        else:
            self.wakeups.notify(channel, payload)

    def listen_loop(self) -> None:
        """Postgres LISTEN as a wake-up hint; polling stays the fallback."""
        channels = {CH_JOBS, CH_ADVANCE, *((CH_CANCEL,) if self.spec.workers else ())}
        conn = None
        # on listen_url: one line when LISTEN fails there, one when it works again (on the database itself,
        # its outage's own lines say it)
        separate, down = self.store.listen_info is not self.store.info, False
        while not self.dead.is_set():
            try:
                if conn is None:
                    conn = self.store.listen_connection()  # a raw pg8000 connection, no transaction
                    for channel in channels:
                        conn.execute_simple(StoreSQL.listen.format(channel=channel))
                    self.wakeups.all()  # we may have missed hints while reconnecting
                    if down and separate:
                        log.info("wake-ups: listening on %s again", self.store.listen_info.display)
                    down = False
                sel = selectors.DefaultSelector()
                sel.register(conn._usock, selectors.EVENT_READ)
                sel.select(timeout=1.0)
                sel.close()
                conn.execute_simple(StoreSQL.ping)   # pumps pending notifications into conn.notifications
                while conn.notifications:
                    _, channel, payload = conn.notifications.popleft()
                    self.hint(channel, payload)
            except Exception as exc:
                if separate and not down and not self.dead.is_set():
                    log.warning("wake-ups: cannot LISTEN on %s (%s); idle threads poll until it answers",
                                self.store.listen_info.display, first_line(exc))
                down = True
                with contextlib.suppress(Exception):
                    conn.close()
                conn = None
                self.dead.wait(1.0)
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def local_listen_loop(self) -> None:
        """SQLite: the wake-up hints other processes' commits send (LocalWakeups)."""
        sock = self.wake_socket = LocalWakeups.listen(self.store.info.path)
        if sock is None:
            return
        try:
            while not self.dead.is_set():
                hint = LocalWakeups.receive(sock)
                if hint is not None:
                    self.hint(*hint)
        finally:
            LocalWakeups.close(sock)

    # -- lifecycle ---------------------------------------------------------------------
    def install_signals(self) -> None:
        """Record TERM, INT, QUIT, TTIN and HUP for the main thread's loop (see the supervisor's signal table)."""
        def record(signum: int, frame: Any) -> None:
            self.signals.put(signum)
            if signum in STOP_SIGNALS:
                self.stop_requested.set()
        for sig in RUNTIME_SIGNALS:
            signal.signal(sig, record)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, RUNTIME_SIGNALS)   # (a recycled predecessor exec'd, them blocked)

    def hooks(self, phase: str) -> None:
        """Run this role's lifecycle hooks of ``phase`` (start | stop; stop in reverse order)."""
        kinds = self.spec.hook_kinds if phase == "start" else tuple(reversed(self.spec.hook_kinds))
        for kind in kinds:
            run_hooks(f"{kind}_{phase}")

    def serve(self) -> int:
        """Run until told to stop; returns the exit code."""
        _PROCESS_ROLE["role"] = self.row_role
        self.hooks("start")
        try:   # waiting for the database at boot: a stop signal ends the wait (nothing claimed yet)
            self._db_retry(lambda: ensure_schema(self.store), self.stop_requested)
            self._db_retry(self.register, self.stop_requested)
        except DatabaseUnavailable:
            if not self.stop_requested.is_set():
                raise
            log.info("%s stopped while it waited for the database to boot", self.row_role)
            self.hooks("stop")
            return EXIT_OK
        self._check_clock()
        _SERVING_PID["pid"] = os.getpid()
        _SERVING_STORE[os.getpid()] = self.store
        self.start_threads()
        self.check_memory_limit()
        self.booted.set()
        self._report(PIPE_READY, str(self.process_id))   # booted only now: every thread runs
        self.systemd.ready(self.status_line())
        log.info("%s started (pid %d, row %d) for %s", self.row_role, os.getpid(), self.process_id,
                 ", ".join(sorted(set(self.pipelines) | set(self.worker_pipelines))) or "no pipelines")
        if self.report_fd is None:  # foreground: no supervisor to state the drain arithmetic
            self.log_drain_arithmetic()
        try:
            code = self.loop()
        finally:
            _SERVING_STORE.pop(os.getpid(), None)
        self.hooks("stop")
        return code

    def log_drain_arithmetic(self) -> None:
        """In the foreground: this role's drain budget and the grace period the orchestrator must give it."""
        drain = drain_arithmetic(self.config, self.spec)
        log.info("drain: this %s gets %ss (%s) after SIGTERM; give the orchestrator at least %ss "
                 "(terminationGracePeriodSeconds / stop_grace_period)", drain.role, drain.budget, drain.key,
                 drain.grace)
        for warning in self.config.warnings():
            log.warning("config: %s", warning)

    def start_threads(self) -> None:
        """Start the threads of thread_plan(); they claim nothing until all of them run (``booted``). One that
        cannot be started (a thread limit) fails the boot: the started ones end, the row goes, nothing claimed."""
        plan = self.thread_plan()
        try:
            for name, target, arg in plan:
                self._spawn(name, target, arg)
        except Exception as exc:
            self.dead.set()
            self.stopping.set()
            self.booted.set()   # releases the started threads, which see ``dead`` and end
            for thread in self.threads:
                thread.join(1.0)
            self._unregister()
            raise DuctworkError(f"could not start thread {len(self.threads)} of {len(plan)}: {first_line(exc)} "
                                f"(lower job_worker.count or raise the thread limit)") from exc

    def wait_booted(self) -> bool:
        """Block until the boot is complete: whether it succeeded (False: it failed, end the thread)."""
        self.booted.wait()
        return not self.dead.is_set()

    def _spawn(self, name: str, target: Callable, arg: Any) -> None:
        """Start one daemon thread (``arg``: its one argument, None for none); a worker or advancer thread runs
        under _guarded. The thread is listed only once it started."""
        if target in (self.worker_loop, self.advancer_loop):
            thread = threading.Thread(target=self._guarded, args=(name, target, arg), name=name, daemon=True)
        else:
            thread = threading.Thread(target=target, args=(arg,) if arg is not None else (), name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def _guarded(self, name: str, target: Callable, arg: Any) -> None:
        """Run a worker or advancer loop; if it dies anyway (a bug: the loops catch what steps and the database
        raise), log it with its traceback, count it, hand its claims back and start a replacement at once."""
        try:
            target(arg)
        except BaseException as exc:  # noqa: B036 - a dead worker thread must never go unnoticed
            self.inert_if_forked(1)
            if self.store.fatal is not None:   # the process stops on it (Runtime.loop): not a bug to report
                return
            with self.in_flight_lock:
                self.thread_restarts += 1
                restarts = self.thread_restarts
            log.error("thread %s died (%s); handing its claims back and starting a replacement (restart %d)", name,
                      type(exc).__name__, restarts, exc_info=(type(exc), exc, exc.__traceback__))
            self._hand_back_thread(threading.get_ident())
            if not self.stopping.is_set():
                self._spawn(name, target, arg)

    def _hand_back_thread(self, ident: int) -> None:
        """The claims of a thread that died: its steps (started: a crash; not started: released) and its
        branch."""
        handed = self._hand_back_in_flight("its worker thread died", ident)
        branch = self.advancing.pop(ident, None)
        if branch is not None:
            with contextlib.suppress(Exception):
                self._db_retry(lambda: self.engine.release_branch(branch, False), self.dead)
        if handed or branch is not None:
            log.warning("handed back %d step(s)%s of the dead thread", handed, " and a branch" if branch else "")

    def inert_if_forked(self, code: int | None = 0) -> None:
        """In a forked copy of this process (a step called os.fork() without exec): end it now, quietly, without
        touching anything of the parent's (connections, pipe, claims). A no-op in the process itself."""
        if os.getpid() == self.pid:
            return
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code if isinstance(code, int) else (0 if code is None else 1))

    def loop(self) -> int:
        """The main thread: report alive each tick, drain when the supervisor is gone, act on recorded signals."""
        tick = min(1.0, float(self.config.get("supervisor.heartbeat_interval")))
        while True:
            self._report(PIPE_ALIVE, str(len(self.in_flight)))
            self.proof.touch(self.row_role)
            if self.systemd.address:   # (no status line built for nobody)
                self.systemd.ping()
                self.systemd.status(self.status_line())
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                log.warning("supervisor (pid %d) is gone; draining", self.parent_pid)
                return self.drain()
            if self.store.fatal is not None:   # nothing more may be done (the Store said why, or says it now)
                return self.stop_fatal(self.store.fatal)
            if self.recycle is not NEVER_RECYCLE and not self.recycled:
                why = self.recycle_reason()
                if why:
                    self.begin_recycle(why)
            try:
                signum = self.signals.get(timeout=min(tick, self.systemd.until_ping()))
            except queue.Empty:
                continue
            if signum in (signal.SIGTERM, signal.SIGINT, RECYCLE_WAKE):
                return self.drain()
            if signum == signal.SIGQUIT:
                return self.quit()
            if signum == signal.SIGTTIN:
                dump_threads(self.row_role)

    def status_line(self) -> str:
        """What systemd's STATUS= says of this process."""
        pipelines = ", ".join(sorted(set(self.pipelines) | set(self.worker_pipelines))) or "no pipelines"
        return f"{self.row_role} for {pipelines}: {len(self.in_flight)} step(s) in flight"

    def drain(self) -> int:
        """Stop claiming, give in-flight steps the drain budget, hand back the rest, exit (to be recycled: the
        supervisor is told first, and starts the replacement beside it)."""
        started = time.monotonic()
        if self.recycled:
            self._report(PIPE_RECYCLE, self.recycled)
            self.systemd.reloading(f"recycling: {self.recycled}")
        else:
            self.systemd.stopping(f"draining {len(self.in_flight)} step(s) in flight")
        self.stopping.set()
        self.wakeups.all()
        deadline = started + float(self.config.get(self.spec.shutdown_timeout))
        tick = min(1.0, float(self.config.get("supervisor.heartbeat_interval")))
        for thread in self.threads:
            if thread.name.endswith(SERVICE_THREADS) or thread.ident in self.abandoned:   # (see SERVICE_THREADS;
                continue                                                                  # abandoned: step timeouts)
            while thread.is_alive() and time.monotonic() < deadline:   # alive for the supervisor's hang check and
                thread.join(min(deadline - time.monotonic(), tick, self.systemd.until_ping()))   # systemd's watchdog
                self._report(PIPE_ALIVE, str(len(self.in_flight)))
                self.systemd.ping()
        handed = self._hand_back_in_flight("drain deadline passed")
        self.dead.set()
        self._unregister()
        log.info("drained in %.2fs (%d step(s) handed back)%s", time.monotonic() - started, handed,
                 " to be recycled" if self.recycled else "")
        return EXIT_OK

    def stop_fatal(self, exc: DuctworkError) -> int:
        """An error that ends the process (Store.fatal): stop at once; exit 2 for a configuration error
        (the supervisor then stops the deployment), else 1. A replaced SQLite file was logged by the Store."""
        self.stopping.set()
        self.dead.set()
        if isinstance(exc, ConfigError):
            log.error("%s", exc)
        return fatal_exit_code(exc)

    def quit(self) -> int:
        """QUIT: stop claiming, hand every in-flight step back at once, exit."""
        self.systemd.stopping("quit: handing the steps in flight back")
        self.stopping.set()
        handed = self._hand_back_in_flight("quit")
        self.dead.set()
        self._unregister()
        log.info("quit: %d step(s) handed back", handed)
        return EXIT_OK

    def _hand_back_in_flight(self, why: str, owner: int | None = None) -> int:
        """At the drain deadline (or of the thread ``owner`` that died): started steps are closed as crashes,
        unstarted ones released."""
        with self.in_flight_lock:
            entries = [e for sid, e in self.in_flight.items() if owner is None or self.owners.get(sid) == owner]
        started = [c for c, running in entries if running]
        unstarted = [c for c, running in entries if not running]
        handed = 0
        if entries:
            self.store.close()  # idle connections date from register(): a server restart since then broke them
        try:
            for process_id in {c.process_id for c in started}:
                ids = [c.step_id for c in started if c.process_id == process_id]
                handed += self.engine.hand_back(process_id, ids, why)
            for c in unstarted:
                self.engine.release(c.process_id, [c.step_id], c.pipeline)
        except Exception as exc:
            log.warning("could not hand back %d step(s): %s (a peer reaps them later)", len(entries), exc)
        self._untrack([c for c, _ in entries])
        return handed

    def _report(self, kind: str, text: str = "") -> None:
        """Tell the supervisor (a forked child only; PIPE_*); never blocks, gives up once the pipe is gone."""
        if self.report_fd is None:
            return
        try:
            os.write(self.report_fd, pipe_encode(kind, text))
        except BlockingIOError:
            pass
        except OSError:
            self.report_fd = None

    def _check_clock(self) -> None:
        """Warn when this host's clock and the database's differ by more than 5 s."""
        try:
            skew, _ = clock_skew(self.store, samples=1)
        except Exception:
            return
        if abs(skew) > 5:
            log.warning("host clock differs from the database clock by %.1fs; ductwork uses the database clock", skew)


# -- run_inline (SPEC §19) ----------------------------------------------------------------
# A test runs a pipeline to its end on its own thread through the same engine, SQL and step runner as a worker
# and an advancer (Runtime.run_step, _commit_results, advance): only the claim differs. It takes the run's own
# rows (SQL.claim_run_steps, claim_run_branches), none of another run even on a shared database, and at once
# whatever they wait for, so retry delays, `sleep` and a delayed start are skipped; a branch parked for a signal
# is left parked until the signal comes. It claims under a process row of its own (deleted at the end, with
# whatever it still held handed back), heartbeating between steps.
class InlineRunner:
    """Runs one run's steps and advancements on the calling thread until it can go no further."""

    def __init__(self, config: Config, pipeline: str, replaced: dict[str, Any]):
        self.runtime = Runtime(config, "worker", [pipeline])
        self.runtime.replaced, self.runtime.caller_thread = replaced, True
        if self.runtime.lane is not None:   # (an async step runs on a loop of its own, here: Runtime._call)
            self.runtime.lane.close()
            self.runtime.lane = None
        self.pipeline = pipeline
        self.beat_every = float(config.get("supervisor.heartbeat_interval"))

    def drive(self, run_id: int) -> None:
        """Claim, run and commit the run's steps, and advance its branches, one at a time, until none is left."""
        rt = self.runtime
        rt.register()
        rt.booted.set()
        try:
            beaten = time.monotonic()
            while True:
                if time.monotonic() - beaten >= self.beat_every:
                    rt.heartbeat()
                    beaten = time.monotonic()
                steps, branches = rt.engine.claim_run(run_id, self.pipeline, rt.process_id)
                for c in steps:
                    rt._track([c])
                    result = rt.run_step(c)
                    if result is not None:
                        rt._commit_results([result], 0)
                for b in branches:
                    rt.advance(b)
                if not steps and not branches:
                    return
        finally:
            with contextlib.suppress(Exception):
                rt.engine.retire(rt.process_id, "run_inline ended holding it")
            rt.store.close()


def dump_threads(role: str) -> None:
    """TTIN: print every thread's stack, labelled by its name, to stdout."""
    frames = sys._current_frames()
    out = [f"=== ductwork thread dump: pid {os.getpid()} role {role} ==="]
    for thread in threading.enumerate():
        out.append(f"--- {thread.name} (pid {os.getpid()}, role {role})")
        frame = frames.get(thread.ident or -1)
        if frame is not None:
            out.extend(line.rstrip() for line in traceback.format_stack(frame))
    print("\n".join(out), flush=True)


# =====================================================================================
# supervisor: the pre-fork process manager (single-threaded, one selectors loop)
# =====================================================================================
# Shape borrowed from gunicorn's arbiter: signal handlers only queue the signal and write
# a byte to a wake-up pipe; one loop selects on that pipe and on one pipe per child
# (children write a line every tick of their control loop: that is how hangs are seen),
# then handles queued signals, reaps exited children (waitpid), kills silent ones,
# starts due children and writes the heartbeat. Nothing here runs in a thread.
#
# signal        the supervisor                                  a Runtime (a child, or a foreground role)
# TERM, INT     drain: TERM to every child, wait for them up    drain: stop claiming, give in-flight steps the
#               to supervisor.shutdown_timeout, then SIGKILL    role's shutdown_timeout, hand back the rest, exit 0
# 2nd TERM/INT  SIGKILL every child, hand its work back, exit   ignored: the drain goes on
# QUIT          as a second TERM                                hand every in-flight step back at once, exit 0
# TTIN          dump its thread stacks, send TTIN to every      dump its thread stacks to stdout
#               child
# HUP           rolling restart: re-import the app, start new   ignored (the supervisor TERMs the old children
#               children, TERM the old ones (not while          itself)
#               shutting down)
# CHLD          nothing: it only wakes the loop, which reaps    not handled (a Runtime forks nothing)
#               (waitpid) every turn
#
# Three signal mechanisms, one rule: a handler only records the signal, and the code that acts on it runs
# in the ordinary flow of one thread. The supervisor has no threads and already sleeps in a selectors loop,
# so its handler appends to a list and writes a byte to the self-pipe that the loop selects on. A Runtime's
# main thread has nothing to select on (its threads do the work); its handler puts the signal into a
# SimpleQueue that the main thread blocks on, a tick at a time. The dashboard's main thread only waits for
# the end, so its handler sets an Event.

BOOT_BACKOFF_START, BOOT_BACKOFF_CAP = 0.5, 30.0


@record
class ChildSpec:
    """One child the supervisor keeps alive: the advancer, or the worker of one pipeline."""
    key: str                      # "advancer" | "worker:<Pipeline>"
    role: str                     # its Runtime's mode: advancer | worker
    pipelines: list[str]          # the pipelines it serves (the advancer: all of them)
    restarts: int = 0             # how often it was started again (crashes and failed boots)
    recycles: int = 0             # how often it was replaced on its own word (job_worker.recycle): no restart
    boot_failures: int = 0        # failed boots in a row (reset once one boots)
    next_start: float = 0.0       # monotonic time when it may start again
    last_error: str = ""          # the last failed boot's error line


@record
class Child:
    """One forked child process of a ChildSpec."""
    spec: ChildSpec
    pid: int
    fd: int                       # the read end of its pipe
    started: float                # monotonic time of the fork
    last_seen: float              # monotonic time of its last pipe message (hang_timeout counts from here)
    row_id: int | None = None     # its process row, once it reported PIPE_READY
    ready: bool = False           # it booted: a death from now on is a crash, not a failed boot
    buffer: bytes = b""           # a partial line read from its pipe
    killed_for: str = ""          # why the supervisor killed it, if it did
    retiring: bool = False        # an old generation's child, draining after a HUP
    recycling: str = ""           # why it drains to be recycled (PIPE_RECYCLE): its replacement runs already
    in_flight: int = 0            # steps in flight, as its last PIPE_ALIVE said (systemd's STATUS=)


class Supervisor:
    """Forks one advancer and one job worker per pipeline, keeps them alive, drains them."""

    def __init__(self, config: Config, pipelines: list[str]):
        """A supervisor of the advancer and one worker per pipeline; it forks nothing until run()."""
        self.config = config
        self.role = ROLE_MODES["supervisor"]
        self.specs = [ChildSpec("advancer", "advancer", list(pipelines))]
        self.specs += [ChildSpec(f"worker:{p}", "worker", [p]) for p in pipelines]
        self.children: dict[int, Child] = {}
        self.signals: list[int] = []
        self.stop_requested = threading.Event()   # a stop signal arrived: the boot's wait for the database ends
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.selector.register(self.wake_r, selectors.EVENT_READ, None)
        self.store = Store(config.data["database_url"])   # one connection: the supervisor is single-threaded
        self.engine = Engine(self.store, config)
        self.outage = Outage(settle=2 * float(config.get("supervisor.heartbeat_interval")))
        self.row_id = 0
        self.reaped_row = 0   # the row id last found reaped (logged once, however often registering fails)
        self.machine = machine_identifier()
        self.proof = LocalProof.of(self.machine, self.store.info)
        self.stopping_since: float | None = None
        self.exit_code = EXIT_OK
        self.next_heartbeat = 0.0
        # systemd (Type=notify): taken from the environment before any fork; READY=1 once every child booted
        self.systemd = SystemdNotifier()
        self.ready_sent = False

    # -- entry point --------------------------------------------------------------------
    def run(self) -> int:
        """Boot, fork the children, loop until they are all gone after a shutdown; the exit code."""
        _PROCESS_ROLE["role"] = self.role.row_role
        try:
            self.hooks("start")
        except HookFailed as exc:
            log.error("supervisor boot failed: %s", exc)
            return EXIT_FAILURE
        self.install_signals()   # before the boot: a stop signal ends its wait for the database
        try:
            self.outage.retry(lambda: ensure_schema(self.store), give_up=self.stop_requested)
            self.outage.retry(self.register, give_up=self.stop_requested)
        except DatabaseUnavailable:
            if not self.stop_requested.is_set():
                raise
            log.info("supervisor stopped while it waited for the database to boot")
            self.hooks("stop")
            return EXIT_OK
        self.store.close()
        self.log_drain_arithmetic()
        log.info("supervisor started (pid %d, row %d) on %s: %d child(ren)", os.getpid(), self.row_id,
                 self.store.info.display, len(self.specs))
        for spec in self.specs:
            self.spawn(spec)
        while self.children or self.stopping_since is None:
            self.loop_once()
        self._with_db(self._delete_row)
        self.store.close()
        self.hooks("stop")
        log.info("supervisor stopped (exit %d)", self.exit_code)
        return self.exit_code

    def hooks(self, phase: str) -> None:
        """Run the supervisor's lifecycle hooks of ``phase`` (start | stop)."""
        kinds = self.role.hook_kinds if phase == "start" else tuple(reversed(self.role.hook_kinds))
        for kind in kinds:
            run_hooks(f"{kind}_{phase}")

    def loop_once(self) -> None:
        """One turn: wait for a pipe, then signals, reaping, hangs, starts or the deadline, the heartbeat."""
        for key, _ in self.selector.select(self.next_timeout()):
            if key.fd == self.wake_r:
                self._drain_wake_pipe()
            else:
                self.read_child(key.data)
        self.handle_signals()
        self.reap_children()
        self.kill_hung_children()
        if self.stopping_since is None:
            self.start_due_children()
        else:
            self.enforce_shutdown_deadline()
        self.maybe_heartbeat()
        self.tell_systemd()

    def tell_systemd(self) -> None:
        """Each turn: WATCHDOG=1 when due, READY=1 once every child of this generation booted, STATUS= when it
        changed. Nothing without NOTIFY_SOCKET."""
        if not self.systemd.address:
            return
        self.systemd.ping()
        current = [c for c in self.children.values() if not (c.retiring or c.recycling)]
        ready = sum(c.ready for c in current)
        if self.stopping_since is None and not self.ready_sent and ready == len(self.specs):
            self.ready_sent = True
            self.systemd.ready(self.status_line(ready))
        elif self.ready_sent:
            self.systemd.status(self.status_line(ready))

    def status_line(self, ready: int) -> str:
        """What systemd's STATUS= says of the deployment."""
        in_flight = sum(c.in_flight for c in self.children.values())
        restarts, recycles = sum(s.restarts for s in self.specs), sum(s.recycles for s in self.specs)
        return (f"{ready}/{len(self.specs)} children ready, {in_flight} step(s) in flight, "
                f"{restarts} restart(s), {recycles} recycled")

    def next_timeout(self) -> float:
        """How long the loop may sleep: until the next heartbeat, due start or polling timeout."""
        now = time.monotonic()
        timeout = min(float(self.config.get("supervisor.polling_timeout")), self.systemd.until_ping())
        pending = [s.next_start for s in self.specs if not self._running(s) and s.next_start > now]
        if pending and self.stopping_since is None:
            timeout = min(timeout, max(0.0, min(pending) - now))
        return max(0.0, min(timeout, self.next_heartbeat - now))

    # -- signals ------------------------------------------------------------------------
    def signal_handlers(self) -> dict[int, Callable[[int], None]]:
        """The signals the supervisor handles, each with its handle_<signal> method (the table above)."""
        return {signal.SIGTERM: self.handle_term, signal.SIGINT: self.handle_term,
                signal.SIGQUIT: self.handle_quit, signal.SIGTTIN: self.handle_ttin,
                signal.SIGHUP: self.handle_hup, signal.SIGCHLD: self.handle_chld}

    def install_signals(self) -> None:
        """Install the record-only handler for every signal of signal_handlers()."""
        for sig in self.signal_handlers():
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        """The handler: record the signal and wake the loop (and a boot's wait), nothing else."""
        self.signals.append(signum)
        if signum in STOP_SIGNALS:
            self.stop_requested.set()
        with contextlib.suppress(OSError):
            os.write(self.wake_w, b"!")

    def _drain_wake_pipe(self) -> None:
        """Empty the self-pipe (its bytes only woke the loop)."""
        with contextlib.suppress(OSError):
            while os.read(self.wake_r, 4096):
                pass

    def handle_signals(self) -> None:
        """Act on the recorded signals, oldest first."""
        handlers = self.signal_handlers()
        while self.signals:
            signum = self.signals.pop(0)
            handlers[signum](signum)

    def handle_term(self, signum: int) -> None:
        """TERM or INT: drain; a second one: stop now."""
        if self.stopping_since is None:
            self.begin_shutdown(f"received {signal.Signals(signum).name}")
        else:
            log.warning("second %s: stopping now", signal.Signals(signum).name)
            self.quit_now()

    def handle_quit(self, signum: int) -> None:
        """QUIT: stop now."""
        self.quit_now()

    def handle_ttin(self, signum: int) -> None:
        """TTIN: dump this process's threads, and have every child dump its own."""
        dump_threads(self.role.row_role)
        self.signal_children(signal.SIGTTIN)

    def handle_hup(self, signum: int) -> None:
        """HUP: a rolling restart (not while shutting down)."""
        if self.stopping_since is None:
            self.rolling_restart()

    def handle_chld(self, signum: int) -> None:
        """CHLD: nothing to do; it woke the loop, and the loop reaps every turn (reap_children)."""

    def begin_shutdown(self, why: str, code: int = EXIT_OK) -> None:
        """Start draining: TERM every child; the loop ends when they are gone (or the deadline kills them)."""
        log.info("shutting down (%s): draining %d child(ren), up to %ss", why, len(self.children),
                 self.config.get("supervisor.shutdown_timeout"))
        self.stopping_since = time.monotonic()
        self.exit_code = max(self.exit_code, code)
        self.systemd.stopping(f"draining {len(self.children)} child(ren) ({why})")
        self.signal_children(signal.SIGTERM)

    def quit_now(self) -> None:
        """QUIT or a second TERM: SIGKILL every child, hand its work back, exit."""
        if self.stopping_since is None:
            self.stopping_since = time.monotonic()
            self.systemd.stopping("quit: killing the children")
        for child in list(self.children.values()):
            child.killed_for = "quit"
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while self.children and time.monotonic() < deadline:
            self.reap_children(block=True)

    def signal_children(self, signum: int) -> None:
        """Send ``signum`` to every child."""
        for child in self.children.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)

    def rolling_restart(self) -> None:
        """HUP: re-import the app, start fresh children, then drain the old ones."""
        log.info("HUP: re-importing the app and restarting children")
        for target in self.config.data["app"] or []:
            name = os.path.splitext(os.path.basename(target))[0] if target.endswith(".py") else target
            module = sys.modules.get(name)
            if module is not None:
                try:
                    importlib.reload(module)
                except Exception as exc:
                    log.error("HUP: re-importing %s failed, keeping the running code: %s", target, exc)
                    return
        old = list(self.children.values())
        for child in old:
            child.retiring = True
        self.systemd.reloading()   # READY=1 again once the new children booted (tell_systemd)
        self.ready_sent = False
        for spec in self.specs:
            self.spawn(spec)
        for child in old:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)

    # -- children -----------------------------------------------------------------------
    def _running(self, spec: ChildSpec) -> bool:
        """Whether a current child of ``spec`` is alive (not one of an old generation, nor one being recycled)."""
        return any(c.spec is spec and not (c.retiring or c.recycling) for c in self.children.values())

    def start_due_children(self) -> None:
        """Start every child that is not running and whose backoff has passed."""
        now = time.monotonic()
        for spec in self.specs:
            if not self._running(spec) and spec.next_start <= now:
                self.spawn(spec)

    def spawn(self, spec: ChildSpec) -> None:
        """Fork one child of ``spec`` and watch its pipe."""
        read_fd, write_fd = os.pipe()
        self.store.close()  # never hold a database connection across fork
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            os.close(read_fd)
            code = EXIT_FAILURE
            try:
                code = self._child_main(spec, write_fd)
            except BaseException as exc:  # noqa: B036 - report any boot failure to the supervisor
                self._child_failed(spec, write_fd, exc)
                if isinstance(exc, ConfigError):
                    code = EXIT_USAGE
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        now = time.monotonic()
        child = Child(spec, pid, read_fd, now, now)
        self.children[pid] = child
        self.selector.register(read_fd, selectors.EVENT_READ, child)
        log.info("started %s (pid %d)%s", spec.key, pid, f", restart {spec.restarts}" if spec.restarts else "")

    def _child_main(self, spec: ChildSpec, write_fd: int) -> int:
        """In the child: drop the supervisor's descriptors and signal handlers, then serve as a Runtime."""
        os.set_blocking(write_fd, False)  # a stopped supervisor must never block a child's report
        self.selector.close()
        for fd in (self.wake_r, self.wake_w):
            os.close(fd)
        for other in self.children.values():
            with contextlib.suppress(OSError):
                os.close(other.fd)
        for sig in (signal.SIGCHLD, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        _PROCESS_ROLE["role"] = ROLE_MODES[spec.role].row_role
        _APP.engine = None   # the supervisor's, if it made one: the child's steps use its Runtime's pool
        Fault()("boot")
        runtime = Runtime(self.config, spec.role, spec.pipelines, parent_row=self.row_id, report_fd=write_fd,
                          restarts=spec.restarts, recycles=spec.recycles)
        runtime.install_signals()
        return runtime.serve()

    @staticmethod
    def _child_failed(spec: ChildSpec, write_fd: int, exc: BaseException) -> None:
        """In the child: report the error that ended it to the supervisor (PIPE_ERROR) and log it."""
        message = mask(f"{type(exc).__name__}: {exc}")
        with contextlib.suppress(OSError):
            os.write(write_fd, pipe_encode(PIPE_ERROR, message))
        if not isinstance(exc, (HookFailed, SystemExit, ConfigError)):
            log.exception("%s child failed", spec.key)
        else:
            log.error("%s child failed to boot: %s", spec.key, message)

    def read_child(self, child: Child) -> None:
        """Read a child's pipe: any line proves it alive; PIPE_READY and PIPE_ERROR carry news."""
        try:
            data = os.read(child.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # EOF: the child is exiting; waitpid tells us how
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(child.fd)
            return
        child.last_seen = time.monotonic()
        child.buffer += data
        *lines, child.buffer = child.buffer.split(b"\n")
        for line in lines:
            kind, text = pipe_decode(line)
            if kind == PIPE_READY:
                child.ready, child.row_id = True, int(text)
            elif kind == PIPE_ALIVE and text.isdigit():
                child.in_flight = int(text)
            elif kind == PIPE_ERROR:
                child.spec.last_error = text
            elif kind == PIPE_RECYCLE and not child.recycling:
                self.recycling(child, text)

    def recycling(self, child: Child, why: str) -> None:
        """A child drains to be recycled: the loop starts its replacement this turn (no restart, no backoff)."""
        child.recycling = why or "recycling"
        if child.retiring or self.stopping_since is not None:
            return
        child.spec.recycles += 1
        child.spec.next_start = 0.0
        log.info("%s (pid %d) recycles (%s): starting its replacement", child.spec.key, child.pid, child.recycling)

    def reap_children(self, block: bool = False) -> None:
        """waitpid every exited child (``block``: wait for one)."""
        while True:
            try:
                pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is not None:  # as PID 1 we also reap orphans that are not ours
                self.child_exited(child, status)
            if block:
                return

    def child_exited(self, child: Child, status: int) -> None:
        """A child is gone: close its pipe, hand its work back, then log the exit, back off a failed boot or
        replace a crashed child at once."""
        self.close_pipe(child)
        how = exit_description(status)
        handed = self.hand_back(child)
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_USAGE and not child.retiring:
            self.stop_if_fatal(f"{child.spec.key} (pid {child.pid}) stopped on a configuration error: "
                               f"{child.spec.last_error or how}")
        if self.stopping_since is not None or child.retiring or child.recycling:
            self.log_exit(child, how, handed)
        elif not child.ready:
            self.boot_failed(child, how)
        else:
            self.crashed(child, how, handed, clean=os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0)

    def close_pipe(self, child: Child) -> None:
        """Read what is left in a dead child's pipe, then close it."""
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(child.fd)
        with contextlib.suppress(OSError):
            self.read_child(child)
            os.close(child.fd)

    def log_exit(self, child: Child, how: str, handed: int) -> None:
        """An exit while shutting down, retiring or recycling: expected, only logged."""
        log.info("%s (pid %d) exited%s: %s%s", child.spec.key, child.pid, " (recycled)" if child.recycling else "",
                 how, f"; {handed} step(s) handed back" if handed else "")

    def boot_failed(self, child: Child, how: str) -> None:
        """It died before it finished booting: start it again after a backoff, or give up after
        supervisor.max_boot_failures failures in a row."""
        spec = child.spec
        spec.restarts += 1
        spec.boot_failures += 1
        spec.last_error = spec.last_error or how
        limit = int(self.config.get("supervisor.max_boot_failures"))
        if limit and spec.boot_failures >= limit:
            log.error("%s failed to boot %d times in a row; giving up. last error: %s", spec.key,
                      spec.boot_failures, spec.last_error)
            self.begin_shutdown(f"{spec.key} keeps failing to boot", EXIT_FAILURE)
            return
        delay = backoff(spec.boot_failures, BOOT_BACKOFF_START, BOOT_BACKOFF_CAP)
        spec.next_start = time.monotonic() + delay
        detail = how if spec.last_error == how else f"{how}; {spec.last_error}"
        log.warning("%s (pid %d) failed to boot (%s); retrying in %.1fs", spec.key, child.pid, detail, delay)

    def crashed(self, child: Child, how: str, handed: int, clean: bool) -> None:
        """It ran fine before: the loop replaces it at once."""
        spec = child.spec
        spec.restarts += 1
        spec.boot_failures, spec.last_error, spec.next_start = 0, "", 0.0
        why = child.killed_for or ("exited cleanly" if clean else "crashed")
        log.warning("%s (pid %d) %s (%s); %d step(s) handed back; restarting", spec.key, child.pid, why, how,
                    handed)

    def hand_back(self, child: Child) -> int:
        """Re-enqueue the dead child's in-flight steps and release its branches, now."""
        def work() -> int:
            with self.store.tx(write=False) as t:
                rows = t.all(SQL.rows_of_child, {"parent_id": self.row_id, "pid": child.pid})
            ids = {r[0] for r in rows} | ({child.row_id} if child.row_id else set())
            return sum(self.engine.retire(row, f"{child.spec.key} process died") for row in ids)
        return self._with_db(work) or 0

    def kill_hung_children(self) -> None:
        """SIGKILL every child that has been silent on its pipe for longer than supervisor.hang_timeout."""
        limit = float(self.config.get("supervisor.hang_timeout"))
        now = time.monotonic()
        for child in self.children.values():
            if not child.killed_for and now - child.last_seen > limit:
                child.killed_for = f"was silent for {now - child.last_seen:.1f}s (hang_timeout {limit}s), killed"
                log.warning("%s (pid %d) %s", child.spec.key, child.pid, child.killed_for)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)
                    os.kill(child.pid, signal.SIGCONT)

    def enforce_shutdown_deadline(self) -> None:
        """Past supervisor.shutdown_timeout: SIGKILL every child still running."""
        assert self.stopping_since is not None
        if time.monotonic() - self.stopping_since < float(self.config.get("supervisor.shutdown_timeout")):
            return
        for child in self.children.values():
            if not child.killed_for:
                child.killed_for = "shutdown deadline passed"
                log.warning("%s (pid %d) still running at the shutdown deadline: SIGKILL", child.spec.key, child.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)

    # -- database: own row, heartbeat --------------------------------------------------
    def _with_db(self, fn: Callable[[], Any]) -> Any:
        """One try of ``fn`` from the loop (Outage.retry, not forever): None on an outage or another database
        error (logged: a peer's reaper covers it; e.g. a Postgres deadlock, 40P01, is never fatal here)."""
        return self.outage.retry(fn, forever=False, on_error=self._db_error)

    def _db_error(self, exc: Exception) -> None:
        """Log a database error of the supervisor loop, which goes on (a configuration error stops it)."""
        if not isinstance(exc, ConfigError):
            log.error("database error in the supervisor loop (a peer's reaper covers it): %s", first_line(exc))

    def stop_if_fatal(self, child_error: str | None = None) -> None:
        """Stop the deployment (once) for an error that ends it: the Store's own (a replaced SQLite file, a
        pooler behind a URL without pgbouncer=true), or a child's configuration error (it exited 2)."""
        if self.stopping_since is not None:
            return
        if child_error is not None:
            log.error("%s", child_error)
            self.begin_shutdown("a child stopped on a configuration error", EXIT_USAGE)
        elif self.store.fatal is not None:   # a replaced file's line is logged already: stop, not restart
            if isinstance(self.store.fatal, ConfigError):
                log.error("%s", self.store.fatal)
            self.begin_shutdown("the database cannot be used (see above)", fatal_exit_code(self.store.fatal))

    def register(self) -> None:
        """Insert the supervisor's process row (its children's rows name it as their parent)."""
        with self.store.tx() as t:   # the id is the supervisor's only once the row is committed
            row_id = int(t.one(SQL.register_process, {
                "pid": os.getpid(), "machine": self.machine, "role": self.role.row_role,
                "pipelines": ",".join(s.pipelines[0] for s in self.specs if ROLE_MODES[s.role].workers),
                "parent_id": None, "state": "running", "restarts": 0, "info": self.info_json()})[0])
        self.row_id = row_id

    def info_json(self) -> str:
        """The row's ``info``: per child its pid, restarts, boot failures, restart delay and last error."""
        now = time.monotonic()
        return _dumps({"children": {s.key: {"pid": next((c.pid for c in self.children.values() if c.spec is s), None),
                                            "restarts": s.restarts, "recycles": s.recycles,
                                            "boot_failures": s.boot_failures,
                                            "restart_in": round(max(0.0, s.next_start - now), 2),
                                            "last_error": s.last_error} for s in self.specs}})

    def maybe_heartbeat(self) -> None:
        """Every heartbeat interval: touch the local heartbeat file, then refresh the row (re-registering)."""
        now = time.monotonic()
        if now < self.next_heartbeat:
            return
        self.next_heartbeat = now + float(self.config.get("supervisor.heartbeat_interval"))

        def beat() -> None:
            state = "draining" if self.stopping_since is not None else "running"
            restarts = sum(s.restarts for s in self.specs)
            with self.store.tx() as t:
                alive = t.run(SQL.heartbeat, {"state": state, "restarts": restarts, "info": self.info_json(),
                                              "id": self.row_id})
            if alive != 1:  # outside the heartbeat transaction: register() opens its own
                if self.reaped_row != self.row_id:   # once: a registration that fails is tried at every heartbeat
                    log.warning("supervisor row %s was reaped while paused; registering again", self.row_id)
                    self.reaped_row = self.row_id
                self.register()
        # proof of looping, even when the database is down
        self.proof.touch(self.role.row_role)
        self._with_db(beat)
        self.stop_if_fatal()

    def _delete_row(self) -> None:
        """Delete the supervisor's row and its local heartbeat file (at the end of run())."""
        with self.store.tx() as t:
            t.run(SQL.delete_process, {"id": self.row_id})
        self.proof.remove(self.role.row_role)

    def log_drain_arithmetic(self) -> None:
        """At boot: the drain budgets, and the grace period the process manager must give the supervisor."""
        drain = drain_arithmetic(self.config, self.role)
        log.info("drain: job workers get %ss for in-flight steps < supervisor waits %ss < give the process manager "
                 "at least %ss (e.g. Kubernetes terminationGracePeriodSeconds, systemd TimeoutStopSec)",
                 drain.worker, drain.budget, drain.grace)
        for warning in self.config.warnings():
            log.warning("config: %s", warning)


def exit_description(status: int) -> str:
    """A waitpid status in words: "signal SIGKILL" or "exit 1"."""
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit {os.WEXITSTATUS(status)}"


# =====================================================================================
# health & status: the liveness verdict (database rows, local fallback), the status report, doctor
# =====================================================================================


STATUS_ERROR_LINE = 300   # characters of an error's first line that status and the dashboard's summaries show


@record
class Counts:
    """The counts (see "Counts (migration 2)"), each keyed by (pipeline, label)."""

    runs: dict[tuple[str, str], int]       # runs in each status now
    pruned: dict[tuple[str, str], int]     # runs pruned, by the status they had
    executed: dict[tuple[str, str], int]   # step executions, by outcome
    reopened: dict[tuple[str, str], int]   # runs revive() took out of a finished status, by that status
    triggered: dict[str, int]              # every run ever, per pipeline (pruned or not)

    @classmethod
    def read(cls, t: Tx) -> Counts:
        counts: dict[str, dict[tuple[str, str], int]] = {"runs": {}, "pruned": {}, "executed": {}, "reopened": {},
                                                         "triggered": {}}
        if t.dialect == "postgres":
            t.run(SQL.plain_plans)
        for pipeline, name, label, value in t.all(SQL.counters):
            if name in counts:   # (a name of a newer version's, during a rolling upgrade: not this one's to show)
                counts[name][pipeline, label] = int(value)
        triggered = {pipeline: n for (pipeline, _), n in counts.pop("triggered").items()}
        for pipeline, n in triggered.items():   # completed: what the rest leaves
            gone = sum(m for (p, _), m in counts["pruned"].items() if p == pipeline)
            counted = sum(m for (p, _), m in counts["runs"].items() if p == pipeline)
            counts["runs"][pipeline, "completed"] = n - gone - counted
        return cls(**counts, triggered=triggered)

    def pipelines(self) -> set[str]:
        """Every pipeline that ever had a run."""
        return {pipeline for pipeline, _ in (*self.runs, *self.pruned)}

    def finished(self) -> dict[tuple[str, str], int]:
        """Per (pipeline, finished status): every time a run entered it, ever: the runs in it now, those pruned from
        it, those revive() took out of it. Only ever goes up."""
        out: dict[tuple[str, str], int] = {}
        for source in (self.runs, self.pruned, self.reopened):
            for (pipeline, status), n in source.items():
                if status in FINISHED_STATUSES:
                    out[pipeline, status] = out.get((pipeline, status), 0) + n
        return out


STATUS_WAITS = 10   # the parked branches status lists one by one (the dashboard's run page shows each)


def status_report(engine: Engine) -> dict:
    """The status report: processes, run counts per pipeline and status, what waits (branches for a signal, steps
    asleep, the first STATUS_WAITS parked branches), the delayed runs still to start, recent halts and errors."""
    with engine.store.tx(write=False) as t:
        procs = t.all(SQL.processes)
        counts = Counts.read(t)
        halts = t.all(SQL.recent_halts, {"limit": 10})
        errors = t.all(SQL.recent_errors, {"limit": 10})
        scheduled = t.all(SQL.scheduled_runs)
        runs: dict[str, dict[str, int]] = {}
        for (pipeline, status), n in counts.runs.items():
            if n:
                runs.setdefault(pipeline, {})[status] = n
        empty = {"signal": 0, "first_timeout": None, "sleeping": 0, "first_wake": None, "for_slot": 0}
        waiting = {pipeline: {**empty, "signal": int(n), "first_timeout": first}
                   for pipeline, n, first in t.all(SQL.parked_branches)}
        for pipeline, n in t.all(SQL.blocked_steps):
            waiting.setdefault(pipeline, dict(empty))["for_slot"] = int(n)
        for pipeline in sorted(p for p, by_status in runs.items() if by_status.get("in_progress")):
            n, first = sleeping_steps(t, pipeline)
            if n:
                waiting.setdefault(pipeline, dict(empty)).update(sleeping=int(n), first_wake=first)
        parked = t.all(SQL.parked_list, {"limit": STATUS_WAITS})
    return {
        "processes": [ProcessRow.from_row(row).report() for row in procs],
        "runs": runs,
        "scheduled": {pipeline: {"runs": int(n), "first": first} for pipeline, n, first in sorted(scheduled)},
        "waiting": dict(sorted(waiting.items())),
        "waits": [{"run": r[0], "branch": r[1], "pipeline": r[2], "signal": r[3], "until": r[4]} for r in parked],
        "recent_halts": [{"run": r[0], "pipeline": r[1], "reasons": _loads(r[2]), "finished_at": r[3]} for r in halts],
        "recent_errors": [{"step": r[0], "run": r[1], "pipeline": r[2], "name": r[3], "outcome": r[4],
                           "error": clip((r[5] or "").partition("\n")[0], STATUS_ERROR_LINE), "at": r[6]}
                          for r in errors],
    }


@record
class Health:
    """The health check's verdict: ``code`` 0 healthy, 1 unhealthy/dead, 3 unreachable and no local proof."""
    code: int                     # the exit code of `ductwork healthcheck`
    line: str                     # the verdict in one line, as printed
    processes: list[dict] = dataclasses.field(default_factory=list)   # the rows it judged (printed by -v)


def check_health(config: Config, role: str | None = None, pid: int | None = None,
                 max_age: float | None = None) -> Health:
    """Is this machine's process for ``role`` (or ``pid``) alive? Database clock; local fallback."""
    row_role = role_spec(role or config.data["role"]).row_role
    limit = float(max_age if max_age is not None else config.get("healthcheck.max_age"))
    machine = machine_identifier()
    store = Store(config.data["database_url"], connect_timeout=0.5, read_only=True)
    try:
        with store.tx(write=False) as t:
            rows = t.all(SQL.machine_processes, {"machine": machine})
    except Exception as exc:   # sqlite3 / pg8000 errors, DatabaseUnavailable
        wrong = _database_wrong(store.info, exc)
        if wrong:
            return Health(EXIT_FAILURE, f"dead: no process ({wrong})")
        return LocalProof.of(machine, store.info).health(row_role, pid, limit)
    finally:
        store.close()
    procs = [ProcessRow.from_row(row).liveness() for row in rows]
    mine = [p for p in procs if (p["pid"] == pid if pid is not None else p["role"] == row_role)]
    if not mine:
        return Health(EXIT_FAILURE, "dead: no process", procs)
    freshest = min(p["heartbeat_age"] for p in mine)
    if freshest <= limit:
        return Health(EXIT_OK, "healthy", mine)
    return Health(EXIT_FAILURE, f"unhealthy: heartbeat {freshest:.0f}s old", mine)


def _database_wrong(info: DatabaseInfo, exc: BaseException) -> str | None:
    """What is wrong with a database that answered but cannot hold a heartbeat row (None: unreachable)."""
    text = _db_error_text(exc) if not isinstance(exc, DuctworkError) else str(exc)
    if "no such table" in text or "42P01" in text:    # SQLite / Postgres undefined_table
        return "schema not created: run migrate"
    if "3D000" in text:                                # invalid_catalog_name
        return f"database {info.database!r} does not exist"
    if "28000" in text or "28P01" in text or "asks for a password" in text:   # invalid authorization
        reason = "role does not exist" if "does not exist" in text else "authentication failed"
        return f"cannot log in as {info.user!r}: {reason}"
    if "transaction pooler" in text:                   # named statements through PgBouncer and the like
        return "the URL goes through a transaction pooler: add ?pgbouncer=true to database_url"
    if "not a database" in text:                       # SQLite: the file holds something else
        return f"{info.path} is not a SQLite database"
    return None


def healthy(max_age: float | None = None, role: str | None = None) -> bool:
    """The health check for app code: True when this machine's process for ``role`` is alive."""
    config = _APP.config or load_config()
    return check_health(config, role, None, max_age).code == EXIT_OK


# Folders found private (a directory of ours, mode 0700): in the sticky temp dir nobody else can replace
# them, so the check runs until it passes once, not at every touch.
_TRUSTED_FOLDERS: set[str] = set()


@record(frozen=True)
class LocalProof:
    """Local proof that a process's control loop runs: one file per process (``<role>.<pid>``, its
    mtime the last loop) in a folder of this user, this machine and this database. The health
    check's fallback when the database is unreachable (a DB outage must not make an orchestrator
    restart every pod): scoped to the database, so another deployment on the same host proves
    nothing about this one; only in a private folder (a directory of ours, mode 0700, not a
    symlink): through one another user made, a process running as root could be made to create
    files anywhere, or proof faked. The health check must run as the user ductwork runs as (as a
    container's probe does)."""
    machine: str
    database: str   # the database's identity: its file, or server and database name (never the password)

    @classmethod
    def of(cls, machine: str, info: DatabaseInfo) -> "LocalProof":
        """The proof folder of ``machine`` for the database of ``info``."""
        if info.dialect == "sqlite":   # the file itself, however the URL spells its path
            return cls(machine, "sqlite:" + os.path.realpath(info.path))
        return cls(machine, f"postgres:{info.host.lower()}:{info.port}/{info.database}")

    @property
    def folder(self) -> str:
        """``$TMPDIR/ductwork-<uid>-<machine>-<database hash>``."""
        import hashlib
        import tempfile
        machine = re.sub(r"[^A-Za-z0-9_.-]", "_", self.machine)
        scope = hashlib.sha256(self.database.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        return os.path.join(tempfile.gettempdir(), f"ductwork-{os.getuid()}-{machine}-{scope}")

    def touch(self, role: str) -> None:
        """Refresh this process's file (created on first use, in a private folder only)."""
        folder = self.folder
        if folder not in _TRUSTED_FOLDERS:
            if not private_folder(folder, create=True, tighten=True):
                return
            _TRUSTED_FOLDERS.add(folder)
        name = os.path.join(folder, f"{role}.{os.getpid()}")
        try:
            os.utime(name, follow_symlinks=False)
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
        except OSError:
            pass

    def remove(self, role: str) -> None:
        """Remove this process's file (at a clean exit)."""
        folder = self.folder
        if folder in _TRUSTED_FOLDERS:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, f"{role}.{os.getpid()}"))

    def health(self, role: str, pid: int | None, limit: float) -> Health:
        """The database is unreachable: is a local process of this role (or ``pid``) alive and looping?"""
        folder = self.folder
        now = time.time()
        try:   # files in a folder that is not a private one of ours prove nothing (anyone could have made them)
            names = os.listdir(folder) if private_folder(folder) else []
        except OSError:
            names = []
        for name in names:
            file_role, _, file_pid = name.rpartition(".")
            if file_role != role or not file_pid.isdigit() or (pid is not None and int(file_pid) != pid):
                continue
            try:
                fresh = now - os.stat(os.path.join(folder, name), follow_symlinks=False).st_mtime <= min(limit, 60)
                os.kill(int(file_pid), 0)
            except (OSError, ProcessLookupError):
                continue
            if fresh:
                return Health(EXIT_OK, "healthy (database unreachable)")
        return Health(EXIT_UNREACHABLE, "unhealthy: database unreachable and no local proof of life")


# -- drain arithmetic: what a SIGTERM costs, shared by the start-up log lines and doctor --------

DRAIN_MARGIN = 5            # seconds a grace period needs beyond the drain budget: the hand-back, the row, the exit


@record(frozen=True)
class DrainArithmetic:
    """What a SIGTERM costs a process of one role (README "Drain arithmetic"): its drain budget, and the grace
    period its process manager must give it, the budget and DRAIN_MARGIN."""
    role: str           # its process row's role: supervisor, advancer or worker
    key: str            # the config key of its budget
    budget: float       # seconds it waits after SIGTERM (the supervisor: for its children)
    worker: float       # job_worker.shutdown_timeout: what in-flight steps get
    forks: bool         # a supervisor, which waits for its children, or one process in the foreground

    @property
    def grace(self) -> int:
        """The shortest grace period the process manager may give it (whole seconds, as the orchestrators take)."""
        return int(self.budget) + DRAIN_MARGIN


def drain_arithmetic(config: Config, spec: RoleSpec) -> DrainArithmetic:
    """The drain arithmetic of a process of ``spec`` under ``config`` (logged at start, checked by doctor)."""
    return DrainArithmetic(spec.row_role, spec.shutdown_timeout, config.get(spec.shutdown_timeout),
                           config.get(ROLE_MODES["worker"].shutdown_timeout), spec.forks)


# -- doctor: one line per check of a deployment (SPEC §13) -------------------------------------
# `python ductwork.py doctor` looks at what the deployment it is pointed at will run into: the
# database and its schema, the clocks, the connection budget, the pooler, the drain arithmetic,
# stale process rows and the queue. DOCTOR_CHECKS lists the checks in output order, each a
# function of the DoctorContext returning its Finding; those of a Postgres server do not run on
# SQLite. A check that needs the database (or its tables) is not run when an earlier one found
# it unreachable (or the schema missing); that line says which were not.

DOCTOR_OK, DOCTOR_WARN, DOCTOR_FAIL = "ok", "warn", "fail"
CLOCK_WARN_SKEW = 1.0       # seconds between the database clock and this host's before doctor warns
BUDGET_WARN_SHARE = 0.8     # of the available connections: above it doctor warns (a HUP's overlap doubles the demand)
QUEUE_WARN_AGE = 60.0       # seconds a claimable step may wait before doctor warns, or QUEUE_WARN_POLLS polls
QUEUE_WARN_POLLS = 10       # x job_worker.polling_timeout if that is longer: an idle worker looks that often


@record(frozen=True)
class ConnectionDemand:
    """The most connections a deployment holds (SPEC §13): per host, each forking supervisor 1 (it is single-threaded),
    each other process (an advancer, a job worker, a ``forking: none`` process, a dashboard) its pool and its LISTEN
    connection. Behind a transaction pooler (``pgbouncer=true``) the pools go to the pooler and only the LISTEN
    connections (on ``listen_url``; none without it: polling) to the server."""
    hosts: int
    supervisors: int          # per host
    processes: int            # per host: each holds pool_size + listen
    pool_size: int
    listen: int               # LISTEN connections per process: 1, or 0 (SQLite; a pooler and no listen_url)
    pooled: bool              # database_url has pgbouncer=true
    source: str = "config"    # or "live rows": counted from the heartbeats of ductwork_processes

    @property
    def server(self) -> int:
        """Connections to the database server itself."""
        if self.pooled:
            return self.hosts * self.processes * self.listen
        return self.hosts * (self.supervisors + self.processes * (self.pool_size + self.listen))

    @property
    def pooler(self) -> int:
        """Client connections to the pooler (0 without one)."""
        return self.hosts * (self.supervisors + self.processes * self.pool_size) if self.pooled else 0

    def arithmetic(self, pooler: bool = False) -> str:
        """The sum as doctor prints it, e.g. ``2 host(s) x (1 + 6 x 3) = 38`` (``pooler``: the pooler's clients)."""
        listen_only = self.pooled and not pooler
        per_process = self.listen if listen_only else self.pool_size + (0 if self.pooled else self.listen)
        terms = [] if listen_only or not self.supervisors else [str(self.supervisors)]
        terms.append(f"{self.processes} x {per_process}")
        total = self.pooler if pooler else self.server
        if self.source != "config":
            return f"{self.source}: {' + '.join(terms)} = {total}"
        inner = f"({' + '.join(terms)})" if len(terms) > 1 else terms[0]
        return f"{self.hosts} host(s) x {inner} = {total}"


def connection_demand(config: Config, pipelines: int, hosts: int = 1) -> ConnectionDemand:
    """The connection demand of ``hosts`` hosts running ``config`` with ``pipelines`` configured pipelines: a
    supervisor forks one advancer and one job worker per pipeline; ``forking: none`` and the foreground roles
    are one process."""
    info = parse_database_url(config.data["database_url"])
    spec = role_spec(config.role, config.data["forking"])
    listens = info.dialect == "postgres" and (not info.pgbouncer or config.data["listen_url"] is not None)
    supervisors, processes = (1, 1 + pipelines) if spec.forks else (0, 1)
    return ConnectionDemand(hosts, supervisors, processes, int(config.data["pool_size"]), int(listens),
                            info.pgbouncer)


@record(frozen=True)
class ConnectionBudget:
    """What the server leaves a deployment: its tightest limit less what other clients hold now."""
    available: int
    why: str            # the arithmetic, e.g. "max_connections 100 - 3 reserved - 2 held by other clients"


class DoctorSQL:
    """doctor's own statements (it reads the rest through StoreSQL, SQL and DashboardSQL)."""

    # The server's autovacuum switch and how long its launcher sleeps between rounds (Postgres).
    autovacuum_settings = """
        SELECT name, setting
        FROM pg_settings
        WHERE name IN ('autovacuum', 'autovacuum_naptime')"""

    # The server's version (Postgres).
    postgres_version = """
        SELECT current_setting('server_version')"""

    # The library's version (SQLite).
    sqlite_version = """
        SELECT sqlite_version()"""

    # The server's connection slots; reserved_connections is new in PG 16 (older servers have no such row).
    connection_settings = """
        SELECT name, setting
        FROM pg_settings
        WHERE name IN ('max_connections', 'superuser_reserved_connections', 'reserved_connections')"""

    # The connections of other clients now (all, of this role, in this database), ductwork's own to this
    # database, and this role's and this database's CONNECTION LIMIT (-1: none; superusers are exempt). A
    # ductwork on another database is another client. A role without pg_read_all_stats sees no backend_type
    # of other roles' sessions: a session with a database and a user is taken for a client (at worst a
    # parallel worker is counted, which errs on the safe side).
    connection_usage = """
        SELECT count(*) FILTER (WHERE NOT a.ours),
               count(*) FILTER (WHERE NOT a.ours AND a.usename = current_user),
               count(*) FILTER (WHERE NOT a.ours AND a.datname = current_database()),
               count(*) FILTER (WHERE a.ours),
               (SELECT rolconnlimit FROM pg_roles WHERE rolname = current_user),
               (SELECT datconnlimit FROM pg_database WHERE datname = current_database()),
               (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
        FROM (SELECT usename, datname,
                     coalesce(application_name, '') = 'ductwork' AND datname = current_database() AS ours
              FROM pg_stat_activity
              WHERE (backend_type = 'client backend'
                     OR (backend_type IS NULL AND datname IS NOT NULL AND usename IS NOT NULL))
                AND pid <> pg_backend_pid()) a"""


def connection_budget(t: Tx, rows_hold: int | None) -> ConnectionBudget:
    """The connections the server of ``t`` has left for this deployment: the smallest of its limits, less what
    other clients hold now. ``rows_hold``: the most the live process rows hold; ductwork's connections to this
    database beyond it are of processes without a row (app code that triggers, a dashboard, a command) or of
    processes that hold more than the arithmetic says, which the demand does not count, so they count here
    (None: not counted, as behind a pooler, whose server connections these are)."""
    settings = {name: int(value) for name, value in t.all(DoctorSQL.connection_settings)}
    most = settings["max_connections"]
    reserved = settings.get("superuser_reserved_connections", 0) + settings.get("reserved_connections", 0)
    others, of_role, in_database, ours, role_limit, database_limit, superuser = t.one(DoctorSQL.connection_usage)
    rowless = 0 if rows_hold is None else max(0, ours - rows_hold)

    def held(n: int) -> str:
        clients = f" - {n} held by other clients" if n else ""
        return clients + (f" - {rowless} more held by ductwork than its live processes account for (app code, "
                          "dashboards)" if rowless else "")
    budgets = [ConnectionBudget(most - reserved - others - rowless,
                                f"max_connections {most} - {reserved} reserved{held(others)}")]
    if not superuser and role_limit is not None and role_limit >= 0:
        budgets.append(ConnectionBudget(role_limit - of_role - rowless,
                                        f"the role's CONNECTION LIMIT {role_limit}{held(of_role)}"))
    if not superuser and database_limit is not None and database_limit >= 0:
        budgets.append(ConnectionBudget(database_limit - in_database - rowless,
                                        f"the database's CONNECTION LIMIT {database_limit}{held(in_database)}"))
    return min(budgets, key=lambda budget: budget.available)


def looks_pooled(info: DatabaseInfo) -> str | None:
    """Why a Postgres URL looks like a connection pooler's (None: it does not): PgBouncer's port, or the host
    names of the managed poolers."""
    host = info.host.lower()
    if info.port == 6432:
        return "port 6432 looks like PgBouncer"
    if "-pooler" in host or "pooler." in host:
        return f"host {info.host} looks like a pooler (Neon, Supabase)"
    if ".proxy-" in host:
        return f"host {info.host} looks like RDS Proxy"
    return None


def clock_skew(store: Store, samples: int = 3) -> tuple[float, float]:
    """The database clock minus this host's, in seconds, and its error bound: as NTP does, each sample puts the
    host's time in the middle of the round trip, and the sample with the shortest round trip wins."""
    best = (float("inf"), 0.0)
    for _ in range(samples):
        before = time.time()
        database = store.now()
        after = time.time()
        best = min(best, (after - before, database - (before + after) / 2))
    return best[1], best[0] / 2


@record(frozen=True)
class Finding:
    """One line of doctor: a check's verdict and what it found or advises."""
    level: str          # ok | warn | fail
    check: str
    text: str

    @property
    def line(self) -> str:
        """``ok    schema: version 1 (current)``."""
        return f"{self.level:<6}{self.check}: {self.text}"


@record
class DoctorContext:
    """What the checks share: the config, one connection, and what earlier checks found."""
    config: Config
    store: Store
    grace: float | None                  # --grace: the process manager's grace period, seconds
    pipelines: list[str] | None          # the configured pipelines (None: "*" and no app imported)
    reachable: bool = False              # the database answered
    schema: int | None = None            # the schema version found (None: not created)
    _rows: list[ProcessRow] | None = None

    @property
    def postgres(self) -> bool:
        """Is the database Postgres (where the clock, connection and pooler checks apply)?"""
        return self.store.dialect == "postgres"

    @property
    def reaper_timeout(self) -> float:
        """Older heartbeats than this are a dead process's (its row is stale)."""
        return float(self.config.get("supervisor.reaper_timeout"))

    def rows(self) -> list[ProcessRow]:
        """Every process row, ages on the database clock (read once; none while the schema is missing)."""
        if self._rows is None:
            self._rows = []
            if self.schema is not None:
                with self.store.tx(write=False) as t:
                    self._rows = [ProcessRow.from_row(row) for row in t.all(SQL.processes)]
        return self._rows

    def live(self) -> list[ProcessRow]:
        """The process rows with a heartbeat within reaper_timeout."""
        return [row for row in self.rows() if row.heartbeat_age <= self.reaper_timeout]


def _seconds(value: float) -> str:
    """``30s``, ``2.5s``: a number of seconds as doctor prints it."""
    return f"{float(value):g}s"


def _forking_supervisor(row: ProcessRow) -> bool:
    """Is this the row of a forking supervisor (one connection), not of a process with a pool? A ``forking: none``
    process also has role supervisor; only a forking one lists its children in ``info``."""
    info = _loads_for_display(row.info)
    return row.role == "supervisor" and isinstance(info, dict) and "children" in info


def _runs_workers(row: ProcessRow) -> bool:
    """Does the process of this row run job worker threads (a worker, or a ``forking: none`` process)?"""
    return row.role == "worker" or (row.role == "supervisor" and not _forking_supervisor(row))


def _doctor_database(ctx: DoctorContext) -> Finding:
    """1. The database answers (the checks after it that need it run only then)."""
    info = ctx.store.info
    if info.dialect == "sqlite" and not os.path.exists(info.path):
        return Finding(DOCTOR_FAIL, "database", f"{info.display}: no such file (run migrate to "
                                                "create it, or fix database_url)")
    try:
        with ctx.store.tx(write=False) as t:
            version = t.one(DoctorSQL.postgres_version if ctx.postgres else DoctorSQL.sqlite_version)[0]
    except Exception as exc:
        if not _database_error(exc):
            raise
        wrong = _database_wrong(info, exc)
        return Finding(DOCTOR_FAIL, "database", f"{info.display}: {wrong}" if wrong else first_line(exc))
    ctx.reachable = True
    if ctx.postgres:
        return Finding(DOCTOR_OK, "database", f"{info.display} answers (PostgreSQL {str(version).split()[0]})")
    return Finding(DOCTOR_OK, "database", f"{info.display} answers (SQLite {version}; the clock, connections "
                                          "and pooler checks are for PostgreSQL)")


def _doctor_schema(ctx: DoctorContext) -> Finding:
    """2. The schema version against this ductwork's (SCHEMA_VERSION)."""
    try:
        with ctx.store.tx(write=False) as t:
            row = t.one(StoreSQL.schema_version)
    except Exception as exc:
        if not _database_error(exc) or _database_wrong(ctx.store.info, exc) is None:
            raise
        row = None   # no migrations table: never migrated
    version = row[0] if row else None
    if version is None:
        return Finding(DOCTOR_FAIL, "schema", "not created: run migrate")
    ctx.schema = int(version)
    if ctx.schema < SCHEMA_VERSION:
        return Finding(DOCTOR_FAIL, "schema", f"version {ctx.schema}, this ductwork needs {SCHEMA_VERSION}: "
                                              "run migrate")
    if ctx.schema > SCHEMA_VERSION:
        return Finding(DOCTOR_FAIL, "schema", f"version {ctx.schema} is newer than this ductwork's {SCHEMA_VERSION}: "
                                              "this ductwork is older than the schema (upgrade it)")
    return Finding(DOCTOR_OK, "schema", f"version {ctx.schema} (current)")


# 3. The clock. ductwork itself reads every time that crosses hosts on the database clock (heartbeat ages,
# reaping, available_at, claim ages), so skew breaks neither claims nor reaping. This host's clock is what
# the rest uses: log lines, the local proof-of-life files of the health check's outage fallback, app code
# and any tool that compares a stored timestamp with its own time (a monitoring query on last_heartbeat_at).
# Past 1 s logs and rows disagree enough to mislead (warn). Past reaper_timeout - heartbeat_interval, a live
# process's latest heartbeat, read against this host's clock, is older than reaper_timeout (or a dead one
# looks fresh that much longer): the host clock and the database clock no longer agree on who is alive (fail).
def clock_limits(config: Config) -> tuple[float, float]:
    """The skews (seconds) above which doctor warns and fails."""
    fail = float(config.get("supervisor.reaper_timeout")) - float(config.get("supervisor.heartbeat_interval"))
    return CLOCK_WARN_SKEW, max(fail, CLOCK_WARN_SKEW)


def _doctor_clock(ctx: DoctorContext) -> Finding:
    """3. The skew between the database clock and this host's (SQLite's clock is this host's)."""
    skew, error = clock_skew(ctx.store)
    warn, fail = clock_limits(ctx.config)
    limits = f"warn above {_seconds(warn)}, fail above {_seconds(fail)}"
    if abs(skew) <= warn:
        return Finding(DOCTOR_OK, "clock", f"this host and the database agree within {abs(skew) + error:.3f}s "
                                           f"({limits})")
    way = "behind" if skew > 0 else "ahead of"
    text = f"this host's clock is {abs(skew):.1f}s {way} the database's ({limits})"
    if abs(skew) <= fail:
        return Finding(DOCTOR_WARN, "clock", f"{text}: ductwork goes by the database clock, but logs and local proof "
                                             "of life by this host's: synchronise it (NTP)")
    return Finding(DOCTOR_FAIL, "clock", f"{text}: against this host's clock a live heartbeat looks older than "
                                         "reaper_timeout: synchronise it (NTP)")


def _config_demand(ctx: DoctorContext, live: list[ProcessRow]) -> ConnectionDemand | None:
    """The demand the config describes: its processes x the machines that run its role now (at least 1).
    Pipelines ``*`` without an app: the pipelines the live rows serve (None: nothing to count)."""
    pipelines = ctx.pipelines
    if pipelines is None:
        pipelines = sorted({p for row in live for p in row.pipelines.split(",") if p}) or None
    if pipelines is None:
        return None
    role = role_spec(ctx.config.role, ctx.config.data["forking"]).row_role
    hosts = len({row.machine for row in live if row.role == role}) or 1
    return connection_demand(ctx.config, len(pipelines), hosts)


def _live_demand(ctx: DoctorContext, live: list[ProcessRow]) -> ConnectionDemand:
    """The demand of the processes alive now (their pools taken as this config's pool_size)."""
    supervisors = sum(_forking_supervisor(row) for row in live)
    return dataclasses.replace(connection_demand(ctx.config, 0), hosts=1, supervisors=supervisors,
                               processes=len(live) - supervisors, source="live rows")


def _budget_level(demand: int, budget: ConnectionBudget) -> str:
    """fail above the budget, warn above BUDGET_WARN_SHARE of it."""
    if demand > budget.available:
        return DOCTOR_FAIL
    return DOCTOR_WARN if demand > BUDGET_WARN_SHARE * budget.available else DOCTOR_OK


def _doctor_connections(ctx: DoctorContext) -> Finding:
    """4. The connection budget: this deployment's demand, from the config and from the live rows (the larger),
    against what the server has left."""
    live = ctx.live()
    rows = _live_demand(ctx, live)
    with ctx.store.tx(write=False) as t:
        budget = connection_budget(t, None if rows.pooled else rows.server)
    candidates = [d for d in (_config_demand(ctx, live), rows if live else None) if d]
    of = f"of {budget.available} available ({budget.why})"
    if not candidates:
        per = connection_demand(ctx.config, 0)
        return Finding(DOCTOR_WARN, "connections", f"cannot count this deployment's processes: pipelines \"*\", no app "
                                                   "to import and no live process (give --app or list the pipelines); "
                                                   f"each advancer or worker process takes up to "
                                                   f"{per.pool_size + per.listen} {of}")
    demand = max(candidates, key=lambda d: (d.server, d.pooler))
    level = _budget_level(demand.server, budget)
    if demand.pooled:
        listen = (f"LISTEN on listen_url: {demand.arithmetic()} {of}" if demand.listen
                  else f"no LISTEN connections (no listen_url: polling); the server has {budget.available} available "
                       f"({budget.why})")
        return Finding(level, "connections", f"behind a transaction pooler (pgbouncer=true), so its settings are the "
                                             f"budget: {demand.arithmetic(pooler=True)} client connections: give it "
                                             f"max_client_conn >= {demand.pooler} and a default_pool_size that fits "
                                             f"the server; {listen}")
    advice = {DOCTOR_OK: "",
              DOCTOR_WARN: f": over {BUDGET_WARN_SHARE:.0%}, and a HUP's overlap of old and new children doubles it",
              DOCTOR_FAIL: ": lower pool_size or the number of processes, raise max_connections, or put a "
                           "transaction pooler in front (pgbouncer=true)"}[level]
    return Finding(level, "connections", f"{demand.arithmetic()} {of}{advice}")


def _doctor_pooler(ctx: DoctorContext) -> Finding:
    """5. Pooler settings: a URL that looks pooled must say pgbouncer=true; with it, LISTEN wants listen_url."""
    info = ctx.store.info
    pooled = looks_pooled(info)
    if pooled and not info.pgbouncer:
        return Finding(DOCTOR_FAIL, "pooler", f"{pooled} but the URL has no pgbouncer=true: add ?pgbouncer=true to "
                                              "database_url")
    listen_url = ctx.config.data["listen_url"]
    if info.pgbouncer and listen_url is None:
        polls = (f"job_worker.polling_timeout {_seconds(ctx.config.get('job_worker.polling_timeout'))}, "
                 f"pipeline_advancer.polling_timeout {_seconds(ctx.config.get('pipeline_advancer.polling_timeout'))}")
        return Finding(DOCTOR_WARN, "pooler", f"pgbouncer=true and no listen_url: wake-ups poll, so new work waits up "
                                              f"to the polling timeout ({polls}): set listen_url (DUCTWORK_LISTEN_URL) "
                                              "to the database's direct URL")
    if listen_url is not None:
        listen = parse_database_url(listen_url)
        pooled_listen = looks_pooled(listen)
        if pooled_listen:
            return Finding(DOCTOR_WARN, "pooler", f"listen_url: {pooled_listen}: LISTEN needs a session of its own, "
                                                  "so give listen_url the database's direct URL")
        return Finding(DOCTOR_OK, "pooler", f"pgbouncer=true, LISTEN on listen_url {listen.display}")
    return Finding(DOCTOR_OK, "pooler", "none in database_url (a direct connection)")


def _doctor_drain(ctx: DoctorContext) -> Finding:
    """6. The drain arithmetic against the process manager's grace period (--grace); a supervisor's children must
    drain within the supervisor's budget."""
    drain = drain_arithmetic(ctx.config, role_spec(ctx.config.role, ctx.config.data["forking"]))
    who = "the supervisor" if drain.forks else f"this {drain.role}"
    if ctx.grace is not None and ctx.grace < drain.grace:
        return Finding(DOCTOR_FAIL, "drain", f"--grace {_seconds(ctx.grace)} is below the {drain.grace}s {who} needs "
                                             f"({drain.key} {_seconds(drain.budget)} + {DRAIN_MARGIN}s to hand back "
                                             f"and exit): it is SIGKILLed mid-drain; raise the grace period or lower "
                                             f"{drain.key}")
    slowest = max(float(ctx.config.get("job_worker.shutdown_timeout")),
                  float(ctx.config.get("pipeline_advancer.shutdown_timeout")))
    if drain.forks and slowest >= drain.budget:
        return Finding(DOCTOR_WARN, "drain", f"a child drains up to {_seconds(slowest)}, not below {drain.key} "
                                             f"{_seconds(drain.budget)}: the supervisor SIGKILLs it mid-drain; lower "
                                             "job_worker.shutdown_timeout / pipeline_advancer.shutdown_timeout")
    if drain.forks:
        plan = (f"job workers get {_seconds(drain.worker)} < the supervisor waits {_seconds(drain.budget)} < "
                f"{drain.grace}s")
    else:
        plan = f"this {drain.role} drains {_seconds(drain.budget)} ({drain.key}) < {drain.grace}s"
    if ctx.grace is None:
        return Finding(DOCTOR_OK, "drain", f"{plan}: give the process manager a grace period of at least "
                                           f"{drain.grace}s (--grace SECONDS checks yours)")
    return Finding(DOCTOR_OK, "drain", f"--grace {_seconds(ctx.grace)} >= {drain.grace}s needed ({plan})")


def _doctor_processes(ctx: DoctorContext) -> Finding:
    """7. Stale process rows: a dead process's row, and its claims, wait for a live peer's reaper."""
    rows, live = ctx.rows(), ctx.live()
    stale = [row for row in rows if row.heartbeat_age > ctx.reaper_timeout]
    machines = sorted({row.machine for row in live})
    alive = f"{len(live)} live on {len(machines)} machine(s)" if live else "no live process"
    if not stale:
        return Finding(DOCTOR_OK, "processes", f"{alive}, none stale" if rows else "none registered")
    where = sorted({row.machine for row in stale})
    text = (f"{len(stale)} stale row(s) (no heartbeat for supervisor.reaper_timeout {_seconds(ctx.reaper_timeout)}) "
            f"of {', '.join(where[:5])}{' and others' if len(where) > 5 else ''}; {alive}")
    if live:
        return Finding(DOCTOR_WARN, "processes", f"{text}: a live peer reaps them and hands their steps back")
    return Finding(DOCTOR_WARN, "processes", f"{text}: nobody will reap them; their claimed steps wait until a "
                                             "ductwork process starts")


def queue_limit(config: Config, pipeline: str | None = None) -> float:
    """The age (seconds) above which the oldest claimable step of ``pipeline`` makes doctor warn."""
    return max(QUEUE_WARN_AGE, QUEUE_WARN_POLLS * float(config.get("job_worker.polling_timeout", pipeline)))


def _doctor_queue(ctx: DoctorContext) -> Finding:
    """8. The oldest claimable step per pipeline (database clock): too old, nobody serves it or workers are busy."""
    with ctx.store.tx(write=False) as t:
        queue = [(pipeline, int(n), float(age or 0)) for pipeline, n, age in t.all(DashboardSQL.queue)]
    if not queue:
        return Finding(DOCTOR_OK, "queue", "no claimable step waiting")
    served = {p for row in ctx.live() if _runs_workers(row) for p in row.pipelines.split(",")}
    late = [(p, n, age) for p, n, age in sorted(queue) if age > queue_limit(ctx.config, p)]
    oldest = max(age for _, _, age in queue)
    if not late:
        return Finding(DOCTOR_OK, "queue", f"{sum(n for _, n, _ in queue)} claimable step(s), the oldest "
                                           f"{oldest:.1f}s old (warn above {_seconds(queue_limit(ctx.config))})")
    why = [f"{p} {age:.0f}s old, {n} waiting: " + ("its workers are saturated or stuck (add workers or raise "
                                                   "job_worker.count)" if p in served else "no live worker serves it")
           for p, n, age in late]
    return Finding(DOCTOR_WARN, "queue", f"the oldest claimable step is {oldest:.0f}s old (warn above "
                                         f"{_seconds(queue_limit(ctx.config))}): {'; '.join(why)}")


# 9. Storage (Postgres). Every processed step leaves dead row versions; autovacuum makes their room reusable.
# bench/churn.py: a million steps processed and pruned at about 5 000 a second plateau at about 140 MB with
# autovacuum_naptime 10 s and 580 MB with the default 60 s (a minute of dead rows); with autovacuum off the
# tables grow without bound. An index of a migration that is missing or invalid (an interrupted concurrent
# build) is rebuilt by migrate.
NAPTIME_ADVICE = 15.0


def _doctor_storage(ctx: DoctorContext) -> Finding:
    """9. Autovacuum, and the migrations' indexes (all there and valid)."""
    with ctx.store.tx(write=False) as t:
        unbuilt = sorted(_unbuilt_indexes(t))
        settings = dict(t.all(DoctorSQL.autovacuum_settings))
    if unbuilt:
        return Finding(DOCTOR_FAIL, "storage", f"index(es) missing or invalid (an interrupted build): "
                                               f"{', '.join(unbuilt)}: run migrate")
    if settings.get("autovacuum") != "on":
        return Finding(DOCTOR_WARN, "storage", "autovacuum is off: the dead rows every processed step leaves are "
                                               "never reclaimed and the tables grow without bound: turn it on")
    naptime = float(settings.get("autovacuum_naptime", 60))
    text = f"autovacuum on, naptime {_seconds(naptime)}, indexes valid"
    if naptime > NAPTIME_ADVICE:
        text += (" (a busy deployment: autovacuum_naptime 10s keeps the tables about a quarter the size, "
                 "see README Data lifecycle)")
    return Finding(DOCTOR_OK, "storage", text)


@record(frozen=True)
class DoctorCheck:
    """One row of DOCTOR_CHECKS."""
    name: str
    run: Callable[[DoctorContext], Finding]
    needs: str = ""         # "database": runs only when it answered; "schema": only when the tables are there too
    postgres: bool = False  # PostgreSQL only (SQLite has no server clock of its own, no connection limit, no pooler)


DOCTOR_CHECKS = (   # in output order
    DoctorCheck("database", _doctor_database),
    DoctorCheck("schema", _doctor_schema, needs="database"),
    DoctorCheck("clock", _doctor_clock, needs="database", postgres=True),
    DoctorCheck("connections", _doctor_connections, needs="database", postgres=True),
    DoctorCheck("pooler", _doctor_pooler, postgres=True),
    DoctorCheck("drain", _doctor_drain),
    DoctorCheck("processes", _doctor_processes, needs="schema"),
    DoctorCheck("queue", _doctor_queue, needs="schema"),
    DoctorCheck("storage", _doctor_storage, needs="schema", postgres=True),
)


def _database_error(exc: BaseException) -> bool:
    """An error of the database or of the connection to it (as opposed to a bug of doctor's)."""
    return (isinstance(exc, (DuctworkError, sqlite3.Error, OSError))
            or type(exc).__module__.startswith("pg8000"))


def _doctor_pipelines(config: Config) -> tuple[list[str] | None, Finding | None]:
    """The configured pipelines (None: ``*`` and no app to count them from) and, when the config names an app,
    a finding on its import (doctor may run where the app is not installed: a warning, not an error)."""
    listed = None if config.data["pipelines"] == "*" else list(config.data["pipelines"])
    if not config.data["app"]:
        return listed, None
    try:
        import_app(config.data["app"])
    except (ConfigError, DefinitionError) as exc:
        counted = "from the config" if listed else "from the live process rows"
        return listed, Finding(DOCTOR_WARN, "app", f"{exc}: pipelines counted {counted}")
    names = listed if listed is not None else sorted(_REGISTRY)
    return names, Finding(DOCTOR_OK, "app", f"{len(names)} pipeline(s) configured ({', '.join(names) or 'none'})")


def run_doctor(config: Config, grace: float | None = None) -> list[Finding]:
    """Every check of DOCTOR_CHECKS that applies, in order (doctor's lines)."""
    pipelines, app = _doctor_pipelines(config)
    store = Store(config.data["database_url"], read_only=True)
    ctx = DoctorContext(config, store, grace, pipelines)
    findings = [app] if app else []
    gates: dict[str, int] = {}          # "database" / "schema": the index of the finding that closed it
    skipped: dict[str, list[str]] = {}
    try:
        for check in DOCTOR_CHECKS:
            if check.postgres and not ctx.postgres:
                continue
            gate = _closed_gate(check, ctx)
            if gate:
                skipped.setdefault(gate, []).append(check.name)
                continue
            gates[check.name] = len(findings)
            findings.append(_run_check(check, ctx))
    finally:
        store.close()
    for gate, names in skipped.items():   # the line that closed the gate says what was not checked
        at = gates[gate]
        findings[at] = dataclasses.replace(findings[at], text=f"{findings[at].text} (not checked: {', '.join(names)})")
    return findings


def _closed_gate(check: DoctorCheck, ctx: DoctorContext) -> str | None:
    """What ``check`` needs and earlier checks found missing: "database" (unreachable), "schema" (no tables)."""
    if check.needs and not ctx.reachable:
        return "database"
    if check.needs == "schema" and ctx.schema is None:
        return "schema"
    return None


def _run_check(check: DoctorCheck, ctx: DoctorContext) -> Finding:
    """One check; a database error on the way is its fail line, not the end of doctor."""
    try:
        return check.run(ctx)
    except Exception as exc:
        if not _database_error(exc):
            raise
        return Finding(DOCTOR_FAIL, check.name, f"database error: {first_line(exc)}")


# =====================================================================================
# dashboard: pages, their JSON twins under /api/..., /metrics, and the actions (cancel, revive)
# =====================================================================================
# `python ductwork.py dashboard` serves / (overview), /runs (filters, pages), /runs/<id>
# (the step tree: branches nest under the step that fanned them out), /errors (failed and
# crashed executions), each with a JSON twin under /api/..., and /metrics (Prometheus text
# format). Stdlib only. A page polls its JSON twin and, when its ETag changed, swaps in a
# freshly rendered <main> (a few lines of inline JS). Pages only SELECT; the actions (a POST
# each: cancel or revive a run, cancel a pipeline's runs in progress) call Engine.cancel and
# Engine.revive, and only where the dashboard offers them (see "actions" under http). A handler
# thread's connection is closed when its request ends. Everything stored is shown html-escaped (and
# what UTF-8 cannot encode, a lone surrogate, as its backslash escape). A fixed pool of handler
# threads; an accept loop reads request headers (10 s at most) without a thread each.
# Layout: the statements, the data (JSON twins, /metrics), the html, then the http server.

DASHBOARD_PER_PAGE, DASHBOARD_MAX_STEPS = 50, 2000
# The overview's chart windows (?window=): name -> (seconds, seconds per point): 15 to 48 points a chart.
OVERVIEW_WINDOWS = {"15m": (900, 60), "1h": (3600, 120), "6h": (21600, 600), "24h": (86400, 1800)}
DASHBOARD_WINDOW = "1h"
# A fan-out's branches a run page shows (in position order; ?fanout=<step>&fstatus=&fpage= pages and filters
# one fan-out); the rest are counted by status, and their steps are not read at all: a 1,000-way expand's
# page reads and renders ~20 branches, not 1,000 (issue 20).
DASHBOARD_BRANCHES = 20
# The errors page groups the latest DASHBOARD_ERROR_SAMPLE failed and crashed executions by their error's first
# line (its class and message), reading only that line's first STATUS_ERROR_LINE characters of each.
DASHBOARD_ERROR_SAMPLE = 5000
DASHBOARD_MAX_TEXT = 20000   # characters of one error text a page or JSON twin shows
# The actions' URLs (POST only; see "actions" under http): /runs/<id>/cancel, /runs/<id>/revive, and the bulk
# cancel, whose confirmation (a GET page: the count, then the form) has a URL of its own.
DASHBOARD_BULK_CANCEL, DASHBOARD_CONFIRM_CANCEL = "/runs/cancel", "/runs/confirm-cancel"
# What an action did, shown on the page it redirects to (its ?done=; {count} and {pipeline} from the query).
DASHBOARD_NOTICES = {
    "cancelled": "Run cancelled: no step of it starts any more; steps running were told to stop.",
    "not-cancelled": "Nothing changed: the run was not in progress any more.",
    "revived": "Run revived: what had not completed runs again.",
    "not-revived": "Nothing changed: the run is neither halted nor cancelled.",
    "bulk-cancelled": "Cancelled {count} run(s) of {pipeline}.",
}
DASHBOARD_OUTCOMES = {"cancelled": "cancelled", "not-cancelled": "nothing changed (it was not in progress)",
                      "revived": "revived", "not-revived": "nothing changed (it is neither halted nor cancelled)"}


class DashboardSQL:
    """The dashboard's statements, SELECTs only (its actions write through Engine.cancel and Engine.revive):
    ``:name`` parameters, ``{now}`` the database clock.

    ``{where}`` (``{{where}}`` in an f-string) takes the filters of a paged list: fixed ``AND column = :f_column``
    fragments (see _paged). A ``*_COLUMNS`` list is both its statement's select list and its records' keys.
    """

    # the pipelines that ever had runs: the choices of the pipeline filter (the rolled-up totals, and the runs
    # past their mark)
    pipelines = """
        SELECT pipeline
        FROM ductwork_counters
        WHERE name = 'triggered'
        UNION
        SELECT pipeline
        FROM ductwork_runs
        WHERE id > (SELECT mark FROM ductwork_rollup WHERE name = 'runs')
        ORDER BY pipeline"""

    # the runs page: one page of runs, newest first
    RUN_COLUMNS = "id, pipeline, status, created_at, finished_at, halt_reasons, trigger_key"
    runs = f"""
        SELECT {RUN_COLUMNS}
        FROM ductwork_runs
        WHERE 1 = 1{{where}}
        ORDER BY id DESC
        LIMIT :limit OFFSET :offset"""

    # search: the run of an id
    run_by_id = f"""
        SELECT {RUN_COLUMNS}
        FROM ductwork_runs
        WHERE id = :id"""

    # search: the runs of a trigger key, one per pipeline at most (the unique index on (pipeline, trigger_key),
    # probed once per pipeline of {pipelines}: BulkSQL.rows over PIPELINE_ROWS, the :rows parameter)
    PIPELINE_ROWS = [("pipeline", "TEXT")]
    runs_by_key = f"""
        SELECT {RUN_COLUMNS}
        FROM ductwork_runs
        WHERE pipeline IN (SELECT r.pipeline FROM {{pipelines}})
          AND trigger_key = :key
        ORDER BY id DESC"""

    # an action on one run: its status (no row: no such run)
    run_status = """
        SELECT status
        FROM ductwork_runs
        WHERE id = :id"""

    # the bulk cancel's confirmation: how many runs of a pipeline are in progress (what a cancel of it stops now)
    in_progress_of_pipeline = """
        SELECT count(*)
        FROM ductwork_runs
        WHERE pipeline = :pipeline
          AND status = 'in_progress'"""

    # a run's page: the first :limit steps of the branches it shows ({branches}: BulkSQL.ids over branch_id),
    # in the order they were made
    STEP_COLUMNS = ("id, name, node, status, input, output, attempts, crashes, error, halt_reason, branch_id, "
                    "created_at, claimed_at AS started_at, finished_at, "
                    "CASE WHEN status = 'queued' AND available_at > {now} THEN available_at END AS not_before")
    steps = f"""
        SELECT {STEP_COLUMNS}
        FROM ductwork_steps
        WHERE run_id = :run_id
          AND {{branches}}
        ORDER BY id
        LIMIT :limit"""

    # a run's page: how many of its steps each node of its graph has, by status (all of them, shown or not)
    node_counts = """
        SELECT node, status, count(*)
        FROM ductwork_steps
        WHERE run_id = :run_id
        GROUP BY node, status"""

    # a run's page: its branches, the nodes of the step tree
    BRANCH_COLUMNS = "id, parent_id, origin_step_id, position, status, halt_reason, waiting_for, wait_until"
    branches = f"""
        SELECT {BRANCH_COLUMNS}
        FROM ductwork_branches
        WHERE run_id = :run_id
        ORDER BY id"""

    # a run's page: every execution (attempt) of the steps it shows ({steps}: BulkSQL.ids over step_id), oldest
    # first
    EXECUTION_COLUMNS = "e.step_id, e.attempt, e.outcome, e.error, e.process_id, e.started_at, e.finished_at"
    executions = f"""
        SELECT {EXECUTION_COLUMNS}
        FROM ductwork_executions e
        WHERE {{steps}}
        ORDER BY e.id"""

    # the errors page: one page of failed and crashed executions, newest first
    ERROR_COLUMNS = ("e.id, e.step_id AS step, e.run_id AS run, s.pipeline, s.name, e.outcome, e.attempt, e.error, "
                     "e.finished_at")
    errors = f"""
        SELECT {ERROR_COLUMNS}
        FROM ductwork_executions e
        JOIN ductwork_steps s ON s.id = e.step_id
        WHERE e.outcome IN ('failed', 'crashed'){{where}}
        ORDER BY e.id DESC
        LIMIT :limit OFFSET :offset"""

    # the errors page's groups: the head of the error of the :limit latest failed and crashed executions
    ERROR_HEAD_KEYS = ("step", "run", "pipeline", "name", "outcome", "head", "finished_at")
    error_heads = """
        SELECT e.step_id, e.run_id, s.pipeline, s.name, e.outcome, substr(e.error, 1, :head), e.finished_at
        FROM ductwork_executions e
        JOIN ductwork_steps s ON s.id = e.step_id
        WHERE e.outcome IN ('failed', 'crashed'){where}
        ORDER BY e.id DESC
        LIMIT :limit"""

    # overview: the last minute the samples counted (the latest sample's, STATS_LAG before it) ...
    last_sample = """
        SELECT max(minute)
        FROM ductwork_queue_samples
        WHERE pipeline = ''
          AND minute <= :minute"""

    # ... the minutes' stats (migration 9) of the window, all pipelines together: steps and runs by duration bin
    minute_stats = """
        SELECT minute, kind, bin, sum(count)
        FROM ductwork_minute_stats
        WHERE minute > :since AND minute <= :until
        GROUP BY minute, kind, bin"""

    # ... and those of the minutes after, read from the rows (the stats' own statement, all pipelines together)
    finished = {kind: f"""
        SELECT minute, bin, sum(n)
        FROM ({finished_by_minute(kind)}) f
        GROUP BY minute, bin""" for kind in FINISHED_KINDS}

    # ... and the queue's samples (migration 9) of the window's minutes
    queue_samples = """
        SELECT minute, pipeline, depth, oldest_age
        FROM ductwork_queue_samples
        WHERE minute > :since"""

    # /metrics: claimable steps per pipeline, and the seconds the oldest of them has waited
    queue = SQL.claimable

    # /metrics: the info of the live processes (their abandoned threads: step timeouts)
    process_infos = """
        SELECT role, machine_identifier, pid, info, id
        FROM ductwork_processes
        WHERE last_heartbeat_at >= {now} - :live_within"""

    # /metrics: per role, the live processes (a heartbeat within :live_within seconds)
    processes = """
        SELECT role, sum(CASE WHEN last_heartbeat_at >= {now} - :live_within THEN 1 ELSE 0 END)
        FROM ductwork_processes
        GROUP BY role"""


def _bare(column: str) -> str:
    """A column's name without its table prefix: ``s.pipeline`` -> ``pipeline``."""
    return column.rpartition(".")[2]


def _with_durations(runs: list[dict]) -> list[dict]:
    """Run records (DashboardSQL.RUN_COLUMNS), each given its duration."""
    for run in runs:
        run["duration"] = _duration(run["created_at"], run["finished_at"])
    return runs


def _run_records(rows: list[tuple]) -> list[dict]:
    """Rows of DashboardSQL.RUN_COLUMNS as records, each with its duration."""
    return _with_durations(_records(rows, DashboardSQL.RUN_COLUMNS, "halt_reasons"))


def _records(rows: list[tuple], columns: str, decode: str = "") -> list[dict]:
    """Rows as dicts keyed by the select list ``columns`` (plain columns, each maybe ``AS alias``: the
    key is the alias, else the bare column name); the ``decode`` keys hold JSON (shown raw when corrupt)."""
    keys = [_bare(column.split()[-1]) for column in columns.split(",")]
    out = [dict(zip(keys, row, strict=True)) for row in rows]
    for record in out:
        for key in decode.split():
            record[key] = _loads_for_display(record[key])
        if isinstance(record.get("error"), str):   # the JSON twins are bounded like the pages
            record["error"] = clip(record["error"], DASHBOARD_MAX_TEXT)
    return out


def _duration(start: float | None, end: float | None) -> float | None:
    """Seconds from start to end (None unless both are known)."""
    return round(float(end) - float(start), 3) if start is not None and end is not None else None


# -- data: the JSON twins ------------------------------------------------------------------
def dashboard_overview(engine: Engine, window: str = DASHBOARD_WINDOW) -> dict:
    """The overview: the status report, the schedules, and the charts' series over ``window`` (a name of
    OVERVIEW_WINDOWS), each a list with one value per point, the latest first: runs completed and steps
    finished, the p50 and p95 of their durations (None: none finished then), and per pipeline the queue's depth
    and the age of its oldest claimable step (the largest sample of the point; None: no sample then)."""
    report = status_report(engine)
    seconds, bucket = OVERVIEW_WINDOWS[window]
    points = seconds // bucket
    with engine.store.tx(write=False) as t:
        minute = int(float(t.one(StoreSQL.now)[0]) // 60)
        since = minute - seconds // 60   # (the window's minutes: since < m <= minute)
        (sampled,) = t.one(DashboardSQL.last_sample, {"minute": minute})
        counted = max(int(sampled) - STATS_LAG if sampled is not None else since, minute - STATS_LIVE)
        rows = {"start": (counted + 1) * 60, "end": (minute + 1) * 60}
        found = [(m, kind, b, n) for kind in FINISHED_KINDS for m, b, n in t.all(DashboardSQL.finished[kind], rows)]
        found += t.all(DashboardSQL.minute_stats, {"since": since, "until": counted})
        samples = t.all(DashboardSQL.queue_samples, {"since": since})
    by_kind: dict[str, list[tuple]] = {kind: [] for kind in FINISHED_KINDS}
    for m, kind, b, n in found:   # each minute at its point: points of ``bucket`` seconds back from this minute's end
        by_kind[kind].append(((minute - int(m)) * 60 // bucket, b, n))
    run_bins, step_bins = _binned(by_kind["run"], points), _binned(by_kind["step"], points)
    report["window"] = {"name": window, "seconds": seconds, "bucket": bucket, "points": points,
                        "choices": list(OVERVIEW_WINDOWS), "minute": minute}
    report["throughput"] = {"runs_completed": [sum(b.values()) for b in run_bins],
                            "steps_finished": [sum(b.values()) for b in step_bins]}
    report["durations"] = {kind: {f"p{round(q * 100)}": [_quantile(b, q) for b in bins] for q in (0.5, 0.95)}
                           for kind, bins in (("run", run_bins), ("step", step_bins))}
    report["queue"] = _queue_history(samples, minute, bucket, points)
    report["schedules"] = schedule_report(engine, engine.config)
    report["stale_after"] = float(engine.config.get("supervisor.reaper_timeout"))
    return report


def _binned(rows: list[tuple], points: int) -> list[dict[int, int]]:
    """(point, bin, count) rows as each point's counts by bin (points past the window, a clock step: dropped)."""
    out: list[dict[int, int]] = [{} for _ in range(points)]
    for point, b, n in rows:
        if 0 <= int(point) < points:
            out[int(point)][int(b)] = out[int(point)].get(int(b), 0) + int(n)
    return out


def _quantile(bins: dict[int, int], q: float) -> float | None:
    """The ``q`` quantile of durations counted in DURATION_BINS bins, interpolated inside its bin (None: none)."""
    total = sum(bins.values())
    if not total:
        return None
    rank, seen = q * total, 0
    for b in sorted(bins):
        if seen + bins[b] >= rank:
            low = DURATION_BINS[b - 1] if b > 0 else 0.0
            high = DURATION_BINS[b] if b < len(DURATION_BINS) else low
            return round(low + (high - low) * (rank - seen) / bins[b], 4)
        seen += bins[b]
    return None   # (not reached: the last bin holds the rank)


def _queue_history(samples: list[tuple], minute: int, bucket: int, points: int) -> dict:
    """The queue's samples as per-point series: ``sampled`` (a sample was taken in the point), and per pipeline
    ``depth`` and ``oldest_age``, the largest of the point's samples (0 where sampled without the pipeline's
    claimable steps, None where nothing was sampled)."""
    sampled = [False] * points
    seen: dict[str, dict[int, tuple[int, float]]] = {}
    for m, pipeline, depth, oldest in samples:
        point = (minute - int(m)) * 60 // bucket
        if not 0 <= point < points:
            continue
        sampled[point] = True
        if pipeline:
            was = seen.setdefault(pipeline, {}).get(point, (0, 0.0))
            seen[pipeline][point] = (max(was[0], int(depth)), max(was[1], float(oldest)))
    fill = [0 if on else None for on in sampled]
    depth = {p: [by[i][0] if i in by else f for i, f in enumerate(fill)] for p, by in sorted(seen.items())}
    oldest = {p: [round(by[i][1], 3) if i in by else f for i, f in enumerate(fill)] for p, by in sorted(seen.items())}
    return {"sampled": sampled, "depth": depth, "oldest_age": oldest}


def _paged(store: Store, key: str, sql: str, columns: str, filters: dict[str, str | None], page: int, per_page: int,
           decode: str = "") -> dict:
    """One page of rows, newest first; ``filters`` maps a fixed column name to a value (None = any)."""
    given = {column: value for column, value in filters.items() if value}
    where = "".join(f" AND {column} = :f_{_bare(column)}" for column in given)  # column names from code only
    params = {"limit": per_page + 1, "offset": (page - 1) * per_page,
              **{f"f_{_bare(column)}": value for column, value in given.items()}}
    with store.tx(write=False) as t:
        rows = t.all(sql.replace("{where}", where), params)
        pipelines = [pipeline for (pipeline,) in t.all(DashboardSQL.pipelines)]
    return {key: _records(rows[:per_page], columns, decode), "page": page, "per_page": per_page,
            "has_next": len(rows) > per_page, "pipelines": pipelines,
            **{_bare(column): value for column, value in filters.items()}}


def dashboard_runs(store: Store, pipeline: str | None = None, status: str | None = None, page: int = 1,
                   per_page: int = DASHBOARD_PER_PAGE) -> dict:
    """The runs page: one page of runs (newest first), filtered by pipeline and status."""
    data = _paged(store, "runs", DashboardSQL.runs, DashboardSQL.RUN_COLUMNS, {"pipeline": pipeline, "status": status},
                  page, per_page, decode="halt_reasons")
    _with_durations(data["runs"])
    return data


def dashboard_errors(store: Store, pipeline: str | None = None, page: int = 1,
                     per_page: int = DASHBOARD_PER_PAGE, sample: int = DASHBOARD_ERROR_SAMPLE) -> dict:
    """The errors page: the latest ``sample`` failed and crashed executions grouped by class and message (the
    first page only), then one page of them (newest first); both filtered by pipeline."""
    data = _paged(store, "errors", DashboardSQL.errors, DashboardSQL.ERROR_COLUMNS, {"s.pipeline": pipeline},
                  page, per_page)
    if page == 1:
        where, params = (" AND s.pipeline = :pipeline", {"pipeline": pipeline}) if pipeline else ("", {})
        with store.tx(write=False) as t:
            rows = t.all(DashboardSQL.error_heads.replace("{where}", where),
                         {**params, "head": STATUS_ERROR_LINE, "limit": sample})
        heads = [dict(zip(DashboardSQL.ERROR_HEAD_KEYS, row, strict=True)) for row in rows]
        data.update(groups=_error_groups(heads), sample=sample, sampled=len(rows))
    return data


def _error_groups(heads: list[dict]) -> list[dict]:
    """Executions (newest first) grouped by the first line of their error, ``Class: message`` (a crash's: what
    the reaper wrote), most frequent first: each group's count, steps, first and last seen, latest example."""
    groups: dict[str, dict] = {}
    for e in heads:
        line = (e["head"] or "").partition("\n")[0].strip() or "(no error text)"
        kind, sep, message = line.partition(": ")
        group = groups.get(line)
        if group is None:   # the first met is the latest: the example
            group = groups[line] = {"class": kind if sep else line, "message": message, "count": 0, "steps": [],
                                    "outcomes": [], "first_seen": e["finished_at"], "last_seen": e["finished_at"],
                                    "example": {"run": e["run"], "step": e["step"]}}
        group["count"] += 1
        group["first_seen"] = e["finished_at"]
        where = f'{e["pipeline"]}.{e["name"]}'
        if where not in group["steps"]:
            group["steps"].append(where)
        if e["outcome"] not in group["outcomes"]:
            group["outcomes"].append(e["outcome"])
    return sorted(groups.values(), key=lambda g: (-g["count"], -(g["last_seen"] or 0)))


@record(frozen=True)
class FanoutView:
    """Which branches of one fan-out a run page shows: those of ``status`` (None: any), page ``page``."""

    step: int | None = None   # the fan-out's step (None: no fan-out is paged or filtered: each shows its first)
    status: str | None = None
    page: int = 1

    def of(self, step_id: int) -> tuple[str | None, int]:
        """(status filter, page) for the fan-out of ``step_id``."""
        return (self.status, self.page) if step_id == self.step else (None, 1)


def dashboard_search(store: Store, q: str) -> dict:
    """Search: the run whose id ``q`` is, the runs whose trigger key it is (any pipeline), the pipelines
    whose name holds it (any case); ``go`` is the one page every match points to (a page shows it at once)."""
    q = (q or "").strip()[:MAX_TRIGGER_KEY]
    found: dict = {"q": q, "run": None, "keyed": [], "pipelines": [], "go": None}
    if not q:
        return found
    with store.tx(write=False) as t:
        pipelines = [pipeline for (pipeline,) in t.all(DashboardSQL.pipelines)]
        if re.fullmatch(r"[0-9]{1,18}", q):
            row = t.one(DashboardSQL.run_by_id, {"id": int(q)})
            found["run"] = _run_records([row])[0] if row else None
        names = BulkSQL.rows(t.dialect, DashboardSQL.PIPELINE_ROWS)
        keyed = t.all(DashboardSQL.runs_by_key.replace("{pipelines}", names),
                      {"rows": _document(DashboardSQL.PIPELINE_ROWS, [(p,) for p in pipelines]), "key": q}
                      ) if pipelines else []
    found["keyed"] = _run_records(keyed)
    found["pipelines"] = [p for p in pipelines if q.casefold() in p.casefold()]
    targets = {f'/runs/{r["id"]}' for r in [found["run"], *found["keyed"]] if r}
    targets |= {"/runs?" + urllib.parse.urlencode({"pipeline": p}) for p in found["pipelines"]}
    found["go"] = targets.pop() if len(targets) == 1 else None
    return found


def dashboard_run(store: Store, run_id: int, view: FanoutView = FanoutView(),
                  max_steps: int = DASHBOARD_MAX_STEPS) -> dict | None:
    """One run and its tree: ``tree`` is the root branch; a step's ``branches`` are the fan-out
    (expand/divide/divert) that followed it, in position order, at most DASHBOARD_BRANCHES of them (which
    ones: ``view``), and its ``fanout`` counts them all by status; its join step comes after it. Only the
    shown branches' steps (and their executions) are read; the graph's counts are of every step."""
    by_run = {"run_id": run_id}
    with store.tx(write=False) as t:
        row = t.one(SQL.select_run, {"id": run_id})
        if row is None:
            return None
        branches, fanouts = _shown_branches(t.all(DashboardSQL.branches, by_run), run_id, view)
        step_rows = t.all(DashboardSQL.steps.replace("{branches}", BulkSQL.ids(t.dialect, "", "branch_id")),
                          {**by_run, "ids": BulkSQL.id_list(t.dialect, branches), "limit": max_steps + 1})
        execution_rows = t.all(DashboardSQL.executions.replace("{steps}", BulkSQL.ids(t.dialect, "e", "step_id")),
                               {"ids": BulkSQL.id_list(t.dialect, (r[0] for r in step_rows[:max_steps]))})
        node_counts = t.all(DashboardSQL.node_counts, by_run)
        context = {k: _loads_for_display(v) for k, v in t.all(SQL.context_all, by_run)}
        run = _records([row], RunRow.select_list(), "input output halt_reasons")[0]
        definition = t.one(SQL.select_definition, {"hash": run.pop("definition")})
    run.update(duration=_duration(run["created_at"], run["finished_at"]), context=context)
    steps = _steps(step_rows[:max_steps], execution_rows)
    counts: dict[int, dict[str, int]] = {}
    for node, status, n in node_counts:
        counts.setdefault(int(node), {})[status] = int(n)
    graph = _graph_nodes(definition[0]) if definition else None
    return {"run": run, "tree": _tree(branches, fanouts, steps), "steps": len(steps),
            "truncated": len(step_rows) > max_steps, "graph": graph, "node_counts": counts}


def _shown_branches(branch_rows: list[tuple], run_id: int, view: FanoutView) -> tuple[dict[int, dict], dict[int, dict]]:
    """The branches a run page shows (by id: the root, and per fan-out of a shown branch the page of its
    children ``view`` picks), and every fan-out's summary by its step: its branches by status, which shown."""
    records = sorted(_records(branch_rows, DashboardSQL.BRANCH_COLUMNS), key=lambda b: (b["position"], b["id"]))
    children: dict[int, dict[int, list[dict]]] = {}   # parent branch -> its fan-outs' steps -> their branches
    roots = []
    for b in records:
        if b["parent_id"] is None:
            roots.append(b)
        else:
            children.setdefault(b["parent_id"], {}).setdefault(b["origin_step_id"], []).append(b)
    # the branches down to the fan-out paged or filtered (nested in another's later page, say) are shown too
    parent_of = {b["id"]: b["parent_id"] for b in records}
    holder = next((b["parent_id"] for b in records if b["origin_step_id"] == view.step), None)
    forced: set[int] = set()
    while holder is not None and holder not in forced:
        forced.add(holder)
        holder = parent_of.get(holder)
    shown: dict[int, dict] = {}
    fanouts: dict[int, dict] = {}
    todo = roots[:1]
    while todo:
        branch = todo.pop()
        shown[branch["id"]] = branch
        for step_id, fanned in children.get(branch["id"], {}).items():
            status, page = view.of(step_id)
            by_status: dict[str, int] = {}
            for b in fanned:
                by_status[b["status"]] = by_status.get(b["status"], 0) + 1
            chosen = [b for b in fanned if status in (None, b["status"])]
            first = (page - 1) * DASHBOARD_BRANCHES
            fanouts[step_id] = {"run": run_id, "step": step_id, "branches": len(fanned), "by_status": by_status,
                                "status": status, "page": page, "first": first, "matching": len(chosen),
                                "has_next": len(chosen) > first + DASHBOARD_BRANCHES}
            page_of = chosen[first:first + DASHBOARD_BRANCHES]
            on_page = {b["id"] for b in page_of}
            todo.extend(page_of + [b for b in fanned if b["id"] in forced - on_page])
    return shown, fanouts


def _graph_nodes(body: str) -> list[dict] | None:
    """A stored definition's nodes (None when the body is not one: a hand-edited or newer row)."""
    try:
        nodes = json.loads(body)["nodes"]
        return nodes if isinstance(nodes, list) and all(isinstance(n, dict) and "id" in n for n in nodes) else None
    except (ValueError, TypeError, KeyError):
        return None


def _steps(step_rows: list[tuple], execution_rows: list[tuple]) -> dict[int, dict]:
    """A run's steps by id, in order, each with its executions (oldest first) and room for its fan-out."""
    steps: dict[int, dict] = {}
    for step in _records(step_rows, DashboardSQL.STEP_COLUMNS, "input output"):
        step.update(duration=_duration(step["started_at"], step["finished_at"]), executions=[], branches=[])
        steps[step["id"]] = step
    for e in _records(execution_rows, DashboardSQL.EXECUTION_COLUMNS):
        if e["step_id"] in steps:
            e["duration"] = _duration(e["started_at"], e["finished_at"])
            steps[e.pop("step_id")]["executions"].append(e)
    for step in steps.values():  # a finished step ran when its last execution did (it was claimed before)
        last = step["executions"][-1] if step["executions"] else None
        if step["status"] in ("succeeded", "failed") and last and last["started_at"] is not None:
            step.update(started_at=last["started_at"], finished_at=last["finished_at"], duration=last["duration"])
    return steps


def _tree(shown: dict[int, dict], fanouts: dict[int, dict], steps: dict[int, dict]) -> dict | None:
    """The root branch: each step in its branch's ``steps``, each shown child branch under the step it came
    from (with that fan-out's summary as the step's ``fanout``)."""
    branches = {i: {**b, "steps": []} for i, b in shown.items()}
    for step in steps.values():
        branches[step["branch_id"]]["steps"].append(step)
        if step["id"] in fanouts:
            step["fanout"] = fanouts[step["id"]]
    root = None
    for branch in sorted(branches.values(), key=lambda b: (b["position"], b["id"])):
        if branch["parent_id"] is None:
            root = root or branch
        elif branch["origin_step_id"] in steps:  # else beyond max_steps
            steps[branch["origin_step_id"]]["branches"].append(branch)
    return root


# -- data: what the pages offer to change (the actions) ------------------------------------
def run_actions(status: str, offered: bool) -> dict[str, bool]:
    """A run page's actions: cancel while the run is in progress, revive once it halted or was cancelled."""
    return {"cancel": offered and status == "in_progress", "revive": offered and status in ("halted", "cancelled")}


def runs_actions(pipeline: str | None, status: str | None, offered: bool) -> dict[str, bool]:
    """The runs page's: a bulk cancel of the filter's runs in progress, once it names a pipeline (and no other
    status than in_progress): a cancel of every pipeline at once is the CLI's, not a click's."""
    return {"bulk_cancel": offered and bool(pipeline) and status in (None, "in_progress")}


def dashboard_bulk_cancel(store: Store, pipeline: str | None, offered: bool) -> dict:
    """The bulk cancel's confirmation: the pipeline and how many of its runs are in progress now."""
    if not pipeline:
        raise _BadRequest("pipeline is required: a bulk cancel stops the runs of one pipeline")
    with store.tx(write=False) as t:
        (count,) = t.one(DashboardSQL.in_progress_of_pipeline, {"pipeline": pipeline})
    return {"pipeline": pipeline, "in_progress": int(count), "actions": {"bulk_cancel": offered and int(count) > 0}}


# -- data: /metrics ------------------------------------------------------------------------
@record(frozen=True)
class MetricFamily:
    """One /metrics family: a sample for every combination of its labels' values, read from one source."""

    name: str
    kind: str                # the Prometheus type: counter or gauge
    labels: tuple[str, ...]  # label names; _metric_data() gives each label's values
    source: str              # _metric_data()'s samples for it, keyed by the tuple of label values
    help: str
    zero: float = 0          # the value of a combination the source lacks
    values: tuple[tuple[str, tuple[str, ...]], ...] = ()   # this family's own values of a label, if not the common ones


DASHBOARD_METRICS = (
    MetricFamily("ductwork_build_info", "gauge", ("version", "python", "dialect", "schema"), "build",
                 "This ductwork: 1, its version, Python, the database dialect and the schema version in it."),
    MetricFamily("ductwork_runs", "gauge", ("pipeline", "status"), "runs",
                 "Runs kept per pipeline and status now (pruned ones are gone; revive() moves one back)."),
    MetricFamily("ductwork_runs_in_progress", "gauge", ("pipeline",), "in_progress",
                 "Runs in progress per pipeline."),
    MetricFamily("ductwork_runs_triggered_total", "counter", ("pipeline",), "triggered",
                 "Runs ever triggered per pipeline."),
    MetricFamily("ductwork_runs_finished_total", "counter", ("pipeline", "status"), "finished",
                 "Times a run of the pipeline completed, halted or was cancelled (a revived run that halts again "
                 "counts again).", values=(("status", FINISHED_STATUSES),)),
    MetricFamily("ductwork_runs_pruned_total", "counter", ("pipeline", "status"), "pruned",
                 "Finished runs deleted by retention, per pipeline and the status they had.",
                 values=(("status", FINISHED_STATUSES),)),
    MetricFamily("ductwork_steps_executed_total", "counter", ("pipeline", "outcome"), "executed",
                 "Step executions per pipeline and outcome (succeeded, failed, crashed, cancelled: discarded)."),
    MetricFamily("ductwork_queue_depth", "gauge", ("pipeline",), "queue_depth",
                 "Claimable steps (queued and available now) per pipeline."),
    MetricFamily("ductwork_queue_oldest_age_seconds", "gauge", ("pipeline",), "queue_age",
                 "Seconds the oldest claimable step has waited (0 when none).", zero=0.0),
    MetricFamily("ductwork_steps_waiting_for_slot", "gauge", ("pipeline",), "for_slot",
                 "Steps of capped steps waiting for a free slot of their concurrency key, per pipeline."),
    MetricFamily("ductwork_processes", "gauge", ("role",), "live",
                 "Live processes (heartbeat within supervisor.reaper_timeout) per role."),
    MetricFamily("ductwork_abandoned_threads", "gauge", ("role",), "abandoned",
                 "Worker threads still running a step that ran past its timeout (each was replaced), per role."),
)
# The values of the fixed labels; "pipeline" and "role" take every known one (_metric_data).
METRIC_LABEL_VALUES = {"status": RUN_STATUSES, "outcome": ("succeeded", "failed", "crashed", "cancelled")}
METRIC_ROLES = tuple(dict.fromkeys(spec.row_role for spec in ROLE_SPECS))   # supervisor, advancer, worker

# The families each live process exports through its row (ProcessMetrics, the supervisor's children): labelled
# with the process ("machine:pid") and its role, present only for what it observed. (name, type, help)
PROCESS_HISTOGRAMS = {
    "step_duration": ("ductwork_step_duration_seconds", "Seconds a step execution ran, per pipeline."),
    "queue_wait": ("ductwork_queue_wait_seconds",
                   "Seconds a step waited from claimable (queued, or its delay's end) to claimed, per pipeline."),
    "run_duration": ("ductwork_run_duration_seconds", "Seconds from trigger to completion of completed runs."),
}
PROCESS_COUNTERS = {
    "retries": ("ductwork_step_retries_total", "Step executions that were a retry (an attempt after a failed one)."),
    "timeouts": ("ductwork_step_timeouts_total", "Step executions that ran past their timeout (StepTimeout)."),
}
CHILD_COUNTERS = {
    "restarts": ("ductwork_child_restarts_total", "Restarts of a supervisor's child (by its supervisor)."),
    "recycles": ("ductwork_child_recycles_total", "Recycles of a supervisor's child (planned restarts)."),
}


def _metric_data(engine: Engine) -> tuple[dict[str, Sequence[str]], dict[str, dict[tuple, float]], list[tuple]]:
    """Each label's values (every known pipeline and role: zero-valued series too), each source's samples and the
    live processes' rows (role, machine, pid, info)."""
    live_within = {"live_within": float(engine.config.get("supervisor.reaper_timeout"))}
    with engine.store.tx(write=False) as t:
        counts = Counts.read(t)
        queue = t.all(DashboardSQL.queue)
        blocked = t.all(SQL.blocked_steps)
        processes = t.all(DashboardSQL.processes, live_within)
        infos = t.all(DashboardSQL.process_infos, live_within)
        schema = (t.one(StoreSQL.schema_version) or (0,))[0]
    build = (__version__, ".".join(map(str, sys.version_info[:3])), engine.store.dialect, str(schema))
    sources: dict[str, dict[tuple, float]] = {
        "build": {build: 1},
        "runs": dict(counts.runs),
        "in_progress": {(p,): n for (p, s), n in counts.runs.items() if s == "in_progress"},
        "triggered": {(p,): n for p, n in counts.triggered.items()},
        "finished": counts.finished(),
        "executed": dict(counts.executed),
        "pruned": dict(counts.pruned),
        "queue_depth": {(p,): int(n) for p, n, _ in queue},
        "queue_age": {(p,): round(float(age or 0), 3) for p, _, age in queue},
        "for_slot": {(p,): int(n) for p, n in blocked},
        "live": {(role,): int(n or 0) for role, n in processes},
        "abandoned": _abandoned_threads(infos),
    }
    pipelines = set(_REGISTRY) | counts.pipelines() | {pipeline for (pipeline,) in sources["queue_depth"]}
    roles = {role for (role,) in sources["live"]} | set(METRIC_ROLES)
    labels = {**METRIC_LABEL_VALUES, "pipeline": sorted(pipelines), "role": sorted(roles)}
    labels.update({name: (value,) for name, value in zip(("version", "python", "dialect", "schema"), build,
                                                         strict=True)})
    return labels, sources, infos


def _process_families(infos: list[tuple]) -> str:
    """The families the live processes export through their rows' info (PROCESS_HISTOGRAMS, PROCESS_COUNTERS,
    CHILD_COUNTERS), each series labelled with its process; a row whose info is not what this version writes
    (another version's, a hand-written one) adds nothing."""
    histograms: dict[str, list[str]] = {name: [] for name in PROCESS_HISTOGRAMS}
    counters: dict[str, list[str]] = {name: [] for name in (*PROCESS_COUNTERS, *CHILD_COUNTERS)}
    for role, machine, pid, info, row_id in sorted(infos, key=lambda row: (row[1], row[2], row[4])):
        # (the row too: a container restarted in its pod has the same machine and pid as its dead predecessor,
        # whose row lives on until the reaper takes it)
        process = _prom_label(f"{machine}:{pid}/{row_id}")
        try:
            data = json.loads(info)
            metrics = data.get("metrics") or {}
            for name, by_pipeline in (metrics.get("histograms") or {}).items():
                if name in histograms:
                    for pipeline, counts in sorted(by_pipeline.items()):
                        where = f'pipeline="{_prom_label(pipeline)}",process="{process}",role="{role}"'
                        histograms[name] += _histogram_lines(PROCESS_HISTOGRAMS[name][0], HISTOGRAM_BOUNDS[name],
                                                             where, counts)
            for name, by_pipeline in (metrics.get("counters") or {}).items():
                for pipeline, n in sorted(by_pipeline.items()) if name in PROCESS_COUNTERS else ():
                    counters[name].append(f'{PROCESS_COUNTERS[name][0]}{{pipeline="{_prom_label(pipeline)}",'
                                          f'process="{process}",role="{role}"}} {int(n)}')
            for child, about in sorted((data.get("children") or {}).items()):
                for name in CHILD_COUNTERS:
                    counters[name].append(f'{CHILD_COUNTERS[name][0]}{{child="{_prom_label(child)}",'
                                          f'process="{process}"}} {int(about.get(name, 0))}')
        except (ValueError, TypeError, AttributeError, IndexError):
            continue
    out = []
    for name, (family, about) in PROCESS_HISTOGRAMS.items():
        out += [f"# HELP {family} {about}", f"# TYPE {family} histogram", *histograms[name]]
    for name, (family, about) in {**PROCESS_COUNTERS, **CHILD_COUNTERS}.items():
        out += [f"# HELP {family} {about}", f"# TYPE {family} counter", *counters[name]]
    return "".join(line + "\n" for line in out)


def _histogram_lines(family: str, bounds: Sequence[float], where: str, counts: list[float]) -> list[str]:
    """A histogram's sample lines: the cumulative _bucket per bound and +Inf, _sum, _count (``counts``: per bucket,
    not cumulative, then the sum). Of the wrong length (another bucket layout): none."""
    if len(counts) != len(bounds) + 2:
        return []
    lines, total = [], 0
    for bound, n in zip((*(repr(float(b)) for b in bounds), "+Inf"), counts, strict=False):
        total += int(n)
        lines.append(f'{family}_bucket{{{where},le="{bound}"}} {total}')
    return [*lines, f"{family}_sum{{{where}}} {float(counts[-1])!r}", f"{family}_count{{{where}}} {total}"]


def _abandoned_threads(infos: list[tuple]) -> dict[tuple, float]:
    """Per role, the abandoned threads the process rows' info reports (a row whose info is not JSON counts 0)."""
    out: dict[tuple, float] = {}
    for role, _, _, info, _ in infos:
        try:
            n = int(json.loads(info).get("abandoned_threads", 0))
        except (ValueError, TypeError, AttributeError):
            n = 0
        out[(role,)] = out.get((role,), 0) + n
    return out


def _prom_family(family: MetricFamily, labels: dict[str, Sequence[str]], samples: dict[tuple, float]) -> str:
    """One family in the text format: # HELP, # TYPE, then one sample line per combination of label values."""
    import itertools
    lines = [f"# HELP {family.name} {family.help}", f"# TYPE {family.name} {family.kind}"]
    labels = {**labels, **dict(family.values)}
    for values in itertools.product(*(labels[name] for name in family.labels)):
        text = ",".join(f'{name}="{_prom_label(value)}"' for name, value in zip(family.labels, values, strict=True))
        lines.append(f"{family.name}{{{text}}} {samples.get(values, family.zero)!r}")
    return "".join(line + "\n" for line in lines)


def _prom_label(value: str) -> str:
    """A label value escaped for the text format (backslash, newline, double quote)."""
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def dashboard_metrics(engine: Engine) -> str:
    """Prometheus text format (0.0.4): the deployment's counts from the database, with zero-valued series for every
    known pipeline and role, then what each live process exports through its row."""
    labels, sources, infos = _metric_data(engine)
    return ("".join(_prom_family(family, labels, sources[family.source]) for family in DASHBOARD_METRICS)
            + _process_families(infos))


# -- html ------------------------------------------------------------------------------------
_DASHBOARD_CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#222;background:#f7f7f9}
nav{background:#223;padding:.6em 1.5em}nav a{color:#fff;margin-right:1.4em;text-decoration:none}
nav b{color:#9cf;margin-right:2em}nav form{display:inline;margin:0}
nav input{font:inherit;padding:.15em .5em;width:16em;border:1px solid #667;border-radius:3px}
main{padding:.5em 1.5em 2em}main:focus{outline:none}
:focus-visible{outline:3px solid #d97706;outline-offset:2px}
.skip{position:absolute;left:-999em;background:#fff;color:#1a1a1a;padding:.4em .8em}.skip:focus{left:1em;top:.3em}
summary{cursor:pointer;color:#336}form{margin:.6em 0}
table{border-collapse:collapse;margin:.4em 0 1.4em;background:#fff}th{background:#eef}
th,td{border:1px solid #ddd;padding:.2em .6em;text-align:left;vertical-align:top}
pre{margin:.2em 0;white-space:pre-wrap;word-break:break-all;max-height:24em;overflow:auto;background:#f0f0f3;
padding:.4em}
.st{padding:0 .45em;border-radius:3px;background:#ddd;color:#1a1a1a;font-size:.9em}
.st-completed,.st-succeeded{background:#c8f0c8}
.st-halted,.st-failed,.st-crashed{background:#f6c4c4}.st-cancelled,.st-cancelling,.st-stopping{background:#e2d6ee}
.st-in_progress,.st-running,.st-advancing{background:#cfe0ff}
.st-queued,.st-waiting,.st-advance,.st-blocked{background:#fff2b8}
ul.tree{list-style:none;padding-left:1.2em;border-left:2px solid #ccd;margin:.3em 0}li.step{margin:.35em 0}
.muted{color:#5f6068}.warn{color:#c00}.actions form{display:inline-block;margin:.2em 1em .8em 0}
.notice{background:#e6f2e6;border:1px solid #bcd9bc;padding:.4em .8em;margin:.6em 0}
svg{display:block;margin:.4em 0 1.2em;max-width:100%;height:auto;font-size:12px}
svg .node rect{fill:#fff;stroke:#889}svg .node.st-succeeded rect{fill:#c8f0c8}
svg .node.st-failed rect,svg .node.st-crashed rect{fill:#f6c4c4}svg .node.st-running rect{fill:#cfe0ff}
svg .node.st-queued rect,svg .node.st-blocked rect{fill:#fff2b8}svg .node.st-cancelled rect{fill:#e2d6ee}
svg .edge{stroke:#667;stroke-width:1.4}svg marker path{fill:#667}svg .edge-label,svg .tl-axis{fill:#555}
svg .wait{fill:#e9e9ef}svg .bar-x{fill:#69c}
.charts{display:flex;flex-wrap:wrap;gap:0 1.5em}figure.chart{margin:0 0 1em}figcaption{font-weight:600}
svg.chart{margin:.2em 0}svg .axis{stroke:#889}svg polyline.series{fill:none;stroke-width:1.6}
.s0{stroke:#2166ac;fill:#2166ac;color:#2166ac}.s1{stroke:#c2410c;fill:#c2410c;color:#c2410c}
.s2{stroke:#15803d;fill:#15803d;color:#15803d}.s3{stroke:#7e22ce;fill:#7e22ce;color:#7e22ce}
.s4{stroke:#a16207;fill:#a16207;color:#a16207}.s5{stroke:#0e7490;fill:#0e7490;color:#0e7490}
.s6{stroke:#be185d;fill:#be185d;color:#be185d}.s7{stroke:#4b5563;fill:#4b5563;color:#4b5563}
.legend .key{margin-right:1em}svg .o-succeeded{fill:#4a4}svg .o-failed{fill:#d44}
svg .o-crashed{fill:#a0a}svg .o-cancelled{fill:#98a}svg .o-running{fill:#69c}
@media (prefers-color-scheme:dark){body{color:#e4e4ea;background:#15171c}table{background:#1d2027}th{background:#272b38}
th,td{border-color:#3a3d48}pre{background:#22252d}summary,a{color:#9cc4ff}.muted{color:#a0a3ad}.warn{color:#ff8a80}
.st{background:#3a3d48;color:#fff}.st-completed,.st-succeeded{background:#1f5a2a}
.st-halted,.st-failed,.st-crashed{background:#7a2626}
.st-cancelled,.st-cancelling,.st-stopping{background:#4d3a66}
.st-in_progress,.st-running,.st-advancing{background:#24467a}
.st-queued,.st-waiting,.st-advance,.st-blocked{background:#6b5a12}.notice{background:#1f3a24;border-color:#2f5a36}
svg .node rect{fill:#1d2027;stroke:#8890a0}svg .node text,svg .tl-label{fill:#e4e4ea}
svg .node.st-succeeded rect{fill:#1f5a2a}svg .node.st-failed rect,svg .node.st-crashed rect{fill:#7a2626}
svg .node.st-running rect{fill:#24467a}svg .node.st-queued rect,svg .node.st-blocked rect{fill:#6b5a12}
svg .edge{stroke:#a0a8b8}svg marker path{fill:#a0a8b8}svg .edge-label,svg .tl-axis{fill:#a0a3ad}
svg .wait{fill:#2c2f38}svg .axis{stroke:#8890a0}
.s0{stroke:#6cb4ff;fill:#6cb4ff;color:#6cb4ff}.s1{stroke:#ff9a5c;fill:#ff9a5c;color:#ff9a5c}
.s2{stroke:#5fd98a;fill:#5fd98a;color:#5fd98a}.s3{stroke:#d6a2ff;fill:#d6a2ff;color:#d6a2ff}
.s4{stroke:#f5cc4a;fill:#f5cc4a;color:#f5cc4a}.s5{stroke:#4fd6e8;fill:#4fd6e8;color:#4fd6e8}
.s6{stroke:#ff8cc6;fill:#ff8cc6;color:#ff8cc6}.s7{stroke:#c0c6d0;fill:#c0c6d0;color:#c0c6d0}}"""

# Poll the JSON twin; when its ETag (a hash of the data) differs from the page's, fetch this
# page's <main> alone (X-Ductwork-Fragment) and swap it in, keeping open <details> open. Times
# (<time datetime>, sent in UTC) are shown in the browser's time zone, with its short name; the
# title keeps the UTC time for the hover.
_DASHBOARD_JS = """const b=document.body,every=1000*b.dataset.refresh;let cur=b.dataset.etag;
const p2=n=>String(n).padStart(2,"0");
function local(){const f=new Intl.DateTimeFormat([],{timeZoneName:"short"});
document.querySelectorAll("time[datetime]").forEach(t=>{const d=new Date(t.dateTime);
const z=f.formatToParts(d).find(x=>x.type==="timeZoneName");
t.textContent=d.getFullYear()+"-"+p2(d.getMonth()+1)+"-"+p2(d.getDate())+" "+p2(d.getHours())+":"
+p2(d.getMinutes())+":"+p2(d.getSeconds())+"."+String(d.getMilliseconds()).padStart(3,"0")+" "+(z?z.value:"")});}
local();
document.addEventListener("keydown",e=>{const t=e.target.tagName;   // "/": to the search box
if(e.key==="/"&&!e.ctrlKey&&!e.metaKey&&!e.altKey&&!/^(INPUT|TEXTAREA|SELECT)$/.test(t)){
e.preventDefault();document.getElementById("search").focus();}});
async function tick(){try{const r=await fetch(b.dataset.api,{cache:"no-store",headers:{"If-None-Match":cur}});
if(r.status===200&&r.headers.get("ETag")!==cur){
const f=await fetch(location.href,{cache:"no-store",headers:{"X-Ductwork-Fragment":"1"}});
if(f.ok){const h=await f.text(),open=[...document.querySelectorAll("details[open]")].map(d=>d.id);
document.querySelector("main").innerHTML=h;cur=f.headers.get("ETag");local();
open.forEach(i=>{const d=i&&document.getElementById(i);if(d)d.open=true});}}
}catch(e){}setTimeout(tick,every);}setTimeout(tick,every);"""


def _esc(value: Any) -> str:
    """Any value as html text (None as nothing), quotes escaped too."""
    import html
    return html.escape("" if value is None else str(value), quote=True)


def _ts(epoch: float | None) -> str:
    """An epoch time as UTC with milliseconds."""
    if epoch is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1000):03d}"


def _when(epoch: float | None) -> str:
    """An epoch time on a page: a <time> in UTC (machine-readable in ``datetime``, shown with "UTC" on hover
    in ``title``) that the page's script rewrites to the browser's local time (without script: UTC, said so)."""
    if epoch is None:
        return ""
    utc = _ts(epoch)
    iso = utc.replace(" ", "T") + "Z"
    return f'<time datetime="{iso}" title="{utc} UTC">{utc} UTC</time>'


def _secs(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}s" if value < 10 else f"{value:.1f}s"


def _badge(status: str | None) -> str:
    return f'<span class="st st-{_esc(status)}">{_esc(status)}</span>'


def _reasons(value: Any) -> str:
    return _esc(", ".join(map(str, value)) if isinstance(value, list) else value)


def _href(path: str, **params: Any) -> str:
    """An escaped link to ``path`` with the given (non-empty) query parameters."""
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v not in (None, "")})
    return _esc(path + ("?" + query if query else ""))


def _link(path: str, text: str) -> str:
    return f'<a href="{_esc(path)}">{_esc(text)}</a>'


def _table(headers: list[str], rows: list[list[str]], empty: str = "none") -> str:
    """A table of already escaped cells (or the ``empty`` note when there are no rows)."""
    if not rows:
        return f'<p class="muted">{_esc(empty)}</p>'
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return "<table><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in headers) + f"</tr>{body}</table>"


def _details(ident: str, summary: str, text: str) -> str:
    return f'<details id="{_esc(ident)}"><summary>{summary}</summary><pre>{_esc(text)}</pre></details>'


def _value(value: Any, label: str, ident: str, limit: int = 20000) -> str:
    """A stored value: one short line as the summary, the indented JSON (up to ``limit`` characters) inside."""
    text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
    short = json.dumps(value, ensure_ascii=False, default=str)
    more = f"\n... ({len(text) - limit} more characters in the JSON twin)" if len(text) > limit else ""
    short = short if len(short) <= 80 else short[:77] + "..."
    return _details(ident, f"{_esc(label)} <code>{_esc(short)}</code>", text[:limit] + more)


def _error(text: str | None, ident: str) -> str:
    """An error: its first line as the summary, the traceback inside (both bounded: rows stored before
    the bound on error texts may hold megabytes)."""
    first, _, rest = (text or "").partition("\n")
    if not text:
        return ""
    return _details(ident, _esc(clip(first, STATUS_ERROR_LINE)), clip(rest or first, DASHBOARD_MAX_TEXT))


def _paging(path: str, data: dict, **filters: Any) -> str:
    """The newer/older links of a paged list, keeping its filters."""
    size = data["per_page"] if data["per_page"] != DASHBOARD_PER_PAGE else None
    newer = f'<a href="{_href(path, page=data["page"] - 1, per_page=size, **filters)}">&larr; newer</a> '
    older = f' <a href="{_href(path, page=data["page"] + 1, per_page=size, **filters)}">older &rarr;</a>'
    return f'<p>{newer if data["page"] > 1 else ""}page {data["page"]}{older if data["has_next"] else ""}</p>'


def _filters(path: str, data: dict, **choices: list[str]) -> str:
    """A GET form with one <select> per filter (the current choice selected)."""
    selects = "".join(
        f'<select name="{name}"><option value="">any {name}</option>'
        + "".join(f'<option value="{_esc(o)}"{" selected" if o == data.get(name) else ""}>{_esc(o)}</option>'
                  for o in options)
        + "</select> " for name, options in choices.items())
    return f'<form method="get" action="{path}">{selects}<button>filter</button></form>'


def render_overview(data: dict) -> str:
    """The overview's <main>: the charts over the chosen window, runs per pipeline, what waits, schedules and
    delayed runs, processes, recent halts and errors."""
    return (_overview_charts(data) + _overview_runs(data["runs"])
            + _overview_waiting(data["waiting"], data["waits"]) + _overview_schedules(data["schedules"])
            + _overview_scheduled(data["scheduled"])
            + _overview_processes(data["processes"], data["stale_after"])
            + _overview_halts(data["recent_halts"]) + _overview_errors(data["recent_errors"]))


def _overview_charts(data: dict) -> str:
    """The window's choices and its charts: throughput, durations (p50, p95), the queue per pipeline."""
    w = data["window"]
    choices = " ".join(f'<b aria-current="page">{name}</b>' if name == w["name"]
                       else f'<a href="{_href("/", window=name)}">{name}</a>' for name in w["choices"])
    every = _span_text(w["bucket"])
    tp, d, q = data["throughput"], data["durations"], data["queue"]
    queue_note = ("" if any(q["sampled"]) else
                  '<p class="muted">no queue samples in this window: an advancer process takes one a minute</p>')
    return (f'<h2>Activity</h2><p class="windows">window: {choices}</p><div class="charts">'
            + render_chart("throughput", f"finished per {every}", {"runs completed": tp["runs_completed"],
                                                                    "steps finished": tp["steps_finished"]}, w)
            + render_chart("step-duration", "step duration (s)", d["step"], w)
            + render_chart("run-duration", "run duration (s)", d["run"], w)
            + render_chart("queue-depth", "claimable steps", q["depth"], w)
            + render_chart("queue-age", "oldest claimable step waited (s)", q["oldest_age"], w)
            + "</div>" + queue_note)


def _span_text(seconds: float) -> str:
    """A span of time as its largest whole unit: 120 -> "2 min", 3600 -> "1 h"."""
    for unit, size in (("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)} {unit}"
    return f"{seconds:g} s"


def _overview_waiting(waiting: dict[str, dict], waits: list[dict]) -> str:
    """What waits, per pipeline (for a signal, asleep, for a concurrency slot), and the first parked branches."""
    if not waiting:
        return ""
    rows = [[_esc(p), str(w["signal"]), _when(w["first_timeout"]), str(w["sleeping"]), _when(w["first_wake"]),
             str(w["for_slot"])] for p, w in waiting.items()]
    table = _table(["pipeline", "for a signal", "first timeout", "asleep", "first wakes", "for a slot"], rows)
    parked = [[_link(f'/runs/{w["run"]}', f'run {w["run"]}'), _esc(w["pipeline"]), _esc(repr(w["signal"])),
               _when(w["until"]) or "no timeout"] for w in waits]
    return ('<h2>Waiting</h2><div id="waiting">' + table
            + (_table(["run", "pipeline", "signal", "until"], parked) if parked else "") + "</div>")


def _overview_schedules(schedules: list[dict]) -> str:
    """The registered pipelines' schedules: on or off, the next tick, the last fired and its run."""
    if not schedules:
        return ""
    def last(r: dict) -> str:
        if r["last"] is None:
            return "never fired"
        run = _link(f'/runs/{r["last_run"]}', f'run {r["last_run"]}') if r["last_run"] else "(seen, not fired)"
        return f'{_when(r["last"])} {run}'
    rows = [[_esc(r["pipeline"]), _esc(r["schedule"]), _badge("on" if r["on"] else "off"),
             _when(r["next"]) if r["on"] else "off (config schedules)", last(r)] for r in schedules]
    return ('<h2>Schedules</h2><div id="schedules">'
            + _table(["pipeline", "schedule", "state", "next", "last"], rows) + "</div>")


def _overview_runs(counts_by_pipeline: dict[str, dict[str, int]]) -> str:
    statuses = RUN_STATUSES
    rows = [[f'<a href="{_href("/runs", pipeline=p)}">{_esc(p)}</a>',
             *(f'<a href="{_href("/runs", pipeline=p, status=s)}">{counts.get(s, 0)}</a>' for s in statuses),
             str(sum(counts.values()))] for p, counts in sorted(counts_by_pipeline.items())]
    return "<h2>Runs</h2>" + _table(["pipeline", *statuses, "total"], rows, "no runs yet")


def _overview_scheduled(scheduled: dict[str, dict]) -> str:
    """The delayed runs still to start, per pipeline (nothing when there are none)."""
    rows = [[_esc(p), str(due["runs"]), _when(due["first"])] for p, due in scheduled.items()]
    return ('<h2>Scheduled</h2><div id="scheduled">' + _table(["pipeline", "runs to start", "first at"], rows)
            + "</div>") if rows else ""


def _overview_processes(processes: list[dict], stale_after: float) -> str:
    rows = [[_esc(p["machine"]), str(p["pid"]), _esc(p["role"]), _badge(p["state"]),
             f'<span class="{"warn" if p["heartbeat_age"] > stale_after else ""}">'
             f'{_secs(p["heartbeat_age"])} ago</span>',
             _secs(p["age"]), str(p["restarts"]), _esc(",".join(p["pipelines"]))] for p in processes]
    headers = ["machine", "pid", "role", "state", "heartbeat", "up", "restarts", "pipelines"]
    return "<h2>Processes</h2>" + _table(headers, rows, "no live processes")


def _overview_halts(halts: list[dict]) -> str:
    rows = [[_link(f'/runs/{h["run"]}', f'run {h["run"]}'), _esc(h["pipeline"]), _reasons(h["reasons"]),
             _when(h["finished_at"])] for h in halts]
    return "<h2>Recent halts</h2>" + _table(["run", "pipeline", "reasons", "finished"], rows)


def _overview_errors(errors: list[dict]) -> str:
    rows = [[_link(f'/runs/{e["run"]}#step-{e["step"]}', f'run {e["run"]} step {e["step"]}'),
             _esc(f'{e["pipeline"]}.{e["name"]}'), _badge(e["outcome"]), _esc(e["error"]), _when(e["at"])]
            for e in errors]
    return ('<h2>Recent step errors <a href="/errors" class="muted">(all)</a></h2>'
            + _table(["step", "pipeline.step", "outcome", "error", "at"], rows))


def render_runs(data: dict) -> str:
    """The runs page's <main>: the filters, the bulk cancel's link (when offered), one page of runs, paging."""
    bulk = (f'<p class="actions"><a href="{_href(DASHBOARD_CONFIRM_CANCEL, pipeline=data["pipeline"])}">'
            f'cancel the runs in progress of {_esc(data["pipeline"])}&hellip;</a></p>'
            if data.get("actions", {}).get("bulk_cancel") else "")
    return ("<h2>Runs</h2>"
            + _filters("/runs", data, pipeline=data["pipelines"], status=list(RUN_STATUSES)) + bulk
            + _runs_table(data["runs"])
            + _paging("/runs", data, pipeline=data["pipeline"], status=data["status"]))


def _action_form(action: str, token: str, label: str, **fields: Any) -> str:
    """A POST form of one button: its hidden fields and this session's CSRF token (see "actions")."""
    hidden = "".join(f'<input type="hidden" name="{_esc(name)}" value="{_esc(value)}">'
                     for name, value in {**fields, "csrf": token}.items())
    return f'<form method="post" action="{_esc(action)}">{hidden}<button>{_esc(label)}</button></form>'


def _run_forms(run_id: int, actions: dict[str, bool], token: str | None) -> str:
    """A run's action buttons, those its status allows (none without a token: a read-only dashboard)."""
    if token is None:
        return ""
    forms = [_action_form(f"/runs/{run_id}/{name}", token, label)
             for name, label in (("cancel", "Cancel run"), ("revive", "Revive run")) if actions.get(name)]
    return f'<div class="actions">{"".join(forms)}</div>' if forms else ""


def render_bulk_cancel(data: dict, token: str | None = None) -> str:
    """The bulk cancel's confirmation: how many runs of the pipeline are in progress, and the form that
    cancels them (no form when none is, or without a token)."""
    pipeline, count = data["pipeline"], int(data["in_progress"])
    back = f'<p><a href="{_href("/runs", pipeline=pipeline)}">back to the runs of {_esc(pipeline)}</a></p>'
    head = f"<h2>Cancel the runs of {_esc(pipeline)}</h2>"
    if count == 0:
        return head + f"<p>No run of <b>{_esc(pipeline)}</b> is in progress: nothing to cancel.</p>" + back
    runs = "1 run" if count == 1 else f"{count} runs"
    text = (f'<p><b id="bulk-count">{runs}</b> of <b>{_esc(pipeline)}</b> {"is" if count == 1 else "are"} in '
            "progress now. Cancelling ends them: no step of theirs starts any more, steps running are told to stop "
            "and what they return is discarded. Runs of it that start before you confirm are cancelled too. A "
            "cancelled run can be revived: it re-runs what had not completed.</p>")
    form = (_action_form(DASHBOARD_BULK_CANCEL, token, f"Cancel {runs}", pipeline=pipeline, expected=count)
            if token is not None and data["actions"]["bulk_cancel"] else "")
    return head + text + f'<div class="actions">{form}</div>' + back


def _notice(query: dict) -> str:
    """The line saying what the action that redirected here did (its ``?done=``; unknown values: nothing)."""
    text = DASHBOARD_NOTICES.get(query.get("done", ""))
    if text is None:
        return ""
    count = query.get("count", "")   # the query's: shown as a number or not at all, the pipeline clipped
    text = text.format(count=int(count) if re.fullmatch(r"[0-9]{1,12}", count) else 0,
                       pipeline=clip(query.get("pipeline", ""), 200))
    return f'<p class="notice" id="notice">{_esc(text)}</p>'


def _render_branch(branch: dict) -> str:
    """A branch and its steps, each step followed by the branches it fanned out to (recursively)."""
    where = f', position {branch["position"]}' if branch["parent_id"] is not None else " (root)"
    reason = f' <span class="warn">{_esc(branch["halt_reason"])}</span>' if branch["halt_reason"] else ""
    if branch.get("waiting_for") is not None and branch["status"] == "advance":
        until = f'until {_when(branch["wait_until"])}' if branch["wait_until"] is not None else "(no timeout)"
        reason += f' <span class="muted waits">waits for signal {_esc(repr(branch["waiting_for"]))} {until}</span>'
    steps = "".join(_render_step(s) for s in branch["steps"])
    return f'<li class="branch">branch {int(branch["id"])}{where} {_badge(branch["status"])}{reason}' \
           f'<ul class="tree">{steps}</ul></li>'


def _render_step(s: dict) -> str:
    """One step: its status and times, input, output, error, its executions, then its fan-out."""
    sid = int(s["id"])
    attempts = "".join(f'<li>{_badge(e["outcome"])} attempt {_esc(e["attempt"])}, process {_esc(e["process_id"])}, '
                       f'{_when(e["started_at"])} &rarr; {_when(e["finished_at"])} ({_secs(e["duration"])})'
                       f'{_error(e["error"], f"err-{sid}-{i}")}</li>' for i, e in enumerate(s["executions"]))
    children = _render_fanout(s["fanout"]) if s.get("fanout") else ""
    children += "".join(_render_branch(b) for b in s["branches"])
    return (f'<li class="step" id="step-{sid}"><b>{_esc(s["name"])}</b> {_badge(s["status"])} '
            f'<span class="muted">step {sid}, attempts {_esc(s["attempts"])}, crashes {_esc(s["crashes"])}, '
            f'queued {_when(s["created_at"])}, started {_when(s["started_at"])}, finished {_when(s["finished_at"])}, '
            f'took {_secs(s["duration"])}</span>'
            + (f' <span class="warn">{_esc(s["halt_reason"])}</span>' if s["halt_reason"] else "")
            + (f' <span class="muted waits">not before {_when(s["not_before"])}</span>' if s.get("not_before")
               else "")
            + _value(s["input"], "input", f"in-{sid}") + _value(s["output"], "output", f"out-{sid}")
            + _error(s["error"], f"error-{sid}") + (f'<ul class="muted">{attempts}</ul>' if attempts else "")
            + (f'<ul class="tree">{children}</ul>' if children else "") + "</li>")


def _render_fanout(f: dict) -> str:
    """A fan-out's summary line above its branches: how many, by status (each a link to those alone), which
    of them are shown, and the links to the next and previous ones. Nothing for a small fan-out shown whole."""
    if f["branches"] <= DASHBOARD_BRANCHES and f["status"] is None and f["page"] == 1:
        return ""
    run, step = int(f["run"]), int(f["step"])

    def link(text: str, status: str | None, page: int) -> str:
        return f'<a href="{_href(f"/runs/{run}", fanout=step, fstatus=status, fpage=page)}#fanout-{step}">{text}</a>'
    statuses = " ".join(f"<b>{_esc(name)} {n}</b>" if name == f["status"] else link(f"{_esc(name)} {n}", name, 1)
                        for name, n in sorted(f["by_status"].items()))
    every = link("all", None, 1) if f["status"] is not None else "<b>all</b>"
    last = min(f["first"] + DASHBOARD_BRANCHES, f["matching"])
    which = (f"showing {f['first'] + 1}&ndash;{last} of {f['matching']}" if f["first"] < f["matching"]
             else f"none on this page, of {f['matching']}")
    previous = f" {link('&larr; previous', f['status'], f['page'] - 1)}" if f["page"] > 1 else ""
    following = f" {link('next &rarr;', f['status'], f['page'] + 1)}" if f["has_next"] else ""
    return (f'<li class="fanout" id="fanout-{step}"><b>fan-out of {int(f["branches"])} branches</b>: {every} '
            f'{statuses} <span class="muted">({which}{" " + _esc(f["status"]) if f["status"] else ""})</span>'
            f"{previous}{following}</li>")


def render_run(data: dict, token: str | None = None) -> str:
    """A run's <main>: its summary, its action buttons (with a token: the actions its status allows), input,
    output, context, then the step tree."""
    r = data["run"]
    summary = [[_esc(r["pipeline"]), _badge(r["status"]), _when(r["created_at"]), _when(r["finished_at"]),
                _secs(r["duration"]), _reasons(r["halt_reasons"])]]
    context = [[_esc(k), f"<pre>{_esc(json.dumps(v, ensure_ascii=False, default=str))}</pre>"]
               for k, v in r["context"].items()]
    note = f'<p class="warn">showing the first {data["steps"]} steps only</p>' if data["truncated"] else ""
    tree = (f'<ul class="tree">{_render_branch(data["tree"])}</ul>' if data["tree"]
            else '<p class="muted">no branches</p>')
    why = (f'<p class="muted" id="cancel-reason">cancel reason: {_esc(clip(r["cancel_reason"], STATUS_ERROR_LINE))}'
           "</p>" if r.get("cancel_reason") else "")
    if r.get("scheduled_at") is not None:   # a delayed run: when it starts (started)
        why += f'<p class="muted" id="scheduled-at">scheduled to start at {_when(r["scheduled_at"])}</p>'

    return (f'<h2>Run {int(r["id"])}</h2>'
            + _table(["pipeline", "status", "created", "finished", "took", "halt reasons"], summary)
            + why + _run_forms(int(r["id"]), data.get("actions", {}), token)
            + _value(r["input"], "input", "run-in") + _value(r["output"], "output", "run-out")
            + _run_pictures(data)
            + "<h3>Context</h3>" + _table(["key", "value"], context, "empty") + f"<h3>Steps</h3>{note}{tree}")


def _run_pictures(data: dict) -> str:
    """A run page's graph and timeline (none for a run whose definition is not stored)."""
    if not data.get("graph"):
        return ""
    steps = sorted(_tree_steps(data["tree"]), key=lambda s: (s.get("created_at") or 0, s["id"]))
    r = data["run"]
    end = max([r["finished_at"] or time.time(), *(e["finished_at"] for s in steps for e in s["executions"])])
    counts = {int(node): by_status for node, by_status in data["node_counts"].items()}
    return ("<h3>Pipeline</h3>" + render_graph(data["graph"], counts)
            + "<h3>Timeline</h3>" + render_timeline(steps, r["created_at"], end))


# -- pictures: a run's pipeline as a graph, its executions as a timeline (inline SVG, no script) -------------
GRAPH_BOX = (150, 34, 56, 18)   # a node's width and height, the gaps between layers and between nodes (px)
TIMELINE_ROWS = 200             # the timeline's rows (steps) at most; the rest are counted below it
TIMELINE_SIZE = (900, 14, 200)  # the bars' width, a row's height, the label column's width (px)
# a step status (or an execution's outcome) -> its colour class; a node takes the first of these its steps have
GRAPH_STATUS_ORDER = ("failed", "crashed", "running", "cancelling", "stopping", "blocked", "queued", "cancelled",
                      "succeeded")


def _tree_steps(branch: dict | None) -> Iterator[dict]:
    """Every step of a run's tree (dashboard_run), each branch's in order, its fan-outs' under it."""
    for step in (branch or {}).get("steps", []):
        yield step
        for child in step["branches"]:
            yield from _tree_steps(child)


def _node_edges(after: dict) -> list[tuple[int, str, str]]:
    """A node's edges: (target, kind: next | child | join, label: the wait before it, if any)."""
    label = ""
    if after.get("kind") == "wait":
        wait = after.get("wait") or {}
        label = f'sleep {wait["sleep"]:g}s' if "sleep" in wait else f'wait_for {wait.get("signal", "")}'
        join, after = after.get("join"), after.get("then") or {}
    else:
        join = after.get("join")
    kind = after.get("kind")
    targets = ([(after["next"], "next")] if kind == "chain" else [(after["child"], "child")] if kind == "expand"
               else [(n, "child") for n in after.get("children", [])] if kind == "divide"
               else [(n, "child") for n in (after.get("cases") or {}).values()] if kind == "divert" else [])
    if join is not None and kind in ("expand", "divide", "divert"):
        targets.append((join, "join"))
    return [(int(n), k, label) for n, k in targets]


def render_graph(nodes: list[dict], counts: dict[int, dict[str, int]]) -> str:
    """The pipeline's definition as an SVG DAG: a box per node (layered by its longest path from the start),
    coloured by the status of its steps in this run, with their count on a fan-out's; arrows for chains and
    fan-outs, dashed ones to a fan-out's join, a wait's label on its arrow."""
    edges = {int(n["id"]): _node_edges(n.get("after") or {}) for n in nodes}
    layer = {0: 0}
    for _ in nodes:   # longest path: at most len(nodes) rounds in a DAG
        changed = False
        for source, out in edges.items():
            for target, kind, _ in out:   # (a join comes after its fan-out's children: two layers on)
                step = 2 if kind == "join" else 1
                if source in layer and layer.get(target, -1) < layer[source] + step <= 2 * len(nodes):
                    layer[target], changed = layer[source] + step, True
        if not changed:
            break
    rows: dict[int, int] = {}
    place: dict[int, tuple[int, int]] = {}
    for n in sorted(layer, key=lambda n: (layer[n], n)):
        place[n] = (layer[n], rows.get(layer[n], 0))
        rows[layer[n]] = rows.get(layer[n], 0) + 1
    w, h, gx, gy = GRAPH_BOX
    at = {n: (10 + c * (w + gx), 10 + r * (h + gy)) for n, (c, r) in place.items()}
    width = 20 + (max(layer.values()) + 1) * (w + gx) - gx
    height = 20 + max(rows.values()) * (h + gy) - gy
    parts = []
    for source, out in edges.items():
        for target, kind, label in out:
            if source not in at or target not in at:
                continue
            (x1, y1), (x2, y2) = at[source], at[target]
            dash = ' stroke-dasharray="5 4"' if kind == "join" else ""
            parts.append(f'<line class="edge edge-{kind}" x1="{x1 + w}" y1="{y1 + h / 2:g}" x2="{x2 - 4}" '
                         f'y2="{y2 + h / 2:g}" marker-end="url(#arrow)"{dash}/>')
            if label:
                parts.append(f'<text class="edge-label" x="{(x1 + w + x2) / 2:g}" y="{(y1 + y2) / 2 + h / 2 - 4:g}" '
                             f'text-anchor="middle">{_esc(label)}</text>')
    by_id = {int(n["id"]): n for n in nodes}
    for n, (x, y) in at.items():
        mine = counts.get(n, {})
        status = next((s for s in GRAPH_STATUS_ORDER if mine.get(s)), "none")
        total = sum(mine.values())
        name = str(by_id[n]["step"])
        about = ", ".join(f"{k} {v}" for k, v in sorted(mine.items())) or "not reached"
        shown = clip(name, 18) + (f" \u00d7{total}" if total > 1 else "")
        parts.append(f'<g class="node st-{status}" data-node="{n}" data-step="{_esc(name)}" data-count="{total}" '
                     f'data-status="{status}"><title>{_esc(name)}: {_esc(about)}</title>'
                     f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="5"/>'
                     f'<text x="{x + w / 2:g}" y="{y + h / 2 + 5:g}" text-anchor="middle">{_esc(shown)}</text></g>')
    return (f'<svg class="graph" role="img" aria-label="pipeline graph" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}"><defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" '
            'markerWidth="7" markerHeight="7" orient="auto"><path d="M0,0L10,5L0,10z"/></marker></defs>'
            + "".join(parts) + "</svg>")


def render_timeline(steps: list[dict], start: float, end: float) -> str:
    """The run's executions as Gantt bars, a row per step (the first TIMELINE_ROWS): the wait before its first
    execution (queued, asleep, blocked) as a pale bar, each execution a bar coloured by its outcome (a retry's,
    a crash's: a bar each), a step still running up to now."""
    width, row, label = TIMELINE_SIZE
    span = max(end - start, 1e-3)

    def x(t: float) -> float:
        return label + round(max(0.0, min(span, t - start)) / span * width, 1)
    shown, parts = steps[:TIMELINE_ROWS], []
    for i, step in enumerate(shown):
        y = 4 + i * row
        parts.append(f'<text class="tl-label" x="{label - 6}" y="{y + row - 4}" text-anchor="end">'
                     f'{_esc(clip(str(step["name"]), 26))}</text>')
        first = step["executions"][0]["started_at"] if step["executions"] else step.get("started_at")
        waited_until = first if first is not None else (end if step["status"] in ("queued", "blocked") else None)
        if waited_until is not None and step.get("created_at") is not None and waited_until > step["created_at"]:
            parts.append(f'<rect class="wait" data-step="{int(step["id"])}" x="{x(step["created_at"])}" y="{y + 3}" '
                         f'width="{max(0.5, x(waited_until) - x(step["created_at"])):g}" height="{row - 6}">'
                         f'<title>waited {waited_until - step["created_at"]:.3f}s</title></rect>')
        bars = [(e["started_at"], e["finished_at"], e["outcome"], e["attempt"]) for e in step["executions"]
                if e["started_at"] is not None]
        if step["status"] == "running" and step.get("started_at") is not None:
            bars.append((step["started_at"], end, "running", step["attempts"] + 1))
        for began, ended, outcome, attempt in bars:
            parts.append(f'<rect class="bar-x o-{_esc(outcome)}" data-step="{int(step["id"])}" '
                         f'data-attempt="{int(attempt)}" data-outcome="{_esc(outcome)}" x="{x(began)}" y="{y + 1}" '
                         f'width="{max(1.0, x(ended) - x(began)):g}" height="{row - 2}"><title>'
                         f'{_esc(step["name"])} attempt {int(attempt)}: {_esc(outcome)}, {ended - began:.3f}s'
                         '</title></rect>')
    height = 8 + len(shown) * row
    more = (f'<p class="muted">timeline: the first {TIMELINE_ROWS} of {len(steps)} steps</p>'
            if len(steps) > TIMELINE_ROWS else "")
    return (f'<svg class="timeline" role="img" aria-label="timeline of executions" width="{label + width + 10}" '
            f'height="{height}" viewBox="0 0 {label + width + 10} {height}">' + "".join(parts)
            + f'<text class="tl-axis" x="{label}" y="{height - 1}">0s</text>'
            f'<text class="tl-axis" x="{label + width}" y="{height - 1}" text-anchor="end">{span:.3f}s</text>'
            + "</svg>" + more)


CHART_SIZE = (360, 120, 46, 24)   # a chart's plot width and height, its left and bottom margins (px)
CHART_SERIES = 8                  # series a chart draws at most (the largest; the others are counted)


def render_chart(name: str, title: str, series: dict[str, list[float | None]], window: dict) -> str:
    """A line chart of series over the window (values latest first; None: nothing to plot there, a gap): an
    SVG with a polyline per run of values and a dot per value (its value on hover), the largest value and the
    window's span on the axes, a legend. At most CHART_SERIES series, the first ones (in their order: a series
    keeps its colour from one refresh to the next)."""
    width, height, left, bottom = CHART_SIZE
    points = int(window["points"])
    shown, more = list(series.items())[:CHART_SERIES], len(series) - CHART_SERIES
    top = max([v for _, values in shown for v in values if v is not None] or [0]) or 1
    step = width / max(points - 1, 1)

    def xy(i: int, v: float) -> tuple[str, str]:   # i points before now: right to left
        return f"{left + round(width - i * step, 1):g}", f"{round(8 + height * (1 - v / top), 1):g}"
    parts = [f'<line class="axis" x1="{left}" y1="{8 + height}" x2="{left + width}" y2="{8 + height}"/>',
             f'<text class="tl-axis" x="{left - 4}" y="{14}" text-anchor="end">{_esc(_chart_value(top))}</text>',
             f'<text class="tl-axis" x="{left - 4}" y="{8 + height}" text-anchor="end">0</text>',
             f'<text class="tl-axis" x="{left}" y="{height + bottom}">-{_esc(_span_text(window["seconds"]))}</text>',
             f'<text class="tl-axis" x="{left + width}" y="{height + bottom}" text-anchor="end">now</text>']
    legend = []
    for k, (label, values) in enumerate(shown):
        runs: list[list[str]] = [[]]
        for i in range(points - 1, -1, -1):   # oldest first: left to right
            v = values[i] if i < len(values) else None
            if v is None:   # a gap: the line breaks
                runs.append([])
                continue
            x, y = xy(i, v)
            runs[-1].append(f"{x},{y}")
            parts.append(f'<circle class="s{k}" data-series="{_esc(label)}" cx="{x}" cy="{y}" r="2"><title>'
                         f'{_esc(label)}: {_esc(_chart_value(v))}</title></circle>')
        parts += [f'<polyline class="series s{k}" data-series="{_esc(label)}" points="{" ".join(run)}"/>'
                  for run in runs if run]
        legend.append(f'<span class="key"><i class="s{k}" aria-hidden="true">&#9632;</i> {_esc(label)}</span>')
    if more > 0:
        legend.append(f'<span class="muted">+{more} more</span>')
    size = f'width="{left + width + 10}" height="{height + bottom + 12}"'
    return (f'<figure class="chart" id="chart-{_esc(name)}"><figcaption>{_esc(title)}</figcaption>'
            f'<svg class="chart" data-chart="{_esc(name)}" data-points="{points}" role="img" '
            f'aria-label="{_esc(title)}" {size} viewBox="0 0 {left + width + 10} {height + bottom + 12}">'
            + "".join(parts) + "</svg>"
            + f'<div class="legend">{" ".join(legend) or "<span class=muted>nothing in this window</span>"}</div>'
            "</figure>")


def _chart_value(v: float) -> str:
    """A chart's value as its label: whole counts as is, seconds to three significant digits."""
    return str(int(v)) if float(v).is_integer() else f"{v:.3g}"


def render_errors(data: dict) -> str:
    """The errors page's <main>: the pipeline filter, one page of failed and crashed executions, paging."""
    rows = [[_when(e["finished_at"]), _link(f'/runs/{e["run"]}#step-{e["step"]}', f'run {e["run"]} step {e["step"]}'),
             _esc(f'{e["pipeline"]}.{e["name"]}'), _badge(e["outcome"]), _esc(e["attempt"]),
             _error(e["error"], f'x-{e["id"]}')] for e in data["errors"]]
    headers = ["at", "step", "pipeline.step", "outcome", "attempt", "error"]
    return ("<h2>Step errors</h2>" + _filters("/errors", data, pipeline=data["pipelines"])
            + _render_error_groups(data) + "<h3>Latest</h3>"
            + _table(headers, rows, "none failed or crashed")
            + _paging("/errors", data, pipeline=data["pipeline"]))


def _runs_table(runs: list[dict], empty: str = "no runs") -> str:
    rows = [[_link(f'/runs/{r["id"]}', str(r["id"])), _esc(r["pipeline"]), _badge(r["status"]), _esc(r["trigger_key"]),
             _when(r["created_at"]), _when(r["finished_at"]), _secs(r["duration"]),
             _reasons(r["halt_reasons"])] for r in runs]
    return _table(["run", "pipeline", "status", "key", "created", "finished", "took", "halt reasons"], rows, empty)


def render_search(data: dict) -> str:
    """The search page's <main>: the run of that id, the runs of that trigger key, the pipelines named so."""
    q = data["q"]
    if not q:
        return '<h2>Search</h2><p class="muted">a run id, a trigger key or (part of) a pipeline name</p>'
    parts = [f"<h2>Search: {_esc(q)}</h2>"]
    if data["run"]:
        parts.append("<h3>Run</h3>" + _runs_table([data["run"]]))
    if data["keyed"]:
        parts.append("<h3>Runs with that trigger key</h3>" + _runs_table(data["keyed"]))
    if data["pipelines"]:
        links = "".join(f'<li><a href="{_href("/runs", pipeline=p)}">{_esc(p)}</a></li>' for p in data["pipelines"])
        parts.append(f"<h3>Pipelines</h3><ul>{links}</ul>")
    if len(parts) == 1:
        parts.append('<p class="muted" id="no-match">no run has that id or trigger key, no pipeline that name</p>')
    return "".join(parts)


def _render_error_groups(data: dict) -> str:
    """The errors page's groups by class and message (its first page only)."""
    if "groups" not in data:
        return ""
    rows = [[f'<span class="err-class">{_esc(g["class"])}</span>', _esc(clip(g["message"], STATUS_ERROR_LINE)),
             str(g["count"]), _esc(", ".join(g["steps"][:3])) + (" &hellip;" if len(g["steps"]) > 3 else ""),
             " ".join(_badge(o) for o in g["outcomes"]), _when(g["first_seen"]), _when(g["last_seen"]),
             _link(f'/runs/{g["example"]["run"]}#step-{g["example"]["step"]}', f'run {g["example"]["run"]}')]
            for g in data["groups"]]
    scope = (f'the latest {data["sample"]} failed or crashed executions' if data["sampled"] >= data["sample"]
             else "every failed or crashed execution")
    return (f'<h3>Grouped by class and message</h3><p class="muted">of {scope}</p><div id="error-groups">'
            + _table(["class", "message", "count", "steps", "outcome", "first seen", "last seen", "example"], rows,
                     "none failed or crashed") + "</div>")


def _page(title: str, api: str, etag: str, main: str, nonce: str, refresh: float) -> str:
    """A whole page: nav, <main>, and the refresh script (allowed by its nonce) polling ``api``."""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_esc(title)} - ductwork</title>'
            f'<meta name="viewport" content="width=device-width"><style>{_DASHBOARD_CSS}</style></head>'
            f'<body data-api="{_esc(api)}" data-etag="{_esc(etag)}" data-refresh="{refresh:g}">'
            '<a class="skip" href="#main">skip to the content</a><nav><b>ductwork</b>'
            '<a href="/">overview</a><a href="/runs">runs</a><a href="/errors">errors</a><a href="/metrics">metrics</a>'
            '<form method="get" action="/search" role="search"><input type="search" name="q" id="search" '
            'placeholder="run id, trigger key, pipeline" aria-label="search runs" maxlength="500"></form>'
            f'</nav><main id="main" tabindex="-1">{main}</main><script nonce="{nonce}">{_DASHBOARD_JS}</script>'
            "</body></html>")


# -- http --------------------------------------------------------------------------------------
# Headers of every response: the security policy (a fresh script nonce each time) and fixed ones;
# a 401 also carries the Basic challenge.
DASHBOARD_CSP = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'nonce-{nonce}'; connect-src 'self'; "
                 "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
DASHBOARD_HEADERS = (("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"),
                     ("Referrer-Policy", "same-origin"))
DASHBOARD_CHALLENGE = 'Basic realm="ductwork", charset="UTF-8"'


@record(frozen=True)
class DashboardReply:
    """One response before it is sent: status code, content type, body and (for data) the data's ETag."""

    code: int
    ctype: str
    body: str
    etag: str = ""
    retry_after: str = ""  # a 429's Retry-After (seconds)
    location: str = ""     # a 303's Location (after an action)
    allow: str = ""        # a 405's Allow
    cookie: str = ""       # a Set-Cookie: the session cookie a page's forms need (see "actions")


def _int_param(query: dict, name: str, default: int, high: int) -> int:
    """A query parameter as an integer from 1 to ``high`` (400 otherwise)."""
    try:
        value = int(query.get(name) or default)
    except ValueError:
        raise _BadRequest(f"{name} must be an integer") from None
    if not 1 <= value <= high:
        raise _BadRequest(f"{name} must be between 1 and {high}")
    return value


def dashboard_route(engine: Engine, path: str, query: dict, overview: Callable[[str], dict] | None = None,
                    token: str | None = None) -> tuple[str, dict, Any] | None:
    """(title, data, renderer) for a page path (``/...``, without ``/api``); None when unknown.
    ``overview`` computes the overview's data for a window (default: dashboard_overview, uncached). ``token``: this
    session's CSRF token on a dashboard that offers actions (None: read-only: the data's ``actions`` are all
    false, no form is rendered and the bulk cancel's confirmation is not a page)."""
    paging = {"page": _int_param(query, "page", 1, 10**6),
              "per_page": _int_param(query, "per_page", DASHBOARD_PER_PAGE, 500)}
    offered = token is not None
    if path in ("/", "/overview"):
        window = query.get("window") or DASHBOARD_WINDOW
        if window not in OVERVIEW_WINDOWS:
            raise _BadRequest(f"window must be one of {', '.join(OVERVIEW_WINDOWS)}")
        return "overview", (overview or functools.partial(dashboard_overview, engine))(window), render_overview
    if path == "/runs":
        data = dashboard_runs(engine.store, query.get("pipeline"), query.get("status"), **paging)
        data["actions"] = runs_actions(data["pipeline"], data["status"], offered)
        return "runs", data, render_runs
    if path == "/errors":
        return "errors", dashboard_errors(engine.store, query.get("pipeline"), **paging), render_errors
    if path == "/search":
        return "search", dashboard_search(engine.store, query.get("q", "")), render_search
    if path == DASHBOARD_CONFIRM_CANCEL and offered:
        return ("cancel runs", dashboard_bulk_cancel(engine.store, query.get("pipeline"), offered),
                functools.partial(render_bulk_cancel, token=token))
    match = re.fullmatch(r"/runs/(\d{1,18})", path)
    data = dashboard_run(engine.store, int(match.group(1)), _fanout_view(query)) if match else None
    if data is None:
        return None
    data["actions"] = run_actions(data["run"]["status"], offered)
    return f"run {match.group(1)}", data, functools.partial(render_run, token=token)  # type: ignore[union-attr]


def _fanout_view(query: dict) -> FanoutView:
    """A run page's ?fanout=<step id>&fstatus=<branch status>&fpage=<n>: the fan-out it pages or filters."""
    if not query.get("fanout"):
        return FanoutView()
    return FanoutView(_int_param(query, "fanout", 1, 10**18), query.get("fstatus") or None,
                      _int_param(query, "fpage", 1, 10**6))


def _api_url(url: urllib.parse.SplitResult) -> str:
    """The JSON twin of a page URL (the overview's is /api/overview), query kept."""
    return "/api" + (url.path if url.path != "/" else "/overview") + (f"?{url.query}" if url.query else "")


def _etag(text: str) -> str:
    """The ETag of a page's data: the same for the page, its fragment and its JSON twin."""
    import hashlib
    return f'"{hashlib.sha1(text.encode()).hexdigest()[:24]}"'


def _host_name(header: str) -> str:
    """The host name in a Host header ('' when it cannot be parsed)."""
    try:
        return urllib.parse.urlsplit("//" + header).hostname or ""
    except ValueError:
        return ""


def _failure_reply(path: str, exc: Exception) -> DashboardReply:
    """The answer to a request that raised: 400 bad parameter (a POST body that cannot be read: its own code),
    503 database unavailable, else 500 (logged)."""
    if isinstance(exc, _BadRequest):
        return DashboardReply(getattr(exc, "code", 400), "text/plain", str(exc))
    if isinstance(exc, DatabaseUnavailable):
        return DashboardReply(503, "text/plain", f"database unavailable: {mask(str(exc))}")
    log.exception("dashboard request %s failed", path)
    return DashboardReply(500, "text/plain", f"internal error: {type(exc).__name__}")


def _final_reply(reply: DashboardReply, path: str, if_none_match: str | None) -> DashboardReply:
    """Errors under /api/ as JSON; a 200 whose ETag the client already has as an empty 304."""
    if reply.code >= 400 and path.startswith("/api/") and reply.ctype == "text/plain":
        return dataclasses.replace(reply, ctype="application/json", body=json.dumps({"error": reply.body}))
    if reply.code == 200 and reply.etag and if_none_match == reply.etag:
        return dataclasses.replace(reply, code=304, body="")
    return reply


def _reply_headers(reply: DashboardReply, length: int, nonce: str) -> list[tuple[str, str]]:
    """The response headers, in order; the empty ones (no ETag, no challenge) left out."""
    headers = [("Content-Type", f"{reply.ctype}; charset=utf-8"), ("Content-Length", str(length)), *DASHBOARD_HEADERS,
               ("ETag", reply.etag), ("Content-Security-Policy", DASHBOARD_CSP.format(nonce=nonce)),
               ("WWW-Authenticate", DASHBOARD_CHALLENGE if reply.code == 401 else ""),
               ("Retry-After", reply.retry_after), ("Location", reply.location), ("Allow", reply.allow),
               ("Set-Cookie", reply.cookie)]
    return [(name, value) for name, value in headers if value]


# The server's limits. A connection is read by the accept loop (a selector, no thread) until its request
# header is complete, then handed to a fixed pool of handler threads; one whose header is not complete
# within the request timeout is answered 408 and closed. Beyond the connection limit, new connections
# wait in the listen backlog. The overview and /metrics are computed at most once a second, shared by
# concurrent requests. After DASHBOARD_AUTH_FAILURES failed logins in a window an address is answered
# 429 for a delay that doubles with each block (up to the max), and one warning a window is logged.
DASHBOARD_THREADS, DASHBOARD_MAX_CONNECTIONS, DASHBOARD_REQUEST_TIMEOUT = 8, 256, 10.0
DASHBOARD_MAX_HEADER, DASHBOARD_CACHE_SECONDS, DASHBOARD_STOP_GRACE = 65536, 1.0, 1.0
DASHBOARD_AUTH_FAILURES, DASHBOARD_AUTH_WINDOW, DASHBOARD_AUTH_MAX_DELAY = 5, 60.0, 300.0


class _Shared:
    """A value computed at most once every ``ttl`` seconds: concurrent callers wait for one computation."""

    def __init__(self, ttl: float):
        self.ttl, self.lock, self.value, self.at = ttl, threading.Lock(), None, -float("inf")

    def get(self, compute: Callable[[], Any]) -> Any:
        with self.lock:
            if time.monotonic() - self.at >= self.ttl:
                self.value = compute()  # an exception leaves the old value expired: the next caller retries
                self.at = time.monotonic()
            return self.value


@record
class _Client:
    """One address's failed logins: this window's start and count, its blocks so far and until when."""

    window: float
    failures: int = 0
    blocks: int = 0
    blocked_until: float = 0.0
    last: float = 0.0


class _AuthThrottle:
    """Failed logins per client address; an address idle for ten windows is forgotten (at most 10000 kept)."""

    def __init__(self, limit: int = DASHBOARD_AUTH_FAILURES, window: float = DASHBOARD_AUTH_WINDOW,
                 max_delay: float = DASHBOARD_AUTH_MAX_DELAY):
        self.limit, self.window, self.max_delay = limit, window, max_delay
        self.lock, self.clients = threading.Lock(), {}

    def retry_after(self, address: str) -> float:
        """Seconds until ``address`` may try again (0: now)."""
        with self.lock:
            client = self.clients.get(address)
            return max(0.0, client.blocked_until - time.monotonic()) if client else 0.0

    def failed(self, address: str) -> bool:
        """Count a failure; True when it is the first of its window (the one to log)."""
        now = time.monotonic()
        with self.lock:
            self._forget(now)
            client = self.clients.get(address)
            first = client is None or now - client.window >= self.window
            if client is None or now - client.last >= 10 * self.window:  # a stranger again: no blocks so far
                client = self.clients[address] = _Client(window=now)
            elif first:
                client.window, client.failures = now, 0
            client.failures, client.last = client.failures + 1, now
            if client.failures >= self.limit:
                client.blocks, client.failures = client.blocks + 1, 0
                client.blocked_until = now + min(2.0 ** (client.blocks - 1), self.max_delay)
            return first

    def succeeded(self, address: str) -> None:
        """A login: its failures so far are forgiven (its blocks count on, until forgotten)."""
        with self.lock:
            if address in self.clients:
                self.clients[address].failures = 0

    def _forget(self, now: float) -> None:
        if len(self.clients) >= 10000:
            for address in [a for a, c in self.clients.items() if now - c.last >= 10 * self.window]:
                del self.clients[address]
            while len(self.clients) >= 10000:
                del self.clients[next(iter(self.clients))]


def _credentials_match(header: str, expected: tuple[bytes, bytes]) -> bool:
    """An Authorization header carries the expected user and password (any case of the Basic scheme;
    both compared in constant time)."""
    import base64
    import hmac
    scheme, _, token = header.strip().partition(" ")
    try:
        user, sep, password = base64.b64decode(token.strip(), validate=True).partition(b":")
    except ValueError:  # binascii.Error
        return False
    same_user, same_password = hmac.compare_digest(user, expected[0]), hmac.compare_digest(password, expected[1])
    return scheme.lower() == "basic" and bool(sep) and same_user and same_password


# -- actions: who may change what, and the checks of a POST ------------------------------------------
# Cancel and revive a run (/runs/<id>/cancel, /runs/<id>/revive) and cancel the runs in progress of a pipeline
# (/runs/cancel, after the confirmation page /runs/confirm-cancel showed how many): a POST each, a form
# (application/x-www-form-urlencoded, DASHBOARD_MAX_BODY at most), answered with a 303 to the page showing what
# it did. They are offered on a loopback bind (this machine's users, who can run the CLI anyway) or with auth;
# never on a public bind without auth (--insecure: read-only) nor with --read-only. A POST changes something
# only when, in this order: it is authorized and its Host header passes (as a GET), its Origin header (without
# one, its Referer) names this dashboard's own origin as its Host header does, and its form's token is this
# session's. The session is the random id in an HttpOnly, SameSite=Strict cookie that the first page sets; the
# token is HMAC-SHA256 over it (and the user) with a secret drawn when the server starts, compared in constant
# time: a page of another origin can neither read it nor compute it, and a restart expires every form. The
# cookie is Secure only over TLS, which this server never speaks. Each action is one info line: who (the user,
# or "loopback"), the client address, what, and what came of it; a refused one a warning (once a minute per
# address: a hostile page cannot flood the log).
DASHBOARD_SESSION_COOKIE, DASHBOARD_MAX_BODY, DASHBOARD_MAX_FIELDS = "ductwork_session", 16384, 16
DASHBOARD_REFUSAL_WINDOW = 60.0


class _BadBody(_BadRequest):
    """A POST body the dashboard will not take: answered with ``code`` (400, 408, 411, 413 or 415) and one line."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class _ClientGone(Exception):
    """The client closed its connection before its request body arrived: nothing to answer."""


@record(frozen=True)
class DashboardAction:
    """A state change an action URL names: ``kind`` cancel or revive (of ``run_id``), or bulk_cancel."""

    kind: str
    run_id: int | None = None


def dashboard_action(path: str) -> DashboardAction | None:
    """The action a URL path names (None: not an action URL)."""
    if path == DASHBOARD_BULK_CANCEL:
        return DashboardAction("bulk_cancel")
    match = re.fullmatch(r"/runs/(\d{1,18})/(cancel|revive)", path)
    return DashboardAction(match.group(2), int(match.group(1))) if match else None


def dashboard_actions_offered(loopback: bool, authenticated: bool, read_only: bool) -> bool:
    """Whether a dashboard offers its actions: on a loopback bind or with auth, never on an unauthenticated
    public bind, and not with --read-only."""
    return not read_only and (loopback or authenticated)


def _read_only_reason(read_only: bool) -> str:
    """The one line a POST to an action gets from a dashboard that does not offer them."""
    if read_only:
        return "this dashboard is read-only (--read-only): no actions"
    return "this dashboard is read-only: actions need a loopback bind or --auth"


def _new_session() -> str:
    """A fresh session id (43 url-safe characters, 256 random bits)."""
    import secrets
    return secrets.token_urlsafe(32)


def _session_id(cookie_headers: list[str]) -> str | None:
    """The first well-formed session id among the Cookie headers' cookies (None: no session yet)."""
    for header in cookie_headers:
        for part in header.split(";"):
            name, sep, value = part.strip().partition("=")
            if sep and name == DASHBOARD_SESSION_COOKIE and re.fullmatch(r"[A-Za-z0-9_-]{43}", value):
                return value
    return None


def _session_cookie(session: str) -> str:
    """The Set-Cookie of a new session: for this browser session only, never sent by a cross-site request,
    unreadable by scripts."""
    return f"{DASHBOARD_SESSION_COOKIE}={session}; Path=/; HttpOnly; SameSite=Strict"


def _csrf_token(secret: bytes, session: str, user: bytes) -> str:
    """The token of a session's forms: HMAC-SHA256 of its id and the user under the server's secret."""
    import hashlib
    import hmac
    return hmac.new(secret, b"csrf\0" + session.encode() + b"\0" + user, hashlib.sha256).hexdigest()


def _token_matches(given: str, expected: str) -> bool:
    """A form's token is the expected one (compared in constant time; any text given)."""
    import hmac
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode())


def _same_origin(url: str, host_header: str) -> bool:
    """An Origin (or a Referer's scheme, host and port) is the origin a Host header names: http, or https through
    a TLS-terminating proxy that keeps the Host header; the port defaults by the scheme."""
    try:
        them, us = urllib.parse.urlsplit(url.strip()), urllib.parse.urlsplit("//" + host_header.strip())
        default = {"http": 80, "https": 443}.get(them.scheme)
        return (default is not None and bool(them.hostname) and them.hostname == us.hostname
                and (them.port or default) == (us.port or default))
    except ValueError:   # a port that is not a number, a bad IPv6 literal
        return False


def _content_length(values: list[str]) -> int:
    """A POST's one Content-Length (411 without, 400 when unclear, 413 above DASHBOARD_MAX_BODY)."""
    if not values:
        raise _BadBody(411, "a POST needs a Content-Length")
    if len({value.strip() for value in values}) != 1 or not re.fullmatch(r"[0-9]{1,12}", values[0].strip()):
        raise _BadBody(400, "bad Content-Length")
    length = int(values[0])
    if length > DASHBOARD_MAX_BODY:
        raise _BadBody(413, f"a form is at most {DASHBOARD_MAX_BODY} bytes")
    return length


def _receive(sock: Any, count: int, timeout: float) -> bytes:
    """``count`` more bytes from ``sock``, all within ``timeout`` seconds (408 after; _ClientGone at its end)."""
    deadline, chunks = time.monotonic() + timeout, []
    while count > 0:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _BadBody(408, f"the request body did not arrive within {timeout:g}s")
        sock.settimeout(left)
        try:
            data = sock.recv(min(count, 65536))
        except TimeoutError:
            continue   # the deadline has passed: the next round says so
        except OSError:
            raise _ClientGone from None
        if not data:
            raise _ClientGone
        chunks.append(data)
        count -= len(data)
    return b"".join(chunks)


def _form_fields(content_type: str, body: bytes) -> dict[str, str]:
    """An urlencoded form as one value per field (415 for another type, 400 when malformed or a field repeats)."""
    if content_type.partition(";")[0].strip().lower() != "application/x-www-form-urlencoded":
        raise _BadBody(415, "an action takes a form (application/x-www-form-urlencoded)")
    try:
        fields = urllib.parse.parse_qs(body.decode("ascii"), keep_blank_values=True, strict_parsing=True,
                                       errors="strict", max_num_fields=DASHBOARD_MAX_FIELDS)
    except ValueError:   # not ASCII, percent-escapes that are not UTF-8, a field without "=", too many fields
        raise _BadRequest("malformed form") from None
    if any(len(values) > 1 for values in fields.values()):
        raise _BadRequest("a field of the form is repeated")
    return {name: values[0] for name, values in fields.items()}


def _see_other(path: str, **params: Any) -> DashboardReply:
    """A 303 to ``path`` with the given query parameters: where an action's result shows."""
    location = path + "?" + urllib.parse.urlencode(params)
    return DashboardReply(303, "text/plain", f"see {location}", location=location)


class _OncePer:
    """True for the first of a key's events in each window (at most 10000 keys remembered): the log lines an
    abusive client could otherwise repeat at will."""

    def __init__(self, window: float):
        self.window, self.lock, self.last = window, threading.Lock(), {}

    def first(self, key: str) -> bool:
        now = time.monotonic()
        with self.lock:
            if now - self.last.get(key, -float("inf")) < self.window:
                return False
            if len(self.last) >= 10000:
                self.last = {k: t for k, t in self.last.items() if now - t < self.window}
                while len(self.last) >= 10000:
                    del self.last[next(iter(self.last))]
            self.last[key] = now
            return True


class _SendAll:
    """A handler's wfile: each write is one sendall (bounded by the socket's timeout)."""

    closed = False

    def __init__(self, sock: Any):
        self.sock = sock

    def write(self, data: bytes) -> int:
        self.sock.sendall(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def _close_socket(sock: Any, farewell: bytes = b"") -> None:
    """Close a client connection (after a best-effort ``farewell``, never blocking)."""
    import socket
    with contextlib.suppress(OSError):
        if farewell:
            sock.setblocking(False)
            sock.send(farewell)
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@record
class _Reading:
    """A connection whose request header is still arriving."""

    address: Any
    deadline: float
    head: bytearray = dataclasses.field(default_factory=bytearray)


# The server and its request handler are mixins, so that http.server is imported only when a dashboard
# starts: _http_class() puts each over the http.server class that its ``http_base`` names.
class DashboardServer:
    """The dashboard's listening socket, its accept loop and handler pool, and what its requests share: the
    engine, the credentials expected (None = no auth), whether the bind address is loopback, the refresh,
    whether it offers the actions (and the secret of their CSRF tokens), the failed-login throttle and the
    cached overview and /metrics."""

    http_base = "HTTPServer"  # the http.server class under this one (see _http_class)
    request_queue_size = 128  # the listen backlog: where connections beyond the limit wait

    def __init__(self, host: str, port: int, engine: Engine, credentials: tuple[bytes, bytes] | None, loopback: bool,
                 refresh: float, limits: dict | None = None, read_only: bool = False):
        import secrets
        import socket
        self.engine, self.credentials, self.loopback, self.refresh = engine, credentials, loopback, refresh
        self.actions = dashboard_actions_offered(loopback, credentials is not None, read_only)
        self.read_only_reason = _read_only_reason(read_only)
        self.secret = secrets.token_bytes(32)   # of the CSRF tokens: drawn anew by each start (see "actions")
        self.refusals = _OncePer(DASHBOARD_REFUSAL_WINDOW)
        limits = {"threads": DASHBOARD_THREADS, "max_connections": DASHBOARD_MAX_CONNECTIONS,
                  "request_timeout": DASHBOARD_REQUEST_TIMEOUT, **(limits or {})}
        self.threads, self.max_connections = int(limits["threads"]), int(limits["max_connections"])
        self.request_timeout = float(limits["request_timeout"])
        self.throttle = _AuthThrottle()
        self.shared = {"metrics": _Shared(DASHBOARD_CACHE_SECONDS),
                       **{("overview", window): _Shared(DASHBOARD_CACHE_SECONDS) for window in OVERVIEW_WINDOWS}}
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()  # (socket, address, header) for the pool; None = stop
        self.workers: list[threading.Thread] = []
        self.open_lock, self.open_count = threading.Lock(), 0
        self.stopping, self.stopped = threading.Event(), threading.Event()
        self.stopped.set()
        self.address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0] if host else socket.AF_INET
        super().__init__((host, port), _http_class(DashboardHandler))

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Accept connections and read their request headers until shutdown(); the pool handles them."""
        if self.stopping.is_set():
            return
        self.stopped.clear()
        self.workers = [threading.Thread(target=self._work, name=f"ductwork.dashboard-{i}", daemon=True)
                        for i in range(self.threads)]
        for worker in self.workers:
            worker.start()
        reading: dict[Any, _Reading] = {}
        with selectors.DefaultSelector() as selector:
            try:
                self._loop(selector, reading, poll_interval)
            finally:
                for sock in reading:
                    _close_socket(sock)
                    self._closed()
                self.stopped.set()

    def _loop(self, selector: Any, reading: dict, poll_interval: float) -> None:
        accepting = False
        while not self.stopping.is_set():
            with self.open_lock:
                room = self.open_count < self.max_connections
            if room and not accepting:
                selector.register(self.socket, selectors.EVENT_READ)
            elif accepting and not room:  # at the limit, new connections wait in the listen backlog
                selector.unregister(self.socket)
            accepting = room
            for key, _ in selector.select(poll_interval):
                if key.fileobj is self.socket:
                    self._accept(selector, reading)
                else:
                    self._read(selector, reading, key.fileobj)
            now = time.monotonic()
            for sock in [sock for sock, pending in reading.items() if pending.deadline <= now]:
                selector.unregister(sock)
                del reading[sock]
                _close_socket(sock, b"HTTP/1.0 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
                self._closed()

    def _accept(self, selector: Any, reading: dict) -> None:
        try:
            sock, address = self.socket.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # e.g. out of file descriptors: try again on the next round
            log.warning("dashboard: cannot accept a connection: %s", exc)
            self.stopping.wait(0.1)   # a pause that shutdown cuts short
            return
        with self.open_lock:
            self.open_count += 1
        sock.setblocking(False)
        reading[sock] = _Reading(address, time.monotonic() + self.request_timeout)
        selector.register(sock, selectors.EVENT_READ)

    def _read(self, selector: Any, reading: dict, sock: Any) -> None:
        pending = reading[sock]
        try:
            data = sock.recv(8192)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        pending.head += data
        complete = b"\r\n\r\n" in pending.head or b"\n\n" in pending.head
        if data and not complete and len(pending.head) <= DASHBOARD_MAX_HEADER:
            return
        selector.unregister(sock)
        del reading[sock]
        if not complete:  # closed early (nothing is rendered for half a request) or a header too large
            _close_socket(sock, b"HTTP/1.0 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n\r\n"
                          if data else b"")
            self._closed()
            return
        sock.setblocking(True)
        sock.settimeout(self.request_timeout)  # bounds each reply's sendall
        self.jobs.put((sock, pending.address, bytes(pending.head)))

    def _work(self) -> None:
        """A pool thread: handle complete requests until told to stop."""
        while (job := self.jobs.get()) is not None:
            sock, address, head = job
            try:
                if not self.stopping.is_set():
                    self.RequestHandlerClass((sock, head), address, self)
            except Exception as exc:  # the client went away mid-reply and the like
                log.debug("dashboard: request from %s ended: %s", address[0], exc)
            finally:
                _close_socket(sock)
                self._closed()

    def _closed(self) -> None:
        with self.open_lock:
            self.open_count -= 1

    def shutdown(self) -> None:
        """Stop serve_forever() (within its poll interval) and wait for it."""
        self.stopping.set()
        self.stopped.wait()

    def server_close(self) -> None:
        """Close the listening socket; the pool finishes its current requests (DASHBOARD_STOP_GRACE at most)."""
        self.stopping.set()
        for _ in self.workers:
            self.jobs.put(None)
        deadline = time.monotonic() + DASHBOARD_STOP_GRACE
        for worker in self.workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        super().server_close()


class DashboardHandler:
    """One request, its header already read: a GET (authorize, check the Host header, route and render) or
    the POST of an action (the same checks, then those of "actions"), then send; its connection is closed
    after."""

    http_base = "BaseHTTPRequestHandler"
    server: DashboardServer  # the one that accepted the request
    server_version = f"ductwork/{__version__}"

    def setup(self) -> None:
        """The request is (socket, its header bytes): read the header from memory, write to the socket."""
        import io
        self.connection, head = self.request
        self.rfile, self.wfile = io.BytesIO(head), _SendAll(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("dashboard %s " + format, self.address_string(), *args)

    def do_GET(self) -> None:  # noqa: N802
        import secrets
        nonce = secrets.token_urlsafe(16)  # lets this response's one inline script run (DASHBOARD_CSP)
        try:   # its transactions took connections of the pool and gave them back
            reply = self.authorize() or self.check_host() or self.route(nonce)
        except Exception as exc:
            reply = _failure_reply(self.path, exc)
        self.send(reply, nonce)

    def authorize(self) -> DashboardReply | None:
        """None when auth is off or the request carries the credentials; 429 while this address is blocked
        after failed logins, else 401 (a failure when an Authorization header was sent)."""
        if not self.server.credentials:
            return None
        address, throttle = self.client_address[0], self.server.throttle
        wait = throttle.retry_after(address)
        if wait > 0:
            return DashboardReply(429, "text/plain", "too many failed logins: retry later",
                                  retry_after=str(max(1, int(-(-wait // 1)))))
        header = self.headers.get("Authorization")
        if header is not None and _credentials_match(header, self.server.credentials):
            throttle.succeeded(address)
            return None
        if header is not None and throttle.failed(address):
            log.warning("dashboard: failed login from %s (more from it within %d s are not logged; after %d it is "
                        "answered 429 for a growing delay)", address, throttle.window, throttle.limit)
        return DashboardReply(401, "text/plain", "authentication required")

    def check_host(self) -> DashboardReply | None:
        """403 for a non-loopback Host header on a loopback dashboard without auth (no DNS rebinding)."""
        guarded = self.server.loopback and not self.server.credentials
        if guarded and not _is_loopback(_host_name(self.headers.get("Host", ""))):
            return DashboardReply(403, "text/plain",
                                  "unexpected Host header (the dashboard without auth answers loopback names only)")
        return None

    def route(self, nonce: str) -> DashboardReply:
        """/metrics, or the page a path names (under /api/: its JSON twin), rendered; 405 for an action's
        URL (POST only), 403 for the bulk cancel's confirmation on a read-only dashboard; else 404."""
        url = urllib.parse.urlsplit(self.path)
        engine, shared = self.server.engine, self.server.shared
        if url.path == "/metrics":
            metrics = shared["metrics"].get(functools.partial(dashboard_metrics, engine))
            return DashboardReply(200, "text/plain; version=0.0.4", metrics)
        api = url.path.startswith("/api/")
        path = url.path[4:] if api else url.path
        if dashboard_action(path) is not None:
            return DashboardReply(405, "text/plain", "an action takes a POST (the form on its page)", allow="POST")
        if path == DASHBOARD_CONFIRM_CANCEL and not self.server.actions:
            return DashboardReply(403, "text/plain", self.server.read_only_reason)
        query = dict(urllib.parse.parse_qsl(url.query))
        def overview(window: str) -> dict:   # one computation a window for every client (see _Shared)
            return shared["overview", window].get(functools.partial(dashboard_overview, engine, window))

        token, fresh = self.page_token()
        found = dashboard_route(engine, path, query, overview, token)
        if found is None:
            return DashboardReply(404, "text/plain", "not found")
        # one match: its page (not for a live refresh's fragment: the search page stays what it is)
        if path == "/search" and not api and found[1]["go"] and self.headers.get("X-Ductwork-Fragment") != "1":
            return DashboardReply(303, "text/plain", f'see {found[1]["go"]}', location=found[1]["go"])
        reply = self.render(url, api, *found, nonce=nonce)
        if fresh and not api:   # a page whose forms need the session (a JSON twin renders none)
            reply = dataclasses.replace(reply, cookie=_session_cookie(fresh))
        return reply

    def render(self, url: urllib.parse.SplitResult, api: bool, title: str, data: dict, renderer: Any,
               nonce: str) -> DashboardReply:
        """The JSON twin, the <main> fragment alone (X-Ductwork-Fragment: 1) or the whole page; a page's
        <main> starts with the notice of the action that redirected to it (?done=)."""
        text = json.dumps(data, default=str)  # ASCII: a lone surrogate stays a \\ud800 escape
        etag = _etag(text)
        if api:
            return DashboardReply(200, "application/json", text, etag)
        main = _notice(dict(urllib.parse.parse_qsl(url.query))) + renderer(data)
        if self.headers.get("X-Ductwork-Fragment") == "1":
            return DashboardReply(200, "text/html", main, etag)
        page = _page(title, _api_url(url), etag, main, nonce, self.server.refresh)
        return DashboardReply(200, "text/html", page, etag)

    # -- the POST of an action (see "actions") --
    def do_POST(self) -> None:  # noqa: N802
        """An action: authorized and its Host header checked as a GET, then act(); a client that went away
        before its body arrived gets nothing."""
        import secrets
        nonce = secrets.token_urlsafe(16)
        try:
            reply = self.authorize() or self.check_host() or self.act()
        except _ClientGone:
            return
        except Exception as exc:
            reply = _failure_reply(self.path, exc)
        self.send(reply, nonce)

    def act(self) -> DashboardReply:
        """Read the body, check that this is an action the dashboard offers, that the form comes from its own
        origin with this session's token, then do it. Refusals change nothing."""
        # The body is read first (bounded): a reply sent while some of it is unread would end in a reset
        # when the connection closes, and the client might never see the answer.
        body = self.read_body()
        action = dashboard_action(urllib.parse.urlsplit(self.path).path)
        if action is None:
            return DashboardReply(405, "text/plain", "only an action's URL takes a POST", allow="GET")
        if not self.server.actions:
            return DashboardReply(403, "text/plain", self.server.read_only_reason)
        form = _form_fields(self.headers.get("Content-Type", ""), body)
        why = self.foreign_origin() or self.foreign_token(form.get("csrf", ""))
        if why:
            if self.server.refusals.first(self.client_address[0]):
                log.warning("dashboard: refused a POST to %s from %s: %s (more from it within %g s are not "
                            "logged)", printable(clip(urllib.parse.urlsplit(self.path).path, 100)),
                            self.client_address[0], why, self.server.refusals.window)
            return DashboardReply(403, "text/plain", f"refused: {why}")
        return self.perform(action, form)

    def read_body(self) -> bytes:
        """The POST's body: what came with the header, then the rest off the socket within the request
        timeout (a Content-Length is required, DASHBOARD_MAX_BODY at most; no Transfer-Encoding)."""
        if self.headers.get("Transfer-Encoding") is not None:
            raise _BadBody(411, "a POST needs a Content-Length (no Transfer-Encoding)")
        length = _content_length(self.headers.get_all("Content-Length") or [])
        body = self.rfile.read(length)   # what the accept loop read with the header
        try:
            return body + _receive(self.connection, length - len(body), self.server.request_timeout)
        finally:
            self.connection.settimeout(self.server.request_timeout)   # bounds the reply's sendall again

    def page_token(self) -> tuple[str | None, str | None]:
        """The CSRF token of the forms this request's page renders (None: the dashboard offers no actions) and
        the new session to set as its cookie (None: the request has one, or no actions)."""
        if not self.server.actions:
            return None, None
        session = _session_id(self.headers.get_all("Cookie") or [])
        if session is not None:
            return self.token(session), None
        fresh = _new_session()
        return self.token(fresh), fresh

    def who(self) -> str:
        """Who acts: the user of the credentials (checked by authorize()), or "loopback" without auth."""
        credentials = self.server.credentials
        return credentials[0].decode("utf-8", "replace") if credentials else "loopback"

    def token(self, session: str) -> str:
        """The CSRF token of ``session``'s forms for this dashboard's user."""
        user = self.server.credentials[0] if self.server.credentials else b""
        return _csrf_token(self.server.secret, session, user)

    def foreign_origin(self) -> str | None:
        """Why the form does not come from this dashboard's own pages by its Origin (else Referer) header;
        None when it does."""
        host = self.headers.get("Host", "")
        for header in ("Origin", "Referer"):
            value = self.headers.get(header)
            if value is not None:
                shown = printable(clip(value, 200))
                return None if _same_origin(value, host) else f"{header} {shown!r} is not this dashboard's origin"
        return "neither Origin nor Referer says where the form comes from"

    def foreign_token(self, given: str) -> str | None:
        """Why the form's token is not this session's; None when it is."""
        session = _session_id(self.headers.get_all("Cookie") or [])
        if session is None:
            return "no session cookie (cookies off, or a form from elsewhere): load the page again"
        if not _token_matches(given, self.token(session)):
            return "the form's token is not this session's (the dashboard restarted?): load the page again"
        return None

    def perform(self, action: DashboardAction, form: dict[str, str]) -> DashboardReply:
        """Do the action (the cancels wait for the workers holding claimed steps, a few seconds at most),
        log it, and redirect to the page showing what it did."""
        who, address, engine = self.who(), self.client_address[0], self.server.engine
        reason = f"cancelled from the dashboard by {who}"
        if action.kind == "bulk_cancel":
            pipeline, expected = form.get("pipeline", ""), form.get("expected", "")
            if not pipeline:
                raise _BadRequest("pipeline is required: a bulk cancel stops the runs of one pipeline")
            if not re.fullmatch(r"[0-9]{1,12}", expected):
                raise _BadRequest("expected (the count the confirmation showed) must be a whole number")
            cancelled = engine.cancel(pipeline=pipeline, reason=reason)
            shown = printable(clip(pipeline, 200))   # form input: one line in the log, whatever it holds
            log.info("dashboard: %s from %s cancelled %d run(s) of pipeline %s (the confirmation showed %s)", who,
                     address, len(cancelled), shown, expected, extra={"pipeline": shown})
            return _see_other("/runs", pipeline=pipeline, done="bulk-cancelled", count=len(cancelled))
        run_id = int(action.run_id)  # type: ignore[arg-type]
        with engine.store.tx(write=False) as t:
            if t.one(DashboardSQL.run_status, {"id": run_id}) is None:
                return DashboardReply(404, "text/plain", f"run {run_id} not found")
        if action.kind == "cancel":
            done = "cancelled" if engine.cancel(run_ids=[run_id], reason=reason) else "not-cancelled"
        else:
            done = "revived" if engine.revive(run_id) else "not-revived"
        log.info("dashboard: %s from %s: %s run %d: %s", who, address, action.kind, run_id, DASHBOARD_OUTCOMES[done],
                 extra={"run": run_id})
        return _see_other(f"/runs/{run_id}", done=done)

    def send(self, reply: DashboardReply, nonce: str) -> None:
        """The status line, the headers and the body (after _final_reply); text that UTF-8 cannot encode
        (a lone surrogate a step returned) is shown as its backslash escape."""
        reply = _final_reply(reply, self.path, self.headers.get("If-None-Match"))
        body = reply.body.encode("utf-8", "backslashreplace")
        self.send_response(reply.code)
        for name, value in _reply_headers(reply, len(body), nonce):
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


@functools.cache
def _http_class(mixin: type) -> type:
    """``mixin`` over the http.server class it names, made once: only the dashboard imports http.server."""
    import http.server
    return type(mixin.__name__, (mixin, getattr(http.server, mixin.http_base)), {"__doc__": mixin.__doc__})


def _parse_auth(auth: str) -> tuple[str, str]:
    """``user:password`` as a pair; the password is masked in logs from now on."""
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise ConfigError("dashboard auth must be user:password (--auth or DUCTWORK_DASHBOARD_AUTH)")
    _remember_secret(password)
    return user, password


def _expected_credentials(credentials: tuple[str, str] | None) -> tuple[bytes, bytes] | None:
    """The user and password every request must carry, as UTF-8 (None when auth is off)."""
    return (credentials[0].encode(), credentials[1].encode()) if credentials else None


def _is_loopback(host: str) -> bool:
    """A loopback address literal or ``localhost`` (never resolved: other names count as public)."""
    import ipaddress
    host = host.strip("[]").lower()
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    return host == "localhost"


def make_dashboard_server(config: Config, host: str, port: int, auth: str | None = None, insecure: bool = False,
                          refresh: float = 5.0, read_only: bool = False, **limits: float) -> Any:
    """The dashboard's HTTP server (not started: call serve_forever()). Without auth it only binds
    loopback addresses (unless ``insecure``: then read-only) and then only answers loopback Host headers
    (no DNS rebinding). It offers the actions (cancel, revive) unless that or ``read_only``.
    ``limits``: threads, max_connections, request_timeout (DASHBOARD_* defaults)."""
    unknown = set(limits) - {"threads", "max_connections", "request_timeout"}
    if unknown or not all(value > 0 for value in limits.values()):
        raise ConfigError(f"dashboard limits must be positive threads, max_connections, request_timeout: {limits}")
    credentials = _parse_auth(auth) if auth else None
    loopback = _is_loopback(host)
    if credentials is None and not loopback and not insecure:
        raise ConfigError(f"refusing to serve the dashboard on {host} without auth: pass --auth user:password "
                          "(or set DUCTWORK_DASHBOARD_AUTH), or --insecure")
    engine = Engine(Store(config.data["database_url"], pool_size=config.data["pool_size"]), config)
    ensure_schema(engine.store)
    engine.store.close()
    try:
        return _http_class(DashboardServer)(host, port, engine, _expected_credentials(credentials), loopback, refresh,
                                            limits, read_only)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


# =====================================================================================
# cli: python ductwork.py [COMMAND] [OPTIONS]
# =====================================================================================
# One table of commands (COMMANDS, after their handlers): build_parser() adds each with its
# aliases and arguments, main() picks the handler; no command means `run`.

DEFAULT_COMMAND = "run"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are ConfigErrors (one line, exit 2)."""

    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        """Raise the usage error as a ConfigError instead of printing usage and exiting."""
        raise ConfigError(message)


def _add_common(parser: argparse.ArgumentParser, top: bool) -> None:
    """The options every command takes, before or after its name (``top``: the main parser's defaults)."""
    d = None if top else argparse.SUPPRESS
    parser.add_argument("-c", "--config", default=d, help="config file (default config/ductwork.yml if it exists)")
    parser.add_argument("--app", action="append", dest="app" if top else "app_after", default=d,
                        help="module or .py file that defines pipelines (repeatable)")
    parser.add_argument("--role", choices=ROLES, default=d, help="all (=supervisor) | advancer | worker")
    parser.add_argument("--database-url", default=d, help="sqlite:///path or postgresql://user:pass@host/db")
    parser.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="show tracebacks")


@record(frozen=True)
class Command:
    """One command of the command line: the COMMANDS table's row."""
    name: str
    help: str                                                  # its line in --help
    handler: Callable[[argparse.Namespace, Any], int]          # (args, config) -> exit code
    arguments: Callable[[argparse.ArgumentParser], None] | None = None   # its own options, after the common ones
    aliases: tuple[str, ...] = ()                              # other names, each listed as "alias of <name>"
    light: bool = False                                        # no app import, no logging setup: config is None

    def add_to(self, sub: Any) -> None:
        """Add this command and its aliases to ``sub`` (the main parser's add_subparsers())."""
        for name, help_text in ((self.name, self.help), *((alias, f"alias of {self.name}") for alias in self.aliases)):
            parser = sub.add_parser(name, help=help_text)
            _add_common(parser, top=False)
            if self.arguments is not None:
                self.arguments(parser)


def build_parser(named: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command in COMMANDS, or of those ``named`` (the rest cannot be chosen then:
    a probe that runs every few seconds need not build the thirteen parsers it does not use)."""
    parser = _Parser(prog="ductwork", description="Durable multi-step pipelines: supervisor, workers, tools.")
    parser.add_argument("--version", action="version", version=f"ductwork {__version__}")
    _add_common(parser, top=True)
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    chosen = None if named is None else {COMMANDS_BY_NAME[name] for name in named}
    for command in COMMANDS:
        if chosen is None or command in chosen:
            command.add_to(sub)
    return parser


def _status_arguments(p: argparse.ArgumentParser) -> None:
    """status's (and schedules') own options."""
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _healthcheck_arguments(p: argparse.ArgumentParser) -> None:
    """healthcheck's own options."""
    p.add_argument("--pid", type=int, help="check this process id instead of the role's row")
    p.add_argument("--max-age", type=float, help="heartbeat age limit in seconds")
    p.add_argument("-v", "--verbose", action="store_true", help="one block per process")


def _trigger_arguments(p: argparse.ArgumentParser) -> None:
    """trigger's own arguments: the pipeline and the start step's arguments."""
    p.add_argument("name")
    p.add_argument("args", nargs="*", help="one JSON value per argument of the start step")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--delay", type=float, metavar="S", help="start it S seconds from now (the database clock)")
    when.add_argument("--at", metavar="ISO8601", help="start it at this time (with its UTC offset, or Z)")
    p.add_argument("--key", help="the run of this pipeline with this key, if there is one, instead of a new one")
    p.add_argument("--priority", type=int, default=0, metavar="N",
                   help="lower runs first (default 0, negatives allowed)")


def _dashboard_arguments(p: argparse.ArgumentParser) -> None:
    """dashboard's own options."""
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; others need --auth or --insecure)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 = any free port)")
    p.add_argument("--auth", help="user:password for HTTP basic auth (default: env DUCTWORK_DASHBOARD_AUTH)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback address without auth (read-only: no actions)")
    p.add_argument("--read-only", action="store_true", dest="read_only",
                   help="no actions: no cancel or revive buttons, every POST refused (the actions are offered on "
                        "a loopback bind or with --auth otherwise)")
    p.add_argument("--refresh", type=float, default=5.0, help="seconds between a page's refresh polls (default 5)")


def _doctor_arguments(p: argparse.ArgumentParser) -> None:
    """doctor's own options."""
    p.add_argument("--grace", type=float, help="the process manager's grace period in seconds (e.g. Kubernetes "
                                               "terminationGracePeriodSeconds): checked against the drain arithmetic")


def _prune_arguments(p: argparse.ArgumentParser) -> None:
    """prune's own options."""
    p.add_argument("--dry-run", action="store_true", help="count what would be deleted; delete nothing")
    for status in RETENTION_DEFAULTS:
        p.add_argument(f"--{status}", type=_retention_age, metavar="S",
                       help=f"prune {status} runs finished more than S seconds ago (-1: keep them; "
                            f"default: config retention.{status})")


def _run_id(text: str) -> int:
    """A run id on the command line: a positive whole number."""
    if not text.isdigit() or not 0 < int(text) <= 2 ** 63 - 1:
        raise argparse.ArgumentTypeError(f"a run id is a positive whole number, got {text!r}")
    return int(text)


def _age_seconds(text: str) -> float:
    """--older-than: seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= MAX_DURATION:
        raise argparse.ArgumentTypeError(f"must be seconds >= 0, got {text!r}")
    return value


def _cancel_arguments(p: argparse.ArgumentParser) -> None:
    """cancel's own arguments: run ids, or the filters of a bulk cancel."""
    p.add_argument("run_ids", nargs="*", type=_run_id, metavar="RUN_ID", help="the runs to cancel")
    p.add_argument("--pipeline", help="cancel every run in progress of this pipeline")
    p.add_argument("--older-than", type=_age_seconds, metavar="S", dest="older_than",
                   help="only runs triggered more than S seconds ago")
    p.add_argument("--reason", help="why (kept with each run, shown by the dashboard)")


def _revive_arguments(p: argparse.ArgumentParser) -> None:
    """revive's own arguments."""
    p.add_argument("run_ids", nargs="+", type=_run_id, metavar="RUN_ID", help="halted or cancelled runs")


def _signal_arguments(p: argparse.ArgumentParser) -> None:
    """signal's own arguments."""
    p.add_argument("run_id", type=_run_id, metavar="RUN_ID")
    p.add_argument("name", help="the signal's name (what wait_for waits for)")
    p.add_argument("payload", nargs="?", default="null", help="its payload, one JSON value (default null)")


def _config_from_args(args: argparse.Namespace) -> Config:
    """The configuration: the config file and environment, overridden by the command line."""
    apps = (args.app or []) + (getattr(args, "app_after", None) or [])  # --app before and after the command
    overrides = {"role": args.role, "database_url": args.database_url, "app": apps or None}
    return load_config(args.config, overrides=overrides)


def import_app(targets: Iterable[str]) -> None:
    """Import each module name or .py path so its pipelines register."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for target in targets:
        try:
            if target.endswith(".py") or os.sep in target:
                path = os.path.abspath(target)
                if not os.path.exists(path):
                    raise ConfigError(f"app file {target} does not exist")
                name = os.path.splitext(os.path.basename(path))[0]
                if os.path.dirname(path) not in sys.path:
                    sys.path.insert(0, os.path.dirname(path))
                if name in sys.modules and getattr(sys.modules[name], "__file__", None) == path:
                    continue
                from importlib.util import module_from_spec, spec_from_file_location
                spec = spec_from_file_location(name, path) if os.path.isfile(path) else None
                if spec is None or spec.loader is None:
                    raise ConfigError(f"app {target} is not a Python file (give a .py file or a module name)")
                module = module_from_spec(spec)
                sys.modules[name] = module
                spec.loader.exec_module(module)  # type: ignore[union-attr]
            else:
                importlib.import_module(target)
        except (ConfigError, DefinitionError):
            raise
        except SystemExit as exc:   # sys.exit() at import time: a broken app, not a way to end the CLI quietly
            raise ConfigError(f"cannot import app {target}: it called sys.exit({exc.code!r})") from None
        except Exception as exc:
            raise ConfigError(f"cannot import app {target}: {type(exc).__name__}: {exc}") from exc


def selected_pipelines(config: Config) -> list[str]:
    """The configured pipelines (``*``: every registered one); a ConfigError names one that is missing."""
    wanted = config.data["pipelines"]
    switched = [name for name in config.data["schedules"] if name not in _REGISTRY]
    missing = [name for name in wanted if name not in _REGISTRY] if wanted != "*" else []
    if switched:   # (a typo in a safety switch must not pass unseen)
        raise ConfigError(f"config key 'schedules' names pipeline {switched[0]!r}, which is not defined "
                          f"(registered: {', '.join(sorted(_REGISTRY)) or 'none'})")
    if missing:
        raise ConfigError(f"pipeline {missing[0]!r} not found (registered: {', '.join(sorted(_REGISTRY)) or 'none'})")
    return sorted(_REGISTRY) if wanted == "*" else list(wanted)


def _prepare(args: argparse.Namespace) -> Config:
    """For every command but healthcheck: load the config, set up logging, import the app, configure."""
    config = _config_from_args(args)
    setup_logging(config.data["logger"]["level"], config.data["logger"]["format"])
    import_app(config.data["app"] or [])
    with _APP.lock:
        _APP.config, _APP.engine = config, None
    return config


def cmd_run(args: argparse.Namespace, config: Config) -> int:
    """Start the configured role: the supervisor, or one runtime in the foreground."""
    pipelines = selected_pipelines(config)
    validate()
    spec = role_spec(config.role, config.data["forking"])
    if config.data["logger"]["capture"]:
        setup_logging(config.data["logger"]["level"], config.data["logger"]["format"], capture=True)
    if spec.forks:
        return Supervisor(config, pipelines).run()
    runtime = Runtime(config, spec.mode, pipelines)
    runtime.install_signals()
    code = runtime.serve()
    if runtime.recycled and code == EXIT_OK:
        # blocked from here on and across the exec (the mask is kept): a stop signal that comes now waits for the
        # new program's handlers (Runtime.install_signals unblocks them), one that came before is seen here
        signal.pthread_sigmask(signal.SIG_BLOCK, RUNTIME_SIGNALS)
        if not runtime.stop_requested.is_set():   # (reexecute unblocks them if the exec fails)
            return reexecute(runtime.recycle_environment())   # (in place: an orchestrator sees no restart)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, RUNTIME_SIGNALS)
    return code


def cmd_migrate(args: argparse.Namespace, config: Config) -> int:
    """Create or upgrade the schema; print what was applied."""
    store = Store(config.data["database_url"])
    applied = migrate_store(store)
    print(f"migrated {store.info.display}: " + (f"applied {', '.join(map(str, applied))}" if applied else "up to date"))
    return EXIT_OK


def _retention_age(text: str) -> float:
    """A prune override: seconds >= 0, or -1 (keep forever)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value >= 0 or value == -1) or value > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"must be seconds >= 0 or -1 (keep forever), got {text!r}")
    return value


def pruned_text(pruned: collections.Counter) -> str:
    """``N runs (pipeline status n, ...)`` for a prune's counts."""
    total = sum(pruned.values())
    parts = ", ".join(f"{pipeline} {status} {n}" for (pipeline, status), n in sorted(pruned.items()))
    return f"{total} run{'s' if total != 1 else ''}" + (f" ({parts})" if parts else "")


def cmd_prune(args: argparse.Namespace, config: Config) -> int:
    """Delete (or, --dry-run, count) the finished runs past their retention now; print how many, per pipeline
    and status. The flags override config `retention` for this run (-1 keeps that status)."""
    overrides = {status: getattr(args, status) for status in RETENTION_DEFAULTS if getattr(args, status) is not None}
    ages = config.retention(overrides)
    engine = Engine(Store(config.data["database_url"]), config)
    ensure_schema(engine.store)
    kept = ", ".join(f"{status} after {age:.0f}s" for status, age in ages.items()) or "nothing: every status is kept"
    if args.dry_run:
        would = engine.prunable(ages)
        print(f"would prune {pruned_text(would)} from {engine.store.info.display} (prunes {kept})")
    else:
        pruned = engine.prune(ages, wait=True)
        print(f"pruned {pruned_text(pruned)} from {engine.store.info.display} (prunes {kept})")
    return EXIT_OK


def _finite(text: str) -> float:
    """A JSON number as a float, refused when it does not fit one (``1e999`` would become infinity)."""
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    """NaN, Infinity and -Infinity: Python's json reads them, JSON has no such values."""
    raise ValueError(f"{name} is not a JSON value")


def _json_argument(text: str) -> Any:
    """One trigger argument: strict JSON (finite numbers, at most a few hundred levels deep)."""
    shown = text if len(text) <= 60 else text[:57] + "..."
    try:
        return json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except RecursionError:
        raise ConfigError(f"argument {shown!r} is nested too deeply") from None
    except ValueError as exc:
        raise ConfigError(f"argument {shown!r} is not valid JSON ({exc})") from None


def cmd_trigger(args: argparse.Namespace, config: Config) -> int:
    """Trigger a run of a pipeline with JSON arguments; print its id."""
    values = [_json_argument(text) for text in args.args]
    if args.name not in _REGISTRY:
        raise ConfigError(f"pipeline {args.name!r} not found (registered: {', '.join(sorted(_REGISTRY)) or 'none'})")
    at = _time_argument(args.at)
    try:   # the trigger's own checks, before anything is written: a usage error (exit 2)
        trigger_start(args.delay, at)
        check_trigger_key(args.key)
        check_priority(args.priority)
    except DuctworkError as exc:
        raise ConfigError(str(exc)) from None
    print(trigger(args.name, *values, delay=args.delay, at=at, key=args.key, priority=args.priority).id)
    return EXIT_OK


def _time_argument(text: str | None) -> Any:
    """--at: an ISO 8601 time with its UTC offset (Z too) as an aware datetime; ConfigError (exit 2) when not."""
    import datetime
    if text is None:
        return None
    try:
        at = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ConfigError(f"--at {text!r} is not an ISO 8601 time (e.g. 2026-12-24T18:00:00+01:00)") from None
    if at.tzinfo is None:
        raise ConfigError(f"--at {text!r} has no UTC offset: add one (e.g. +01:00, or Z for UTC)")
    return at


def _unknown_runs(engine: Engine, run_ids: Sequence[int]) -> list[int]:
    """The ids among ``run_ids`` that name no run (never triggered, or pruned)."""
    with engine._tx(write=False) as t:
        known = {row[0] for row in t.all(SQL.existing_runs.replace("{ids}", BulkSQL.ids(t.dialect, "", "id")),
                                         {"ids": t.ids(run_ids)})}
    return [run_id for run_id in run_ids if run_id not in known]


def cmd_cancel(args: argparse.Namespace, config: Config) -> int:
    """Cancel runs (by id, or every run in progress of --pipeline / older than --older-than); print how many.
    Exit 1 when a run id names no run (one line each on stderr)."""
    if not args.run_ids and args.pipeline is None and args.older_than is None:
        raise ConfigError("cancel needs RUN_ID ... or --pipeline NAME (and/or --older-than S)")
    engine = _app_engine()
    unknown = _unknown_runs(engine, args.run_ids) if args.run_ids else []
    cancelled = engine.cancel(args.run_ids, args.pipeline, args.older_than, args.reason)
    print(f"cancelled {len(cancelled)} run{'s' if len(cancelled) != 1 else ''}")
    for run_id in unknown:
        print(f"ductwork: error: run {run_id} not found", file=sys.stderr)
    return EXIT_FAILURE if unknown else EXIT_OK


def cmd_revive(args: argparse.Namespace, config: Config) -> int:
    """Revive halted or cancelled runs; exit 1 when one could not be (one line each on stderr)."""
    engine, failed = _app_engine(), 0
    unknown = set(_unknown_runs(engine, args.run_ids))
    for run_id in args.run_ids:
        if run_id in unknown or not engine.revive(run_id):
            failed += 1
            why = "not found" if run_id in unknown else "is neither halted nor cancelled"
            print(f"ductwork: error: run {run_id} {why}", file=sys.stderr)
        else:
            print(f"revived run {run_id}")
    return EXIT_FAILURE if failed else EXIT_OK


def cmd_signal(args: argparse.Namespace, config: Config) -> int:
    """Send a run a signal; exit 1 (one line on stderr) when it was not kept."""
    payload = _json_argument(args.payload)
    engine = _app_engine()
    if _unknown_runs(engine, [args.run_id]):
        print(f"ductwork: error: run {args.run_id} not found", file=sys.stderr)
        return EXIT_FAILURE
    try:
        kept = Run(args.run_id, engine).signal(args.name, payload)
    except DuctworkError as exc:   # (a bad name: a usage error)
        raise ConfigError(str(exc)) from None
    if not kept:
        print(f"ductwork: error: run {args.run_id} is not in progress, or had its signal {args.name!r} already",
              file=sys.stderr)
        return EXIT_FAILURE
    print(f"signal {args.name!r} sent to run {args.run_id}")
    return EXIT_OK


def schedule_report(engine: Engine, config: Config) -> list[dict]:
    """Every schedule of the registered pipelines: what it is, on or off (config ``schedules``), its next tick
    by the database's clock, and the last tick fired (or first seen) with its run."""
    now = engine.store.now()
    with engine.store.tx(write=False) as t:
        states = {(p, ident): (last, run_id) for p, ident, last, run_id in t.all(SQL.schedule_states)}
    switches = config.data["schedules"]
    out = []
    for name in sorted(_REGISTRY):
        for schedule in _REGISTRY[name].schedules:
            last, run_id = states.get((name, schedule.ident), (None, None))
            out.append({"pipeline": name, "schedule": schedule.describe(), "ident": schedule.ident,
                        "on": switches.get(name, True), "next": schedule.next_after(now), "last": last,
                        "last_run": run_id})
    return out


def cmd_schedules(args: argparse.Namespace, config: Config) -> int:
    """List the schedules, their next ticks and their last runs (--json: exact)."""
    selected_pipelines(config)   # (a config naming a pipeline that is not there: exit 2)
    report = schedule_report(_app_engine(), config)
    if args.json:
        print(json.dumps(report, indent=2))
        return EXIT_OK
    if not report:
        print("no schedules")
    for r in report:
        last = (f"last {_ts(r['last'])} UTC" + (f" (run {r['last_run']})" if r["last_run"] else " (seen, not fired)")
                if r["last"] is not None else "never fired")
        state = "next " + _ts(r["next"]) + " UTC" if r["on"] else "off (config schedules)"
        print(printable(f"{r['pipeline']:<28} {r['schedule']}  {state}  {last}"))
    return EXIT_OK


def cmd_validate(args: argparse.Namespace, config: Config) -> int:
    """Validate every registered pipeline and the configured selection."""
    names = validate()
    selected_pipelines(config)
    print(f"ok: {len(names)} pipeline(s): {', '.join(names)}" if names else "ok: no pipelines registered")
    return EXIT_OK


# Characters a terminal acts on (C0 and C1 controls, DEL) or that reorder the text shown (bidi overrides).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` safe to print on a terminal, on one line: each control character is shown escaped (``\\x1b``)."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    """Print the status report, as text or (--json) JSON (exact); text lines have control characters escaped."""
    engine = Engine(Store(config.data["database_url"]), config)
    ensure_schema(engine.store)
    report = status_report(engine)
    if getattr(args, "json", False):
        print(json.dumps(report, indent=2, sort_keys=True))
        return EXIT_OK
    for line in _status_lines(report):
        print(printable(line))
    return EXIT_OK


def sleeping_steps(t: Tx, pipeline: str) -> tuple[int, float | None]:
    """A pipeline's steps asleep, and the first wake-up: SQL.sleeping_steps a priority at a time (an index range
    of the claim queue each)."""
    count, first, priority = 0, None, t.one(SQL.next_priority, {"pipeline": pipeline, "lowest": PRIORITY_RANGE[0]})[0]
    while priority is not None:
        n, wake = t.one(SQL.sleeping_steps, {"pipeline": pipeline, "priority": priority})
        count += int(n)
        first = wake if first is None or (wake is not None and wake < first) else first
        if priority >= PRIORITY_RANGE[1]:
            break
        priority = t.one(SQL.next_priority, {"pipeline": pipeline, "lowest": priority + 1})[0]
    return count, first


def _waiting_lines(report: dict) -> Iterator[str]:
    """The status report's waits: per pipeline, branches parked for a signal and steps asleep; then the first
    parked branches, each with its signal and deadline."""
    if not report["waiting"]:
        return
    yield "waiting (for a signal, asleep, or for a slot of a concurrency cap):"
    for pipeline, w in report["waiting"].items():
        parts = []
        if w["signal"]:
            timeout = f"the first timeout at {_ts(w['first_timeout'])} UTC" if w["first_timeout"] else "no timeout"
            parts.append(f"{w['signal']} branch(es) for a signal ({timeout})")
        if w["sleeping"]:
            parts.append(f"{w['sleeping']} step(s) asleep (the first wakes at {_ts(w['first_wake'])} UTC)")
        if w["for_slot"]:
            parts.append(f"{w['for_slot']} step(s) waiting for a slot (concurrency cap)")
        yield f"  {pipeline:<28} " + ", ".join(parts)
    for w in report["waits"]:
        until = f"until {_ts(w['until'])} UTC" if w["until"] is not None else "(no timeout)"
        yield f"  run {w['run']} branch {w['branch']} {w['pipeline']}: signal {w['signal']!r} {until}"


def _status_lines(report: dict) -> Iterator[str]:
    """The text form of the status report, line by line (raw: the caller escapes them)."""
    yield f"processes ({len(report['processes'])}):"
    for p in report["processes"]:
        yield (f"  {p['machine']:<20} pid {p['pid']:<7} {p['role']:<10} {p['state']:<9} "
               f"heartbeat {p['heartbeat_age']:.1f}s ago  up {p['age']:.0f}s  restarts {p['restarts']}  "
               f"{','.join(p['pipelines'])}")
    yield "runs:"
    for pipeline, by_status in sorted(report["runs"].items()):
        yield f"  {pipeline:<28} " + "  ".join(f"{s} {n}" for s, n in sorted(by_status.items()))
    yield from _waiting_lines(report)
    if report["scheduled"]:
        yield "scheduled (delayed runs still to start):"
        for pipeline, due in report["scheduled"].items():
            yield f"  {pipeline:<28} {due['runs']} run(s), the first at {_ts(due['first'])} UTC"
    if report["recent_halts"]:
        yield "recent halts:"
        for h in report["recent_halts"]:
            yield f"  run {h['run']} {h['pipeline']}: {', '.join(map(str, h['reasons'])) or 'halted'}"
    if report["recent_errors"]:
        yield "recent step errors:"
        for e in report["recent_errors"]:
            yield f"  run {e['run']} step {e['step']} {e['pipeline']}.{e['name']} {e['outcome']}: {e['error']}"


def cmd_healthcheck(args: argparse.Namespace, config: Config | None) -> int:
    """The liveness probe: print the verdict (-v: each process), exit with its code."""
    config = config or _config_from_args(args)
    if args.max_age is not None and not 0 < args.max_age <= MAX_DURATION:   # NaN and infinity fail this too
        raise ConfigError(f"--max-age must be a number of seconds > 0 (at most {MAX_DURATION})")
    health = check_health(config, args.role, args.pid, args.max_age)
    print(printable(health.line))
    if args.verbose:
        for p in health.processes:
            print(printable(f"  process {p['id']}: pid {p['pid']} role {p['role']} state {p['state']} "
                            f"heartbeat {p['heartbeat_age']:.1f}s ago, up {p['age']:.0f}s, restarts {p['restarts']}"))
    return health.code


def cmd_doctor(args: argparse.Namespace, config: Config | None) -> int:
    """Check the deployment: one line per check (ok / warn / fail, escaped); exit 1 when one failed. It imports the
    app itself (light): an app that does not import here is a warning, not an error."""
    config = config or _config_from_args(args)
    if args.grace is not None and not 0 <= args.grace <= MAX_DURATION:   # NaN and infinity fail this too
        raise ConfigError(f"--grace must be a number of seconds >= 0 (at most {MAX_DURATION})")
    findings = run_doctor(config, args.grace)
    for finding in findings:
        print(printable(finding.line))
    return EXIT_FAILURE if any(finding.level == DOCTOR_FAIL for finding in findings) else EXIT_OK


def cmd_dashboard(args: argparse.Namespace, config: Config) -> int:
    """Serve the dashboard until SIGTERM/SIGINT; exit 0."""
    if not 0 <= args.port <= 65535 or not 0 < args.refresh <= MAX_DURATION:
        raise ConfigError("--port must be between 0 and 65535 and --refresh above 0")
    auth = args.auth or os.environ.get("DUCTWORK_DASHBOARD_AUTH") or None
    server = make_dashboard_server(config, args.host, args.port, auth=auth, insecure=args.insecure,
                                   refresh=args.refresh, read_only=args.read_only)
    stop = threading.Event()  # the handlers only record the signal
    previous = {sig: signal.signal(sig, lambda signum, _: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="ductwork.dashboard",
                     daemon=True).start()
    host, port = server.server_address[:2]
    log.info("dashboard on http://%s:%s/ (JSON under /api/, Prometheus at /metrics)%s; %s",
             f"[{host}]" if ":" in host else host, port, "" if auth else ", no auth",
             "actions: cancel, revive" if server.actions else server.read_only_reason)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.shutdown()
        server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("dashboard stopped")
    return EXIT_OK


COMMANDS = (   # in --help order
    Command("run", "start the configured role (default)", cmd_run),
    Command("migrate", "create or upgrade the schema", cmd_migrate),
    Command("validate", "import the app and validate every pipeline", cmd_validate),
    Command("status", "processes, runs per pipeline, recent halts and errors", cmd_status, _status_arguments),
    Command("prune", "delete finished runs past their retention now (--dry-run: count them)", cmd_prune,
            _prune_arguments),
    Command("healthcheck", "liveness probe for this machine and role", cmd_healthcheck, _healthcheck_arguments,
            aliases=("health",), light=True),
    Command("trigger", "trigger a pipeline: trigger NAME [JSON ...] [--delay S | --at ISO8601]", cmd_trigger,
            _trigger_arguments),
    Command("cancel", "cancel runs: cancel RUN_ID ... | --pipeline NAME [--older-than S]", cmd_cancel,
            _cancel_arguments),
    Command("revive", "re-run what did not complete of halted or cancelled runs: revive RUN_ID ...", cmd_revive,
            _revive_arguments),
    Command("signal", "send a run a signal (what wait_for waits for): signal RUN_ID NAME [JSON]", cmd_signal,
            _signal_arguments),
    Command("schedules", "list the schedules, their next ticks and last runs: schedules [--json]", cmd_schedules,
            _status_arguments),
    Command("dashboard", "web dashboard (cancel and revive runs unless --read-only), JSON API and Prometheus "
            "/metrics", cmd_dashboard, _dashboard_arguments),
    Command("doctor", "check the deployment: one line per check, ok / warn / fail", cmd_doctor, _doctor_arguments,
            light=True),
)
COMMANDS_BY_NAME = {name: command for command in COMMANDS for name in (command.name, *command.aliases)}


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (``argv``, default sys.argv[1:]; without a command: run); the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    named = [a for a in argv if a in COMMANDS_BY_NAME]   # the command, and any option value spelled like one
    asks_help = any(a in ("-h", "--help", "--version") for a in argv)
    if not named and not asks_help:
        argv, named = [DEFAULT_COMMAND, *argv], [DEFAULT_COMMAND]
    debug = "--debug" in argv
    try:
        args = _parse_arguments(argv, None if asks_help else named)
        command = COMMANDS_BY_NAME[args.command or DEFAULT_COMMAND]
        _warn_argv_passwords(args)
        if command.light:  # healthcheck: no app import, no logging setup
            return command.handler(args, None)
        config = _prepare(args)
        return command.handler(args, config)
    except (ConfigError, DefinitionError) as exc:
        return _error_exit(EXIT_USAGE, str(exc), debug)
    except RecursionError:   # input nested deeper than any check expected
        return _error_exit(EXIT_USAGE, "input nested too deeply", debug)
    except DuctworkError as exc:   # DatabaseUnavailable, trigger arguments that are not JSON, ...
        return _error_exit(EXIT_FAILURE, str(exc), debug)
    except KeyboardInterrupt:
        return EXIT_FAILURE
    except Exception as exc:   # the database's own errors (disk full, ...), then anything unforeseen
        if isinstance(exc, sqlite3.Error) or type(exc).__module__.startswith("pg8000"):
            return _error_exit(EXIT_FAILURE, f"database error: {_db_error_text(exc)}", debug)
        return _error_exit(EXIT_FAILURE, f"{type(exc).__name__}: {exc} (--debug shows the traceback)", debug)


def _parse_arguments(argv: list[str], named: list[str] | None) -> argparse.Namespace:
    """``argv`` parsed by the parser of the ``named`` commands; a usage error is the whole parser's,
    so its message (the commands to choose from) is the same as ever."""
    try:
        return build_parser(named).parse_args(argv)
    except ConfigError:
        if named is None:
            raise
        return build_parser().parse_args(argv)


def _error_exit(code: int, message: str, debug: bool) -> int:
    """Print the error as one line on stderr (masked; control characters escaped); --debug: its traceback first."""
    if debug:
        traceback.print_exc()
    print(f"ductwork: error: {printable(mask(message))}", file=sys.stderr)
    return code


def _warn_argv_passwords(args: argparse.Namespace) -> None:
    """A password on the command line is visible to every user of the machine (ps, /proc): say so on stderr."""
    given = []
    url = getattr(args, "database_url", None)
    with contextlib.suppress(ValueError):
        if url and urllib.parse.urlsplit(url).password:
            given.append(("--database-url", "DUCTWORK_DATABASE_URL or DATABASE_URL"))
    auth = getattr(args, "auth", None)
    if auth and auth.partition(":")[2]:
        given.append(("--auth", "DUCTWORK_DASHBOARD_AUTH"))
    for flag, variables in given:
        print(f"ductwork: warning: the password in {flag} is visible to other users in ps; use {variables} instead",
              file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

"""OpenTelemetry across processes (SPEC §19): each process that imports this sets a tracer provider with the SDK's
in-memory exporter (a worker: its own, at on_worker_start) and writes the spans it finished to
$DW_TEST_DIR/spans-<pid>.json (dump_spans; a worker at on_worker_stop)."""
import json
import os

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import ductwork

EXPORTER = InMemorySpanExporter()


def set_provider() -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(provider)


def dump_spans() -> None:
    spans = [{"name": s.name, "trace_id": format(s.context.trace_id, "032x"),
              "span_id": format(s.context.span_id, "016x"),
              "parent": format(s.parent.span_id, "016x") if s.parent else None, "attributes": dict(s.attributes),
              "status": s.status.status_code.name, "events": [e.name for e in s.events], "pid": os.getpid()}
             for s in EXPORTER.get_finished_spans()]
    with open(os.path.join(os.environ["DW_TEST_DIR"], f"spans-{os.getpid()}.json"), "w") as f:
        json.dump(spans, f)


ductwork.on_worker_start(set_provider)
ductwork.on_worker_stop(dump_spans)


def traced_first(x):
    return x + 1


class TracedFlaky(ductwork.Step):
    def execute(self, x):
        if self.attempt == 1:
            raise ValueError("first attempt fails")
        return x * 2


class Traced(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(traced_first).chain(to=TracedFlaky)

"""The engine's decision rules as a pure function: ``decide(Situation) -> _Outcome``, no database.

One table per rule of ``DECISIONS`` (end, chain, expand, divide, divert), the join rule (``expected > 0``)
and the unknown-kind rule; each row is a Situation and the whole outcome it must give. The graphs are
written out by hand in the format of the definitions section; ``test_the_hand_written_graphs_are_the_builders``
checks them against what real Pipeline definitions compile to.
"""
from __future__ import annotations

import copy

import pytest

import ductwork
from ductwork import (
    CONDITION_UNMATCHED,
    DEFINITION_CHANGED,
    JOB_CRASHES_EXHAUSTED,
    JOB_RETRIES_EXHAUSTED,
    MAX_FANOUT_EXCEEDED,
    TRANSITION_INVALID,
    Situation,
    decide,
)


# -- the graphs ----------------------------------------------------------------------------------------
def node(i: int, step: str, kind: str, **after) -> dict:
    return {"id": i, "step": step, "after": {"kind": kind, **after}}


def ends(start: int, *steps: str) -> list[dict]:
    """Nodes start, start + 1, ... each running one of ``steps`` and ending its branch."""
    return [node(start + i, step, "end") for i, step in enumerate(steps)]


END = [node(0, "first", "end")]
CHAIN = [node(0, "first", "chain", next=1), *ends(1, "second")]
EXPAND = [node(0, "first", "expand", child=1, join=2), *ends(1, "child", "joined")]
EXPAND_OPEN = [node(0, "first", "expand", child=1, join=None), *ends(1, "child")]
DIVIDE = [node(0, "first", "divide", children=[1, 2], join=3), *ends(1, "child", "other", "joined")]
DIVIDE_OPEN = [node(0, "first", "divide", children=[1, 2], join=None), *ends(1, "child", "other")]
CASES = {"True": 1, "None": 2, "3": 3, "2.5": 4, "abc": 5, "otherwise": 6}
DIVERT_STEPS = ("on_true", "on_none", "on_three", "on_float", "on_abc", "fallback")
DIVERT = [node(0, "first", "divert", cases=CASES, join=7), *ends(1, *DIVERT_STEPS, "joined")]
DIVERT_OPEN = [node(0, "first", "divert", cases=CASES, join=None), *ends(1, *DIVERT_STEPS)]
# the builder refuses these two (otherwise is mandatory; no such kind): a stored definition may have them
DIVERT_STRICT = [node(0, "first", "divert", cases={"yes": 1, "no": 2}, join=3), *ends(1, "on_yes", "on_no", "joined")]
UNKNOWN = [node(0, "first", "loop", back=0)]


def first(x):
    return x


def second(x):
    return x


def child(x):
    return x


def other(x):
    return x


def joined(x):
    return x


def on_true(x):
    return x


def on_none(x):
    return x


def on_three(x):
    return x


def on_float(x):
    return x


def on_abc(x):
    return x


def fallback(x):
    return x


class DecEnd(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(first)


class DecChain(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(first).chain(to=second)


class DecExpand(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(first).expand(to=child).collapse(into=joined)


class DecExpandOpen(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(first).expand(to=child)


class DecDivide(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(first).divide(to=[child, other]).combine(into=joined)


class DecDivideOpen(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(first).divide(to=[child, other])


DIVERT_TO = {True: on_true, None: on_none, 3: on_three, 2.5: on_float, "abc": on_abc, "otherwise": fallback}


class DecDivert(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(first).divert(to=DIVERT_TO).converge(into=joined)


class DecDivertOpen(ductwork.Pipeline):
    @staticmethod
    def define(p):
        p.start(first).divert(to=DIVERT_TO)


@pytest.mark.parametrize("pipeline, nodes", [
    (DecEnd, END), (DecChain, CHAIN), (DecExpand, EXPAND), (DecExpandOpen, EXPAND_OPEN), (DecDivide, DIVIDE),
    (DecDivideOpen, DIVIDE_OPEN), (DecDivert, DIVERT), (DecDivertOpen, DIVERT_OPEN),
], ids=["end", "chain", "expand", "expand-open", "divide", "divide-open", "divert", "divert-open"])
def test_the_hand_written_graphs_are_the_builders(pipeline, nodes):
    assert pipeline.definition.nodes == nodes
    assert [list(n["after"].get("cases", {})) for n in pipeline.definition.nodes] == \
           [list(n["after"].get("cases", {})) for n in nodes]   # divert positions follow the order of cases


def test_the_decisions_table_has_a_rule_for_every_kind_of_the_graph_format():
    assert set(ductwork.DECISIONS) == {"end", "chain", "expand", "divide", "divert"}
    assert set(ductwork.FAN_OUTS) == {"expand", "divide", "divert"}


# -- building rows ---------------------------------------------------------------------------------------
Outcome = ductwork._Outcome


def ok(output: str | None) -> ductwork.StepState:
    """The branch's step succeeded with ``output`` (JSON text as stored)."""
    return ductwork.StepState(step_id=11, status="succeeded", output=output, halt_reason=None)


def failed(reason: str | None = None) -> ductwork.StepState:
    return ductwork.StepState(step_id=11, status="failed", output=None, halt_reason=reason)


def halted(reason: str | None, node: int = 0, warning: str | None = None, counts: int = 0) -> Outcome:
    """The branch halts at ``node``; a join that halts keeps its counts (expected = arrived)."""
    return Outcome("halted", node, expected=counts, arrived=counts, halt_reason=reason, warning=warning)


def running(node: int, value: str) -> Outcome:
    """The branch goes on with the step of ``node`` on ``value``."""
    return Outcome("running", node, new_step=(node, value))


def waiting(*children: tuple[int, int, str]) -> Outcome:
    """The branch waits for these (position, node, input) children."""
    return Outcome("waiting", 0, expected=len(children), children=list(children))


def completed(output: str, node: int = 0) -> Outcome:
    return Outcome("completed", node, output=output)


def row(case_id: str, situation: Situation, outcome: Outcome):
    return pytest.param(situation, outcome, id=case_id)


def check(situation: Situation, outcome: Outcome) -> None:
    before = copy.deepcopy(situation)
    assert decide(situation) == outcome
    assert situation == before           # pure: the situation is read, never changed
    assert decide(situation) == outcome  # and the same situation decides the same again


# -- what every kind shares: a failed step halts with its reason, no step is an invalid transition --------
KINDS = {"end": END, "chain": CHAIN, "expand": EXPAND, "divide": DIVIDE, "divert": DIVERT, "unknown": UNKNOWN}


@pytest.mark.parametrize("nodes", KINDS.values(), ids=KINDS.keys())
@pytest.mark.parametrize("step, defined, outcome", [
    pytest.param(failed(JOB_CRASHES_EXHAUSTED), None, halted(JOB_CRASHES_EXHAUSTED), id="failed-with-its-reason"),
    pytest.param(failed(), None, halted(JOB_RETRIES_EXHAUSTED), id="failed-without-a-reason"),
    pytest.param(failed(), (), halted(JOB_RETRIES_EXHAUSTED), id="failed-beats-definition-changed"),
    pytest.param(None, None, halted(TRANSITION_INVALID), id="no-step"),
    pytest.param(None, (), halted(TRANSITION_INVALID), id="no-step-nothing-defined"),
])
def test_every_kind_halts_on_a_failed_step_or_no_step(nodes, step, defined, outcome):
    check(Situation(0, nodes, step, defined=defined), outcome)


# -- end -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("situation, outcome", [
    row("completes-with-the-output-as-stored", Situation(0, END, ok('{"a": [1, 2]}')), completed('{"a": [1, 2]}')),
    row("null-output", Situation(0, END, ok("null")), completed("null")),
    row("last-node-of-a-chain", Situation(1, CHAIN, ok("8")), completed("8", node=1)),
    row("needs-no-defined-step", Situation(0, END, ok("1"), defined=()), completed("1")),
])
def test_end(situation, outcome):
    check(situation, outcome)


# -- chain -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("situation, outcome", [
    row("next-step-runs-on-the-output", Situation(0, CHAIN, ok("7")), running(1, "7")),
    row("output-text-passed-unchanged", Situation(0, CHAIN, ok('{"a": [1, 2]}')), running(1, '{"a": [1, 2]}')),
    row("null-output", Situation(0, CHAIN, ok("null")), running(1, "null")),
    row("next-step-defined", Situation(0, CHAIN, ok("7"), defined=("first", "second")), running(1, "7")),
    row("only-the-next-step-must-be-defined", Situation(0, CHAIN, ok("7"), defined=("second",)), running(1, "7")),
    row("next-step-no-longer-defined", Situation(0, CHAIN, ok("7"), defined=("first",)), halted(DEFINITION_CHANGED)),
    row("max-depth-is-for-fan-outs", Situation(0, CHAIN, ok("7"), max_depth=0), running(1, "7")),
])
def test_chain(situation, outcome):
    check(situation, outcome)


# -- expand ----------------------------------------------------------------------------------------------
def not_a_list(got: str) -> Outcome:
    return halted(TRANSITION_INVALID, warning=f"expand after first needs a list, got {got}")


def too_wide(count: int, max_depth: int) -> Outcome:
    warning = f"expand after first has {count} elements, more than max_depth {max_depth}"
    return halted(MAX_FANOUT_EXCEEDED, warning=warning)


@pytest.mark.parametrize("situation, outcome", [
    row("one-child-per-element", Situation(0, EXPAND, ok("[1, 2, 3]")), waiting((0, 1, "1"), (1, 1, "2"), (2, 1, "3"))),
    row("elements-re-encoded", Situation(0, EXPAND, ok('[{"k": [1, 2]}, "x", null]')),
        waiting((0, 1, '{"k":[1,2]}'), (1, 1, '"x"'), (2, 1, "null"))),
    row("open-expand-fans-out-the-same", Situation(0, EXPAND_OPEN, ok("[1, 2]")), waiting((0, 1, "1"), (1, 1, "2"))),
    row("dict", Situation(0, EXPAND, ok('{"a": 1}')), not_a_list("dict")),
    row("str", Situation(0, EXPAND, ok('"abc"')), not_a_list("str")),
    row("null", Situation(0, EXPAND, ok("null")), not_a_list("NoneType")),
    row("int", Situation(0, EXPAND, ok("3")), not_a_list("int")),
    row("not-a-list-before-max-depth", Situation(0, EXPAND, ok('{"a": 1}'), max_depth=0), not_a_list("dict")),
    row("over-max-depth", Situation(0, EXPAND, ok("[1, 2, 3]"), max_depth=2), too_wide(3, 2)),
    row("at-max-depth", Situation(0, EXPAND, ok("[1, 2, 3]"), max_depth=3),
        waiting((0, 1, "1"), (1, 1, "2"), (2, 1, "3"))),
    row("no-limit", Situation(0, EXPAND, ok(str(list(range(40)))), max_depth=-1),
        waiting(*[(i, 1, str(i)) for i in range(40)])),
    row("max-depth-0-allows-none", Situation(0, EXPAND, ok("[1]"), max_depth=0), too_wide(1, 0)),
    row("max-depth-0-allows-empty", Situation(0, EXPAND, ok("[]"), max_depth=0), running(2, "[]")),
    row("empty-goes-straight-to-the-join", Situation(0, EXPAND, ok("[]")), running(2, "[]")),
    row("empty-without-join-completes", Situation(0, EXPAND_OPEN, ok("[]")), completed("[]")),
    row("empty-needs-only-the-join", Situation(0, EXPAND, ok("[]"), defined=("joined",)), running(2, "[]")),
    row("empty-join-no-longer-defined", Situation(0, EXPAND, ok("[]"), defined=("first", "child")),
        halted(DEFINITION_CHANGED)),
    row("child-no-longer-defined", Situation(0, EXPAND, ok("[1]"), defined=("first", "joined")),
        halted(DEFINITION_CHANGED)),
    row("the-join-is-not-checked-yet", Situation(0, EXPAND, ok("[1]"), defined=("child",)), waiting((0, 1, "1"))),
])
def test_expand(situation, outcome):
    check(situation, outcome)


# -- divide ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("situation, outcome", [
    row("every-child-gets-the-output", Situation(0, DIVIDE, ok("5")), waiting((0, 1, "5"), (1, 2, "5"))),
    row("output-text-passed-unchanged", Situation(0, DIVIDE, ok('{"a": 1}')),
        waiting((0, 1, '{"a": 1}'), (1, 2, '{"a": 1}'))),
    row("any-output-even-null", Situation(0, DIVIDE, ok("null")), waiting((0, 1, "null"), (1, 2, "null"))),
    row("open-divide-fans-out-the-same", Situation(0, DIVIDE_OPEN, ok("5")), waiting((0, 1, "5"), (1, 2, "5"))),
    row("over-max-depth", Situation(0, DIVIDE, ok("5"), max_depth=1), halted(MAX_FANOUT_EXCEEDED)),
    row("max-depth-0-allows-none", Situation(0, DIVIDE, ok("5"), max_depth=0), halted(MAX_FANOUT_EXCEEDED)),
    row("at-max-depth", Situation(0, DIVIDE, ok("5"), max_depth=2), waiting((0, 1, "5"), (1, 2, "5"))),
    row("no-limit", Situation(0, DIVIDE, ok("5"), max_depth=-1), waiting((0, 1, "5"), (1, 2, "5"))),
    row("children-defined", Situation(0, DIVIDE, ok("5"), defined=("child", "other")),
        waiting((0, 1, "5"), (1, 2, "5"))),
    row("a-child-no-longer-defined", Situation(0, DIVIDE, ok("5"), defined=("first", "child", "joined")),
        halted(DEFINITION_CHANGED)),
])
def test_divide(situation, outcome):
    check(situation, outcome)


# -- divert: the case is str() of the output after its JSON round trip ---------------------------------------
def chosen(position: int, output: str) -> Outcome:
    """The one child of case ``position`` (node position + 1 in DIVERT), on the output as stored."""
    return waiting((position, position + 1, output))


OTHERWISE = 5


@pytest.mark.parametrize("output, outcome", [
    pytest.param("true", chosen(0, "true"), id="true-is-True"),
    pytest.param("null", chosen(1, "null"), id="null-is-None"),
    pytest.param("3", chosen(2, "3"), id="3"),
    pytest.param("2.5", chosen(3, "2.5"), id="2.5"),
    pytest.param('"abc"', chosen(4, '"abc"'), id="abc"),
    pytest.param('"True"', chosen(0, '"True"'), id="the-string-True-is-True-too"),
    pytest.param('"3"', chosen(2, '"3"'), id="the-string-3-is-3-too"),
    pytest.param("3.0", chosen(OTHERWISE, "3.0"), id="3.0-is-not-3"),
    pytest.param("false", chosen(OTHERWISE, "false"), id="False-unmatched"),
    pytest.param('"zzz"', chosen(OTHERWISE, '"zzz"'), id="zzz-unmatched"),
    pytest.param("[1]", chosen(OTHERWISE, "[1]"), id="list-unmatched"),
    pytest.param('{"a": 1}', chosen(OTHERWISE, '{"a": 1}'), id="dict-unmatched-output-unchanged"),
    pytest.param('"otherwise"', chosen(OTHERWISE, '"otherwise"'), id="the-string-otherwise"),
])
def test_divert_chooses_by_str_of_the_json_value(output, outcome):
    check(Situation(0, DIVERT, ok(output)), outcome)
    check(Situation(0, DIVERT_OPEN, ok(output)), outcome)   # the join plays no part yet


ALL_BUT_ON_TRUE = ("first", *DIVERT_STEPS[1:], "joined")


@pytest.mark.parametrize("situation, outcome", [
    row("matched-without-otherwise", Situation(0, DIVERT_STRICT, ok('"yes"')), waiting((0, 1, '"yes"'))),
    row("second-case-without-otherwise", Situation(0, DIVERT_STRICT, ok('"no"')), waiting((1, 2, '"no"'))),
    row("unmatched-without-otherwise", Situation(0, DIVERT_STRICT, ok('"maybe"')), halted(CONDITION_UNMATCHED)),
    row("True-is-not-yes", Situation(0, DIVERT_STRICT, ok("true")), halted(CONDITION_UNMATCHED)),
    row("chosen-case-no-longer-defined", Situation(0, DIVERT, ok("true"), defined=ALL_BUT_ON_TRUE),
        halted(DEFINITION_CHANGED)),
    row("other-cases-need-not-be-defined", Situation(0, DIVERT, ok("3"), defined=ALL_BUT_ON_TRUE), chosen(2, "3")),
    row("otherwise-no-longer-defined", Situation(0, DIVERT, ok('"zzz"'), defined=("first", "on_true")),
        halted(DEFINITION_CHANGED)),
    row("max-depth-is-for-expand-and-divide", Situation(0, DIVERT, ok("true"), max_depth=0), chosen(0, "true")),
])
def test_divert(situation, outcome):
    check(situation, outcome)


# -- unknown kinds -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("situation, outcome", [
    row("unknown-kind", Situation(0, UNKNOWN, ok("1")), halted(TRANSITION_INVALID)),
    row("unknown-kind-nothing-defined", Situation(0, UNKNOWN, ok("1"), defined=()), halted(TRANSITION_INVALID)),
    row("unknown-kind-max-depth", Situation(0, UNKNOWN, ok("[1, 2]"), max_depth=0), halted(TRANSITION_INVALID)),
])
def test_unknown_transition_kind(situation, outcome):
    check(situation, outcome)


# -- joins: every child of the fan-out finished (expected > 0) -----------------------------------------------
def done(*outputs: str) -> list[tuple[str, str]]:
    """Children that completed with these outputs, in position order."""
    return [("completed", output) for output in outputs]


def join(nodes: list[dict], children: list[tuple[str, str | None]], **kw) -> Situation:
    return Situation(0, nodes, ok("[2, 4, 6]"), expected=len(children), children=children, **kw)


@pytest.mark.parametrize("situation, outcome", [
    row("expand-join-runs-on-the-list", join(EXPAND, done("2", "4", "6")), running(2, "[2,4,6]")),
    row("outputs-re-encoded", join(EXPAND, done('{"a": [1, 2]}', "null")), running(2, '[{"a":[1,2]},null]')),
    row("expand-without-join-completes", join(EXPAND_OPEN, done("2", "4")), completed("[2,4]")),
    row("divide-join-runs-on-the-list", join(DIVIDE, done("6", "10")), running(3, "[6,10]")),
    row("divide-without-join-completes", join(DIVIDE_OPEN, done("6", '"x"')), completed('[6,"x"]')),
    row("divert-join-gets-the-output-itself", join(DIVERT, done('"was-true"')), running(7, '"was-true"')),
    row("divert-join-a-list-output-unwrapped-once", join(DIVERT, done("[1, 2]")), running(7, "[1,2]")),
    row("divert-without-join-completes", join(DIVERT_OPEN, done("null")), completed("null")),
    row("a-child-halted", join(EXPAND, [("completed", "2"), ("halted", None), ("completed", "6")]),
        halted(None, counts=3)),
    row("every-child-halted", join(DIVIDE, [("halted", None), ("halted", None)]), halted(None, counts=2)),
    row("the-divert-child-halted", join(DIVERT, [("halted", None)]), halted(None, counts=1)),
    row("a-child-halted-no-join", join(EXPAND_OPEN, [("halted", None), ("completed", "4")]),
        halted(None, counts=2)),
    row("join-defined", join(EXPAND, done("2"), defined=("joined",)), running(2, "[2]")),
    row("join-no-longer-defined", join(EXPAND, done("2", "4", "6"), defined=("first", "child")),
        halted(DEFINITION_CHANGED, counts=3)),
    row("divide-join-no-longer-defined", join(DIVIDE, done("6", "10"), defined=("first", "child", "other")),
        halted(DEFINITION_CHANGED, counts=2)),
    row("divert-join-no-longer-defined", join(DIVERT, done("1"), defined=DIVERT_STEPS),
        halted(DEFINITION_CHANGED, counts=1)),
    row("no-join-needs-nothing-defined", join(EXPAND_OPEN, done("2"), defined=()), completed("[2]")),
    row("max-depth-is-not-checked-again", join(EXPAND, done("2", "4", "6"), max_depth=0), running(2, "[2,4,6]")),
    # rows missing (a database edited by hand): nothing to join, the branch halts keeping its counts
    row("children-missing", Situation(0, EXPAND, ok("[2, 4, 6]"), expected=3, children=done("2")),
        halted(TRANSITION_INVALID, counts=3)),
    row("divert-child-missing", Situation(0, DIVERT, ok("true"), expected=1, children=[]),
        halted(TRANSITION_INVALID, counts=1)),
])
def test_join(situation, outcome):
    check(situation, outcome)

"""Pipeline definitions without a database (SPEC §2).

Every misuse raises ductwork.DefinitionError while the class body is being defined, with a
message that names the pipeline and the problem; valid definitions compile into the graph
described in ductwork.py (node 0 is the start step; each node has "step" and "after").

The pipeline registry is global to the process, so every pipeline class here has a name
that is unique across the whole test suite (prefix ``Def``).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import sys

import pytest

import ductwork

# -- steps shared by the tests -----------------------------------------------------------


class DefA(ductwork.Step):
    def execute(self, x):
        return x


class DefB(ductwork.Step):
    def execute(self, x):
        return x


class DefC(ductwork.Step):
    def execute(self, x):
        return x


class DefD(ductwork.Step):
    def execute(self, x):
        return x


class DefE(ductwork.Step):
    def execute(self, x):
        return x


class DefF(ductwork.Step):
    def execute(self, x):
        return x


def def_report(values):
    return len(values)


def steps_of(cls) -> list[str]:
    return [node["step"] for node in cls.definition.nodes]


def node_named(cls, name: str) -> dict:
    matches = [node for node in cls.definition.nodes if node["step"] == name]
    assert len(matches) == 1, f"expected one node for {name}, got {matches}"
    return matches[0]


def index_of(cls, name: str) -> int:
    return cls.definition.nodes.index(node_named(cls, name))


def raises_definition_error(pipeline: str, *fragments: str):
    """Context manager: DefinitionError whose message names the pipeline and every fragment."""
    return _DefinitionErrorCheck(pipeline, fragments)


class _DefinitionErrorCheck:
    def __init__(self, pipeline: str, fragments: tuple[str, ...]):
        self.pipeline, self.fragments = pipeline, fragments
        self._ctx = pytest.raises(ductwork.DefinitionError)

    def __enter__(self):
        self.info = self._ctx.__enter__()
        return self.info

    def __exit__(self, *exc):
        suppressed = self._ctx.__exit__(*exc)
        message = str(self.info.value)
        assert self.pipeline in message, f"message does not name the pipeline: {message!r}"
        for fragment in self.fragments:
            assert fragment.lower() in message.lower(), f"{fragment!r} not in {message!r}"
        assert self.pipeline not in ductwork.registered_pipelines(), "a broken pipeline must not be registered"
        return suppressed


# -- misuse: each raises DefinitionError at class-definition time ---------------------------


def test_collapse_without_expand():
    with raises_definition_error("DefCollapseNoExpand", "collapse", "expand"):
        class DefCollapseNoExpand(ductwork.Pipeline):
            @staticmethod
            def define(p):
                p.start(DefA).chain(to=DefB).collapse(into=DefC)


def test_collapse_of_a_divided_branch_is_not_a_collapse_of_an_expand():
    with raises_definition_error("DefCollapseInDivide", "collapse", "expand"):
        class DefCollapseInDivide(ductwork.Pipeline):
            @staticmethod
            def define(p):
                a, b = p.start(DefA).divide(to=[DefB, DefC])
                a.collapse(into=DefD)


def test_combine_without_divide():
    with raises_definition_error("DefCombineNoDivide", "combine", "divide"):
        class DefCombineNoDivide(ductwork.Pipeline):
            @staticmethod
            def define(p):
                p.start(DefA).chain(to=DefB).combine(into=DefC)


def test_combine_of_a_divert_is_rejected():
    with raises_definition_error("DefCombineDivert", "combine", "divide"):
        class DefCombineDivert(ductwork.Pipeline):
            @staticmethod
            def define(p):
                p.start(DefA).divert(to={"x": DefB, "otherwise": DefC}).combine(into=DefD)


def test_converge_without_divert():
    with raises_definition_error("DefConvergeNoDivert", "converge", "divert"):
        class DefConvergeNoDivert(ductwork.Pipeline):
            @staticmethod
            def define(p):
                p.start(DefA).converge(into=DefB)


def test_converge_of_a_divide_is_rejected():
    with raises_definition_error("DefConvergeDivide", "converge", "divert"):
        class DefConvergeDivide(ductwork.Pipeline):
            @staticmethod
            def define(p):
                a, b = p.start(DefA).divide(to=[DefB, DefC])
                a.converge(b, into=DefD)


def test_divert_without_otherwise():
    with raises_definition_error("DefDivertNoOtherwise", "divert", "otherwise"):
        class DefDivertNoOtherwise(ductwork.Pipeline):
            @staticmethod
            def define(p):
                p.start(DefA).divert(to={"yes": DefB, "no": DefC})


def test_divert_keys_that_collide_as_strings():
    # keys are matched against str(output): 1 and "1" would be the same case
    with raises_definition_error("DefDivertCollide", "divert"):
        class DefDivertCollide(ductwork.Pipeline):
            @staticmethod
            def define(p):
                p.start(DefA).divert(to={1: DefB, "1": DefC, "otherwise": DefD})


def test_divide_needs_a_list_of_steps():
    with raises_definition_error("DefDivideEmpty", "divide"):
        class DefDivideEmpty(ductwork.Pipeline):
            @staticmethod
            def define(p):
                p.start(DefA).divide(to=[])


def test_start_called_twice():
    with raises_definition_error("DefStartTwice", "start", "twice"):
        class DefStartTwice(ductwork.Pipeline):
            @staticmethod
            def define(p):
                p.start(DefA)
                p.start(DefB)


def test_no_start():
    with raises_definition_error("DefNoStart", "start"):
        class DefNoStart(ductwork.Pipeline):
            @staticmethod
            def define(p):
                pass


def test_missing_define():
    with raises_definition_error("DefNoDefine", "define"):
        class DefNoDefine(ductwork.Pipeline):
            pass


def test_class_that_is_not_a_step_subclass():
    class NotAStep:
        def execute(self, x):
            return x

    with raises_definition_error("DefNotAStepClass", "NotAStep", "Step"):
        class DefNotAStepClass(ductwork.Pipeline):
            @staticmethod
            def define(p):
                p.start(DefA).chain(to=NotAStep)


@pytest.mark.parametrize("bad", ["DefA", 42, None, DefA()], ids=["string", "int", "none", "step-instance"])
def test_step_that_is_neither_a_step_class_nor_a_function(bad):
    name = f"DefBadStep{type(bad).__name__.title()}"
    with raises_definition_error(name, "step"):
        type(name, (ductwork.Pipeline,), {"define": staticmethod(lambda p: p.start(DefA).chain(to=bad))})


def test_step_without_execute():
    class NoExecute(ductwork.Step):
        pass

    with raises_definition_error("DefNoExecute", "NoExecute", "execute"):
        class DefNoExecute(ductwork.Pipeline):
            @staticmethod
            def define(p):
                p.start(NoExecute)


def test_lambda_step():
    with raises_definition_error("DefLambdaStep", "lambda"):
        class DefLambdaStep(ductwork.Pipeline):
            @staticmethod
            def define(p):
                p.start(DefA).chain(to=lambda x: x)


def test_two_different_step_classes_with_the_same_name():
    def make():
        class Twin(ductwork.Step):
            def execute(self, x):
                return x
        return Twin

    first, second = make(), make()
    assert first is not second
    with raises_definition_error("DefTwinSteps", "Twin"):
        class DefTwinSteps(ductwork.Pipeline):
            @staticmethod
            def define(p):
                p.start(first).chain(to=second)


def test_a_function_and_a_step_class_with_the_same_name():
    def DefB(x):  # noqa: N802 - same name as the module's DefB step class on purpose
        return x

    step_class = globals()["DefB"]
    with raises_definition_error("DefFuncClassTwin", "DefB"):
        class DefFuncClassTwin(ductwork.Pipeline):
            @staticmethod
            def define(p):
                p.start(step_class).chain(to=DefB)


def test_the_same_step_used_twice_is_fine():
    class DefSameStepTwice(ductwork.Pipeline):
        @staticmethod
        def define(p):
            p.start(DefA).chain(to=DefB).chain(to=DefA)

    assert steps_of(DefSameStepTwice) == ["DefA", "DefB", "DefA"]


def test_combine_that_omits_a_branch():
    with raises_definition_error("DefCombineOmits", "combine", "branch"):
        class DefCombineOmits(ductwork.Pipeline):
            @staticmethod
            def define(p):
                a, b, c = p.start(DefA).divide(to=[DefB, DefC, DefD])
                a.combine(b, into=DefE)


def test_combine_with_a_branch_of_another_divide():
    with raises_definition_error("DefCombineForeign", "combine"):
        class DefCombineForeign(ductwork.Pipeline):
            @staticmethod
            def define(p):
                a, b = p.start(DefA).divide(to=[DefB, DefC])
                x, y = a.divide(to=[DefD, DefE])
                x.combine(b, into=DefF)


def test_combine_while_a_nested_expand_is_still_open():
    with raises_definition_error("DefCombineOpenExpand", "expand", "combine"):
        class DefCombineOpenExpand(ductwork.Pipeline):
            @staticmethod
            def define(p):
                a, b = p.start(DefA).divide(to=[DefB, DefC])
                a.expand(to=DefD)          # never collapsed
                a.combine(b, into=DefE)


def test_fluent_combine_while_a_nested_expand_is_still_open():
    with raises_definition_error("DefFluentOpenExpand", "expand"):
        class DefFluentOpenExpand(ductwork.Pipeline):
            @staticmethod
            def define(p):
                group = p.start(DefA).divide(to=[DefB, DefC])
                group[1].expand(to=DefD)
                group.combine(into=DefE)


def test_converge_while_a_nested_expand_is_still_open():
    with raises_definition_error("DefConvergeOpenExpand", "expand", "converge"):
        class DefConvergeOpenExpand(ductwork.Pipeline):
            @staticmethod
            def define(p):
                yes, other = p.start(DefA).divert(to={"yes": DefB, "otherwise": DefC})
                other.expand(to=DefD)
                yes.converge(other, into=DefE)


def test_branch_handle_used_after_it_was_combined():
    with raises_definition_error("DefHandleAfterCombine", "chain", "combined"):
        class DefHandleAfterCombine(ductwork.Pipeline):
            @staticmethod
            def define(p):
                a, b = p.start(DefA).divide(to=[DefB, DefC])
                a.combine(b, into=DefD)
                b.chain(to=DefE)


def test_group_combined_twice():
    with raises_definition_error("DefCombineTwice", "combine"):
        class DefCombineTwice(ductwork.Pipeline):
            @staticmethod
            def define(p):
                group = p.start(DefA).divide(to=[DefB, DefC])
                group.combine(into=DefD)
                group.combine(into=DefE)


def test_handle_used_after_it_was_divided():
    # after divide, the line continues on the branches (or after the combine), not on the old handle
    with raises_definition_error("DefHandleAfterDivide", "chain"):
        class DefHandleAfterDivide(ductwork.Pipeline):
            @staticmethod
            def define(p):
                head = p.start(DefA)
                head.divide(to=[DefB, DefC])
                head.chain(to=DefD)


def test_transition_called_with_wrong_arguments():
    with raises_definition_error("DefWrongArgs"):
        class DefWrongArgs(ductwork.Pipeline):
            @staticmethod
            def define(p):
                p.start(DefA).chain(DefB, DefC)


def _load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_duplicate_pipeline_names_in_two_modules(tmp_path):
    body = (
        "import ductwork\n"
        "class DefDupStep(ductwork.Step):\n"
        "    def execute(self, x):\n"
        "        return x\n"
        "class DefDuplicatePipe(ductwork.Pipeline):\n"
        "    @staticmethod\n"
        "    def define(p):\n"
        "        p.start(DefDupStep)\n"
    )
    (tmp_path / "def_dup_one.py").write_text(body)
    (tmp_path / "def_dup_two.py").write_text(body)
    try:
        _load_module(tmp_path / "def_dup_one.py", "def_dup_one")
        with pytest.raises(ductwork.DefinitionError) as info:
            _load_module(tmp_path / "def_dup_two.py", "def_dup_two")
        message = str(info.value)
        assert "DefDuplicatePipe" in message
        assert "unique" in message or "twice" in message
        assert ductwork.registered_pipelines()["DefDuplicatePipe"].__module__ == "def_dup_one"
    finally:
        sys.modules.pop("def_dup_one", None)
        sys.modules.pop("def_dup_two", None)


# -- the shape of valid graphs ------------------------------------------------------------


def test_chain_graph():
    class DefChain(ductwork.Pipeline):
        @staticmethod
        def define(p):
            p.start(DefA).chain(to=DefB).chain(to=def_report)

    nodes = DefChain.definition.nodes
    assert steps_of(DefChain) == ["DefA", "DefB", "def_report"]
    assert nodes[0]["after"] == {"kind": "chain", "next": 1}
    assert nodes[1]["after"] == {"kind": "chain", "next": 2}
    assert nodes[2]["after"] == {"kind": "end"}
    assert DefChain.definition.pipeline == "DefChain"
    assert set(DefChain.steps) == {"DefA", "DefB", "def_report"}
    assert DefChain.steps["def_report"] is def_report


def test_single_step_pipeline():
    class DefSingle(ductwork.Pipeline):
        @staticmethod
        def define(p):
            p.start(def_report)

    assert DefSingle.definition.nodes == [{"id": 0, "step": "def_report", "after": {"kind": "end"}}]


def test_fluent_divide_combine():
    class DefFluentDivide(ductwork.Pipeline):
        @staticmethod
        def define(p):
            p.start(DefA).divide(to=[DefB, DefC]).combine(into=DefD)

    nodes = DefFluentDivide.definition.nodes
    assert nodes[0]["step"] == "DefA"
    after = nodes[0]["after"]
    assert after["kind"] == "divide"
    # branch order is the order of the divide list (this is the fan-in order)
    assert [nodes[i]["step"] for i in after["children"]] == ["DefB", "DefC"]
    assert nodes[after["join"]]["step"] == "DefD"
    for i in after["children"]:
        assert nodes[i]["after"] == {"kind": "end"}
    assert nodes[after["join"]]["after"] == {"kind": "end"}


def test_unpacked_divide_chain_combine():
    class DefUnpackedDivide(ductwork.Pipeline):
        @staticmethod
        def define(p):
            a, b = p.start(DefA).divide(to=[DefB, DefC])
            a.chain(to=DefE)
            a.combine(b, into=DefD)

    nodes = DefUnpackedDivide.definition.nodes
    after = nodes[0]["after"]
    assert after["kind"] == "divide"
    b, c = after["children"]
    assert (nodes[b]["step"], nodes[c]["step"]) == ("DefB", "DefC")
    assert nodes[b]["after"] == {"kind": "chain", "next": index_of(DefUnpackedDivide, "DefE")}
    assert node_named(DefUnpackedDivide, "DefE")["after"] == {"kind": "end"}
    assert nodes[c]["after"] == {"kind": "end"}
    assert nodes[after["join"]]["step"] == "DefD"


def test_combine_returns_a_handle_that_continues_the_line():
    class DefContinueAfterCombine(ductwork.Pipeline):
        @staticmethod
        def define(p):
            a, b = p.start(DefA).divide(to=[DefB, DefC])
            a.combine(b, into=DefD).chain(to=DefE)

    d = node_named(DefContinueAfterCombine, "DefD")
    assert d["after"] == {"kind": "chain", "next": index_of(DefContinueAfterCombine, "DefE")}


def test_divide_without_combine_is_left_open():
    class DefOpenDivide(ductwork.Pipeline):
        @staticmethod
        def define(p):
            p.start(DefA).divide(to=[DefB, DefC])

    after = DefOpenDivide.definition.nodes[0]["after"]
    assert after["kind"] == "divide"
    assert after["join"] is None


def test_divert_converge():
    class DefDivertConverge(ductwork.Pipeline):
        @staticmethod
        def define(p):
            p.start(DefA).divert(to={"big": DefB, True: DefC, "otherwise": DefD}).converge(into=DefE)

    nodes = DefDivertConverge.definition.nodes
    after = nodes[0]["after"]
    assert after["kind"] == "divert"
    # keys are compared with str(output): True becomes "True"
    assert {key: nodes[i]["step"] for key, i in after["cases"].items()} == {
        "big": "DefB", "True": "DefC", "otherwise": "DefD"}
    assert nodes[after["join"]]["step"] == "DefE"


def test_unpacked_divert_with_chained_branch_and_converge():
    class DefDivertUnpacked(ductwork.Pipeline):
        @staticmethod
        def define(p):
            yes, other = p.start(DefA).divert(to={"yes": DefB, "otherwise": DefC})
            other.chain(to=DefD)
            yes.converge(other, into=DefE)

    nodes = DefDivertUnpacked.definition.nodes
    after = nodes[0]["after"]
    assert after["kind"] == "divert"
    assert nodes[after["cases"]["otherwise"]]["after"] == {"kind": "chain", "next": index_of(DefDivertUnpacked, "DefD")}
    assert nodes[after["cases"]["yes"]]["after"] == {"kind": "end"}
    assert nodes[after["join"]]["step"] == "DefE"


def test_divert_group_is_indexable_by_key():
    class DefDivertIndex(ductwork.Pipeline):
        @staticmethod
        def define(p):
            group = p.start(DefA).divert(to={"yes": DefB, "otherwise": DefC})
            group["otherwise"].chain(to=DefD)
            group.converge(into=DefE)

    nodes = DefDivertIndex.definition.nodes
    other = nodes[0]["after"]["cases"]["otherwise"]
    assert nodes[other]["step"] == "DefC"
    assert nodes[other]["after"] == {"kind": "chain", "next": index_of(DefDivertIndex, "DefD")}


def test_expand_collapse():
    class DefExpandCollapse(ductwork.Pipeline):
        @staticmethod
        def define(p):
            p.start(DefA).expand(to=DefB).collapse(into=def_report)

    nodes = DefExpandCollapse.definition.nodes
    assert nodes[0]["after"] == {"kind": "expand", "child": 1, "join": 2}
    assert nodes[1]["step"] == "DefB" and nodes[1]["after"] == {"kind": "end"}
    assert nodes[2]["step"] == "def_report" and nodes[2]["after"] == {"kind": "end"}


def test_expand_without_collapse_is_left_open():
    class DefOpenExpand(ductwork.Pipeline):
        @staticmethod
        def define(p):
            p.start(DefA).expand(to=DefB).chain(to=DefC)

    nodes = DefOpenExpand.definition.nodes
    assert nodes[0]["after"] == {"kind": "expand", "child": 1, "join": None}
    assert nodes[1]["after"] == {"kind": "chain", "next": 2}


def test_expand_expand_collapse_collapse():
    class DefNestedExpand(ductwork.Pipeline):
        @staticmethod
        def define(p):
            p.start(DefA).expand(to=DefB).expand(to=DefC).collapse(into=DefD).collapse(into=DefE)

    nodes = DefNestedExpand.definition.nodes
    a, b, c, d, e = (index_of(DefNestedExpand, n) for n in ("DefA", "DefB", "DefC", "DefD", "DefE"))
    assert a == 0
    # the inner collapse joins the inner expand (on B's branch), the outer one joins A's
    assert nodes[a]["after"] == {"kind": "expand", "child": b, "join": e}
    assert nodes[b]["after"] == {"kind": "expand", "child": c, "join": d}
    assert nodes[c]["after"] == {"kind": "end"}
    assert nodes[d]["after"] == {"kind": "end"}
    assert nodes[e]["after"] == {"kind": "end"}


def test_divide_combine_inside_an_expand():
    class DefDivideInExpand(ductwork.Pipeline):
        @staticmethod
        def define(p):
            (p.start(DefA).expand(to=DefB)
             .divide(to=[DefC, DefD]).combine(into=DefE)
             .collapse(into=DefF))

    nodes = DefDivideInExpand.definition.nodes
    a, b, c, d, e, f = (index_of(DefDivideInExpand, n) for n in ("DefA", "DefB", "DefC", "DefD", "DefE", "DefF"))
    assert nodes[a]["after"] == {"kind": "expand", "child": b, "join": f}
    assert nodes[b]["after"] == {"kind": "divide", "children": [c, d], "join": e}
    assert nodes[e]["after"] == {"kind": "end"}   # E ends the expanded branch; F collapses them
    assert nodes[f]["after"] == {"kind": "end"}


def test_expand_inside_a_divided_branch():
    class DefExpandInBranch(ductwork.Pipeline):
        @staticmethod
        def define(p):
            a, b = p.start(DefA).divide(to=[DefB, DefC])
            a.expand(to=DefD).collapse(into=DefE)
            a.combine(b, into=DefF)

    nodes = DefExpandInBranch.definition.nodes
    a, b, c, d, e, f = (index_of(DefExpandInBranch, n) for n in ("DefA", "DefB", "DefC", "DefD", "DefE", "DefF"))
    assert nodes[a]["after"] == {"kind": "divide", "children": [b, c], "join": f}
    assert nodes[b]["after"] == {"kind": "expand", "child": d, "join": e}
    assert nodes[d]["after"] == {"kind": "end"}
    assert nodes[e]["after"] == {"kind": "end"}
    assert nodes[c]["after"] == {"kind": "end"}


def test_nested_divide_inside_a_divided_branch():
    class DefNestedDivide(ductwork.Pipeline):
        @staticmethod
        def define(p):
            a, b = p.start(DefA).divide(to=[DefB, DefC])
            x, y = a.divide(to=[DefD, DefE])
            x.combine(y, into=DefF).combine(b, into=def_report)

    nodes = DefNestedDivide.definition.nodes
    a, b, c, d, e, f, r = (index_of(DefNestedDivide, n)
                           for n in ("DefA", "DefB", "DefC", "DefD", "DefE", "DefF", "def_report"))
    assert nodes[a]["after"] == {"kind": "divide", "children": [b, c], "join": r}
    assert nodes[b]["after"] == {"kind": "divide", "children": [d, e], "join": f}


def test_on_halt_handlers_are_recorded():
    def handler(run, reasons):
        pass

    class DefOnHalt(ductwork.Pipeline):
        @staticmethod
        def define(p):
            p.start(DefA)
            p.on_halt(handler)

    assert DefOnHalt.halt_handlers == [handler]


def test_on_halt_needs_a_callable():
    with raises_definition_error("DefOnHaltBad", "on_halt"):
        class DefOnHaltBad(ductwork.Pipeline):
            @staticmethod
            def define(p):
                p.start(DefA)
                p.on_halt("not callable")


def test_definition_is_json_and_hash_is_stable():
    class DefHashed(ductwork.Pipeline):
        @staticmethod
        def define(p):
            p.start(DefA).expand(to=DefB).collapse(into=DefC)

    body = DefHashed.definition.body
    again = ductwork.Definition.from_body(body)
    assert again.nodes == DefHashed.definition.nodes
    assert again.hash == DefHashed.definition.hash


# -- validate() ----------------------------------------------------------------------------


def test_validate_returns_the_registered_names():
    class DefValidateOne(ductwork.Pipeline):
        @staticmethod
        def define(p):
            p.start(DefA)

    class DefValidateTwo(ductwork.Pipeline):
        @staticmethod
        def define(p):
            p.start(DefA).chain(to=def_report)

    names = ductwork.validate()
    assert {"DefValidateOne", "DefValidateTwo"} <= set(names)
    assert names == sorted(names)
    assert set(names) == set(ductwork.registered_pipelines())


def test_validate_reports_a_pipeline_whose_step_went_missing(monkeypatch):
    class DefValidateBroken(ductwork.Pipeline):
        @staticmethod
        def define(p):
            p.start(DefA).chain(to=DefB)

    monkeypatch.setattr(DefValidateBroken, "steps", {"DefA": DefA})
    with pytest.raises(ductwork.DefinitionError) as info:
        ductwork.validate()
    assert "DefValidateBroken" in str(info.value)
    assert "DefB" in str(info.value)


def test_records_compare_hash_and_show_as_dataclasses_would():
    """record(): the module's dataclasses share one __repr__, __eq__ and __hash__ (made once, not per class)."""
    retry = ductwork.Retry(max=3, delay=1.5)
    assert retry == ductwork.Retry(max=3, delay=1.5) and retry != ductwork.Retry(max=4, delay=1.5)
    assert hash(retry) == hash(ductwork.Retry(max=3, delay=1.5)) and len({retry, ductwork.Retry(max=3, delay=1.5)}) == 1
    assert repr(retry).startswith("Retry(max=3, delay=1.5, backoff=")
    assert (retry == "Retry") is False and retry.__eq__("Retry") is NotImplemented
    with pytest.raises(dataclasses.FrozenInstanceError):
        retry.max = 4
    health = ductwork.Health(0, "healthy")          # mutable: equal by fields, unhashable
    assert health == ductwork.Health(0, "healthy", []) and health != ductwork.Health(1, "healthy")
    assert type(health).__hash__ is None and repr(health) == "Health(code=0, line='healthy', processes=[])"
    every = ductwork.Schedule(every=60)             # its own __eq__ and __hash__ stay
    assert every == ductwork.Schedule(every=60) and hash(every) == hash(ductwork.Schedule(every=60))
    assert dataclasses.replace(retry, max=5).max == 5 and dataclasses.asdict(health)["line"] == "healthy"

"""What the ONNX fold must never fold (issue #2): the BN stays, the report gives the reason
code, and the returned model is still valid and computes what the original computes."""

from __future__ import annotations

from typing import Dict, Optional, Union

import numpy as np
import onnx
import pytest
from onnx import helper

from bnfold.onnx_pass import fold_onnx
from onnx_models import (
    GraphBuilder,
    assert_equivalent,
    bn_stats,
    check_valid,
    count_op,
    find_node,
    node_names,
    ort_session,
    tensor_value,
)


def refuse_and_check(
    model: onnx.ModelProto,
    bn: str,
    reasons: Union[str, set],
    runner: Optional[str] = "ort",
    feeds: Optional[Dict[str, np.ndarray]] = None,
    valid: bool = True,
):
    """Fold ``model``; assert ``bn`` is skipped with one of ``reasons``, is still in the graph,
    and (unless ``runner`` is None) the result is equivalent to the original."""
    reasons = {reasons} if isinstance(reasons, str) else set(reasons)
    before = model.SerializeToString()
    out, report = fold_onnx(model)
    assert model.SerializeToString() == before, "fold_onnx mutated its input"
    skipped = {s.bn: s for s in report.skipped}
    assert bn not in {f.bn for f in report.folded}, f"{bn} was folded"
    assert bn in skipped, f"{bn} not reported: {report.to_dict()}"
    assert skipped[bn].reason in reasons, f"{bn}: reason {skipped[bn].reason!r} ({skipped[bn].detail}), want {reasons}"
    assert skipped[bn].detail, "a refusal needs a human-readable detail"
    assert bn in node_names(out)
    if valid:
        check_valid(out)
    if runner is not None:
        assert_equivalent(model, out, runner=runner, feeds=feeds)
    return out, report


def conv_bn(seed: int = 0, c_in: int = 3, c_out: int = 4, w_kind: str = "init", bn_kind: str = "init", **bn_kw):
    """x -> Conv -> BN -> y, returned as the builder (callers add more before ``model()``)."""
    g = GraphBuilder(seed=seed)
    x = g.input("x", ["N", c_in, 5, 5])
    y = g.conv(x, "conv", c_in, c_out, (3, 3), kind=w_kind)
    return g, g.bn(y, "bn", c_out, kind=bn_kind, **bn_kw)


# -- the producer's output is used elsewhere --------------------------------------------------


def test_producer_output_with_another_consumer():
    g, y = conv_bn()
    g.output(y)
    g.output(g.node("Relu", ["conv_out"], "r", "relu").output[0])
    refuse_and_check(g.model(), "bn", "producer-has-other-consumers")


def test_producer_output_read_twice_by_the_same_other_node():
    g, y = conv_bn(seed=1)
    g.output(g.node("Add", [y, "conv_out"], "s", "add").output[0])
    refuse_and_check(g.model(), "bn", "producer-has-other-consumers")


def test_producer_output_is_graph_output():
    g, y = conv_bn(seed=2)
    g.output(y)
    g.output("conv_out")
    refuse_and_check(g.model(), "bn", "producer-output-is-graph-output")


def test_subgraph_reading_producer_output_from_outer_scope_is_another_consumer():
    g, y = conv_bn(seed=3)
    g.input("cond", [], dtype=np.bool_)
    then_g = helper.make_graph(
        [helper.make_node("Relu", ["conv_out"], ["t"], name="then_relu")],
        "then",
        [],
        [helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, ["N", 4, 3, 3])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Neg", ["conv_out"], ["e"], name="else_neg")],
        "else",
        [],
        [helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, ["N", 4, 3, 3])],
    )
    g.node("If", ["cond"], ["branch_out"], "if", then_branch=then_g, else_branch=else_g)
    g.output(y)
    g.output("branch_out", shape=["N", 4, 3, 3])
    model = g.model()
    for cond in (True, False):
        refuse_and_check(model, "bn", "producer-has-other-consumers", feeds={"cond": np.array(cond)})


def test_matmul_output_used_elsewhere_before_add_bn():
    g = GraphBuilder(seed=4)
    x = g.input("x", ["N", 4])
    g.node("MatMul", [x, g.init("W", g.weight((4, 3)))], "mm", "matmul")
    g.node("Add", ["mm", g.init("bias", g.weight((3,)))], "a", "add")
    g.output(g.bn("a", "bn", 3))
    g.output("mm")
    refuse_and_check(g.model(), "bn", {"producer-has-other-consumers", "producer-output-is-graph-output"})


# -- parameters that are not constants --------------------------------------------------------


@pytest.mark.parametrize("what", ["weight", "bias"])
def test_conv_parameter_is_graph_input(what):
    g = GraphBuilder(seed=5)
    x = g.input("x", ["N", 3, 5, 5])
    w = g.param("W", g.weight((4, 3, 3, 3)), "input" if what == "weight" else "init")
    b = g.param("B", g.weight((4,)), "input" if what == "bias" else "init")
    g.node("Conv", [x, w, b], "c", "conv")
    g.output(g.bn("c", "bn", 4))
    refuse_and_check(g.model(), "bn", "not-constant")


@pytest.mark.parametrize("which", ["scale", "B", "mean", "var"])
def test_bn_parameter_is_graph_input(which):
    g = GraphBuilder(seed=6)
    x = g.input("x", ["N", 3, 5, 5])
    y = g.conv(x, "conv", 3, 4, (3, 3))
    stats = bn_stats(g.rng, 4)
    ins = [y] + [g.param(f"bn_{k}", stats[k], "input" if k == which else "init") for k in ("scale", "B", "mean", "var")]
    g.node("BatchNormalization", ins, "y", "bn")
    g.output("y")
    model = g.model()
    # the graph input must be fed: use the BN's own statistics, then other values
    for scale in (1.0, 1.7):
        refuse_and_check(model, "bn", "not-constant", feeds={f"bn_{which}": np.abs(stats[which] * scale)})


def _also_graph_input(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    t = next(t for t in model.graph.initializer if t.name == name)
    model.graph.input.append(helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("name", ["conv_W", "conv_B", "bn_scale", "bn_var"])
def test_initializer_that_is_also_a_graph_input(name):
    g, y = conv_bn(seed=7)
    g.output(y)
    model = _also_graph_input(g.model(), name)
    assert model.ir_version >= 4
    refuse_and_check(model, "bn", "overridable-initializer")
    # the caller overrides it: the result must follow the override too
    out, _ = fold_onnx(model)
    override = np.abs(tensor_value(model, name)) * np.float32(1.5)
    assert_equivalent(model, out, feeds={name: override})


# -- training mode ------------------------------------------------------------------------------


def test_training_mode_1():
    g, y = conv_bn(seed=8, outputs=["y", "running_mean", "running_var"], training_mode=1)
    g.output(y)
    refuse_and_check(g.model(opset=15), "bn", "training-mode")


def test_training_mode_1_without_optional_outputs():
    """Not run: onnxruntime 1.32 crashes (segfault) on training_mode=1 with one output."""
    g, y = conv_bn(seed=9, training_mode=1)
    g.output(y)
    refuse_and_check(g.model(opset=15, check=False), "bn", "training-mode", runner=None, valid=False)


def test_bn9_with_optional_training_outputs():
    g, y = conv_bn(seed=10, outputs=["y", "mean_out", "var_out", "saved_mean", "saved_var"])
    g.output(y)
    g.output("mean_out", shape=[4])
    refuse_and_check(g.model(opset=9), "bn", "training-mode")


@pytest.mark.parametrize("attrs", [{}, {"is_test": 0}])
def test_bn6_without_is_test_is_training_mode(attrs):
    """BatchNormalization-6 defaults to is_test=0, i.e. batch statistics (ONNX operator spec).

    Not run: onnxruntime has no BN-6 kernel, and onnx 1.23's reference evaluator fails on BN-6
    in training mode (it returns a tuple), so only the report is checked.
    """
    g, y = conv_bn(seed=11, **attrs)
    g.output(y)
    refuse_and_check(g.model(opset=6), "bn", "training-mode", runner=None)



def test_bn7_spatial_0_is_refused_or_exact():
    """spatial=0 normalizes per activation ([C, H, W] statistics): never per channel."""
    g = GraphBuilder(seed=12)
    x = g.input("x", [2, 3, 4, 4])
    g.conv(x, "conv", 3, 2, (1, 1))
    rng = np.random.default_rng(0)
    ins = ["conv_out"] + [
        g.init(f"bn_{k}", (rng.uniform(0.5, 2.0, (2, 4, 4)) if k in ("scale", "var") else rng.normal(size=(2, 4, 4))).astype(np.float32))
        for k in ("scale", "B", "mean", "var")
    ]
    g.node("BatchNormalization", ins, "y", "bn", spatial=0)
    g.output("y", shape=[2, 2, 4, 4])
    model = g.model(opset=7)
    try:
        ort_session(model)
        runner = "ort"
    except Exception:
        runner = "reference"
    refuse_and_check(model, "bn", {"not-per-channel", "unsupported-attribute"}, runner=runner)


# -- not per channel ----------------------------------------------------------------------------


@pytest.mark.parametrize("length,n", [(5, 5), (4, 5)], ids=["L==N", "L!=N"])
def test_matmul_on_3d_input(length, n):
    """BN on [B, L, N] normalizes L; the MatMul's features are N. L == N is the dangerous case."""
    g = GraphBuilder(seed=13)
    x = g.input("x", ["B", length, 6])
    g.node("MatMul", [x, g.init("W", g.weight((6, n)))], "mm", "matmul")
    g.output(g.bn("mm", "bn", length))
    refuse_and_check(g.model(), "bn", {"not-per-channel", "channel-mismatch"})


def test_matmul_add_on_3d_input():
    g = GraphBuilder(seed=14)
    x = g.input("x", ["B", 5, 6])
    g.node("MatMul", [x, g.init("W", g.weight((6, 5)))], "mm", "matmul")
    g.node("Add", ["mm", g.init("bias", g.weight((5,)))], "a", "add")
    g.output(g.bn("a", "bn", 5))
    refuse_and_check(g.model(), "bn", {"not-per-channel", "channel-mismatch"})


def test_matmul_on_input_of_unknown_rank():
    g = GraphBuilder(seed=15)
    g.inputs.append(helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None))
    g.node("MatMul", ["x", g.init("W", g.weight((6, 3)))], "mm", "matmul")
    g.output(g.bn("mm", "bn", 3), shape=["B", 3])
    model = g.model(check=False)  # the full checker wants every input shaped
    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    refuse_and_check(model, "bn", {"shape-unknown", "not-per-channel"}, feeds={"x": x}, valid=False)


def test_matmul_add_bias_of_higher_rank():
    """An Add of a [1, 1, N] constant makes the output 3-D: the BN's channels change axis."""
    g = GraphBuilder(seed=16)
    x = g.input("x", [3, 6])
    g.node("MatMul", [x, g.init("W", g.weight((6, 3)))], "mm", "matmul")
    g.node("Add", ["mm", g.init("bias", g.weight((1, 1, 3)))], "a", "add")
    g.output(g.bn("a", "bn", 3))
    refuse_and_check(g.model(), "bn", {"not-per-channel", "no-linear-producer", "channel-mismatch"})


def test_conv_bn_channel_count_mismatch():
    """An invalid model (onnxruntime would reject it): the fold must refuse, not crash."""
    g = GraphBuilder(seed=17)
    x = g.input("x", [1, 3, 5, 5])
    y = g.conv(x, "conv", 3, 4, (3, 3))
    g.output(g.bn(y, "bn", 3), shape=[1, 4, 3, 3])
    refuse_and_check(g.model(check=False), "bn", {"channel-mismatch", "not-per-channel"}, runner=None, valid=False)


# -- no linear producer -------------------------------------------------------------------------


def test_bn_after_relu():
    g = GraphBuilder(seed=18)
    x = g.input("x", ["N", 3, 5, 5])
    y = g.conv(x, "conv", 3, 4, (3, 3))
    g.node("Relu", [y], "r", "relu")
    g.output(g.bn("r", "bn", 4))
    _, report = refuse_and_check(g.model(), "bn", "no-linear-producer")
    assert report.skipped[0].producer in (None, "relu")


def test_bn_on_graph_input():
    g = GraphBuilder(seed=19)
    x = g.input("x", ["N", 3, 5, 5])
    g.output(g.bn(x, "bn", 3))
    refuse_and_check(g.model(), "bn", "no-linear-producer")


def test_bn_after_conv_in_custom_domain():
    g = GraphBuilder(seed=20)
    x = g.input("x", [1, 3, 5, 5])
    g.nodes.append(helper.make_node("Conv", [x, g.init("W", g.weight((4, 3, 3, 3)))], ["c"], name="conv", domain="my.domain"))
    g.output(g.bn("c", "bn", 4), shape=[1, 4, 3, 3])
    model = g.model(check=False, extra_opsets=[helper.make_opsetid("my.domain", 1)])
    refuse_and_check(model, "bn", "no-linear-producer", runner=None, valid=False)


# -- bad parameters ---------------------------------------------------------------------------


@pytest.mark.parametrize("var,eps", [(-1.0, 1e-5), (0.0, 0.0), (-1e-3, 1e-4)])
def test_non_positive_variance(var, eps):
    g = GraphBuilder(seed=21)
    stats = bn_stats(g.rng, 4)
    stats["var"][2] = var
    x = g.input("x", ["N", 3, 5, 5])
    y = g.conv(x, "conv", 3, 4, (3, 3))
    g.output(g.bn(y, "bn", 4, stats=stats, epsilon=eps))
    refuse_and_check(g.model(), "bn", "non-positive-variance")


@pytest.mark.parametrize("which", ["scale", "B", "mean", "var"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_bn_parameter(which, bad):
    g = GraphBuilder(seed=22)
    stats = bn_stats(g.rng, 4)
    stats[which][1] = bad
    x = g.input("x", ["N", 3, 5, 5])
    y = g.conv(x, "conv", 3, 4, (3, 3))
    g.output(g.bn(y, "bn", 4, stats=stats))
    refuse_and_check(g.model(), "bn", "non-finite-parameter")


def test_non_finite_conv_weight():
    g = GraphBuilder(seed=23)
    x = g.input("x", ["N", 3, 5, 5])
    w = g.weight((4, 3, 3, 3))
    w[1, 0, 0, 0] = np.inf
    g.node("Conv", [x, g.init("W", w)], "c", "conv")
    g.output(g.bn("c", "bn", 4))
    refuse_and_check(g.model(), "bn", {"non-finite-parameter", "non-finite-result"})


def test_float16_fold_that_would_overflow():
    """|W * a| beyond 65504: the original computes finite values, a fold would write inf."""
    g = GraphBuilder(seed=24, dtype=np.float16)
    x = g.input("x", [1, 2, 4, 4])
    w = np.full((2, 2, 1, 1), 700.0, np.float16)
    g.node("Conv", [x, g.init("W", w)], "c", "conv")
    stats = {
        "scale": np.array([1.0, 1.0], np.float16),
        "B": np.zeros(2, np.float16),
        "mean": np.zeros(2, np.float16),
        "var": np.array([1e-4, 1.0], np.float16),  # a = 100 on channel 0: 700 * 100 > 65504
    }
    g.output(g.bn("c", "bn", 2, stats=stats, epsilon=0.0))
    model = g.model()
    small = {"x": np.random.default_rng(0).uniform(-1e-3, 1e-3, (1, 2, 4, 4)).astype(np.float16)}
    refuse_and_check(model, "bn", "overflow", feeds=small)


def test_float16_bias_that_would_overflow():
    g = GraphBuilder(seed=25, dtype=np.float16)
    x = g.input("x", [1, 2, 4, 4])
    g.node("Conv", [x, g.init("W", np.full((2, 2, 1, 1), 1e-3, np.float16))], "c", "conv")
    stats = {
        "scale": np.array([1.0, 1.0], np.float16),
        "B": np.zeros(2, np.float16),
        "mean": np.array([60000.0, 0.0], np.float16),
        "var": np.array([0.25, 1.0], np.float16),  # b = -mean * 2 = -120000 on channel 0
    }
    g.output(g.bn("c", "bn", 2, stats=stats, epsilon=0.0))
    refuse_and_check(g.model(), "bn", "overflow", runner="ort")


# -- one refusal does not stop the others -------------------------------------------------------


def test_refusal_leaves_other_bns_folded():
    g = GraphBuilder(seed=26)
    x = g.input("x", ["N", 3, 6, 6])
    h = g.bn(g.conv(x, "c1", 3, 4, (3, 3), pads=[1, 1, 1, 1]), "bn1", 4)
    h = g.node("Relu", [h], "r1", "relu1").output[0]
    h = g.bn(h, "bn_after_relu", 4)
    h = g.node("Relu", [h], "r2", "relu2").output[0]  # no linear op on either side of the BN
    c2 = g.conv(h, "c2", 4, 4, (1, 1))
    h = g.bn(c2, "bn2", 4)
    g.output(h)
    g.output(c2)  # c2's output is a graph output: bn2 must stay
    model = g.model()
    out, report = fold_onnx(model)
    assert [f.bn for f in report.folded] == ["bn1"]
    assert {s.bn: s.reason for s in report.skipped} == {
        "bn_after_relu": "no-linear-producer",
        "bn2": "producer-output-is-graph-output",
    }
    assert count_op(out, "BatchNormalization") == 2
    check_valid(out)
    assert_equivalent(model, out)
    d = report.to_dict()
    assert d["folded_count"] == 1 and d["skipped_count"] == 2
    # a refused conv keeps its own weights
    np.testing.assert_array_equal(tensor_value(out, find_node(out.graph, "c2").input[1]), tensor_value(model, "c2_W"))


def test_consumer_two_subgraph_levels_down():
    """An If inside an If branch reads the conv's output from two scopes up."""
    g, y = conv_bn(seed=27)
    g.input("cond", [], dtype=np.bool_)
    vi = lambda name: helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["N", 4, 3, 3])  # noqa: E731
    inner_then = helper.make_graph([helper.make_node("Relu", ["conv_out"], ["t2"], name="deep_relu")], "it", [], [vi("t2")])
    inner_else = helper.make_graph([helper.make_node("Neg", ["conv_out"], ["e2"], name="deep_neg")], "ie", [], [vi("e2")])
    inner_if = helper.make_node("If", ["cond"], ["t"], name="inner_if", then_branch=inner_then, else_branch=inner_else)
    outer_then = helper.make_graph([inner_if], "ot", [], [vi("t")])
    outer_else = helper.make_graph([helper.make_node("Abs", ["x"], ["e"], name="outer_abs")], "oe", [],
                                   [helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, ["N", 3, 5, 5])])  # fmt: skip
    g.node("If", ["cond"], ["branch_out"], "outer_if", then_branch=outer_then, else_branch=outer_else)
    g.output(y)
    g.output("branch_out", shape=None)
    model = g.model(check=False)  # the two branches differ in shape: fine for ORT, not for the checker
    refuse_and_check(model, "bn", "producer-has-other-consumers", feeds={"cond": np.array(True)}, valid=False)

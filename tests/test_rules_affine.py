"""Rule: Conv/ConvTranspose/Gemm/MatMul -> Mul/Add/Sub/Div by per-channel constants (issue #5)."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_models import GraphBuilder, count_op, op_types
from rules_helpers import fold_ok, refuse_ok


def conv_model(chain, c=4, seed=0, kernel=(3, 3), op="Conv", bias=True):
    """x -> Conv -> each (op, constant, constant-first) of ``chain`` -> y."""
    g = GraphBuilder(seed=seed)
    x = g.input("x", ["N", 3, 6, 6])
    h = g.conv(x, "conv", 3, c, kernel, op=op, bias=bias)
    for i, (op_type, value, first) in enumerate(chain):
        k = g.init(f"k{i}", np.asarray(value, np.float32))
        h = g.node(op_type, [k, h] if first else [h, k], f"a{i}", f"op{i}").output[0]
    g.output(h)
    return g.model()


def per_c(rng, shape, positive=False):
    v = rng.uniform(0.5, 1.5, shape) if positive else rng.normal(0, 1, shape)
    return v.astype(np.float32)


RNG = np.random.default_rng(0)
CHANNEL_SHAPES = {"C11": (4, 1, 1), "1C11": (1, 4, 1, 1), "scalar": (), "one": (1,), "111": (1, 1, 1)}


@pytest.mark.parametrize("shape", list(CHANNEL_SHAPES))
@pytest.mark.parametrize("op", ["Mul", "Add", "Sub", "Div"])
def test_conv_then_one_affine_op(op, shape):
    value = per_c(RNG, CHANNEL_SHAPES[shape], positive=True)
    out, _ = fold_ok(conv_model([(op, value, False)]), {"op0": "conv-affine"})
    assert op_types(out.graph) == ["Conv"]


@pytest.mark.parametrize("op", ["Mul", "Add", "Sub"])
def test_constant_as_first_operand(op):
    out, _ = fold_ok(conv_model([(op, per_c(RNG, (4, 1, 1)), True)]), {"op0": "conv-affine"})
    assert op_types(out.graph) == ["Conv"]


def test_tensorflow_style_bn_as_mul_add_chain():
    chain = [("Mul", per_c(RNG, (1, 4, 1, 1)), False), ("Add", per_c(RNG, (4, 1, 1)), False),
             ("Sub", per_c(RNG, ()), False), ("Div", per_c(RNG, (4, 1, 1), True), False),
             ("Mul", per_c(RNG, (4, 1, 1)), True)]
    out, report = fold_ok(conv_model(chain, bias=False), {"op0": "conv-affine"}, gone=["op1", "op2", "op3", "op4"])
    assert op_types(out.graph) == ["Conv"]
    assert [e["node"] for e in report.extra["affine_folded"]] == ["op0"]  # one run, named by its first node
    assert report.n_folded == 0  # report.folded lists BatchNormalizations only


def test_folded_constants_leave_the_model():
    """The constants of a folded Mul/Add chain have no reader left, so they must go."""
    chain = [("Mul", per_c(RNG, (4, 1, 1)), False), ("Add", per_c(RNG, (1, 4, 1, 1)), False)]
    out, _ = fold_ok(conv_model(chain), {"op0": "conv-affine"})
    names = {t.name for t in out.graph.initializer}
    assert not names & {"k0", "k1"}, names


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
def test_bn_between_affine_ops(op):
    g = GraphBuilder(seed=1)
    x = g.input("x", ["N", 4, 5, 5])
    h = g.conv(x, "conv", 4, 6, (3, 3), op=op, group=2)
    h = g.node("Mul", [h, g.init("m", per_c(RNG, (6, 1, 1)))], "m_out", "mul").output[0]
    h = g.bn(h, "bn", 6)
    h = g.node("Add", [h, g.init("a", per_c(RNG, (1, 6, 1, 1)))], "a_out", "add").output[0]
    g.output(h)
    kind = op.lower()
    out, _ = fold_ok(g.model(), {"mul": f"{kind}-affine", "bn": f"{kind}-bn", "add": f"{kind}-affine"})
    assert op_types(out.graph) == [op]


def test_one_d_constant_on_conv_output_is_not_per_channel():
    """[C] broadcasts on the LAST axis of a 4-D conv output (here W == C == 4)."""
    g = GraphBuilder(seed=2)
    x = g.input("x", ["N", 3, 6, 6])
    h = g.conv(x, "conv", 3, 4, (3, 3))  # output [N, 4, 4, 4]
    g.output(g.node("Mul", [h, g.init("k", per_c(RNG, (4,)))], "y", "mul").output[0])
    refuse_ok(g.model(), "mul", "not-per-channel")


@pytest.mark.parametrize("shape", [(1, 4, 4, 1), (4, 4, 1), (1, 1, 4, 1, 1)])
def test_other_non_channel_shapes_refused(shape):
    g = GraphBuilder(seed=3)
    x = g.input("x", ["N", 3, 6, 6])
    h = g.conv(x, "conv", 3, 4, (3, 3))
    g.output(g.node("Add", [h, g.init("k", per_c(RNG, shape))], "y", "add").output[0])
    refuse_ok(g.model(), "add", {"not-per-channel", "shape-unknown"})


def test_div_by_constant_with_zero_refused():
    value = per_c(RNG, (4, 1, 1), positive=True)
    value[2] = 0.0
    refuse_ok(conv_model([("Div", value, False)]), "op0", "division-by-zero")


def test_constant_divided_by_data_refused():
    refuse_ok(conv_model([("Div", per_c(RNG, (4, 1, 1), True), True)]), "op0", "not-affine",
              feeds={"x": np.abs(RNG.normal(size=(2, 3, 6, 6))).astype(np.float32) + 1})


def test_chain_stops_at_first_refused_op_and_folds_the_rest():
    bad = per_c(RNG, (4,))
    out, report = fold_ok(conv_model([("Mul", per_c(RNG, (4, 1, 1)), False), ("Add", bad, False)]), {"op0": "conv-affine"})
    assert op_types(out.graph) == ["Conv", "Add"]
    assert [e["node"] for e in report.extra["affine_skipped"]] == ["op1"]


def test_non_constant_operand_is_not_touched():
    g = GraphBuilder(seed=4)
    x = g.input("x", ["N", 3, 6, 6])
    s = g.input("s", [1, 4, 1, 1])
    h = g.conv(x, "conv", 3, 4, (3, 3))
    g.output(g.node("Mul", [h, s], "y", "mul").output[0])
    out, report = refuse_ok(g.model(), "mul", None)
    assert not report.skipped and not report.folded and not report.extra


def test_conv_output_with_two_readers_is_not_folded():
    g = GraphBuilder(seed=5)
    x = g.input("x", ["N", 3, 6, 6])
    h = g.conv(x, "conv", 3, 4, (3, 3))
    g.output(g.node("Mul", [h, g.init("k", per_c(RNG, (4, 1, 1)))], "y", "mul").output[0])
    g.output(g.node("Relu", [h], "r", "relu").output[0])
    refuse_ok(g.model(), "mul", None)


@pytest.mark.parametrize("shape", [(5,), (1, 5), ()])
def test_gemm_then_mul_add(shape):
    """A Keras Dense -> BN exported as Gemm -> Mul -> Add: [N] is per feature after a Gemm."""
    g = GraphBuilder(seed=6)
    x = g.input("x", ["N", 4])
    g.node("Gemm", [x, g.init("W", g.weight((5, 4))), g.init("C", g.weight((5,)))], "h", "gemm", transB=1, alpha=0.7)
    h = g.node("Mul", ["h", g.init("m", per_c(RNG, shape))], "m_out", "mul").output[0]
    g.output(g.node("Add", [h, g.init("a", per_c(RNG, shape))], "y", "add").output[0])
    out, _ = fold_ok(g.model(), {"mul": "gemm-affine"}, gone=["add"])
    assert op_types(out.graph) == ["Gemm"]


def test_matmul_then_mul_add_on_3d_input():
    """After MatMul the features are the last axis whatever the rank: [N] is per feature."""
    g = GraphBuilder(seed=7)
    x = g.input("x", ["B", 3, 4])
    g.node("MatMul", [x, g.init("W", g.weight((4, 5)))], "h", "matmul")
    h = g.node("Add", ["h", g.init("bias", per_c(RNG, (5,)))], "b_out", "bias_add").output[0]
    h = g.node("Mul", [h, g.init("m", per_c(RNG, (5,)))], "m_out", "mul").output[0]
    g.output(g.node("Add", [h, g.init("a", per_c(RNG, (1, 1, 5)))], "y", "add").output[0])
    out, report = fold_ok(g.model(), {"mul": "matmul-affine"}, gone=["bias_add", "add"])
    assert op_types(out.graph) == ["MatMul", "Add"]
    assert [e["node"] for e in report.extra["affine_folded"]] == ["mul"]  # the bias Add is the Linear's own


def test_matmul_bias_add_alone_on_a_2d_input_becomes_one_gemm():
    g = GraphBuilder(seed=8)
    x = g.input("x", ["B", 4])
    g.node("MatMul", [x, g.init("W", g.weight((4, 5)))], "h", "matmul")
    g.output(g.node("Add", ["h", g.init("bias", per_c(RNG, (1, 5)))], "y", "add").output[0])
    out, report = fold_ok(g.model(), {"add": "matmul-gemm"})
    assert op_types(out.graph) == ["Gemm"]
    assert [t.name for t in out.graph.initializer] == ["W", "matmul_bnfold_bias"]  # W itself is kept


@pytest.mark.parametrize("shape", [["B", 3, 4], None])
def test_matmul_bias_add_on_an_input_not_known_2d_is_left_as_is(shape):
    g = GraphBuilder(seed=8)
    x = g.input("x", shape or [2, 3, 4])
    feeds = None
    if shape is None:  # reshaped to a shape given at run time: the rank is unknown
        x = g.node("Reshape", [x, g.input("s", ["K"], np.int64)], "x2", "reshape").output[0]
        feeds = {"s": np.array([3, 2, 4], np.int64)}
    g.node("MatMul", [x, g.init("W", g.weight((4, 5)))], "h", "matmul")
    g.output(g.node("Add", ["h", g.init("bias", per_c(RNG, (5,)))], "y", "add").output[0], shape=["a", "b", "c"])
    model = g.model()
    out, report = refuse_ok(model, "add", None, feeds=feeds)
    assert out.SerializeToString() == model.SerializeToString()
    assert not report.folded and not report.skipped and not report.extra


def test_matmul_column_constant_is_not_per_feature():
    g = GraphBuilder(seed=9)
    x = g.input("x", [3, 4])
    g.node("MatMul", [x, g.init("W", g.weight((4, 5)))], "h", "matmul")
    g.output(g.node("Mul", ["h", g.init("m", per_c(RNG, (3, 1)))], "y", "mul").output[0])
    refuse_ok(g.model(), "mul", "not-per-channel")


@pytest.mark.parametrize("how", ["unsqueeze", "reshape", "cast", "constant-node"])
def test_constant_through_a_constant_subgraph(how):
    g = GraphBuilder(seed=10)
    x = g.input("x", ["N", 3, 6, 6])
    h = g.conv(x, "conv", 3, 4, (3, 3))
    v = per_c(RNG, (4,))
    if how == "unsqueeze":
        k = g.node("Unsqueeze", [g.init("v", v), g.init("axes", np.array([1, 2], np.int64))], "k", "unsq").output[0]
    elif how == "reshape":
        k = g.node("Reshape", [g.init("v", v), g.init("shape", np.array([1, 4, 1, 1], np.int64))], "k", "resh").output[0]
    elif how == "cast":
        k = g.node("Cast", [g.init("v", v.astype(np.float64).reshape(4, 1, 1))], "k", "cast", to=1).output[0]
    else:
        k = g.const("k", v.reshape(4, 1, 1))
    g.output(g.node("Mul", [h, k], "y", "mul").output[0])
    out, _ = fold_ok(g.model(), {"mul": "conv-affine"}, gone=["unsq", "resh", "cast"])
    assert count_op(out, "Unsqueeze") + count_op(out, "Reshape") + count_op(out, "Cast") == 0


def test_float16_affine_overflow_refused():
    g = GraphBuilder(seed=11, dtype=np.float16)
    x = g.input("x", [1, 2, 4, 4])
    g.node("Conv", [x, g.init("W", np.full((2, 2, 1, 1), 700.0, np.float16))], "c", "conv")
    g.output(g.node("Mul", ["c", g.init("k", np.array([200.0, 1.0], np.float16).reshape(2, 1, 1))], "y", "mul").output[0])
    small = {"x": np.random.default_rng(0).uniform(-1e-3, 1e-3, (1, 2, 4, 4)).astype(np.float16)}
    refuse_ok(g.model(), "mul", "overflow", feeds=small)


def test_affine_chain_inside_subgraph():
    c = 3
    g = GraphBuilder(seed=12)
    x = g.input("x", [1, c, 4, 4])
    g.input("cond", [], dtype=np.bool_)
    w = g.init("W_outer", g.weight((c, c, 1, 1)))
    branch = GraphBuilder(name="then", seed=13)
    branch.node("Conv", [x, w], "bc", "b_conv")
    branch.node("Mul", ["bc", branch.init("bm", per_c(RNG, (c, 1, 1)))], "bm_out", "b_mul")
    branch.output("bm_out", shape=[1, c, 4, 4])
    other = GraphBuilder(name="else", seed=14)
    other.node("Identity", [x], "e", "e_id")
    other.output("e", shape=[1, c, 4, 4])
    g.node("If", ["cond"], ["y"], "if", then_branch=branch.graph(), else_branch=other.graph())
    g.output("y", shape=[1, c, 4, 4])
    for cond in (True, False):
        fold_ok(g.model(), {"b_mul": "conv-affine"}, feeds={"cond": np.array(cond)})

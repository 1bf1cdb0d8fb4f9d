"""Rule: BN before a linear op -- unpadded Conv (grouped, depthwise), Gemm, 2-D MatMul, and
BN2d -> Flatten -> Gemm/MatMul (issue #5)."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_models import GraphBuilder, count_op, op_types
from rules_helpers import fold_ok, refuse_ok


def bn_conv(c_in=4, c_out=6, kernel=(3, 3), group=1, bias=True, seed=0, **conv_attrs):
    g = GraphBuilder(seed=seed)
    x = g.input("x", ["N", c_in, 7, 7])
    h = g.node("Relu", [x], "r", "relu").output[0]  # no linear op before the BN
    h = g.bn(h, "bn", c_in)
    g.output(g.conv(h, "conv", c_in, c_out, kernel, group=group, bias=bias, **conv_attrs))
    return g.model()


CASES = {
    "plain": {},
    "nobias": {"bias": False},
    "grouped": {"group": 2},
    "depthwise": {"group": 4, "c_out": 4},
    "depthwise-multiplier": {"group": 4, "c_out": 8},
    "strided-dilated": {"strides": [2, 1], "dilations": [1, 2]},
    "valid": {"auto_pad": "VALID"},
    "explicit-zero-pads": {"pads": [0, 0, 0, 0]},
    "1x1-same": {"kernel": (1, 1), "auto_pad": "SAME_UPPER"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_bn_folds_into_following_unpadded_conv(case):
    out, _ = fold_ok(bn_conv(**CASES[case]), {"bn": "bn-conv"})
    assert op_types(out.graph) == ["Relu", "Conv"]


@pytest.mark.parametrize("attrs", [{"pads": [1, 1, 1, 1]}, {"pads": [0, 1, 0, 0]}, {"auto_pad": "SAME_UPPER"}])
def test_padded_conv_refused(attrs):
    refuse_ok(bn_conv(**attrs), "bn", "padded-conv")


def test_bn_feeding_two_convs_folds_into_both():
    g = GraphBuilder(seed=1)
    x = g.input("x", ["N", 4, 5, 5])
    h = g.bn(g.node("Relu", [x], "r", "relu").output[0], "bn", 4)
    g.output(g.conv(h, "c1", 4, 3, (1, 1)))
    g.output(g.conv(h, "c2", 4, 2, (3, 3), group=2))
    out, _ = fold_ok(g.model(), {"bn": "bn-conv"})
    assert count_op(out, "BatchNormalization") == 0


@pytest.mark.parametrize("other", ["padded-conv", "relu", "graph-output"])
def test_bn_with_a_reader_that_cannot_absorb_it_stays(other):
    g = GraphBuilder(seed=2)
    x = g.input("x", ["N", 4, 5, 5])
    h = g.bn(g.node("Relu", [x], "r", "relu").output[0], "bn", 4)
    g.output(g.conv(h, "c1", 4, 3, (1, 1)))
    if other == "padded-conv":
        g.output(g.conv(h, "c2", 4, 3, (3, 3), pads=[1, 1, 1, 1]))
    elif other == "relu":
        g.output(g.node("Relu", [h], "r2", "relu2").output[0])
    else:
        g.output(h)
    reasons = {"padded-conv": "padded-conv", "relu": "consumer-cannot-absorb", "graph-output": "bn-output-is-graph-output"}
    out, _ = refuse_ok(g.model(), "bn", reasons[other])
    # the conv that could have absorbed it keeps its weights
    assert [n for n in out.graph.node if n.name == "c1"][0].input[1] == "c1_W"


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (5,), (1, 5), ()])
def test_bn1d_before_gemm(trans_b, c_shape):
    g = GraphBuilder(seed=3)
    x = g.input("x", ["N", 4])
    h = g.bn(g.node("Relu", [x], "r", "relu").output[0], "bn", 4)
    ins = [h, g.init("W", g.weight((5, 4) if trans_b else (4, 5)))]
    if c_shape is not None:
        ins.append(g.init("C", g.weight(c_shape)))
    g.node("Gemm", ins, "y", "gemm", transB=trans_b, alpha=0.5, beta=1.5)
    g.output("y")
    out, _ = fold_ok(g.model(), {"bn": "bn-gemm"})
    assert op_types(out.graph) == ["Relu", "Gemm"]


def test_gemm_reading_bn_transposed_refused():
    g = GraphBuilder(seed=4)
    x = g.input("x", [4, 3])
    h = g.bn(g.node("Relu", [x], "r", "relu").output[0], "bn", 3)
    g.node("Gemm", [h, g.init("W", g.weight((4, 5)))], "y", "gemm", transA=1)
    g.output("y")
    refuse_ok(g.model(), "bn", "unsupported-attribute")


@pytest.mark.parametrize("bias", [False, True])
def test_bn1d_before_matmul(bias):
    g = GraphBuilder(seed=5)
    x = g.input("x", ["N", 4])
    h = g.bn(g.node("Relu", [x], "r", "relu").output[0], "bn", 4)
    h = g.node("MatMul", [h, g.init("W", g.weight((4, 5)))], "mm", "matmul").output[0]
    if bias:
        h = g.node("Add", [h, g.init("b", g.weight((5,)))], "y", "add").output[0]
    g.output(h)
    # with its bias Add the 2-D MatMul is one Gemm first (matmul-gemm), which then takes the BN;
    # without, the BN's shift becomes the C of a Gemm in the MatMul's place
    out, _ = fold_ok(g.model(), {"bn": "bn-gemm" if bias else "bn-matmul"})
    assert op_types(out.graph) == ["Relu", "Gemm"]


def test_bn_before_matmul_on_3d_input_refused():
    g = GraphBuilder(seed=6)
    x = g.input("x", ["N", 4, 4])
    h = g.bn(g.node("Relu", [x], "r", "relu").output[0], "bn", 4)
    g.output(g.node("MatMul", [h, g.init("W", g.weight((4, 5)))], "y", "matmul").output[0])
    refuse_ok(g.model(), "bn", "not-per-channel")


@pytest.mark.parametrize("op", ["Gemm", "MatMul"])
def test_bn2d_flatten_linear(op):
    g = GraphBuilder(seed=7)
    x = g.input("x", ["N", 3, 2, 2])
    h = g.bn(g.node("Relu", [x], "r", "relu").output[0], "bn", 3)
    h = g.node("Flatten", [h], "f", "flatten").output[0]
    g.output(g.node(op, [h, g.init("W", g.weight((12, 5)))], "y", "linear").output[0])
    out, _ = fold_ok(g.model(), {"bn": f"bn-flatten-{op.lower()}"})
    assert count_op(out, "BatchNormalization") == 0


def test_bn2d_flatten_with_unknown_spatial_size_refused():
    g = GraphBuilder(seed=8)
    x = g.input("x", ["N", 3, "H", "W"])
    h = g.bn(g.node("Relu", [x], "r", "relu").output[0], "bn", 3)
    h = g.node("Flatten", [h], "f", "flatten").output[0]
    g.output(g.node("MatMul", [h, g.init("W", g.weight((12, 5)))], "y", "linear").output[0])
    refuse_ok(g.model(), "bn", "shape-unknown", feeds={"x": np.ones((2, 3, 2, 2), np.float32)})


def test_bn_between_two_linear_ops_folds_into_the_first():
    g = GraphBuilder(seed=9)
    x = g.input("x", ["N", 3, 5, 5])
    h = g.bn(g.conv(x, "c1", 3, 4, (3, 3), pads=[1, 1, 1, 1]), "bn", 4)
    g.output(g.conv(h, "c2", 4, 2, (1, 1)))
    fold_ok(g.model(), {"bn": "conv-bn"})


def test_bn_before_and_after_the_same_conv():
    """Pass 1 folds the BN after the conv; the BN before it then folds into the new weights."""
    g = GraphBuilder(seed=10)
    x = g.input("x", ["N", 4, 5, 5])
    h = g.bn(g.node("Relu", [x], "r", "relu").output[0], "bn_before", 4)
    h = g.bn(g.conv(h, "conv", 4, 6, (3, 3), group=2), "bn_after", 6)
    g.output(h)
    out, _ = fold_ok(g.model(), {"bn_before": "bn-conv", "bn_after": "conv-bn"})
    assert op_types(out.graph) == ["Relu", "Conv"]
    assert len(out.graph.initializer) == 2  # intermediate folded weights are not left behind

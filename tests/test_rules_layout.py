"""Layout ops between a linear op and its BN / affine ops: Transpose pairs, Squeeze/Unsqueeze/
Reshape that keep the channel axis, and MatMul -> Reshape/Transpose -> BN (issue #5)."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_models import GraphBuilder, op_types
from rules_helpers import fold_ok, refuse_ok


def test_transpose_pair_with_bias_add_between():
    """Conv -> Transpose(NHWC) -> Add([C]) -> Transpose(NCHW) -> BN: everything but the conv goes."""
    g = GraphBuilder(seed=0)
    x = g.input("x", ["N", 3, 6, 6])
    h = g.conv(x, "conv", 3, 4, (3, 3), bias=False)
    h = g.node("Transpose", [h], "t1_out", "t1", perm=[0, 2, 3, 1]).output[0]
    h = g.node("Add", [h, g.init("bias", g.weight((4,)))], "a_out", "add").output[0]
    h = g.node("Transpose", [h], "t2_out", "t2", perm=[0, 3, 1, 2]).output[0]
    g.output(g.bn(h, "bn", 4))
    out, _ = fold_ok(g.model(), {"bn": "conv-layout-bn", "add": "conv-layout-affine"}, gone=["t1", "t2"])
    assert op_types(out.graph) == ["Conv"]


def test_transpose_pair_alone_is_seen_through():
    g = GraphBuilder(seed=1)
    x = g.input("x", ["N", 3, 6, 6])
    h = g.conv(x, "conv", 3, 4, (3, 3))
    h = g.node("Transpose", [h], "t1_out", "t1", perm=[0, 2, 3, 1]).output[0]
    h = g.node("Transpose", [h], "t2_out", "t2", perm=[0, 3, 1, 2]).output[0]
    g.output(g.bn(h, "bn", 4))
    out, _ = fold_ok(g.model(), {"bn": "conv-layout-bn"}, gone=["t1", "t2"])
    assert op_types(out.graph) == ["Conv"]


def test_transpose_moving_channels_last_keeps_the_transpose():
    g = GraphBuilder(seed=2)
    x = g.input("x", ["N", 3, 6, 6])
    h = g.conv(x, "conv", 3, 4, (3, 3))
    h = g.node("Transpose", [h], "t_out", "t", perm=[0, 2, 3, 1]).output[0]
    h = g.node("Mul", [h, g.init("m", g.weight((4,)))], "m_out", "mul").output[0]
    g.output(g.node("Add", [h, g.init("a", g.weight((1, 1, 4)))], "y", "add").output[0])
    out, _ = fold_ok(g.model(), {"mul": "conv-layout-affine"}, gone=["add"])
    assert op_types(out.graph) == ["Conv", "Transpose"]


def test_transposed_constant_that_is_not_per_channel_refused():
    g = GraphBuilder(seed=3)
    x = g.input("x", ["N", 3, 6, 6])
    h = g.conv(x, "conv", 3, 4, (3, 3))  # [N, 4, 4, 4]
    h = g.node("Transpose", [h], "t_out", "t", perm=[0, 2, 3, 1]).output[0]
    g.output(g.node("Mul", [h, g.init("m", g.weight((4, 1, 1)))], "y", "mul").output[0])
    refuse_ok(g.model(), "mul", "not-per-channel")


@pytest.mark.parametrize("squeeze", ["Squeeze", "Reshape"])
def test_tensorflow_conv1d_squeeze_add_mul_add(squeeze):
    """TF Conv1D: Conv on [N, C, 1, L] -> Squeeze(axis 2) -> Add(bias) -> Mul -> Add (a BN)."""
    g = GraphBuilder(seed=4)
    x = g.input("x", ["N", 3, 1, 9])
    h = g.conv(x, "conv", 3, 5, (1, 3), bias=False)  # [N, 5, 1, 7]
    if squeeze == "Squeeze":
        h = g.node("Squeeze", [h, g.init("axes", np.array([2], np.int64))], "sq", "squeeze").output[0]
    else:
        h = g.node("Reshape", [h, g.init("shape", np.array([0, 5, 7], np.int64))], "sq", "squeeze").output[0]
    h = g.node("Add", [h, g.init("bias", g.weight((5, 1)))], "b_out", "bias_add").output[0]
    h = g.node("Mul", [h, g.init("m", g.weight((5, 1)))], "m_out", "mul").output[0]
    g.output(g.node("Add", [h, g.init("a", g.weight((1, 5, 1)))], "y", "add").output[0])
    out, _ = fold_ok(g.model(), {"bias_add": "conv-layout-affine"}, gone=["mul", "add"])
    assert op_types(out.graph) == ["Conv", squeeze]


def test_reshape_mixing_channels_refused():
    g = GraphBuilder(seed=5)
    x = g.input("x", [2, 3, 6, 6])
    h = g.conv(x, "conv", 3, 4, (3, 3))  # [2, 4, 4, 4]
    h = g.node("Reshape", [h, g.init("shape", np.array([2, 8, 8], np.int64))], "r_out", "reshape").output[0]
    g.output(g.bn(h, "bn", 8))
    refuse_ok(g.model(), "bn", {"not-per-channel", "channel-mismatch"})


@pytest.mark.parametrize("how", ["transpose", "reshape-2d-to-3d"])
def test_matmul_layout_bn(how):
    """MatMul's features (last axis) moved to axis 1 by the layout op: BN1d over them folds."""
    g = GraphBuilder(seed=6)
    if how == "transpose":
        x = g.input("x", ["B", 7, 4])
        g.node("MatMul", [x, g.init("W", g.weight((4, 5)))], "mm", "matmul")
        h = g.node("Transpose", ["mm"], "t", "layout", perm=[0, 2, 1]).output[0]  # [B, 5, 7]
    else:
        x = g.input("x", [6, 4])
        g.node("MatMul", [x, g.init("W", g.weight((4, 5)))], "mm", "matmul")
        h = g.node("Reshape", ["mm", g.init("shape", np.array([6, 5, 1], np.int64))], "t", "layout").output[0]
    g.output(g.bn(h, "bn", 5))
    out, _ = fold_ok(g.model(), {"bn": "matmul-layout-bn"})
    # on a 2-D input the MatMul and the BN's shift become one Gemm
    assert op_types(out.graph) == (["MatMul", "Add", "Transpose"] if how == "transpose" else ["Gemm", "Reshape"])


def test_matmul_reshape_that_does_not_prove_the_axis_refused():
    g = GraphBuilder(seed=7)
    x = g.input("x", [3, 4])
    g.node("MatMul", [x, g.init("W", g.weight((4, 6)))], "mm", "matmul")  # [3, 6]
    h = g.node("Reshape", ["mm", g.init("shape", np.array([3, 2, 3], np.int64))], "t", "reshape").output[0]
    g.output(g.bn(h, "bn", 2))
    refuse_ok(g.model(), "bn", "not-per-channel")


def test_matmul_transpose_of_unknown_rank_refused():
    from onnx import TensorProto, helper

    g = GraphBuilder(seed=8)
    g.inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, None))
    g.node("MatMul", ["x", g.init("W", g.weight((4, 5)))], "mm", "matmul")
    g.node("Transpose", ["mm"], "t", "transpose")  # default perm: reverse, rank unknown
    g.output(g.bn("t", "bn", 3), shape=[5, 3])  # BN over the MatMul's rows: must not fold
    out, report = refuse_ok(g.model(check=False), "bn", {"shape-unknown"}, feeds={"x": np.ones((3, 4), np.float32)}, valid=False)


def test_conv1d_squeeze_with_dynamic_length_uses_the_axes():
    """Spatial size unknown: the Squeeze's axes alone prove the channel axis stays axis 1."""
    g = GraphBuilder(seed=9)
    x = g.input("x", ["N", 3, 1, "L"])
    h = g.conv(x, "conv", 3, 5, (1, 3), bias=False)
    h = g.node("Squeeze", [h, g.init("axes", np.array([2], np.int64))], "sq", "squeeze").output[0]
    h = g.node("Mul", [h, g.init("m", g.weight((5, 1)))], "m_out", "mul").output[0]
    g.output(g.node("Add", [h, g.init("a", g.weight((5, 1)))], "y", "add").output[0])
    out, _ = fold_ok(g.model(), {"mul": "conv-layout-affine"}, gone=["add"],
                     feeds={"x": np.ones((2, 3, 1, 9), np.float32)})
    assert op_types(out.graph) == ["Conv", "Squeeze"]


def test_squeeze_of_the_channel_axis_refused():
    g = GraphBuilder(seed=10)
    x = g.input("x", ["N", 3, 1, "L"])
    h = g.conv(x, "conv", 3, 1, (1, 3))  # one channel, squeezed away
    h = g.node("Squeeze", [h, g.init("axes", np.array([1], np.int64))], "sq", "squeeze").output[0]
    g.output(g.node("Mul", [h, g.init("m", g.weight((2, 1)))], "y", "mul").output[0])
    out, report = refuse_ok(g.model(), "mul", None, feeds={"x": np.ones((2, 3, 1, 9), np.float32)})
    assert "mul" not in {e["node"] for e in report.extra.get("affine_folded", [])}

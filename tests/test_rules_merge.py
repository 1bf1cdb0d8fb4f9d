"""Rule: BN -> BN and BN -> Mul/Add/Sub/Div with no linear op merge into the first BN (issue #5)."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_models import GraphBuilder, op_types
from rules_helpers import fold_ok, refuse_ok


def relu_bn(g, c=4, shape=("N", 4, 5, 5)):
    x = g.input("x", list(shape))
    return g.bn(g.node("Relu", [x], "r", "relu").output[0], "bn1", c)


def test_bn_bn_merge():
    g = GraphBuilder(seed=0)
    h = relu_bn(g)
    g.output(g.node("Relu", [g.bn(h, "bn2", 4)], "y", "relu2").output[0])
    out, report = fold_ok(g.model(), {"bn2": "bn-bn"})
    assert op_types(out.graph) == ["Relu", "BatchNormalization", "Relu"]
    assert {s.bn: s.reason for s in report.skipped} == {"bn1": "no-linear-producer"}


def test_bn_mul_add_merge_and_identity_removed():
    g = GraphBuilder(seed=1)
    h = relu_bn(g)
    h = g.node("Mul", [h, g.init("m", g.weight((4, 1, 1)))], "m_out", "mul").output[0]
    h = g.node("Identity", [h], "i_out", "ident").output[0]
    h = g.node("Sub", [h, g.init("s", g.weight((1, 4, 1, 1)))], "s_out", "sub").output[0]
    h = g.bn(h, "bn2", 4)
    g.output(g.node("Div", [h, g.init("d", np.full((1,), 2.0, np.float32))], "y", "div").output[0])
    out, _ = fold_ok(g.model(), {"mul": "bn-affine", "bn2": "bn-bn", "div": "bn-affine"}, gone=["ident", "sub"])
    assert op_types(out.graph) == ["Relu", "BatchNormalization"]


def test_mul_with_last_axis_constant_not_merged():
    g = GraphBuilder(seed=2)
    h = relu_bn(g, shape=("N", 4, 4, 4))
    g.output(g.node("Mul", [h, g.init("m", g.weight((4,)))], "y", "mul").output[0])
    refuse_ok(g.model(), "mul", None)


def test_merged_then_folded_into_following_conv():
    g = GraphBuilder(seed=3)
    h = relu_bn(g)
    h = g.node("Mul", [h, g.init("m", g.weight((4, 1, 1)))], "m_out", "mul").output[0]
    g.output(g.conv(h, "conv", 4, 3, (1, 1)))
    out, _ = fold_ok(g.model(), {"mul": "bn-affine", "bn1": "bn-conv"})
    assert op_types(out.graph) == ["Relu", "Conv"]


def test_bn_with_two_readers_not_merged():
    g = GraphBuilder(seed=4)
    h = relu_bn(g)
    g.output(g.bn(h, "bn2", 4))
    g.output(g.node("Relu", [h], "y2", "relu2").output[0])
    refuse_ok(g.model(), "bn2", "no-linear-producer")


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_merge_keeps_parameter_dtype(dtype):
    g = GraphBuilder(seed=5, dtype=dtype)
    h = relu_bn(g)
    g.output(g.bn(h, "bn2", 4))
    out, _ = fold_ok(g.model(), {"bn2": "bn-bn"})
    from onnx_models import tensor_value

    bn = [n for n in out.graph.node if n.op_type == "BatchNormalization"][0]
    assert tensor_value(out, bn.input[1]).dtype == dtype

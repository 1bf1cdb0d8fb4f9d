"""Identity and inference Dropout between a linear op and its BN / affine ops (issue #5)."""

from __future__ import annotations

import numpy as np
import pytest

from bnfold.onnx_pass import fold_onnx
from onnx_models import GraphBuilder, op_types
from rules_helpers import fold_ok, refuse_ok


def conv_noop_bn(noop: str, opset: int = 17, **attrs):
    g = GraphBuilder(seed=0)
    x = g.input("x", ["N", 3, 6, 6])
    h = g.conv(x, "conv", 3, 4, (3, 3))
    outs = [f"{noop}_out"]
    ins = [h]
    if noop == "Dropout" and attrs.pop("with_mask", False):
        outs.append("mask")
    if "training" in attrs:
        ins += [g.init("ratio", np.array(0.5, np.float32)), g.init("train", np.array(attrs.pop("training")))]
    h = g.node(noop, ins, outs, noop.lower(), **attrs).output[0]
    h = g.node("Identity", [h], "id2_out", "id2").output[0]
    return g, g.bn(h, "bn", 4)


@pytest.mark.parametrize("noop,attrs", [
    ("Identity", {}), ("Dropout", {}), ("Dropout", {"with_mask": True}), ("Dropout", {"training": False}),
])
def test_noops_between_conv_and_bn_are_removed(noop, attrs):
    g, y = conv_noop_bn(noop, **attrs)
    g.output(y)
    out, report = fold_ok(g.model(), {"bn": "conv-bn"}, gone=[noop.lower(), "id2"])
    assert op_types(out.graph) == ["Conv"]


def test_dropout_whose_mask_is_read_stays():
    g, y = conv_noop_bn("Dropout", with_mask=True)
    g.output(y)
    g.output("mask", dtype=np.bool_)
    refuse_ok(g.model(), "bn", "no-linear-producer")


def test_dropout_in_training_mode_stays():
    g, y = conv_noop_bn("Dropout", training=True)
    g.output(y)
    # not run: a training-mode Dropout is random, so only the graph and the report are checked
    out, report = fold_onnx(g.model())
    assert "dropout" in [n.name for n in out.graph.node] and "bn" in [n.name for n in out.graph.node]
    assert {s.bn: s.reason for s in report.skipped} == {"bn": "no-linear-producer"}


def test_identity_output_read_twice_keeps_everything():
    g, y = conv_noop_bn("Identity")
    g.output(y)
    g.output("id2_out")
    refuse_ok(g.model(), "bn", "producer-output-is-graph-output")


def test_identity_between_gemm_and_mul_add():
    g = GraphBuilder(seed=1)
    x = g.input("x", ["N", 4])
    g.node("Gemm", [x, g.init("W", g.weight((4, 5)))], "h", "gemm")
    h = g.node("Identity", ["h"], "i", "ident").output[0]
    h = g.node("Mul", [h, g.init("m", g.weight((5,)))], "m_out", "mul").output[0]
    h = g.node("Dropout", [h], "d", "drop").output[0]
    g.output(g.node("Add", [h, g.init("a", g.weight((5,)))], "y", "add").output[0])
    out, _ = fold_ok(g.model(), {"mul": "gemm-affine"}, gone=["ident", "drop", "add"])
    assert op_types(out.graph) == ["Gemm"]

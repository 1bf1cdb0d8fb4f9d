"""Exporter idioms around the linear ops (issue 11, items 2-4): MatMul and its bias as one Gemm,
a Mul (or Add/Sub/Div) by a constant before a linear op, and Mul/Div by 1 / Add/Sub of 0.

Each fold is checked with onnxruntime at ORT_DISABLE_ALL on seeded inputs (rules_helpers).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnx_models import GraphBuilder, op_types
from rules_helpers import fold_ok, refuse_ok, skipped_reasons

RNG = np.random.default_rng(11)


def vec(shape, low=0.5, high=1.5):
    return RNG.uniform(low, high, size=shape).astype(np.float32)


# ---------------------------------------------------------------- MatMul + bias -> Gemm


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_matmul_bn_on_a_2d_input_is_one_gemm(dtype):
    g = GraphBuilder(seed=1, dtype=dtype)
    x = g.input("x", ["N", 6])
    g.node("MatMul", [x, g.init("W", g.weight((6, 4)))], "h", "matmul")
    g.output(g.bn("h", "bn", 4))
    out, _ = fold_ok(g.model(), {"bn": "matmul-bn"})
    assert op_types(out.graph) == ["Gemm"]


@pytest.mark.parametrize("bias_shape", [(4,), (1, 4)])
def test_matmul_add_bn_on_a_2d_input_is_one_gemm(bias_shape):
    g = GraphBuilder(seed=2)
    x = g.input("x", [3, 6])
    g.node("MatMul", [x, g.init("W", g.weight((6, 4)))], "h", "matmul")
    g.node("Add", ["h", g.init("bias", vec(bias_shape))], "a", "bias_add")
    g.output(g.bn("a", "bn", 4))
    out, _ = fold_ok(g.model(), {"bn": "matmul-bn", "bias_add": "matmul-gemm"})
    assert op_types(out.graph) == ["Gemm"]


def test_matmul_bn_on_a_3d_input_keeps_matmul_and_add():
    g = GraphBuilder(seed=3)
    x = g.input("x", ["N", 5, 6])
    g.node("MatMul", [x, g.init("W", g.weight((6, 4)))], "h", "matmul")
    h = g.node("Transpose", ["h"], "t", "t", perm=[0, 2, 1]).output[0]
    g.output(g.bn(h, "bn", 4))
    out, _ = fold_ok(g.model(), {"bn": "matmul-layout-bn"})
    assert op_types(out.graph) == ["MatMul", "Add", "Transpose"]


def test_matmul_gemm_keeps_the_graph_output_name():
    g = GraphBuilder(seed=4)
    x = g.input("x", [3, 6])
    g.node("MatMul", [x, g.init("W", g.weight((6, 4)))], "h", "matmul")
    g.output(g.node("Add", ["h", g.init("bias", vec((4,)))], "y", "bias_add").output[0])
    out, _ = fold_ok(g.model(), {"bias_add": "matmul-gemm"})
    assert [o.name for o in out.graph.output] == ["y"] and out.graph.node[0].output[0] == "y"


# ---------------------------------------------------------------- Mul/Add before a linear op


def mul_before(op, const, pads=None, data_shape=None, kind="Mul", pos=1):
    g = GraphBuilder(seed=5)
    x = g.input("x", data_shape or ([2, 4, 6, 6] if "Conv" in op else [3, 4]))
    r = g.node("Relu", [x], "r", "relu").output[0]
    ins = [r, g.init("c", const)] if pos == 1 else [g.init("c", const), r]
    m = g.node(kind, ins, "m", "mul").output[0]
    if op == "Conv":
        y = g.conv(m, "lin", 4, 5, (3, 3), pads=pads or [0, 0, 0, 0])
    elif op == "ConvTranspose":
        y = g.conv(m, "lin", 4, 6, (3, 3), group=2, op="ConvTranspose", strides=[2, 2])
    elif op == "Gemm":
        y = g.node("Gemm", [m, g.init("W", g.weight((5, 4))), g.init("C", g.weight((5,)))], "y", "lin",
                   transB=1, alpha=0.5).output[0]
    else:
        y = g.node("MatMul", [m, g.init("W", g.weight((4, 5)))], "y", "lin").output[0]
    g.output(y)
    return g.model()


@pytest.mark.parametrize("op,const", [
    ("Conv", np.float32(0.5)),
    ("Conv", vec((1, 4, 1, 1))),
    ("Conv", vec((4, 1, 1))),
    ("ConvTranspose", vec((4, 1, 1))),
    ("ConvTranspose", np.float32(0.5)),
    ("Gemm", vec((4,))),
    ("MatMul", vec((1, 4))),
    ("MatMul", np.float32(0.5)),
])
def test_mul_by_a_constant_before_a_linear_op_folds(op, const):
    out, _ = fold_ok(mul_before(op, const), {"mul": f"affine-{op.lower()}"})
    assert "Mul" not in op_types(out.graph)


def test_mul_before_a_zero_padded_conv_folds():
    """0 * s = 0: scaling before zero padding is exact."""
    fold_ok(mul_before("Conv", vec((1, 4, 1, 1)), pads=[1, 1, 1, 1]), {"mul": "affine-conv"})


def test_mul_before_matmul_on_a_3d_input_folds():
    """MatMul reads the last axis of any rank: a per-feature scale there folds."""
    fold_ok(mul_before("MatMul", vec((4,)), data_shape=[2, 3, 4]), {"mul": "affine-matmul"})


@pytest.mark.parametrize("kind", ["Add", "Sub"])
def test_add_before_an_unpadded_conv_folds(kind):
    fold_ok(mul_before("Conv", vec((1, 4, 1, 1)), kind=kind), {"mul": "affine-conv"})


@pytest.mark.parametrize("kind,pos", [("Add", 1), ("Sub", 1), ("Sub", 0)])
def test_add_before_a_padded_conv_stays(kind, pos):
    refuse_ok(mul_before("Conv", vec((1, 4, 1, 1)), pads=[1, 1, 1, 1], kind=kind, pos=pos), "mul", None)


def test_add_before_convtranspose_stays():
    refuse_ok(mul_before("ConvTranspose", vec((4, 1, 1)), kind="Add"), "mul", None)


@pytest.mark.parametrize("const", [vec((6,)), vec((4, 6, 1)), vec((1, 1, 6, 1))])
def test_mul_not_per_input_channel_stays(const):
    """A [6] constant lands on the width axis, a [4, 6, 1] one varies along H: neither is per channel."""
    refuse_ok(mul_before("Conv", const), "mul", None)


def test_div_of_a_constant_by_the_data_stays():
    refuse_ok(mul_before("Conv", vec((1, 4, 1, 1)), kind="Div", pos=0), "mul", None)


def test_add_before_a_matmul_without_a_bias_stays():
    """On an input not known 2-D the shift would only move to a new Add after the MatMul."""
    refuse_ok(mul_before("MatMul", vec((4,)), data_shape=[2, 3, 4], kind="Add"), "mul", None)


def test_add_before_a_2d_matmul_becomes_a_gemm():
    out, _ = fold_ok(mul_before("MatMul", vec((4,)), kind="Add"), {"mul": "affine-matmul"})
    assert op_types(out.graph) == ["Relu", "Gemm"]


def test_noop_read_inside_a_subgraph_stays():
    g = GraphBuilder(seed=10)
    x = g.input("x", [2, 3])
    g.input("cond", [], np.bool_)
    y = g.node("Mul", [x, g.init("one", np.float32(1))], "m", "noop").output[0]
    branch = lambda name: onnx.helper.make_graph(  # noqa: E731
        [onnx.helper.make_node("Relu", [y], [f"{name}_out"], name=f"{name}_relu")], name, [],
        [onnx.helper.make_tensor_value_info(f"{name}_out", onnx.TensorProto.FLOAT, [2, 3])])
    g.node("If", ["cond"], "z", "if", then_branch=branch("t"), else_branch=branch("e"))
    g.output("z", [2, 3])
    for cond in (True, False):
        refuse_ok(g.model(), "noop", None, feeds={"cond": np.array(cond)})


def test_mul_read_by_a_non_linear_op_too_stays():
    g = GraphBuilder(seed=6)
    x = g.input("x", [2, 4, 6, 6])
    m = g.node("Mul", [x, g.init("c", np.float32(0.5))], "m", "mul").output[0]
    g.output(g.conv(m, "conv", 4, 5, (1, 1)))
    g.output(g.node("Relu", [m], "r", "relu").output[0])
    refuse_ok(g.model(), "mul", None)


def test_mul_read_by_two_convs_folds_into_both():
    g = GraphBuilder(seed=7)
    x = g.input("x", [2, 4, 6, 6])
    m = g.node("Mul", [x, g.init("c", vec((1, 4, 1, 1)))], "m", "mul").output[0]
    g.output(g.conv(m, "c1", 4, 5, (1, 1)))
    g.output(g.conv(m, "c2", 4, 3, (3, 3), pads=[1, 1, 1, 1]))
    out, _ = fold_ok(g.model(), {"mul": "affine-conv"})
    assert op_types(out.graph) == ["Conv", "Conv"]


# ---------------------------------------------------------------- no-op elimination


def noop_model(kind, const, pos=1, shape=(2, 4, 3), output_is_noop=True):
    g = GraphBuilder(seed=8)
    x = g.input("x", list(shape))
    r = g.node("Sigmoid", [x], "s", "sig").output[0]
    ins = [r, g.init("c", const)] if pos == 1 else [g.init("c", const), r]
    y = g.node(kind, ins, "y" if output_is_noop else "n", "noop").output[0]
    if not output_is_noop:
        y = g.node("Relu", [y], "y", "relu").output[0]
    g.output(y)
    return g.model()


@pytest.mark.parametrize("kind,const,pos", [
    ("Mul", np.array([1.0], np.float32), 1),
    ("Mul", np.ones((1, 4, 1), np.float32), 0),
    ("Div", np.float32(1.0), 1),
    ("Add", np.zeros((3,), np.float32), 1),
    ("Add", np.float32(0.0), 0),
    ("Sub", np.zeros((4, 3), np.float32), 1),
])
@pytest.mark.parametrize("output_is_noop", [True, False])
def test_noop_is_removed(kind, const, pos, output_is_noop):
    out, report = fold_ok(noop_model(kind, const, pos, output_is_noop=output_is_noop), {})
    assert kind not in op_types(out.graph)
    assert [o.name for o in out.graph.output] == ["y"]
    assert [(e["node"], e["rule"]) for e in report.extra["noops_removed"]] == [("noop", "noop")]


@pytest.mark.parametrize("kind,const,pos", [
    ("Mul", np.ones((2, 2, 4, 3), np.float32), 1),  # broadcasts the value to a bigger shape
    ("Add", np.zeros((3, 1, 1, 1), np.float32), 1),  # idem
    ("Sub", np.float32(0.0), 0),  # 0 - x is not x
    ("Div", np.float32(1.0), 0),  # 1 / x is not x
    ("Mul", np.array([1.0, 2.0, 1.0], np.float32), 1),  # not all ones
])
def test_not_a_noop_stays(kind, const, pos):
    out, report = refuse_ok(noop_model(kind, const, pos), "noop", None)
    assert "noops_removed" not in report.extra


def test_noop_on_a_graph_input_read_as_output_stays_named():
    """y = x * 1 with x a graph input: y must stay a graph output of its own."""
    g = GraphBuilder(seed=9)
    x = g.input("x", [2, 3])
    g.output(g.node("Mul", [x, g.init("one", np.float32(1))], "y", "noop").output[0])
    out, _ = refuse_ok(g.model(), "noop", None)
    assert [o.name for o in out.graph.output] == ["y"]


def test_refusals_of_the_idioms_are_not_reported_as_bns():
    out, report = refuse_ok(mul_before("Conv", vec((1, 4, 1, 1)), pads=[1, 1, 1, 1], kind="Add"), "mul", None)
    assert skipped_reasons(report) == {}


# ---------------------------------------------------------------- random chains of the idioms


def random_idiom_model(seed: int):
    """Relu -> 1 to 3 random Mul/Add/Sub/Div by constants (scalars, per channel, per last axis,
    ones and zeros, broadcasting ones) -> a random linear op."""
    import random

    rng = random.Random(seed)
    g = GraphBuilder(seed=seed)
    op = rng.choice(["Conv", "ConvTranspose", "Gemm", "MatMul", "MatMul3"])
    shape, axis = {"Conv": ([2, 4, 5, 5], 1), "ConvTranspose": ([2, 4, 5, 5], 1), "MatMul3": ([2, 3, 4], 2)}.get(
        op, ([3, 4], 1))
    h = g.node("Relu", [g.input("x", shape)], "r", "relu").output[0]
    for i in range(rng.randint(1, 3)):
        kind = rng.choice(["Mul", "Add", "Sub", "Div"])
        neutral = 1.0 if kind in ("Mul", "Div") else 0.0
        pick = rng.random()
        if pick < 0.25:
            c = np.array(rng.uniform(0.5, 1.5), np.float32)
        elif pick < 0.45:
            c = np.full([1] * rng.randint(0, len(shape)), neutral, np.float32)
        elif pick < 0.65:
            dims = [1] * len(shape)
            dims[axis] = shape[axis]
            c = vec(dims[rng.randint(0, axis):])
        elif pick < 0.8:
            c = vec((shape[-1],))
        else:
            c = np.full([2] + shape[1:], neutral, np.float32) if shape[0] == 2 else np.float32(neutral)
        if list(np.broadcast_shapes(tuple(shape), c.shape)) != shape:
            continue
        ins = [h, g.init(f"c{i}", c)] if kind == "Div" or rng.random() < 0.7 else [g.init(f"c{i}", c), h]
        h = g.node(kind, ins, f"e{i}", f"e{i}").output[0]
    if op == "Conv":
        y = g.conv(h, "lin", 4, 3, (3, 3), pads=rng.choice([[0, 0, 0, 0], [1, 1, 1, 1]]), bias=rng.random() < 0.5)
    elif op == "ConvTranspose":
        y = g.conv(h, "lin", 4, 6, (3, 3), group=rng.choice([1, 2]), op="ConvTranspose", strides=[2, 2])
    elif op == "Gemm":
        tb = rng.randint(0, 1)
        y = g.node("Gemm", [h, g.init("W", g.weight((5, 4) if tb else (4, 5))), g.init("C", g.weight((5,)))], "y",
                   "lin", transB=tb, alpha=0.7, beta=1.3).output[0]
    else:
        y = g.node("MatMul", [h, g.init("W", g.weight((4, 5)))], "y", "lin").output[0]
        if rng.random() < 0.5:
            y = g.node("Add", [y, g.init("bias", g.weight((5,)))], "yb", "bias").output[0]
    g.output(y)
    return g.model()


def test_random_idiom_chains_fold_exactly_or_stay():
    """Each model folds to one that onnxruntime finds equivalent, or stays; over the draws every
    idiom rule fires (BNFOLD_SLOW=1 draws 600 models instead of 60)."""
    import os
    from collections import Counter

    from bnfold.onnx_pass import fold_onnx
    from onnx_models import assert_equivalent, check_valid

    fired = Counter()
    for seed in range(600 if os.environ.get("BNFOLD_SLOW") == "1" else 60):
        model = random_idiom_model(seed)
        out, report = fold_onnx(model)
        fired.update(e["rule"] for k in ("affine_folded", "noops_removed") for e in report.extra.get(k, []))
        check_valid(out)
        assert_equivalent(model, out, seed=seed)
    assert {"noop", "affine-conv", "affine-gemm", "affine-matmul"} <= set(fired), fired

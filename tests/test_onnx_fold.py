"""What the ONNX fold must fold (issue #2), and the hygiene of the model it writes.

Each fold test checks three things: the BN node is gone, the report names it as folded by the
expected rule, and the folded model computes the same outputs as the original under
onnxruntime with every graph optimization disabled.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterable, Optional

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfold.onnx_pass import fold_onnx
from bnfold.pipeline import fold_file
from onnx_models import (
    BFLOAT16,
    GraphBuilder,
    all_graphs,
    assert_equivalent,
    bn_stats,
    check_valid,
    count_op,
    defined_names,
    find_node,
    node_names,
    ort_session,
    random_feeds,
    run_model,
    tensor_value,
)

RULES = {"conv-bn", "convtranspose-bn", "gemm-bn", "matmul-bn"}


def fold_and_check(
    model: onnx.ModelProto,
    folded_bns: Iterable[str],
    rule: Optional[str] = None,
    runner: str = "ort",
    feeds: Optional[Dict[str, np.ndarray]] = None,
    producers: Optional[Dict[str, str]] = None,
):
    """Fold ``model``; assert the named BNs are folded (and gone) and the result equivalent."""
    before = model.SerializeToString()
    out, report = fold_onnx(model)
    assert model.SerializeToString() == before, "fold_onnx mutated its input"
    folded_bns = list(folded_bns)
    got = {f.bn: f for f in report.folded}
    for bn in folded_bns:
        assert bn in got, f"{bn} not folded; skipped: {[(s.bn, s.reason, s.detail) for s in report.skipped]}"
        assert bn not in node_names(out), f"{bn} folded but still in the graph"
        assert got[bn].rule in RULES
        if rule is not None:
            assert got[bn].rule == rule
        if producers and bn in producers:
            assert got[bn].producer == producers[bn]
    assert count_op(out, "BatchNormalization") == count_op(model, "BatchNormalization") - len(folded_bns)
    check_valid(out)
    assert_equivalent(model, out, runner=runner, feeds=feeds)
    return out, report


# -- Conv ------------------------------------------------------------------------------------

CONV_CASES = {
    "1d": dict(kernel=(3,), spatial=(9,)),
    "1d-stride-pad": dict(kernel=(5,), spatial=(11,), strides=[2], pads=[2, 1]),
    "2d": dict(kernel=(3, 3), spatial=(7, 6)),
    "2d-pads-strides": dict(kernel=(3, 3), spatial=(8, 8), pads=[1, 0, 2, 1], strides=[2, 1]),
    "2d-dilations": dict(kernel=(3, 2), spatial=(9, 9), dilations=[2, 3]),
    "2d-grouped": dict(kernel=(3, 3), spatial=(6, 6), group=2, pads=[1, 1, 1, 1]),
    "2d-depthwise": dict(kernel=(3, 3), spatial=(6, 6), group=6, c_in=6, c_out=6, pads=[1, 1, 1, 1]),
    "2d-depthwise-multiplier": dict(kernel=(3, 3), spatial=(6, 6), group=3, c_in=3, c_out=6),
    "2d-same-upper": dict(kernel=(3, 3), spatial=(7, 7), strides=[2, 2], auto_pad="SAME_UPPER"),
    "2d-same-lower": dict(kernel=(4, 4), spatial=(7, 7), auto_pad="SAME_LOWER"),
    "2d-valid": dict(kernel=(3, 3), spatial=(7, 7), auto_pad="VALID"),
    "2d-1x1": dict(kernel=(1, 1), spatial=(4, 4)),
    "3d": dict(kernel=(2, 3, 3), spatial=(4, 5, 5)),
    "3d-grouped-strided": dict(kernel=(3, 3, 3), spatial=(5, 5, 5), group=3, c_in=6, c_out=9, strides=[2, 2, 2]),
}


def conv_bn_model(case: dict, bias: bool, op: str = "Conv", seed: int = 0, kind: str = "init", dtype=np.float32):
    case = dict(case)
    kernel, spatial = case.pop("kernel"), case.pop("spatial")
    c_in, c_out = case.pop("c_in", 4), case.pop("c_out", 6)
    g = GraphBuilder(seed=seed, dtype=dtype)
    x = g.input("x", ["N", c_in, *spatial])
    y = g.conv(x, "conv", c_in, c_out, kernel, bias=bias, kind=kind, op=op, **case)
    g.output(g.bn(y, "bn", c_out, kind=kind))
    return g.model()


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", list(CONV_CASES), ids=list(CONV_CASES))
def test_conv_bn_folds(case, bias):
    out, _ = fold_and_check(conv_bn_model(CONV_CASES[case], bias), ["bn"], "conv-bn", producers={"bn": "conv"})
    assert [n.op_type for n in out.graph.node] == ["Conv"]


CONVT_CASES = {
    "1d": dict(kernel=(3,), spatial=(6,)),
    "1d-strided-outpad": dict(kernel=(3,), spatial=(5,), strides=[2], output_padding=[1]),
    "2d": dict(kernel=(3, 3), spatial=(5, 5)),
    "2d-strided-outpad": dict(kernel=(3, 3), spatial=(4, 5), strides=[2, 3], output_padding=[1, 2], pads=[1, 1, 0, 1]),
    "2d-grouped": dict(kernel=(3, 3), spatial=(4, 4), group=2),  # 2 in, 3 out per group
    "2d-grouped-square": dict(kernel=(2, 2), spatial=(4, 4), group=2, c_in=4, c_out=4),
    "2d-grouped-narrow": dict(kernel=(3, 3), spatial=(4, 4), group=3, c_in=6, c_out=3, strides=[2, 2]),
    "2d-depthwise": dict(kernel=(3, 3), spatial=(4, 4), group=4, c_in=4, c_out=4, strides=[2, 2]),
    "2d-dilations": dict(kernel=(2, 2), spatial=(4, 4), dilations=[2, 2]),
    "3d": dict(kernel=(2, 2, 2), spatial=(3, 3, 3)),
    "3d-grouped-outpad": dict(kernel=(3, 3, 3), spatial=(3, 3, 3), group=2, strides=[2, 2, 2], output_padding=[1, 0, 1]),
}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", list(CONVT_CASES), ids=list(CONVT_CASES))
def test_conv_transpose_bn_folds(case, bias):
    model = conv_bn_model(CONVT_CASES[case], bias, op="ConvTranspose", seed=1)
    out, _ = fold_and_check(model, ["bn"], "convtranspose-bn", producers={"bn": "conv"})
    assert [n.op_type for n in out.graph.node] == ["ConvTranspose"]


@pytest.mark.parametrize("kind", ["const", "mixed"])
def test_parameters_as_constant_nodes_fold(kind):
    """Weights, bias and BN parameters given as Constant nodes instead of initializers."""
    g = GraphBuilder(seed=2)
    x = g.input("x", [1, 3, 6, 6])
    y = g.conv(x, "conv", 3, 4, (3, 3), kind="const" if kind == "const" else "init")
    g.output(g.bn(y, "bn", 4, kind="const"))
    out, _ = fold_and_check(g.model(), ["bn"], "conv-bn")
    # the BN's Constant nodes are gone, and so is everything no longer used
    assert count_op(out, "Constant") <= 2
    assert not any(n.op_type == "Constant" and n.output[0].startswith("bn_") for n in out.graph.node)


def test_conv_weight_exactly_float64_folded_then_cast_once():
    """W' = float32(float64(W) * a) with a = gamma / sqrt(var + eps) computed in float64."""
    g = GraphBuilder(seed=3)
    x = g.input("x", [1, 3, 5, 5])
    y = g.conv(x, "conv", 3, 4, (3, 3))
    stats = bn_stats(g.rng, 4)
    stats["var"] = np.array([1e-7, 3e-4, 2.0, 1e4], np.float32)
    g.output(g.bn(y, "bn", 4, stats=stats, epsilon=1e-6))
    model = g.model()
    out, _ = fold_and_check(model, ["bn"], "conv-bn")
    conv = out.graph.node[0]
    eps = float(np.float32(1e-6))  # the attribute is stored as float32
    s = {k: v.astype(np.float64) for k, v in stats.items()}
    a = s["scale"] / np.sqrt(s["var"] + eps)
    w64 = tensor_value(model, "conv_W").astype(np.float64) * a[:, None, None, None]
    b64 = (tensor_value(model, "conv_B").astype(np.float64) - s["mean"]) * a + s["B"]
    got_w = tensor_value(out, conv.input[1])
    got_b = tensor_value(out, conv.input[2])
    assert got_w.dtype == np.float32 and got_b.dtype == np.float32
    # at most one float32 rounding away from the float64 result
    np.testing.assert_array_max_ulp(got_w, w64.astype(np.float32), maxulp=1)
    np.testing.assert_array_max_ulp(got_b, b64.astype(np.float32), maxulp=1)


# -- Gemm and MatMul ---------------------------------------------------------------------------

C_KINDS = {"none": None, "N": (5,), "1xN": (1, 5), "scalar": (), "one": (1,)}


def gemm_bn_model(trans_b: int, alpha: float, beta: float, c_kind: str, seed: int = 0, dtype=np.float32):
    k, n = 4, 5
    g = GraphBuilder(seed=seed, dtype=dtype)
    x = g.input("x", ["N", k])
    ins = [x, g.init("gemm_W", g.weight((n, k) if trans_b else (k, n)))]
    if C_KINDS[c_kind] is not None:
        ins.append(g.init("gemm_C", g.weight(C_KINDS[c_kind])))
    attrs = {"transB": trans_b}
    if alpha != 1.0:
        attrs["alpha"] = alpha
    if beta != 1.0:
        attrs["beta"] = beta
    g.node("Gemm", ins, "gemm_out", "gemm", **attrs)
    g.output(g.bn("gemm_out", "bn", n))
    return g.model()


@pytest.mark.parametrize("c_kind", list(C_KINDS))
@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_bn_folds(trans_b, c_kind):
    fold_and_check(gemm_bn_model(trans_b, 1.0, 1.0, c_kind), ["bn"], "gemm-bn", producers={"bn": "gemm"})


@pytest.mark.parametrize("alpha,beta", [(0.5, 1.0), (-2.0, 0.25), (1.0, 3.0), (0.0, 1.0), (1.5, 0.0)])
@pytest.mark.parametrize("c_kind", ["none", "N", "1xN", "scalar"])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_alpha_beta_fold(trans_b, c_kind, alpha, beta):
    fold_and_check(gemm_bn_model(trans_b, alpha, beta, c_kind, seed=4), ["bn"], "gemm-bn")


def test_gemm_trans_a_is_folded_or_refused_but_always_exact():
    g = GraphBuilder(seed=5)
    x = g.input("x", [4, 3])  # transA: the Gemm reads x^T, [3, 4]
    g.node("Gemm", [x, g.init("gemm_W", g.weight((4, 5))), g.init("gemm_C", g.weight((5,)))], "h", "gemm", transA=1)
    g.output(g.bn("h", "bn", 5))
    model = g.model()
    out, report = fold_onnx(model)
    assert "bn" in {f.bn for f in report.folded} | {s.bn for s in report.skipped}
    check_valid(out)
    assert_equivalent(model, out)


def matmul_bn_model(add: Optional[str] = None, seed: int = 0, dtype=np.float32):
    k, n = 6, 3
    g = GraphBuilder(seed=seed, dtype=dtype)
    x = g.input("x", ["N", k])
    g.node("MatMul", [x, g.init("mm_W", g.weight((k, n)))], "mm_out", "matmul")
    last = "mm_out"
    if add is not None:
        bias = g.init("mm_bias", g.weight({"N": (n,), "1xN": (1, n), "N-first": (n,)}[add]))
        ins = [bias, last] if add == "N-first" else [last, bias]
        g.node("Add", ins, "add_out", "add")
        last = "add_out"
    g.output(g.bn(last, "bn", n))
    return g.model()


@pytest.mark.parametrize("add", [None, "N", "1xN", "N-first"])
def test_matmul_bn_folds(add):
    out, report = fold_and_check(matmul_bn_model(add), ["bn"], "matmul-bn")
    assert report.folded[0].producer in ({"matmul", "add"} if add else {"matmul"})
    assert count_op(out, "MatMul") + count_op(out, "Gemm") == 1
    assert set(n.op_type for n in out.graph.node) <= {"MatMul", "Add", "Gemm"}


def test_float64_gemm_and_matmul_fold():
    fold_and_check(gemm_bn_model(1, 0.7, 1.3, "N", dtype=np.float64), ["bn"], "gemm-bn")
    fold_and_check(matmul_bn_model("N", dtype=np.float64), ["bn"], "matmul-bn")


# -- many blocks, opsets, dtypes ---------------------------------------------------------------


def resnet_block_model(seed: int = 0):
    """stem conv-bn-relu, a residual block of two conv-bn, a depthwise conv-bn, a head conv-bn."""
    g = GraphBuilder(seed=seed)
    x = g.input("x", ["N", 3, 8, 8])
    h = g.bn(g.conv(x, "stem", 3, 8, (3, 3), pads=[1, 1, 1, 1], bias=False), "stem_bn", 8)
    h = g.node("Relu", [h], "r0", "relu0").output[0]
    b = g.bn(g.conv(h, "c1", 8, 8, (3, 3), pads=[1, 1, 1, 1]), "bn1", 8)
    b = g.node("Relu", [b], "r1", "relu1").output[0]
    b = g.bn(g.conv(b, "c2", 8, 8, (1, 1)), "bn2", 8)
    h = g.node("Add", [h, b], "res", "add").output[0]
    h = g.bn(g.conv(h, "dw", 8, 8, (3, 3), group=8, strides=[2, 2], pads=[1, 1, 1, 1]), "dw_bn", 8)
    h = g.bn(g.conv(h, "head", 8, 4, (1, 1), bias=False), "head_bn", 4)
    g.output(h)
    return g.model()


def test_many_blocks_fold():
    out, report = fold_and_check(resnet_block_model(), ["stem_bn", "bn1", "bn2", "dw_bn", "head_bn"], "conv-bn")
    assert count_op(out, "BatchNormalization") == 0
    assert not report.skipped


@pytest.mark.parametrize("version,attrs", [(7, {}), (9, {}), (14, {}), (14, {"training_mode": 0}), (15, {}), (15, {"training_mode": 0})])
def test_bn_opset_versions_fold(version, attrs):
    g = GraphBuilder(seed=6)
    x = g.input("x", [2, 3, 5, 5])
    y = g.conv(x, "conv", 3, 4, (3, 3))
    g.output(g.bn(y, "bn", 4, **attrs))
    model = g.model(opset=version)
    out, _ = fold_and_check(model, ["bn"], "conv-bn")
    assert [(o.domain, o.version) for o in out.opset_import] == [(o.domain, o.version) for o in model.opset_import]


def test_bn_opset_6_in_test_mode_folds():
    """onnxruntime has no BatchNormalization-6 kernel; onnx's reference evaluator checks it."""
    g = GraphBuilder(seed=7)
    x = g.input("x", [2, 3, 5, 5])
    y = g.conv(x, "conv", 3, 4, (3, 3))
    g.output(g.bn(y, "bn", 4, is_test=1))
    model = g.model(opset=6)
    fold_and_check(model, ["bn"], "conv-bn", runner="reference")


def test_bn15_float32_params_on_float16_conv():
    """BN-15 allows float32 statistics on a float16 input: the fold must keep the conv float16."""
    g = GraphBuilder(seed=8, dtype=np.float16)
    x = g.input("x", ["N", 3, 6, 6])
    y = g.conv(x, "conv", 3, 4, (3, 3), pads=[1, 1, 1, 1])
    g.output(g.bn(y, "bn", 4, param_dtype=np.float32))
    model = g.model(opset=15)
    out, _ = fold_and_check(model, ["bn"], "conv-bn")
    conv = out.graph.node[0]
    for name in conv.input[1:]:
        assert tensor_value(out, name).dtype == np.float16, f"{name} is not float16"


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
def test_float16_conv_folds(op):
    g = GraphBuilder(seed=9, dtype=np.float16)
    x = g.input("x", ["N", 4, 5, 5])
    y = g.conv(x, "conv", 4, 6, (3, 3), group=2, op=op)
    g.output(g.bn(y, "bn", 6))
    fold_and_check(g.model(), ["bn"])


def test_float64_conv_folds():
    """onnxruntime's CPU provider has no float64 Conv: check with onnx's reference evaluator."""
    g = GraphBuilder(seed=10, dtype=np.float64)
    x = g.input("x", [1, 3, 5, 5])
    y = g.conv(x, "conv", 3, 4, (3, 3), pads=[1, 1, 1, 1])
    g.output(g.bn(y, "bn", 4))
    out, _ = fold_and_check(g.model(), ["bn"], "conv-bn", runner="reference")
    assert tensor_value(out, out.graph.node[0].input[1]).dtype == np.float64


@pytest.mark.skipif(BFLOAT16 is None, reason="ml_dtypes not installed")
def test_bfloat16_conv_folds():
    g = GraphBuilder(seed=11, dtype=BFLOAT16)
    x = g.input("x", [1, 3, 5, 5])
    y = g.conv(x, "conv", 3, 4, (3, 3))
    g.output(g.bn(y, "bn", 4))
    model = g.model(opset=22)  # Conv accepts bfloat16 from opset 22
    try:
        ort_session(model)
        runner = "ort"
    except Exception:  # no bfloat16 Conv/BN kernels in onnxruntime's CPU provider
        runner = "reference"
    out, _ = fold_and_check(model, ["bn"], "conv-bn", runner=runner)
    assert tensor_value(out, out.graph.node[0].input[1]).dtype == BFLOAT16


# -- shared weights and names ------------------------------------------------------------------


@pytest.mark.parametrize("second", ["bn", "none", "relu"])
def test_shared_weight_keeps_original_for_other_user(second):
    g = GraphBuilder(seed=12)
    x = g.input("x", ["N", 3, 5, 5])
    w = g.init("W", g.weight((4, 3, 3, 3)))
    bias = g.init("B", g.weight((4,)))
    g.node("Conv", [x, w, bias], "c1", "conv1")
    g.node("Conv", [x, w, bias], "c2", "conv2", pads=[1, 1, 1, 1])
    g.output(g.bn("c1", "bn1", 4))
    if second == "bn":
        g.output(g.bn("c2", "bn2", 4))
    elif second == "relu":
        g.output(g.node("Relu", ["c2"], "r2", "relu2").output[0])
    else:
        g.output("c2")
    model = g.model()
    out, _ = fold_and_check(model, ["bn1", "bn2"] if second == "bn" else ["bn1"], "conv-bn")
    conv1, conv2 = find_node(out.graph, "conv1"), find_node(out.graph, "conv2")
    if second != "bn":
        np.testing.assert_array_equal(tensor_value(out, conv2.input[1]), tensor_value(model, "W"))
        np.testing.assert_array_equal(tensor_value(out, conv2.input[2]), tensor_value(model, "B"))
    assert conv1.input[1] != conv2.input[1]


NAIVE_NAMES = [
    "W_bnfold", "W_folded", "W_fused", "B_bnfold", "B_folded", "conv_bias", "conv_B", "conv_W_bnfold",
    "conv_W_folded", "conv_W_fused", "conv_bnfold_bias", "conv_bias_bnfold", "bn_out_bnfold", "conv_out_bnfold",
    "conv_W__bnfold", "conv_W_bn", "conv_B_bn", "conv_W_1", "conv_B_1", "bn_bias", "conv_b",
]  # fmt: skip


def test_new_names_do_not_clash_with_existing_ones():
    """A model already using names a naive folder would invent: each must keep its own value."""
    g = GraphBuilder(seed=13)
    x = g.input("x", [1, 3, 5, 5])
    g.init("W", g.weight((4, 3, 3, 3)))
    g.node("Conv", [x, "W"], "conv_out", "conv")  # no bias: the fold must create one
    g.output(g.bn("conv_out", "bn", 4))
    # live initializers and node outputs carrying the tempting names, on a path (from graph
    # input z) that nothing can be folded into
    h = g.input("z", [4, 1, 1])
    for i, name in enumerate(NAIVE_NAMES):
        src = name if i % 3 else f"{name}_src"
        g.init(src, g.weight((4, 1, 1)))
        if src != name:
            g.node("Identity", [src], name, f"ident_{i}")
        h = g.node("Add", [h, name], f"sum_{i}", f"add_{i}").output[0]
    g.output(h)
    model = g.model()
    out, _ = fold_and_check(model, ["bn"], "conv-bn")
    names = defined_names(out.graph)
    assert len(names) == len(set(names)), "a name is defined twice"
    for name in NAIVE_NAMES:  # the old values are untouched
        src = name if name in {t.name for t in model.graph.initializer} else f"{name}_src"
        np.testing.assert_array_equal(tensor_value(out, src), tensor_value(model, src))


def test_fold_uses_node_and_tensor_names_already_taken_in_subgraphs():
    """Names defined only inside a subgraph are still taken: a new outer name must not shadow them."""
    model = if_model(inner_names=["conv_W_bnfold", "conv_B_bnfold", "conv_bias", "W_folded", "conv_W_folded"])
    out, _ = fold_and_check(model, ["bn_main", "then_bn", "else_bn"], feeds={"cond": np.array(True)})
    for g in all_graphs(out.graph):
        names = defined_names(g)
        assert len(names) == len(set(names))
    assert_equivalent(model, out, feeds={"cond": np.array(False)})


# -- subgraphs -------------------------------------------------------------------------------


def branch(name: str, builder_seed: int, outer_w: str, c: int, inner_names=()) -> onnx.GraphProto:
    """A branch graph: Conv with an outer-scope weight, then BN; names kept unique per branch."""
    g = GraphBuilder(name=name, seed=builder_seed)
    g.node("Conv", ["h", outer_w], f"{name}_c", f"{name}_conv", pads=[1, 1, 1, 1])
    last = g.bn(f"{name}_c", f"{name}_bn", c)
    for i, n in enumerate(inner_names):
        g.init(n, g.weight((c, 1, 1)))
        last = g.node("Add", [last, n], f"{name}_s{i}", f"{name}_add{i}").output[0]
    g.output(last, shape=None)
    return g.graph()


def if_model(inner_names=()):
    c = 4
    g = GraphBuilder(seed=14)
    x = g.input("x", [1, c, 5, 5])
    g.input("cond", [], dtype=np.bool_)
    w = g.init("W_outer", g.weight((c, c, 3, 3)))
    h = g.bn(g.conv(x, "conv", c, c, (3, 3), pads=[1, 1, 1, 1]), "bn_main", c)
    g.node("Identity", [h], "h", "ident")
    then_g = branch("then", 1, w, c, inner_names)
    else_g = branch("else", 2, w, c)
    g.node("If", ["cond"], ["y"], "if", then_branch=then_g, else_branch=else_g)
    g.output("y", shape=[1, c, 5, 5])
    return g.model()


@pytest.mark.parametrize("cond", [True, False])
def test_bn_inside_if_branches_folds_with_outer_weight(cond):
    model = if_model()
    out, report = fold_and_check(model, ["bn_main", "then_bn", "else_bn"], "conv-bn", feeds={"cond": np.array(cond)})
    graphs = {f.bn: f.graph for f in report.folded}
    assert graphs["bn_main"] == ""
    assert "then" in graphs["then_bn"] and "else" in graphs["else_bn"]
    assert count_op(out, "BatchNormalization") == 0
    # the outer weight is still there for anyone else, unchanged
    if "W_outer" in {t.name for t in out.graph.initializer}:
        np.testing.assert_array_equal(tensor_value(out, "W_outer"), tensor_value(model, "W_outer"))


def test_bn_inside_loop_body_folds():
    c = 3
    g = GraphBuilder(seed=15)
    x = g.input("x", [1, c, 4, 4])
    g.input("trip", [], dtype=np.int64)
    w = g.init("W_loop", g.weight((c, c, 3, 3), scale=0.3))
    body = GraphBuilder(name="body", seed=16)
    body.input("i", [], dtype=np.int64)
    body.input("cond_in", [], dtype=np.bool_)
    body.input("state", [1, c, 4, 4])
    body.node("Identity", ["cond_in"], "cond_out", "body_cond")
    body.node("Conv", ["state", w], "bc", "body_conv", pads=[1, 1, 1, 1])
    body.bn("bc", "body_bn", c, outputs=["state_out"])
    body.output("cond_out", shape=[], dtype=np.bool_)
    body.output("state_out", shape=[1, c, 4, 4])
    g.node("Loop", ["trip", "", x], ["y"], "loop", body=body.graph())
    g.output("y", shape=[1, c, 4, 4])
    model = g.model()
    out, report = fold_and_check(model, ["body_bn"], "conv-bn", feeds={"trip": np.array(3, np.int64)})
    assert report.folded[0].graph != ""


# -- model hygiene ---------------------------------------------------------------------------


def test_model_metadata_io_and_names_are_kept():
    model = resnet_block_model(seed=17)
    model.producer_name = "some-exporter"
    model.producer_version = "9.9"
    model.doc_string = "a doc string"
    model.model_version = 42
    helper.set_model_props(model, {"author": "tests", "license": "MIT"})
    model.graph.name = "the_graph"
    out, _ = fold_and_check(model, ["stem_bn", "bn1", "bn2", "dw_bn", "head_bn"])
    assert out.ir_version == model.ir_version
    assert [(o.domain, o.version) for o in out.opset_import] == [(o.domain, o.version) for o in model.opset_import]
    assert (out.producer_name, out.producer_version) == ("some-exporter", "9.9")
    assert out.doc_string == model.doc_string and out.model_version == 42
    assert {p.key: p.value for p in out.metadata_props} == {"author": "tests", "license": "MIT"}
    assert out.graph.name == "the_graph"
    assert [i.SerializeToString() for i in out.graph.input] == [i.SerializeToString() for i in model.graph.input]
    assert [o.SerializeToString() for o in out.graph.output] == [o.SerializeToString() for o in model.graph.output]
    bns = {"stem_bn", "bn1", "bn2", "dw_bn", "head_bn"}
    kept = [n for n in node_names(model) if n not in bns]
    assert node_names(out) == kept


def test_unused_initializers_and_constants_are_removed():
    g = GraphBuilder(seed=18)
    x = g.input("x", [1, 3, 5, 5])
    y = g.conv(x, "conv", 3, 4, (3, 3), bias=False)
    y = g.bn(y, "bn", 4, kind="const")
    y = g.conv(y, "conv2", 4, 4, (1, 1))
    g.output(g.bn(y, "bn2", 4))
    model = g.model()
    out, _ = fold_and_check(model, ["bn", "bn2"])
    used = {i for gr in all_graphs(out.graph) for n in gr.node for i in n.input}
    used |= {o.name for o in out.graph.output}
    for t in out.graph.initializer:
        assert t.name in used, f"initializer {t.name} is unused"
    for n in out.graph.node:
        if n.op_type == "Constant":
            assert n.output[0] in used, f"Constant {n.name} is unused"
    assert count_op(out, "Constant") == 0
    # the original weights are replaced, not kept beside the folded ones
    assert len(out.graph.initializer) == 4


def test_input_model_is_not_mutated_and_inplace_works():
    model = resnet_block_model(seed=19)
    before = model.SerializeToString()
    out, _ = fold_onnx(model)
    assert model.SerializeToString() == before
    assert out is not model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    out2, report = fold_onnx(copy, inplace=True)
    assert report.n_folded == 5
    check_valid(out2)
    assert_equivalent(model, out2)
    assert out2.SerializeToString() == out.SerializeToString()


def test_fold_is_deterministic_and_idempotent():
    model = resnet_block_model(seed=20)
    out1, _ = fold_onnx(model)
    out2, _ = fold_onnx(model)
    assert out1.SerializeToString() == out2.SerializeToString()
    again, report = fold_onnx(out1)
    assert report.n_folded == 0 and report.n_skipped == 0
    assert_equivalent(out1, again)


@pytest.mark.parametrize("as_type", [str, Path])
def test_fold_from_path_leaves_file_unchanged(tmp_path, as_type):
    model = resnet_block_model(seed=21)
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))
    before = path.read_bytes()
    out, report = fold_onnx(as_type(str(path)))
    assert path.read_bytes() == before
    assert report.n_folded == 5
    assert_equivalent(model, out)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_fold_file_writes_an_equivalent_model(tmp_path):
    model = resnet_block_model(seed=22)
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save_model(model, str(src))
    before = src.read_bytes()
    report = fold_file(str(src), str(dst))
    assert src.read_bytes() == before
    assert report.n_folded == 5
    out = onnx.load(str(dst))
    check_valid(out)
    assert_equivalent(model, out)
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "out.onnx"]  # no temp files left


def test_fold_file_overwrites_an_existing_output(tmp_path):
    model = resnet_block_model(seed=23)
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save_model(model, str(src))
    dst.write_bytes(b"old contents")
    fold_file(src, dst)
    assert_equivalent(model, onnx.load(str(dst)))


def _save_external(model: onnx.ModelProto, path: Path, location: str) -> None:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(
        copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=0
    )


def test_external_data_model_folds(tmp_path):
    model = resnet_block_model(seed=24)
    src_dir, dst_dir = tmp_path / "src", tmp_path / "dst"
    src_dir.mkdir()
    dst_dir.mkdir()
    src = src_dir / "m.onnx"
    _save_external(model, src, "m.weights")
    before = {p.name: p.read_bytes() for p in src_dir.iterdir()}

    out, report = fold_onnx(str(src))
    assert report.n_folded == 5
    assert_equivalent(model, out)

    dst = dst_dir / "folded.onnx"
    report = fold_file(str(src), str(dst))
    assert report.n_folded == 5
    assert {p.name: p.read_bytes() for p in src_dir.iterdir()} == before  # inputs untouched
    folded = onnx.load(str(dst))  # loads external data relative to dst
    check_valid(folded)
    assert_equivalent(model, folded)
    # onnxruntime loads it from the path, with its external data
    feeds = random_feeds(model)
    names = [o.name for o in model.graph.output]
    got = ort_session(str(dst)).run(names, feeds)
    ref = run_model(model, feeds)
    for n, v in zip(names, got):
        np.testing.assert_allclose(v, ref[n], rtol=1e-4, atol=1e-4 * np.abs(ref[n]).max())


def test_wrong_fold_is_detected():
    """The comparison can fail: scaling one output channel's folded weight by 1.001 is caught."""
    model = conv_bn_model(CONV_CASES["2d"], True)
    out, _ = fold_and_check(model, ["bn"])
    conv = out.graph.node[0]
    for t in out.graph.initializer:
        if t.name == conv.input[1]:
            w = numpy_helper.to_array(t).copy()
            w[2] *= np.float32(1.001)
            t.CopyFrom(numpy_helper.from_array(w, t.name))
    with pytest.raises(AssertionError):
        assert_equivalent(model, out)


def test_wrong_bias_is_detected():
    model = gemm_bn_model(1, 1.0, 1.0, "N")
    out, _ = fold_and_check(model, ["bn"])
    for t in out.graph.initializer:
        v = numpy_helper.to_array(t)
        if v.ndim == 1 or (v.ndim == 2 and v.shape[0] == 1):
            v = v.copy()
            v.flat[0] += np.float32(1e-3) * max(1.0, float(np.abs(v).max()))
            t.CopyFrom(numpy_helper.from_array(v, t.name))
    with pytest.raises(AssertionError):
        assert_equivalent(model, out)


# -- the sample models -------------------------------------------------------------------------

SAMPLES_DIR = Path(__file__).resolve().parent.parent / "sample_models"
SAMPLE_BNS = {"resnet_mini.onnx": 12, "mobilenet_mini.onnx": 10, "convtranspose_decoder.onnx": 4, "mlp.onnx": 3}


def _load_sample_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_samples", SAMPLES_DIR / "make_samples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sample_models_are_reproducible(tmp_path):
    """The committed .onnx files are exactly what make_samples.py writes."""
    paths = _load_sample_script().write_samples(str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths) == sorted(SAMPLE_BNS)
    for p in paths:
        committed = SAMPLES_DIR / os.path.basename(p)
        assert committed.read_bytes() == Path(p).read_bytes(), f"{committed.name} is stale: rerun make_samples.py"


@pytest.mark.parametrize("name", sorted(SAMPLE_BNS))
def test_sample_model_folds_completely(name):
    path = SAMPLES_DIR / name
    assert path.stat().st_size < 1_000_000
    model = onnx.load(str(path))
    assert count_op(model, "BatchNormalization") == SAMPLE_BNS[name]
    out, report = fold_onnx(str(path))
    assert report.n_folded == SAMPLE_BNS[name] and not report.skipped
    assert count_op(out, "BatchNormalization") == 0
    check_valid(out)
    assert_equivalent(model, out, trials=3)


# -- older IR versions and pre-inferred shapes -------------------------------------------------


def test_ir_version_3_model_folds_and_stays_valid():
    """IR 3: initializers must be graph inputs (onnxruntime treats them as constants there)."""
    g = GraphBuilder(seed=30)
    x = g.input("x", [1, 3, 5, 5])
    g.output(g.bn(g.conv(x, "conv", 3, 4, (3, 3)), "bn", 4), shape=[1, 4, 3, 3])
    model = g.model(ir_version=3, opset=8, check=False)
    for t in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    onnx.checker.check_model(model, full_check=True)
    out, report = fold_onnx(model)
    assert [f.bn for f in report.folded] == ["bn"]
    assert out.ir_version == 3
    assert out.graph.input[0].name == "x"
    assert_equivalent(model, out)
    onnx.checker.check_model(out, full_check=True)


def test_model_with_inferred_value_info_folds():
    """Shape inference already ran (value_info for every intermediate): the result stays valid."""
    model = onnx.shape_inference.infer_shapes(resnet_block_model(seed=31))
    assert len(model.graph.value_info) > 5
    out, _ = fold_and_check(model, ["stem_bn", "bn1", "bn2", "dw_bn", "head_bn"])
    defined = set(defined_names(out.graph))
    for vi in out.graph.value_info:
        assert vi.name in defined, f"value_info for '{vi.name}', which no longer exists"


def test_gemm_bias_per_row():
    """Gemm C of shape [M, 1] (fixed batch): a per-row bias, folded or refused but exact."""
    g = GraphBuilder(seed=32)
    x = g.input("x", [3, 4])
    g.node("Gemm", [x, g.init("W", g.weight((4, 5))), g.init("C", g.weight((3, 1)))], "h", "gemm", beta=0.5)
    g.output(g.bn("h", "bn", 5))
    model = g.model()
    out, _ = fold_onnx(model)
    check_valid(out)
    assert_equivalent(model, out)


@pytest.mark.parametrize(
    "x_dtype,scale_dtype,stat_dtype",
    [(np.float32, np.float16, np.float32), (np.float16, np.float32, np.float16), (np.float16, np.float32, np.float32)],
)
def test_bn15_mixed_parameter_dtypes(x_dtype, scale_dtype, stat_dtype):
    """BN-15 types scale/B (T1) and mean/var (T2) separately from X: the conv keeps X's dtype."""
    g = GraphBuilder(seed=33, dtype=x_dtype)
    x = g.input("x", [1, 3, 5, 5])
    y = g.conv(x, "conv", 3, 4, (3, 3))
    stats = {k: v.astype(scale_dtype if k in ("scale", "B") else stat_dtype) for k, v in bn_stats(g.rng, 4).items()}
    g.output(g.bn(y, "bn", 4, stats=stats))
    out, _ = fold_and_check(g.model(opset=15), ["bn"], "conv-bn")
    for name in out.graph.node[0].input[1:]:
        assert tensor_value(out, name).dtype == x_dtype


def test_bn_parameters_as_constant_value_floats():
    """Constant nodes may carry value_floats instead of a tensor."""
    g = GraphBuilder(seed=34)
    x = g.input("x", [1, 3, 5, 5])
    y = g.conv(x, "conv", 3, 4, (3, 3))
    stats = bn_stats(g.rng, 4)
    names = []
    for k in ("scale", "B", "mean", "var"):
        g.nodes.append(helper.make_node("Constant", [], [f"c_{k}"], name=f"const_{k}", value_floats=stats[k].tolist()))
        names.append(f"c_{k}")
    g.node("BatchNormalization", [y, *names], "out", "bn")
    g.output("out")
    out, _ = fold_and_check(g.model(), ["bn"], "conv-bn")
    assert count_op(out, "Constant") == 0


def test_fold_path_imports_neither_onnxruntime_nor_torch(tmp_path):
    """The ONNX fold itself needs only onnx and numpy (checked in a fresh interpreter)."""
    import subprocess
    import sys

    path = tmp_path / "m.onnx"
    onnx.save_model(resnet_block_model(seed=35), str(path))
    code = (
        "import sys, bnfold\n"
        "from bnfold.onnx_pass import fold_onnx\n"
        f"model, report = fold_onnx({str(path)!r})\n"
        "assert report.n_folded == 5\n"
        "print(sorted(m for m in ('onnxruntime', 'torch') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"

"""One regression test per public bug listed in /work/shared/PRIOR_ART.md, on the ONNX side.

Each test names the report it guards against. They overlap with test_onnx_fold.py and
test_onnx_refusals.py on purpose: these are the cases other tools got wrong, kept in one place.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfold.onnx_pass import fold_onnx
from onnx_models import (
    GraphBuilder,
    assert_equivalent,
    bn_stats,
    check_valid,
    count_op,
    defined_names,
    find_node,
    ort_session,
    random_feeds,
    run_model,
    tensor_value,
)


def _folded_names(report):
    return {f.bn for f in report.folded}


# -- grouped ConvTranspose: pytorch#180995, ultralytics PR #25364, onnxscript#2867, onnx/optimizer#106


@pytest.mark.parametrize("c_in,c_out,groups", [(4, 4, 2), (6, 4, 2), (4, 6, 2), (6, 9, 3), (4, 4, 4)])
def test_grouped_conv_transpose_scales_the_right_weights(c_in, c_out, groups):
    g = GraphBuilder(seed=c_in * 10 + c_out)
    x = g.input("x", [1, c_in, 4, 4])
    y = g.conv(x, "convt", c_in, c_out, (3, 3), group=groups, op="ConvTranspose", strides=[2, 2])
    stats = bn_stats(g.rng, c_out)
    g.output(g.bn(y, "bn", c_out, stats=stats))
    model = g.model()
    out, report = fold_onnx(model)
    assert _folded_names(report) == {"bn"}
    check_valid(out)
    assert_equivalent(model, out)
    # independently: output channel grp * (C_out/g) + j lives at [rows of group grp, j]
    w = tensor_value(model, "convt_W").astype(np.float64)
    a = stats["scale"].astype(np.float64) / np.sqrt(stats["var"].astype(np.float64) + np.float32(1e-5))
    per_out, rows = c_out // groups, c_in // groups
    expected = w.copy()
    for row in range(c_in):
        for j in range(per_out):
            expected[row, j] *= a[(row // rows) * per_out + j]
    got = tensor_value(out, out.graph.node[0].input[1])
    np.testing.assert_allclose(got, expected.astype(np.float32), rtol=2e-7, atol=1e-30)


# -- shared conv / shared weight: pytorch#197539, Tencent/TNN#808, onnxscript PR #2883


def test_shared_weight_other_path_is_bit_identical():
    g = GraphBuilder(seed=1)
    x = g.input("x", [1, 3, 6, 6])
    w, b = g.init("W", g.weight((4, 3, 3, 3))), g.init("B", g.weight((4,)))
    g.node("Conv", [x, w, b], "c1", "conv1")
    g.node("Conv", [x, w, b], "c2", "conv2")
    g.output(g.bn("c1", "bn1", 4))
    g.output(g.node("Relu", ["c2"], "other", "relu").output[0])
    model = g.model()
    out, report = fold_onnx(model)
    assert _folded_names(report) == {"bn1"}
    feeds = random_feeds(model)
    # the path that had no BN runs the very same op on the very same weights
    np.testing.assert_array_equal(run_model(out, feeds)["other"], run_model(model, feeds)["other"])
    assert_equivalent(model, out)


def test_shared_weight_two_different_bns():
    g = GraphBuilder(seed=2)
    x = g.input("x", [1, 3, 6, 6])
    w = g.init("W", g.weight((4, 3, 3, 3)))
    g.node("Conv", [x, w], "c1", "conv1")
    g.node("Conv", [x, w], "c2", "conv2", strides=[2, 2])
    g.output(g.bn("c1", "bn1", 4))
    g.output(g.bn("c2", "bn2", 4))
    model = g.model()
    out, report = fold_onnx(model)
    assert _folded_names(report) == {"bn1", "bn2"}
    assert find_node(out.graph, "conv1").input[1] != find_node(out.graph, "conv2").input[1]
    assert_equivalent(model, out)


# -- Linear + BN1d on a 3-D input: pytorch/ao#4116 (only feature counts were compared)


def test_matmul_on_3d_input_with_matching_counts_is_not_folded():
    g = GraphBuilder(seed=3)
    x = g.input("x", [2, 5, 7])  # [N, L, K] with L == N_out == 5: counts agree, axes do not
    g.node("MatMul", [x, g.init("W", g.weight((7, 5)))], "mm", "matmul")
    g.output(g.bn("mm", "bn", 5))
    model = g.model()
    out, report = fold_onnx(model)
    assert not report.folded
    assert report.skipped[0].reason in {"not-per-channel", "shape-unknown"}
    assert_equivalent(model, out)


# -- Mul/Add broadcasting: onnxslim ConvMul ([C] broadcasts on the last axis, not on channels)


@pytest.mark.parametrize("op", ["Add", "Mul"])
@pytest.mark.parametrize("const_shape", [(4,), (4, 1, 1), (1, 4, 1, 1), (1,)])
def test_conv_then_elementwise_constant_then_bn(op, const_shape):
    """Width == channels == 4 makes a [4] constant shape-valid; it must not be taken per channel."""
    g = GraphBuilder(seed=4)
    x = g.input("x", [1, 3, 6, 6])
    y = g.conv(x, "conv", 3, 4, (3, 3), pads=[1, 0, 1, 0])  # output [1, 4, 6, 4]
    vals = np.random.default_rng(5).uniform(0.5, 1.5, const_shape).astype(np.float32)
    g.node(op, [y, g.init("k", vals)], "e", "elementwise")
    g.output(g.bn("e", "bn", 4))
    model = g.model()
    assert tuple(d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim) == (1, 4, 6, 4)
    out, report = fold_onnx(model)
    assert "bn" in {f.bn for f in report.folded} | {s.bn for s in report.skipped}
    check_valid(out)
    assert_equivalent(model, out)


def test_matmul_add_with_batch_shaped_bias():
    """An Add constant of shape [M, N] is not a per-feature bias; the fold must stay exact."""
    g = GraphBuilder(seed=6)
    x = g.input("x", [3, 4])
    g.node("MatMul", [x, g.init("W", g.weight((4, 5)))], "mm", "matmul")
    g.node("Add", ["mm", g.init("bias", g.weight((3, 5)))], "a", "add")
    g.output(g.bn("a", "bn", 5))
    model = g.model()
    out, report = fold_onnx(model)
    check_valid(out)
    assert_equivalent(model, out)


# -- float16: pytorch PR #134105, apple/coreai-torch PR #54


def test_float16_overflow_is_refused_not_written_as_inf():
    g = GraphBuilder(seed=7, dtype=np.float16)
    x = g.input("x", [1, 2, 3, 3])
    g.node("Conv", [x, g.init("W", np.full((2, 2, 1, 1), 1000.0, np.float16))], "c", "conv")
    stats = {k: np.ones(2, np.float16) for k in ("scale", "var")}
    stats.update(B=np.zeros(2, np.float16), mean=np.zeros(2, np.float16))
    stats["scale"][:] = 100.0  # a = 100: 1000 * 100 > 65504
    g.output(g.bn("c", "bn", 2, stats=stats))
    model = g.model()
    out, report = fold_onnx(model)
    assert [s.reason for s in report.skipped] == ["overflow"]
    for t in out.graph.initializer:
        assert np.all(np.isfinite(numpy_helper.to_array(t).astype(np.float64)))


def test_bn15_mixed_precision_gives_a_valid_model():
    g = GraphBuilder(seed=8, dtype=np.float16)
    x = g.input("x", [1, 3, 5, 5])
    y = g.conv(x, "conv", 3, 4, (3, 3))
    g.output(g.bn(y, "bn", 4, param_dtype=np.float32))
    model = g.model(opset=15)
    out, report = fold_onnx(model)
    assert _folded_names(report) == {"bn"}
    check_valid(out)
    ort_session(out)  # onnxruntime loads it: no float32 tensor feeds a float16 Conv
    assert {tensor_value(out, n).dtype for n in out.graph.node[0].input[1:]} == {np.dtype(np.float16)}
    assert_equivalent(model, out)


# -- training-mode BN: onnxscript folds training_mode=1


def test_training_mode_bn_is_never_folded():
    g = GraphBuilder(seed=9)
    x = g.input("x", [2, 3, 5, 5])
    y = g.conv(x, "conv", 3, 4, (3, 3))
    g.output(g.bn(y, "bn", 4, training_mode=1, outputs=["y", "rm", "rv"]))
    model = g.model(opset=15)
    out, report = fold_onnx(model)
    assert [s.reason for s in report.skipped] == ["training-mode"]
    assert_equivalent(model, out)  # onnxruntime uses batch statistics here: a fold would differ


# -- initializer that is also a graph input: onnxslim, onnxsim


def test_overridable_initializer_is_not_a_constant():
    g = GraphBuilder(seed=10)
    x = g.input("x", [1, 3, 5, 5])
    y = g.conv(x, "conv", 3, 4, (3, 3))
    g.output(g.bn(y, "bn", 4))
    model = g.model()
    model.graph.input.append(helper.make_tensor_value_info("conv_W", onnx.TensorProto.FLOAT, [4, 3, 3, 3]))
    out, report = fold_onnx(model)
    assert [s.reason for s in report.skipped] == ["overridable-initializer"]
    override = {"conv_W": np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32)}
    assert_equivalent(model, out, feeds=override)


# -- name clashes: onnx/optimizer#174, onnxscript PR #2680


def test_unnamed_nodes_sharing_a_weight_get_distinct_tensors():
    """Two unnamed convs on one weight: names derived from the node or the weight would collide."""
    g = GraphBuilder(seed=11)
    x = g.input("x", [1, 3, 5, 5])
    w = g.init("W", g.weight((2, 3, 3, 3)))
    for i in range(2):
        g.nodes.append(helper.make_node("Conv", [x, w], [f"c{i}"], strides=[i + 1, i + 1]))  # no name
        g.output(g.bn(f"c{i}", f"bn{i}", 2))
    g.nodes[-1].name = ""  # an unnamed BN too
    model = g.model()
    out, report = fold_onnx(model)
    assert report.n_folded == 2
    names = defined_names(out.graph)
    assert len(names) == len(set(names))
    assert out.graph.node[0].input[1] != out.graph.node[1].input[1]
    check_valid(out)
    assert_equivalent(model, out)


def test_names_the_folder_itself_would_pick_are_already_taken():
    """Take the names bnfold gives new tensors (learned from a first fold), then fold a model
    where those names already exist and are used."""
    g = GraphBuilder(seed=12)
    x = g.input("x", [1, 3, 5, 5])
    g.output(g.bn(g.conv(x, "conv", 3, 4, (3, 3), bias=False), "bn", 4))
    probe, _ = fold_onnx(g.model())
    new_names = [n for n in probe.graph.node[0].input[1:]]

    g = GraphBuilder(seed=12)
    x = g.input("x", [1, 3, 5, 5])
    g.output(g.bn(g.conv(x, "conv", 3, 4, (3, 3), bias=False), "bn", 4))
    other = g.input("z", [4, 1, 1])  # the taken names feed a path nothing can fold into
    for i, name in enumerate(new_names):
        g.init(name, g.weight((4, 1, 1)))
        other = g.node("Add", [other, name], f"s{i}", f"add{i}").output[0]
    g.output(other)
    model = g.model()
    out, report = fold_onnx(model)
    assert "bn" in _folded_names(report)
    names = defined_names(out.graph)
    assert len(names) == len(set(names))
    for name in new_names:
        np.testing.assert_array_equal(tensor_value(out, name), tensor_value(model, name))
    assert_equivalent(model, out)


# -- Gemm alpha/beta: onnxscript PR #3027


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_alpha_and_beta_are_folded_in(trans_b):
    g = GraphBuilder(seed=13)
    x = g.input("x", [3, 4])
    w = g.init("W", g.weight((5, 4) if trans_b else (4, 5)))
    g.node("Gemm", [x, w, g.init("C", g.weight((5,)))], "h", "gemm", alpha=0.37, beta=-2.5, transB=trans_b)
    g.output(g.bn("h", "bn", 5))
    model = g.model()
    out, report = fold_onnx(model)
    assert _folded_names(report) == {"bn"}
    assert_equivalent(model, out)


# -- tolerances: a check at ORT's default level compares two fused models; rtol=1 accepts anything


def test_equivalence_helper_runs_without_graph_optimizations():
    import onnxruntime as ort

    g = GraphBuilder(seed=14)
    x = g.input("x", [1, 3, 5, 5])
    g.output(g.bn(g.conv(x, "conv", 3, 4, (3, 3)), "bn", 4))
    sess = ort_session(g.model())
    assert sess.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL


def test_bnfold_check_catches_a_small_wrong_fold(tmp_path):
    """bnfold's own verifier (not only this suite's helper) rejects a 1 % error on one channel."""
    from bnfold import check

    g = GraphBuilder(seed=15)
    x = g.input("x", [1, 3, 6, 6])
    g.output(g.bn(g.conv(x, "conv", 3, 4, (3, 3)), "bn", 4))
    model = g.model()
    out, _ = fold_onnx(model)
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save_model(out, str(good))
    conv = out.graph.node[0]
    for t in out.graph.initializer:
        if t.name == conv.input[1]:
            w = numpy_helper.to_array(t).copy()
            w[1] *= np.float32(1.01)
            t.CopyFrom(numpy_helper.from_array(w, t.name))
    onnx.save_model(out, str(bad))
    orig = tmp_path / "orig.onnx"
    onnx.save_model(model, str(orig))
    assert check(str(orig), str(good))
    assert not check(str(orig), str(bad))


# -- onnxoptimizer rewrites BN into Add/Sqrt/Div/Mul for a later constant folder


def test_fold_computes_weights_instead_of_emitting_arithmetic():
    g = GraphBuilder(seed=16)
    x = g.input("x", [1, 3, 5, 5])
    g.output(g.bn(g.conv(x, "conv", 3, 4, (3, 3)), "bn", 4))
    model = g.model()
    out, _ = fold_onnx(model)
    assert [n.op_type for n in out.graph.node] == ["Conv"]
    assert len(out.graph.initializer) == 2


# -- onnxoptimizer: shape problems raise instead of skipping


def test_unknown_shapes_are_skipped_not_raised():
    g = GraphBuilder(seed=17)
    g.inputs.append(helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None))
    g.node("MatMul", ["x", g.init("W", g.weight((4, 3)))], "mm", "matmul")
    g.output(g.bn("mm", "bn", 3), shape=None)
    model = g.model(check=False)
    out, report = fold_onnx(model)  # must not raise
    assert not report.folded and report.skipped[0].reason in {"shape-unknown", "not-per-channel"}
    assert count_op(out, "BatchNormalization") == 1


# -- onnxslim's slim() changes the caller's model in place


def test_caller_model_is_not_changed():
    g = GraphBuilder(seed=18)
    x = g.input("x", [1, 3, 5, 5])
    g.output(g.bn(g.conv(x, "conv", 3, 4, (3, 3)), "bn", 4))
    model = g.model()
    before = model.SerializeToString()
    fold_onnx(model)
    assert model.SerializeToString() == before


# -- onnxscript skips Constant-node parameters


def test_constant_node_parameters_are_folded():
    g = GraphBuilder(seed=19)
    x = g.input("x", [1, 3, 5, 5])
    y = g.conv(x, "conv", 3, 4, (3, 3), kind="const")
    g.output(g.bn(y, "bn", 4, kind="const"))
    model = g.model()
    out, report = fold_onnx(model)
    assert _folded_names(report) == {"bn"}
    assert count_op(out, "BatchNormalization") == 0
    assert_equivalent(model, out)

"""Issue #5 as a user would try it: a TensorFlow-style model (BNs written as Mul/Add, a Conv1D
exported as Conv -> Squeeze -> Add -> Mul -> Add, a Dense -> BN head as Gemm -> Mul -> Add) and
a model with a BN1d before its classifier. bnfold must leave no more BN/Mul/Add/Sub/Div than
onnxruntime's basic level (which fuses Conv+BN, Conv+Mul, Conv+Add itself), and fewer where
an issue #5 rule applies."""

from __future__ import annotations

import numpy as np
import onnx

from bnfold.onnx_pass import fold_onnx
from onnx_models import GraphBuilder, assert_equivalent, check_valid, count_op

AFFINE = ("BatchNormalization", "Mul", "Add", "Sub", "Div")


def tf_style_model() -> onnx.ModelProto:
    g = GraphBuilder(seed=0)
    rng = np.random.default_rng(1)
    x = g.input("x", [1, 3, 8, 8])
    # Conv2D + BN written as Mul/Add with [C,1,1] constants
    h = g.conv(x, "c1", 3, 6, (3, 3), bias=False)
    h = g.node("Mul", [h, g.init("s1", rng.uniform(0.5, 1.5, (6, 1, 1)).astype(np.float32))], "m1", "bn1_mul").output[0]
    h = g.node("Add", [h, g.init("b1", rng.normal(0, 1, (6, 1, 1)).astype(np.float32))], "a1", "bn1_add").output[0]
    h = g.node("Relu", [h], "r1", "relu1").output[0]  # [1, 6, 6, 6]
    # Conv1D: Conv over [N, C, 1, L] -> Squeeze -> bias Add -> BN as Mul/Add
    h = g.node("Reshape", [h, g.init("to_1d", np.array([1, 6, 1, 36], np.int64))], "flat", "to_conv1d").output[0]
    h = g.conv(h, "c2", 6, 5, (1, 3), bias=False)  # [1, 5, 1, 34]
    h = g.node("Squeeze", [h, g.init("axes", np.array([2], np.int64))], "sq", "squeeze").output[0]
    h = g.node("Add", [h, g.init("b2", rng.normal(0, 1, (5, 1)).astype(np.float32))], "a2", "conv1d_bias").output[0]
    h = g.node("Mul", [h, g.init("s3", rng.uniform(0.5, 1.5, (5, 1)).astype(np.float32))], "m3", "bn2_mul").output[0]
    h = g.node("Add", [h, g.init("b3", rng.normal(0, 1, (5, 1)).astype(np.float32))], "a3", "bn2_add").output[0]
    h = g.node("Relu", [h], "r2", "relu2").output[0]
    h = g.node("ReduceMean", [h, g.init("ax", np.array([2], np.int64))], "pool", "pool", keepdims=0).output[0]  # [1, 5]
    # Dense -> BN exported as Gemm -> Mul -> Add with [N] constants
    g.node("Gemm", [h, g.init("W", g.weight((4, 5))), g.init("C", g.weight((4,)))], "d", "dense", transB=1)
    h = g.node("Mul", ["d", g.init("s4", rng.uniform(0.5, 1.5, (4,)).astype(np.float32))], "m4", "bn3_mul").output[0]
    g.output(g.node("Add", [h, g.init("b4", rng.normal(0, 1, (4,)).astype(np.float32))], "y", "bn3_add").output[0])
    return g.model(opset=18)


def bn1d_classifier_model() -> onnx.ModelProto:
    g = GraphBuilder(seed=2)
    x = g.input("x", ["N", 3, 8, 8])
    h = g.bn(g.conv(x, "c1", 3, 8, (3, 3), pads=[1, 1, 1, 1]), "bn_conv", 8)
    h = g.node("Relu", [h], "r", "relu").output[0]
    h = g.node("GlobalAveragePool", [h], "gap", "gap").output[0]
    h = g.node("Flatten", [h], "flat", "flatten").output[0]
    h = g.bn(h, "bn1d", 8)
    g.output(g.node("Gemm", [h, g.init("W", g.weight((10, 8))), g.init("C", g.weight((10,)))], "y", "fc", transB=1).output[0])
    return g.model()


def ort_basic(model: onnx.ModelProto, tmp_path) -> onnx.ModelProto:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(tmp_path / "ort_basic.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    return onnx.load(opts.optimized_model_filepath)


def affine_count(model: onnx.ModelProto) -> int:
    return sum(count_op(model, op) for op in AFFINE)


def test_tf_style_model_against_ort_basic(tmp_path):
    model = tf_style_model()
    ours, report = fold_onnx(model)
    theirs = ort_basic(model, tmp_path)
    check_valid(ours)
    assert_equivalent(model, ours)
    # every per-channel Mul/Add is gone; the folds are named in the report
    assert affine_count(ours) == 0, [n.op_type for n in ours.graph.node]
    rules = {e["node"]: e["rule"] for e in report.extra["affine_folded"]}
    assert rules == {"bn1_mul": "conv-affine", "conv1d_bias": "conv-layout-affine", "bn3_mul": "gemm-affine"}
    # onnxruntime's basic level keeps at least the Dense head's Mul/Add
    assert affine_count(ours) < affine_count(theirs)


def test_bn1d_before_classifier_against_ort_basic(tmp_path):
    model = bn1d_classifier_model()
    ours, report = fold_onnx(model)
    theirs = ort_basic(model, tmp_path)
    check_valid(ours)
    assert_equivalent(model, ours)
    assert count_op(ours, "BatchNormalization") == 0
    assert {f.bn: f.rule for f in report.folded} == {"bn_conv": "conv-bn", "bn1d": "bn-gemm"}
    assert affine_count(ours) < affine_count(theirs)  # ORT leaves the BN1d

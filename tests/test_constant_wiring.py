"""The ONNX pass reads every constant through the resolver (issue 11 item 1): parameters behind
constant subgraphs fold, what is not a true constant is refused with the resolver's reason code,
constant subgraphs go only when nothing reads them any more, and the report lists what was
evaluated (item 5). Shapes are never proven from a value a caller can replace (issue 12)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from bnfold.onnx_pass import fold_onnx
from bnfold.report import REASONS
from onnx_models import assert_equivalent, count_op

C = 4


def _conv_bn(bias_nodes, bias_name, extra_inits=(), extra_inputs=(), opset=13, extra_outputs=(), domains=()):
    """x -> Conv(W, bias_name) -> BN, with ``bias_nodes`` computing the bias."""
    rng = np.random.default_rng(3)
    inits = [nh.from_array(rng.normal(size=(C, 3, 3, 3)).astype(np.float32), "W")]
    for n, v in (("s", rng.uniform(0.5, 1.5, C)), ("b", rng.normal(size=C)), ("m", rng.normal(size=C)),
                 ("v", rng.uniform(0.5, 1.5, C))):
        inits.append(nh.from_array(v.astype(np.float32), n))
    inits += list(extra_inits)
    nodes = list(bias_nodes) + [
        h.make_node("Conv", ["x", "W", bias_name], ["c"], name="conv", pads=[1, 1, 1, 1]),
        h.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn"),
    ]
    inputs = [h.make_tensor_value_info("x", T.FLOAT, [2, 3, 5, 5])] + list(extra_inputs)
    outputs = [h.make_tensor_value_info("y", T.FLOAT, [2, C, 5, 5])] + list(extra_outputs)
    g = h.make_graph(nodes, "g", inputs, outputs, inits)
    model = h.make_model(g, opset_imports=[h.make_opsetid("", opset)] + [h.make_opsetid(d, 1) for d in domains])
    onnx.checker.check_model(model, full_check=True)
    return model


def _bias(name="B0"):
    return nh.from_array(np.random.default_rng(5).normal(size=C).astype(np.float32), name)


def test_deduplicated_bias_folds_and_its_identity_goes():
    model = _conv_bn([h.make_node("Identity", ["B0"], ["bias"])], "bias", [_bias()])
    folded, report = fold_onnx(model)
    assert [f.bn for f in report.folded] == ["bn"]
    assert count_op(folded, "Identity") == 0 and count_op(folded, "BatchNormalization") == 0
    assert "B0" not in {t.name for t in folded.graph.initializer}  # nothing reads it any more
    assert_equivalent(model, folded)
    c = report.extra["constants"]
    assert c["subgraphs"] == 1 and c["nodes"] == 1 and c["evaluated"][0]["value"] == "bias"
    assert "evaluated 1 constant subgraph(s): 1 op(s)" in report.summary(verbose=True)
    assert json.loads(report.to_json())["constants"]["subgraphs"] == 1


def test_constant_subgraph_still_read_elsewhere_stays():
    # the Identity's output is also a graph output, and B0 is read by a second node
    nodes = [h.make_node("Identity", ["B0"], ["bias"]), h.make_node("Neg", ["B0"], ["negb"])]
    outs = [h.make_tensor_value_info("bias", T.FLOAT, [C]), h.make_tensor_value_info("negb", T.FLOAT, [C])]
    model = _conv_bn(nodes, "bias", [_bias()], extra_outputs=outs)
    folded, report = fold_onnx(model)
    assert [f.bn for f in report.folded] == ["bn"]
    assert count_op(folded, "Identity") == 1 and count_op(folded, "Neg") == 1
    assert "B0" in {t.name for t in folded.graph.initializer}
    onnx.checker.check_model(folded, full_check=True)
    assert_equivalent(model, folded)


def test_plain_model_reports_no_constant_subgraphs():
    model = _conv_bn([], "B0", [_bias()])
    folded, report = fold_onnx(model)
    assert report.n_folded == 1 and "constants" not in report.extra
    assert "constant subgraph" not in report.summary(verbose=True)


def _refused(model, reason, feeds=None, run=True):
    before = model.SerializeToString()
    folded, report = fold_onnx(model)
    assert model.SerializeToString() == before
    assert not report.folded, report.to_dict()
    assert [s.reason for s in report.skipped] == [reason], [(s.reason, s.detail) for s in report.skipped]
    assert reason in REASONS
    assert count_op(folded, "BatchNormalization") == 1
    if run:
        assert_equivalent(model, folded, feeds=feeds)
    return report


def test_bias_reading_a_graph_input_is_not_constant():
    nodes = [h.make_node("Add", ["B0", "z"], ["bias"])]
    model = _conv_bn(nodes, "bias", [_bias()], [h.make_tensor_value_info("z", T.FLOAT, [C])])
    report = _refused(model, "not-constant")
    assert "graph input" in report.skipped[0].detail


def test_bias_through_an_overridable_initializer_is_refused():
    nodes = [h.make_node("Identity", ["B0"], ["bias"])]
    model = _conv_bn(nodes, "bias", [_bias()], [h.make_tensor_value_info("B0", T.FLOAT, [C])])
    _refused(model, "overridable-initializer", feeds={"B0": np.full(C, 3.0, np.float32)})


def test_bias_from_a_random_op_is_refused():
    nodes = [h.make_node("RandomNormal", [], ["bias"], shape=[C], dtype=T.FLOAT, seed=1.0)]
    _refused(_conv_bn(nodes, "bias"), "nondeterministic-op", run=False)  # outputs differ run to run


def test_bias_from_another_domain_is_refused():
    nodes = [h.make_node("Gelu", ["B0"], ["bias"], domain="com.microsoft")]
    model = _conv_bn(nodes, "bias", [_bias()], domains=["com.microsoft"])
    _refused(model, "foreign-domain")


def test_bias_over_the_size_bound_is_refused():
    # 2-D, so that onnx's data propagation in shape inference does not take seconds on it
    big = nh.from_array(np.array([8192, 8192], np.int64), "big")
    half = nh.from_array(np.array([0.5], np.float32), "half")
    st, en = nh.from_array(np.array([0, 0], np.int64), "st"), nh.from_array(np.array([1, C], np.int64), "en")
    shape = nh.from_array(np.array([C], np.int64), "shape")
    nodes = [
        h.make_node("Expand", ["half", "big"], ["filled"]),
        h.make_node("Slice", ["filled", "st", "en"], ["row"]),
        h.make_node("Reshape", ["row", "shape"], ["bias"]),
    ]
    report = _refused(_conv_bn(nodes, "bias", [big, half, st, en, shape]), "constant-too-large", run=False)
    assert "67108864 elements" in report.skipped[0].detail  # refused before allocating 256 MB


def _conv_reshape_bn(target_is_input: bool):
    rng = np.random.default_rng(0)
    inits = [nh.from_array(rng.normal(size=(C, 3, 1, 1)).astype(np.float32), "W"),
             nh.from_array(np.array([1, C, 2, 8], np.int64), "shp")]
    inits += [nh.from_array(rng.uniform(0.5, 1.5, C).astype(np.float32), n) for n in ("s", "b", "m", "v")]
    nodes = [h.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             h.make_node("Reshape", ["c", "shp"], ["r"], name="reshape"),
             h.make_node("BatchNormalization", ["r", "s", "b", "m", "v"], ["y"], name="bn")]
    inputs = [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 4, 4])]
    if target_is_input:
        inputs.append(h.make_tensor_value_info("shp", T.INT64, [4]))
    g = h.make_graph(nodes, "g", inputs, [h.make_tensor_value_info("y", T.FLOAT, None)], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 13)])


def test_reshape_target_is_proof_only_when_it_is_a_true_constant():
    model = _conv_reshape_bn(False)
    folded, report = fold_onnx(model)
    assert report.n_folded == 1
    assert_equivalent(model, folded)
    # a caller may feed another target, which moves the channels: the fold must not be proven
    # from the default (issue 12)
    model = _conv_reshape_bn(True)
    for target in ([1, C, 2, 8], [C, C, C, 1]):
        _refused(model, "overridable-initializer", feeds={"shp": np.array(target, np.int64)})


@pytest.mark.parametrize("opset", [11, 13])
def test_mul_operand_behind_unsqueeze_folds_with_axes_either_way(opset):
    c = nh.from_array(np.random.default_rng(2).uniform(0.5, 2, C).astype(np.float32), "k")
    if opset < 13:
        uns = h.make_node("Unsqueeze", ["k"], ["cu"], axes=[1, 2])
        inits = [c]
    else:
        uns = h.make_node("Unsqueeze", ["k", "ax"], ["cu"])
        inits = [c, nh.from_array(np.array([1, 2], np.int64), "ax")]
    model = _conv_bn([], "B0", [_bias()] + inits, opset=opset)
    g = model.graph
    bn = g.node[-1]
    bn.output[0] = "t"
    g.node.extend([uns, h.make_node("Mul", ["t", "cu"], ["y"], name="mul")])
    onnx.checker.check_model(model, full_check=True)
    folded, report = fold_onnx(model)
    assert report.n_folded == 1
    assert count_op(folded, "Mul") == 0 and count_op(folded, "Unsqueeze") == 0
    assert not ({"k", "ax"} & {t.name for t in folded.graph.initializer})
    assert_equivalent(model, folded)

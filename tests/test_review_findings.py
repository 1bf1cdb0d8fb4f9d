"""Regressions for what a review of the whole pass found: folds inside subgraphs through the
file path, value names shared by sibling subgraphs, external-data references that bnfold did
not make, and malformed constant subgraphs and attributes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from bnfold.cli import main
from bnfold.errors import EXIT_OK
from bnfold.onnx_pass import fold_onnx
from bnfold.pipeline import fold_file
from onnx_models import assert_equivalent

RNG = np.random.default_rng(7)
V = helper.make_tensor_value_info


def _init(name, *shape):
    return numpy_helper.from_array(RNG.normal(size=shape).astype(np.float32), name)


def _bn(prefix, x, y, c):
    inits = [numpy_helper.from_array(RNG.uniform(0.5, 1.5, c).astype(np.float32), prefix + "s"),
             numpy_helper.from_array(RNG.normal(size=c).astype(np.float32), prefix + "b"),
             numpy_helper.from_array(RNG.normal(size=c).astype(np.float32), prefix + "m"),
             numpy_helper.from_array(RNG.uniform(0.5, 2, c).astype(np.float32), prefix + "v")]
    node = helper.make_node("BatchNormalization", [x] + [prefix + k for k in "sbmv"], [y], name=prefix)
    return node, inits


def _if_model(then_g, else_g, inputs, out_type=None):
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g, name="if")
    graph = helper.make_graph([node], "g", [V("cond", TensorProto.BOOL, [])] + inputs, [V("y", TensorProto.FLOAT, out_type)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_large_fold_inside_a_subgraph_through_the_file_path(tmp_path):
    """New weights of a subgraph must be written into the file (they were left pointing at a
    deleted scratch file when the fold ran file to file)."""
    c = 32
    conv = helper.make_node("Conv", ["x", "tW"], ["tc"], pads=[1, 1, 1, 1], name="tconv")
    bn, bn_inits = _bn("tbn", "tc", "to", c)
    then_g = helper.make_graph([conv, bn], "then", [], [V("to", TensorProto.FLOAT, [1, c, 8, 8])],
                               [_init("tW", c, 16, 3, 3)] + bn_inits)
    else_g = helper.make_graph([helper.make_node("Conv", ["x", "eW"], ["eo"], pads=[1, 1, 1, 1], name="econv")],
                               "else", [], [V("eo", TensorProto.FLOAT, [1, c, 8, 8])], [_init("eW", c, 16, 3, 3)])
    model = _if_model(then_g, else_g, [V("x", TensorProto.FLOAT, [1, 16, 8, 8])], [1, c, 8, 8])
    src, dst = str(tmp_path / "m.onnx"), str(tmp_path / "f.onnx")
    onnx.save(model, src)
    report = fold_file(src, dst, check=False)
    assert [f.bn for f in report.folded] == ["tbn"]
    folded = onnx.load(dst)
    onnx.checker.check_model(folded, full_check=True)
    for cond in (True, False):
        assert_equivalent(model, folded, feeds={"cond": np.array(cond)}, trials=1)


def test_sibling_branches_reusing_a_name_do_not_share_its_shape():
    """then: h is 2-D; else: h is 3-D -> BN -> MatMul. The BN before a MatMul on a 3-D value
    normalizes axis 1 while the MatMul reads the last axis: it must not fold."""
    then_g = helper.make_graph(
        [helper.make_node("Identity", ["x2"], ["h"]), helper.make_node("MatMul", ["h", "tW"], ["t1"]),
         helper.make_node("Unsqueeze", ["t1", "tax"], ["to"])],
        "then", [], [V("to", TensorProto.FLOAT, None)],
        [_init("tW", 4, 5), numpy_helper.from_array(np.array([1], np.int64), "tax")])
    bn, bn_inits = _bn("ebn", "h", "hb", 4)
    else_g = helper.make_graph(
        [helper.make_node("Identity", ["x3"], ["h"]), bn, helper.make_node("MatMul", ["hb", "eW"], ["eo"])],
        "else", [], [V("eo", TensorProto.FLOAT, None)], [_init("eW", 4, 5)] + bn_inits)
    model = _if_model(then_g, else_g, [V("x3", TensorProto.FLOAT, [2, 4, 4]), V("x2", TensorProto.FLOAT, [2, 4])])
    folded, report = fold_onnx(model)
    assert "ebn" not in {f.bn for f in report.folded}
    assert_equivalent(model, folded, feeds={"cond": np.array(False)}, trials=1)


def test_external_reference_in_a_model_proto_is_never_followed(tmp_path):
    """A ModelProto whose weight points (absolutely) at some file: bnfold must not read it."""
    secret = tmp_path / "outside.bin"
    secret.write_bytes(np.full(4 * 3 * 3 * 3, 7.0, np.float32).tobytes())
    w = onnx.TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[4, 3, 3, 3])
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", str(secret)), ("offset", "0"), ("length", str(4 * 27 * 4))):
        w.external_data.add(key=k, value=v)
    conv = helper.make_node("Conv", ["x", "W"], ["c"], name="conv")
    bn, bn_inits = _bn("bn", "c", "y", 4)
    graph = helper.make_graph([conv, bn], "g", [V("x", TensorProto.FLOAT, [1, 3, 5, 5])],
                              [V("y", TensorProto.FLOAT, [1, 4, 3, 3])], [w] + bn_inits)
    folded, report = fold_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert report.n_folded == 0 and report.skipped[0].reason == "unreadable-constant"


def _chain_through(op_nodes, inits):
    """x -> Conv -> (nodes computing a Mul constant from initializers) -> Mul -> y."""
    conv = helper.make_node("Conv", ["x", "W"], ["c"], name="conv")
    mul = helper.make_node("Mul", ["c", "k"], ["y"], name="mul")
    graph = helper.make_graph([conv] + op_nodes + [mul], "g", [V("x", TensorProto.FLOAT, [1, 3, 5, 5])],
                              [V("y", TensorProto.FLOAT, None)], [_init("W", 4, 3, 3, 3)] + inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


MALFORMED = {
    "reshape-size-mismatch": ([helper.make_node("Reshape", ["k0", "shape"], ["k"])],
                              [_init("k0", 4), numpy_helper.from_array(np.array([3, 1, 1], np.int64), "shape")]),
    "squeeze-non-unit-axis": ([helper.make_node("Squeeze", ["k0", "axes"], ["k"])],
                              [_init("k0", 4, 2, 1), numpy_helper.from_array(np.array([1], np.int64), "axes")]),
    "cast-to-unknown-type": ([helper.make_node("Cast", ["k0"], ["k"], to=999)], [_init("k0", 4, 1, 1)]),
    "unsqueeze-axes-not-a-list": ([helper.make_node("Unsqueeze", ["k0"], ["k"], axes=1)], [_init("k0", 4, 1)]),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_constant_subgraph_is_a_clean_outcome(tmp_path, case):
    """onnxruntime rejects these models; bnfold must refuse or report, never crash (exit 70)."""
    model = _chain_through(*MALFORMED[case])
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src))
    result = CliRunner().invoke(main, [str(src), "-o", str(tmp_path / "f.onnx"), "--no-check"],
                                catch_exceptions=False)
    assert result.exit_code in (EXIT_OK, 2), result.output
    assert "internal error" not in result.output

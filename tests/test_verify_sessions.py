"""How the check builds its onnxruntime sessions: extra outputs of a model on disk are added
by appending to its bytes (no parse, the file untouched), and both models run side by side."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfold.verify import OrtRunner
from bnfold.verify.equivalence import _side_by_side
from bnfold.verify.runner import graph_output_names


def _model(path):
    w = numpy_helper.from_array(np.arange(4, dtype=np.float32).reshape(2, 2), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def test_extra_outputs_of_a_file_come_back_and_the_file_is_untouched(tmp_path):
    path = _model(str(tmp_path / "m.onnx"))
    before = hashlib.sha256(open(path, "rb").read()).hexdigest()
    x = np.array([[1.0, -2.0]], dtype=np.float32)
    got = OrtRunner(path, extra_outputs=["h", "y", "h"]).run({"x": x})
    assert sorted(got) == ["h", "y"]  # 'y' is already an output: listed once
    np.testing.assert_array_equal(got["h"], x @ np.arange(4, dtype=np.float32).reshape(2, 2))
    np.testing.assert_array_equal(got["y"], np.maximum(got["h"], 0))
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == before


def test_graph_output_names_read_off_the_wire(tmp_path):
    path = _model(str(tmp_path / "m.onnx"))
    assert graph_output_names(open(path, "rb").read()) == {"y"}


def test_side_by_side_returns_in_order_and_raises_the_first_failure():
    assert _side_by_side([lambda: 1, lambda: 2]) == [1, 2]

    def fail(msg):
        raise ValueError(msg)

    try:
        _side_by_side([lambda: fail("first"), lambda: fail("second")])
    except ValueError as exc:
        assert str(exc) == "first"
    else:
        raise AssertionError("no error raised")


def test_an_edited_graph_gets_the_weights_from_the_file_byte_for_byte(tmp_path):
    from bnfold.verify.runner import with_file_weights

    path = _model(str(tmp_path / "m.onnx"))
    edited = onnx.load(path)
    edited.graph.node[1].output[0] = "y_cut"  # an edit that leaves the initializers alone
    edited.graph.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1]))
    data = with_file_weights(edited, path)
    back = onnx.ModelProto()
    back.ParseFromString(data)
    assert back == edited
    edited.graph.initializer.pop()  # initializers that no longer line up: the caller serializes
    assert with_file_weights(edited, path) is None


def test_a_prepared_original_session_is_taken_only_for_the_same_model_and_options(tmp_path):
    from bnfold.verify import OriginalSession, check

    path = _model(str(tmp_path / "m.onnx"))
    prepared = OriginalSession(path)
    assert prepared.take(path, "disable", "cpu", None) is not None
    assert prepared.take(path, "basic", "cpu", None) is None
    assert prepared.take(str(tmp_path / "other.onnx"), "disable", "cpu", None) is None
    assert check(path, path, prepared=OriginalSession(path))


def test_a_prepared_session_that_failed_leaves_the_error_to_the_check(tmp_path):
    import pytest

    from bnfold.errors import InputError
    from bnfold.verify import OriginalSession, check

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    prepared = OriginalSession(str(bad))
    assert prepared.take(str(bad), "disable", "cpu", None) is None
    with pytest.raises(InputError):
        check(str(bad), _model(str(tmp_path / "m.onnx")), prepared=prepared)


def test_a_wrong_fold_through_the_fold_command_fails_names_the_fold_and_writes_nothing(tmp_path, monkeypatch):
    """The fold command's check (original session made during the fold, sessions side by side,
    the cut copy made early, probes only on failure) still catches one channel 1 % off."""
    import os

    import bnfold.onnx_pass as onnx_pass
    from bnfold.onnx_io import tensor_array
    from bnfold.pipeline import fold_path

    real = onnx_pass.fold_model_proto
    hit = {}

    def sabotaged(model, **kwargs):
        report = real(model, **kwargs)
        conv = next(n for n in model.graph.node if n.op_type == "Conv")
        inits = {t.name: t for t in model.graph.initializer}
        w = tensor_array(inits[conv.input[1]]).copy()
        w[0] *= 1.01
        tensor = inits[conv.input[1]]
        del tensor.float_data[:]
        tensor.raw_data = np.ascontiguousarray(w, dtype="<f4").tobytes()
        hit["conv"] = conv.name
        return report

    monkeypatch.setattr(onnx_pass, "fold_model_proto", sabotaged)
    src = os.path.join(os.path.dirname(__file__), "..", "sample_models", "resnet_mini.onnx")
    dst = tmp_path / "out.onnx"
    outcome = fold_path(src, str(dst))
    assert not outcome.ok and not dst.exists()
    failed = [s for s in outcome.verdict["sites"] if not s["passed"]]
    assert failed and hit["conv"] in failed[0]["into"]

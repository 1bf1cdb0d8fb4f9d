"""bnfold.verify: inputs, running with onnxruntime, the comparison rule, check(), assert_equivalent.

Models are built here with onnx.helper; folds are done by hand in float64 so these tests do not
depend on bnfold's own fold pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from bnfold import verify
from bnfold.errors import ExternalDataError, InputError
from bnfold.testing import assert_equivalent

ml_dtypes = pytest.importorskip("ml_dtypes")
OPSET = [h.make_opsetid("", 17)]


# ---------------------------------------------------------------------------------------------
# Model builders (shared with test_cli_check.py and test_bench.py)


def conv_bn_chain(layers=3, channels=8, seed=0, dynamic=True, fold=False, perturb=None):
    """``layers`` x (Conv 3x3 -> BatchNorm -> Relu). With ``fold`` the BNs are folded into the
    convs in float64 (the correct fold); ``perturb=(layer, channel, factor)`` scales one output
    channel of one folded weight (a wrong fold)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    for i in range(layers):
        w = rng.standard_normal((channels, channels, 3, 3)) * np.sqrt(2.0 / (channels * 9))
        b = rng.standard_normal(channels) * 0.1
        gamma, beta = rng.normal(1.0, 0.2, channels), rng.normal(0.0, 0.2, channels)
        mean, var = rng.normal(0.0, 0.5, channels), rng.uniform(0.5, 2.0, channels)
        if fold:
            a = gamma / np.sqrt(var + 1e-5)
            w, b = w * a[:, None, None, None], (b - mean) * a + beta
            if perturb and perturb[0] == i:
                w[perturb[1]] *= perturb[2]
            nodes.append(h.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"))
        else:
            nodes.append(h.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"))
            nodes.append(h.make_node("BatchNormalization", [f"c{i}", f"g{i}", f"be{i}", f"m{i}", f"v{i}"], [f"n{i}"], name=f"bn{i}"))
            for name, arr in ((f"g{i}", gamma), (f"be{i}", beta), (f"m{i}", mean), (f"v{i}", var)):
                inits.append(nh.from_array(arr.astype(np.float32), name))
        inits += [nh.from_array(w.astype(np.float32), f"w{i}"), nh.from_array(b.astype(np.float32), f"b{i}")]
        src = f"c{i}" if fold else f"n{i}"
        nodes.append(h.make_node("Relu", [src], [f"r{i}"], name=f"relu{i}"))
        x = f"r{i}"
    nodes.append(h.make_node("Identity", [x], ["y"], name="out"))
    dims = ["N", channels, "H", "W"] if dynamic else [1, channels, 8, 8]
    graph = h.make_graph(nodes, "chain", [h.make_tensor_value_info("x", T.FLOAT, dims)],
                         [h.make_tensor_value_info("y", T.FLOAT, None)], inits)
    return h.make_model(graph, opset_imports=OPSET)


def multi_io_model(offset=0.0, int_offset=0):
    """Inputs x float32 [N,4], y float32 [N,4], i int64 [N], j int32 [3], m bool [N];
    outputs s = x + y (+ offset), p = x * y, k = i (+ int_offset), jj = j, nm = not m."""
    inits = [nh.from_array(np.array(offset, np.float32), "off"), nh.from_array(np.array(int_offset, np.int64), "ioff")]
    nodes = [
        h.make_node("Add", ["x", "y"], ["s0"]),
        h.make_node("Add", ["s0", "off"], ["s"]),
        h.make_node("Mul", ["x", "y"], ["p"]),
        h.make_node("Add", ["i", "ioff"], ["k"]),
        h.make_node("Identity", ["j"], ["jj"]),
        h.make_node("Not", ["m"], ["nm"]),
    ]
    inputs = [
        h.make_tensor_value_info("x", T.FLOAT, ["N", 4]),
        h.make_tensor_value_info("y", T.FLOAT, ["N", 4]),
        h.make_tensor_value_info("i", T.INT64, ["N"]),
        h.make_tensor_value_info("j", T.INT32, [3]),
        h.make_tensor_value_info("m", T.BOOL, ["N"]),
    ]
    outputs = [h.make_tensor_value_info(n, t, None) for n, t in
               (("s", T.FLOAT), ("p", T.FLOAT), ("k", T.INT64), ("jj", T.INT32), ("nm", T.BOOL))]
    return h.make_model(h.make_graph(nodes, "multi", inputs, outputs, inits), opset_imports=OPSET)


def cast_model(elem_type, add=0.0):
    """x (elem_type) -> y = Cast(x, float32) + add, and z = Identity(x) in elem_type."""
    nodes = [h.make_node("Cast", ["x"], ["c"], to=T.FLOAT), h.make_node("Add", ["c", "a"], ["y"]),
             h.make_node("Identity", ["x"], ["z"])]
    graph = h.make_graph(nodes, "cast", [h.make_tensor_value_info("x", elem_type, ["N", 5])],
                         [h.make_tensor_value_info("y", T.FLOAT, None), h.make_tensor_value_info("z", elem_type, None)],
                         [nh.from_array(np.array(add, np.float32), "a")])
    return h.make_model(graph, opset_imports=OPSET)


def save(model, path):
    onnx.save(model, str(path))
    return str(path)


# ---------------------------------------------------------------------------------------------
# check(): verdicts


def test_model_matches_itself_and_result_is_truthy(tmp_path):
    path = save(conv_bn_chain(), tmp_path / "m.onnx")
    result = verify.check(path, path)
    assert result and result.passed
    assert [o.name for o in result.outputs] == ["y"]
    assert result.outputs[0].max_abs_err == 0 and result.outputs[0].failing == 0
    text = str(result)
    assert text.startswith("PASS") and "atol" in text and "rtol" in text and "|folded - original|" in text


def test_correct_deep_fold_passes_with_default_tolerance(tmp_path):
    # A correct float64 fold of 12 Conv+BN layers, rounded to float32, is not bit-exact...
    orig = save(conv_bn_chain(layers=12), tmp_path / "o.onnx")
    good = save(conv_bn_chain(layers=12, fold=True), tmp_path / "f.onnx")
    result = verify.check(orig, good, batches=2)
    assert result, result.summary()
    assert result.outputs[0].max_abs_err > 0  # ...so the tolerance is doing real work
    # and its error stays well inside the default budget (headroom for deeper nets)
    assert result.outputs[0].max_rel_err < 1e-5


@pytest.mark.parametrize("layer, factor", [(2, 1.01), (2, 0.99), (2, -1.0), (5, 1.002)])
def test_wrong_fold_fails(tmp_path, layer, factor):
    # One channel of one layer off by 1 % (0.2 % in the last layer): far smaller than the
    # folding bugs seen in the wild (wrong axis, wrong group, forgotten bias), still caught.
    orig = save(conv_bn_chain(layers=6), tmp_path / "o.onnx")
    bad = save(conv_bn_chain(layers=6, fold=True, perturb=(layer, 3, factor)), tmp_path / "b.onnx")
    result = verify.check(orig, bad)
    assert not result
    out = result.outputs[0]
    assert out.failing > 0 and out.max_rel_err > out.atol / out.scale
    assert out.worst is not None and "worst at" in result.summary()
    assert result.summary().startswith("FAIL")


def test_labels_name_the_models(tmp_path):
    path = save(conv_bn_chain(layers=1), tmp_path / "tmp123.onnx")
    result = verify.check(path, path, labels=("in.onnx", "out.onnx"))
    assert result.models == {"original": "in.onnx", "folded": "out.onnx"} and "in.onnx vs out.onnx" in result.summary()
    with pytest.raises(InputError, match="'zz'.*in.onnx"):
        verify.check(path, path, labels=("in.onnx", "out.onnx"), per_output_atol={"zz": 1.0})


def test_check_accepts_model_protos(tmp_path):
    model = conv_bn_chain(layers=2)
    assert verify.check(model, conv_bn_chain(layers=2, fold=True))
    assert not verify.check(model, conv_bn_chain(layers=2, fold=True, perturb=(0, 0, 1.01)))


def test_ort_opt_levels(tmp_path):
    orig = save(conv_bn_chain(), tmp_path / "o.onnx")
    folded = save(conv_bn_chain(fold=True), tmp_path / "f.onnx")
    for level in verify.OPT_LEVELS:
        result = verify.check(orig, folded, ort_opt=level)
        assert result and result.runtime["graph_optimization"] == level
    with pytest.raises(InputError, match="optimization level"):
        verify.check(orig, folded, ort_opt="fast")


def test_check_default_runs_with_optimizations_disabled(tmp_path, monkeypatch):
    import onnxruntime as ort

    seen = []
    real = ort.InferenceSession

    def spy(source, options=None, **kw):
        seen.append(options.graph_optimization_level)
        return real(source, options, **kw)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    path = save(conv_bn_chain(layers=1), tmp_path / "m.onnx")
    verify.check(path, path)
    assert seen == [ort.GraphOptimizationLevel.ORT_DISABLE_ALL] * 2


# ---------------------------------------------------------------------------------------------
# Several inputs and outputs, every input type


def test_multi_io_all_int_and_bool_types(tmp_path):
    path = save(multi_io_model(), tmp_path / "m.onnx")
    result = verify.check(path, path, batches=2)
    assert result, result.summary()
    assert [o.name for o in result.outputs] == ["s", "p", "k", "jj", "nm"]
    assert {i.name: i.dtype for i in result.inputs} == {"x": "float32", "y": "float32", "i": "int64", "j": "int32", "m": "bool"}
    feeds, _ = verify.make_inputs(path)
    assert feeds[0]["m"].dtype == np.bool_ and feeds[0]["m"].shape == (1,)
    assert feeds[0]["i"].min() >= 0 and feeds[0]["i"].max() <= 9


def test_multi_io_float_offset_fails_only_that_output(tmp_path):
    orig = save(multi_io_model(), tmp_path / "o.onnx")
    bad = save(multi_io_model(offset=0.5), tmp_path / "b.onnx")
    result = verify.check(orig, bad, shapes={"x": (4, 4)})
    assert not result
    assert [o.name for o in result.failed_outputs] == ["s"]


def test_int_outputs_are_exact(tmp_path):
    orig = save(multi_io_model(), tmp_path / "o.onnx")
    bad = save(multi_io_model(int_offset=1), tmp_path / "b.onnx")
    result = verify.check(orig, bad, atol=100.0, rtol=1.0)  # float tolerances do not apply to ints
    assert [o.name for o in result.failed_outputs] == ["k"]
    assert result.outputs[2].tolerance_source.startswith("exact")


@pytest.mark.parametrize("elem_type, name", [(T.FLOAT16, "float16"), (T.BFLOAT16, "bfloat16"), (T.DOUBLE, "float64")])
def test_low_and_high_precision_inputs(tmp_path, elem_type, name):
    orig = save(cast_model(elem_type), tmp_path / "o.onnx")
    result = verify.check(orig, orig)
    assert result, result.summary()
    assert result.inputs[0].dtype == name
    z = next(o for o in result.outputs if o.name == "z")
    assert z.dtype == name and z.total == 5
    bad = save(cast_model(elem_type, add=0.25), tmp_path / "b.onnx")
    assert [o.name for o in verify.check(orig, bad).failed_outputs] == ["y"]


def test_default_tolerances_by_dtype():
    assert verify.default_tolerance("float32") == (1e-4, 1e-4)
    assert verify.default_tolerance("float16")[0] > verify.default_tolerance("float32")[0] > verify.default_tolerance("float64")[0]
    assert verify.default_tolerance("bfloat16")[0] >= verify.default_tolerance("float16")[0]
    assert verify.default_tolerance("int64") is None and verify.default_tolerance("bool") is None


# ---------------------------------------------------------------------------------------------
# Inputs: seeds, ranges, dynamic dims, npz


def test_inputs_are_seeded_and_batches_are_stable(tmp_path):
    path = save(multi_io_model(), tmp_path / "m.onnx")
    a, _ = verify.make_inputs(path, seed=3, batches=1)
    b, _ = verify.make_inputs(path, seed=3, batches=3)
    c, _ = verify.make_inputs(path, seed=4)
    assert len(b) == 3
    np.testing.assert_array_equal(a[0]["x"], b[0]["x"])
    assert not np.array_equal(b[0]["x"], b[1]["x"])
    assert not np.array_equal(a[0]["x"], c[0]["x"])


def test_value_range(tmp_path):
    path = save(multi_io_model(), tmp_path / "m.onnx")
    feeds, _ = verify.make_inputs(path, value_range=(2.0, 3.0), shapes={"N": (50,)})
    assert feeds[0]["x"].min() >= 2.0 and feeds[0]["x"].max() < 3.0
    assert set(np.unique(feeds[0]["i"])) <= {2, 3}
    default, _ = verify.make_inputs(path, shapes={"N": (500,)})
    assert default[0]["x"].min() < -1 and default[0]["x"].max() > 1  # standard normal
    with pytest.raises(InputError):
        verify.make_inputs(path, value_range=(1.0, 1.0))


def test_dynamic_dims_default_with_note(tmp_path):
    path = save(conv_bn_chain(), tmp_path / "m.onnx")
    feeds, notes = verify.make_inputs(path)
    assert feeds[0]["x"].shape == (verify.DEFAULT_BATCH_DIM, 8, verify.DEFAULT_OTHER_DIM, verify.DEFAULT_OTHER_DIM)
    assert len(notes) == 1 and "'x'" in notes[0] and "N=1" in notes[0] and "--shape" in notes[0]
    result = verify.check(path, path)
    assert result.notes == notes and notes[0] in result.summary()


def test_dynamic_dims_set_by_shape_by_input_or_symbol(tmp_path):
    path = save(multi_io_model(), tmp_path / "m.onnx")
    feeds, notes = verify.make_inputs(path, shapes={"x": (6, 4)})
    # The symbol N is bound by x's shape and reused for y, i and m.
    assert [feeds[0][k].shape[0] for k in "xyim"] == [6, 6, 6, 6]
    assert notes == []
    feeds, notes = verify.make_inputs(path, shapes={"N": (3,)})
    assert feeds[0]["y"].shape == (3, 4) and notes == []
    with pytest.raises(InputError, match="fixes it to 4"):
        verify.make_inputs(path, shapes={"x": (6, 5)})
    with pytest.raises(InputError, match="rank"):
        verify.make_inputs(path, shapes={"x": (6,)})
    with pytest.raises(InputError, match="neither an input"):
        verify.make_inputs(path, shapes={"nope": (1,)})


def test_static_model_needs_no_notes(tmp_path):
    path = save(conv_bn_chain(dynamic=False), tmp_path / "m.onnx")
    feeds, notes = verify.make_inputs(path)
    assert feeds[0]["x"].shape == (1, 8, 8, 8) and notes == []


def test_parse_shape_range_atol():
    assert verify.parse_shape("x:1x3x224x224") == ("x", (1, 3, 224, 224))
    assert verify.parse_shape("input:0:2x3") == ("input:0", (2, 3))  # TF-style names keep their colon
    assert verify.parse_shape("s:") == ("s", ())
    for bad in ("x", ":1x2", "x:1xa", "x:1x-2", "x:1.5"):
        with pytest.raises(InputError):
            verify.parse_shape(bad)
    assert verify.parse_range("-1,1") == (-1.0, 1.0)
    for bad in ("1", "1,0", "a,b", "0,inf"):
        with pytest.raises(InputError):
            verify.parse_range(bad)
    assert verify.parse_atol(["1e-3", "out:0:0.5"]) == (1e-3, {"out:0": 0.5})
    for bad in (["x:"], ["-1"], ["nan"]):
        with pytest.raises(InputError):
            verify.parse_atol(bad)


def test_npz_inputs_are_used(tmp_path):
    path = save(multi_io_model(), tmp_path / "m.onnx")
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    npz = tmp_path / "in.npz"
    np.savez(npz, x=x, y=np.ones((2, 4), np.float32), i=np.array([5, 6]), j=np.array([1, 2, 3], np.int32),
             m=np.array([True, False]))
    feeds, notes = verify.make_inputs(path, inputs_npz=npz)
    np.testing.assert_array_equal(feeds[0]["x"], x)
    outputs = verify.run_onnx(path, feeds[0])
    np.testing.assert_array_equal(outputs["s"], x + 1)
    result = verify.check(path, path, inputs_npz=npz)
    assert result and all(i.source.startswith("npz") for i in result.inputs) and result.seed is None


def test_npz_partial_inputs_are_completed(tmp_path):
    path = save(multi_io_model(), tmp_path / "m.onnx")
    npz = tmp_path / "in.npz"
    np.savez(npz, i=np.array([1, 2, 3], np.int64))
    feeds, notes = verify.make_inputs(path, inputs_npz=npz)
    assert feeds[0]["x"].shape == (3, 4)  # N bound by the npz array
    assert any("generated" in n for n in notes)


@pytest.mark.parametrize("arrays, match", [
    ({"q": np.ones(3, np.float32)}, "match no input"),
    ({"i": np.ones(3, np.float32)}, "is float32"),
    ({"x": np.ones((2, 5), np.float32)}, "shape"),
    ({"j": np.ones((3, 1), np.int32)}, "shape"),
])
def test_npz_mismatch_is_input_error(tmp_path, arrays, match):
    path = save(multi_io_model(), tmp_path / "m.onnx")
    npz = tmp_path / "in.npz"
    np.savez(npz, **arrays)
    with pytest.raises(InputError, match=match):
        verify.make_inputs(path, inputs_npz=npz)


def test_npz_bfloat16_raw_bytes(tmp_path):
    path = save(cast_model(T.BFLOAT16), tmp_path / "m.onnx")
    x = np.array([[1.5, -2.0, 0.25, 8.0, 3.0]], dtype=ml_dtypes.bfloat16)
    npz = tmp_path / "in.npz"
    np.savez(npz, x=x)  # numpy keeps bfloat16 as raw 2-byte values
    feeds, _ = verify.make_inputs(path, inputs_npz=npz)
    out = verify.run_onnx(path, feeds[0])
    np.testing.assert_array_equal(out["y"], x.astype(np.float32))
    assert out["z"].dtype == x.dtype


def test_npz_not_with_batches_and_bad_file(tmp_path):
    path = save(multi_io_model(), tmp_path / "m.onnx")
    npz = tmp_path / "in.npz"
    np.savez(npz, j=np.ones(3, np.int32))
    with pytest.raises(InputError, match="batches"):
        verify.make_inputs(path, inputs_npz=npz, batches=2)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="npz"):
        verify.make_inputs(path, inputs_npz=tmp_path / "bad.npz")
    with pytest.raises(InputError, match="no such file"):
        verify.make_inputs(path, inputs_npz=tmp_path / "missing.npz")


# ---------------------------------------------------------------------------------------------
# compare_outputs: the rule itself


def test_rule_is_allclose_with_scaled_default_atol():
    e = np.array([100.0, 1.0, 0.0], np.float32)
    # scale 100 -> atol 1e-2, rtol 1e-4: the element at 0 may move by 1e-2, the one at 100 by 2e-2
    ok = verify.compare_outputs({"o": e}, {"o": e + np.array([0.019, 0.0099, 0.0099], np.float32)})
    assert ok, ok.summary()
    bad = verify.compare_outputs({"o": e}, {"o": e + np.array([0.0, 0.0, 0.0102], np.float32)})
    assert not bad and bad.outputs[0].failing == 1 and bad.outputs[0].worst["index"] == [2]
    s = ok.outputs[0]
    assert s.scale == 100.0 and s.atol == pytest.approx(1e-2) and s.rtol == 1e-4
    assert s.max_rel_err == pytest.approx(s.max_abs_err / 100.0)


def test_given_atol_is_absolute_and_per_output_wins():
    e = {"a": np.array([1000.0], np.float32), "b": np.array([1.0], np.float32)}
    a = {"a": np.array([1000.5], np.float32), "b": np.array([1.05], np.float32)}
    assert not verify.compare_outputs(e, a)
    assert not verify.compare_outputs(e, a, atol=0.01, rtol=0.0)
    r = verify.compare_outputs(e, a, atol=0.01, rtol=0.0, per_output={"a": 1.0, "b": 0.1})
    assert r and r.outputs[0].tolerance_source == "given for this output"
    r = verify.compare_outputs(e, a, per_output={"a": (0.0, 1e-3), "b": 0.1})
    assert r and r.outputs[0].atol == 0.0 and r.outputs[0].rtol == 1e-3
    with pytest.raises(InputError, match="'c'"):
        verify.compare_outputs(e, a, per_output={"c": 1.0})


def test_nan_and_inf_positions_must_match():
    e = np.array([np.nan, 1.0, np.inf, -np.inf], np.float32)
    assert verify.compare_outputs({"o": e}, {"o": e.copy()})
    for changed in ([1.0, 1.0, np.inf, -np.inf], [np.nan, np.nan, np.inf, -np.inf],
                    [np.nan, 1.0, -np.inf, -np.inf], [np.nan, 1.0, 3e38, -np.inf]):
        r = verify.compare_outputs({"o": e}, {"o": np.array(changed, np.float32)})
        assert not r and r.outputs[0].nonfinite_mismatch == 1


def test_structural_differences_fail():
    e = {"o": np.zeros((2, 3), np.float32), "p": np.zeros(2, np.float32)}
    assert not verify.compare_outputs(e, {"o": np.zeros((3, 2), np.float32), "p": e["p"]})
    assert not verify.compare_outputs(e, {"o": np.zeros((2, 3), np.float64), "p": e["p"]})
    missing = verify.compare_outputs(e, {"o": e["o"]})
    assert not missing and "missing" in missing.summary()
    extra = verify.compare_outputs(e, dict(e, q=np.zeros(1)))
    assert not extra and "only in the folded" in extra.summary()


def test_all_zero_output_uses_unit_scale():
    r = verify.compare_outputs({"o": np.zeros(4, np.float32)}, {"o": np.full(4, 5e-5, np.float32)})
    assert r and r.outputs[0].scale == 1.0
    assert not verify.compare_outputs({"o": np.zeros(4, np.float32)}, {"o": np.full(4, 5e-4, np.float32)})


def test_to_dict_is_json_with_the_documented_fields(tmp_path):
    orig = save(multi_io_model(), tmp_path / "o.onnx")
    bad = save(multi_io_model(offset=float("nan")), tmp_path / "b.onnx")
    d = json.loads(json.dumps(verify.check(orig, bad, seed=7, batches=2).to_dict()))
    assert d["passed"] is False and "atol" in d["rule"]
    assert d["models"] == {"original": orig, "folded": bad}
    assert d["inputs"]["seed"] == 7 and d["inputs"]["batches"] == 2
    assert {t["name"] for t in d["inputs"]["tensors"]} == {"x", "y", "i", "j", "m"}
    assert d["runtime"]["graph_optimization"] == "disable" and d["runtime"]["provider"] == "cpu"
    assert d["runtime"]["onnxruntime"]
    s = d["outputs"][0]
    for key in ("name", "passed", "dtype", "shape", "atol", "rtol", "tolerance_source", "scale", "max_abs_err",
                "max_rel_err", "mean_abs_err", "failing", "total", "nonfinite_mismatch"):
        assert key in s
    assert s["name"] == "s" and s["passed"] is False and s["nonfinite_mismatch"] == s["total"] == 8


# ---------------------------------------------------------------------------------------------
# Errors: one line, the right class


def test_missing_corrupt_and_empty_files(tmp_path):
    good = save(multi_io_model(), tmp_path / "m.onnx")
    with pytest.raises(InputError, match="no such file"):
        verify.check(good, tmp_path / "missing.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage\xff\xff\xff" * 20)
    with pytest.raises(InputError, match="not an ONNX model"):
        verify.check(tmp_path / "bad.onnx", good)
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(InputError, match="not an ONNX model"):
        verify.check(good, tmp_path / "empty.onnx")
    with pytest.raises(InputError, match="directory"):
        verify.check(good, tmp_path)


def test_onnxruntime_errors_become_one_line(tmp_path):
    # A Reshape to a fixed size cannot take the default dynamic dims: ORT fails at run time.
    graph = h.make_graph([h.make_node("Reshape", ["x", "s"], ["y"])], "r", [h.make_tensor_value_info("x", T.FLOAT, ["N", "K"])],
                         [h.make_tensor_value_info("y", T.FLOAT, None)], [nh.from_array(np.array([2, 3], np.int64), "s")])
    path = save(h.make_model(graph, opset_imports=OPSET), tmp_path / "r.onnx")
    with pytest.raises(InputError) as info:
        verify.check(path, path)
    message = str(info.value)
    assert "\n" not in message and "onnxruntime failed to run" in message and "--shape" in message
    assert verify.check(path, path, shapes={"x": (2, 3)})
    # An invalid graph fails at load time, also in one line.
    broken = h.make_model(h.make_graph([h.make_node("Relu", ["nope"], ["y"])], "b", [h.make_tensor_value_info("x", T.FLOAT, [1])],
                                       [h.make_tensor_value_info("y", T.FLOAT, None)]), opset_imports=OPSET)
    with pytest.raises(InputError) as info:
        verify.run_onnx(broken, {"x": np.ones(1, np.float32)})
    assert "\n" not in str(info.value) and "cannot load" in str(info.value)


def test_missing_external_data_is_external_data_error(tmp_path):
    model = conv_bn_chain(layers=1, dynamic=False)
    path = str(tmp_path / "ext.onnx")
    onnx.save(model, path, save_as_external_data=True, location="ext.data", size_threshold=0)
    assert verify.check(path, path)
    os.remove(tmp_path / "ext.data")
    with pytest.raises(ExternalDataError):
        verify.check(path, path)


def test_interface_difference_fails_with_problem(tmp_path):
    orig = save(cast_model(T.FLOAT16), tmp_path / "o.onnx")
    other = save(cast_model(T.FLOAT), tmp_path / "f.onnx")
    result = verify.check(orig, other)
    assert not result and "float16 in the original" in result.summary()


def test_string_inputs_need_npz(tmp_path):
    graph = h.make_graph([h.make_node("Identity", ["x"], ["y"])], "s", [h.make_tensor_value_info("x", T.STRING, [2])],
                         [h.make_tensor_value_info("y", T.STRING, None)])
    path = save(h.make_model(graph, opset_imports=OPSET), tmp_path / "s.onnx")
    with pytest.raises(InputError, match="--inputs"):
        verify.make_inputs(path)


def test_initializer_backed_inputs_are_not_fed(tmp_path):
    model = multi_io_model()
    model.graph.input.append(h.make_tensor_value_info("off", T.FLOAT, []))  # overridable default
    path = save(model, tmp_path / "m.onnx")
    feeds, _ = verify.make_inputs(path)
    assert "off" not in feeds[0] and verify.check(path, path)


# ---------------------------------------------------------------------------------------------
# Providers


def _has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(not _has_cuda(), reason="CUDAExecutionProvider not available")
def test_cuda_check_runs(tmp_path):
    orig = save(conv_bn_chain(layers=4), tmp_path / "o.onnx")
    result = verify.check(orig, save(conv_bn_chain(layers=4, fold=True), tmp_path / "f.onnx"), provider="cuda")
    assert result, result.summary()
    assert result.runtime["providers_used"][0] == "CUDAExecutionProvider" and result.runtime["tf32"] is False
    assert not verify.check(orig, save(conv_bn_chain(layers=4, fold=True, perturb=(1, 1, 1.01)), tmp_path / "b.onnx"), provider="cuda")


def test_cuda_missing_is_clear_input_error(tmp_path, monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    path = save(multi_io_model(), tmp_path / "m.onnx")
    with pytest.raises(InputError, match="onnxruntime-gpu") as info:
        verify.check(path, path, provider="cuda")
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="provider"):
        verify.check(path, path, provider="tpu")


# ---------------------------------------------------------------------------------------------
# bnfold.testing and imports


def test_assert_equivalent(tmp_path):
    orig = save(conv_bn_chain(), tmp_path / "o.onnx")
    result = assert_equivalent(orig, save(conv_bn_chain(fold=True), tmp_path / "f.onnx"), batches=2)
    assert result.passed and result.batches == 2
    with pytest.raises(AssertionError) as info:
        assert_equivalent(orig, save(conv_bn_chain(fold=True, perturb=(0, 0, 1.01)), tmp_path / "b.onnx"))
    assert "FAIL" in str(info.value) and "rule:" in str(info.value)


def test_top_level_check_is_lazy_and_importing_does_not_load_onnxruntime():
    code = (
        "import sys, bnfold, bnfold.verify, bnfold.latency, bnfold.testing, bnfold.cli.verify_cmds\n"
        "assert 'onnxruntime' not in sys.modules, 'onnxruntime imported eagerly'\n"
        "assert bnfold.check is bnfold.verify.check and bnfold.bench is bnfold.latency.bench\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

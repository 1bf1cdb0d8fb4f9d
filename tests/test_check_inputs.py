"""What the check feeds and writes: dims written -1 or 0, overridable initializers, --save-inputs /
--save-outputs replayed with --inputs, error percentiles and the smallest passing atol, and
onnxruntime's own log kept off the terminal."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import bnfold
from bnfold import verify
from bnfold.cli import main
from bnfold.errors import EXIT_INPUT, EXIT_MISMATCH, EXIT_OK
from test_verify import conv_bn_chain, save

OPSET = [h.make_opsetid("", 17)]


def unknown_dims_model(unknown=-1):
    """The paddle2onnx classifier's interface: x [-1, 3, ?, ?] (dims written as -1, or 0)."""
    model = conv_bn_chain(layers=2, channels=3)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for i in (0, 2, 3):
        dims[i].Clear()
        dims[i].dim_value = unknown
    return model


@pytest.mark.parametrize("unknown", [-1, 0])
def test_dims_written_minus_one_or_zero_are_dynamic(tmp_path, unknown):
    src, dst = save(unknown_dims_model(unknown), tmp_path / "m.onnx"), tmp_path / "out.onnx"
    result = CliRunner().invoke(main, [src, "-o", str(dst)])
    assert result.exit_code == EXIT_OK, result.output
    feeds, notes = verify.make_inputs(src)
    assert feeds[0]["x"].shape == (verify.DEFAULT_BATCH_DIM, 3, verify.DEFAULT_OTHER_DIM, verify.DEFAULT_OTHER_DIM)
    assert notes and "dim 0=1" in notes[0]
    shaped = CliRunner().invoke(main, ["check", src, str(dst), "--shape", "x:1x3x48x192"])
    assert shaped.exit_code == EXIT_OK, shaped.output
    assert "[1x3x48x192]" in shaped.output
    bad = CliRunner().invoke(main, ["check", src, str(dst), "--shape", "x:1x4x48x192"])
    assert bad.exit_code == EXIT_INPUT  # the fixed channel dim still holds


def overridable_model(baked=False):
    """y = x * s + 1 where s is an initializer that a graph input of the same name overrides.
    ``baked``: a wrong "fold" that multiplies by s's default instead of reading s."""
    s = nh.from_array(np.full((1, 4), 2.0, np.float32), "s")
    k = nh.from_array(np.full((1, 4), 2.0, np.float32), "k")
    one = nh.from_array(np.ones((1, 4), np.float32), "one")
    nodes = [h.make_node("Mul", ["x", "k" if baked else "s"], ["xs"]), h.make_node("Add", ["xs", "one"], ["y"])]
    graph = h.make_graph(nodes, "ov", [h.make_tensor_value_info("x", T.FLOAT, ["N", 4]), h.make_tensor_value_info("s", T.FLOAT, [1, 4])],
                         [h.make_tensor_value_info("y", T.FLOAT, None)], [s, k, one] if baked else [s, one])
    return h.make_model(graph, opset_imports=OPSET)


def test_overridable_initializers_are_fed_and_listed():
    model = overridable_model()
    result = verify.check(model, model)
    assert result and result.batches == 2
    listed = {i.name: i for i in result.inputs}
    assert "overridable initializer" in listed["s"].source and listed["s"].shape == [1, 4]
    assert any("overridable" in n for n in result.notes)
    wrong = verify.check(model, overridable_model(baked=True))
    assert not wrong, "a model that ignores the override must fail in the batch that sets it"


def test_overridable_initializer_set_from_npz(tmp_path):
    model = overridable_model()
    npz = tmp_path / "in.npz"
    np.savez(npz, x=np.ones((2, 4), np.float32), s=np.full((1, 4), 5.0, np.float32))
    result = verify.check(model, model, inputs_npz=str(npz), save_outputs=str(tmp_path / "o.npz"))
    assert result
    with np.load(tmp_path / "o.npz") as out:
        np.testing.assert_array_equal(out["original/y"], np.full((2, 4), 6.0, np.float32))


def test_save_inputs_and_outputs_replay(tmp_path):
    orig = save(conv_bn_chain(layers=2), tmp_path / "o.onnx")
    bad = save(conv_bn_chain(layers=2, fold=True, perturb=(1, 2, 1.05)), tmp_path / "b.onnx")
    ins, outs = tmp_path / "in.npz", tmp_path / "out.npz"
    first = CliRunner().invoke(main, ["check", orig, bad, "--batches", "2", "--seed", "3",
                                      "--save-inputs", str(ins), "--save-outputs", str(outs)])
    assert first.exit_code == EXIT_MISMATCH, first.output
    with np.load(ins) as data:
        assert sorted(data.files) == ["batch0/x", "batch1/x"]
    with np.load(outs) as data:
        assert {"batch0/original/y", "batch0/folded/y", "batch1/original/y", "batch1/folded/y"} <= set(data.files)
        saved_diff = max(np.abs(data[f"batch{b}/original/y"] - data[f"batch{b}/folded/y"]).max() for b in (0, 1))
    replay = verify.check(orig, bad, inputs_npz=str(ins))
    assert replay.batches == 2 and not replay
    assert replay.outputs[0].max_abs_err == pytest.approx(float(saved_diff), rel=1e-6)


def test_percentiles_and_smallest_passing_atol(tmp_path):
    orig = conv_bn_chain(layers=2)
    bad = conv_bn_chain(layers=2, fold=True, perturb=(1, 2, 1.05))
    result = verify.check(orig, bad)
    out = result.outputs[0]
    assert 0 <= out.p50_abs_err <= out.p99_abs_err <= out.max_abs_err and out.min_atol > 0
    assert verify.check(orig, bad, atol=out.min_atol * 1.001, rtol=out.rtol)
    assert not verify.check(orig, bad, atol=out.min_atol * 0.9, rtol=out.rtol)
    assert "passes from atol" in result.summary()


def test_onnxruntime_log_lines_do_not_reach_the_terminal(tmp_path):
    """A Reshape whose target does not fit fails inside onnxruntime at run time: the user sees
    bnfold's one line, not onnxruntime's own [E:onnxruntime:...] log."""
    nodes = [h.make_node("Reshape", ["x", "shape"], ["y"])]
    graph = h.make_graph(nodes, "bad", [h.make_tensor_value_info("x", T.FLOAT, [2, 3])],
                         [h.make_tensor_value_info("y", T.FLOAT, None)], [nh.from_array(np.array([4, 4], np.int64), "shape")])
    path = save(h.make_model(graph, opset_imports=OPSET), tmp_path / "bad.onnx")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", "from bnfold.cli import main; main()", "check", path, path],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == EXIT_INPUT, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfold: error:"), proc.stderr
    assert "[E:onnxruntime" not in proc.stderr and ".h:" not in proc.stderr  # no log lines, no C++ positions


def test_fold_report_lists_folds_and_check_runs_in_pipeline(tmp_path):
    model = conv_bn_chain(layers=3)
    out, report = bnfold.fold_onnx(model)
    result = verify.check(model, out, report=report)
    assert [s.node for s in result.sites] == ["bn0", "bn1", "bn2"]
    assert all(s.tensor == f"n{i}" for i, s in enumerate(result.sites))
    assert onnx.ModelProto  # the models stay ModelProtos: nothing was written

"""`bnfold check`: exit codes (0 match, 1 mismatch, 2 usage/load), options, the JSON report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import TensorProto as T

from bnfold.cli.verify_cmds import check
from bnfold.errors import EXIT_INPUT, EXIT_MISMATCH, EXIT_OK
from test_verify import cast_model, conv_bn_chain, multi_io_model, save


@pytest.fixture
def models(tmp_path):
    return {
        "orig": save(conv_bn_chain(layers=4), tmp_path / "orig.onnx"),
        "good": save(conv_bn_chain(layers=4, fold=True), tmp_path / "good.onnx"),
        "bad": save(conv_bn_chain(layers=4, fold=True, perturb=(1, 2, 1.05)), tmp_path / "bad.onnx"),
    }


def run(*args):
    return CliRunner().invoke(check, [str(a) for a in args])


def assert_one_line_error(result, code):
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfold: error:"), result.stderr
    assert "Traceback" not in result.output


def test_match_mismatch_exit_codes(models):
    ok = run(models["orig"], models["good"])
    assert ok.exit_code == EXIT_OK, ok.output
    assert ok.stdout.startswith("PASS") and "rule:" in ok.stdout
    bad = run(models["orig"], models["bad"])
    assert bad.exit_code == EXIT_MISMATCH, bad.output
    assert bad.stdout.startswith("FAIL") and "worst at" in bad.stdout


def test_quiet(models):
    result = run(models["orig"], models["bad"], "-q")
    assert result.exit_code == EXIT_MISMATCH and len(result.stdout.strip().splitlines()) == 1


def test_missing_and_corrupt_files_exit_2(models, tmp_path):
    assert_one_line_error(run(models["orig"], tmp_path / "nope.onnx"), EXIT_INPUT)
    corrupt = tmp_path / "corrupt.onnx"
    data = open(models["orig"], "rb").read()
    corrupt.write_bytes(data[: len(data) // 2])  # a truncated download
    assert_one_line_error(run(corrupt, models["orig"]), EXIT_INPUT)
    text = tmp_path / "text.onnx"
    text.write_text("this is not a model\n")
    assert_one_line_error(run(models["orig"], text), EXIT_INPUT)


@pytest.mark.parametrize("args", [
    ["--shape", "x:1xAx8x8"],
    ["--shape", "nope:1x8x8x8"],
    ["--shape", "x:1x8x8"],
    ["--shape", "x:1x9x8x8"],
    ["--range", "1"],
    ["--range", "2,1"],
    ["--atol", "abc"],
    ["--atol", "zz:0.1"],
    ["--rtol", "-1"],
])
def test_bad_options_exit_2(models, args):
    assert_one_line_error(run(models["orig"], models["good"], *args), EXIT_INPUT)


def test_click_usage_errors_exit_2(models):
    assert run(models["orig"]).exit_code == 2
    assert run(models["orig"], models["good"], "--ort-opt", "fast").exit_code == 2
    assert run(models["orig"], models["good"], "--batches", "0").exit_code == 2


def test_options_reach_the_report(models, tmp_path):
    report = tmp_path / "r.json"
    result = run(models["orig"], models["good"], "--seed", "5", "--batches", "3", "--shape", "x:2x8x6x6",
                 "--range", "-1,1", "--ort-opt", "basic", "--threads", "1", "--json", report)
    assert result.exit_code == 0, result.output
    d = json.loads(report.read_text())
    assert d["passed"] is True
    assert d["inputs"]["seed"] == 5 and d["inputs"]["batches"] == 3 and d["inputs"]["value_range"] == [-1.0, 1.0]
    assert d["inputs"]["tensors"] == [{"name": "x", "dtype": "float32", "shape": [2, 8, 6, 6], "source": "uniform[-1,1)"}]
    assert d["runtime"]["graph_optimization"] == "basic" and d["runtime"]["threads"] == 1
    assert d["outputs"][0]["shape"] == [2, 8, 6, 6] and d["outputs"][0]["total"] == 3 * 2 * 8 * 36


def test_json_report_on_mismatch(models, tmp_path):
    report = tmp_path / "r.json"
    result = run(models["orig"], models["bad"], "--json", report)
    assert result.exit_code == EXIT_MISMATCH
    d = json.loads(report.read_text())
    assert set(d) >= {"passed", "rule", "scale_rule", "models", "inputs", "runtime", "outputs", "problems", "notes"}
    assert d["passed"] is False and d["models"]["folded"] == models["bad"]
    out = d["outputs"][0]
    assert out["passed"] is False and out["failing"] > 0 and out["max_abs_err"] > out["atol"]
    assert out["worst"]["batch"] == 0 and len(out["worst"]["index"]) == 4
    assert any("dynamic dims" in n for n in d["notes"])
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_json_to_stdout(models):
    result = run(models["orig"], models["good"], "--json", "-")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["passed"] is True and result.stderr.startswith("PASS")


def test_json_unwritable_exit_4(models, tmp_path):
    result = run(models["orig"], models["good"], "--json", tmp_path / "no" / "dir" / "r.json")
    assert_one_line_error(result, 4)


def test_per_output_atol(tmp_path):
    orig = save(multi_io_model(), tmp_path / "o.onnx")
    off = save(multi_io_model(offset=0.01), tmp_path / "f.onnx")
    assert run(orig, off).exit_code == EXIT_MISMATCH
    assert run(orig, off, "--atol", "s:0.02").exit_code == EXIT_OK
    assert run(orig, off, "--atol", "0.02").exit_code == EXIT_OK
    assert run(orig, off, "--atol", "0.02", "--atol", "s:0.001").exit_code == EXIT_MISMATCH


def test_inputs_npz(tmp_path):
    path = save(multi_io_model(), tmp_path / "m.onnx")
    npz = tmp_path / "in.npz"
    np.savez(npz, x=np.ones((2, 4), np.float32), y=np.ones((2, 4), np.float32), i=np.array([1, 2]),
             j=np.array([1, 2, 3], np.int32), m=np.array([True, False]))
    report = tmp_path / "r.json"
    assert run(path, path, "--inputs", npz, "--json", report).exit_code == 0
    assert {t["source"] for t in json.loads(report.read_text())["inputs"]["tensors"]} == {f"npz {npz}"}
    np.savez(npz, x=np.ones((2, 4), np.float64))
    assert_one_line_error(run(path, path, "--inputs", npz), EXIT_INPUT)


def test_dynamic_dims_note_and_shape(models):
    default = run(models["orig"], models["good"])
    assert "note: dynamic dims of input 'x'" in default.stdout
    shaped = run(models["orig"], models["good"], "--shape", "x:1x8x4x4")
    assert shaped.exit_code == 0 and "note:" not in shaped.stdout and "[1x8x4x4]" in shaped.stdout
    symbol = run(models["orig"], models["good"], "--shape", "N:2")
    assert symbol.exit_code == 0 and "N=" not in symbol.stdout and "H=32" in symbol.stdout


def test_float16_and_bfloat16_inputs(tmp_path):
    for elem_type in (T.FLOAT16, T.BFLOAT16):
        orig = save(cast_model(elem_type), tmp_path / f"o{elem_type}.onnx")
        bad = save(cast_model(elem_type, add=1.0), tmp_path / f"b{elem_type}.onnx")
        assert run(orig, orig).exit_code == 0
        assert run(orig, bad).exit_code == EXIT_MISMATCH


def _has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(_has_cuda(), reason="CUDAExecutionProvider is present: the missing-CUDA path cannot be seen")
def test_provider_cuda_without_cuda_exit_2(models):
    result = run(models["orig"], models["good"], "--provider", "cuda")
    assert_one_line_error(result, EXIT_INPUT)
    assert "onnxruntime-gpu" in result.stderr


@pytest.mark.skipif(not _has_cuda(), reason="CUDAExecutionProvider not available")
def test_provider_cuda(models):
    assert run(models["orig"], models["good"], "--provider", "cuda").exit_code == 0
    assert run(models["orig"], models["bad"], "--provider", "cuda").exit_code == EXIT_MISMATCH


def test_installed_command(models):
    """The real `bnfold check` entry point, through the router, in a fresh process."""
    exe = [sys.executable, "-c", "from bnfold.cli import main; main()"]
    ok = subprocess.run(exe + ["check", models["orig"], models["good"]], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(exe + ["check", models["orig"], models["bad"]], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stdout.startswith("FAIL")
    missing = subprocess.run(exe + ["check", models["orig"], models["orig"] + ".nope"], capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1

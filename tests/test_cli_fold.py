"""The ``bnfold IN -o OUT`` command: output, reports, and failures (one line, an exit code from
bnfold.errors, no traceback, no output file, input untouched)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from bnfold import __version__
from bnfold.cli import main
from bnfold.errors import EXIT_EXTERNAL_DATA, EXIT_INPUT, EXIT_MISMATCH, EXIT_OUTPUT
from onnx_models import GraphBuilder, assert_equivalent, count_op


def small_model(seed: int = 0) -> onnx.ModelProto:
    """conv-bn (folds), relu-bn-relu (refused: no linear op on either side), conv-bn (folds)."""
    g = GraphBuilder(seed=seed)
    x = g.input("x", [1, 3, 6, 6])
    h = g.bn(g.conv(x, "conv1", 3, 4, (3, 3), pads=[1, 1, 1, 1]), "bn1", 4)
    h = g.node("Relu", [h], "r", "relu").output[0]
    h = g.bn(h, "bn_after_relu", 4)
    h = g.node("Relu", [h], "r2", "relu2").output[0]
    g.output(g.bn(g.conv(h, "conv2", 4, 2, (1, 1)), "bn2", 2))
    return g.model()


@pytest.fixture
def model_file(tmp_path) -> Path:
    path = tmp_path / "in" / "model.onnx"
    path.parent.mkdir()
    onnx.save_model(small_model(), str(path))
    return path


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def listing(*dirs: Path):
    return {str(p) for d in dirs for p in d.rglob("*")}


def assert_clean_failure(result, code: int) -> None:
    """Exit ``code``, exactly one line on stderr starting 'bnfold: error:', no traceback."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("bnfold: error:"), lines[0]
    assert "Traceback" not in result.stdout + result.stderr


# -- success ----------------------------------------------------------------------------------


def test_fold_writes_output_and_prints_summary(model_file, tmp_path):
    before = model_file.read_bytes()
    out = tmp_path / "out" / "folded.onnx"
    out.parent.mkdir()
    result = invoke(model_file, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert "folded 2 of 3" in result.stdout
    assert model_file.read_bytes() == before
    folded = onnx.load(str(out))
    assert count_op(folded, "BatchNormalization") == 1
    assert_equivalent(small_model(), folded)
    assert listing(out.parent) == {str(out)}  # no staging leftovers


def test_explicit_fold_subcommand(model_file, tmp_path):
    out = tmp_path / "f.onnx"
    result = invoke("fold", model_file, "--output", out)
    assert result.exit_code == 0, result.stderr
    assert out.exists()


def test_verbose_lists_every_bn(model_file, tmp_path):
    result = invoke(model_file, "-o", tmp_path / "f.onnx", "--verbose")
    assert result.exit_code == 0, result.stderr
    for name in ("bn1", "bn2", "bn_after_relu"):
        assert name in result.stdout
    assert "no-linear-producer" in result.stdout
    quiet = invoke(model_file, "-o", tmp_path / "g.onnx")
    assert "bn_after_relu" not in quiet.stdout


def test_dry_run_writes_nothing(model_file, tmp_path):
    out = tmp_path / "out.onnx"
    before = listing(tmp_path)
    result = invoke(model_file, "-o", out, "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("would fold 2 of 3") and "folded" not in result.stdout
    assert not out.exists()
    assert listing(tmp_path) == before


def test_json_report_parses(model_file, tmp_path):
    report_path = tmp_path / "report.json"
    result = invoke(model_file, "-o", tmp_path / "f.onnx", "--json", report_path)
    assert result.exit_code == 0, result.stderr
    data = json.loads(report_path.read_text())["models"][0]["fold"]
    assert data["folded_count"] == 2 and data["skipped_count"] == 1
    assert {f["bn"] for f in data["folded"]} == {"bn1", "bn2"}
    assert {f["rule"] for f in data["folded"]} == {"conv-bn"}
    assert data["skipped"][0]["bn"] == "bn_after_relu"
    assert data["skipped"][0]["reason"] == "no-linear-producer"


def test_json_with_dry_run(model_file, tmp_path):
    report_path = tmp_path / "report.json"
    result = invoke(model_file, "--dry-run", "--json", report_path)
    assert result.exit_code == 0, result.stderr
    assert json.loads(report_path.read_text())["models"][0]["fold"]["folded_count"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "report.json"]


def test_no_check_still_writes_an_equivalent_model(model_file, tmp_path):
    out = tmp_path / "f.onnx"
    result = invoke(model_file, "-o", out, "--no-check")
    assert result.exit_code == 0, result.stderr
    assert_equivalent(small_model(), onnx.load(str(out)))


def test_existing_output_is_replaced(model_file, tmp_path):
    out = tmp_path / "f.onnx"
    out.write_bytes(b"stale")
    assert invoke(model_file, "-o", out).exit_code == 0
    assert_equivalent(small_model(), onnx.load(str(out)))


def test_version_and_help():
    result = invoke("--version")
    assert result.exit_code == 0 and __version__ in result.stdout
    result = invoke("--help")
    assert result.exit_code == 0 and "fold" in result.stdout
    result = invoke("fold", "--help")
    assert result.exit_code == 0
    for option in ("--output", "--dry-run", "--verbose", "--json", "--no-check"):
        assert option in result.stdout


# -- bad input ------------------------------------------------------------------------------


def _bad_input(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / "bad.onnx"
    if kind == "missing":
        return tmp_path / "does-not-exist.onnx"
    if kind == "text":
        path.write_text("this is not an ONNX model\n" * 20)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = small_model().SerializeToString()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random-bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "directory":
        path.mkdir()
    return path


@pytest.mark.parametrize("kind", ["missing", "text", "empty", "truncated", "random-bytes", "directory"])
def test_bad_input_fails_cleanly(kind, tmp_path):
    src = _bad_input(kind, tmp_path)
    out = tmp_path / "out" / "f.onnx"
    out.parent.mkdir()
    before = listing(tmp_path)
    result = invoke(src, "-o", out)
    assert_clean_failure(result, EXIT_INPUT)
    assert listing(tmp_path) == before


def _external_model(tmp_path: Path) -> Path:
    src_dir = tmp_path / "ext"
    src_dir.mkdir()
    path = src_dir / "m.onnx"
    onnx.save_model(small_model(seed=1), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.data", size_threshold=0)  # fmt: skip
    return path


def test_external_data_model_folds(tmp_path):
    src = _external_model(tmp_path)
    before = {p.name: p.read_bytes() for p in src.parent.iterdir()}
    out = tmp_path / "out" / "f.onnx"
    out.parent.mkdir()
    result = invoke(src, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert {p.name: p.read_bytes() for p in src.parent.iterdir()} == before
    assert_equivalent(small_model(seed=1), onnx.load(str(out)))


def test_missing_external_data_fails_cleanly(tmp_path):
    src = _external_model(tmp_path)
    (src.parent / "m.data").unlink()
    out = tmp_path / "f.onnx"
    result = invoke(src, "-o", out)
    assert_clean_failure(result, EXIT_EXTERNAL_DATA)
    assert not out.exists()


@pytest.mark.parametrize("location", ["../outside.data", "/etc/hostname", "sub/../../outside.data"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path, location):
    src = _external_model(tmp_path)
    model = onnx.load(str(src), load_external_data=False)
    (tmp_path / "outside.data").write_bytes((src.parent / "m.data").read_bytes())
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(src))
    out = tmp_path / "f.onnx"
    result = invoke(src, "-o", out)
    assert_clean_failure(result, EXIT_EXTERNAL_DATA)
    assert not out.exists()


# -- bad output -----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["missing-dir", "parent-is-file"])
def test_unwritable_output_fails_cleanly(model_file, tmp_path, where):
    if where == "missing-dir":
        out = tmp_path / "no" / "such" / "dir" / "f.onnx"
    else:
        (tmp_path / "a_file").write_text("x")
        out = tmp_path / "a_file" / "f.onnx"
    before = listing(tmp_path)
    input_bytes = model_file.read_bytes()
    result = invoke(model_file, "-o", out)
    assert_clean_failure(result, EXIT_OUTPUT)
    assert listing(tmp_path) == before
    assert model_file.read_bytes() == input_bytes


def test_mismatch_writes_nothing(model_file, tmp_path, monkeypatch):
    """A fold that computes something else is caught by the check: exit 1, nothing written,
    an existing output left as it was."""
    import bnfold.onnx_pass as onnx_pass

    real = onnx_pass.fold_model_proto

    def broken(model, *args, **kwargs):
        report = real(model, *args, **kwargs)
        conv = next(n for n in model.graph.node if n.op_type == "Conv")
        for t in model.graph.initializer:
            if t.name == conv.input[1]:
                w = numpy_helper.to_array(t).copy()
                w[0] *= np.float32(1.01)
                t.CopyFrom(numpy_helper.from_array(w, t.name))
        return report

    monkeypatch.setattr(onnx_pass, "fold_model_proto", broken)
    out = tmp_path / "f.onnx"
    out.write_bytes(b"previous output")
    result = invoke(model_file, "-o", out)
    assert_clean_failure(result, EXIT_MISMATCH)
    assert out.read_bytes() == b"previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.onnx", "in"]


# -- real processes -------------------------------------------------------------------------

BNFOLD = [sys.executable, "-c", "import sys; from bnfold.cli import main; sys.exit(main())"]


def test_end_to_end_subprocess(model_file, tmp_path):
    out = tmp_path / "f.onnx"
    report_path = tmp_path / "r.json"
    proc = subprocess.run(BNFOLD + [str(model_file), "-o", str(out), "--json", str(report_path)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "folded 2 of 3" in proc.stdout
    assert json.loads(report_path.read_text())["models"][0]["fold"]["folded_count"] == 2
    assert_equivalent(small_model(), onnx.load(str(out)))


@pytest.mark.parametrize("kind,code", [("missing", EXIT_INPUT), ("truncated", EXIT_INPUT)])
def test_end_to_end_subprocess_failure(tmp_path, kind, code):
    src = _bad_input(kind, tmp_path)
    out = tmp_path / "f.onnx"
    env = dict(os.environ)
    env.pop("BNFOLD_DEBUG", None)
    proc = subprocess.run(BNFOLD + [str(src), "-o", str(out)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == code
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bnfold: error:"), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not out.exists()


def test_output_same_as_input_is_refused(model_file):
    before = model_file.read_bytes()
    result = invoke(model_file, "-o", model_file)
    assert_clean_failure(result, EXIT_OUTPUT)
    assert model_file.read_bytes() == before
    assert sorted(p.name for p in model_file.parent.iterdir()) == ["model.onnx"]


def test_output_errors_show_the_path_as_typed(model_file, monkeypatch):
    """The README: paths are printed as you typed them, in output errors too (not made absolute)."""
    monkeypatch.chdir(model_file.parent)
    result = invoke("model.onnx", "-o", "model.onnx")
    assert_clean_failure(result, EXIT_OUTPUT)
    assert result.stderr.startswith("bnfold: error: model.onnx: would overwrite"), result.stderr
    result = invoke("model.onnx", "-o", os.path.join("missing", "f.onnx"))
    assert_clean_failure(result, EXIT_OUTPUT)
    assert result.stderr.startswith("bnfold: error: missing: output folder does not exist"), result.stderr

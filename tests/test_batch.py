"""Folding many models at once: `bnfold A B DIR --out-dir OUT [-j N] [--json F]`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from bnfold.cli import main
from bnfold.errors import EXIT_INPUT, EXIT_OK, EXIT_OUTPUT
from onnx_models import GraphBuilder, assert_equivalent

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def conv_bn_model(seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed=seed)
    x = g.input("x", [1, 3, 6, 6])
    g.output(g.bn(g.conv(x, "conv", 3, 4, (3, 3)), "bn", 4))
    return g.model()


@pytest.fixture
def inputs(tmp_path):
    """Two loose models and a folder with one model at its top and one in a subfolder."""
    loose = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    for i, path in enumerate(loose):
        onnx.save(conv_bn_model(i), str(path))
    folder = tmp_path / "zoo"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(SAMPLES / "resnet_mini.onnx", folder / "resnet_mini.onnx")
    shutil.copy(SAMPLES / "mlp.onnx", folder / "sub" / "mlp.onnx")
    (folder / "notes.txt").write_text("not a model")
    return loose, folder


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_files_and_folders_fold_into_out_dir(tmp_path, inputs):
    loose, folder = inputs
    out = tmp_path / "out"
    report = tmp_path / "all.json"
    result = run(*loose, folder, "--out-dir", out, "--json", report)
    assert result.exit_code == EXIT_OK, result.output
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.onnx"))
    assert written == ["a.onnx", "b.onnx", "resnet_mini.onnx", "sub/mlp.onnx"]  # paths below a folder kept
    data = json.loads(report.read_text())
    assert data["summary"]["models"] == 4 and data["summary"]["failed"] == 0
    assert all(m["status"] == "ok" and m["fold"]["folded_count"] > 0 for m in data["models"])
    assert_equivalent(onnx.load(str(loose[0])), onnx.load(str(out / "a.onnx")))


def test_a_bad_model_is_reported_and_the_others_go_on(tmp_path, inputs):
    loose, _ = inputs
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    out = tmp_path / "out"
    report = tmp_path / "all.json"
    result = run(loose[0], bad, loose[1], "--out-dir", out, "--json", report)
    assert result.exit_code == EXIT_INPUT
    assert sorted(p.name for p in out.glob("*.onnx")) == ["a.onnx", "b.onnx"]
    statuses = {Path(m["input"]).name: m["status"] for m in json.loads(report.read_text())["models"]}
    assert statuses == {"a.onnx": "ok", "bad.onnx": "error", "b.onnx": "ok"}
    assert "FAIL" in result.output and "bad.onnx" in result.output


def test_parallel_workers_give_the_same_bytes(tmp_path, inputs):
    loose, folder = inputs
    one, two = tmp_path / "one", tmp_path / "two"
    assert run(*loose, folder, "--out-dir", one, "-j", "1").exit_code == EXIT_OK
    assert run(*loose, folder, "--out-dir", two, "-j", "2").exit_code == EXIT_OK
    for path in one.rglob("*.onnx"):
        assert path.read_bytes() == (two / path.relative_to(one)).read_bytes()


def test_two_inputs_on_one_output_are_refused(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    for d in ("x", "y"):
        onnx.save(conv_bn_model(0), str(tmp_path / d / "m.onnx"))
    result = run(tmp_path / "x" / "m.onnx", tmp_path / "y" / "m.onnx", "--out-dir", tmp_path / "out")
    assert result.exit_code == EXIT_INPUT
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_usage_errors(tmp_path, inputs):
    loose, _ = inputs
    assert run(*loose, "-o", tmp_path / "o.onnx").exit_code == 2  # several inputs need --out-dir
    result = run(*loose, "--out-dir", tmp_path / "out", "--json", loose[0])
    assert result.exit_code == EXIT_OUTPUT  # the report may not overwrite an input
    assert onnx.load(str(loose[0])).graph.node  # still a model

"""Folding the same model twice gives byte-identical output: through the CLI (two files, one
process and two processes), with and without external data, and through ``fold_onnx``."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from bnfold.cli import main
from onnx_models import GraphBuilder

ROOT = Path(__file__).resolve().parent.parent


def mixed_model() -> onnx.ModelProto:
    """Conv, grouped ConvTranspose, Gemm and MatMul, each with a BN; one BN that cannot fold."""
    b = GraphBuilder(seed=7)
    y = b.conv(b.input("x", [2, 4, 6, 6]), "conv", 4, 6, [3, 3], pads=[1, 1, 1, 1])
    y = b.bn(y, "bn1", 6)
    y = b.conv(y, "up", 6, 6, [2, 2], group=3, op="ConvTranspose", strides=[2, 2])
    y = b.bn(y, "bn2", 6, kind="const")
    b.node("Relu", [y], "r", "relu")
    b.output(b.bn("r", "bn_after_relu", 6))  # no linear producer: stays, with a reason
    h = b.input("h", [3, 5])
    b.node("Gemm", [h, b.init("gW", b.weight((4, 5)))], "g", "gemm", transB=1, alpha=0.5)
    g = b.bn("g", "bn3", 4)
    b.node("MatMul", [g, b.init("mW", b.weight((4, 2)))], "m", "matmul")
    b.output(b.bn("m", "bn4", 2))
    return b.model()


def fold_twice(tmp_path: Path, src: Path, *extra: str):
    outs = []
    for i in (1, 2):
        out = tmp_path / f"run{i}" / "folded.onnx"
        out.parent.mkdir()
        result = CliRunner().invoke(main, [str(src), "-o", str(out), *extra], catch_exceptions=False)
        assert result.exit_code == 0, result.stderr
        outs.append(out)
    return outs


def same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.parent.iterdir())
    assert names == sorted(p.name for p in b.parent.iterdir())
    for name in names:
        assert (a.parent / name).read_bytes() == (b.parent / name).read_bytes(), f"{name} differs"


def test_cli_twice_gives_identical_bytes(tmp_path) -> None:
    src = tmp_path / "model.onnx"
    onnx.save(mixed_model(), str(src))
    a, b = fold_twice(tmp_path, src)
    same_files(a, b)
    assert a.read_bytes() != src.read_bytes(), "nothing was folded: the comparison proves little"


def test_cli_twice_with_external_data(tmp_path) -> None:
    src = tmp_path / "in" / "model.onnx"
    src.parent.mkdir()
    onnx.save(mixed_model(), str(src), save_as_external_data=True, location="w.bin", size_threshold=0)
    a, b = fold_twice(tmp_path, src)
    assert (a.parent / "folded.onnx.data").exists()
    same_files(a, b)


def test_two_processes_give_identical_bytes(tmp_path) -> None:
    """Separate interpreters (different hash seeds): no set or dict order leaks into the output."""
    src = tmp_path / "model.onnx"
    onnx.save(mixed_model(), str(src))
    outs = []
    for seed in ("1", "2"):
        out = tmp_path / f"p{seed}.onnx"
        env = dict(os.environ, PYTHONHASHSEED=seed)
        proc = subprocess.run([sys.executable, "-c", "from bnfold.cli import main; main()", str(src), "-o", str(out)],
                              capture_output=True, text=True, timeout=180, env=env)
        assert proc.returncode == 0, proc.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


@pytest.mark.parametrize(
    "path", sorted(glob.glob(str(ROOT / "sample_models" / "*.onnx"))) or [None],
    ids=lambda p: os.path.basename(p) if p else "no-samples",
)
def test_fold_onnx_is_deterministic(path) -> None:
    from bnfold.onnx_pass import fold_onnx

    model = onnx.load(path) if path else mixed_model()
    first, report1 = fold_onnx(model)
    second, report2 = fold_onnx(model)
    assert first.SerializeToString(deterministic=True) == second.SerializeToString(deterministic=True)
    assert [(p.bn, p.rule) for p in report1.folded] == [(p.bn, p.rule) for p in report2.folded]
    assert [(s.bn, s.reason) for s in report1.skipped] == [(s.bn, s.reason) for s in report2.skipped]

"""Opt-in: models from timm, ultralytics, segmentation-models-pytorch and MONAI (random weights,
nothing downloaded). Runs only with BNFOLD_LIBS=1 in an environment that has those libraries;
for each model the PyTorch path must leave no more BatchNorms than the ONNX path leaves on the
same model exported with training=TrainingMode.PRESERVE, with outputs equal to the original."""

from __future__ import annotations

import importlib.util
import os
import pathlib

import pytest

pytestmark = [
    pytest.mark.libs,
    pytest.mark.skipif(os.environ.get("BNFOLD_LIBS") != "1", reason="opt-in: set BNFOLD_LIBS=1"),
]

for _lib in ("torch", "timm", "ultralytics", "segmentation_models_pytorch", "monai"):
    if os.environ.get("BNFOLD_LIBS") == "1":
        pytest.importorskip(_lib)


def _bench():
    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench_torch_libs.py"
    spec = importlib.util.spec_from_file_location("bench_torch_libs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH = _bench() if os.environ.get("BNFOLD_LIBS") == "1" else None
NAMES = list(BENCH.MODELS) if BENCH else ["skipped"]


@pytest.mark.parametrize("name", NAMES)
def test_torch_path_leaves_no_more_bns_than_the_onnx_path(name):
    row = BENCH.run_one(name, rounds=0)
    assert row["torch_check"], row
    assert row["onnx_check"], row
    assert row["left_torch"] <= row["left_onnx"], row

"""export_folded: fold, export to ONNX with torch.onnx, check the file with onnxruntime.

Kept few and small: torch.onnx export is slow. The check inside export_folded compares the ONNX
file (onnxruntime, graph optimizations disabled) with the *original* module; these tests also
rerun that comparison themselves on a second seeded input.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402

from bnfold.torch_pass import export_folded  # noqa: E402
from bnfold.torch_pass._math import to_numpy  # noqa: E402
from bnfold.verify import compare_outputs, run_onnx  # noqa: E402
from test_torch_archs import MLP, BasicBlock, UpBlock, count_bn, outputs, randomize, seeded, state_copy  # noqa: E402


def onnx_bn_count(path) -> int:
    import onnx

    return sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)


def recheck(model, path, *args):
    feeds = {f"input_{i}": to_numpy(a) for i, a in enumerate(args)}
    actual = run_onnx(str(path), feeds, ort_opt="disable")
    expected = {f"output_{i}": v for i, v in enumerate(outputs(model, *args).values())}
    return compare_outputs(expected, actual)


def test_resnet_block_exports_folded_and_checks(tmp_path):
    model = randomize(nn.Sequential(BasicBlock(3, 8, stride=2), BasicBlock(8, 8))).eval()
    before = state_copy(model)
    report, check = export_folded(model, seeded(2, 3, 16, 16), tmp_path / "m.onnx")
    assert check and report.n_folded == 5, check.summary()
    assert onnx_bn_count(tmp_path / "m.onnx") == 0
    assert count_bn(model) == 5 and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert recheck(model, tmp_path / "m.onnx", seeded(2, 3, 16, 16, seed=5))


def test_two_input_unet_step_and_mlp_export(tmp_path):
    model = randomize(UpBlock(8, 4, groups=2)).eval()
    args = (seeded(1, 8, 4, 4), seeded(1, 4, 8, 8, seed=2))
    report, check = export_folded(model, args, tmp_path / "u.onnx", opset=17)
    assert check and onnx_bn_count(tmp_path / "u.onnx") == 0
    mlp = randomize(MLP()).eval()
    report, check = export_folded(mlp, (seeded(4, 12),), tmp_path / "mlp.onnx", check=True)
    assert check and report.n_folded == 2 and onnx_bn_count(tmp_path / "mlp.onnx") == 0


def test_check_catches_a_wrong_file(tmp_path):
    """The same comparison fails when the file is not the model (so the check can fail)."""
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    export_folded(model, seeded(1, 3, 8, 8), tmp_path / "m.onnx")
    with torch.no_grad():
        model[1].running_mean += 0.5
    assert not recheck(model, tmp_path / "m.onnx", seeded(1, 3, 8, 8))


def test_failed_export_leaves_no_file(tmp_path):
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    with pytest.raises(Exception):
        export_folded(model, seeded(1, 3, 8, 8), tmp_path / "m.onnx", no_such_option=1)
    assert list(tmp_path.iterdir()) == []

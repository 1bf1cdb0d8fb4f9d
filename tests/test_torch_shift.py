"""Folded 1x1 depthwise convs (a slow CPU bias path) add their new bias after the convolution:
same function, same parameters and state_dict keys, still an nn.Conv*d."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402

from bnfold.torch_pass import fold_module  # noqa: E402
from bnfold.torch_pass._shift import ShiftAfterConv1d, ShiftAfterConv2d, ShiftAfterConv3d  # noqa: E402
from test_torch_archs import assert_same, count_bn, randomize, seeded  # noqa: E402


def block(conv, bn):
    return randomize(nn.Sequential(conv, bn, nn.ReLU())).eval()


CASES = [
    (lambda: nn.Conv2d(6, 6, 1, groups=6, bias=False), nn.BatchNorm2d(6), (2, 6, 5, 5), ShiftAfterConv2d),
    (lambda: nn.Conv2d(6, 6, 1, stride=2, groups=6, bias=False), nn.BatchNorm2d(6), (2, 6, 7, 7), ShiftAfterConv2d),
    (lambda: nn.Conv1d(6, 6, 1, groups=6, bias=False), nn.BatchNorm1d(6), (2, 6, 20), ShiftAfterConv1d),
    (lambda: nn.Conv3d(6, 6, 1, groups=6, bias=False), nn.BatchNorm3d(6), (1, 6, 6, 5, 5), ShiftAfterConv3d),
    (lambda: nn.Conv2d(6, 6, 1, padding=1, groups=6, padding_mode="reflect", bias=False), nn.BatchNorm2d(6),
     (2, 6, 5, 5), ShiftAfterConv2d),
]


@pytest.mark.parametrize("make_conv,bn,shape,cls", CASES)
@pytest.mark.parametrize("method", ["fx", "hooks"])
def test_slow_path_conv_adds_the_shift_after(make_conv, bn, shape, cls, method):
    model = block(make_conv(), bn)
    x = seeded(*shape)
    folded, report = fold_module(model, (x,), method=method)
    assert count_bn(folded) == 0, report.summary(verbose=True)
    assert type(folded[0]) is cls and isinstance(folded[0], type(model[0]))
    assert set(folded[0].state_dict()) == {"weight", "bias"}
    assert_same(model, folded, x)
    assert_same(model, folded, seeded(*shape, seed=4))
    again, report2 = fold_module(folded, (x,))  # a folded model folds again without change
    assert report2.n_folded == 0 and type(again[0]) is cls
    assert_same(model, again, x)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 6, 3, padding=1, bias=False),  # a fast path
    nn.Conv2d(4, 6, 3, padding=2, dilation=2, bias=True),  # it had a bias: no new cost
    nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False),  # depthwise, not 1x1
    nn.Conv2d(6, 6, 3, padding=2, dilation=2, bias=False),  # dilated: the bias in the conv measured faster
    nn.Conv2d(6, 6, 1, groups=6, bias=True),  # 1x1 depthwise that had a bias: no new cost
])
def test_other_convs_keep_their_class(conv):
    model = block(conv, nn.BatchNorm2d(6))
    x = seeded(2, conv.in_channels, 8, 8)
    folded, report = fold_module(model, (x,))
    assert report.n_folded == 1 and type(folded[0]) is nn.Conv2d
    assert_same(model, folded, x)


def test_shift_after_survives_torch_compile():
    model = block(nn.Conv2d(6, 6, 1, groups=6, bias=False), nn.BatchNorm2d(6))
    x = seeded(2, 6, 9, 9)
    folded, _ = fold_module(model, (x,))
    try:
        fast = torch.compile(folded)
        assert_same(model, fast, x)
    except Exception as exc:  # no compiler here
        if "inductor" in str(exc).lower() or "compile" in type(exc).__module__:
            pytest.skip(f"torch.compile does not run here: {type(exc).__name__}")
        raise


def test_shift_after_scripts_and_exports_to_onnx(tmp_path):
    import warnings

    from bnfold.torch_pass import export_folded

    model = block(nn.Conv2d(6, 6, 1, groups=6, bias=False), nn.BatchNorm2d(6))
    x = seeded(2, 6, 5, 5)
    folded, _ = fold_module(model, (x,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(folded)
    assert_same(model, scripted, x)
    report, check = export_folded(model, (x,), tmp_path / "m.onnx")
    assert check, check.summary()

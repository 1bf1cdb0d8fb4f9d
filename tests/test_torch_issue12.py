"""Issue 12's PyTorch findings: observing never changes the module bnfold returns, every method
honours every example, and a module that cannot be deep-copied does not crash bnfold."""

from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402

from bnfold.torch_pass import fold_module  # noqa: E402
from test_torch_archs import assert_same, count_bn, randomize, reasons, seeded  # noqa: E402


class CountingForward(nn.Module):
    """A Python counter and an in-place buffer update, both read by the output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.register_buffer("buf", torch.zeros(1))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        self.buf.add_(1)
        return self.bn(self.conv(x)) * self.buf + self.calls


@pytest.mark.parametrize("method", ["auto", "fx", "export", "hooks"])
def test_observing_never_changes_the_returned_module(method):
    model = randomize(CountingForward()).eval()
    x = seeded(2, 3, 8, 8)
    folded, report = fold_module(model, (x,), method=method, more_examples=[(seeded(1, 3, 6, 6),)])
    assert folded.calls == 0 and float(folded.buf) == 0.0, report.summary(verbose=True)
    assert model.calls == 0 and float(model.buf) == 0.0
    assert_same(model, folded, x)  # both start from the same state: the first calls agree
    assert float(folded.buf) == 1.0


def test_observing_in_place_leaves_the_state_as_it_was():
    model = randomize(CountingForward()).eval()
    folded, report = fold_module(model, (seeded(2, 3, 8, 8),), inplace=True)
    assert folded is model and model.calls == 0 and float(model.buf) == 0.0
    assert report.n_folded == 1


class LinearBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.fc(x))


@pytest.mark.parametrize("method", ["fx", "export", "hooks"])
def test_linear_bn1d_with_a_2d_and_a_3d_example_is_not_folded(method):
    # On a 3-D input BatchNorm1d normalizes dim 1 (not Linear's features): folding is wrong there.
    model = randomize(LinearBN()).eval()
    x2, x3 = seeded(4, 6), seeded(4, 5, 6, seed=2)
    folded, report = fold_module(model, (x2,), method=method, more_examples=[(x3,)])
    assert count_bn(folded) == 1, report.summary(verbose=True)
    assert reasons(report) == {"bn": "not-per-channel"}
    assert_same(model, folded, x2)
    assert_same(model, folded, x3)


class BranchOnSize(nn.Module):
    """Small inputs take conv -> bn; larger ones read the conv output twice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        if x.shape[-1] <= 8:
            return self.bn(y)
        return self.bn(y) + y


@pytest.mark.parametrize("method", ["auto", "export", "hooks"])
def test_branch_on_input_size_sees_every_example(method):
    model = randomize(BranchOnSize()).eval()
    small, large = seeded(2, 3, 8, 8), seeded(2, 3, 12, 12, seed=3)
    folded, report = fold_module(model, (small,), method=method, more_examples=[(large,)])
    # the large input's path reads the conv output twice (hooks see two calls of conv, one not
    # followed by the BN alone): either reason is right, folding is not
    assert reasons(report)["bn"] in ("producer-has-other-consumers", "shared-module-different-bn"), report.summary(verbose=True)
    assert_same(model, folded, small)
    assert_same(model, folded, large)


class HoldsALock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        with self.lock:
            return self.bn(self.conv(x))


@pytest.mark.parametrize("inplace", [False, True])
def test_module_that_cannot_be_deep_copied_folds(inplace):
    model = randomize(HoldsALock()).eval()
    reference = randomize(HoldsALock()).eval()  # same seeds: same weights as `model`
    reference.conv.load_state_dict(model.conv.state_dict())
    x = seeded(2, 3, 8, 8)
    folded, report = fold_module(model, (x,), inplace=inplace)
    assert report.n_folded == 1, report.summary(verbose=True)
    assert (folded is model) == inplace
    if not inplace:
        assert count_bn(model) == 1  # the caller's module is untouched
        assert folded.lock is model.lock  # the lock is shared, and the report says so
        assert any("shared" in n for n in report.notes)
    assert_same(reference, folded, x)


def test_an_example_the_model_cannot_run_is_a_clear_error():
    from bnfold.torch_pass import ModelTraceError

    model = randomize(CountingForward()).eval()
    with pytest.raises(ModelTraceError, match="fails on example 1"):
        fold_module(model, (seeded(2, 3, 8, 8),), more_examples=[(seeded(2, 5, 8, 8),)])
    assert model.calls == 0

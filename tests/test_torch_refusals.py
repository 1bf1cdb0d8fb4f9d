"""What the PyTorch front end must never fold, with one regression test per public bug in
PRIOR_ART.md (shared conv module, Linear+BN1d on a 3-D input, grouped ConvTranspose,
track_running_stats=False, float16 overflow), and the guards around them.

Every refusal is checked three ways: the reason code, the BN still in the module, and the
folded module's outputs still matching the original's (a refusal must also be harmless).
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bnfold.torch_pass import TrainingModeError, fold_module  # noqa: E402
from test_torch_archs import assert_same, count_bn, fold_and_check, randomize, reasons, seeded  # noqa: E402

METHODS = ["fx", "export", "hooks"]
METHOD_NAMES = {"fx": "torch.fx", "export": "torch.export", "hooks": "forward-hooks"}


def refused(model, args, bn: str, reason: str, method: str = "fx"):
    """Fold with ``method``; assert ``bn`` was left for ``reason`` and outputs still match."""
    model = randomize(model).eval()
    folded, report = fold_module(model, args, method=method)
    assert report.method == METHOD_NAMES[method]
    assert reasons(report).get(bn) == reason, report.summary(verbose=True)
    assert isinstance(folded.get_submodule(bn), nn.modules.batchnorm._BatchNorm)
    assert_same(model, folded, *args)
    return folded, report


# --- shared conv module (pytorch#197539 and friends) -----------------------------------------


class SharedConvTwoBNs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn_a(self.conv(x)) + self.bn_b(self.conv(x * 2))


class SharedConvOneBranchPlain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x.flip(-1))


class SharedConvSameBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x))) * self.bn(self.conv(x.flip(-1)))


@pytest.mark.parametrize("method", METHODS)
def test_shared_conv_followed_by_different_bns_is_refused(method):
    _, report = refused(SharedConvTwoBNs(), (seeded(2, 4, 6, 6),), "bn_a", "shared-module-different-bn", method)
    assert reasons(report)["bn_b"] == "shared-module-different-bn"


@pytest.mark.parametrize("method", METHODS)
def test_shared_conv_with_one_plain_call_is_refused(method):
    refused(SharedConvOneBranchPlain(), (seeded(2, 4, 6, 6),), "bn", "shared-module-different-bn", method)


@pytest.mark.parametrize("method", METHODS)
def test_shared_conv_always_followed_by_the_same_bn_folds(method):
    fold_and_check(randomize(SharedConvSameBN()), (seeded(2, 4, 6, 6),), left=0, expect=METHOD_NAMES[method], method=method)


# --- Linear + BatchNorm1d on a 3-D input (pytorch/ao#4116) ------------------------------------


class LinearBN3d(nn.Module):
    """(N, C, L) with L == C: feature counts agree, but BN normalizes dim 1, Linear the last dim."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn(self.fc(x))


@pytest.mark.parametrize("method", METHODS)
def test_linear_bn1d_on_3d_input_is_refused(method):
    refused(LinearBN3d(), (seeded(2, 6, 6),), "bn", "not-per-channel", method)


def test_linear_bn1d_without_shapes_is_not_guessed():
    model = randomize(LinearBN3d()).eval()
    folded, report = fold_module(model)
    assert reasons(report) == {"bn": "shape-unknown"}
    assert_same(model, folded, seeded(2, 6, 6))


# --- grouped ConvTranspose (pytorch#180995, onnxscript#2867, ...) -----------------------------


@pytest.mark.parametrize("groups,cin,cout", [(2, 4, 6), (3, 6, 9), (4, 8, 4), (6, 6, 6)])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_grouped_conv_transpose_folds_on_the_right_axis(groups, cin, cout, dims):
    convt = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    model = nn.Sequential(convt(cin, cout, 3, stride=2, padding=1, output_padding=1, groups=groups, dilation=1), bn(cout))
    fold_and_check(randomize(model), (seeded(2, cin, *([5] * dims)),), left=0)


def test_grouped_conv_transpose_with_dilation_and_no_bias():
    model = nn.Sequential(nn.ConvTranspose2d(6, 4, 3, stride=2, dilation=2, output_padding=1, groups=2, bias=False), nn.BatchNorm2d(4))
    fold_and_check(randomize(model), (seeded(2, 6, 5, 5),), left=0)


# --- BN with batch statistics (pytorch PR #71259) ---------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_track_running_stats_false_is_refused(method):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    refused(model, (seeded(2, 3, 6, 6),), "1", "no-running-stats", method)


def test_model_in_training_mode_is_a_clear_error():
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).train()
    with pytest.raises(TrainingModeError, match="training mode"):
        fold_module(model)
    assert model.training


def test_allow_training_folds_a_copy_in_eval_mode():
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).train()
    folded, report = fold_module(model, allow_training=True)
    assert model.training and count_bn(model) == 1
    assert not folded.training and count_bn(folded) == 0
    assert any("training mode" in n for n in report.notes)
    assert_same(copy.deepcopy(model).eval(), folded, seeded(2, 3, 6, 6))


def test_one_bn_left_in_training_mode_is_refused():
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))).eval()
    model[3].train()
    stats = model[3].running_mean.clone()
    folded, report = fold_module(model, (seeded(2, 3, 6, 6),))
    assert reasons(report) == {"3": "training-mode"} and count_bn(folded) == 1
    assert torch.equal(folded[3].running_mean, stats)  # the shape run did not update its statistics
    assert torch.equal(model[3].running_mean, stats)


def test_affine_false_bn_folds():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False))
    fold_and_check(randomize(model), (seeded(2, 3, 6, 6),), left=0)


# --- float16 overflow (pytorch PR #134105) -----------------------------------------------------


def test_float16_overflow_is_refused_not_written_as_inf():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, eps=1e-9)).eval()
    with torch.no_grad():
        model[0].weight.fill_(2.0)
        model[1].running_var.fill_(0.0)  # a = gamma / sqrt(0 + 1e-9) ~ 3.2e4 * gamma
        model[1].weight.fill_(10.0)  # weight * a ~ 6.3e5 > 65504
    half = model.half()
    folded, report = fold_module(half)
    assert reasons(report) == {"1": "overflow"}
    assert torch.equal(folded[0].weight, half[0].weight) and count_bn(folded) == 1
    assert all(torch.isfinite(p).all() for p in folded.parameters())


def test_the_same_bn_folds_in_float32():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, eps=1e-9)).eval()
    with torch.no_grad():
        model[0].weight.fill_(2.0)
        model[1].running_var.fill_(0.0)
        model[1].weight.fill_(10.0)
    fold_and_check(model, (seeded(1, 3, 4, 4),), left=0)


# --- dataflow the folder must see ---------------------------------------------------------------


class ConvOutputReused(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y  # the conv's output has another reader


class ConvOutputIsAnOutput(ConvOutputReused):
    def forward(self, x):
        y = self.conv(x)
        return self.bn(y), y


class ConvOutputChangedInPlace(ConvOutputReused):
    def forward(self, x):
        y = self.conv(x)
        z = self.bn(y)
        return z * y.sum()


@pytest.mark.parametrize("model_cls", [ConvOutputReused, ConvOutputIsAnOutput, ConvOutputChangedInPlace])
@pytest.mark.parametrize("method", METHODS)
def test_conv_output_with_another_reader_is_refused(model_cls, method):
    refused(model_cls(), (seeded(2, 4, 5, 5),), "bn", "producer-has-other-consumers", method)


class RegistrationOrderLies(nn.Module):
    """Registered conv -> bn, but the dataflow is bn(x) then conv: names and order prove nothing."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.conv(self.bn(x))


@pytest.mark.parametrize("method", METHODS)
def test_registration_order_alone_never_folds(method):
    refused(RegistrationOrderLies(), (seeded(2, 4, 5, 5),), "bn", "no-linear-producer", method)


class FunctionalWeightUse(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + F.conv2d(x, self.conv.weight)


@pytest.mark.parametrize("method", METHODS)
def test_weight_read_outside_the_module_is_refused(method):
    refused(FunctionalWeightUse(), (seeded(2, 4, 5, 5),), "bn", "parameter-used-elsewhere", method)


class TiedWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(4, 4, 1, bias=False), nn.Conv2d(4, 4, 1, bias=False)
        self.conv2.weight = self.conv1.weight
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv1(x)) + self.conv2(x)


@pytest.mark.parametrize("method", ["fx", "hooks"])
def test_tied_weight_keeps_its_values_in_the_other_module(method):
    model = randomize(TiedWeights()).eval()
    folded, report = fold_module(model, (seeded(2, 4, 5, 5),), method=method)
    # two module calls; conv1 gets a new Parameter, so conv2 keeps the old values
    assert report.n_folded == 1 and torch.equal(folded.conv2.weight, model.conv2.weight)
    assert folded.conv1.weight is not folded.conv2.weight
    assert_same(model, folded, seeded(2, 4, 5, 5))


class HiddenAlias(nn.Module):
    """The BN is registered, but forward calls it through a plain list that bnfold cannot edit."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.alias = [self.bn]

    def forward(self, x):
        return self.alias[0](self.conv(x))


def test_bn_called_through_an_unregistered_reference_is_undone():
    model = randomize(HiddenAlias()).eval()
    folded, report = fold_module(model)
    assert reasons(report) == {"bn": "unverified"} and report.n_folded == 0
    assert_same(model, folded, seeded(2, 4, 5, 5))


class CustomConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2 + 1


def test_subclass_with_own_forward_is_not_folded_into():
    model = nn.Sequential(CustomConv(3, 4, 3), nn.BatchNorm2d(4))
    refused(model, (seeded(2, 3, 6, 6),), "1", "unsupported-module")


def test_sync_batchnorm_is_not_folded():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4))
    model = randomize(model).eval()
    folded, report = fold_module(model, method="hooks", example_inputs=(seeded(2, 3, 6, 6),))
    assert reasons(report) == {"1": "unsupported-module"}


def test_forward_hook_on_the_bn_is_respected():
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    model[1].register_forward_hook(lambda m, i, o: o * 3)
    folded, report = fold_module(model)
    assert reasons(report) == {"1": "module-has-hooks"}
    assert_same(model, folded, seeded(2, 3, 6, 6))


def test_parametrized_weight_is_not_folded_into():
    from torch.nn.utils.parametrizations import weight_norm

    model = nn.Sequential(weight_norm(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4))
    refused(model, (seeded(2, 3, 6, 6),), "1", "unsupported-module")


def test_conv2d_bn1d_on_unbatched_input_is_refused():
    """Conv2d on a (C, H, W) input gives 3-D output: BatchNorm1d then normalizes H, not channels."""
    model = nn.Sequential(nn.Conv2d(3, 5, 1), nn.BatchNorm1d(5))
    refused(model, (seeded(3, 5, 4),), "1", "not-per-channel")


def test_branch_not_taken_by_the_examples_is_covered_by_more_examples():
    """Forward hooks vouch only for the paths the examples take; a second example that takes the
    other branch (where the conv feeds no BN) makes the fold refused."""

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            if x.mean() > 0:
                return self.bn(self.conv(x))
            return self.conv(x)

    model = randomize(Branchy()).eval()
    pos, neg = seeded(2, 3, 4, 4) + 3, seeded(2, 3, 4, 4) - 3
    folded, report = fold_module(model, (pos,))
    assert report.method == "forward-hooks" and report.n_folded == 1
    assert_same(model, folded, pos)
    folded, report = fold_module(model, (pos,), more_examples=[(neg,)])
    assert reasons(report) == {"bn": "shared-module-different-bn"}
    assert_same(model, folded, pos)
    assert_same(model, folded, neg)


def test_bad_method_and_bad_inputs():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with pytest.raises(ValueError):
        fold_module(model, method="names")
    with pytest.raises(TypeError):
        fold_module("not a module")


class SharedBNTwoConvs(nn.Module):
    """One BN module after two different convs: it folds into both, then disappears."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.conv_b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv_a(x)) - self.bn(self.conv_b(x))


@pytest.mark.parametrize("method", METHODS)
def test_one_bn_shared_by_two_convs_folds_into_both(method):
    _, report = fold_and_check(randomize(SharedBNTwoConvs()), (seeded(2, 3, 5, 5),), left=0,
                               expect=METHOD_NAMES[method], method=method)
    assert sorted(f.producer for f in report.folded) == ["conv_a", "conv_b"]


class SharedBNOneInputNotAConv(SharedBNTwoConvs):
    def forward(self, x):
        return self.bn(self.conv_a(x)) - self.bn(x[:, :1].expand(-1, 4, -1, -1))


@pytest.mark.parametrize("method", METHODS)
def test_shared_bn_with_one_non_conv_input_is_not_folded(method):
    refused(SharedBNOneInputNotAConv(), (seeded(2, 3, 5, 5),), "bn", "no-linear-producer", method)

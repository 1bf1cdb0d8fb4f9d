"""BatchNorm as real model libraries spell it (issue 14), in hand-written look-alikes: a norm-act
BN subclass (timm's BatchNormAct2d style), a functional batch norm over a module's own buffers,
and a conv-norm-act block with its own fuse method (ultralytics style). Each folded result is
checked against the original on several inputs, and after torch.compile where that works."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bnfold.torch_pass import fold_module  # noqa: E402
from bnfold.torch_pass._functional import FoldedTail  # noqa: E402
from test_torch_archs import assert_same, assert_untouched, count_bn, randomize, reasons, seeded, state_copy  # noqa: E402


class NormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d, written again: batch norm by hand, then dropout and activation."""

    def __init__(self, num_features, act=nn.SiLU, drop=0.0, eps=1e-3):
        super().__init__(num_features, eps=eps)
        self.drop = nn.Dropout(drop) if drop else nn.Identity()
        self.act = act()

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, bn_training, factor, self.eps)
        x = self.drop(x)
        return self.act(x)


class NormActNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = NormAct2d(8, drop=0.2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8, bias=False)
        self.bn2 = NormAct2d(8, act=lambda: nn.PReLU(8))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.bn2(self.conv2(self.bn1(self.conv1(x)))))


def inputs(seed_shapes):
    return [(seeded(*shape, seed=seed),) for seed, shape in seed_shapes]


EXAMPLES = [(1, (2, 3, 12, 12)), (2, (1, 3, 9, 7)), (3, (3, 3, 16, 16))]


def check_everywhere(model, folded, examples=EXAMPLES, compiled=True):
    for args in inputs(examples):
        assert_same(model, folded, *args)
    if compiled:
        try:
            fast = torch.compile(folded)
            args = inputs(examples[:1])[0]
            assert_same(model, fast, *args)
        except Exception as exc:  # no C++ compiler, or an unsupported platform
            if "compile" in type(exc).__module__ or "inductor" in str(exc).lower() or "backend" in str(exc).lower():
                pytest.skip(f"torch.compile does not run here: {type(exc).__name__}")
            raise


@pytest.mark.parametrize("method", ["fx", "export", "hooks"])
def test_norm_act_subclass_folds_at_module_level(method):
    model = randomize(NormActNet()).eval()
    before, n = state_copy(model), count_bn(model)
    x = seeded(2, 3, 12, 12)
    folded, report = fold_module(model, (x,), method=method)
    assert_untouched(model, before, n)
    assert count_bn(folded) == 0, report.summary(verbose=True)
    assert type(folded) is NormActNet  # the module keeps its class
    assert isinstance(folded.bn1, FoldedTail) and isinstance(folded.bn2.act, nn.PReLU)
    assert report.extra["fold_methods"] == {"bn1": "module (norm-act)", "bn2": "module (norm-act)"}
    # the state dict loses the BNs' statistics and keeps the activation's parameter in place
    assert "bn2.act.weight" in folded.state_dict() and "bn1.running_mean" not in folded.state_dict()
    check_everywhere(model, folded, compiled=(method == "fx"))


def test_norm_act_without_examples_uses_its_asserted_rank():
    model = randomize(NormActNet()).eval()
    folded, report = fold_module(model)
    assert count_bn(folded) == 0, report.summary(verbose=True)
    check_everywhere(model, folded, compiled=False)


class ResidualNorm(nn.BatchNorm2d):
    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps) + x


class AlwaysBatchStats(nn.BatchNorm2d):
    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, 0.0, self.eps)


class ReadsStatsAfter(nn.BatchNorm2d):
    def forward(self, x):
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)
        return y * self.running_var.mean()


class TwoInputs(nn.BatchNorm2d):
    def forward(self, x, scale=None):
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)
        return y if scale is None else y * scale


@pytest.mark.parametrize("cls", [ResidualNorm, AlwaysBatchStats, ReadsStatsAfter, TwoInputs])
@pytest.mark.parametrize("method", ["fx", "hooks"])
def test_bn_subclass_not_proven_is_left(cls, method):
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), cls(4))).eval()
    x = seeded(2, 3, 8, 8)
    folded, report = fold_module(model, (x,), method=method)
    assert reasons(report) == {"1": "unsupported-module"}, report.summary(verbose=True)
    assert_same(model, folded, x)


class FunctionalBN(nn.Module):
    """A library's own BN: buffers and parameters, and F.batch_norm in forward."""

    def __init__(self, c, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.rand(c) + 0.5)
        self.bias = nn.Parameter(torch.rand(c) - 0.5)
        self.register_buffer("running_mean", torch.rand(c) * 2 - 1)
        self.register_buffer("running_var", torch.rand(c) + 0.25)

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, self.eps)


class FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.norm = FunctionalBN(6)
        self.fc = nn.Linear(6, 5)
        self.norm_fc = FunctionalBN(5)
        self.conv2 = nn.Conv2d(3, 6, 1, bias=False)

    def forward(self, x):
        y = F.relu(self.norm(self.conv(x)))
        z = torch.batch_norm(self.conv2(x), self.norm.weight, None, self.norm.running_mean, self.norm.running_var,
                             False, 0.0, 1e-3, False)  # torch.batch_norm; shares the first norm's buffers
        pooled = (y + z).mean((2, 3))
        return self.norm_fc(self.fc(pooled)), z

    def extra_method(self):
        return "still here"


def test_functional_batch_norm_folds_into_a_graph_module():
    torch.manual_seed(0)
    model = FunctionalNet().eval()
    before = state_copy(model)
    x = seeded(2, 3, 10, 10)
    folded, report = fold_module(model, (x,), more_examples=[(seeded(1, 3, 5, 7, seed=4),)])
    assert isinstance(folded, torch.fx.GraphModule), report.summary(verbose=True)
    assert report.n_folded == 3 and report.n_skipped == 0, report.summary(verbose=True)
    assert set(report.extra["fold_methods"].values()) == {"fx-graph"}
    assert not any(n.target in (F.batch_norm, torch.batch_norm) for n in folded.graph.nodes)
    assert {k for k, v in before.items()} == set(model.state_dict())  # the original is untouched
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)
    assert model.extra_method() == "still here"
    check_everywhere(model, folded, [(1, (2, 3, 10, 10)), (5, (4, 3, 6, 6))])


def test_functional_batch_norm_kept_when_rewrite_is_off():
    torch.manual_seed(0)
    model = FunctionalNet().eval()
    x = seeded(2, 3, 10, 10)
    folded, report = fold_module(model, (x,), rewrite_graph=False)
    assert type(folded) is FunctionalNet
    assert set(reasons(report).values()) == {"functional-bn"}, report.summary(verbose=True)
    assert_same(model, folded, x)


def test_functional_batch_norm_on_a_reused_conv_output_is_left():
    class Reused(FunctionalNet):
        def forward(self, x):
            y = self.conv(x)
            return self.norm(y) + y

    torch.manual_seed(0)
    model = Reused().eval()
    x = seeded(2, 3, 10, 10)
    folded, report = fold_module(model, (x,))
    assert reasons(report) == {"norm": "producer-has-other-consumers"}, report.summary(verbose=True)
    assert_same(model, folded, x)


def test_functional_batch_norm_in_training_mode_is_left():
    torch.manual_seed(0)
    model = FunctionalNet().eval()
    model.norm.train()  # its forward passes self.training: batch statistics
    x = seeded(2, 3, 10, 10)
    folded, report = fold_module(model, (x,))
    # two calls read norm's buffers (labelled norm@<node>): the one in training mode updates
    # them in place, so the other cannot fold with their values either
    assert reasons(report) == {"norm@batch_norm": "training-mode", "norm@batch_norm_1": "parameter-used-elsewhere"}, \
        report.summary(verbose=True)
    assert report.n_folded == 1
    assert_same(model, folded, x)


class ConvNormAct(nn.Module):
    """ultralytics' Conv style: conv, BN, activation, and a fuse method of its own."""

    def __init__(self, cin, cout, k=3, s=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x):
        return self.act(self.conv(x))


class Detectish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = ConvNormAct(3, 8, 3, 2)
        self.b1 = ConvNormAct(8, 8)
        self.b2 = ConvNormAct(8, 8, 1)

    def forward(self, x):
        y = self.stem(x)
        out = torch.cat([self.b1(y), self.b2(y)], 1)
        if out.shape[-1] > 4:  # data-dependent Python: torch.fx cannot trace this
            out = out * 2
        return out


def test_conv_norm_act_block_with_its_own_fuse_method():
    model = randomize(Detectish()).eval()
    x = seeded(1, 3, 16, 16)
    folded, report = fold_module(model, (x,), more_examples=[(seeded(2, 3, 8, 8, seed=5),)])
    assert report.method == "torch.export", report.summary(verbose=True)
    assert count_bn(folded) == 0 and type(folded) is Detectish
    assert set(report.extra["fold_methods"].values()) == {"module"}
    assert folded.b1.forward_fuse(y := seeded(1, 8, 8, 8)).shape == folded.b1(y).shape
    check_everywhere(model, folded, [(1, (1, 3, 16, 16)), (2, (2, 3, 8, 8))], compiled=False)


class UntraceableFunctional(FunctionalNet):
    """Functional batch norm in a forward torch.fx cannot trace (data-dependent Python)."""

    def forward(self, x):
        y = F.relu(self.norm(self.conv(x)))
        if y.shape[-1] > 3:
            y = y * 2
        return self.norm_fc(self.fc(y.mean((2, 3))))


def test_functional_batch_norm_in_an_untraceable_model_folds_in_the_exported_program():
    torch.manual_seed(0)
    model = UntraceableFunctional().eval()
    x = seeded(2, 3, 10, 10)
    folded, report = fold_module(model, (x,), more_examples=[(seeded(2, 3, 10, 10, seed=9),)])
    assert report.method == "torch.export", report.summary(verbose=True)
    assert report.n_folded == 2 and report.n_skipped == 0, report.summary(verbose=True)
    assert set(report.extra["fold_methods"].values()) == {"exported-program"}
    assert_same(model, folded, x)
    assert_same(model, folded, seeded(2, 3, 10, 10, seed=11))
    with pytest.raises(Exception):
        folded(seeded(1, 3, 7, 7))  # the program takes the example's shapes only: no silent result


@pytest.mark.parametrize("method", ["export", "hooks"])
def test_functional_batch_norm_with_examples_of_two_shapes_is_left_and_reported(method):
    torch.manual_seed(0)
    model = UntraceableFunctional().eval()
    x = seeded(2, 3, 10, 10)
    folded, report = fold_module(model, (x,), method=method, more_examples=[(seeded(1, 3, 6, 6, seed=9),)])
    assert type(folded) is UntraceableFunctional
    assert set(reasons(report).values()) == {"functional-bn"} and report.n_skipped == 2, report.summary(verbose=True)
    assert_same(model, folded, x)

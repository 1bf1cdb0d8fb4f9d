"""PyTorch front end on realistic architectures, written here (no downloads).

Each test folds a seeded model and checks: the folded module's outputs match the original's on
seeded inputs (bnfold's tolerance rule, per dtype), the number of BatchNorms left is what a
correct folder leaves, the original is untouched, and the report says which method found the
pairs. Other test_torch_* files import the builders and helpers from here.
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bnfold  # noqa: E402
from bnfold.torch_pass import fold_module  # noqa: E402
from bnfold.torch_pass._math import to_numpy  # noqa: E402
from bnfold.verify import compare_outputs  # noqa: E402

# --------------------------------------------------------------------------------------------
# helpers


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial statistics and affine parameters, so a wrong fold shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
                    m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.25)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                    m.bias.copy_(torch.rand(n, generator=gen) * 2 - 1)
    return model


def count_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def seeded(*shape, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def outputs(model: nn.Module, *args) -> dict:
    with torch.no_grad():
        out = model(*args)
    leaves = out if isinstance(out, (tuple, list)) else [out]
    return {f"out{i}": to_numpy(t) for i, t in enumerate(leaves)}


def assert_same(original: nn.Module, folded: nn.Module, *args) -> None:
    """Outputs match under bnfold's rule (tolerance scaled to the output, set by dtype)."""
    result = compare_outputs(outputs(original, *args), outputs(folded, *args))
    assert result, result.summary()


def state_copy(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model: nn.Module, before: dict, bn_count: int, training: bool = False) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert count_bn(model) == bn_count
    assert model.training == training


def fold_and_check(model: nn.Module, args: tuple, left: int, expect: str = "torch.fx", **kw):
    """Fold a copy; check equivalence on ``args`` and on a second seeded batch, BNs left,
    original untouched, method; return (folded, report)."""
    model = model.eval()
    before, n = state_copy(model), count_bn(model)
    folded, report = fold_module(model, args, **kw)
    assert_untouched(model, before, n)
    assert report.method == expect, report.summary(verbose=True)
    assert count_bn(folded) == left, report.summary(verbose=True)
    assert report.n_folded + report.n_skipped >= n - left
    assert not folded.training
    assert_same(model, folded, *args)
    other = tuple(seeded(*a.shape, seed=7, dtype=a.dtype) for a in args)
    assert_same(model, folded, *other)
    return folded, report


def reasons(report) -> dict:
    return {s.bn: s.reason for s in report.skipped}


# --------------------------------------------------------------------------------------------
# architectures


def conv_bn(cin, cout, k=3, stride=1, groups=1, act=True, dims=2):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    layers = [conv(cin, cout, k, stride, k // 2, groups=groups, bias=False), bn(cout)]
    return nn.Sequential(*layers, nn.ReLU6() if act else nn.Identity())


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride=1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class InvertedResidual(nn.Module):
    """MobileNetV2: expand 1x1, depthwise 3x3 (groups = channels), linear project 1x1."""

    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            conv_bn(cin, hidden, 1),
            conv_bn(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class DenseLayer(nn.Module):
    """DenseNet: BN -> ReLU -> Conv (pre-activation), outputs concatenated. Without the 1x1
    bottleneck no BN follows a conv; with it (DenseNet-B), norm2 follows conv1."""

    def __init__(self, cin, growth, bottleneck=False):
        super().__init__()
        mid = 4 * growth if bottleneck else cin
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False) if bottleneck else nn.Identity()
        self.norm2 = nn.BatchNorm2d(mid) if bottleneck else nn.Identity()
        self.conv2 = nn.Conv2d(mid, growth, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        return torch.cat([x, out], 1)


class DenseBlock(nn.Module):
    def __init__(self, cin=8, growth=4, layers=3, bottleneck=False):
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(cin + i * growth, growth, bottleneck) for i in range(layers))
        self.norm = nn.BatchNorm2d(cin + layers * growth)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return F.relu(self.norm(x))


class UpBlock(nn.Module):
    """U-Net decoder step: ConvTranspose + BN upsampling, concat the skip, conv + BN."""

    def __init__(self, cin, cout, groups):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, 2, stride=2, groups=groups, bias=groups != 1)
        self.up_bn = nn.BatchNorm2d(cout)
        self.conv = nn.Conv2d(2 * cout, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x, skip):
        x = F.relu(self.up_bn(self.up(x)))
        return F.relu(self.bn(self.conv(torch.cat([x, skip], 1))))


class UNetDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.up1 = UpBlock(16, 8, groups=1)
        self.up2 = UpBlock(8, 8, groups=2)
        self.up3 = UpBlock(8, 8, groups=8)  # depthwise transposed conv
        self.head = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=1)
        self.head_bn = nn.BatchNorm2d(6)

    def forward(self, x, s1, s2, s3):
        x = self.up3(self.up2(self.up1(x, s1), s2), s3)
        return self.head_bn(self.head(x))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(12, 32), nn.BatchNorm1d(32)
        self.fc2, self.bn2 = nn.Linear(32, 16, bias=False), nn.BatchNorm1d(16, affine=False)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.fc1(x)))
        x = F.relu(self.bn2(self.fc2(x)))
        return self.out(x)


class Conv3dBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = conv_bn(2, 6, 3, dims=3)
        self.b = conv_bn(6, 6, 3, stride=2, groups=3, dims=3)
        self.c = nn.Sequential(nn.ConvTranspose3d(6, 4, 2, stride=2), nn.BatchNorm3d(4))

    def forward(self, x):
        return self.c(self.b(self.a(x)))


class SmallResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, stride=2))
        self.layer2 = nn.Sequential(Bottleneck(16, 4), Bottleneck(16, 8, stride=2))
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# --------------------------------------------------------------------------------------------
# tests


def test_resnet_basic_and_bottleneck_blocks_fold_completely():
    model = randomize(SmallResNet())
    _, report = fold_and_check(model, (seeded(2, 3, 32, 32),), left=0)
    assert report.n_folded == 1 + 2 * 2 + 1 + 3 * 2 + 1  # stem, 2 basic (+downsample), 2 bottleneck (+downsample)
    assert {f.rule for f in report.folded} == {"conv-bn"}


def test_resnet_folds_without_example_inputs():
    model = randomize(SmallResNet()).eval()
    folded, report = fold_module(model)
    assert report.method == "torch.fx" and count_bn(folded) == 0
    assert_same(model, folded, seeded(1, 3, 32, 32))


def test_mobilenet_v2_inverted_residuals_with_depthwise_convs():
    model = randomize(nn.Sequential(InvertedResidual(8, 8, 1, 6), InvertedResidual(8, 12, 2, 6), InvertedResidual(12, 12, 1, 4)))
    fold_and_check(model, (seeded(2, 8, 16, 16),), left=0)


def test_densenet_pre_activation_block_has_nothing_to_fold():
    model = randomize(DenseBlock())
    folded, report = fold_and_check(model, (seeded(2, 8, 8, 8),), left=4)
    assert report.n_folded == 0 and report.n_skipped == 4
    assert set(reasons(report).values()) == {"no-linear-producer"}


def test_densenet_b_bottleneck_folds_only_the_bn_after_the_1x1_conv():
    model = randomize(DenseBlock(bottleneck=True))
    folded, report = fold_and_check(model, (seeded(2, 8, 8, 8),), left=4)
    assert sorted(f.bn for f in report.folded) == [f"layers.{i}.norm2" for i in range(3)]


def test_unet_decoder_conv_transpose_groups_1_2_and_depthwise():
    model = randomize(UNetDecoder())
    args = (seeded(2, 16, 4, 4), seeded(2, 8, 8, 8, seed=2), seeded(2, 8, 16, 16, seed=3), seeded(2, 8, 32, 32, seed=4))
    folded, report = fold_and_check(model, args, left=0)
    rules = {f.bn: f.rule for f in report.folded}
    assert rules["up3.up_bn"] == rules["head_bn"] == "convtranspose-bn"
    assert folded.up2.up.bias is not None and folded.up1.up.bias is not None  # a bias was created


def test_mlp_linear_bn1d_folds_with_example_inputs_affine_false_included():
    model = randomize(MLP())
    folded, report = fold_and_check(model, (seeded(8, 12),), left=0)
    assert {f.rule for f in report.folded} == {"linear-bn"}


def test_mlp_without_inputs_leaves_linear_bn1d_shape_unknown():
    model = randomize(MLP()).eval()
    folded, report = fold_module(model)
    assert set(reasons(report).values()) == {"shape-unknown"} and count_bn(folded) == 2
    assert_same(model, folded, seeded(4, 12))


def test_conv3d_block_with_grouped_and_transposed_3d_convs():
    fold_and_check(randomize(Conv3dBlock()), (seeded(2, 2, 6, 6, 6),), left=0)


def test_conv1d_bn1d_folds_only_with_a_traced_shape():
    model = randomize(nn.Sequential(nn.Conv1d(4, 6, 3), nn.BatchNorm1d(6), nn.ReLU())).eval()
    _, report = fold_module(model)
    assert reasons(report) == {"1": "shape-unknown"}
    fold_and_check(model, (seeded(2, 4, 10),), left=0)


class TwoBranches(nn.Module):
    """Data-dependent control flow: torch.fx and torch.export cannot trace it."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.stem(x)
        if y.mean() > 0:  # decided by the data
            return F.relu(self.bn(self.conv(y)))
        return -self.bn(self.conv(y))


def test_data_dependent_control_flow_falls_back_to_forward_hooks():
    model = randomize(TwoBranches())
    folded, report = fold_and_check(model, (seeded(2, 3, 8, 8),), left=0, expect="forward-hooks")
    assert any("fell back" in n for n in report.notes) and any("not covered" in n for n in report.notes)
    # both branches use the same pairs, so the fold holds on either
    for bias in (-5.0, 5.0):
        assert_same(model, folded, seeded(2, 3, 8, 8) + bias)


def test_data_dependent_model_without_inputs_is_a_clear_error():
    with pytest.raises(bnfold.torch_pass.ModelTraceError, match="example_inputs"):
        fold_module(TwoBranches().eval())


class ShapeBranch(nn.Module):
    """Python control flow on a shape: torch.fx fails, torch.export specializes."""

    def __init__(self):
        super().__init__()
        self.a = conv_bn(3, 6)

    def forward(self, x):
        y = self.a(x)
        if y.shape[-1] > 4:
            y = F.max_pool2d(y, 2)
        return y


def test_shape_dependent_control_flow_uses_torch_export():
    fold_and_check(randomize(ShapeBranch()), (seeded(2, 3, 8, 8),), left=0, expect="torch.export")


@pytest.mark.parametrize("method", ["fx", "export", "hooks"])
def test_every_method_folds_the_same_resnet(method):
    model = randomize(SmallResNet())
    name = {"fx": "torch.fx", "export": "torch.export", "hooks": "forward-hooks"}[method]
    _, report = fold_and_check(model, (seeded(1, 3, 32, 32),), left=0, expect=name, method=method)
    assert report.n_folded == 13


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_models_fold_in_float64_and_cast_once(dtype):
    dt = getattr(torch, dtype)
    model = randomize(nn.Sequential(BasicBlock(4, 8, stride=2), InvertedResidual(8, 8, 1, 2))).eval()
    half = copy.deepcopy(model).to(dt)
    folded, report = fold_and_check(half, (seeded(2, 4, 8, 8, dtype=dt),), left=0)
    assert all(p.dtype == dt for p in folded.parameters())
    # the folded weight is the float64 fold rounded once: compare with the float64 math
    bn = half[0].bn1
    a = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    expected = (half[0].conv1.weight.double() * a.view(-1, 1, 1, 1)).to(dt)
    assert torch.equal(folded[0].conv1.weight, expected)


def test_inplace_folds_the_module_itself():
    model = randomize(SmallResNet()).eval()
    reference = copy.deepcopy(model)
    folded, report = fold_module(model, inplace=True)
    assert folded is model and count_bn(model) == 0
    assert_same(reference, model, seeded(1, 3, 32, 32))


def test_bnfold_fold_dispatches_modules():
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    folded, report = bnfold.fold(model)
    assert count_bn(folded) == 0 and report.method == "torch.fx"
    folded2, _ = bnfold.fold_module(model)
    assert count_bn(folded2) == 0

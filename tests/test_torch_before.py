"""BatchNorm1d before a Linear (timm's NormLinear head: BN, Dropout, Linear) folds into the
Linear on the torch.fx path; every case where that is not exact is left."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402

from bnfold.torch_pass import fold_module  # noqa: E402
from test_torch_archs import assert_same, count_bn, randomize, reasons, seeded  # noqa: E402


class NormLinearHead(nn.Module):
    def __init__(self, c=8, classes=5, drop=0.2):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten(1)
        self.bn = nn.BatchNorm1d(c)
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(self.drop(self.bn(self.flat(self.pool(x)))))


def test_norm_linear_head_folds_into_the_linear():
    model = randomize(NormLinearHead()).eval()
    x = seeded(3, 8, 4, 4)
    folded, report = fold_module(model, (x,), more_examples=[(seeded(1, 8, 2, 2, seed=3),)])
    assert count_bn(folded) == 0, report.summary(verbose=True)
    assert report.extra["fold_methods"] == {"bn": "module (bn-before)"}
    assert [(f.bn, f.producer, f.rule) for f in report.folded] == [("bn", "fc", "bn-linear")]
    assert_same(model, folded, x)
    assert_same(model, folded, seeded(5, 8, 3, 3, seed=8))


class LinearThenBNThenLinear(nn.Module):
    """fc1 -> bn1 folds after fc1; bn2 on a pooled value folds before fc2."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(6, 8), nn.BatchNorm1d(8)
        self.bn2, self.fc2 = nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.bn2(torch.relu(self.bn1(self.fc1(x)))))


def test_after_and_before_rules_compose():
    model = randomize(LinearThenBNThenLinear()).eval()
    x = seeded(4, 6)
    folded, report = fold_module(model, (x,))
    assert count_bn(folded) == 0, report.summary(verbose=True)
    assert_same(model, folded, x)


class BNOutputAlsoRead(NormLinearHead):
    def forward(self, x):
        y = self.bn(self.flat(self.pool(x)))
        return self.fc(y), y


class LinearCalledTwice(NormLinearHead):
    def forward(self, x):
        v = self.flat(self.pool(x))
        return self.fc(self.bn(v)) + self.fc(v)


class OnThreeD(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.fc = nn.BatchNorm1d(4), nn.Linear(6, 3)

    def forward(self, x):  # (N, 4, 6): the BN normalizes dim 1, the Linear reads dim 2
        return self.fc(self.bn(x))


@pytest.mark.parametrize("model_cls,shape", [
    (BNOutputAlsoRead, (3, 8, 4, 4)),
    (LinearCalledTwice, (3, 8, 4, 4)),
    (OnThreeD, (2, 4, 6)),
])
def test_bn_before_linear_left_where_not_exact(model_cls, shape):
    model = randomize(model_cls()).eval()
    x = seeded(*shape)
    folded, report = fold_module(model, (x,))
    assert count_bn(folded) == 1 and "bn" in reasons(report), report.summary(verbose=True)
    assert_same(model, folded, x)


def test_bn_before_linear_with_a_hook_or_a_3d_example_is_left():
    model = randomize(NormLinearHead()).eval()
    x = seeded(3, 8, 4, 4)
    model.bn.register_forward_hook(lambda m, a, out: out * 2)
    folded, report = fold_module(model, (x,))
    assert count_bn(folded) == 1, report.summary(verbose=True)
    assert_same(model, folded, x)

"""Convs whose folded shift is added after the convolution, not given to it as a bias.

Folding gives a bias to a conv that had none. On PyTorch's CPU path for 1x1 depthwise convs a
bias costs more than the BatchNorm it replaces: in ``benchmarks/bench_torch_shift.py`` (CPU time,
one thread, torch 2.13 and 2.14) a folded 256-channel 1x1 depthwise conv with its bias ran 1.02-
1.05x the original conv+BN, and 0.89-0.93x as conv-then-add. So for those convs only, and only
when the conv had no bias before the fold, the folded conv becomes a
:class:`ShiftAfterConv1d/2d/3d`: the same class underneath (``isinstance`` holds, ``weight``/
``bias`` and their ``state_dict`` keys are the same), whose ``forward`` runs the convolution
without the bias and then adds it, channel by channel: the same function (bias added once per
output element), only the rounding order of one addition differs. Dilated convs keep the bias
in the conv: there conv-then-add measured 1-3 % slower than the bias, and both faster than the
original conv+BN.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class _ShiftAfter:
    """Marks bnfold's shift-after convs (each spells out its forward, so TorchScript can compile it)."""


class ShiftAfterConv1d(_ShiftAfter, nn.Conv1d):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = self._conv_forward(input, self.weight, None)
        bias = self.bias
        return out if bias is None else out.add_(bias.view(-1, 1))


class ShiftAfterConv2d(_ShiftAfter, nn.Conv2d):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = self._conv_forward(input, self.weight, None)
        bias = self.bias
        return out if bias is None else out.add_(bias.view(-1, 1, 1))


class ShiftAfterConv3d(_ShiftAfter, nn.Conv3d):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = self._conv_forward(input, self.weight, None)
        bias = self.bias
        return out if bias is None else out.add_(bias.view(-1, 1, 1, 1))


_BY_BASE = {nn.Conv1d: ShiftAfterConv1d, nn.Conv2d: ShiftAfterConv2d, nn.Conv3d: ShiftAfterConv3d}


def shift_after_class(module: nn.Module, base: type):
    """The ShiftAfter class for a stock conv (``type(module) is base``) on the CPU that had no
    bias and takes the slow bias path: 1x1 depthwise; else None."""
    if type(module) is not base or base not in _BY_BASE or module.bias is not None:
        return None
    if module.weight.device.type != "cpu":
        return None
    depthwise_1x1 = (
        module.groups == module.in_channels == module.out_channels and all(k == 1 for k in module.kernel_size)
    )
    return _BY_BASE[base] if depthwise_1x1 else None

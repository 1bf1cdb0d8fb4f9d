"""Conv and ConvTranspose: absorb a per-channel affine map after them, or before them (a scale
always; a shift only into a Conv that reads no padding).

Conv weights are ``[C_out, C_in/g, k..]``: output channels on axis 0, input channels on axis 1.
ConvTranspose weights are ``[C_in, C_out/g, k..]``: output channel ``g * C_out/g + j`` sits at
position ``j`` of axis 1 within group ``g``'s rows, which :func:`bnfold.affine.channel_broadcast`
handles.

After: ``a * conv(x) + b`` scales the weight per output channel and the bias becomes ``c * a + b``.
Before: ``conv(a * x + b)`` scales the weight per input channel and adds ``W b`` to the bias.
A shift ``b`` is exact only when the conv reads no padding: it pads the map's *input* with
zeros, where the original read ``b`` (a BN of a zero is ``b``); a scale alone is always exact
(``a * 0 = 0``). A ConvTranspose takes a scale only: its border outputs sum fewer input
positions, so ``W b`` is no per-channel bias there.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from ...affine import Refusal, cast_back, fold_after, fold_before, output_channels
from ..graph import attr, node_label
from ..layout import Axis
from .base import Edit, LinearOp, float_constant, optional_input


class Conv(LinearOp):
    @property
    def transpose(self) -> bool:
        return self.node.op_type == "ConvTranspose"

    def read_weight(self) -> np.ndarray:
        if not optional_input(self.node, 1):
            raise Refusal("not-constant", "the conv has no weight input")
        weight = float_constant(self.rw, self.node.input[1], "conv weight")
        if weight.ndim < 3:
            raise Refusal("not-per-channel", f"conv weight has rank {weight.ndim}, expected 3 or more")
        return weight

    def _bias(self) -> Optional[np.ndarray]:
        name = optional_input(self.node, 2)
        return self.rw.constant(name, "conv bias") if name else None

    def output_axis(self) -> Tuple[Axis, int]:
        """Axis 1 of a value as deep as the weight."""
        groups = int(attr(self.node, "group", 1)) if self.transpose else 1
        channels = output_channels(self.weight.shape, 1 if self.transpose else 0, groups)
        return Axis.known(self.weight.ndim, 1), channels

    def input_axis(self) -> Tuple[Axis, int]:
        """Axis 1 of a value as deep as the weight."""
        per_group = self.weight.shape[0] if self.transpose else self.weight.shape[1]
        groups = 1 if self.transpose else int(attr(self.node, "group", 1))
        return Axis.known(self.weight.ndim, 1), int(per_group) * groups

    def after(self, a: np.ndarray, b: np.ndarray) -> Edit:
        groups = int(attr(self.node, "group", 1)) if self.transpose else 1
        w64, c64 = fold_after(self.weight, self._bias(), a, b, axis=1 if self.transpose else 0, groups=groups)
        return self._write(cast_back(w64, self.dtype, "weight"), cast_back(c64, self.dtype, "bias"))

    def before(self, a: np.ndarray, b: np.ndarray) -> Edit:
        if self.transpose:
            return self._scale_input_rows(a, b)
        if np.any(b != 0):
            self._check_no_padding()
        w64, c64 = fold_before(self.weight, self._bias(), a, b, in_axis=1, groups=int(attr(self.node, "group", 1)))
        return self._write(cast_back(w64, self.dtype, "weight"), cast_back(c64, self.dtype, "bias"))

    def _scale_input_rows(self, a: np.ndarray, b: np.ndarray) -> Edit:
        """ConvTranspose: input channel ``c`` is row ``c`` of the weight ``[C_in, C_out/g, k..]``."""
        if np.any(b != 0):
            raise Refusal(
                "consumer-cannot-absorb",
                f"ConvTranspose '{node_label(self.node)}' cannot take a shift before it (its border outputs sum "
                "fewer inputs)",
            )
        if a.shape[0] != self.weight.shape[0]:
            raise Refusal("channel-mismatch", f"the linear op reads {self.weight.shape[0]} channels, the map has {a.shape[0]}")
        w64 = np.multiply(self.weight, a.reshape((-1,) + (1,) * (self.weight.ndim - 1)), dtype=np.float64)
        new_w = cast_back(w64, self.dtype, "weight")
        rw, conv, base = self.rw, self.node, self.base

        def edit():
            rw.set_input(conv, 1, rw.add_initializer(f"{base}_bnfold_W", new_w))

        return edit

    def _write(self, new_w: np.ndarray, new_c: np.ndarray) -> Edit:
        rw, conv, base = self.rw, self.node, self.base

        def edit():
            rw.set_input(conv, 1, rw.add_initializer(f"{base}_bnfold_W", new_w))
            rw.set_input(conv, 2, rw.add_initializer(f"{base}_bnfold_B", new_c))
            return conv

        return edit

    def _check_no_padding(self) -> None:
        """Refuse a conv that reads padding (see the module docstring)."""
        conv = self.node
        auto_pad = attr(conv, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            if any(self._same_padding()):
                raise Refusal("padded-conv", f"auto_pad={auto_pad} pads the input of conv '{node_label(conv)}'")
            return
        if auto_pad == "VALID":
            return
        pads = attr(conv, "pads", None)
        if pads and any(int(p) for p in pads):
            raise Refusal("padded-conv", f"conv '{node_label(conv)}' pads its input ({list(pads)})")

    def _same_padding(self) -> List[Optional[int]]:
        """The total padding SAME_* adds on each spatial axis (None where the input size is
        unknown and the kernel is wider than one): ``(ceil(n / s) - 1) * s + (k - 1) * d + 1 - n``."""
        spatial = self.weight.ndim - 2
        dilations = attr(self.node, "dilations", None) or [1] * spatial
        strides = attr(self.node, "strides", None) or [1] * spatial
        shape = self.rw.shape(self.node.input[0])
        sizes = list(shape[2:]) if shape is not None and len(shape) == spatial + 2 else [None] * spatial
        out = []
        for k, d, s, n in zip(self.weight.shape[2:], dilations, strides, sizes):
            reach = (int(k) - 1) * int(d)
            if reach == 0:
                out.append(0)  # a 1-wide kernel never needs padding
            elif n is None or int(s) < 1:
                out.append(None)
            else:
                out.append(max(0, (-(-int(n) // int(s)) - 1) * int(s) + reach + 1 - int(n)))
        return out

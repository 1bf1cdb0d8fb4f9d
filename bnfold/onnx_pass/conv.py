"""Conv and ConvTranspose: absorb a per-output-channel affine map that follows them.

Conv weights are ``[C_out, C_in/g, k..]`` (channels on axis 0). ConvTranspose weights are
``[C_in, C_out/g, k..]``: output channel ``g * C_out/g + j`` sits at position ``j`` of axis 1
within group ``g``'s rows, which :func:`bnfold.affine.channel_broadcast` handles.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
from onnx import NodeProto

from ..affine import Refusal, cast_back, fold_after, output_channels
from .graph import attr, float_dtype
from .layout import Axis
from .rewrite import GraphRewrite


def conv_output_axis(rw: GraphRewrite, conv: NodeProto) -> Tuple[Axis, int]:
    """The channel axis of the conv's output (axis 1 of a value as deep as the weight) and the
    channel count; refuses a conv whose weight is not a usable constant."""
    weight = _weight(rw, conv)
    transpose = conv.op_type == "ConvTranspose"
    groups = int(attr(conv, "group", 1)) if transpose else 1
    return Axis.known(weight.ndim, 1), output_channels(weight.shape, 1 if transpose else 0, groups)


def _weight(rw: GraphRewrite, conv: NodeProto) -> np.ndarray:
    if len(conv.input) < 2 or not conv.input[1]:
        raise Refusal("not-constant", "the conv has no weight input")
    float_dtype(rw.scope.tensor(conv.input[1], "conv weight"), "conv weight")
    weight = rw.scope.array(conv.input[1], "conv weight")
    if weight.ndim < 3:
        raise Refusal("not-per-channel", f"conv weight has rank {weight.ndim}, expected 3 or more")
    return weight


def fold_into_conv(rw: GraphRewrite, conv: NodeProto, a: np.ndarray, b: np.ndarray) -> None:
    """Make ``conv`` compute ``a * conv(x) + b`` per output channel (new initializers; the old
    weight stays for any other user)."""
    w_t = rw.scope.tensor(conv.input[1], "conv weight")
    dtype = float_dtype(w_t, "conv weight")
    weight = _weight(rw, conv)
    has_bias = len(conv.input) > 2 and bool(conv.input[2])
    bias = rw.scope.array(conv.input[2], "conv bias") if has_bias else None
    transpose = conv.op_type == "ConvTranspose"
    groups = int(attr(conv, "group", 1)) if transpose else 1
    w64, c64 = fold_after(weight, bias, a, b, axis=1 if transpose else 0, groups=groups)
    new_w = cast_back(w64, dtype, "weight")
    new_c = cast_back(c64, dtype, "bias")

    base = conv.name or conv.input[1]
    rw.set_input(conv, 1, rw.add_initializer(f"{base}_bnfold_W", new_w))
    rw.set_input(conv, 2, rw.add_initializer(f"{base}_bnfold_B", new_c))

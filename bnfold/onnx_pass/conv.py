"""Rule: Conv or ConvTranspose followed by BN. The BN's channels are the conv's output channels.

Conv weights are ``[C_out, C_in/g, k..]`` (channels on axis 0). ConvTranspose weights are
``[C_in, C_out/g, k..]``: output channel ``g * C_out/g + j`` sits at position ``j`` of axis 1
within group ``g``'s rows, which :func:`bnfold.affine.channel_broadcast` handles.
"""

from __future__ import annotations

from onnx import NodeProto

from ..affine import Refusal, cast_back, fold_after
from .bn import BNAffine
from .graph import attr, float_dtype
from .rewrite import GraphRewrite


def fold_conv_bn(rw: GraphRewrite, bn: BNAffine, conv: NodeProto, x: str) -> str:
    if len(conv.input) < 2 or not conv.input[1]:
        raise Refusal("not-constant", "the conv has no weight input")
    w_t = rw.scope.tensor(conv.input[1], "conv weight")
    dtype = float_dtype(w_t, "conv weight")
    weight = rw.scope.array(conv.input[1], "conv weight")
    has_bias = len(conv.input) > 2 and bool(conv.input[2])
    bias = rw.scope.array(conv.input[2], "conv bias") if has_bias else None
    if weight.ndim < 3:
        raise Refusal("not-per-channel", f"conv weight has rank {weight.ndim}, expected 3 or more")
    transpose = conv.op_type == "ConvTranspose"
    groups = int(attr(conv, "group", 1)) if transpose else 1
    w64, c64 = fold_after(weight, bias, bn.a, bn.b, axis=1 if transpose else 0, groups=groups)
    new_w = cast_back(w64, dtype, "weight")
    new_c = cast_back(c64, dtype, "bias")

    base = conv.name or conv.input[1]
    rw.set_input(conv, 1, rw.add_initializer(f"{base}_bnfold_W", new_w))
    rw.set_input(conv, 2, rw.add_initializer(f"{base}_bnfold_B", new_c))
    rw.remove_bn(bn.node, conv, x)
    return "convtranspose-bn" if transpose else "conv-bn"

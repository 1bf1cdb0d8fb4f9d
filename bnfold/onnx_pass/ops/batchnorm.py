"""BatchNormalization as a per-channel affine map, in inference mode only.

A BN computes ``s * (x - m) / sqrt(v + eps) + B``, which is ``a * x + b`` per channel
(:func:`bnfold.affine.bn_coefficients`). Both directions:

- after: ``A * BN(x) + C`` is the same BN with scale ``A * s`` and shift ``A * B + C`` (mean,
  variance and epsilon stay), exact up to one rounding of the two new vectors
  (:meth:`BNAffine.after`);
- before: ``BN(A * x + C)`` cannot be written as one BN: the new variance would be ``v / A^2``
  but epsilon is not scaled with it. A BN never absorbs a map before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import NodeProto

from ...affine import Refusal, bn_coefficients, cast_back
from ..graph import attr
from ..rewrite import GraphRewrite
from ..rewrite import check_float
from .base import Edit


@dataclass
class BNAffine:
    """A BN node as ``y = a * x + b`` per channel (float64), with its scale and shift as read."""

    node: NodeProto
    a: np.ndarray
    b: np.ndarray
    scale: np.ndarray
    shift: np.ndarray

    @property
    def channels(self) -> int:
        return int(self.a.shape[0])

    def after(self, rw: GraphRewrite, a: np.ndarray, c: np.ndarray) -> Edit:
        """Plan ``a * BN(x) + c`` as this BN with a new scale and shift."""
        bn = self.node
        scale = check_float(self.scale, bn.input[1], "BN parameter")
        shift = check_float(self.shift, bn.input[2], "BN parameter")
        new_scale = cast_back(a * scale.astype(np.float64), scale.dtype, "BN scale")
        new_shift = cast_back(a * shift.astype(np.float64) + c, shift.dtype, "BN shift")
        base = bn.name or bn.output[0]

        def edit():
            rw.set_input(bn, 1, rw.add_initializer(f"{base}_bnfold_scale", new_scale))
            rw.set_input(bn, 2, rw.add_initializer(f"{base}_bnfold_B", new_shift))
            return bn

        return edit


def is_batchnorm(node: NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")


def check_inference_mode(node: NodeProto, opset: int = 0) -> None:
    """Refuse a BN that would use batch statistics, or one that is not per channel.

    ``opset`` is the model's default-domain opset (0 if unknown): before opset 7 a BN runs in
    training mode unless ``is_test=1``.
    """
    if not node.output or not node.output[0]:
        raise Refusal("malformed-node", "the BN has no output")
    if 0 < opset < 7 and not attr(node, "is_test", 0):
        raise Refusal("training-mode", "BatchNormalization-6 without is_test=1 normalizes with batch statistics")
    if attr(node, "training_mode", 0):
        raise Refusal("training-mode", "training_mode=1: the BN normalizes with batch statistics")
    if any(out for out in node.output[1:]):
        raise Refusal(
            "training-mode",
            "the BN's optional running-mean/var outputs are used, which exist only in training mode",
        )
    if attr(node, "spatial", 1) == 0:
        raise Refusal("not-per-channel", "spatial=0: the BN normalizes per activation, not per channel")
    if len(node.input) < 5 or not all(node.input[:5]):
        raise Refusal("not-constant", "the BN lacks one of its five inputs")


def read_bn(rw: GraphRewrite, node: NodeProto) -> BNAffine:
    """The affine map of an inference-mode BN whose parameters are constants."""
    check_inference_mode(node, rw.opset)
    names = ("scale", "B", "input_mean", "input_var")
    values = [rw.constant(name, f"BN {what}") for name, what in zip(node.input[1:5], names)]
    a, b = bn_coefficients(*values, eps=float(attr(node, "epsilon", 1e-5)))
    return BNAffine(node, a, b, values[0], values[1])

"""Reading a BatchNormalization node: is it in inference mode, and what affine map is it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import NodeProto

from ..affine import Refusal, bn_coefficients
from .graph import Scope, attr


@dataclass
class BNAffine:
    """A BN node as ``y = a * x + b`` per channel (float64)."""

    node: NodeProto
    a: np.ndarray
    b: np.ndarray

    @property
    def channels(self) -> int:
        return int(self.a.shape[0])


def is_batchnorm(node: NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")


def check_inference_mode(node: NodeProto, opset: int = 0) -> None:
    """Refuse a BN that would use batch statistics, or one that is not per channel.

    ``opset`` is the model's default-domain opset (0 if unknown): before opset 7 a BN runs in
    training mode unless ``is_test=1``.
    """
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


def read_bn(node: NodeProto, scope: Scope) -> BNAffine:
    """The affine map of an inference-mode BN whose parameters are constants."""
    check_inference_mode(node, scope.opset)
    names = ("scale", "B", "input_mean", "input_var")
    values = [scope.array(name, f"BN {what}") for name, what in zip(node.input[1:5], names)]
    a, b = bn_coefficients(*values, eps=float(attr(node, "epsilon", 1e-5)))
    return BNAffine(node, a, b)

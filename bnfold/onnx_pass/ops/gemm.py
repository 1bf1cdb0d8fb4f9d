"""Gemm: ``alpha * A' B' + beta * C`` (``'`` a transpose when transA/transB is set), features on
the last axis of its 2-D output. Absorbs a per-feature affine map after it, and before it
when A is not transposed (the BN's channels are then the features Gemm reads). alpha and
beta are folded in and become 1; C must broadcast per feature.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from ...affine import Refusal, cast_back, fold_after, fold_before
from ..graph import attr, node_label, set_attr
from ..layout import Axis
from .base import Edit, LinearOp, combine_bias, constant_2d, optional_input


class Gemm(LinearOp):
    def read_weight(self) -> np.ndarray:
        if self.rw.opset < 7:
            raise Refusal("unsupported-attribute", "Gemm before opset 7 has broadcast semantics bnfold does not fold")
        if len(self.node.input) < 2:
            raise Refusal("not-constant", "Gemm without a B input")
        return constant_2d(self.rw, self.node.input[1], "Gemm B")

    def output_axis(self) -> Tuple[Axis, int]:
        return Axis.known(2, 1), int(self.weight.shape[0 if attr(self.node, "transB", 0) else 1])

    def input_axis(self) -> Tuple[Axis, int]:
        return Axis.known(2, 1), int(self.weight.shape[1 if attr(self.node, "transB", 0) else 0])

    def _scaled(self) -> Tuple[np.ndarray, np.ndarray]:
        """``alpha * B`` and ``beta * C`` in float64 (C None when absent)."""
        alpha = float(attr(self.node, "alpha", 1.0))
        beta = float(attr(self.node, "beta", 1.0))
        name = optional_input(self.node, 2)
        c = self.rw.constant(name, "Gemm C").astype(np.float64) * beta if name else None
        return self.weight.astype(np.float64) * alpha, c

    def after(self, a: np.ndarray, b: np.ndarray) -> Edit:
        w, c = self._scaled()
        w64, _ = fold_after(w, None, a, b, axis=0 if attr(self.node, "transB", 0) else 1)
        c64 = combine_bias(c, a, b)
        return self._write(cast_back(w64, self.dtype, "weight"), cast_back(c64, self.dtype, "bias"))

    def before(self, a: np.ndarray, b: np.ndarray) -> Edit:
        if attr(self.node, "transA", 0):
            raise Refusal("unsupported-attribute", f"Gemm '{node_label(self.node)}' reads the BN's output transposed")
        w, c = self._scaled()
        w64, shift = fold_before(w, None, a, b, in_axis=1 if attr(self.node, "transB", 0) else 0)
        c64 = combine_bias(c, np.ones_like(shift), shift)
        return self._write(cast_back(w64, self.dtype, "weight"), cast_back(c64, self.dtype, "bias"))

    def _write(self, new_w: np.ndarray, new_c: np.ndarray) -> Edit:
        rw, gemm, base = self.rw, self.node, self.base

        def edit():
            rw.set_input(gemm, 1, rw.add_initializer(f"{base}_bnfold_B", new_w))
            rw.set_input(gemm, 2, rw.add_initializer(f"{base}_bnfold_C", new_c))
            set_attr(gemm, "alpha", 1.0)
            set_attr(gemm, "beta", 1.0)
            return gemm

        return edit


"""Gemm and MatMul: absorb a per-output-feature affine map that follows them.

Both put their output features on the last axis. Gemm's output is always 2-D; a MatMul with a
2-D constant weight keeps its input's rank, which may be unknown (the features are then still
the last axis, which is all a right-aligned constant needs).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from onnx import NodeProto

from ..affine import Refusal, cast_back, fold_after
from .graph import attr, float_dtype, set_attr
from .layout import Axis
from .rewrite import GraphRewrite


def gemm_output_axis(rw: GraphRewrite, gemm: NodeProto) -> Tuple[Axis, int]:
    weight = gemm_weight(rw, gemm)
    return Axis.known(2, 1), int(weight.shape[0 if attr(gemm, "transB", 0) else 1])


def gemm_weight(rw: GraphRewrite, gemm: NodeProto) -> np.ndarray:
    if rw.opset < 7:
        raise Refusal("unsupported-attribute", "Gemm before opset 7 has broadcast semantics bnfold does not fold")
    if len(gemm.input) < 2:
        raise Refusal("not-constant", "Gemm without a B input")
    return _constant_2d(rw, gemm.input[1], "Gemm B")


def _constant_2d(rw: GraphRewrite, name: str, what: str) -> np.ndarray:
    """The 2-D float constant behind ``name``; refuse anything else."""
    float_dtype(rw.scope.tensor(name, what), what)
    weight = rw.scope.array(name, what)
    if weight.ndim != 2:
        raise Refusal("not-per-channel", f"{what} has rank {weight.ndim}, expected 2")
    return weight


def fold_into_gemm(rw: GraphRewrite, gemm: NodeProto, a: np.ndarray, b: np.ndarray) -> None:
    """Make ``gemm`` compute ``a * gemm(x) + b`` per output feature; alpha and beta become 1."""
    dtype = float_dtype(rw.scope.tensor(gemm.input[1], "Gemm B"), "Gemm B")
    weight = gemm_weight(rw, gemm)
    alpha = float(attr(gemm, "alpha", 1.0))
    beta = float(attr(gemm, "beta", 1.0))
    axis = 0 if attr(gemm, "transB", 0) else 1
    w64, _ = fold_after(weight.astype(np.float64) * alpha, None, a, b, axis=axis)
    has_c = len(gemm.input) > 2 and bool(gemm.input[2])
    c = rw.scope.array(gemm.input[2], "Gemm C") if has_c else None
    c64 = fold_bias(None if c is None else c.astype(np.float64) * beta, a, b)
    new_w = cast_back(w64, dtype, "weight")
    new_c = cast_back(c64, dtype, "bias")

    base = gemm.name or gemm.input[1]
    rw.set_input(gemm, 1, rw.add_initializer(f"{base}_bnfold_B", new_w))
    rw.set_input(gemm, 2, rw.add_initializer(f"{base}_bnfold_C", new_c))
    set_attr(gemm, "alpha", 1.0)
    set_attr(gemm, "beta", 1.0)


def fold_bias(c64: Optional[np.ndarray], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``c * a + b`` for a bias that broadcasts against ``[M, N]`` (features on the last axis)."""
    if c64 is None:
        return b.copy()
    if c64.ndim > 2 or (c64.ndim >= 1 and c64.shape[-1] not in (1, a.shape[0])):
        raise Refusal("not-per-channel", f"bias of shape {list(c64.shape)} does not broadcast per feature")
    if c64.ndim == 2:
        return c64 * a[None, :] + b[None, :]
    return c64 * a + b


def matmul_output_axis(rw: GraphRewrite, matmul: NodeProto) -> Tuple[Axis, int]:
    """Features on the last axis; the rank is the input's (a 2-D weight keeps it)."""
    weight = matmul_weight(rw, matmul)
    rank = rw.rank(matmul.input[0])
    axis = Axis.known(rank, rank - 1) if rank else Axis(None, None, -1, 1)
    return axis, int(weight.shape[1])


def matmul_weight(rw: GraphRewrite, matmul: NodeProto) -> np.ndarray:
    if len(matmul.input) != 2:
        raise Refusal("not-constant", "MatMul without two inputs")
    return _constant_2d(rw, matmul.input[1], "MatMul weight")


def fold_into_matmul(rw: GraphRewrite, matmul: NodeProto, a: np.ndarray, b: np.ndarray) -> Optional[np.ndarray]:
    """Scale the MatMul's weight by ``a`` per output feature; return ``b`` in the weight's dtype
    for an Add after it, or None when ``b`` is zero (a MatMul has no bias of its own)."""
    dtype = float_dtype(rw.scope.tensor(matmul.input[1], "MatMul weight"), "MatMul weight")
    weight = matmul_weight(rw, matmul)
    w64, c64 = fold_after(weight, None, a, b, axis=1)
    new_w = cast_back(w64, dtype, "weight")
    new_c = cast_back(c64, dtype, "bias") if np.any(c64 != 0) else None
    base = matmul.name or matmul.input[1]
    rw.set_input(matmul, 1, rw.add_initializer(f"{base}_bnfold_W", new_w))
    return new_c

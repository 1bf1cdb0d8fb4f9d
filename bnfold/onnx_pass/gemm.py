"""Rules: Gemm followed by BN, and MatMul (optionally followed by Add of a constant) followed by BN.

Both produce ``[M, N]`` with the features on the last axis. The BN normalizes axis 1, so a
fold is exact only when the output is 2-D: Gemm always is; MatMul's rank is proven from shapes.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from onnx import NodeProto, helper

from ..affine import Refusal, cast_back, fold_after
from .bn import BNAffine
from .graph import attr, float_dtype, set_attr
from .rewrite import GraphRewrite


def fold_gemm_bn(rw: GraphRewrite, bn: BNAffine, gemm: NodeProto, x: str) -> str:
    if rw.opset < 7:
        raise Refusal("unsupported-attribute", "Gemm before opset 7 has broadcast semantics bnfold does not fold")
    w_t = rw.scope.tensor(gemm.input[1], "Gemm B")
    dtype = float_dtype(w_t, "Gemm B")
    weight = rw.scope.array(gemm.input[1], "Gemm B")
    if weight.ndim != 2:
        raise Refusal("not-per-channel", f"Gemm B has rank {weight.ndim}")
    alpha = float(attr(gemm, "alpha", 1.0))
    beta = float(attr(gemm, "beta", 1.0))
    axis = 0 if attr(gemm, "transB", 0) else 1
    w64, _ = fold_after(weight.astype(np.float64) * alpha, None, bn.a, bn.b, axis=axis)
    has_c = len(gemm.input) > 2 and bool(gemm.input[2])
    c = rw.scope.array(gemm.input[2], "Gemm C") if has_c else None
    c64 = _fold_bias(None if c is None else c.astype(np.float64) * beta, bn)
    new_w = cast_back(w64, dtype, "weight")
    new_c = cast_back(c64, dtype, "bias")

    base = gemm.name or gemm.input[1]
    rw.set_input(gemm, 1, rw.add_initializer(f"{base}_bnfold_B", new_w))
    rw.set_input(gemm, 2, rw.add_initializer(f"{base}_bnfold_C", new_c))
    set_attr(gemm, "alpha", 1.0)
    set_attr(gemm, "beta", 1.0)
    rw.remove_bn(bn.node, gemm, x)
    return "gemm-bn"


def _fold_bias(c64: Optional[np.ndarray], bn: BNAffine) -> np.ndarray:
    """``c * a + b`` for a bias that broadcasts against ``[M, N]`` (features on the last axis)."""
    if c64 is None:
        return bn.b.copy()
    if c64.ndim > 2 or (c64.ndim >= 1 and c64.shape[-1] not in (1, bn.channels)):
        raise Refusal("not-per-channel", f"bias of shape {list(c64.shape)} does not broadcast per feature")
    if c64.ndim == 2:
        return c64 * bn.a[None, :] + bn.b[None, :]
    return c64 * bn.a + bn.b


def fold_matmul_bn(rw: GraphRewrite, bn: BNAffine, node: NodeProto, x: str) -> str:
    """MatMul -> BN, or MatMul -> Add(constant) -> BN (``node`` is the MatMul or the Add)."""
    matmul, add, bias_pos = _matmul_and_add(rw, node)
    w_t = rw.scope.tensor(matmul.input[1], "MatMul weight")
    dtype = float_dtype(w_t, "MatMul weight")
    weight = rw.scope.array(matmul.input[1], "MatMul weight")
    if weight.ndim != 2:
        raise Refusal("not-per-channel", f"MatMul weight has rank {weight.ndim}, expected 2")
    rank = rw.rank(matmul.input[0])
    if rank is None:
        raise Refusal("shape-unknown", f"the rank of MatMul input '{matmul.input[0]}' is unknown")
    if rank != 2:
        raise Refusal(
            "not-per-channel",
            f"MatMul input is {rank}-D: the BN normalizes axis 1, the MatMul's features are the last axis",
        )
    w64, _ = fold_after(weight, None, bn.a, bn.b, axis=1)
    bias = None if add is None else rw.scope.array(add.input[bias_pos], "Add bias").astype(np.float64)
    c64 = _fold_bias(bias, bn)
    new_w = cast_back(w64, dtype, "weight")
    new_c = cast_back(c64, dtype, "bias")

    base = matmul.name or matmul.input[1]
    rw.set_input(matmul, 1, rw.add_initializer(f"{base}_bnfold_W", new_w))
    c_name = rw.add_initializer(f"{base}_bnfold_bias", new_c)
    if add is not None:
        rw.set_input(add, bias_pos, c_name)
        rw.remove_bn(bn.node, add, x)
    else:
        add = helper.make_node("Add", [x, c_name], [bn.node.output[0]], name=rw.names.fresh(f"{base}_bnfold_add"))
        rw.replace_node(bn.node, add)
    return "matmul-bn"


def _matmul_and_add(rw: GraphRewrite, node: NodeProto) -> Tuple[NodeProto, Optional[NodeProto], int]:
    """Split ``node`` into (MatMul, Add or None, position of the Add's constant input)."""
    if node.op_type == "MatMul":
        _check_matmul(rw, node)
        return node, None, -1
    # node is an Add: one input constant, the other a MatMul's output used only here
    for pos in (0, 1):
        other = node.input[1 - pos]
        producer = rw.index.producer.get(other)
        if producer is None or producer.op_type != "MatMul":
            continue
        try:
            rw.scope.tensor(node.input[pos], "Add bias")
        except Refusal:
            continue
        if rw.index.sole_consumer(other) is not node or other in rw.index.outputs:
            raise Refusal("producer-has-other-consumers", f"MatMul output '{other}' is also used elsewhere")
        _check_matmul(rw, producer)
        return producer, node, pos
    raise Refusal("no-linear-producer", "the BN follows an Add that is not MatMul + constant")


def _check_matmul(rw: GraphRewrite, matmul: NodeProto) -> None:
    if len(matmul.input) != 2:
        raise Refusal("not-constant", "MatMul without two inputs")
    rw.scope.tensor(matmul.input[1], "MatMul weight")

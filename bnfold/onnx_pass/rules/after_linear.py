"""Rules: a linear op (Conv, ConvTranspose, Gemm, MatMul) followed by a chain of per-channel
affine ops -- BatchNormalization, Mul/Add/Sub/Div by a constant -- possibly with inference
no-ops (Identity, Dropout) and channel-keeping layout ops (Transpose, Reshape, Squeeze,
Unsqueeze, Flatten) between them. The whole chain folds into the linear op.

Pattern: follow the linear op's output from sole reader to sole reader (:func:`..chain.walk`).
Check: each affine op is per channel on the axis where the channels are at that point (tracked
through layout ops); the op absorbs the composed map (``LinearOp.after``). Rewrite: scale the
weights, drop the affine ops and no-ops; keep the layout ops, except Transposes that together
are the identity permutation.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np
from onnx import NodeProto

from ...affine import Refusal
from ..chain import Step, bns_reached, compose, foldable_prefix, rewire, transposes_cancel, walk
from ..ops import linear_op
from ..rewrite import GraphRewrite
from . import Outcome

# Rule names as they appear in reports ("<op>" is conv, convtranspose, gemm or matmul).
RULES: Dict[str, str] = {
    "<op>-bn": "linear op -> BN, through Identity/Dropout (conv-bn, convtranspose-bn, gemm-bn, matmul-bn)",
    "<op>-affine": "linear op -> Mul/Add/Sub/Div by per-channel constants",
    "<op>-layout-bn": "linear op -> Transpose/Reshape/Squeeze/Unsqueeze/Flatten keeping channels -> BN",
    "<op>-layout-affine": "the same with Mul/Add/Sub/Div",
    "matmul-gemm": "MatMul (constant 2-D weight, 2-D input) -> Add of a constant bias (or a BN's shift): one Gemm",
}


def fold_after_linear(rw: GraphRewrite, linear: NodeProto) -> List[Outcome]:
    """Fold the affine chain after ``linear``; an outcome for each BN and elementwise run."""
    op = linear_op(rw, linear)
    try:
        axis, channels = op.output_axis()
    except Refusal as why:
        return bns_reached(rw, linear.output[0], why)
    steps, left, stopped = walk(rw, linear.output[0], axis, channels, allow_layout=True)
    if stopped is not None:
        node, why = stopped
        left.append(Outcome(node, into=[linear], refusal=why))
    prefix = foldable_prefix(steps)
    if not prefix:
        return left
    a, b = compose(prefix, channels)
    drop_layout = transposes_cancel(rw, prefix)
    n_bn = sum(s.kind == "bn" for s in prefix)
    removed = sum(s.kind != "layout" or drop_layout for s in prefix)
    gemm = op.kind == "matmul" and op.writes_gemm(b)
    if op.kind == "matmul" and not gemm and n_bn == 0 and removed - bool(np.any(b != 0)) <= 0:
        return left  # MatMul -> Add(bias) alone is already as small as it gets without a Gemm
    try:
        edit = op.after(a, b)
    except Refusal as why:
        return left + [Outcome(s.node, into=[linear], refusal=why) for s in prefix if s.kind in ("bn", "elementwise")]
    head = edit()  # a MatMul's folded bias goes into a Gemm or an Add right after it: the new head
    rewire(rw, head, prefix, drop_layout)
    return left + _folded(linear, op.kind, prefix, gemm)


def _folded(linear: NodeProto, kind: str, steps: List[Step], gemm: bool) -> List[Outcome]:
    """One outcome per BN, and one per run of Mul/Add/Sub/Div (named by its first node).

    A MatMul's leading Add is its bias, not an affine op folded away: reported only when the
    MatMul and it became one Gemm (``matmul-gemm``)."""
    out: List[Outcome] = []
    in_run = False
    bias_add = kind == "matmul"
    for s in steps:
        if s.kind == "noop":
            continue
        layout = "layout-" if s.after_layout else ""
        if s.kind == "bn":
            out.append(Outcome(s.node, f"{kind}-{layout}bn", [linear]))
            in_run = bias_add = False
        elif s.kind == "elementwise":
            if bias_add and s.node.op_type == "Add" and not s.after_layout:
                bias_add = False
                if gemm:
                    out.append(Outcome(s.node, "matmul-gemm", [linear]))
                continue
            if not in_run:
                out.append(Outcome(s.node, f"{kind}-{layout}affine", [linear]))
            in_run = True
            bias_add = False
        else:
            bias_add = False
    return out

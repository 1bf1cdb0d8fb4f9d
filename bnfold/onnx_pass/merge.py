"""Rule: a BN followed by more per-channel affine ops (another BN, Mul/Add/Sub/Div by a
constant, with Identity/Dropout between) and no linear op to fold into: merge them all into
the first BN.

A BN computes ``s * (x - m) / sqrt(v + eps) + B``; ``A * that + C`` is the same BN with scale
``A * s`` and shift ``A * B + C``, so mean, variance and epsilon stay as they are and the
merge is exact up to one rounding of the two new vectors.
"""

from __future__ import annotations

from onnx import NodeProto

from ..affine import Refusal
from .chain import Refusals, compose, report_affine_folded, rewire, walk
from .layout import Axis
from .ops.batchnorm import read_bn
from .rewrite import GraphRewrite


def merge_after_bn(rw: GraphRewrite, bn: NodeProto, handled: set) -> None:
    """Merge the affine ops after ``bn`` into it; silently do nothing when none can be."""
    try:
        first = read_bn(rw, bn)
    except Refusal:
        return
    rank = rw.rank(bn.input[0]) or rw.rank(bn.output[0])
    axis = Axis.known(rank, 1) if rank and rank >= 2 else Axis(None, 1, None, 2)
    ignored: Refusals = {}
    steps, _ = walk(rw, bn.output[0], axis, first.channels, ignored, allow_layout=False)
    last = max((i for i, s in enumerate(steps) if s.kind in ("affine", "bn")), default=-1)
    steps = steps[: last + 1]
    if not steps:
        return
    a, c = compose(steps, first.channels)
    try:
        edit = first.after(rw, a, c)
    except Refusal:
        return
    edit()
    rewire(rw, bn, steps)
    in_run = False
    for s in steps:
        if s.kind == "bn":
            handled.add(id(s.node))
            rw.report.add_folded(rw.label(s.node), rw.label(bn), bn.op_type, "bn-bn", rw.path)
            in_run = False
        elif s.kind == "affine":
            if not in_run:
                report_affine_folded(rw, s.node, bn, "bn-affine")
            in_run = True

"""Rules: a BN followed by more per-channel affine ops -- another BN, Mul/Add/Sub/Div by a
constant, with Identity/Dropout between -- merged into the first BN.

Pattern: the chain after an inference-mode BN with constant parameters, from sole reader to
sole reader (:func:`..chain.walk`, no layout ops). Check: each op is per channel on axis 1;
the merged scale and shift fit the BN's dtype (``BNAffine.after``). Rewrite: the first BN gets
the new scale and shift (mean, variance and epsilon stay); the others go.

Runs for BNs that no linear op before them took; a BN that cannot merge is left to the next
rule. Besides what it merged, the rule reports a following BN that is not an inference-mode
BN with constant parameters (training mode, say): that is why it stays, not the missing
linear op before it.
"""

from __future__ import annotations

from typing import Dict, List

from onnx import NodeProto

from ...affine import Refusal
from ..chain import compose, foldable_prefix, rewire, walk
from ..layout import Axis
from ..ops.batchnorm import read_bn
from ..rewrite import GraphRewrite
from . import Outcome

RULES: Dict[str, str] = {
    "bn-bn": "BN -> BN merged into the first BN",
    "bn-affine": "BN -> Mul/Add/Sub/Div merged into the BN",
}


def merge_into_bn(rw: GraphRewrite, bn: NodeProto) -> List[Outcome]:
    """Merge the affine ops after ``bn`` into it; an outcome for each BN and run merged."""
    try:
        first = read_bn(rw, bn)
    except Refusal:
        return []
    rank = rw.rank(bn.input[0]) or rw.rank(bn.output[0])
    axis = Axis.known(rank, 1) if rank and rank >= 2 else Axis(None, 1, None, 2)
    steps, left, _ = walk(rw, bn.output[0], axis, first.channels, allow_layout=False)
    own = [o for o in (_own_refusal(rw, o.node) for o in left if o.seen) if o is not None]
    steps = foldable_prefix(steps)
    if not steps:
        return own
    a, c = compose(steps, first.channels)
    try:
        edit = first.after(rw, a, c)
    except Refusal:
        return own
    edit()
    rewire(rw, bn, steps)
    out: List[Outcome] = list(own)
    in_run = False
    for s in steps:
        if s.kind == "bn":
            out.append(Outcome(s.node, "bn-bn", [bn]))
            in_run = False
        elif s.kind == "elementwise":
            if not in_run:
                out.append(Outcome(s.node, "bn-affine", [bn]))
            in_run = True
    return out


def _own_refusal(rw: GraphRewrite, bn: NodeProto):
    """The BN's own reason not to fold (it cannot be read as an inference-mode affine map), or None."""
    try:
        read_bn(rw, bn)
    except Refusal as why:
        return Outcome(bn, refusal=why)
    return None

"""Ops a fold may pass over: inference no-ops (Identity, Dropout) and layout ops that keep
every element's channel (Transpose, and Reshape/Squeeze/Unsqueeze/Flatten that keep the
channel axis whole).

:class:`Axis` says where the channels are in a value; :func:`map_layout` moves it through a
layout op or raises :class:`Refusal` when the op mixes channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np
from onnx import NodeProto

from ..affine import Refusal
from .graph import attr, int_list, node_label, normalized_axes
from .rewrite import GraphRewrite

NOOP_OPS = {"Identity", "Dropout"}
LAYOUT_OPS = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten"}


@dataclass(frozen=True)
class Axis:
    """The channel axis of a value: ``rank`` (None if unknown), the axis counted from the
    front (``pos``) and from the back (``neg``, negative); either may be None, not both.
    ``min_rank`` is a lower bound on the rank when it is unknown."""

    rank: Optional[int]
    pos: Optional[int]
    neg: Optional[int]
    min_rank: int = 1

    @staticmethod
    def known(rank: int, pos: int) -> "Axis":
        return Axis(rank, pos, pos - rank, rank)

    def with_rank(self, rank: Optional[int]) -> "Axis":
        """This axis on a value now known to have ``rank`` dimensions."""
        if rank is None or self.rank is not None:
            return self
        pos = self.pos if self.pos is not None else rank + self.neg
        return Axis.known(rank, pos) if 0 <= pos < rank else self


def is_noop(rw: GraphRewrite, node: NodeProto) -> bool:
    """Identity, or a Dropout in inference mode whose mask nobody reads."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in NOOP_OPS or not node.input or not node.output:
        return False
    try:
        return _is_noop(rw, node)
    except Refusal:  # an attribute of an unexpected type: the op is not known to be a no-op
        return False


def _is_noop(rw: GraphRewrite, node: NodeProto) -> bool:
    if node.op_type == "Identity":
        return True
    mask = node.output[1] if len(node.output) > 1 else ""
    if mask and (rw.consumers(mask) or rw.is_graph_output(mask)):
        return False
    if rw.opset < 7 and not attr(node, "is_test", 0):
        return False  # Dropout-1/6 trains unless is_test=1
    if len(node.input) > 2 and node.input[2]:
        try:
            training = rw.constant(node.input[2], "Dropout training_mode")
        except Refusal:
            return False
        return not bool(np.any(training))
    return True


def is_layout(node: NodeProto) -> bool:
    return node.domain in ("", "ai.onnx") and node.op_type in LAYOUT_OPS and bool(node.input) and bool(node.output)


def map_layout(rw: GraphRewrite, node: NodeProto, axis: Axis, channels: int) -> Axis:
    """The channel axis after layout op ``node``; Refusal when the op does not keep channels."""
    if node.op_type == "Transpose":
        return _through_transpose(rw, node, axis)
    return _through_reshape(rw, node, axis, channels)


def transpose_perm(rw: GraphRewrite, node: NodeProto, rank: Optional[int]) -> Optional[List[int]]:
    perm = attr(node, "perm", None)
    if perm is not None:
        return [int(p) for p in perm]
    rank = rank if rank is not None else rw.rank(node.input[0])
    return None if rank is None else list(range(rank))[::-1]


def _through_transpose(rw: GraphRewrite, node: NodeProto, axis: Axis) -> Axis:
    perm = transpose_perm(rw, node, axis.rank)
    if perm is None:
        raise Refusal("shape-unknown", f"the rank before Transpose '{node_label(node)}' is unknown")
    axis = axis.with_rank(len(perm))
    if axis.pos is None or sorted(perm) != list(range(len(perm))):
        raise Refusal("shape-unknown", f"cannot place the channel axis through Transpose '{node_label(node)}'")
    return Axis.known(len(perm), perm.index(axis.pos))


def _through_reshape(rw: GraphRewrite, node: NodeProto, axis: Axis, channels: int) -> Axis:
    """Reshape-like ops keep channels when the channel axis survives whole: some output axis
    has the channel count and the same number of elements after it as the input's channel axis
    (then ``(flat index // inner) % channels`` is the same channel on both sides)."""
    s_in, s_out = rw.shape(node.input[0]), rw.shape(node.output[0])
    if s_in is not None and s_out is not None:
        axis = axis.with_rank(len(s_in))
        inner = _product(s_in[axis.pos + 1:]) if axis.pos is not None else None
        if inner is not None:
            for j, dim in enumerate(s_out):
                if dim == channels and _product(s_out[j + 1:]) == inner:
                    return Axis.known(len(s_out), j)
            if all(d is not None for d in s_out):
                raise Refusal(
                    "not-per-channel",
                    f"{node.op_type} '{node_label(node)}' maps {list(s_in)} to {list(s_out)}: "
                    f"the channel axis (axis {axis.pos}) does not survive whole",
                )
    if node.op_type in ("Squeeze", "Unsqueeze"):
        mapped = _through_axes(rw, node, axis)
        if mapped is not None:
            return mapped
    if node.op_type == "Reshape" and len(node.input) > 1 and node.input[1]:
        try:
            rw.constant(node.input[1], "Reshape target")
        except Refusal as why:  # shapes are not inferred from a target a caller can replace
            if why.reason == "overridable-initializer":
                raise
    raise Refusal("shape-unknown", f"the shapes around {node.op_type} '{node_label(node)}' are unknown")


def _through_axes(rw: GraphRewrite, node: NodeProto, axis: Axis) -> Optional[Axis]:
    """Squeeze/Unsqueeze with explicit axes on a value of known rank (no shapes needed)."""
    axes = attr(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1]:
        try:
            axes = int_list(rw.constant(node.input[1], "axes"), f"the axes of {node.op_type} '{node_label(node)}'")
        except Refusal:
            return None
    if axes is None or axis.rank is None or axis.pos is None:
        return None
    what = f"{node.op_type} '{node_label(node)}'"
    if node.op_type == "Unsqueeze":
        rank = axis.rank + len(axes)
        added = set(normalized_axes(axes, rank, what))
        kept = [i for i in range(rank) if i not in added]
        return Axis.known(rank, kept[axis.pos])
    dropped = set(normalized_axes(axes, axis.rank, what))
    if axis.pos in dropped:
        raise Refusal("not-per-channel", f"Squeeze '{node_label(node)}' removes the channel axis")
    return Axis.known(axis.rank - len(dropped), axis.pos - sum(1 for a in dropped if a < axis.pos))


def _product(dims) -> Optional[int]:
    if any(d is None for d in dims):
        return None
    return int(np.prod(dims, dtype=np.int64)) if dims else 1

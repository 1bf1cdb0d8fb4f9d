"""Chains of per-channel affine ops: BatchNormalization and Mul/Add/Sub/Div by a constant,
with inference no-ops (Identity, Dropout) and, where allowed, channel-keeping layout ops
(Transpose, Reshape, Squeeze, Unsqueeze, Flatten) between them. :func:`walk` follows one from
sole reader to sole reader, tracking where the channel axis is; :func:`compose` makes the
chain one map; :func:`rewire` removes its folded nodes. Used by the rules that fold a chain
into the op before it (:mod:`.rules.after_linear`, :mod:`.rules.bn_merge`).

Each node is looked at once per chain: linear in the graph's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
from onnx import NodeProto

from ..affine import Refusal
from .graph import node_label
from .layout import LAYOUT_OPS, NOOP_OPS, Axis, is_layout, is_noop, map_layout, transpose_perm
from .ops.batchnorm import is_batchnorm, read_bn
from .ops.elementwise import ELEMENTWISE_OPS, constant_operand, per_channel
from .rewrite import GraphRewrite
from .rules import Outcome


@dataclass
class Step:
    """One node of a chain: ``kind`` is noop, layout, elementwise or bn; ``a``/``b`` its map."""

    node: NodeProto
    kind: str
    a: Optional[np.ndarray] = None
    b: Optional[np.ndarray] = None
    const: str = ""  # the constant operand of an elementwise op
    after_layout: bool = False  # a layout op lies between the linear op and this step


PASSABLE = NOOP_OPS | LAYOUT_OPS | ELEMENTWISE_OPS


def next_link(rw: GraphRewrite, value: str) -> Tuple[Optional[NodeProto], Optional[Refusal]]:
    """The sole reader of ``value``, or None and (when there are readers) why it is not alone."""
    if rw.is_graph_output(value):
        return None, Refusal("producer-output-is-graph-output", f"'{value}' is a graph output")
    users = rw.consumers(value)
    if not users:
        return None, None
    if len(users) > 1:
        names = ", ".join(node_label(n) for n in users)
        return None, Refusal("producer-has-other-consumers", f"'{value}' is read by {names}")
    node = users[0]
    if list(node.input).count(value) != 1:
        return None, Refusal("producer-has-other-consumers", f"'{value}' is read twice by {node_label(node)}")
    if rw.is_removed(node) or not node.output or not node.output[0]:
        return None, None
    return node, None


def walk(
    rw: GraphRewrite, value: str, axis: Axis, channels: int, allow_layout: bool
) -> Tuple[List[Step], List[Outcome], Optional[Tuple[NodeProto, Refusal]]]:
    """The chain after ``value``: every step up to the first node that is not part of one.

    Returns the steps, the BNs the chain cannot take (with why), and, when the chain ended at
    an affine op that was refused, that op and why.
    """
    steps: List[Step] = []
    seen_layout = False
    while True:
        node, why = next_link(rw, value)
        if node is None:
            return steps, (bns_reached(rw, value, why) if why is not None else []), None
        if is_batchnorm(node):
            try:
                step = _bn_step(rw, node, value, axis, channels)
            except Refusal as why:
                return steps, [Outcome(node, refusal=why)], None
        elif is_noop(rw, node) and node.input[0] == value:
            step = Step(node, "noop")
        elif allow_layout and is_layout(node) and node.input[0] == value:
            try:
                axis = map_layout(rw, node, axis, channels)
            except Refusal as why:
                return steps, [Outcome(bn, refusal=why, seen=False) for bn in _bns_ahead(rw, node)], None
            step = Step(node, "layout")
            seen_layout = True
        else:
            operand = constant_operand(rw, node, value)
            if operand is None:
                return steps, [], None
            try:
                a, b = per_channel(node, operand[0], operand[1], axis, channels)
            except Refusal as why:
                return steps, [], (node, why)
            step = Step(node, "elementwise", a, b, const=node.input[operand[0]])
        step.after_layout = seen_layout
        steps.append(step)
        value = node.output[0]
        axis = _known_rank(rw, axis, value)


def _bn_step(rw: GraphRewrite, bn: NodeProto, value: str, axis: Axis, channels: int) -> Step:
    affine = read_bn(rw, bn)
    if bn.input[0] != value:
        raise Refusal("not-constant", f"'{value}' is a parameter of the BN, not its input")
    axis = _known_rank(rw, axis, value)
    if axis.pos is None:
        raise Refusal("shape-unknown", f"the rank of '{value}' is unknown: the BN normalizes axis 1, the channels may be elsewhere")
    if axis.pos != 1 or (axis.rank is not None and axis.rank < 2):
        raise Refusal(
            "not-per-channel",
            f"the BN normalizes axis 1 of a {axis.rank}-D value; the linear op's channels are on axis {axis.pos}",
        )
    if affine.channels != channels:
        raise Refusal("channel-mismatch", f"the linear op has {channels} output channels, the BN has {affine.channels}")
    return Step(bn, "bn", affine.a, affine.b)


def bns_reached(rw: GraphRewrite, value: str, why: Refusal) -> List[Outcome]:
    """The BNs that the readers of ``value`` lead to, each left with ``why`` (not seen)."""
    left = []
    for user in rw.consumers(value):
        for bn in [user] if is_batchnorm(user) else _bns_ahead(rw, user):
            left.append(Outcome(bn, refusal=why, seen=False))
    return left


def _bns_ahead(rw: GraphRewrite, node: NodeProto, limit: int = 16) -> List[NodeProto]:
    """The BN reached from ``node`` through ops a chain may hold (no-ops, layout and affine
    ops), each the sole reader of the one before: the BN a refusal at ``node`` concerns."""
    for _ in range(limit):
        if node.op_type not in PASSABLE or not node.output:
            return []
        users = rw.consumers(node.output[0])
        if len(users) != 1:
            return []
        node = users[0]
        if is_batchnorm(node):
            return [node]
    return []


def foldable_prefix(steps: List[Step]) -> List[Step]:
    last = max((i for i, s in enumerate(steps) if s.kind in ("elementwise", "bn")), default=-1)
    return steps[: last + 1]


def compose(steps: List[Step], channels: int) -> Tuple[np.ndarray, np.ndarray]:
    """The affine steps as one map ``a * x + b`` (float64), first step applied first."""
    a, b = np.ones(channels), np.zeros(channels)
    for s in steps:
        if s.kind in ("elementwise", "bn"):
            a, b = s.a * a, s.a * b + s.b
    return a, b


def transposes_cancel(rw: GraphRewrite, steps: List[Step]) -> bool:
    """True when the chain's layout ops are all Transposes that compose to the identity."""
    layout = [s.node for s in steps if s.kind == "layout"]
    if not layout or any(n.op_type != "Transpose" for n in layout):
        return False
    order: Optional[List[int]] = None
    for node in layout:
        perm = transpose_perm(rw, node, None if order is None else len(order))
        if perm is None or (order is not None and len(perm) != len(order)):
            return False
        order = list(range(len(perm))) if order is None else order
        order = [order[p] for p in perm]
    return order == sorted(order)


def rewire(rw: GraphRewrite, head: NodeProto, steps: List[Step], drop_layout: bool = False) -> None:
    """Remove the chain's folded nodes: each run of removed nodes is bridged by renaming the
    output of the node before it to the run's last output, so the readers after it (and graph
    outputs) keep their names."""
    live_node, live_value = head, head.output[0]
    pending: Optional[str] = None
    for s in steps:
        if s.kind == "layout" and not drop_layout:
            if pending is not None:
                rw.rename_output(live_node, live_value, pending)
            live_node, live_value, pending = s.node, s.node.output[0], None
            continue
        rw.drop_node(s.node)
        rw.forget(s.node.output[1:])
        if pending is not None:
            rw.forget([pending])
        pending = s.node.output[0]
        if s.kind == "bn":
            rw.orphan(s.node.input[1:])
        elif s.kind == "elementwise":
            rw.drop_dead_constant(s.const)
    if pending is not None:
        rw.rename_output(live_node, live_value, pending)


def _known_rank(rw: GraphRewrite, axis: Axis, value: str) -> Axis:
    """``axis`` with its rank filled in; shapes are looked up only when it is still unknown."""
    return axis if axis.rank is not None else axis.with_rank(rw.rank(value))


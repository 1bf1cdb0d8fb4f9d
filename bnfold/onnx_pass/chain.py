"""Rule: a linear op (Conv, ConvTranspose, Gemm, MatMul) followed by a chain of per-channel
affine ops -- BatchNormalization, Mul/Add/Sub/Div by a constant -- possibly with inference
no-ops (Identity, Dropout) and channel-keeping layout ops (Transpose, Reshape, Squeeze,
Unsqueeze, Flatten) between them. The whole chain folds into the linear op.

Pattern: follow the linear op's output from sole consumer to sole consumer. Check: each
affine op is per channel on the axis where the channels are at that point (tracked through
layout ops). Rewrite: scale the weights, drop the affine ops and no-ops; keep the layout ops,
except Transposes that together are the identity permutation.

Each node is looked at once per chain, and each chain starts at one linear op: linear in the
graph's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
from onnx import NodeProto

from ..affine import Refusal
from ..report import AFFINE_FOLDED, AFFINE_SKIPPED
from .graph import node_label
from .layout import LAYOUT_OPS, NOOP_OPS, Axis, is_layout, is_noop, map_layout, transpose_perm
from .ops import is_linear, linear_op
from .ops.batchnorm import is_batchnorm, read_bn
from .ops.elementwise import ELEMENTWISE_OPS, constant_operand, per_channel
from .rewrite import GraphRewrite


@dataclass
class Step:
    """One node of a chain: ``kind`` is noop, layout, affine or bn; ``a``/``b`` its map."""

    node: NodeProto
    kind: str
    a: Optional[np.ndarray] = None
    b: Optional[np.ndarray] = None
    const: str = ""  # the constant operand of an affine op
    after_layout: bool = False  # a layout op lies between the linear op and this step


PASSABLE = NOOP_OPS | LAYOUT_OPS | ELEMENTWISE_OPS
Refusals = Dict[int, Refusal]  # id() of a BN -> why a linear op before it could not take it


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
    if rw.is_removed(node):
        return None, None
    return node, None


def fold_chain_after(rw: GraphRewrite, linear: NodeProto, handled: set, refusals: Refusals) -> None:
    """Fold the affine chain after ``linear``; record why BNs on it were refused in ``refusals``."""
    op = linear_op(rw, linear)
    try:
        axis, channels = op.output_axis()
    except Refusal as why:
        for user in rw.consumers(linear.output[0]):
            for bn in [user] if is_batchnorm(user) else _bns_ahead(rw, user):
                refusals.setdefault(id(bn), why)
        return
    steps, stopped = walk(rw, linear.output[0], axis, channels, refusals, allow_layout=True)
    if stopped is not None:
        node, why = stopped
        report_affine_skipped(rw, node, linear, why)
    prefix = _foldable_prefix(steps)
    if not prefix:
        return
    a, b = compose(prefix, channels)
    drop_layout = _transposes_cancel(rw, prefix)
    n_bn = sum(s.kind == "bn" for s in prefix)
    removed = sum(s.kind != "layout" or drop_layout for s in prefix)
    if op.kind == "matmul" and n_bn == 0 and removed - bool(np.any(b != 0)) <= 0:
        return  # MatMul -> Add(bias) alone is already as small as it gets
    try:
        edit = op.after(a, b)
    except Refusal as why:
        for s in prefix:
            if s.kind == "bn":
                refusals[id(s.node)] = why
            elif s.kind == "affine":
                report_affine_skipped(rw, s.node, linear, why)
        return
    head = edit()  # a MatMul's folded bias goes into an Add right after it: the new head
    rewire(rw, head, prefix, drop_layout)
    _report(rw, linear, op.kind, prefix, handled)


def walk(
    rw: GraphRewrite, value: str, axis: Axis, channels: int, refusals: Refusals, allow_layout: bool
) -> Tuple[List[Step], Optional[Tuple[NodeProto, Refusal]]]:
    """The chain after ``value``: every step up to the first node that is not part of one.

    Returns the steps and, when the chain ended at an affine op that was refused, that op and
    why. A refused BN goes into ``refusals`` instead.
    """
    steps: List[Step] = []
    seen_layout = False
    while True:
        node, why = next_link(rw, value)
        if node is None:
            if why is not None:
                for user in rw.consumers(value):
                    ahead = [user] if is_batchnorm(user) else _bns_ahead(rw, user)
                    for bn in ahead:
                        refusals.setdefault(id(bn), why)
            return steps, None
        if is_batchnorm(node):
            try:
                step = _bn_step(rw, node, value, axis, channels)
            except Refusal as why:
                refusals[id(node)] = why
                return steps, None
        elif is_noop(rw, node) and node.input[0] == value:
            step = Step(node, "noop")
        elif allow_layout and is_layout(node) and node.input[0] == value:
            try:
                axis = map_layout(rw, node, axis, channels)
            except Refusal as why:
                for bn in _bns_ahead(rw, node):
                    refusals.setdefault(id(bn), why)
                return steps, None
            step = Step(node, "layout")
            seen_layout = True
        else:
            operand = constant_operand(rw, node, value)
            if operand is None:
                return steps, None
            try:
                a, b = per_channel(node, operand[0], operand[1], axis, channels)
            except Refusal as why:
                return steps, (node, why)
            step = Step(node, "affine", a, b, const=node.input[operand[0]])
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
    if axis.pos != 1 or axis.rank < 2:
        raise Refusal(
            "not-per-channel",
            f"the BN normalizes axis 1 of a {axis.rank}-D value; the linear op's channels are on axis {axis.pos}",
        )
    if affine.channels != channels:
        raise Refusal("channel-mismatch", f"the linear op has {channels} output channels, the BN has {affine.channels}")
    return Step(bn, "bn", affine.a, affine.b)


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


def _foldable_prefix(steps: List[Step]) -> List[Step]:
    last = max((i for i, s in enumerate(steps) if s.kind in ("affine", "bn")), default=-1)
    return steps[: last + 1]


def compose(steps: List[Step], channels: int) -> Tuple[np.ndarray, np.ndarray]:
    """The affine steps as one map ``a * x + b`` (float64), first step applied first."""
    a, b = np.ones(channels), np.zeros(channels)
    for s in steps:
        if s.kind in ("affine", "bn"):
            a, b = s.a * a, s.a * b + s.b
    return a, b


def _transposes_cancel(rw: GraphRewrite, steps: List[Step]) -> bool:
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
        elif s.kind == "affine":
            rw.drop_dead_constant(s.const)
    if pending is not None:
        rw.rename_output(live_node, live_value, pending)


def _report(rw: GraphRewrite, linear: NodeProto, kind: str, steps: List[Step], handled: set) -> None:
    """One entry per BN, and one per run of Mul/Add/Sub/Div (named by its first node).

    A MatMul's leading Add is its bias, not an affine op folded away: not reported."""
    in_run = False
    bias_add = kind == "matmul"
    for s in steps:
        if s.kind == "noop":
            continue
        layout = "layout-" if s.after_layout else ""
        if s.kind == "bn":
            handled.add(id(s.node))
            rw.report.add_folded(rw.label(s.node), rw.label(linear), linear.op_type, f"{kind}-{layout}bn", rw.path)
            in_run = bias_add = False
        elif s.kind == "affine":
            if bias_add and s.node.op_type == "Add" and not s.after_layout:
                bias_add = False
                continue
            if not in_run:
                report_affine_folded(rw, s.node, linear, f"{kind}-{layout}affine")
            in_run = True
            bias_add = False
        else:
            bias_add = False


def _known_rank(rw: GraphRewrite, axis: Axis, value: str) -> Axis:
    """``axis`` with its rank filled in; shapes are looked up only when it is still unknown."""
    return axis if axis.rank is not None else axis.with_rank(rw.rank(value))


def report_affine_folded(rw: GraphRewrite, node: NodeProto, into: NodeProto, rule: str) -> None:
    """Record a folded run of affine ops, named by its first node."""
    entry = {"node": rw.label(node), "op": node.op_type, "into": rw.label(into), "into_op": into.op_type,
             "rule": rule, "graph": rw.path}
    rw.report.extra.setdefault(AFFINE_FOLDED, []).append(entry)


def report_affine_skipped(rw: GraphRewrite, node: NodeProto, after: NodeProto, why: Refusal) -> None:
    """Record an affine op right after a linear op that could not be folded, and why."""
    entry = {"node": rw.label(node), "op": node.op_type, "after": rw.label(after), "after_op": after.op_type,
             "reason": why.reason, "detail": why.detail, "graph": rw.path}
    rw.report.extra.setdefault(AFFINE_SKIPPED, []).append(entry)

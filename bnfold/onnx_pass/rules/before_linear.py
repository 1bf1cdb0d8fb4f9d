"""Rules: a per-channel affine map before linear ops. ``W (a * x + b) + c`` is
``(W * a) x + (c + W b)``: the weights are scaled per *input* channel and ``W b`` joins the
bias (:func:`bnfold.affine.fold_before`, ``LinearOp.before``).

BN before (``bn-conv``, ``bn-gemm``, ...). Pattern: every reader of the BN's output is a Conv,
Gemm or MatMul reading it as its data input, or a Flatten(axis=1) whose readers all are Gemm or
MatMul. Check: a Conv adds no padding when the BN shifts (padding zeros are not shifted by
``b``, so the fold would be wrong at the borders); a MatMul's input is 2-D and a Gemm's is not
transposed (the BN's channels must be the features the op reads); a Flatten's input has known
spatial dims (each channel becomes a contiguous block of features). Rewrite: the readers read
the BN's input; the BN goes.

Mul/Add/Sub/Div before (``affine-conv``, ``affine-gemm``, ...; exporters write ``Mul(x, 0.5)``
before a 1x1 conv). Pattern: every reader of the op's output is a Conv, ConvTranspose, Gemm or
MatMul reading it as its data input, the other operand a constant. Check: the constant is one
value, or one per input channel of every reader once right-aligned against the data (the
channels are axis 1 of a conv's input, the last axis of a Gemm's or MatMul's); a shift obeys
the padding rule above (a scale alone is exact before any padding: ``a * 0 = 0``). Rewrite: the
readers read the data operand; the op goes. A refusal is not reported: most such ops are no
fold candidates at all.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import numpy as np
from onnx import NodeProto

from ...affine import Refusal
from ..graph import attr, node_label
from ..ops import is_linear, linear_op
from ..ops.batchnorm import read_bn
from ..ops.elementwise import constant_operand, is_elementwise, per_channel
from ..rewrite import GraphRewrite
from . import Outcome

RULES: Dict[str, str] = {
    "bn-conv": "BN -> Conv without padding (grouped, depthwise)",
    "bn-gemm": "BN1d -> Gemm",
    "bn-matmul": "BN1d -> MatMul on a 2-D value",
    "bn-flatten-gemm": "BN2d -> Flatten(axis=1) -> Gemm (bn-flatten-matmul likewise)",
    "affine-<op>": "Mul/Add/Sub/Div by a constant -> Conv/ConvTranspose/Gemm/MatMul (affine-conv, ...)",
}

CONSUMERS = {"Conv", "Gemm", "MatMul", "Flatten", "ConvTranspose"}

Plan = Tuple[str, Callable[[], None]]  # (kind for the rule name, the edit)


def fold_before_linear(rw: GraphRewrite, bn: NodeProto) -> Outcome:
    """Fold ``bn`` into the linear ops reading it, or say why not."""
    try:
        rule, users = _fold(rw, bn)
    except Refusal as why:
        return Outcome(bn, refusal=why)
    return Outcome(bn, rule, users)


def fold_elementwise_before_linear(rw: GraphRewrite, node: NodeProto) -> Optional[Outcome]:
    """Fold a Mul/Add/Sub/Div by a constant into the linear ops reading it; None when it is no
    candidate (not such an op, or not read by linear ops only)."""
    if not is_elementwise(node):
        return None
    y = node.output[0] if node.output else ""
    users = list(rw.consumers(y)) if y else []
    if not users or rw.is_graph_output(y) or not all(_reads_as_data(u, y) for u in users):
        return None
    for data in node.input:
        operand = constant_operand(rw, node, data)
        if operand is not None:
            break
    else:
        return None
    pos, value = operand
    try:
        plans = []
        for u in users:  # all checks first
            op = linear_op(rw, u)
            axis, channels = op.input_axis()
            a, b = per_channel(node, pos, value, axis, channels)
            if op.kind == "matmul" and op.needs_new_add(b):
                raise Refusal("consumer-cannot-absorb", "the shift would only move to a new Add after the MatMul")
            plans.append((op.kind, op.before(a, b)))
    except Refusal as why:
        return Outcome(node, into=users, refusal=why)
    for _, edit in plans:
        edit()
    for u in list(rw.consumers(y)):  # the readers now (an edit may have replaced one)
        rw.replace_input(u, y, data)
    rw.drop_node(node)
    rw.drop_dead_constant(node.input[pos])
    rw.forget([y])
    return Outcome(node, "affine-" + "+".join(sorted({kind for kind, _ in plans})), users)


def _reads_as_data(node: NodeProto, y: str) -> bool:
    return is_linear(node) and node.input[0] == y and list(node.input).count(y) == 1


def _fold(rw: GraphRewrite, bn: NodeProto):
    if not bn.output or not bn.output[0]:
        raise Refusal("malformed-node", "the BN has no output")
    y = bn.output[0]
    users = list(rw.consumers(y))
    if not any(u.op_type in CONSUMERS and u.domain in ("", "ai.onnx") for u in users):
        raise Refusal("no-linear-consumer", "no Conv, Gemm, MatMul or Flatten reads the BN's output")
    if rw.is_graph_output(y):
        raise Refusal("bn-output-is-graph-output", f"'{y}' is a graph output")
    affine = read_bn(rw, bn)
    rank = rw.rank(bn.input[0]) or rw.rank(y)
    plans = [_plan(rw, u, y, affine.a, affine.b, rank) for u in users]  # all checks first
    for _, edit in plans:
        edit()
    for u in list(rw.consumers(y)):  # the readers now (an edit may have replaced one)
        rw.replace_input(u, y, bn.input[0])
    rw.drop_node(bn)
    rw.orphan(bn.input[1:])
    rw.forget([y])
    kinds = sorted({kind for kind, _ in plans})
    return "bn-" + ("+".join(kinds)), users


def _plan(rw: GraphRewrite, node: NodeProto, y: str, a, b, rank: Optional[int]) -> Plan:
    label = f"{node.op_type} '{node_label(node)}'"
    if node.domain not in ("", "ai.onnx") or node.op_type not in CONSUMERS:
        raise Refusal("consumer-cannot-absorb", f"{label} also reads the BN's output")
    if list(node.input).count(y) != 1 or node.input[0] != y:
        raise Refusal("consumer-cannot-absorb", f"{label} reads the BN's output as a parameter")
    if node.op_type == "MatMul":
        if rank is None:
            raise Refusal("shape-unknown", f"the rank of the BN's input is unknown; {label} needs it 2-D")
        if rank != 2:
            raise Refusal(
                "not-per-channel",
                f"the BN's input is {rank}-D: the BN normalizes axis 1, {label} reads the last axis",
            )
    if node.op_type == "Flatten":
        return _flatten_plan(rw, node, y, a, b)
    op = linear_op(rw, node)
    return op.kind, op.before(a, b)


def _flatten_plan(rw: GraphRewrite, flatten: NodeProto, y: str, a, b) -> Plan:
    """BN2d -> Flatten(axis=1) -> Gemm/MatMul: channel ``c`` becomes features ``c*HW .. c*HW+HW-1``."""
    label = f"Flatten '{node_label(flatten)}'"
    shape = rw.shape(y) or rw.shape(flatten.input[0])
    axis = int(attr(flatten, "axis", 1))
    if axis < 0 and shape is not None:
        axis += len(shape)  # Flatten(axis=-3) of a 4-D value is Flatten(axis=1)
    if axis != 1:
        raise Refusal("not-per-channel" if axis >= 0 else "shape-unknown", f"{label} does not flatten from axis 1")
    if shape is None or len(shape) < 2 or any(d is None for d in shape[2:]):
        raise Refusal("shape-unknown", f"the spatial size before {label} is unknown")
    block = int(np.prod(shape[2:], dtype=np.int64)) if len(shape) > 2 else 1
    out = flatten.output[0]
    users = rw.consumers(out)
    if rw.is_graph_output(out) or not users:
        raise Refusal("consumer-cannot-absorb", f"the output of {label} is used as it is")
    a_f, b_f = np.repeat(a, block), np.repeat(b, block)
    plans = []
    for u in users:
        if u.op_type not in ("Gemm", "MatMul") or u.domain not in ("", "ai.onnx") or list(u.input).count(out) != 1 or u.input[0] != out:
            raise Refusal("consumer-cannot-absorb", f"{u.op_type} '{node_label(u)}' reads the output of {label}")
        plans.append(linear_op(rw, u).before(a_f, b_f))
    kinds = sorted({u.op_type.lower() for u in users})

    def edit() -> None:
        for p in plans:
            p()

    return "flatten-" + "+".join(kinds), edit

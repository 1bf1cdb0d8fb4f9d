"""Rule: elementwise no-ops. ``Mul``/``Div`` by 1 and ``Add``/``Sub`` of 0 are removed
(paddle2onnx writes ``Mul(x, [1.0])`` in every swish; onnxruntime and onnxslim remove them).

Pattern: Mul(x, 1), Mul(1, x), Div(x, 1), Add(x, 0), Add(0, x), Sub(x, 0), the constant of any
rank, every element equal. Check: the constant does not broadcast ``x`` to a bigger shape
(right-aligned against ``x``'s known shape, each of its dims is 1 or equals ``x``'s); ONNX gives
both operands one type, so the result's dtype is ``x``'s. ``x + 0`` turns ``-0.0`` into ``+0.0``,
which compares equal. Rewrite: the readers read ``x``; when the result is a graph output, the
node making ``x`` writes it under that name instead (when ``x`` is a graph input, an
initializer, or read elsewhere, the op stays).
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
from onnx import NodeProto

from ..graph import subgraphs
from ..ops.elementwise import constant_operand, is_elementwise
from ..rewrite import GraphRewrite
from . import Outcome

RULES: Dict[str, str] = {
    "noop": "Mul/Div by 1 and Add/Sub of 0 that do not broadcast, removed",
}

_IDENTITY = {"Mul": 1.0, "Div": 1.0, "Add": 0.0, "Sub": 0.0}
_COMMUTATIVE = {"Mul", "Add"}


def remove_noop(rw: GraphRewrite, node: NodeProto) -> Optional[Outcome]:
    """Remove ``node`` when it is an elementwise no-op; None otherwise."""
    if not is_elementwise(node):
        return None
    if len(node.output) != 1 or not node.output[0]:
        return None
    candidates = node.input if node.op_type in _COMMUTATIVE else node.input[:1]
    for data in candidates:
        operand = constant_operand(rw, node, data)
        if operand is not None and _is_identity(rw, node.op_type, operand[1], data):
            break
    else:
        return None
    y, const = node.output[0], node.input[operand[0]]
    if rw.is_graph_output(y):
        producer = rw.producer(data)
        if producer is None or rw.is_graph_output(data) or rw.consumers(data) != [node]:
            return None
        rw.drop_node(node)
        rw.rename_output(producer, data, y)
    else:
        users = list(rw.consumers(y))
        if not all(y in u.input and not any(True for _ in subgraphs(u)) for u in users):
            return None  # a subgraph may read it by name: it cannot be rewired
            return None
        for u in users:
            rw.replace_input(u, y, data)
        rw.drop_node(node)
        rw.forget([y])
    rw.drop_dead_constant(const)
    return Outcome(node, "noop")


def _is_identity(rw: GraphRewrite, op: str, value: np.ndarray, data: str) -> bool:
    if value.dtype.kind not in "fiu" and "bfloat16" not in str(value.dtype):
        return False
    with np.errstate(invalid="ignore"):
        if not np.all(value.astype(np.float64) == _IDENTITY[op]):
            return False
    if value.ndim == 0:
        return True
    shape = rw.shape(data)
    if shape is None or value.ndim > len(shape):
        return False
    return all(c == 1 or d == c for c, d in zip(value.shape[::-1], shape[::-1]))

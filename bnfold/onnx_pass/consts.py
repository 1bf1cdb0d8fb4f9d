"""Constants that reach an op through a small constant subgraph.

Exporters often write a per-channel constant as ``Unsqueeze(initializer)``, ``Reshape`` or
``Cast`` of one. Such chains are evaluated here with numpy at fold time, so the rules can treat
their result as a constant. Only a few shape-only ops (and Cast) are evaluated: anything else
is "computed at run time".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List

import numpy as np
from onnx import NodeProto, helper

from ..affine import Refusal
from .graph import attr

if TYPE_CHECKING:
    from .rewrite import GraphRewrite

CONST_OPS = {"Identity", "Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten"}
MAX_DEPTH = 8  # longest constant chain followed
MAX_ELEMENTS = 1 << 20  # larger constants are not worth evaluating for a per-channel fold


def constant_value(
    rw: "GraphRewrite", name: str, what: str, cache: Dict[str, np.ndarray], depth: int = 0
) -> np.ndarray:
    """The value of ``name``: a constant, or a short chain of :data:`CONST_OPS` over constants
    (values kept in ``cache``). Used by :meth:`GraphRewrite.constant` only.

    Raises :class:`Refusal` when it is neither (a graph input, a run-time value, a chain too
    long or too large).
    """
    if name in cache:
        return cache[name]
    producer = rw.producer(name)
    if producer is None or producer.op_type == "Constant":
        value = rw.scope.array(name, what)
    elif producer.op_type in CONST_OPS and producer.domain in ("", "ai.onnx") and depth < MAX_DEPTH:
        args = [constant_value(rw, i, what, cache, depth + 1) if i else None for i in producer.input]
        try:
            value = _evaluate(rw, producer, args)
        except (ValueError, TypeError, KeyError, IndexError) as exc:  # a malformed model
            raise Refusal("not-constant", f"{what} '{name}': {producer.op_type} cannot be evaluated ({exc})") from None
    else:
        raise Refusal("not-constant", f"{what} '{name}' is computed at run time by {producer.op_type}")
    if value.size > MAX_ELEMENTS:
        raise Refusal("not-constant", f"{what} '{name}' has {value.size} elements, too many to fold")
    cache[name] = value
    return value


def _evaluate(rw: "GraphRewrite", node: NodeProto, args: List) -> np.ndarray:
    x = args[0]
    op = node.op_type
    if op == "Identity":
        return x
    if op == "Cast":
        return x.astype(helper.tensor_dtype_to_np_dtype(int(attr(node, "to", 1))))
    if op == "Flatten":
        axis = int(attr(node, "axis", 1)) % max(x.ndim, 1) if x.ndim else 0
        return x.reshape(int(np.prod(x.shape[:axis])), -1)
    if op == "Reshape":
        target = [int(d) for d in args[1]]
        if not attr(node, "allowzero", 0):
            target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
        return x.reshape(target)
    axes = _axes(rw, node, args)
    if op == "Unsqueeze":
        rank = x.ndim + len(axes)
        for a in sorted(a % rank for a in axes):
            x = np.expand_dims(x, a)
        return x
    # Squeeze
    if axes is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=tuple(a % x.ndim for a in axes))


def _axes(rw: "GraphRewrite", node: NodeProto, args: List):
    if len(args) > 1 and args[1] is not None:
        return [int(a) for a in args[1]]
    axes = attr(node, "axes", None)
    return None if axes is None else [int(a) for a in axes]

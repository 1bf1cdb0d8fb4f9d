"""Constants that reach an op through a small constant subgraph.

Exporters often write a per-channel constant as ``Unsqueeze(initializer)``, ``Reshape`` or
``Cast`` of one. Such chains are evaluated here with numpy at fold time, so the rules can treat
their result as a constant. Only a few shape-only ops (and Cast) are evaluated: anything else
is "computed at run time".
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Dict, List, Optional

import numpy as np
from onnx import NodeProto, helper

from ..affine import Refusal
from .graph import attr, int_list, normalized_axes

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
        except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:  # a malformed model
            raise Refusal("not-constant", f"{what} '{name}': {producer.op_type} cannot be evaluated ({exc})") from None
    else:
        raise Refusal("not-constant", f"{what} '{name}' is computed at run time by {producer.op_type}")
    if value.size > MAX_ELEMENTS:
        raise Refusal("not-constant", f"{what} '{name}' has {value.size} elements, too many to fold")
    cache[name] = value
    return value


def _evaluate(rw: "GraphRewrite", node: NodeProto, args: List) -> np.ndarray:
    """``node`` applied to constant ``args`` with the op's exact ONNX semantics (axis ranges,
    Flatten's axis = rank, Reshape's 0 and -1); a Refusal for anything the spec does not allow."""
    x = args[0]
    op = node.op_type
    what = f"{op} '{node.name or node.output[0]}'"
    if op == "Identity":
        return x
    if op == "Cast":
        return x.astype(helper.tensor_dtype_to_np_dtype(int(attr(node, "to", 1))))
    if op == "Flatten":
        axis = int(attr(node, "axis", 1))
        if not -x.ndim <= axis <= x.ndim:
            raise Refusal("unsupported-attribute", f"{what}: axis {axis} is out of range for rank {x.ndim}")
        axis = axis + x.ndim if axis < 0 else axis
        return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))
    if op == "Reshape":
        if len(args) < 2 or args[1] is None:
            raise Refusal("not-constant", f"{what} has no shape input")
        target = int_list(args[1], f"the shape of {what}")
        if not attr(node, "allowzero", 0):
            if any(d == 0 and i >= x.ndim for i, d in enumerate(target)):
                raise Refusal("unsupported-attribute", f"{what}: a 0 in the shape has no input dimension to copy")
            target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
        if target.count(-1) > 1 or any(d < -1 for d in target):
            raise Refusal("unsupported-attribute", f"{what}: shape {target} is not a valid target")
        return x.reshape(target)
    axes = _axes(node, args, what)
    if op == "Unsqueeze":
        if axes is None:
            raise Refusal("unsupported-attribute", f"{what} has no axes")
        for a in sorted(normalized_axes(axes, x.ndim + len(axes), what)):
            x = np.expand_dims(x, a)
        return x
    # Squeeze
    if axes is None:
        return np.squeeze(x)
    axes = normalized_axes(axes, x.ndim, what)
    if any(x.shape[a] != 1 for a in axes):
        raise Refusal("unsupported-attribute", f"{what} squeezes an axis of size other than 1")
    return np.squeeze(x, axis=tuple(axes))


def _axes(node: NodeProto, args: List, what: str) -> Optional[List[int]]:
    if len(args) > 1 and args[1] is not None:
        return int_list(args[1], f"the axes of {what}")
    axes = attr(node, "axes", None)
    return None if axes is None else [int(a) for a in axes]

"""Mul, Add, Sub and Div with a constant operand, read as a per-channel affine map
``y = a * x + b``.

These ops absorb nothing themselves: each *is* an affine map, which the linear op next to it
absorbs (``LinearOp.after`` / ``LinearOp.before``) and a BN merges (``batchnorm.merge``).
:func:`per_channel` reads one on any channel axis, so the same reading serves a map after a
linear op (its output channels) and before one.

The constant must broadcast *per channel*: right-aligned against the data's rank, every axis
but the channel axis has size 1, and the constant adds no axes. A 1-D ``[C]`` constant on a
4-D conv output lands on the *last* axis, not the channels, and is refused.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from onnx import NodeProto

from ...affine import Refusal
from ..graph import node_label
from ..layout import Axis
from ..rewrite import GraphRewrite

ELEMENTWISE_OPS = {"Mul", "Add", "Sub", "Div"}


def is_elementwise(node: NodeProto) -> bool:
    """A default-domain Mul/Add/Sub/Div with its two operands."""
    return node.op_type in ELEMENTWISE_OPS and node.domain in ("", "ai.onnx") and len(node.input) == 2


def constant_operand(rw: GraphRewrite, node: NodeProto, data: str) -> Optional[Tuple[int, np.ndarray]]:
    """``(position, value)`` of the constant operand when ``node`` is ``data`` op constant;
    None when ``node`` is no such op (then it is no fold candidate at all)."""
    if not is_elementwise(node):
        return None
    if list(node.input).count(data) != 1:
        return None
    pos = 1 - list(node.input).index(data)
    try:
        return pos, rw.constant(node.input[pos], f"{node.op_type} operand")
    except Refusal:
        return None


def per_channel(node: NodeProto, pos: int, value: np.ndarray, axis: Axis, channels: int) -> Tuple[np.ndarray, np.ndarray]:
    """``(a, b)`` in float64, one entry per channel, with ``node(x) == a * x + b``.

    Refuses a constant that is not per channel on ``axis``, that would raise the data's rank,
    a divisor with a zero, and a constant first operand of Div.
    """
    label = f"{node.op_type} '{node_label(node)}'"
    if value.dtype.kind != "f" and "bfloat16" not in str(value.dtype):
        raise Refusal("unsupported-dtype", f"the constant of {label} has type {value.dtype}")
    v = _channel_vector(label, np.asarray(value, dtype=np.float64), axis, channels)
    if not np.all(np.isfinite(v)):
        raise Refusal("non-finite-parameter", f"the constant of {label} contains NaN or infinity")
    ones, zeros = np.ones(channels), np.zeros(channels)
    op = node.op_type
    if op == "Mul":
        return v, zeros
    if op == "Add":
        return ones, v
    if op == "Sub":
        return (ones, -v) if pos == 1 else (-ones, v)  # x - c, or c - x
    if pos == 0:
        raise Refusal("not-affine", f"{label} divides a constant by the data: not an affine map")
    if np.any(v == 0):
        raise Refusal("division-by-zero", f"the divisor of {label} contains zero")
    return 1.0 / v, zeros


def _channel_vector(label: str, c: np.ndarray, axis: Axis, channels: int) -> np.ndarray:
    """The constant as one value per channel, after checking it broadcasts per channel."""
    limit = axis.rank if axis.rank is not None else axis.min_rank
    if c.ndim > limit:
        reason = "not-per-channel" if axis.rank is not None else "shape-unknown"
        raise Refusal(reason, f"the constant of {label} has shape {list(c.shape)}: it would raise the data's rank")
    if c.size == 1:
        return np.full(channels, float(c.reshape(())))
    neg = axis.neg
    if neg is None:
        raise Refusal("shape-unknown", f"the rank of the data of {label} is unknown")
    for k in range(1, c.ndim + 1):
        dim = c.shape[-k]
        if -k == neg:
            if dim not in (1, channels):
                raise Refusal("channel-mismatch", f"the constant of {label} has {dim} channels, the op has {channels}")
        elif dim != 1:
            where = f"axis {axis.pos}" if axis.pos is not None else f"axis {neg}"
            raise Refusal(
                "not-per-channel",
                f"the constant of {label} has shape {list(c.shape)}: right-aligned against the data it "
                f"varies along an axis other than the channel axis ({where})",
            )
    # every axis but the channel axis has size 1 and the constant is not a scalar: the
    # channel axis is among its axes, with one entry per channel
    return c.reshape(-1).copy()

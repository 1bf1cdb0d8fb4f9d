"""What each op knows about itself, one module per op, each covering both directions: how it
absorbs a per-channel affine map after it and before it, or why it cannot.

:data:`LINEAR` maps the linear ops' types to their classes (:class:`base.LinearOp`). To add a
linear op: write ``ops/<op>.py`` with a ``LinearOp`` subclass (``read_weight``,
``output_axis``, ``after``, ``before``), add one row here, and add tests.
"""

from __future__ import annotations

from typing import Dict, Type

from onnx import NodeProto

from .base import LinearOp
from .conv import Conv
from .gemm import Gemm
from .matmul import MatMul

LINEAR: Dict[str, Type[LinearOp]] = {
    "Conv": Conv,
    "ConvTranspose": Conv,
    "Gemm": Gemm,
    "MatMul": MatMul,
}


def is_linear(node: NodeProto) -> bool:
    return node.op_type in LINEAR and node.domain in ("", "ai.onnx") and bool(node.output)


def linear_op(rw, node: NodeProto) -> LinearOp:
    """The :class:`LinearOp` for ``node`` (its weight is read on first use)."""
    return LINEAR[node.op_type](rw, node)

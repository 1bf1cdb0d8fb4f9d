"""What every linear op module provides: :class:`LinearOp`, read from one node, reading its
weight once, and able to absorb a per-channel affine map on either side of it.

- ``after(a, b)`` plans ``a * op(x) + b`` (a map on the op's *output* channels) and
  ``before(a, b)`` plans ``op(a * x + b)`` (on its *input* channels). Both do every check and
  compute and cast back every new value first, and return an :data:`Edit` that only writes
  them; an op that cannot absorb a map on one side raises :class:`Refusal` saying why.
- ``output_axis()`` and ``input_axis()`` say where the output / input channels are, and how
  many there are.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import numpy as np
from onnx import NodeProto

from ...affine import Refusal
from ..layout import Axis
from ..rewrite import GraphRewrite

Edit = Callable[[], Optional[NodeProto]]  # writes a planned fold; an after-edit returns the head node

class LinearOp:
    """One Conv, ConvTranspose, Gemm or MatMul node; subclasses fill in the weight layout."""

    def __init__(self, rw: GraphRewrite, node: NodeProto) -> None:
        self.rw = rw
        self.node = node
        self._weight: Optional[np.ndarray] = None

    @property
    def kind(self) -> str:
        """The prefix of rule names: conv, convtranspose, gemm, matmul."""
        return self.node.op_type.lower()

    @property
    def weight(self) -> np.ndarray:
        """The constant weight, read (and checked) on first use only."""
        if self._weight is None:
            self._weight = self.read_weight()
        return self._weight

    @property
    def dtype(self):
        return self.weight.dtype

    @property
    def base(self) -> str:
        """The stem of the names of the op's new initializers."""
        return self.node.name or self.node.input[1]

    def read_weight(self) -> np.ndarray:
        raise NotImplementedError

    def output_axis(self) -> Tuple[Axis, int]:
        raise NotImplementedError

    def input_axis(self) -> Tuple[Axis, int]:
        raise NotImplementedError

    def after(self, a: np.ndarray, b: np.ndarray) -> Edit:
        raise NotImplementedError

    def before(self, a: np.ndarray, b: np.ndarray) -> Edit:
        raise NotImplementedError


def float_constant(rw: GraphRewrite, name: str, what: str) -> np.ndarray:
    """The constant behind ``name``; refuse one whose element type bnfold does not fold."""
    return rw.constant(name, what, float_only=True)


def constant_2d(rw: GraphRewrite, name: str, what: str) -> np.ndarray:
    """The 2-D float constant behind ``name``; refuse anything else."""
    weight = float_constant(rw, name, what)
    if weight.ndim != 2:
        raise Refusal("not-per-channel", f"{what} has rank {weight.ndim}, expected 2")
    return weight


def combine_bias(c64: Optional[np.ndarray], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``c * a + b`` for a bias ``c`` broadcasting against ``[M, N]`` (features on the last
    axis); refuse one that does not broadcast per feature. ``c`` None reads as zero."""
    if c64 is None:
        return b.copy()
    if c64.ndim > 2 or (c64.ndim >= 1 and c64.shape[-1] not in (1, a.shape[0])):
        raise Refusal("not-per-channel", f"bias of shape {list(c64.shape)} does not broadcast per feature")
    if c64.ndim == 2:
        return c64 * a[None, :] + b[None, :]
    return c64 * a + b


def optional_input(node: NodeProto, position: int) -> str:
    """The name of input ``position``, or '' when absent."""
    return node.input[position] if len(node.input) > position else ""

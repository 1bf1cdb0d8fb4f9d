"""MatMul with a constant 2-D weight ``[K, N]``: features on the last axis of its output, which
keeps its input's rank (possibly unknown: the features are still the last axis, which is all a
right-aligned constant needs). A MatMul has no bias of its own, so a folded shift goes into an
Add after it -- or, when the input is known to be 2-D, the MatMul and its bias become one Gemm
(``matmul-gemm``; onnxruntime does the same).

After: ``a * (x W) + b`` scales the weight's columns; ``b`` (when not zero) becomes the Gemm's C,
or an Add.
Before: ``(a * x + b) W`` scales its rows; ``b W`` joins the constant bias of an Add that is
the MatMul's sole reader, or becomes the C of a Gemm (input known 2-D) or a new Add. The caller checks that the input is 2-D (a
BN's channels are axis 1, the features MatMul reads are the last axis).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from onnx import NodeProto, helper

from ...affine import Refusal, cast_back, fold_after, fold_before
from ..layout import Axis
from ..rewrite import GraphRewrite
from .base import Edit, LinearOp, combine_bias, constant_2d
from .elementwise import constant_operand


class MatMul(LinearOp):
    def read_weight(self) -> np.ndarray:
        if len(self.node.input) != 2:
            raise Refusal("not-constant", "MatMul without two inputs")
        return constant_2d(self.rw, self.node.input[1], "MatMul weight")

    def output_axis(self) -> Tuple[Axis, int]:
        """Features on the last axis; the rank is the input's (a 2-D weight keeps it)."""
        weight = self.weight
        rank = self.rw.rank(self.node.input[0])
        axis = Axis.known(rank, rank - 1) if rank else Axis(None, None, -1, 1)
        return axis, int(weight.shape[1])

    def input_axis(self) -> Tuple[Axis, int]:
        """The features it reads: the last axis of its input, whatever the rank."""
        axis, _ = self.output_axis()
        return axis, int(self.weight.shape[0])

    def writes_gemm(self, b: np.ndarray) -> bool:
        """Whether absorbing a map with shift ``b`` writes a Gemm: there is a bias to hold, the
        input is known to be 2-D, and the opset has a Gemm for this dtype."""
        if not np.any(b != 0) or self.rw.rank(self.node.input[0]) != 2 or self.rw.opset < 7:
            return False
        return self.dtype in (np.float16, np.float32, np.float64) or self.rw.opset >= 13

    def needs_new_add(self, b: np.ndarray) -> bool:
        """Whether absorbing a map with shift ``b`` before it needs a new Add after it."""
        return bool(np.any(b != 0)) and _bias_add(self.rw, self.node) is None and not self.writes_gemm(b)

    def after(self, a: np.ndarray, b: np.ndarray) -> Edit:
        w64, c64 = fold_after(self.weight, None, a, b, axis=1)
        new_w = None if np.all(a == 1) else cast_back(w64, self.dtype, "weight")  # a bias alone keeps W
        new_c = cast_back(c64, self.dtype, "bias") if np.any(c64 != 0) else None
        gemm = self.writes_gemm(b)
        rw, matmul, base = self.rw, self.node, self.base

        def edit():
            w = matmul.input[1] if new_w is None else rw.add_initializer(f"{base}_bnfold_W", new_w)
            if gemm:
                return self._replace_by_gemm(w, new_c)
            if new_w is not None:
                rw.set_input(matmul, 1, w)
            if new_c is None:
                return matmul
            return rw.add_after(matmul, rw.add_initializer(f"{base}_bnfold_bias", new_c), base)

        return edit

    def before(self, a: np.ndarray, b: np.ndarray) -> Edit:
        w64, shift = fold_before(self.weight, None, a, b, in_axis=0)
        new_w = cast_back(w64, self.dtype, "weight")
        bias_add = _bias_add(self.rw, self.node)
        if bias_add is not None:  # MatMul -> Add(bias): the shift joins that bias
            add, pos, value = bias_add
            new_bias = cast_back(combine_bias(value.astype(np.float64), np.ones_like(shift), shift), self.dtype, "bias")
        else:
            new_bias = cast_back(shift, self.dtype, "bias")
        gemm = bias_add is None and self.writes_gemm(shift)  # (with an Add, it is a Gemm already)
        rw, matmul, base = self.rw, self.node, self.base

        def edit():
            w = rw.add_initializer(f"{base}_bnfold_W", new_w)
            if gemm:
                self._replace_by_gemm(w, new_bias)
                return
            rw.set_input(matmul, 1, w)
            if bias_add is not None and np.any(shift != 0):
                old = add.input[pos]
                rw.set_input(add, pos, rw.add_initializer(f"{base}_bnfold_bias", new_bias))
                rw.drop_dead_constant(old)
            elif np.any(shift != 0):
                rw.add_after(matmul, rw.add_initializer(f"{base}_bnfold_bias", new_bias), base)

        return edit

    def _replace_by_gemm(self, w: str, c: np.ndarray) -> NodeProto:
        """Edit: a Gemm(x, w, c) takes the MatMul's place and output names."""
        rw, matmul = self.rw, self.node
        bias = rw.add_initializer(f"{self.base}_bnfold_bias", c)
        node = helper.make_node("Gemm", [matmul.input[0], w, bias], list(matmul.output), name=matmul.name)
        if w != matmul.input[1]:
            rw.orphan([matmul.input[1]])
        rw.replace_node(matmul, node)
        return node


def _bias_add(rw: GraphRewrite, matmul: NodeProto) -> Optional[Tuple[NodeProto, int, np.ndarray]]:
    """``(Add, position, value)`` when the MatMul's sole reader adds a float constant to it."""
    out = matmul.output[0]
    users = rw.consumers(out)
    if len(users) != 1 or rw.is_graph_output(out):
        return None
    operand = constant_operand(rw, users[0], out)
    if users[0].op_type != "Add" or operand is None or operand[1].dtype.kind != "f":
        return None
    return users[0], operand[0], operand[1]

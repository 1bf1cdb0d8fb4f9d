"""Rule: BN before a linear op. ``W (a * x + b) + c`` is ``(W * a) x + (c + W b)``: the weights
are scaled per *input* channel and ``W b`` joins the bias (:func:`bnfold.affine.fold_before`).

Pattern: every reader of the BN's output is a Conv, Gemm or MatMul reading it as its data
input, or a Flatten(axis=1) whose readers all are Gemm or MatMul. Check: a Conv adds no
padding (padding zeros are not shifted by ``b``, so the fold would be wrong at the borders);
a MatMul's input is 2-D and a Gemm's is not transposed (the BN's channels must be the
features the op reads); a Flatten's input has known spatial dims (each channel becomes a
contiguous block of features). Rewrite: the readers read the BN's input; the BN goes.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import numpy as np
from onnx import NodeProto

from ..affine import Refusal, cast_back, fold_before
from .affine_ops import constant_operand
from .bn import read_bn
from .consts import drop_dead_subgraph
from .gemm import gemm_weight, matmul_weight
from .graph import attr, float_dtype, node_label, set_attr
from .rewrite import GraphRewrite

CONSUMERS = {"Conv", "Gemm", "MatMul", "Flatten", "ConvTranspose"}

Plan = Tuple[str, Callable[[], None]]  # (kind for the rule name, the edit)


def fold_bn_before(rw: GraphRewrite, bn: NodeProto) -> Tuple[str, List[NodeProto]]:
    """Fold ``bn`` into the linear ops reading it; return the rule name and those readers."""
    y = bn.output[0]
    users = list(rw.index.consumers.get(y, []))
    if not any(u.op_type in CONSUMERS and u.domain in ("", "ai.onnx") for u in users):
        raise Refusal("no-linear-consumer", "no Conv, Gemm, MatMul or Flatten reads the BN's output")
    if y in rw.index.outputs:
        raise Refusal("bn-output-is-graph-output", f"'{y}' is a graph output")
    affine = read_bn(bn, rw.scope)
    rank = rw.rank(bn.input[0]) or rw.rank(y)
    plans = [_plan(rw, u, y, affine.a, affine.b, rank) for u in users]  # all checks first
    for _, edit in plans:
        edit()
    for u in users:
        rw.index.replace_input(u, y, bn.input[0])
    rw.drop_node(bn)
    rw.orphans.extend(n for n in bn.input[1:] if n)
    rw.gone_values.add(y)
    kinds = sorted({kind for kind, _ in plans})
    return "bn-" + ("+".join(kinds)), users


def _plan(rw: GraphRewrite, node: NodeProto, y: str, a, b, rank: Optional[int]) -> Plan:
    label = f"{node.op_type} '{node_label(node)}'"
    if node.domain not in ("", "ai.onnx") or node.op_type not in CONSUMERS or node.op_type == "ConvTranspose":
        raise Refusal("consumer-cannot-absorb", f"{label} also reads the BN's output")
    if list(node.input).count(y) != 1 or node.input[0] != y:
        raise Refusal("consumer-cannot-absorb", f"{label} reads the BN's output as a parameter")
    if node.op_type == "Conv":
        return "conv", _conv_plan(rw, node, a, b)
    if node.op_type == "Gemm":
        return "gemm", _gemm_plan(rw, node, a, b)
    if node.op_type == "MatMul":
        if rank is None:
            raise Refusal("shape-unknown", f"the rank of the BN's input is unknown; {label} needs it 2-D")
        if rank != 2:
            raise Refusal(
                "not-per-channel",
                f"the BN's input is {rank}-D: the BN normalizes axis 1, {label} reads the last axis",
            )
        return "matmul", _matmul_plan(rw, node, a, b)
    return _flatten_plan(rw, node, y, a, b)


def _conv_plan(rw: GraphRewrite, conv: NodeProto, a, b) -> Callable[[], None]:
    if len(conv.input) < 2 or not conv.input[1]:
        raise Refusal("not-constant", "the conv has no weight input")
    dtype = float_dtype(rw.scope.tensor(conv.input[1], "conv weight"), "conv weight")
    weight = rw.scope.array(conv.input[1], "conv weight")
    if weight.ndim < 3:
        raise Refusal("not-per-channel", f"conv weight has rank {weight.ndim}")
    _check_no_padding(conv, weight)
    has_bias = len(conv.input) > 2 and bool(conv.input[2])
    bias = rw.scope.array(conv.input[2], "conv bias") if has_bias else None
    w64, c64 = fold_before(weight, bias, a, b, in_axis=1, groups=int(attr(conv, "group", 1)))
    new_w, new_c = cast_back(w64, dtype, "weight"), cast_back(c64, dtype, "bias")
    base = conv.name or conv.input[1]

    def edit() -> None:
        rw.set_input(conv, 1, rw.add_initializer(f"{base}_bnfold_W", new_w))
        rw.set_input(conv, 2, rw.add_initializer(f"{base}_bnfold_B", new_c))

    return edit


def _check_no_padding(conv: NodeProto, weight: np.ndarray) -> None:
    """Refuse a conv that reads padding: it pads the BN's *input* with zeros, where the
    original read ``b`` (the BN of a zero is ``b``, not zero)."""
    auto_pad = attr(conv, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        dilations = attr(conv, "dilations", None) or [1] * (weight.ndim - 2)
        if any((k - 1) * d for k, d in zip(weight.shape[2:], dilations)):
            raise Refusal("padded-conv", f"auto_pad={auto_pad} pads the input of conv '{node_label(conv)}'")
        return
    if auto_pad == "VALID":
        return
    pads = attr(conv, "pads", None)
    if pads and any(int(p) for p in pads):
        raise Refusal("padded-conv", f"conv '{node_label(conv)}' pads its input ({list(pads)})")


def _gemm_plan(rw: GraphRewrite, gemm: NodeProto, a, b) -> Callable[[], None]:
    if attr(gemm, "transA", 0):
        raise Refusal("unsupported-attribute", f"Gemm '{node_label(gemm)}' reads the BN's output transposed")
    dtype = float_dtype(rw.scope.tensor(gemm.input[1], "Gemm B"), "Gemm B")
    weight = gemm_weight(rw, gemm)
    alpha, beta = float(attr(gemm, "alpha", 1.0)), float(attr(gemm, "beta", 1.0))
    in_axis = 1 if attr(gemm, "transB", 0) else 0
    w64, shift = fold_before(weight.astype(np.float64) * alpha, None, a, b, in_axis=in_axis)
    has_c = len(gemm.input) > 2 and bool(gemm.input[2])
    c64 = _add_shift(rw.scope.array(gemm.input[2], "Gemm C").astype(np.float64) * beta if has_c else None, shift)
    new_w, new_c = cast_back(w64, dtype, "weight"), cast_back(c64, dtype, "bias")
    base = gemm.name or gemm.input[1]

    def edit() -> None:
        rw.set_input(gemm, 1, rw.add_initializer(f"{base}_bnfold_B", new_w))
        rw.set_input(gemm, 2, rw.add_initializer(f"{base}_bnfold_C", new_c))
        set_attr(gemm, "alpha", 1.0)
        set_attr(gemm, "beta", 1.0)

    return edit


def _add_shift(c64: Optional[np.ndarray], shift: np.ndarray) -> np.ndarray:
    """``c + shift`` for a bias broadcasting against ``[M, N]``; refuse one that does not."""
    if c64 is None:
        return shift
    if c64.ndim > 2 or (c64.ndim >= 1 and c64.shape[-1] not in (1, shift.shape[0])):
        raise Refusal("not-per-channel", f"bias of shape {list(c64.shape)} does not broadcast per feature")
    return c64 + (shift[None, :] if c64.ndim == 2 else shift)


def _matmul_plan(rw: GraphRewrite, matmul: NodeProto, a, b) -> Callable[[], None]:
    dtype = float_dtype(rw.scope.tensor(matmul.input[1], "MatMul weight"), "MatMul weight")
    weight = matmul_weight(rw, matmul)
    w64, shift = fold_before(weight, None, a, b, in_axis=0)
    new_w = cast_back(w64, dtype, "weight")
    base = matmul.name or matmul.input[1]
    bias_add = _bias_add(rw, matmul)
    if bias_add is not None:  # MatMul -> Add(bias): the shift joins that bias
        add, pos, value = bias_add
        new_bias = cast_back(_add_shift(value.astype(np.float64), shift), dtype, "bias")
    else:
        new_bias = cast_back(shift, dtype, "bias")

    def edit() -> None:
        rw.set_input(matmul, 1, rw.add_initializer(f"{base}_bnfold_W", new_w))
        if bias_add is not None:
            old = add.input[pos]
            rw.set_input(add, pos, rw.add_initializer(f"{base}_bnfold_bias", new_bias))
            drop_dead_subgraph(rw, old)
        elif np.any(shift != 0):
            rw.add_after(matmul, rw.add_initializer(f"{base}_bnfold_bias", new_bias), base)

    return edit


def _bias_add(rw: GraphRewrite, matmul: NodeProto):
    """``(Add, position, value)`` when the MatMul's sole reader adds a float constant to it."""
    out = matmul.output[0]
    users = rw.index.consumers.get(out, [])
    if len(users) != 1 or out in rw.index.outputs:
        return None
    operand = constant_operand(rw, users[0], out)
    if users[0].op_type != "Add" or operand is None or operand[1].dtype.kind != "f":
        return None
    return users[0], operand[0], operand[1]


def _flatten_plan(rw: GraphRewrite, flatten: NodeProto, y: str, a, b) -> Plan:
    """BN2d -> Flatten(axis=1) -> Gemm/MatMul: channel ``c`` becomes features ``c*HW .. c*HW+HW-1``."""
    label = f"Flatten '{node_label(flatten)}'"
    if int(attr(flatten, "axis", 1)) != 1:
        raise Refusal("not-per-channel", f"{label} does not flatten from axis 1")
    shape = rw.shape(y) or rw.shape(flatten.input[0])
    if shape is None or len(shape) < 2 or any(d is None for d in shape[2:]):
        raise Refusal("shape-unknown", f"the spatial size before {label} is unknown")
    block = int(np.prod(shape[2:], dtype=np.int64)) if len(shape) > 2 else 1
    out = flatten.output[0]
    users = rw.index.consumers.get(out, [])
    if out in rw.index.outputs or not users:
        raise Refusal("consumer-cannot-absorb", f"the output of {label} is used as it is")
    a_f, b_f = np.repeat(a, block), np.repeat(b, block)
    plans = []
    for u in users:
        if u.op_type not in ("Gemm", "MatMul") or u.domain not in ("", "ai.onnx") or list(u.input).count(out) != 1 or u.input[0] != out:
            raise Refusal("consumer-cannot-absorb", f"{u.op_type} '{node_label(u)}' reads the output of {label}")
        plans.append(_gemm_plan(rw, u, a_f, b_f) if u.op_type == "Gemm" else _matmul_plan(rw, u, a_f, b_f))
    kinds = sorted({u.op_type.lower() for u in users})

    def edit() -> None:
        for p in plans:
            p()

    return "flatten-" + "+".join(kinds), edit

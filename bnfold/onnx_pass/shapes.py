"""Ranks and shapes of values, found by onnx shape inference on a copy of the model without tensor data.

Only rules that need a rank (MatMul: is its input 2-D?) ask, so models without such
patterns never pay for inference. The copy keeps small integer initializers (Reshape
targets and the like) and turns the others into typed graph inputs, so inference is cheap
even for multi-GB models.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import onnx
from onnx import ModelProto, TensorProto, helper

from .graph import all_graphs

_SMALL_INT = (TensorProto.INT64, TensorProto.INT32)


def _skeleton(model: ModelProto) -> ModelProto:
    """A copy of ``model`` whose main-graph initializers carry shape but no data."""
    from ..onnx_io import shallow_copy

    out = shallow_copy(model, "graph")
    g = out.graph
    g.CopyFrom(shallow_copy(model.graph, "initializer"))
    inputs = {i.name for i in g.input}
    for t in model.graph.initializer:
        small = t.data_type in _SMALL_INT and len(t.dims) <= 1 and (not t.dims or t.dims[0] <= 16)
        if small:
            g.initializer.append(t)
        elif t.name not in inputs:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    if out.ir_version < 4:
        out.ir_version = 4  # inputs beside initializers are legal from IR 4 on
    return out


Shape = Tuple[Optional[int], ...]  # a dimension is None when not a known number


def infer_shapes(model: ModelProto) -> Dict[str, Shape]:
    """Map every value name whose rank inference (or the model) knows to its shape."""
    try:
        inferred = onnx.shape_inference.infer_shapes(_skeleton(model), strict_mode=False, data_prop=True)
    except Exception:  # inference is a help, never a requirement
        inferred = model
    shapes: Dict[str, Shape] = {}
    for g in all_graphs(inferred.graph):
        for v in list(g.input) + list(g.output) + list(g.value_info):
            shape = _shape(v)
            if shape is not None:
                shapes[v.name] = shape
        for t in g.initializer:
            shapes[t.name] = tuple(int(d) for d in t.dims)
    return shapes


def infer_ranks(model: ModelProto) -> Dict[str, int]:
    """Map every value name whose rank inference (or the model) knows to that rank."""
    return {name: len(shape) for name, shape in infer_shapes(model).items()}


def _shape(value_info) -> Optional[Shape]:
    t = value_info.type
    if t.HasField("tensor_type") and t.tensor_type.HasField("shape"):
        return tuple(int(d.dim_value) if d.HasField("dim_value") else None for d in t.tensor_type.shape.dim)
    return None

"""Ranks and shapes of values, found by onnx shape inference on a copy of the model without tensor data.

Only rules that need a rank (MatMul: is its input 2-D?) ask, so models without such
patterns never pay for inference. The copy keeps small integer initializers (Reshape
targets and the like) and turns the others into typed graph inputs, so inference is cheap
even for multi-GB models.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import onnx
from onnx import ModelProto, helper

from .graph import all_graphs

# Initializers up to this size keep their data in the copy (shape inference may need the values
# of small ones: Reshape targets, Unsqueeze axes); larger ones become typed graph inputs.
KEEP_ELEMENTS = 1024


def _skeleton(model: ModelProto) -> ModelProto:
    """A copy of ``model`` whose large main-graph initializers carry shape but no data."""
    from ..onnx_io import shallow_copy
    from ..onnx_wire import is_stub

    out = shallow_copy(model, "graph")
    g = out.graph
    g.CopyFrom(shallow_copy(model.graph, "initializer"))
    inputs = {i.name for i in g.input}
    small, large = [], []
    for t in model.graph.initializer:
        # an initializer that a graph input can override (IR >= 4) is no constant: its default
        # value must not prove a shape, so inference sees only the input
        overridable = t.name in inputs and model.ir_version >= 4
        (large if is_stub(t) or overridable or math.prod(t.dims) > KEEP_ELEMENTS else small).append(t)
    g.initializer.extend(small)
    g.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in large if t.name not in inputs
    )
    if out.ir_version < 4:
        out.ir_version = 4  # inputs beside initializers are legal from IR 4 on
    _forget_minus_one_dims(out)
    return out


def _forget_minus_one_dims(model: ModelProto) -> None:
    """Dims written -1 become unknown dims, so inference never reasons with a -1 (the copy only)."""
    for g in all_graphs(model.graph):
        for field in (g.input, g.output, g.value_info):
            for v in field:
                if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
                    for d in v.type.tensor_type.shape.dim:
                        if d.HasField("dim_value") and d.dim_value < 0:
                            d.ClearField("dim_value")


Shape = Tuple[Optional[int], ...]  # a dimension is None when not a known number


class ShapeTable:
    """Shapes by value name, read from the inferred model's value infos on first request."""

    def __init__(self, inferred: ModelProto) -> None:
        self._model = inferred  # keeps the value infos alive
        self._infos: Dict[str, list] = {}
        self._cache: Dict[str, Optional[Shape]] = {}
        for g in all_graphs(inferred.graph):
            for field in (g.input, g.output, g.value_info):
                for v in field:
                    self._infos.setdefault(v.name, []).append(v)
            for t in g.initializer:
                self._infos.setdefault(t.name, []).append(tuple(int(d) for d in t.dims))

    def get(self, name: str, default=None) -> Optional[Shape]:
        if name not in self._cache:
            self._cache[name] = self._agreed_shape(self._infos.get(name, []))
        shape = self._cache[name]
        return default if shape is None else shape

    @staticmethod
    def _agreed_shape(infos: list) -> Optional[Shape]:
        """One shape for a name, or None when unknown. Sibling subgraphs (If branches) may
        each define a value of the same name; if their shapes differ, none is trusted."""
        shapes = {info if isinstance(info, tuple) else _shape(info) for info in infos}
        return shapes.pop() if len(shapes) == 1 else None

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None


def snapshot(model: ModelProto) -> ModelProto:
    """A data-free copy of ``model`` as it is now, for :func:`infer_from` to use later (the
    rules rename values as they rewrite, so inference must see the graph before any rewrite)."""
    return _skeleton(model)


def infer_from(skeleton: ModelProto) -> ShapeTable:
    """The shapes that onnx shape inference (or the model itself) knows, by value name."""
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
    except Exception:  # inference is a help, never a requirement
        inferred = skeleton
    return ShapeTable(inferred)





def _shape(value_info) -> Optional[Shape]:
    t = value_info.type
    if t.HasField("tensor_type") and t.tensor_type.HasField("shape"):
        # a dim written -1 is read as unknown, as runtimes and exporters (paddle2onnx) mean it
        return tuple(int(d.dim_value) if d.HasField("dim_value") and d.dim_value >= 0 else None
                     for d in t.tensor_type.shape.dim)
    return None

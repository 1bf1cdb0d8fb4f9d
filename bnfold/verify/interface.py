"""A model's interface as the check sees it: its inputs (the ones a caller must feed and the
ones with an initializer default) and outputs, read from a path or a ModelProto."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple, Union

import numpy as np

from ..errors import InputError

ModelLike = Union[str, "os.PathLike[str]", Any]  # a path or an onnx.ModelProto
Shape = Tuple[int, ...]



@dataclass
class TensorSpec:
    """A graph input or output: name, ONNX element type, and dims (int, symbol str, or None)."""

    name: str
    elem_type: int
    dims: Optional[List[Union[int, str, None]]]  # None: no shape information at all

    @property
    def dtype_name(self) -> str:
        return elem_type_name(self.elem_type)


@dataclass
class Interface:
    inputs: List[TensorSpec]  # inputs the caller must feed (initializer-backed ones left out)
    optional_inputs: List[str]  # inputs with an initializer default
    outputs: List[TensorSpec]
    label: str
    # Initializers a graph input of the same name can override (IR >= 4), with the
    # initializer's dtype and shape: the check feeds them like inputs in later batches.
    overridable: List[TensorSpec] = field(default_factory=list)
    zero_dims: bool = False  # an input dim written as 0 (unknown): onnxruntime needs it cleared
    proto: Any = field(default=None, repr=False)  # the ModelProto read (without external data)


def elem_type_name(elem_type: int) -> str:
    """numpy-style dtype names (float32, bfloat16, int64, bool, string, ...)."""
    import onnx

    if elem_type == onnx.TensorProto.STRING:
        return "string"
    try:
        return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)))
    except Exception:  # an element type numpy cannot hold
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def model_label(model: ModelLike) -> str:
    """How a model is named in messages and reports: its path, or '<ModelProto graph-name>'."""
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    graph = getattr(model, "graph", None)
    return f"<ModelProto {graph.name}>" if graph is not None and graph.name else "<ModelProto>"


def check_path(path: str) -> None:
    from ..onnx_io import check_readable  # one wording for every command

    check_readable(path)


def load_proto(model: ModelLike):
    """The ModelProto without external data (only the interface is needed). Raises InputError."""
    import onnx

    if not isinstance(model, (str, os.PathLike)):
        if isinstance(model, onnx.ModelProto):
            return model
        raise InputError(f"expected a path or an onnx.ModelProto, got {type(model).__name__}")
    from ..onnx_io import read_model  # the fold's own parser: same checks, same messages

    return read_model(os.fspath(model), load_external=False)[0]


def load_graph(model: ModelLike):
    """Like :func:`load_proto`, for reading the graph only: a large file's big weights stay on
    disk as lazy stubs (:func:`bnfold.onnx_wire.read_lazy`; read them with
    :func:`bnfold.onnx_io.tensor_array`), so the check does not parse 100 MB it never looks at."""
    if isinstance(model, (str, os.PathLike)):
        from ..onnx_io import LAZY_FILE_MIN_BYTES, _check_is_model
        from ..onnx_wire import read_lazy

        path = os.fspath(model)
        check_path(path)
        if os.path.getsize(path) >= LAZY_FILE_MIN_BYTES:
            try:
                proto = read_lazy(path)[0]
                _check_is_model(proto, path)
                return proto
            except Exception:  # malformed: the full parser words the error
                pass
    return load_proto(model)


def read_interface(model: ModelLike) -> Interface:
    proto = load_graph(model)
    graph = proto.graph
    init_names = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    inputs, optional = [], []
    for vi in graph.input:
        if vi.name in init_names:
            optional.append(vi.name)
        else:
            inputs.append(_spec(vi, model_label(model)))
    outputs = [_spec(vi, model_label(model), strict=False) for vi in graph.output]
    overridable = []
    if proto.ir_version >= 4:  # below IR 4 every initializer is listed as an input: weights, not an interface
        inits = {t.name: t for t in graph.initializer}
        overridable = [TensorSpec(n, inits[n].data_type, [int(d) for d in inits[n].dims]) for n in optional if n in inits]
    zero = any(d.HasField("dim_value") and d.dim_value == 0 for vi in graph.input if vi.name not in init_names
               for d in vi.type.tensor_type.shape.dim)
    return Interface(inputs, optional, outputs, model_label(model), overridable=overridable, zero_dims=zero, proto=proto)


def _spec(vi, label: str, strict: bool = True) -> TensorSpec:
    kind = vi.type.WhichOneof("value")
    if kind != "tensor_type":
        if strict:
            raise InputError(f"{label}: input '{vi.name}' is a {kind or 'untyped value'}, not a tensor; bnfold check supports tensor inputs only")
        return TensorSpec(vi.name, 0, None)
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return TensorSpec(vi.name, tt.elem_type, None)
    dims: List[Union[int, str, None]] = []
    # An input dim written as -1, or as 0, is how several exporters say "unknown": dynamic.
    for d in tt.shape.dim:
        if d.HasField("dim_value") and (d.dim_value not in (-1, 0) or not strict):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return TensorSpec(vi.name, tt.elem_type, dims)



def dims_text(dims) -> str:
    return "x".join("?" if d is None else str(d) for d in dims) or "scalar"


def is_float_dtype(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype.name == "bfloat16" or dtype.name.startswith("float8")


def one_line(text: str, limit: int = 400) -> str:
    """ORT messages span lines and carry C++ file positions; keep one readable line."""
    text = re.sub(r"\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*", "", text)
    # C++ positions and signatures: "reshape_helper.h:91 onnxruntime::ReshapeHelper::ReshapeHelper(...) "
    text = re.sub(r"\S+\.(?:h|cc|cpp|hpp):\d+\s+(?:[\w:~<>]+\([^()]*(?:\([^()]*\)[^()]*)*\)\s*)?", "", text)
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


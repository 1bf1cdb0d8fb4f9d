"""ONNX's protobuf messages and the few helpers bnfold needs from onnx, without ``import onnx``.

``import onnx`` costs 0.5-3 s (most of it loading ml_dtypes' extension), more than a whole fold
of a small model. The messages here are ONNX's own schema (``onnx/onnx-ml.proto``) generated
under the proto package ``bnfold.onnx`` by ``tools/gen_onnx_proto.py``: same field numbers and
types, so the bytes are the same both ways (a model read with these classes and written again is
byte for byte what onnx writes), and both families live side by side in one program.

Messages of the two families do not mix inside one tree (appending an ``onnx.NodeProto`` to a
``bnfold.onnx.GraphProto`` raises TypeError); :func:`convert` moves a message across through its
bytes. The helpers mirror onnx's (``onnx.helper.make_node``, ``numpy_helper.from_array``, ...) for
the dtypes and attribute kinds bnfold folds and build messages of this family; anything rarer
(bfloat16, float8, 4-bit, strings) is handed to onnx, imported only then.

Which family the file readers build is :data:`USE_ONNX_CLASSES` (see :func:`message_classes`).
"""

from __future__ import annotations

import numbers
import sys
from typing import Any, Dict, Optional, Sequence

import numpy as np

from ._onnx_ml_pb2 import (  # noqa: F401  (re-exported)
    AttributeProto,
    FunctionProto,
    GraphProto,
    ModelProto,
    NodeProto,
    OperatorSetIdProto,
    SparseTensorProto,
    StringStringEntryProto,
    TensorProto,
    TensorShapeProto,
    TrainingInfoProto,
    TypeProto,
    ValueInfoProto,
)

PACKAGE = "bnfold.onnx"  # the proto package of these messages (onnx's is "onnx")

# The fold path reads models into onnx's classes while any module on it still builds messages
# with onnx.helper / numpy_helper (the two families cannot be mixed in one model). Set to False
# once every module on the path (bnfold.onnx_pass) builds them with this module: the file
# readers then return this family and `bnfold MODEL -o OUT --no-check` never imports onnx
# (tests/test_startup_imports.py then checks that).
USE_ONNX_CLASSES = True


def message_classes():
    """The module whose ``ModelProto``, ``TensorProto``, ... the file readers build:
    ``onnx`` while :data:`USE_ONNX_CLASSES`, else this one."""
    if USE_ONNX_CLASSES:
        import onnx

        return onnx
    return sys.modules[__name__]


def is_bnfold_message(msg) -> bool:
    """Whether ``msg`` is a message of this family (not onnx's)."""
    return msg.DESCRIPTOR.file.package == PACKAGE


def convert(msg, cls):
    """``msg`` as a message of class ``cls`` (the same message of the other family), through its
    bytes; ``msg`` itself when it already is one. (Serializing fails over 2 GiB.)"""
    if type(msg) is cls:
        return msg
    if msg.DESCRIPTOR.full_name.rsplit(".", 1)[-1] != cls.DESCRIPTOR.full_name.rsplit(".", 1)[-1]:
        raise TypeError(f"cannot convert a {msg.DESCRIPTOR.full_name} to a {cls.DESCRIPTOR.full_name}")
    out = cls()
    out.ParseFromString(msg.SerializeToString())
    return out


def to_bnfold(msg):
    """``msg`` (an onnx message or one of ours) as a message of this family."""
    return convert(msg, globals()[msg.DESCRIPTOR.name])


def to_onnx(msg):
    """``msg`` as a message of onnx's family (imports onnx)."""
    import onnx

    return convert(msg, getattr(onnx, msg.DESCRIPTOR.name))


# ---------------------------------------------------------------- element types

_T = TensorProto
# numpy holds these natively; the others need ml_dtypes (onnx's helper is asked for them)
NP_DTYPES: Dict[int, np.dtype] = {
    _T.FLOAT: np.dtype(np.float32),
    _T.UINT8: np.dtype(np.uint8),
    _T.INT8: np.dtype(np.int8),
    _T.UINT16: np.dtype(np.uint16),
    _T.INT16: np.dtype(np.int16),
    _T.INT32: np.dtype(np.int32),
    _T.INT64: np.dtype(np.int64),
    _T.BOOL: np.dtype(np.bool_),
    _T.FLOAT16: np.dtype(np.float16),
    _T.DOUBLE: np.dtype(np.float64),
    _T.UINT32: np.dtype(np.uint32),
    _T.UINT64: np.dtype(np.uint64),
    _T.COMPLEX64: np.dtype(np.complex64),
    _T.COMPLEX128: np.dtype(np.complex128),
}
_TENSOR_DTYPES: Dict[np.dtype, int] = {v: k for k, v in NP_DTYPES.items()}

# Bytes per element of every fixed-size type, ml_dtypes' included; packed sub-byte types
# (4-bit, 2-bit, 6-bit), STRING and UNDEFINED have none.
ITEMSIZE: Dict[int, int] = {k: v.itemsize for k, v in NP_DTYPES.items()}
ITEMSIZE.update(
    {getattr(_T, n): 1 for n in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT8E8M0")
     if hasattr(_T, n)}
)
ITEMSIZE[_T.BFLOAT16] = 2
SUB_BYTE_TYPES = frozenset(
    getattr(_T, n) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2", "FLOAT6E2M3", "FLOAT6E3M2")
    if hasattr(_T, n)
)


def tensor_dtype_to_np_dtype(data_type: int) -> np.dtype:
    """The numpy dtype of an ONNX element type (as ``onnx.helper.tensor_dtype_to_np_dtype``)."""
    dtype = NP_DTYPES.get(data_type)
    if dtype is not None:
        return dtype
    from onnx import helper  # bfloat16, float8, 4-bit, string: ml_dtypes' types

    return helper.tensor_dtype_to_np_dtype(data_type)


def np_dtype_to_tensor_dtype(dtype) -> int:
    """The ONNX element type of a numpy dtype (as ``onnx.helper.np_dtype_to_tensor_dtype``)."""
    dtype = np.dtype(dtype)
    found = _TENSOR_DTYPES.get(dtype.newbyteorder("=") if dtype.byteorder not in "=|" else dtype)
    if found is not None:
        return found
    from onnx import helper

    return int(helper.np_dtype_to_tensor_dtype(dtype))


# ---------------------------------------------------------------- tensors

# typed-field storage of the numpy-native types: (field, numpy type the field holds)
_TYPED_FIELDS = {
    _T.FLOAT: ("float_data", np.float32),
    _T.DOUBLE: ("double_data", np.float64),
    _T.INT64: ("int64_data", np.int64),
    _T.INT32: ("int32_data", np.int32),
    _T.INT16: ("int32_data", np.int32),
    _T.INT8: ("int32_data", np.int32),
    _T.UINT8: ("int32_data", np.int32),
    _T.UINT32: ("uint64_data", np.uint64),
    _T.UINT64: ("uint64_data", np.uint64),
}


def to_array(tensor) -> np.ndarray:
    """The value of a TensorProto held in the message (as ``onnx.numpy_helper.to_array``;
    external data is not followed: see :func:`bnfold.onnx_io.tensor_array`)."""
    dtype = NP_DTYPES.get(tensor.data_type)
    dims = tuple(tensor.dims)
    if dtype is not None and not tensor.HasField("segment") and tensor.data_location != _T.EXTERNAL:
        if tensor.HasField("raw_data"):
            return np.frombuffer(tensor.raw_data, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(dims)
        typed = _TYPED_FIELDS.get(tensor.data_type)
        if typed is not None:
            field, held = typed
            return np.asarray(getattr(tensor, field), dtype=held).astype(dtype).reshape(dims)
    from onnx import numpy_helper  # other storage or types: onnx's rules

    return numpy_helper.to_array(to_onnx(tensor))


def from_array(array: np.ndarray, name: Optional[str] = None) -> TensorProto:
    """A TensorProto holding ``array`` in ``raw_data`` (as ``onnx.numpy_helper.from_array``)."""
    array = np.asarray(array)
    data_type = _TENSOR_DTYPES.get(array.dtype.newbyteorder("=") if array.dtype.byteorder not in "=|" else array.dtype)
    if data_type is None:
        from onnx import numpy_helper

        return to_bnfold(numpy_helper.from_array(array, name))
    tensor = TensorProto()
    tensor.dims.extend(array.shape)
    if name:
        tensor.name = name
    tensor.data_type = data_type
    tensor.raw_data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    return tensor


# ---------------------------------------------------------------- nodes and attributes


def make_attribute(key: str, value: Any, attr_type: Optional[int] = None) -> AttributeProto:
    """An AttributeProto for a Python value (as ``onnx.helper.make_attribute``): int, float,
    str/bytes, TensorProto, GraphProto, or a list of one of those (``attr_type`` for an empty one)."""
    attr = AttributeProto()
    attr.name = key
    A = AttributeProto
    if isinstance(value, numbers.Integral):
        attr.i, attr.type = int(value), A.INT
    elif isinstance(value, numbers.Real):
        attr.f, attr.type = float(value), A.FLOAT
    elif isinstance(value, (str, bytes)):
        attr.s, attr.type = _to_bytes(value), A.STRING
    elif _is_message(value, "TensorProto"):
        attr.t.CopyFrom(to_bnfold(value))
        attr.type = A.TENSOR
    elif _is_message(value, "GraphProto"):
        attr.g.CopyFrom(to_bnfold(value))
        attr.type = A.GRAPH
    else:
        items = list(value)
        if attr_type is None:
            if not items:
                raise ValueError(f"Could not infer attribute `{key}` type from empty iterator")
            if all(isinstance(v, numbers.Integral) for v in items):
                attr_type = A.INTS
            elif all(isinstance(v, numbers.Real) for v in items):
                attr_type = A.FLOATS
            elif all(isinstance(v, (str, bytes)) for v in items):
                attr_type = A.STRINGS
            elif all(_is_message(v, "TensorProto") for v in items):
                attr_type = A.TENSORS
            elif all(_is_message(v, "GraphProto") for v in items):
                attr_type = A.GRAPHS
            else:
                raise ValueError(f"attribute `{key}`: cannot infer a type from {value!r}")
        if attr_type == A.INTS:
            attr.ints.extend(int(v) for v in items)
        elif attr_type == A.FLOATS:
            attr.floats.extend(float(v) for v in items)
        elif attr_type == A.STRINGS:
            attr.strings.extend(_to_bytes(v) for v in items)
        elif attr_type == A.TENSORS:
            attr.tensors.extend(to_bnfold(v) for v in items)
        elif attr_type == A.GRAPHS:
            attr.graphs.extend(to_bnfold(v) for v in items)
        else:
            raise ValueError(f"attribute `{key}`: unsupported type {attr_type}")
        attr.type = attr_type
    return attr


def get_attribute_value(attr) -> Any:
    """The Python value of an AttributeProto (as ``onnx.helper.get_attribute_value``)."""
    if attr.ref_attr_name:
        raise ValueError(f"Cannot get value of reference attribute: {attr.name}")
    A = AttributeProto
    field = _ATTR_FIELDS.get(attr.type)
    if field is None:
        if attr.type == A.UNDEFINED:
            return None
        raise ValueError(f"Unsupported ONNX attribute type {attr.type} ({attr.name})")
    value = getattr(attr, field)
    return list(value) if attr.type in _LIST_TYPES else value


_A = AttributeProto
_ATTR_FIELDS = {
    _A.FLOAT: "f", _A.INT: "i", _A.STRING: "s", _A.TENSOR: "t", _A.SPARSE_TENSOR: "sparse_tensor",
    _A.GRAPH: "g", _A.TYPE_PROTO: "tp", _A.FLOATS: "floats", _A.INTS: "ints", _A.STRINGS: "strings",
    _A.TENSORS: "tensors", _A.SPARSE_TENSORS: "sparse_tensors", _A.GRAPHS: "graphs", _A.TYPE_PROTOS: "type_protos",
}
_LIST_TYPES = frozenset((_A.FLOATS, _A.INTS, _A.STRINGS, _A.TENSORS, _A.SPARSE_TENSORS, _A.GRAPHS, _A.TYPE_PROTOS))


def make_node(
    op_type: str,
    inputs: Sequence[str],
    outputs: Sequence[str],
    name: Optional[str] = None,
    doc_string: Optional[str] = None,
    domain: Optional[str] = None,
    **attributes: Any,
) -> NodeProto:
    """A NodeProto (as ``onnx.helper.make_node``: attributes sorted by name, None ones left out)."""
    node = NodeProto()
    node.op_type = op_type
    node.input.extend(inputs)
    node.output.extend(outputs)
    if name:
        node.name = name
    if doc_string:
        node.doc_string = doc_string
    if domain is not None:
        node.domain = domain
    node.attribute.extend(make_attribute(k, v) for k, v in sorted(attributes.items()) if v is not None)
    return node


def make_tensor_value_info(name: str, elem_type: int, shape: Optional[Sequence]) -> ValueInfoProto:
    """A ValueInfoProto of a tensor (as ``onnx.helper.make_tensor_value_info``): ``shape`` None
    for an unknown rank; a dimension is an int, a str (symbolic) or None (unknown)."""
    info = ValueInfoProto()
    info.name = name
    tensor_type = info.type.tensor_type
    tensor_type.elem_type = elem_type
    if shape is not None:
        tensor_type.shape.SetInParent()  # a scalar's empty shape is a shape, not no shape
        for d in shape:
            dim = tensor_type.shape.dim.add()
            if d is None:
                continue
            if isinstance(d, numbers.Integral):
                dim.dim_value = int(d)
            elif isinstance(d, str):
                dim.dim_param = d
            else:
                raise ValueError(f"Invalid item in shape: {d}. Needs to be of int or str.")
    return info


def infer_shapes(model, **options):
    """onnx shape inference (``onnx.shape_inference.infer_shapes`` options) on a model of either
    family, returned in the same family. Imports onnx: call it only when shapes are needed."""
    import onnx.shape_inference

    inferred = onnx.shape_inference.infer_shapes(model.SerializeToString(), **options)
    return convert(inferred, type(model))


def _is_message(value, name: str) -> bool:
    descriptor = getattr(value, "DESCRIPTOR", None)
    return descriptor is not None and getattr(descriptor, "name", None) == name and hasattr(value, "ListFields")


def _to_bytes(value) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value

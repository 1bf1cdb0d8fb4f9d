"""Loading and saving ONNX models safely.

Loading turns every failure into a :class:`bnfold.errors.BnfoldError` with one clear line,
and checks each external-data reference before reading it: the location must be relative,
stay inside the model's folder (no ``..``, no symbolic link out of it), and its offset and
length must lie inside the data file.

Saving is atomic: everything is written to temporary files in the destination folder and
renamed into place only once complete, so a failure never leaves a half-written output and
an existing output is replaced only on success. The model is streamed out tensor by tensor,
so a full serialized copy of it is never held in memory.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import tempfile
from typing import BinaryIO, Iterator, List, Optional, Set, Tuple

import numpy as np
from google.protobuf.message import EncodeError

from . import onnx_proto
from .errors import ExternalDataError, InputError, LimitError, OutputError
from .onnx_proto import AttributeProto, GraphProto, ModelProto, TensorProto  # enums and field numbers only
from .onnx_wire import copy_range, is_stub, key, make_stub, point_to, read_lazy, stub_source, varint

PROTOBUF_LIMIT = 2**31 - 1  # a serialized protobuf message cannot exceed 2 GiB
EXTERNAL_THRESHOLD = 1024  # tensors at least this large go to the data file when writing external data


# ---------------------------------------------------------------- loading


def load_model(path: str, load_external: bool = True) -> ModelProto:
    """Parse the model at ``path`` and, if asked, read its external data (checked first)."""
    return read_model(path, load_external)[0]


def read_model(path: str, load_external: bool = True) -> Tuple[ModelProto, Set[str]]:
    """Like :func:`load_model`; also return the real paths of the external data files read.

    The model's classes are :func:`bnfold.onnx_proto.message_classes`' (onnx's or bnfold's own).
    """
    model = _parse(path)
    files: Set[str] = set()
    if load_external:
        files = load_external_data(model, os.path.dirname(os.path.abspath(path)))
    for tensor in iter_tensors(model.graph):
        check_tensor_size(tensor, _stored_bytes(tensor))
    return model, files


def _parse(path: str) -> ModelProto:
    """The whole file parsed, its tensors not checked yet."""
    data = _read_file(path)
    model = onnx_proto.message_classes().ModelProto()
    try:
        model.ParseFromString(data)
    except RecursionError:
        raise LimitError(f"{path}: the model is nested too deeply to parse") from None
    except Exception as exc:
        if "depth" in str(exc).lower():  # upb's recursion limit (MaxDepth) is a DecodeError
            raise LimitError(f"{path}: the model is nested too deeply to parse") from None
        raise InputError(f"{path}: not an ONNX model (the protobuf is corrupt or truncated)") from None
    del data
    _check_is_model(model, path)
    return model


def _check_is_model(model: ModelProto, path: str) -> None:
    if not model.HasField("graph") or model.ir_version <= 0:
        raise InputError(f"{path}: not an ONNX model (no graph or no IR version)")


# Tensors claiming more than this are refused outright (LimitError), whatever their data;
# a tensor claiming more than ABSURD_UNBACKED_BYTES without the data to match is a limit too
# (someone is probing sizes), a smaller mismatch a corrupt file.
MAX_TENSOR_BYTES = 1 << 40
ABSURD_UNBACKED_BYTES = 1 << 31

_SUB_BYTE_TYPES = onnx_proto.SUB_BYTE_TYPES
_ITEMSIZE = onnx_proto.ITEMSIZE


def check_tensor_size(tensor: TensorProto, stored: Optional[int]) -> None:
    """Refuse a tensor whose dims are negative or absurd, or whose data has another size.

    ``stored`` is the number of data bytes it holds (raw or external), None when its values
    sit in typed fields. Checked before anything is read or allocated from its dims.
    (Runs once per tensor of every model read: kept to a few protobuf accesses.)
    """
    dims = tensor.dims
    if dims and min(dims) < 0:
        raise InputError(f"tensor '{tensor.name or '<unnamed>'}' has a negative dimension {list(dims)}")
    count = math.prod(dims)  # Python ints: no overflow
    data_type = tensor.data_type
    itemsize = _ITEMSIZE.get(data_type)
    if itemsize is not None:
        need = count * itemsize
    else:
        need = (count + 1) // 2 if data_type in _SUB_BYTE_TYPES else None
    if need is not None and need > MAX_TENSOR_BYTES or count > MAX_TENSOR_BYTES:
        name = tensor.name or "<unnamed>"
        raise LimitError(f"tensor '{name}' claims {count} elements of shape {list(dims)}; refused")
    if stored is not None and need is not None and stored != need:
        name = tensor.name or "<unnamed>"
        if need > ABSURD_UNBACKED_BYTES:
            raise LimitError(
                f"tensor '{name}' claims {count} elements of shape {list(dims)} "
                f"but holds {stored} bytes; refused"
            )
        raise InputError(
            f"tensor '{name}' of shape {list(dims)} needs {need} bytes of data but holds {stored}"
        )


def _itemsize(data_type: int) -> Optional[int]:
    """Bytes per element; None for strings, packed sub-byte types and types bnfold does not know
    (left to the runtime)."""
    return onnx_proto.ITEMSIZE.get(data_type)


def _stored_bytes(tensor: TensorProto) -> Optional[int]:
    if tensor.data_location == TensorProto.EXTERNAL:
        return stub_source(tensor)[2] if is_stub(tensor) else None  # None: not loaded
    return _inline_bytes(tensor)


def _inline_bytes(tensor: TensorProto) -> Optional[int]:
    """The size of a tensor's ``raw_data``; None when its values are in typed fields."""
    raw = tensor.raw_data
    return len(raw) if raw or tensor.HasField("raw_data") else None


# Files smaller than this are parsed whole: there is little memory to save, and a file this
# small with many fields (a 100,000-node graph) walks slowly in Python.
LAZY_FILE_MIN_BYTES = 32 << 20


def read_model_lazy(path: str) -> Tuple[ModelProto, Set[str]]:
    """Like :func:`read_model`, but large main-graph weights stay on disk as stubs
    (see :mod:`bnfold.onnx_wire`) until something reads them. For file-to-file folding:
    the writer copies untouched weights through without ever holding them in memory.
    External data stays on disk the same way (a small file may point at gigabytes of it).
    """
    check_readable(path)
    model, stub_positions = None, []
    if os.path.getsize(path) >= LAZY_FILE_MIN_BYTES:  # else protobuf's C parser beats a walk in Python
        try:
            model, stub_positions = read_lazy(path)
        except Exception:  # malformed (WireError, protobuf's DecodeError, ...): the full parser words it
            model = None
    if model is None:
        model = _parse(path)
    else:
        _check_is_model(model, path)
    base_dir = os.path.dirname(os.path.abspath(path))
    stubs = set(stub_positions)
    files: Set[str] = set()
    external = TensorProto.EXTERNAL
    # One walk over every tensor: sizes checked, external initializers turned into stubs.
    for i, tensor in enumerate(model.graph.initializer):
        if tensor.data_location != external:
            check_tensor_size(tensor, _inline_bytes(tensor))
        elif i in stubs:
            check_tensor_size(tensor, stub_source(tensor)[2])
        else:
            real, offset, length = external_reference(tensor, base_dir)
            if length is None:
                length = os.path.getsize(real) - offset
            make_stub(tensor, real, offset, length)
            check_tensor_size(tensor, length)
            files.add(real)
    # External tensors elsewhere (subgraphs, attributes) are few: read them now.
    rest = []
    for tensor in iter_tensors(model.graph, initializers=False):
        if tensor.data_location == external:
            rest.append(tensor)
        else:
            check_tensor_size(tensor, _inline_bytes(tensor))
    files |= _load_external_tensors(rest, base_dir)
    for tensor in rest:
        check_tensor_size(tensor, _stored_bytes(tensor))
    return model, files


def check_readable(path: str) -> None:
    """Refuse a model path that is missing, a directory, or unreadable (InputError)."""
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, not a model file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: cannot read (permission denied)")


def _read_file(path: str) -> bytes:
    check_readable(path)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None


def iter_tensors(graph: GraphProto, initializers: bool = True) -> Iterator[TensorProto]:
    """Every TensorProto in a graph: initializers and tensor attributes, subgraphs included.

    ``initializers=False`` leaves out this graph's own initializers (not its subgraphs').
    """
    if initializers:
        yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:  # every attribute of every node: keep the loop lean
        for attr in node.attribute:
            kind = attr.type
            if kind not in _TENSOR_HOLDERS:
                continue
            if kind == _TENSOR:
                yield attr.t
            elif kind == _TENSORS:
                yield from attr.tensors
            elif kind == _GRAPH:
                yield from iter_tensors(attr.g)
            else:
                for g in attr.graphs:
                    yield from iter_tensors(g)


_TENSOR, _TENSORS, _GRAPH = AttributeProto.TENSOR, AttributeProto.TENSORS, AttributeProto.GRAPH
_TENSOR_HOLDERS = frozenset((_TENSOR, _TENSORS, _GRAPH, AttributeProto.GRAPHS))


def external_reference(tensor: TensorProto, base_dir: str) -> Tuple[str, int, Optional[int]]:
    """Check a tensor's external-data entry; return (file path, offset, length or None)."""
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    what = f"tensor '{tensor.name}'"
    if not location:
        raise ExternalDataError(f"{what}: external data without a location")
    if "\0" in location:
        raise ExternalDataError(f"{what}: external data location {location!r} is not a valid file name; refused")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in location[:3]:
        raise ExternalDataError(f"{what}: external data location '{location}' is absolute; refused")
    norm = os.path.normpath(location)
    if norm == ".." or norm.startswith(".." + os.sep) or norm.startswith("../"):
        raise ExternalDataError(f"{what}: external data location '{location}' leaves the model's folder; refused")
    full = os.path.join(base_dir, norm)
    real_base = os.path.realpath(base_dir)
    real = os.path.realpath(full)
    if os.path.commonpath([real_base, real]) != real_base:
        raise ExternalDataError(
            f"{what}: external data location '{location}' resolves outside the model's folder "
            "(through a symbolic link); refused"
        )
    if not os.path.isfile(real):
        raise ExternalDataError(f"{what}: external data file '{location}' is missing")
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise ExternalDataError(f"{what}: external data offset or length is not a number") from None
    size = os.path.getsize(real)
    if offset < 0 or (length is not None and length < 0):
        raise ExternalDataError(f"{what}: negative external data offset or length")
    end = offset + (length if length is not None else 0)
    if offset > size or end > size:
        raise ExternalDataError(
            f"{what}: external data [{offset}, {end}) lies past the end of '{location}' ({size} bytes)"
        )
    return real, offset, length


def tensor_array(tensor: TensorProto) -> "np.ndarray":
    """The value of ``tensor`` as a numpy array.

    A tensor whose data stays in a file (bnfold's lazy loading keeps untouched weights on
    disk) points at it with an *absolute*, already validated location; it is read here on
    demand. Everything else goes through :func:`bnfold.onnx_proto.to_array` (onnx's rules).
    """
    if tensor.data_location != TensorProto.EXTERNAL:
        # the general conversion costs ~15 us of Python per call, and a fold reads six per BN:
        # the common case (raw little-endian bytes of a numpy type) takes a few accesses
        data_type = tensor.data_type
        dtype = _RAW_DTYPES.get(data_type)
        if dtype is None and data_type in _PLAIN_TYPES:
            dtype = _plain_dtype(data_type)  # bfloat16: ml_dtypes' type
        if dtype is not None:
            raw = tensor.raw_data
            if raw or tensor.HasField("raw_data"):
                dims = tuple(tensor.dims)
                count = math.prod(dims)
                if len(raw) != count * dtype.itemsize:
                    raise InputError(f"tensor '{tensor.name}': {len(raw)} bytes of data for {count} elements")
                return np.frombuffer(raw, dtype=dtype).reshape(dims)
        return onnx_proto.to_array(tensor)
    if not is_stub(tensor):  # a reference from the model itself: never followed from here
        raise ExternalDataError(f"tensor '{tensor.name}': its external data was not loaded")
    info = {e.key: e.value for e in tensor.external_data}
    location = info["location"]
    offset, length = int(info.get("offset", "0")), int(info.get("length", "-1"))
    if tensor.data_type in _PLAIN_TYPES:  # little-endian bytes as numpy lays them out
        dtype = _plain_dtype(tensor.data_type)
        count = int(np.prod(tensor.dims, dtype=np.int64))
        if length != count * dtype.itemsize:
            raise InputError(f"tensor '{tensor.name}': {length} bytes of data for {count} elements")
        return np.fromfile(location, dtype=dtype, count=count, offset=offset).reshape(tuple(tensor.dims))
    with open(location, "rb") as f:
        f.seek(offset)
        raw = f.read(length) if length >= 0 else f.read()
    loaded = type(tensor)()
    loaded.CopyFrom(tensor)
    del loaded.external_data[:]
    loaded.data_location = TensorProto.DEFAULT
    loaded.raw_data = raw
    return onnx_proto.to_array(loaded)


_PLAIN_TYPES = {
    TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16,
    TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16,
    TensorProto.INT32, TensorProto.UINT32, TensorProto.INT64, TensorProto.UINT64,
}


_RAW_DTYPES = {t: onnx_proto.NP_DTYPES[t].newbyteorder("<") for t in _PLAIN_TYPES if t in onnx_proto.NP_DTYPES}


@functools.lru_cache(maxsize=None)
def _plain_dtype(data_type: int) -> np.dtype:
    return np.dtype(onnx_proto.tensor_dtype_to_np_dtype(data_type)).newbyteorder("<")


def load_external_data(model: ModelProto, base_dir: str) -> Set[str]:
    """Read every external tensor into ``raw_data`` after checking its reference.

    Returns the real paths of the data files read.
    """
    return _load_external_tensors(iter_tensors(model.graph), base_dir)


def _load_external_tensors(tensors, base_dir: str) -> Set[str]:
    handles = {}
    try:
        for tensor in tensors:
            if tensor.data_location != TensorProto.EXTERNAL:
                continue
            path, offset, length = external_reference(tensor, base_dir)
            f = handles.get(path)
            if f is None:
                f = handles[path] = open(path, "rb")
            f.seek(offset)
            raw = f.read() if length is None else f.read(length)
            tensor.raw_data = raw
            tensor.data_location = TensorProto.DEFAULT
            del tensor.external_data[:]
    except OSError as exc:
        raise ExternalDataError(f"cannot read external data: {exc.strerror or exc}") from None
    finally:
        for f in handles.values():
            f.close()
    return set(handles)


# ---------------------------------------------------------------- saving


def save_model(model: ModelProto, path: str, external: Optional[bool] = None) -> None:
    """Write ``model`` to ``path`` atomically (see :func:`staged_output` and :func:`write_model`)."""
    with staged_output(path) as staged:
        write_model(model, staged, external)


def write_model(model: ModelProto, path: str, external: Optional[bool] = None) -> None:
    """Write ``model`` to ``path``, with tensors in ``<name>.data`` beside it when ``external``.

    ``external=None`` writes external data only when the model would exceed the 2 GiB protobuf
    limit. When writing external data, ``model``'s large tensors are moved out of it.
    """
    plan = None
    if not external:
        plan = _stream_plan(model)  # sizes every part: decides as well as model_size(), exactly
        if plan is None:
            if external is False:
                raise OutputError("the model exceeds the 2 GiB protobuf limit; write it with external data")
            external = True
    try:
        with open(path, "wb") as out:
            if external:
                with open(path + ".data", "wb") as data_out:
                    _write_external(model, out, data_out, os.path.basename(path) + ".data")
            else:
                _write_plan(model, plan, out)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None


def check_output_path(path: str, protect: Set[str] = frozenset(), protected: str = "the input model or its data") -> None:
    """Refuse an output path that cannot be written or would overwrite a protected file
    (``protected`` says what those files are, for the message). Messages show ``path`` as given."""
    shown = os.fspath(path)
    path = os.path.abspath(shown)
    if os.path.isdir(path):
        raise OutputError(f"{shown}: is a directory")
    if not os.path.isdir(os.path.dirname(path)):
        raise OutputError(f"{os.path.dirname(shown) or '.'}: output folder does not exist")
    for target, shown_target in ((path, shown), (path + ".data", shown + ".data")):
        if os.path.realpath(target) in protect:
            raise OutputError(f"{shown_target}: would overwrite {protected}; choose another path")


@contextlib.contextmanager
def staged_output(path: str, protect: Set[str] = frozenset()) -> Iterator[str]:
    """Yield a path in a private staging folder beside ``path``; on success move what was
    written there (the model and its ``.data`` file, if any) into place, else delete it.

    So a failed run never leaves a half-written output, and an existing output is replaced
    only when the whole run succeeds. (Files are not fsync'ed: the rename is atomic against a
    failed or killed process, not against a power cut; syncing a multi-GB output costs seconds.) ``protect`` lists real paths (the input and its data
    files) that the output must not overwrite.
    """
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    check_output_path(path, protect)
    try:
        stage = tempfile.mkdtemp(prefix=".bnfold-", dir=folder)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot write ({exc.strerror or exc})") from None
    try:
        staged = os.path.join(stage, os.path.basename(path))
        yield staged
        try:
            if os.path.exists(staged + ".data"):
                os.replace(staged + ".data", path + ".data")
            os.replace(staged, path)
        except OSError as exc:
            raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def shallow_copy(msg, skip):
    """A copy of protobuf message ``msg`` without its field ``skip`` (which may be large; a
    field name, or several in a tuple)."""
    skips = {skip} if isinstance(skip, str) else set(skip)
    out = type(msg)()
    for field, value in msg.ListFields():
        if field.name in skips:
            continue
        if _is_repeated(field):
            getattr(out, field.name).extend(value)
        elif field.message_type is not None:
            getattr(out, field.name).CopyFrom(value)
        else:
            setattr(out, field.name, value)
    return out


def _is_repeated(field) -> bool:
    flag = getattr(field, "is_repeated", None)  # protobuf >= 5; `label` is gone in 7
    return bool(flag) if flag is not None else field.label == field.LABEL_REPEATED


_GRAPH_FIELD = ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_INIT_FIELD = GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_NODE_FIELD = GraphProto.DESCRIPTOR.fields_by_name["node"].number
_RAW_FIELD = TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number


def write_streaming(model: ModelProto, out: BinaryIO) -> None:
    """Serialize ``model`` to ``out`` one main-graph initializer at a time.

    The bytes parse to the same ModelProto: protobuf accepts fields in any order, so the
    graph is written last and its initializers after its other fields. A lazy stub's bytes
    are copied from its file into the tensor's ``raw_data``, never held in memory.
    """
    plan = _stream_plan(model)
    if plan is None:
        raise OutputError("the model exceeds the 2 GiB protobuf limit; write it with external data")
    _write_plan(model, plan, out)


# Initializers up to this size are serialized while the output is sized (once, not twice: a
# 100,000-node graph has 133,000 of them); larger ones when written, so that a model's weights
# are never held twice.
_SMALL_TENSOR_BYTES = 1 << 16
_FLUSH_BYTES = 1 << 20


def _stream_plan(model: ModelProto):
    """What :func:`_write_plan` writes: ``(head, graph_rest, graph_len, pieces)``, each piece
    ``(prefix bytes, size, stub source or None)``, where ``prefix`` is the initializer's key and
    length, followed by a stub's header or a small tensor's whole serialization. None when the
    model exceeds the 2 GiB protobuf limit."""
    try:
        head = shallow_copy(model, "graph").SerializeToString(deterministic=True)
        # The nodes one by one, not through a copy of the graph (a copy of 100,000 nodes costs
        # 85 MB that the process keeps); field 1, so they come first, as in a whole serialization.
        node_key = key(_NODE_FIELD)
        parts = []
        for node in model.graph.node:
            body = node.SerializeToString(deterministic=True)
            parts.append(node_key + varint(len(body)) + body)
        parts.append(shallow_copy(model.graph, ("node", "initializer")).SerializeToString(deterministic=True))
        graph_rest = b"".join(parts)
        del parts
    except EncodeError:  # over 2 GiB without the initializers (huge Constant nodes)
        return None
    if len(graph_rest) > PROTOBUF_LIMIT:
        return None
    init_key = key(_INIT_FIELD)
    pieces = []
    total = len(graph_rest)
    external = TensorProto.EXTERNAL
    for t in model.graph.initializer:
        if t.data_location == external and is_stub(t):
            path, offset, length = stub_source(t)
            header = _without_location(t).SerializeToString(deterministic=True) + key(_RAW_FIELD) + varint(length)
            size = len(header) + length
            pieces.append((init_key + varint(size) + header, size, (path, offset, length)))
        else:
            size = t.ByteSize()
            prefix = init_key + varint(size)
            if size <= _SMALL_TENSOR_BYTES:
                prefix += t.SerializeToString(deterministic=True)
            pieces.append((prefix, size, None))
        total += len(init_key) + len(varint(size)) + size
    if len(head) + len(key(_GRAPH_FIELD)) + len(varint(total)) + total > PROTOBUF_LIMIT:
        return None
    return head, graph_rest, total, pieces


def _write_plan(model: ModelProto, plan, out: BinaryIO) -> None:
    head, graph_rest, graph_len, pieces = plan
    out.write(head)
    out.write(key(_GRAPH_FIELD) + varint(graph_len))
    out.write(graph_rest)
    buffer: List[bytes] = []
    buffered = 0
    for t, (prefix, size, src) in zip(model.graph.initializer, pieces):
        if src is None and size <= _SMALL_TENSOR_BYTES:
            buffer.append(prefix)  # the whole tensor, serialized while sizing
            buffered += len(prefix)
            if buffered >= _FLUSH_BYTES:
                out.write(b"".join(buffer))
                buffer, buffered = [], 0
            continue
        if buffer:
            out.write(b"".join(buffer))
            buffer, buffered = [], 0
        out.write(prefix)
        if src:
            copy_range(*src, out)
        else:  # serialized only now: holding every large one would double their memory
            body = t.SerializeToString(deterministic=True)
            if len(body) != size:
                raise OutputError(f"tensor '{t.name}' changed size while being written")
            out.write(body)
            del body
    if buffer:
        out.write(b"".join(buffer))


def _without_location(stub: TensorProto) -> TensorProto:
    header = type(stub)()
    header.CopyFrom(stub)
    del header.external_data[:]
    header.ClearField("data_location")
    return header


def _write_external(model: ModelProto, out: BinaryIO, data_out: BinaryIO, data_name: str) -> None:
    """Move large tensors' bytes to ``data_out`` and write the model, pointing at them, to ``out``.

    This empties those tensors' ``raw_data`` in ``model`` (restoring them would mean holding a
    second copy of every weight) and repoints stubs at the new file; callers pass a model they own.
    """
    offset = 0
    for tensor in iter_tensors(model.graph):
        stub = is_stub(tensor)
        if not stub and (tensor.data_location == TensorProto.EXTERNAL or not tensor.HasField("raw_data")):
            continue
        length = stub_source(tensor)[2] if stub else len(tensor.raw_data)
        if length < EXTERNAL_THRESHOLD and not stub:
            continue
        pad = (-offset) % 4096  # page-aligned, so readers can memory-map each tensor
        data_out.write(b"\0" * pad)
        offset += pad
        if stub:
            copy_range(*stub_source(tensor), data_out)
        else:
            data_out.write(tensor.raw_data)
            tensor.ClearField("raw_data")
        point_to(tensor, data_name, offset, length)
        offset += length
    write_streaming(model, out)


def model_size(model: ModelProto) -> int:
    """An estimate of the serialized size of ``model``: its tensors' data plus 64 MiB.

    (protobuf's ByteSize() serializes the whole model to answer, which costs seconds and a
    full copy in memory for a large one.)
    """
    total = 64 << 20
    for t in iter_tensors(model.graph):
        total += math.prod(t.dims) * (_itemsize(t.data_type) or 8)
    return total

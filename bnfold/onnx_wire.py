"""Protobuf wire-level access to ONNX files: read a model without reading its weights.

A model file is mostly the ``raw_data`` bytes of its initializers. Parsing them all (as
``onnx.load`` does) costs time and a copy of the file in memory, though a fold touches few
of them. :func:`read_lazy` walks the file's protobuf fields instead, parses everything but
large ``raw_data`` fields, and leaves each large main-graph initializer as a *stub*: a
TensorProto with its name, type and dims whose data location points, by absolute path,
offset and length, at the bytes in the file. :func:`bnfold.onnx_io.tensor_array` reads a
stub on demand, and the writer copies untouched stubs' bytes straight from file to file.
"""

from __future__ import annotations

import os
import secrets
from typing import Iterator, List, Optional, Tuple

from . import onnx_proto
from .onnx_proto import GraphProto, ModelProto, TensorProto  # enums and field numbers only

LAZY_MIN_BYTES = 4096  # smaller tensors are parsed as usual

_MODEL_GRAPH = ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_GRAPH_INIT = GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_TENSOR_RAW = TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number
_TENSOR_LOCATION = TensorProto.DESCRIPTOR.fields_by_name["data_location"].number


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def varint(n: int) -> bytes:
    if n < 0x80:
        return _ONE_BYTE[n]
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


_ONE_BYTE = [bytes((i,)) for i in range(0x80)]


def key(field_number: int) -> bytes:
    """The tag of a length-delimited field."""
    return varint((field_number << 3) | 2)


def _read_varint(buf, pos: int, end: int) -> Tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def fields(buf, start: int, end: int) -> Iterator[Tuple[int, int, int, int, int]]:
    """Yield ``(number, wire_type, field_start, value_start, value_end)`` for each field.

    For length-delimited fields the value range excludes the length prefix.
    """
    pos = start
    while pos < end:
        field_start = pos
        tag, pos = _read_varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, value_end = _read_varint(buf, pos, end)
            value_start = pos
        elif wire == 1:
            value_start, value_end = pos, pos + 8
        elif wire == 5:
            value_start, value_end = pos, pos + 4
        elif wire == 2:
            length, value_start = _read_varint(buf, pos, end)
            value_end = value_start + length
        else:
            raise WireError(f"unsupported wire type {wire}")
        if value_end > end or number == 0:
            raise WireError("field runs past the end of its message")
        pos = value_end
        yield number, wire, field_start, value_start, value_end


# Stubs carry this process's secret token, so that an external-data entry coming from a file
# (an absolute location, say) can never pass for one and make bnfold read an arbitrary file.
_STUB_KEY = "bnfold-stub"
_STUB_TOKEN = secrets.token_hex(16)


def is_stub(tensor: TensorProto) -> bool:
    """Whether ``tensor`` is a lazy stub made by this process (see :func:`make_stub`)."""
    if tensor.data_location != TensorProto.EXTERNAL:
        return False
    return any(e.key == _STUB_KEY and e.value == _STUB_TOKEN for e in tensor.external_data)


def stub_source(tensor: TensorProto) -> Tuple[str, int, int]:
    info = {e.key: e.value for e in tensor.external_data}
    return info["location"], int(info.get("offset", "0")), int(info["length"])


def point_to(tensor: TensorProto, location: str, offset: int, length: int) -> TensorProto:
    """Make ``tensor`` (without its data) refer to ``length`` bytes at ``offset`` of ``location``."""
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = k, v
    return tensor


def make_stub(header: TensorProto, path: str, offset: int, length: int) -> TensorProto:
    """Turn ``header`` into a stub: its data is ``length`` bytes at ``offset`` of the file at the
    absolute, already validated ``path``, read on demand and copied through when written."""
    point_to(header, path, offset, length)
    entry = header.external_data.add()
    entry.key, entry.value = _STUB_KEY, _STUB_TOKEN
    return header


def read_lazy(path: str) -> Tuple[ModelProto, List[int]]:
    """Parse the model at ``path``, leaving large main-graph ``raw_data`` in the file.
    Its classes are :func:`bnfold.onnx_proto.message_classes`' (onnx's or bnfold's own).

    Returns the model and the positions (in ``model.graph.initializer``) of the stubs made
    here; any other tensor with external data still has the location the file gave it.
    Raises :class:`WireError` for malformed bytes (the caller falls back to a full parse,
    which reports the error in its own words).
    """
    real = os.path.realpath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise WireError("empty file")
        return _read_lazy(_FileView(f.fileno(), size), size, real, onnx_proto.message_classes())


class _FileView:
    """Byte and slice access to a file through small positioned reads.

    (A memory map would do, but walking one maps in the whole file: the process's peak
    memory would grow by the file's size though the weights are never read.)
    """

    WINDOW = 1 << 16

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size
        self.start, self.window = 0, b""

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop = index.start, min(index.stop, self.size)
            data = os.pread(self.fd, stop - start, start)
            if len(data) != stop - start:
                raise WireError("file changed while reading")
            return data
        offset = index - self.start
        if not 0 <= offset < len(self.window):
            self.start, self.window = index, os.pread(self.fd, self.WINDOW, index)
            offset = 0
            if not self.window:
                raise WireError("read past the end of the file")
        return self.window[offset]


def _add_range(ranges: List[List[int]], start: int, end: int) -> None:
    """Record bytes ``[start, end)`` to keep, merged with the previous range when adjacent
    (one read for a run of fields instead of one per field)."""
    if ranges and ranges[-1][1] == start:
        ranges[-1][1] = end
    else:
        ranges.append([start, end])


def _read_lazy(buf, size: int, real: str, classes) -> Tuple[ModelProto, List[int]]:
    head_ranges: List[List[int]] = []
    graph_range: Optional[Tuple[int, int]] = None
    for number, wire, fstart, vstart, vend in fields(buf, 0, size):
        if number == _MODEL_GRAPH and wire == 2:
            if graph_range is not None:
                raise WireError("several graph fields")  # merge semantics: leave to protobuf
            graph_range = (vstart, vend)
        else:
            _add_range(head_ranges, fstart, vend)
    if graph_range is None:
        raise WireError("no graph")
    head = [buf[s:e] for s, e in head_ranges]
    ranges: List[List[int]] = []
    stubs: List[Tuple[int, TensorProto]] = []
    n_init = 0
    for number, wire, fstart, vstart, vend in fields(buf, *graph_range):
        if number == _GRAPH_INIT and wire == 2:
            big = vend - vstart >= LAZY_MIN_BYTES
            stub = _stub_for(buf, vstart, vend, real, classes.TensorProto) if big else None
            if stub is not None:
                stubs.append((n_init, stub))
                n_init += 1
                continue  # appended after parsing, at its position
            n_init += 1
        _add_range(ranges, fstart, vend)
    parts = [buf[s:e] for s, e in ranges]
    graph_bytes = b"".join(parts)
    model = classes.ModelProto()
    model.ParseFromString(b"".join(head) + key(_MODEL_GRAPH) + varint(len(graph_bytes)) + graph_bytes)
    del graph_bytes, parts
    _insert_stubs(model.graph, stubs)
    return model, [i for i, _ in stubs]


def _stub_for(buf, start: int, end: int, real: str, tensor_class) -> Optional[TensorProto]:
    """A stub for the tensor in ``buf[start:end]`` if its raw_data is large, else None."""
    raw = None
    for number, wire, fstart, vstart, vend in fields(buf, start, end):
        if number == _TENSOR_LOCATION and wire == 0:
            return None  # already external (or explicit default): leave it to the usual path
        if number == _TENSOR_RAW and wire == 2:
            raw = (fstart, vstart, vend)
    if raw is None or raw[2] - raw[1] < LAZY_MIN_BYTES:
        return None
    fstart, vstart, vend = raw
    header = tensor_class()
    header.ParseFromString(buf[start:fstart] + buf[vend:end])
    if header.HasField("raw_data"):
        return None  # a repeated raw_data field: protobuf keeps the last; don't be clever
    return make_stub(header, real, vstart, vend - vstart)


def _insert_stubs(graph: GraphProto, stubs: List[Tuple[int, TensorProto]]) -> None:
    """Put each stub at its original position among the initializers."""
    if not stubs:
        return
    parsed = list(graph.initializer)
    ordered: List[TensorProto] = []
    it = iter(parsed)
    pending = dict(stubs)
    total = len(parsed) + len(stubs)
    for i in range(total):
        ordered.append(pending[i] if i in pending else next(it))
    del graph.initializer[:]
    graph.initializer.extend(ordered)


def copy_range(src_path: str, offset: int, length: int, out) -> None:
    """Append ``length`` bytes of ``src_path`` from ``offset`` to binary file ``out``.

    Uses the kernel's file-to-file copy where available, so the bytes never enter this
    process's memory.
    """
    out.flush()
    out_fd = out.fileno()
    with open(src_path, "rb") as src:
        src_fd = src.fileno()
        done = 0
        copier = getattr(os, "copy_file_range", None)
        while done < length and copier is not None:
            try:
                n = copier(src_fd, out_fd, length - done, offset + done)
            except OSError:
                copier = None
                break
            if n == 0:
                raise WireError(f"{src_path}: unexpected end of file")
            done += n
        if done < length:
            src.seek(offset + done)
            while done < length:
                chunk = src.read(min(length - done, 1 << 24))
                if not chunk:
                    raise WireError(f"{src_path}: unexpected end of file")
                out.write(chunk)
                done += len(chunk)
                out.flush()
    # keep Python's file position in step with the descriptor's
    out.seek(0, os.SEEK_END)


class Spill:
    """A scratch file for new tensors, so that a fold's results need not stay in memory.

    :meth:`stub` writes an array's bytes to the file and returns a stub for them; the writer
    later copies them into the output like any untouched weight. The file is deleted on
    :meth:`close` (use as a context manager). Put it on the output's file system so that
    the copy stays inside the kernel.
    """

    min_bytes = LAZY_MIN_BYTES

    def __init__(self, folder: Optional[str] = None) -> None:
        import tempfile

        self._file = tempfile.NamedTemporaryFile(prefix=".bnfold-spill-", suffix=".tmp", dir=folder, delete=False)
        self.path = os.path.realpath(self._file.name)
        self._offset = 0

    def stub(self, name: str, value) -> TensorProto:
        """Write ``value`` (a numpy array) to the file; return a stub TensorProto named ``name``
        (of :func:`bnfold.onnx_proto.message_classes`' family, as the readers build)."""
        value = value.astype(value.dtype.newbyteorder("<"), copy=False)
        data = value.tobytes()
        self._file.write(data)
        self._file.flush()
        header = onnx_proto.message_classes().TensorProto()
        header.name = name
        header.data_type = onnx_proto.np_dtype_to_tensor_dtype(value.dtype)
        header.dims.extend(value.shape)
        stub = make_stub(header, self.path, self._offset, len(data))
        self._offset += len(data)
        return stub

    def close(self) -> None:
        self._file.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def __enter__(self) -> "Spill":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = [
    "LAZY_MIN_BYTES",
    "WireError",
    "copy_range",
    "fields",
    "is_stub",
    "key",
    "make_stub",
    "point_to",
    "read_lazy",
    "Spill",
    "stub_source",
    "varint",
]

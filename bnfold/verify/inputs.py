"""Seeded inputs for a check or a benchmark: shapes (named dims, --shape, defaults), random
values by dtype, real arrays from an .npz; and the CLI's small syntaxes for them."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import InputError, LimitError
from .interface import Interface, ModelLike, Shape, TensorSpec, check_path, dims_text, is_float_dtype, one_line, read_interface

# Dynamic dimensions without a value: the first axis is taken as a batch (1), others get 32
# (enough for a few stride-2 stages of a conv net, small enough to stay fast).
DEFAULT_BATCH_DIM = 1
DEFAULT_OTHER_DIM = 32
DEFAULT_INT_RANGE = (0, 9)  # inclusive; small non-negative ints are valid indices for most gathers


def parse_shape(text: str) -> Tuple[str, Shape]:
    """``NAME:1x3x224x224`` -> ``("NAME", (1, 3, 224, 224))``. NAME may itself contain ':'.

    NAME is an input name, or a symbolic dimension name (``N:8`` sets every dim called N).
    ``NAME:`` (nothing after the colon) is a scalar. Raises InputError on bad syntax.
    """
    name, sep, dims = text.rpartition(":")
    if not sep or not name:
        raise InputError(f"bad --shape {text!r}: expected NAME:DIMS such as x:1x3x224x224")
    dims = dims.strip()
    if not dims:
        return name, ()
    parts = re.split(r"[x,]", dims)
    if not all(re.fullmatch(r"\d+", p.strip()) for p in parts):
        raise InputError(f"bad --shape {text!r}: dims must be non-negative integers separated by 'x', such as 1x3x224x224")
    return name, tuple(int(p) for p in parts)


def parse_range(text: str) -> Tuple[float, float]:
    """``lo,hi`` -> ``(lo, hi)`` with lo < hi, both finite. Raises InputError."""
    parts = text.split(",")
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise InputError(f"bad --range {text!r}: expected LO,HI such as -1,1") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise InputError(f"bad --range {text!r}: need finite LO < HI")
    return lo, hi




@dataclass
class InputInfo:
    """What was fed to one input: for the report."""

    name: str
    dtype: str
    shape: List[int]
    source: str  # 'normal(0,1)', 'uniform[lo,hi)', 'integers[0,9]', 'bernoulli(0.5)', 'npz FILE'


def make_inputs(
    model: ModelLike,
    *,
    seed: int = 0,
    batches: int = 1,
    shapes: Optional[Mapping[str, Sequence[int]]] = None,
    value_range: Optional[Tuple[float, float]] = None,
    inputs_npz: Optional[Union[str, "os.PathLike[str]"]] = None,
) -> Tuple[List[Dict[str, np.ndarray]], List[str]]:
    """Seeded feeds for every input the model needs (initializer-backed inputs are left to their
    defaults), one dict per batch, plus notes on choices the caller did not make.

    ``shapes`` maps an input name to its full shape, or a symbolic dim name to a 1-tuple.
    Floats are standard normal (or uniform in ``value_range``), ints uniform in [0, 9] (or in
    ``value_range``), bools fair coin flips. Batch ``b`` of seed ``s`` is the same whatever
    ``batches`` is. With ``inputs_npz`` the arrays in that file are used (batches must be 1);
    inputs missing from it are generated.

    Raises InputError for unknown names, wrong shapes or dtypes, and types that cannot be generated.
    """
    feeds, _infos, notes = make_feeds(model, seed=seed, batches=batches, shapes=shapes, value_range=value_range, inputs_npz=inputs_npz)
    return feeds, notes


def make_feeds(
    model: Union[ModelLike, Interface],
    *,
    seed: int = 0,
    batches: int = 1,
    shapes: Optional[Mapping[str, Sequence[int]]] = None,
    value_range: Optional[Tuple[float, float]] = None,
    inputs_npz: Optional[Union[str, "os.PathLike[str]"]] = None,
) -> Tuple[List[Dict[str, np.ndarray]], List["InputInfo"], List[str]]:
    """As :func:`make_inputs`, for a model or an :class:`Interface` already read, and also
    returning what was fed to each input (:class:`InputInfo`, for reports)."""
    iface = read_interface(model) if not isinstance(model, Interface) else model
    if batches < 1:
        raise InputError("--batches must be at least 1")
    if value_range is not None:
        lo, hi = value_range
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise InputError(f"bad value range {value_range!r}: need finite lo < hi")
    npz_batches = _read_npz(inputs_npz, iface) if inputs_npz is not None else []
    if len(npz_batches) == 1 and batches != 1:
        raise InputError("--inputs gives one batch; use --batches 1 with it")
    if npz_batches:
        batches = len(npz_batches)
    npz = npz_batches[0] if npz_batches else {}
    resolved, notes = _resolve_shapes(iface, shapes or {}, npz)
    feeds: List[Dict[str, np.ndarray]] = []
    infos: List[InputInfo] = []
    where = f"npz {os.fspath(inputs_npz)}" if inputs_npz is not None else ""
    for b in range(batches):
        given = npz_batches[b] if npz_batches else {}
        feed = {}
        for index, spec in enumerate(iface.inputs):
            if spec.name in given:
                feed[spec.name] = given[spec.name]
                source = where
            else:
                rng = np.random.default_rng([seed, b, index])
                feed[spec.name], source = _generate(spec, resolved[spec.name], rng, value_range, iface.label)
            if b == 0:
                infos.append(InputInfo(spec.name, _array_dtype_name(feed[spec.name]), list(feed[spec.name].shape), source))
        overridable = {s.name: s for s in iface.overridable}
        for index, name in enumerate(iface.optional_inputs, start=len(iface.inputs)):
            spec = overridable.get(name)
            if name in given:
                feed[name] = given[name]
                if b == 0:
                    infos.append(InputInfo(name, _array_dtype_name(given[name]), list(given[name].shape), where))
            elif spec is not None and b > 0 and is_float_dtype(_np_dtype(spec, iface.label)):
                rng = np.random.default_rng([seed, b, index])
                feed[name], _ = _generate(spec, tuple(spec.dims), rng, value_range, iface.label)
        feeds.append(feed)
    for spec in iface.overridable:
        if spec.name in npz:
            continue
        dtype = _np_dtype(spec, iface.label)
        how = "its default in batch 1, normal(0,1) in the others" if is_float_dtype(dtype) else "its default (not a float: kept)"
        infos.append(InputInfo(spec.name, str(dtype), list(spec.dims), f"overridable initializer: {how}"))
    missing = [s.name for s in iface.inputs if s.name not in npz]
    if npz and missing:
        notes.append(f"input(s) {', '.join(map(repr, missing))} not in {os.fspath(inputs_npz)}: generated")
    return feeds, infos, notes


def _array_dtype_name(arr: np.ndarray) -> str:
    return str(arr.dtype)


def _resolve_shapes(iface: Interface, shapes: Mapping[str, Sequence[int]], npz: Mapping[str, np.ndarray]):
    """Concrete shape for each input to generate; notes for every dim bnfold chose."""
    input_names = {s.name for s in iface.inputs} | set(iface.optional_inputs)
    symbols: Dict[str, int] = {}
    all_symbols = {d for s in iface.inputs if s.dims for d in s.dims if isinstance(d, str)}
    for name, dims in shapes.items():
        if name in input_names:
            continue
        if name in all_symbols:
            if len(tuple(dims)) != 1:
                raise InputError(f"--shape {name}: '{name}' is a dynamic dimension; give one value, such as {name}:8")
            symbols[name] = int(tuple(dims)[0])
            continue
        known = ", ".join(sorted(input_names)) or "none"
        raise InputError(f"--shape names '{name}', which is neither an input nor a dynamic dimension of the model (inputs: {known})")
    # Symbols bound by explicitly shaped inputs or npz arrays bind the same symbol elsewhere.
    for spec in iface.inputs:
        given = shapes.get(spec.name)
        given = tuple(npz[spec.name].shape) if spec.name in npz else given
        if given is not None and spec.dims is not None and len(spec.dims) == len(tuple(given)):
            for d, v in zip(spec.dims, given):
                if isinstance(d, str):
                    symbols.setdefault(d, int(v))
    resolved: Dict[str, Shape] = {}
    notes: List[str] = []
    for spec in iface.inputs:
        if spec.name in npz:
            resolved[spec.name] = tuple(npz[spec.name].shape)
            continue
        if spec.name in shapes:
            resolved[spec.name] = _explicit_shape(spec, tuple(int(v) for v in shapes[spec.name]))
            continue
        if spec.dims is None:
            raise InputError(f"input '{spec.name}' has no shape in the model; give one with --shape {spec.name}:DIMS")
        dims, chosen = _default_dims(spec, symbols)
        resolved[spec.name] = tuple(dims)
        if chosen:
            text = dims_text(dims)
            notes.append(
                f"dynamic dims of input '{spec.name}' set to {', '.join(chosen)} (shape {text}); "
                f"use --shape {spec.name}:{text} to choose"
            )
    return resolved, notes


def _default_dims(spec: TensorSpec, symbols: Dict[str, int]) -> Tuple[List[int], List[str]]:
    """Fill the dynamic dims of ``spec`` (binding new symbols in ``symbols``); list the choices made."""
    dims: List[int] = []
    chosen: List[str] = []
    for axis, d in enumerate(spec.dims or []):
        if isinstance(d, int):
            dims.append(d)
        elif isinstance(d, str) and d in symbols:
            dims.append(symbols[d])
        else:
            value = DEFAULT_BATCH_DIM if axis == 0 else DEFAULT_OTHER_DIM
            if isinstance(d, str):
                symbols[d] = value
            chosen.append(f"{d if isinstance(d, str) else f'dim {axis}'}={value}")
            dims.append(value)
    return dims, chosen


def _explicit_shape(spec: TensorSpec, given: Shape) -> Shape:
    if spec.dims is not None:
        if len(spec.dims) != len(given):
            raise InputError(
                f"--shape {spec.name}: rank {len(given)} given, the model's input has rank {len(spec.dims)} ({dims_text(spec.dims)})"
            )
        for axis, (d, v) in enumerate(zip(spec.dims, given)):
            if isinstance(d, int) and d != v:
                raise InputError(f"--shape {spec.name}: dim {axis} is {v}, the model fixes it to {d} ({dims_text(spec.dims)})")
    return given



# Generated inputs larger than this many elements (1 GiB of float32) are refused rather than
# allocated: a model may declare any size, and a CI machine should not be exhausted by it.
MAX_INPUT_ELEMENTS = 1 << 28


def _check_generated_shape(spec: TensorSpec, shape: Shape) -> None:
    if any(d < 0 for d in shape):
        raise InputError(f"input '{spec.name}' has a negative dimension {list(shape)}; set it with --shape")
    count = math.prod(shape)
    if count > MAX_INPUT_ELEMENTS:
        raise LimitError(
            f"input '{spec.name}' of shape {list(shape)} has {count} elements, over bnfold's limit of "
            f"{MAX_INPUT_ELEMENTS}; give a smaller shape with --shape or real inputs with --inputs"
        )


def _generate(spec: TensorSpec, shape: Shape, rng, value_range, label: str) -> Tuple[np.ndarray, str]:
    array, how = _generate_any(spec, tuple(shape), rng, value_range, label)
    return np.asarray(array), how  # a 0-d result must stay an array (onnxruntime refuses numpy scalars)


def _generate_any(spec: TensorSpec, shape: Shape, rng, value_range, label: str) -> Tuple[np.ndarray, str]:
    _check_generated_shape(spec, shape)
    dtype = _np_dtype(spec, label)
    if is_float_dtype(dtype):
        if value_range is None:
            return rng.standard_normal(shape).astype(dtype), "normal(0,1)"
        lo, hi = value_range
        return rng.uniform(lo, hi, shape).astype(dtype), f"uniform[{lo:g},{hi:g})"
    if dtype == np.bool_:
        return rng.random(shape) < 0.5, "bernoulli(0.5)"
    if dtype.kind in "iu":
        lo, hi = DEFAULT_INT_RANGE if value_range is None else (math.ceil(value_range[0]), math.floor(value_range[1]))
        info = np.iinfo(dtype)
        lo, hi = max(lo, info.min), min(hi, info.max)
        if lo > hi:
            raise InputError(f"input '{spec.name}' ({dtype}): the value range holds no {dtype} value")
        return rng.integers(lo, hi, size=shape, endpoint=True).astype(dtype), f"integers[{lo},{hi}]"
    raise InputError(f"input '{spec.name}' has type {spec.dtype_name}, which bnfold cannot generate; give it with --inputs FILE.npz")


def _np_dtype(spec: TensorSpec, label: str) -> np.dtype:
    import onnx

    if spec.elem_type == onnx.TensorProto.STRING:
        raise InputError(f"input '{spec.name}' is a string tensor, which bnfold cannot generate; give it with --inputs FILE.npz")
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(spec.elem_type))
    except Exception:
        raise InputError(f"{label}: input '{spec.name}' has an element type ({spec.elem_type}) bnfold does not know") from None



BATCH_KEY = re.compile(r"batch(\d+)/(.+)")  # several batches in one .npz: 'batch0/x', 'batch1/x', ...


def _read_npz(path, iface: Interface) -> List[Dict[str, np.ndarray]]:
    """The arrays of an .npz, one dict per batch: plain names are one batch; names written as
    ``batchN/NAME`` (as ``--save-inputs`` writes several batches) are batch N."""
    path = os.fspath(path)
    check_path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:
        raise InputError(f"{path}: cannot read as .npz ({one_line(str(exc)) or type(exc).__name__})") from None
    split = {k: BATCH_KEY.fullmatch(k) for k in arrays}
    if arrays and all(split.values()):
        count = 1 + max(int(m.group(1)) for m in split.values())
        batches: List[Dict[str, np.ndarray]] = [{} for _ in range(count)]
        for key, m in split.items():
            batches[int(m.group(1))][m.group(2)] = arrays[key]
        return [_check_npz(path, b, iface) for b in batches]
    return [_check_npz(path, arrays, iface)]


def _check_npz(path: str, arrays: Dict[str, np.ndarray], iface: Interface) -> Dict[str, np.ndarray]:
    specs = {s.name: s for s in iface.inputs}
    allowed = set(specs) | set(iface.optional_inputs)
    unknown = sorted(set(arrays) - allowed)
    if unknown:
        raise InputError(
            f"{path}: array(s) {', '.join(map(repr, unknown))} match no input of {iface.label} (inputs: {', '.join(sorted(specs)) or 'none'})"
        )
    out = {}
    for name, arr in arrays.items():
        spec = specs.get(name)
        out[name] = _check_npz_array(path, name, arr, spec, iface.label) if spec else arr
    return out


def _check_npz_array(path: str, name: str, arr: np.ndarray, spec: TensorSpec, label: str) -> np.ndarray:
    want = _np_dtype(spec, label) if spec.elem_type else arr.dtype
    if want.name == "bfloat16" and arr.dtype.itemsize == 2 and arr.dtype.kind in "uV":
        arr = arr.view(want)  # numpy stores bfloat16 as raw 2-byte values in .npz
    if arr.dtype != want:
        raise InputError(f"{path}: array '{name}' is {arr.dtype}, input '{name}' of {label} is {want}")
    if spec.dims is not None:
        if arr.ndim != len(spec.dims) or any(isinstance(d, int) and d != v for d, v in zip(spec.dims, arr.shape)):
            raise InputError(
                f"{path}: array '{name}' has shape {dims_text(arr.shape)}, input '{name}' of {label} needs {dims_text(spec.dims)}"
            )
    return arr



def save_npz(path: Union[str, "os.PathLike[str]"], batches: Sequence[Mapping[str, np.ndarray]]) -> None:
    """Write arrays to an .npz: plain names for one batch, ``batchN/NAME`` for several (the
    form ``--inputs`` reads back). bfloat16 arrays are stored as their raw 16-bit values."""
    arrays: Dict[str, np.ndarray] = {}
    for b, batch in enumerate(batches):
        for name, value in batch.items():
            value = np.asarray(value)
            if value.dtype.name == "bfloat16":
                value = value.view(np.uint16)
            arrays[name if len(batches) == 1 else f"batch{b}/{name}"] = value
    path = os.fspath(path)
    try:
        with open(path, "wb") as handle:
            np.savez(handle, **arrays)
    except OSError as exc:
        from ..errors import OutputError

        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None

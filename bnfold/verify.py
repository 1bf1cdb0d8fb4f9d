"""Equivalence checks with onnxruntime: run two models on the same inputs, compare every output.

The comparison rule (one rule, used everywhere, stated in every report)::

    an element fails  iff  |folded - original| > atol + rtol * |original|      (in float64)

``original`` is the reference model's output. NaN must sit at the same positions in both
outputs, and +-inf must match exactly; such a difference counts as a failing element.

Tolerances. Folding a BatchNorm changes the order of floating-point rounding, so a correct
fold is not bit-exact, and the rounding error grows with the magnitude of the values the
network computes, not with each output element (an element near zero can carry the error of
its large neighbours). So the default ``atol`` is *relative to the output's scale*::

    scale = max |original| over the output's finite elements (1 if all are zero)
    atol  = k_atol(dtype) * scale,      rtol = k_rtol(dtype)

with ``(k_atol, k_rtol)`` = (1e-9, 1e-9) for float64, (1e-4, 1e-4) for float32, (1e-2, 1e-2)
for float16 and (5e-2, 5e-2) for bfloat16; integer and bool outputs must be equal. For
float32 that leaves ~100x headroom over the ~1e-6 relative error of a correct fold of a deep
network, while any real folding bug (wrong axis, wrong channel, forgotten bias or epsilon
ignored on a small variance) moves outputs by 1e-2 of their scale or more. An ``atol`` given
by the caller (globally or per output) is absolute and is used as it is.

``max_rel_err`` in the statistics is ``max |folded - original| / scale``.

onnxruntime is imported inside functions only, so ``import bnfold`` stays light.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import ExternalDataError, InputError, LimitError

RULE = "element fails iff |folded - original| > atol + rtol*|original| (float64); NaN positions and infinities must match"
SCALE_RULE = "default atol = k_atol(dtype) * scale, scale = max |original| over finite elements (1 if all zero)"

# dtype name -> (k_atol, relative to the output's scale; rtol). See the module docstring.
DEFAULT_TOLERANCES: Dict[str, Tuple[float, float]] = {
    "float64": (1e-9, 1e-9),
    "float32": (1e-4, 1e-4),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}
# Any other float type (float8 variants): loose, these carry 2 to 3 mantissa bits.
_OTHER_FLOAT_TOLERANCE = (2.5e-1, 2.5e-1)

OPT_LEVELS = ("disable", "basic", "extended", "all")
PROVIDERS = ("cpu", "cuda")

# Dynamic dimensions without a value: the first axis is taken as a batch (1), others get 32
# (enough for a few stride-2 stages of a conv net, small enough to stay fast).
DEFAULT_BATCH_DIM = 1
DEFAULT_OTHER_DIM = 32
DEFAULT_INT_RANGE = (0, 9)  # inclusive; small non-negative ints are valid indices for most gathers

ModelLike = Union[str, "os.PathLike[str]", Any]  # a path or an onnx.ModelProto
Shape = Tuple[int, ...]

CUDA_HELP = (
    "`--provider cuda` needs the onnxruntime-gpu package and an NVIDIA GPU with CUDA/cuDNN: "
    "`pip uninstall -y onnxruntime && pip install onnxruntime-gpu`"
)


# --------------------------------------------------------------------------------------------
# Reading a model's interface


@dataclass
class TensorSpec:
    """A graph input or output: name, ONNX element type, and dims (int, symbol str, or None)."""

    name: str
    elem_type: int
    dims: Optional[List[Union[int, str, None]]]  # None: no shape information at all

    @property
    def dtype_name(self) -> str:
        return _elem_type_name(self.elem_type)


@dataclass
class _Interface:
    inputs: List[TensorSpec]  # inputs the caller must feed (initializer-backed ones left out)
    optional_inputs: List[str]  # inputs with an initializer default
    outputs: List[TensorSpec]
    label: str


def _elem_type_name(elem_type: int) -> str:
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


def _check_path(path: str) -> None:
    from .onnx_io import check_readable  # one wording for every command

    check_readable(path)


def _load_proto(model: ModelLike):
    """The ModelProto without external data (only the interface is needed). Raises InputError."""
    import onnx

    if not isinstance(model, (str, os.PathLike)):
        if isinstance(model, onnx.ModelProto):
            return model
        raise InputError(f"expected a path or an onnx.ModelProto, got {type(model).__name__}")
    from .onnx_io import read_model  # the fold's own parser: same checks, same messages

    return read_model(os.fspath(model), load_external=False)[0]


def _interface(model: ModelLike) -> _Interface:
    proto = _load_proto(model)
    graph = proto.graph
    init_names = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    inputs, optional = [], []
    for vi in graph.input:
        if vi.name in init_names:
            optional.append(vi.name)
        else:
            inputs.append(_spec(vi, model_label(model)))
    outputs = [_spec(vi, model_label(model), strict=False) for vi in graph.output]
    return _Interface(inputs, optional, outputs, model_label(model))


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
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return TensorSpec(vi.name, tt.elem_type, dims)


# --------------------------------------------------------------------------------------------
# Parsing the CLI's small syntaxes (kept here so the CLI stays thin and the API can reuse them)


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


def parse_atol(values: Iterable[str]) -> Tuple[Optional[float], Dict[str, float]]:
    """``["1e-3", "logits:0.01"]`` -> ``(1e-3, {"logits": 0.01})``. Raises InputError."""
    global_atol: Optional[float] = None
    per_output: Dict[str, float] = {}
    for text in values:
        name, sep, value = text.rpartition(":")
        number = _tolerance_value(value, f"--atol {text!r}")
        if sep:
            if not name:
                raise InputError(f"bad --atol {text!r}: expected VALUE or NAME:VALUE")
            per_output[name] = number
        else:
            global_atol = number
    return global_atol, per_output


def _tolerance_value(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"bad {what}: {text!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise InputError(f"bad {what}: tolerance must be finite and >= 0")
    return value


# --------------------------------------------------------------------------------------------
# Inputs


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
    feeds, _infos, notes = _make_inputs(model, seed, batches, shapes, value_range, inputs_npz)
    return feeds, notes


def _make_inputs(model, seed, batches, shapes, value_range, inputs_npz):
    iface = _interface(model) if not isinstance(model, _Interface) else model
    if batches < 1:
        raise InputError("--batches must be at least 1")
    if value_range is not None:
        lo, hi = value_range
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise InputError(f"bad value range {value_range!r}: need finite lo < hi")
    npz = _read_npz(inputs_npz, iface) if inputs_npz is not None else {}
    if npz and batches != 1:
        raise InputError("--inputs gives one batch; use --batches 1 with it")
    resolved, notes = _resolve_shapes(iface, shapes or {}, npz)
    feeds: List[Dict[str, np.ndarray]] = []
    infos: List[InputInfo] = []
    for b in range(batches):
        feed = {}
        for index, spec in enumerate(iface.inputs):
            if spec.name in npz:
                feed[spec.name] = npz[spec.name]
                source = f"npz {os.fspath(inputs_npz)}"
            else:
                rng = np.random.default_rng([seed, b, index])
                feed[spec.name], source = _generate(spec, resolved[spec.name], rng, value_range, iface.label)
            if b == 0:
                infos.append(InputInfo(spec.name, _array_dtype_name(feed[spec.name]), list(feed[spec.name].shape), source))
        for name in iface.optional_inputs:
            if name in npz:
                feed[name] = npz[name]
                if b == 0:
                    infos.append(InputInfo(name, _array_dtype_name(npz[name]), list(npz[name].shape), f"npz {os.fspath(inputs_npz)}"))
        feeds.append(feed)
    missing = [s.name for s in iface.inputs if s.name not in npz]
    if npz and missing:
        notes.append(f"input(s) {', '.join(map(repr, missing))} not in {os.fspath(inputs_npz)}: generated")
    return feeds, infos, notes


def _array_dtype_name(arr: np.ndarray) -> str:
    return str(arr.dtype)


def _resolve_shapes(iface: _Interface, shapes: Mapping[str, Sequence[int]], npz: Mapping[str, np.ndarray]):
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
            text = _dims_text(dims)
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
                f"--shape {spec.name}: rank {len(given)} given, the model's input has rank {len(spec.dims)} ({_dims_text(spec.dims)})"
            )
        for axis, (d, v) in enumerate(zip(spec.dims, given)):
            if isinstance(d, int) and d != v:
                raise InputError(f"--shape {spec.name}: dim {axis} is {v}, the model fixes it to {d} ({_dims_text(spec.dims)})")
    return given


def _dims_text(dims) -> str:
    return "x".join("?" if d is None else str(d) for d in dims) or "scalar"


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
    if _is_float_dtype(dtype):
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


def _is_float_dtype(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype.name == "bfloat16" or dtype.name.startswith("float8")


def _read_npz(path, iface: _Interface) -> Dict[str, np.ndarray]:
    path = os.fspath(path)
    _check_path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:
        raise InputError(f"{path}: cannot read as .npz ({_one_line(str(exc)) or type(exc).__name__})") from None
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
                f"{path}: array '{name}' has shape {_dims_text(arr.shape)}, input '{name}' of {label} needs {_dims_text(spec.dims)}"
            )
    return arr


# --------------------------------------------------------------------------------------------
# Running with onnxruntime


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise InputError("onnxruntime is not installed: `pip install onnxruntime` (or onnxruntime-gpu)") from None
    return ort


def _one_line(text: str, limit: int = 400) -> str:
    """ORT messages span lines and carry C++ file positions; keep one readable line."""
    text = re.sub(r"\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*", "", text)
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _opt_level(ort, ort_opt: str):
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if ort_opt not in levels:
        raise InputError(f"unknown ORT optimization level {ort_opt!r}; choose one of {', '.join(OPT_LEVELS)}")
    return levels[ort_opt]


def _providers(ort, provider: str, tf32: bool) -> list:
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise InputError(f"CUDAExecutionProvider is not available (onnxruntime has: {', '.join(available)}); {CUDA_HELP}")
        # TF32 rounds float32 matmul/conv inputs to 10 mantissa bits: off for comparisons.
        return [("CUDAExecutionProvider", {"use_tf32": "1" if tf32 else "0"}), "CPUExecutionProvider"]
    raise InputError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")


class OrtRunner:
    """One onnxruntime session for one model; ``run(feeds)`` returns ``{output name: array}``.

    ``model`` is a path (loaded by path, so external data next to it is found) or a ModelProto.
    Raises InputError / ExternalDataError with one line for anything onnxruntime refuses.
    """

    def __init__(
        self,
        model: ModelLike,
        *,
        ort_opt: str = "disable",
        provider: str = "cpu",
        threads: Optional[int] = None,
        tf32: bool = False,
        label: Optional[str] = None,
    ) -> None:
        ort = _import_ort()
        self.label = label or model_label(model)
        self.provider = provider
        self.ort_opt = ort_opt
        options = ort.SessionOptions()
        options.graph_optimization_level = _opt_level(ort, ort_opt)
        options.log_severity_level = 3  # errors only: ORT's warnings are noise on a user's terminal
        if threads is not None:
            if threads < 1:
                raise InputError("--threads must be at least 1")
            options.intra_op_num_threads = int(threads)
        providers = _providers(ort, provider, tf32)
        source = self._source(model)
        start = time.perf_counter()
        try:
            self.session = ort.InferenceSession(source, options, providers=providers)
        except MemoryError:
            raise
        except Exception as exc:
            raise _load_error(self.label, exc) from None
        self.create_seconds = time.perf_counter() - start
        self.providers_used = list(self.session.get_providers())
        if provider == "cuda" and self.providers_used[:1] != ["CUDAExecutionProvider"]:
            raise InputError(f"{self.label}: onnxruntime fell back to {self.providers_used[0]} (CUDA libraries missing?); {CUDA_HELP}")
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._bf16 = any(o.type == "tensor(bfloat16)" for o in self.session.get_outputs()) or any(
            i.type == "tensor(bfloat16)" for i in self.session.get_inputs()
        )

    def _source(self, model: ModelLike):
        if isinstance(model, (str, os.PathLike)):
            path = os.fspath(model)
            _check_path(path)
            return path
        try:
            return model.SerializeToString()
        except Exception as exc:  # e.g. a proto over 2 GiB
            raise InputError(f"{self.label}: cannot serialize the model for onnxruntime ({_one_line(str(exc))}); save it with external data and pass the path") from None

    def run(self, feeds: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        try:
            if self._bf16:
                return self._run_ort_values(feeds)
            values = self.session.run(None, dict(feeds))
        except (MemoryError, InputError):
            raise
        except Exception as exc:
            raise InputError(f"{self.label}: onnxruntime failed to run the model: {_one_line(str(exc))}") from None
        out = {}
        for name, value in zip(self.output_names, values):
            if not isinstance(value, np.ndarray):
                raise InputError(f"{self.label}: output '{name}' is not a tensor; bnfold compares tensor outputs only")
            out[name] = value
        return out

    def _run_ort_values(self, feeds):
        """bfloat16 has no numpy type in ORT's bindings: pass OrtValues and copy raw bytes back."""
        ort = _import_ort()
        values = {}
        for name, arr in feeds.items():
            if arr.dtype.name == "bfloat16":
                import onnx

                values[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                    np.ascontiguousarray(arr).view(np.uint16), onnx.TensorProto.BFLOAT16
                )
            else:
                values[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr))
        results = self.session.run_with_ort_values(None, values)
        return {name: _ortvalue_to_numpy(v, name, self.label) for name, v in zip(self.output_names, results)}


def _ortvalue_to_numpy(value, name: str, label: str) -> np.ndarray:
    if not value.is_tensor():
        raise InputError(f"{label}: output '{name}' is not a tensor; bnfold compares tensor outputs only")
    if value.data_type() != "tensor(bfloat16)":
        return value.numpy()
    import ctypes

    import ml_dtypes

    shape = tuple(value.shape())
    count = int(np.prod(shape, dtype=np.int64))
    raw = (ctypes.c_uint16 * count).from_address(value.data_ptr()) if count else []
    return np.array(raw, dtype=np.uint16).view(ml_dtypes.bfloat16).reshape(shape)


def _load_error(label: str, exc: Exception) -> Exception:
    message = _one_line(str(exc))
    if "external" in message.lower():
        return ExternalDataError(f"{label}: onnxruntime cannot read external data: {message}")
    return InputError(f"{label}: onnxruntime cannot load the model: {message}")


def run_onnx(
    model: ModelLike,
    feeds: Mapping[str, np.ndarray],
    *,
    ort_opt: str = "disable",
    provider: str = "cpu",
    threads: Optional[int] = None,
) -> Dict[str, np.ndarray]:
    """Run ``model`` (path or ModelProto) once on ``feeds``; return ``{output name: array}``.

    Graph optimizations are off by default, so onnxruntime's own fusions cannot hide a wrong fold.
    Raises InputError (load or run failure, unknown provider) or ExternalDataError.
    """
    return OrtRunner(model, ort_opt=ort_opt, provider=provider, threads=threads).run(feeds)


def ort_version() -> str:
    return _import_ort().__version__


# --------------------------------------------------------------------------------------------
# Comparing


@dataclass
class OutputStats:
    """Comparison of one output over all batches. Errors are in float64."""

    name: str
    passed: bool
    dtype: str
    shape: List[int]
    atol: float = 0.0  # the absolute atol used
    rtol: float = 0.0
    tolerance_source: str = ""  # how atol was chosen
    scale: float = 0.0
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0  # max_abs_err / scale
    mean_abs_err: float = 0.0
    failing: int = 0
    total: int = 0
    nonfinite_mismatch: int = 0  # NaN/inf positions or signs that differ (counted in failing)
    worst: Optional[Dict[str, Any]] = None  # batch, index, original, folded of the largest error
    problem: Optional[str] = None  # a structural difference: missing output, shape or dtype

    def line(self) -> str:
        mark = "ok  " if self.passed else "FAIL"
        head = f"  {mark} {self.name}  {self.dtype} [{_dims_text(self.shape)}]"
        if self.problem:
            return f"{head}  {self.problem}"
        text = (
            f"{head}  max abs {self.max_abs_err:.3g}  max rel {self.max_rel_err:.3g} (scale {self.scale:.3g})"
            f"  mean abs {self.mean_abs_err:.3g}  failing {self.failing}/{self.total}"
            f"  atol {self.atol:.3g} ({self.tolerance_source}) rtol {self.rtol:.3g}"
        )
        if self.nonfinite_mismatch:
            text += f"  NaN/inf mismatches {self.nonfinite_mismatch}"
        if not self.passed and self.worst:
            w = self.worst
            text += f"\n       worst at batch {w['batch']} index {tuple(w['index'])}: original {w['original']:.7g}, folded {w['folded']:.7g}"
        return text


@dataclass
class CheckResult:
    """The verdict of a check: truthy iff every output matched. ``str()`` is the summary."""

    passed: bool
    outputs: List[OutputStats]
    problems: List[str] = field(default_factory=list)  # interface differences, missing outputs
    notes: List[str] = field(default_factory=list)
    rule: str = RULE
    scale_rule: str = SCALE_RULE
    models: Dict[str, str] = field(default_factory=dict)
    inputs: List[InputInfo] = field(default_factory=list)
    seed: Optional[int] = None
    batches: int = 1
    value_range: Optional[Tuple[float, float]] = None
    runtime: Dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.passed)

    @property
    def failed_outputs(self) -> List[OutputStats]:
        return [o for o in self.outputs if not o.passed]

    def summary(self) -> str:
        n = len(self.outputs)
        if self.passed:
            head = f"PASS: all {n} output(s) match"
        else:
            head = f"FAIL: {len(self.failed_outputs)} of {n} output(s) differ" if self.failed_outputs else "FAIL"
        if self.models:
            head += f" ({self.models.get('original', '?')} vs {self.models.get('folded', '?')})"
        lines = [head, f"rule: {self.rule}", f"      {self.scale_rule}"]
        lines.extend(f"  problem: {p}" for p in self.problems)
        lines.extend(o.line() for o in self.outputs)
        if self.inputs:
            feed = ", ".join(f"{i.name} {i.dtype} [{_dims_text(i.shape)}] {i.source}" for i in self.inputs)
            lines.append(f"inputs: {feed}; seed {self.seed}, {self.batches} batch(es)")
        if self.runtime:
            r = self.runtime
            extra = f", intra-op threads {r['threads']}" if r.get("threads") else ""
            tf32 = ", TF32 off" if r.get("provider") == "cuda" else ""
            lines.append(
                f"onnxruntime {r.get('onnxruntime')}, {', '.join(r.get('providers_used', [])) or r.get('provider')}"
                f", graph optimizations: {r.get('graph_optimization')}{extra}{tf32}"
            )
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return f"<CheckResult {'PASS' if self.passed else 'FAIL'}: {len(self.outputs)} output(s)>"

    def to_dict(self) -> Dict[str, Any]:
        return {
            "passed": bool(self.passed),
            "rule": self.rule,
            "scale_rule": self.scale_rule,
            "models": dict(self.models),
            "inputs": {
                "seed": self.seed,
                "batches": self.batches,
                "value_range": list(self.value_range) if self.value_range else None,
                "tensors": [asdict(i) for i in self.inputs],
            },
            "runtime": dict(self.runtime),
            "outputs": [_json_safe(asdict(o)) for o in self.outputs],
            "problems": list(self.problems),
            "notes": list(self.notes),
            "seconds": round(self.seconds, 6),
        }


def _json_safe(obj):
    """NaN and inf are not JSON: write them as strings."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def default_tolerance(dtype_name: str) -> Optional[Tuple[float, float]]:
    """``(k_atol, rtol)`` for a float dtype name; None for exact (integer, bool, string) types."""
    if dtype_name in DEFAULT_TOLERANCES:
        return DEFAULT_TOLERANCES[dtype_name]
    if dtype_name.startswith("float"):
        return _OTHER_FLOAT_TOLERANCE
    return None


def compare_outputs(
    expected: Mapping[str, Any],
    actual: Mapping[str, Any],
    *,
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    per_output: Optional[Mapping[str, Union[float, Tuple[float, float]]]] = None,
) -> CheckResult:
    """Compare outputs by name under the module's rule; ``expected`` is the reference.

    Values are arrays, or lists of arrays (one per batch). ``atol`` (absolute) replaces the
    scaled default for every output; ``per_output`` maps an output name to an absolute atol, or
    to ``(atol, rtol)``, and wins over ``atol``/``rtol``. Outputs present on one side only fail.
    Raises InputError if ``per_output`` names an output that neither side has.
    """
    per_output = dict(per_output or {})
    unknown = sorted(set(per_output) - set(expected) - set(actual))
    if unknown:
        raise InputError(
            f"--atol names output(s) {', '.join(map(repr, unknown))} that the model does not have (outputs: {', '.join(expected)})"
        )
    stats: List[OutputStats] = []
    problems: List[str] = []
    for name, exp in expected.items():
        exp_list = exp if isinstance(exp, (list, tuple)) else [exp]
        exp_list = [np.asarray(e) for e in exp_list]
        if name not in actual:
            problems.append(f"output '{name}' is missing from the folded model")
            stats.append(OutputStats(name, False, str(exp_list[0].dtype), list(exp_list[0].shape), problem="missing from the folded model"))
            continue
        act = actual[name]
        act_list = [np.asarray(a) for a in (act if isinstance(act, (list, tuple)) else [act])]
        override = per_output.get(name)
        o_atol, o_rtol = (override if isinstance(override, tuple) else (override, None)) if override is not None else (None, None)
        stats.append(
            _compare_one(name, exp_list, act_list, o_atol if o_atol is not None else atol, o_rtol if o_rtol is not None else rtol,
                         "given for this output" if o_atol is not None else "given")
        )
    for name in actual:
        if name not in expected:
            problems.append(f"output '{name}' exists only in the folded model")
    passed = all(s.passed for s in stats) and not problems
    return CheckResult(passed=passed, outputs=stats, problems=problems)


def _compare_one(name, exp_list, act_list, atol, rtol, given_text) -> OutputStats:
    exp0 = exp_list[0]
    dtype = str(exp0.dtype)
    base = OutputStats(name, False, dtype, list(exp0.shape))
    if len(exp_list) != len(act_list):
        base.problem = f"{len(exp_list)} batch(es) of original output, {len(act_list)} of folded"
        return base
    for e, a in zip(exp_list, act_list):
        if e.dtype != a.dtype:
            base.problem = f"dtype differs: original {e.dtype}, folded {a.dtype}"
            return base
        if e.shape != a.shape:
            base.problem = f"shape differs: original [{_dims_text(e.shape)}], folded [{_dims_text(a.shape)}]"
            return base
    tol = default_tolerance(dtype) if _is_float_dtype(exp0.dtype) else None
    if tol is None and (exp0.dtype.kind in "iub" or exp0.dtype.kind in "USO"):
        return _compare_exact(base, exp_list, act_list)
    if tol is None:
        tol = _OTHER_FLOAT_TOLERANCE
    return _compare_float(base, exp_list, act_list, tol, atol, rtol, given_text)


def _compare_exact(stats: OutputStats, exp_list, act_list) -> OutputStats:
    """Integers, bools, strings: every element must be equal."""
    failing = sum(int(np.count_nonzero(e != a)) for e, a in zip(exp_list, act_list))
    total = sum(int(e.size) for e in exp_list)
    stats.tolerance_source = "exact (integer/bool)"
    stats.failing, stats.total = failing, total
    if stats.dtype not in ("object",) and exp_list[0].dtype.kind in "iub" and total:
        diffs = [np.abs(e.astype(np.float64) - a.astype(np.float64)) for e, a in zip(exp_list, act_list)]
        flat = np.concatenate([d.ravel() for d in diffs])
        stats.max_abs_err = float(flat.max())
        stats.mean_abs_err = float(flat.mean())
        scale = float(max(np.abs(e.astype(np.float64)).max() if e.size else 0.0 for e in exp_list)) or 1.0
        stats.scale = scale
        stats.max_rel_err = stats.max_abs_err / scale
        if failing:
            stats.worst = _worst(diffs, exp_list, act_list)
    stats.passed = failing == 0
    return stats


def _compare_float(stats: OutputStats, exp_list, act_list, tol, atol, rtol, given_text) -> OutputStats:
    e = np.concatenate([x.astype(np.float64).ravel() for x in exp_list])
    a = np.concatenate([x.astype(np.float64).ravel() for x in act_list])
    finite_e = np.isfinite(e)
    scale = float(np.abs(e[finite_e]).max()) if finite_e.any() else 0.0
    scale = scale if scale > 0 else 1.0
    k_atol, k_rtol = tol
    if atol is None:
        stats.atol = k_atol * scale
        stats.tolerance_source = f"{k_atol:g} x scale, default for {stats.dtype}"
    else:
        stats.atol = float(atol)
        stats.tolerance_source = given_text
    stats.rtol = float(k_rtol if rtol is None else rtol)
    both = finite_e & np.isfinite(a)
    nan_mismatch = np.isnan(e) != np.isnan(a)
    # Infinities (and a finite value against an infinity) must be equal; NaN==NaN is handled above.
    other_nonfinite = ~both & ~np.isnan(e) & ~np.isnan(a) & (e != a)
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: masked out just below
        diff = np.where(both, np.abs(a - e), 0.0)
    bad = both & (diff > stats.atol + stats.rtol * np.abs(e))
    stats.nonfinite_mismatch = int(np.count_nonzero(nan_mismatch | other_nonfinite))
    stats.failing = int(np.count_nonzero(bad)) + stats.nonfinite_mismatch
    stats.total = int(e.size)
    stats.scale = scale
    stats.max_abs_err = float(diff.max()) if diff.size else 0.0
    stats.max_rel_err = stats.max_abs_err / scale
    stats.mean_abs_err = float(diff[both].mean()) if both.any() else 0.0
    stats.passed = stats.failing == 0
    if stats.failing:
        score = np.where(nan_mismatch | other_nonfinite, np.inf, diff)
        stats.worst = _worst_flat(int(np.argmax(score)), exp_list, e, a)
    return stats


def _worst(diffs, exp_list, act_list) -> Dict[str, Any]:
    flat = np.concatenate([d.ravel() for d in diffs])
    e = np.concatenate([x.astype(np.float64).ravel() for x in exp_list])
    a = np.concatenate([x.astype(np.float64).ravel() for x in act_list])
    return _worst_flat(int(np.argmax(flat)), exp_list, e, a)


def _worst_flat(flat_index: int, exp_list, e: np.ndarray, a: np.ndarray) -> Dict[str, Any]:
    """Turn an index into the concatenated batches back into (batch, index within the output)."""
    offset = 0
    for batch, x in enumerate(exp_list):
        if flat_index < offset + x.size:
            index = np.unravel_index(flat_index - offset, x.shape) if x.shape else ()
            return {"batch": batch, "index": [int(i) for i in index], "original": float(e[flat_index]), "folded": float(a[flat_index])}
        offset += x.size
    return {"batch": 0, "index": [], "original": float("nan"), "folded": float("nan")}


# --------------------------------------------------------------------------------------------
# check()


def check(
    original: ModelLike,
    folded: ModelLike,
    *,
    seed: int = 0,
    batches: int = 1,
    shapes: Optional[Mapping[str, Sequence[int]]] = None,
    value_range: Optional[Tuple[float, float]] = None,
    inputs_npz: Optional[Union[str, "os.PathLike[str]"]] = None,
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    per_output_atol: Optional[Mapping[str, float]] = None,
    ort_opt: str = "disable",
    provider: str = "cpu",
    threads: Optional[int] = None,
    labels: Optional[Tuple[str, str]] = None,
) -> CheckResult:
    """Run both models (paths or ModelProtos) on the same seeded inputs; compare every output.

    ``labels`` names the two models in messages and reports (default: their paths), e.g. when
    ``folded`` is a temporary file that will be renamed.

    Returns a CheckResult, truthy iff every output matches under :data:`RULE` (see the module
    docstring for the default tolerances). Inputs are made from the *original* model's interface;
    if the folded model needs other inputs, the result fails with that as its problem.
    Raises InputError / ExternalDataError when a model cannot be loaded or run, or when the
    options (shapes, npz, tolerances, provider) do not fit.
    """
    start = time.perf_counter()
    orig_iface = _interface(original)
    fold_iface = _interface(folded)
    if labels is not None:
        orig_iface.label, fold_iface.label = labels
    unknown = sorted(set(per_output_atol or {}) - {o.name for o in orig_iface.outputs})
    if unknown:  # fail before running anything
        raise InputError(
            f"--atol names output(s) {', '.join(map(repr, unknown))} that {orig_iface.label} does not have "
            f"(outputs: {', '.join(o.name for o in orig_iface.outputs)})"
        )
    feeds, infos, notes = _make_inputs(orig_iface, seed, batches, shapes, value_range, inputs_npz)
    result_meta = dict(
        notes=notes,
        models={"original": orig_iface.label, "folded": fold_iface.label},
        inputs=infos,
        seed=None if inputs_npz is not None and all(i.source.startswith("npz") for i in infos) else seed,
        batches=batches,
        value_range=tuple(value_range) if value_range else None,
    )
    problems = _interface_problems(orig_iface, fold_iface)
    if problems:
        return CheckResult(passed=False, outputs=[], problems=problems, seconds=time.perf_counter() - start, **result_meta)
    runners = [
        OrtRunner(m, ort_opt=ort_opt, provider=provider, threads=threads, label=iface.label)
        for m, iface in ((original, orig_iface), (folded, fold_iface))
    ]
    expected: Dict[str, List[np.ndarray]] = {}
    actual: Dict[str, List[np.ndarray]] = {}
    for feed in feeds:
        for runner, sink in zip(runners, (expected, actual)):
            try:
                outputs = runner.run(feed)
            except InputError as exc:
                raise InputError(_with_shape_hint(str(exc), notes)) from None
            for name, value in outputs.items():
                sink.setdefault(name, []).append(value)
    result = compare_outputs(expected, actual, atol=atol, rtol=rtol, per_output=per_output_atol)
    result.runtime = {
        "onnxruntime": ort_version(),
        "provider": provider,
        "providers_used": runners[0].providers_used,
        "graph_optimization": ort_opt,
        "threads": threads,
        "tf32": False if provider == "cuda" else None,
    }
    for key, value in result_meta.items():
        setattr(result, key, value)
    result.seconds = time.perf_counter() - start
    return result


def _with_shape_hint(message: str, notes: List[str]) -> str:
    chosen = [n.split(";")[0] for n in notes if n.startswith("dynamic dims")]
    if not chosen:
        return message
    return f"{message} ({'; '.join(chosen)} by bnfold: set them with --shape)"


def _interface_problems(orig: _Interface, fold: _Interface) -> List[str]:
    """A fold must keep the model's inputs: the same names and element types."""
    problems = []
    want = {s.name: s for s in orig.inputs}
    have = {s.name: s for s in fold.inputs}
    for name, spec in want.items():
        if name not in have and name not in fold.optional_inputs:
            problems.append(f"input '{name}' of the original model is missing from the folded model")
        elif name in have and have[name].elem_type != spec.elem_type:
            problems.append(f"input '{name}' is {spec.dtype_name} in the original model, {have[name].dtype_name} in the folded model")
    for name in have:
        if name not in want:
            problems.append(f"the folded model needs input '{name}', which the original model does not have")
    return problems

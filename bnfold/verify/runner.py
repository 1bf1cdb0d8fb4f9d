"""Running a model with onnxruntime: one session per model, one-line errors, bfloat16 I/O.

onnxruntime is imported inside functions only, so ``import bnfold`` stays light.
"""

from __future__ import annotations

import os
import time
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from ..errors import ExternalDataError, InputError
from .interface import ModelLike, check_path, load_proto, model_label, one_line

OPT_LEVELS = ("disable", "basic", "extended", "all")
PROVIDERS = ("cpu", "cuda")

CUDA_HELP = (
    "`--provider cuda` needs the onnxruntime-gpu package and an NVIDIA GPU with CUDA/cuDNN: "
    "`pip uninstall -y onnxruntime && pip install onnxruntime-gpu`"
)



_QUIET = False


def import_ort():
    """onnxruntime, with its process-wide logger silenced: its ``[E:onnxruntime:...]`` lines would
    reach the user's terminal beside bnfold's own one-line message for the same failure."""
    global _QUIET
    try:
        import onnxruntime as ort
    except ImportError:
        raise InputError("onnxruntime is not installed: `pip install onnxruntime` (or onnxruntime-gpu)") from None
    if not _QUIET:
        ort.set_default_logger_severity(4)  # fatal only; errors come back as exceptions
        _QUIET = True
    return ort


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
        extra_outputs: Sequence[str] = (),
        external_folder: Optional[str] = None,
        relax_zero_dims: bool = False,
    ) -> None:
        ort = import_ort()
        self.label = label or model_label(model)
        self.provider = provider
        self.ort_opt = ort_opt
        options = ort.SessionOptions()
        options.graph_optimization_level = _opt_level(ort, ort_opt)
        options.log_severity_level = 4  # errors reach the user as bnfold's one-line message, not ORT's log
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = 4
        if threads is not None:
            if threads < 1:
                raise InputError("--threads must be at least 1")
            options.intra_op_num_threads = int(threads)
        providers = _providers(ort, provider, tf32)
        if external_folder is not None:  # a ModelProto whose external data lives beside a file
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", external_folder)
        if extra_outputs or relax_zero_dims:
            source = self._with_outputs(model, extra_outputs, options, relax_zero_dims)
        else:
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
        if isinstance(model, bytes):  # already serialized
            return model
        if isinstance(model, (str, os.PathLike)):
            path = os.fspath(model)
            check_path(path)
            return path
        try:
            return model.SerializeToString()
        except Exception as exc:  # e.g. a proto over 2 GiB
            raise InputError(f"{self.label}: cannot serialize the model for onnxruntime ({one_line(str(exc))}); save it with external data and pass the path") from None

    def _with_outputs(self, model: ModelLike, names: Sequence[str], options, relax_zero_dims: bool = False):
        """A private in-memory copy that also returns ``names`` (and, with ``relax_zero_dims``,
        whose input dims written as 0 are unknown); a model on disk keeps reading its external
        data from its own folder. The model file is never written."""
        from .sites import with_outputs

        if isinstance(model, bytes):
            return model + _outputs_tail(model, names)
        if isinstance(model, (str, os.PathLike)):
            check_path(os.fspath(model))
            folder = os.path.dirname(os.path.abspath(os.fspath(model)))
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
            if not relax_zero_dims:
                data = _file_with_outputs(os.fspath(model), names, self.label)
                if data is not None:
                    return data
            model = load_proto(model)
        copy = with_outputs(model, names)
        if relax_zero_dims:
            inits = {t.name for t in copy.graph.initializer}
            for vi in copy.graph.input:
                if vi.name in inits:
                    continue
                for i, d in enumerate(vi.type.tensor_type.shape.dim):
                    if d.HasField("dim_value") and d.dim_value == 0:
                        d.Clear()
                        d.dim_param = f"unknown_{vi.name}_{i}"
        return self._source(copy)

    def run(self, feeds: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        try:
            if self._bf16:
                return self._run_ort_values(feeds)
            values = self.session.run(None, dict(feeds), self._run_options)
        except (MemoryError, InputError):
            raise
        except Exception as exc:
            raise InputError(f"{self.label}: onnxruntime failed to run the model: {one_line(str(exc))}") from None
        out = {}
        for name, value in zip(self.output_names, values):
            if not isinstance(value, np.ndarray):
                raise InputError(f"{self.label}: output '{name}' is not a tensor; bnfold compares tensor outputs only")
            out[name] = value
        return out

    def _run_ort_values(self, feeds):
        """bfloat16 has no numpy type in ORT's bindings: pass OrtValues and copy raw bytes back."""
        ort = import_ort()
        values = {}
        for name, arr in feeds.items():
            if arr.dtype.name == "bfloat16":
                import onnx

                values[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                    np.ascontiguousarray(arr).view(np.uint16), onnx.TensorProto.BFLOAT16
                )
            else:
                values[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr))
        results = self.session.run_with_ort_values(None, values, self._run_options)
        return {name: _ortvalue_to_numpy(v, name, self.label) for name, v in zip(self.output_names, results)}


def _file_with_outputs(path: str, names: Sequence[str], label: str) -> Optional[bytes]:
    """The file's bytes followed by a ModelProto that holds only ``graph.output`` entries named
    ``names``: protobuf merges a repeated message field by appending, so onnxruntime reads the
    model with those outputs added. No parse, copy or re-serialization of the weights; a name the
    file already lists as an output is not added twice (a graph output listed twice is refused)."""
    from ..onnx_wire import WireError

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise InputError(f"{label}: cannot read ({exc.strerror or exc})") from None
    try:
        return data + _outputs_tail(data, names)
    except WireError:  # malformed: the full parser words the error
        return None


def _outputs_tail(data: bytes, names: Sequence[str]) -> bytes:
    """A serialized ModelProto that, appended to ``data``, adds ``names`` as graph outputs."""
    from ..onnx_proto import ModelProto

    present = graph_output_names(data)
    tail = ModelProto()
    for name in dict.fromkeys(names):
        if name not in present:
            tail.graph.output.add().name = name
    return tail.SerializeToString()


def with_file_weights(model, path: str) -> Optional[bytes]:
    """``model`` (a copy of the model at ``path`` whose graph was edited, its main-graph
    initializers unchanged but possibly lazy stubs) serialized with the initializers' bytes
    taken verbatim from the file: the rest of the model is serialized (small), the weights are
    neither parsed nor serialized. None when the file's initializers do not line up with the
    model's (then the caller serializes the model itself)."""
    from ..onnx_proto import GraphProto, ModelProto
    from ..onnx_wire import WireError, fields, key, varint

    graph_no = ModelProto.DESCRIPTOR.fields_by_name["graph"].number
    init_no = GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
    try:
        with open(path, "rb") as f:
            data = f.read()
        view = memoryview(data)
        graphs = [(s, e) for n, w, _, s, e in fields(view, 0, len(data)) if n == graph_no and w == 2]
        if len(graphs) != 1:
            return None
        inits = [(fs, e) for n, w, fs, _, e in fields(view, *graphs[0]) if n == init_no and w == 2]
    except (OSError, WireError):
        return None
    if len(inits) != len(model.graph.initializer):
        return None
    rest = type(model)()
    rest.CopyFrom(model)  # stubs, not weights: small
    del rest.graph.initializer[:]
    head = rest.graph.SerializeToString()
    size = len(head) + sum(e - s for s, e in inits)
    rest.ClearField("graph")
    return b"".join([rest.SerializeToString(), key(graph_no), varint(size), head] + [view[s:e] for s, e in inits])


def graph_output_names(data: bytes) -> set:
    """The names of the main graph's outputs in a serialized ModelProto, read off the wire
    (only the graph's top-level fields are walked; the weights are skipped, not parsed)."""
    from ..onnx_proto import GraphProto, ModelProto, ValueInfoProto
    from ..onnx_wire import fields

    graph_no = ModelProto.DESCRIPTOR.fields_by_name["graph"].number
    output_no = GraphProto.DESCRIPTOR.fields_by_name["output"].number
    name_no = ValueInfoProto.DESCRIPTOR.fields_by_name["name"].number
    view = memoryview(data)
    names = set()
    for number, wire, _, start, end in fields(view, 0, len(data)):
        if number != graph_no or wire != 2:
            continue
        for n2, w2, _, s2, e2 in fields(view, start, end):
            if n2 != output_no or w2 != 2:
                continue
            for n3, w3, _, s3, e3 in fields(view, s2, e2):
                if n3 == name_no and w3 == 2:
                    names.add(bytes(view[s3:e3]).decode("utf-8", "replace"))
    return names


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
    message = one_line(str(exc))
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
    return import_ort().__version__



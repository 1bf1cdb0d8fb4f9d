"""Small ONNX model builders and an onnxruntime equivalence check, for bnfold's tests.

Every model is built here from onnx.helper and seeded numpy, so the tests need no downloads.
Every node gets a name, so a fold report can be checked BN by BN.

The equivalence check runs both models with onnxruntime at ``ORT_DISABLE_ALL``: at any higher
level ORT fuses Conv+BN itself, and a comparison would then pit two fused models against each
other and hide a wrong fold.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

try:  # bfloat16 for numpy; optional
    import ml_dtypes

    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is installed in the dev environment
    BFLOAT16 = None

ArrayLike = Union[np.ndarray, Sequence[float], float]

# Relative tolerance per output dtype, applied to the largest finite magnitude of the reference
# output. Across this suite (hypothesis runs with extreme statistics included) correct folds
# measured at most 4.6e-13 (float64), 6.7e-7 (float32), 9.6e-4 (float16), 6.7e-3 (bfloat16):
# these limits leave 7 to 10x headroom. A 0.1 % change of one channel's weight in a single
# conv is two orders of magnitude above them (see test_wrong_fold_is_detected).
TOLERANCE = {
    np.dtype(np.float64): 1e-10,
    np.dtype(np.float32): 5e-6,
    np.dtype(np.float16): 1e-2,
}
if BFLOAT16 is not None:
    TOLERANCE[BFLOAT16] = 5e-2


def onnx_type(dtype) -> int:
    """The TensorProto element type of a numpy dtype (bfloat16 included)."""
    dtype = np.dtype(dtype)
    if BFLOAT16 is not None and dtype == BFLOAT16:
        return TensorProto.BFLOAT16
    return helper.np_dtype_to_tensor_dtype(dtype)


def numpy_type(elem_type: int) -> np.dtype:
    """The numpy dtype of a TensorProto element type (bfloat16 included)."""
    if elem_type == TensorProto.BFLOAT16:
        return BFLOAT16
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


def make_tensor(name: str, array: np.ndarray) -> TensorProto:
    """A TensorProto from any numpy array, bfloat16 included (numpy_helper handles it too)."""
    return numpy_helper.from_array(np.asarray(array), name)


def bn_stats(rng: np.random.Generator, channels: int, dtype=np.float32) -> Dict[str, np.ndarray]:
    """Non-trivial BN statistics: signed gamma, non-zero beta and mean, positive varied variance."""
    sign = np.where(rng.random(channels) < 0.2, -1.0, 1.0)
    return {
        "scale": (sign * rng.uniform(0.5, 1.5, channels)).astype(dtype),
        "B": rng.normal(0.0, 0.5, channels).astype(dtype),
        "mean": rng.normal(0.0, 0.5, channels).astype(dtype),
        "var": rng.uniform(0.2, 2.0, channels).astype(dtype),
    }


class GraphBuilder:
    """Collects nodes, initializers and graph I/O; :meth:`model` makes a checked ModelProto.

    ``dtype`` is the default float type of weights and inputs; ``seed`` seeds the weights.
    """

    def __init__(self, name: str = "g", dtype=np.float32, seed: int = 0) -> None:
        self.name = name
        self.dtype = np.dtype(dtype)
        self.rng = np.random.default_rng(seed)
        self.nodes: List[onnx.NodeProto] = []
        self.initializers: List[TensorProto] = []
        self.inputs: List[onnx.ValueInfoProto] = []
        self.outputs: List[onnx.ValueInfoProto] = []
        self._count = 0

    # -- primitives -------------------------------------------------------------------------
    def fresh(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}{self._count}"

    def input(self, name: str, shape: Sequence[Union[int, str, None]], dtype=None) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, onnx_type(dtype or self.dtype), list(shape)))
        return name

    def init(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(make_tensor(name, np.asarray(array)))
        return name

    def const(self, name: str, array: np.ndarray, node_name: Optional[str] = None) -> str:
        """A Constant node whose output is ``name``."""
        node = helper.make_node(
            "Constant", [], [name], name=node_name or f"const_{name}", value=make_tensor(name, np.asarray(array))
        )
        self.nodes.append(node)
        return name

    def param(self, name: str, array: np.ndarray, kind: str = "init") -> str:
        """A constant parameter as an initializer (``init``), a Constant node (``const``), or a
        graph input (``input``, i.e. not a constant at all)."""
        array = np.asarray(array)
        if kind == "init":
            return self.init(name, array)
        if kind == "const":
            return self.const(name, array)
        if kind == "input":
            return self.input(name, array.shape, array.dtype)
        raise ValueError(kind)

    def node(self, op: str, inputs: Sequence[str], outputs: Union[str, Sequence[str]], name: str, **attrs):
        outs = [outputs] if isinstance(outputs, str) else list(outputs)
        node = helper.make_node(op, list(inputs), outs, name=name, **attrs)
        self.nodes.append(node)
        return node

    def output(self, name: str, shape: Optional[Sequence] = None, dtype=None) -> None:
        """Declare a graph output; its shape is inferred by :meth:`model` when not given."""
        vi = helper.make_tensor_value_info(name, onnx_type(dtype or self.dtype), shape)
        self.outputs.append(vi)

    def weight(self, shape: Sequence[int], dtype=None, scale: float = 0.5) -> np.ndarray:
        return (self.rng.normal(0.0, scale, size=tuple(shape))).astype(dtype or self.dtype)

    # -- composites -------------------------------------------------------------------------
    def conv(
        self,
        x: str,
        name: str,
        c_in: int,
        c_out: int,
        kernel: Sequence[int],
        bias: bool = True,
        group: int = 1,
        kind: str = "init",
        op: str = "Conv",
        **attrs,
    ) -> str:
        """A Conv (or ConvTranspose with ``op``) with random weights; returns its output name."""
        if op == "Conv":
            w_shape = (c_out, c_in // group) + tuple(kernel)
        else:
            w_shape = (c_in, c_out // group) + tuple(kernel)
        ins = [x, self.param(f"{name}_W", self.weight(w_shape), kind)]
        if bias:
            ins.append(self.param(f"{name}_B", self.weight((c_out,)), kind))
        if group != 1:
            attrs["group"] = group
        out = f"{name}_out"
        self.node(op, ins, out, name, **attrs)
        return out

    def bn(
        self,
        x: str,
        name: str,
        channels: int,
        kind: str = "init",
        stats: Optional[Dict[str, np.ndarray]] = None,
        param_dtype=None,
        epsilon: Optional[float] = None,
        outputs: Optional[Sequence[str]] = None,
        **attrs,
    ) -> str:
        """A BatchNormalization with random non-trivial statistics; returns its first output."""
        stats = stats or bn_stats(self.rng, channels, param_dtype or self.dtype)
        ins = [x] + [self.param(f"{name}_{k}", np.asarray(stats[k]), kind) for k in ("scale", "B", "mean", "var")]
        if epsilon is not None:
            attrs["epsilon"] = epsilon
        outs = list(outputs) if outputs else [f"{name}_out"]
        self.node("BatchNormalization", ins, outs, name, **attrs)
        return outs[0]

    # -- the model --------------------------------------------------------------------------
    def graph(self) -> onnx.GraphProto:
        return helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)

    def model(
        self,
        opset: int = 17,
        ir_version: Optional[int] = None,
        check: bool = True,
        extra_opsets: Iterable = (),
    ) -> onnx.ModelProto:
        """A ModelProto; missing output shapes are filled by shape inference, then the model is
        checked (``full_check``) unless ``check`` is False (for deliberately broken models)."""
        kwargs = {"opset_imports": [helper.make_opsetid("", opset), *extra_opsets]}
        if ir_version is not None:
            kwargs["ir_version"] = ir_version
        model = helper.make_model(self.graph(), producer_name="bnfold-tests", **kwargs)
        fill_output_shapes(model)
        if check:
            onnx.checker.check_model(model, full_check=True)
        return model


def fill_output_shapes(model: onnx.ModelProto) -> None:
    """Give graph outputs without a shape the inferred one (the full checker wants a shape)."""
    missing = [o for o in model.graph.output if not o.type.tensor_type.HasField("shape")]
    if not missing:
        return
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # broken test models: leave the shape out
        return
    known = {vi.name: vi for vi in list(inferred.graph.output) + list(inferred.graph.value_info)}
    for out in missing:
        if out.name in known and known[out.name].type.tensor_type.HasField("shape"):
            out.type.CopyFrom(known[out.name].type)


def rename_nodes_uniquely(graph: onnx.GraphProto) -> None:
    """Give every unnamed node a name (a model builder's helper for hand-written graphs)."""
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"


# -- running and comparing ------------------------------------------------------------------


def initializer_names(graph: onnx.GraphProto) -> set:
    return {t.name for t in graph.initializer}


def random_feeds(model: onnx.ModelProto, seed: int = 0, batch: int = 2) -> Dict[str, np.ndarray]:
    """Seeded random values for every real graph input (not those backed by an initializer).

    Unknown or symbolic dimensions become ``batch``. Float inputs are standard normal, bool
    inputs are True, integer inputs are 2 (a small trip count).
    """
    rng = np.random.default_rng(seed)
    inits = initializer_names(model.graph)
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in tt.shape.dim]
        dtype = numpy_type(tt.elem_type)
        if dtype == np.bool_:
            feeds[vi.name] = np.ones(shape, dtype=np.bool_)
        elif np.issubdtype(dtype, np.integer):
            feeds[vi.name] = np.full(shape, 2, dtype=dtype)
        else:
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def ort_session(model: Union[onnx.ModelProto, str]):
    """An onnxruntime CPU session with every graph optimization disabled."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    src = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])


def float64_as_float32(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a float64 model with every float64 tensor and type made float32.

    For float64 convs, which onnxruntime's CPU provider cannot run and onnx's reference
    evaluator gets wrong when grouped (ConvTranspose): the fold's layout is still checked,
    at float32 precision. Handles initializers, Constant nodes and graph/value types.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for g in all_graphs(out.graph):
        for i, t in enumerate(g.initializer):
            if t.data_type == TensorProto.DOUBLE:
                g.initializer[i].CopyFrom(make_tensor(t.name, numpy_helper.to_array(t).astype(np.float32)))
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.DOUBLE:
                    a.t.CopyFrom(make_tensor(a.t.name, numpy_helper.to_array(a.t).astype(np.float32)))
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.tensor_type.elem_type == TensorProto.DOUBLE:
                vi.type.tensor_type.elem_type = TensorProto.FLOAT
    return out


def run_model(model: onnx.ModelProto, feeds: Dict[str, np.ndarray], runner: str = "ort") -> Dict[str, np.ndarray]:
    """Outputs by name. ``runner`` is ``ort`` (ORT_DISABLE_ALL), ``reference`` (onnx's
    reference evaluator, for dtypes ORT's CPU provider has no kernels for, e.g. bfloat16), or
    ``ort-f32`` (float64 tensors run as float32 by ORT; see :func:`float64_as_float32`)."""
    names = [o.name for o in model.graph.output]
    if runner == "ort-f32":
        feeds = {k: (v.astype(np.float32) if v.dtype == np.float64 else v) for k, v in feeds.items()}
        values = ort_session(float64_as_float32(model)).run(names, feeds)
    elif runner == "ort":
        values = ort_session(model).run(names, feeds)
    elif runner == "reference":
        from onnx.reference import ReferenceEvaluator

        values = ReferenceEvaluator(model).run(names, feeds)
    else:
        raise ValueError(runner)
    return dict(zip(names, values))


def compare_outputs(ref: Dict[str, np.ndarray], got: Dict[str, np.ndarray], tol: Optional[float] = None) -> None:
    """Assert two output dicts agree: same names in order, shapes, dtypes, non-finite positions,
    and finite values within ``tol * max|ref|`` (``tol`` defaults to :data:`TOLERANCE`)."""
    assert list(ref) == list(got), f"outputs differ: {list(ref)} vs {list(got)}"
    for name in ref:
        r, g = np.asarray(ref[name]), np.asarray(got[name])
        assert r.shape == g.shape, f"{name}: shape {r.shape} vs {g.shape}"
        assert r.dtype == g.dtype, f"{name}: dtype {r.dtype} vs {g.dtype}"
        r64, g64 = r.astype(np.float64), g.astype(np.float64)
        fin = np.isfinite(r64)
        # NaN where NaN, +inf where +inf: a fold must not turn a finite value non-finite or back
        assert np.array_equal(np.isnan(r64), np.isnan(g64)), f"{name}: NaN positions differ"
        assert np.array_equal(np.where(fin, 0, r64), np.where(np.isfinite(g64), 0, g64), equal_nan=True), (
            f"{name}: infinite values differ"
        )
        if not fin.any():
            continue
        t = TOLERANCE.get(r.dtype, 1e-5) if tol is None else tol
        scale = max(float(np.max(np.abs(r64[fin]))), np.finfo(np.float64).tiny)
        err = float(np.max(np.abs(r64[fin] - g64[fin])))
        assert err <= t * scale, f"{name}: max abs error {err:.3g} > {t:g} * {scale:.3g} (rel {err / scale:.3g})"


def assert_equivalent(
    original: onnx.ModelProto,
    folded: onnx.ModelProto,
    seed: int = 0,
    feeds: Optional[Dict[str, np.ndarray]] = None,
    runner: str = "ort",
    tol: Optional[float] = None,
    trials: int = 2,
) -> None:
    """Run both models on ``trials`` seeded random input sets and compare every output.

    ``feeds`` overrides (or supplies) named inputs, e.g. an If condition.
    """
    for t in range(trials):
        base = random_feeds(original, seed + t)
        base.update(feeds or {})
        compare_outputs(run_model(original, base, runner), run_model(folded, base, runner), tol)


# -- inspecting results ---------------------------------------------------------------------


def op_types(graph: onnx.GraphProto) -> List[str]:
    return [n.op_type for n in graph.node]


def all_graphs(graph: onnx.GraphProto):
    """``graph`` and every subgraph inside it, depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from all_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from all_graphs(g)


def count_op(model: onnx.ModelProto, op: str) -> int:
    return sum(op_types(g).count(op) for g in all_graphs(model.graph))


def node_names(model: onnx.ModelProto) -> List[str]:
    return [n.name for g in all_graphs(model.graph) for n in g.node]


def find_node(graph: onnx.GraphProto, name: str) -> onnx.NodeProto:
    for node in graph.node:
        if node.name == name:
            return node
    raise KeyError(name)


def tensor_value(model: onnx.ModelProto, name: str, graph: Optional[onnx.GraphProto] = None) -> np.ndarray:
    """The value of a named constant: an initializer or a Constant node's output, searched in
    ``graph`` (default: every graph of the model)."""
    graphs = [graph] if graph is not None else list(all_graphs(model.graph))
    for g in graphs:
        for t in g.initializer:
            if t.name == name:
                return numpy_helper.to_array(t)
        for n in g.node:
            if n.op_type == "Constant" and n.output[0] == name:
                for a in n.attribute:
                    if a.name == "value":
                        return numpy_helper.to_array(a.t)
    raise KeyError(name)


def check_valid(model: onnx.ModelProto) -> None:
    """The full checker and strict shape inference both accept ``model``."""
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)


def defined_names(graph: onnx.GraphProto) -> List[str]:
    """Every value name a graph defines (inputs, initializers, node outputs), with repeats."""
    names = [i.name for i in graph.input if i.name not in initializer_names(graph)]
    names += [t.name for t in graph.initializer]
    names += [o for n in graph.node for o in n.output if o]
    return names


def sabotage_conv_fold(monkeypatch) -> None:
    """Make the conv fold wrong on purpose (channel 0's scale off by 1 %), so a test can show
    that its oracle notices a wrong fold."""
    import bnfold.onnx_pass.ops.conv as conv_rule

    real = conv_rule.fold_after

    def off_by_one_percent(weight, bias, a, b, axis, groups=1):
        a = a.copy()
        a[0] *= 1.01
        return real(weight, bias, a, b, axis, groups)

    monkeypatch.setattr(conv_rule, "fold_after", off_by_one_percent)

"""The one constant resolver: the value of a name when it is computed only from constants.

Exporters rarely hand a rule its parameter as a bare initializer. torch.onnx writes a
deduplicated bias as ``Identity(shared)``, tf2onnx without its optimizers writes a depthwise
weight as ``Reshape(Transpose(w))``, Caffe2 converters build parameters with
``ConstantOfShape``, and constants pass through ``Cast``, ``Squeeze``/``Unsqueeze``,
``Concat``, ``Expand``, ``Slice`` and ``Gather``. :class:`ConstantResolver` answers, for any
name of one graph, either its value or a :class:`Refusal` with a stable reason code.

What counts as a constant
    An initializer that no graph input can override (from IR version 4 a graph input of the
    same name overrides it; below IR 4 every initializer is listed as an input and is not
    overridable), a ``Constant`` node (``value``, ``sparse_value``, ``value_float(s)``,
    ``value_int(s)``; strings are refused), the enclosing graphs' constants inside a subgraph
    (a name the subgraph defines itself shadows them), and the outputs of deterministic
    default-domain ops all of whose inputs are constants. ``Shape`` and ``Size`` are evaluated
    only on constants: the shape of a run-time value, even a static one, is the shape table's
    business (it can depend on what a caller feeds), so it is refused as ``not-constant``.

What is refused (reason codes)
    ``not-constant`` (a graph input, or an op reading a run-time value), ``overridable-initializer``,
    ``nondeterministic-op`` (RandomNormal and kin, Dropout in training mode),
    ``foreign-domain`` (any op outside the default domain), ``unsupported-constant-op``
    (control flow, sequences, an op without an evaluator), ``constant-too-large`` (a value
    over :attr:`Limits.max_elements`, more than :attr:`Limits.max_nodes` ops behind one value,
    or more than :attr:`Limits.max_total_elements` evaluated by one resolver: sizes are
    checked *before* allocating where an op can grow its input), ``invalid-constant`` (the op
    cannot run on these values: shapes that disagree, an index out of range, inf in a Reshape
    target, a cycle) and ``unreadable-constant`` (tensor data that does not match its dims).

How values are computed, and why
    ``python benchmarks/exporter_idioms.py --evaluators`` (this project's 2-core machine, shared,
    medians; a ``Reshape(Transpose(w))`` of a 3x3x32x1 depthwise weight as tf2onnx writes it):

    ===========================================  =============  ==================
    evaluator                                    per subgraph   import (fresh run)
    ===========================================  =============  ==================
    numpy, the two ops alone                     1 us           0.49 s (numpy)
    this resolver (index, read, evaluate)        70 us          (bnfold's own)
    onnx ``ReferenceEvaluator``                  199 us         3.39 s ``onnx.reference``
    an onnxruntime session on the subgraph       491 us         0.53 s ``onnxruntime``
    ===========================================  =============  ==================

    Every idiom exporters write needs only a small set of layout and arithmetic ops, so those
    are evaluated here with numpy: 3-7x faster per subgraph than the alternatives, and no
    import beyond numpy, which matters because issue 16 wants the fold path to start in
    0.3 s without ``onnx`` or ``onnxruntime`` (one onnxruntime session for all of a model's
    subgraphs would amortize its cost, but not its import). Their semantics are written
    against the ONNX operator specification and checked bit for bit against onnxruntime by
    ``tests/test_constants.py``, including its edge cases (Flatten of ``[4]`` is ``[4, 1]``;
    0-D Unsqueeze axes; Squeeze of a scalar, with empty or repeated axes; Reshape with 0, -1
    and ``allowzero``; Slice clamping with negative steps; Range accumulating ``value +=
    delta`` as onnxruntime does; integer Div truncating) and 500 random cases where a graph
    onnxruntime refuses must be refused too. Float-to-integer Casts out of the target's range
    (undefined in C++) are refused rather than guessed. Any other deterministic default-domain
    op is handed to the reference evaluator, one node at a time, imported only when a model
    actually needs it; ``Limits(reference_fallback=False)`` refuses those ops instead.

The resolver never changes the graph. :meth:`ConstantResolver.removable` tells the caller which
producer nodes and initializers of a constant subgraph nothing reads any more once the
caller has stopped reading some of its values; the caller removes them (below IR 4, with the
graph inputs that list those initializers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Set, Tuple

import numpy as np

from ..affine import Refusal
from ..errors import BnfoldError
from ..onnx_io import tensor_array

NOT_CONSTANT = "not-constant"
OVERRIDABLE = "overridable-initializer"
NONDETERMINISTIC = "nondeterministic-op"
FOREIGN_DOMAIN = "foreign-domain"
UNSUPPORTED_OP = "unsupported-constant-op"
TOO_LARGE = "constant-too-large"
INVALID = "invalid-constant"
UNREADABLE = "unreadable-constant"

DEFAULT_DOMAINS = ("", "ai.onnx")
RANDOM_OPS = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
)
# Never handed to the reference evaluator: control flow, sequences, optionals, and ops whose
# result depends on more than their inputs.
_NO_FALLBACK = frozenset(
    {"If", "Loop", "Scan", "SequenceMap", "Optional", "OptionalGetElement", "OptionalHasElement"}
)

# AttributeProto.AttributeType values (kept here so this module needs no onnx import).
_A_FLOAT, _A_INT, _A_STRING, _A_TENSOR, _A_GRAPH = 1, 2, 3, 4, 5
_A_FLOATS, _A_INTS, _A_STRINGS, _A_GRAPHS, _A_SPARSE_TENSOR = 6, 7, 8, 10, 11

# TensorProto.DataType -> numpy dtype, for Cast and ConstantOfShape (bfloat16 when ml_dtypes is there).
_NP_TYPES: Dict[int, np.dtype] = {
    1: np.dtype(np.float32), 2: np.dtype(np.uint8), 3: np.dtype(np.int8), 4: np.dtype(np.uint16),
    5: np.dtype(np.int16), 6: np.dtype(np.int32), 7: np.dtype(np.int64), 9: np.dtype(np.bool_),
    10: np.dtype(np.float16), 11: np.dtype(np.float64), 12: np.dtype(np.uint32), 13: np.dtype(np.uint64),
}


def _bfloat16() -> Optional[np.dtype]:
    try:  # ml_dtypes ships with onnx; imported only when a bfloat16 Cast is evaluated
        import ml_dtypes
    except ImportError:  # pragma: no cover
        return None
    return np.dtype(ml_dtypes.bfloat16)


def _np_type(data_type: int) -> np.dtype:
    if data_type == 16:
        bf16 = _bfloat16()
        if bf16 is not None:
            return bf16
    if data_type not in _NP_TYPES:
        raise _Fail(UNSUPPORTED_OP, f"element type {data_type} is not evaluated")
    return _NP_TYPES[data_type]


@dataclass(frozen=True)
class Limits:
    """Bounds on the work one resolver does."""

    max_elements: int = 1 << 25  # one computed value (a 3x3x512x512 conv weight is 2.4M)
    max_nodes: int = 4096  # ops behind one requested value
    max_total_elements: int = 1 << 27  # everything one resolver computes
    reference_fallback: bool = True  # evaluate other deterministic default-domain ops with onnx's ReferenceEvaluator
    max_fallback_elements: int = 1 << 20  # inputs of one op handed to it (a big constant MatMul could take minutes)


@dataclass
class EvaluatedSubgraph:
    """One requested value that needed ops evaluated: for ``--verbose`` reports."""

    name: str
    nodes: int
    elements: int


@dataclass
class ResolverStats:
    subgraphs: int = 0  # requested values that needed at least one op evaluated
    nodes: int = 0  # ops evaluated in all
    elements: int = 0  # elements of all values computed by ops
    reference_nodes: int = 0  # of which by onnx's ReferenceEvaluator
    evaluated: List[EvaluatedSubgraph] = field(default_factory=list)


@dataclass
class Removal:
    """What :meth:`ConstantResolver.removable` found unread: nodes to drop, initializers to drop."""

    nodes: List[object]
    initializers: List[str]


class _Fail(Exception):
    """An internal refusal: reason code and the end of a sentence about the value."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _node_label(node) -> str:
    return f"{node.op_type} '{node.name}'" if node.name else f"{node.op_type}({node.output[0] if node.output else ''})"


def _subgraphs(node):
    for a in node.attribute:
        if a.type == _A_GRAPH:
            yield a.g
        elif a.type == _A_GRAPHS:
            yield from a.graphs


class ConstantResolver:
    """Values of the constant names of one graph, computed lazily and cached.

    ``graph`` is a GraphProto; ``ir_version`` decides whether a graph input overrides an
    initializer of the same name; ``outer`` is the resolver of the enclosing graph (for a
    subgraph); ``overridable`` adds names to treat as overridable whatever the IR version;
    ``opset`` is the default-domain opset (used by the reference evaluator fallback);
    ``producers`` may pass an existing output-name -> node map of this graph to save a pass.
    """

    def __init__(
        self,
        graph,
        *,
        ir_version: int = 10,
        outer: Optional["ConstantResolver"] = None,
        overridable: Iterable[str] = (),
        opset: int = 0,
        limits: Limits = Limits(),
        producers: Optional[Mapping[str, object]] = None,
    ) -> None:
        self.graph = graph
        self.outer = outer
        self.limits = limits
        self.opset = opset or (outer.opset if outer is not None else 21)
        self.stats = outer.stats if outer is not None else ResolverStats()  # one tally per model
        self._budget = outer._budget if outer is not None else [limits.max_total_elements]
        self._inputs = {i.name for i in graph.input}
        self._initializers = {t.name: t for t in graph.initializer}
        self._sparse = {t.values.name: t for t in graph.sparse_initializer}
        self._overridable = set(overridable)
        if ir_version >= 4:
            self._overridable |= self._inputs & (set(self._initializers) | set(self._sparse))
        if producers is None:
            producers = {}
            for node in graph.node:
                for out in node.output:
                    if out:
                        producers[out] = node
        self._producer = producers
        self._values: Dict[str, np.ndarray] = {}
        self._failed: Dict[str, _Fail] = {}

    # ----------------------------------------------------------------- the public questions

    def value(self, name: str, what: str = "value") -> np.ndarray:
        """The value of ``name``; raises :class:`Refusal` (``what 'name' ...``) when it is not a constant.

        The array is shared with the cache, so it is read-only: copy it to change it.
        """
        try:
            return self._resolve(name)
        except _Fail as fail:
            raise Refusal(fail.reason, f"{what} '{name}' {fail.detail}") from None

    def is_constant(self, name: str) -> bool:
        try:
            self._resolve(name)
        except _Fail:
            return False
        return True

    def refusal(self, name: str, what: str = "value") -> Optional[Refusal]:
        """The :class:`Refusal` :meth:`value` would raise, or None for a constant."""
        try:
            self._resolve(name)
        except _Fail as fail:
            return Refusal(fail.reason, f"{what} '{name}' {fail.detail}")
        return None

    def subgraph(self, name: str) -> List[object]:
        """The ops of this graph evaluated to compute ``name`` (dependencies first; Constant
        nodes and outer-scope values excluded); empty for a plain constant. Raises
        :class:`Refusal` when ``name`` is not a constant."""
        self.value(name)
        order: List[object] = []
        done: Set[int] = set()
        stack: List[Tuple[object, bool]] = []
        node = self._producer.get(name)
        if node is not None:
            stack.append((node, False))
        while stack:
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
                continue
            if id(node) in done or node.op_type == "Constant":
                continue
            done.add(id(node))
            stack.append((node, True))
            for inp in node.input:
                dep = self._producer.get(inp) if inp else None
                if dep is not None and id(dep) not in done:
                    stack.append((dep, False))
        return order

    def define(self, name: str, value: np.ndarray) -> None:
        """Record a constant the caller added (a folded weight's new initializer)."""
        self._values[name] = value
        self._failed.pop(name, None)

    def forget(self, name: str) -> None:
        """Drop a cached value (to free memory once a fold has used it)."""
        self._values.pop(name, None)

    def removable(self, released: Iterable[str], readers: Callable[[str], int], keep: Set[str] = frozenset()) -> Removal:
        """The constant-subgraph nodes and initializers of this graph that nothing reads any more.

        ``released`` are names the caller has just stopped reading; ``readers(name)`` is the
        number of nodes that still read ``name`` *after* the caller's edits (a node holding a
        subgraph that reads it counts); ``keep`` are names that must stay (graph outputs are
        always kept). Starting from the released names, a producer whose every output is
        unread is removable, which may leave its inputs unread in turn. Only ops this resolver
        evaluated and ``Constant`` nodes are ever proposed; initializers only of this graph.
        """
        keep = set(keep) | {o.name for o in self.graph.output}
        lost: Dict[str, int] = {}  # reads lost to nodes proposed for removal
        gone_nodes: Dict[int, object] = {}
        gone_inits: List[str] = []
        seen: Set[str] = set()
        stack = [n for n in released if n]
        while stack:
            name = stack.pop()
            if name in keep or name in seen or readers(name) - lost.get(name, 0) > 0:
                continue
            node = self._producer.get(name)
            if node is None:
                if name in self._initializers or name in self._sparse:
                    seen.add(name)
                    gone_inits.append(name)
                continue
            if id(node) in gone_nodes or not self._evaluable(node):
                continue
            if any(o in keep or (o and readers(o) - lost.get(o, 0) > 0) for o in node.output):
                continue
            seen.update(node.output)
            gone_nodes[id(node)] = node
            for i in node.input:
                if i:
                    lost[i] = lost.get(i, 0) + 1
                    stack.append(i)
        return Removal(list(gone_nodes.values()), gone_inits)

    def _evaluable(self, node) -> bool:
        return node.domain in DEFAULT_DOMAINS and (
            node.op_type == "Constant" or all(self._values.get(o) is not None for o in node.output if o)
        )

    # ----------------------------------------------------------------- resolution

    def _leaf(self, name: str) -> Optional[np.ndarray]:
        """The value of a name no op of this graph produces, from this graph or an outer one."""
        if name in self._initializers or name in self._sparse:
            if name in self._overridable:
                raise _Fail(OVERRIDABLE, f"is an initializer that graph input '{name}' can override")
            tensor = self._initializers.get(name)
            return _read(tensor) if tensor is not None else _densify(self._sparse[name])
        if name in self._inputs:
            raise _Fail(NOT_CONSTANT, "is a graph input")
        if self.outer is not None:
            return self.outer._resolve(name)
        raise _Fail(NOT_CONSTANT, "is not defined in the graph")

    def _resolve(self, name: str) -> np.ndarray:
        if name in self._values:
            return self._values[name]
        if name in self._failed:
            raise self._failed[name]
        if not name:
            raise _Fail(NOT_CONSTANT, "is an absent optional input")
        try:
            value = self._compute(name)
        except _Fail as fail:
            self._failed[name] = fail
            raise
        value = self._values[name] = _frozen(value)
        return value

    def _compute(self, name: str) -> np.ndarray:
        """Evaluate ``name`` without recursion (exported chains can be thousands of ops long)."""
        root = self._producer.get(name)
        if root is None:
            return self._leaf(name)
        order: List[object] = []  # ops to evaluate, dependencies first
        state: Dict[int, int] = {}  # id(node) -> 1 on the stack, 2 done
        stack: List[Tuple[object, bool]] = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                state[id(node)] = 2
                order.append(node)
                continue
            if state.get(id(node)) == 2:
                continue
            if state.get(id(node)) == 1:
                raise _Fail(INVALID, f"depends on itself through {_node_label(node)}")
            self._admit(node)
            state[id(node)] = 1
            stack.append((node, True))
            for inp in reversed(node.input):
                if not inp or inp in self._values:
                    continue
                if inp in self._failed:
                    raise _Fail(self._failed[inp].reason, _through(node, inp, self._failed[inp]))
                dep = self._producer.get(inp)
                if dep is None:
                    try:
                        self._values[inp] = _frozen(self._leaf(inp))
                    except _Fail as fail:
                        self._failed[inp] = fail
                        raise _Fail(fail.reason, _through(node, inp, fail)) from None
                    continue
                if state.get(id(dep)) == 1:
                    raise _Fail(INVALID, f"depends on itself through {_node_label(dep)}")
                if state.get(id(dep)) != 2:
                    stack.append((dep, False))
            if len(state) > self.limits.max_nodes:
                raise _Fail(TOO_LARGE, f"is computed by more than {self.limits.max_nodes} ops")
        evaluated: List[object] = []
        elements = 0
        for node in order:
            if all(o in self._values for o in node.output if o):
                continue
            args = [self._values[i] if i else None for i in node.input]
            try:
                outs, by_reference = _run(node, args, self.opset, self.limits)
            except _Fail as fail:
                fail = _Fail(fail.reason, _at(node, fail.detail))
                for o in node.output:
                    if o:
                        self._failed.setdefault(o, fail)
                raise fail from None
            if node.op_type != "Constant":
                evaluated.append(node)
                self.stats.nodes += 1
                self.stats.reference_nodes += by_reference
            for o, v in zip(node.output, outs):
                if not o or v is None:
                    continue
                if v.size > self.limits.max_elements:
                    raise _Fail(TOO_LARGE, _at(node, f"gives {v.size} elements (limit {self.limits.max_elements})"))
                if node.op_type not in _NO_COPY and node.op_type != "Constant":
                    elements += v.size
                    self._budget[0] -= v.size
                    if self._budget[0] < 0:
                        raise _Fail(TOO_LARGE, _at(node, "exceeds the resolver's budget of evaluated elements"))
                self._values[o] = _frozen(v)
        if name not in self._values:
            raise _Fail(UNSUPPORTED_OP, f"is an output of {_node_label(root)} that is not evaluated")
        if evaluated:
            self.stats.subgraphs += 1
            self.stats.elements += elements
            self.stats.evaluated.append(EvaluatedSubgraph(name, len(evaluated), elements))
        return self._values[name]

    def _admit(self, node) -> None:
        """Refuse an op that must not be evaluated at fold time."""
        if node.domain not in DEFAULT_DOMAINS:
            raise _Fail(FOREIGN_DOMAIN, f"is computed by {_node_label(node)} of domain '{node.domain}'")
        if node.op_type in RANDOM_OPS:
            raise _Fail(NONDETERMINISTIC, f"is computed by {_node_label(node)}, a random op")
        if node.op_type in _NO_FALLBACK or node.op_type.startswith("Sequence") or any(_subgraphs(node)):
            raise _Fail(UNSUPPORTED_OP, f"is computed by {_node_label(node)}, which is not evaluated at fold time")
        if node.op_type not in _OPS and not self.limits.reference_fallback:
            raise _Fail(UNSUPPORTED_OP, f"is computed by {_node_label(node)}, which is not evaluated at fold time")


def _frozen(value) -> np.ndarray:
    if not isinstance(value, np.ndarray):  # a numpy scalar (np.take with a 0-D index gives one)
        value = np.asarray(value)
    value.flags.writeable = False  # cached and shared by every caller
    return value


def _through(node, inp: str, fail: _Fail) -> str:
    return f"is computed by {_node_label(node)} from '{inp}', which {fail.detail}"


def _at(node, detail: str) -> str:
    return f"is computed by {_node_label(node)}, which {detail}" if not detail.startswith("is computed") else detail


def _read(tensor) -> np.ndarray:
    if tensor.data_type == 8:
        raise _Fail(UNSUPPORTED_OP, "holds strings")
    try:
        return tensor_array(tensor)
    except (BnfoldError, ValueError, TypeError, KeyError) as exc:
        raise _Fail(UNREADABLE, f"cannot be read ({type(exc).__name__}: {exc})") from None


def _densify(sparse) -> np.ndarray:
    values = _read(sparse.values)
    indices = _read(sparse.indices).astype(np.int64)
    dims = tuple(int(d) for d in sparse.dims)
    count = math.prod(dims)
    out = np.zeros(count, dtype=values.dtype)
    if indices.ndim == 2:  # [NNZ, rank] coordinates
        if indices.shape[1] != len(dims):
            raise _Fail(UNREADABLE, "has sparse indices of the wrong rank")
        indices = np.ravel_multi_index(tuple(indices.T), dims) if indices.size else indices.reshape(0)
    if indices.size != values.size or (indices.size and (indices.min() < 0 or indices.max() >= count)):
        raise _Fail(UNREADABLE, "has sparse indices that do not match its values or dims")
    out[indices.reshape(-1)] = values.reshape(-1)
    return out.reshape(dims)


# --------------------------------------------------------------------- op evaluation

_NO_COPY = frozenset({"Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Dropout"})


def _attrs(node) -> Dict[str, object]:
    out: Dict[str, object] = {}
    for a in node.attribute:
        if a.ref_attr_name:
            raise _Fail(INVALID, f"attribute '{a.name}' refers to a function attribute")
        if a.type == _A_FLOAT:
            out[a.name] = a.f
        elif a.type == _A_INT:
            out[a.name] = a.i
        elif a.type == _A_STRING:
            out[a.name] = a.s
        elif a.type == _A_TENSOR:
            out[a.name] = a.t
        elif a.type == _A_SPARSE_TENSOR:
            out[a.name] = a.sparse_tensor
        elif a.type == _A_FLOATS:
            out[a.name] = list(a.floats)
        elif a.type == _A_INTS:
            out[a.name] = list(a.ints)
        elif a.type == _A_STRINGS:
            out[a.name] = list(a.strings)
        else:
            out[a.name] = a
    return out


def _int_attr(attrs, key: str, default: int) -> int:
    v = attrs.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool):
        raise _Fail(INVALID, f"has attribute '{key}' of the wrong type")
    return v


def _ints(x: Optional[np.ndarray], what: str, scalar_ok: bool = False) -> List[int]:
    """A 1-D integer tensor (shape, axes, starts...) as a list; refuse anything else.

    ``scalar_ok``: a 0-D tensor counts as one value (onnxruntime accepts it for Unsqueeze and
    Squeeze axes and Expand's shape, and refuses it elsewhere).
    """
    if x is None:
        raise _Fail(INVALID, f"lacks its {what}")
    if x.dtype.kind not in "iu":
        raise _Fail(INVALID, f"has a {what} of element type {x.dtype} (integers required)")
    if x.ndim != 1 and not (scalar_ok and x.ndim == 0):
        raise _Fail(INVALID, f"has a {x.ndim}-D {what}")
    return [int(v) for v in x.reshape(-1)]


def _scalar(x: Optional[np.ndarray], what: str):
    if x is None or x.ndim != 0:
        raise _Fail(INVALID, f"has a {what} that is not a scalar")
    return x[()]


def _axis(a: int, rank: int, what: str = "axis") -> int:
    if not -rank <= a < rank:
        raise _Fail(INVALID, f"has {what} {a} out of range for rank {rank}")
    return a % rank


def _check_size(shape: Iterable[int], limits: Limits) -> None:
    shape = list(shape)
    if any(d < 0 for d in shape):
        raise _Fail(INVALID, f"would make a tensor of shape {shape}")
    count = math.prod(shape)
    if count > limits.max_elements:
        raise _Fail(TOO_LARGE, f"would make {count} elements (limit {limits.max_elements})")


def _run(node, args: List[Optional[np.ndarray]], opset: int, limits: Limits) -> Tuple[List[Optional[np.ndarray]], int]:
    """Evaluate one node: its outputs (None where not computed) and 1 if the reference evaluator did it."""
    fn = _OPS.get(node.op_type)
    if fn is None:
        return _reference(node, args, opset, limits), 1
    attrs = _attrs(node)
    try:
        with np.errstate(all="ignore"):
            out = fn(node, args, attrs, limits)
    except _Fail:
        raise
    except (ValueError, TypeError, IndexError, OverflowError, MemoryError) as exc:
        raise _Fail(INVALID, f"cannot be evaluated ({exc})") from None
    return (out if isinstance(out, list) else [out]), 0


def _constant(node, args, attrs, limits):
    for key, v in attrs.items():
        if key == "value":
            return _read(v)
        if key == "sparse_value":
            return _densify(v)
        if key == "value_float":
            return np.array(v, dtype=np.float32)
        if key == "value_floats":
            return np.array(v, dtype=np.float32)
        if key == "value_int":
            return np.array(v, dtype=np.int64)
        if key == "value_ints":
            return np.array(v, dtype=np.int64)
        if key in ("value_string", "value_strings"):
            raise _Fail(UNSUPPORTED_OP, "holds strings")
    raise _Fail(INVALID, "has no value")


def _identity(node, args, attrs, limits):
    return args[0]


def _dropout(node, args, attrs, limits):
    training = args[2] if len(args) > 2 else None
    if training is not None and bool(_scalar(training, "training_mode")):
        raise _Fail(NONDETERMINISTIC, "runs in training mode")
    if attrs.get("is_test", 1) == 0 and "is_test" in attrs:
        raise _Fail(NONDETERMINISTIC, "runs in training mode")
    x = args[0]
    return [x] + [np.ones(x.shape, dtype=np.bool_) if len(node.output) > 1 else None]


def _cast(node, args, attrs, limits):
    x = args[0]
    if x.dtype == object:
        raise _Fail(UNSUPPORTED_OP, "casts strings")
    to = _np_type(_int_attr(attrs, "to", 0))
    if x.dtype.kind == "f" and to.kind in "iu":
        if not np.isfinite(x).all():
            raise _Fail(INVALID, "casts a non-finite value to an integer type")
        info = np.iinfo(to)
        t = np.trunc(x.astype(np.float64))
        if t.size and (t.min() < info.min or t.max() > info.max):
            raise _Fail(INVALID, f"casts a value out of range for {to}")
    return x.astype(to)


def _transpose(node, args, attrs, limits):
    x = args[0]
    perm = attrs.get("perm")
    if perm is None:
        return x.T.copy()  # (np.ascontiguousarray would make a 0-D tensor 1-D)
    if sorted(perm) != list(range(x.ndim)):
        raise _Fail(INVALID, f"has perm {perm} for rank {x.ndim}")
    return np.transpose(x, perm).copy()


def _reshape(node, args, attrs, limits):
    x = args[0]
    if len(args) > 1 and args[1] is not None:
        if args[1].dtype.kind == "f":
            raise _Fail(INVALID, "has a floating-point target shape")
        target = _ints(args[1], "target shape")
    elif "shape" in attrs:  # opset 1-4
        target = list(attrs["shape"])
    else:
        raise _Fail(INVALID, "lacks its target shape")
    allowzero = _int_attr(attrs, "allowzero", 0)
    if allowzero and 0 in target and -1 in target:
        raise _Fail(INVALID, "has allowzero with both 0 and -1 in its target")
    out = []
    for i, d in enumerate(target):
        if d == 0 and not allowzero:
            if i >= x.ndim:
                raise _Fail(INVALID, f"copies dimension {i} of a rank-{x.ndim} input")
            d = x.shape[i]
        elif d < -1:
            raise _Fail(INVALID, f"has target dimension {d}")
        out.append(d)
    if out.count(-1) > 1:
        raise _Fail(INVALID, "has more than one -1 in its target")
    if -1 in out:
        known = math.prod(d for d in out if d != -1)
        if known == 0 or x.size % known:
            raise _Fail(INVALID, f"cannot infer -1 in target {target} for {x.size} elements")
        out[out.index(-1)] = x.size // known
    if math.prod(out) != x.size:
        raise _Fail(INVALID, f"cannot reshape {list(x.shape)} to {target}")
    return x.reshape(out)


def _axes_of(node, args, attrs, what="axes") -> Optional[List[int]]:
    if len(args) > 1 and args[1] is not None:
        axes = _ints(args[1], what, scalar_ok=True)  # a 0-D tensor counts as one axis
        return axes if axes or node.op_type != "Squeeze" else None  # Squeeze: empty = all
    if "axes" in attrs:
        return list(attrs["axes"])
    return None


def _unsqueeze(node, args, attrs, limits):
    x = args[0]
    axes = _axes_of(node, args, attrs)
    if axes is None:
        raise _Fail(INVALID, "lacks its axes")
    rank = x.ndim + len(axes)
    norm = sorted(_axis(a, rank) for a in axes)
    if len(set(norm)) != len(norm):
        raise _Fail(INVALID, f"repeats an axis in {axes}")
    shape = list(x.shape)
    for a in norm:
        shape.insert(a, 1)
    return x.reshape(shape)


def _squeeze(node, args, attrs, limits):
    x = args[0]
    axes = _axes_of(node, args, attrs)
    if axes is None:
        return x.reshape([d for d in x.shape if d != 1])
    norm = {_axis(a, x.ndim) for a in axes}  # a repeated axis is squeezed once, as onnxruntime does
    if any(x.shape[a] != 1 for a in norm):
        raise _Fail(INVALID, f"squeezes axes {axes} of shape {list(x.shape)}")
    return x.reshape([d for i, d in enumerate(x.shape) if i not in norm])


def _flatten(node, args, attrs, limits):
    x = args[0]
    axis = _int_attr(attrs, "axis", 1)
    if not -x.ndim <= axis <= x.ndim:
        raise _Fail(INVALID, f"has axis {axis} for rank {x.ndim}")
    if axis < 0:
        axis += x.ndim
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _concat(node, args, attrs, limits):
    parts = [a for a in args if a is not None]
    if not parts or "axis" not in attrs:
        raise _Fail(INVALID, "lacks inputs or its axis")
    rank = parts[0].ndim
    if rank == 0 or any(p.ndim != rank for p in parts) or len({p.dtype for p in parts}) != 1:
        raise _Fail(INVALID, "joins tensors of different ranks or types")
    axis = _axis(_int_attr(attrs, "axis", 0), rank)
    return np.concatenate(parts, axis=axis)


def _expand(node, args, attrs, limits):
    x = args[0]
    shape = _ints(args[1] if len(args) > 1 else None, "shape", scalar_ok=True)
    try:
        out_shape = np.broadcast_shapes(x.shape, tuple(shape))
    except ValueError:
        raise _Fail(INVALID, f"cannot expand {list(x.shape)} to {shape}") from None
    _check_size(out_shape, limits)
    return np.array(np.broadcast_to(x, out_shape))


def _tile(node, args, attrs, limits):
    x = args[0]
    reps = _ints(args[1] if len(args) > 1 else None, "repeats")
    if len(reps) != x.ndim or any(r < 0 for r in reps):
        raise _Fail(INVALID, f"has repeats {reps} for rank {x.ndim}")
    _check_size([d * r for d, r in zip(x.shape, reps)], limits)
    return np.tile(x, reps)


def _constant_of_shape(node, args, attrs, limits):
    shape = _ints(args[0], "shape")
    _check_size(shape, limits)
    if "value" in attrs:
        fill = _read(attrs["value"])
        if fill.size != 1:
            raise _Fail(INVALID, "has a value that is not one element")
        fill = fill.reshape(())
    else:
        fill = np.zeros((), dtype=np.float32)
    return np.full(shape, fill, dtype=fill.dtype)


def _shape(node, args, attrs, limits):
    dims = np.array(args[0].shape, dtype=np.int64)
    rank = dims.size
    start = _int_attr(attrs, "start", 0)
    end = _int_attr(attrs, "end", rank)
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    return dims[start:end] if start < end else dims[:0]


def _size(node, args, attrs, limits):
    return np.array(args[0].size, dtype=np.int64)


def _gather(node, args, attrs, limits):
    x, idx = args[0], args[1] if len(args) > 1 else None
    if idx is None or idx.dtype.kind not in "iu":
        raise _Fail(INVALID, "lacks integer indices")
    if x.ndim == 0:
        raise _Fail(INVALID, "gathers from a scalar")
    axis = _axis(_int_attr(attrs, "axis", 0), x.ndim)
    dim = x.shape[axis]
    idx = idx.astype(np.int64)
    if idx.size and (idx.min() < -dim or idx.max() >= dim):
        raise _Fail(INVALID, f"has an index out of range for dimension {dim}")
    _check_size(list(x.shape[:axis]) + list(idx.shape) + list(x.shape[axis + 1 :]), limits)
    return np.take(x, np.where(idx < 0, idx + dim, idx), axis=axis)


def _slice(node, args, attrs, limits):
    x = args[0]
    if len(args) > 1:  # opset 10+
        starts = _ints(args[1], "starts")
        ends = _ints(args[2] if len(args) > 2 else None, "ends")
        axes = _ints(args[3], "axes") if len(args) > 3 and args[3] is not None else list(range(len(starts)))
        steps = _ints(args[4], "steps") if len(args) > 4 and args[4] is not None else [1] * len(starts)
    else:
        starts, ends = list(attrs.get("starts", [])), list(attrs.get("ends", []))
        axes = list(attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    if not (len(starts) == len(ends) == len(axes) == len(steps)):
        raise _Fail(INVALID, "has starts, ends, axes and steps of different lengths")
    index = [slice(None)] * x.ndim
    seen = set()
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = _axis(a, x.ndim)
        if a in seen or st == 0:
            raise _Fail(INVALID, "repeats an axis or has step 0")
        seen.add(a)
        dim = x.shape[a]
        s = s + dim if s < 0 else s
        e = e + dim if e < 0 else e
        if st > 0:
            s, e = min(max(s, 0), dim), min(max(e, 0), dim)
            index[a] = slice(s, e, st)
        else:
            s, e = min(max(s, 0), dim - 1), min(max(e, -1), dim - 1)
            index[a] = slice(s, e if e >= 0 else None, st) if dim else slice(0, 0)
    return x[tuple(index)].copy()


_RANGE_TYPES = frozenset({"float32", "float64", "int16", "int32", "int64"})  # the operator's type constraint


def _range(node, args, attrs, limits):
    start, limit, delta = (_scalar(a, n) for a, n in zip(args[:3], ("start", "limit", "delta")))
    dtype = args[0].dtype
    if dtype.name not in _RANGE_TYPES or any(a.dtype != dtype for a in args[:3]):
        raise _Fail(INVALID, "has start, limit and delta of different or unsupported types")
    if delta == 0:
        raise _Fail(INVALID, "has delta 0")
    count = max(math.ceil((float(limit) - float(start)) / float(delta)), 0)
    _check_size([count], limits)
    if dtype.kind == "f":  # onnxruntime accumulates: value += delta
        steps = np.full(count, delta, dtype=dtype)
        if count:
            steps[0] = start
        return np.cumsum(steps, dtype=dtype)
    return (np.arange(count, dtype=np.int64) * int(delta) + int(start)).astype(dtype)


def _binary(fn, kinds="fiu"):
    def run(node, args, attrs, limits):
        a, b = args[0], args[1] if len(args) > 1 else None
        if b is None or a.dtype != b.dtype or a.dtype.kind not in kinds:
            raise _Fail(INVALID, "has operands of different or unsupported types")
        try:
            shape = np.broadcast_shapes(a.shape, b.shape)
        except ValueError:
            raise _Fail(INVALID, f"cannot broadcast {list(a.shape)} with {list(b.shape)}") from None
        _check_size(shape, limits)
        return np.asarray(fn(a, b), dtype=a.dtype)

    return run


def _div(a, b):
    if a.dtype.kind == "f":
        return a / b
    if (b == 0).any():
        raise _Fail(INVALID, "divides an integer by zero")
    q = np.abs(a.astype(np.int64)) // np.abs(b.astype(np.int64))  # C++ division: toward zero
    return np.where((a < 0) != (b < 0), -q, q)


def _unary(fn, kinds="f"):
    def run(node, args, attrs, limits):
        x = args[0]
        if x.dtype.kind not in kinds:
            raise _Fail(INVALID, f"has an operand of type {x.dtype}")
        return np.asarray(fn(x), dtype=x.dtype)

    return run


def _pow(node, args, attrs, limits):
    a, b = args[0], args[1] if len(args) > 1 else None
    if b is None or a.dtype.kind != "f" or b.dtype.kind not in "fiu":
        raise _Fail(INVALID, "has a base that is not floating point")
    shape = np.broadcast_shapes(a.shape, b.shape)
    _check_size(shape, limits)
    if a.dtype.itemsize < 4:  # onnxruntime computes half-precision Pow in float32
        return np.power(a.astype(np.float32), b.astype(np.float32)).astype(a.dtype)
    return np.power(a, b.astype(a.dtype))


_OPS: Dict[str, Callable] = {
    "Constant": _constant,
    "Identity": _identity,
    "Dropout": _dropout,
    "Cast": _cast,
    "Transpose": _transpose,
    "Reshape": _reshape,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Flatten": _flatten,
    "Concat": _concat,
    "Expand": _expand,
    "Tile": _tile,
    "ConstantOfShape": _constant_of_shape,
    "Shape": _shape,
    "Size": _size,
    "Gather": _gather,
    "Slice": _slice,
    "Range": _range,
    "Add": _binary(np.add),
    "Sub": _binary(np.subtract),
    "Mul": _binary(np.multiply),
    "Div": _binary(_div),
    "Pow": _pow,
    "Neg": _unary(np.negative, "fi"),
    "Abs": _unary(np.abs, "fiu"),
    "Sqrt": _unary(np.sqrt),
    "Reciprocal": _unary(np.reciprocal),
}


def _reference(node, args: List[Optional[np.ndarray]], opset: int, limits: Limits) -> List[Optional[np.ndarray]]:
    """Evaluate one other deterministic default-domain op with onnx's ReferenceEvaluator."""
    size = sum(a.size for a in args if a is not None)
    if size > limits.max_fallback_elements:
        raise _Fail(TOO_LARGE, f"has {size} input elements, too many for the reference evaluator")
    # Imported here: `import onnx.reference` costs about 1.8 s and most models never get here.
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    names = [f"in{i}" if a is not None else "" for i, a in enumerate(args)]
    outs = [f"out{i}" if o else "" for i, o in enumerate(node.output)]
    inputs = [
        helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape))
        for n, a in zip(names, args)
        if a is not None
    ]
    one = helper.make_node(node.op_type, names, outs, domain="")
    one.attribute.extend(node.attribute)
    graph = helper.make_graph(
        [one], "constant", inputs, [helper.make_value_info(o, helper.TypeProto()) for o in outs if o]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    try:
        with np.errstate(all="ignore"):
            got = ReferenceEvaluator(model).run(None, {n: a for n, a in zip(names, args) if a is not None})
    except Exception as exc:  # the reference evaluator raises anything for an op it cannot run
        raise _Fail(UNSUPPORTED_OP, f"cannot be evaluated by the reference evaluator ({type(exc).__name__}: {exc})")
    results: List[Optional[np.ndarray]] = []
    it = iter(got)
    for o in outs:
        v = next(it) if o else None
        if v is not None and not isinstance(v, np.ndarray):
            raise _Fail(UNSUPPORTED_OP, "gives a value that is not a tensor")
        results.append(None if v is None else np.asarray(v))
    return results

"""Structural validation of an ONNX model, before any fold rule looks at it.

The rules assume a well-formed graph: every value produced once, no cycles, nodes with the
inputs, outputs and attribute types their op defines, tensors of a known element type. A
model that breaks one of these is refused here with one line (:class:`InputError`, exit 2)
instead of sending a rule into an endless walk or an uncaught exception.

Only what the ONNX IR forbids is refused, so every model onnxruntime would accept passes:

- a cycle, in the main graph or a subgraph (a subgraph's reads from outer scopes count as
  inputs of the node that holds it);
- a value produced twice in one graph (SSA), or produced by a node and also a graph input or
  initializer of that graph; two initializers of one name;
- standard-domain nodes in a model that imports no valid default-domain opset;
- a standard-domain node with fewer or more inputs or outputs than its schema allows (at the
  model's opset), a required input or output left empty, an attribute without a type or of
  another type than the schema's;
- Conv / ConvTranspose with ``group`` < 1, a ``kernel_shape``/``strides``/``dilations`` entry
  < 1 or a negative pad;
- a tensor (initializer, Constant value, tensor attribute) of an unknown or undefined element
  type, a typed value (input, output, value_info) of an unknown element type;
- a ``dim_value`` below -1 (ONNX dims are ``dim_value >= 0`` or a named ``dim_param``; -1 is
  accepted and read as unknown, since exporters such as paddle2onnx write it and runtimes run it);
- a value or node name that is not valid UTF-8.

One pass over each graph; ops are looked up once per (op, domain). Undefined inputs, unknown
ops and custom domains are left alone: the runtime (and the check) judges those.
"""

from __future__ import annotations

import functools
from typing import Dict, List, Optional, Set

from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, TypeProto, defs

from .errors import InputError

_KNOWN_TYPES = frozenset(v for v in TensorProto.DataType.values() if v != TensorProto.UNDEFINED)
_DEFAULT_DOMAINS = ("", "ai.onnx")
_CONV_OPS = ("Conv", "ConvTranspose")
_SINGLE = defs.OpSchema.FormalParameterOption.Single
_VARIADIC = defs.OpSchema.FormalParameterOption.Variadic


def validate_model(model: ModelProto) -> None:
    """Raise :class:`InputError` with one line when ``model`` is structurally invalid."""
    try:
        for message in (model, model.graph, *model.opset_import, *model.metadata_props):
            _check_strings(message)
        _Validator(_default_opset(model)).graph(model.graph, "main graph")
    except UnicodeDecodeError:  # depending on the protobuf build, a bad string may raise when read
        raise InputError("invalid model: a name is not valid UTF-8") from None


def _default_opset(model: ModelProto) -> Optional[int]:
    for imp in model.opset_import:
        if imp.domain in _DEFAULT_DOMAINS:
            return int(imp.version)
    return None


def _fail(where: str, what: str) -> None:
    raise InputError(f"invalid model: {where}: {what}")


def _node_text(node: NodeProto) -> str:
    first = node.output[0] if node.output else ""
    return f"{node.op_type} node '{node.name or first or '<unnamed>'}'"


@functools.lru_cache(maxsize=None)
def _schema(op_type: str, opset: int):
    """The op's schema at ``opset`` (standard domain), or None when onnx does not know it."""
    try:
        return defs.get_schema(op_type, opset, "")
    except Exception:  # unknown op or an opset before it existed: the runtime judges it
        return None


@functools.lru_cache(maxsize=None)
def _schema_facts(op_type: str, opset: int):
    """(inputs, outputs, attribute types) of a schema, in plain Python for fast checks:
    inputs/outputs as (min count, max count, positions that must not be empty)."""
    schema = _schema(op_type, opset)
    if schema is None:
        return None

    def arity(params, low, high):
        required = [i for i, p in enumerate(params) if p.option == _SINGLE]
        variadic = bool(params) and params[-1].option == _VARIADIC
        return low, high, required, variadic

    attrs = {name: int(a.type.value) for name, a in schema.attributes.items()}
    return (
        arity(schema.inputs, schema.min_input, schema.max_input),
        arity(schema.outputs, schema.min_output, schema.max_output),
        attrs,
    )


# Ops whose attributes bnfold reads (or that hold tensors or subgraphs): their attributes are
# checked against the schema. Attributes of other ops are never read, so they cost no time here.
_ATTRIBUTE_OPS = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "Dropout", "Identity",
    "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Cast", "Constant",
    "Mul", "Add", "Sub", "Div", "If", "Loop", "Scan", "SequenceMap",
})


class _Validator:
    def __init__(self, opset: Optional[int]) -> None:
        self.declared = opset
        self.opset = opset if opset is not None and opset > 0 else None
        self.facts: Dict[str, object] = {}  # op -> _schema_facts at this opset

    def schema(self, op: str):
        if self.opset is None:  # a standard op, but no (valid) version of the standard ops
            what = "imports no opset" if self.declared is None else f"imports opset {self.declared}"
            _fail("model", f"it uses standard ops such as {op} but {what} for the default domain")
        try:
            return self.facts[op]
        except KeyError:
            facts = self.facts[op] = _schema_facts(op, self.opset)
            return facts

    # ------------------------------------------------------------------ one graph
    def graph(self, graph: GraphProto, where: str) -> Set[str]:
        """Validate ``graph``; return the names it reads from enclosing scopes."""
        defined: Set[str] = set()
        inits: Set[str] = set()
        for t in graph.initializer:
            if t.name in inits:
                _fail(where, f"two initializers are named '{t.name}'")
            inits.add(t.name)
            self.tensor(t, where, "initializer")
        for sp in graph.sparse_initializer:
            self.tensor(sp.values, where, "sparse initializer")
            inits.add(sp.values.name)
        for vi in graph.input:
            self.value_type(vi.type, vi.name, where, "input")
            defined.add(vi.name)
        for vi in graph.output:
            self.value_type(vi.type, vi.name, where, "output")
        for vi in graph.value_info:
            self.value_type(vi.type, vi.name, where, "value_info")
        defined |= inits
        defined.add("")  # an omitted optional input

        # One pass in node order. A value read before any node here produced it is an outer
        # (or undefined) name -- or, if a later node produces it, a hint of a cycle.
        producer: Dict[str, int] = {}
        outer: Set[str] = set()
        sub_reads: Dict[int, List[str]] = {}  # node position -> what its subgraphs read
        schema, known = self.schema, self.facts
        for i, node in enumerate(graph.node):
            ins = list(node.input)  # each name decoded once
            outs = list(node.output)
            op = node.op_type
            domain = node.domain
            default = not domain or domain == "ai.onnx"
            facts = None
            if default:
                facts = known[op] if op in known else schema(op)
                if facts is not None:
                    (lo, hi, req, _), (olo, ohi, oreq, _), _ = facts
                    if not lo <= len(ins) <= hi or "" in ins:
                        self.arity(node, ins, lo, hi, req, "input", where)
                    if not olo <= len(outs) <= ohi or "" in outs:
                        self.arity(node, outs, olo, ohi, oreq, "output", where)
            if not default or op in _ATTRIBUTE_OPS:
                reads = self.attributes(node, facts, default and op in _CONV_OPS, where)
                if reads:
                    sub_reads[i] = reads
                    outer.update(n for n in reads if n not in producer and n not in defined)
            for name in ins:
                if name not in producer and name not in defined:
                    outer.add(name)
            for out in outs:
                if out in producer or out in defined:
                    if not out:
                        continue
                    what = "another node" if out in producer else "a graph input or initializer"
                    _fail(where, f"value '{out}' is produced by {_node_text(node)} and also by {what} "
                                 "(each value must be assigned once)")
                producer[out] = i
        producer.pop("", None)
        _check_text(where, producer, outer, defined, (n.name for n in graph.node))
        if not outer.isdisjoint(producer):  # a node reads a later node's output: maybe a cycle
            self.cycles(graph, producer, sub_reads, where)
            outer -= producer.keys()
        outer.discard("")
        return outer

    def cycles(self, graph: GraphProto, producer: Dict[str, int], sub_reads: Dict[int, List[str]], where: str) -> None:
        """Kahn's algorithm over the nodes; what cannot be ordered lies on or after a cycle."""
        nodes = list(graph.node)
        n = len(nodes)
        users: List[List[int]] = [[] for _ in range(n)]
        waiting = [0] * n
        for i, node in enumerate(nodes):
            for p in {producer[name] for name in [*node.input, *sub_reads.get(i, ())] if name in producer}:
                users[p].append(i)
                waiting[i] += 1
        ready = [i for i in range(n) if waiting[i] == 0]
        done = 0
        while ready:
            i = ready.pop()
            done += 1
            for u in users[i]:
                waiting[u] -= 1
                if waiting[u] == 0:
                    ready.append(u)
        if done < n:
            stuck = next(i for i in range(n) if waiting[i] > 0)
            _fail(where, f"the graph has a cycle ({_node_text(nodes[stuck])} depends on its own output)")

    # ------------------------------------------------------------------ nodes
    @staticmethod
    def arity(node, names, low, high, required, what, where) -> None:
        # trailing empty names are omitted optional values
        count = len(names)
        while count and not names[count - 1]:
            count -= 1
        if count < low or len(names) > high:
            want = f"{low}" if low == high else (f"at least {low}" if high >= 2**31 - 1 else f"{low} to {high}")
            _fail(where, f"{_node_text(node)} has {count} {what}s; the op takes {want}")
        for i in required:
            if i < len(names) and not names[i]:
                _fail(where, f"{_node_text(node)} leaves its required {what} {i} empty")

    def attributes(self, node: NodeProto, facts, conv: bool, where: str) -> List[str]:
        """Check attribute types against the schema ``facts`` (and a Conv's values, ``conv``);
        validate subgraphs; return the names they read from enclosing scopes."""
        types = facts[2] if facts is not None else {}
        outer: List[str] = []
        for a in node.attribute:
            kind = a.type
            name = a.name
            want = types.get(name)
            if want != kind and (want is not None or kind == AttributeProto.UNDEFINED) and not a.ref_attr_name:
                if kind == AttributeProto.UNDEFINED:
                    _fail(where, f"attribute '{name}' of {_node_text(node)} has no type")
                _fail(where, f"attribute '{name}' of {_node_text(node)} is "
                             f"{_attr_type_name(kind)}; the op defines it as {_attr_type_name(want)}")
            if kind == AttributeProto.INT:
                if conv and name == "group" and a.i < 1:
                    _fail(where, f"{_node_text(node)} has group {a.i}; it must be at least 1")
            elif kind == AttributeProto.INTS:
                if conv:
                    _conv_ints(node, name, list(a.ints), where)
            elif kind == AttributeProto.TENSOR:
                self.tensor(a.t, where, f"attribute '{name}' of {_node_text(node)}")
            elif kind == AttributeProto.TENSORS:
                for t in a.tensors:
                    self.tensor(t, where, f"attribute '{name}' of {_node_text(node)}")
            elif kind == AttributeProto.GRAPH:
                outer.extend(self.graph(a.g, f"{where} > {_node_text(node)}.{name}"))
            elif kind == AttributeProto.GRAPHS:
                for k, g in enumerate(a.graphs):
                    outer.extend(self.graph(g, f"{where} > {_node_text(node)}.{name}[{k}]"))
        return outer

    # ------------------------------------------------------------------ tensors and types
    @staticmethod
    def tensor(t: TensorProto, where: str, what: str) -> None:
        if t.data_type not in _KNOWN_TYPES:
            label = f" '{t.name}'" if t.name else ""
            kind = "no element type" if t.data_type == TensorProto.UNDEFINED else f"unknown element type {t.data_type}"
            _fail(where, f"{what}{label} has {kind}")

    def value_type(self, tp: TypeProto, name: str, where: str, what: str) -> None:
        kind = tp.WhichOneof("value")
        if kind in ("tensor_type", "sparse_tensor_type"):
            tt = getattr(tp, kind)
            if tt.elem_type and tt.elem_type not in _KNOWN_TYPES:
                _fail(where, f"{what} '{name}' has unknown element type {tt.elem_type}")
            if tt.HasField("shape"):
                for k, d in enumerate(tt.shape.dim):
                    if d.dim_value < -1:  # -1 is how exporters (paddle2onnx) write "unknown"
                        _fail(where, f"{what} '{name}' has dimension {k} = {d.dim_value}; ONNX dimensions "
                                     "are >= 0 (an unknown one is a named dim_param, or -1)")
        elif kind == "sequence_type":
            self.value_type(tp.sequence_type.elem_type, name, where, what)
        elif kind == "optional_type":
            self.value_type(tp.optional_type.elem_type, name, where, what)
        elif kind == "map_type":
            self.value_type(tp.map_type.value_type, name, where, what)


def _check_strings(message) -> None:
    """The message's own (not repeated) string fields: copies of the model set them again,
    which fails on one protobuf handed back as bytes."""
    for field, value in message.ListFields():
        if isinstance(value, bytes) and field.type == field.TYPE_STRING:
            _fail("model", f"its {field.name} is not valid UTF-8")


def _check_text(where: str, *groups) -> None:
    """protobuf hands back a name that is not valid UTF-8 as bytes: refuse those (joining
    strings is a fast way to find one)."""
    for names in groups:
        try:
            "".join(names)
        except TypeError:
            _fail(where, "a name is not valid UTF-8")


def _conv_ints(node: NodeProto, name: str, values: List[int], where: str) -> None:
    if name in ("kernel_shape", "strides", "dilations") and any(v < 1 for v in values):
        _fail(where, f"{_node_text(node)} has {name} {values}; each must be at least 1")
    if name in ("pads", "output_padding") and any(v < 0 for v in values):
        _fail(where, f"{_node_text(node)} has {name} {values}; none may be negative")


def _attr_type_name(kind: int) -> str:
    try:
        return AttributeProto.AttributeType.Name(kind)
    except ValueError:
        return str(kind)

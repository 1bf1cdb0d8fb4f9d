"""An index over one ONNX graph: who produces and who consumes each value, and which values
are constants (through the graph's resolver). Built once per graph (linear in its size) and
kept up to date by the rewrites.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, Iterable, Iterator, List, Optional, Set, Tuple

import numpy as np
from onnx import AttributeProto, GraphProto, NodeProto, TensorProto, helper

from ..affine import Refusal
from .constants import ConstantResolver

FLOAT_TYPES = {
    TensorProto.FLOAT: "float32",
    TensorProto.FLOAT16: "float16",
    TensorProto.DOUBLE: "float64",
    TensorProto.BFLOAT16: "bfloat16",
}


# Standard ops that hold subgraphs; ops of other domains may too. Checking the op first spares
# a walk over the attributes of every other node (a 100,000-node graph asks several times).
_CONTROL_FLOW = frozenset({"If", "Loop", "Scan", "SequenceMap"})


def subgraphs(node: NodeProto) -> Iterator[Tuple[str, GraphProto]]:
    """The subgraphs held in a node's attributes (If branches, Loop/Scan bodies, ...)."""
    if node.op_type not in _CONTROL_FLOW and node.domain in ("", "ai.onnx"):
        return
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            yield attr.name, attr.g
        elif attr.type == AttributeProto.GRAPHS:
            for i, g in enumerate(attr.graphs):
                yield f"{attr.name}[{i}]", g


def free_names(graph: GraphProto) -> Set[str]:
    """Names a subgraph reads from enclosing scopes (used but not defined inside it)."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}  # a sparse tensor is named by its values
    used: Set[str] = set()
    for node in graph.node:
        defined.update(node.output)
        used.update(node.input)
        for _, sub in subgraphs(node):
            used |= free_names(sub)
    used.update(o.name for o in graph.output)
    used.discard("")
    return used - defined


def node_label(node: NodeProto) -> str:
    """A name for reports: the node's name, or its op and first output when it has none."""
    return node.name or f"{node.op_type}({node.output[0] if node.output else ''})"


class Scope:
    """The constants of one graph: its :class:`~.constants.ConstantResolver` (the one reader of
    constants, with the enclosing graph's resolver as its outer scope), the producer of each
    value (shared by the resolver and the graph's :class:`GraphIndex`, so both see the
    rewrites), and the graph's initializers and inputs.
    """

    def __init__(
        self, graph: GraphProto, ir_version: int, parent: Optional["Scope"] = None, opset: int = 0
    ) -> None:
        self.parent = parent
        self.ir_version = ir_version
        self.opset = opset or (parent.opset if parent is not None else 0)  # default-domain opset
        self.inputs = {i.name for i in graph.input}
        self.initializers: Dict[str, TensorProto] = {t.name: t for t in graph.initializer}
        self.producers: Dict[str, NodeProto] = {out: n for n in graph.node for out in n.output if out}
        self.resolver = ConstantResolver(
            graph,
            ir_version=ir_version,
            outer=parent.resolver if parent is not None else None,
            opset=self.opset,
            producers=self.producers,
        )


class GraphIndex:
    """Producers and consumers of every value in one graph.

    A node whose subgraph reads an outer value counts as a consumer of it, so a value read
    inside an If branch is never taken to have a single user.
    """

    def __init__(self, graph: GraphProto, producer: Optional[Dict[str, NodeProto]] = None) -> None:
        self.graph = graph
        self.producer: Dict[str, NodeProto] = {} if producer is None else producer  # shared with the resolver
        self.consumers: Dict[str, List[NodeProto]] = defaultdict(list)
        self.outputs = {o.name for o in graph.output}
        for node in graph.node:
            if producer is None:
                for out in node.output:
                    if out:
                        self.producer[out] = node
            for name in set(node.input):
                if name:
                    self.consumers[name].append(node)
            for name in self._subgraph_reads(node):
                if node not in self.consumers[name]:
                    self.consumers[name].append(node)

    @staticmethod
    def _subgraph_reads(node: NodeProto) -> Set[str]:
        reads: Set[str] = set()
        for _, sub in subgraphs(node):
            reads |= free_names(sub)
        return reads

    def rename_output(self, node: NodeProto, old: str, new: str) -> None:
        """Make ``node`` produce ``new`` instead of ``old`` (the rewrites' one index update)."""
        for i, out in enumerate(node.output):
            if out == old:
                node.output[i] = new
        self.producer.pop(old, None)
        self.consumers.pop(old, None)
        self.producer[new] = node

    def replace_input(self, node: NodeProto, old: str, new: str) -> None:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        users = self.consumers.get(old, [])
        if node in users and old not in node.input:
            users.remove(node)
        if node not in self.consumers[new]:
            self.consumers[new].append(node)


class Names:
    """Every name used anywhere in the model, so new ones never clash."""

    def __init__(self, graphs: Iterable[GraphProto]) -> None:
        self.taken: Set[str] = set()
        self._next: Dict[str, int] = {}  # base -> the next suffix to try
        for g in graphs:
            self.taken.update(i.name for i in g.input)
            self.taken.update(o.name for o in g.output)
            self.taken.update(v.name for v in g.value_info)
            self.taken.update(t.name for t in g.initializer)
            self.taken.update(t.values.name for t in g.sparse_initializer)
            for node in g.node:
                self.taken.update(node.input)
                self.taken.update(node.output)
                if node.name:
                    self.taken.add(node.name)

    def fresh(self, base: str) -> str:
        """``base``, or ``base_2``, ``base_3``, ... : the first that is free. Each base
        remembers where its search stopped, so asking for one base many times costs O(1) each
        (names are never given back, so no earlier suffix becomes free)."""
        if base not in self.taken:
            self.taken.add(base)
            return base
        n = self._next.get(base, 2)
        while f"{base}_{n}" in self.taken:
            n += 1
        self._next[base] = n + 1
        name = f"{base}_{n}"
        self.taken.add(name)
        return name


def all_graphs(graph: GraphProto) -> Iterator[GraphProto]:
    """The graph and every subgraph nested in it, outermost first."""
    yield graph
    for node in graph.node:
        for _, sub in subgraphs(node):
            yield from all_graphs(sub)


_ATTR_TYPES = {float: (AttributeProto.FLOAT,), int: (AttributeProto.INT,), str: (AttributeProto.STRING,)}
_LIST_ATTRS = {"perm", "axes", "pads", "dilations", "strides", "kernel_shape", "output_padding", "output_shape"}


def attr(node: NodeProto, name: str, default):
    """The value of attribute ``name``, or ``default`` when absent.

    A scalar default fixes the type the attribute must have (an int is accepted for a float);
    another type is refused, since the op's meaning is then unknown.
    """
    for a in node.attribute:
        if a.name != name:
            continue
        expected = (AttributeProto.INTS,) if name in _LIST_ATTRS else _ATTR_TYPES.get(type(default))
        if expected is not None and a.type not in expected + ((AttributeProto.INT,) if isinstance(default, float) else ()):
            raise Refusal(
                "unsupported-attribute",
                f"attribute '{name}' of {node_label(node)} has type {AttributeProto.AttributeType.Name(a.type)}",
            )
        value = helper.get_attribute_value(a)
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return default


def int_list(value: np.ndarray, what: str) -> List[int]:
    """A 1-D integer constant (axes, a Reshape target) as a list of ints; refuse any other
    rank or element type, which no op reads as such a list."""
    if value.ndim != 1 or value.dtype.kind not in "iu":
        raise Refusal("unsupported-attribute", f"{what} is a {value.ndim}-D {value.dtype} tensor, not a 1-D integer one")
    return [int(v) for v in value]


def normalized_axes(axes, rank: int, what: str) -> List[int]:
    """``axes`` in ``[-rank, rank)`` made non-negative; refuse ones out of range or repeated."""
    out = []
    for a in axes:
        if not -rank <= int(a) < rank:
            raise Refusal("unsupported-attribute", f"{what}: axis {a} is out of range for rank {rank}")
        out.append(int(a) % rank)
    if len(set(out)) != len(out):
        raise Refusal("unsupported-attribute", f"{what}: axes {list(axes)} repeat an axis")
    return out


def set_attr(node: NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))

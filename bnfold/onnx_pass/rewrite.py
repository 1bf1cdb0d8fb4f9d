"""One graph being folded: what rules may read of it (constants, shapes, producers and
consumers) and the only edits they may make. Rules compute everything first and only then
call the edits, so a refused fold leaves the graph untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, Iterable, List, Optional, Set

import numpy as np
from onnx import GraphProto, NodeProto, TensorProto, helper, numpy_helper

from ..affine import Refusal
from ..onnx_io import tensor_array
from ..report import FoldReport
from .graph import FLOAT_TYPES, GraphIndex, Names, Scope, node_label

if TYPE_CHECKING:
    from .shapes import ShapeTable


@dataclass
class FoldContext:
    """What every graph of one model shares while it is folded."""

    names: Names
    report: FoldReport
    opset: int
    shape_table: Callable[[], "ShapeTable"]  # inferred on first call (see onnx_pass.shapes)
    spill: Optional[object] = None  # a bnfold.onnx_wire.Spill, or None to keep tensors in memory
    orphans: List[str] = field(default_factory=list)


class GraphRewrite:
    """One graph being folded: its index, its constants and the pending edits."""

    def __init__(
        self,
        graph: GraphProto,
        scope: Scope,
        ctx: "FoldContext",
        path: str,
    ) -> None:
        self.graph = graph
        self.scope = scope
        self.index = GraphIndex(graph, scope.producers)
        self.resolver = scope.resolver
        # Reports name an unnamed node by its output, which a fold may rename: fix those
        # labels now, as the user's model has them.
        self._labels = {id(n): node_label(n) for n in graph.node if not n.name}
        self.names = ctx.names
        self.path = path
        self.opset = ctx.opset
        self._shape_table = ctx.shape_table
        self._spill = ctx.spill
        self.inserted: Dict[int, List[NodeProto]] = {}  # id() of node -> nodes to place after it
        self._added: Dict[str, TensorProto] = {}  # initializers this rewrite added, by name
        self.removed: Set[int] = set()  # id() of nodes to drop
        self.orphans: List[str] = []  # values that may now be unused
        self.gone_values: Set[str] = set()  # values that no longer exist

    # ------------------------------------------------------------------ reading

    def constant(self, name: str, what: str, float_only: bool = False) -> np.ndarray:
        """The value of ``name`` when it is a constant, else :class:`Refusal` saying why.

        Every constant a rule reads comes through here, and from here only through the graph's
        :class:`~.constants.ConstantResolver`: initializers that no graph input can override,
        Constant nodes, outer-scope constants, and values computed from those alone by
        deterministic default-domain ops (the refusal's reason code says why anything else is
        not a constant). The array is read-only. ``float_only`` refuses an element type that
        bnfold does not fold (an initializer's before its data is read).
        """
        added = self._added.get(name)
        stored = self.scope.initializers.get(name)
        if float_only and stored is not None and stored.data_type not in FLOAT_TYPES:
            if not (name in self.scope.inputs and self.scope.ir_version >= 4):  # else: overridable, said below
                raise Refusal("unsupported-dtype", f"{what} '{name}' has element type {_type_name(stored.data_type)}")
        if added is not None:  # a value this fold wrote: read back (from the spill file if spilled)
            value = tensor_array(added)
        else:
            value = self.resolver.value(name, what)
            if name in self.scope.initializers:
                self.resolver.forget(name)  # weights are read again when needed, not kept in memory
        return check_float(value, name, what) if float_only else value

    def producer(self, name: str) -> Optional[NodeProto]:
        return self.index.producer.get(name)

    def consumers(self, name: str) -> List[NodeProto]:
        """The nodes reading ``name`` now (do not modify the list)."""
        return self.index.consumers.get(name, [])

    def is_graph_output(self, name: str) -> bool:
        return name in self.index.outputs

    def is_removed(self, node: NodeProto) -> bool:
        return id(node) in self.removed

    def label(self, node: NodeProto) -> str:
        """The node's name for reports, as it was before any rewrite of this graph."""
        return node.name or self._labels.get(id(node)) or node_label(node)

    def shape(self, name: str) -> Optional[tuple]:
        """The inferred shape of ``name`` (dimensions None where unknown), or None."""
        return self._shape_table().get(name)

    def rank(self, name: str) -> Optional[int]:
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def add_initializer(self, base: str, value: np.ndarray) -> str:
        """Add ``value`` as a new initializer under a fresh name; return the name.

        Below IR 4 every initializer must also be a graph input, so one is added there too.
        """
        name = self.names.fresh(base)
        tensor = self.graph.initializer.add()  # filled in place: append() would copy it
        # only the main graph's initializers are streamed by the writer; subgraphs' stay inline
        spill = self._spill if self.scope.parent is None else None
        if spill is not None and value.nbytes >= spill.min_bytes:
            tensor.CopyFrom(spill.stub(name, value))
        else:
            _fill_tensor(tensor, name, value)
        self._added[name] = tensor
        if self.scope.ir_version < 4:
            self.graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, list(value.shape)))
        return name

    def set_input(self, node: NodeProto, position: int, name: str) -> None:
        """Point input ``position`` of ``node`` at ``name`` (appending empty inputs as needed)."""
        while len(node.input) <= position:
            node.input.append("")
        old = node.input[position]
        if old:
            self.orphans.append(old)
        node.input[position] = name
        if old:
            users = self.index.consumers.get(old, [])
            if node in users and old not in node.input:
                users.remove(node)
        self.index.consumers[name].append(node)

    def drop_node(self, node: NodeProto) -> None:
        """Remove ``node``; its inputs lose it as a consumer and become orphan candidates."""
        self.removed.add(id(node))
        for name in node.input:
            if not name:
                continue
            users = self.index.consumers.get(name)
            if users and node in users:
                users.remove(node)

    def insert_after(self, anchor: NodeProto, new: NodeProto) -> None:
        """Place ``new`` right after ``anchor`` in the graph at commit; index its edges now."""
        self.inserted.setdefault(id(anchor), []).append(new)
        for out in new.output:
            self.index.producer[out] = new
        for name in new.input:
            if name:
                self.index.consumers[name].append(new)

    def replace_node(self, old: NodeProto, new: NodeProto) -> None:
        """Put ``new`` where ``old`` is (at commit) and drop ``old``; ``new`` takes over its
        outputs' names."""
        self.drop_node(old)
        self.insert_after(old, new)

    def add_after(self, node: NodeProto, bias: str, base: str) -> NodeProto:
        """Make ``node`` write a fresh value and add ``bias`` to it under the old output name
        (a MatMul gaining a bias). Returns the new Add node."""
        out = node.output[0]
        fresh = self.names.fresh(f"{out}_bnfold_pre")
        node.output[0] = fresh
        self.index.producer[fresh] = node
        self.resolver.forget(out)  # the Add writes it now
        add = helper.make_node("Add", [fresh, bias], [out], name=self.names.fresh(f"{base}_bnfold_add"))
        self.insert_after(node, add)
        return add

    def replace_input(self, node: NodeProto, old: str, new: str) -> None:
        """Make ``node`` read ``new`` wherever it read ``old``."""
        self.index.replace_input(node, old, new)

    def rename_output(self, node: NodeProto, old: str, new: str) -> None:
        """Make ``node`` write ``new`` instead of ``old``; ``old`` no longer exists."""
        self.index.rename_output(node, old, new)
        self.resolver.forget(old)
        self.resolver.forget(new)
        self.gone_values.add(old)
        self.gone_values.discard(new)

    def orphan(self, names: Iterable[str]) -> None:
        """Mark values that may now be unused; the final sweep removes unused constants among them."""
        self.orphans.extend(n for n in names if n)

    def forget(self, names: Iterable[str]) -> None:
        """Values that no longer exist (their value_info goes at commit)."""
        for n in names:
            if n:
                self.gone_values.add(n)
                self.resolver.forget(n)

    def drop_dead_constant(self, name: str) -> None:
        """The rule no longer reads ``name``: at commit, the constant subgraph behind it goes
        where nothing reads it any more (see :meth:`commit`)."""
        self.orphans.append(name)

    def commit(self) -> None:
        """Remove the constant subgraphs the folds left unread, then apply node removals and
        insertions, keeping the order of what remains.

        Starting from the values the rules stopped reading (:attr:`orphans`), the resolver
        names the ops it evaluated and the Constant nodes whose outputs nothing reads any more
        (nodes holding a subgraph that reads a value count as readers; graph outputs stay).
        Their inputs become orphans too: the engine's final sweep removes the initializers
        among them that no graph reads.
        """
        if self.orphans:
            gone = self.resolver.removable(self.orphans, lambda n: len(self.index.consumers.get(n, ())))
            for node in gone.nodes:
                self.drop_node(node)
                self.forget(node.output)
                self.orphans.extend(i for i in node.input if i)
        if not (self.removed or self.inserted):
            return
        kept = []
        for node in self.graph.node:
            after = self.inserted.get(id(node), [])
            if id(node) not in self.removed:
                kept.append(node)
            kept.extend(after)
        # Messages taken from a repeated field stay valid after it is cleared (protobuf
        # detaches them); extend() copies them back in.
        del self.graph.node[:]
        self.graph.node.extend(kept)
        if self.gone_values:
            vi = [v for v in self.graph.value_info if v.name not in self.gone_values]
            if len(vi) != len(self.graph.value_info):
                del self.graph.value_info[:]
                self.graph.value_info.extend(vi)


_FLOAT_DTYPES = {np.dtype(helper.tensor_dtype_to_np_dtype(t)) for t in FLOAT_TYPES}


def check_float(value: np.ndarray, name: str, what: str) -> np.ndarray:
    """``value`` when its element type is one bnfold folds (float16/32/64, bfloat16), else
    :class:`Refusal` (``unsupported-dtype``)."""
    if value.dtype not in _FLOAT_DTYPES:
        raise Refusal("unsupported-dtype", f"{what} '{name}' has element type {_type_name(value.dtype)}")
    return value


def _type_name(dtype) -> str:
    """The ONNX name of a numpy dtype or of a TensorProto data type number."""
    try:
        number = dtype if isinstance(dtype, int) else helper.np_dtype_to_tensor_dtype(dtype)
        return TensorProto.DataType.Name(number)
    except (KeyError, ValueError, TypeError):
        return str(dtype)


def _fill_tensor(tensor: TensorProto, name: str, value: np.ndarray) -> None:
    """Write ``value`` into an empty TensorProto as raw little-endian bytes."""
    try:
        data_type = helper.np_dtype_to_tensor_dtype(value.dtype)
    except (KeyError, ValueError, TypeError):
        data_type = None
    if data_type is None or value.dtype.kind not in "fiu" and value.dtype.name != "bfloat16":
        tensor.CopyFrom(numpy_helper.from_array(value, name))
        return
    tensor.name = name
    tensor.data_type = data_type
    tensor.dims.extend(value.shape)
    if value.dtype.byteorder == ">":
        value = value.astype(value.dtype.newbyteorder("<"))
    tensor.raw_data = np.ascontiguousarray(value).tobytes()

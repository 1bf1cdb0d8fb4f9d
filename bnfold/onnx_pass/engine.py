"""The engine: runs the rules over the model's graphs, subgraphs first, keeps the ledger of
their outcomes, writes the report, commits each graph's edits and sweeps the constants the
folds left unused.

Per graph, two kinds of anchor, each node looked at a bounded number of times:

1. each linear op takes the chain of affine ops after it (:mod:`.rules.after_linear`);
2. each BN left merges the affine ops after it (:mod:`.rules.bn_merge`), then goes into the
   linear ops it feeds (:mod:`.rules.before_linear`);
3. each Mul/Add/Sub/Div left that does nothing is removed (:mod:`.rules.noops`);
4. each Mul/Add/Sub/Div left goes into the linear ops it feeds (:mod:`.rules.before_linear`).
"""

from __future__ import annotations

import time
from typing import Dict, Iterable, List

from onnx import GraphProto, ModelProto, NodeProto

from ..affine import Refusal
from ..onnx_validate import validate_model
from ..report import AFFINE_FOLDED, AFFINE_SKIPPED, CONSTANTS, FoldReport
from .constants import ResolverStats
from .graph import Names, Scope, all_graphs, node_label, subgraphs
from .ops import is_linear
from .ops.batchnorm import is_batchnorm
from .ops.elementwise import ELEMENTWISE_OPS
from .rewrite import FoldContext, GraphRewrite
from .rules import Outcome
from .rules.after_linear import fold_after_linear
from .rules.before_linear import fold_before_linear, fold_elementwise_before_linear
from .rules.bn_merge import merge_into_bn
from .rules.noops import remove_noop

NOOPS_REMOVED = "noops_removed"  # report.extra key: the elementwise no-ops removed


def fold_model_proto(model: ModelProto, spill=None) -> FoldReport:
    """Fold ``model`` in place and return the report.

    ``spill`` (a :class:`bnfold.onnx_wire.Spill`) makes new large tensors stubs backed by a
    scratch file instead of memory; the file-to-file pipeline uses it to bound peak memory.
    """
    start = time.perf_counter()
    validate_model(model)  # malformed graphs are refused before any rule runs
    report = FoldReport(method="onnx-graph")
    ctx = FoldContext(Names(all_graphs(model.graph)), report, _default_opset(model), _lazy_shapes(model), spill)
    scope = Scope(model.graph, model.ir_version, opset=ctx.opset)
    _fold_graph(model.graph, scope, ctx, "")
    _drop_unused(model.graph, ctx.orphans, model.ir_version)
    _note_affine(report)
    _note_constants(report, scope.resolver.stats)
    report.seconds = time.perf_counter() - start
    return report


class Ledger:
    """The outcomes of one graph's rules, written to the report as they come.

    A BN may be left by more than one rule; the reason reported is, in order: why the rule
    that looked at it after a linear op refused it; else why a rule that stopped before it
    refused (the first one); else why it could not go into the ops after it; and when
    nothing reads it that could take it, that nothing before it could.
    """

    def __init__(self, rw: GraphRewrite, report: FoldReport) -> None:
        self.rw = rw
        self.report = report
        self.folded: set = set()  # id() of BNs folded
        self.why: Dict[int, Refusal] = {}  # id() of a BN left -> the reason so far

    def record(self, outcomes: Iterable[Outcome]) -> None:
        for o in outcomes:
            if is_batchnorm(o.node):
                self._record_bn(o)
            else:
                self._record_elementwise(o)

    def settle(self, bn: NodeProto, last: Outcome) -> None:
        """The last rule's outcome for ``bn``: report it folded, or left with one reason."""
        if last.folded:
            self._record_bn(last)
            return
        rw = self.rw
        producer = rw.producer(bn.input[0]) if bn.input else None
        why = self.why.get(id(bn))
        if why is None:
            why = last.refusal if last.refusal.reason != "no-linear-consumer" else _no_producer(producer)
        p_label = rw.label(producer) if producer is not None else None
        p_op = producer.op_type if producer is not None else None
        self.report.add_skipped(rw.label(bn), why.reason, why.detail, p_label, p_op, rw.path)

    def _record_bn(self, o: Outcome) -> None:
        rw = self.rw
        if o.folded:
            self.folded.add(id(o.node))
            into = ", ".join(rw.label(n) for n in o.into)
            self.report.add_folded(rw.label(o.node), into, o.into[0].op_type, o.rule, rw.path)
        elif o.seen:
            self.why[id(o.node)] = o.refusal
        else:
            self.why.setdefault(id(o.node), o.refusal)

    def _record_elementwise(self, o: Outcome) -> None:
        if not o.into:
            if not o.folded:  # a node a rule gave up on, outside any run of its own: nothing to say
                return
            entry = {"node": self.rw.label(o.node), "op": o.node.op_type, "rule": o.rule, "graph": self.rw.path}
            self.report.extra.setdefault(NOOPS_REMOVED, []).append(entry)
            return
        rw, node, other = self.rw, o.node, o.into[0]
        if o.folded:
            into = ", ".join(rw.label(n) for n in o.into)
            entry = {"node": rw.label(node), "op": node.op_type, "into": into, "into_op": other.op_type,
                     "rule": o.rule, "graph": rw.path}
            self.report.extra.setdefault(AFFINE_FOLDED, []).append(entry)
        else:
            entry = {"node": rw.label(node), "op": node.op_type, "after": rw.label(other), "after_op": other.op_type,
                     "reason": o.refusal.reason, "detail": o.refusal.detail, "graph": rw.path}
            self.report.extra.setdefault(AFFINE_SKIPPED, []).append(entry)


def _fold_graph(graph: GraphProto, scope: Scope, ctx: FoldContext, path: str) -> None:
    for node in graph.node:
        for attr_name, sub in subgraphs(node):
            sub_path = f"{path}/{node_label(node)}.{attr_name}".lstrip("/")
            _fold_graph(sub, Scope(sub, scope.ir_version, parent=scope), ctx, sub_path)
    rw = GraphRewrite(graph, scope, ctx, path)
    ledger = Ledger(rw, ctx.report)
    nodes = list(graph.node)
    for node in nodes:
        if is_linear(node) and not rw.is_removed(node):
            ledger.record(_run(fold_after_linear, rw, node))
    for node in nodes:
        if is_batchnorm(node) and id(node) not in ledger.folded and not rw.is_removed(node):
            ledger.record(_run(merge_into_bn, rw, node))
            ledger.settle(node, _run(fold_before_linear, rw, node)[0])
    for node in nodes:
        if not rw.is_removed(node):
            ledger.record(_run(remove_noop, rw, node))
    for node in nodes:
        if not rw.is_removed(node):  # a refusal here is not reported: most are no candidates
            ledger.record(o for o in _run(fold_elementwise_before_linear, rw, node) if o.folded)
    rw.commit()
    ctx.orphans.extend(rw.orphans)


def _run(rule, rw: GraphRewrite, node: NodeProto) -> List[Outcome]:
    """The outcomes of ``rule`` on ``node`` as a list. Rules plan before they edit, so one that
    lets a Refusal escape has changed nothing: the node is then left with that reason."""
    try:
        outcomes = rule(rw, node)
    except Refusal as why:
        return [Outcome(node, refusal=why)]
    if outcomes is None:
        return []
    return [outcomes] if isinstance(outcomes, Outcome) else list(outcomes)


def _no_producer(producer) -> Refusal:
    if producer is None:
        what = "a graph input or constant"
    else:
        what = f"{producer.op_type} '{node_label(producer)}'"
    return Refusal("no-linear-producer", f"the BN's input comes from {what}")


def _lazy_shapes(model: ModelProto):
    """A function giving the model's shapes, inferred on first call (seconds on a large graph,
    and many models never need them) from a snapshot taken now, before any rewrite renames
    values. Models without a BN, linear or elementwise op get an empty table."""
    from .shapes import ShapeTable, infer_from, snapshot

    if not any(is_linear(n) or is_batchnorm(n) or n.op_type in ELEMENTWISE_OPS
               for g in all_graphs(model.graph) for n in g.node):
        return lambda: ShapeTable(ModelProto())
    skeleton, table = snapshot(model), []

    def infer_once() -> ShapeTable:
        if not table:
            table.append(infer_from(skeleton))
        return table[0]

    return infer_once


def _note_affine(report: FoldReport) -> None:
    """One summary line for the Mul/Add/Sub/Div runs (their entries are in report.extra)."""
    folded, skipped = report.extra.get(AFFINE_FOLDED, []), report.extra.get(AFFINE_SKIPPED, [])
    if folded or skipped:
        report.notes.append(
            f"also folded {len(folded)} run(s) of per-channel Mul/Add/Sub/Div, left {len(skipped)} "
            f"(see {AFFINE_FOLDED} / {AFFINE_SKIPPED} in the JSON report)"
        )
    noops = report.extra.get(NOOPS_REMOVED, [])
    if noops:
        report.notes.append(f"removed {len(noops)} Mul/Div by 1 or Add/Sub of 0 (see {NOOPS_REMOVED} in the JSON report)")


def _note_constants(report: FoldReport, stats: ResolverStats) -> None:
    """The constant subgraphs the resolver evaluated (all graphs), under ``extra["constants"]``."""
    if stats.subgraphs:
        report.extra[CONSTANTS] = {
            "subgraphs": stats.subgraphs,
            "nodes": stats.nodes,
            "elements": stats.elements,
            "reference_nodes": stats.reference_nodes,
            "evaluated": [{"value": e.name, "nodes": e.nodes, "elements": e.elements} for e in stats.evaluated],
        }


def _default_opset(model: ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 1


def _drop_unused(graph: GraphProto, candidates: List[str], ir_version: int) -> None:
    """Remove initializers and Constant nodes that a fold left without users.

    Only values the fold itself orphaned are candidates, so unrelated parts of the model stay
    byte-for-byte as they were. Uses are counted across every graph, subgraphs included. From
    IR 4 on, an initializer that is also a graph input is part of the model's interface and
    stays; below IR 4 every initializer is listed as an input, and goes with it.
    """
    candidates = set(candidates)
    if not candidates:
        return
    used = set()
    for g in all_graphs(graph):
        for node in g.node:
            used.update(node.input)
        used.update(o.name for o in g.output)
        if ir_version >= 4:
            used.update(i.name for i in g.input)
        else:
            inits = {t.name for t in g.initializer}
            used.update(i.name for i in g.input if i.name not in inits)
    dead = candidates - used
    if not dead:
        return
    for g in all_graphs(graph):
        _remove_where(g.initializer, lambda t: t.name in dead)
        _remove_where(g.node, lambda n: n.op_type == "Constant" and n.output and n.output[0] in dead)
        _remove_where(g.value_info, lambda v: v.name in dead)
        if ir_version < 4:
            _remove_where(g.input, lambda v: v.name in dead)


def _remove_where(field, doomed) -> None:
    """Delete the items of a repeated protobuf field for which ``doomed`` holds.

    Deleting in place keeps large tensors where they are; rebuilding the field would copy
    every item that stays (protobuf's extend() copies), so it is used only for many deletions.
    """
    positions = [i for i, item in enumerate(field) if doomed(item)]
    if len(positions) <= 64:
        for i in reversed(positions):
            del field[i]
        return
    keep = [item for item in field if not doomed(item)]
    del field[:]
    field.extend(keep)

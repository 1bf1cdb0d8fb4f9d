"""The ONNX front end: fold BatchNormalization and other per-channel affine ops into the
linear ops next to them, or explain why not.

Two kinds of anchor, each node looked at a bounded number of times (linear in graph size):

1. each linear op (Conv, ConvTranspose, Gemm, MatMul) takes the chain of per-channel affine
   ops after it -- BNs and Mul/Add/Sub/Div by constants, through Identity/Dropout and
   channel-keeping layout ops (``chain.py``);
2. each BN left merges the affine ops after it (``merge.py``), then tries the linear ops it
   feeds (``before.py``).

Every rule computes in float64 and raises :class:`bnfold.affine.Refusal` with a reason code
(:data:`bnfold.report.REASONS`) when a fold would not be
exact. ``report.folded`` / ``report.skipped`` hold one entry per BN; Mul/Add/Sub/Div runs are
listed in ``report.extra["affine_folded"]`` / ``["affine_skipped"]``.
"""

from __future__ import annotations

import os
import time
from typing import Dict, Tuple, Union

from onnx import GraphProto, ModelProto, NodeProto

from ..affine import Refusal
from ..onnx_validate import validate_model
from ..report import FoldReport
from .before import fold_bn_before
from .bn import is_batchnorm
from .chain import Refusals, fold_chain_after, is_linear
from .graph import Names, Scope, all_graphs, node_label, subgraphs
from .merge import merge_after_bn
from .rewrite import FoldContext, GraphRewrite

# Rule names as they appear in reports ("<op>" is conv, convtranspose, gemm or matmul).
RULES: Dict[str, str] = {
    "<op>-bn": "linear op -> BN, through Identity/Dropout (conv-bn, convtranspose-bn, gemm-bn, matmul-bn)",
    "<op>-affine": "linear op -> Mul/Add/Sub/Div by per-channel constants",
    "<op>-layout-bn": "linear op -> Transpose/Reshape/Squeeze/Unsqueeze/Flatten keeping channels -> BN",
    "<op>-layout-affine": "the same with Mul/Add/Sub/Div",
    "bn-conv": "BN -> Conv without padding (grouped, depthwise)",
    "bn-gemm": "BN1d -> Gemm",
    "bn-matmul": "BN1d -> MatMul on a 2-D value",
    "bn-flatten-gemm": "BN2d -> Flatten(axis=1) -> Gemm (bn-flatten-matmul likewise)",
    "bn-bn": "BN -> BN merged into the first BN",
    "bn-affine": "BN -> Mul/Add/Sub/Div merged into the BN",
}

ModelLike = Union[ModelProto, str, "os.PathLike[str]"]


def fold_onnx(model: ModelLike, *, inplace: bool = False) -> Tuple[ModelProto, FoldReport]:
    """Fold every BatchNormalization that can be folded exactly; return ``(model, report)``.

    ``model`` is a ModelProto or a path (external data next to it is loaded). A ModelProto is
    copied first unless ``inplace=True``; a file is never modified. The report lists each BN
    folded (and the rule that did it) and each BN left, with a reason code and a sentence.
    """
    from ..onnx_io import load_model

    if isinstance(model, ModelProto):
        if not inplace:
            copy = ModelProto()
            copy.CopyFrom(model)
            model = copy
    else:
        model = load_model(os.fspath(model))
    report = fold_model_proto(model)
    return model, report


def fold_file(
    src: Union[str, "os.PathLike[str]"], dst: Union[str, "os.PathLike[str]"], *, check: bool = True, seed: int = 0
) -> FoldReport:
    """Fold the model at ``src`` and write it to ``dst``; return the report.

    Weights are read lazily and copied through (see :mod:`bnfold.pipeline`), the result is
    checked with onnxruntime unless ``check=False``, and ``dst`` is written atomically.
    Raises :class:`bnfold.errors.BnfoldError` (``CheckFailed`` on a mismatch).
    """
    from ..pipeline import fold_path

    outcome = fold_path(os.fspath(src), os.fspath(dst), check=check, seed=seed)
    outcome.raise_for_error()
    return outcome.report


def fold_model_proto(model: ModelProto, spill=None) -> FoldReport:
    """Fold ``model`` in place and return the report.

    ``spill`` (a :class:`bnfold.onnx_wire.Spill`) makes new large tensors stubs backed by a
    scratch file instead of memory; the file-to-file pipeline uses it to bound peak memory.
    """
    start = time.perf_counter()
    validate_model(model)  # malformed graphs are refused before any rule runs
    report = FoldReport(method="onnx-graph")
    shapes = _lazy_shapes(model)
    ctx = FoldContext(Names(all_graphs(model.graph)), report, _default_opset(model), shapes, spill)
    _fold_graph(model.graph, Scope(model.graph, model.ir_version, opset=ctx.opset), ctx, "")
    _drop_unused(model.graph, ctx.orphans, model.ir_version)
    _note_affine(report)
    report.seconds = time.perf_counter() - start
    return report


def _lazy_shapes(model: ModelProto):
    """A function giving the model's shapes, inferred on first call (seconds on a large graph,
    and many models never need them) from a snapshot taken now, before any rewrite renames
    values. Models without a BN or linear op get an empty table."""
    from .shapes import ShapeTable, infer_from, snapshot

    if not any(is_linear(n) or is_batchnorm(n) for g in all_graphs(model.graph) for n in g.node):
        return lambda: ShapeTable(ModelProto())
    skeleton, table = snapshot(model), []

    def shapes() -> ShapeTable:
        if not table:
            table.append(infer_from(skeleton))
        return table[0]

    return shapes


def _note_affine(report: FoldReport) -> None:
    """One summary line for the Mul/Add/Sub/Div runs (their entries are in report.extra)."""
    from ..report import AFFINE_FOLDED, AFFINE_SKIPPED

    folded, skipped = report.extra.get(AFFINE_FOLDED, []), report.extra.get(AFFINE_SKIPPED, [])
    if folded or skipped:
        report.notes.append(
            f"also folded {len(folded)} run(s) of per-channel Mul/Add/Sub/Div, left {len(skipped)} "
            f"(see {AFFINE_FOLDED} / {AFFINE_SKIPPED} in the JSON report)"
        )


def _default_opset(model: ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 1


def _fold_graph(graph: GraphProto, scope: Scope, ctx: FoldContext, path: str) -> None:
    for node in graph.node:
        for attr_name, sub in subgraphs(node):
            sub_path = f"{path}/{node_label(node)}.{attr_name}".lstrip("/")
            sub_scope = Scope(sub, scope.ir_version, parent=scope)
            _fold_graph(sub, sub_scope, ctx, sub_path)
    rw = GraphRewrite(graph, scope, ctx, path)
    handled: set = set()  # id() of BNs folded
    refusals: Refusals = {}  # id() of a BN -> why the linear op before it could not take it
    nodes = list(graph.node)
    # 1. each linear op takes the affine chain after it (BNs, Mul/Add/Sub/Div, ...)
    for node in nodes:
        if is_linear(node) and id(node) not in rw.removed:
            fold_chain_after(rw, node, handled, refusals)
    # 2. each BN left merges what follows it, then tries the linear ops it feeds
    for node in nodes:
        if is_batchnorm(node) and id(node) not in handled and id(node) not in rw.removed:
            _fold_leftover_bn(rw, node, handled, refusals)
    rw.commit()
    ctx.orphans.extend(rw.orphans)


def _fold_leftover_bn(rw: GraphRewrite, bn: NodeProto, handled: set, refusals: Refusals) -> None:
    merge_after_bn(rw, bn, handled)
    label = rw.label(bn)
    try:
        rule, users = fold_bn_before(rw, bn)
    except Refusal as before:
        producer = rw.index.producer.get(bn.input[0]) if bn.input else None
        why = refusals.get(id(bn))
        if why is None:
            why = before if before.reason != "no-linear-consumer" else _no_producer(producer)
        p_label = rw.label(producer) if producer is not None else None
        p_op = producer.op_type if producer is not None else None
        rw.report.add_skipped(label, why.reason, why.detail, p_label, p_op, rw.path)
        return
    handled.add(id(bn))
    rw.report.add_folded(label, ", ".join(rw.label(u) for u in users), users[0].op_type, rule, rw.path)


def _no_producer(producer) -> Refusal:
    if producer is None:
        what = "a graph input or constant"
    else:
        what = f"{producer.op_type} '{node_label(producer)}'"
    return Refusal("no-linear-producer", f"the BN's input comes from {what}")


def _drop_unused(graph: GraphProto, candidates, ir_version: int) -> None:
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

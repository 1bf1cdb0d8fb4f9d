"""The ONNX front end: find BN nodes, match each to the linear op before it, fold or explain.

One rule per producer kind (``conv.py``, ``gemm.py``); each computes the folded tensors in
float64 and raises :class:`bnfold.affine.Refusal` with a reason code when the fold would not
be exact. The checks every rule shares (inference mode, constant parameters, the producer's
output used by the BN alone) run here, before any rule.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Dict, Optional, Tuple, Union

from onnx import GraphProto, ModelProto, NodeProto

from ..affine import Refusal
from ..report import FoldReport
from .bn import is_batchnorm, read_bn
from .conv import fold_conv_bn
from .gemm import fold_gemm_bn, fold_matmul_bn
from .graph import GraphIndex, Names, Scope, all_graphs, node_label, subgraphs
from .rewrite import GraphRewrite

Rule = Callable[..., str]

RULES: Dict[str, Rule] = {
    "Conv": fold_conv_bn,
    "ConvTranspose": fold_conv_bn,
    "Gemm": fold_gemm_bn,
    "MatMul": fold_matmul_bn,
    "Add": fold_matmul_bn,  # MatMul -> Add(bias) -> BN
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


def fold_file(src: Union[str, "os.PathLike[str]"], dst: Union[str, "os.PathLike[str]"]) -> FoldReport:
    """Fold the model at ``src`` and write it to ``dst`` atomically (see :mod:`bnfold.onnx_io`)."""
    from ..onnx_io import read_model, staged_output, write_model

    src = os.path.abspath(os.fspath(src))
    model, data_files = read_model(src)
    report = fold_model_proto(model)
    with staged_output(os.fspath(dst), protect={os.path.realpath(src)} | data_files) as staged:
        write_model(model, staged, external=True if data_files else None)
    return report


def fold_model_proto(model: ModelProto) -> FoldReport:
    """Fold ``model`` in place and return the report."""
    start = time.perf_counter()
    report = FoldReport(method="onnx-graph")
    opset = _default_opset(model)
    names = Names(all_graphs(model.graph))
    ranks_cache: Dict[str, int] = {}

    def ranks() -> Dict[str, int]:
        if not ranks_cache:
            from .shapes import infer_ranks

            ranks_cache.update(infer_ranks(model) or {"": 0})
        return ranks_cache

    orphans = []
    _fold_graph(model.graph, Scope(model.graph, model.ir_version), names, report, "", opset, ranks, orphans)
    _drop_unused(model.graph, orphans)
    report.seconds = time.perf_counter() - start
    return report


def _default_opset(model: ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 1


def _fold_graph(graph: GraphProto, scope: Scope, names: Names, report: FoldReport, path: str,
                opset: int, ranks, orphans: list) -> None:
    for node in graph.node:
        for attr_name, sub in subgraphs(node):
            sub_path = f"{path}/{node_label(node)}.{attr_name}".lstrip("/")
            sub_scope = Scope(sub, scope.ir_version, parent=scope)
            _fold_graph(sub, sub_scope, names, report, sub_path, opset, ranks, orphans)
    rw = GraphRewrite(graph, scope, names, report, path, opset, ranks)
    for node in list(graph.node):
        if is_batchnorm(node):
            _fold_one(rw, node)
    rw.commit()
    orphans.extend(rw.orphans)


def _fold_one(rw: GraphRewrite, bn: NodeProto) -> None:
    x = bn.input[0] if bn.input else ""
    producer = rw.index.producer.get(x)
    label = node_label(bn)
    try:
        if producer is None or producer.op_type not in RULES or producer.domain not in ("", "ai.onnx"):
            what = "a graph input" if producer is None else f"{producer.op_type} '{node_label(producer)}'"
            raise Refusal("no-linear-producer", f"the BN's input comes from {what}")
        _check_sole_use(rw.index, x, bn)
        affine = read_bn(bn, rw.scope)
        rule = RULES[producer.op_type](rw, affine, producer, x)
    except Refusal as why:
        p_label = node_label(producer) if producer is not None else None
        p_op = producer.op_type if producer is not None else None
        rw.report.add_skipped(label, why.reason, why.detail, p_label, p_op, rw.path)
        return
    rw.folded(bn, producer, rule)


def _check_sole_use(index: GraphIndex, x: str, bn: NodeProto) -> None:
    if x in index.outputs:
        raise Refusal("producer-output-is-graph-output", f"'{x}' is a graph output")
    users = index.consumers.get(x, [])
    if len(users) != 1 or users[0] is not bn or list(bn.input).count(x) != 1:
        others = ", ".join(node_label(n) for n in users if n is not bn) or "another input of the BN"
        raise Refusal("producer-has-other-consumers", f"'{x}' is also read by {others}")


def _drop_unused(graph: GraphProto, candidates) -> None:
    """Remove initializers and Constant nodes that a fold left without users.

    Only values the fold itself orphaned are candidates, so unrelated parts of the model stay
    byte-for-byte as they were. Uses are counted across every graph, subgraphs included.
    """
    candidates = set(candidates)
    if not candidates:
        return
    used = set()
    for g in all_graphs(graph):
        for node in g.node:
            used.update(node.input)
        used.update(o.name for o in g.output)
        used.update(i.name for i in g.input)  # an initializer that is also an input stays
    dead = candidates - used
    if not dead:
        return
    for g in all_graphs(graph):
        if any(t.name in dead for t in g.initializer):
            keep = [t for t in g.initializer if t.name not in dead]
            del g.initializer[:]
            g.initializer.extend(keep)
        if any(n.op_type == "Constant" and n.output and n.output[0] in dead for n in g.node):
            keep_nodes = [n for n in g.node if not (n.op_type == "Constant" and n.output and n.output[0] in dead)]
            del g.node[:]
            g.node.extend(keep_nodes)
        if any(v.name in dead for v in g.value_info):
            keep_vi = [v for v in g.value_info if v.name not in dead]
            del g.value_info[:]
            g.value_info.extend(keep_vi)

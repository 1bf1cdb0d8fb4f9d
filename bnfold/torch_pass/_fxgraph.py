"""Fold batch norm *function calls* (``F.batch_norm`` / ``torch.batch_norm`` in a custom module's
``forward``) found in the torch.fx graph.

Such a BN has no module to replace: the call sits in someone's Python ``forward``. bnfold folds
its statistics into the producer module's weights and removes the call from the traced graph, so
the result is a ``torch.fx.GraphModule`` of the model's traced ``forward`` (its submodules keep
their qualified names; the folded calls' buffers are no longer referenced, so they leave its
``state_dict``, as a folded BN module's do when it becomes ``Identity``). The original class's
Python methods other than ``forward`` are not on a GraphModule: :func:`fold_module` returns one
only when such a call was folded, and ``rewrite_graph=False`` keeps the original class instead
(those calls are then left, with reason ``functional-bn``).

A call folds when, in the graph: it runs in inference mode (``training`` is the constant False)
with a constant eps; its statistics and affine parameters are attributes of the model that no
other op may change (only inference-mode batch-norm calls read them); its input
is the output of a stock conv/linear module call read by nothing else; that module is called
once in the whole graph, with no hooks and no parameter read elsewhere; and the traced ranks over
every example put the producer's channels on dim 1.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx
import torch.nn as nn

from ..affine import Refusal
from ..report import FoldReport
from ._functional import bn_call_args, inference_eps
from ._kinds import BNKind, producer_kind, rank_verdict
from ._math import bn_affine, fold_tensors
from ._observe import RANKS_META, merged_rank
from ._shift import shift_after_class

def _attr(root: nn.Module, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(root.get_submodule(owner) if owner else root, name)


def _owner(target: str) -> str:
    return target.rpartition(".")[0] or target


def functional_bn_nodes(graph: torch.fx.Graph) -> List[torch.fx.Node]:
    return [n for n in graph.nodes if bn_call_args(n) is not None]


def labels(nodes: List[torch.fx.Node]) -> Dict[torch.fx.Node, str]:
    """A report name per call: the module owning its running mean, ``@node`` when shared."""
    def base(n):
        mean = bn_call_args(n)["running_mean"]
        return _owner(mean.target) if isinstance(mean, torch.fx.Node) and mean.op == "get_attr" else n.name

    counts = Counter(base(n) for n in nodes)
    return {n: base(n) if counts[base(n)] == 1 else f"{base(n)}@{n.name}" for n in nodes}


class _Pending:
    def __init__(self, node, label, producer, weight, bias, shift_after) -> None:
        self.node, self.label, self.producer, self.weight, self.bias = node, label, producer, weight, bias
        self.shift_after = shift_after


def _readers(graph: torch.fx.Graph) -> Dict[str, List[torch.fx.Node]]:
    """Attribute name -> every node that reads it (through any get_attr of it)."""
    out: Dict[str, List[torch.fx.Node]] = {}
    for n in graph.nodes:
        if n.op == "get_attr":
            out.setdefault(n.target, []).extend(n.users)
    return out


def _only_read_by_inference(readers: List[torch.fx.Node]) -> bool:
    """No reader can change the tensor: each is an inference-mode batch-norm call."""
    for r in readers:
        args = bn_call_args(r)
        if args is None or inference_eps(args) is None:
            return False
    return True


def _refusal(root: nn.Module, node: torch.fx.Node, calls: Counter, producer_refusal,
             readers: Dict[str, List[torch.fx.Node]]) -> Tuple[Optional[Refusal], object]:
    """``(None, (producer name, weight, bias))`` for a foldable call, else ``(Refusal, None)``."""
    args = bn_call_args(node)
    eps = inference_eps(args)
    if args["running_mean"] is None or args["running_var"] is None:
        return Refusal("no-running-stats", "the call passes no running statistics"), None
    if eps is None:
        return Refusal("training-mode", "the call normalizes with batch statistics (training is not the constant False)"), None
    tensors = {}
    for key in ("running_mean", "running_var", "weight", "bias"):
        value = args[key]
        if value is None and key in ("weight", "bias"):
            tensors[key] = None
            continue
        if not (isinstance(value, torch.fx.Node) and value.op == "get_attr"):
            return Refusal("not-constant", f"its {key} is not an attribute of the model"), None
        tensors[key] = _attr(root, value.target)
        if not isinstance(tensors[key], torch.Tensor):
            return Refusal("not-constant", f"its {key} is not a tensor"), None
        if not _only_read_by_inference(readers.get(value.target, [])):
            # a training-mode call updates running statistics in place, an in-place op changes them
            return Refusal("parameter-used-elsewhere", f"{value.target} is also read by an op that may change it"), None
    src = args["input"]
    if not (isinstance(src, torch.fx.Node) and src.op == "call_module"):
        what = getattr(src, "op", "a constant")
        return Refusal("no-linear-producer", f"its input comes from {what} {getattr(src, 'name', '')}".strip()), None
    mod = root.get_submodule(src.target)
    pk = producer_kind(mod)
    if pk is None:
        return Refusal("no-linear-producer", f"its input comes from {type(mod).__name__} {src.target}"), None
    flat = list(node.args) + list(node.kwargs.values())
    if list(src.users) != [node] or sum(a is src for a in flat) != 1:
        readers = ", ".join(u.name for u in src.users if u is not node) or "the call itself"
        return Refusal("producer-has-other-consumers", f"the output of {src.target} is also read by {readers}"), None
    if calls[src.target] != 1:
        return Refusal("shared-module-different-bn", f"{src.target} is called {calls[src.target]} times"), None
    refusal = producer_refusal(src.target, mod)
    if refusal:
        return refusal, None
    rank = merged_rank(src.meta.get(RANKS_META, {None}), pk.out_rank)  # over every example
    verdict = rank_verdict(pk, BNKind("batch_norm", frozenset({2, 3, 4, 5}), eps), rank)
    if verdict == "not-per-channel":
        return Refusal(verdict, f"{pk.op} gives a {rank}-D output whose dim 1 is not its channels"), None
    if verdict == "shape-unknown":
        return Refusal(verdict, f"{pk.op}+batch_norm: the output rank is unknown; pass example_inputs"), None
    if tensors["running_mean"].numel() != pk.out_channels:
        return Refusal("channel-mismatch", f"{pk.op} has {pk.out_channels} output channels, the call "
                       f"{tensors['running_mean'].numel()}"), None
    a, b = bn_affine(tensors["weight"], tensors["bias"], tensors["running_mean"], tensors["running_var"], eps)
    try:
        w, c = fold_tensors(mod.weight, mod.bias, a, b, pk.axis, pk.groups, src.target)
    except Refusal as exc:
        return exc, None
    return None, (src.target, w, c, shift_after_class(mod, getattr(nn, pk.op)))


def fold_graph_calls(root: nn.Module, graph: torch.fx.Graph, report: FoldReport, producer_refusal,
                     rewrite: bool) -> Optional[torch.fx.GraphModule]:
    """Fold every foldable batch-norm call of ``graph`` (traced from a copy of ``root``): return
    a GraphModule on ``root`` without those calls, whose folded producers are new modules (so
    ``root`` itself, whose forward still makes the calls, is not changed); None when no call
    was folded. Every call is reported."""
    nodes = functional_bn_nodes(graph)
    if not nodes:
        return None
    names = labels(nodes)
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    readers = _readers(graph)
    pending: List[_Pending] = []
    for node in nodes:
        refusal, fold = _refusal(root, node, calls, producer_refusal, readers)
        if refusal is None and not rewrite:
            refusal = Refusal("functional-bn", "folding this call needs a rewritten forward (rewrite_graph=False)")
        if refusal is not None:
            src = bn_call_args(node)["input"]
            prod = src.target if isinstance(src, torch.fx.Node) and src.op == "call_module" else None
            report.add_skipped(names[node], refusal.reason, refusal.detail, prod,
                               type(root.get_submodule(prod)).__name__ if prod else None)
            continue
        pending.append(_Pending(node, names[node], *fold))
    if not pending:
        return None
    new = torch.fx.Graph()
    new._codegen = graph._codegen  # how forward's arguments are laid out
    env: Dict[torch.fx.Node, torch.fx.Node] = {}
    out = new.graph_copy(graph, env)
    new.output(out)
    for p in pending:
        mod = root.get_submodule(p.producer)
        call, src = env[p.node], env[bn_call_args(p.node)["input"]]
        inputs = call.all_input_nodes
        call.replace_all_uses_with(src)
        new.erase_node(call)
        for i in inputs:
            if i.op == "get_attr" and not i.users:
                new.erase_node(i)
        pk = producer_kind(mod)
        rule = "linear-bn" if pk.op == "Linear" else ("convtranspose-bn" if pk.op.startswith("ConvTranspose") else "conv-bn")
        report.add_folded(p.label, p.producer, type(mod).__name__, rule)
        report.extra.setdefault("fold_methods", {})[p.label] = "fx-graph"
    new.lint()
    result = torch.fx.GraphModule(root, new, class_name=f"{type(root).__name__}Folded")
    for p in pending:
        _replace_producer(result, p)
    result.eval()
    return result


def _replace_producer(result: torch.fx.GraphModule, p: _Pending) -> None:
    """Give the GraphModule its own copy of the producer, with the folded weight and bias.

    GraphModule shares leaf modules with the module it was built from but makes its own parent
    modules on the way, so setting the copy there leaves the original module as it was."""
    owner, _, key = p.producer.rpartition(".")
    parent = result.get_submodule(owner) if owner else result
    mod = getattr(parent, key)
    new = copy.copy(mod)
    new._parameters = dict(mod._parameters)
    grad = mod.weight.requires_grad
    new._parameters["weight"] = nn.Parameter(p.weight, requires_grad=grad)
    new._parameters["bias"] = nn.Parameter(p.bias, requires_grad=grad)
    if p.shift_after is not None:
        new.__class__ = p.shift_after
    if parent._modules.get(key) is not mod:
        raise AssertionError(f"{p.producer} is not a registered submodule of the GraphModule")
    parent._modules[key] = new

"""Batch norm written as a function call, and BatchNorm subclasses proven to be "batch norm, then
something applied to its output" from their traced graph.

timm's ``BatchNormAct2d`` (and the norm-act blocks of other libraries) subclass ``BatchNorm2d``
but override ``forward`` with ``F.batch_norm(x, self.running_mean, ...)`` followed by dropout
and an activation. Such a module folds like a stock BN when its traced ``forward`` shows, node by
node, that:

* it takes one input ``x``, and reads only its metadata besides (``x.ndim`` for an assertion);
* it calls batch norm once, on ``x``, in inference mode (``training`` is the constant False),
  with its own ``running_mean``/``running_var``/``weight``/``bias``, each read nowhere else;
* everything after reads only the batch norm's output (and attributes other than those four).

The fold then puts the BN's statistics into the producer and replaces the module with
:class:`FoldedTail`, a ``GraphModule`` of what ``forward`` did after the batch norm (its
submodules keep their names, so ``bn.act.weight`` of a PReLU stays where it was). No class name
is consulted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from . import _state

# The parameter names of each batch-norm function, in order, and the defaults it has.
_SIGNATURES = {
    F.batch_norm: (
        ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
        {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5},
    ),
    torch.batch_norm: (
        ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps", "cudnn_enabled"),
        {},
    ),
}
STATS = ("running_mean", "running_var", "weight", "bias")
_OWN = STATS + ("num_batches_tracked",)
_METADATA_ATTRS = ("ndim", "shape", "dtype", "device")
_METADATA_METHODS = ("dim", "size")


def bn_call_args(node: torch.fx.Node) -> Optional[Dict[str, object]]:
    """The arguments of a batch-norm call node by name (defaults filled in), or None when the
    node is not one (or its arguments cannot be read by name)."""
    if node.op != "call_function":
        return None
    try:
        sig = _SIGNATURES.get(node.target)
    except TypeError:  # an unhashable target
        return None
    if sig is None:
        return None
    names, defaults = sig
    if len(node.args) > len(names):
        return None
    out = dict(zip(names, node.args))
    for key, value in node.kwargs.items():
        if key not in names or key in out:
            return None
        out[key] = value
    for key in names:
        if key not in out:
            if key not in defaults:
                return None
            out[key] = defaults[key]
    return out


def inference_eps(args: Dict[str, object]) -> Optional[float]:
    """The call's eps when it is an inference-mode batch norm with constant eps, else None."""
    eps = args.get("eps")
    if args.get("training") is not False or isinstance(eps, torch.fx.Node) or not isinstance(eps, (int, float)):
        return None
    return float(eps)


class FoldedTail(torch.fx.GraphModule):
    """What a norm-act module's ``forward`` did after its batch norm (the BN went into the
    producer). bnfold's tracer keeps it as one call, like the module it replaced."""


@dataclass(frozen=True)
class NormAct:
    """A proven norm-act module: fold with ``eps``; ``rank`` is the input rank its forward
    asserts (None: any); ``tail`` replaces the module after the fold."""

    eps: float
    rank: Optional[int]
    tail: FoldedTail


def prove_norm_act(module: nn.Module) -> Tuple[Optional[NormAct], str]:
    """``(NormAct, '')`` when ``module``'s forward is proven to be batch norm then a function
    of its output; ``(None, why not)`` otherwise. The trace runs on a throwaway copy."""
    probe = _state.throwaway(module)
    if probe is None:
        return None, "the module cannot be copied to trace its forward"
    try:
        graph = torch.fx.Tracer().trace(probe)
    except Exception as exc:  # whatever tracing raises: not provable
        return None, f"its forward cannot be traced ({type(exc).__name__})"
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return None, "its forward takes more than one input"
    x = inputs[0]
    calls = [n for n in nodes if bn_call_args(n) is not None]
    if len(calls) != 1:
        return None, f"its forward calls batch norm {len(calls)} times"
    bn = calls[0]
    args = bn_call_args(bn)
    eps = inference_eps(args)
    if args["input"] is not x or eps is None:
        return None, "its batch norm is not an inference-mode call on the input"
    for key in STATS:
        want, got = getattr(module, key, None), args[key]
        if want is None and got is None:
            continue
        if not (isinstance(got, torch.fx.Node) and got.op == "get_attr" and got.target == key) or want is None:
            return None, f"its batch norm does not read the module's own {key}"
    for n in nodes:
        if n.op == "get_attr" and n.target in _OWN and set(n.users) - {bn}:
            return None, f"its {n.target} is read outside the batch norm"
        if n.op == "get_attr" and not _has_attr(module, n.target):
            # a tensor the tracer computed eagerly and baked in (from the module's own state)
            return None, f"its forward computes {n.target} eagerly while tracing"
    meta = _metadata_nodes(nodes, x)
    if set(x.users) - meta - {bn}:
        return None, "its forward reads the input other than through the batch norm"
    tail = _tail_nodes(nodes, bn)
    if tail is None:
        return None, "what follows the batch norm reads more than its output"
    rest = [n for n in nodes if n.op in ("call_function", "call_method", "call_module")
            and n not in meta and n not in tail and n is not bn]
    if rest:
        return None, f"its forward also computes {rest[0].name}"
    return NormAct(eps, _asserted_rank(nodes, x), _tail_module(module, graph, bn, tail)), ""


def _has_attr(module: nn.Module, target: str) -> bool:
    obj = module
    for part in target.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def _metadata_nodes(nodes, x: torch.fx.Node) -> set:
    """Nodes that read only the input's metadata (ndim, shape...), and functions of those, and
    are used only by such nodes (an assertion on the rank, say)."""
    meta = set()
    for n in nodes:
        if n.op == "call_function" and n.target is getattr and n.args[0] is x and n.args[1] in _METADATA_ATTRS:
            meta.add(n)
        elif n.op == "call_method" and n.target in _METADATA_METHODS and n.args and n.args[0] is x:
            meta.add(n)
        elif n.op == "call_function" and n.all_input_nodes and all(i in meta for i in n.all_input_nodes):
            meta.add(n)
    # a metadata value that flows into anything else is not only metadata
    changed = True
    while changed:
        changed = False
        for n in list(meta):
            if any(u not in meta for u in n.users):
                meta.discard(n)
                changed = True
    return meta


def _tail_nodes(nodes, bn: torch.fx.Node) -> Optional[set]:
    """The nodes computed from the batch norm's output (and non-BN attributes), or None when one
    of them reads anything else."""
    tail: set = set()
    after = False
    for n in nodes:
        if n is bn:
            after = True
            continue
        if not after or n.op == "output":
            continue
        inputs = n.all_input_nodes
        if n.op == "get_attr":
            if n.target in _OWN:
                continue
            tail.add(n)
        elif inputs and any(i is bn or i in tail for i in inputs):
            if not all(i is bn or i in tail or (i.op == "get_attr" and i.target not in _OWN) for i in inputs):
                return None
            tail.add(n)
    out = [n for n in nodes if n.op == "output"][0]
    if not all(i is bn or i in tail for i in out.all_input_nodes):
        return None
    tail = {n for n in tail if n.op != "get_attr"}
    return tail | {i for n in tail for i in n.all_input_nodes if i.op == "get_attr"}


def _asserted_rank(nodes, x: torch.fx.Node) -> Optional[int]:
    """k when forward runs ``torch._assert(x.ndim == k, ...)`` (or ``x.dim() == k``)."""
    import operator

    for n in nodes:
        if n.op != "call_function" or n.target is not torch._assert or not n.args:
            continue
        cond = n.args[0]
        if not (isinstance(cond, torch.fx.Node) and cond.op == "call_function" and cond.target is operator.eq):
            continue
        lhs, rhs = cond.args
        if isinstance(rhs, int) and isinstance(lhs, torch.fx.Node) and lhs.args and lhs.args[0] is x and (
            (lhs.op == "call_function" and lhs.target is getattr and lhs.args[1] == "ndim")
            or (lhs.op == "call_method" and lhs.target == "dim")
        ):
            return rhs
    return None


def _tail_module(module: nn.Module, graph: torch.fx.Graph, bn, tail: set) -> FoldedTail:
    """A GraphModule of the tail, on ``module``'s own submodules (not the traced copy's)."""
    new = torch.fx.Graph()
    env = {bn: new.placeholder("x")}
    for n in graph.nodes:
        if n in tail:
            env[n] = new.node_copy(n, lambda a: env[a])
        elif n.op == "output":
            new.output(torch.fx.node.map_arg(n.args[0], lambda a: env[a]))
    return FoldedTail(module, new, class_name=f"{type(module).__name__}Tail")

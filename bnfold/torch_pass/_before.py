"""A BatchNorm1d *before* a Linear, folded into the Linear (torch.fx path).

``Linear(BN(x))`` with a 2-D ``x`` is ``W (a * x + b) + c = (W diag(a)) x + (W b + c)``: exact,
as the Linear reads every BN output element and nothing else (timm's ``NormLinear`` classifier
head: BatchNorm1d, Dropout, Linear). This rule runs after the producer rules, on the BNs they
left for want of a producer, and only on the torch.fx graph, where every call is seen:

* the BN is a stock BatchNorm1d in eval mode with running statistics, no hooks, its buffers
  read nowhere else, called once; its input is 2-D on every example (features on dim 1);
* its output reaches a Linear only through eval-mode Dropout or Identity modules, each value
  on the way read by the next module alone;
* the Linear is stock, called once, with no hooks and no weight read elsewhere.

The BN becomes ``nn.Identity`` and the Linear takes the folded weight and bias.
"""

from __future__ import annotations

from collections import Counter
from typing import List, Optional, Tuple

import torch
import torch.fx
import torch.nn as nn

from ..affine import Refusal
from ..report import FoldReport
from ._kinds import bn_kind_why, producer_kind
from ._math import bn_affine, fold_tensors
from ._observe import RANKS_META

RETRY = ("no-linear-producer", "producer-has-other-consumers")


def _passes_through(mod: nn.Module) -> bool:
    """A module that returns its input unchanged in eval mode, with no hooks."""
    if mod._forward_hooks or mod._forward_pre_hooks:
        return False
    if type(mod) is nn.Identity:
        return True
    return type(mod) in (nn.Dropout, nn.Dropout1d, nn.AlphaDropout) and not mod.training


def _consumer(node: torch.fx.Node, modules) -> Optional[torch.fx.Node]:
    """The Linear call that alone reads ``node`` through pass-through modules, or None."""
    cur = node
    while True:
        users = list(cur.users)
        if len(users) != 1:
            return None
        user = users[0]
        if user.op != "call_module" or tuple(user.args) != (cur,) or user.kwargs:
            return None
        mod = modules.get(user.target)
        if isinstance(mod, nn.Linear):
            return user
        if mod is None or not _passes_through(mod):
            return None
        cur = user


def _fold(bn: nn.Module, linear: nn.Module, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    a, b = bn_affine(bn.weight, bn.bias, bn.running_mean, bn.running_var, eps)
    return fold_tensors(linear.weight, linear.bias, a, b, 1, 1, "the Linear", before=True)


def fold_bn_before_linear(root: nn.Module, graph: torch.fx.Graph, report: FoldReport, producer_refusal,
                          foreign: dict, applied) -> List[str]:
    """Fold the BNs the producer rules left (reasons in RETRY) into the Linear after them, when
    the rule above proves it; update ``report``; return the BNs folded."""
    modules = dict(root.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    left = {s.bn: s for s in report.skipped if s.reason in RETRY}
    done = []
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in left or calls[node.target] != 1:
            continue
        bn = modules.get(node.target)
        kind, _ = bn_kind_why(bn)
        if kind is None or kind.norm_act is not None or kind.op != "BatchNorm1d":
            continue
        if bn.training or bn.running_mean is None or bn._forward_hooks or bn._forward_pre_hooks:
            continue
        if node.target in foreign or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        if node.args[0].meta.get(RANKS_META) != frozenset({2}):
            continue
        user = _consumer(node, modules)
        if user is None or calls[user.target] != 1:
            continue
        linear = modules[user.target]
        if producer_kind(linear) is None or producer_refusal(user.target, linear) is not None:
            continue
        try:
            weight, bias = _fold(bn, linear, kind.eps)
        except Refusal:
            continue
        grad = linear.weight.requires_grad
        applied.set(linear._parameters, "weight", nn.Parameter(weight, requires_grad=grad))
        applied.set(linear._parameters, "bias", nn.Parameter(bias, requires_grad=grad))
        applied.removed_bns.append(bn)
        for parent in root.modules():
            for key, child in list(parent._modules.items()):
                if child is bn:
                    applied.set(parent._modules, key, nn.Identity())
        report.skipped.remove(left[node.target])
        report.add_folded(node.target, user.target, "Linear", "bn-linear")
        report.extra.setdefault("fold_methods", {})[node.target] = "module (bn-before)"
        done.append(node.target)
    return done

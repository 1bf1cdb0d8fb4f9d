"""From observed calls to fold decisions, and applying them to a module.

Every method of finding pairs (torch.fx, torch.export, forward hooks) reduces what it saw to an
:class:`Observation`: each call of a producer module (and the BN module, if any, that alone
consumes that call's output), each call of a BN module (and the producer call feeding it), and
the modules whose parameters are read outside their own calls. :func:`decide` then applies the
same rules whatever the method, so a fold never rests on names or registration order.

A BN module is folded only when *every* call of it reads the output of a producer call that
feeds it alone, and every call of each such producer module is followed by this same BN module;
folding then changes the producer's weights (every call of it) and removes the BN (every call of
it), so all call sites stay exact.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..affine import Refusal
from ..report import REASONS, FoldReport
from ._kinds import FOLD_DTYPES, BNKind, bn_kind_why, is_batchnorm, is_producer_type, producer_kind, rank_verdict
from ._math import bn_affine, fold_tensors
from ._shift import shift_after_class

# Reason codes this front end adds (their sentences live in bnfold.report.REASONS).
TORCH_REASONS: Dict[str, str] = {
    code: REASONS[code]
    for code in ("unsupported-module", "module-has-hooks", "parameter-used-elsewhere", "not-called", "unverified")
}


@dataclass
class ProducerCall:
    """One call of a producer module. ``follower`` is the BN module that alone reads its output."""

    module: str
    follower: Optional[str]
    rank: Optional[int]
    detail: str = ""  # why the follower is None (who else reads the output)


@dataclass
class BNCall:
    """One call of a BN module; ``producer`` indexes ``Observation.producer_calls`` (None: its
    input does not come straight from a producer call)."""

    bn: str
    producer: Optional[int]
    source: str = ""  # what the input is, for the report when there is no producer


@dataclass
class Observation:
    method: str
    producer_calls: List[ProducerCall] = field(default_factory=list)
    bn_calls: List[BNCall] = field(default_factory=list)
    foreign_use: Dict[str, str] = field(default_factory=dict)  # module -> where its params were read
    notes: List[str] = field(default_factory=list)
    functional_bns: List[str] = field(default_factory=list)  # batch-norm calls outside BN modules


@dataclass
class FoldAction:
    bn: str
    producers: List[Tuple[str, torch.Tensor, torch.Tensor, Optional[type]]]  # (name, weight, bias, new class)
    replacement: nn.Module  # what the BN module becomes: Identity, or a norm-act's tail


def _has_forward_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _bn_refusal(name: str, bn: nn.Module, obs: Observation, calls: List[BNCall], kind, why: str) -> Optional[Refusal]:
    """A reason the BN module itself cannot be folded, whoever feeds it."""
    if kind is None:
        return Refusal("unsupported-module", why)
    if bn.training:
        return Refusal("training-mode", "the BN is in training mode, so it normalizes with batch statistics")
    if bn.running_mean is None or bn.running_var is None:
        return Refusal("no-running-stats", "track_running_stats=False: the BN always uses batch statistics")
    if _has_forward_hooks(bn):
        return Refusal("module-has-hooks", "the BN has forward hooks")
    if name in obs.foreign_use:
        return Refusal("parameter-used-elsewhere", f"its buffers are read by {obs.foreign_use[name]}")
    if not calls:
        return Refusal("not-called", f"the BN is never called ({obs.method})")
    return None


def producer_refusal(name: str, mod: nn.Module, obs: Observation) -> Optional[Refusal]:
    """A reason the producer module cannot take a fold, whatever follows it."""
    if producer_kind(mod) is None:
        return Refusal("unsupported-module", f"{type(mod).__name__} overrides forward")
    if torch.nn.utils.parametrize.is_parametrized(mod):
        return Refusal("unsupported-module", "the producer's weight is parametrized")
    if not isinstance(mod._parameters.get("weight"), nn.Parameter):
        return Refusal("unsupported-module", "the producer's weight is not a plain Parameter")
    if _has_forward_hooks(mod):
        return Refusal("module-has-hooks", "the producer has forward hooks")
    if name in obs.foreign_use:
        return Refusal("parameter-used-elsewhere", f"its weight is read by {obs.foreign_use[name]}")
    dtype = str(mod.weight.dtype).replace("torch.", "")
    if dtype not in FOLD_DTYPES:
        return Refusal("unsupported-dtype", f"the producer's weight is {dtype}")
    return None


def _call_refusal(root: nn.Module, call: BNCall, obs: Observation, by_producer, bk: BNKind) -> Optional[Refusal]:
    """A reason this one call of the BN cannot be folded into its producer."""
    if call.producer is None:
        return Refusal("no-linear-producer", call.source or "its input is not the output of a conv or linear module")
    pc = obs.producer_calls[call.producer]
    mod = root.get_submodule(pc.module)
    if not is_producer_type(mod):
        return Refusal("no-linear-producer", f"its input comes from {type(mod).__name__}")
    if pc.follower != call.bn:
        return Refusal("producer-has-other-consumers", pc.detail or "the producer's output is also used elsewhere")
    refusal = producer_refusal(pc.module, mod, obs)
    if refusal:
        return refusal
    followers = {c.follower for c in by_producer[pc.module]}
    if followers != {call.bn}:
        others = sorted(f or "something other than a BN" for f in followers if f != call.bn)
        return Refusal(
            "shared-module-different-bn",
            f"{pc.module} is called {len(by_producer[pc.module])} times; other calls feed {', '.join(others)}",
        )
    pk = producer_kind(mod)
    verdict = rank_verdict(pk, bk, pc.rank)
    if verdict == "not-per-channel":
        rank = f"a {pc.rank}-D" if pc.rank is not None else "an"
        return Refusal(verdict, f"{pk.op} gives {rank} output whose dim 1 is not its output channels")
    if verdict == "shape-unknown":
        return Refusal(verdict, f"{pk.op}+{bk.op}: the BN input may be 2-D or 3-D; pass example_inputs to trace shapes")
    n_bn = root.get_submodule(call.bn).num_features
    if pk.out_channels != n_bn:
        return Refusal("channel-mismatch", f"{pk.op} has {pk.out_channels} output channels, the BN has {n_bn}")
    return None


def _rule(mod: nn.Module) -> str:
    op = producer_kind(mod).op
    return "linear-bn" if op == "Linear" else ("convtranspose-bn" if op.startswith("ConvTranspose") else "conv-bn")


def _compute(root: nn.Module, bn_name: str, producers: List[str], kind: BNKind) -> FoldAction:
    bn = root.get_submodule(bn_name)
    a, b = bn_affine(bn.weight, bn.bias, bn.running_mean, bn.running_var, kind.eps)
    out = []
    for name in producers:
        mod = root.get_submodule(name)
        pk = producer_kind(mod)
        w, c = fold_tensors(mod.weight, mod.bias, a, b, pk.axis, pk.groups, name)
        out.append((name, w, c, shift_after_class(mod, getattr(nn, pk.op))))
    return FoldAction(bn_name, out, kind.replacement())


def decide(root: nn.Module, obs: Observation, report: FoldReport) -> List[FoldAction]:
    """The folds to make, each fully computed; every BN module not folded goes in the report."""
    by_bn: Dict[str, List[BNCall]] = defaultdict(list)
    for call in obs.bn_calls:
        by_bn[call.bn].append(call)
    by_producer: Dict[str, List[ProducerCall]] = defaultdict(list)
    for pc in obs.producer_calls:
        by_producer[pc.module].append(pc)
    actions = []
    for name, bn in root.named_modules():
        if not is_batchnorm(bn) or bn is root:
            continue
        calls = by_bn.get(name, [])
        producers: List[str] = []
        kind, why = bn_kind_why(bn)
        refusal = _bn_refusal(name, bn, obs, calls, kind, why)
        for call in [] if refusal else calls:
            refusal = _call_refusal(root, call, obs, by_producer, kind)
            if refusal:
                break
            pname = obs.producer_calls[call.producer].module
            if pname not in producers:
                producers.append(pname)
        if refusal is None:
            try:
                actions.append(_compute(root, name, producers, kind))
            except Refusal as exc:
                refusal = exc
        if refusal is not None:
            first = _first_producer(root, calls, obs)
            report.add_skipped(name, refusal.reason, refusal.detail, *first)
            continue
        for pname in producers:
            mod = root.get_submodule(pname)
            report.add_folded(name, pname, type(mod).__name__, _rule(mod))
        report.extra.setdefault("fold_methods", {})[name] = "module (norm-act)" if kind.norm_act else "module"
    return actions


def _first_producer(root, calls: List[BNCall], obs: Observation):
    for call in calls:
        if call.producer is not None:
            pname = obs.producer_calls[call.producer].module
            return pname, type(root.get_submodule(pname)).__name__
    return None, None


# --------------------------------------------------------------------------------------------
# Applying, and undoing


class Applied:
    """What :func:`apply` changed, so that :meth:`undo` can put it back (for ``inplace=True``)."""

    def __init__(self) -> None:
        self._changes: List[Tuple[dict, str, object]] = []
        self._classes: List[Tuple[nn.Module, type]] = []
        self.removed_bns: List[nn.Module] = []

    def set(self, table: dict, key: str, value) -> None:
        self._changes.append((table, key, table.get(key)))
        table[key] = value

    @property
    def changed(self) -> bool:
        return bool(self._changes)

    def set_class(self, module: nn.Module, cls: type) -> None:
        self._classes.append((module, type(module)))
        module.__class__ = cls

    def undo(self) -> None:
        for table, key, old in reversed(self._changes):
            table[key] = old
        for module, cls in reversed(self._classes):
            module.__class__ = cls
        self._changes.clear()
        self._classes.clear()


def apply(root: nn.Module, actions: List[FoldAction]) -> Applied:
    """Give each producer its folded weight and bias (new Parameters, so a weight tied to another
    module keeps its old values there) and replace every registration of each BN by Identity."""
    done = Applied()
    parents = list(root.modules())
    for action in actions:
        for name, weight, bias, cls in action.producers:
            mod = root.get_submodule(name)
            grad = mod.weight.requires_grad
            done.set(mod._parameters, "weight", nn.Parameter(weight, requires_grad=grad))
            done.set(mod._parameters, "bias", nn.Parameter(bias, requires_grad=grad))
            if cls is not None:  # a new bias on a slow CPU path: added after the conv instead
                done.set_class(mod, cls)
        bn = root.get_submodule(action.bn)
        done.removed_bns.append(bn)
        for parent in parents:
            for key, child in list(parent._modules.items()):
                if child is bn:
                    done.set(parent._modules, key, action.replacement)
    return done


def unverified(report: FoldReport, detail: str) -> None:
    """Turn every fold in ``report`` into a skip (after the fold was undone)."""
    seen = set()
    for f in report.folded:
        if f.bn not in seen:
            seen.add(f.bn)
            report.add_skipped(f.bn, "unverified", detail, f.producer, f.producer_op)
    report.folded.clear()
    report.extra.pop("fold_methods", None)

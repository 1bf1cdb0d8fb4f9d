"""Which modules bnfold folds, and the facts about each that the fold math needs.

A producer is a stock ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` or ``nn.Linear`` (or a
subclass that keeps the stock ``forward``); a BatchNorm is a stock ``nn.BatchNorm1d/2d/3d`` (or a
subclass that keeps ``forward`` and the input-rank check), or a BatchNorm subclass whose own
``forward`` is proven from its traced graph to be batch norm then a function of its output
(:mod:`._functional`, timm's ``BatchNormAct2d``). Any other subclass with its own ``forward``
computes something else, so it is never folded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import FrozenSet, Optional, Tuple

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._functional import FoldedTail, NormAct, prove_norm_act
from ._shift import ShiftAfterConv1d, ShiftAfterConv2d, ShiftAfterConv3d

FOLD_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class ProducerKind:
    """How a producer's weight carries its output channels."""

    op: str  # class name, for the report
    axis: int  # weight axis of output channels: 0 conv/linear, 1 transposed conv
    groups: int  # only matters on axis 1
    out_rank: int  # rank of a batched output, where channels sit on dim 1
    other_ranks: FrozenSet[int]  # ranks of outputs where dim 1 is NOT the channel dim
    out_channels: int


@dataclass(frozen=True)
class BNKind:
    op: str
    ranks: FrozenSet[int]  # input ranks the BN's own check accepts
    eps: float
    norm_act: Optional[NormAct] = None  # set for a proven norm-act subclass: its tail replaces it

    def replacement(self) -> nn.Module:
        """What the module becomes once folded: Identity, or the norm-act's tail."""
        return self.norm_act.tail if self.norm_act is not None else nn.Identity()


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# bnfold's own folded convs (bias added after the conv) compute what their base class computes
_SHIFT_BASES = {ShiftAfterConv1d: nn.Conv1d, ShiftAfterConv2d: nn.Conv2d, ShiftAfterConv3d: nn.Conv3d}
_BNS = {nn.BatchNorm1d: frozenset({2, 3}), nn.BatchNorm2d: frozenset({4}), nn.BatchNorm3d: frozenset({5})}


def _stock_base(module: nn.Module, bases, method: str = "forward"):
    """The stock class among ``bases`` that ``module`` is, if it keeps that class's ``method``."""
    for base in bases:
        if isinstance(module, base) and getattr(type(module), method) is getattr(base, method):
            return base
    return None


def is_batchnorm(module: nn.Module) -> bool:
    """Any BatchNorm-like module, foldable or not (it is listed in the report either way)."""
    return isinstance(module, _BatchNorm)


def is_producer_type(module: nn.Module) -> bool:
    """A conv or linear module of any flavour (the report names it even when it cannot fold)."""
    return isinstance(module, _CONVS + _TRANSPOSED + (nn.Linear,))


def bn_kind(module: nn.Module) -> Optional[BNKind]:
    """The kind of a foldable BatchNorm module, or None for a BN bnfold does not fold."""
    return bn_kind_why(module)[0]


def bn_kind_why(module: nn.Module) -> Tuple[Optional[BNKind], str]:
    """``(kind, '')`` for a foldable BatchNorm module, else ``(None, why not)``."""
    for base, ranks in _BNS.items():
        if _stock_base(module, (base,)) and _stock_base(module, (base,), "_check_input_dim"):
            return BNKind(base.__name__, ranks, float(module.eps)), ""
    if not isinstance(module, _BatchNorm) or type(module).forward is _BatchNorm.forward:
        return None, f"{type(module).__name__} is not a stock BatchNorm1d/2d/3d"
    proof, why = prove_norm_act(module)
    if proof is None:
        return None, f"{type(module).__name__} has its own forward, not proven to be batch norm then its output's function: {why}"
    ranks = frozenset({proof.rank}) if proof.rank is not None else frozenset({2, 3, 4, 5})
    return BNKind(type(module).__name__, ranks, proof.eps, proof), ""


def is_folded_tail(module: nn.Module) -> bool:
    return isinstance(module, FoldedTail)


def producer_kind(module: nn.Module) -> Optional[ProducerKind]:
    """The kind of a foldable producer module, or None (a subclass with its own ``forward``)."""
    base = _stock_base(module, _CONVS) or _SHIFT_BASES.get(type(module))
    if base is not None:
        k = _CONVS.index(base) + 1
        return ProducerKind(base.__name__, 0, module.groups, k + 2, frozenset({k + 1}), module.out_channels)
    base = _stock_base(module, _TRANSPOSED)
    if base is not None:
        k = _TRANSPOSED.index(base) + 1
        return ProducerKind(base.__name__, 1, module.groups, k + 2, frozenset({k + 1}), module.out_channels)
    if _stock_base(module, (nn.Linear,)) is not None:
        # Linear acts on the last dim: only a 2-D output has its features on dim 1.
        return ProducerKind("Linear", 0, 1, 2, frozenset({1, 3, 4, 5, 6}), module.out_features)
    return None


def rank_verdict(pk: ProducerKind, bk: BNKind, rank: Optional[int]) -> Optional[str]:
    """None when the BN's channels (dim 1 of its input) are the producer's output channels.

    Otherwise the reason code: 'not-per-channel' (they are not) or 'shape-unknown' (the rank of
    the producer's output is unknown and the BN type alone does not pin it down: BatchNorm1d takes
    2-D and 3-D inputs, so Conv1d+BN1d and Linear+BN1d need a traced shape).
    """
    if rank is not None:
        return None if rank == pk.out_rank else "not-per-channel"
    possible = bk.ranks & (pk.other_ranks | {pk.out_rank})
    if possible == {pk.out_rank}:
        return None
    if pk.out_rank not in possible:
        return "not-per-channel"
    return "shape-unknown"

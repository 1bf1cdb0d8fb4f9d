"""The rules, one module per family, and the contract they share.

A rule is a function ``(rw, node) -> outcomes``. It reads the graph through its
:class:`~bnfold.onnx_pass.rewrite.GraphRewrite` (``rw.constant`` for every constant), plans
the whole fold first (every check, every new value computed and cast back), then edits through
``rw`` only, and returns an :class:`Outcome` for each BN or run of Mul/Add/Sub/Div it folded or
had to leave. It never writes the report: the engine keeps the ledger of outcomes and decides
which reason a BN left by several rules is reported with.

- :mod:`.after_linear`: a linear op takes the chain of affine ops after it (``<op>-bn``, ...);
- :mod:`.bn_merge`: a BN takes the affine ops after it (``bn-bn``, ``bn-affine``);
- :mod:`.before_linear`: a BN, or a Mul/Add/Sub/Div by a constant, goes into the linear ops
  reading it (``bn-conv``, ``affine-conv``, ...);
- :mod:`.noops`: Mul/Div by 1 and Add/Sub of 0 go (``noop``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from onnx import NodeProto

from ...affine import Refusal


@dataclass
class Outcome:
    """What a rule did with one BN, or with one run of Mul/Add/Sub/Div (named by its first op).

    Folded: ``rule`` names the rule and ``into`` the node(s) it went into. Left: ``refusal``
    says why, ``into`` holds the linear op it followed (for an elementwise op), and ``seen``
    is False when the rule stopped before it reached the BN (a weaker reason, which a rule
    that looked at the BN itself overrides).
    """

    node: NodeProto
    rule: str = ""
    into: Sequence[NodeProto] = ()
    refusal: Optional[Refusal] = None
    seen: bool = True

    @property
    def folded(self) -> bool:
        return self.refusal is None

"""FoldReport: what a fold did, BN by BN, as text for people and JSON for machines."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

# Stable reason codes, with the sentence a user reads. Front ends may add their own codes;
# a code missing here is printed as it is.
REASONS: Dict[str, str] = {
    "no-linear-producer": "the BN does not follow a foldable linear op",
    "producer-has-other-consumers": "the linear op's output is also used elsewhere",
    "producer-output-is-graph-output": "the linear op's output is a graph output",
    "not-constant": "a weight, bias or BN parameter is not a constant",
    "overridable-initializer": "an initializer that a graph input of the same name can override",
    "training-mode": "the BN runs in training mode (batch statistics)",
    "no-running-stats": "the BN has no running statistics (batch statistics)",
    "not-per-channel": "the BN's channels are not the linear op's output channels",
    "channel-mismatch": "channel counts of the BN and the linear op disagree",
    "shape-unknown": "a shape needed to prove the fold exact is unknown",
    "non-finite-parameter": "a parameter is NaN or infinite",
    "non-positive-variance": "var + epsilon <= 0",
    "non-finite-result": "the folded values are not finite",
    "overflow": "the folded values overflow the weight's dtype",
    "unsupported-dtype": "the weight's dtype is not a float type bnfold folds",
    "unsupported-attribute": "an attribute bnfold cannot fold exactly",
    "shared-module-different-bn": "the module is called more than once with different followers",
    "padded-conv": "the conv pads its input with zeros, which are not shifted by the BN",
    "unreadable-constant": "a constant's data cannot be read",
    # the ONNX constant resolver: why a value computed by ops is not taken as a constant
    "nondeterministic-op": "a parameter is computed by a random op",
    "foreign-domain": "a parameter is computed by an op outside the default ONNX domain",
    "unsupported-constant-op": "a parameter is computed by an op bnfold does not evaluate at fold time",
    "constant-too-large": "a constant subgraph is over the resolver's size bounds",
    "invalid-constant": "a constant subgraph cannot be evaluated (shapes, indices or types that do not fit)",
    # ONNX rules for affine chains and BN before a linear op
    "division-by-zero": "a Div's constant divisor contains zero",
    "not-affine": "the op is not an affine map of its input (a constant divided by the data)",
    "no-linear-consumer": "the BN feeds no linear op it could be folded into",
    "consumer-cannot-absorb": "a consumer of the BN's output cannot absorb the BN",
    "bn-output-is-graph-output": "the BN's output is a graph output",
    # PyTorch front end
    "unsupported-module": "a subclass with its own forward, a parametrized weight, or SyncBatchNorm",
    "module-has-hooks": "a forward hook or pre-hook on the module could change what it computes",
    "parameter-used-elsewhere": "a weight or buffer of the module is also read outside its own calls",
    "not-called": "the BN is never called on the traced or observed path",
    "unverified": "the folded module did not re-trace to the same calls, so the fold was undone",
    "functional-bn": "a batch norm call in forward folds only by rewriting forward (rewrite_graph=False)",
}

# Mul/Add/Sub/Div runs folded or left by the ONNX rules are listed in ``extra`` under these
# keys (``folded``/``skipped`` hold one entry per BatchNormalization).
AFFINE_FOLDED = "affine_folded"
AFFINE_SKIPPED = "affine_skipped"
# The constant subgraphs the ONNX pass evaluated (how many, their ops and elements, and each
# value) are listed in ``extra`` under this key; ``summary(verbose=True)`` shows the totals.
CONSTANTS = "constants"


@dataclass
class FoldedPair:
    """One BN folded away. ``bn`` and ``producer`` are node or qualified module names."""

    bn: str
    producer: str
    producer_op: str
    rule: str
    graph: str = ""  # '' for the main graph, else a path like 'If_3/then_branch'


@dataclass
class SkippedBN:
    """One BN left in place, with a stable ``reason`` code and a human ``detail``."""

    bn: str
    reason: str
    detail: str
    producer: Optional[str] = None
    producer_op: Optional[str] = None
    graph: str = ""

    @property
    def reason_text(self) -> str:
        return REASONS.get(self.reason, self.reason)


@dataclass
class FoldReport:
    """The outcome of one fold. ``method`` says how pairs were found (ONNX graph, torch.fx, ...)."""

    method: str = "onnx-graph"
    folded: List[FoldedPair] = field(default_factory=list)
    skipped: List[SkippedBN] = field(default_factory=list)
    seconds: float = 0.0
    notes: List[str] = field(default_factory=list)
    extra: Dict[str, Any] = field(default_factory=dict)

    def add_folded(self, bn: str, producer: str, producer_op: str, rule: str, graph: str = "") -> None:
        self.folded.append(FoldedPair(bn, producer, producer_op, rule, graph))

    def add_skipped(
        self,
        bn: str,
        reason: str,
        detail: str,
        producer: Optional[str] = None,
        producer_op: Optional[str] = None,
        graph: str = "",
    ) -> None:
        self.skipped.append(SkippedBN(bn, reason, detail, producer, producer_op, graph))

    @property
    def n_folded(self) -> int:
        return len(self.folded)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def reason_counts(self) -> Dict[str, int]:
        return dict(Counter(s.reason for s in self.skipped).most_common())

    def to_dict(self) -> Dict[str, Any]:
        return {
            "method": self.method,
            "folded_count": self.n_folded,
            "skipped_count": self.n_skipped,
            "skipped_by_reason": self.reason_counts(),
            "seconds": round(self.seconds, 6),
            "folded": [asdict(f) for f in self.folded],
            "skipped": [dict(asdict(s), reason_text=s.reason_text) for s in self.skipped],
            "notes": list(self.notes),
            **self.extra,
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    def summary(self, verbose: bool = False) -> str:
        """A one-screen text summary; ``verbose`` lists every BN and its fate."""
        total = self.n_folded + self.n_skipped
        lines = [f"folded {self.n_folded} of {total} BatchNorm(s) in {self.seconds:.3f} s ({self.method})"]
        for reason, count in self.reason_counts().items():
            lines.append(f"  left {count}: {REASONS.get(reason, reason)} [{reason}]")
        if verbose:
            for f in self.folded:
                where = f" in {f.graph}" if f.graph else ""
                lines.append(f"  folded  {f.bn} into {f.producer_op} {f.producer}{where} [{f.rule}]")
            for s in self.skipped:
                where = f" in {s.graph}" if s.graph else ""
                after = f" after {s.producer_op} {s.producer}" if s.producer else ""
                lines.append(f"  skipped {s.bn}{after}{where}: {s.detail} [{s.reason}]")
        if verbose:
            lines.extend(self._affine_lines())
            lines.extend(self._constant_lines())
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    def _affine_lines(self) -> List[str]:
        lines = []
        for e in self.extra.get(AFFINE_FOLDED, []):
            where = f" in {e['graph']}" if e.get("graph") else ""
            lines.append(f"  folded  {e['op']} {e['node']} into {e['into_op']} {e['into']}{where} [{e['rule']}]")
        for e in self.extra.get(AFFINE_SKIPPED, []):
            where = f" in {e['graph']}" if e.get("graph") else ""
            lines.append(f"  skipped {e['op']} {e['node']} after {e['after_op']} {e['after']}{where}: "
                         f"{e['detail']} [{e['reason']}]")
        return lines

    def _constant_lines(self) -> List[str]:
        c = self.extra.get(CONSTANTS)
        if not c:
            return []
        by_ref = f", {c['reference_nodes']} by onnx's reference evaluator" if c.get("reference_nodes") else ""
        return [f"  evaluated {c['subgraphs']} constant subgraph(s): {c['nodes']} op(s), "
                f"{c['elements']} element(s){by_ref}"]

    def __str__(self) -> str:
        return self.summary()

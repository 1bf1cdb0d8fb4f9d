"""What a check found: per-output statistics and the verdict, as text and as JSON."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from .inputs import InputInfo
from .interface import dims_text



@dataclass
class OutputStats:
    """Comparison of one output over all batches. Errors are in float64."""

    name: str
    passed: bool
    dtype: str
    shape: List[int]
    atol: float = 0.0  # the absolute atol used
    rtol: float = 0.0
    tolerance_source: str = ""  # how atol was chosen
    scale: float = 0.0
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0  # max_abs_err / scale
    mean_abs_err: float = 0.0
    failing: int = 0
    total: int = 0
    nonfinite_mismatch: int = 0  # NaN/inf positions or signs that differ (counted in failing)
    worst: Optional[Dict[str, Any]] = None  # batch, index, original, folded of the largest error
    problem: Optional[str] = None  # a structural difference: missing output, shape or dtype

    def line(self) -> str:
        mark = "ok  " if self.passed else "FAIL"
        head = f"  {mark} {self.name}  {self.dtype} [{dims_text(self.shape)}]"
        if self.problem:
            return f"{head}  {self.problem}"
        text = (
            f"{head}  max abs {self.max_abs_err:.3g}  max rel {self.max_rel_err:.3g} (scale {self.scale:.3g})"
            f"  mean abs {self.mean_abs_err:.3g}  failing {self.failing}/{self.total}"
            f"  atol {self.atol:.3g} ({self.tolerance_source}) rtol {self.rtol:.3g}"
        )
        if self.nonfinite_mismatch:
            text += f"  NaN/inf mismatches {self.nonfinite_mismatch}"
        if not self.passed and self.worst:
            w = self.worst
            text += f"\n       worst at batch {w['batch']} index {tuple(w['index'])}: original {w['original']:.7g}, folded {w['folded']:.7g}"
        return text


@dataclass
class CheckResult:
    """The verdict of a check: truthy iff every output matched. ``str()`` is the summary."""

    passed: bool
    outputs: List[OutputStats]
    problems: List[str] = field(default_factory=list)  # interface differences, missing outputs
    notes: List[str] = field(default_factory=list)
    rule: str = ""  # the comparison rule in words (set by compare_outputs)
    scale_rule: str = ""
    models: Dict[str, str] = field(default_factory=dict)
    inputs: List[InputInfo] = field(default_factory=list)
    seed: Optional[int] = None
    batches: int = 1
    value_range: Optional[Tuple[float, float]] = None
    runtime: Dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.passed)

    @property
    def failed_outputs(self) -> List[OutputStats]:
        return [o for o in self.outputs if not o.passed]

    def summary(self) -> str:
        n = len(self.outputs)
        if self.passed:
            head = f"PASS: all {n} output(s) match"
        else:
            head = f"FAIL: {len(self.failed_outputs)} of {n} output(s) differ" if self.failed_outputs else "FAIL"
        if self.models:
            head += f" ({self.models.get('original', '?')} vs {self.models.get('folded', '?')})"
        lines = [head, f"rule: {self.rule}", f"      {self.scale_rule}"]
        lines.extend(f"  problem: {p}" for p in self.problems)
        lines.extend(o.line() for o in self.outputs)
        if self.inputs:
            feed = ", ".join(f"{i.name} {i.dtype} [{dims_text(i.shape)}] {i.source}" for i in self.inputs)
            lines.append(f"inputs: {feed}; seed {self.seed}, {self.batches} batch(es)")
        if self.runtime:
            r = self.runtime
            extra = f", intra-op threads {r['threads']}" if r.get("threads") else ""
            tf32 = ", TF32 off" if r.get("provider") == "cuda" else ""
            lines.append(
                f"onnxruntime {r.get('onnxruntime')}, {', '.join(r.get('providers_used', [])) or r.get('provider')}"
                f", graph optimizations: {r.get('graph_optimization')}{extra}{tf32}"
            )
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return f"<CheckResult {'PASS' if self.passed else 'FAIL'}: {len(self.outputs)} output(s)>"

    def to_dict(self) -> Dict[str, Any]:
        return {
            "passed": bool(self.passed),
            "rule": self.rule,
            "scale_rule": self.scale_rule,
            "models": dict(self.models),
            "inputs": {
                "seed": self.seed,
                "batches": self.batches,
                "value_range": list(self.value_range) if self.value_range else None,
                "tensors": [asdict(i) for i in self.inputs],
            },
            "runtime": dict(self.runtime),
            "outputs": [_json_safe(asdict(o)) for o in self.outputs],
            "problems": list(self.problems),
            "notes": list(self.notes),
            "seconds": round(self.seconds, 6),
        }


def _json_safe(obj):
    """NaN and inf are not JSON: write them as strings."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj



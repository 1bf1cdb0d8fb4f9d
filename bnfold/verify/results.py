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
    p50_abs_err: float = 0.0
    p99_abs_err: float = 0.0
    min_atol: float = 0.0  # the smallest atol that passes with this rtol (inf: NaN/inf mismatch)
    precision: str = ""  # the float type the output is computed in (sets the default tolerance)
    precision_why: str = ""
    # 'original', or 'stitched': the output failed against the original, every fold site passed,
    # and it matched what the original network computes from the folded model's site values.
    judged_against: str = "original"
    vs_original: Optional[Dict[str, Any]] = None  # when stitched: the failed comparison with the original

    def line(self) -> str:
        mark = "ok  " if self.passed else "FAIL"
        head = f"  {mark} {self.name}  {self.dtype} [{dims_text(self.shape)}]"
        if self.problem:
            return f"{head}  {self.problem}"
        text = (
            f"{head}  max abs {self.max_abs_err:.3g}  max rel {self.max_rel_err:.3g} (scale {self.scale:.3g})"
            f"  p50/p99 abs {self.p50_abs_err:.3g}/{self.p99_abs_err:.3g}  failing {self.failing}/{self.total}"
            f"  atol {self.atol:.3g} ({self.tolerance_source}) rtol {self.rtol:.3g}; passes from atol {self.min_atol:.3g}"
        )
        if self.nonfinite_mismatch:
            text += f"  NaN/inf mismatches {self.nonfinite_mismatch}"
        if self.judged_against == "stitched" and self.vs_original:
            v = self.vs_original
            text += (f"\n       against the original: max abs {v['max_abs_err']:.3g}, failing {v['failing']}/{v['total']}; "
                     "matches the original network run on the folded model's fold-site values (every site passed): "
                     "rounding amplified downstream of the folds, not a folding error")
        if not self.passed and self.worst:
            w = self.worst
            text += f"\n       worst at batch {w['batch']} index {tuple(w['index'])}: original {w['original']:.7g}, folded {w['folded']:.7g}"
        return text


@dataclass
class SiteStats:
    """Comparison of one fold site (a tensor where a folded run ended) over all batches."""

    fold: str  # e.g. "BatchNormalization 'bn3' folded into Conv 'conv3' [conv-bn]"
    kind: str  # 'bn' or 'affine'
    node: str
    into: str
    rule: str
    tensor: str
    passed: bool
    dtype: str = ""
    shape: List[int] = field(default_factory=list)
    precision: str = ""
    precision_why: str = ""
    k: float = 0.0  # the relative tolerance used
    tolerance_source: str = ""
    per_channel_axis: Optional[int] = None
    scale: float = 0.0  # max |original| over the tensor
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0  # max over elements of |folded - original| / (R + |original|)
    p50_abs_err: float = 0.0
    p99_abs_err: float = 0.0
    min_k: float = 0.0  # the smallest k that passes
    max_slope: float = 0.0  # the largest |slope| of (folded - original) against original, per channel
    slope_channel: Optional[int] = None
    slope_limit: float = 0.0
    failing: int = 0
    total: int = 0
    nonfinite_mismatch: int = 0
    worst: Optional[Dict[str, Any]] = None
    problem: Optional[str] = None

    def line(self) -> str:
        mark = "ok  " if self.passed else "FAIL"
        head = f"  {mark} {self.fold} at '{self.tensor}'"
        if self.problem:
            return f"{head}  {self.problem}"
        text = (f"{head}  {self.precision}: max abs {self.max_abs_err:.3g}  p50/p99 abs {self.p50_abs_err:.3g}/{self.p99_abs_err:.3g}"
                f"  failing {self.failing}/{self.total}  k {self.k:.3g} ({self.tolerance_source}); passes from k {self.min_k:.3g}")
        text += f"  slope {self.max_slope:.3g} (limit {self.slope_limit:.3g})"
        if self.nonfinite_mismatch:
            text += f"  NaN/inf mismatches {self.nonfinite_mismatch}"
        if not self.passed and self.max_slope > self.slope_limit:
            where = f"channel {self.slope_channel}" if self.slope_channel is not None else "the tensor"
            text += (f"\n       {where} is scaled: folded - original = {self.max_slope:.3g} x original "
                     f"(+ a constant), over the limit {self.slope_limit:.3g}")
        if not self.passed and self.worst:
            w = self.worst
            text += (f"\n       worst at batch {w['batch']} index {tuple(w['index'])}: original {w['original']:.7g}, "
                     f"folded {w['folded']:.7g} (allowed difference {w['allowed']:.3g})")
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
    sites: List[SiteStats] = field(default_factory=list)  # one per fold site tensor (with a report)
    site_rule: str = ""
    verdict_rule: str = ""

    @property
    def failed_sites(self) -> List[SiteStats]:
        return [s for s in self.sites if not s.passed]

    def __bool__(self) -> bool:
        return bool(self.passed)

    @property
    def failed_outputs(self) -> List[OutputStats]:
        return [o for o in self.outputs if not o.passed]

    def summary(self) -> str:
        n = len(self.outputs)
        if self.passed:
            head = f"PASS: all {n} output(s)" + (f" and {len(self.sites)} fold site(s)" if self.sites else "") + " match"
        else:
            head = f"FAIL: {len(self.failed_outputs)} of {n} output(s) differ" if self.failed_outputs else "FAIL"
        if self.models:
            head += f" ({self.models.get('original', '?')} vs {self.models.get('folded', '?')})"
        if self.failed_sites:
            head += f"; {len(self.failed_sites)} fold site(s) differ, first: {self.failed_sites[0].fold}"
        lines = [head, f"rule: {self.rule}", f"      {self.scale_rule}"]
        if self.sites:
            lines += [f"      {self.site_rule}", f"      {self.verdict_rule}"]
        lines.extend(f"  problem: {p}" for p in self.problems)
        lines.extend(o.line() for o in self.outputs)
        if self.sites:
            passed = sum(s.passed for s in self.sites)
            lines.append(f"  fold sites: {passed} of {len(self.sites)} pass")
            shown = [s for s in self.sites if not s.passed] or sorted(self.sites, key=lambda s: -s.min_k / (s.k or 1))[:3]
            lines.extend(s.line() for s in shown)
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
            "site_rule": self.site_rule,
            "verdict_rule": self.verdict_rule,
            "sites": [_json_safe(asdict(s)) for s in self.sites],
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



"""The comparison rule and its default tolerances (see the package docstring), applied to
outputs given as arrays or lists of arrays (one per batch)."""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np

from ..errors import InputError
from .interface import dims_text, is_float_dtype
from .results import CheckResult, OutputStats

RULE = "element fails iff |folded - original| > atol + rtol*|original| (float64); NaN positions and infinities must match"
SCALE_RULE = "default atol = k_atol(dtype) * scale, scale = max |original| over finite elements (1 if all zero)"

# dtype name -> (k_atol, relative to the output's scale; rtol). See the module docstring.
DEFAULT_TOLERANCES: Dict[str, Tuple[float, float]] = {
    "float64": (1e-9, 1e-9),
    "float32": (1e-4, 1e-4),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}
# Any other float type (float8 variants): loose, these carry 2 to 3 mantissa bits.
_OTHER_FLOAT_TOLERANCE = (2.5e-1, 2.5e-1)



def parse_atol(values: Iterable[str]) -> Tuple[Optional[float], Dict[str, float]]:
    """``["1e-3", "logits:0.01"]`` -> ``(1e-3, {"logits": 0.01})``. Raises InputError."""
    global_atol: Optional[float] = None
    per_output: Dict[str, float] = {}
    for text in values:
        name, sep, value = text.rpartition(":")
        number = _tolerance_value(value, f"--atol {text!r}")
        if sep:
            if not name:
                raise InputError(f"bad --atol {text!r}: expected VALUE or NAME:VALUE")
            per_output[name] = number
        else:
            global_atol = number
    return global_atol, per_output


def _tolerance_value(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"bad {what}: {text!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise InputError(f"bad {what}: tolerance must be finite and >= 0")
    return value



def default_tolerance(dtype_name: str) -> Optional[Tuple[float, float]]:
    """``(k_atol, rtol)`` for a float dtype name; None for exact (integer, bool, string) types."""
    if dtype_name in DEFAULT_TOLERANCES:
        return DEFAULT_TOLERANCES[dtype_name]
    if dtype_name.startswith("float"):
        return _OTHER_FLOAT_TOLERANCE
    return None


def compare_outputs(
    expected: Mapping[str, Any],
    actual: Mapping[str, Any],
    *,
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    per_output: Optional[Mapping[str, Union[float, Tuple[float, float]]]] = None,
) -> CheckResult:
    """Compare outputs by name under the module's rule; ``expected`` is the reference.

    Values are arrays, or lists of arrays (one per batch). ``atol`` (absolute) replaces the
    scaled default for every output; ``per_output`` maps an output name to an absolute atol, or
    to ``(atol, rtol)``, and wins over ``atol``/``rtol``. Outputs present on one side only fail.
    Raises InputError if ``per_output`` names an output that neither side has.
    """
    per_output = dict(per_output or {})
    unknown = sorted(set(per_output) - set(expected) - set(actual))
    if unknown:
        raise InputError(
            f"--atol names output(s) {', '.join(map(repr, unknown))} that the model does not have (outputs: {', '.join(expected)})"
        )
    stats: List[OutputStats] = []
    problems: List[str] = []
    for name, exp in expected.items():
        exp_list = exp if isinstance(exp, (list, tuple)) else [exp]
        exp_list = [np.asarray(e) for e in exp_list]
        if name not in actual:
            problems.append(f"output '{name}' is missing from the folded model")
            stats.append(OutputStats(name, False, str(exp_list[0].dtype), list(exp_list[0].shape), problem="missing from the folded model"))
            continue
        act = actual[name]
        act_list = [np.asarray(a) for a in (act if isinstance(act, (list, tuple)) else [act])]
        override = per_output.get(name)
        o_atol, o_rtol = (override if isinstance(override, tuple) else (override, None)) if override is not None else (None, None)
        stats.append(
            _compare_one(name, exp_list, act_list, o_atol if o_atol is not None else atol, o_rtol if o_rtol is not None else rtol,
                         "given for this output" if o_atol is not None else "given")
        )
    for name in actual:
        if name not in expected:
            problems.append(f"output '{name}' exists only in the folded model")
    passed = all(s.passed for s in stats) and not problems
    return CheckResult(passed=passed, outputs=stats, problems=problems, rule=RULE, scale_rule=SCALE_RULE)


def _compare_one(name, exp_list, act_list, atol, rtol, given_text) -> OutputStats:
    exp0 = exp_list[0]
    dtype = str(exp0.dtype)
    base = OutputStats(name, False, dtype, list(exp0.shape))
    if len(exp_list) != len(act_list):
        base.problem = f"{len(exp_list)} batch(es) of original output, {len(act_list)} of folded"
        return base
    for e, a in zip(exp_list, act_list):
        if e.dtype != a.dtype:
            base.problem = f"dtype differs: original {e.dtype}, folded {a.dtype}"
            return base
        if e.shape != a.shape:
            base.problem = f"shape differs: original [{dims_text(e.shape)}], folded [{dims_text(a.shape)}]"
            return base
    tol = default_tolerance(dtype) if is_float_dtype(exp0.dtype) else None
    if tol is None and (exp0.dtype.kind in "iub" or exp0.dtype.kind in "USO"):
        return _compare_exact(base, exp_list, act_list)
    if tol is None:
        tol = _OTHER_FLOAT_TOLERANCE
    return _compare_float(base, exp_list, act_list, tol, atol, rtol, given_text)


def _compare_exact(stats: OutputStats, exp_list, act_list) -> OutputStats:
    """Integers, bools, strings: every element must be equal."""
    failing = sum(int(np.count_nonzero(e != a)) for e, a in zip(exp_list, act_list))
    total = sum(int(e.size) for e in exp_list)
    stats.tolerance_source = "exact (integer/bool)"
    stats.failing, stats.total = failing, total
    if stats.dtype not in ("object",) and exp_list[0].dtype.kind in "iub" and total:
        diffs = [np.abs(e.astype(np.float64) - a.astype(np.float64)) for e, a in zip(exp_list, act_list)]
        flat = np.concatenate([d.ravel() for d in diffs])
        stats.max_abs_err = float(flat.max())
        stats.mean_abs_err = float(flat.mean())
        scale = float(max(np.abs(e.astype(np.float64)).max() if e.size else 0.0 for e in exp_list)) or 1.0
        stats.scale = scale
        stats.max_rel_err = stats.max_abs_err / scale
        if failing:
            stats.worst = _worst(diffs, exp_list, act_list)
    stats.passed = failing == 0
    return stats


def _compare_float(stats: OutputStats, exp_list, act_list, tol, atol, rtol, given_text) -> OutputStats:
    e = np.concatenate([x.astype(np.float64).ravel() for x in exp_list])
    a = np.concatenate([x.astype(np.float64).ravel() for x in act_list])
    finite_e = np.isfinite(e)
    scale = float(np.abs(e[finite_e]).max()) if finite_e.any() else 0.0
    scale = scale if scale > 0 else 1.0
    k_atol, k_rtol = tol
    if atol is None:
        stats.atol = k_atol * scale
        stats.tolerance_source = f"{k_atol:g} x scale, default for {stats.dtype}"
    else:
        stats.atol = float(atol)
        stats.tolerance_source = given_text
    stats.rtol = float(k_rtol if rtol is None else rtol)
    both = finite_e & np.isfinite(a)
    nan_mismatch = np.isnan(e) != np.isnan(a)
    # Infinities (and a finite value against an infinity) must be equal; NaN==NaN is handled above.
    other_nonfinite = ~both & ~np.isnan(e) & ~np.isnan(a) & (e != a)
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: masked out just below
        diff = np.where(both, np.abs(a - e), 0.0)
    bad = both & (diff > stats.atol + stats.rtol * np.abs(e))
    stats.nonfinite_mismatch = int(np.count_nonzero(nan_mismatch | other_nonfinite))
    stats.failing = int(np.count_nonzero(bad)) + stats.nonfinite_mismatch
    stats.total = int(e.size)
    stats.scale = scale
    stats.max_abs_err = float(diff.max()) if diff.size else 0.0
    stats.max_rel_err = stats.max_abs_err / scale
    stats.mean_abs_err = float(diff[both].mean()) if both.any() else 0.0
    stats.passed = stats.failing == 0
    if stats.failing:
        score = np.where(nan_mismatch | other_nonfinite, np.inf, diff)
        stats.worst = _worst_flat(int(np.argmax(score)), exp_list, e, a)
    return stats


def _worst(diffs, exp_list, act_list) -> Dict[str, Any]:
    flat = np.concatenate([d.ravel() for d in diffs])
    e = np.concatenate([x.astype(np.float64).ravel() for x in exp_list])
    a = np.concatenate([x.astype(np.float64).ravel() for x in act_list])
    return _worst_flat(int(np.argmax(flat)), exp_list, e, a)


def _worst_flat(flat_index: int, exp_list, e: np.ndarray, a: np.ndarray) -> Dict[str, Any]:
    """Turn an index into the concatenated batches back into (batch, index within the output)."""
    offset = 0
    for batch, x in enumerate(exp_list):
        if flat_index < offset + x.size:
            index = np.unravel_index(flat_index - offset, x.shape) if x.shape else ()
            return {"batch": batch, "index": [int(i) for i in index], "original": float(e[flat_index]), "folded": float(a[flat_index])}
        offset += x.size
    return {"batch": 0, "index": [], "original": float("nan"), "folded": float("nan")}



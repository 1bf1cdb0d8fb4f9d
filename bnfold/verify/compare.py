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
    precisions: Optional[Mapping[str, Tuple[str, str]]] = None,
) -> CheckResult:
    """Compare outputs by name under the module's rule; ``expected`` is the reference.

    Values are arrays, or lists of arrays (one per batch). ``atol`` (absolute) replaces the
    scaled default for every output; ``per_output`` maps an output name to an absolute atol, or
    to ``(atol, rtol)``, and wins over ``atol``/``rtol``. Outputs present on one side only fail.
    ``precisions`` maps an output name to ``(float type it is computed in, why)``: the default
    tolerance is that type's (else the output's own dtype's).
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
                         "given for this output" if o_atol is not None else "given", (precisions or {}).get(name))
        )
    for name in actual:
        if name not in expected:
            problems.append(f"output '{name}' exists only in the folded model")
    passed = all(s.passed for s in stats) and not problems
    return CheckResult(passed=passed, outputs=stats, problems=problems, rule=RULE, scale_rule=SCALE_RULE)


def _compare_one(name, exp_list, act_list, atol, rtol, given_text, precision=None) -> OutputStats:
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
    if not is_float_dtype(exp0.dtype) and (exp0.dtype.kind in "iub" or exp0.dtype.kind in "USO"):
        return _compare_exact(base, exp_list, act_list)
    base.precision, base.precision_why = precision if precision else (dtype, "the output's dtype")
    tol = default_tolerance(base.precision) or _OTHER_FLOAT_TOLERANCE
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
        why = "" if stats.precision == stats.dtype else f", computed in {stats.precision}: {stats.precision_why}"
        stats.tolerance_source = f"{k_atol:g} x scale, default for {stats.precision}{why}"
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
    if both.any():
        stats.p50_abs_err, stats.p99_abs_err = (float(x) for x in np.percentile(diff[both], [50, 99]))
        stats.min_atol = float(max(0.0, (diff[both] - stats.rtol * np.abs(e[both])).max()))
    if stats.nonfinite_mismatch:
        stats.min_atol = math.inf
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




# --------------------------------------------------------------------------------------------
# Fold sites


# float type -> k, the relative tolerance at a fold site (see SITE_RULE and the package docstring)
SITE_TOLERANCES: Dict[str, float] = {
    "float64": 1e-12,  # ~4500 ulp
    "float32": 1e-5,  # ~84 ulp; a correct fold measures 2 to 4 (the comparison is local, see sites.py)
    "float16": 1e-2,  # ~10 ulp
    "bfloat16": 6e-2,  # ~8 ulp
}
# float type -> the largest per-channel slope of (folded - original) against original a correct
# fold may show. Rounding noise does not correlate with the values (slopes ~1e-5 and below), a
# channel scaled by (1 + s) has slope s exactly: this finds a channel 1 % off in float16 and
# bfloat16, where one element's rounding is already 0.05 % to 0.4 %.
SITE_SLOPES: Dict[str, float] = {"float64": 1e-9, "float32": 1e-4, "float16": 2.5e-3, "bfloat16": 5e-3}
_OTHER_FLOAT_SLOPE = 5e-2
MIN_SLOPE_ELEMENTS = 16  # fewer elements in a channel: no slope test for it
MIN_EXPLAINED = 0.5  # r^2 of the fit: a slope counts only when it explains most of the difference
# unit roundoff per float type; a slope counts only when the scaling it describes moves the
# channel's values by more than SLOPE_ULPS units of its scale (a channel whose values barely vary
# can show a steep slope from rounding alone, e.g. values straddling a power of two)
UNIT_ROUNDOFF: Dict[str, float] = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
SLOPE_ULPS = 4.0
_OTHER_FLOAT_SITE = 2.5e-1
SITE_FLOOR = 1e-2  # R is at least this fraction of the tensor's scale
END_TO_END_FACTOR = 10.0  # k is widened this much when a site can only be compared end to end
SITE_RULE = (
    "fold site: element fails iff |folded - original| > k * (R + |original|), k by the precision the site computes in; "
    "R = the larger of |a| * max |input of the folded run| over the element's channel (the size of the values before the "
    "run's shift; |a| = std(output)/std(input) per channel) and |a| * sum |w||x| of the linear op for that element (the "
    "size of the terms it adds), for a BN site also |a| (max |input| + |mean|) + |B| from its parameters, or, without "
    "the run's input, max |original| over the channel; "
    f"at least {SITE_FLOOR:g} x max |original| over the tensor; "
    "and no channel is a scaled copy: |slope of (folded - original) against original| <= s(precision) per channel, "
    f"counted where the slope explains at least {MIN_EXPLAINED:g} of the difference's variance (r^2) and moves the "
    f"channel by more than {SLOPE_ULPS:g} units of roundoff of its scale"
)


def site_tolerance(precision: str) -> float:
    return SITE_TOLERANCES.get(precision, _OTHER_FLOAT_SITE)


def site_slope_limit(precision: str) -> float:
    return SITE_SLOPES.get(precision, _OTHER_FLOAT_SLOPE)


def _channel_slopes(e: np.ndarray, a: np.ndarray, axis: Optional[int], unit: float = 0.0) -> Tuple[float, Optional[int]]:
    """The largest |least-squares slope| of (a - e) against e over the channels (the whole tensor
    when ``axis`` is None), and the channel where it is (None for the whole tensor)."""
    if not e.size:
        return 0.0, None
    others = tuple(i for i in range(e.ndim) if i != axis) if axis is not None else None
    finite = np.isfinite(e) & np.isfinite(a)
    all_finite = bool(finite.all())
    if not all_finite:
        e = np.where(finite, e, 0.0)
        a = np.where(finite, a, 0.0)
    d = a - e
    n = finite.sum(axis=others) if not all_finite else np.full(1 if axis is None else e.shape[axis], e.size // (1 if axis is None else e.shape[axis]))
    with np.errstate(invalid="ignore", divide="ignore"):
        em = e.sum(axis=others, keepdims=True) / np.maximum(n, 1).reshape(_kept_shape(e, axis))
        dm = d.sum(axis=others, keepdims=True) / np.maximum(n, 1).reshape(_kept_shape(e, axis))
        ec = e - em
        dc = d - dm
        if not all_finite:
            ec = np.where(finite, ec, 0.0)
            dc = np.where(finite, dc, 0.0)
        var = np.ravel((ec * ec).sum(axis=others))
        dvar = np.ravel((dc * dc).sum(axis=others))
        cov = np.ravel((ec * dc).sum(axis=others))
        scale = np.ravel(np.abs(e).max(axis=others))
        spread = np.ravel(np.where(finite, e, -np.inf).max(axis=others) - np.where(finite, e, np.inf).min(axis=others)) \
            if not all_finite else np.ravel(e.max(axis=others) - e.min(axis=others))
        n = np.ravel(n)
        # only a difference that *is* a scaling counts: most of its variance explained by the values
        # (rounding differences can correlate weakly with them, e.g. bias-only borders of a
        # strided ConvTranspose, and then give a slope without being one)
        ok = (var > 0) & (dvar > 0)
        explained = np.where(ok, cov * cov / np.where(ok, var * dvar, 1.0), 0.0)
        usable = (n >= MIN_SLOPE_ELEMENTS) & (var > 0) & (explained >= MIN_EXPLAINED)
        slope = np.where(usable, cov / np.where(usable, var, 1.0), 0.0)
        slope = np.where(np.abs(slope) * spread > SLOPE_ULPS * unit * scale, slope, 0.0)
    if not slope.size or not usable.any():
        return 0.0, None
    c = int(np.argmax(np.abs(slope)))
    return float(abs(slope[c])), (c if axis is not None else None)


def _kept_shape(e: np.ndarray, axis: Optional[int]) -> Tuple[int, ...]:
    """The shape of a reduction over every axis but ``axis`` with keepdims."""
    return tuple(s if i == axis else 1 for i, s in enumerate(e.shape))


def compare_site(site, value, exp_list, act_list, before_list, k: Optional[float] = None, local: bool = True,
                 magnitude=None):
    """Compare one fold site tensor under :data:`SITE_RULE` (``value`` a SiteValue, lists one
    array per batch; ``before_list`` the original's input of the run, or None)."""
    from .results import SiteStats

    exp0 = np.asarray(exp_list[0])
    stats = SiteStats(site.title, site.kind, site.node, site.into, site.rule, value.name, False, str(exp0.dtype),
                      list(exp0.shape), site.precision, site.precision_why)
    for e, a in zip(exp_list, act_list):
        if np.shape(e) != np.shape(a):
            stats.problem = f"shape differs: original [{dims_text(np.shape(e))}], folded [{dims_text(np.shape(a))}]"
            return stats
    if not is_float_dtype(exp0.dtype):
        stats.problem = None
        stats.failing = sum(int(np.count_nonzero(np.asarray(e) != np.asarray(a))) for e, a in zip(exp_list, act_list))
        stats.total = sum(int(np.size(e)) for e in exp_list)
        stats.passed = stats.failing == 0
        stats.tolerance_source = "exact (not a float)"
        return stats
    stats.k = float(k) if k is not None else site_tolerance(site.precision or str(exp0.dtype))
    stats.tolerance_source = "given (--rtol)" if k is not None else f"default for {site.precision or exp0.dtype}"
    if not local and k is None:
        stats.k *= END_TO_END_FACTOR
        stats.tolerance_source += f", x{END_TO_END_FACTOR:g} end to end"
    diffs, ratios, origs, folds = [], [], [], []
    nonfinite = failing = 0
    axis = None
    scale = 0.0
    groups = _site_groups(exp_list, act_list, before_list, magnitude)
    tiny = np.finfo(np.float64).tiny
    for e, a, x, m, stacked in groups:
        bn = (value.bn_gain, value.bn_shift) if getattr(value, "bn_gain", None) is not None else None
        R, axis = _site_reference(e, x, None if value.channel_axis is None else _shift_axis(value.channel_axis, stacked, e.ndim),
                                  m, value.direct, bn)
        with np.errstate(invalid="ignore", over="ignore"):
            if np.isfinite(e).all() and np.isfinite(a).all():  # the usual case: fewer passes
                diff = np.abs(a - e)
                ratio = diff / np.maximum(R + np.abs(e), tiny)
                scale = max(scale, float(np.abs(e).max()) if e.size else 0.0)
            else:
                both = np.isfinite(e) & np.isfinite(a)
                nan_mismatch = np.isnan(e) != np.isnan(a)
                other = ~both & ~np.isnan(e) & ~np.isnan(a) & (e != a)
                nonfinite += int(np.count_nonzero(nan_mismatch | other))
                diff = np.where(both, np.abs(a - e), 0.0)
                ratio = np.where(both, diff / np.maximum(R + np.abs(np.where(both, e, 0.0)), tiny), 0.0)
                ratio = np.where(nan_mismatch | other, np.inf, ratio)
                finite = np.abs(e[np.isfinite(e)])
                scale = max(scale, float(finite.max()) if finite.size else 0.0)
        # |folded - original| > k (R + |original|)  <=>  ratio > k  (non-finite mismatches counted apart)
        failing += int(np.count_nonzero(np.isfinite(ratio) & (ratio > stats.k)))
        diffs.append(diff.ravel())
        ratios.append(ratio.ravel())
        origs.append(e.ravel())
        folds.append(a.ravel())
    diff, ratio = (np.concatenate(x) if len(x) > 1 else x[0] for x in (diffs, ratios))
    stats.per_channel_axis = None if axis is None else axis - (1 if groups[0][4] else 0)
    stats.slope_limit = float(k) if k is not None else site_slope_limit(site.precision or str(exp0.dtype))
    for e, a, _, _, stacked in groups:
        ch_axis = None if value.channel_axis is None else _shift_axis(value.channel_axis, stacked, e.ndim)
        unit = UNIT_ROUNDOFF.get(site.precision or str(exp0.dtype), 2.0**-4)
        slope, channel = _channel_slopes(e, a, ch_axis, unit)
        if slope >= stats.max_slope:
            stats.max_slope, stats.slope_channel = slope, channel
    stats.total = int(diff.size)
    stats.nonfinite_mismatch = nonfinite
    stats.failing = failing + nonfinite
    stats.passed = stats.failing == 0 and stats.max_slope <= stats.slope_limit
    stats.scale = scale
    if diff.size:
        stats.max_abs_err = float(diff.max())
        stats.p50_abs_err, stats.p99_abs_err = (float(v) for v in np.percentile(diff, [50, 99]))
        stats.min_k = float(ratio.max())
        stats.max_rel_err = stats.min_k
    if not stats.passed and stats.failing:
        flat = int(np.argmax(ratio))
        worst = _worst_flat(flat, exp_list, np.concatenate(origs), np.concatenate(folds))
        worst["allowed"] = float(stats.k * diff[flat] / ratio[flat]) if 0 < ratio[flat] < np.inf else 0.0
        stats.worst = worst
    return stats


def _site_groups(exp_list, act_list, before_list, magnitude_list=None):
    """``(original, folded, before, magnitude, stacked)``: all batches stacked on a new first axis
    when their shapes agree (per-channel statistics then see every batch), else one group per batch."""
    e = [np.asarray(v, dtype=np.float64) for v in exp_list]
    a = [np.asarray(v, dtype=np.float64) for v in act_list]
    x = None if before_list is None else [np.asarray(v, dtype=np.float64) for v in before_list]
    m = None if magnitude_list is None else [np.asarray(v, dtype=np.float64) for v in magnitude_list]
    same = all(len({v.shape for v in group}) == 1 for group in (e, x, m) if group is not None)
    if same:
        stack = _stack
        return [(stack(e), stack(a), None if x is None else stack(x), None if m is None else stack(m), True)]
    return [(eb, ab, None if x is None else x[i], None if m is None else m[i], False) for i, (eb, ab) in enumerate(zip(e, a))]


def _stack(arrays):
    """``np.stack(arrays)``; one array becomes a view with a new first axis, not a copy."""
    return arrays[0][np.newaxis] if len(arrays) == 1 else np.stack(arrays)


def _shift_axis(axis: int, stacked: bool, ndim: int) -> Optional[int]:
    """A channel axis of one batch's tensor, as an axis of the stacked array."""
    rank = ndim - (1 if stacked else 0)
    if not -rank <= axis < rank:
        return None
    return axis % rank + (1 if stacked else 0)


def _site_reference(e: np.ndarray, x: Optional[np.ndarray], channel_axis: Optional[int], m: Optional[np.ndarray] = None,
                    direct: bool = False, bn: Optional[Tuple[np.ndarray, np.ndarray]] = None):
    """R of :data:`SITE_RULE` for each element of ``e`` (broadcastable), and the channel axis used.

    ``m``: sum |w| |x| of the linear op the run was folded into, per element of its output (of
    ``e`` itself when ``direct``)."""
    finite = np.where(np.isfinite(e), np.abs(e), 0.0)
    tensor_scale = float(finite.max()) if finite.size else 0.0
    axis = None
    if channel_axis is not None and e.size and e.size // max(e.shape[channel_axis], 1) >= 2:
        axis = channel_axis  # (a channel needs two or more elements for its statistics)
    others = tuple(i for i in range(e.ndim) if i != axis) if axis is not None else None
    channel = finite.max(axis=others, keepdims=True) if others is not None else np.full((1,) * e.ndim, tensor_scale)
    floor = SITE_FLOOR * tensor_scale
    R = np.maximum(channel, floor)
    if x is not None and x.shape == e.shape and e.size > 1:
        # the run maps x to e per channel as e = a x + b: |a| = std(e) / std(x) over the channel;
        # |a| * max |x| is how large the values were before the shift took them back towards 0
        xf = np.where(np.isfinite(x), x, 0.0)
        ef = np.where(np.isfinite(e), e, 0.0)
        sx = xf.std(axis=others, keepdims=True) if others is not None else np.full((1,) * e.ndim, xf.std())
        se = ef.std(axis=others, keepdims=True) if others is not None else np.full((1,) * e.ndim, ef.std())
        mx = np.abs(xf).max(axis=others, keepdims=True) if others is not None else np.full((1,) * e.ndim, np.abs(xf).max())
        with np.errstate(divide="ignore", invalid="ignore"):
            pre = np.where(sx > 0, se / sx * mx, 0.0)
        R = np.maximum(np.where(sx > 0, pre, channel), floor)
        if m is not None and m.shape == e.shape:
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                gain = np.where(sx > 0, se / sx, 0.0)
                terms = gain * m  # m is inf where the probe overflowed its dtype: no limit there
            R = np.maximum(R, np.where(np.isnan(terms), 0.0, terms))
        if bn is not None and axis is not None and len(bn[0]) == e.shape[axis]:
            gain, shift = (v.reshape(tuple(-1 if i == axis else 1 for i in range(e.ndim))) for v in bn)
            R = np.maximum(R, gain * mx + shift)  # the BN's own terms: a*x and a*mean, B
            if m is not None and m.shape == e.shape:
                with np.errstate(invalid="ignore", over="ignore"):
                    terms = gain * m
                R = np.maximum(R, np.where(np.isnan(terms), 0.0, terms))
    elif direct and m is not None and m.shape == e.shape:
        R = np.maximum(R, np.where(np.isnan(m), 0.0, m))
    if tensor_scale == 0:
        R = np.maximum(R, 1.0)
    return R, axis

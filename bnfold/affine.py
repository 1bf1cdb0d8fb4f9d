"""The numeric core: a BatchNorm as a per-channel affine map, and its fold into a linear op.

Every front end (ONNX, PyTorch) goes through these functions, so the arithmetic lives in one
place. All of it runs in float64; results are cast back to the weight's own dtype exactly
once, by :func:`cast_back`, which refuses a result that does not fit that dtype.

At inference a BatchNorm computes ``y = gamma * (x - mean) / sqrt(var + eps) + beta``,
which is ``y = a * x + b`` per channel with::

    a = gamma / sqrt(var + eps)
    b = beta - mean * a

Folding it into a linear op ``z = W x + c`` that feeds it gives ``W' = W * a`` along the op's
output-channel axis and ``c' = c * a + b``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np


class Refusal(Exception):
    """A fold that must not be done. ``reason`` is a stable code, ``detail`` says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


_BN_NAMES = ("scale", "B", "mean", "var")


def bn_coefficients(scale, shift, mean, var, eps: float) -> Tuple[np.ndarray, np.ndarray]:
    """Return ``(a, b)`` in float64 for a BatchNorm in inference mode.

    Preconditions: the four parameter vectors are 1-D and of one length (the channel count).
    Raises :class:`Refusal` when a parameter is not finite, when shapes disagree, or when
    ``var + eps`` is not positive (the BN itself would produce NaN or infinity).
    """
    params = [np.asarray(p, dtype=np.float64) for p in (scale, shift, mean, var)]
    shapes = {p.shape for p in params}
    if len(shapes) != 1 or params[0].ndim != 1:
        raise Refusal(
            "not-per-channel",
            "BatchNorm parameters are not 1-D vectors of one length: "
            + ", ".join(str(list(s)) for s in sorted(shapes)),
        )
    stacked = np.stack(params)  # one finiteness check for all four (a fold is often tiny)
    if not np.isfinite(stacked).all():
        bad = next(n for n, p in zip(_BN_NAMES, params) if not np.isfinite(p).all())
        raise Refusal("non-finite-parameter", f"{bad} contains NaN or infinity")
    if not np.isfinite(eps):
        raise Refusal("non-finite-parameter", "epsilon is not finite")
    scale, shift, mean, var = stacked
    denom = var + np.float64(eps)
    if (denom <= 0).any():
        raise Refusal("non-positive-variance", "var + epsilon <= 0 for some channel")
    with np.errstate(over="ignore", invalid="ignore"):  # checked just below
        a = scale / np.sqrt(denom)
        b = shift - mean * a
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise Refusal("non-finite-result", "the BatchNorm's scale or shift overflows float64")
    return a, b


def channel_broadcast(shape, a: np.ndarray, axis: int, groups: int = 1) -> np.ndarray:
    """Reshape per-channel ``a`` so that it multiplies a weight of ``shape`` channel-wise.

    ``axis`` is the weight axis that carries the channels (0 for Conv ``[C_out, C_in/g, k..]``
    and Linear ``[N, K]``; 1 for MatMul ``[K, N]`` and ConvTranspose ``[C_in, C_out/g, k..]``).
    With ``groups > 1`` on axis 1 (grouped ConvTranspose), channel ``g * per + j`` lives at
    position ``j`` of axis 1 inside the rows of group ``g`` on axis 0; the result then has
    the full weight shape.
    """
    shape = tuple(shape)
    rank = len(shape)
    if axis == 0:
        return a.reshape((-1,) + (1,) * (rank - 1))
    if axis != 1 or rank < 2:
        raise ValueError(f"unsupported channel axis {axis} for a weight of rank {rank}")
    if groups == 1:
        return a.reshape((1, -1) + (1,) * (rank - 2))
    rows, per = shape[0], shape[1]
    rest = (1,) * (rank - 2)
    grid = a.reshape((groups, 1, per) + rest)
    full = np.broadcast_to(grid, (groups, rows // groups, per) + rest)
    return full.reshape((rows, per) + rest)


def output_channels(shape, axis: int, groups: int = 1) -> int:
    """Number of output channels of a weight laid out as :func:`channel_broadcast` expects."""
    return int(shape[axis]) * (groups if axis == 1 else 1)


def fold_after(
    weight: np.ndarray,
    bias: Optional[np.ndarray],
    a: np.ndarray,
    b: np.ndarray,
    axis: int,
    groups: int = 1,
) -> Tuple[np.ndarray, np.ndarray]:
    """Fold ``y = a * (W x + c) + b`` into one linear op; return ``(W', c')`` in float64.

    Preconditions: ``a`` and ``b`` come from :func:`bn_coefficients`; the weight's output
    channels (see :func:`channel_broadcast`) number ``len(a)``; ``bias`` is None or has one
    value per output channel.
    """
    n = output_channels(weight.shape, axis, groups)
    if n != a.shape[0] or (axis == 1 and groups > 1 and weight.shape[0] % groups):
        raise Refusal(
            "channel-mismatch",
            f"the linear op has {n} output channels, the BatchNorm has {a.shape[0]}",
        )
    # weight * float64 scale computes in float64 without a float64 copy of the weight first
    w64 = np.multiply(weight, channel_broadcast(weight.shape, a, axis, groups), dtype=np.float64)
    return w64, _bias64(bias, n) * a + b


def _bias64(bias: Optional[np.ndarray], n: int) -> np.ndarray:
    """``bias`` as a float64 vector of ``n`` values (zeros when absent); refuse another size."""
    if bias is None:
        return np.zeros(n)
    bias = np.asarray(bias, dtype=np.float64)
    if bias.size != n:
        raise Refusal("channel-mismatch", f"the bias has {bias.size} values for {n} output channels")
    return bias.reshape(n)


def fold_before(
    weight: np.ndarray,
    bias: Optional[np.ndarray],
    a: np.ndarray,
    b: np.ndarray,
    in_axis: int,
    groups: int = 1,
) -> Tuple[np.ndarray, np.ndarray]:
    """Fold ``z = W (a * x + b) + c`` into one linear op; return ``(W', c')`` in float64.

    For a linear op that *consumes* the BatchNorm's output. ``in_axis`` is the weight axis of
    input channels (1 for Conv ``[C_out, C_in/g, k..]`` and Linear ``[N, K]``, 0 for MatMul
    ``[K, N]``). With ``groups > 1`` (Conv only), output channel ``o`` of group ``o // (C_out/g)``
    reads input channels ``g * C_in/g .. (g+1) * C_in/g - 1``.

    Exact only when every input element the op reads is a real BN output: a Conv with zero
    padding reads inserted zeros, not ``b``, so callers must refuse padded convs.
    """
    w64 = np.asarray(weight, dtype=np.float64)
    out_axis = 1 - in_axis
    per_in = w64.shape[in_axis]
    if per_in * groups != a.shape[0]:
        raise Refusal(
            "channel-mismatch",
            f"the linear op reads {per_in * groups} channels, the BatchNorm has {a.shape[0]}",
        )
    n_out = w64.shape[out_axis]
    # For each (output channel, input position) the BN channel it reads.
    group_of_out = np.arange(n_out) // (n_out // groups)
    chan = group_of_out[:, None] * per_in + np.arange(per_in)[None, :]  # [n_out, per_in]
    if in_axis == 0:
        chan = chan.T  # weight is [K, N]
    extra = (1,) * (w64.ndim - 2)
    a_full = a[chan].reshape(chan.shape + extra)
    b_full = b[chan].reshape(chan.shape + extra)
    w_new = w64 * a_full
    # sum of W * b over every axis but the output axis
    shift = (w64 * b_full).sum(axis=tuple(i for i in range(w64.ndim) if i != out_axis))
    return w_new, _bias64(bias, n_out) + shift


def cast_back(value64: np.ndarray, dtype, what: str) -> np.ndarray:
    """Cast a float64 result to ``dtype`` once; refuse when it does not fit.

    ``dtype`` is a numpy dtype (float16, float32, float64, or ml_dtypes' bfloat16). A value
    that becomes infinite or NaN in the target dtype (float16 beyond 65504, say) raises
    :class:`Refusal` rather than writing a broken model.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked just below
        out = value64.astype(dtype)
    # NaN and infinity survive the cast, so one check of the result covers both causes
    if not np.all(np.isfinite(out)):
        if not np.all(np.isfinite(value64)):
            raise Refusal("non-finite-result", f"the folded {what} is not finite")
        big = float(np.max(np.abs(value64)))
        raise Refusal(
            "overflow",
            f"the folded {what} reaches {big:.4g}, beyond the range of {np.dtype(dtype).name}",
        )
    return out

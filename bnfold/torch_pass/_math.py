"""Torch tensors in and out of the shared float64 core (:mod:`bnfold.affine`).

Every fold goes: tensors -> float64 numpy -> ``bn_coefficients`` / ``fold_after`` -> ``cast_back``
to the producer weight's own dtype exactly once (refusing overflow) -> tensors on the weight's
device and in its memory format.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from ..affine import Refusal, bn_coefficients, cast_back, fold_after, fold_before


def numpy_dtype(dtype: torch.dtype):
    """The numpy dtype ``cast_back`` takes for a torch float dtype; Refusal for any other."""
    if dtype == torch.bfloat16:
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    table = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
    if dtype not in table:
        raise Refusal("unsupported-dtype", f"the weight is {str(dtype).replace('torch.', '')}")
    return np.dtype(table[dtype])


def to64(tensor: Optional[torch.Tensor]) -> Optional[np.ndarray]:
    """An exact float64 copy (every float16/bfloat16/float32 value is a float64 value)."""
    if tensor is None:
        return None
    return tensor.detach().to(device="cpu", dtype=torch.float64).numpy().copy()


def from_numpy(arr: np.ndarray, dtype: torch.dtype, device) -> torch.Tensor:
    """A tensor of ``arr``'s values (already of the numpy twin of ``dtype``) on ``device``.

    torch cannot read ml_dtypes' bfloat16 arrays, so those travel as their uint16 bit patterns.
    """
    arr = np.ascontiguousarray(arr)
    if dtype == torch.bfloat16:
        out = torch.from_numpy(arr.view(np.uint16).copy()).view(torch.bfloat16)
    else:
        out = torch.from_numpy(arr.copy())
    if out.dtype != dtype:
        raise AssertionError(f"expected {dtype}, got {out.dtype}")
    return out.to(device)


def same_layout(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``tensor`` in ``like``'s memory format (channels-last weights stay channels-last)."""
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    fmt = formats.get(like.dim())
    if fmt is not None and not like.is_contiguous() and like.is_contiguous(memory_format=fmt):
        return tensor.contiguous(memory_format=fmt)
    return tensor


def bn_affine(weight, bias, mean, var, eps: float) -> Tuple[np.ndarray, np.ndarray]:
    """``(a, b)`` in float64 from BN tensors; ``weight``/``bias`` None for ``affine=False``."""
    m = to64(mean)
    if m is None or var is None:
        raise Refusal("no-running-stats", "the BN has no running statistics")
    n = m.shape[0] if m.ndim == 1 else -1
    scale = to64(weight) if weight is not None else np.ones(max(n, 0))
    shift = to64(bias) if bias is not None else np.zeros(max(n, 0))
    return bn_coefficients(scale, shift, m, to64(var), float(eps))


def fold_tensors(
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    a: np.ndarray,
    b: np.ndarray,
    axis: int,
    groups: int,
    name: str,
    *,
    before: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The folded ``(weight, bias)`` as tensors like ``weight`` (bias created when None).
    ``before``: the affine map comes before the op (``axis`` is then its input-channel axis).

    Raises Refusal (channel mismatch, non-finite values, overflow of the weight's dtype).
    """
    np_dtype = numpy_dtype(weight.dtype)
    if bias is not None and bias.dtype != weight.dtype:
        raise Refusal("unsupported-dtype", f"{name}: bias dtype {bias.dtype} differs from weight dtype {weight.dtype}")
    if before:
        w64, c64 = fold_before(to64(weight), to64(bias), a, b, in_axis=axis, groups=groups)
    else:
        w64, c64 = fold_after(to64(weight), to64(bias), a, b, axis, groups)
    w_np = cast_back(w64, np_dtype, f"weight of {name}")  # refuses overflow of the dtype
    c_np = cast_back(c64, np_dtype, f"bias of {name}")
    w_new = from_numpy(w_np, weight.dtype, weight.device)
    c_new = from_numpy(c_np, weight.dtype, weight.device)
    return same_layout(w_new, weight), c_new


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A numpy copy in the tensor's own dtype (bfloat16 as ml_dtypes.bfloat16), for comparisons."""
    t = tensor.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy().view(numpy_dtype(torch.bfloat16)).copy()
    return t.numpy().copy()

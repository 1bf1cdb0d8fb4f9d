"""Unit tests of bnfold.affine, the float64 numeric core, against direct computation.

The linear ops are run by onnxruntime (ORT_DISABLE_ALL) or numpy, never by bnfold itself,
so these tests check the fold arithmetic independently of any graph code.
"""

from __future__ import annotations

import numpy as np
import pytest

from bnfold.affine import (
    Refusal,
    bn_coefficients,
    cast_back,
    channel_broadcast,
    fold_after,
    fold_before,
    output_channels,
)
from onnx_models import BFLOAT16, GraphBuilder, run_model


def _stats(rng, c):
    return (
        rng.uniform(0.5, 1.5, c) * np.where(rng.random(c) < 0.3, -1, 1),
        rng.normal(0, 1, c),
        rng.normal(0, 1, c),
        rng.uniform(0.1, 3.0, c),
    )


def _bn_reference(x, scale, shift, mean, var, eps, axis):
    """BatchNorm in float64, channel ``axis`` of ``x``, straight from the ONNX definition."""
    shape = [1] * x.ndim
    shape[axis] = -1
    r = lambda v: np.asarray(v, np.float64).reshape(shape)  # noqa: E731
    return r(scale) * (x - r(mean)) / np.sqrt(r(var) + eps) + r(shift)


# -- bn_coefficients ---------------------------------------------------------------------------


def test_bn_coefficients_match_the_bn_formula():
    rng = np.random.default_rng(0)
    scale, shift, mean, var = _stats(rng, 7)
    a, b = bn_coefficients(scale, shift, mean, var, 1e-3)
    assert a.dtype == np.float64 and b.dtype == np.float64
    x = rng.normal(0, 3, (5, 7))
    np.testing.assert_allclose(a * x + b, _bn_reference(x, scale, shift, mean, var, 1e-3, 1), rtol=1e-12, atol=1e-12)


def test_bn_coefficients_work_in_float64_for_float32_inputs():
    # var + eps with a tiny variance: float32 arithmetic would lose eps entirely
    var = np.array([1e-12, 1e-8], np.float32)
    a, _ = bn_coefficients(np.ones(2, np.float32), np.zeros(2, np.float32), np.zeros(2, np.float32), var, 1e-12)
    expected = 1.0 / np.sqrt(var.astype(np.float64) + 1e-12)
    np.testing.assert_allclose(a, expected, rtol=1e-14)


@pytest.mark.parametrize("which", [0, 1, 2, 3])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_bn_coefficients_refuse_non_finite_parameters(which, bad):
    params = [np.ones(3), np.zeros(3), np.zeros(3), np.ones(3)]
    params[which] = params[which].copy()
    params[which][1] = bad
    with pytest.raises(Refusal) as info:
        bn_coefficients(*params, 1e-5)
    assert info.value.reason == "non-finite-parameter"


@pytest.mark.parametrize("eps", [np.nan, np.inf])
def test_bn_coefficients_refuse_non_finite_epsilon(eps):
    with pytest.raises(Refusal) as info:
        bn_coefficients(np.ones(2), np.zeros(2), np.zeros(2), np.ones(2), eps)
    assert info.value.reason == "non-finite-parameter"


@pytest.mark.parametrize("var,eps", [(-1.0, 1e-5), (-1e-5, 1e-5), (0.0, 0.0), (-2.0, 1.0)])
def test_bn_coefficients_refuse_non_positive_variance(var, eps):
    with pytest.raises(Refusal) as info:
        bn_coefficients(np.ones(2), np.zeros(2), np.zeros(2), np.array([1.0, var]), eps)
    assert info.value.reason == "non-positive-variance"


def test_bn_coefficients_accept_zero_variance_with_positive_epsilon():
    a, b = bn_coefficients(np.ones(2), np.zeros(2), np.ones(2), np.zeros(2), 1e-5)
    np.testing.assert_allclose(a, 1 / np.sqrt(1e-5))
    np.testing.assert_allclose(b, -1 / np.sqrt(1e-5))


@pytest.mark.parametrize(
    "shapes",
    [
        [(3,), (3,), (3,), (4,)],  # one parameter of another length
        [(2, 3)] * 4,  # not 1-D
        [()] * 4,  # scalars
    ],
)
def test_bn_coefficients_refuse_mismatched_shapes(shapes):
    params = [np.ones(s) for s in shapes]
    with pytest.raises(Refusal) as info:
        bn_coefficients(*params, 1e-5)
    assert info.value.reason == "not-per-channel"


def test_bn_coefficients_refuse_float64_overflow():
    with pytest.raises(Refusal) as info:
        bn_coefficients(np.array([1e300]), np.zeros(1), np.zeros(1), np.array([1e-300]), 0.0)
    assert info.value.reason == "non-finite-result"


# -- fold_after, checked against onnxruntime ---------------------------------------------------


def _run_linear_bn(op, x, w, bias, stats, eps, folded, **attrs):
    """Run ``op(x, W, B) -> BN`` and ``op(x, W', B')`` (folded) with ORT; return both outputs."""
    outs = []
    for with_bn, (ww, bb) in ((True, (w, bias)), (False, folded)):
        g = GraphBuilder(seed=0)
        g.input("x", x.shape)
        ins = ["x", g.init("W", ww.astype(np.float32))]
        if bb is not None:
            ins.append(g.init("B", bb.astype(np.float32)))
        g.node(op, ins, "y", "lin", **attrs)
        last = "y"
        if with_bn:
            names = [g.init(n, np.asarray(v, np.float32)) for n, v in zip(("s", "b", "m", "v"), stats)]
            g.node("BatchNormalization", ["y", *names], "z", "bn", epsilon=eps)
            last = "z"
        g.output(last)
        outs.append(run_model(g.model(), {"x": x})[last].astype(np.float64))
    return outs


CONV_CASES = [
    # (kernel, c_in, c_out, group, attrs)
    ((3,), 3, 5, 1, {}),
    ((3, 3), 4, 6, 1, {"pads": [1, 1, 1, 1], "strides": [2, 1]}),
    ((3, 3), 4, 6, 2, {"dilations": [2, 2]}),
    ((3, 3), 6, 6, 6, {"pads": [1, 1, 1, 1]}),  # depthwise
    ((2, 2, 2), 2, 4, 1, {}),
]


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("kernel,c_in,c_out,group,attrs", CONV_CASES)
def test_fold_after_conv_matches_onnxruntime(kernel, c_in, c_out, group, attrs, with_bias):
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.5, (c_out, c_in // group) + kernel).astype(np.float32)
    bias = rng.normal(0, 0.5, c_out).astype(np.float32) if with_bias else None
    stats = _stats(rng, c_out)
    eps = 1e-3
    a, b = bn_coefficients(*stats, eps)
    w2, b2 = fold_after(w, bias, a, b, axis=0)
    assert w2.shape == w.shape and b2.shape == (c_out,)
    x = rng.normal(0, 1, (2, c_in) + (7,) * len(kernel)).astype(np.float32)
    ref, got = _run_linear_bn("Conv", x, w, bias, stats, eps, (w2, b2), group=group, **attrs)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


CONVT_CASES = [
    # (kernel, c_in, c_out, group, attrs)
    ((3,), 3, 5, 1, {}),
    ((3, 3), 4, 6, 1, {"strides": [2, 2], "output_padding": [1, 1]}),
    ((3, 3), 4, 6, 2, {"strides": [2, 2]}),  # grouped: 2 in, 3 out per group
    ((3, 3), 6, 4, 2, {}),  # grouped, fewer outputs than inputs
    ((3, 3), 4, 4, 2, {}),  # grouped, C_in == C_out: axis 0 would be shape-valid but wrong
    ((3, 3), 5, 5, 5, {"pads": [1, 1, 1, 1]}),  # depthwise
    ((2, 2, 2), 4, 6, 2, {"strides": [2, 2, 2]}),
]


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("kernel,c_in,c_out,group,attrs", CONVT_CASES)
def test_fold_after_conv_transpose_matches_onnxruntime(kernel, c_in, c_out, group, attrs, with_bias):
    rng = np.random.default_rng(2)
    w = rng.normal(0, 0.5, (c_in, c_out // group) + kernel).astype(np.float32)
    bias = rng.normal(0, 0.5, c_out).astype(np.float32) if with_bias else None
    stats = _stats(rng, c_out)
    a, b = bn_coefficients(*stats, 1e-5)
    w2, b2 = fold_after(w, bias, a, b, axis=1, groups=group)
    assert w2.shape == w.shape
    x = rng.normal(0, 1, (2, c_in) + (5,) * len(kernel)).astype(np.float32)
    ref, got = _run_linear_bn("ConvTranspose", x, w, bias, stats, 1e-5, (w2, b2), group=group, **attrs)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("layout", ["matmul", "linear"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_after_dense_matches_numpy(layout, with_bias):
    rng = np.random.default_rng(3)
    k, n = 6, 4
    w = rng.normal(0, 1, (k, n) if layout == "matmul" else (n, k))
    bias = rng.normal(0, 1, n) if with_bias else None
    stats = _stats(rng, n)
    a, b = bn_coefficients(*stats, 1e-5)
    axis = 1 if layout == "matmul" else 0
    w2, b2 = fold_after(w, bias, a, b, axis=axis)
    x = rng.normal(0, 1, (5, k))
    wm = w if layout == "matmul" else w.T
    z = x @ wm + (0 if bias is None else bias)
    ref = _bn_reference(z, *stats, 1e-5, 1)
    got = x @ (w2 if layout == "matmul" else w2.T) + b2
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


def test_fold_after_refuses_channel_mismatch():
    a, b = bn_coefficients(np.ones(3), np.zeros(3), np.zeros(3), np.ones(3), 1e-5)
    with pytest.raises(Refusal) as info:
        fold_after(np.ones((4, 2, 3, 3)), None, a, b, axis=0)
    assert info.value.reason == "channel-mismatch"
    with pytest.raises(Refusal) as info:  # ConvTranspose: 2 groups x 2 = 4 outputs, BN has 3
        fold_after(np.ones((4, 2, 3, 3)), None, a, b, axis=1, groups=2)
    assert info.value.reason == "channel-mismatch"


def test_fold_after_refuses_groups_not_dividing_input_channels():
    a, b = bn_coefficients(np.ones(4), np.zeros(4), np.zeros(4), np.ones(4), 1e-5)
    with pytest.raises(Refusal) as info:  # 5 input rows cannot split into 2 groups
        fold_after(np.ones((5, 2, 3)), None, a, b, axis=1, groups=2)
    assert info.value.reason == "channel-mismatch"


def test_fold_after_does_not_modify_its_arguments():
    rng = np.random.default_rng(4)
    w, bias = rng.normal(size=(4, 3, 3)), rng.normal(size=4)
    w0, bias0 = w.copy(), bias.copy()
    a, b = bn_coefficients(*_stats(rng, 4), 1e-5)
    fold_after(w, bias, a, b, axis=0)
    np.testing.assert_array_equal(w, w0)
    np.testing.assert_array_equal(bias, bias0)


# -- channel_broadcast / output_channels -------------------------------------------------------


def test_channel_broadcast_grouped_layout_matches_explicit_loop():
    c_in, per, groups = 6, 4, 3  # ConvTranspose weight [C_in, C_out/g, k], C_out = 12
    a = np.arange(per * groups, dtype=np.float64) + 1
    got = channel_broadcast((c_in, per, 2), a, axis=1, groups=groups)
    assert got.shape == (c_in, per, 1)
    rows_per_group = c_in // groups
    for row in range(c_in):
        grp = row // rows_per_group
        for j in range(per):
            assert got[row, j, 0] == a[grp * per + j]


def test_channel_broadcast_rejects_other_axes():
    with pytest.raises(ValueError):
        channel_broadcast((4, 3, 3), np.ones(3), axis=2)


@pytest.mark.parametrize(
    "shape,axis,groups,expected", [((8, 3, 3, 3), 0, 1, 8), ((6, 4, 3), 1, 1, 4), ((6, 4, 3), 1, 3, 12)]
)
def test_output_channels(shape, axis, groups, expected):
    assert output_channels(shape, axis, groups) == expected


# -- fold_before (BN feeding a linear op) ------------------------------------------------------


@pytest.mark.parametrize("c_in,c_out,group", [(4, 6, 1), (4, 6, 2), (6, 6, 6)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_before_conv_without_padding_matches_onnxruntime(c_in, c_out, group, with_bias):
    rng = np.random.default_rng(5)
    w = rng.normal(0, 0.5, (c_out, c_in // group, 3, 3)).astype(np.float32)
    bias = rng.normal(0, 0.5, c_out).astype(np.float32) if with_bias else None
    stats = _stats(rng, c_in)
    a, b = bn_coefficients(*stats, 1e-5)
    w2, b2 = fold_before(w, bias, a, b, in_axis=1, groups=group)
    x = rng.normal(0, 1, (2, c_in, 6, 6)).astype(np.float32)

    g = GraphBuilder()
    g.input("x", x.shape)
    names = [g.init(n, np.asarray(v, np.float32)) for n, v in zip(("s", "b", "m", "v"), stats)]
    g.node("BatchNormalization", ["x", *names], "n", "bn")
    ins = ["n", g.init("W", w)] + ([g.init("B", bias)] if with_bias else [])
    g.node("Conv", ins, "y", "conv", group=group)
    g.output("y")
    ref = run_model(g.model(), {"x": x})["y"].astype(np.float64)

    g = GraphBuilder()
    g.input("x", x.shape)
    g.node("Conv", ["x", g.init("W", w2.astype(np.float32)), g.init("B", b2.astype(np.float32))], "y", "conv", group=group)
    g.output("y")
    got = run_model(g.model(), {"x": x})["y"].astype(np.float64)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("layout", ["matmul", "linear"])
def test_fold_before_dense_matches_numpy(layout):
    rng = np.random.default_rng(6)
    k, n = 5, 3
    w = rng.normal(0, 1, (k, n) if layout == "matmul" else (n, k))
    bias = rng.normal(0, 1, n)
    stats = _stats(rng, k)
    a, b = bn_coefficients(*stats, 1e-5)
    in_axis = 0 if layout == "matmul" else 1
    w2, b2 = fold_before(w, bias, a, b, in_axis=in_axis)
    x = rng.normal(0, 1, (4, k))
    wm, wm2 = (w, w2) if layout == "matmul" else (w.T, w2.T)
    ref = _bn_reference(x, *stats, 1e-5, 1) @ wm + bias
    np.testing.assert_allclose(x @ wm2 + b2, ref, rtol=1e-12, atol=1e-12)


def test_fold_before_refuses_channel_mismatch():
    a, b = bn_coefficients(np.ones(5), np.zeros(5), np.zeros(5), np.ones(5), 1e-5)
    with pytest.raises(Refusal) as info:
        fold_before(np.ones((3, 4, 3, 3)), None, a, b, in_axis=1)
    assert info.value.reason == "channel-mismatch"


# -- cast_back ---------------------------------------------------------------------------------


def test_cast_back_refuses_float16_overflow():
    with pytest.raises(Refusal) as info:
        cast_back(np.array([1.0, 70000.0]), np.float16, "weight")
    assert info.value.reason == "overflow"
    assert "weight" in info.value.detail


def test_cast_back_keeps_values_that_fit():
    v = np.array([65504.0, -65504.0, 1e-3, 0.0])
    out = cast_back(v, np.float16, "weight")
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, v.astype(np.float16))


@pytest.mark.parametrize("dtype,big", [(np.float32, 1e39), (np.float16, 1e5)])
def test_cast_back_overflow_per_dtype(dtype, big):
    with pytest.raises(Refusal) as info:
        cast_back(np.array([big]), dtype, "bias")
    assert info.value.reason == "overflow"


@pytest.mark.skipif(BFLOAT16 is None, reason="ml_dtypes not installed")
def test_cast_back_bfloat16_has_float32_range():
    out = cast_back(np.array([1e30, -3.0]), BFLOAT16, "weight")
    assert out.dtype == BFLOAT16
    assert np.all(np.isfinite(out.astype(np.float64)))
    with pytest.raises(Refusal):
        cast_back(np.array([1e39]), BFLOAT16, "weight")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_cast_back_refuses_non_finite_input(bad):
    with pytest.raises(Refusal) as info:
        cast_back(np.array([1.0, bad]), np.float32, "weight")
    assert info.value.reason == "non-finite-result"

"""Property tests: random conv / dense shapes and BN statistics, including extreme ones.

For every generated model the fold either removes the BN and the result is equivalent under
onnxruntime (ORT_DISABLE_ALL) within the dtype's tolerance, or leaves it with one of the
reasons that such statistics justify, and the model is unchanged in behaviour. Folded weights
are never NaN or infinite.

Bounded for CI (``max_examples=40``, derandomized); BNFOLD_SLOW=1 adds a longer random run.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from bnfold.onnx_pass import fold_onnx
from onnx_models import GraphBuilder, all_graphs, assert_equivalent, check_valid, count_op

# the reasons extreme statistics can justify; anything else is a bug in the fold's matching
STAT_REASONS = {"overflow", "non-finite-parameter", "non-positive-variance", "non-finite-result"}

FAST = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
SLOW = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))

DTYPES = [np.float32, np.float64, np.float16]

# per-channel statistics, as (gamma, beta, mean, var) recipes over a float64 draw
STAT_KINDS = ["normal", "tiny-var", "huge-var", "zero-gamma", "huge-gamma", "large-mean", "zero-beta", "zero-var"]


def make_stats(kinds, rng: np.random.Generator, dtype) -> dict:
    """BN statistics per channel from ``kinds``; cast to ``dtype`` (values may overflow it)."""
    c = len(kinds)
    gamma = rng.uniform(0.5, 2.0, c) * np.where(rng.random(c) < 0.3, -1, 1)
    beta = rng.normal(0, 1, c)
    mean = rng.normal(0, 1, c)
    var = rng.uniform(0.1, 3.0, c)
    for i, kind in enumerate(kinds):
        if kind == "tiny-var":
            var[i] = 1e-12
        elif kind == "huge-var":  # huge, but within the dtype (65504 caps float16)
            var[i] = min(1e12, 0.5 * float(np.finfo(dtype).max))
        elif kind == "zero-gamma":
            gamma[i] = 0.0
        elif kind == "huge-gamma":
            gamma[i] = 3e4 * np.sign(gamma[i])
        elif kind == "large-mean":
            mean[i] = 1e4 * np.sign(mean[i] or 1.0)
        elif kind == "zero-beta":
            beta[i] = 0.0
        elif kind == "zero-var":
            var[i] = 0.0
    with np.errstate(over="ignore"):
        return {k: v.astype(dtype) for k, v in (("scale", gamma), ("B", beta), ("mean", mean), ("var", var))}


def runner_for(dtype, op: str) -> str:
    # onnxruntime's CPU provider has no float64 Conv / ConvTranspose kernels, and onnx's
    # reference evaluator computes grouped ConvTranspose wrongly: run those as float32
    return "ort-f32" if np.dtype(dtype) == np.float64 and op.startswith("Conv") else "ort"


def check_fold(model, runner: str) -> None:
    out, report = fold_onnx(model)
    folded = [f for f in report.folded if f.bn == "bn"]
    skipped = [s for s in report.skipped if s.bn == "bn"]
    assert len(folded) + len(skipped) == 1
    original = {t.SerializeToString() for g in all_graphs(model.graph) for t in g.initializer}
    for g in all_graphs(out.graph):
        for t in g.initializer:
            if t.SerializeToString() in original:
                continue  # an input's own values (a refused BN keeps its infinite variance)
            assert np.all(np.isfinite(numpy_helper.to_array(t).astype(np.float64))), f"{t.name} is not finite"
    if folded:
        event("folded")
        assert count_op(out, "BatchNormalization") == 0
    else:
        skip = skipped[0]
        event(f"refused: {skip.reason}")
        assert skip.reason in STAT_REASONS, f"unexpected refusal {skip.reason}: {skip.detail}"
    check_valid(out)
    assert_equivalent(model, out, runner=runner)


@st.composite
def conv_cases(draw):
    op = draw(st.sampled_from(["Conv", "ConvTranspose"]))
    dtype = draw(st.sampled_from(DTYPES))
    rank = draw(st.sampled_from([1, 2, 2, 3]))
    groups = draw(st.integers(1, 3))
    c_in = groups * draw(st.integers(1, 3))
    c_out = groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    strides = [draw(st.integers(1, 2)) for _ in range(rank)]
    dilations = [draw(st.integers(1, 2)) for _ in range(rank)]
    attrs = {"strides": strides, "dilations": dilations}
    if op == "Conv":
        pads = [draw(st.integers(0, k - 1)) for k in kernel] * 2
        attrs["pads"] = pads
        spatial = [d * (k - 1) + 1 + draw(st.integers(0, 3)) for d, k in zip(dilations, kernel)]
    else:
        attrs["output_padding"] = [draw(st.integers(0, max(0, min(s, d) - 1))) for s, d in zip(strides, dilations)]
        spatial = [draw(st.integers(1, 4)) for _ in range(rank)]
    bias = draw(st.booleans())
    kinds = draw(st.lists(st.sampled_from(STAT_KINDS), min_size=c_out, max_size=c_out))
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.0]))
    seed = draw(st.integers(0, 2**16))
    return dict(op=op, dtype=dtype, groups=groups, c_in=c_in, c_out=c_out, kernel=kernel, attrs=attrs,
                spatial=spatial, bias=bias, kinds=kinds, eps=eps, seed=seed)  # fmt: skip


def build_conv(case) -> "onnx.ModelProto":  # noqa: F821
    g = GraphBuilder(seed=case["seed"], dtype=case["dtype"])
    x = g.input("x", [2, case["c_in"], *case["spatial"]])
    y = g.conv(x, "conv", case["c_in"], case["c_out"], case["kernel"], bias=case["bias"], group=case["groups"],
               op=case["op"], **case["attrs"])  # fmt: skip
    stats = make_stats(case["kinds"], g.rng, case["dtype"])
    g.output(g.bn(y, "bn", case["c_out"], stats=stats, epsilon=case["eps"]))
    return g.model(opset=15)


def _conv_property(case):
    check_fold(build_conv(case), runner_for(case["dtype"], case["op"]))


@FAST
@given(conv_cases())
def test_conv_fold_property(case):
    _conv_property(case)


@pytest.mark.slow
@SLOW
@given(conv_cases())
def test_conv_fold_property_long(case):
    _conv_property(case)


@st.composite
def dense_cases(draw):
    op = draw(st.sampled_from(["Gemm", "MatMul", "MatMulAdd"]))
    dtype = draw(st.sampled_from(DTYPES))
    k, n = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    trans_b = draw(st.integers(0, 1))
    alpha = draw(st.sampled_from([1.0, 0.5, -1.5, 0.0]))
    beta = draw(st.sampled_from([1.0, 2.0, -0.5, 0.0]))
    c_kind = draw(st.sampled_from(["none", "N", "1xN", "scalar"]))
    kinds = draw(st.lists(st.sampled_from(STAT_KINDS), min_size=n, max_size=n))
    eps = draw(st.sampled_from([1e-5, 0.0]))
    seed = draw(st.integers(0, 2**16))
    return dict(op=op, dtype=dtype, k=k, n=n, trans_b=trans_b, alpha=alpha, beta=beta, c_kind=c_kind,
                kinds=kinds, eps=eps, seed=seed)  # fmt: skip


def build_dense(case):
    k, n = case["k"], case["n"]
    g = GraphBuilder(seed=case["seed"], dtype=case["dtype"])
    x = g.input("x", ["M", k])
    if case["op"] == "Gemm":
        ins = [x, g.init("W", g.weight((n, k) if case["trans_b"] else (k, n)))]
        c_shape = {"none": None, "N": (n,), "1xN": (1, n), "scalar": ()}[case["c_kind"]]
        if c_shape is not None:
            ins.append(g.init("C", g.weight(c_shape)))
        g.node("Gemm", ins, "h", "gemm", transB=case["trans_b"], alpha=case["alpha"], beta=case["beta"])
    else:
        g.node("MatMul", [x, g.init("W", g.weight((k, n)))], "mm", "matmul")
        if case["op"] == "MatMulAdd":
            g.node("Add", ["mm", g.init("bias", g.weight((n,)))], "h", "add")
        else:
            g.node("Identity", ["mm"], "unused", "ident_unused")  # never read: the graph has no use for it
            g.nodes.pop()
            g.nodes[-1].output[0] = "h"
    stats = make_stats(case["kinds"], g.rng, case["dtype"])
    g.output(g.bn("h", "bn", n, stats=stats, epsilon=case["eps"]))
    return g.model(opset=15)


@FAST
@given(dense_cases())
def test_dense_fold_property(case):
    check_fold(build_dense(case), runner_for(case["dtype"], case["op"]))

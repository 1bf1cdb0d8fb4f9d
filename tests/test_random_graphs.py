"""Property-based equivalence: hypothesis builds random graphs of Conv / ConvTranspose / Gemm /
MatMul(+Add) / BN / ReLU / Add, with random shapes, groups, dtypes and extreme BN statistics, and
checks that ``bnfold.onnx_pass.fold_onnx``

- folds or refuses (with a reason) every BN, and folds every BN that is plainly foldable;
- writes only finite folded weights;
- gives a model whose every output matches the original under onnxruntime (optimizations
  disabled), within a tolerance derived from the dtype.

Bounded for CI (``BNFOLD_PROPERTY_EXAMPLES``, default 100); set it higher to run more by hand.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import numpy as np
import onnx
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from onnx_models import GraphBuilder, compare_outputs, random_feeds, run_model, sabotage_conv_fold

EXAMPLES = int(os.environ.get("BNFOLD_PROPERTY_EXAMPLES", "100"))
# Relative to the largest output magnitude, per dtype (onnx_models.TOLERANCE is for one layer;
# a chain of layers with extreme statistics accumulates a little more rounding).
TOLERANCE = {np.dtype(np.float64): 1e-9, np.dtype(np.float32): 1e-4, np.dtype(np.float16): 3e-2}
EXTREMES = ("normal", "tiny-var", "huge-var", "zero-gamma", "large-mean", "mixed")


@dataclass
class Expectation:
    """What the generator knows about one BN: its name and whether a fold is certain."""

    bn: str
    must_fold: bool  # False: the pass may fold or refuse, but must say why it refused


@dataclass
class Built:
    model: onnx.ModelProto
    dtype: np.dtype
    expect: List[Expectation] = field(default_factory=list)
    depth: int = 0


# ---------------------------------------------------------------- strategies


def bn_stats(draw, channels: int, dtype) -> Tuple[Dict[str, np.ndarray], float]:
    """BN parameters with one of the extreme patterns (and an epsilon)."""
    kind = draw(st.sampled_from(EXTREMES))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    small = np.dtype(dtype) == np.float16  # keep float16 models from overflowing on their own
    scale = rng.uniform(0.5, 1.5, channels) * np.where(rng.random(channels) < 0.3, -1, 1)
    shift = rng.normal(0, 0.5, channels)
    mean = rng.normal(0, 0.5, channels)
    var = rng.uniform(0.2, 2.0, channels)
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.0] if not small else [1e-5, 1e-3]))
    if kind in ("tiny-var", "mixed"):
        var = np.where(rng.random(channels) < 0.5, 10.0 ** rng.uniform(-12, -6, channels), var)
        eps = max(eps, 1e-5 if small else 1e-12)
    if kind in ("huge-var", "mixed"):
        var = np.where(rng.random(channels) < 0.5, 10.0 ** rng.uniform(2 if small else 4, 4 if small else 12, channels), var)
    if kind in ("zero-gamma", "mixed"):
        scale = np.where(rng.random(channels) < 0.5, 0.0, scale)
    if kind in ("large-mean", "mixed"):
        mean = mean + rng.choice([-1, 1], channels) * 10.0 ** rng.uniform(1, 2 if small else 5, channels)
    if eps == 0.0:
        var = np.maximum(var, 1e-6)  # var + eps must stay positive for the BN itself
    stats = {"scale": scale, "B": shift, "mean": mean, "var": var}
    return {k: v.astype(dtype) for k, v in stats.items()}, float(eps)


class Generator:
    """Draws one random graph into a GraphBuilder, tracking channel counts and expectations."""

    def __init__(self, draw, dtype, spatial: bool) -> None:
        self.draw = draw
        self.dtype = np.dtype(dtype)
        self.spatial = spatial
        self.b = GraphBuilder(dtype=dtype, seed=draw(st.integers(0, 2**16)))
        self.expect: List[Expectation] = []
        self.extra_outputs: List[str] = []

    def kind(self) -> str:
        return self.draw(st.sampled_from(["init", "init", "const"]))

    # -- one linear op -----------------------------------------------------------------
    def conv(self, x: str, c_in: int, c_out: int, groups: int) -> str:
        op = self.draw(st.sampled_from(["Conv", "ConvTranspose"]))
        k = self.draw(st.sampled_from([1, 3]))
        rank = self.rank - 2
        name = self.b.fresh(op.lower())
        return self.b.conv(
            x, name, c_in, c_out, [k] * rank, bias=self.draw(st.booleans()), group=groups,
            kind=self.kind(), op=op, pads=[k // 2] * (2 * rank),
        )

    def dense(self, x: str, f_in: int, f_out: int) -> str:
        op = self.draw(st.sampled_from(["Gemm", "MatMul", "MatMul+Add"]))
        name = self.b.fresh(op.lower().replace("+", ""))
        if op == "Gemm":
            trans_b = self.draw(st.integers(0, 1))
            w = self.b.weight((f_out, f_in) if trans_b else (f_in, f_out))
            ins = [x, self.b.param(f"{name}_B", w, self.kind())]
            bias = self.draw(st.sampled_from(["none", "vec", "row"]))
            if bias != "none":
                shape = (f_out,) if bias == "vec" else (1, f_out)
                ins.append(self.b.param(f"{name}_C", self.b.weight(shape), self.kind()))
            alpha = self.draw(st.sampled_from([1.0, 0.5, -2.0]))
            beta = self.draw(st.sampled_from([1.0, 0.25, -1.0]))
            self.b.node("Gemm", ins, f"{name}_out", name, transB=trans_b, alpha=alpha, beta=beta)
            return f"{name}_out"
        w = self.b.param(f"{name}_W", self.b.weight((f_in, f_out)), self.kind())
        self.b.node("MatMul", [x, w], f"{name}_mm", name)
        if op == "MatMul":
            return f"{name}_mm"
        c = self.b.param(f"{name}_bias", self.b.weight((f_out,)), self.kind())
        ins = [f"{name}_mm", c] if self.draw(st.booleans()) else [c, f"{name}_mm"]
        self.b.node("Add", ins, f"{name}_out", f"{name}_add")
        return f"{name}_out"

    # -- a block: linear op, maybe BN, maybe ReLU --------------------------------------
    def block(self, x: str, c_in: int, c_out: int) -> str:
        if self.spatial:
            groups = self.draw(st.sampled_from([g for g in (1, 2, 3) if c_in % g == 0 and c_out % g == 0]))
            y = self.conv(x, c_in, c_out, groups)
        else:
            y = self.dense(x, c_in, c_out)
        if self.draw(st.integers(0, 9)) < 8:
            tap = self.draw(st.integers(0, 9)) == 0  # the linear op's output is also a graph output
            if tap:
                self.extra_outputs.append(y)
            y = self.bn(y, c_out, must_fold=not tap)
        if self.draw(st.booleans()):
            name = self.b.fresh("relu")
            self.b.node("Relu", [y], f"{name}_out", name)
            y = f"{name}_out"
            if self.draw(st.integers(0, 9)) == 0:  # a BN after a ReLU has no linear producer
                y = self.bn(y, c_out, must_fold=False)
        return y

    def bn(self, x: str, channels: int, must_fold: bool) -> str:
        stats, eps = bn_stats(self.draw, channels, self.dtype)
        name = self.b.fresh("bn")
        # float16 results may exceed 65504: then a refusal ("overflow") is the right answer
        self.expect.append(Expectation(name, must_fold and self.dtype != np.float16))
        return self.b.bn(x, name, channels, kind=self.kind(), stats=stats, epsilon=eps)

    def build(self) -> Built:
        draw = self.draw
        batch = draw(st.integers(1, 3))
        c = draw(st.integers(1, 4)) * draw(st.sampled_from([1, 2, 3]))
        if self.spatial:
            self.rank = draw(st.sampled_from([3, 4]))
            dims = [draw(st.integers(1, 5)) for _ in range(self.rank - 2)]
            y = self.b.input("x", [batch, c] + dims)
        else:
            y = self.b.input("x", [batch, c])
        n_blocks = draw(st.integers(1, 2 if self.dtype == np.float16 else 3))
        for _ in range(n_blocks):
            c_out = draw(st.integers(1, 4)) * draw(st.sampled_from([1, 2, 3]))
            if draw(st.integers(0, 3)) == 0:  # a branch: two blocks joined by Add
                left, right = self.block(y, c, c_out), self.block(y, c, c_out)
                name = self.b.fresh("add")
                self.b.node("Add", [left, right], f"{name}_out", name)
                y = f"{name}_out"
            else:
                y = self.block(y, c, c_out)
            c = c_out
        self.b.output(y)
        for extra in self.extra_outputs:
            self.b.output(extra)
        return Built(self.b.model(), self.dtype, self.expect, n_blocks)


@st.composite
def random_graphs(draw) -> Built:
    spatial = draw(st.booleans())
    # onnxruntime's CPU provider has no float64 Conv / ConvTranspose kernels
    dtypes = [np.float32, np.float16] if spatial else [np.float32, np.float16, np.float64]
    dtype = draw(st.sampled_from(dtypes))
    return Generator(draw, dtype, spatial).build()


# ---------------------------------------------------------------- checks


def float_initializers(model: onnx.ModelProto):
    from onnx import numpy_helper

    for g in _graphs(model.graph):
        for t in g.initializer:
            yield t.name, numpy_helper.to_array(t)
        for n in g.node:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        yield n.output[0], numpy_helper.to_array(a.t)


def _graphs(graph):
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)


def assert_fold_is_sound(built: Built) -> None:
    from bnfold.onnx_pass import fold_onnx

    original = built.model
    before = original.SerializeToString()
    folded, report = fold_onnx(original)
    assert original.SerializeToString() == before, "fold_onnx changed the caller's model"

    folded_bns = {p.bn for p in report.folded}
    skipped = {s.bn: s for s in report.skipped}
    for exp in built.expect:
        assert (exp.bn in folded_bns) != (exp.bn in skipped), f"BN {exp.bn}: neither folded nor explained"
        if exp.bn in skipped:
            why = skipped[exp.bn]
            assert why.reason and why.detail, f"BN {exp.bn}: refused without a reason"
            assert not exp.must_fold, f"BN {exp.bn}: a plainly foldable BN was refused: {why.reason}: {why.detail}"
    bn_left = sum(n.op_type == "BatchNormalization" for g in _graphs(folded.graph) for n in g.node)
    assert bn_left == len(skipped), "the BNs left in the graph are not the ones reported as skipped"
    event(f"{built.dtype.name}: folded {len(folded_bns)} / refused {len(skipped)}")
    for s in skipped.values():
        event(f"refused: {s.reason}")

    for name, value in float_initializers(folded):
        if value.dtype.kind == "f":
            assert np.all(np.isfinite(value.astype(np.float64))), f"folded tensor {name} is not finite"
    onnx.checker.check_model(folded, full_check=True)

    for trial in range(2):
        feeds = random_feeds(original, seed=trial)
        ref = run_model(original, feeds)
        if not all(np.all(np.isfinite(v.astype(np.float64))) for v in ref.values()):
            event("original overflows its own dtype: outputs not compared")
            return
        compare_outputs(ref, run_model(folded, feeds), TOLERANCE[built.dtype])


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize="BNFOLD_PROPERTY_EXAMPLES" not in os.environ,  # CI: the same cases every run
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(random_graphs())
def test_fold_matches_original_or_refuses(built: Built) -> None:
    assert_fold_is_sound(built)


# ---------------------------------------------------------------- the property can fail


def test_property_catches_a_wrong_fold(monkeypatch) -> None:
    """Sabotage the fold math (one channel's scale off by 1 %): the property must notice."""
    from hypothesis import find

    sabotage_conv_fold(monkeypatch)

    def fails(built: Built) -> bool:
        try:
            assert_fold_is_sound(built)
        except AssertionError:
            return True
        return False

    found = find(random_graphs(), fails, settings=settings(max_examples=200, deadline=None, database=None))
    assert found is not None

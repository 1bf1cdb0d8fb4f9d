"""Semantic fuzzing: random *valid* graphs built from every rule's pattern, folded and compared.

Each case draws, from a seeded ``random.Random``, one of the pattern families the rules match:

- ``after``: Conv / ConvTranspose / Gemm / MatMul(+Add) -> up to two pass-through ops
  (Identity, Dropout, Transpose, Reshape, Squeeze, Unsqueeze, Flatten) -> one to three
  BNs and Mul/Add/Sub/Div by constants, with a ReLU or a tapped output now and then;
- ``before``: BN -> Conv (padded or not) / Gemm / MatMul, or BN2d -> Flatten -> Gemm/MatMul;
- ``bn-chain``: BN -> BN / Mul / Add / Sub / Div;

with random shapes, groups, strides, dilations, pads, Gemm attributes, dtypes, BN statistics
(extremes included: tiny and huge variances, zero gammas, large means) and constants given as
initializers, Constant nodes, small constant subgraphs (Unsqueeze/Reshape/Flatten/Cast/Expand
of an initializer) or initializers that a graph input overrides -- which the comparison then
feeds with other values, since a user may.

``fold_onnx`` must never raise on these valid models, must fold or explain every BN, and the
folded model must match the original under onnxruntime (ORT_DISABLE_ALL) on seeded inputs
within the dtype's tolerance. Generated models onnxruntime itself refuses are skipped.

CI runs ``BNFOLD_SEMANTIC_EXAMPLES`` models (default 200, fixed seeds; setting it draws fresh
ones). As a script it runs a campaign that reports every failure and saves repro models::

    python tests/test_semantic_fuzz.py 10000 [--save DIR] [--first SEED]
"""

from __future__ import annotations

import os
import random
import sys
import traceback
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bnfold.onnx_pass import fold_onnx  # noqa: E402
from onnx_models import GraphBuilder, compare_outputs, random_feeds, run_model, sabotage_conv_fold  # noqa: E402

try:  # the generator makes some models onnxruntime refuses (they are skipped): keep its log quiet
    import onnxruntime

    onnxruntime.set_default_logger_severity(4)
except ImportError:  # pragma: no cover
    pass

FRESH = "BNFOLD_SEMANTIC_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("BNFOLD_SEMANTIC_EXAMPLES", "200"))
# relative to the largest output magnitude (as in test_random_graphs.py: chains of layers with
# extreme statistics round a little more than one layer)
TOLERANCE = {np.dtype(np.float64): 1e-9, np.dtype(np.float32): 1e-4, np.dtype(np.float16): 3e-2}


class Skip(Exception):
    """The generated model is not usable (onnxruntime refuses the original)."""


# ---------------------------------------------------------------- building blocks


class Gen:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        r = self.rng
        self.family = r.choice(["after", "after", "after", "before", "bn-chain"])
        self.dtype = np.dtype(r.choice([np.float32] * 6 + [np.float64, np.float16]))
        self.b = GraphBuilder(dtype=self.dtype, seed=r.randrange(2**31))
        self.np = np.random.default_rng(r.randrange(2**31))
        self.overrides: Dict[str, np.ndarray] = {}  # input name -> another value to feed
        self.ir4 = r.random() < 0.9
        self.n = 0

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    # -- constants in every form the rules read --------------------------------------
    def const(self, value: np.ndarray, float_value: bool = True, chain: bool = False) -> str:
        """A constant as an initializer or Constant node; ``chain``: also through a small
        constant subgraph (the rules evaluate those only for Mul/Add/Sub/Div operands).
        Now and then (float values) an initializer that a graph input of the same name
        overrides: the comparison feeds it other values."""
        r, b = self.rng, self.b
        value = np.asarray(value)
        kinds = ["init", "init", "const"]
        if chain:
            kinds += ["unsqueeze", "reshape", "flatten", "cast", "expand"]
        kind = "override" if r.random() < 0.04 else r.choice(kinds)
        name = self.name("k")
        if kind == "const":
            return b.const(name, value)
        if kind == "override" and self.ir4 and float_value:
            b.init(name, value)
            b.input(name, list(value.shape), value.dtype)
            self.overrides[name] = self.np.normal(0, 1, value.shape).astype(value.dtype)
            return name
        if kind == "unsqueeze" and value.ndim >= 1 and value.shape[0] == 1:
            src = b.init(name + "_src", value.reshape(value.shape[1:]))
            b.node("Unsqueeze", [src, b.init(name + "_ax", np.array([0], np.int64))], name, name + "_op")
            return name
        if kind == "reshape":
            src = b.init(name + "_src", value.reshape(-1))
            b.node("Reshape", [src, b.init(name + "_shape", np.array(value.shape, np.int64))], name, name + "_op")
            return name
        if kind == "flatten" and value.ndim == 2:
            src = b.init(name + "_src", value.reshape(value.shape[0], value.shape[1], 1))
            b.node("Flatten", [src], name, name + "_op", axis=1)
            return name
        if kind == "cast" and float_value:
            src = b.init(name + "_src", value.astype(np.float64 if value.dtype != np.float64 else np.float32))
            b.node("Cast", [src], name, name + "_op", to=helper.np_dtype_to_tensor_dtype(value.dtype))
            return name
        if kind == "expand" and value.ndim >= 1:
            src = b.init(name + "_src", value[(slice(0, 1),) * value.ndim] if value.size else value)
            if src and np.all(value == value[(slice(0, 1),) * value.ndim]):
                b.node("Expand", [src, b.init(name + "_shape", np.array(value.shape, np.int64))], name, name + "_op")
                return name
            b.initializers.pop()
        return b.init(name, value)

    def stats(self, c: int) -> Tuple[Dict[str, np.ndarray], float]:
        r, g = self.rng, self.np
        kind = r.choice(["normal", "normal", "tiny-var", "huge-var", "zero-gamma", "large-mean", "mixed"])
        small = self.dtype == np.float16
        scale = g.uniform(0.5, 1.5, c) * np.where(g.random(c) < 0.3, -1, 1)
        shift, mean, var = g.normal(0, 0.5, c), g.normal(0, 0.5, c), g.uniform(0.2, 2.0, c)
        eps = r.choice([1e-5, 1e-3] if small else [1e-5, 1e-3, 0.0])
        if kind in ("tiny-var", "mixed"):
            var = np.where(g.random(c) < 0.5, 10.0 ** g.uniform(-12, -6, c), var)
            eps = max(eps, 1e-5 if small else 1e-12)
        if kind in ("huge-var", "mixed"):
            var = np.where(g.random(c) < 0.5, 10.0 ** g.uniform(2, 4 if small else 12, c), var)
        if kind in ("zero-gamma", "mixed"):
            scale = np.where(g.random(c) < 0.5, 0.0, scale)
        if kind in ("large-mean", "mixed"):
            mean = mean + g.choice([-1, 1], c) * 10.0 ** g.uniform(1, 2 if small else 5, c)
        if eps == 0.0:
            var = np.maximum(var, 1e-6)
        return {k: v.astype(self.dtype) for k, v in (("scale", scale), ("B", shift), ("mean", mean), ("var", var))}, eps

    def bn(self, x: str, c: int) -> str:
        stats, eps = self.stats(c)
        name = self.name("bn")
        ins = [x] + [self.const(stats[k]) for k in ("scale", "B", "mean", "var")]
        self.b.node("BatchNormalization", ins, name + "_out", name, epsilon=eps)
        return name + "_out"

    def affine(self, x: str, shape: List[int], ch: Optional[int], first: bool) -> str:
        """Mul/Add/Sub/Div by a constant broadcasting against ``shape`` (mostly per channel).

        ``k / x`` (not affine: it must be refused) only as the ``first`` op after the linear
        op: later, it would amplify the harmless rounding differences of an earlier fold
        without bound (1/x near x = 0), and the comparison would flag an exact fold."""
        r = self.rng
        op = r.choice(["Mul", "Add", "Sub", "Div"])
        cshape = [1] * len(shape)
        style = r.random()
        if ch is not None and style < 0.7:
            cshape[ch] = shape[ch]
        elif style < 0.85:
            cshape = [d if r.random() < 0.3 else 1 for d in shape]
        else:
            cshape = [1]
        drop = r.randint(0, max(0, len(cshape) - 1)) if r.random() < 0.5 else 0
        while drop and cshape and cshape[0] == 1:
            cshape, drop = cshape[1:], drop - 1
        value = self.np.normal(0, 1, cshape)
        if op == "Div":
            value = np.where(np.abs(value) < 0.1, 0.5, value)
        value = value.astype(self.dtype)
        k = self.const(value, chain=True)
        ins = [x, k] if r.random() < 0.75 or (op == "Div" and not first) else [k, x]
        name = self.name(op.lower())
        self.b.node(op, ins, name + "_out", name)
        return name + "_out"

    # -- linear ops ---------------------------------------------------------------------
    def conv(self, x: str, shape: List[int], c_out: int, transpose: bool, padded: bool = True) -> Tuple[str, List[int]]:
        r = self.rng
        c_in, spatial = shape[1], shape[2:]
        groups = r.choice([g for g in (1, 2, 3, c_in) if c_in % g == 0 and c_out % g == 0])
        k = [r.choice([1, 2, 3]) for _ in spatial]
        s = [r.choice([1, 1, 2]) for _ in spatial]
        d = [r.choice([1, 1, 2]) for _ in spatial]
        attrs = {"kernel_shape": k, "strides": s, "dilations": d}
        if groups != 1:
            attrs["group"] = groups
        pads = [r.choice([0, 0, 1]) if padded else 0 for _ in range(2 * len(spatial))]
        if padded and r.random() < 0.2 and d == [1] * len(spatial):
            attrs["auto_pad"] = r.choice(["SAME_UPPER", "SAME_LOWER", "VALID"])
        elif any(pads):
            attrs["pads"] = pads
        if transpose:
            w = self.np.normal(0, 0.5, (c_in, c_out // groups, *k)).astype(self.dtype)
            op = "ConvTranspose"
            if "auto_pad" not in attrs and r.random() < 0.3:
                attrs["output_padding"] = [r.randrange(max(si, di)) for si, di in zip(s, d)]
        else:
            w = self.np.normal(0, 0.5, (c_out, c_in // groups, *k)).astype(self.dtype)
            op = "Conv"
        ins = [x, self.const(w)]
        if r.random() < 0.6:
            ins.append(self.const(self.np.normal(0, 0.5, c_out).astype(self.dtype)))
        name = self.name(op.lower())
        self.b.node(op, ins, name + "_out", name, **attrs)
        return name + "_out", None

    def gemm(self, x: str, shape: List[int], f_out: int) -> str:
        r = self.rng
        f_in = shape[1]
        trans_b = r.randint(0, 1)
        w = self.np.normal(0, 0.5, (f_out, f_in) if trans_b else (f_in, f_out)).astype(self.dtype)
        ins = [x, self.const(w)]
        bias = r.choice(["none", "vec", "row", "full", "scalar"])
        if bias != "none":
            cshape = {"vec": (f_out,), "row": (1, f_out), "full": (shape[0], f_out), "scalar": (1,)}[bias]
            ins.append(self.const(self.np.normal(0, 0.5, cshape).astype(self.dtype)))
        name = self.name("gemm")
        self.b.node("Gemm", ins, name + "_out", name, transB=trans_b,
                    alpha=r.choice([1.0, 0.5, -2.0]), beta=r.choice([1.0, 0.25, -1.0]))
        return name + "_out"

    def matmul(self, x: str, shape: List[int], f_out: int) -> str:
        r = self.rng
        w = self.np.normal(0, 0.5, (shape[-1], f_out)).astype(self.dtype)
        name = self.name("matmul")
        self.b.node("MatMul", [x, self.const(w)], name + "_out", name)
        out = name + "_out"
        if r.random() < 0.5:
            c = self.const(self.np.normal(0, 0.5, (f_out,)).astype(self.dtype))
            self.b.node("Add", [out, c] if r.random() < 0.7 else [c, out], name + "_biased", name + "_add")
            out = name + "_biased"
        return out

    # -- pass-through ops ---------------------------------------------------------------
    def passthrough(self, x: str, shape: List[int], ch: Optional[int]) -> Tuple[str, List[int], Optional[int]]:
        r, b = self.rng, self.b
        op = r.choice(["Identity", "Dropout", "Transpose", "Reshape", "Unsqueeze", "Squeeze", "Flatten"])
        name = self.name(op.lower())
        out = name + "_out"
        rank = len(shape)
        if op in ("Identity", "Dropout"):
            b.node(op, [x], out, name)
            return out, shape, ch
        if op == "Transpose":
            perm = list(range(rank))
            r.shuffle(perm)
            b.node(op, [x], out, name, perm=perm)
            return out, [shape[p] for p in perm], (perm.index(ch) if ch is not None else None)
        if op == "Unsqueeze":
            axis = r.randint(-rank - 1, rank)
            b.node(op, [x, self.const(np.array([axis], np.int64), float_value=False)], out, name)
            pos = axis % (rank + 1)
            new = shape[:pos] + [1] + shape[pos:]
            return out, new, (None if ch is None else ch + (1 if pos <= ch else 0))
        if op == "Squeeze":
            ones = [i for i, d in enumerate(shape) if d == 1]
            if not ones:
                b.node("Identity", [x], out, name)
                return out, shape, ch
            axis = r.choice(ones)
            b.node(op, [x, self.const(np.array([axis - rank if r.random() < 0.5 else axis], np.int64), float_value=False)], out, name)
            new = shape[:axis] + shape[axis + 1:]
            return out, new, (None if ch is None or ch == axis else ch - (1 if axis < ch else 0))
        if op == "Flatten":
            axis = r.randint(-rank, rank)
            b.node(op, [x], out, name, axis=axis)
            a = axis % rank if axis != rank else rank
            new = [int(np.prod(shape[:a])), int(np.prod(shape[a:]))]
            keeps = ch is not None and ((a == ch + 1 and all(d == 1 for d in shape[:ch])) or (a == ch and all(d == 1 for d in shape[ch + 1:])))
            return out, new, ((0 if a == ch + 1 else 1) if keeps else None)
        # Reshape: merge or split the dims after the channel, or something arbitrary
        total = int(np.prod(shape))
        if ch is not None and r.random() < 0.7:
            inner = int(np.prod(shape[ch + 1:]))
            target = shape[:ch + 1] + ([inner] if inner > 1 or r.random() < 0.5 else [])
            new_ch = ch
        else:
            target = [total] if r.random() < 0.5 else [1, total]
            new_ch = None
        spec = list(target)
        if r.random() < 0.3 and spec:
            spec[r.randrange(len(spec))] = -1
        b.node("Reshape", [x, self.const(np.array(spec, np.int64), float_value=False)], out, name)
        return out, target, new_ch

    # -- families -----------------------------------------------------------------------
    def linear(self, x: str, shape: List[int], spatial: bool) -> Tuple[str, List[int], Optional[int]]:
        r = self.rng
        c_out = r.randint(1, 4) * r.choice([1, 2, 3])
        if spatial:
            out, _ = self.conv(x, shape, c_out, transpose=r.random() < 0.4)
            return out, None, 1
        if r.random() < 0.5 and len(shape) == 2:
            return self.gemm(x, shape, c_out), [shape[0], c_out], 1
        out = self.matmul(x, shape, c_out)
        return out, shape[:-1] + [c_out], len(shape) - 1

    def build(self) -> onnx.ModelProto:
        r, b = self.rng, self.b
        fam = self.family
        kind = r.choice(["conv", "conv", "dense", "dense3"]) if self.dtype != np.float64 else r.choice(["dense", "dense3"])
        batch = r.randint(1, 3)
        c = r.randint(1, 4) * r.choice([1, 2, 3])
        if kind == "conv":
            shape = [batch, c] + [r.randint(2, 6) for _ in range(r.choice([1, 2]))]
        elif kind == "dense":
            shape = [batch, c]
        else:
            shape = [batch, r.randint(1, 3), c]
        x = b.input("x", shape)
        outs = []
        if fam == "before":
            y = self.bn(x, shape[1])
            if kind == "conv":
                if r.random() < 0.5:
                    name = self.name("flatten")
                    b.node("Flatten", [y], name + "_out", name, axis=r.choice([1, 1, -len(shape) + 1, 2]))
                    flat = [shape[0], int(np.prod(shape[1:]))] if True else None
                    y = self.gemm(name + "_out", flat, r.randint(1, 5)) if r.random() < 0.5 else self.matmul(name + "_out", flat, r.randint(1, 5))
                else:
                    y, _ = self.conv(y, shape, r.randint(1, 4) * r.choice([1, 2]), transpose=False, padded=r.random() < 0.3)
            elif kind == "dense":
                y = self.gemm(y, shape, r.randint(1, 5)) if r.random() < 0.5 else self.matmul(y, shape, r.randint(1, 5))
            else:
                y = self.matmul(y, shape, r.randint(1, 5))
            outs.append(y)
        else:
            if fam == "after" or r.random() < 0.5:
                y, out_shape, ch = self.linear(x, shape, kind == "conv")
                if out_shape is None:  # a conv: let onnx tell the shape
                    out_shape = self.infer(y)
            else:
                y, out_shape, ch = x, shape, 1
            if fam == "after":
                for _ in range(r.choice([0, 0, 1, 2])):
                    y, out_shape, ch = self.passthrough(y, out_shape, ch)
            if r.random() < 0.1:
                outs.append(y)  # the linear op's (or pass-through's) output is tapped
            for step in range(r.randint(1, 3)):
                if r.random() < 0.5 and len(out_shape) >= 2:
                    y = self.bn(y, out_shape[1])
                    ch_now = 1
                else:
                    y = self.affine(y, out_shape, ch, first=step == 0)
                    ch_now = ch
                ch = ch_now if ch == ch_now else ch
            if r.random() < 0.3:
                name = self.name("relu")
                b.node("Relu", [y], name + "_out", name)
                y = name + "_out"
            outs.append(y)
        for o in outs[::-1]:
            b.output(o)
        opset = r.choice([13, 15, 17, 18, 21])
        return b.model(check=False, opset=opset, ir_version=None if self.ir4 else 3)

    def infer(self, name: str) -> List[int]:
        model = self.b.model(check=False)
        model.graph.output.append(helper.make_empty_tensor_value_info(name))
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        except Exception as exc:
            raise Skip(f"shape inference: {exc}") from None
        for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
            if vi.name == name and vi.type.tensor_type.HasField("shape"):
                dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
                if all(d > 0 for d in dims):
                    return dims
        raise Skip("conv output shape unknown or empty")


def build_case(seed: int) -> Tuple[onnx.ModelProto, Dict[str, np.ndarray], np.dtype]:
    g = Gen(seed)
    model = g.build()
    return model, g.overrides, g.dtype


# ---------------------------------------------------------------- the oracle


def check_case(seed: int) -> str:
    """Build, fold and compare one case; return a short outcome. AssertionError on a wrong
    result or a BN neither folded nor explained; Skip when the generated model does not run."""
    model, overrides, dtype = build_case(seed)
    feed_sets = []
    for trial in range(2):
        feeds = random_feeds(model, seed=trial)
        if trial == 1:
            feeds.update(overrides)  # overridable constants fed with other values
        feed_sets.append(feeds)
    try:
        refs = [run_model(model, f) for f in feed_sets]
    except Exception as exc:
        raise Skip(f"onnxruntime refuses the original: {str(exc).splitlines()[0][:120]}") from None
    folded, report = fold_onnx(model)  # a valid model: any exception here is a bug
    bns = [n.name for n in model.graph.node if n.op_type == "BatchNormalization"]
    done = {f.bn for f in report.folded}
    left = {s.bn: s for s in report.skipped}
    for bn in bns:
        assert (bn in done) != (bn in left), f"BN {bn}: neither folded nor explained (or both)"
        if bn in left:
            assert left[bn].reason and left[bn].detail, f"BN {bn}: left without a reason"
    tol = TOLERANCE[np.dtype(dtype)]
    for feeds, ref in zip(feed_sets, refs):
        if not all(np.all(np.isfinite(v.astype(np.float64))) for v in ref.values()):
            continue  # the original overflows its own dtype: nothing exact to compare
        compare_outputs(ref, run_model(folded, feeds), tol)
    affine = len(report.extra.get("affine_folded", []))
    return f"folded {len(done) + affine} left {len(left)}"


def _seeds(n: int) -> List[int]:
    if FRESH:
        rng = random.Random()
        return [rng.randrange(2**62) for _ in range(n)]
    return list(range(n))


def test_random_valid_graphs_fold_exactly_or_are_left() -> None:
    folded = skipped = 0
    for seed in _seeds(EXAMPLES):
        try:
            outcome = check_case(seed)
        except Skip:
            skipped += 1
            continue
        except AssertionError as exc:
            pytest.fail(f"seed {seed}: {exc}")
        except Exception as exc:  # noqa: BLE001 -- the fold raised on a valid model
            pytest.fail(f"seed {seed}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        folded += not outcome.startswith("folded 0")
    # the generator must mostly make runnable models, and many must actually fold
    assert skipped < EXAMPLES // 4, f"{skipped} of {EXAMPLES} generated models were unusable"
    assert folded > EXAMPLES // 4, f"only {folded} of {EXAMPLES} models folded anything"


def test_the_oracle_catches_a_wrong_fold(monkeypatch) -> None:
    """Sabotage the conv fold (one channel's scale off by 1 %): some early case must fail."""
    sabotage_conv_fold(monkeypatch)
    for seed in range(200):
        try:
            check_case(seed)
        except AssertionError:
            return
        except Skip:
            continue
    pytest.fail("the oracle never noticed a wrong fold")


# ---------------------------------------------------------------- a long campaign


def campaign(n: int, save: Optional[str], first: int = 0) -> int:
    counts: Dict[str, int] = {}
    failures: List[Tuple[int, str]] = []
    for seed in range(first, first + n):
        try:
            outcome = "folded" if not check_case(seed).startswith("folded 0") else "nothing folded"
        except Skip:
            outcome = "skipped"
        except AssertionError as exc:
            outcome = "WRONG"
            failures.append((seed, f"wrong: {exc}"))
        except Exception as exc:  # noqa: BLE001
            outcome = "CRASH"
            failures.append((seed, f"crash: {type(exc).__name__}: {exc}"))
        counts[outcome] = counts.get(outcome, 0) + 1
    print(f"{n} models (seeds {first}..{first + n - 1}): " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for seed, text in failures:
        print(f"seed {seed}: {text.splitlines()[0][:300]}")
        if save:
            os.makedirs(save, exist_ok=True)
            model, overrides, _ = build_case(seed)
            onnx.save(model, os.path.join(save, f"semantic-{seed}.onnx"))
    return len(failures)


if __name__ == "__main__":
    args = sys.argv[1:]
    save_dir = args[args.index("--save") + 1] if "--save" in args else None
    start = int(args[args.index("--first") + 1]) if "--first" in args else 0
    count = int(args[0]) if args and args[0].isdigit() else 500
    sys.exit(1 if campaign(count, save_dir, start) else 0)

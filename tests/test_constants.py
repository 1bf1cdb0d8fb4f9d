"""The constant resolver (bnfold.onnx_pass.constants) against onnxruntime.

Each case is a small graph with no inputs whose output ``y`` is computed from constants.
onnxruntime runs it at ``ORT_DISABLE_ALL`` (so it evaluates every op itself, no constant
folding), and the resolver must give the same values bit for bit, with the same dtype and
shape. Where onnxruntime refuses to run a graph, the resolver must refuse too: it must never
produce a value for something the model cannot compute.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.affine import Refusal
from bnfold.onnx_pass.constants import (
    FOREIGN_DOMAIN,
    INVALID,
    NONDETERMINISTIC,
    NOT_CONSTANT,
    OVERRIDABLE,
    TOO_LARGE,
    UNREADABLE,
    UNSUPPORTED_OP,
    ConstantResolver,
    Limits,
)

RNG = np.random.default_rng(1234)


def graph_of(nodes, inits, outputs=("y",), inputs=()):
    init = [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()]
    return helper.make_graph(
        nodes, "g", list(inputs), [helper.make_value_info(o, onnx.TypeProto()) for o in outputs], init
    )


def ort_value(nodes, inits, opset=17, out="y"):
    """``out`` computed by onnxruntime (ORT_DISABLE_ALL), or None when it will not run the graph."""
    g = graph_of(nodes, inits, outputs=(out,))
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        types = {v.name: v.type for v in inferred.graph.value_info}
        types.update({o.name: o.type for o in inferred.graph.output})
        if not types.get(out) or not types[out].tensor_type.elem_type:
            return None
        model.graph.output[0].type.CopyFrom(types[out])
        model.graph.output[0].type.tensor_type.ClearField("shape")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.log_severity_level = 4
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return sess.run(None, {})[0]
    except Exception:
        return None


def resolve(nodes, inits, opset=17, out="y", **kw):
    return ConstantResolver(graph_of(nodes, inits, outputs=(out,)), opset=opset, **kw).value(out)


def assert_same(got, want):
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_array_equal(got, want)  # NaN equals NaN here


def check_vs_ort(nodes, inits, opset=17):
    """Both agree, or both refuse; returns True when onnxruntime ran the graph."""
    want = ort_value(nodes, inits, opset)
    if want is None:
        with pytest.raises(Refusal) as info:
            resolve(nodes, inits, opset)
        assert info.value.reason in (INVALID, UNSUPPORTED_OP), info.value
        return False
    assert_same(resolve(nodes, inits, opset), want)
    return True


N = helper.make_node
f32 = np.float32
W4 = np.arange(1, 5, dtype=f32)
W234 = RNG.standard_normal((2, 3, 4)).astype(f32)
I64 = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731

# (id, nodes, initializers, opset): onnxruntime must run each of these.
VALID = [
    ("identity", [N("Identity", ["w"], ["y"])], {"w": W4}, 17),
    ("cast-f16", [N("Cast", ["w"], ["y"], to=TensorProto.FLOAT16)], {"w": W234 * 1000}, 17),
    ("cast-int", [N("Cast", ["w"], ["y"], to=TensorProto.INT32)], {"w": W234 * 10}, 17),
    ("cast-bool", [N("Cast", ["w"], ["y"], to=TensorProto.BOOL)], {"w": np.array([0.0, -0.0, 2.0, np.nan], f32)}, 17),
    ("cast-f64", [N("Cast", ["w"], ["y"], to=TensorProto.DOUBLE)], {"w": W234}, 17),
    ("transpose", [N("Transpose", ["w"], ["y"], perm=[2, 0, 1])], {"w": W234}, 17),
    ("transpose-default", [N("Transpose", ["w"], ["y"])], {"w": W234}, 17),
    ("tf2onnx-depthwise", [N("Transpose", ["w"], ["t"], perm=[2, 3, 0, 1]), N("Reshape", ["t", "s"], ["y"])],
     {"w": RNG.standard_normal((3, 3, 8, 1)).astype(f32), "s": I64(8, 1, 3, 3)}, 17),
    ("flatten-1d", [N("Flatten", ["w"], ["y"], axis=1)], {"w": W4}, 17),  # issue 12: [4] -> [4, 1]
    ("flatten-1d-axis0", [N("Flatten", ["w"], ["y"], axis=0)], {"w": W4}, 17),
    ("flatten-neg", [N("Flatten", ["w"], ["y"], axis=-1)], {"w": W234}, 17),
    ("flatten-axis-rank", [N("Flatten", ["w"], ["y"], axis=3)], {"w": W234}, 17),
    ("reshape-0", [N("Reshape", ["w", "s"], ["y"])], {"w": W234, "s": I64(0, -1)}, 17),
    ("reshape-allowzero", [N("Reshape", ["w", "s"], ["y"], allowzero=1)], {"w": np.zeros((0, 3), f32), "s": I64(3, 0)}, 17),
    ("reshape-scalar", [N("Reshape", ["w", "s"], ["y"])], {"w": np.array([5.0], f32), "s": np.zeros(0, np.int64)}, 17),
    ("unsqueeze-input", [N("Unsqueeze", ["w", "a"], ["y"])], {"w": W4, "a": I64(0, -1)}, 17),
    ("unsqueeze-attr", [N("Unsqueeze", ["w"], ["y"], axes=[0, 2])], {"w": W4}, 11),
    ("unsqueeze-0d-axes", [N("Unsqueeze", ["w", "a"], ["y"])], {"w": W4, "a": np.array(1, np.int64)}, 17),
    ("unsqueeze-scalar", [N("Unsqueeze", ["w", "a"], ["y"])], {"w": np.array(3.0, f32), "a": I64(0)}, 17),
    ("squeeze-all", [N("Squeeze", ["w"], ["y"])], {"w": np.ones((1, 4, 1), f32)}, 17),
    ("squeeze-axes", [N("Squeeze", ["w", "a"], ["y"])], {"w": np.ones((1, 4, 1), f32), "a": I64(-1)}, 17),
    ("squeeze-attr", [N("Squeeze", ["w"], ["y"], axes=[0])], {"w": np.ones((1, 4, 1), f32)}, 11),
    ("squeeze-scalar", [N("Squeeze", ["w"], ["y"])], {"w": np.array(2.0, f32)}, 17),
    ("squeeze-empty-axes", [N("Squeeze", ["w", "a"], ["y"])], {"w": np.ones((1, 3, 1), f32), "a": np.zeros(0, np.int64)}, 17),
    ("expand-0d-shape", [N("Expand", ["w", "s"], ["y"])], {"w": W4[:1], "s": np.array(3, np.int64)}, 17),
    ("cast-wrap-int", [N("Cast", ["w"], ["y"], to=TensorProto.INT8)], {"w": I64(300, -200)}, 17),
    ("cast-f16-overflow", [N("Cast", ["w"], ["y"], to=TensorProto.FLOAT16)], {"w": np.array([1e6, 65519.0, 65520.0])}, 17),
    ("div-f16", [N("Div", ["a", "b"], ["y"])], {"a": np.array([1, 2, 3], np.float16), "b": np.array([3, 7, 11], np.float16)}, 17),
    ("sqrt-reciprocal-f16", [N("Sqrt", ["a"], ["t"]), N("Reciprocal", ["t"], ["y"])], {"a": np.array([2, 3, 5], np.float16)}, 17),
    ("mul-int32-wraps", [N("Mul", ["a", "b"], ["y"])], {"a": np.array([2**30], np.int32), "b": np.array([4], np.int32)}, 17),
    ("pow-f64", [N("Pow", ["a", "b"], ["y"])], {"a": RNG.uniform(0.1, 10, 20), "b": RNG.uniform(-3, 3, 20)}, 17),
    ("range-float-long", [N("Range", ["a", "b", "c"], ["y"])],
     {"a": np.array(-3.3, f32), "b": np.array(100.1, f32), "c": np.array(0.7, f32)}, 17),
    ("squeeze-repeated-axis", [N("Squeeze", ["w", "a"], ["y"])], {"w": np.ones((1, 3), f32), "a": I64(0, -2)}, 17),
    ("squeeze-scalar-axes-none", [N("Squeeze", ["w"], ["y"])], {"w": np.ones((1, 1), f32)}, 17),
    ("concat", [N("Concat", ["a", "b"], ["y"], axis=-1)], {"a": W234, "b": W234[..., :2]}, 17),
    ("concat-ints", [N("Concat", ["a", "b"], ["y"], axis=0)], {"a": I64(1, 2), "b": I64(3)}, 17),
    ("expand", [N("Expand", ["w", "s"], ["y"])], {"w": W4.reshape(4, 1), "s": I64(2, 1, 3)}, 17),
    ("expand-smaller-shape", [N("Expand", ["w", "s"], ["y"])], {"w": W234, "s": I64(1, 1)}, 17),
    ("tile", [N("Tile", ["w", "r"], ["y"])], {"w": W234, "r": I64(2, 1, 3)}, 17),
    ("constantofshape", [N("ConstantOfShape", ["s"], ["y"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.25]))],
     {"s": I64(2, 3)}, 17),
    ("constantofshape-default", [N("ConstantOfShape", ["s"], ["y"])], {"s": I64(3)}, 17),
    ("constantofshape-scalar", [N("ConstantOfShape", ["s"], ["y"], value=helper.make_tensor("v", TensorProto.INT64, [1], [7]))],
     {"s": np.zeros(0, np.int64)}, 17),
    ("shape", [N("Shape", ["w"], ["y"])], {"w": W234}, 17),
    ("shape-start-end", [N("Shape", ["w"], ["y"], start=-2, end=10)], {"w": W234}, 17),
    ("size", [N("Size", ["w"], ["y"])], {"w": W234}, 17),
    ("gather", [N("Gather", ["w", "i"], ["y"], axis=1)], {"w": W234, "i": I64(2, -1, 0)}, 17),
    ("gather-scalar-index", [N("Gather", ["w", "i"], ["y"], axis=-1)], {"w": W234, "i": np.array(-2, np.int64)}, 17),
    ("gather-2d-index", [N("Gather", ["w", "i"], ["y"])], {"w": W4, "i": np.array([[0, 1], [3, 3]], np.int32)}, 17),
    ("slice", [N("Slice", ["w", "s", "e"], ["y"])], {"w": W234, "s": I64(1), "e": I64(100)}, 17),
    ("slice-axes-steps", [N("Slice", ["w", "s", "e", "a", "t"], ["y"])],
     {"w": W234, "s": I64(-1, 0), "e": I64(-100, 3), "a": I64(2, 1), "t": I64(-2, 2)}, 17),
    ("slice-neg-step-max", [N("Slice", ["w", "s", "e", "a", "t"], ["y"])],
     {"w": W4, "s": I64(2**62), "e": I64(-(2**62)), "a": I64(0), "t": I64(-1)}, 17),
    ("slice-empty", [N("Slice", ["w", "s", "e"], ["y"])], {"w": W4, "s": I64(3), "e": I64(1)}, 17),
    ("slice-opset9", [N("Slice", ["w"], ["y"], starts=[0, 1], ends=[1, 1000], axes=[0, 2])], {"w": W234}, 9),
    ("range-int", [N("Range", ["a", "b", "c"], ["y"])],
     {"a": np.array(2, np.int64), "b": np.array(-7, np.int64), "c": np.array(-3, np.int64)}, 17),
    ("range-float", [N("Range", ["a", "b", "c"], ["y"])],
     {"a": np.array(0.1, f32), "b": np.array(7.3, f32), "c": np.array(0.3, f32)}, 17),
    ("range-empty", [N("Range", ["a", "b", "c"], ["y"])],
     {"a": np.array(5, np.int32), "b": np.array(1, np.int32), "c": np.array(1, np.int32)}, 17),
    ("add-broadcast", [N("Add", ["a", "b"], ["y"])], {"a": W234, "b": W4}, 17),
    ("sub", [N("Sub", ["a", "b"], ["y"])], {"a": W234, "b": W234[:1]}, 17),
    ("mul-f16", [N("Mul", ["a", "b"], ["y"])], {"a": W234.astype(np.float16), "b": W4.astype(np.float16)}, 17),
    ("div", [N("Div", ["a", "b"], ["y"])], {"a": W234, "b": np.array([0.0, 3.0, -7.0, 1e-30], f32)}, 17),
    ("div-int-trunc", [N("Div", ["a", "b"], ["y"])], {"a": I64(7, -7, 7, -7), "b": I64(2, 2, -2, -2)}, 17),
    ("div-int32", [N("Div", ["a", "b"], ["y"])], {"a": np.array([9, -9], np.int32), "b": np.array([4, 4], np.int32)}, 17),
    ("sqrt", [N("Sqrt", ["w"], ["y"])], {"w": np.array([4.0, 2.0, -1.0, 0.0], f32)}, 17),
    ("reciprocal", [N("Reciprocal", ["w"], ["y"])], {"w": np.array([4.0, 3.0, 0.0, -0.0], f32)}, 17),
    ("neg-abs", [N("Neg", ["w"], ["t"]), N("Abs", ["t"], ["y"])], {"w": W234}, 17),
    ("neg-int", [N("Neg", ["w"], ["y"])], {"w": I64(3, -4)}, 17),
    ("pow-int-exp", [N("Pow", ["a", "b"], ["y"])], {"a": W4, "b": np.array(2, np.int64)}, 17),
    ("pow-f16", [N("Pow", ["a", "b"], ["y"])], {"a": W4.astype(np.float16), "b": np.array(0.5, np.float16)}, 17),
    ("bn-scale-chain", [N("Add", ["v", "e"], ["t"]), N("Sqrt", ["t"], ["s"]), N("Div", ["g", "s"], ["y"])],
     {"v": np.abs(W4), "e": np.array(1e-5, f32), "g": W4[::-1].copy()}, 17),
    ("dropout-inference", [N("Dropout", ["w"], ["y"])], {"w": W4}, 17),
    ("constant-value-floats", [N("Constant", [], ["c"], value_floats=[1.5, 2.5]), N("Identity", ["c"], ["y"])], {}, 17),
    ("constant-value-int", [N("Constant", [], ["c"], value_int=3), N("Unsqueeze", ["w", "c"], ["y"])],
     {"w": W234}, 17),
    ("constant-value-float", [N("Constant", [], ["y"], value_float=0.5)], {}, 17),
    ("torch-shape-gather-concat", [N("Shape", ["w"], ["sh"]), N("Gather", ["sh", "i"], ["d"]),
     N("Unsqueeze", ["d", "z"], ["du"]), N("Concat", ["du", "m"], ["s"], axis=0), N("Reshape", ["w", "s"], ["y"])],
     {"w": W234, "i": np.array(0, np.int64), "z": I64(0), "m": I64(-1)}, 17),
    # others: handed to onnx's reference evaluator
    ("ref-where", [N("Greater", ["a", "z"], ["c"]), N("Where", ["c", "a", "z"], ["y"])],
     {"a": W234, "z": np.array(0.0, f32)}, 17),
    ("ref-reducesum", [N("ReduceSum", ["a", "ax"], ["y"], keepdims=0)], {"a": W234, "ax": I64(1)}, 17),
    ("ref-clip", [N("Clip", ["a", "lo", "hi"], ["y"])],
     {"a": W234, "lo": np.array(-0.5, f32), "hi": np.array(0.5, f32)}, 17),
]


@pytest.mark.parametrize("nodes,inits,opset", [c[1:] for c in VALID], ids=[c[0] for c in VALID])
def test_value_matches_onnxruntime(nodes, inits, opset):
    assert check_vs_ort(nodes, inits, opset), "onnxruntime was expected to run this graph"


# Graphs onnxruntime refuses to run: the resolver must refuse them too, never crash.
INVALID_CASES = [
    ("reshape-inf-target", [N("Reshape", ["w", "s"], ["y"])], {"w": W4, "s": np.array([np.inf], f32)}),
    ("reshape-two-minus-one", [N("Reshape", ["w", "s"], ["y"])], {"w": W234, "s": I64(-1, -1)}),
    ("reshape-bad-count", [N("Reshape", ["w", "s"], ["y"])], {"w": W234, "s": I64(5, 5)}),
    ("reshape-zero-past-rank", [N("Reshape", ["w", "s"], ["y"])], {"w": W4, "s": I64(0, 0, 4)}),
    ("squeeze-non-one", [N("Squeeze", ["w", "a"], ["y"])], {"w": W234, "a": I64(0)}),
    ("unsqueeze-2d-axes", [N("Unsqueeze", ["w", "a"], ["y"])], {"w": W4, "a": np.array([[0]], np.int64)}),
    ("unsqueeze-dup", [N("Unsqueeze", ["w", "a"], ["y"])], {"w": W4, "a": I64(0, 0)}),
    ("gather-out-of-range", [N("Gather", ["w", "i"], ["y"])], {"w": W4, "i": I64(4)}),
    ("transpose-bad-perm", [N("Transpose", ["w"], ["y"], perm=[0, 0, 1])], {"w": W234}),
    ("concat-rank", [N("Concat", ["a", "b"], ["y"], axis=0)], {"a": W234, "b": W4}),
    ("expand-bad", [N("Expand", ["w", "s"], ["y"])], {"w": W4, "s": I64(3)}),
    ("add-bad-broadcast", [N("Add", ["a", "b"], ["y"])], {"a": W234, "b": np.ones(3, f32)}),
    ("slice-step-0", [N("Slice", ["w", "s", "e", "a", "t"], ["y"])],
     {"w": W4, "s": I64(0), "e": I64(2), "a": I64(0), "t": I64(0)}),
    ("tile-wrong-length", [N("Tile", ["w", "r"], ["y"])], {"w": W234, "r": I64(2)}),
    ("flatten-axis-too-big", [N("Flatten", ["w"], ["y"], axis=2)], {"w": W4}),
    ("tile-0d-repeats", [N("Tile", ["w", "r"], ["y"])], {"w": W4, "r": np.array(2, np.int64)}),
    ("constantofshape-0d", [N("ConstantOfShape", ["s"], ["y"])], {"s": np.array(3, np.int64)}),
    ("reshape-0d-target", [N("Reshape", ["w", "s"], ["y"])], {"w": np.ones(1, f32), "s": np.array(1, np.int64)}),
    ("slice-0d-starts", [N("Slice", ["w", "s", "e"], ["y"])], {"w": W4, "s": np.array(1, np.int64), "e": np.array(3, np.int64)}),
    ("range-1d", [N("Range", ["a", "b", "c"], ["y"])], {"a": I64(0), "b": I64(5), "c": I64(1)}),
    ("dropout-1d-training-mode", [N("Dropout", ["w", "r", "t"], ["y"])],
     {"w": W4, "r": np.array(0.5, f32), "t": np.array([False])}),
]


@pytest.mark.parametrize("nodes,inits", [c[1:] for c in INVALID_CASES], ids=[c[0] for c in INVALID_CASES])
def test_invalid_graphs_are_refused(nodes, inits):
    assert ort_value(nodes, inits) is None, "onnxruntime was expected to refuse this graph"
    with pytest.raises(Refusal) as info:
        resolve(nodes, inits)
    assert info.value.reason in (INVALID, UNSUPPORTED_OP)


def _random_case(rng):
    """A random layout op with random (often invalid) parameters on a random constant."""
    rank = int(rng.integers(0, 4))
    shape = tuple(int(d) for d in rng.integers(0, 4, size=rank))
    w = rng.standard_normal(shape).astype(f32)
    op = rng.choice(["Slice", "Gather", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose", "Expand", "Concat", "Tile"])
    def ints(n, lo=-4, hi=5):  # now and then a 0-D tensor where one value is asked for
        v = rng.integers(lo, hi, size=n).astype(np.int64)
        return v.reshape(()) if n == 1 and rng.random() < 0.15 else v

    inits = {"w": w}
    if op == "Slice":
        n = int(rng.integers(1, max(rank, 1) + 1))
        inits.update(s=ints(n, -6, 7), e=ints(n, -6, 7), a=ints(n, -rank - 1, rank + 1), t=ints(n, -3, 4))
        return [N("Slice", ["w", "s", "e", "a", "t"], ["y"])], inits
    if op == "Gather":
        inits["i"] = ints(int(rng.integers(0, 3)), -4, 4).reshape(-1)
        return [N("Gather", ["w", "i"], ["y"], axis=int(rng.integers(-rank - 1, rank + 1)))], inits
    if op == "Reshape":
        inits["s"] = ints(int(rng.integers(0, 4)), -1, 5)
        return [N("Reshape", ["w", "s"], ["y"], allowzero=int(rng.integers(0, 2)))], inits
    if op in ("Squeeze", "Unsqueeze"):
        inits["a"] = ints(int(rng.integers(1, 3)), -4, 4)
        return [N(op, ["w", "a"], ["y"])], inits
    if op == "Flatten":
        return [N("Flatten", ["w"], ["y"], axis=int(rng.integers(-rank - 1, rank + 2)))], inits
    if op == "Transpose":
        perm = [int(p) for p in rng.permutation(rank)]
        return [N("Transpose", ["w"], ["y"], **({"perm": perm} if perm else {}))], inits
    if op == "Expand":
        inits["s"] = ints(int(rng.integers(0, 4)), 0, 4)
        return [N("Expand", ["w", "s"], ["y"])], inits
    if op == "Tile":
        inits["r"] = ints(rank, 0, 3)
        return [N("Tile", ["w", "r"], ["y"])], inits
    inits["v"] = w.copy()
    return [N("Concat", ["w", "v"], ["y"], axis=int(rng.integers(-rank - 1, rank + 1)))], inits


def test_random_layout_ops_match_onnxruntime():
    rng = np.random.default_rng(7)
    ran = 0
    for _ in range(250):
        nodes, inits = _random_case(rng)
        ran += check_vs_ort(nodes, inits)
    assert ran > 100  # most random cases are valid, so the comparison is not vacuous


_TYPES = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16, np.float64: TensorProto.DOUBLE,
          np.int32: TensorProto.INT32, np.int64: TensorProto.INT64, np.int8: TensorProto.INT8, np.uint8: TensorProto.UINT8}


def _random_value_case(rng):
    """A random arithmetic op, Cast, Range or ConstantOfShape on random types and shapes."""
    dtype = list(_TYPES)[int(rng.integers(len(_TYPES)))]

    def tensor(shape):
        v = rng.standard_normal(shape) * 4
        if np.dtype(dtype).kind in "iu":
            v = np.where(np.abs(v) < 1, 3, v)  # no zero divisors
            v = np.abs(v) if np.dtype(dtype).kind == "u" else v
        return v.astype(dtype)

    shape = tuple(int(d) for d in rng.integers(1, 4, size=int(rng.integers(0, 3))))
    other = tuple(d if rng.random() < 0.7 else int(rng.integers(1, 3)) for d in shape[int(rng.integers(0, len(shape) + 1)):])
    op = rng.choice(["Add", "Sub", "Mul", "Div", "Pow", "Neg", "Abs", "Sqrt", "Reciprocal", "Cast", "Range", "ConstantOfShape"])
    if op in ("Add", "Sub", "Mul", "Div", "Pow"):
        return [N(op, ["a", "b"], ["y"])], {"a": tensor(shape), "b": tensor(other)}
    if op in ("Neg", "Abs", "Sqrt", "Reciprocal"):
        return [N(op, ["a"], ["y"])], {"a": tensor(shape)}
    if op == "Cast":
        to = list(_TYPES.values())[int(rng.integers(len(_TYPES)))]
        return [N("Cast", ["a"], ["y"], to=to)], {"a": tensor(shape) / 8}
    if op == "Range":
        a, b, c = (tensor(()) for _ in range(3))
        return [N("Range", ["a", "b", "c"], ["y"])], {"a": a, "b": (b * 8).astype(dtype), "c": c}
    fill = helper.make_tensor("v", _TYPES[dtype], [1], tensor((1,)).astype(dtype).tolist())
    return [N("ConstantOfShape", ["s"], ["y"], value=fill)], {"s": np.array(shape, np.int64)}


def test_random_value_ops_match_onnxruntime():
    rng = np.random.default_rng(11)
    ran = 0
    for _ in range(250):
        nodes, inits = _random_value_case(rng)
        want = ort_value(nodes, inits)
        try:
            got = resolve(nodes, inits)
        except Refusal as r:
            # refused where onnxruntime computes: only where C++ leaves the result undefined or
            # the resolver declines an op form (integer Pow, a float out of an int's range)
            assert want is None or (r.reason == INVALID and nodes[0].op_type in ("Cast", "Pow")), (nodes, inits, r)
            continue
        assert want is not None, (nodes, inits)
        if nodes[0].op_type == "Pow" and want.dtype.kind == "f":  # libm pow may differ in the last bit
            np.testing.assert_allclose(got, want, rtol=2 * np.finfo(want.dtype).eps)
            assert got.dtype == want.dtype and got.shape == want.shape
        else:
            assert_same(got, want)
        ran += 1
    assert ran > 120


# ------------------------------------------------------------------------- refusals


def refusal(graph, name="y", **kw):
    with pytest.raises(Refusal) as info:
        ConstantResolver(graph, **kw).value(name, "conv bias")
    return info.value


def test_graph_input_is_not_constant():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    g = graph_of([N("Identity", ["x"], ["t"]), N("Mul", ["t", "w"], ["y"])], {"w": W4}, inputs=[x])
    r = refusal(g)
    assert r.reason == NOT_CONSTANT and "'x'" in r.detail and r.detail.startswith("conv bias 'y'")


def test_overridable_initializer_is_refused_from_ir4_only():
    w_in = helper.make_tensor_value_info("w", TensorProto.FLOAT, [4])
    g = graph_of([N("Identity", ["w"], ["y"])], {"w": W4}, inputs=[w_in])
    assert refusal(g, ir_version=4).reason == OVERRIDABLE
    np.testing.assert_array_equal(ConstantResolver(g, ir_version=3).value("y"), W4)  # Caffe2-style IR 3


def test_explicit_overridable_names():
    g = graph_of([N("Identity", ["w"], ["y"])], {"w": W4})
    assert refusal(g, overridable={"w"}).reason == OVERRIDABLE


def test_random_op_is_refused():
    g = graph_of([N("RandomNormal", [], ["r"], shape=[4]), N("Add", ["r", "w"], ["y"])], {"w": W4})
    assert refusal(g).reason == NONDETERMINISTIC


def test_dropout_in_training_mode_is_refused():
    g = graph_of([N("Dropout", ["w", "", "t"], ["y"])], {"w": W4, "t": np.array(True)})
    assert refusal(g).reason == NONDETERMINISTIC


def test_foreign_domain_is_refused():
    g = graph_of([N("Identity", ["w"], ["y"], domain="com.example")], {"w": W4})
    assert refusal(g).reason == FOREIGN_DOMAIN


def test_control_flow_is_refused():
    then = helper.make_graph([N("Identity", ["w"], ["o"])], "t", [], [helper.make_value_info("o", onnx.TypeProto())])
    g = graph_of([N("If", ["c"], ["y"], then_branch=then, else_branch=then)], {"w": W4, "c": np.array(True)})
    assert refusal(g).reason == UNSUPPORTED_OP


def test_fallback_can_be_turned_off():
    g = graph_of([N("ReduceSum", ["w"], ["y"])], {"w": W4})
    assert refusal(g, limits=Limits(reference_fallback=False)).reason == UNSUPPORTED_OP


def test_size_limit_is_checked_before_allocating():
    g = graph_of([N("ConstantOfShape", ["s"], ["y"])], {"s": I64(1 << 20, 1 << 20, 1 << 20)})
    assert refusal(g).reason == TOO_LARGE
    g = graph_of([N("Expand", ["w", "s"], ["y"])], {"w": W4, "s": I64(1 << 40, 4)})
    assert refusal(g).reason == TOO_LARGE
    g = graph_of([N("Tile", ["w", "r"], ["y"])], {"w": W4, "r": I64(100)})
    assert refusal(g, limits=Limits(max_elements=64)).reason == TOO_LARGE


def test_reference_fallback_is_bounded():
    g = graph_of([N("MatMul", ["w", "w"], ["y"])], {"w": np.ones((64, 64), f32)})
    assert refusal(g, limits=Limits(max_fallback_elements=1000)).reason == TOO_LARGE
    np.testing.assert_array_equal(ConstantResolver(g).value("y"), np.full((64, 64), 64, f32))


def test_total_budget_is_shared_by_one_resolver():
    g = graph_of([N("Neg", ["w"], ["a"]), N("Abs", ["w"], ["b"])], {"w": np.ones(60, f32)}, outputs=("a", "b"))
    res = ConstantResolver(g, limits=Limits(max_total_elements=100))
    res.value("a")
    with pytest.raises(Refusal) as info:
        res.value("b")
    assert info.value.reason == TOO_LARGE


def test_node_limit_and_long_chains():
    n = 3000  # far past Python's recursion limit if resolution recursed
    nodes = [N("Identity", ["w" if i == 0 else f"t{i}"], [f"t{i + 1}"]) for i in range(n)]
    g = graph_of(nodes, {"w": W4}, outputs=(f"t{n}",))
    np.testing.assert_array_equal(ConstantResolver(g).value(f"t{n}"), W4)
    assert refusal(g, name=f"t{n}", limits=Limits(max_nodes=100)).reason == TOO_LARGE


def test_cycle_is_refused():
    g = graph_of([N("Add", ["w", "b"], ["a"]), N("Neg", ["a"], ["b"]), N("Identity", ["a"], ["y"])], {"w": W4})
    assert refusal(g).reason == INVALID


@pytest.mark.parametrize("nodes,inits", [
    ([N("Cast", ["w"], ["y"], to=TensorProto.UINT8)], {"w": np.array([-1.5, 300.0], f32)}),
    ([N("Cast", ["w"], ["y"], to=TensorProto.INT64)], {"w": np.array([1e19], f32)}),
    ([N("Cast", ["w"], ["y"], to=TensorProto.INT32)], {"w": np.array([np.nan], f32)}),
], ids=["to-uint8", "to-int64", "nan"])
def test_out_of_range_float_to_int_cast_is_refused(nodes, inits):
    # undefined behaviour in C++: onnxruntime gives whatever the platform does; never fold on it
    with pytest.raises(Refusal) as info:
        resolve(nodes, inits)
    assert info.value.reason == INVALID


def test_unreadable_tensors_are_refused():
    bad_type = numpy_helper.from_array(W4, "w")
    bad_type.data_type = 73
    short = numpy_helper.from_array(W4, "v")
    short.raw_data = b"abc"
    external = TensorProto(name="e", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    external.external_data.add(key="location", value="weights.bin")
    few = TensorProto(name="f", data_type=TensorProto.FLOAT, dims=[2], float_data=[1.0])
    g = helper.make_graph([N("Identity", [n], [n + "y"]) for n in "wvef"], "g", [], [], [bad_type, short, external, few])
    res = ConstantResolver(g)
    for n in "wvef":
        assert res.refusal(n + "y").reason == UNREADABLE, n


def test_strings_are_refused():
    g = graph_of([N("Constant", [], ["y"], value_string="x")], {})
    assert refusal(g).reason == UNSUPPORTED_OP


def test_refusal_is_cached_and_worded_for_each_caller():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    g = graph_of([N("Neg", ["x"], ["y"])], {}, inputs=[x])
    res = ConstantResolver(g)
    assert not res.is_constant("y")
    r = res.refusal("y", "BN mean")
    assert r.reason == NOT_CONSTANT and r.detail.startswith("BN mean 'y'")


# ------------------------------------------------------------------------- scopes


def test_subgraph_reads_outer_constants_and_its_own_names_shadow_them():
    outer = graph_of([N("Neg", ["w"], ["nw"])], {"w": W4, "v": W4 * 2}, outputs=("nw",))
    sub_in = helper.make_tensor_value_info("v", TensorProto.FLOAT, [4])
    sub = helper.make_graph(
        [N("Add", ["nw", "w"], ["s"]), N("Mul", ["v", "w"], ["m"])],
        "body", [sub_in], [helper.make_value_info("s", onnx.TypeProto())],
    )
    top = ConstantResolver(outer)
    inner = ConstantResolver(sub, outer=top)
    np.testing.assert_array_equal(inner.value("s"), -W4 + W4)
    with pytest.raises(Refusal) as info:
        inner.value("m")  # 'v' is the subgraph's own input here, not the outer initializer
    assert info.value.reason == NOT_CONSTANT
    assert inner.stats is top.stats and top.stats.subgraphs == 2  # Neg in the outer graph, then Add


# ------------------------------------------------------------------------- bookkeeping


def test_stats_and_subgraph_listing():
    nodes = [N("Transpose", ["w"], ["t"], perm=[1, 0]), N("Reshape", ["t", "s"], ["y"]), N("Identity", ["w"], ["z"])]
    g = graph_of(nodes, {"w": np.ones((2, 3), f32), "s": I64(-1)}, outputs=("y", "z"))
    res = ConstantResolver(g)
    assert [n.op_type for n in res.subgraph("y")] == ["Transpose", "Reshape"]
    assert [n.op_type for n in res.subgraph("t")] == ["Transpose"]  # computed along the way
    assert res.subgraph("w") == []
    res.value("y")  # cached: not counted again
    assert (res.stats.subgraphs, res.stats.nodes, res.stats.elements) == (1, 2, 6)
    assert res.stats.evaluated[0].name == "y"
    assert not res.value("y").flags.writeable and not res.value("z").flags.writeable  # the cache is shared


def test_removable_leaves_what_others_still_read():
    nodes = [
        N("Transpose", ["w"], ["t"], perm=[1, 0], name="tr"),
        N("Reshape", ["t", "s"], ["y"], name="rs"),
        N("Constant", [], ["k"], value_floats=[1.0], name="k"),
        N("Mul", ["t", "k"], ["z"], name="mul"),
        N("Conv", ["x", "y"], ["o1"], name="conv"),
        N("Relu", ["z"], ["o2"], name="relu"),
    ]
    g = graph_of(nodes, {"w": np.ones((2, 3), f32), "s": I64(-1)}, outputs=("o1", "o2"))
    res = ConstantResolver(g)
    res.value("y")
    reads = {"w": 1, "t": 2, "s": 1, "y": 1, "k": 1, "z": 1}
    # The conv stopped reading 'y': Reshape goes, and its shape; Transpose stays (Mul reads 't').
    reads["y"] = 0
    gone = res.removable(["y"], lambda n: reads.get(n, 0))
    assert [n.name for n in gone.nodes] == ["rs"] and gone.initializers == ["s"]
    # Once the Mul is gone too, the whole subgraph and the initializer go.
    res.value("z")
    reads.update(y=0, z=0)
    gone = res.removable(["y", "z"], lambda n: reads.get(n, 0))
    assert sorted(n.name for n in gone.nodes) == ["k", "mul", "rs", "tr"]
    assert sorted(gone.initializers) == ["s", "w"]
    # A graph output is never proposed.
    assert res.removable(["z"], lambda n: 0, keep={"z"}).nodes == []


def test_define_records_a_new_constant():
    res = ConstantResolver(graph_of([], {}, outputs=()))
    res.define("folded", W4)
    np.testing.assert_array_equal(res.value("folded"), W4)


def test_module_does_not_import_the_reference_evaluator():
    code = "import sys, bnfold.onnx_pass.constants; sys.exit('onnx.reference' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0

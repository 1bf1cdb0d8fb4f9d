"""Mixed precision (issue 17): the check's default tolerance follows the precision a model computes
in, not its declared output type.

Models are built in float32 and converted the way onnxconverter-common's
``convert_float_to_float16`` writes them: float16 initializers and value types, and with
``keep_io_types=True`` float32 graph inputs and outputs joined to the float16 graph by Cast nodes.
Correct folds (bnfold's own) must pass the default check; wrong folds (one channel off by 1 %, a
dropped shift) must fail and be named.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import bnfold
from bnfold import verify
from bnfold.verify.precision import value_precisions

OPSET = [h.make_opsetid("", 17)]


class Net:
    """A tiny float32 graph builder: conv/bn/act blocks with deterministic random weights."""

    def __init__(self, seed, channels_in=3, spatial=(16, 16)):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []
        self.shape = [1, channels_in, *spatial]
        self.n = 0

    def _name(self, prefix):
        self.n += 1
        return f"{prefix}{self.n}"

    def init(self, prefix, array):
        name = self._name(prefix)
        self.inits.append(nh.from_array(np.asarray(array, np.float32), name))
        return name

    def conv(self, x, cin, cout, k=3, group=1, dims=2, stride=1, bias=False):
        fan = cin // group * k**dims
        w = self.init("w", self.rng.standard_normal((cout, cin // group) + (k,) * dims) * np.sqrt(2.0 / fan))
        ins = [x, w] + ([self.init("cb", self.rng.normal(0, 0.1, cout))] if bias else [])
        out = self._name("conv")
        self.nodes.append(h.make_node("Conv", ins, [out], name=out, pads=[k // 2] * (2 * dims), group=group,
                                      strides=[stride] * dims))
        return out

    def bn(self, x, c):
        r = self.rng
        params = [self.init("g", r.normal(1, 0.2, c)), self.init("b", r.normal(0, 0.2, c)),
                  self.init("m", r.normal(0, 0.5, c)), self.init("v", r.uniform(0.5, 2.0, c))]
        out = self._name("bn")
        self.nodes.append(h.make_node("BatchNormalization", [x] + params, [out], name=out))
        return out

    def op(self, op_type, inputs, **attrs):
        out = self._name(op_type.lower())
        self.nodes.append(h.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def cbr(self, x, cin, cout, act="Relu", **kw):
        y = self.bn(self.conv(x, cin, cout, **kw), cout)
        if act == "Relu":
            return self.op("Relu", [y])
        if act == "Relu6":
            return self.op("Clip", [y, self.init("lo", 0.0), self.init("hi", 6.0)])
        if act == "SiLU":
            return self.op("Mul", [y, self.op("Sigmoid", [y])])
        return y

    def model(self, out):
        graph = h.make_graph(self.nodes, "net", [h.make_tensor_value_info("x", T.FLOAT, self.shape)],
                             [h.make_tensor_value_info(out, T.FLOAT, None)], self.inits)
        return h.make_model(graph, opset_imports=OPSET)


def resnet(seed=0):
    n = Net(seed)
    x = n.cbr("x", 3, 16)
    y = n.bn(n.conv(n.cbr(x, 16, 16), 16, 16), 16)
    y = n.op("Relu", [n.op("Add", [x, y])])
    y = n.cbr(y, 16, 32, stride=2)
    return n.model(n.op("Flatten", [n.op("GlobalAveragePool", [y])]))


def mobilenet(seed=1):
    n = Net(seed)
    x = n.cbr("x", 3, 16, act="Relu6")
    x = n.cbr(x, 16, 16, act="Relu6", group=16)  # depthwise
    x = n.cbr(x, 16, 24, act=None, k=1)  # pointwise, linear bottleneck
    return n.model(x)


def efficientnet(seed=2):
    n = Net(seed)
    x = n.cbr("x", 3, 16, act="SiLU")
    x = n.cbr(x, 16, 16, act="SiLU", group=16)
    se = n.op("GlobalAveragePool", [x])
    se = n.op("Sigmoid", [n.conv(n.op("Relu", [n.conv(se, 16, 4, k=1, bias=True)]), 4, 16, k=1, bias=True)])
    return n.model(n.cbr(n.op("Mul", [x, se]), 16, 24, act=None, k=1))


def vgg(seed=3):
    n = Net(seed)
    x = n.op("MaxPool", [n.cbr("x", 3, 16, bias=True)], kernel_shape=[2, 2], strides=[2, 2])
    return n.model(n.op("MaxPool", [n.cbr(x, 16, 32, bias=True)], kernel_shape=[2, 2], strides=[2, 2]))


def googlenet(seed=4):
    n = Net(seed)
    x = n.cbr("x", 3, 16)
    branches = [n.cbr(x, 16, 8, k=1), n.cbr(n.cbr(x, 16, 8, k=1), 8, 12), n.cbr(x, 16, 4, k=5)]
    return n.model(n.op("Concat", branches, axis=1))


def densenet(seed=5):
    n = Net(seed)
    x = n.cbr("x", 3, 16)
    y = n.conv(n.op("Relu", [n.bn(x, 16)]), 16, 8)  # pre-activation: this BN stays
    y = n.cbr(n.op("Concat", [x, y], axis=1), 24, 16, k=1)
    return n.model(y)


def r3d(seed=6):
    n = Net(seed, spatial=(4, 8, 8))
    x = n.cbr("x", 3, 8, dims=3)
    return n.model(n.cbr(x, 8, 8, dims=3))


NETS = {f.__name__: f for f in (resnet, mobilenet, efficientnet, vgg, googlenet, densenet, r3d)}


def to_float16(model, keep_io_types=True):
    """What onnxconverter-common's convert_float_to_float16 writes: float16 initializers and
    value types; with keep_io_types, float32 inputs/outputs and Cast nodes at the borders."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for i, t in enumerate(g.initializer):
        if t.data_type == T.FLOAT:
            g.initializer[i].CopyFrom(nh.from_array(nh.to_array(t).astype(np.float16), t.name))
    for vi in list(g.value_info):
        if vi.type.tensor_type.elem_type == T.FLOAT:
            vi.type.tensor_type.elem_type = T.FLOAT16
    for node in g.node:
        for a in node.attribute:
            if a.name == "value" and a.t.data_type == T.FLOAT:
                a.t.CopyFrom(nh.from_array(nh.to_array(a.t).astype(np.float16)))
    if not keep_io_types:
        for vi in list(g.input) + list(g.output):
            vi.type.tensor_type.elem_type = T.FLOAT16
        return m
    casts_in, casts_out = [], []
    for k, vi in enumerate(g.input):
        inner = f"{vi.name}_casted"  # the converter's naming: graph_input_cast_K -> NAME_casted
        for node in g.node:
            for j, name in enumerate(node.input):
                if name == vi.name:
                    node.input[j] = inner
        casts_in.append(h.make_node("Cast", [vi.name], [inner], name=f"graph_input_cast_{k}", to=T.FLOAT16))
    for k, vi in enumerate(g.output):
        inner = f"{vi.name}_uncasted"
        for node in g.node:
            for j, name in enumerate(node.output):
                if name == vi.name:
                    node.output[j] = inner
        casts_out.append(h.make_node("Cast", [inner], [vi.name], name=f"graph_output_cast_{k}", to=T.FLOAT))
    nodes = casts_in + list(g.node) + casts_out
    del g.node[:]
    g.node.extend(nodes)
    return m


def _tamper(folded, how, report):
    """One folded conv's weight channel off by 1 %, or its shift dropped; returns the model and
    the BN whose fold was spoiled."""
    bad = onnx.ModelProto()
    bad.CopyFrom(folded)
    names = {f.producer: f.bn for f in report.folded if f.producer_op == "Conv"}
    conv = next(n for n in bad.graph.node if n.name in names and len(n.input) > 2)
    inits = {t.name: t for t in bad.graph.initializer}
    if how == "channel":
        t = inits[conv.input[1]]
        w = nh.to_array(t).astype(np.float64)
        w[1] *= 1.01
        t.CopyFrom(nh.from_array(w.astype(nh.to_array(t).dtype), t.name))
    else:
        t = inits[conv.input[2]]
        t.CopyFrom(nh.from_array(np.zeros_like(nh.to_array(t)), t.name))
    return bad, names[conv.name]


@pytest.mark.parametrize("keep_io_types", [True, False], ids=["keep_io_types", "float16_io"])
@pytest.mark.parametrize("net", sorted(NETS))
def test_float16_conversions_fold_and_pass_the_default_check(net, keep_io_types):
    model = to_float16(NETS[net](), keep_io_types)
    folded, report = bnfold.fold_onnx(model)
    assert report.n_folded >= 2, report.summary()
    result = verify.check(model, folded, report=report)
    assert result, result.summary()
    out = result.outputs[0]
    assert out.dtype == ("float32" if keep_io_types else "float16")
    assert out.precision == "float16" and "float16" in out.precision_why
    assert all(s.precision == "float16" for s in result.sites)
    assert verify.check(model, folded), "the outputs alone, at the float16 tolerance, pass too"


@pytest.mark.parametrize("how", ["channel", "shift"])
@pytest.mark.parametrize("net", ["resnet", "mobilenet", "vgg", "r3d"])
def test_wrong_folds_of_float16_models_fail(net, how):
    model = to_float16(NETS[net](), keep_io_types=True)
    folded, report = bnfold.fold_onnx(model)
    bad, bn = _tamper(folded, how, report)
    result = verify.check(model, bad, report=report)
    assert not result
    assert any(s.node == bn for s in result.failed_sites), result.summary()


def test_explicit_tolerances_still_win():
    model = to_float16(resnet(), keep_io_types=True)
    folded, report = bnfold.fold_onnx(model)
    strict = verify.check(model, folded, atol=1e-7, rtol=1e-7)
    assert not strict and strict.outputs[0].tolerance_source == "given"
    assert verify.check(model, folded, report=report, rtol=1e-2)


def test_float32_model_keeps_float32_tolerance():
    model = resnet()
    folded, _ = bnfold.fold_onnx(model)
    result = verify.check(model, folded)
    assert result.outputs[0].precision == "float32"
    assert result.outputs[0].rtol == verify.default_tolerance("float32")[1]


def test_precision_rule_names_the_value_that_set_it():
    model = to_float16(vgg(), keep_io_types=True)
    prec = value_precisions(model)
    out = model.graph.output[0].name
    assert prec[out][0] == "float16"
    assert "graph_input_cast_0" in prec[out][1] or "initializer" in prec[out][1]
    assert "x" not in prec or prec["x"][0] == "float32"  # the input itself is float32
    # an integer path (Shape of a float16 tensor) carries no float precision
    g = model.graph
    g.node.append(h.make_node("Shape", [g.node[1].output[0]], ["shp"]))
    assert "shp" not in value_precisions(model)


def bfloat16_rounded(seed=0):
    """float32 compute with the data rounded to bfloat16 on the way in and out (Cast pairs):
    onnxruntime's CPU provider runs no bfloat16 Conv, so this is how such a model can be checked."""
    n = Net(seed)
    x = n.op("Cast", [n.op("Cast", ["x"], to=T.BFLOAT16)], to=T.FLOAT)
    y = n.cbr(n.cbr(x, 3, 16), 16, 16)
    return n.model(n.op("Cast", [n.op("Cast", [y], to=T.BFLOAT16)], to=T.FLOAT))


def test_bfloat16_rounded_model():
    model = bfloat16_rounded()
    folded, report = bnfold.fold_onnx(model)
    assert report.n_folded == 2
    result = verify.check(model, folded, report=report)
    assert result, result.summary()
    assert result.outputs[0].precision == "bfloat16" and all(s.precision == "bfloat16" for s in result.sites)
    bad, bn = _tamper(folded, "shift", report)
    failed = verify.check(model, bad, report=report)
    assert not failed and any(s.node == bn for s in failed.failed_sites)

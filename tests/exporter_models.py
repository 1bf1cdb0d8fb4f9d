"""Models written the way real exporters write them (issue 11), for tests and benchmarks.

Each builder returns a ModelProto whose BatchNorms sit behind the idioms exporters produce:
parameters computed by small constant subgraphs, no-op Muls, a Mul before a 1x1 conv.
Where the exporter is PyTorch, a real module is exported with ``torch.onnx.export`` and the
builder asserts that the idiom is in the file (so a change in the exporter shows up as a test
failure, not as a test that silently checks something else). The others are hand-built from
the node sequences those converters emit, with seeded weights; nothing is downloaded.

``IDIOMS`` maps a short name to a builder taking no arguments.
"""

from __future__ import annotations

import io
import warnings
from typing import Callable, Dict

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_models import fill_output_shapes

# BN statistics far from the identity, so that a BN left in place or folded wrongly shows.


def _bn(rng, c, dtype=np.float32):
    return {
        "scale": rng.uniform(0.5, 2.0, c).astype(dtype),
        "B": rng.uniform(-1.0, 1.0, c).astype(dtype),
        "mean": rng.uniform(-1.0, 1.0, c).astype(dtype),
        "var": rng.uniform(0.5, 2.0, c).astype(dtype),
    }


class _Graph:
    """A tiny builder: nodes, initializers, one input, one output."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes = []
        self.inits = []
        self.n = 0

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}_{self.n}"

    def init(self, name: str, value) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def const(self, name: str, value) -> str:
        self.node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs, outputs, **attrs) -> str:
        outputs = [outputs] if isinstance(outputs, str) else list(outputs)
        self.nodes.append(helper.make_node(op, list(inputs), outputs, name=self.name(op), **attrs))
        return outputs[0]

    def bn(self, x: str, c: int, names=None, dtype=np.float32) -> str:
        p = _bn(self.rng, c, dtype)
        ins = names or [self.init(self.name(f"bn_{k}"), v) for k, v in p.items()]
        return self.node("BatchNormalization", [x, *ins], self.name("bn_out"), epsilon=1e-3)

    def model(self, x_shape, y: str, opset: int, ir_version: int = 8, x_type=TensorProto.FLOAT, y_type=None,
              inits_as_inputs: bool = False) -> onnx.ModelProto:
        inputs = [helper.make_tensor_value_info("x", x_type, list(x_shape))]
        if inits_as_inputs:  # IR 3: every initializer is also a graph input
            inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in self.inits]
        out = helper.make_tensor_value_info(y, y_type or x_type, None)
        g = helper.make_graph(self.nodes, "exported", inputs, [out], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
        fill_output_shapes(m)
        onnx.checker.check_model(m, full_check=True)
        return m


# ------------------------------------------------------------------------- torch.onnx


def torch_dedup_biases() -> onnx.ModelProto:
    """A VGG-style torch module whose convs and Linear have identical (zero) biases and whose BNs
    share some parameters: torch.onnx keeps one initializer and writes the others as
    ``Identity(shared)``. Exported with the TorchScript exporter in PRESERVE mode, which keeps
    the BatchNorms (EVAL mode would fuse Conv+BN itself)."""
    import torch

    torch.manual_seed(0)

    class VGGish(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.convs = torch.nn.ModuleList(torch.nn.Conv2d(c, 8, 3, padding=1) for c in (3, 8, 8))
            self.bns = torch.nn.ModuleList(torch.nn.BatchNorm2d(8) for _ in range(3))
            self.fc = torch.nn.Linear(8, 8)
            self.bn_fc = torch.nn.BatchNorm1d(8)
            with torch.no_grad():
                for m in list(self.convs) + [self.fc]:
                    m.bias.zero_()  # re-initialised biases: all equal
                for i, bn in enumerate(list(self.bns) + [self.bn_fc]):
                    bn.running_mean.uniform_(-1, 1)
                    bn.running_var.uniform_(0.5, 2)
                    bn.bias.uniform_(-1, 1)
                    if i % 2:  # BN weights left at their initial value on every other BN
                        bn.weight.uniform_(0.5, 2)

        def forward(self, x):
            for conv, bn in zip(self.convs, self.bns):
                x = torch.relu(bn(conv(x)))
            x = x.mean(dim=(2, 3))
            return self.bn_fc(self.fc(x))

    module = VGGish().eval()
    f = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated; it is what wrote these files
        warnings.simplefilter("ignore")
        _export(torch, module, f)
    model = onnx.load_from_string(f.getvalue())
    inits = {t.name for t in model.graph.initializer}
    dedup = {n.output[0] for n in model.graph.node if n.op_type == "Identity" and n.input[0] in inits}
    read = {i for n in model.graph.node if n.op_type in ("Conv", "Gemm", "BatchNormalization") for i in n.input[1:]}
    assert dedup & read, "torch.onnx no longer writes deduplicated initializers as Identity"
    return model


def _export(torch, module, f) -> None:
    torch.onnx.export(
        module, (torch.randn(1, 3, 8, 8),), f, dynamo=False, opset_version=17,
        training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
        input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
    )


# ------------------------------------------------------------------------- tf2onnx


def tf2onnx_mobilenet(optimized: bool = False) -> onnx.ModelProto:
    """A MobileNetV2-style block as tf2onnx writes it from an NHWC Keras model.

    Without its optimizers, every conv weight stays in TensorFlow's HWIO layout behind a
    ``Transpose`` (and a ``Reshape`` for depthwise weights, HWC1 -> C1HW); ReLU6 is a Clip
    with Constant bounds. With them (``optimized=True``) the weights are plain initializers.
    """
    g = _Graph(seed=11)
    c_in, c_mid, c_out = 4, 8, 16
    x = g.node("Transpose", ["x"], "x_nchw", perm=[0, 3, 1, 2])

    def weight(hwio: np.ndarray, depthwise: bool) -> str:
        if optimized:
            w = np.transpose(hwio, (2, 3, 0, 1)) if depthwise else np.transpose(hwio, (3, 2, 0, 1))
            if depthwise:
                w = w.reshape(hwio.shape[2] * hwio.shape[3], 1, hwio.shape[0], hwio.shape[1])
            return g.init(g.name("kernel"), np.ascontiguousarray(w))
        k = g.init(g.name("kernel_hwio"), hwio)
        if not depthwise:
            return g.node("Transpose", [k], g.name("kernel_oihw"), perm=[3, 2, 0, 1])
        t = g.node("Transpose", [k], g.name("kernel_t"), perm=[2, 3, 0, 1])
        shape = g.init(g.name("new_shape"), np.array([hwio.shape[2] * hwio.shape[3], 1, *hwio.shape[:2]], np.int64))
        return g.node("Reshape", [t, shape], g.name("kernel_dw"))

    lo, hi = g.const("relu6_min", np.array(0.0, np.float32)), g.const("relu6_max", np.array(6.0, np.float32))
    w1 = weight(g.rng.standard_normal((3, 3, c_in, c_mid)).astype(np.float32) * 0.3, False)
    y = g.node("Conv", [x, w1], "expand", pads=[1, 1, 1, 1])
    y = g.node("Clip", [g.bn(y, c_mid), lo, hi], "expand_relu6")
    w2 = weight(g.rng.standard_normal((3, 3, c_mid, 1)).astype(np.float32) * 0.3, True)
    y = g.node("Conv", [y, w2], "depthwise", pads=[1, 1, 1, 1], group=c_mid)
    y = g.node("Clip", [g.bn(y, c_mid), lo, hi], "depthwise_relu6")
    w3 = weight(g.rng.standard_normal((1, 1, c_mid, c_out)).astype(np.float32) * 0.3, False)
    y = g.bn(g.node("Conv", [y, w3], "project"), c_out)
    g.node("Transpose", [y], "y", perm=[0, 2, 3, 1])
    return g.model(["N", 8, 8, c_in], "y", opset=13)


# ------------------------------------------------------------------------- Caffe2


def caffe2_ir3() -> onnx.ModelProto:
    """A residual block as Caffe2's converter wrote it (cf. the onnx wheel's light_resnet50):
    IR version 3, every initializer also listed as a graph input, conv weights and BN running
    statistics built by ``ConstantOfShape`` from ``*__SHAPE`` initializers, BN scale and bias as
    plain initializers, the residual sum as ``Sum``."""
    g = _Graph(seed=3)
    c = 8

    def filled(name: str, shape, value: float) -> str:
        s = g.init(f"{name}__SHAPE", np.array(shape, np.int64))
        fill = helper.make_tensor("value", TensorProto.FLOAT, [1], [value])
        return g.node("ConstantOfShape", [s], name, value=fill)

    def conv_bn(x: str, cin: int, k: int, tag: str, relu: bool) -> str:
        w = filled(f"{tag}_w_0", [c, cin, k, k], float(g.rng.uniform(-0.2, 0.2)))
        y = g.node("Conv", [x, w], f"{tag}_0", pads=[k // 2] * 4, kernel_shape=[k, k])
        p = _bn(g.rng, c)
        s = g.init(f"{tag}_bn_s_0", p["scale"])
        b = g.init(f"{tag}_bn_b_0", p["B"])
        rm = filled(f"{tag}_bn_rm_0", [c], float(g.rng.uniform(-1, 1)))
        riv = filled(f"{tag}_bn_riv_0", [c], float(g.rng.uniform(0.5, 2)))
        y = g.node("BatchNormalization", [y, s, b, rm, riv], f"{tag}_bn_0", epsilon=1e-5)
        return g.node("Relu", [y], f"{tag}_relu_0") if relu else y

    stem = conv_bn("x", 3, 3, "conv1", True)
    a = conv_bn(stem, c, 1, "res2_branch2a", True)
    b = conv_bn(a, c, 3, "res2_branch2b", False)
    s = g.node("Sum", [stem, b], "res2_sum")
    g.node("Relu", [s], "y")
    return g.model([1, 3, 8, 8], "y", opset=9, ir_version=3, inits_as_inputs=True)


# ------------------------------------------------------------------------- paddle2onnx


def paddle_swish() -> onnx.ModelProto:
    """Conv+BN+swish as paddle2onnx writes it: ``x * Sigmoid(Mul(x, [1.0]))``, the beta of
    swish a Constant ``[1.0]`` (a no-op Mul onnxruntime and onnxslim remove)."""
    g = _Graph(seed=5)
    c = 8
    one = g.const("swish_beta", np.array([1.0], np.float32))
    y = "x"
    for i, cin in enumerate((3, c)):
        w = g.init(g.name("conv_w"), g.rng.standard_normal((c, cin, 3, 3)).astype(np.float32) * 0.3)
        y = g.bn(g.node("Conv", [y, w], g.name("conv"), pads=[1, 1, 1, 1]), c)
        beta_x = g.node("Mul", [y, one], g.name("swish_beta_x"))
        y = g.node("Mul", [y, g.node("Sigmoid", [beta_x], g.name("swish_sig"))], "y" if i else g.name("swish"))
    return g.model(["N", 3, 8, 8], "y", opset=11)


def ppocr_gelu_tail() -> onnx.ModelProto:
    """A PP-OCR block: Conv+BN, GELU written out as ``x * 0.5 * (1 + Erf(x / sqrt 2))`` whose
    final ``Mul(., 0.5)`` feeds a 1x1 Conv (with bias) + BN. The scalars are ``[1]`` Constants."""
    g = _Graph(seed=6)
    c = 8
    w = g.init("conv1_w", g.rng.standard_normal((c, 3, 3, 3)).astype(np.float32) * 0.3)
    y = g.bn(g.node("Conv", ["x", w], "conv1", pads=[1, 1, 1, 1]), c)
    r2 = g.const("sqrt2", np.array([1.4142135], np.float32))
    one = g.const("one", np.array([1.0], np.float32))
    half = g.const("half", np.array([0.5], np.float32))
    e = g.node("Erf", [g.node("Div", [y, r2], "gelu_div")], "gelu_erf")
    m = g.node("Mul", [y, g.node("Add", [e, one], "gelu_add")], "gelu_mul")
    h = g.node("Mul", [m, half], "gelu_half")
    w2 = g.init("pw_w", g.rng.standard_normal((c, c, 1, 1)).astype(np.float32) * 0.3)
    b2 = g.init("pw_b", g.rng.standard_normal(c).astype(np.float32))
    y = g.bn(g.node("Conv", [h, w2, b2], "pw_conv"), c)
    g.node("Relu", [y], "y")
    return g.model(["N", 3, 8, 8], "y", opset=13)


# ------------------------------------------------------------------------- constants through layout ops


def constant_chains(opset: int = 13) -> onnx.ModelProto:
    """Conv, BN, Mul and Gemm parameters that reach their op through Cast, Squeeze,
    Unsqueeze (axes as an attribute below opset 13, as an input from 13), Concat, Expand,
    Slice, Gather and ``Constant(value_floats)``: forms seen in the wild."""
    g = _Graph(seed=7)
    c = 8
    rng = g.rng

    def axes(node_inputs, values, op, out):
        if opset >= 13:
            return g.node(op, [*node_inputs, g.init(g.name("axes"), np.array(values, np.int64))], out)
        return g.node(op, node_inputs, out, axes=list(values))

    w = g.node("Cast", [g.init("w64", rng.standard_normal((c, 3, 3, 3)) * 0.3)], "w_cast", to=TensorProto.FLOAT)
    table = g.init("bias_table", rng.standard_normal((2, c)).astype(np.float32))
    bias = g.node("Gather", [table, g.init("row", np.array(1, np.int64))], "bias_row", axis=0)
    y = g.node("Conv", ["x", w, bias], "conv", pads=[1, 1, 1, 1])
    p = _bn(rng, c)
    scale = axes([g.init("scale_4d", p["scale"].reshape(1, c, 1, 1))], [0, 2, 3], "Squeeze", "scale")
    shift = g.node("Concat", [g.init("B_lo", p["B"][:4]), g.init("B_hi", p["B"][4:])], "shift", axis=0)
    big = np.concatenate([rng.standard_normal(3), p["mean"], rng.standard_normal(5)]).astype(np.float32)
    mean = g.node("Slice", [g.init("mean_big", big), g.init("s0", np.array([3], np.int64)),
                            g.init("s1", np.array([3 + c], np.int64))], "mean") if opset >= 10 else None
    var = g.node("Expand", [g.init("var1", np.array([1.5], np.float32)), g.init("vshape", np.array([c], np.int64))], "var")
    y = g.node("BatchNormalization", [y, scale, shift, mean, var], "bn1", epsilon=1e-5)
    k = g.const("k", rng.uniform(0.5, 2.0, c).astype(np.float32))
    y = g.node("Mul", [y, axes([k], [1, 2], "Unsqueeze", "k_c11")], "mul_k")
    y = g.node("Relu", [y], "relu")
    y = g.node("GlobalAveragePool", [y], "gap")
    y = g.node("Flatten", [y], "flat", axis=1)
    gw = g.node("Transpose", [g.init("fc_w_t", rng.standard_normal((c, c)).astype(np.float32))], "fc_w", perm=[1, 0])
    gc_ = g.node("Identity", [g.const("fc_b_c", np.zeros(c, np.float32))], "fc_b")
    y = g.node("Gemm", [y, gw, gc_], "fc", transB=1)
    y = g.bn(y, c)
    g.node("Identity", [y], "y")
    return g.model(["N", 3, 8, 8], "y", opset=opset)


# ------------------------------------------------------------------------- float16


def float16_keep_io() -> onnx.ModelProto:
    """A net as onnxconverter-common's ``convert_float_to_float16(keep_io_types=True)`` leaves
    it: float32 input and output with ``Cast`` at both ends, float16 weights, BN parameters and
    compute in between."""
    g = _Graph(seed=8)
    c = 8
    h = np.float16
    y = g.node("Cast", ["x"], "x_fp16", to=TensorProto.FLOAT16)
    for i, cin in enumerate((3, c)):
        w = g.init(g.name("conv_w"), (g.rng.standard_normal((c, cin, 3, 3)) * 0.3).astype(h))
        b = g.init(g.name("conv_b"), g.rng.standard_normal(c).astype(h))
        y = g.bn(g.node("Conv", [y, w, b], g.name("conv"), pads=[1, 1, 1, 1]), c, dtype=h)
        y = g.node("Relu", [y], g.name("relu"))
    g.node("Cast", [y], "y", to=TensorProto.FLOAT)
    return g.model(["N", 3, 8, 8], "y", opset=13)


IDIOMS: Dict[str, Callable[[], onnx.ModelProto]] = {
    "torch-dedup-biases": torch_dedup_biases,
    "tf2onnx-mobilenet": tf2onnx_mobilenet,
    "tf2onnx-mobilenet-optimized": lambda: tf2onnx_mobilenet(optimized=True),
    "caffe2-ir3": caffe2_ir3,
    "paddle-swish": paddle_swish,
    "ppocr-gelu-tail": ppocr_gelu_tail,
    "constant-chains-opset11": lambda: constant_chains(opset=11),
    "constant-chains-opset13": lambda: constant_chains(opset=13),
    "float16-keep-io": float16_keep_io,
}

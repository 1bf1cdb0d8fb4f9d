"""Build bnfold's sample ONNX models: small, seeded, with non-trivial BatchNorm statistics.

    python sample_models/make_samples.py [OUT_DIR]     # default: the folder of this script

Only onnx.helper and numpy are used (no torch), and every random draw is seeded, so running
the script twice writes identical bytes. The models:

  resnet_mini.onnx         stem + two bottleneck blocks (one with a strided projection) + Gemm head
  mobilenet_mini.onnx      depthwise-separable blocks and an inverted residual, Clip (ReLU6)
  convtranspose_decoder.onnx   ConvTranspose upsampling with group 1, grouped and depthwise
  mlp.onnx                 Gemm+BN and MatMul+Add+BN on 2-D features

Every BN has random positive variance, non-zero mean, gamma (some negative) and beta, so a
wrong fold shows up as a wrong output, not as a no-op.
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # pinned, so the bytes do not depend on the installed onnx's default


class Net:
    """A tiny graph builder: initializers, named nodes, one float32 input."""

    def __init__(self, name: str, seed: int) -> None:
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.nodes: List[onnx.NodeProto] = []
        self.inits: List[onnx.TensorProto] = []

    def init(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name))
        return name

    def node(self, op: str, inputs: Sequence[str], name: str, n_out: int = 1, **attrs) -> str:
        outs = [f"{name}_out"] if n_out == 1 else [f"{name}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, **attrs))
        return outs[0]

    def he(self, shape: Sequence[int], fan_in: int) -> np.ndarray:
        return self.rng.normal(0.0, np.sqrt(2.0 / fan_in), size=tuple(shape))

    def conv(self, x: str, name: str, c_in: int, c_out: int, k: int, stride: int = 1, group: int = 1,
             bias: bool = False) -> str:  # fmt: skip
        w = self.init(f"{name}.weight", self.he((c_out, c_in // group, k, k), c_in // group * k * k))
        ins = [x, w]
        if bias:
            ins.append(self.init(f"{name}.bias", self.rng.normal(0, 0.1, c_out)))
        pad = k // 2
        return self.node("Conv", ins, name, kernel_shape=[k, k], strides=[stride, stride],
                         pads=[pad, pad, pad, pad], group=group)  # fmt: skip

    def conv_t(self, x: str, name: str, c_in: int, c_out: int, k: int, stride: int, pad: int, group: int = 1,
               output_padding: int = 0, bias: bool = True) -> str:  # fmt: skip
        w = self.init(f"{name}.weight", self.he((c_in, c_out // group, k, k), c_in // group * k * k))
        ins = [x, w]
        if bias:
            ins.append(self.init(f"{name}.bias", self.rng.normal(0, 0.1, c_out)))
        attrs = dict(kernel_shape=[k, k], strides=[stride, stride], pads=[pad, pad, pad, pad], group=group)
        if output_padding:
            attrs["output_padding"] = [output_padding, output_padding]
        return self.node("ConvTranspose", ins, name, **attrs)

    def bn(self, x: str, name: str, c: int) -> str:
        rng = self.rng
        gamma = rng.uniform(0.5, 1.5, c) * np.where(rng.random(c) < 0.15, -1.0, 1.0)
        ins = [
            x,
            self.init(f"{name}.weight", gamma),
            self.init(f"{name}.bias", rng.normal(0.0, 0.3, c)),
            self.init(f"{name}.running_mean", rng.normal(0.0, 0.5, c)),
            self.init(f"{name}.running_var", rng.lognormal(0.0, 0.5, c)),
        ]
        return self.node("BatchNormalization", ins, name, epsilon=1e-5)

    def relu(self, x: str, name: str) -> str:
        return self.node("Relu", [x], name)

    def relu6(self, x: str, name: str) -> str:
        lo, hi = self.init(f"{name}.min", np.array(0.0)), self.init(f"{name}.max", np.array(6.0))
        return self.node("Clip", [x, lo, hi], name)

    def model(self, x_shape: Sequence, out: str, out_shape: Sequence, doc: str) -> onnx.ModelProto:
        assert out == self.nodes[-1].output[0], "the last node must write the graph output"
        self.nodes[-1].output[0] = "output"
        graph = helper.make_graph(
            self.nodes,
            self.name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(x_shape))],
            [helper.make_tensor_value_info("output", TensorProto.FLOAT, list(out_shape))],
            self.inits,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
            producer_name="bnfold-samples", doc_string=doc,
        )  # fmt: skip
        onnx.checker.check_model(model, full_check=True)
        return model


def _head(net: Net, x: str, c: int, classes: int) -> str:
    pooled = net.node("GlobalAveragePool", [x], "pool")
    flat = net.node("Flatten", [pooled], "flatten", axis=1)
    w = net.init("fc.weight", net.he((classes, c), c))
    b = net.init("fc.bias", net.rng.normal(0, 0.1, classes))
    return net.node("Gemm", [flat, w, b], "fc", transB=1)


def resnet_mini() -> onnx.ModelProto:
    net = Net("resnet_mini", seed=1)
    h = net.relu(net.bn(net.conv("input", "stem.conv", 3, 16, 3), "stem.bn", 16), "stem.relu")

    def bottleneck(x: str, name: str, c_in: int, mid: int, c_out: int, stride: int) -> str:
        y = net.relu(net.bn(net.conv(x, f"{name}.conv1", c_in, mid, 1), f"{name}.bn1", mid), f"{name}.relu1")
        y = net.relu(net.bn(net.conv(y, f"{name}.conv2", mid, mid, 3, stride), f"{name}.bn2", mid), f"{name}.relu2")
        y = net.bn(net.conv(y, f"{name}.conv3", mid, c_out, 1), f"{name}.bn3", c_out)
        if stride != 1 or c_in != c_out:
            x = net.bn(net.conv(x, f"{name}.downsample.conv", c_in, c_out, 1, stride), f"{name}.downsample.bn", c_out)
        return net.relu(net.node("Add", [y, x], f"{name}.add"), f"{name}.relu3")

    h = bottleneck(h, "layer1.0", 16, 8, 32, 1)
    h = bottleneck(h, "layer1.1", 32, 8, 32, 1)
    h = bottleneck(h, "layer2.0", 32, 16, 64, 2)
    out = _head(net, h, 64, 10)
    return net.model(["N", 3, 32, 32], out, ["N", 10], "ResNet-style net with bottleneck blocks (bnfold sample)")


def mobilenet_mini() -> onnx.ModelProto:
    net = Net("mobilenet_mini", seed=2)
    h = net.relu6(net.bn(net.conv("input", "stem.conv", 3, 16, 3, 2), "stem.bn", 16), "stem.relu6")

    def separable(x: str, name: str, c_in: int, c_out: int, stride: int) -> str:
        y = net.bn(net.conv(x, f"{name}.dw", c_in, c_in, 3, stride, group=c_in), f"{name}.dw_bn", c_in)
        y = net.relu6(y, f"{name}.dw_relu6")
        y = net.bn(net.conv(y, f"{name}.pw", c_in, c_out, 1), f"{name}.pw_bn", c_out)
        return net.relu6(y, f"{name}.pw_relu6")

    def inverted_residual(x: str, name: str, c: int, expand: int) -> str:
        e = c * expand
        y = net.relu6(net.bn(net.conv(x, f"{name}.expand", c, e, 1), f"{name}.expand_bn", e), f"{name}.expand_relu6")
        y = net.relu6(net.bn(net.conv(y, f"{name}.dw", e, e, 3, group=e), f"{name}.dw_bn", e), f"{name}.dw_relu6")
        y = net.bn(net.conv(y, f"{name}.project", e, c, 1), f"{name}.project_bn", c)
        return net.node("Add", [x, y], f"{name}.add")

    h = separable(h, "block1", 16, 24, 1)
    h = separable(h, "block2", 24, 32, 2)
    h = inverted_residual(h, "block3", 32, 4)
    h = separable(h, "block4", 32, 48, 2)
    out = _head(net, h, 48, 10)
    return net.model(["N", 3, 32, 32], out, ["N", 10], "MobileNet-style net with depthwise convs (bnfold sample)")


def convtranspose_decoder() -> onnx.ModelProto:
    net = Net("convtranspose_decoder", seed=3)
    h = net.bn(net.conv_t("input", "up1", 32, 24, 4, 2, 1), "up1.bn", 24)  # group 1: 4x4 -> 8x8
    h = net.relu(h, "up1.relu")
    h = net.bn(net.conv_t(h, "up2", 24, 16, 4, 2, 1, group=4, bias=False), "up2.bn", 16)  # grouped: -> 16x16
    h = net.relu(h, "up2.relu")
    h = net.bn(net.conv_t(h, "up3", 16, 16, 3, 2, 1, group=16, output_padding=1), "up3.bn", 16)  # depthwise: -> 32
    h = net.relu(h, "up3.relu")
    h = net.bn(net.conv(h, "to_rgb", 16, 3, 3, bias=True), "to_rgb.bn", 3)
    out = net.node("Sigmoid", [h], "sigmoid")
    return net.model(["N", 32, 4, 4], out, ["N", 3, 32, 32], "ConvTranspose decoder, group 1 / grouped / depthwise (bnfold sample)")


def mlp() -> onnx.ModelProto:
    net = Net("mlp", seed=4)
    w1 = net.init("fc1.weight", net.he((128, 64), 64))  # Linear layout [out, in]: Gemm transB=1
    b1 = net.init("fc1.bias", net.rng.normal(0, 0.1, 128))
    h = net.node("Gemm", ["input", w1, b1], "fc1", transB=1)
    h = net.relu(net.bn(h, "bn1", 128), "relu1")
    w2 = net.init("fc2.weight", net.he((128, 64), 128))  # MatMul layout [in, out]
    h = net.node("MatMul", [h, w2], "fc2.matmul")
    h = net.node("Add", [h, net.init("fc2.bias", net.rng.normal(0, 0.1, 64))], "fc2.add")
    h = net.relu(net.bn(h, "bn2", 64), "relu2")
    w3 = net.init("fc3.weight", net.he((64, 32), 64))
    h = net.node("Gemm", [h, w3], "fc3", alpha=0.5)  # Gemm without C, alpha != 1
    h = net.bn(h, "bn3", 32)
    w4 = net.init("fc4.weight", net.he((10, 32), 32))
    out = net.node("Gemm", [h, w4, net.init("fc4.bias", np.zeros(10))], "fc4", transB=1)
    return net.model(["N", 64], out, ["N", 10], "MLP with Gemm+BN and MatMul+Add+BN (bnfold sample)")


SAMPLES = {
    "resnet_mini.onnx": resnet_mini,
    "mobilenet_mini.onnx": mobilenet_mini,
    "convtranspose_decoder.onnx": convtranspose_decoder,
    "mlp.onnx": mlp,
}


def write_samples(out_dir: Optional[str] = None) -> List[str]:
    """Write every sample into ``out_dir`` (default: this script's folder); return the paths."""
    out_dir = out_dir or os.path.dirname(os.path.abspath(__file__))
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, build in SAMPLES.items():
        path = os.path.join(out_dir, name)
        with open(path, "wb") as f:
            f.write(build().SerializeToString())
        paths.append(path)
    return paths


def main(argv: Sequence[str]) -> int:
    for path in write_samples(argv[0] if argv else None):
        model = onnx.load(path)
        bns = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
        print(f"{os.path.basename(path):28s} {os.path.getsize(path):>8d} bytes  {bns:2d} BatchNorm")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Realistic benchmark models, built locally from onnx.helper and seeded numpy (no downloads).

Each builder mirrors the topology and parameter count of a well-known network, with float32
random weights (He-scaled, so activations stay finite) and BatchNorms whose statistics are not
the identity (scale, shift, mean and variance all drawn at random):

- ``mobilenetv2``: MobileNetV2 (depthwise convs, Clip as ReLU6), 52 Conv+BN, ~14 MB.
- ``resnet50``: ResNet-50 (bottlenecks [3, 4, 6, 3]), 53 Conv+BN, ~98 MB.
- ``vgg11bn``: VGG-11 with BN, 8 Conv+BN and three big Gemm layers, ~507 MB.
- ``xl_external``: a >2 GB stack of 4096x4096 1x1 convs with every other one followed by a BN,
  stored as external data; written tensor by tensor so generating it needs ~100 MB of RAM.
- ``chain10k`` / ``chain100k``: a long chain of tiny Conv -> BN -> Relu triples (10,000 and
  100,000 nodes) to show that pattern matching is linear in graph size.

Usage: ``python benchmarks/models.py NAME OUT.onnx`` (the harness, ``run.py``, calls
:func:`build` itself and caches the files under ``benchmarks/work/``).
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
SEED = 0
IMAGE = [1, 3, 224, 224]


class GraphBuilder:
    """Collects nodes and initializers; every node and tensor gets a unique, readable name."""

    def __init__(self, seed: int = SEED) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: List[onnx.NodeProto] = []
        self.inits: List[TensorProto] = []
        self.count = 0

    def name(self, kind: str) -> str:
        self.count += 1
        return f"{kind}_{self.count}"

    def const(self, kind: str, array: np.ndarray) -> str:
        name = self.name(kind)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], **attrs) -> str:
        name = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [name + "_out"], name=name, **attrs))
        return name + "_out"

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1) -> str:
        """A bias-free conv, as torchvision builds the convs that feed a BN."""
        fan_in = cin // group * k * k
        w = self.rng.standard_normal((cout, cin // group, k, k), dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        pad = k // 2
        return self.op("Conv", [x, self.const("w", w)], kernel_shape=[k, k], strides=[stride, stride],
                       pads=[pad, pad, pad, pad], group=group)

    def bn(self, x: str, channels: int) -> str:
        """Inference-mode BN with non-trivial statistics."""
        r = self.rng
        scale = r.uniform(0.5, 1.5, channels).astype(np.float32)
        shift = r.normal(0.0, 0.1, channels).astype(np.float32)
        mean = r.normal(0.0, 0.1, channels).astype(np.float32)
        var = r.uniform(0.5, 2.0, channels).astype(np.float32)
        names = [self.const(k, v) for k, v in (("gamma", scale), ("beta", shift), ("mean", mean), ("var", var))]
        return self.op("BatchNormalization", [x] + names, epsilon=1e-5)

    def conv_bn(self, x: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1) -> str:
        return self.bn(self.conv(x, cin, cout, k, stride, group), cout)

    def relu(self, x: str) -> str:
        return self.op("Relu", [x])

    def relu6(self, x: str) -> str:
        if not hasattr(self, "_clip"):
            self._clip = (self.const("zero", np.array(0.0, np.float32)), self.const("six", np.array(6.0, np.float32)))
        return self.op("Clip", [x, *self._clip])

    def gemm(self, x: str, fin: int, fout: int) -> str:
        w = self.rng.standard_normal((fout, fin), dtype=np.float32) * np.float32(np.sqrt(2.0 / fin))
        b = self.rng.normal(0.0, 0.01, fout).astype(np.float32)
        return self.op("Gemm", [x, self.const("fc_w", w), self.const("fc_b", b)], transB=1)

    def classifier(self, x: str, channels: int) -> str:
        x = self.op("GlobalAveragePool", [x])
        x = self.op("Flatten", [x], axis=1)
        return self.gemm(x, channels, 1000)

    def model(self, name: str, in_shape: Sequence[int] = IMAGE, out_shape: Optional[Sequence[int]] = None) -> onnx.ModelProto:
        """The finished model; the last node's output becomes the graph output ``output``."""
        inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, list(in_shape))
        self.nodes[-1].output[0] = "output"
        outp = helper.make_tensor_value_info("output", TensorProto.FLOAT, list(out_shape) if out_shape else None)
        graph = helper.make_graph(self.nodes, name, [inp], [outp], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="bnfold-benchmarks")
        model.ir_version = IR_VERSION
        return model


def resnet50() -> onnx.ModelProto:
    b = GraphBuilder()
    x = b.relu(b.conv_bn("input", 3, 64, 7, stride=2))
    x = b.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for j in range(blocks):
            s = stride if j == 0 else 1
            cout = width * 4
            y = b.relu(b.conv_bn(x, cin, width, 1))
            y = b.relu(b.conv_bn(y, width, width, 3, stride=s))
            y = b.conv_bn(y, width, cout, 1)
            shortcut = b.conv_bn(x, cin, cout, 1, stride=s) if j == 0 else x
            x = b.relu(b.op("Add", [y, shortcut]))
            cin = cout
    b.classifier(x, 2048)
    return b.model("resnet50_like", out_shape=[1, 1000])


def vgg11bn() -> onnx.ModelProto:
    b = GraphBuilder()
    x, cin = "input", 3
    for item in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"):
        if item == "M":
            x = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
        else:
            x = b.relu(b.conv_bn(x, cin, item, 3))
            cin = item
    x = b.op("Flatten", [x], axis=1)
    x = b.relu(b.gemm(x, 512 * 7 * 7, 4096))
    x = b.relu(b.gemm(x, 4096, 4096))
    b.gemm(x, 4096, 1000)
    return b.model("vgg11_bn_like", out_shape=[1, 1000])


def mobilenetv2() -> onnx.ModelProto:
    b = GraphBuilder()
    x = b.relu6(b.conv_bn("input", 3, 32, 3, stride=2))
    cin = 32
    for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = cin * t
            y = x
            if t != 1:
                y = b.relu6(b.conv_bn(y, cin, hidden, 1))
            y = b.relu6(b.conv_bn(y, hidden, hidden, 3, stride=stride, group=hidden))
            y = b.conv_bn(y, hidden, c, 1)
            x = b.op("Add", [x, y]) if stride == 1 and cin == c else y
            cin = c
    x = b.relu6(b.conv_bn(x, cin, 1280, 1))
    b.classifier(x, 1280)
    return b.model("mobilenetv2_like", out_shape=[1, 1000])


def chain(nodes: int) -> onnx.ModelProto:
    """``nodes // 3`` triples of Conv(2->2, 1x1) -> BN -> Relu on a 1x2x4x4 input."""
    b = GraphBuilder()
    x = "input"
    for _ in range(max(1, nodes // 3)):
        x = b.relu(b.conv_bn(x, 2, 2, 1))
    return b.model(f"chain_{nodes}", in_shape=[1, 2, 4, 4], out_shape=[1, 2, 4, 4])


XL_CHANNELS = 4096
XL_LAYERS = 34  # 34 x 64 MiB = 2.18 GB of weights, past the 2 GiB protobuf limit


def write_xl_external(path: str, layers: int = XL_LAYERS, channels: int = XL_CHANNELS) -> None:
    """Write the >2 GB model with its weights in ``<path>.data``, one tensor at a time.

    Even-numbered convs are followed by a BN (their weights must be read to fold); the odd ones
    are not, so a streaming folder can copy them through without loading them.
    """
    b = GraphBuilder()
    data_name = os.path.basename(path) + ".data"
    offset = 0
    x = "input"
    with open(path + ".data", "wb") as data:
        for i in range(layers):
            w = b.rng.standard_normal((channels, channels, 1, 1), dtype=np.float32)
            w *= np.float32(np.sqrt(2.0 / channels))
            raw = w.tobytes()
            del w
            name = b.name("w")
            pad = (-offset) % 4096
            data.write(b"\0" * pad)
            offset += pad
            data.write(raw)
            tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[channels, channels, 1, 1])
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += len(raw)
            del raw
            b.inits.append(tensor)
            x = b.op("Conv", [x, name], kernel_shape=[1, 1])
            if i % 2 == 0:
                x = b.bn(x, channels)
            x = b.relu(x)
    model = b.model("xl_external", in_shape=[1, channels, 1, 1], out_shape=[1, channels, 1, 1])
    with open(path, "wb") as f:
        f.write(model.SerializeToString())


BUILDERS: Dict[str, Callable[[], onnx.ModelProto]] = {
    "mobilenetv2": mobilenetv2,
    "resnet50": resnet50,
    "vgg11bn": vgg11bn,
    "chain10k": lambda: chain(10_000),
    "chain100k": lambda: chain(100_000),
}
NAMES = list(BUILDERS) + ["xl_external"]


def build(name: str, path: str) -> None:
    """Write model ``name`` to ``path`` (atomically: a partial file is never left behind)."""
    tmp = path + ".partial"
    if name == "xl_external":
        write_xl_external(tmp)
        os.replace(tmp + ".data", path + ".data")
        # the .onnx file names its data file, so it must be named after the final path
        model = onnx.load(tmp, load_external_data=False)
        for t in model.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = os.path.basename(path) + ".data"
        with open(tmp, "wb") as f:
            f.write(model.SerializeToString())
    else:
        with open(tmp, "wb") as f:
            f.write(BUILDERS[name]().SerializeToString())
    os.replace(tmp, path)


def main(argv: Sequence[str]) -> int:
    if len(argv) != 2 or argv[0] not in NAMES:
        print(f"usage: python benchmarks/models.py {{{','.join(NAMES)}}} OUT.onnx", file=sys.stderr)
        return 2
    build(argv[0], argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

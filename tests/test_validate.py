"""Load-time structural validation (``bnfold.onnx_validate``): malformed graphs are refused
with one line (InputError, exit 2) before any rule runs, and valid models -- the samples,
torch.onnx exports, graphs out of node order, control flow -- are never refused.

Each refusal case starts from a model that folds and breaks one thing, so the refusal is due
to that edit (the baseline test shows the unedited model passes).
"""

from __future__ import annotations

import glob
import io
import os

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from bnfold.cli import main
from bnfold.errors import EXIT_INPUT, InputError
from bnfold.onnx_pass import fold_onnx
from bnfold.onnx_validate import validate_model
from onnx_models import GraphBuilder, assert_equivalent

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def conv_bn_relu() -> onnx.ModelProto:
    b = GraphBuilder(seed=4)
    y = b.conv(b.input("x", [1, 3, 6, 6]), "conv", 3, 4, [3, 3], pads=[1, 1, 1, 1])
    y = b.bn(y, "bn", 4)
    b.node("Relu", [y], "r", "relu")
    b.output("r")
    return b.model()


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def init(model: onnx.ModelProto, name: str) -> TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def set_attr(n: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(n.attribute):
        if a.name == name:
            del n.attribute[i]
            break
    n.attribute.append(helper.make_attribute(name, value))


# ---------------------------------------------------------------- the defects


def _cycle_two_nodes(m):  # conv reads the BN's output: conv -> bn -> conv
    node(m, "conv").input[0] = "bn_out"


def _cycle_self(m):  # relu reads its own output
    node(m, "relu").input[0] = "r"


def _cycle_three_nodes(m):  # conv -> bn -> relu -> conv
    node(m, "conv").input[0] = "r"


def _cycle_through_subgraph(m):
    # an If whose branch reads 'r', computed from the If's own output
    then = helper.make_graph([helper.make_node("Identity", ["r"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    m.graph.input.append(helper.make_tensor_value_info("c", TensorProto.BOOL, []))
    m.graph.node.insert(0, helper.make_node("If", ["c"], ["if_out"], name="if", then_branch=then, else_branch=other))
    node(m, "conv").input[0] = "if_out"


def _cycle_inside_subgraph(m):
    body = helper.make_graph(
        [helper.make_node("Relu", ["b"], ["a"], name="ra"), helper.make_node("Relu", ["a"], ["b"], name="rb")],
        "then", [], [helper.make_tensor_value_info("b", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["r"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    m.graph.input.append(helper.make_tensor_value_info("c", TensorProto.BOOL, []))
    m.graph.node.append(helper.make_node("If", ["c"], ["y2"], name="if", then_branch=body, else_branch=other))


def _bn_no_outputs(m):
    del node(m, "bn").output[:]
    node(m, "relu").input[0] = "conv_out"


def _identity_no_outputs(m):
    m.graph.node.append(helper.make_node("Identity", ["r"], [], name="id"))


def _bn_empty_output(m):
    node(m, "bn").output[0] = ""
    node(m, "relu").input[0] = "conv_out"


def _gemm_one_input(m):
    m.graph.node.append(helper.make_node("Gemm", ["r"], ["g"], name="gemm"))


def _conv_required_input_empty(m):
    node(m, "conv").input[1] = ""


def _bn_too_many_outputs(m):
    node(m, "bn").output.extend(["o1", "o2", "o3", "o4"])


def _duplicate_output(m):
    node(m, "relu").output[0] = "conv_out"  # conv_out is the conv's output already


def _output_shadows_initializer(m):
    node(m, "relu").output[0] = "bn_mean"


def _output_shadows_input(m):
    node(m, "relu").output[0] = "x"


def _two_initializers_one_name(m):
    t = TensorProto()
    t.CopyFrom(init(m, "bn_var"))
    m.graph.initializer.append(t)


def _group(value):
    return lambda m: set_attr(node(m, "conv"), "group", value)


def _ints(name, value):
    return lambda m: set_attr(node(m, "conv"), name, value)


def _epsilon_as_floats(m):
    set_attr(node(m, "bn"), "epsilon", [1e-5, 1e-3])


def _epsilon_untyped(m):
    a = onnx.AttributeProto()
    a.name = "epsilon"
    a.f = 1e-5  # the type field is left UNDEFINED
    n = node(m, "bn")
    for i, old in enumerate(n.attribute):
        if old.name == "epsilon":
            del n.attribute[i]
    n.attribute.append(a)


def _group_as_float(m):
    set_attr(node(m, "conv"), "group", 1.0)


def _dtype(value):
    return lambda m: setattr(init(m, "conv_W"), "data_type", value)


def _constant_dtype_73(m):
    const = helper.make_node("Constant", [], ["k"], name="k", value=helper.make_tensor("k", TensorProto.FLOAT, [1], [2.0]))
    const.attribute[0].t.data_type = 73
    m.graph.node.insert(0, const)


def _value_info_dim(value):
    def edit(m):
        m.graph.value_info.append(helper.make_tensor_value_info("conv_out", TensorProto.FLOAT, [1, value, 6, 6]))
    return edit


def _input_dim_negative(m):
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1


def _value_info_dtype_73(m):
    m.graph.value_info.append(helper.make_tensor_value_info("conv_out", 73, [1, 4, 6, 6]))


DEFECTS = [
    (_cycle_two_nodes, ["cycle"]),
    (_cycle_self, ["cycle"]),
    (_cycle_three_nodes, ["cycle"]),
    (_cycle_through_subgraph, ["cycle"]),
    (_cycle_inside_subgraph, ["cycle", "then_branch"]),
    (_bn_no_outputs, ["BatchNormalization", "0 outputs"]),
    (_identity_no_outputs, ["Identity", "0 outputs"]),
    (_bn_empty_output, ["BatchNormalization", "0 outputs"]),
    (_gemm_one_input, ["Gemm", "1 inputs"]),
    (_conv_required_input_empty, ["required input 1 empty"]),
    (_bn_too_many_outputs, ["BatchNormalization", "5 outputs"]),
    (_duplicate_output, ["conv_out", "assigned once"]),
    (_output_shadows_initializer, ["bn_mean", "assigned once"]),
    (_output_shadows_input, ["'x'", "assigned once"]),
    (_two_initializers_one_name, ["two initializers", "bn_var"]),
    (_group(0), ["group 0"]),
    (_group(-2), ["group -2"]),
    (_ints("kernel_shape", [0, 3]), ["kernel_shape"]),
    (_ints("strides", [1, -1]), ["strides"]),
    (_ints("dilations", [0, 1]), ["dilations"]),
    (_ints("pads", [1, 1, -1, 1]), ["pads"]),
    (_epsilon_as_floats, ["epsilon", "FLOATS"]),
    (_epsilon_untyped, ["epsilon", "no type"]),
    (_group_as_float, ["group", "FLOAT"]),
    (_dtype(73), ["conv_W", "unknown element type 73"]),
    (_dtype(0), ["conv_W", "no element type"]),
    (_constant_dtype_73, ["Constant", "73"]),
    (_value_info_dim(-3), ["conv_out", "-3"]),
    (_value_info_dim(-2), ["conv_out", "-2"]),
    (_value_info_dtype_73, ["conv_out", "73"]),
]


@pytest.mark.parametrize("defect, words", DEFECTS, ids=[d.__name__.strip("_") if d.__name__ != "<lambda>" else f"attr-{i}" for i, (d, _) in enumerate(DEFECTS)])
def test_malformed_model_is_refused(tmp_path, defect, words) -> None:
    model = conv_bn_relu()
    defect(model)
    with pytest.raises(InputError) as info:
        validate_model(model)
    message = str(info.value)
    assert "\n" not in message and message.startswith("invalid model: ")
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    # the API refuses it before any rule runs, whether given a ModelProto or a path
    with pytest.raises(InputError):
        fold_onnx(model)
    path = tmp_path / "bad.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(InputError):
        fold_onnx(path)
    # the CLI: exit 2, one line, no output file
    out = tmp_path / "out" / "folded.onnx"
    out.parent.mkdir()
    result = CliRunner().invoke(main, [str(path), "-o", str(out)], catch_exceptions=False)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == EXIT_INPUT, result.stderr
    assert len(lines) == 1 and lines[0].startswith("bnfold: error: invalid model"), result.stderr
    assert list(out.parent.iterdir()) == []


def test_the_unedited_model_is_valid_and_folds() -> None:
    model = conv_bn_relu()
    validate_model(model)
    folded, report = fold_onnx(model)
    assert [f.bn for f in report.folded] == ["bn"]
    assert_equivalent(model, folded)


@pytest.mark.parametrize("defect", [_input_dim_negative, _value_info_dim(-1)], ids=["input", "value-info"])
def test_dims_written_minus_one_are_unknown_not_invalid(defect) -> None:
    """paddle2onnx writes unknown dims as -1 and onnxruntime runs such models: they fold (issue 13)."""
    model = conv_bn_relu()
    defect(model)
    validate_model(model)
    folded, report = fold_onnx(model)
    assert [f.bn for f in report.folded] == ["bn"]
    for m in (model, folded):  # the test's input generator needs a number there
        m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    assert_equivalent(model, folded)


@pytest.mark.parametrize("old", [b"bn_out", b"\x1a\x04relu"], ids=["value-name", "node-name"])
def test_invalid_utf8_name_through_a_path(tmp_path, old) -> None:
    """fold_onnx(path) on a name that is not UTF-8 (protobuf hands it back as bytes): one
    InputError, not a UnicodeDecodeError from a rewrite."""
    data = conv_bn_relu().SerializeToString()
    assert old in data
    path = tmp_path / "bad.onnx"
    path.write_bytes(data.replace(old, old[:-1] + b"\xff"))
    with pytest.raises(InputError, match="UTF-8"):
        fold_onnx(path)


# ---------------------------------------------------------------- valid models pass


def test_sample_models_are_valid() -> None:
    paths = sorted(glob.glob(os.path.join(ROOT, "sample_models", "*.onnx")))
    assert paths
    for path in paths:
        validate_model(onnx.load(path))


def test_nodes_out_of_order_are_not_a_cycle() -> None:
    """ONNX asks for sorted nodes, but onnxruntime sorts them itself: out of order is no cycle."""
    model = conv_bn_relu()
    nodes = list(model.graph.node)[::-1]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    validate_model(model)
    folded, report = fold_onnx(model)
    assert_equivalent(model, folded)


def test_allowed_forms_pass() -> None:
    """Forms that look odd but are valid: an initializer that an input overrides, omitted
    optional inputs and outputs, unknown and custom-domain ops, symbolic and zero dims,
    an attribute unknown to the schema, BN's optional training outputs omitted with ''."""
    model = conv_bn_relu()
    g = model.graph
    g.input.append(helper.make_tensor_value_info("bn_mean", TensorProto.FLOAT, [4]))  # overridable
    g.node.append(helper.make_node("Clip", ["r", "", ""], ["clipped"], name="clip"))
    g.node.append(helper.make_node("Dropout", ["r"], ["d", ""], name="drop"))
    g.node.append(helper.make_node("Whatever", ["r"], [], name="custom", domain="my.domain"))
    g.node.append(helper.make_node("NoSuchOp", ["r"], ["n"], name="unknown"))
    node(model, "bn").output.extend(["", ""])
    g.value_info.append(helper.make_tensor_value_info("conv_out", TensorProto.FLOAT, ["N", 4, 0, "W"]))
    validate_model(model)


def test_subgraph_reads_outer_values() -> None:
    """An If branch reading a value of the main graph (defined before or after the If in node
    order, without a cycle) and shadowing nothing is valid."""
    model = conv_bn_relu()
    then = helper.make_graph([helper.make_node("Relu", ["bn_out"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    model.graph.input.append(helper.make_tensor_value_info("c", TensorProto.BOOL, []))
    model.graph.node.insert(0, helper.make_node("If", ["c"], ["y2"], name="if", then_branch=then, else_branch=other))
    validate_model(model)


def _torch_modules(torch):
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.up, self.bn2 = nn.ConvTranspose2d(8, 4, 3, groups=2), nn.BatchNorm2d(4)
            self.fc, self.bn1 = nn.Linear(4, 5), nn.BatchNorm1d(5)
            self.rnn = nn.LSTM(5, 6, batch_first=True)

        def forward(self, x):
            y = self.bn2(self.up(torch.relu(self.bn(self.conv(x)))))
            z = self.bn1(self.fc(y.mean((2, 3))))
            out, _ = self.rnn(z.unsqueeze(1))
            return out, y.flatten(1)

    class Branchy(nn.Module):
        def forward(self, x, n: int):
            if bool(x.sum() > 0):
                x = x * 2
            for i in range(n):
                x = x + i
            return x

    return [
        (Net().eval(), (torch.randn(2, 3, 8, 8),), {"dynamic_axes": {"x": {0: "N"}}, "input_names": ["x"]}),
        (torch.jit.script(Branchy()), (torch.randn(3), 2), {}),
    ]


@pytest.mark.parametrize("opset", [9, 13, 17])
def test_torch_onnx_exports_are_valid(opset) -> None:
    torch = pytest.importorskip("torch")
    for module, args, extra in _torch_modules(torch):
        f = io.BytesIO()
        torch.onnx.export(module, args, f, opset_version=opset, dynamo=False, **extra)
        model = onnx.load_from_string(f.getvalue())
        validate_model(model)
        if opset >= 13:
            fold_onnx(model)


def test_validation_reads_no_weights() -> None:
    """Validation looks at element types only: weights kept on disk (data stripped) pass."""
    model = conv_bn_relu()
    for t in model.graph.initializer:
        t.ClearField("raw_data")
        t.ClearField("float_data")
    validate_model(model)

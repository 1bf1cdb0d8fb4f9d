"""bnfold's own ONNX message classes (bnfold.onnx_proto): the same schema and the same bytes as
onnx's, and helpers that build what onnx's helpers build."""

from __future__ import annotations

import glob
import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnx import onnx_ml_pb2

from bnfold import onnx_proto

SAMPLES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "sample_models", "*.onnx")))


def _fields(descriptor):
    return {f.name: (f.number, f.type, f.message_type.name if f.message_type else None,
                     f.enum_type.name if f.enum_type else None) for f in descriptor.fields}


def test_schema_has_every_field_of_onnx_schema():
    """A field onnx knows and bnfold's copy does not would be invisible to bnfold: regenerate
    with tools/gen_onnx_proto.py when this fails after an onnx upgrade."""
    from bnfold import _onnx_ml_pb2

    ours = _onnx_ml_pb2.DESCRIPTOR
    assert ours.package == "bnfold.onnx" and ours.package != onnx_ml_pb2.DESCRIPTOR.package

    def walk(theirs, mine, path):
        for name, msg in theirs.message_types_by_name.items() if hasattr(theirs, "message_types_by_name") else \
                [(m.name, m) for m in theirs.nested_types]:
            other = (mine.message_types_by_name if hasattr(mine, "message_types_by_name")
                     else {m.name: m for m in mine.nested_types}).get(name)
            assert other is not None, f"{path}{name} missing"
            assert _fields(msg) == _fields(other), f"{path}{name} differs"
            walk(msg, other, f"{path}{name}.")

    walk(onnx_ml_pb2.DESCRIPTOR, ours, "")
    for enum in onnx_ml_pb2.TensorProto.DESCRIPTOR.enum_types:
        mine = onnx_proto.TensorProto.DESCRIPTOR.enum_types_by_name[enum.name]
        assert {v.name: v.number for v in enum.values} == {v.name: v.number for v in mine.values}


@pytest.mark.parametrize("path", SAMPLES, ids=os.path.basename)
def test_same_bytes_both_ways(path):
    data = onnx.load(path).SerializeToString(deterministic=True)
    ours = onnx_proto.ModelProto.FromString(data)
    assert ours.SerializeToString(deterministic=True) == data
    back = onnx_proto.to_onnx(ours)
    assert isinstance(back, onnx.ModelProto) and back.SerializeToString(deterministic=True) == data
    assert onnx_proto.to_bnfold(back).SerializeToString(deterministic=True) == data


def test_the_two_families_do_not_mix_and_convert_moves_across():
    graph = onnx_proto.GraphProto()
    with pytest.raises(TypeError):
        graph.node.append(helper.make_node("Relu", ["x"], ["y"]))
    # (upb leaves an empty node behind a failed append: a mixed-up tree is corrupt, not just refused)
    graph = onnx_proto.GraphProto()
    graph.node.append(onnx_proto.to_bnfold(helper.make_node("Relu", ["x"], ["y"])))
    assert [n.op_type for n in graph.node] == ["Relu"]
    with pytest.raises(TypeError):
        onnx_proto.convert(graph, onnx.ModelProto)


def test_both_families_coexist_in_one_process():
    """Imported together (the user's program imports onnx) they share protobuf's default pool."""
    model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    assert onnx_proto.to_bnfold(model).graph.name == "g"


ALL_TYPES = [v.number for v in onnx_ml_pb2.TensorProto.DataType.DESCRIPTOR.values
             if v.name not in ("UNDEFINED", "STRING")]


@pytest.mark.parametrize("data_type", ALL_TYPES)
def test_dtype_tables_agree_with_onnx(data_type):
    try:
        theirs = np.dtype(helper.tensor_dtype_to_np_dtype(data_type))
    except Exception:
        pytest.skip("onnx has no numpy type for it")
    if data_type in onnx_proto.SUB_BYTE_TYPES:
        assert data_type not in onnx_proto.ITEMSIZE
        return
    assert onnx_proto.ITEMSIZE.get(data_type) == theirs.itemsize
    assert onnx_proto.tensor_dtype_to_np_dtype(data_type) == theirs
    if data_type in onnx_proto.NP_DTYPES:
        assert onnx_proto.np_dtype_to_tensor_dtype(theirs) == int(helper.np_dtype_to_tensor_dtype(theirs))


NATIVE = sorted(onnx_proto.NP_DTYPES.items())


@pytest.mark.parametrize("data_type,dtype", NATIVE, ids=[str(d) for _, d in NATIVE])
def test_arrays_round_trip_like_numpy_helper(data_type, dtype):
    rng = np.random.default_rng(data_type)
    array = (rng.standard_normal((2, 3, 4)) * 50).astype(dtype)
    theirs = numpy_helper.from_array(array, "w")
    ours = onnx_proto.from_array(array, "w")
    assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(deterministic=True)
    np.testing.assert_array_equal(onnx_proto.to_array(ours), array)
    # typed-field storage, as some exporters write it
    typed = helper.make_tensor("t", data_type, array.shape, array.flatten().tolist()
                               if data_type not in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128)
                               else array.flatten())
    expect = numpy_helper.to_array(typed)
    got = onnx_proto.to_array(onnx_proto.to_bnfold(typed))
    assert got.dtype == expect.dtype
    np.testing.assert_array_equal(got, expect)


def test_rare_types_fall_back_to_onnx():
    strings = numpy_helper.from_array(np.array(["a", "bc"], dtype=object), "s")
    assert list(onnx_proto.to_array(onnx_proto.to_bnfold(strings))) == ["a", "bc"]
    bf16 = helper.make_tensor("b", onnx.TensorProto.BFLOAT16, [2], [1.0, -2.0])
    np.testing.assert_array_equal(onnx_proto.to_array(onnx_proto.to_bnfold(bf16)).astype(np.float32), [1.0, -2.0])


ATTRIBUTE_VALUES = [1, -7, 2.5, "same_upper", b"raw", [1, 2, 3], [0.5, 1.5], ["a", "b"],
                    np.int64(3), np.float32(0.25)]


@pytest.mark.parametrize("value", ATTRIBUTE_VALUES, ids=repr)
def test_nodes_and_attributes_match_onnx_helper(value):
    theirs = helper.make_node("Op", ["a", "b"], ["c"], name="n", domain="d", z=value, a=1, skip=None)
    ours = onnx_proto.make_node("Op", ["a", "b"], ["c"], name="n", domain="d", z=value, a=1, skip=None)
    assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(deterministic=True)
    for mine, other in zip(ours.attribute, theirs.attribute):
        assert onnx_proto.get_attribute_value(mine) == helper.get_attribute_value(other)


def test_tensor_and_graph_attributes_match_onnx_helper():
    t = numpy_helper.from_array(np.arange(3, dtype=np.float32), "t")
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "body", [], [])
    for value in (t, g, [t, t]):
        theirs = helper.make_attribute("v", value)
        ours = onnx_proto.make_attribute("v", value)
        assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(deterministic=True)
    with pytest.raises(ValueError):
        onnx_proto.make_attribute("empty", [])
    assert onnx_proto.make_attribute("empty", [], attr_type=onnx.AttributeProto.INTS).type == onnx.AttributeProto.INTS


@pytest.mark.parametrize("shape", [None, [], [1, 3], ["N", None, 4]], ids=repr)
def test_value_infos_match_onnx_helper(shape):
    theirs = helper.make_tensor_value_info("v", onnx.TensorProto.FLOAT, shape)
    ours = onnx_proto.make_tensor_value_info("v", onnx.TensorProto.FLOAT, shape)
    assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(deterministic=True)


def test_shape_inference_keeps_the_family():
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
    inferred = onnx_proto.infer_shapes(onnx_proto.to_bnfold(model))
    assert onnx_proto.is_bnfold_message(inferred)
    dims = [d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim]
    assert dims == [2, 3]

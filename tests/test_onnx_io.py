"""The file layer: lazy reading, copy-through writing, spilled weights, external data.

The lazy path must give exactly the model the eager path gives; these tests compare the two
byte for byte after a fold, and run the results with onnxruntime (optimizations disabled).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from bnfold.onnx_io import load_model, read_model_lazy, save_model, write_streaming
from bnfold.onnx_pass import fold_onnx
from bnfold.pipeline import fold_file
from bnfold.onnx_wire import LAZY_MIN_BYTES, is_stub
from onnx_models import GraphBuilder, assert_equivalent


@pytest.fixture(autouse=True)
def lazy_for_small_files(monkeypatch):
    """Small files are normally parsed whole; these tests need the lazy path on small models."""
    monkeypatch.setattr("bnfold.onnx_io.LAZY_FILE_MIN_BYTES", 0)


def big_model(blocks: int = 3, c: int = 32) -> onnx.ModelProto:
    """Conv->BN->Relu blocks with weights above the lazy threshold, plus one conv without BN
    (its weight must be copied through untouched)."""
    g = GraphBuilder(seed=5)
    h = g.input("x", [1, c, 6, 6])
    for i in range(blocks):
        h = g.conv(h, f"conv{i}", c, c, (3, 3), pads=[1, 1, 1, 1])
        h = g.bn(h, f"bn{i}", c)
        h = g.node("Relu", [h], f"r{i}", f"relu{i}").output[0]
    h = g.conv(h, "plain", c, c, (3, 3), pads=[1, 1, 1, 1])
    g.output(h)
    model = g.model()
    assert any(len(t.raw_data) >= LAZY_MIN_BYTES for t in model.graph.initializer)
    return model


def test_lazy_read_leaves_large_weights_on_disk(tmp_path):
    path = str(tmp_path / "m.onnx")
    onnx.save(big_model(), path)
    lazy, files = read_model_lazy(path)
    assert files == set()
    stubs = [t for t in lazy.graph.initializer if is_stub(t)]
    assert stubs and all(not t.raw_data for t in stubs)
    eager = load_model(path)
    assert [t.name for t in lazy.graph.initializer] == [t.name for t in eager.graph.initializer]


def test_file_fold_matches_in_memory_fold_byte_for_byte(tmp_path):
    model = big_model()
    src, dst, ref = (str(tmp_path / n) for n in ("m.onnx", "lazy.onnx", "eager.onnx"))
    onnx.save(model, src)
    report = fold_file(src, dst)
    folded, _ = fold_onnx(model)
    save_model(folded, ref)
    assert report.n_folded == 3
    assert open(dst, "rb").read() == open(ref, "rb").read()
    assert_equivalent(model, onnx.load(dst))


def test_streamed_bytes_parse_to_the_same_model(tmp_path):
    model = big_model(blocks=1)
    path = tmp_path / "s.onnx"
    with open(path, "wb") as f:
        write_streaming(model, f)
    assert onnx.load(str(path)) == model


def test_no_scratch_or_staging_files_are_left(tmp_path):
    src = str(tmp_path / "m.onnx")
    onnx.save(big_model(), src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    fold_file(src, str(out_dir / "f.onnx"))
    assert sorted(os.listdir(out_dir)) == ["f.onnx"]


def test_external_data_model_folds_and_keeps_untouched_bytes(tmp_path):
    model = big_model()
    src_dir, out_dir = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    src = str(src_dir / "m.onnx")
    on_disk = onnx.ModelProto()
    on_disk.CopyFrom(model)  # save_model moves the tensors of the model it is given out of it
    onnx.save_model(on_disk, src, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.data", size_threshold=0)
    data_before = (src_dir / "m.data").read_bytes()
    dst = str(out_dir / "f.onnx")
    report = fold_file(src, dst)
    assert report.n_folded == 3
    assert (src_dir / "m.data").read_bytes() == data_before  # the input is never modified
    assert sorted(os.listdir(out_dir)) == ["f.onnx", "f.onnx.data"]
    folded = onnx.load(dst)  # reads f.onnx.data beside it
    assert_equivalent(model, folded)
    plain = {t.name: t for t in model.graph.initializer}
    kept = {t.name: t for t in folded.graph.initializer if t.name in plain}
    assert any("plain" in n for n in kept)  # the conv without BN keeps its weight
    for name, t in kept.items():
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), onnx.numpy_helper.to_array(plain[name]))


def test_output_onto_the_input_data_file_is_refused(tmp_path):
    src = str(tmp_path / "m.onnx")
    onnx.save_model(big_model(), src, save_as_external_data=True, location="out.onnx.data", size_threshold=0)
    before = (tmp_path / "out.onnx.data").read_bytes()
    from bnfold.errors import OutputError

    with pytest.raises(OutputError):
        fold_file(src, str(tmp_path / "out.onnx"))
    assert (tmp_path / "out.onnx.data").read_bytes() == before
    assert not (tmp_path / "out.onnx").exists()


def test_non_float_stub_reads_back(tmp_path):
    """A large integer initializer goes lazy too and must survive the round trip."""
    g = GraphBuilder(seed=1)
    x = g.input("x", [1, 3, 4, 4])
    g.output(g.bn(g.conv(x, "conv", 3, 4, (1, 1)), "bn", 4))
    model = g.model()
    big_int = onnx.numpy_helper.from_array(np.arange(5000, dtype=np.int64), "lookup")
    model.graph.initializer.append(big_int)
    model.graph.output.append(onnx.helper.make_tensor_value_info("lookup", TensorProto.INT64, [5000]))
    src, dst = str(tmp_path / "m.onnx"), str(tmp_path / "f.onnx")
    onnx.save(model, src)
    fold_file(src, dst)
    out = onnx.load(dst)
    got = {t.name: t for t in out.graph.initializer}["lookup"]
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(got), np.arange(5000))


def test_small_model_file_keeps_its_external_data_on_disk(tmp_path, monkeypatch):
    """A model file parsed whole (small) may still point at gigabytes of external data: those
    tensors must stay on disk as stubs, not be loaded."""
    monkeypatch.setattr("bnfold.onnx_io.LAZY_FILE_MIN_BYTES", 1 << 40)
    model = big_model()
    src = str(tmp_path / "m.onnx")
    onnx.save_model(model, src, save_as_external_data=True, location="m.data", size_threshold=0)
    lazy, files = read_model_lazy(src)
    assert files == {os.path.realpath(str(tmp_path / "m.data"))}
    assert all(is_stub(t) for t in lazy.graph.initializer)
    dst = str(tmp_path / "f.onnx")
    fold_file(src, dst)
    assert_equivalent(onnx.load(src), onnx.load(dst))


def test_writer_switches_to_external_data_past_the_protobuf_limit(tmp_path, monkeypatch):
    """external=None: inline below the limit, external data above it; external=False refuses."""
    from bnfold import onnx_io
    from bnfold.errors import OutputError

    model = big_model(blocks=1)
    inline = str(tmp_path / "inline.onnx")
    onnx_io.write_model(model, inline)
    assert not os.path.exists(inline + ".data")
    assert onnx.load(inline) == model
    size = os.path.getsize(inline)
    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", size - 1)
    with pytest.raises(OutputError):
        onnx_io.write_model(model, str(tmp_path / "refused.onnx"), external=False)
    out = str(tmp_path / "big.onnx")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx_io.write_model(copy, out)
    assert os.path.exists(out + ".data")
    assert_equivalent(model, onnx.load(out))
    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", size)
    onnx_io.write_model(model, str(tmp_path / "exact.onnx"))  # exactly at the limit: still inline
    assert not os.path.exists(str(tmp_path / "exact.onnx.data"))

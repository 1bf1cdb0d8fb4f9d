"""Hostile and broken input to ``bnfold``: unsafe external data, corrupt files, absurd sizes,
deep nesting, and the output contract (atomic, never over the input, replaced only on success).

Every case runs the CLI in-process (click's CliRunner, ``catch_exceptions=False``) and asserts
the documented exit code, one ``bnfold: error:`` line, no traceback, no file left behind, and
the input (model and data file) byte-for-byte unchanged. Known bugs are ``xfail(strict=True)``
with the BUGS.md number in the reason.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import resource
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from bnfold.cli import main
from bnfold.errors import EXIT_EXTERNAL_DATA, EXIT_INPUT, EXIT_LIMIT, EXIT_MISMATCH, EXIT_OK, EXIT_OUTPUT
from onnx_models import GraphBuilder, assert_equivalent

DATA = "weights.bin"


# ---------------------------------------------------------------- models and helpers


def conv_bn(input_shape=(1, 3, 8, 8)) -> onnx.ModelProto:
    b = GraphBuilder(seed=3)
    y = b.conv(b.input("x", list(input_shape)), "conv", 3, 4, [3, 3])
    b.output(b.bn(y, "bn", 4))
    return b.model(check=False)


def save_external(model: onnx.ModelProto, folder: Path, name: str = "model.onnx", location: str = DATA) -> Path:
    """Save with every tensor in ``folder/<location>``; return the model path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=location, size_threshold=0)
    return path


def edit_external(path: Path, tensor: str, **entries: str) -> None:
    """Set external-data keys (location, offset, length) of one tensor of the model at ``path``."""
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        if t.name == tensor:
            current = {e.key: e.value for e in t.external_data}
            current.update(entries)
            del t.external_data[:]
            for key, value in current.items():
                e = t.external_data.add()
                e.key, e.value = key, value
    path.write_bytes(model.SerializeToString())


def snapshot(folder: Path) -> Dict[str, str]:
    """sha256 of every file under ``folder`` (links are not followed), by relative path."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def bnfold(*args: str):
    """Run the CLI in-process; an exception escaping it fails the test."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_refused(result, code: int, *words: str) -> str:
    """One ``bnfold: error:`` line on stderr, exit ``code``, no traceback; returns the line."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == code, f"exit {result.exit_code} (want {code}): {result.stderr.strip()}"
    assert "Traceback" not in result.output + result.stderr
    assert len(lines) == 1 and lines[0].startswith("bnfold: error: "), result.stderr
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


def run_refused(tmp_path: Path, model_path: Path, code: int, *words: str) -> None:
    """Fold ``model_path`` into ``tmp_path/out``; assert the refusal left everything as it was."""
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    before = snapshot(tmp_path)
    result = bnfold(model_path, "-o", out_dir / "folded.onnx")
    assert_refused(result, code, *words)
    assert snapshot(tmp_path) == before, "a refused run changed or left files"
    assert list(out_dir.iterdir()) == []


# ---------------------------------------------------------------- external data: refused


@pytest.fixture
def ext_model(tmp_path) -> Path:
    return save_external(conv_bn(), tmp_path / "model")


def test_external_data_baseline_folds(tmp_path, ext_model) -> None:
    """The unedited model folds: so every refusal below is due to its one edit."""
    out = tmp_path / "out" / "folded.onnx"
    out.parent.mkdir()
    before = snapshot(ext_model.parent)
    result = bnfold(ext_model, "-o", out)
    assert result.exit_code == EXIT_OK, result.stderr
    assert snapshot(ext_model.parent) == before, "the input or its data file changed"
    # external data in, external data out: written only inside the output's folder, beside it
    assert sorted(p.name for p in out.parent.iterdir()) == ["folded.onnx", "folded.onnx.data"]
    folded = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in folded.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations <= {"folded.onnx.data"}
    assert_equivalent(onnx.load(str(ext_model)), onnx.load(str(out)))


@pytest.mark.parametrize(
    "entries, words",
    [
        ({"location": "/etc/hostname"}, ["absolute"]),
        ({"location": "../secret.bin"}, ["leaves the model's folder"]),
        ({"location": "sub/../../secret.bin"}, ["leaves the model's folder"]),
        ({"location": "missing.bin"}, ["missing"]),
        ({"location": "."}, ["missing"]),
        ({"location": ""}, ["location"]),
        ({"offset": "100000"}, ["past the end"]),
        ({"length": "100000"}, ["past the end"]),
        ({"offset": str(10**30)}, ["past the end"]),
        ({"offset": "-8"}, ["negative"]),
        ({"offset": "twelve"}, ["not a number"]),
        pytest.param({"location": "weights.bin\0x"}, []),
    ],
    ids=lambda v: repr(v)[:40],
)
def test_unsafe_external_data_is_refused(tmp_path, ext_model, entries, words) -> None:
    (tmp_path / "secret.bin").write_bytes(b"\0" * 4096)
    edit_external(ext_model, "conv_W", **entries)
    run_refused(tmp_path, ext_model, EXIT_EXTERNAL_DATA, "conv_W", *words)


def test_external_data_missing_file(tmp_path, ext_model) -> None:
    (ext_model.parent / DATA).unlink()
    run_refused(tmp_path, ext_model, EXIT_EXTERNAL_DATA, "missing")


@pytest.mark.parametrize("via", ["file", "folder"])
def test_symbolic_link_out_of_the_folder_is_refused(tmp_path, ext_model, via) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / DATA).write_bytes((ext_model.parent / DATA).read_bytes())  # real data: only the link is wrong
    if via == "file":
        (ext_model.parent / "link.bin").symlink_to(outside / DATA)
        location = "link.bin"
    else:
        (ext_model.parent / "d").symlink_to(outside, target_is_directory=True)
        location = f"d/{DATA}"
    for name in ("conv_W", "conv_B", "bn_scale", "bn_B", "bn_mean", "bn_var"):
        edit_external(ext_model, name, location=location)
    run_refused(tmp_path, ext_model, EXIT_EXTERNAL_DATA, "symbolic link")


def test_symbolic_link_inside_the_folder_is_followed(tmp_path, ext_model) -> None:
    (ext_model.parent / "alias.bin").symlink_to(DATA)
    edit_external(ext_model, "conv_W", location="alias.bin")
    out = tmp_path / "folded.onnx"
    assert bnfold(ext_model, "-o", out).exit_code == EXIT_OK


def test_external_data_shorter_than_the_tensor(tmp_path, ext_model) -> None:
    """A length that fits the file but not the tensor: refused, never a half-read tensor folded."""
    edit_external(ext_model, "conv_W", length="8")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = bnfold(ext_model, "-o", out_dir / "f.onnx")
    assert result.exit_code in (EXIT_INPUT, EXIT_EXTERNAL_DATA)
    assert_refused(result, result.exit_code)
    assert list(out_dir.iterdir()) == []


# ---------------------------------------------------------------- broken files


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", ["not an ONNX model"]),
        (b"hello, I am not a model", ["not an ONNX model"]),
        (b"\0" * 64, ["not an ONNX model"]),
        (b"\xff" * 64, ["not an ONNX model"]),
        ("half", ["not an ONNX model"]),
        ("all-but-one", ["not an ONNX model"]),
    ],
    ids=["empty", "text", "zeros", "ones", "truncated-half", "truncated-last-byte"],
)
def test_corrupt_files_are_refused(tmp_path, content, words) -> None:
    if isinstance(content, str):
        good = conv_bn().SerializeToString()
        content = good[: len(good) // 2] if content == "half" else good[:-1]
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    run_refused(tmp_path, path, EXIT_INPUT, *words)


def test_missing_file_and_directory(tmp_path) -> None:
    run_refused(tmp_path, tmp_path / "nope.onnx", EXIT_INPUT, "no such file")
    (tmp_path / "dir.onnx").mkdir()
    run_refused(tmp_path, tmp_path / "dir.onnx", EXIT_INPUT, "directory")


def test_a_pickle_is_never_unpickled(tmp_path) -> None:
    """A .pt file is refused by name: unpickling would run the payload (here: create a file)."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps(Payload()))
    run_refused(tmp_path, path, EXIT_INPUT, "pickle")
    assert not marker.exists()


def _cut_raw(model: onnx.ModelProto, name: str, keep: int) -> onnx.ModelProto:
    for t in model.graph.initializer:
        if t.name == name:
            t.raw_data = t.raw_data[:keep]
    return model


def test_size_mismatch_is_refused_with_the_check(tmp_path) -> None:
    path = tmp_path / "model.onnx"
    onnx.save(_cut_raw(conv_bn(), "conv_W", 100), str(path))
    run_refused(tmp_path, path, EXIT_INPUT)


def test_size_mismatch_is_refused_without_the_check(tmp_path) -> None:
    path = tmp_path / "model.onnx"
    onnx.save(_cut_raw(conv_bn(), "conv_W", 100), str(path))
    run_refused_extra(tmp_path, path, EXIT_INPUT, "--no-check")


def run_refused_extra(tmp_path: Path, model_path: Path, code: int, *extra: str) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    result = bnfold(model_path, "-o", out_dir / "folded.onnx", *extra)
    assert_refused(result, code)
    assert list(out_dir.iterdir()) == []


def _absurd_dims(model: onnx.ModelProto, dims: List[int]) -> onnx.ModelProto:
    for t in model.graph.initializer:
        if t.name == "conv_W":
            del t.dims[:]
            t.dims.extend(dims)
    return model


@pytest.mark.parametrize("dims", [[4, 3, 3, 3 * 10**9], [2**31, 2**31, 2**31]], ids=["billions", "overflowing"])
def test_absurd_tensor_dims_do_not_exhaust_memory(tmp_path, dims) -> None:
    """A tensor claiming billions of elements over 432 bytes: a clean error, not an allocation."""
    path = tmp_path / "model.onnx"
    onnx.save(_absurd_dims(conv_bn(), dims), str(path))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = bnfold(path, "-o", out_dir / "f.onnx")
    assert result.exit_code in (EXIT_INPUT, EXIT_LIMIT, EXIT_EXTERNAL_DATA)
    assert_refused(result, result.exit_code)
    assert list(out_dir.iterdir()) == []


def test_absurd_tensor_dims_exit_code_is_the_limit_code(tmp_path) -> None:
    path = tmp_path / "model.onnx"
    onnx.save(_absurd_dims(conv_bn(), [4, 3, 3, 3 * 10**9]), str(path))
    run_refused(tmp_path, path, EXIT_LIMIT)


def test_absurd_tensor_dims_in_a_memory_capped_process(tmp_path) -> None:
    """Same model in a subprocess limited to 3 GiB of address space: a clean exit, never a kill."""
    path = tmp_path / "model.onnx"
    onnx.save(_absurd_dims(conv_bn(), [4, 3, 3, 3 * 10**9]), str(path))

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    proc = subprocess.run(
        [sys.executable, "-c", "from bnfold.cli import main; main()", str(path), "-o", str(tmp_path / "f.onnx")],
        capture_output=True, text=True, timeout=120, preexec_fn=cap,
    )
    assert proc.returncode in (EXIT_INPUT, EXIT_LIMIT, EXIT_EXTERNAL_DATA), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "f.onnx").exists()


def test_absurd_input_shape_is_a_limit(tmp_path) -> None:
    path = tmp_path / "model.onnx"
    onnx.save(conv_bn(input_shape=(100000, 3, 10000, 10000)), str(path))
    run_refused(tmp_path, path, EXIT_LIMIT)


def test_negative_input_dim_is_bad_input(tmp_path) -> None:
    path = tmp_path / "model.onnx"
    onnx.save(conv_bn(input_shape=(-5, 3, 8, 8)), str(path))
    run_refused(tmp_path, path, EXIT_INPUT)


# ---------------------------------------------------------------- deep nesting


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint((number << 3) | 2) + _varint(len(payload)) + payload


def nested_if_model(depth: int) -> bytes:
    """A model whose graph holds an If whose then_branch holds an If ... ``depth`` deep.

    Built from raw protobuf bytes: onnx's own serializer refuses messages nested this deep.
    """
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"], name="leaf")], "leaf", [], [out])
    graph = g.SerializeToString()
    for _ in range(depth):
        attr = _field(1, b"then_branch") + _varint(20 << 3) + _varint(AttributeProto_GRAPH) + _field(6, graph)
        node = _field(1, b"c") + _field(2, b"y") + _field(4, b"If") + _field(5, attr)
        graph = _field(1, node) + _field(2, b"g") + _field(12, out.SerializeToString())
    head = helper.make_model(helper.make_graph([], "m", [], []), opset_imports=[helper.make_opsetid("", 17)])
    head.ClearField("graph")
    return head.SerializeToString() + _field(7, graph)


AttributeProto_GRAPH = onnx.AttributeProto.GRAPH


def test_moderate_nesting_is_processed(tmp_path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(nested_if_model(25))
    result = bnfold(path, "-o", tmp_path / "f.onnx", "--no-check")
    assert result.exit_code == EXIT_OK, result.stderr


@pytest.mark.parametrize("depth", [40, 3000])
def test_deep_nesting_is_a_clean_error(tmp_path, depth) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(nested_if_model(depth))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = bnfold(path, "-o", out_dir / "f.onnx")
    assert result.exit_code in (EXIT_INPUT, EXIT_LIMIT)
    assert_refused(result, result.exit_code)
    assert list(out_dir.iterdir()) == []


def test_deep_nesting_exit_code_is_the_limit_code(tmp_path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(nested_if_model(40))
    run_refused(tmp_path, path, EXIT_LIMIT, "nested")


# ---------------------------------------------------------------- the output contract


@pytest.fixture
def plain_model(tmp_path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(conv_bn(), str(path))
    return path


def test_output_naming_the_input_is_refused(tmp_path, plain_model) -> None:
    run_refused_out(tmp_path, plain_model, plain_model, EXIT_OUTPUT, "overwrite the input")


def test_output_through_a_link_to_the_input_is_refused(tmp_path, plain_model) -> None:
    link = tmp_path / "link.onnx"
    link.symlink_to(plain_model)
    run_refused_out(tmp_path, plain_model, link, EXIT_OUTPUT, "overwrite the input")


def test_output_over_the_input_data_file_is_refused(tmp_path, ext_model) -> None:
    # the output *is* the input's data file
    run_refused_out(tmp_path, ext_model, ext_model.parent / DATA, EXIT_OUTPUT, "overwrite")
    # the output's own data file (OUT.data) would be the input's data file
    other = save_external(conv_bn(), tmp_path / "other", location="f.onnx.data")
    run_refused_out(tmp_path, other, other.parent / "f.onnx", EXIT_OUTPUT, "overwrite")


def run_refused_out(tmp_path: Path, model: Path, out: Path, code: int, *words: str) -> None:
    before = snapshot(tmp_path)
    assert_refused(bnfold(model, "-o", out), code, *words)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["missing-folder", "is-a-directory"])
def test_unwritable_output_is_refused(tmp_path, plain_model, where) -> None:
    if where == "missing-folder":
        out = tmp_path / "no" / "such" / "f.onnx"
    else:
        out = tmp_path / "adir"
        out.mkdir()
    before = snapshot(tmp_path)
    result = bnfold(plain_model, "-o", out)
    assert result.exit_code in (EXIT_OUTPUT, EXIT_INPUT), result.stderr  # click may call a directory a usage error
    assert "Traceback" not in result.output
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only permissions")
def test_read_only_output_folder(tmp_path, plain_model) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        run_refused_out(tmp_path, plain_model, ro / "f.onnx", EXIT_OUTPUT)
    finally:
        ro.chmod(0o700)


def random_normal_model() -> onnx.ModelProto:
    """Conv -> BN plus an unseeded RandomNormal output: two runs never agree, so the check fails."""
    b = GraphBuilder(seed=4)
    y = b.conv(b.input("x", [1, 3, 8, 8]), "conv", 3, 4, [3, 3])
    b.output(b.bn(y, "bn", 4))
    b.node("RandomNormal", [], "noise", "noise", shape=[4], dtype=TensorProto.FLOAT)
    b.output("noise", [4])
    return b.model()


def test_existing_output_survives_a_failed_check(tmp_path) -> None:
    src = tmp_path / "model.onnx"
    onnx.save(random_normal_model(), str(src))
    out = tmp_path / "out" / "f.onnx"
    out.parent.mkdir()
    out.write_bytes(b"precious")
    result = bnfold(src, "-o", out)
    assert result.exit_code == EXIT_MISMATCH, result.stderr
    assert "nothing written" in result.stderr
    assert out.read_bytes() == b"precious"
    assert [p.name for p in out.parent.iterdir()] == ["f.onnx"], "staging files left behind"


def test_existing_output_survives_a_bad_input(tmp_path) -> None:
    src = tmp_path / "model.onnx"
    src.write_bytes(b"not a model")
    out = tmp_path / "f.onnx"
    out.write_bytes(b"precious")
    assert_refused(bnfold(src, "-o", out), EXIT_INPUT)
    assert out.read_bytes() == b"precious"


def test_existing_output_is_replaced_on_success(tmp_path, plain_model) -> None:
    out = tmp_path / "f.onnx"
    out.write_bytes(b"old")
    before = plain_model.read_bytes()
    assert bnfold(plain_model, "-o", out).exit_code == EXIT_OK
    assert plain_model.read_bytes() == before
    onnx.checker.check_model(onnx.load(str(out)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.onnx", "model.onnx"]


@pytest.mark.parametrize("target", ["input", "output"])
def test_json_report_never_overwrites_a_model(tmp_path, plain_model, target) -> None:
    out = tmp_path / "f.onnx"
    json_path = plain_model if target == "input" else out
    before = plain_model.read_bytes()
    result = bnfold(plain_model, "-o", out, "--json", json_path)
    assert plain_model.read_bytes() == before, "the input model was overwritten by the JSON report"
    assert_refused(result, EXIT_OUTPUT)
    assert not out.exists()


def test_scalar_bool_input_is_checked(tmp_path) -> None:
    """An If on a scalar condition (the usual If model) must be checkable."""
    graph = helper.make_graph(
        [helper.make_node("Not", ["c"], ["d"], name="not")], "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("d", TensorProto.BOOL, [])],
    )
    src = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    result = bnfold(src, "-o", tmp_path / "f.onnx")
    assert result.exit_code == EXIT_OK, result.stderr

"""Fuzzing the ``bnfold`` command with broken models.

Hypothesis mutates and truncates the bytes of sample models (``sample_models/*.onnx`` when
present, plus small Conv/BN and Gemm/BN models built here), and separately damages parsed models
field by field (dims, element types, raw data, attributes, op types, external-data entries).
Every run must end with a known exit code, one ``bnfold: error:`` line and no traceback on
failure, no output file (nor staging folder) after a failure, and the input untouched.

The CLI runs in-process (click's CliRunner, ``catch_exceptions=False`` so that an escaping
exception fails the test); two cases also run as a subprocess.

Bounded for CI: ``BNFOLD_FUZZ_EXAMPLES`` (default 120 per fuzz test) sets the number of cases;
setting it also switches from the fixed CI cases to fresh random ones.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from typing import List

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from bnfold.cli import main
from bnfold.errors import EXIT_EXTERNAL_DATA, EXIT_INPUT, EXIT_LIMIT, EXIT_MISMATCH, EXIT_OK, EXIT_OUTPUT
from onnx_models import GraphBuilder

EXAMPLES = int(os.environ.get("BNFOLD_FUZZ_EXAMPLES", "120"))
KNOWN_CODES = {EXIT_OK, EXIT_MISMATCH, EXIT_INPUT, EXIT_EXTERNAL_DATA, EXIT_OUTPUT, EXIT_LIMIT}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_SAMPLE_BYTES = 256 * 1024  # larger samples make each case slow; they add little to a byte fuzz
# Inputs bigger than this are run with --no-check, to keep each case fast: the check allocates
# inputs up to bnfold.verify.MAX_INPUT_ELEMENTS (larger ones are refused, exit 5; see test_safety.py).
CHECK_INPUT_LIMIT = 1 << 20

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize="BNFOLD_FUZZ_EXAMPLES" not in os.environ,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


# ---------------------------------------------------------------- seed models


def conv_bn_model() -> onnx.ModelProto:
    b = GraphBuilder(seed=1)
    x = b.input("x", [1, 3, 6, 6])
    y = b.conv(x, "conv", 3, 4, [3, 3], pads=[1, 1, 1, 1])
    y = b.bn(y, "bn", 4)
    b.node("Relu", [y], "r", "relu")
    y = b.conv("r", "dw", 4, 4, [3, 3], group=2, op="ConvTranspose")
    b.output(b.bn(y, "bn2", 4, kind="const"))
    return b.model()


def gemm_bn_model() -> onnx.ModelProto:
    b = GraphBuilder(seed=2)
    x = b.input("x", ["N", 5])
    b.node("Gemm", [x, b.init("W", b.weight((3, 5))), b.init("C", b.weight((3,)))], "g", "gemm", transB=1, alpha=0.5)
    b.output(b.bn("g", "bn", 3))
    return b.model()


def seed_models() -> List[bytes]:
    found = []
    for path in sorted(glob.glob(os.path.join(ROOT, "sample_models", "*.onnx"))):
        if os.path.getsize(path) <= MAX_SAMPLE_BYTES:
            with open(path, "rb") as f:
                found.append(f.read())
    return found + [conv_bn_model().SerializeToString(), gemm_bn_model().SerializeToString()]


SEEDS = seed_models()


# ---------------------------------------------------------------- running the CLI


def check_wanted(data: bytes) -> bool:
    """Run the equivalence check unless the model declares inputs too big to generate (B5)."""
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception:
        return True
    for vi in model.graph.input:
        size = 1
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                if d.dim_value < 0:
                    return False
                size *= d.dim_value
        if size > CHECK_INPUT_LIMIT:
            return False
    return True


def _event(text: str) -> None:
    """hypothesis.event, which refuses to run outside a hypothesis test (test_fuzz_finding)."""
    try:
        event(text)
    except Exception:
        pass


def run_cli(tmp_path, data: bytes, extra=()) -> None:
    """Run ``bnfold model.onnx -o out/folded.onnx`` in-process; assert the safety contract."""
    src = tmp_path / "model.onnx"
    src.write_bytes(data)
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    for old in out_dir.iterdir():
        old.unlink()
    out = out_dir / "folded.onnx"
    args = [str(src), "-o", str(out), *extra]
    if not check_wanted(data):
        args.append("--no-check")
        _event("inputs too large for the check: --no-check")
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    _event(f"exit {result.exit_code}")
    assert_contract(result.exit_code, result.stdout, result.stderr, out_dir, out)
    assert src.read_bytes() == data, "the input was modified"


def assert_contract(code: int, stdout: str, stderr: str, out_dir, out) -> None:
    assert code in KNOWN_CODES, f"exit {code}: {stderr.strip()}"
    assert "Traceback" not in stdout + stderr
    written = sorted(p.name for p in out_dir.iterdir())
    if code == EXIT_OK:
        assert out.exists()
        onnx.load(str(out))  # what was written parses
        assert all(not n.startswith(".bnfold-") for n in written), f"staging left behind: {written}"
    else:
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bnfold: error: "), f"not one error line: {stderr!r}"
        assert written == [], f"a failed run left files: {written}"


# ---------------------------------------------------------------- byte-level mutations


@st.composite
def mutated_bytes(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["truncate", "flip", "set", "delete", "insert", "duplicate"]))
        n = len(data)
        if n == 0:
            break
        i = draw(st.integers(0, n - 1))
        if kind == "truncate":
            del data[i:]
        elif kind == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[i] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF, 0x0A, 0x12, 0x22]))
        elif kind == "delete":
            del data[i:i + draw(st.integers(1, 16))]
        elif kind == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        else:
            data[i:i] = data[i:i + draw(st.integers(1, 64))]
        event(f"mutation {kind}")
    return bytes(data)


@FUZZ_SETTINGS
@given(data=mutated_bytes())
def test_mutated_bytes(tmp_path, data: bytes) -> None:
    run_cli(tmp_path, data)


# ---------------------------------------------------------------- field-level mutations

ODD_INTS = [-(2**62), -3, -1, 0, 1, 2, 3, 7, 2**31, 2**40]
ODD_FLOATS = [float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 1e-45, 1e30, 3.0]


def _mutate_tensor(draw, t: TensorProto) -> None:
    kind = draw(st.sampled_from(["dtype", "dims", "raw_cut", "raw_grow", "external", "float_data"]))
    event(f"tensor {kind}")
    if kind == "dtype":
        t.data_type = draw(st.integers(0, 25))
    elif kind == "dims":
        del t.dims[:]
        t.dims.extend(draw(st.lists(st.sampled_from(ODD_INTS), max_size=4)))
    elif kind == "raw_cut":
        t.raw_data = t.raw_data[: draw(st.integers(0, max(0, len(t.raw_data) - 1)))]
    elif kind == "raw_grow":
        t.raw_data = t.raw_data + b"\x7f" * draw(st.integers(1, 64))
    elif kind == "external":
        t.data_location = TensorProto.EXTERNAL
        for key, value in draw(st.lists(st.tuples(
            st.sampled_from(["location", "offset", "length", "checksum"]),
            st.sampled_from(["w.bin", "../w.bin", "/etc/hostname", "", "model.onnx", "-1", "0", "4", "99999999999"]),
        ), max_size=3)):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
    else:
        t.ClearField("raw_data")
        t.float_data.extend(draw(st.lists(st.sampled_from(ODD_FLOATS), max_size=8)))


def _mutate_node(draw, node: onnx.NodeProto) -> None:
    kind = draw(st.sampled_from(["op", "drop_input", "rename_input", "attr_int", "attr_float", "domain", "extra_output"]))
    event(f"node {kind}")
    if kind == "op":
        node.op_type = draw(st.sampled_from(["Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "BatchNormalization", "Relu", "If"]))
    elif kind == "drop_input" and node.input:
        del node.input[draw(st.integers(0, len(node.input) - 1))]
    elif kind == "rename_input" and node.input:
        node.input[draw(st.integers(0, len(node.input) - 1))] = draw(st.sampled_from(["", "nowhere", "x"]))
    elif kind == "attr_int":
        name = draw(st.sampled_from(["group", "transB", "training_mode", "spatial", "axis"]))
        _set_attr(node, name, draw(st.sampled_from(ODD_INTS)))
    elif kind == "attr_float":
        name = draw(st.sampled_from(["epsilon", "alpha", "beta", "momentum"]))
        _set_attr(node, name, draw(st.sampled_from(ODD_FLOATS)))
    elif kind == "domain":
        node.domain = draw(st.sampled_from(["com.microsoft", "ai.onnx", "x"]))
    elif kind == "extra_output":
        node.output.append(draw(st.sampled_from(["", "extra", "x"])))


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


@st.composite
def mutated_models(draw) -> bytes:
    model = onnx.ModelProto()
    model.ParseFromString(draw(st.sampled_from(SEEDS)))
    g = model.graph
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from(["tensor", "node", "input", "opset", "ir"]))
        if target == "tensor" and g.initializer:
            _mutate_tensor(draw, g.initializer[draw(st.integers(0, len(g.initializer) - 1))])
        elif target == "node" and g.node:
            _mutate_node(draw, g.node[draw(st.integers(0, len(g.node) - 1))])
        elif target == "input" and g.input:
            dims = g.input[0].type.tensor_type.shape.dim
            if dims:
                # small dims only: big ones hit B5 in the check (covered in test_safety.py)
                dims[draw(st.integers(0, len(dims) - 1))].dim_value = draw(st.integers(0, 8))
        elif target == "opset" and model.opset_import:
            model.opset_import[0].version = draw(st.sampled_from([1, 6, 9, 13, 15, 17, 99, -1]))
        elif target == "ir":
            model.ir_version = draw(st.sampled_from([1, 3, 4, 8, 10, 99]))
    return model.SerializeToString()


@FUZZ_SETTINGS
@given(data=mutated_models(), check=st.booleans())
def test_mutated_fields(tmp_path, data: bytes, check: bool) -> None:
    run_cli(tmp_path, data, () if check else ("--no-check",))


# ---------------------------------------------------------------- the contract can fail


def test_contract_rejects_a_traceback(tmp_path) -> None:
    """The checker itself must catch an escaping exception and a leftover file."""
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    with pytest.raises(AssertionError):
        assert_contract(70, "", "bnfold: error: internal error", out_dir, out_dir / "f.onnx")
    (out_dir / "f.onnx").write_bytes(b"half")
    with pytest.raises(AssertionError):
        assert_contract(EXIT_INPUT, "", "bnfold: error: bad", out_dir, out_dir / "f.onnx")


# ---------------------------------------------------------------- as a real process


@pytest.mark.parametrize("cut", [0.5, 0.97])
def test_truncated_model_in_a_subprocess(tmp_path, cut: float) -> None:
    data = conv_bn_model().SerializeToString()
    src = tmp_path / "model.onnx"
    src.write_bytes(data[: int(len(data) * cut)])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "folded.onnx"
    proc = subprocess.run(
        [sys.executable, "-c", "from bnfold.cli import main; main()", str(src), "-o", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == EXIT_INPUT, proc.stderr
    assert_contract(proc.returncode, proc.stdout, proc.stderr, out_dir, out)
    assert "truncated" in proc.stderr or "corrupt" in proc.stderr


# ---------------------------------------------------------------- regressions found by fuzzing


def _conv_bn() -> onnx.ModelProto:
    b = GraphBuilder(seed=1)
    y = b.conv(b.input("x", [1, 3, 8, 8]), "conv", 3, 4, [3, 3])
    b.output(b.bn(y, "bn", 4))
    return b.model()


def _with_epsilon(attr: onnx.AttributeProto) -> bytes:
    model = _conv_bn()
    model.graph.node[-1].attribute.append(attr)
    return model.SerializeToString()


def _undefined_epsilon() -> onnx.AttributeProto:
    attr = onnx.AttributeProto()
    attr.name, attr.type = "epsilon", onnx.AttributeProto.UNDEFINED
    return attr


def _with_bias(n: int) -> bytes:
    model = _conv_bn()
    for t in model.graph.initializer:
        if t.name == "conv_B":
            t.CopyFrom(onnx.numpy_helper.from_array(np.ones(n, np.float32), "conv_B"))
    return model.SerializeToString()


def _bad_utf8_producer() -> bytes:
    model = _conv_bn()
    model.producer_name = "P"
    return model.SerializeToString().replace(b"\x12\x01P", b"\x12\x01\x80", 1)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: _with_epsilon(_undefined_epsilon()), id="epsilon-undefined-type"),
        pytest.param(lambda: _with_epsilon(helper.make_attribute("epsilon", [1.0, 2.0])), id="epsilon-floats"),
        pytest.param(lambda: _with_bias(1), id="conv-bias-1"),
        pytest.param(lambda: _with_bias(5), id="conv-bias-5"),
        pytest.param(_bad_utf8_producer, id="bad-utf8-string"),
    ],
)
@pytest.mark.parametrize("check", [True, False], ids=["check", "no-check"])
def test_fuzz_finding(tmp_path, make, check: bool) -> None:
    """Minimal inputs behind what the fuzzers found: each must be a clean refusal or error."""
    run_cli(tmp_path, make(), () if check else ("--no-check",))

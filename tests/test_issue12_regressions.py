"""Issue 12 (ONNX side): one hostile model per reported bug.

Each case runs ``fold_onnx`` and the CLI and asserts the safety contract:

- no exception other than bnfold's own (:class:`bnfold.errors.BnfoldError`);
- the fold is exact (both models under onnxruntime at ORT_DISABLE_ALL, seeded random inputs,
  overridable inputs fed with other values too) or the BN is left with a reason;
- structurally invalid models are refused: InputError from the API, exit 2 and one
  ``bnfold: error:`` line from the CLI, nothing written;
- every case runs in a child process with a time limit, so a hang fails the test instead of
  hanging CI.

Cases that need a rule fix not made yet are ``xfail(strict=True)``: they flip to a failure
("XPASS") the moment the fix lands, so the mark is removed with the fix.
"""

from __future__ import annotations

import multiprocessing
import traceback
from typing import Callable, Dict, Optional

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from bnfold.cli import main
from bnfold.errors import EXIT_INPUT, EXIT_OK, BnfoldError, InputError
from bnfold.onnx_pass import fold_onnx
from onnx_models import GraphBuilder, compare_outputs, random_feeds, run_model, sabotage_conv_fold

TIME_LIMIT = 60  # seconds per case, in a child process (a hang fails, it does not block CI)
RULE_FIX = pytest.mark.xfail(strict=True, reason="rule fix pending (onnx helper)")


# ---------------------------------------------------------------- the contract


def outcome(model: onnx.ModelProto, other_feeds: Optional[Dict[str, np.ndarray]] = None) -> str:
    """'invalid: ...', 'folded' or 'left: reason' -- after checking the fold is exact.

    ``other_feeds``: values for inputs that override initializers (a user may feed them).
    Raises AssertionError on a wrong fold or a BN neither folded nor explained.
    """
    try:
        folded, report = fold_onnx(model)
    except InputError as exc:
        return f"invalid: {exc}"
    bns = [n.name for n in model.graph.node if n.op_type == "BatchNormalization"]
    done = {f.bn for f in report.folded} | {s.bn for s in report.skipped}
    assert set(bns) <= done, f"BNs neither folded nor explained: {set(bns) - done}"
    for s in report.skipped:
        assert s.reason and s.detail, f"BN {s.bn} left without a reason"
    for seed in range(2):
        feeds = random_feeds(model, seed)
        for name, value in (other_feeds or {}).items():
            feeds[name] = value
        try:
            ref = run_model(model, feeds)
        except Exception as exc:  # onnxruntime refuses the original itself: nothing to compare
            return f"unrunnable: {str(exc).splitlines()[0]}"
        compare_outputs(ref, run_model(folded, feeds))
    if report.skipped:
        return "left: " + ", ".join(sorted({s.reason for s in report.skipped}))
    return "folded"


def _child(make: Callable, other_feeds, queue) -> None:
    try:
        queue.put(("ok", outcome(make(), other_feeds)))
    except AssertionError as exc:
        queue.put(("wrong", str(exc)))
    except BnfoldError as exc:
        queue.put(("ok", f"{type(exc).__name__}: {exc}"))
    except BaseException as exc:  # noqa: BLE001 -- what escapes is the bug being tested
        queue.put(("crash", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def run_case(make: Callable[[], onnx.ModelProto], other_feeds=None) -> str:
    """:func:`outcome` in a child process with a time limit; fail on a hang or a crash."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(make, other_feeds, queue))
    proc.start()
    proc.join(TIME_LIMIT)
    if proc.is_alive():
        proc.kill()
        proc.join()
        pytest.fail(f"fold_onnx did not finish in {TIME_LIMIT} s (a hang)")
    assert not queue.empty(), f"the child died (exit {proc.exitcode})"
    kind, text = queue.get()
    assert kind == "ok", f"{kind}: {text}"
    return text


def run_cli(tmp_path, model: onnx.ModelProto, *extra: str):
    src = tmp_path / "model.onnx"
    src.write_bytes(model.SerializeToString())
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    result = CliRunner().invoke(main, [str(src), "-o", str(out_dir / "f.onnx"), *extra], catch_exceptions=False)
    assert "Traceback" not in result.output + result.stderr
    if result.exit_code != EXIT_OK:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bnfold: error: "), result.stderr
        assert list(out_dir.iterdir()) == []
    return result


def assert_invalid(tmp_path, make, *words: str) -> None:
    text = run_case(make)
    assert text.startswith("invalid: "), text
    for word in words:
        assert word in text, f"{word!r} not in {text!r}"
    result = run_cli(tmp_path, make())
    assert result.exit_code == EXIT_INPUT, result.stderr
    assert "invalid model" in result.stderr


def assert_sound(tmp_path, make, other_feeds=None) -> str:
    text = run_case(make, other_feeds)
    assert not text.startswith("invalid"), text
    result = run_cli(tmp_path, make())
    assert result.exit_code == EXIT_OK, result.stderr
    return text


# ---------------------------------------------------------------- models


def _gemm(b: GraphBuilder, x: str, n: int = 4, name: str = "gemm") -> str:
    b.node("Gemm", [x, b.init(f"{name}_W", b.weight((n, n))), b.init(f"{name}_C", b.weight((n,)))], f"{name}_out", name)
    return f"{name}_out"


def _finish(b: GraphBuilder, y: str, channels: int, opset: int = 17, **kw) -> onnx.ModelProto:
    b.output(b.bn(y, "bn", channels))
    return b.model(check=False, opset=opset, **kw)


def flatten_constant_axis() -> onnx.ModelProto:
    """Gemm -> Mul(g, Flatten(c, axis=1)), c of shape [4]: Flatten makes it [4, 1] (rows)."""
    b = GraphBuilder(seed=11)
    g = _gemm(b, b.input("x", [4, 4]))
    b.init("c", np.array([1.0, -2.0, 3.0, 0.5], np.float32))
    b.node("Flatten", ["c"], "cf", "flat", axis=1)
    b.node("Mul", [g, "cf"], "m", "mul")
    b.output("m")
    return b.model(check=False)


def overridable_reshape_target() -> onnx.ModelProto:
    """Conv -> Reshape(x, shp) -> BN, shp an initializer that input 'shp' overrides."""
    b = GraphBuilder(seed=12)
    y = b.conv(b.input("x", [1, 4, 2, 2]), "conv", 4, 4, [1, 1])
    b.init("shp", np.array([1, 4, 4], np.int64))
    b.input("shp", ["rank"], np.int64)
    b.node("Reshape", [y, "shp"], "r", "reshape")
    return _finish(b, "r", 4)


def overridable_matmul_rank() -> onnx.ModelProto:
    """Reshape(x, shp) -> MatMul -> BN: the default shp makes the MatMul 2-D (BN on its
    columns); a 3-D shp fed by the user puts the BN's channel axis on its rows."""
    b = GraphBuilder(seed=13)
    x = b.input("x", [3, 4])
    b.init("shp", np.array([3, 4], np.int64))
    b.input("shp", ["rank"], np.int64)
    b.node("Reshape", [x, "shp"], "r", "reshape")
    b.node("MatMul", ["r", b.init("W", b.weight((4, 3)))], "mm", "matmul")
    return _finish(b, "mm", 3)


def cycle() -> onnx.ModelProto:
    """BN -> Mul -> back into the BN: the merge walk used to loop with growing memory."""
    b = GraphBuilder(seed=14)
    x = b.input("x", [1, 4])
    b.node("Add", [x, "m"], "a", "add")
    y = b.bn("a", "bn", 4)
    b.node("Mul", [y, b.init("k", np.full(4, 0.5, np.float32))], "m", "mul")
    b.node("Identity", ["m"], "out", "id")
    b.output("out", [1, 4])
    return b.model(check=False)


def cycle_of_bns() -> onnx.ModelProto:
    b = GraphBuilder(seed=15)
    b.input("x", [1, 4])
    b.bn("b2_out", "bn", 4, outputs=["b1_out"])
    b.bn("b1_out", "bn2", 4, outputs=["b2_out"])
    b.output("b1_out", [1, 4])
    return b.model(check=False)


def bn_bn_unknown_rank() -> onnx.ModelProto:
    b = GraphBuilder(seed=16)
    b.inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, None))
    y = b.bn("x", "bn0", 3)
    return _finish(b, y, 3)


def bn_bn_found_by_semantic_fuzz() -> onnx.ModelProto:
    """Found by test_semantic_fuzz.py (seed 1168), a valid model: input x is also a graph
    output declared without a shape, so onnx's shape inference loses the shapes after it
    and Add -> BN -> BN reaches the BN -> BN merge with an unknown rank."""
    b = GraphBuilder(seed=34)
    x = b.input("x", [3, 9])
    b.node("Add", [b.init("k1", b.weight((1, 9))), x], "a", "add")
    y = b.bn("a", "bn0", 9)
    b.output(b.bn(y, "bn", 9))
    b.outputs.append(helper.make_empty_tensor_value_info("x"))
    b.outputs[-1].type.tensor_type.elem_type = TensorProto.FLOAT
    return b.model(check=False, opset=18)


def _gemm_unknown_shape(b: GraphBuilder) -> str:
    b.inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, None))
    return _gemm(b, "x", 3)


def unsqueeze_0d_axes() -> onnx.ModelProto:
    b = GraphBuilder(seed=17)
    g = _gemm_unknown_shape(b)
    b.init("ax", np.array(2, np.int64))
    b.node("Unsqueeze", [g, "ax"], "u", "unsq")
    return _finish(b, "u", 3)


def axes_2d() -> onnx.ModelProto:
    b = GraphBuilder(seed=18)
    g = _gemm_unknown_shape(b)
    b.init("ax", np.array([[2]], np.int64))
    b.node("Unsqueeze", [g, "ax"], "u", "unsq")
    return _finish(b, "u", 3)


def squeeze_scalar_constant() -> onnx.ModelProto:
    b = GraphBuilder(seed=19)
    g = _gemm(b, b.input("x", [2, 3]), 3)
    b.init("s", np.array(2.0, np.float32))
    b.init("ax", np.array([0], np.int64))
    b.node("Squeeze", ["s", "ax"], "sq", "squeeze")
    b.node("Mul", [g, "sq"], "m", "mul")
    return _finish(b, "m", 3)


def reshape_target_inf() -> onnx.ModelProto:
    b = GraphBuilder(seed=20)
    g = _gemm(b, b.input("x", [2, 3]), 3)
    b.init("c", np.array([1.0, 2.0, 3.0], np.float32))
    b.init("shp", np.array([np.inf], np.float32))
    b.node("Reshape", ["c", "shp"], "cr", "reshape")
    b.node("Mul", [g, "cr"], "m", "mul")
    return _finish(b, "m", 3)


def conv_transpose_group(group: int) -> Callable[[], onnx.ModelProto]:
    def make() -> onnx.ModelProto:
        b = GraphBuilder(seed=21)
        y = b.conv(b.input("x", [1, 4, 4, 4]), "ct", 4, 4, [3, 3], op="ConvTranspose")
        b.nodes[-1].attribute.append(helper.make_attribute("group", group))
        return _finish(b, y, 4)
    return make


def _conv_bn(b: GraphBuilder) -> str:
    return b.conv(b.input("x", [1, 3, 4, 4]), "conv", 3, 3, [1, 1])


def bn_no_outputs() -> onnx.ModelProto:
    b = GraphBuilder(seed=22)
    y = _conv_bn(b)
    b.bn(y, "bn", 3)
    del b.nodes[-1].output[:]
    b.output(y)
    return b.model(check=False)


def identity_no_outputs() -> onnx.ModelProto:
    b = GraphBuilder(seed=23)
    y = _conv_bn(b)
    b.node("Identity", [y], [], "id")
    return _finish(b, y, 3)


def bn_then_one_input(op: str) -> Callable[[], onnx.ModelProto]:
    def make() -> onnx.ModelProto:
        b = GraphBuilder(seed=24)
        y = b.bn(b.input("x", [2, 3]), "bn", 3)
        b.node(op, [y], "g", "lin")
        b.output("g", [2, 3])
        return b.model(check=False)
    return make


def weight_dtype_73() -> onnx.ModelProto:
    b = GraphBuilder(seed=25)
    model = _finish(b, _conv_bn(b), 3)
    next(t for t in model.graph.initializer if t.name == "conv_W").data_type = 73
    return model


def negative_value_info_dim() -> onnx.ModelProto:
    b = GraphBuilder(seed=26)
    model = _finish(b, _conv_bn(b), 3)
    model.graph.value_info.append(helper.make_tensor_value_info("conv_out", TensorProto.FLOAT, [1, -3, 4, 4]))
    return model


def dropout6_float_is_test() -> onnx.ModelProto:
    b = GraphBuilder(seed=27)
    y = _conv_bn(b)
    b.node("Dropout", [y], "d", "drop", is_test=1.0)
    b.output(b.bn("d", "bn", 3, is_test=1))
    return b.model(check=False, opset=6, ir_version=3)


def flatten_negative_axis() -> onnx.ModelProto:
    """BN2d -> Flatten(axis=-3) -> Gemm on a 4-D value: axis -3 is axis 1."""
    b = GraphBuilder(seed=28)
    y = b.bn(b.input("x", [2, 3, 2, 2]), "bn", 3)
    b.node("Flatten", [y], "f", "flat", axis=-3)
    b.node("Gemm", ["f", b.init("W", b.weight((12, 5)))], "g", "gemm")
    b.output("g")
    return b.model(check=False)


def same_padding_that_pads_nothing() -> onnx.ModelProto:
    """BN -> Conv(3x3, stride 3, SAME_UPPER) on 6x6: the total padding is 0."""
    b = GraphBuilder(seed=29)
    y = b.bn(b.input("x", [1, 2, 6, 6]), "bn", 2)
    b.conv(y, "conv", 2, 3, [3, 3], auto_pad="SAME_UPPER", strides=[3, 3])
    b.output("conv_out")
    return b.model(check=False)


def training_bn_after_bn() -> onnx.ModelProto:
    b = GraphBuilder(seed=30)
    y = b.bn(b.input("x", [2, 3, 2, 2]), "bn0", 3)
    b.bn(y, "bn", 3, training_mode=1, outputs=["bn_out", "bn_mean_out", "bn_var_out"])
    b.output("bn_out")
    return b.model(check=False)


def expand_constant() -> onnx.ModelProto:
    """Gemm -> Mul(g, Expand(c, [1, 3])): a per-feature constant behind Expand."""
    b = GraphBuilder(seed=31)
    g = _gemm(b, b.input("x", [2, 3]), 3)
    b.init("c", np.array([1.5, -1.0, 0.5], np.float32))
    b.init("shape", np.array([1, 3], np.int64))
    b.node("Expand", ["c", "shape"], "ce", "expand")
    b.node("Mul", [g, "ce"], "m", "mul")
    b.output("m")
    return b.model(check=False)


def constant_of_shape() -> onnx.ModelProto:
    """Gemm -> Add(g, ConstantOfShape([3]) = 0.25): a uniform constant."""
    b = GraphBuilder(seed=32)
    g = _gemm(b, b.input("x", [2, 3]), 3)
    b.init("shape", np.array([3], np.int64))
    b.node("ConstantOfShape", ["shape"], "k", "cos", value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.25]))
    b.node("Add", [g, "k"], "a", "add")
    b.output("a")
    return b.model(check=False)


# ---------------------------------------------------------------- invalid structure: refused


@pytest.mark.parametrize(
    "make, words",
    [
        pytest.param(cycle, ["cycle"], id="cycle"),
        pytest.param(cycle_of_bns, ["cycle"], id="cycle-of-bns"),
        pytest.param(conv_transpose_group(0), ["group 0"], id="convtranspose-group-0"),
        pytest.param(conv_transpose_group(-1), ["group -1"], id="convtranspose-group-negative"),
        pytest.param(bn_no_outputs, ["BatchNormalization", "0 outputs"], id="bn-no-outputs"),
        pytest.param(identity_no_outputs, ["Identity", "0 outputs"], id="identity-no-outputs"),
        pytest.param(bn_then_one_input("Gemm"), ["Gemm", "1 inputs"], id="bn-gemm-one-input"),
        pytest.param(bn_then_one_input("MatMul"), ["MatMul", "1 inputs"], id="bn-matmul-one-input"),
        pytest.param(weight_dtype_73, ["conv_W", "73"], id="dtype-73"),
        pytest.param(negative_value_info_dim, ["conv_out", "-3"], id="negative-value-info-dim"),
        pytest.param(dropout6_float_is_test, ["is_test", "FLOAT"], id="dropout6-float-is-test"),
    ],
)
def test_invalid_structure_is_refused(tmp_path, make, words) -> None:
    assert_invalid(tmp_path, make, *words)


# ---------------------------------------------------------------- valid but hostile: exact or left


def _other_shape(values):
    return {"shp": np.array(values, np.int64)}


X_2x3 = {"x": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)}  # for inputs of unknown shape


@pytest.mark.parametrize(
    "make, other",
    [
        pytest.param(flatten_constant_axis, None, id="flatten-constant-axis"),
        pytest.param(overridable_reshape_target, _other_shape([4, 4, 1]), id="overridable-reshape-target"),
        pytest.param(overridable_matmul_rank, _other_shape([1, 3, 4]), id="overridable-matmul-rank"),
        pytest.param(bn_bn_unknown_rank, {"x": np.linspace(-1, 1, 12, dtype=np.float32).reshape(2, 3, 2)}, id="bn-bn-unknown-rank"),
        pytest.param(bn_bn_found_by_semantic_fuzz, None, id="bn-bn-semantic-fuzz-1168"),
        pytest.param(unsqueeze_0d_axes, X_2x3, id="unsqueeze-0d-axes"),  # passes on this path today
        pytest.param(axes_2d, X_2x3, id="axes-2d"),
        pytest.param(squeeze_scalar_constant, None, id="squeeze-scalar-constant"),
        pytest.param(reshape_target_inf, None, id="reshape-target-inf"),
    ],
)
def test_hostile_model_folds_exactly_or_is_left(tmp_path, make, other) -> None:
    text = run_case(make, other)
    assert not text.startswith("invalid"), text
    result = run_cli(tmp_path, make())
    assert result.exit_code in (EXIT_OK, EXIT_INPUT), result.stderr


def test_the_contract_catches_a_wrong_fold(monkeypatch) -> None:
    """outcome() must notice a fold that changes the result (one scale off by 1 %)."""
    sabotage_conv_fold(monkeypatch)
    b = GraphBuilder(seed=33)
    model = _finish(b, _conv_bn(b), 3)
    with pytest.raises(AssertionError):
        outcome(model)


# ---------------------------------------------------------------- missed and misreported


def _report(make):
    return fold_onnx(make())[1]


def test_flatten_negative_axis_folds(tmp_path) -> None:
    assert assert_sound(tmp_path, flatten_negative_axis) == "folded"


def test_same_padding_that_pads_nothing_folds(tmp_path) -> None:
    assert assert_sound(tmp_path, same_padding_that_pads_nothing) == "folded"


def test_training_bn_after_bn_is_reported_as_training(tmp_path) -> None:
    text = assert_sound(tmp_path, training_bn_after_bn)
    reasons = {s.bn: s.reason for s in _report(training_bn_after_bn).skipped}
    assert reasons.get("bn") == "training-mode", (text, reasons)


@pytest.mark.parametrize("make", [expand_constant, constant_of_shape], ids=["expand", "constant-of-shape"])
def test_expand_and_constant_of_shape_are_folded_or_reported(tmp_path, make) -> None:
    assert_sound(tmp_path, make)
    report = _report(make)
    extra = report.extra
    assert extra.get("affine_folded") or extra.get("affine_skipped"), "the Mul/Add was neither folded nor reported"

"""``.pt2`` programs (torch.export.save): folding, and loading without running code from the file."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile

import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from bnfold.errors import CheckFailed, InputError  # noqa: E402
from bnfold.torch_pass import fold_exported_program, fold_program_file, load_program  # noqa: E402
from bnfold.torch_pass import _program  # noqa: E402
from bnfold.torch_pass._program import safe_sym_expr  # noqa: E402
from bnfold.verify import compare_outputs  # noqa: E402
from test_torch_archs import SmallResNet, UNetDecoder, outputs, randomize, seeded  # noqa: E402
from test_torch_refusals import SharedConvTwoBNs, LinearBN3d  # noqa: E402


def bn_nodes(ep) -> int:
    return sum(1 for n in ep.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target))


def save(model, args, path, **kw):
    ep = torch.export.export(randomize(model).eval(), args, **kw)
    torch.export.save(ep, str(path))
    return model


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_resnet_program_folds_and_matches(tmp_path):
    args = (seeded(2, 3, 32, 32),)
    model = save(SmallResNet(), args, tmp_path / "m.pt2")
    before = digest(tmp_path / "m.pt2")
    report = fold_program_file(str(tmp_path / "m.pt2"), str(tmp_path / "f.pt2"))
    assert digest(tmp_path / "m.pt2") == before
    assert report.method == "torch.export" and report.n_folded == 13 and report.n_skipped == 0
    assert report.extra["check"]["passed"]
    folded = load_program(str(tmp_path / "f.pt2"))
    assert bn_nodes(folded) == 0
    other = seeded(2, 3, 32, 32, seed=9)
    assert compare_outputs(outputs(model, other), outputs(folded.module(), other))


def test_no_check_skips_the_run_against_the_original(tmp_path, monkeypatch):
    save(SmallResNet(), (seeded(2, 3, 32, 32),), tmp_path / "m.pt2")
    checked = fold_program_file(str(tmp_path / "m.pt2"), str(tmp_path / "f.pt2"))
    assert checked.extra["check"]["inputs"]["tensors"] == [
        {"name": "x", "dtype": "float32", "shape": [2, 3, 32, 32], "source": "the program's example input"}]
    runs = []
    real = _program._outputs
    monkeypatch.setattr(_program, "_outputs", lambda *a: runs.append(1) or real(*a))
    report = fold_program_file(str(tmp_path / "m.pt2"), str(tmp_path / "g.pt2"), check=False)
    assert runs == [] and "check" not in report.extra and report.n_folded == 13
    assert not any("example inputs" in n for n in report.notes)
    assert bn_nodes(load_program(str(tmp_path / "g.pt2"))) == 0


def test_a_failed_program_check_carries_its_verdict_and_writes_nothing(tmp_path, monkeypatch):
    save(SmallResNet(), (seeded(2, 3, 32, 32),), tmp_path / "m.pt2")
    real = _program.fold_exported_program

    def broken(ep):  # a fold bug: every bias shifted
        ep, report = real(ep)
        for name, value in list(ep.state_dict.items()):
            if name.endswith("bias"):
                ep.state_dict[name] = nn.Parameter(value + 0.5, requires_grad=False)
        return ep, report

    monkeypatch.setattr(_program, "fold_exported_program", broken)
    with pytest.raises(CheckFailed) as info:
        fold_program_file(str(tmp_path / "m.pt2"), str(tmp_path / "f.pt2"))
    assert info.value.verdict["passed"] is False and not info.value.verdict["outputs"][0]["passed"]
    assert info.value.report.n_folded == 13
    assert not (tmp_path / "f.pt2").exists()


def test_decomposed_program_with_grouped_conv_transpose_folds(tmp_path):
    model = randomize(UNetDecoder()).eval()
    args = (seeded(1, 16, 4, 4), seeded(1, 8, 8, 8, seed=2), seeded(1, 8, 16, 16, seed=3), seeded(1, 8, 32, 32, seed=4))
    ep = torch.export.export(model, args).run_decompositions()
    assert bn_nodes(ep) == 7
    ep, report = fold_exported_program(ep)
    assert bn_nodes(ep) == 0 and report.n_folded == 7
    assert compare_outputs(outputs(model, *args), outputs(ep.module(), *args))


def test_dynamic_batch_survives_the_fold(tmp_path):
    batch = torch.export.Dim("batch", min=1, max=32)
    model = save(SmallResNet(), (seeded(2, 3, 32, 32),), tmp_path / "m.pt2", dynamic_shapes=({0: batch},))
    fold_program_file(str(tmp_path / "m.pt2"), str(tmp_path / "f.pt2"))
    folded = load_program(str(tmp_path / "f.pt2")).module()
    x = seeded(5, 3, 32, 32, seed=3)
    assert compare_outputs(outputs(model, x), outputs(folded, x))


def test_program_refusals_shared_conv_and_3d_linear(tmp_path):
    ep = torch.export.export(randomize(SharedConvTwoBNs()).eval(), (seeded(2, 4, 6, 6),))
    _, report = fold_exported_program(ep)
    assert {s.reason for s in report.skipped} == {"shared-module-different-bn"} and bn_nodes(ep) == 2
    ep = torch.export.export(randomize(LinearBN3d()).eval(), (seeded(2, 6, 6),))
    _, report = fold_exported_program(ep)
    assert [s.reason for s in report.skipped] == ["not-per-channel"] and bn_nodes(ep) == 1


def test_program_with_training_bn_is_not_folded(tmp_path):
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).train()
    ep = torch.export.export(model, (seeded(2, 3, 6, 6),))
    _, report = fold_exported_program(ep)
    assert [s.reason for s in report.skipped] == ["training-mode"]


# --- loading safely --------------------------------------------------------------------------


def rewrite_archive(src, dst, edit):
    """Copy a .pt2 zip, passing each (name, bytes) through ``edit`` (return None to drop)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)


@pytest.fixture
def program(tmp_path):
    save(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), (seeded(1, 3, 6, 6),), tmp_path / "m.pt2")
    return tmp_path / "m.pt2"


def edit_json(suffix, change):
    def edit(name, data):
        if name.endswith(suffix):
            obj = json.loads(data)
            change(obj)
            return json.dumps(obj).encode()
        return data

    return edit


def test_pickled_weight_is_refused_before_loading(program, tmp_path):
    def flag(cfg):
        next(iter(cfg["config"].values()))["use_pickle"] = True

    bad = tmp_path / "bad.pt2"
    rewrite_archive(program, bad, edit_json("_weights_config.json", flag))
    with pytest.raises(InputError, match="pickled"):
        load_program(str(bad))


def test_guards_code_is_refused(program, tmp_path):
    bad = tmp_path / "bad.pt2"
    rewrite_archive(program, bad, edit_json("models/model.json", lambda p: p.__setitem__("guards_code", ["__import__('os')"])))
    with pytest.raises(InputError, match="guards_code"):
        load_program(str(bad))


def test_code_in_a_shape_expression_is_refused(program, tmp_path):
    def inject(p):
        p["graph_module"]["graph"]["sym_int_values"] = {"s0": {"as_expr": {"expr_str": "__import__('os').getcwd()"}}}

    bad = tmp_path / "bad.pt2"
    rewrite_archive(program, bad, edit_json("models/model.json", inject))
    with pytest.raises(InputError, match="shape expression"):
        load_program(str(bad))


def test_node_calling_a_non_operator_is_refused(program, tmp_path):
    def retarget(p):
        p["graph_module"]["graph"]["nodes"][0]["target"] = "torch.serialization.os.getcwd"

    bad = tmp_path / "bad.pt2"
    rewrite_archive(program, bad, edit_json("models/model.json", retarget))
    with pytest.raises(InputError):
        load_program(str(bad))


def test_pickled_sample_inputs_never_fall_back_to_full_unpickling(program, tmp_path):
    import pickle

    marker = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))  # visible if anything unpickles it for real

    bad = tmp_path / "bad.pt2"
    rewrite_archive(program, bad, lambda n, d: pickle.dumps(Boom()) if "sample_inputs" in n else d)
    with pytest.raises(InputError):
        load_program(str(bad))
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a zip", b"PK\x03\x04broken"])
def test_unreadable_files_are_one_line_input_errors(tmp_path, content):
    path = tmp_path / "x.pt2"
    path.write_bytes(content)
    with pytest.raises(InputError) as info:
        fold_program_file(str(path), str(tmp_path / "out.pt2"))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out.pt2").exists()


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        fold_program_file(str(tmp_path / "nope.pt2"), str(tmp_path / "out.pt2"))


@pytest.mark.parametrize(
    "text,ok",
    [
        ("Symbol('s31', positive=True, integer=True)", True),
        ("2*s0 + FloorDiv(s1, 2)", True),
        ("Max(1, s0 - 3)", True),
        ("__import__('os')", False),
        ("s0.__class__", False),
        ("Symbol('x; import os')", False),
        ("(lambda: 1)()", False),
        ("s0[0]", False),
    ],
)
def test_shape_expression_grammar(text, ok):
    assert safe_sym_expr(text) is ok


def test_cli_folds_a_pt2_file(program, tmp_path):
    from bnfold.cli import main

    out = tmp_path / "out.pt2"
    result = CliRunner().invoke(main, [str(program), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "folded 1 of 1" in result.output and out.exists()
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"junk")
    result = CliRunner().invoke(main, [str(bad), "-o", str(tmp_path / "o2.pt2")])
    assert result.exit_code == 2 and not (tmp_path / "o2.pt2").exists()

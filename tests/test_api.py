"""The package's public face: `import bnfold`, `dir(bnfold)`, `from bnfold import *`, and the
file-type policy of `bnfold.fold_file` (the same as the command line's)."""

from __future__ import annotations

import subprocess
import sys

import onnx
import pytest

import bnfold
from bnfold.errors import CheckFailed, InputError
from onnx_models import GraphBuilder, assert_equivalent


def _fresh(code: str) -> str:
    """Run ``code`` in a new interpreter (nothing imported yet) and return its stdout."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_star_import_gives_every_public_name_and_bench_is_the_latency_function():
    out = _fresh(
        "from bnfold import *\n"
        "import bnfold, inspect\n"
        "names = [n for n in bnfold.__all__]\n"
        "assert callable(bench) and inspect.isfunction(bench) and bench.__name__ == 'bench', bench\n"
        "assert bnfold.bench is bench and bnfold.bench is bnfold.bench\n"
        "assert fold_file.__module__ == 'bnfold.pipeline', fold_file.__module__\n"
        "print(sorted(n for n in names if n not in globals()))\n"
    )
    assert out.strip() == "[]"


def test_attribute_access_first_then_star_import():
    """The order the issue hit: `import bnfold; bnfold.bench` before anything else."""
    out = _fresh("import bnfold\nb = bnfold.bench\nfrom bnfold import *\nprint(b is bench, callable(b))\n")
    assert out.split() == ["True", "True"]


def test_dir_shows_the_public_api_and_not_the_plumbing():
    listed = dir(bnfold)
    for name in bnfold.__all__:
        assert name in listed
    assert "_lazy" not in listed and "_bench" not in listed


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError):
        bnfold.no_such_thing  # noqa: B018


def _conv_bn(path):
    g = GraphBuilder(seed=3)
    x = g.input("x", [1, 3, 6, 6])
    g.output(g.bn(g.conv(x, "conv", 3, 4, (3, 3)), "bn", 4))
    onnx.save(g.model(), str(path))
    return g.model()


def test_fold_file_folds_checks_and_returns_the_verdict(tmp_path):
    original = _conv_bn(tmp_path / "m.onnx")
    report = bnfold.fold_file(tmp_path / "m.onnx", tmp_path / "f.onnx")
    assert report.n_folded == 1 and report.extra["check"]["passed"]
    assert_equivalent(original, onnx.load(str(tmp_path / "f.onnx")))


@pytest.mark.parametrize("name", ["model.pt", "model.PTH", "weights.ckpt", "m.pkl"])
def test_fold_file_refuses_pickles_by_name_without_opening_them(tmp_path, name):
    src = tmp_path / name
    src.write_bytes(b"\x80\x04 never unpickled")
    with pytest.raises(InputError, match="refusing to load a pickled PyTorch file"):
        bnfold.fold_file(src, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_fold_file_raises_check_failed_on_a_mismatch(tmp_path, monkeypatch):
    import numpy as np
    from onnx import numpy_helper

    import bnfold.onnx_pass as onnx_pass

    _conv_bn(tmp_path / "m.onnx")
    real = onnx_pass.fold_model_proto

    def broken(model, *args, **kwargs):
        report = real(model, *args, **kwargs)
        for t in model.graph.initializer:
            if t.name == model.graph.node[0].input[1]:
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(1.01), t.name))
        return report

    monkeypatch.setattr(onnx_pass, "fold_model_proto", broken)
    with pytest.raises(CheckFailed):
        bnfold.fold_file(tmp_path / "m.onnx", tmp_path / "f.onnx")
    assert not (tmp_path / "f.onnx").exists()


def test_fold_path_passes_check_options_to_the_check(tmp_path):
    from bnfold.pipeline import fold_path

    _conv_bn(tmp_path / "m.onnx")
    outcome = fold_path(str(tmp_path / "m.onnx"), str(tmp_path / "f.onnx"), check_options={"batches": 3, "seed": 5}, seed=1)
    assert outcome.ok, outcome.error
    assert outcome.verdict["inputs"]["batches"] == 3 and outcome.verdict["inputs"]["seed"] == 5
    assert list(outcome.times) == ["load", "fold", "write", "check"]


def test_op_counts_include_subgraphs_and_custom_domains():
    from onnx import TensorProto, helper

    from bnfold.pipeline import op_counts

    branch = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "b", [],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])  # fmt: skip
    nodes = [
        helper.make_node("If", ["c"], ["out"], then_branch=branch, else_branch=branch),
        helper.make_node("Gelu", ["out"], ["g"], domain="com.microsoft"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("g", TensorProto.FLOAT, [1])])  # fmt: skip
    counts = op_counts(helper.make_model(graph))
    assert counts == {"nodes": 4, "ops": {"If": 1, "Relu": 2, "com.microsoft.Gelu": 1}}

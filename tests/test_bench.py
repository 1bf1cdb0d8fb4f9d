"""bnfold.latency.bench and `bnfold bench`: structure and sanity only, never absolute speed."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from bnfold.latency import _percentile, bench, model_size
from bnfold.cli.verify_cmds import bench as bench_cmd
from bnfold.errors import InputError
from test_verify import conv_bn_chain, multi_io_model, save

FAST = dict(runs=3, warmup=1, sessions=2)
TIMING_KEYS = {"create_ms", "median_ms", "p90_ms", "mean_ms", "min_ms", "std_ms", "throughput_per_s", "runs",
               "create_min_ms", "create_max_ms", "create_runs"}


@pytest.fixture
def pair(tmp_path):
    return save(conv_bn_chain(layers=3), tmp_path / "a.onnx"), save(conv_bn_chain(layers=3, fold=True), tmp_path / "b.onnx")


def _sane(timing, runs):
    assert timing.runs == runs
    assert 0 < timing.min_ms <= timing.median_ms <= timing.p90_ms
    assert timing.min_ms <= timing.mean_ms and timing.create_ms > 0 and timing.std_ms >= 0
    assert timing.create_runs == 2 and timing.create_min_ms <= timing.create_ms <= timing.create_max_ms
    assert timing.throughput_per_s == pytest.approx(1000.0 / timing.mean_ms)


def test_single_model_default_levels(pair):
    result = bench(pair[0], **FAST)
    assert result.levels == ["disable", "all"]
    assert len(result.models) == 1 and result.ratios == {}
    for level in ("disable", "all"):
        _sane(result.models[0].levels[level], 3)
    assert result.models[0].file_size == model_size(pair[0]) > 0
    text = result.summary()
    assert "level disable" in text and "level all" in text and "second/first" not in text


def test_two_models_side_by_side_with_ratios(pair):
    result = bench(pair[0], pair[1], levels=("disable", "basic"), shapes={"x": (1, 8, 8, 8)}, **FAST)
    assert [m.label for m in result.models] == list(pair)
    ratios = result.ratios
    assert set(ratios) == {"file_size", "disable", "basic"}
    for level in ("disable", "basic"):
        assert set(ratios[level]) == {"median_ms", "create_ms", "pair_p25", "pair_median", "pair_p75"}
        a, b = (m.levels[level] for m in result.models)
        assert ratios[level]["median_ms"] == pytest.approx(b.median_ms / a.median_ms)
        assert ratios[level]["create_ms"] == pytest.approx(b.create_ms / a.create_ms)
        assert ratios[level]["pair_p25"] <= ratios[level]["pair_median"] <= ratios[level]["pair_p75"]
    assert ratios["file_size"] == pytest.approx(result.models[1].file_size / result.models[0].file_size)
    assert result.settings["order"] == "ABBA interleaved"
    assert "second/first" in result.summary() and "median at 'basic' / at 'disable'" in result.summary()
    assert "per-pair ratio second/first" in result.summary()
    d = json.loads(json.dumps(result.to_dict()))
    assert set(d["models"][0]["levels"]["disable"]) == TIMING_KEYS
    assert d["inputs"] == [{"name": "x", "dtype": "float32", "shape": [1, 8, 8, 8], "source": "normal(0,1)"}]


def test_models_with_different_inputs_get_their_own(tmp_path, pair):
    other = save(multi_io_model(), tmp_path / "m.onnx")
    result = bench(pair[0], other, levels=("disable",), **FAST)
    assert any("different inputs" in n for n in result.notes)


def test_interleaving_alternates_order(pair, monkeypatch):
    from bnfold import verify

    calls = []
    real = verify.OrtRunner.run

    def spy(self, feeds):
        calls.append(self.label)
        return real(self, feeds)

    monkeypatch.setattr(verify.OrtRunner, "run", spy)
    bench(pair[0], pair[1], levels=("disable",), runs=4, warmup=0, sessions=1)
    a, b = pair
    assert calls == [a, b, b, a, a, b, b, a]


def test_bad_arguments(pair):
    with pytest.raises(InputError, match="level"):
        bench(pair[0], levels=("fastest",), **FAST)
    with pytest.raises(InputError):
        bench(pair[0], levels=(), **FAST)
    with pytest.raises(InputError):
        bench(pair[0], runs=0)
    with pytest.raises(InputError, match="no such file"):
        bench(pair[0] + ".missing", **FAST)


def test_percentile_matches_numpy_default():
    np = pytest.importorskip("numpy")
    values = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 7.0]
    assert _percentile(values, 0.9) == pytest.approx(np.percentile(values, 90))
    assert _percentile([2.0], 0.9) == 2.0


def test_cli_bench_json_and_progress(pair, tmp_path):
    report = tmp_path / "b.json"
    result = CliRunner().invoke(bench_cmd, [*pair, "--runs", "2", "--warmup", "0", "--threads", "1",
                                            "--levels", "disable,all", "--json", str(report), "--progress"])
    assert result.exit_code == 0, result.output
    assert "level disable" in result.stdout and "level all" in result.stdout
    d = json.loads(report.read_text())
    assert d["levels"] == ["disable", "all"] and d["settings"]["threads"] == 1 and d["settings"]["runs"] == 2
    assert set(d["ratios"]) == {"file_size", "disable", "all"}
    assert all(m["levels"]["all"]["median_ms"] > 0 for m in d["models"])


def test_cli_bench_errors_exit_2(pair, tmp_path):
    result = CliRunner().invoke(bench_cmd, [pair[0], "--levels", "disable,turbo", "--runs", "1"])
    assert result.exit_code == 2 and result.stderr.startswith("bnfold: error:")
    missing = CliRunner().invoke(bench_cmd, [str(tmp_path / "none.onnx"), "--runs", "1"])
    assert missing.exit_code == 2 and "Traceback" not in missing.output


def test_bench_is_a_function_and_latency_its_module():
    import bnfold
    import bnfold.latency

    assert callable(bnfold.bench) and bnfold.bench is bnfold.latency.bench
    assert not hasattr(bnfold.latency, "latency")


def test_latency_uses_only_public_names_of_verify():
    import ast
    import inspect

    import bnfold.latency

    tree = ast.parse(inspect.getsource(bnfold.latency))
    private = [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.module or "").endswith("verify")
               for a in n.names if a.name.startswith("_")]
    assert private == []


def test_same_file_names_are_told_apart_by_their_paths(tmp_path):
    from bnfold.latency import short_labels

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = save(conv_bn_chain(layers=1), tmp_path / "a" / "model.onnx")
    b = save(conv_bn_chain(layers=1, fold=True), tmp_path / "b" / "model.onnx")
    assert short_labels([a, b]) == [os.path.join("a", "model.onnx"), os.path.join("b", "model.onnx")]
    assert short_labels([a, a]) == ["model.onnx #1", "model.onnx #2"]
    assert short_labels(["x/one.onnx", "y/two.onnx"]) == ["one.onnx", "two.onnx"]
    result = bench(a, b, levels=("disable",), **FAST)
    assert result.labels == short_labels([a, b])
    assert os.path.join("a", "model.onnx") in result.summary() and "first: " + a in result.summary()


def test_a_model_against_itself_gives_ratios_near_one(tmp_path):
    """Timing is noisy on a shared machine, so the bound is loose; the measured numbers are in
    the README (bnfold bench A A)."""
    path = save(conv_bn_chain(layers=2, dynamic=False), tmp_path / "m.onnx")
    result = bench(path, path, levels=("disable",), runs=40, warmup=5, sessions=5, threads=1)
    r = result.ratios["disable"]
    assert result.ratios["file_size"] == 1.0
    for key in ("median_ms", "pair_median", "create_ms"):
        assert 0.5 < r[key] < 2.0, (key, r)
    assert r["pair_p25"] <= 1.0 <= r["pair_p75"] or 0.8 < r["pair_median"] < 1.25, r

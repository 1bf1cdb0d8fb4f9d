"""What `bnfold` prints and writes in everyday use (issue 15): three short lines by default,
details with --verbose, colour only on a terminal, one-line usage errors, one JSON shape for
one model and many, `--json -` on stdout, batch dry runs, pickles in a batch, and Ctrl-C."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from bnfold.cli import main
from bnfold.errors import EXIT_INPUT, EXIT_MISMATCH, EXIT_OK
from onnx_models import GraphBuilder

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
BNFOLD = [sys.executable, "-c", "import sys; from bnfold.cli import main; sys.exit(main())"]


def model(seed: int = 0, leave_one: bool = True) -> onnx.ModelProto:
    """conv-bn (folds) and, with ``leave_one``, relu-bn (left: no-linear-producer)."""
    g = GraphBuilder(seed=seed)
    h = g.bn(g.conv(g.input("x", [1, 3, 6, 6]), "conv", 3, 4, (3, 3)), "bn", 4)
    if leave_one:
        h = g.bn(g.node("Relu", [h], "r", "relu").output[0], "bn_after_relu", 4)
    g.output(h)
    return g.model()


@pytest.fixture
def three(tmp_path):
    """Two good models and one bad file, in a folder of their own."""
    folder = tmp_path / "models"
    folder.mkdir()
    onnx.save(model(0), str(folder / "a.onnx"))
    (folder / "b.onnx").write_bytes(b"\x08\x07 not a model")
    onnx.save(model(1), str(folder / "c.onnx"))
    return [folder / "a.onnx", folder / "b.onnx", folder / "c.onnx"]


def invoke(*args, env=None, color=False):
    return CliRunner().invoke(main, [str(a) for a in args], env=env, color=color, catch_exceptions=False)


def one_error_line(result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bnfold: error: "), result.stderr
    assert "Usage:" not in result.stderr and "Traceback" not in result.stderr
    return lines[0]


# -- the default summary and --verbose --------------------------------------------------------


def test_default_summary_is_three_short_lines(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    onnx.save(model(), "m.onnx")
    result = invoke("m.onnx", "-o", "f.onnx")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3, result.stdout
    assert all(len(line) < 100 for line in lines), lines
    size = os.path.getsize(tmp_path / "f.onnx")
    assert lines[0].startswith("folded 1 of 2 BatchNorm(s) (4 -> 3 nodes, 1.2 kB -> ")
    assert lines[0].endswith(f"{size} B); left 1: no-linear-producer")
    assert lines[1].startswith("check: PASS, 1 output(s) and 1 fold site(s) match")
    assert lines[2].startswith("wrote f.onnx in ")
    for phase in ("start", "load", "fold", "write", "check"):  # the command's wall time, in parts
        assert f" {phase} " in lines[2]


def test_verbose_adds_every_bn_the_before_after_table_and_check_statistics(tmp_path):
    onnx.save(model(), str(tmp_path / "m.onnx"))
    result = invoke(tmp_path / "m.onnx", "-o", tmp_path / "f.onnx", "--verbose")
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    assert "bn_after_relu" in text and "no-linear-producer" in text
    table = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.startswith("  BatchNorm")}
    assert table["BatchNormalization"][:2] == ["2", "1"]
    assert "file size" in text and "max abs" in text and "rule:" in text


def test_paths_are_printed_as_typed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    onnx.save(model(), "m.onnx")
    os.mkdir("sub")
    result = invoke("m.onnx", "-o", "sub/../f.onnx")
    assert result.exit_code == 0, result.stderr
    assert "wrote sub/../f.onnx in " in result.stdout and str(tmp_path) not in result.stdout


def test_colour_on_a_terminal_only_and_never_with_no_color(tmp_path):
    onnx.save(model(), str(tmp_path / "m.onnx"))
    args = (tmp_path / "m.onnx", "-o", tmp_path / "f.onnx")
    coloured = invoke(*args, color=True).stdout
    assert "\x1b[32mPASS" in coloured and "\x1b[33m" in coloured  # green pass, yellow left
    assert "\x1b[" not in invoke(*args).stdout  # not a terminal
    assert "\x1b[" not in invoke(*args, color=True, env={"NO_COLOR": "1"}).stdout


def test_dry_run_says_would_fold(tmp_path):
    onnx.save(model(), str(tmp_path / "m.onnx"))
    result = invoke(tmp_path / "m.onnx", "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("would fold 1 of 2") and "folded" not in result.stdout
    assert "nothing written" in result.stdout


def test_a_failed_check_prints_the_verdict_and_one_error_line(tmp_path, monkeypatch):
    import numpy as np
    from onnx import numpy_helper

    import bnfold.onnx_pass as onnx_pass

    onnx.save(model(), str(tmp_path / "m.onnx"))
    real = onnx_pass.fold_model_proto

    def broken(m, *args, **kwargs):
        report = real(m, *args, **kwargs)
        for t in m.graph.initializer:
            if t.name == m.graph.node[0].input[1]:
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(1.01), t.name))
        return report

    monkeypatch.setattr(onnx_pass, "fold_model_proto", broken)
    result = invoke(tmp_path / "m.onnx", "-o", tmp_path / "f.onnx", "--json", tmp_path / "r.json")
    assert "does not match" in one_error_line(result, EXIT_MISMATCH)
    # the check names where the fold went wrong, then the outputs
    assert "check: FAIL, 1 of 1 fold site(s) differ (bn); 1 of 1 output(s) differ" in result.stdout
    entry = json.loads((tmp_path / "r.json").read_text())["models"][0]
    assert entry["status"] == "mismatch" and entry["check"]["passed"] is False and entry["output"] is None
    assert not (tmp_path / "f.onnx").exists()


# -- usage errors: one line, exit 2 --------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["{m}"],  # no -o
        ["{m}", "-o", "{dir}"],  # -o names a folder
        ["{m}", "-o", "{dir}/f.onnx", "-j", "2"],  # -j with -o
        ["{m}", "{m}", "-o", "{dir}/f.onnx"],  # several models with -o
        ["{m}", "--no-such-option"],
        ["bench", "{m}", "--runs", "0"],
        ["check", "{m}"],  # missing FOLDED
    ],
    ids=["missing-o", "o-is-folder", "j-with-o", "many-with-o", "unknown-option", "runs-0", "missing-arg"],
)
def test_usage_errors_are_one_line(tmp_path, args):
    onnx.save(model(), str(tmp_path / "m.onnx"))
    argv = [a.format(m=tmp_path / "m.onnx", dir=tmp_path) for a in args]
    one_error_line(invoke(*argv), 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_usage_error_in_a_real_process_is_one_line():
    proc = subprocess.run(BNFOLD + ["bench", "x.onnx", "--runs", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("bnfold: error: "), proc.stderr


def test_help_explains_every_option_with_an_example():
    import click

    from bnfold.cli.fold import fold

    for command in (main, fold):
        for param in command.params:
            if isinstance(param, click.Option) and param.name not in ("help", "version"):
                assert param.help, f"{command.name}: {param.name} has no help"
    text = invoke("fold", "--help").stdout
    assert "Examples:" in text and "bnfold model.onnx -o model.folded.onnx" in text
    for option in ("--output", "--out-dir", "--jobs", "--dry-run", "--verbose", "--json", "--no-check", "--seed", "--shape"):
        assert option in text
    assert "bnfold MODEL.onnx -o OUT.onnx" in invoke("--help").stdout


def test_every_option_of_every_command_has_an_example_that_uses_it():
    import click

    commands = {"bnfold": main, **{f"bnfold {name}": cmd for name, cmd in main.commands.items()}}
    assert {"bnfold fold", "bnfold check", "bnfold bench"} <= set(commands)
    missing = []
    for path, command in commands.items():
        for param in command.params:
            if not isinstance(param, click.Option) or param.name == "help":
                continue
            text = param.help or ""
            example = text.split("Example:", 1)[1] if "Example:" in text else ""
            if not any(flag in example.split() for flag in param.opts + param.secondary_opts):
                missing.append(f"{path} {'/'.join(param.opts + param.secondary_opts)}")
    assert not missing, f"options whose help has no 'Example: ...' using the option: {missing}"
    text = invoke("bench", "--help").stdout  # and --help shows them
    assert "Example: --provider cuda" in " ".join(text.split())


# -- JSON: one documented shape; '-' is stdout ---------------------------------------------------


def _assert_schema(doc, n_models: int):
    assert doc["schema_version"] == 1 and isinstance(doc["bnfold_version"], str)
    assert len(doc["models"]) == n_models and doc["summary"]["models"] == n_models
    keys = {"input", "output", "format", "status", "exit_code", "error", "fold", "check", "before", "after", "seconds"}
    for entry in doc["models"]:
        assert set(entry) == keys


def test_json_has_the_same_shape_for_one_model_and_many(tmp_path, three):
    single = tmp_path / "single.json"
    assert invoke(three[0], "-o", tmp_path / "f.onnx", "--json", single).exit_code == 0
    doc = json.loads(single.read_text())
    _assert_schema(doc, 1)
    entry = doc["models"][0]
    assert entry["status"] == "ok" and entry["check"]["passed"] and entry["fold"]["folded_count"] == 1
    assert entry["before"]["ops"]["BatchNormalization"] == 2 and entry["after"]["ops"]["BatchNormalization"] == 1
    assert entry["after"]["bytes"] == os.path.getsize(tmp_path / "f.onnx")
    assert set(entry["seconds"]) == {"total", "load", "fold", "write", "check"}
    batch = tmp_path / "batch.json"
    invoke(*three, "--out-dir", tmp_path / "out", "--json", batch)
    _assert_schema(json.loads(batch.read_text()), 3)


@pytest.mark.parametrize("batch", [False, True], ids=["single", "batch"])
def test_json_dash_writes_to_stdout_and_the_summary_to_stderr(tmp_path, three, monkeypatch, batch):
    monkeypatch.chdir(tmp_path)
    args = [three[0], three[2], "--out-dir", "out"] if batch else [three[0], "-o", "f.onnx"]
    result = invoke(*args, "--json", "-")
    assert result.exit_code == 0, result.stderr
    _assert_schema(json.loads(result.stdout), 2 if batch else 1)
    assert "folded 1 of 2" in result.stderr
    assert not (tmp_path / "-").exists()


# -- batches ----------------------------------------------------------------------------------


def test_batch_dry_run_reports_every_model_and_writes_nothing(tmp_path, three):
    before = sorted(tmp_path.rglob("*"))
    result = invoke(three[0], three[2], "--dry-run")
    assert result.exit_code == EXIT_OK, (result.stdout, result.stderr)
    assert result.stdout.count("would fold 1 of 2") == 2 and "internal error" not in result.stdout
    assert sorted(tmp_path.rglob("*")) == before


def test_a_pickle_in_a_batch_gets_the_pickle_refusal(tmp_path, three):
    pickle = tmp_path / "models" / "weights.pt"
    pickle.write_bytes(b"\x80\x04 never unpickled")
    result = invoke(three[0], pickle, "--out-dir", tmp_path / "out")
    assert result.exit_code == EXIT_INPUT
    assert "weights.pt: refusing to load a pickled PyTorch file" in result.stdout
    assert "not an ONNX model" not in result.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.onnx"]


def test_batch_prints_one_line_per_model_then_a_total(tmp_path, three):
    result = invoke(*three, "--out-dir", tmp_path / "out")
    assert result.exit_code == EXIT_INPUT
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[:3]] == ["ok", "FAIL", "ok"]
    assert lines[1].endswith("[exit 2]") and str(three[1]) in lines[1]
    assert lines[3].startswith("2 of 3 model(s) ok, 1 failed")
    assert one_error_line(result, EXIT_INPUT) == f"bnfold: error: 1 of 3 model(s) failed: {three[1]}"


def _interrupt(tmp_path, jobs: int, whole_group: bool, sigint=signal.SIG_DFL):
    """Start a batch of 16 models, wait for the first result, send SIGINT, collect the end.
    ``sigint``: the disposition bnfold starts with (SIG_IGN: as a script's `bnfold ... &`)."""
    folder = tmp_path / "zoo"
    folder.mkdir()
    for i in range(16):
        shutil.copy(SAMPLES / "resnet_mini.onnx", folder / f"m{i:02}.onnx")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(BNFOLD + [str(folder), "--out-dir", str(out), "-j", str(jobs)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))  # fmt: skip
    try:
        first = proc.stdout.readline()
        assert first.startswith("ok "), first + proc.stderr.read()
        sent = time.monotonic()
        if whole_group:  # as a terminal does: the workers get it too
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
        stopped_after = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, first + rest, err, out, stopped_after


@pytest.mark.parametrize("jobs,whole_group", [(1, False), (2, True), (2, False)], ids=["j1", "j2-group", "j2-parent"])
def test_ctrl_c_stops_the_batch_and_lists_what_was_written(tmp_path, jobs, whole_group):
    code, stdout, stderr, out, _ = _interrupt(tmp_path, jobs, whole_group)
    assert code == 130, (stdout, stderr)
    assert stderr.strip().splitlines()[-1] == "bnfold: error: interrupted; nothing else was written", stderr
    assert "Traceback" not in stderr
    head, _, listing = stdout.partition("output(s) written:")
    listed = {line.strip() for line in listing.splitlines() if line.strip()}
    on_disk = {str(p) for p in out.rglob("*")}
    assert listed == on_disk, (stdout, on_disk)  # everything written is listed; nothing half-written
    assert 1 <= len(listed) < 16, stdout  # it stopped: the rest was never folded
    assert "interrupted after" in head


def test_a_batch_started_with_sigint_ignored_ignores_it(tmp_path):
    """`bnfold ... -j 2 &` from a script starts with SIGINT ignored: a SIGINT to the whole group
    neither stops it nor turns into an internal error (it did: exit 70, KeyError)."""
    code, stdout, stderr, out, _ = _interrupt(tmp_path, 2, True, sigint=signal.SIG_IGN)
    assert code == 0, (stdout, stderr)
    assert len(list(out.rglob("*.onnx"))) == 16, stdout


# -- .pt2 ---------------------------------------------------------------------------------------


def test_pt2_prints_the_check_verdict_and_fills_the_json_check_block(tmp_path):
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    torch.export.save(torch.export.export(net, (torch.randn(1, 3, 8, 8),)), str(tmp_path / "m.pt2"))
    result = invoke(tmp_path / "m.pt2", "-o", tmp_path / "f.pt2", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("folded 1 of 1 BatchNorm(s) (") and lines[1].startswith("check: PASS, 1 output(s) match")
    entry = json.loads((tmp_path / "r.json").read_text())["models"][0]
    assert entry["format"] == "pt2" and entry["check"]["passed"] is True
    assert entry["check"]["models"] == {"original": str(tmp_path / "m.pt2"), "folded": str(tmp_path / "f.pt2")}
    assert entry["check"]["outputs"] and entry["check"]["runtime"]
    assert entry["check"]["inputs"]["tensors"] == [
        {"name": "input", "dtype": "float32", "shape": [1, 3, 8, 8], "source": "the program's example input"}]
    skipped = invoke(tmp_path / "m.pt2", "-o", tmp_path / "g.pt2", "--no-check", "--json", tmp_path / "s.json")
    assert skipped.exit_code == 0, skipped.stderr
    assert "check: skipped (--no-check)" in skipped.stdout and "PASS" not in skipped.stdout
    assert json.loads((tmp_path / "s.json").read_text())["models"][0]["check"] is None
    assert (tmp_path / "g.pt2").is_file()


def test_pt2_whose_fold_goes_wrong_prints_check_fail_and_writes_nothing(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from bnfold.torch_pass import _program

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    torch.export.save(torch.export.export(net, (torch.randn(1, 3, 8, 8),)), str(tmp_path / "m.pt2"))
    real = _program.fold_exported_program

    def broken(ep):  # a fold bug: one weight comes out scaled
        ep, report = real(ep)
        ep.state_dict["0.weight"] = torch.nn.Parameter(ep.state_dict["0.weight"] * 1.5, requires_grad=False)
        return ep, report

    monkeypatch.setattr(_program, "fold_exported_program", broken)
    result = invoke(tmp_path / "m.pt2", "-o", tmp_path / "f.pt2", "--json", tmp_path / "r.json")
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert "check: FAIL, 1 of 1 output(s) differ (output_0" in result.stdout
    assert not (tmp_path / "f.pt2").exists()
    check = json.loads((tmp_path / "r.json").read_text())["models"][0]["check"]
    assert check["passed"] is False and check["outputs"][0]["passed"] is False
    assert [t["name"] for t in check["inputs"]["tensors"]] == ["input"]


def test_an_output_folder_that_cannot_be_made_is_an_output_error_not_a_bug(tmp_path, three):
    (tmp_path / "a_file").write_text("x")
    result = invoke(three[0], three[2], "--out-dir", tmp_path / "a_file" / "out")
    assert result.exit_code == 4, (result.stdout, result.stderr)
    assert "internal error" not in result.stdout and "cannot create the output folder" in result.stdout


def test_readme_ci_installs_from_a_checkout_or_a_wheel_and_the_wheel_builds(tmp_path):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    ci = readme[readme.index("## Use in CI"):]
    ci = ci[: ci.index("\n## ", 1)]
    assert "pip install bnfold" not in ci
    assert "pip install ./bnfold-src" in ci and "pip wheel --no-deps -w dist ./bnfold-src" in ci
    root, src = Path(__file__).resolve().parent.parent, tmp_path / "src"  # a copy: building writes beside it
    shutil.copytree(root / "bnfold", src / "bnfold", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)  # fmt: skip
    if proc.returncode != 0 and "No module named" in proc.stderr:
        pytest.skip("no setuptools/wheel in this environment")
    assert proc.returncode == 0, proc.stderr[-2000:]
    import zipfile

    (wheel,) = tmp_path.glob("bnfold-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "bnfold/cli/__init__.py" in names and "bnfold/pipeline.py" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "bnfold = bnfold.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def _stderr_on_a_terminal(args, cwd):
    """Run bnfold with stderr on a pseudo-terminal (stdout piped); return (code, stdout, stderr)."""
    import pty

    master, slave = pty.openpty()
    env = dict(os.environ)
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(BNFOLD + [str(a) for a in args], stdout=subprocess.PIPE, stderr=slave, cwd=cwd, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # the other side closed
            break
        if not data:
            break
        chunks.append(data)
    stdout = proc.stdout.read().decode()
    proc.wait(timeout=120)
    os.close(master)
    return proc.returncode, stdout, b"".join(chunks).decode(errors="replace")


def test_progress_on_a_terminal_batch_bar_and_single_phases(tmp_path, three):
    a, c = "models/a.onnx", "models/c.onnx"
    code, stdout, stderr = _stderr_on_a_terminal([a, c, "--out-dir", "out"], tmp_path)
    assert code == 0, stderr
    assert f"0/2  {a}" in stderr and f"1/2  {c}" in stderr  # from the start, then on
    assert stderr.endswith("\r\x1b[K")  # the bar is gone at the end
    assert stdout.count("ok ") == 2 and "\x1b[" not in stdout  # piped stdout stays plain
    code, stdout, stderr = _stderr_on_a_terminal([a, "-o", "f.onnx"], tmp_path)
    assert code == 0, stderr
    for label in ("loading", "folding", "writing", "checking"):
        assert f"{label} {a} (" in stderr
    assert stdout.splitlines()[0].endswith("; left 1: no-linear-producer")

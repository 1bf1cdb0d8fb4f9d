"""``bnfold check`` and ``bnfold bench``: thin wrappers over bnfold.verify and bnfold.latency."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any, Dict, Optional

import click

from ..errors import EXIT_MISMATCH, InputError, OutputError
from ._common import handles_errors
from .check_options import parse_shapes, with_check_options

_OPT_CHOICE = click.Choice(["disable", "basic", "extended", "all"])
_PROVIDER_CHOICE = click.Choice(["cpu", "cuda"])


def _write_json(path: str, data: Dict[str, Any]) -> None:
    """Write atomically (temp file + rename), so a failed run leaves no half-written report.
    ``-`` writes to stdout."""
    text = json.dumps(data, indent=2) + "\n"
    if path == "-":
        sys.stdout.write(text)
        return
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".bnfold-", suffix=".json.tmp", dir=directory)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the JSON report ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise OutputError(f"{path}: cannot write the JSON report ({exc.strerror or exc})") from None


def _echo_report(text: str, json_path: Optional[str]) -> None:
    # With --json -, stdout carries the JSON: the human summary goes to stderr.
    click.echo(text, err=json_path == "-")


@click.command("check")
@click.argument("original", metavar="ORIGINAL")
@click.argument("folded", metavar="FOLDED")
@with_check_options
@click.option("--range", "value_range", metavar="LO,HI",
              help="Uniform float inputs in [LO,HI) (and ints in it) instead of standard normal. Example: --range 0,1")
@click.option("--report", "report_path", metavar="FOLD.json",
              help="The fold's JSON report (bnfold ... --json): also compare the tensor at every fold site, "
                   "and name the fold that differs. Example: --report fold.json")
@click.option("--save-inputs", metavar="FILE.npz",
              help="Write the inputs fed (replay them with --inputs). Example: --save-inputs in.npz")
@click.option("--save-outputs", metavar="FILE.npz",
              help="Write both models' outputs (and fold-site tensors). Example: --save-outputs out.npz")
@click.option("--ort-opt", type=_OPT_CHOICE, default="disable", show_default=True,
              help="onnxruntime graph optimization level for both models. Example: --ort-opt all")
@click.option("--provider", type=_PROVIDER_CHOICE, default="cpu", show_default=True,
              help="onnxruntime execution provider; cuda needs onnxruntime-gpu and a GPU (TF32 is turned off). "
                   "Example: --provider cuda")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="onnxruntime intra-op threads. Example: --threads 1")
@click.option("--json", "json_path", metavar="FILE",
              help="Write the full report as JSON (- for stdout). Example: --json check.json")
@click.option("-q", "--quiet", is_flag=True, help="Print only the verdict line. Example: -q")
@handles_errors
def check(original, folded, check_opts, value_range, report_path, save_inputs, save_outputs, ort_opt, provider, threads,
          json_path, quiet):
    """Run ORIGINAL and FOLDED with onnxruntime on the same inputs and compare every output.

    \b
    Exit codes: 0 all outputs match, 1 a mismatch, 2 bad input or usage
    (missing or corrupt model, inputs that do not fit), 3 external data missing.
    """
    from ..verify import check as run_check
    from ..verify import parse_range

    result = run_check(
        original,
        folded,
        value_range=parse_range(value_range) if value_range else None,
        ort_opt=ort_opt,
        provider=provider,
        threads=threads,
        report=_read_report(report_path) if report_path else None,
        save_inputs=save_inputs,
        save_outputs=save_outputs,
        **check_opts.kwargs(),
    )
    if json_path:
        _write_json(json_path, result.to_dict())
    text = result.summary()
    _echo_report(text.splitlines()[0] if quiet else text, json_path)
    if not result:
        sys.exit(EXIT_MISMATCH)


def _read_report(path: str) -> Dict[str, Any]:
    """A fold's JSON report: the fold command's own (``folded`` and ``affine_folded``), or a
    batch report's entry, or a check report that embeds it."""
    from ..onnx_io import check_readable

    check_readable(path)
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a JSON fold report ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("models"), list):  # the fold command's report
        models = [m for m in data["models"] if isinstance(m, dict) and isinstance(m.get("fold"), dict)]
        if len(models) != 1:
            raise InputError(f"{path}: a report of {len(models)} folded models; --report takes one model's report")
        data = models[0]["fold"]
    if isinstance(data, dict) and isinstance(data.get("report"), dict):
        data = data["report"]
    if not isinstance(data, dict) or not isinstance(data.get("folded"), list):
        raise InputError(f"{path}: not a fold report (no 'folded' list); write one with bnfold MODEL -o OUT --json FILE")
    return data


@click.command("bench")
@click.argument("model", metavar="MODEL")
@click.argument("other", metavar="[OTHER]", required=False)
@click.option("--levels", default="disable,all", show_default=True, metavar="L1,L2",
              help="onnxruntime optimization levels to measure: disable, basic, extended, all. Example: --levels all")
@click.option("--runs", type=click.IntRange(min=1), default=50, show_default=True,
              help="Timed runs per model and level. Example: --runs 200")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True,
              help="Untimed runs first. Example: --warmup 10")
@click.option("--sessions", type=click.IntRange(min=1), default=5, show_default=True,
              help="Session creations timed per model and level (median and min-max reported). Example: --sessions 3")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="onnxruntime intra-op threads (default: ORT's choice). Example: --threads 4")
@click.option("--provider", type=_PROVIDER_CHOICE, default="cpu", show_default=True,
              help="onnxruntime execution provider; cuda needs onnxruntime-gpu and a GPU. Example: --provider cuda")
@click.option("--shape", "shape", multiple=True, metavar="NAME:DIMS",
              help="Shape of an input, or the value of a dynamic dim. Repeatable. Example: --shape x:8x3x224x224")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs. Example: --seed 1")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar on stderr (default: when stderr is a terminal). Example: --no-progress")
@click.option("--json", "json_path", metavar="FILE",
              help="Write all timings as JSON (- for stdout). Example: --json bench.json")
@handles_errors
def bench(model, other, levels, runs, warmup, sessions, threads, provider, shape, seed, progress, json_path):
    """Measure onnxruntime latency of MODEL, or of MODEL and OTHER side by side (interleaved).

    Every ratio is second / first (OTHER / MODEL): below 1 means OTHER is faster or smaller.
    """
    from ..latency import bench as run_bench

    result = run_bench(
        model,
        other,
        levels=[x.strip() for x in levels.split(",") if x.strip()],
        provider=provider,
        threads=threads,
        warmup=warmup,
        runs=runs,
        sessions=sessions,
        seed=seed,
        shapes=parse_shapes(shape),
        progress=progress,
    )
    if json_path:
        _write_json(json_path, result.to_dict())
    _echo_report(result.summary(), json_path)

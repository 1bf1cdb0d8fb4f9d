"""``bnfold check`` and ``bnfold bench``: thin wrappers over bnfold.verify and bnfold.latency."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any, Dict, Optional, Sequence, Tuple

import click

from ..errors import EXIT_MISMATCH, InputError, OutputError
from ._common import handles_errors

_OPT_CHOICE = click.Choice(["disable", "basic", "extended", "all"])
_PROVIDER_CHOICE = click.Choice(["cpu", "cuda"])


def _shapes(values: Sequence[str]) -> Dict[str, Tuple[int, ...]]:
    from ..verify import parse_shape

    shapes: Dict[str, Tuple[int, ...]] = {}
    for text in values:
        name, dims = parse_shape(text)
        if name in shapes:
            raise InputError(f"--shape {name} given twice")
        shapes[name] = dims
    return shapes


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
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--range", "value_range", metavar="LO,HI", help="Uniform float inputs in [LO,HI) (and ints in it) instead of standard normal.")
@click.option("--shape", "shape", multiple=True, metavar="NAME:DIMS",
              help="Shape of an input, e.g. x:1x3x224x224, or the value of a dynamic dim, e.g. N:4. Repeatable.")
@click.option("--inputs", "inputs_npz", metavar="FILE.npz", help="Real inputs: an .npz with one array per input name.")
@click.option("--batches", type=click.IntRange(min=1), default=1, show_default=True, help="Number of random input batches.")
@click.option("--atol", multiple=True, metavar="VALUE|NAME:VALUE",
              help="Absolute tolerance for all outputs, or NAME:VALUE for one output. Repeatable. "
                   "Default: 1e-4 x the output's scale for float32 (see the rule in the report).")
@click.option("--rtol", type=float, default=None, help="Relative tolerance (default by dtype: 1e-4 for float32).")
@click.option("--ort-opt", type=_OPT_CHOICE, default="disable", show_default=True,
              help="onnxruntime graph optimization level for both models.")
@click.option("--provider", type=_PROVIDER_CHOICE, default="cpu", show_default=True,
              help="cuda needs onnxruntime-gpu and a GPU (TF32 is turned off).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime intra-op threads.")
@click.option("--json", "json_path", metavar="FILE", help="Write the full report as JSON (- for stdout).")
@click.option("-q", "--quiet", is_flag=True, help="Print only the verdict line.")
@handles_errors
def check(original, folded, seed, value_range, shape, inputs_npz, batches, atol, rtol, ort_opt, provider, threads, json_path, quiet):
    """Run ORIGINAL and FOLDED with onnxruntime on the same inputs and compare every output.

    \b
    Exit codes: 0 all outputs match, 1 a mismatch, 2 bad input or usage
    (missing or corrupt model, inputs that do not fit), 3 external data missing.
    """
    from ..verify import check as run_check
    from ..verify import parse_atol, parse_range

    global_atol, per_output = parse_atol(atol)
    if rtol is not None and not (rtol >= 0 and rtol != float("inf")):
        raise InputError("--rtol must be finite and >= 0")
    result = run_check(
        original,
        folded,
        seed=seed,
        batches=batches,
        shapes=_shapes(shape),
        value_range=parse_range(value_range) if value_range else None,
        inputs_npz=inputs_npz,
        atol=global_atol,
        rtol=rtol,
        per_output_atol=per_output,
        ort_opt=ort_opt,
        provider=provider,
        threads=threads,
    )
    if json_path:
        _write_json(json_path, result.to_dict())
    text = result.summary()
    _echo_report(text.splitlines()[0] if quiet else text, json_path)
    if not result:
        sys.exit(EXIT_MISMATCH)


@click.command("bench")
@click.argument("model", metavar="MODEL")
@click.argument("other", metavar="[OTHER]", required=False)
@click.option("--levels", default="disable,all", show_default=True, metavar="L1,L2",
              help="onnxruntime optimization levels to measure: disable, basic, extended, all.")
@click.option("--runs", type=click.IntRange(min=1), default=50, show_default=True, help="Timed runs per model and level.")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Untimed runs first.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime intra-op threads (default: ORT's choice).")
@click.option("--provider", type=_PROVIDER_CHOICE, default="cpu", show_default=True)
@click.option("--shape", "shape", multiple=True, metavar="NAME:DIMS", help="Input shape, e.g. x:8x3x224x224. Repeatable.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: when stderr is a terminal).")
@click.option("--json", "json_path", metavar="FILE", help="Write all timings as JSON (- for stdout).")
@handles_errors
def bench(model, other, levels, runs, warmup, threads, provider, shape, seed, progress, json_path):
    """Measure onnxruntime latency of MODEL, or of MODEL and OTHER side by side (interleaved).

    Ratios are OTHER / MODEL: below 1 means OTHER is faster or smaller.
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
        seed=seed,
        shapes=_shapes(shape),
        progress=progress,
    )
    if json_path:
        _write_json(json_path, result.to_dict())
    _echo_report(result.summary(), json_path)

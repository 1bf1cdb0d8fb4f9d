"""``bnfold IN -o OUT``: fold a model file (or many), check the result, print what happened.

All decisions (file types, checks, staging, exit codes) are in :mod:`bnfold.pipeline`; this
module parses options and prints (:mod:`bnfold.cli.output`).
"""

from __future__ import annotations

import json
import os
import sys
import time

import click

from ..errors import EXIT_OK
from . import output as out
from ._common import fail, handles_errors
from .check_options import with_check_options

FOLD_HELP = """Fold every BatchNorm next to a linear op (Conv, ConvTranspose, Gemm, MatMul) into it.

The folded model is run against the original with onnxruntime (graph optimizations
disabled, seeded random inputs) before it is written; a mismatch writes nothing and
exits 1. MODEL is an .onnx file or a .pt2 torch.export program; pickled PyTorch files
(.pt, .pth, .ckpt, ...) are refused, since unpickling runs arbitrary code.

Prints three lines: what was folded (and what was left, with a reason code), the
check's verdict, and what was written with the time of each phase. --verbose adds
every BatchNorm's fate, a before/after table of op counts and file size, and each
output's error statistics.

\b
Examples:
  bnfold model.onnx -o model.folded.onnx
  bnfold model.onnx --dry-run --verbose             # what would fold, and why not
  bnfold model.onnx -o f.onnx --json report.json    # machine-readable report
  bnfold model.onnx -o f.onnx --shape input:1x3x224x224
  bnfold a.onnx b.onnx models/ --out-dir folded/ -j 2
  bnfold program.pt2 -o program.folded.pt2

Exit codes: 0 ok, 1 check failed, 2 bad input or usage, 3 external data, 4 output not
writable, 5 safety limit, 70 internal error, 130 interrupted.
"""


@click.command(help=FOLD_HELP, no_args_is_help=True)
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=str), metavar="MODEL...")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=str), metavar="OUT",
              help="Where to write the folded model (one MODEL). Replaced only if the run succeeds. "
                   "Example: -o model.folded.onnx")  # fmt: skip
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=str), metavar="DIR",
              help="Fold several models (files, or folders searched for *.onnx) into DIR, keeping their "
                   "names. Example: --out-dir folded/")  # fmt: skip
@click.option("-j", "--jobs", type=click.IntRange(1, 256), default=1, show_default=True, metavar="N",
              help="With --out-dir: fold N models at a time in worker processes. Example: -j 4")
@click.option("--dry-run", is_flag=True,
              help="Report what would be folded; write nothing (no -o needed). Example: --dry-run --verbose")
@click.option("-v", "--verbose", is_flag=True,
              help="Also list every BatchNorm and its fate, op counts and file size before/after, "
                   "and each output's error statistics. Example: -v")  # fmt: skip
@click.option("--json", "json_path", type=click.Path(dir_okay=False, allow_dash=True, path_type=str),
              metavar="FILE", help="Write the JSON report (schema in the README) to FILE; '-' for stdout "
                                   "(the text summary then goes to stderr). Example: --json report.json")  # fmt: skip
@click.option("--check/--no-check", default=True, show_default=True,
              help="Run the folded model against the original with onnxruntime before keeping it. "
                   "Example: --no-check (skip it; then check later with `bnfold check`)")  # fmt: skip
@with_check_options
@click.pass_context
@handles_errors
def fold(ctx, models, output, out_dir, jobs, dry_run, verbose, json_path, check, check_opts):
    check_kwargs = check_opts.kwargs()  # parsed inside handles_errors: a bad value is one line
    explicit_jobs = ctx.get_parameter_source("jobs") == click.core.ParameterSource.COMMANDLINE
    if json_path and json_path != "-":
        _check_json_target(json_path, list(models) + ([output] if output else []))
    options = dict(check=check, seed=check_kwargs["seed"], shapes=check_kwargs["shapes"], check_options=check_kwargs)
    if out_dir is not None or len(models) > 1:
        if output:
            raise click.UsageError("-o names one output; with several models use --out-dir DIR")
        if not out_dir and not dry_run:
            raise click.UsageError("several models need --out-dir DIR (or --dry-run)")
        _fold_batch(models, out_dir, jobs, dry_run, verbose, json_path, options)
        return
    if explicit_jobs:
        raise click.UsageError("-j folds several models at a time: use it with --out-dir, not -o")
    if not dry_run and not output:
        raise click.UsageError("give -o OUT for the folded model (or --dry-run to only report)")
    _fold_one(models[0], None if dry_run else output, dry_run, verbose, json_path, options)


def _fold_one(model, output, dry_run, verbose, json_path, options):
    from ..pipeline import fold_path, run_report

    err = json_path == "-"  # stdout carries the JSON: people read stderr
    progress = out.PhaseProgress(model)
    try:
        outcome = fold_path(model, output, on_phase=progress, **options)
    finally:
        progress.clear()
    if outcome.report is not None:
        out.echo(out.fold_line(outcome, dry_run), err=err)
        if verbose:
            for line in out.details(outcome, dry_run):
                out.echo(line, err=err)
        if outcome.ok or outcome.verdict is not None:
            out.echo(out.check_line(outcome, options["check"], dry_run), err=err)
        if verbose:
            for line in out.check_details(outcome.verdict):
                out.echo(line, err=err)
        if outcome.ok:
            out.echo(out.written_line(outcome, dry_run), err=err)
    if json_path:
        report = run_report([outcome], dry_run=dry_run, seconds=outcome.seconds)
        _write_json(json_path, report, outcome.protected)
    if not outcome.ok:
        fail(outcome.error, outcome.exit_code)


def _fold_batch(models, out_dir, jobs, dry_run, verbose, json_path, options):
    from ..pipeline import BatchInterrupted, batch_exit_code, collect_jobs, fold_many, run_report

    start = time.perf_counter()
    pairs = collect_jobs(models, None if dry_run else out_dir)
    err = json_path == "-"
    progress = out.BatchProgress(pairs)

    def on_done(outcome):
        progress.finished(outcome)
        progress.clear()
        out.echo(out.batch_line(outcome, dry_run), err=err)
        if verbose and outcome.report is not None:
            for line in out.details(outcome, dry_run):
                out.echo("  " + line, err=err)
        progress.redraw()

    try:
        outcomes = fold_many(pairs, workers=jobs, on_done=on_done, **options)
    except BatchInterrupted as stop:
        progress.clear()
        _report_interrupt(stop, err)
    finally:
        progress.clear()
    seconds = time.perf_counter() - start
    ok = [o for o in outcomes if o.ok]
    failed = len(outcomes) - len(ok)
    folded = sum(o.report.n_folded for o in ok)
    left = sum(o.report.n_skipped for o in ok)
    tail = f", {out.red(f'{failed} failed')}" if failed else ""
    if dry_run:
        counts = f"would fold {folded} BatchNorm(s), leave {left}"
    else:
        counts = f"{folded} BatchNorm(s) folded, {left} left"
    out.echo(f"{len(ok)} of {len(outcomes)} model(s) ok{tail}; {counts}; {seconds:.2f} s", err=err)
    if json_path:
        protected = frozenset().union(*(o.protected for o in outcomes), *(_model_paths(o) for o in outcomes))
        _write_json(json_path, run_report(outcomes, dry_run=dry_run, seconds=seconds), protected)
    code = batch_exit_code(outcomes)
    if code != EXIT_OK:
        names = [o.source for o in outcomes if not o.ok]
        listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        fail(f"{failed} of {len(outcomes)} model(s) failed: {listed}", code)


def _report_interrupt(stop, err):
    """Ctrl-C: say what was written (those files are complete), then exit 130."""
    from ..pipeline import EXIT_INTERRUPTED

    written = stop.written
    out.echo(f"interrupted after {len(stop.outcomes)} of {stop.total} model(s); "
             f"{len(written)} output(s) written{':' if written else ''}", err=err)  # fmt: skip
    for path in written:
        out.echo(f"  {path}", err=err)
    fail("interrupted; nothing else was written", EXIT_INTERRUPTED)


def _check_json_target(json_path, models):
    """The report must never land on a model (or its data file) that this run reads or writes."""
    from ..onnx_io import check_output_path

    taken = set()
    for m in models:
        real = os.path.realpath(m)
        taken.update({real, real + ".data"})
    check_output_path(json_path, taken, protected="a model file this run reads or writes")


def _model_paths(outcome):
    paths = {os.path.realpath(outcome.source)}
    if outcome.output:
        paths.update({os.path.realpath(outcome.output), os.path.realpath(outcome.output) + ".data"})
    return paths


def _write_json(path, report, protect=frozenset()):
    """The JSON report to ``path`` (staged, replaced only when complete), or stdout for ``-``."""
    text = json.dumps(report, indent=2) + "\n"
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    from ..onnx_io import staged_output

    with staged_output(path, protect=set(protect)) as staged:
        with open(staged, "w", encoding="utf-8") as f:
            f.write(text)

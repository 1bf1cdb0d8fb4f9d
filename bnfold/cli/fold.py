"""``bnfold IN -o OUT``: fold a model file, check the result, print what happened."""

from __future__ import annotations

import os
import time

import click

from ..errors import InputError
from ._common import fail, handles_errors
from .check_options import with_check_options

# Files that can only be read by unpickling, which runs arbitrary code.
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".tar")
PICKLE_REFUSAL = (
    "{path}: refusing to load a pickled PyTorch file, since unpickling runs arbitrary code. "
    "Fold the module in Python with bnfold.fold_module(model), or save it with "
    "torch.export.save(torch.export.export(model, args), 'model.pt2') and pass the .pt2 file"
)


@click.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=str),
              help="Where to write the folded model (one input).")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=str),
              help="Fold several models (files or folders of .onnx files) into this folder.")
@click.option("-j", "--jobs", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Models folded in parallel (processes), with --out-dir.")
@click.option("--dry-run", is_flag=True, help="Report what would be folded; write nothing.")
@click.option("-v", "--verbose", is_flag=True, help="List every BatchNorm with its producer and its fate.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=str),
              help="Write the fold report (and the check verdict) as JSON to this file.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Run the folded model against the original with onnxruntime before keeping it.")
@with_check_options
@handles_errors
def fold(models, output, out_dir, jobs, dry_run, verbose, json_path, check, check_opts):
    """Fold every BatchNorm that follows a linear op (Conv, ConvTranspose, Gemm, MatMul) into it.

    The folded model is checked against the original with onnxruntime (graph optimizations
    disabled, seeded random inputs) before it is written; a mismatch writes nothing and exits 1.

    \b
    bnfold model.onnx -o folded.onnx
    bnfold a.onnx b.onnx models/ --out-dir folded/ -j 2
    """
    check_kwargs = check_opts.kwargs()
    if json_path:
        _check_json_target(json_path, list(models) + ([output] if output else []))
    if out_dir is not None or len(models) > 1:
        if output:
            raise click.UsageError("use --out-dir (not -o) with several models")
        if not out_dir and not dry_run:
            raise click.UsageError("give --out-dir DIR for several models (or --dry-run)")
        _fold_batch(models, out_dir, jobs, dry_run, verbose, json_path, check, check_kwargs)
        return
    model = models[0]
    if not dry_run and not output:
        raise click.UsageError("give -o OUT (or --dry-run to only report)")
    if model.lower().endswith(PICKLE_SUFFIXES):
        raise InputError(PICKLE_REFUSAL.format(path=model))
    if model.lower().endswith(".pt2"):
        _fold_program(model, output, dry_run, verbose, json_path)
        return
    from ..pipeline import fold_path

    outcome = fold_path(model, None if dry_run else output, check=check, check_options=check_kwargs)
    if outcome.report is not None:
        _print_outcome(outcome, verbose, dry_run, check)
    if json_path and outcome.report is not None:
        _write_json(json_path, outcome.report.to_json(), outcome.protected)
    if not outcome.ok:
        fail(outcome.error, outcome.exit_code)


def _print_outcome(outcome, verbose, dry_run, check):
    report = outcome.report
    click.echo(report.summary(verbose=verbose))
    if outcome.verdict is not None:
        click.echo(_indent(outcome.verdict.summary()))
    elif not dry_run and not check:
        click.echo("  check: skipped (--no-check)")
    if dry_run:
        click.echo("  dry run: nothing written")
    elif outcome.ok:
        click.echo(f"  wrote {outcome.output} in {outcome.seconds:.2f} s")


def _fold_batch(models, out_dir, jobs, dry_run, verbose, json_path, check, check_kwargs):
    import json
    import sys

    from ..pipeline import batch_exit_code, collect_jobs, fold_many

    pairs = collect_jobs(models, out_dir or ".")
    if dry_run:
        pairs = [(src, None) for src, _ in pairs]
    lines = []

    def on_done(outcome):
        lines.append(_batch_line(outcome))
        if not bar_shown:
            click.echo(lines[-1])

    bar_shown = sys.stderr.isatty() and len(pairs) > 1
    options = dict(workers=jobs, check=check, check_options=check_kwargs)
    if bar_shown:
        with click.progressbar(length=len(pairs), label="folding", file=sys.stderr) as bar:
            outcomes = fold_many(pairs, on_done=lambda o: (on_done(o), bar.update(1)), **options)
        click.echo("\n".join(lines))
    else:
        outcomes = fold_many(pairs, on_done=on_done, **options)
    failed = sum(not o.ok for o in outcomes)
    folded = sum(o.report.n_folded for o in outcomes if o.report is not None)
    click.echo(f"{len(outcomes) - failed} of {len(outcomes)} model(s) done, {failed} failed; {folded} BatchNorm(s) folded")
    if verbose:
        for o in outcomes:
            if o.report is not None:
                click.echo(f"{o.source}:\n" + _indent(o.report.summary(verbose=True)))
    if json_path:
        summary = {"models": [o.to_dict() for o in outcomes],
                   "summary": {"total": len(outcomes), "failed": failed, "folded_bns": folded}}
        protected = frozenset().union(*(o.protected for o in outcomes), *(_model_paths(o) for o in outcomes))
        _write_json(json_path, json.dumps(summary, indent=2), protected)
    code = batch_exit_code(outcomes)
    if code:
        fail(f"{failed} of {len(outcomes)} model(s) failed", code)


def _batch_line(outcome):
    if outcome.ok:
        r = outcome.report
        total = r.n_folded + r.n_skipped
        where = f" -> {outcome.output}" if outcome.output else ""
        return f"ok    {outcome.source}{where}: folded {r.n_folded} of {total} in {outcome.seconds:.2f} s"
    return f"FAIL  {outcome.source}: {outcome.error} [exit {outcome.exit_code}]"


def _indent(text):
    return "\n".join("  " + line for line in text.splitlines())


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


def _write_json(path, text, protect=frozenset()):
    from ..onnx_io import staged_output

    with staged_output(path, protect=set(protect)) as staged:
        with open(staged, "w", encoding="utf-8") as f:
            f.write(text + "\n")


def _fold_program(model, output, dry_run, verbose, json_path):
    try:
        from ..torch_pass import fold_program_file
    except ImportError:
        raise InputError(
            f"{model}: folding .pt2 programs needs PyTorch: pip install 'bnfold[torch]'"
        ) from None
    start = time.perf_counter()
    report = fold_program_file(model, None if dry_run else output)
    click.echo(report.summary(verbose=verbose))
    if dry_run:
        click.echo("  dry run: nothing written")
    else:
        click.echo(f"  wrote {output} in {time.perf_counter() - start:.2f} s")
    if json_path:
        _write_json(json_path, report.to_json(), {os.path.realpath(model)})

"""``bnfold IN -o OUT``: fold a model file, check the result, print what happened."""

from __future__ import annotations

import os
import time

import click

from ..errors import EXIT_MISMATCH, InputError
from ._common import fail, handles_errors

# Files that can only be read by unpickling, which runs arbitrary code.
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".tar")
PICKLE_REFUSAL = (
    "{path}: refusing to load a pickled PyTorch file, since unpickling runs arbitrary code. "
    "Fold the module in Python with bnfold.fold_module(model), or save it with "
    "torch.export.save(torch.export.export(model, args), 'model.pt2') and pass the .pt2 file"
)


@click.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=str),
              help="Where to write the folded model (required unless --dry-run).")
@click.option("--dry-run", is_flag=True, help="Report what would be folded; write nothing.")
@click.option("-v", "--verbose", is_flag=True, help="List every BatchNorm with its producer and its fate.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=str),
              help="Write the fold report (and the check verdict) as JSON to this file.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Run the folded model against the original with onnxruntime before keeping it.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the check's random inputs.")
@click.option("--shape", "shapes", multiple=True, metavar="NAME:DIMS",
              help="Size dynamic input dims for the check, e.g. input:1x3x224x224 (repeatable).")
@handles_errors
def fold(model, output, dry_run, verbose, json_path, check, seed, shapes):
    """Fold every BatchNorm that follows a linear op (Conv, ConvTranspose, Gemm, MatMul) into it.

    The folded model is checked against the original with onnxruntime (graph optimizations
    disabled, seeded random inputs) before it is written; a mismatch writes nothing and exits 1.
    """
    if not dry_run and not output:
        raise click.UsageError("give -o OUT (or --dry-run to only report)")
    if model.lower().endswith(PICKLE_SUFFIXES):
        raise InputError(PICKLE_REFUSAL.format(path=model))
    if model.lower().endswith(".pt2"):
        _fold_program(model, output, dry_run, verbose, json_path)
        return
    _fold_onnx(model, output, dry_run, verbose, json_path, check, seed, shapes)


def _fold_onnx(model, output, dry_run, verbose, json_path, check, seed, shapes):
    from ..onnx_io import read_model_lazy, staged_output, write_model
    from ..onnx_pass import fold_model_proto

    start = time.perf_counter()
    src = os.path.abspath(model)
    proto, data_files = read_model_lazy(src)
    report = fold_model_proto(proto)
    verdict = None
    if not dry_run:
        protect = {os.path.realpath(src)} | data_files
        with staged_output(output, protect=protect) as staged:
            write_model(proto, staged, external=True if data_files else None)
            del proto  # written; free it before onnxruntime loads both models
            if check:
                verdict = _check(src, staged, seed, shapes)
                report.extra["check"] = verdict.to_dict()
                if not verdict:
                    _finish(report, verdict, verbose, json_path, start, output, dry_run)
                    fail("the folded model does not match the original; nothing written", EXIT_MISMATCH)
    _finish(report, verdict, verbose, json_path, start, output, dry_run)


def _check(original, folded, seed, shapes):
    from ..verify import check as run_check

    return run_check(original, folded, seed=seed, shapes=_parse_shapes(shapes))


def _parse_shapes(specs):
    shapes = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        try:
            shapes[name] = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            sep = ""
        if not sep or not name:
            raise InputError(f"--shape {spec!r}: expected NAME:DIMS such as input:1x3x224x224")
    return shapes


def _finish(report, verdict, verbose, json_path, start, output, dry_run):
    report.extra["total_seconds"] = round(time.perf_counter() - start, 6)
    click.echo(report.summary(verbose=verbose))
    if verdict is not None:
        click.echo(_indent(verdict.summary()))
    elif not dry_run:
        click.echo("  check: skipped (--no-check)")
    if dry_run:
        click.echo("  dry run: nothing written")
    elif verdict is None or verdict:
        click.echo(f"  wrote {output} in {report.extra['total_seconds']:.2f} s")
    if json_path:
        _write_json(json_path, report.to_json())


def _indent(text):
    return "\n".join("  " + line for line in text.splitlines())


def _write_json(path, text):
    from ..onnx_io import staged_output

    with staged_output(path) as staged:
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
    if dry_run:
        raise click.UsageError("--dry-run is not supported for .pt2 programs yet")
    report = fold_program_file(model, output)
    _finish(report, None, verbose, json_path, start, output, dry_run)

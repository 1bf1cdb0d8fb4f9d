"""File-to-file folding: one model (read lazily, folded, checked, written atomically), or many
in parallel processes. The CLI is a thin layer over these functions.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from .errors import EXIT_INTERNAL, EXIT_MISMATCH, EXIT_OK, BnfoldError, CheckFailed, InputError, OutputError
from .report import FoldReport

ONNX_SUFFIX = ".onnx"


@dataclass
class FoldOutcome:
    """What happened to one model. ``exit_code`` follows :mod:`bnfold.errors`."""

    source: str
    output: Optional[str]
    exit_code: int = EXIT_OK
    error: Optional[str] = None
    report: Optional[FoldReport] = None
    verdict: object = None  # a bnfold.verify.CheckResult when the check ran
    seconds: float = 0.0
    exception: Optional[BnfoldError] = field(default=None, repr=False)
    protected: frozenset = frozenset()  # real paths of the input and its data files

    @property
    def ok(self) -> bool:
        return self.exit_code == EXIT_OK

    def raise_for_error(self) -> None:
        """Raise the failure as a :class:`bnfold.errors.BnfoldError` (for the Python API)."""
        if self.exception is not None:
            raise self.exception

    def to_dict(self) -> Dict:
        out = {
            "input": self.source,
            "output": self.output if self.ok else None,
            "status": "ok" if self.ok else ("mismatch" if self.exit_code == EXIT_MISMATCH else "error"),
            "exit_code": self.exit_code,
            "seconds": round(self.seconds, 6),
        }
        if self.error:
            out["error"] = self.error
        if self.report is not None:
            out["report"] = self.report.to_dict()
        return out


def fold_path(
    src: str,
    dst: Optional[str],
    *,
    check: bool = True,
    seed: int = 0,
    shapes: Optional[Dict[str, List[int]]] = None,
    check_options: Optional[Dict] = None,
) -> FoldOutcome:
    """Fold the ONNX model at ``src`` into ``dst`` (None: report only, write nothing).

    ``check_options``: more keyword arguments for :func:`bnfold.verify.check` (tolerances,
    batches, inputs); they win over ``seed`` and ``shapes``.

    The output goes to a staging folder beside ``dst`` and is moved into place only when
    writing and the equivalence check both succeed. Expected failures come back in the
    outcome (``exit_code``, ``error``); bugs propagate.
    """
    from .onnx_io import check_output_path, read_model_lazy
    from .onnx_pass import fold_model_proto

    start = time.perf_counter()
    outcome = FoldOutcome(os.fspath(src), None if dst is None else os.fspath(dst))
    try:
        source = os.path.abspath(src)
        model, data_files = read_model_lazy(source)
        protect = {os.path.realpath(source)} | data_files
        outcome.protected = frozenset(protect)
        if dst is not None:
            check_output_path(os.fspath(dst), protect)  # before the work, not after it
        with _spill_beside(dst) as spill:  # new weights wait on disk, not in memory
            outcome.report = fold_model_proto(model, spill=spill)
            if dst is not None:
                options = dict(external=bool(data_files), check=check,
                               check_options=dict(dict(seed=seed, shapes=shapes or {}), **(check_options or {})))
                _write_and_check(model, source, os.fspath(dst), protect, outcome, **options)
    except _Mismatch:
        exc = CheckFailed("the folded model does not match the original; nothing written")
        outcome.exit_code, outcome.error, outcome.exception = exc.exit_code, str(exc), exc
    except BnfoldError as exc:
        outcome.exit_code, outcome.error, outcome.exception = exc.exit_code, str(exc), exc
    except UnicodeDecodeError:  # protobuf checks UTF-8 only when a string field is read
        exc = InputError(f"{src}: not a valid ONNX model (a string field is not valid UTF-8)")
        outcome.exit_code, outcome.error, outcome.exception = exc.exit_code, str(exc), exc
    outcome.seconds = time.perf_counter() - start
    if outcome.report is not None:
        outcome.report.extra["total_seconds"] = round(outcome.seconds, 6)
    return outcome


def _spill_beside(dst: Optional[str]):
    """A scratch file on the output's file system (kernel-side copies), or the temp folder."""
    from .onnx_wire import Spill

    folder = None if dst is None else os.path.dirname(os.path.abspath(dst))
    try:
        return Spill(folder)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot write ({exc.strerror or exc})") from None


def _write_and_check(model, source: str, dst: str, protect, outcome, *, external, check, check_options) -> None:
    """Write ``model`` to ``dst`` through a staging folder; check it there before moving it in.

    ``external``: write tensors to a data file beside ``dst`` (as the input had them); else
    only when the model exceeds the protobuf limit.
    """
    from .onnx_io import staged_output, write_model

    with staged_output(dst, protect=protect) as staged:
        write_model(model, staged, external=True if external else None)
        if check:
            labels = (outcome.source, dst)
            outcome.verdict = _check(source, staged, labels, outcome.report, check_options)
            outcome.report.extra["check"] = outcome.verdict.to_dict()
            if not outcome.verdict:
                raise _Mismatch()


class _Mismatch(Exception):
    """Raised inside the staging block so that nothing is moved into place."""


def _check(original: str, folded: str, labels, report, check_options):
    from .verify import check

    return check(original, folded, labels=labels, report=report, **check_options)


# ---------------------------------------------------------------- many models


def collect_jobs(inputs: Sequence[str], out_dir: str) -> List[Tuple[str, str]]:
    """Pair each input model with its output path under ``out_dir``.

    A file keeps its name; the models found under a directory (``*.onnx``, recursively)
    keep their path relative to it. Two inputs that would land on one output are refused.
    """
    jobs: List[Tuple[str, str]] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(_onnx_files(item))
            if not found:
                raise InputError(f"{item}: no .onnx files in this directory")
            jobs.extend((path, os.path.join(out_dir, os.path.relpath(path, item))) for path in found)
        else:
            jobs.append((item, os.path.join(out_dir, os.path.basename(item))))
    seen: Dict[str, str] = {}
    for src, dst in jobs:
        key = os.path.abspath(dst)
        if key in seen:
            raise InputError(f"{seen[key]} and {src} would both be written to {dst}")
        seen[key] = src
    return jobs


def _onnx_files(folder: str) -> Iterable[str]:
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".bnfold-"))
        for name in files:
            if name.lower().endswith(ONNX_SUFFIX):
                yield os.path.join(root, name)


def fold_many(
    jobs: Sequence[Tuple[str, str]],
    *,
    workers: int = 1,
    on_done: Optional[Callable[[FoldOutcome], None]] = None,
    **options,
) -> List[FoldOutcome]:
    """Fold every ``(src, dst)`` pair, ``workers`` processes at a time; a bad model is
    reported in its outcome and the others go on. Outcomes come back in job order.
    """
    results: Dict[int, FoldOutcome] = {}

    def finish(i: int, outcome: FoldOutcome) -> None:
        results[i] = outcome
        if on_done is not None:
            on_done(outcome)

    if workers <= 1 or len(jobs) <= 1:
        for i, (src, dst) in enumerate(jobs):
            finish(i, _job(src, dst, options))
    else:
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(_job, src, dst, options): i for i, (src, dst) in enumerate(jobs)}
            for future in as_completed(futures):
                finish(futures[future], future.result())
    return [results[i] for i in range(len(jobs))]


def _job(src: str, dst: str, options) -> FoldOutcome:
    """One model in a worker: a crash becomes that model's error, never the batch's."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        outcome = fold_path(src, dst, **options)
    except Exception as exc:  # a bug on one model must not stop the others
        outcome = FoldOutcome(src, dst, EXIT_INTERNAL, f"internal error ({type(exc).__name__}: {exc})")
    outcome.verdict = None if outcome.verdict is None else outcome.verdict.to_dict()
    outcome.exception = None  # results cross a process boundary: keep them plain
    return outcome


def batch_exit_code(outcomes: Sequence[FoldOutcome]) -> int:
    """1 if any check failed, else the first error's code, else 0."""
    codes = [o.exit_code for o in outcomes if not o.ok]
    if not codes:
        return EXIT_OK
    return EXIT_MISMATCH if EXIT_MISMATCH in codes else codes[0]

"""File-to-file folding: one model (read lazily, folded, checked, written atomically), or many
in parallel processes. The CLI is a thin layer over these functions.

The file-type policy lives here, so that single runs, batch runs and :func:`fold_file` treat a
path alike: ``.pt2`` is a ``torch.export`` program, pickled PyTorch files (``.pt``, ``.pth``,
``.ckpt``, ...) are refused by name and never opened, and anything else is read as ONNX.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from .errors import EXIT_INTERNAL, EXIT_MISMATCH, EXIT_OK, BnfoldError, CheckFailed, InputError, OutputError
from .report import FoldReport

ONNX_SUFFIX = ".onnx"
PROGRAM_SUFFIX = ".pt2"
# Files that can only be read by unpickling, which runs arbitrary code.
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".tar")
PICKLE_REFUSAL = (
    "{path}: refusing to load a pickled PyTorch file, since unpickling runs arbitrary code. "
    "Fold the module in Python with bnfold.fold_module(model), or save it with "
    "torch.export.save(torch.export.export(model, args), 'model.pt2') and pass the .pt2 file"
)

EXIT_INTERRUPTED = 130  # the shell's code for a run stopped by SIGINT
PHASES = ("load", "fold", "write", "check")

PathLike = Union[str, "os.PathLike[str]"]

if TYPE_CHECKING:
    from onnx import ModelProto

# AttributeProto.GRAPH and .GRAPHS: numbers fixed by onnx.proto, so that counting ops needs no
# `import onnx` (the fold path reads models with or without onnx's classes).
_ATTR_GRAPH, _ATTR_GRAPHS = 5, 10


def model_format(path: PathLike) -> str:
    """``"pt2"`` or ``"onnx"`` for ``path``, by its name; a pickle raises :class:`InputError`."""
    name = os.fspath(path).lower()
    if name.endswith(PICKLE_SUFFIXES):
        raise InputError(PICKLE_REFUSAL.format(path=os.fspath(path)))
    return "pt2" if name.endswith(PROGRAM_SUFFIX) else "onnx"


@dataclass
class FoldOutcome:
    """What happened to one model. ``exit_code`` follows :mod:`bnfold.errors`.

    ``source`` and ``output`` are the paths as the caller gave them. ``verdict`` is the check's
    result as a dict (:meth:`bnfold.verify.CheckResult.to_dict`), None when no check ran.
    ``before`` / ``after`` hold ``{"bytes", "nodes", "ops"}`` of the input and of what was
    written; ``times`` the seconds of each phase in :data:`PHASES` that ran.
    """

    source: str
    output: Optional[str]
    exit_code: int = EXIT_OK
    error: Optional[str] = None
    report: Optional[FoldReport] = None
    verdict: Optional[Dict] = None
    seconds: float = 0.0
    format: Optional[str] = None
    before: Optional[Dict] = None
    after: Optional[Dict] = None
    times: Dict[str, float] = field(default_factory=dict)
    exception: Optional[BnfoldError] = field(default=None, repr=False)
    protected: frozenset = frozenset()  # real paths of the input and its data files

    @property
    def ok(self) -> bool:
        return self.exit_code == EXIT_OK

    @property
    def written(self) -> Optional[str]:
        """The output path if this run wrote it, else None."""
        return self.output if self.ok else None

    @property
    def status(self) -> str:
        if self.ok:
            return "ok"
        if self.exit_code == EXIT_MISMATCH:
            return "mismatch"
        return "interrupted" if self.exit_code == EXIT_INTERRUPTED else "error"

    def raise_for_error(self) -> None:
        """Raise the failure as a :class:`bnfold.errors.BnfoldError` (for the Python API)."""
        if self.exception is not None:
            raise self.exception
        if not self.ok:
            raise BnfoldError(self.error or f"failed with exit code {self.exit_code}")

    def to_dict(self) -> Dict:
        """This model's entry in the JSON report (schema in the README, "JSON report")."""
        fold = None
        if self.report is not None:
            fold = {k: v for k, v in self.report.to_dict().items() if k != "check"}
        seconds = {"total": round(self.seconds, 6)}
        seconds.update((k, round(v, 6)) for k, v in self.times.items())
        return {
            "input": self.source,
            "output": self.written,
            "format": self.format,
            "status": self.status,
            "exit_code": self.exit_code,
            "error": self.error,
            "fold": fold,
            "check": self.verdict,
            "before": self.before,
            "after": self.after if self.ok else None,
            "seconds": seconds,
        }


SCHEMA_VERSION = 1  # of the JSON report of `bnfold MODEL... --json`; raised on incompatible changes


def run_report(outcomes: Sequence[FoldOutcome], *, dry_run: bool = False, seconds: float = 0.0) -> Dict:
    """The JSON report of a run, one model or many alike: ``models`` lists one entry per model
    (:meth:`FoldOutcome.to_dict`) and ``summary`` adds them up. Schema: README, "JSON report"."""
    from ._version import __version__

    ok = [o for o in outcomes if o.ok]
    return {
        "schema_version": SCHEMA_VERSION,
        "bnfold_version": __version__,
        "dry_run": bool(dry_run),
        "models": [o.to_dict() for o in outcomes],
        "summary": {
            "models": len(outcomes),
            "ok": len(ok),
            "failed": len(outcomes) - len(ok),
            "folded": sum(o.report.n_folded for o in ok),
            "left": sum(o.report.n_skipped for o in ok),
            "exit_code": batch_exit_code(outcomes),
            "seconds": round(seconds, 6),
        },
    }


def fold_file(src: PathLike, dst: PathLike, *, check: bool = True, seed: int = 0,
              shapes: Optional[Dict[str, Sequence[int]]] = None) -> FoldReport:  # fmt: skip
    """Fold the model at ``src`` and write it to ``dst``; return the report.

    ONNX weights are read lazily and copied through, the result is checked with onnxruntime
    unless ``check=False`` (a ``.pt2`` program is checked on its example inputs), and ``dst``
    is written atomically. Raises :class:`bnfold.errors.BnfoldError` (``CheckFailed`` on a
    mismatch, ``InputError`` for a pickled file); the check's verdict is in
    ``report.extra["check"]``.
    """
    outcome = fold_path(os.fspath(src), os.fspath(dst), check=check, seed=seed, shapes=shapes)
    outcome.raise_for_error()
    if outcome.verdict is not None:
        outcome.report.extra["check"] = outcome.verdict
    return outcome.report


def fold_path(
    src: str,
    dst: Optional[str],
    *,
    check: bool = True,
    seed: int = 0,
    shapes: Optional[Dict[str, Sequence[int]]] = None,
    check_options: Optional[Dict] = None,
    on_phase: Optional[Callable[[str], None]] = None,
) -> FoldOutcome:
    """Fold the model at ``src`` into ``dst`` (None: report only, write nothing).

    The output goes to a staging folder beside ``dst`` and is moved into place only when
    writing and the equivalence check both succeed. Expected failures come back in the
    outcome (``exit_code``, ``error``); bugs and KeyboardInterrupt propagate (nothing is left
    behind). ``check_options`` are passed on to :func:`bnfold.verify.check` (they win over
    ``seed`` and ``shapes``); ``on_phase`` is
    called with each phase name of :data:`PHASES` as it starts.
    """
    start = time.perf_counter()
    outcome = FoldOutcome(os.fspath(src), None if dst is None else os.fspath(dst))
    try:
        outcome.format = model_format(src)
        if outcome.format == "pt2":
            _fold_program(outcome, on_phase, check)
        else:
            options = dict(dict(seed=seed, shapes=dict(shapes or {})), **(check_options or {}))
            _fold_onnx(outcome, check, options, on_phase or (lambda phase: None))
    except _Mismatch:
        _fail(outcome, CheckFailed("the folded model does not match the original; nothing written"))
    except BnfoldError as exc:
        _fail(outcome, exc)
    except UnicodeDecodeError:  # protobuf checks UTF-8 only when a string field is read
        _fail(outcome, InputError(f"{src}: not a valid ONNX model (a string field is not valid UTF-8)"))
    outcome.seconds = time.perf_counter() - start
    return outcome


def _fail(outcome: FoldOutcome, exc: BnfoldError) -> None:
    outcome.exit_code, outcome.error, outcome.exception = exc.exit_code, str(exc), exc


class _Phases:
    """Times the phases of one run into ``outcome.times`` and announces each as it starts."""

    def __init__(self, outcome: FoldOutcome, on_phase: Callable[[str], None]) -> None:
        self.outcome, self.on_phase = outcome, on_phase

    def __call__(self, name: str):
        phases = self

        class _Timer:
            def __enter__(self):
                phases.on_phase(name)
                self.start = time.perf_counter()
                _INTERRUPT.enter()  # a phase is where a batch's Ctrl-C may stop the work

            def __exit__(self, *exc):
                _INTERRUPT.leave()
                phases.outcome.times[name] = phases.outcome.times.get(name, 0.0) + time.perf_counter() - self.start

        return _Timer()


def _fold_onnx(outcome: FoldOutcome, check: bool, check_options: Dict, on_phase) -> None:
    from .onnx_io import check_output_path, read_model_lazy
    from .onnx_pass import fold_model_proto

    phase = _Phases(outcome, on_phase)
    src, dst = outcome.source, outcome.output
    source = os.path.abspath(src)
    with phase("load"):
        model, data_files = read_model_lazy(src)  # errors name the path as the user typed it
        protect = {os.path.realpath(source)} | data_files
        outcome.protected = frozenset(protect)
        if dst is not None:
            check_output_path(dst, protect)  # before the work, not after it
        outcome.before = dict(bytes=_file_bytes([source, *data_files]), **op_counts(model))
    if check and dst is not None:  # the original's session is made while the fold runs
        check_options = dict(check_options, prepared=_prepare_check(source, check_options))
    with _spill_beside(dst) as spill:  # new weights wait on disk, not in memory
        with phase("fold"):
            outcome.report = fold_model_proto(model, spill=spill)
            outcome.after = dict(bytes=None, **op_counts(model))
        if dst is not None:
            _write_and_check(model, source, protect, outcome, phase, external=bool(data_files),
                             check=check, check_options=check_options)  # fmt: skip


def op_counts(model: ModelProto) -> Dict:
    """``{"nodes": N, "ops": {op_type: count}}`` over the model's graph and its subgraphs."""
    counts: Counter = Counter()
    stack = [model.graph]
    while stack:
        graph = stack.pop()
        for node in graph.node:
            counts[node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"] += 1
            for attr in node.attribute:
                if attr.type == _ATTR_GRAPH:
                    stack.append(attr.g)
                elif attr.type == _ATTR_GRAPHS:
                    stack.extend(attr.graphs)
    return {"nodes": sum(counts.values()), "ops": dict(sorted(counts.items()))}


def _file_bytes(paths: Iterable[str]) -> int:
    return sum(os.path.getsize(p) for p in paths if os.path.isfile(p))


def _spill_beside(dst: Optional[str]):
    """A scratch file on the output's file system (kernel-side copies), or the temp folder."""
    from .onnx_wire import Spill

    folder = None if dst is None else os.path.dirname(os.path.abspath(dst))
    try:
        return Spill(folder)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot write ({exc.strerror or exc})") from None


def _write_and_check(model, source: str, protect, outcome, phase, *, external, check, check_options) -> None:
    """Write ``model`` to the output through a staging folder; check it there before moving it in.

    ``external``: write tensors to a data file beside the output (as the input had them); else
    only when the model exceeds the protobuf limit.
    """
    from .onnx_io import staged_output, write_model

    dst = outcome.output
    with staged_output(dst, protect=protect) as staged:
        with phase("write"):
            write_model(model, staged, external=True if external else None)
            outcome.after["bytes"] = _file_bytes([staged, staged + ".data"])
        if check:
            with phase("check"):
                verdict = _check(source, staged, (outcome.source, dst), outcome.report, check_options)
            outcome.verdict = verdict.to_dict()
            if not verdict:
                raise _Mismatch()


class _Mismatch(Exception):
    """Raised inside the staging block so that nothing is moved into place."""


def _prepare_check(original: str, options: Dict):
    """Start making the original's onnxruntime session in a background thread (see
    :class:`bnfold.verify.OriginalSession`); the check takes it if its options match."""
    from .verify import OriginalSession

    return OriginalSession(original, ort_opt=options.get("ort_opt", "disable"), provider=options.get("provider", "cpu"),
                           threads=options.get("threads"))


def _check(original: str, folded: str, labels, report, options: Dict):
    """Outputs and every fold site (the report says where each fold ended) are compared."""
    from .verify import check

    return check(original, folded, labels=labels, report=report, **options)


def _fold_program(outcome: FoldOutcome, on_phase, check: bool) -> None:
    """A ``.pt2`` program: the torch front end loads, folds, checks on the program's example
    inputs (with ``check`` and when it carries some) and writes, in one call."""
    try:
        from .torch_pass import fold_program_file
    except ImportError:
        raise InputError(f"{outcome.source}: folding .pt2 programs needs PyTorch: pip install 'bnfold[torch]'") from None
    if on_phase is not None:
        on_phase("fold")
    src, dst = outcome.source, outcome.output
    outcome.before = {"bytes": _file_bytes([src]), "nodes": None, "ops": None}
    outcome.protected = frozenset({os.path.realpath(src)})
    try:
        outcome.report = fold_program_file(src, dst, check=check)
    except CheckFailed as exc:
        outcome.report = getattr(exc, "report", None)  # the CLI prints the fold and its FAIL
        outcome.verdict = _program_verdict(getattr(exc, "verdict", None), outcome)
        raise
    outcome.verdict = _program_verdict(outcome.report.extra.pop("check", None), outcome)
    outcome.after = {"bytes": _file_bytes([dst]) if dst else None, "nodes": None, "ops": None}


def _program_verdict(verdict, outcome: FoldOutcome) -> Optional[Dict]:
    """The torch front end's check, labelled like an ONNX check (it runs the program itself,
    on its example inputs, not onnxruntime)."""
    if verdict is None:
        return None
    if not isinstance(verdict, dict):
        verdict = verdict.to_dict()
    if not verdict.get("models"):
        verdict["models"] = {"original": outcome.source, "folded": outcome.output or "(not written)"}
    if not verdict.get("runtime"):
        verdict["runtime"] = {"engine": "torch.export ExportedProgram.module()", "inputs": "the program's example inputs"}
    return verdict


# ---------------------------------------------------------------- many models


class BatchInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`fold_many`: the models still running were stopped (their outputs
    discarded), none was started after it. ``outcomes`` holds the models that finished."""

    def __init__(self, outcomes: List[FoldOutcome], total: int) -> None:
        super().__init__(f"interrupted after {len(outcomes)} of {total} model(s)")
        self.outcomes, self.total = outcomes, total

    @property
    def written(self) -> List[str]:
        return [o.written for o in self.outcomes if o.written]


def collect_jobs(inputs: Sequence[str], out_dir: Optional[str]) -> List[Tuple[str, Optional[str]]]:
    """Pair each input model with its output path under ``out_dir`` (None: a dry run).

    A file keeps its name; the models found under a directory (``*.onnx``, recursively)
    keep their path relative to it. Two inputs that would land on one output are refused.
    """
    jobs: List[Tuple[str, str]] = []
    base = out_dir if out_dir is not None else ""
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(_onnx_files(item))
            if not found:
                raise InputError(f"{item}: no .onnx files in this directory")
            jobs.extend((path, os.path.join(base, os.path.relpath(path, item))) for path in found)
        else:
            jobs.append((item, os.path.join(base, os.path.basename(item))))
    if out_dir is None:  # a dry run writes nothing, so no two outputs can clash
        return [(src, None) for src, _ in jobs]
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
    jobs: Sequence[Tuple[str, Optional[str]]],
    *,
    workers: int = 1,
    on_done: Optional[Callable[[FoldOutcome], None]] = None,
    **options,
) -> List[FoldOutcome]:
    """Fold every ``(src, dst)`` pair (``dst`` None: report only), ``workers`` processes at a
    time; a bad model is reported in its outcome and the others go on. Outcomes come back in
    job order; ``on_done`` sees each as it finishes.

    Ctrl-C (SIGINT) stops the run promptly: models in flight are abandoned (nothing of them
    is written, unless one was already moving its output into place, which then completes
    and counts as done), no other model starts, and :class:`BatchInterrupted` carries the
    outcomes of the models that finished (see :class:`_Interrupt`). A ``.pt2`` program in
    flight is folded to the end first: the torch front end has no phases to stop in.
    """
    results: Dict[int, FoldOutcome] = {}

    def finish(i: int, outcome: FoldOutcome) -> None:
        if outcome.exit_code == EXIT_INTERRUPTED:
            return
        results[i] = outcome
        if on_done is not None:
            on_done(outcome)

    def stopped() -> BatchInterrupted:
        return BatchInterrupted([results[i] for i in sorted(results)], len(jobs))

    if workers <= 1 or len(jobs) <= 1:
        _run_here(jobs, options, finish, stopped)
    else:
        _run_in_pool(jobs, workers, options, results, finish, stopped)
    if len(results) < len(jobs):  # a job stopped by a SIGINT this process did not see
        raise stopped()
    return [results[i] for i in range(len(jobs))]


class _Interrupt:
    """SIGINT while a batch runs, in the process that runs the jobs (this one, or a worker).

    Work can be stopped only inside a phase (load, fold, write, check: see :class:`_Phases`),
    never while a scratch or staging file is being made or removed, nor once an output is
    being moved into place. The first SIGINT raises KeyboardInterrupt at once inside a phase,
    else when the next phase starts; the job's cleanup then removes what it staged. Later
    SIGINTs only keep new jobs from starting, so they cannot cut a cleanup short.
    """

    def __init__(self) -> None:
        self.requested = self.interruptible = False

    def handler(self, signum, frame) -> None:
        first = not self.requested
        self.requested = True
        if first and self.interruptible:
            raise KeyboardInterrupt

    def enter(self) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.interruptible = True

    def leave(self) -> None:
        self.interruptible = False


_INTERRUPT = _Interrupt()


def _run_here(jobs, options, finish, stopped) -> None:
    import threading

    global _INTERRUPT
    _INTERRUPT = _Interrupt()
    # a process started with SIGINT ignored (`bnfold ... &` from a script) keeps ignoring it
    catch = threading.current_thread() is threading.main_thread() and not _sigint_ignored()
    previous = signal.signal(signal.SIGINT, _INTERRUPT.handler) if catch else None
    try:
        for i, (src, dst) in enumerate(jobs):
            if _INTERRUPT.requested:
                break
            finish(i, _job(src, dst, options))
    finally:
        if catch:
            signal.signal(signal.SIGINT, previous)
    if _INTERRUPT.requested:
        raise stopped()


def _run_in_pool(jobs, workers: int, options, results, finish, stopped) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    context = multiprocessing.get_context()
    stop = context.Event()
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init,
                               initargs=(stop, _sigint_ignored()))
    futures = {pool.submit(_job, src, dst, options): i for i, (src, dst) in enumerate(jobs)}
    try:
        for future in as_completed(futures):
            finish(futures[future], future.result())
    except KeyboardInterrupt:
        _stop_pool(pool, stop)
        for future, i in futures.items():  # finished while we were interrupted: written, so listed
            if i not in results and future.done() and not future.cancelled() and future.exception() is None:
                finish(i, future.result())
        raise stopped() from None
    except BaseException:  # e.g. the reader of our output went away: stop as for Ctrl-C
        _stop_pool(pool, stop)
        raise
    pool.shutdown(wait=True)


def _stop_pool(pool, stop) -> None:
    """Workers drop what they run (it cleans up after itself) and start nothing new."""
    stop.set()
    try:
        pool.shutdown(wait=True, cancel_futures=True)
    except KeyboardInterrupt:  # a second Ctrl-C: stop waiting
        pass


def _sigint_ignored() -> bool:
    return signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def _worker_init(stop, ignored: bool = False) -> None:
    """A worker hears Ctrl-C from the terminal (the whole process group gets SIGINT) or from
    the parent, which sets ``stop``: both go through :class:`_Interrupt`. When the parent
    ignores SIGINT (started in the background by a script), so do the workers: only the
    parent's ``stop`` ends their work, at the next phase."""
    import threading

    global _INTERRUPT
    _INTERRUPT = _Interrupt()  # not what a forked parent had

    def forward() -> None:
        stop.wait()
        if ignored:
            _INTERRUPT.requested = True
        else:
            os.kill(os.getpid(), signal.SIGINT)

    if ignored:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGINT, _INTERRUPT.handler)
    threading.Thread(target=forward, daemon=True).start()


def _job(src: str, dst: Optional[str], options) -> FoldOutcome:
    """One model: a crash becomes that model's error, never the batch's; an interrupt becomes
    an "interrupted" outcome with nothing written."""
    if _INTERRUPT.requested:
        return FoldOutcome(src, dst, EXIT_INTERRUPTED, "interrupted")
    try:
        if dst is not None:
            _make_folder(os.path.dirname(dst))
        outcome = fold_path(src, dst, **options)
    except OutputError as exc:
        outcome = FoldOutcome(src, dst)
        _fail(outcome, exc)
    except KeyboardInterrupt:
        return FoldOutcome(src, dst, EXIT_INTERRUPTED, "interrupted")
    except Exception as exc:  # a bug on one model must not stop the others
        outcome = FoldOutcome(src, dst, EXIT_INTERNAL, f"internal error ({type(exc).__name__}: {exc})")
    outcome.exception = None  # results cross a process boundary: keep them plain
    return outcome


def _make_folder(folder: str) -> None:
    try:
        os.makedirs(folder or ".", exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create the output folder ({exc.strerror or exc})") from None


def batch_exit_code(outcomes: Sequence[FoldOutcome]) -> int:
    """1 if any check failed, else the first error's code, else 0."""
    codes = [o.exit_code for o in outcomes if not o.ok]
    if not codes:
        return EXIT_OK
    return EXIT_MISMATCH if EXIT_MISMATCH in codes else codes[0]

"""``check``: run two models on the same seeded inputs and compare every output."""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import InputError
from .compare import RULE, SCALE_RULE, SITE_RULE, compare_outputs, compare_site
from .inputs import make_feeds, save_npz
from .interface import Interface, ModelLike, read_interface
from .precision import float_name, lowest, value_precisions
from .results import CheckResult
from .runner import OrtRunner, ort_version, with_file_weights
from .sites import MAGNITUDE, fold_sites, site_tensors, stitched


VERDICT_RULE = (
    "verdict: every fold site passes, and each graph output matches the original, or (when every site "
    "passed) matches the original network run on the folded model's site values"
)


class OriginalSession:
    """The original model's interface and onnxruntime session, made in a background thread
    while the caller does other work (the fold command starts it right after reading the model,
    so the session is ready when the folded model is written). Pass it to :func:`check` as
    ``prepared``; it is used only for the same model and the same runtime options, and any
    failure here is left to :func:`check` to meet again and report in its usual words."""

    def __init__(self, original: ModelLike, *, ort_opt: str = "disable", provider: str = "cpu",
                 threads: Optional[int] = None) -> None:
        import threading

        self.original, self.key = original, (ort_opt, provider, threads)
        self._made: Optional[Tuple[Interface, OrtRunner]] = None
        # not a daemon: a process that exits early (Ctrl-C, a failed fold) waits for the session
        # to be made; a daemon thread still inside onnxruntime at exit aborts the process
        # ("terminate called without an active exception", exit -6 instead of 130)
        self._thread = threading.Thread(target=self._make, daemon=False)
        self._thread.start()

    def _make(self) -> None:
        try:
            iface = read_interface(self.original)
            ort_opt, provider, threads = self.key
            runner = OrtRunner(self.original, label=iface.label, relax_zero_dims=iface.zero_dims, ort_opt=ort_opt,
                               provider=provider, threads=_half_cores(threads))
            self._made = (iface, runner)
        except BaseException:  # noqa: BLE001  (check() makes them again and reports the error)
            self._made = None

    def take(self, original: ModelLike, ort_opt: str, provider: str, threads: Optional[int]):
        """``(interface, runner)`` if made for this model and these options, else None."""
        self._thread.join()
        paths = all(isinstance(m, (str, os.PathLike)) for m in (original, self.original))
        same = original is self.original or paths and os.fspath(original) == os.fspath(self.original)
        if self._made is None or not same:
            return None
        return self._made if self.key == (ort_opt, provider, threads) else None


def _half_cores(threads: Optional[int]) -> int:
    """Intra-op threads of each of the two sessions that run side by side."""
    return threads if threads is not None else max(1, (os.cpu_count() or 2) // 2)


def check(
    original: ModelLike,
    folded: ModelLike,
    *,
    seed: int = 0,
    batches: int = 1,
    shapes: Optional[Mapping[str, Sequence[int]]] = None,
    value_range: Optional[Tuple[float, float]] = None,
    inputs_npz: Optional[Union[str, "os.PathLike[str]"]] = None,
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    per_output_atol: Optional[Mapping[str, float]] = None,
    ort_opt: str = "disable",
    provider: str = "cpu",
    threads: Optional[int] = None,
    labels: Optional[Tuple[str, str]] = None,
    report: Any = None,
    save_inputs: Optional[Union[str, "os.PathLike[str]"]] = None,
    save_outputs: Optional[Union[str, "os.PathLike[str]"]] = None,
    prepared: Optional[OriginalSession] = None,
) -> CheckResult:
    """Run both models (paths or ModelProtos) on the same seeded inputs; compare every output.

    ``labels`` names the two models in messages and reports (default: their paths), e.g. when
    ``folded`` is a temporary file that will be renamed.

    ``report`` (the FoldReport of the fold, or its JSON dict) turns on per-fold verification:
    the tensor where each folded run ended is compared in both models (see
    :mod:`bnfold.verify.sites` and :data:`VERDICT_RULE`), in private in-memory copies.

    ``save_inputs`` / ``save_outputs`` write .npz files of what was fed and what came out
    (``batchN/`` prefixes when there are several batches; outputs as ``original/NAME`` and
    ``folded/NAME``); ``--inputs`` reads the first back.

    Returns a CheckResult, truthy iff the verdict passes. The default tolerances follow the float
    precision each output and site is computed in (see :mod:`bnfold.verify.precision`); an
    ``atol``/``rtol`` given wins. Inputs are made from the *original* model's interface; if the
    folded model needs other inputs, the result fails with that as its problem.
    Raises InputError / ExternalDataError when a model cannot be loaded or run, or when the
    options (shapes, npz, tolerances, provider) do not fit.
    """
    start = time.perf_counter()
    ready = prepared.take(original, ort_opt, provider, threads) if prepared is not None else None
    orig_iface = ready[0] if ready is not None else read_interface(original)
    fold_iface = read_interface(folded)
    if labels is not None:
        orig_iface.label, fold_iface.label = labels
    unknown = sorted(set(per_output_atol or {}) - {o.name for o in orig_iface.outputs})
    if unknown:  # fail before running anything
        raise InputError(
            f"--atol names output(s) {', '.join(map(repr, unknown))} that {orig_iface.label} does not have "
            f"(outputs: {', '.join(o.name for o in orig_iface.outputs)})"
        )
    notes: List[str] = []
    floats_overridable = [s.name for s in orig_iface.overridable if float_name(s.elem_type)]
    if floats_overridable and batches < 2 and inputs_npz is None:
        batches = 2
        notes.append(f"{len(floats_overridable)} overridable initializer(s) ({', '.join(floats_overridable[:3])}"
                     f"{' ...' if len(floats_overridable) > 3 else ''}): batch 1 keeps the defaults, batch 2 feeds random values")
    feeds, infos, input_notes = make_feeds(orig_iface, seed=seed, batches=batches, shapes=shapes, value_range=value_range, inputs_npz=inputs_npz)
    notes = input_notes + notes
    batches = len(feeds)
    result_meta = dict(
        models={"original": orig_iface.label, "folded": fold_iface.label},
        inputs=infos,
        seed=None if inputs_npz is not None and all(i.source.startswith("npz") for i in infos) else seed,
        batches=batches,
        value_range=tuple(value_range) if value_range else None,
    )
    if save_inputs is not None:
        save_npz(save_inputs, feeds)
    problems = _interface_problems(orig_iface, fold_iface)
    if problems:
        return CheckResult(passed=False, outputs=[], problems=problems, rule=RULE, scale_rule=SCALE_RULE, notes=notes,
                           seconds=time.perf_counter() - start, **result_meta)
    sites, site_notes = fold_sites(orig_iface.proto, fold_iface.proto, report) if report is not None else ([], [])
    notes += site_notes
    precisions = value_precisions(orig_iface.proto)
    for site in sites:
        found = lowest(precisions.get(v.name) for v in site.values)
        site.precision, site.precision_why = found if found else ("", "")
    expose_orig, expose_fold = site_tensors(sites)
    run = dict(ort_opt=ort_opt, provider=provider, threads=threads)
    # The two models' sessions are made, and run, side by side (onnxruntime releases the GIL),
    # each on half the cores unless --threads says otherwise.
    pair = dict(run, threads=_half_cores(threads))
    if ready is not None:
        ready[1].label = orig_iface.label
    # The original's own site values are needed only if the cut copy cannot run (see _compare_site).
    runners = _side_by_side([
        (lambda: ready[1]) if ready is not None else
        lambda: OrtRunner(original, label=orig_iface.label, relax_zero_dims=orig_iface.zero_dims, **pair),
        lambda: OrtRunner(folded, label=fold_iface.label, extra_outputs=expose_fold, relax_zero_dims=fold_iface.zero_dims, **pair),
    ])
    out_names = [o.name for o in orig_iface.outputs]
    fold_out_names = [o.name for o in fold_iface.outputs]
    expected: Dict[str, List[np.ndarray]] = {}
    actual: Dict[str, List[np.ndarray]] = {}
    inner: List[Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]] = []
    pending = _early_stitched_runner(original, orig_iface, sites, runners[1], run) if sites else None
    for feed in feeds:
        got = _side_by_side([lambda r=runner: _run(r, feed, input_notes) for runner in runners])
        for name in out_names:
            if name in got[0]:
                expected.setdefault(name, []).append(got[0][name])
        for name in fold_out_names:
            if name in got[1]:
                actual.setdefault(name, []).append(got[1][name])
        inner.append(({}, {n: got[1][n] for n in expose_fold}))
    out_precisions = {n: precisions[n] for n in out_names if n in precisions}
    result = compare_outputs(expected, actual, atol=atol, rtol=rtol, per_output=per_output_atol, precisions=out_precisions)
    if sites:
        # First without the |w||x| probes: they only widen R (see SITE_RULE), so a site that
        # passes without them passes with them; they are computed only when some site fails.
        local = _stitched_run(original, orig_iface, sites, feeds, inner, run, notes, probes=False, pending=pending)
        if local is None:  # compare end to end: the original's own values at the sites
            again = OrtRunner(original, label=orig_iface.label, extra_outputs=expose_orig, relax_zero_dims=orig_iface.zero_dims, **run)
            for feed, (orig_values, _) in zip(feeds, inner):
                got = _run(again, feed, input_notes)
                orig_values.update({n: got[n] for n in expose_orig})
        result.sites = _compare_sites(sites, inner, local, rtol)
        if local is not None and not all(s.passed for s in result.sites) and _has_probes(sites):
            probed = _stitched_run(original, orig_iface, sites, feeds, inner, run, [], probes=True)
            if probed is None:
                notes.append("the |w||x| probes of the folded linear ops do not run: fold sites compared without them")
            else:
                local = probed
                result.sites = _compare_sites(sites, inner, local, rtol)
        result.site_rule, result.verdict_rule = SITE_RULE, VERDICT_RULE
        if local is not None and result.failed_outputs and not result.failed_sites and not result.problems:
            _judge_against_stitched(result, local, actual, atol, rtol, per_output_atol, out_precisions)
        result.passed = not result.problems and not result.failed_outputs and not result.failed_sites
    if save_outputs is not None:
        save_npz(save_outputs, [
            {**{f"original/{n}": expected[n][b] for n in expected}, **{f"folded/{n}": actual[n][b] for n in actual},
             **{f"original/{n}": v for n, v in inner[b][0].items()}, **{f"folded/{n}": inner[b][1][n] for n in expose_fold}}
            for b in range(batches)
        ])
    result.runtime = {
        "onnxruntime": ort_version(),
        "provider": provider,
        "providers_used": runners[0].providers_used,
        "graph_optimization": ort_opt,
        "threads": threads,
        "tf32": False if provider == "cuda" else None,
    }
    result.notes = notes + result.notes
    for key, value in result_meta.items():
        setattr(result, key, value)
    result.seconds = time.perf_counter() - start
    return result


def _run(runner: OrtRunner, feed, notes) -> Dict[str, np.ndarray]:
    try:
        return runner.run(feed)
    except InputError as exc:
        raise InputError(_with_shape_hint(str(exc), notes)) from None


CUT = "__bnfold_cut"


def _side_by_side(jobs):
    """Run the callables in threads at once; their results in order. The first failure, in the
    order given, is raised (so the original model's error wins over the folded one's)."""
    import threading

    if len(jobs) < 2:
        return [job() for job in jobs]
    results: List[Any] = [None] * len(jobs)
    errors: List[Optional[BaseException]] = [None] * len(jobs)

    def work(i):
        try:
            results[i] = jobs[i]()
        except BaseException as exc:  # re-raised in the caller's thread
            errors[i] = exc

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(1, len(jobs))]
    for t in threads:
        t.start()
    work(0)
    for t in threads:
        t.join()
    for exc in errors:
        if exc is not None:
            raise exc
    return results


def _has_probes(sites) -> bool:
    return any(v.probe for s in sites for v in s.values)


def _site_names(sites) -> List[str]:
    return list(dict.fromkeys(v.name for s in sites for v in s.values))


def _stitched_runner(original, orig_iface, sites, dtypes, run, probes=True) -> OrtRunner:
    """The session of the original cut at every fold site (``dtypes``: the numpy dtype of each
    site value, the type of the input that replaces it). Raises what onnxruntime refuses."""
    names = _site_names(sites)
    befores = [v.before for s in sites for v in s.values if v.before and v.before not in names]
    probes = list(dict.fromkeys(v.probe for s in sites for v in s.values if v.probe)) if probes else []
    folder = os.path.dirname(os.path.abspath(os.fspath(original))) if isinstance(original, (str, os.PathLike)) else None
    proto = stitched(orig_iface.proto, {n: np.empty(0, dtypes[n]) for n in names}, probes)
    made = {n.output[0] for n in proto.graph.node if n.output}
    if folder is not None and not orig_iface.zero_dims:  # the weights as the file has them (the graph read may hold lazy stubs)
        proto = with_file_weights(proto, os.fspath(original)) or proto
    extra = [n + CUT for n in names] + list(dict.fromkeys(befores)) + [p + MAGNITUDE for p in probes if p + MAGNITUDE in made]
    return OrtRunner(proto, label=f"{orig_iface.label} (fed the folded model's site values)", external_folder=folder,
                     extra_outputs=extra, relax_zero_dims=orig_iface.zero_dims, **run)


# onnxruntime's output type names -> numpy dtypes, for the cut copy's inputs
_ORT_TYPES = {f"tensor({np.dtype(t).name})": np.dtype(t) for t in (
    np.float32, np.float64, np.float16, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64)}
_ORT_TYPES.update({"tensor(float)": np.dtype(np.float32), "tensor(double)": np.dtype(np.float64), "tensor(bool)": np.dtype(bool)})


def _early_stitched_runner(original, orig_iface, sites, folded_runner, run):
    """Start making the cut copy's session in a background thread while the two models run
    (its inputs' types come from the folded session's outputs); None when a type is not plain."""
    import threading

    types = {o.name: o.type for o in folded_runner.session.get_outputs()}
    dtypes = {n: _ORT_TYPES.get(types.get(n, "")) for n in _site_names(sites)}
    if any(d is None for d in dtypes.values()):
        return None
    box: Dict[str, Any] = {}

    def make():
        try:
            box["runner"] = _stitched_runner(original, orig_iface, sites, dtypes, run, probes=False)
        except BaseException as exc:  # noqa: BLE001  (raised again where the runner is taken)
            box["error"] = exc

    thread = threading.Thread(target=make, daemon=True)
    thread.start()

    def take() -> OrtRunner:
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["runner"]

    return take


def _stitched_run(original, orig_iface, sites, feeds, inner, run, notes, probes=True, pending=None):
    """Run the original with every fold site cut and fed the folded model's value there.

    Per batch: ``{name: array}`` with, for each site ``V``, ``V + CUT`` (what the original's
    folded run computes from the folded model's values upstream: the fold's *local* reference),
    the values entering the runs, and the graph outputs (what the original network computes
    downstream of the folded sites). None (with a note) when onnxruntime refuses the cut model.
    ``pending``: a callable returning the session made already (:func:`_early_stitched_runner`).
    """
    names = _site_names(sites)
    try:
        if pending is not None:
            runner = pending()
        else:
            runner = _stitched_runner(original, orig_iface, sites, {n: inner[0][1][n].dtype for n in names}, run, probes)
        return [{**runner.run({**feed, **{n: fold_values[n] for n in names}}), **{n: fold_values[n] for n in names}}
                for feed, (_, fold_values) in zip(feeds, inner)]
    except (InputError, ValueError, KeyError) as exc:  # an auxiliary run: its failure must not fail the check
        notes.append(f"fold sites compared with the original end to end (looser k): the original cut at the sites "
                     f"does not run ({type(exc).__name__}: {exc})")
        return None


def _compare_sites(sites, inner, local, rtol):
    """Every site value compared (:func:`_compare_site`), on two threads where there are cores:
    numpy's reductions release the GIL. The order of the results is the sites' order."""
    jobs = [(site, v) for site in sites for v in site.values]
    workers = min(2, os.cpu_count() or 1, len(jobs))
    if workers < 2:
        return [_compare_site(site, v, inner, local, rtol) for site, v in jobs]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda job: _compare_site(job[0], job[1], inner, local, rtol), jobs))


def _compare_site(site, value, inner, local, rtol):
    """One site tensor: the folded model's value against the original's run computed from the
    same upstream values (local), or against the original end to end when that is unavailable."""
    magnitude = None
    if local is not None:
        exp = [batch[value.name + CUT] for batch in local]
        before = [batch[value.before] for batch in local] if value.before else None
        if value.probe and value.probe + MAGNITUDE in local[0]:
            magnitude = [batch[value.probe + MAGNITUDE] for batch in local]
    else:
        exp = [o[value.name] for o, _ in inner]
        before = [o[value.before] for o, _ in inner] if value.before else None
    return compare_site(site, value, exp, [f[value.name] for _, f in inner], before, k=rtol, local=local is not None,
                        magnitude=magnitude)


def _judge_against_stitched(result, local, actual, atol, rtol, per_output_atol, precisions):
    """Every fold site passed but an output did not: if the folded output matches what the
    original network computes downstream from the folded model's site values, the difference is
    rounding the sites were allowed, amplified downstream, not a folding error."""
    failed = {o.name: o for o in result.failed_outputs if o.name in local[0] and o.name in actual}
    if not failed:
        return
    reference = {n: [batch[n] for batch in local] for n in failed}
    again = compare_outputs(reference, {n: actual[n] for n in failed}, atol=atol, rtol=rtol,
                            per_output={k: v for k, v in (per_output_atol or {}).items() if k in failed}, precisions=precisions)
    for stats in again.outputs:
        if stats.passed:
            before = failed[stats.name]
            stats.judged_against = "stitched"
            stats.vs_original = {"max_abs_err": before.max_abs_err, "max_rel_err": before.max_rel_err,
                                 "failing": before.failing, "total": before.total, "min_atol": before.min_atol}
            result.outputs[result.outputs.index(before)] = stats


def _with_shape_hint(message: str, notes: List[str]) -> str:
    chosen = [n.split(";")[0] for n in notes if n.startswith("dynamic dims")]
    if not chosen:
        return message
    return f"{message} ({'; '.join(chosen)} by bnfold: set them with --shape)"


def _interface_problems(orig: Interface, fold: Interface) -> List[str]:
    """A fold must keep the model's inputs: the same names and element types."""
    problems = []
    want = {s.name: s for s in orig.inputs}
    have = {s.name: s for s in fold.inputs}
    for name, spec in want.items():
        if name not in have and name not in fold.optional_inputs:
            problems.append(f"input '{name}' of the original model is missing from the folded model")
        elif name in have and have[name].elem_type != spec.elem_type:
            problems.append(f"input '{name}' is {spec.dtype_name} in the original model, {have[name].dtype_name} in the folded model")
    for name in have:
        if name not in want:
            problems.append(f"the folded model needs input '{name}', which the original model does not have")
    return problems

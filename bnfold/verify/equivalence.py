"""``check``: run two models on the same seeded inputs and compare every output."""

from __future__ import annotations

import os
import time
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import InputError
from .compare import RULE, SCALE_RULE, compare_outputs
from .results import CheckResult
from .inputs import make_feeds
from .interface import Interface, ModelLike, read_interface
from .runner import OrtRunner, ort_version


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
) -> CheckResult:
    """Run both models (paths or ModelProtos) on the same seeded inputs; compare every output.

    ``labels`` names the two models in messages and reports (default: their paths), e.g. when
    ``folded`` is a temporary file that will be renamed.

    Returns a CheckResult, truthy iff every output matches under :data:`RULE` (see the module
    docstring for the default tolerances). Inputs are made from the *original* model's interface;
    if the folded model needs other inputs, the result fails with that as its problem.
    Raises InputError / ExternalDataError when a model cannot be loaded or run, or when the
    options (shapes, npz, tolerances, provider) do not fit.
    """
    start = time.perf_counter()
    orig_iface = read_interface(original)
    fold_iface = read_interface(folded)
    if labels is not None:
        orig_iface.label, fold_iface.label = labels
    unknown = sorted(set(per_output_atol or {}) - {o.name for o in orig_iface.outputs})
    if unknown:  # fail before running anything
        raise InputError(
            f"--atol names output(s) {', '.join(map(repr, unknown))} that {orig_iface.label} does not have "
            f"(outputs: {', '.join(o.name for o in orig_iface.outputs)})"
        )
    feeds, infos, notes = make_feeds(orig_iface, seed=seed, batches=batches, shapes=shapes, value_range=value_range, inputs_npz=inputs_npz)
    result_meta = dict(
        notes=notes,
        models={"original": orig_iface.label, "folded": fold_iface.label},
        inputs=infos,
        seed=None if inputs_npz is not None and all(i.source.startswith("npz") for i in infos) else seed,
        batches=batches,
        value_range=tuple(value_range) if value_range else None,
    )
    problems = _interface_problems(orig_iface, fold_iface)
    if problems:
        return CheckResult(passed=False, outputs=[], problems=problems, rule=RULE, scale_rule=SCALE_RULE, seconds=time.perf_counter() - start, **result_meta)
    runners = [
        OrtRunner(m, ort_opt=ort_opt, provider=provider, threads=threads, label=iface.label)
        for m, iface in ((original, orig_iface), (folded, fold_iface))
    ]
    expected: Dict[str, List[np.ndarray]] = {}
    actual: Dict[str, List[np.ndarray]] = {}
    for feed in feeds:
        for runner, sink in zip(runners, (expected, actual)):
            try:
                outputs = runner.run(feed)
            except InputError as exc:
                raise InputError(_with_shape_hint(str(exc), notes)) from None
            for name, value in outputs.items():
                sink.setdefault(name, []).append(value)
    result = compare_outputs(expected, actual, atol=atol, rtol=rtol, per_output=per_output_atol)
    result.runtime = {
        "onnxruntime": ort_version(),
        "provider": provider,
        "providers_used": runners[0].providers_used,
        "graph_optimization": ort_opt,
        "threads": threads,
        "tf32": False if provider == "cuda" else None,
    }
    for key, value in result_meta.items():
        setattr(result, key, value)
    result.seconds = time.perf_counter() - start
    return result


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

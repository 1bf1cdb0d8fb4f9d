"""``fold_module``: fold BatchNorm into the conv/linear modules before it, in an ``nn.Module``."""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..errors import InputError
from ..report import FoldReport
from . import _observe, _state
from ._math import to_numpy
from ._before import fold_bn_before_linear
from ._fxgraph import fold_graph_calls
from ._plan import Applied, Observation, apply, decide, producer_refusal, unverified
from ._state import ModuleCopyError

METHODS = ("auto", "fx", "export", "hooks")
METHOD_NAMES = {"fx": "torch.fx", "export": "torch.export", "hooks": "forward-hooks"}


class TrainingModeError(InputError, ValueError):
    """The module is in training mode: its BatchNorms use batch statistics, nothing can fold."""


class ModelTraceError(InputError):
    """No method could see the model's dataflow (and no example inputs were given to observe it)."""


class ModuleNotCopyable(InputError, ModuleCopyError):
    """The module cannot be copied (not even sharing its un-copyable attributes); fold it in place."""


def examples_of(example_inputs, example_kwargs=None, more_examples: Sequence = ()) -> List[_observe.Example]:
    """Normalize example inputs to ``[(args, kwargs), ...]``; a lone tensor is one argument."""
    out: List[_observe.Example] = []
    if example_inputs is not None or example_kwargs:
        out.append((_as_args(example_inputs), dict(example_kwargs or {})))
    out.extend((_as_args(e), {}) for e in more_examples)
    return out


def _as_args(value) -> tuple:
    if value is None:
        return ()
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (tuple, list)):
        return tuple(value)
    raise TypeError(f"example inputs must be a tensor or a tuple of arguments, not {type(value).__name__}")


def fold_module(
    module: nn.Module,
    example_inputs: Any = None,
    *,
    inplace: bool = False,
    allow_training: bool = False,
    method: str = "auto",
    example_kwargs: Optional[Dict[str, Any]] = None,
    more_examples: Sequence = (),
    rewrite_graph: bool = True,
) -> Tuple[nn.Module, FoldReport]:
    """Fold every BatchNorm that directly follows a Conv/ConvTranspose (1-3d) or Linear module
    (and a BatchNorm1d directly before a Linear), however the model spells it.

    Returns ``(folded, report)``. ``folded`` is a deep copy of ``module`` in eval mode (the
    module itself with ``inplace=True``) whose producers carry the folded weights and whose
    folded BN modules are replaced by ``nn.Identity`` (a proven norm-act BN subclass by the part
    of its forward after the batch norm). When a batch-norm *call* in some ``forward`` was
    folded (``rewrite_graph=True``), ``folded`` is instead a ``torch.fx.GraphModule`` of the
    traced forward, or torch.export's module of the model when fx cannot trace it (example
    shapes only); ``module`` is then not changed. ``report`` lists each BN folded or left, with
    a reason code, and ``report.extra["fold_methods"]`` says how each was folded.

    Preconditions: ``module`` is in eval mode, or ``allow_training=True`` (then the copy is put
    in eval mode and folded with the BNs' running statistics). ``example_inputs`` (a tensor or a
    tuple of positional arguments, on the module's device) lets bnfold propagate shapes, which
    Conv1d/Linear + BatchNorm1d need, observe models that torch.fx cannot trace, and run the
    result against the original (every fold is undone if an output differs). ``more_examples``
    are honoured by every method. ``method``: "auto" (torch.fx, then torch.export, then
    forward hooks), or one of them. Observing never runs the module returned: it runs a copy.

    Raises TrainingModeError (training mode without ``allow_training``), ModelTraceError (no
    method could see the dataflow, or the model fails on an example), ModuleNotCopyable (not
    even a copy sharing its un-copyable attributes can be made; fold with ``inplace=True``),
    or ValueError (unknown method).
    """
    start = time.perf_counter()
    if not isinstance(module, nn.Module):
        raise TypeError(f"fold_module takes an nn.Module, not {type(module).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    if module.training and not allow_training:
        raise TrainingModeError(
            f"{type(module).__name__} is in training mode, where BatchNorm uses batch statistics; "
            "call .eval() first, or pass allow_training=True to fold with the running statistics"
        )
    notes = []
    target = module
    if not inplace:
        try:
            target, shared = _state.copy_module(module)
        except ModuleCopyError as exc:
            raise ModuleNotCopyable(str(exc)) from None
        if shared:
            notes.append(f"attributes that cannot be deep-copied are shared with the original: {', '.join(shared)}")
    if target.training:
        target.eval()
        notes.append("the model was in training mode; it was put in eval mode (allow_training=True)")
    examples = examples_of(example_inputs, example_kwargs, more_examples)
    expected = _run_examples(target, examples) if examples else None
    obs, graph = _observe_any(target, examples, method)
    report = FoldReport(method=obs.method, notes=notes + obs.notes)
    actions = decide(target, obs, report)
    applied = apply(target, actions)
    result = target
    if graph is not None:
        refuse = lambda name, mod: producer_refusal(name, mod, obs)  # noqa: E731
        fold_bn_before_linear(target, graph, report, refuse, obs.foreign_use, applied)
        rewritten = fold_graph_calls(target, graph, report, refuse, rewrite_graph)
        if rewritten is not None:
            result = rewritten
            report.notes.append(
                f"batch norm calls in forward were folded: the result is a torch.fx GraphModule "
                f"({type(rewritten).__name__}) of the traced forward"
            )
    elif obs.functional_bns:
        result = _fold_program(target, obs, examples, report, rewrite_graph)
    problem = _verify(target, obs, graph, examples, applied, expected, report, result)
    if problem:
        applied.undo()
        unverified(report, problem)
        result = target
    report.seconds = time.perf_counter() - start
    return result, report


def _fold_program(target: nn.Module, obs: Observation, examples, report: FoldReport, rewrite: bool) -> nn.Module:
    """Batch-norm calls outside BN modules seen by torch.export or hooks (torch.fx could not
    trace the model): fold every BN op left in the exported program of the module-folded model,
    and return that program's module; or leave them, each reported, and return ``target``."""
    from ._observe import _signature
    from ._program import fold_module_program

    why = ""
    if not rewrite:
        why = "folding this call needs a rewritten forward (rewrite_graph=False)"
    elif len({_signature(e) for e in examples}) != 1:
        why = "the examples differ in shape, and the exported program would take only one of them"
    if not why:
        try:
            with _state.observing(target) as probe:
                program, sub = fold_module_program(probe, examples[0])
        except Exception as exc:  # the export or the program fold failed: leave the calls
            why = f"exporting the folded module failed ({type(exc).__name__}: {_first_line(exc)})"
    if why:
        for label in obs.functional_bns:
            report.add_skipped(label, "functional-bn", why)
        return target
    left_by_module = {s.bn for s in report.skipped}
    if not sub.folded:
        report.skipped.extend(s for s in sub.skipped if s.bn not in left_by_module)
        return target
    report.skipped[:] = [s for s in report.skipped if s.bn not in {f.bn for f in sub.folded}]
    report.skipped.extend(s for s in sub.skipped if s.bn not in left_by_module)
    methods = report.extra.setdefault("fold_methods", {})
    for f in sub.folded:
        report.folded.append(f)
        methods[f.bn] = "exported-program"
    report.notes.append(
        "batch norm calls outside BN modules were folded in torch.export's program of the model: the result is "
        "that program's module, which takes inputs of the example's shapes only"
    )
    return program


def _observe_any(root: nn.Module, examples, method: str) -> Tuple[Observation, Optional[torch.fx.Graph]]:
    """Try the methods in order; the first that sees the whole dataflow wins. Each looks at a
    fresh throwaway copy of ``root`` (observing runs ``forward``: never on the result)."""
    order = ["fx", "export", "hooks"] if method == "auto" else [method]
    failures = []
    for name in order:
        if name != "fx" and not examples:
            failures.append(f"{METHOD_NAMES[name]} needs example inputs")
            continue
        try:
            with _state.observing(root) as probe:
                if name == "fx":
                    obs, graph = _observe.observe_fx(probe, examples)
                else:
                    obs, graph = _run(name, probe, examples), None
        except Exception as exc:  # each method fails in its own ways; the next one may work
            failures.append(f"{METHOD_NAMES[name]}: {type(exc).__name__}: {_first_line(exc)}")
            continue
        obs.notes[:0] = [f"{f} (fell back)" for f in failures]
        return obs, graph
    hint = "" if examples else "; pass example_inputs so bnfold can observe real calls"
    raise ModelTraceError("cannot see the model's dataflow: " + "; ".join(failures) + hint)


def _run(name: str, root, examples) -> Observation:
    observe: Callable = {"export": _observe.observe_export, "hooks": _observe.observe_hooks}[name]
    return observe(root, examples)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def _run_examples(root: nn.Module, examples) -> List[Dict[str, object]]:
    """The module's outputs on every example, computed on a throwaway copy (or with the
    module's state put back), each example starting from the module's current state."""
    from torch.utils._pytree import tree_flatten

    out = []
    for i, (args, kwargs) in enumerate(examples):
        with _state.observing(root) as probe, _observe.quiet_run(probe):
            try:
                result = probe(*args, **kwargs)
            except Exception as exc:  # the model's own error on this input
                raise ModelTraceError(f"the model fails on example {i}: {type(exc).__name__}: {_first_line(exc)}") from exc
        leaves = [v for v in tree_flatten(result)[0] if isinstance(v, torch.Tensor)]
        out.append({f"output_{i}": to_numpy(v) for i, v in enumerate(leaves)})
    return out


def _verify(root, obs: Observation, graph, examples, applied: Applied, expected, report: FoldReport, result) -> str:
    """'' when the folded module provably calls no removed BN and matches the original on every
    example; else what went wrong.

    A BN reached through a reference that is not a registered submodule (a plain list, say)
    would still run after its registration is replaced; a re-trace (fx) or a run of the examples
    with the removed BN objects watched (other methods) catches that. Every check runs on a
    throwaway copy of the folded module.
    """
    if not applied.changed and result is root:
        return ""
    if graph is not None and applied.removed_bns:
        try:
            with _state.observing(root) as probe:
                again = _observe.fx_graph(probe)
        except Exception as exc:
            return f"re-tracing the folded module failed ({type(exc).__name__}: {_first_line(exc)})"
        if _observe.fx_signature(again) != _observe.fx_signature(graph):
            return "the folded module re-traces to different calls"
    elif graph is None:
        problem = _removed_bn_called(root, examples, applied)
        if problem:
            return problem
    return _compare(result, examples, expected, report)


def _removed_bn_called(root, examples, applied: Applied) -> str:
    memo: dict = {}
    try:
        probe, _ = _state.copy_module(root, memo)
        removed = [memo[id(bn)] for bn in applied.removed_bns if id(bn) in memo]
    except ModuleCopyError:
        probe, removed = root, applied.removed_bns  # run under preserved(): state put back
    called = []
    handles = [bn.register_forward_pre_hook(lambda m, a: called.append(m)) for bn in removed]
    try:
        with _state.preserved(probe), _observe.quiet_run(probe):
            for args, kwargs in examples:
                probe(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return "a removed BN is still called through a reference bnfold did not replace" if called else ""


def _compare(root, examples, expected, report: FoldReport) -> str:
    """The folded module's outputs against the original's, bnfold's tolerance rule."""
    from ..verify import compare_outputs

    if not examples:
        return ""
    actual = _run_examples(root, examples)
    for i, (want, got) in enumerate(zip(expected, actual)):
        verdict = compare_outputs(want, got)
        if not verdict:
            return f"on example {i} the folded module's outputs differ from the original's ({verdict.summary()})"
    report.extra["check"] = f"outputs match the original on {len(examples)} example(s)"
    return ""

"""``export_folded``: fold, export to ONNX with torch.onnx, and check the file with onnxruntime."""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from ._math import to_numpy
from ._module import examples_of, fold_module


def _reference_outputs(module: nn.Module, args: tuple) -> List[torch.Tensor]:
    """The original module's outputs in eval mode (a copy, if the module is in training mode)."""
    ref = module
    if module.training:
        ref = copy.deepcopy(module).eval()
    with torch.no_grad():
        result = ref(*args)
    return [v for v in tree_flatten(result)[0] if isinstance(v, torch.Tensor)]


def _legacy_exporter_kwargs(export_kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """torch >= 2.9 exports with the dynamo exporter by default, which needs onnxscript; use the
    TorchScript exporter unless the caller chose, or onnxscript is installed."""
    if "dynamo" in export_kwargs:
        return export_kwargs
    try:
        import onnxscript  # noqa: F401

        return export_kwargs
    except ImportError:
        return {**export_kwargs, "dynamo": False}


def export_folded(
    module: nn.Module,
    example_inputs: Any,
    path: str,
    *,
    opset: Optional[int] = None,
    check: bool = True,
    allow_training: bool = False,
    method: str = "auto",
    **export_kwargs: Any,
):
    """Fold ``module``, export the folded copy to ONNX at ``path``, and check it.

    Returns ``(report, check_result)``: the FoldReport, and with ``check=True`` the CheckResult
    (truthy when equivalent) of the exported file under onnxruntime, with graph optimizations
    disabled, against the *original* module's outputs on ``example_inputs``; None otherwise.

    Preconditions: ``example_inputs`` is a tensor or a tuple of tensors on the CPU. Extra keyword
    arguments go to ``torch.onnx.export`` (``input_names``, ``dynamic_axes``, ``dynamo``...);
    without onnxscript installed the TorchScript exporter (``dynamo=False``) is used. The file is
    written atomically: a failed export leaves no partial file. The module is never modified.
    """
    from ..onnx_io import staged_output
    from ..verify import compare_outputs, run_onnx

    (args, _), = examples_of(example_inputs)
    folded, report = fold_module(module, args, allow_training=allow_training, method=method)
    expected = _reference_outputs(module, args)
    input_names = list(export_kwargs.pop("input_names", [f"input_{i}" for i in range(len(args))]))
    output_names = list(export_kwargs.pop("output_names", [f"output_{i}" for i in range(len(expected))]))
    kwargs = _legacy_exporter_kwargs(export_kwargs)
    if opset is not None:
        kwargs["opset_version"] = opset
    result = None
    with staged_output(os.fspath(path)) as staged:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice
            torch.onnx.export(folded, args, staged, input_names=input_names, output_names=output_names, **kwargs)
        if check:
            feeds = {name: to_numpy(a) for name, a in zip(input_names, args) if isinstance(a, torch.Tensor)}
            actual = run_onnx(staged, feeds, ort_opt="disable")
            result = compare_outputs({n: to_numpy(t) for n, t in zip(output_names, expected)}, actual)
            report.extra["check"] = result.to_dict()
    report.extra["onnx_path"] = os.fspath(path)
    return report, result

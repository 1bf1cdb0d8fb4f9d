"""bnfold: fold BatchNorm into the linear ops around it, and prove the result equivalent.

Public API (imports are lazy, so ``import bnfold`` pulls in neither onnxruntime nor torch)::

    model, report = bnfold.fold_onnx("model.onnx")          # or a ModelProto
    report = bnfold.fold_file("model.onnx", "folded.onnx")  # streams, for large files
    module, report = bnfold.fold_module(torch_module)       # needs the [torch] extra
    model_or_module, report = bnfold.fold(obj)              # dispatches on the type
    result = bnfold.check("model.onnx", "folded.onnx")      # truthy when equivalent
    timings = bnfold.bench("model.onnx", "folded.onnx")     # onnxruntime latency
"""

from __future__ import annotations

from ._version import __version__

__all__ = [
    "__version__",
    "fold",
    "fold_onnx",
    "fold_file",
    "fold_module",
    "check",
    "bench",
    "FoldReport",
]


def fold(obj, **kwargs):
    """Fold an ONNX model (ModelProto or path) or a torch ``nn.Module``; return ``(folded, report)``."""
    import sys

    torch = sys.modules.get("torch")  # an nn.Module exists only if torch is already imported
    if torch is not None and isinstance(obj, torch.nn.Module):
        from .torch_pass import fold_module as _fold_module

        return _fold_module(obj, **kwargs)
    from .onnx_pass import fold_onnx as _fold_onnx

    return _fold_onnx(obj, **kwargs)


def fold_module(module, *args, **kwargs):
    """Fold a torch ``nn.Module``; return ``(module, report)``. Needs the ``[torch]`` extra.

    See :func:`bnfold.torch_pass.fold_module` for the options.
    """
    from .torch_pass import fold_module as _fold_module

    return _fold_module(module, *args, **kwargs)


def _lazy(name):
    if name == "fold_onnx":
        from .onnx_pass import fold_onnx as value
    elif name == "fold_file":
        from .pipeline import fold_file as value
    elif name == "check":
        from .verify import check as value
    elif name == "bench":
        from .latency import bench as value
    elif name == "FoldReport":
        from .report import FoldReport as value
    else:
        raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
    return value


def __getattr__(name):
    value = _lazy(name)
    globals()[name] = value  # resolved once; later lookups never come back here
    return value


def __dir__():
    return sorted(set(__all__) | {n for n in globals() if n.startswith("__") and n.endswith("__")})

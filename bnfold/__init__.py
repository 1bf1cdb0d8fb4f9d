"""bnfold: fold BatchNorm into the linear ops around it, and prove the result equivalent.

Public API (imports are lazy, so ``import bnfold`` pulls in neither onnxruntime nor torch)::

    model, report = bnfold.fold_onnx("model.onnx")          # or a ModelProto
    report = bnfold.fold_file("model.onnx", "folded.onnx")  # streams, for large files
    module, report = bnfold.fold_module(torch_module)       # needs the [torch] extra
    model_or_module, report = bnfold.fold(obj)              # dispatches on the type
    result = bnfold.check("model.onnx", "folded.onnx")      # truthy when equivalent
"""

from __future__ import annotations

__version__ = "0.1.0"

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


def __getattr__(name):
    if name in ("fold_onnx", "fold_file"):
        from . import onnx_pass

        return getattr(onnx_pass, name)
    if name == "fold_module":
        from . import torch_pass

        return torch_pass.fold_module
    if name == "check":
        from . import verify

        return verify.check
    if name == "bench":
        from . import latency

        return latency.bench
    if name == "FoldReport":
        from .report import FoldReport

        return FoldReport
    raise AttributeError(f"module 'bnfold' has no attribute {name!r}")

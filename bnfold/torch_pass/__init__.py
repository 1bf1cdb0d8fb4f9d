"""PyTorch front end: fold BatchNorm in ``nn.Module`` models and in ``torch.export`` programs.

Public API::

    folded, report = fold_module(model, example_inputs)       # a new module, in eval mode
    report, check = export_folded(model, example_inputs, "model.onnx")
    report = fold_program_file("model.pt2", "folded.pt2")     # torch.export.save files

All arithmetic goes through the shared float64 core, :mod:`bnfold.affine`. This package needs
torch; ``import bnfold`` does not import it.
"""

from __future__ import annotations

from ._module import METHODS, ModelTraceError, ModuleNotCopyable, TrainingModeError, fold_module
from ._plan import TORCH_REASONS

__all__ = [
    "fold_module",
    "export_folded",
    "fold_program_file",
    "fold_exported_program",
    "load_program",
    "TrainingModeError",
    "ModelTraceError",
    "ModuleNotCopyable",
    "TORCH_REASONS",
    "METHODS",
]


def __getattr__(name):
    if name == "export_folded":
        from ._onnx_export import export_folded

        return export_folded
    if name in ("fold_program_file", "fold_exported_program", "load_program"):
        from . import _program

        return getattr(_program, name)
    raise AttributeError(f"module 'bnfold.torch_pass' has no attribute {name!r}")

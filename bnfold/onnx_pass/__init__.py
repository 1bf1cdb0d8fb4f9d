"""The ONNX front end: fold BatchNormalization and other per-channel affine ops into the
linear ops next to them, or explain why not.

Every rule computes in float64 and refuses (a :class:`bnfold.affine.Refusal` with a reason
code from :data:`bnfold.report.REASONS`) when a fold would not be exact. ``report.folded`` /
``report.skipped`` hold one entry per BN; Mul/Add/Sub/Div runs are listed in
``report.extra["affine_folded"]`` / ``["affine_skipped"]``.

Layout: ``ops/`` what each op knows about itself, ``rules/`` the rules, ``engine`` runs them.
"""

from __future__ import annotations

import os
from typing import Dict, Tuple, Union

from onnx import ModelProto

from ..report import FoldReport
from .engine import fold_model_proto
from .rules import after_linear, before_linear, bn_merge, noops

__all__ = ["fold_onnx", "fold_model_proto", "RULES"]

# Rule names as they appear in reports ("<op>" is conv, convtranspose, gemm or matmul).
RULES: Dict[str, str] = {**after_linear.RULES, **before_linear.RULES, **bn_merge.RULES, **noops.RULES}

ModelLike = Union[ModelProto, str, "os.PathLike[str]"]


def fold_onnx(model: ModelLike, *, inplace: bool = False) -> Tuple[ModelProto, FoldReport]:
    """Fold every BatchNormalization that can be folded exactly; return ``(model, report)``.

    ``model`` is a ModelProto or a path (external data next to it is loaded). A ModelProto is
    copied first unless ``inplace=True``; a file is never modified. The report lists each BN
    folded (and the rule that did it) and each BN left, with a reason code and a sentence.
    """
    from ..onnx_io import load_model

    if isinstance(model, ModelProto):
        if not inplace:
            copy = ModelProto()
            copy.CopyFrom(model)
            model = copy
    else:
        model = load_model(os.fspath(model))
    report = fold_model_proto(model)
    return model, report


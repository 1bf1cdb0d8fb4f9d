"""Equivalence checks with onnxruntime: run two models on the same inputs, compare every output.

Modules, one job each: ``interface`` (what a model takes and returns), ``inputs`` (seeded
feeds, shapes, .npz), ``runner`` (onnxruntime sessions), ``compare`` (the rules and their
tolerances), ``results`` (statistics and verdict), ``sites`` (where each fold ended, and the
private model copies that expose it), ``precision`` (the float type each value is computed in),
``equivalence`` (``check``, and the verdict rule that joins outputs and fold sites).

The comparison rule (one rule, used everywhere, stated in every report)::

    an element fails  iff  |folded - original| > atol + rtol * |original|      (in float64)

``original`` is the reference model's output. NaN must sit at the same positions in both
outputs, and +-inf must match exactly; such a difference counts as a failing element.

Tolerances. Folding a BatchNorm changes the order of floating-point rounding, so a correct
fold is not bit-exact, and the rounding error grows with the magnitude of the values the
network computes, not with each output element (an element near zero can carry the error of
its large neighbours). So the default ``atol`` is *relative to the output's scale*::

    scale = max |original| over the output's finite elements (1 if all are zero)
    atol  = k_atol(dtype) * scale,      rtol = k_rtol(dtype)

with ``(k_atol, k_rtol)`` = (1e-9, 1e-9) for float64, (1e-4, 1e-4) for float32, (1e-2, 1e-2)
for float16 and (5e-2, 5e-2) for bfloat16; integer and bool outputs must be equal. The
dtype is the precision the output is *computed* in (:mod:`.precision`): a float16 network
between two Casts to and from float32 gets float16 tolerances. For
float32 that leaves ~100x headroom over the ~1e-6 relative error of a correct fold of a deep
network, while any real folding bug (wrong axis, wrong channel, forgotten bias or epsilon
ignored on a small variance) moves outputs by 1e-2 of their scale or more. An ``atol`` given
by the caller (globally or per output) is absolute and is used as it is.

``max_rel_err`` in the statistics is ``max |folded - original| / scale``.

With the fold's report, each fold is also checked where it happened (:mod:`.sites`,
:data:`.compare.SITE_RULE`), and an output that differs from the original passes only if every
fold site passed and it matches the original network run on the folded model's site values
(:data:`.equivalence.VERDICT_RULE`).

onnxruntime is imported inside functions only, so ``import bnfold`` stays light.
"""
from __future__ import annotations

from .compare import (
    DEFAULT_TOLERANCES,
    RULE,
    SCALE_RULE,
    SITE_RULE,
    SITE_SLOPES,
    SITE_TOLERANCES,
    compare_outputs,
    default_tolerance,
    parse_atol,
)
from .equivalence import VERDICT_RULE, OriginalSession, check
from .inputs import (
    DEFAULT_BATCH_DIM,
    DEFAULT_INT_RANGE,
    DEFAULT_OTHER_DIM,
    MAX_INPUT_ELEMENTS,
    InputInfo,
    make_feeds,
    make_inputs,
    parse_range,
    parse_shape,
)
from .interface import Interface, ModelLike, Shape, TensorSpec, dims_text, load_proto, model_label, read_interface
from .precision import value_precisions
from .results import CheckResult, OutputStats, SiteStats
from .sites import FoldSite, fold_sites
from .runner import CUDA_HELP, OPT_LEVELS, PROVIDERS, OrtRunner, ort_version, run_onnx

__all__ = [
    "check", "OriginalSession", "CheckResult", "OutputStats", "SiteStats", "FoldSite", "fold_sites", "value_precisions", "VERDICT_RULE",
    "SITE_RULE", "SITE_TOLERANCES", "SITE_SLOPES", "compare_outputs", "default_tolerance", "DEFAULT_TOLERANCES", "RULE",
    "SCALE_RULE", "parse_atol", "parse_range", "parse_shape", "make_inputs", "make_feeds", "InputInfo",
    "DEFAULT_BATCH_DIM", "DEFAULT_OTHER_DIM", "DEFAULT_INT_RANGE", "MAX_INPUT_ELEMENTS", "Interface", "TensorSpec",
    "ModelLike", "Shape", "read_interface", "load_proto", "model_label", "dims_text", "OrtRunner", "run_onnx",
    "ort_version", "OPT_LEVELS", "PROVIDERS", "CUDA_HELP",
]

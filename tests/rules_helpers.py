"""Shared checks for the issue #5 rule tests (tests/test_rules_*.py)."""

from __future__ import annotations

from typing import Dict, Iterable, Optional

import numpy as np
import onnx

from bnfold.onnx_pass import fold_onnx
from onnx_models import assert_equivalent, check_valid, node_names


def fold_ok(
    model: onnx.ModelProto,
    folded: Dict[str, str],
    gone: Iterable[str] = (),
    feeds: Optional[Dict[str, np.ndarray]] = None,
    runner: str = "ort",
):
    """Fold; assert each ``folded`` node is reported with its rule, each of ``folded`` and
    ``gone`` left the graph, the model is valid and computes the same under ORT_DISABLE_ALL."""
    before = model.SerializeToString()
    out, report = fold_onnx(model)
    assert model.SerializeToString() == before, "the input model was changed"
    got = folded_rules(report)
    for name, rule in folded.items():
        assert got.get(name) == rule, f"{name}: {got.get(name)} != {rule}; report: {report.summary(True)}"
    names = set(node_names(out))
    for name in list(folded) + list(gone):
        assert name not in names, f"{name} is still in the graph"
    check_valid(out)
    assert_equivalent(model, out, feeds=feeds, runner=runner)
    return out, report


def folded_rules(report) -> Dict[str, str]:
    """Node name -> rule, for BNs (report.folded) and affine runs (report.extra)."""
    got = {f.bn: f.rule for f in report.folded}
    got.update({e["node"]: e["rule"] for e in report.extra.get("affine_folded", [])})
    return got


def skipped_reasons(report) -> Dict[str, tuple]:
    """Node name -> (reason, detail), for BNs and affine ops left in place."""
    got = {s.bn: (s.reason, s.detail) for s in report.skipped}
    got.update({e["node"]: (e["reason"], e["detail"]) for e in report.extra.get("affine_skipped", [])})
    return got


def refuse_ok(model: onnx.ModelProto, node: str, reasons, feeds=None, runner: str = "ort", valid: bool = True):
    """Fold; assert ``node`` stays, is not reported folded, and (when ``reasons``) is reported
    skipped with one of them; the result is valid and equivalent."""
    reasons = {reasons} if isinstance(reasons, str) else set(reasons or ())
    out, report = fold_onnx(model)
    assert node not in folded_rules(report), report.summary(True)
    assert node in node_names(out)
    if reasons:
        skipped = skipped_reasons(report)
        assert node in skipped, report.to_json()
        assert skipped[node][0] in reasons, skipped[node]
        assert skipped[node][1]
    if valid:
        check_valid(out)
    assert_equivalent(model, out, feeds=feeds, runner=runner)
    return out, report

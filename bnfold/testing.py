"""Helpers for users' test suites: ``assert_equivalent(original, folded)`` in one line.

Example (pytest)::

    from bnfold.testing import assert_equivalent

    def test_folded_model_is_equivalent(tmp_path):
        assert_equivalent("model.onnx", "model.folded.onnx", batches=3, shapes={"input": (2, 3, 224, 224)})

    # with the fold's report, each fold is also checked where it happened, and named if wrong
    folded, report = bnfold.fold_onnx("model.onnx")
    assert_equivalent("model.onnx", folded, report=report)
"""

from __future__ import annotations

from .verify import CheckResult, ModelLike, check


def assert_equivalent(original: ModelLike, folded: ModelLike, **check_kwargs) -> CheckResult:
    """Run :func:`bnfold.verify.check` and raise AssertionError (message: the full summary) on a
    mismatch. ``check_kwargs`` are those of ``check`` (seed, batches, shapes, atol, rtol,
    report, ...).

    Returns the passing CheckResult. Load and usage errors propagate as bnfold errors, so a
    broken test setup is not mistaken for a non-equivalent model.
    """
    __tracebackhide__ = True  # pytest: show the assertion, not this frame
    result = check(original, folded, **check_kwargs)
    if not result:
        raise AssertionError("models are not equivalent\n" + result.summary())
    return result

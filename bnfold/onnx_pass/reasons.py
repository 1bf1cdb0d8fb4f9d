"""Reason codes the ONNX rules of issue #5 add to :data:`bnfold.report.REASONS`."""

from typing import Dict

EXTRA_REASONS: Dict[str, str] = {
    "division-by-zero": "a Div's constant divisor contains zero",
    "not-affine": "the op is not an affine map of its input (a constant divided by the data)",
    "no-linear-consumer": "the BN feeds no linear op it could be folded into",
    "consumer-cannot-absorb": "a consumer of the BN's output cannot absorb the BN",
    "bn-output-is-graph-output": "the BN's output is a graph output",
}

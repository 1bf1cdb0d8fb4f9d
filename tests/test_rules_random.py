"""Random chains after a Conv (issue #5): whatever bnfold folds or refuses, the result must
compute what the original computes. Width == channels makes wrongly broadcast [C] constants
shape-valid, so a broadcasting mistake shows up as a mismatch."""

from __future__ import annotations

import numpy as np
import pytest

from bnfold.onnx_pass import fold_onnx
from onnx_models import GraphBuilder, assert_equivalent, check_valid, count_op

C = 4
SHAPES = [(C, 1, 1), (1, C, 1, 1), (), (1,), (C,), (1, 1, C), (C, 1), (1, C, 1, C), (1, 1, 1, 1)]


def random_chain_model(seed: int):
    rng = np.random.default_rng(seed)
    g = GraphBuilder(seed=seed)
    x = g.input("x", ["N", 3, C + 2, C + 2])
    h = g.conv(x, "conv", 3, C, (3, 3), bias=bool(rng.integers(2)))  # [N, C, C, C]
    for i in range(int(rng.integers(1, 6))):
        kind = rng.choice(["Mul", "Add", "Sub", "Div", "Identity", "TransposePair", "BN"])
        if kind == "Identity":
            h = g.node("Identity", [h], f"i{i}", f"ident{i}").output[0]
        elif kind == "TransposePair":
            h = g.node("Transpose", [h], f"t{i}a", f"tr{i}a", perm=[0, 2, 3, 1]).output[0]
            k = g.init(f"k{i}", rng.uniform(0.5, 1.5, SHAPES[int(rng.integers(len(SHAPES)))]).astype(np.float32))
            h = g.node("Add", [h, k], f"t{i}m", f"add{i}").output[0]
            h = g.node("Transpose", [h], f"t{i}b", f"tr{i}b", perm=[0, 3, 1, 2]).output[0]
        elif kind == "BN":
            h = g.bn(h, f"bn{i}", C)
        else:
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            k = g.init(f"k{i}", rng.uniform(0.5, 1.5, shape).astype(np.float32))
            first = bool(rng.integers(2)) and kind != "Div"
            h = g.node(str(kind), [k, h] if first else [h, k], f"o{i}", f"op{i}").output[0]
    g.output(h)
    return g.model()


@pytest.mark.parametrize("seed", range(40))
def test_random_chain_is_exact(seed):
    model = random_chain_model(seed)
    out, report = fold_onnx(model)
    check_valid(out)
    assert_equivalent(model, out)
    assert len(out.graph.node) <= len(model.graph.node)
    assert count_op(out, "BatchNormalization") == len(report.skipped)

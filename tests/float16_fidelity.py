"""Fidelity of bnfold's float16 folds: RMS error of the folded float16 model against the float32
model, divided by that of the float16 original, on the nets of test_float16.py (keep_io_types=True).

    PYTHONPATH=.:tests python tests/float16_fidelity.py

Prints one line per net and the geometric mean (README, "float16 models").
"""

import numpy as np, bnfold
from bnfold.verify import run_onnx
from test_float16 import NETS, to_float16
ratios = []
for name, f in sorted(NETS.items()):
    m32 = f(); m16 = to_float16(m32, True); out16, _ = bnfold.fold_onnx(m16)
    errs = []
    for seed in range(3):
        shape = [d.dim_value for d in m32.graph.input[0].type.tensor_type.shape.dim]
        x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        ref = list(run_onnx(m32, {"x": x}).values())[0].astype(np.float64)
        o = list(run_onnx(m16, {"x": x}).values())[0].astype(np.float64)
        fo = list(run_onnx(out16, {"x": x}).values())[0].astype(np.float64)
        errs.append((np.sqrt(np.mean((fo - ref) ** 2)), np.sqrt(np.mean((o - ref) ** 2))))
    r = sum(e[0] for e in errs) / sum(e[1] for e in errs)
    ratios.append(r); print(f"{name:12} rms error vs float32 reference: folded/original = {r:.3f}")
print("geomean", np.exp(np.mean(np.log(ratios))), "worst", max(ratios))

"""Before/after check for refactors of the ONNX pass: the same folds, the same reports.

1. ``python benchmarks/compare_folds.py collect CORPUS`` runs the test suite with a hook
   that saves every model handed to ``fold_model_proto`` (deduplicated by hash) into CORPUS,
   plus the sample models.
2. ``python benchmarks/compare_folds.py dump CORPUS OUT.json`` folds each saved model with
   the code now checked out and writes, per model, the JSON report (timings zeroed) and a
   hash of the folded model's bytes.
3. Run ``dump`` at the old and the new commit and ``diff`` the two files (or use ``compare``).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PLUGIN = '''
import hashlib, os
import bnfold.onnx_pass as _p
_real = _p.fold_model_proto
_dir = os.environ["BNFOLD_CORPUS"]
def _capture(model, *a, **k):
    try:
        data = model.SerializeToString(deterministic=True)
        name = hashlib.sha256(data).hexdigest()[:20] + ".onnx"
        path = os.path.join(_dir, name)
        if not os.path.exists(path) and len(data) < (64 << 20):
            with open(path, "wb") as f:
                f.write(data)
    except Exception:
        pass
    return _real(model, *a, **k)
_p.fold_model_proto = _capture
'''


def collect(corpus: str) -> None:
    os.makedirs(corpus, exist_ok=True)
    for path in glob.glob(os.path.join(ROOT, "sample_models", "*.onnx")):
        with open(path, "rb") as f:
            data = f.read()
        with open(os.path.join(corpus, "sample_" + os.path.basename(path)), "wb") as f:
            f.write(data)
    plugin_dir = os.path.join(corpus, "_plugin")
    os.makedirs(plugin_dir, exist_ok=True)
    with open(os.path.join(plugin_dir, "bnfold_capture.py"), "w") as f:
        f.write(PLUGIN)
    env = dict(os.environ, BNFOLD_CORPUS=os.path.abspath(corpus),
               PYTHONPATH=os.pathsep.join([plugin_dir, ROOT, os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "bnfold_capture",
                    "-x", "-q", os.path.join(ROOT, "tests")], env=env, cwd=ROOT)


def dump(corpus: str, out: str) -> None:
    import onnx

    from bnfold.onnx_pass import fold_onnx

    results = {}
    for path in sorted(glob.glob(os.path.join(corpus, "*.onnx"))):
        key = os.path.basename(path)
        try:
            model = onnx.load(path, load_external_data=False)
            folded, report = fold_onnx(model)
            report.seconds = 0.0
            results[key] = {
                "report": report.to_dict(),
                "model": hashlib.sha256(folded.SerializeToString(deterministic=True)).hexdigest(),
            }
        except Exception as exc:  # recorded, so both sides must fail the same way
            results[key] = {"error": f"{type(exc).__name__}: {exc}"}
    with open(out, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    print(f"{len(results)} models, {sum('error' in r for r in results.values())} errors -> {out}")


def compare(a: str, b: str) -> int:
    with open(a) as f:
        old = json.load(f)
    with open(b) as f:
        new = json.load(f)
    bad = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    for k in bad[:20]:
        print("differs:", k)
    print(f"{len(old)} vs {len(new)} models; {len(bad)} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "collect":
        collect(sys.argv[2])
    elif cmd == "dump":
        dump(sys.argv[2], sys.argv[3])
    elif cmd == "compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)

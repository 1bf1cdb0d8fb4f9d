"""The fold path's import set stays small: `bnfold MODEL -o OUT --no-check` is mostly start-up
for a small model, and `import onnx` alone (ml_dtypes' extension) costs more than the fold.

Each case runs in a fresh interpreter (this test process has imported everything already) and
lists the modules loaded when it ends.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from bnfold import onnx_proto

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = sorted(glob.glob(os.path.join(ROOT, "sample_models", "*.onnx")))
HEAVY = {"onnxruntime", "torch", "onnx", "ml_dtypes"}
# What the --no-check fold path must never import. onnx and ml_dtypes join the list once the
# file readers build bnfold's own message classes (bnfold.onnx_proto.USE_ONNX_CLASSES = False).
NEVER_ON_FOLD_PATH = {"onnxruntime", "torch"} | (set() if onnx_proto.USE_ONNX_CLASSES else {"onnx", "ml_dtypes"})


def _top_level_modules(code: str) -> set:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    script = code + "\nimport json, sys\nprint('MODULES=' + json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = [x for x in proc.stdout.splitlines() if x.startswith("MODULES=")][-1]
    return set(json.loads(line[len("MODULES="):]))


def test_model_io_modules_import_nothing_heavy():
    """Reading and writing models needs protobuf and numpy, not onnx."""
    loaded = _top_level_modules("import bnfold.onnx_proto, bnfold.onnx_io, bnfold.onnx_wire, bnfold.pipeline")
    assert not loaded & HEAVY, sorted(loaded & HEAVY)


def test_bnfold_package_and_cli_import_nothing_heavy():
    loaded = _top_level_modules("import bnfold, bnfold.cli")
    assert not loaded & HEAVY, sorted(loaded & HEAVY)


@pytest.mark.parametrize("path", SAMPLES, ids=os.path.basename)
def test_no_check_fold_stays_off_heavy_modules(path, tmp_path):
    out = str(tmp_path / "out.onnx")
    code = (
        "import sys\nfrom bnfold.cli import main\n"
        f"sys.argv = ['bnfold', {path!r}, '-o', {out!r}, '--no-check']\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
    )
    loaded = _top_level_modules(code)
    assert os.path.exists(out)
    assert not loaded & NEVER_ON_FOLD_PATH, sorted(loaded & NEVER_ON_FOLD_PATH)


def test_model_io_without_onnx_classes_gives_the_same_bytes(tmp_path, monkeypatch):
    """With bnfold's own classes the readers and the writer produce exactly onnx's bytes."""
    from bnfold import onnx_io
    from bnfold.onnx_wire import is_stub

    outputs = {}
    for use_onnx in (True, False):
        monkeypatch.setattr(onnx_proto, "USE_ONNX_CLASSES", use_onnx)
        for path in SAMPLES:
            for lazy_min in (0, 1 << 40):  # walked lazily, and parsed whole
                monkeypatch.setattr(onnx_io, "LAZY_FILE_MIN_BYTES", lazy_min)
                model, _ = onnx_io.read_model_lazy(path)
                assert onnx_proto.is_bnfold_message(model) != use_onnx
                if lazy_min == 0:
                    assert any(is_stub(t) for t in model.graph.initializer) or os.path.getsize(path) < 8192
                out = str(tmp_path / f"{use_onnx}-{lazy_min}-{os.path.basename(path)}")
                onnx_io.save_model(model, out)
                outputs.setdefault(path, set()).add(open(out, "rb").read())
    for path, variants in outputs.items():
        assert len(variants) == 1, path

#!/usr/bin/env bash
# Print the README's command-line transcripts (quick start, a batch with a broken file, a failing
# check, a Ctrl-C'd batch) as this checkout really prints them; paste each block into README.md.
# Run from the repository root with bnfold importable (pip install . or PYTHONPATH=$PWD).
set -u
ROOT=$(pwd)
BNFOLD_PY="import sys; from bnfold.cli import main; sys.argv[0] = 'bnfold'; sys.exit(main())"
bnfold() { python -c "$BNFOLD_PY" "$@"; }
show() { echo "\$ $*"; eval "$@" 2>&1; local c=$?; [ $c -ne 0 ] && echo "[exit $c]"; true; }

echo "=== quickstart"
rm -f /tmp/resnet_mini.folded.onnx
show bnfold sample_models/resnet_mini.onnx -o /tmp/resnet_mini.folded.onnx

WORK=$(mktemp -d) && cd "$WORK" && mkdir models
cp "$ROOT/sample_models/resnet_mini.onnx" "$ROOT/sample_models/mlp.onnx" models/
printf 'not a model' > models/broken.onnx
echo "=== batch"
show ls models/
show bnfold models/ --out-dir folded/

echo "=== check"
python - <<'PY'
import numpy as np, onnx
from onnx import numpy_helper as nh
m = onnx.load("folded/resnet_mini.onnx")  # scale the first conv's weight by 1.01
t = next(t for t in m.graph.initializer if t.name == m.graph.node[0].input[1])
t.CopyFrom(nh.from_array(nh.to_array(t) * np.float32(1.01), t.name))
onnx.save(m, "tampered.onnx")
PY
show bnfold check models/resnet_mini.onnx tampered.onnx

echo "=== ctrl-c"
mkdir zoo && for i in 1 2 3 4 5 6 7 8; do cp "$ROOT/sample_models/resnet_mini.onnx" zoo/model$i.onnx; done
BNFOLD_PY="$BNFOLD_PY" python - <<'PY'
import os, signal, subprocess, sys
print("$ bnfold zoo/ --out-dir folded-zoo/")
p = subprocess.Popen([sys.executable, "-c", os.environ["BNFOLD_PY"], "zoo/", "--out-dir", "folded-zoo/"],
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
lines = [p.stdout.readline(), p.stdout.readline()]  # Ctrl-C after the second model
p.send_signal(signal.SIGINT)
print("".join(lines) + "^C", flush=True)
rest = p.stdout.read()
print(rest, end="")
print(f"[exit {p.wait()}]")
PY
show ls folded-zoo/
rm -rf "$WORK"

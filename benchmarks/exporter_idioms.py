"""What each tool leaves of the exporter idioms of issue 11: ``python benchmarks/exporter_idioms.py``.

For every model of ``tests/exporter_models.py`` (built locally; the torch one needs torch) and
the Caffe2 conversions the onnx wheel ships as backend test data (``light_*.onnx``, when
present), it counts the BatchNormalization, Mul, Add, Sub and Div nodes left by

- ``bnfold``: ``fold_onnx`` of the bnfold importable here (run with ``PYTHONPATH`` at a checkout),
- ``ort_basic``: onnxruntime's offline optimization at the basic level
  (``SessionOptions.optimized_model_filepath``),
- ``onnxslim`` and ``onnxsim`` when installed (they are never project dependencies),

and checks each result against the original with onnxruntime at ``ORT_DISABLE_ALL`` on seeded
inputs (``ok``, or the relative error). A tool that fails says ``error``.

``--evaluators`` instead measures the ways a constant subgraph can be evaluated (the choice
documented in ``bnfold/onnx_pass/constants.py``): numpy, onnx's ReferenceEvaluator and an
onnxruntime session, per subgraph (median of many calls) and the import each needs (median of
fresh processes).

Options: ``--models NAME ...``, ``--no-light`` (skip the onnx wheel's models), ``--json PATH``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

COUNTED = ("BatchNormalization", "Mul", "Add", "Sub", "Div")


def _models(names: Optional[List[str]], light: bool) -> Dict[str, object]:
    import onnx

    from exporter_models import IDIOMS

    out = {}
    for name, build in IDIOMS.items():
        if names and name not in names:
            continue
        try:
            out[name] = build()
        except ImportError as exc:  # torch missing
            print(f"skipped {name}: {exc}", file=sys.stderr)
    if light:
        data = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
        for path in sorted(glob.glob(os.path.join(data, "light_*.onnx"))):
            name = "onnx-" + os.path.basename(path)[:-5]
            if names and name not in names:
                continue
            m = onnx.load(path)
            if any(n.op_type == "BatchNormalization" for n in m.graph.node):
                out[name] = m
    return out


def _counts(model) -> Dict[str, int]:
    ops = [n.op_type for n in model.graph.node]
    c = {op: ops.count(op) for op in COUNTED}
    c["nodes"] = len(ops)
    return c


def _bnfold(model):
    from bnfold.onnx_pass import fold_onnx

    return fold_onnx(model)[0]


def _ort_basic(model):
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        dst = os.path.join(tmp, "out.onnx")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = dst
        opts.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return onnx.load(dst)


def _onnxslim(model):
    import onnx
    import onnxslim

    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # slim() changes its argument
    return onnxslim.slim(copy)


def _onnxsim(model):
    import onnxsim

    simplified, _ = onnxsim.simplify(model)
    return simplified


TOOLS = {"bnfold": _bnfold, "ort_basic": _ort_basic, "onnxslim": _onnxslim, "onnxsim": _onnxsim}


def _available(tool: str) -> bool:
    if tool in ("onnxslim", "onnxsim"):
        try:
            __import__(tool)
        except ImportError:
            return False
    return True


def _error(original, result) -> float:
    """Largest error of any output over its reference's largest magnitude (ORT_DISABLE_ALL)."""
    from onnx_models import random_feeds, run_model

    worst = 0.0
    for seed in (0, 1):
        feeds = random_feeds(original, seed)
        extra = random_feeds(result, seed)  # inputs the tool added (see _dangling)
        extra.update(feeds)
        ref, got = run_model(original, feeds), run_model(result, extra)
        for k, r in ref.items():
            r64, g64 = r.astype(np.float64), np.asarray(got[k]).astype(np.float64)
            scale = max(float(np.max(np.abs(r64))), 1e-30)
            worst = max(worst, float(np.max(np.abs(r64 - g64))) / scale)
    return worst


def _dangling(original, result) -> int:
    """Required inputs of the result the original did not have (onnxruntime's offline basic
    level leaves the inputs of the IR-3 initializers it folded away, so the saved model cannot
    be run without feeding them)."""
    from onnx_models import initializer_names

    before = {i.name for i in original.graph.input} - initializer_names(original.graph)
    after = {i.name for i in result.graph.input} - initializer_names(result.graph)
    return len(after - before)


def _verdict(original, result, tol: float) -> str:
    try:
        err = _error(original, result)
    except Exception as exc:  # noqa: BLE001 - a result onnxruntime cannot run
        return f"unrunnable ({type(exc).__name__})"
    dangling = _dangling(original, result)
    note = f"{dangling} new required inputs" if dangling else ""
    if err > tol:
        note = f"rel err {err:.2g}" + (f", {note}" if note else "")
    return note or "ok"


def idioms(args) -> int:
    models = _models(args.models, not args.no_light)
    tools = [t for t in TOOLS if _available(t)]
    skipped = [t for t in TOOLS if t not in tools]
    rows = []
    for name, model in models.items():
        fp16 = any(t.data_type == 10 for t in model.graph.initializer)
        tol = 1e-2 if fp16 else 1e-4
        row = {"model": name, "original": _counts(model), "tools": {}}
        for tool in tools:
            try:
                out = TOOLS[tool](model)
            except Exception as exc:  # noqa: BLE001 - report and carry on
                row["tools"][tool] = {"error": f"{type(exc).__name__}: {str(exc)[:120]}"}
                continue
            row["tools"][tool] = dict(_counts(out), check=_verdict(model, out, tol))
        rows.append(row)
    _print_table(rows, tools)
    if skipped:
        print(f"\nnot installed: {', '.join(skipped)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "versions": _versions()}, f, indent=1)
    return 0


def _cell(c: Dict) -> str:
    if "error" in c:
        return "error"
    return "/".join(str(c[op]) for op in COUNTED)


def _print_table(rows, tools) -> None:
    print("Nodes left, as BatchNormalization/Mul/Add/Sub/Div; `check` is the result vs the original"
          " (onnxruntime, ORT_DISABLE_ALL).\n")
    print("| model | original | " + " | ".join(tools) + " |")
    print("|---|---|" + "---|" * len(tools))
    for r in rows:
        cells = []
        for t in tools:
            c = r["tools"][t]
            cells.append(_cell(c) + ("" if "error" in c or c["check"] == "ok" else f" ({c['check']})"))
        print(f"| {r['model']} | {_cell(r['original'])} | " + " | ".join(cells) + " |")
    for r in rows:
        for t in tools:
            if "error" in r["tools"][t]:
                print(f"\n{r['model']} / {t}: {r['tools'][t]['error']}")
    print("\n" + _versions())


def _versions() -> str:
    out = []
    for mod in ("onnx", "onnxruntime", "onnxslim", "onnxsim", "numpy"):
        try:
            out.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            pass
    return ", ".join(out)


# ------------------------------------------------------------------------- --evaluators


def evaluators(args) -> int:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    w = np.random.default_rng(0).standard_normal((3, 3, 32, 1)).astype(np.float32)

    def model():
        init = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([32, 1, 3, 3], np.int64), "s")]
        nodes = [helper.make_node("Transpose", ["w"], ["t"], perm=[2, 3, 0, 1]), helper.make_node("Reshape", ["t", "s"], ["y"])]
        g = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], init)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3

    def bnfold_resolver():
        from bnfold.onnx_pass.constants import ConstantResolver

        return ConstantResolver(m.graph).value("y")

    m = model()
    ways = {
        "numpy, the ops alone": lambda: np.transpose(w, (2, 3, 0, 1)).reshape(32, 1, 3, 3),
        "bnfold ConstantResolver (index, read, evaluate)": bnfold_resolver,
        "onnx ReferenceEvaluator": lambda: ReferenceEvaluator(model()).run(None, {})[0],
        "onnxruntime session": lambda: ort.InferenceSession(model().SerializeToString(), opts,
                                                            providers=["CPUExecutionProvider"]).run(None, {})[0],
    }
    want = np.transpose(w, (2, 3, 0, 1)).reshape(32, 1, 3, 3)
    imports = {
        "numpy, the ops alone": "import numpy",
        "bnfold ConstantResolver (index, read, evaluate)": "import bnfold.onnx_pass.constants",
        "onnx ReferenceEvaluator": "import onnx.reference",
        "onnxruntime session": "import onnxruntime",
    }
    print("| evaluator | per subgraph (median) | import, fresh process (median of 5) |")
    print("|---|---|---|")
    for name, fn in ways.items():
        assert np.array_equal(fn(), want)
        times = []
        for _ in range(args.calls):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        imp = []
        for _ in range(5):
            code = f"import time; t = time.perf_counter(); {imports[name]}; print(time.perf_counter() - t)"
            imp.append(float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout))
        print(f"| {name} | {statistics.median(times) * 1e6:.0f} us | {statistics.median(imp):.2f} s |")
    print("\n(subgraph: Reshape(Transpose(w)) of a 3x3x32x1 depthwise weight, as tf2onnx writes it; "
          "the resolver's import is bnfold's, which today imports onnx through onnx_io)")
    print(_versions())
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*")
    p.add_argument("--no-light", action="store_true")
    p.add_argument("--json")
    p.add_argument("--evaluators", action="store_true")
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args(argv)
    return evaluators(args) if args.evaluators else idioms(args)


if __name__ == "__main__":
    sys.exit(main())

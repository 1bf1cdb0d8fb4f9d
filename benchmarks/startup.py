"""Start-up: what a small fold costs as a whole process. ``python benchmarks/startup.py [--runs N]``.

For each sample model (``sample_models/*.onnx``, or ``--models``): ``bnfold IN -o OUT
--no-check`` beside onnxruntime's offline basic optimization of the same file (``ort_basic``,
see ``peers.py``), plus the bare imports that bound it: ``python -c pass``, ``import numpy``,
``import onnx``, ``import onnxruntime``. Every run is a fresh process timed from spawn to exit;
the commands take turns round-robin (so background load hits all alike) and the table shows
medians and each bnfold figure over ort_basic's in the same rounds.

``--alt NAME=PATH`` adds another bnfold tree (its folder goes first on PYTHONPATH), to compare
a change against HEAD in one run. Writes ``startup.json`` (every run) to ``--out`` if given.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
from typing import Any, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run  # noqa: E402  (benchmarks/ is not a package)

IMPORTS = {
    "python -c pass": "pass",
    "import numpy": "import numpy",
    "import onnx": "import onnx",
    "import onnxruntime": "import onnxruntime",
}


def _env(path: Optional[str]) -> Optional[Dict[str, str]]:
    if path is None:
        return None
    env = dict(os.environ)
    env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
    return env


def commands(models: List[str], trees: Dict[str, Optional[str]]) -> List[Tuple[str, str, List[str], Any]]:
    """(row, column, command, env) for every measured process."""
    out = []
    for label, code in IMPORTS.items():
        out.append((label, "s", [sys.executable, "-c", code], None))
    for name, path in trees.items():
        out.append(("bnfold --help", name, [sys.executable, "-c", run.BNFOLD_MAIN, "--help"], _env(path)))
    for model in models:
        row = os.path.basename(model)
        dst = os.path.join(run.WORK, "startup.out.onnx")
        for name, path in trees.items():
            out.append((row, name, run.tool_command("bnfold", model, dst, False), _env(path)))
        out.append((row, "ort_basic", run.tool_command("ort_basic", model, dst, False), None))
    return out


def measure(models: List[str], trees: Dict[str, Optional[str]], runs: int) -> Dict[str, Dict[str, List[float]]]:
    os.makedirs(run.WORK, exist_ok=True)
    times: Dict[str, Dict[str, List[float]]] = {}
    cmds = commands(models, trees)
    for round_no in range(runs):
        for row, column, cmd, env in cmds:
            r = run.run_process(cmd, 120, env)
            if r["rc"] != 0:
                raise SystemExit(f"{row} / {column} failed: {r['stderr']}")
            times.setdefault(row, {}).setdefault(column, []).append(r["seconds"])
        print(f"  round {round_no + 1}/{runs} done", file=sys.stderr, flush=True)
    return times


def table(times: Dict[str, Dict[str, List[float]]], trees: List[str]) -> str:
    med = statistics.median
    lines = ["| process | " + " | ".join(f"{t} s" for t in trees) + " | ort_basic s | "
             + " | ".join(f"{t} ÷ ort_basic" for t in trees) + " |",
             "|---|" + "---:|" * (2 * len(trees) + 1)]
    for row, cols in times.items():
        if "s" in cols:  # a bare import
            lines.append(f"| `{row}` | {med(cols['s']):.2f} |" + " |" * (2 * len(trees)))
            continue
        cells = [f"{med(cols[t]):.2f}" for t in trees]
        ort = cols.get("ort_basic")
        ratios = [f"{statistics.median(a / b for a, b in zip(cols[t], ort)):.2f}" if ort else "-" for t in trees]
        label = f"`bnfold {row} -o OUT --no-check`" if row != "bnfold --help" else "`bnfold --help`"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {med(ort):.2f} |" if ort else
                     f"| {label} | " + " | ".join(cells) + " | - |")
        if ort:
            lines[-1] += " " + " | ".join(ratios) + " |"
        else:
            lines[-1] += " |" * len(trees)
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="rounds (default 7)")
    parser.add_argument("--models", nargs="+", help="models to fold (default: sample_models/*.onnx)")
    parser.add_argument("--bnfold-ref", default="HEAD", help="git ref measured as 'bnfold', or 'worktree'")
    parser.add_argument("--alt", action="append", default=[], metavar="NAME=PATH",
                        help="another bnfold tree to measure beside it (repeatable)")
    parser.add_argument("--out", help="folder for startup.json")
    args = parser.parse_args(argv)
    models = args.models or sorted(glob.glob(os.path.join(run.REPO, "sample_models", "*.onnx")))
    trees: Dict[str, Optional[str]] = {"bnfold": run.bnfold_snapshot(args.bnfold_ref)}
    for item in args.alt:
        name, _, path = item.partition("=")
        trees[name] = os.path.abspath(path)
    times = measure(models, trees, args.runs)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.runs} rounds, medians; load average {load:.1f} at the end\n")
    print(table(times, list(trees)))
    if args.out:
        with open(os.path.join(args.out, "startup.json"), "w", encoding="utf-8") as f:
            json.dump({"runs": args.runs, "trees": trees, "times": times, "load_average_at_end": load}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

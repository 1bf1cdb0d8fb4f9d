"""How bnfold scales with graph size: ``python benchmarks/scale.py [--sizes ...] [--runs N]``.

Folds chains of Conv(2->2, 1x1) -> BN -> Relu (``models.chain``) of 1,000 to 1,000,000 nodes
with ``bnfold IN -o OUT --no-check``, beside the protobuf round trip on the same file:
``onnx.load`` + ``onnx.save`` (``floor``) and the same with bnfold's own message classes, without
``import onnx`` (``proto_floor``). Every run is a whole fresh process (start-up counts), timed
from spawn to exit, with its exact peak RSS (see ``run.py``); the tools take turns on each size
so background load hits them alike, and the tables show medians.

Writes ``scale.md`` (table), ``scale.json`` (every run) and ``scale.png`` (time, time per node and
peak memory against node count; needs matplotlib, else the plot is skipped with a note; redo it
from the JSON with ``--plot-only`` in any environment that has matplotlib) to ``--out``
(default ``benchmarks/scale/``). The 1,000,000-node model is about 170 MB and takes minutes to build
once and minutes per fold on 2 cores: ``--big-runs`` (default 1) runs for it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)



def _run():
    """The harness (run.py); imported only to measure, so --plot-only needs just matplotlib."""
    import run  # benchmarks/ is not a package

    return run

SIZES = [1_000, 10_000, 100_000, 1_000_000]
TOOLS = ["bnfold", "floor", "proto_floor"]
BIG = 1_000_000  # sizes from here on get --big-runs runs


def chain_path(nodes: int) -> str:
    """The chain model of ``nodes`` nodes in the work folder, built once."""
    run = _run()
    os.makedirs(run.WORK, exist_ok=True)
    path = os.path.join(run.WORK, f"scale_{nodes}.onnx")
    if not os.path.exists(path):
        print(f"  generating a {nodes}-node chain ...", flush=True)
        start = time.perf_counter()
        model = run.models.chain(nodes)
        tmp = path + ".partial"
        with open(tmp, "wb") as f:
            f.write(model.SerializeToString())
        del model
        os.replace(tmp, path)
        print(f"  generated in {time.perf_counter() - start:.1f} s ({os.path.getsize(path) / 1e6:.1f} MB)", flush=True)
    return path


def node_count(nodes: int) -> int:
    return 3 * max(1, nodes // 3)  # models.chain builds whole Conv -> BN -> Relu triples


def measure(sizes: List[int], runs: int, big_runs: int, timeout: float) -> Dict[str, Any]:
    run = _run()
    paths = {n: chain_path(n) for n in sizes}
    results: Dict[str, Any] = {str(n): {t: {"runs": []} for t in TOOLS} for n in sizes}
    for round_no in range(max(runs, big_runs)):
        for n in sizes:
            if round_no >= (big_runs if n >= BIG else runs):
                continue
            for tool in TOOLS:
                entry = results[str(n)][tool]
                if "error" in entry:
                    continue
                dst = os.path.join(run.WORK, f"scale_{n}.out.{tool}.onnx")
                run.remove_output(dst)
                r = run.run_process(run.tool_command(tool, paths[n], dst, False), timeout, run.tool_env(tool))
                run.remove_output(dst)
                entry["runs"].append(r)
                ok = r["rc"] == 0
                print(f"    {n:>9,d} nodes {tool:12s} run {round_no + 1}: {r['seconds']:8.2f} s "
                      f"{r['peak_rss_mb']:8.0f} MB{'' if ok else '  FAILED: ' + r['stderr']}", flush=True)
                if not ok:
                    entry["error"] = f"timed out after {timeout:.0f} s" if r["timed_out"] else (r["stderr"] or f"rc {r['rc']}")
    for n in sizes:
        for tool in TOOLS:
            entry = results[str(n)][tool]
            run.summarize(entry)
            if "median_s" in entry:
                entry["us_per_node"] = entry["median_s"] / node_count(n) * 1e6
        results[str(n)]["file_mb"] = os.path.getsize(paths[n]) / 1e6
        results[str(n)]["nodes"] = node_count(n)
    return results


def table(result: Dict[str, Any]) -> str:
    sizes = result["sizes"]
    rows = [
        f"# bnfold scaling: chains of Conv -> BN -> Relu\n",
        f"`python benchmarks/scale.py` on {result['machine']}, {result['date']}, bnfold at {result['bnfold']}.",
        f"Whole processes, medians of {result['runs']} runs ({result['big_runs']} for {BIG:,} nodes), tools interleaved.",
        f"{result.get('note', '')}\n",
        "| nodes | file MB | bnfold s | floor s (onnx load+save) | proto_floor s (no onnx import) | bnfold ÷ floor "
        "| bnfold µs/node | floor µs/node | bnfold peak MB | floor peak MB | bnfold RSS ÷ file |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in sizes:
        e = result["results"][str(n)]
        b, f, p = e["bnfold"], e["floor"], e["proto_floor"]

        def s(x, key="median_s", fmt="{:.2f}"):
            return fmt.format(x[key]) if key in x else ("failed" if "error" in x else "-")

        ratio = f"{b['median_s'] / f['median_s']:.2f}" if "median_s" in b and "median_s" in f else "-"
        rss = f"{b['peak_rss_mb'] / e['file_mb']:.1f}" if "peak_rss_mb" in b else "-"
        rows.append(
            f"| {e['nodes']:,} | {e['file_mb']:.1f} | {s(b)} | {s(f)} | {s(p)} | {ratio} | {s(b, 'us_per_node', '{:.1f}')} "
            f"| {s(f, 'us_per_node', '{:.1f}')} | {s(b, 'peak_rss_mb', '{:.0f}')} | {s(f, 'peak_rss_mb', '{:.0f}')} | {rss} |"
        )
    rows.append("\n![time and peak memory against node count](scale.png)\n")
    return "\n".join(rows) + "\n"


def plot(result: Dict[str, Any], path: str) -> str:
    """Write the PNG; return a note (empty when written)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (rerun with --plot-only where it is)"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    labels = {"bnfold": "bnfold --no-check", "floor": "onnx.load + onnx.save",
              "proto_floor": "protobuf parse + serialize (no onnx import)"}
    for tool, style in (("bnfold", "o-"), ("floor", "s--"), ("proto_floor", "^:")):
        pts = [(result["results"][str(n)]["nodes"], result["results"][str(n)][tool]) for n in result["sizes"]]
        pts = [(n, e) for n, e in pts if "median_s" in e]
        if not pts:
            continue
        xs = [n for n, _ in pts]
        axes[0].plot(xs, [e["median_s"] for _, e in pts], style, label=labels[tool])
        axes[1].plot(xs, [e["us_per_node"] for _, e in pts], style, label=labels[tool])
        axes[2].plot(xs, [e["peak_rss_mb"] for _, e in pts], style, label=labels[tool])
    for ax, title, unit in zip(axes, ("wall time (whole process)", "time per node", "peak RSS"), ("s", "µs / node", "MB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("nodes in the graph")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"bnfold scaling on chains of Conv->BN->Relu ({result['machine']}; {result['date'][:10]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="node counts (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=3, help="runs per tool below 1,000,000 nodes (default 3)")
    parser.add_argument("--big-runs", type=int, default=1, help="runs per tool at 1,000,000 nodes and up (default 1)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds before a run is killed (default 1200)")
    parser.add_argument("--bnfold-ref", default="HEAD", help="git ref of bnfold to measure, or 'worktree'")
    parser.add_argument("--note", default="", help="a line for the table (e.g. how loaded the machine was)")
    parser.add_argument("--out", default=os.path.join(HERE, "scale"), help="folder for scale.md, scale.json, scale.png")
    parser.add_argument("--plot-only", action="store_true", help="redraw scale.png from scale.json in --out")
    args = parser.parse_args(argv)
    json_path = os.path.join(args.out, "scale.json")
    if args.plot_only:
        with open(json_path, encoding="utf-8") as f:
            result = json.load(f)
        note = plot(result, os.path.join(args.out, "scale.png"))
        print(note or f"wrote {os.path.join(args.out, 'scale.png')}")
        return 1 if note else 0
    run = _run()
    run.BNFOLD_PATH = run.bnfold_snapshot(args.bnfold_ref)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} CPUs, {run._cpu_name()}",
        "bnfold": args.bnfold_ref if args.bnfold_ref == "worktree" else run.subprocess.run(
            ["git", "rev-parse", "--short", args.bnfold_ref], capture_output=True, text=True, cwd=run.REPO).stdout.strip(),
        "sizes": sorted(args.sizes),
        "runs": args.runs,
        "big_runs": args.big_runs,
        "load_average_at_start": load,
    }
    result["results"] = measure(result["sizes"], args.runs, args.big_runs, args.timeout)
    result["load_average_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result["note"] = args.note or (
        f"Load average {result['load_average_at_start']:.1f} at the start, {result['load_average_at_end']:.1f} at the end."
        if load is not None else "")
    os.makedirs(args.out, exist_ok=True)
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    note = plot(result, os.path.join(args.out, "scale.png"))
    with open(os.path.join(args.out, "scale.md"), "w", encoding="utf-8") as f:
        f.write(table(result) + (f"\n{note}\n" if note else ""))
    print(table(result))
    if note:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""bnfold's benchmark suite: ``python benchmarks/run.py [--quick] [--runs N]``.

Generates the models of ``models.py`` under ``benchmarks/work/`` (cached), then measures:

1. Fold time and peak memory of ``bnfold IN -o OUT --no-check`` as a whole process, beside
   the plain ``onnx.load`` + ``onnx.save`` round trip (the floor), the same round trip through
   onnx-ir, and the peer tools that are installed (onnxruntime offline optimization at the
   basic level, onnxoptimizer ``fuse_bn_into_conv``, onnxslim, onnxsim). Every run is a fresh
   process; its peak RSS comes from the kernel (``os.wait4``'s rusage, exact per process).
   Runs go round-robin over the tools, and each figure is the median of the runs.
2. onnxruntime CPU latency of the original and the folded model (``latency.py``).
3. PyTorch eager latency before and after folding, if ``bench_torch_eager.py`` is present.

Writes ``RESULTS.md`` (Markdown tables) and ``results.json`` to ``benchmarks/`` (full mode) or
``benchmarks/work/quick/`` (``--quick``), and checks the targets of issue #6 against the numbers.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORK = os.path.join(HERE, "work")
sys.path.insert(0, HERE)

import models  # noqa: E402  (benchmarks/ is not a package)
import report  # noqa: E402

QUICK_MODELS = ["mobilenetv2", "chain10k"]
FULL_MODELS = ["mobilenetv2", "resnet50", "vgg11bn", "chain10k", "chain100k", "xl_external"]
LATENCY_MODELS = {"mobilenetv2": 1.0, "resnet50": 1.0, "vgg11bn": 0.34}  # share of --latency-runs
TOOLS = ["bnfold", "floor", "onnx_ir", "ort_basic", "onnxoptimizer", "onnxslim", "onnxsim"]
# Peers that cannot handle a model, and why; they are listed as skipped, not run.
SKIP = {
    ("chain10k", "onnxoptimizer"): "over 9 minutes for one run on 10,000 nodes (measured; its pass is quadratic)",
    ("chain100k", "onnxoptimizer"): "over 9 minutes for one run on 10,000 nodes (measured; its pass is quadratic)",
    ("xl_external", "onnxoptimizer"): "its C++ API serializes the whole model: fails past the 2 GiB protobuf limit",
    ("xl_external", "onnxsim"): "loads and checks the whole model; minutes per run on 2 cores",
    ("chain100k", "onnxsim"): "minutes per run on a 100,000-node graph",
    ("chain100k", "ort_basic"): "253 s for one run on 100,000 nodes (measured); 5 runs would take 20 minutes",
    ("chain10k", "onnxslim"): "about 4.5 minutes per run on 10,000 nodes (measured)",
    ("chain100k", "onnxslim"): "about 4.5 minutes per run on 10,000 nodes (measured)",
}
PYTHON_MODULES = {"onnx_ir": "onnx_ir", "onnxoptimizer": "onnxoptimizer", "onnxslim": "onnxslim", "onnxsim": "onnxsim"}


# ---------------------------------------------------------------- processes


TIME = "/usr/bin/time"  # GNU time: a tiny launcher that reports its child's exact peak RSS


def run_process(cmd: List[str], timeout: float, env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Run ``cmd`` as a fresh process; return wall time, peak RSS (MB), exit code, stderr tail.

    Peak RSS: Linux carries a parent's RSS high-water mark into a child it forks, so a
    child of this (large) harness process would report at least the harness's own RSS. So the
    tool is started by GNU time, whose few-MB RSS is all the child inherits, and its ``%M``
    (the child's ru_maxrss) is read back. Without GNU time, the rusage of our own child is used.
    """
    with tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile("r") as rss_file:
        launcher = [TIME, "-q", "-f", "%M", "-o", rss_file.name] if os.access(TIME, os.X_OK) else []
        start = time.perf_counter()
        proc = subprocess.Popen(launcher + cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=WORK, env=env)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # rusage of this child alone
        except BaseException:  # interrupted or terminated: never leave the tool running
            proc.kill()
            proc.wait()
            raise
        finally:
            timer.cancel()
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read().decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        kib = usage.ru_maxrss
        if launcher:
            text = rss_file.read().strip().splitlines()
            kib = int(text[-1]) if text and text[-1].isdigit() else kib
    return {
        "seconds": seconds,
        "peak_rss_mb": kib / 1024.0,  # Linux reports KiB
        "rc": proc.returncode,
        "timed_out": seconds >= timeout,
        "stderr": tail[0][:300],
    }


BNFOLD_MAIN = "import sys; from bnfold.cli import main; sys.exit(main())"


def bnfold_snapshot(ref: str) -> Optional[str]:
    """Export ``bnfold/`` at git ``ref`` into the work folder; return the folder for PYTHONPATH.

    Measuring a committed snapshot keeps a long run steady while the working tree changes
    under it. ``ref == "worktree"``: use the installed bnfold as it is (returns None).
    """
    if ref == "worktree":
        return None
    dest = os.path.join(WORK, "bnfold-src")
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    archive = subprocess.run(["git", "archive", ref, "bnfold"], capture_output=True, cwd=REPO, check=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    # byte-compile it, as pip does on install: else every run would compile bnfold's sources
    # (PYTHONDONTWRITEBYTECODE stops Python from caching them), a cost users do not pay
    subprocess.run([sys.executable, "-m", "compileall", "-q", dest], check=True)
    return dest


def tool_command(tool: str, src: str, dst: str, external: bool) -> List[str]:
    """The command line that runs ``tool`` on ``src`` and writes ``dst``."""
    python = sys.executable
    if tool == "bnfold":
        return [python, "-c", BNFOLD_MAIN, src, "-o", dst, "--no-check"]
    if tool == "onnxslim":
        return [shutil.which("onnxslim") or "onnxslim", src, dst]
    if tool == "onnxsim":
        cmd = [shutil.which("onnxsim") or "onnxsim", src, dst, "0"]  # 0: no check runs, like --no-check
        return cmd + (["--save-as-external-data"] if external else [])
    return [python, os.path.join(HERE, "peers.py"), tool, src, dst] + (["--external"] if external else [])


BNFOLD_PATH: Optional[str] = None  # set by main() to the snapshot folder


def tool_env(tool: str) -> Optional[Dict[str, str]]:
    """bnfold (and proto_floor, which uses its message classes) run from the snapshot (if any),
    found first on PYTHONPATH."""
    if tool not in ("bnfold", "proto_floor") or BNFOLD_PATH is None:
        return None
    env = dict(os.environ)
    env["PYTHONPATH"] = BNFOLD_PATH + os.pathsep + env.get("PYTHONPATH", "")
    return env


def available(tool: str) -> Optional[str]:
    """None if ``tool`` can run here, else why not."""
    import importlib.util

    module = PYTHON_MODULES.get(tool)
    if module and importlib.util.find_spec(module) is None:
        return f"not installed (pip install {module.replace('_', '-')})"
    return None


def remove_output(path: str) -> None:
    for p in (path, path + ".data"):
        if os.path.exists(p):
            os.remove(p)


COUNT_SCRIPT = """
import collections, json, sys, onnx
m = onnx.load(sys.argv[1], load_external_data=False)
ops = [n.op_type for n in m.graph.node]
print(json.dumps({"nodes_out": len(ops), "bn_left": ops.count("BatchNormalization")}))
"""


def output_counts(path: str) -> Dict[str, int]:
    """Node count and BatchNormalization count of a written model.

    Parsed in a child process, so the harness never holds a model (its RSS stays small).
    """
    proc = subprocess.run([sys.executable, "-c", COUNT_SCRIPT, path], capture_output=True, text=True)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


# ---------------------------------------------------------------- fold benchmark


def model_path(name: str, regenerate: bool) -> str:
    """Build model ``name`` into the work folder unless it is there already."""
    os.makedirs(WORK, exist_ok=True)
    path = os.path.join(WORK, f"{name}.onnx")
    if regenerate or not os.path.exists(path):
        print(f"  generating {name} ...", flush=True)
        start = time.perf_counter()
        models.build(name, path)
        print(f"  generated {name} in {time.perf_counter() - start:.1f} s", flush=True)
    return path


def file_size(path: str) -> int:
    return os.path.getsize(path) + (os.path.getsize(path + ".data") if os.path.exists(path + ".data") else 0)


def bench_fold(name: str, src: str, tools: List[str], runs: int, timeout: float) -> Dict[str, Any]:
    """Time every tool on ``src``, ``runs`` rounds round-robin; keep bnfold's output for later."""
    external = os.path.exists(src + ".data")
    results: Dict[str, Any] = {}
    active = []
    for tool in tools:
        why = SKIP.get((name, tool)) or available(tool)
        if why:
            results[tool] = {"skipped": why}
        else:
            results[tool] = {"runs": []}
            active.append(tool)
    for round_no in range(runs):
        for tool in list(active):
            dst = os.path.join(WORK, f"{name}.out.{tool}.onnx")
            remove_output(dst)
            r = run_process(tool_command(tool, src, dst, external), timeout, tool_env(tool))
            results[tool]["runs"].append(r)
            ok = r["rc"] == 0 and os.path.exists(dst)
            print(f"    {name:12s} {tool:14s} run {round_no + 1}/{runs}: {r['seconds']:7.2f} s "
                  f"{r['peak_rss_mb']:8.0f} MB{'' if ok else '  FAILED: ' + r['stderr']}", flush=True)
            if not ok:
                results[tool]["error"] = f"timed out after {timeout:.0f} s" if r["timed_out"] else (r["stderr"] or f"exit code {r['rc']}")
                active.remove(tool)  # one failure is enough: don't retry a tool that cannot do it
            elif round_no == runs - 1:
                results[tool].update(output_counts(dst))
            if tool == "bnfold" and ok:
                keep = os.path.join(WORK, f"{name}.folded.onnx")
                remove_output(keep)
                if os.path.exists(dst + ".data"):
                    # the .onnx names its data file: keep the pair under the output's own name
                    keep = dst
                else:
                    os.replace(dst, keep)
                results[tool]["output"] = keep
            else:
                remove_output(dst)
    for tool in tools:
        summarize(results[tool])
    return results


def summarize(entry: Dict[str, Any]) -> None:
    runs = [r for r in entry.get("runs", []) if r["rc"] == 0]
    if runs and "error" not in entry:
        entry["median_s"] = statistics.median(r["seconds"] for r in runs)
        entry["min_s"] = min(r["seconds"] for r in runs)
        entry["peak_rss_mb"] = statistics.median(r["peak_rss_mb"] for r in runs)


SAMPLES = sorted(glob.glob(os.path.join(REPO, "sample_models", "*.onnx")))


def bench_startup(runs: int) -> Dict[str, Any]:
    """Start-up: bare Python and imports, ``bnfold --help``, and ``bnfold SAMPLE -o OUT
    --no-check`` beside onnxruntime's offline basic optimization on each sample model (issue
    16: a small fold is mostly start-up). Round-robin over all of them, ``runs`` rounds."""
    cases = [("python", [sys.executable, "-c", "pass"], None),
             ("import numpy", [sys.executable, "-c", "import numpy"], None),
             ("import onnx", [sys.executable, "-c", "import onnx"], None),
             ("import onnxruntime", [sys.executable, "-c", "import onnxruntime"], None),
             ("bnfold --help", [sys.executable, "-c", BNFOLD_MAIN, "--help"], "bnfold")]
    dst = os.path.join(WORK, "startup.out.onnx")
    for sample in SAMPLES:
        name = os.path.basename(sample)
        cases.append((f"bnfold {name} --no-check", tool_command("bnfold", sample, dst, False), "bnfold"))
        cases.append((f"ort_basic {name}", tool_command("ort_basic", sample, dst, False), None))
    out: Dict[str, Any] = {label: {"runs": []} for label, _, _ in cases}
    os.makedirs(WORK, exist_ok=True)
    for _ in range(runs):
        for label, cmd, tool in cases:
            out[label]["runs"].append(run_process(cmd, 120, tool_env(tool or "")))
            remove_output(dst)
    for label, entry in out.items():
        summarize(entry)
        if label.startswith("bnfold ") and label.endswith(" --no-check"):
            ort = out[f"ort_basic {label[len('bnfold '):-len(' --no-check')]}"]["runs"]
            pairs = [a["seconds"] / b["seconds"] for a, b in zip(entry["runs"], ort)]
            entry["per_round_ratio_to_ort_basic"] = statistics.median(pairs)
    return out


# ---------------------------------------------------------------- latency


def bench_latency(src: str, folded: str, runs: int, threads: int, timeout: float) -> Dict[str, Any]:
    cmd = [sys.executable, os.path.join(HERE, "latency.py"), src, folded, "--runs", str(runs), "--warmup", "3",
           "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout)


def bench_torch(quick: bool, timeout: float) -> Dict[str, Any]:
    """Run the PyTorch eager benchmark (another script) if it is present; return its JSON."""
    script = os.path.join(HERE, "bench_torch_eager.py")
    if not os.path.exists(script):
        return {"skipped": "benchmarks/bench_torch_eager.py not present"}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "torch.json")
        cmd = [sys.executable, script, "--json", out] + (["--size", "112", "--rounds", "10"] if quick else [])
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=tool_env("bnfold"))
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0 or not os.path.exists(out):
            return {"error": (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]}
        with open(out, encoding="utf-8") as f:
            return json.load(f)


# ---------------------------------------------------------------- main


def environment(args) -> Dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for dist in ("bnfold", "onnx", "onnxruntime", "onnx-ir", "onnxoptimizer", "onnxslim", "onnxsim", "numpy", "protobuf", "torch"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    ref = "HEAD" if args.bnfold_ref == "worktree" else args.bnfold_ref
    # the last commit that changed bnfold/ (HEAD itself may touch only other folders)
    commit = subprocess.run(["git", "log", "-1", "--format=%h %s", ref, "--", "bnfold"],
                            capture_output=True, text=True, cwd=REPO).stdout.strip()
    dirty = args.bnfold_ref == "worktree" and subprocess.run(
        ["git", "status", "--porcelain", "--", "bnfold"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    try:
        import psutil

        mem_gb = psutil.virtual_memory().total / 2**30
    except ImportError:
        mem_gb = None
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "runs": args.runs,
        "latency_runs": args.latency_runs,
        "git": commit + (" (bnfold/ has uncommitted changes)" if dirty else ""),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
                   + (f", {mem_gb:.0f} GiB RAM" if mem_gb else ""),
        "cpu": _cpu_name(),
        "python": platform.python_version(),
        "versions": versions,
        "load_average_at_start": os.getloadavg()[0],
        "note": args.note,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def parse_args(argv):
    parser = argparse.ArgumentParser(description="bnfold benchmark suite (see benchmarks/README.md)")
    parser.add_argument("--quick", action="store_true", help="small models only, 3 runs (about 2-3 minutes)")
    parser.add_argument("--runs", type=int, help="fold runs per tool and model (default 5; quick: 3)")
    parser.add_argument("--xl-runs", type=int, help="runs on the >2 GB model (default 3)")
    parser.add_argument("--latency-runs", type=int, help="timed ORT runs per configuration (default 30; quick: 10)")
    parser.add_argument("--models", nargs="+", choices=models.NAMES, help="models to run (default: all, or the quick set)")
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=TOOLS, help="tools to run (default: all)")
    parser.add_argument("--timeout", type=float, help="seconds before a run is killed and the tool marked failed "
                        "(default 300; quick: 60)")
    parser.add_argument("--no-latency", action="store_true", help="skip the inference-latency part")
    parser.add_argument("--note", default="", help="a sentence for the top of RESULTS.md (e.g. how busy the machine was)")
    parser.add_argument("--ort-threads", type=int, default=1, help="ORT intra-op threads for latency (default 1; 0: all cores)")
    parser.add_argument("--update", action="store_true",
                        help="keep the other models' results in the existing results.json; replace only the models run now")
    parser.add_argument("--latency-only", action="store_true",
                        help="rerun only the latency part, on the folded models of the last run, into its results.json")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager part")
    parser.add_argument("--regenerate", action="store_true", help="rebuild the models even if cached")
    parser.add_argument("--bnfold-ref", default="HEAD",
                        help="git ref of bnfold/ to measure, exported to benchmarks/work/bnfold-src "
                        "(default HEAD; 'worktree': the installed bnfold, uncommitted changes included)")
    parser.add_argument("--out", help="folder for RESULTS.md and results.json (default benchmarks/, quick: benchmarks/work/quick/)")
    args = parser.parse_args(argv)
    args.runs = args.runs or (3 if args.quick else 5)
    args.timeout = args.timeout or (60 if args.quick else 300)
    args.xl_runs = args.xl_runs or min(args.runs, 3)
    args.latency_runs = args.latency_runs or (10 if args.quick else 30)
    args.models = args.models or (QUICK_MODELS if args.quick else FULL_MODELS)
    args.out = args.out or (os.path.join(WORK, "quick") if args.quick else HERE)
    if "bnfold" not in args.tools:
        args.tools = ["bnfold"] + args.tools
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # turn `kill` into an exception, so the running tool's process is killed too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    if args.latency_only:
        return latency_only(args)
    global BNFOLD_PATH
    BNFOLD_PATH = bnfold_snapshot(args.bnfold_ref)
    result: Dict[str, Any] = {"environment": environment(args), "models": {}}
    previous = os.path.join(args.out, "results.json")
    if args.update and os.path.exists(previous):
        with open(previous, encoding="utf-8") as f:
            old = json.load(f)
        result["models"] = old.get("models", {})
        result["torch_eager"] = old.get("torch_eager")
        result["environment"]["updated_models"] = args.models
        result["environment"]["first_run"] = old["environment"]
    print(f"bnfold benchmarks ({result['environment']['mode']}): {', '.join(args.models)}", flush=True)
    result["startup"] = bench_startup(args.runs)
    for name in args.models:
        src = model_path(name, args.regenerate)
        runs = args.xl_runs if name == "xl_external" else args.runs
        entry = {"file_mb": file_size(src) / 1e6, **output_counts(src)}
        entry["input_counts"] = {"nodes": entry.pop("nodes_out"), "bn": entry.pop("bn_left")}
        entry["fold"] = bench_fold(name, src, args.tools, runs, args.timeout)
        folded = entry["fold"]["bnfold"].get("output")
        if name in LATENCY_MODELS and folded and not args.no_latency:
            n = max(5, round(args.latency_runs * LATENCY_MODELS[name]))
            print(f"  latency {name}: {n} runs per configuration ...", flush=True)
            entry["latency"] = bench_latency(src, folded, n, args.ort_threads, args.timeout)
        result["models"][name] = entry
        write(result, args.out)  # after every model, so a long run leaves partial results
    if not args.no_torch:
        print("  PyTorch eager ...", flush=True)
        result["torch_eager"] = bench_torch(args.quick, args.timeout)
    result["environment"]["total_minutes"] = (time.perf_counter() - started) / 60
    result["environment"]["load_average_at_end"] = os.getloadavg()[0]
    write(result, args.out)
    print(f"wrote {os.path.join(args.out, 'RESULTS.md')} and results.json "
          f"in {result['environment']['total_minutes']:.1f} min", flush=True)
    return 0


def latency_only(args) -> int:
    """Redo the latency part of the results in ``args.out`` (same folded models), and rewrite them."""
    with open(os.path.join(args.out, "results.json"), encoding="utf-8") as f:
        result = json.load(f)
    for name, entry in result["models"].items():
        folded = entry["fold"].get("bnfold", {}).get("output")
        if name in LATENCY_MODELS and folded and os.path.exists(folded):
            n = max(5, round(args.latency_runs * LATENCY_MODELS[name]))
            print(f"  latency {name}: {n} runs per configuration ...", flush=True)
            entry["latency"] = bench_latency(os.path.join(WORK, f"{name}.onnx"), folded, n, args.ort_threads, args.timeout)
    result["environment"]["latency_runs"] = args.latency_runs
    result["environment"]["latency_rerun"] = datetime.datetime.now().isoformat(timespec="seconds")
    write(result, args.out)
    return 0


def write(result: Dict[str, Any], folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    result["targets"] = report.targets(result)
    with open(os.path.join(folder, "results.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, sort_keys=False)
        f.write("\n")
    with open(os.path.join(folder, "RESULTS.md"), "w", encoding="utf-8") as f:
        f.write(report.markdown(result))


if __name__ == "__main__":
    sys.exit(main())

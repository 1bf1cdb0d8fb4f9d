"""Turn the benchmark results (the dict ``run.py`` builds) into target verdicts and Markdown."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

PEERS = ["floor", "ort_basic", "onnxoptimizer", "onnxslim", "onnxsim"]  # what bnfold must beat on time
TOOL_LABELS = {
    "bnfold": "bnfold `--no-check`",
    "floor": "floor: onnx.load + onnx.save",
    "onnx_ir": "onnx_ir.load + onnx_ir.save",
    "ort_basic": "onnxruntime offline, basic level",
    "onnxoptimizer": "onnxoptimizer fuse_bn_into_conv",
    "onnxslim": "onnxslim (CLI)",
    "onnxsim": "onnxsim (CLI, check_n=0)",
}
TIME_MODELS = ["resnet50", "vgg11bn"]
INLINE_MEMORY_MODELS = ["resnet50", "vgg11bn"]
MEMORY_FACTOR = 1.5  # peak RSS at most this times the file, for inline weights
EXTERNAL_FACTOR = 0.25  # "far below its size": at most a quarter of it
CHAIN_SECONDS = 10.0  # "folds in seconds"
STARTUP_SECONDS = 0.3  # issue 16: a sample model folds with --no-check in this, whole process
NOISE = 0.03  # latency ratios up to 1 + NOISE are reported as "within noise", not as a failure


# ---------------------------------------------------------------- targets


def _target(name: str, value: str, goal: str, status: str) -> Dict[str, str]:
    return {"target": name, "measured": value, "goal": goal, "status": status}


def _fold(result, model: str, tool: str) -> Dict[str, Any]:
    return result["models"].get(model, {}).get("fold", {}).get(tool, {})


def targets(result: Dict[str, Any]) -> List[Dict[str, str]]:
    """One verdict per target of issue #6 that this run has the numbers for."""
    out: List[Dict[str, str]] = []
    for model in TIME_MODELS:
        out += _time_target(result, model)
    for model in INLINE_MEMORY_MODELS:
        out += _memory_target(result, model, MEMORY_FACTOR, "inline weights")
    out += _memory_target(result, "xl_external", EXTERNAL_FACTOR, "external data")
    out += _chain_target(result)
    out += _startup_targets(result.get("startup", {}))
    for model, entry in result["models"].items():
        out += _latency_targets(model, entry.get("latency"))
    out += _torch_target(result.get("torch_eager"))
    return out


def _time_target(result, model: str) -> List[Dict[str, str]]:
    mine = _fold(result, model, "bnfold").get("median_s")
    if mine is None:
        return []
    others = {t: _fold(result, model, t).get("median_s") for t in PEERS}
    others = {t: s for t, s in others.items() if s is not None}
    if not others:
        return []
    best = min(others, key=others.get)
    ratio = mine / others[best]
    value = f"bnfold {mine:.2f} s; fastest other: {best} {others[best]:.2f} s (bnfold ÷ it = {ratio:.2f})"
    ran = ", ".join(sorted(others))
    status = "pass" if ratio < 1 - NOISE else ("tie (within 3 %)" if ratio < 1 + NOISE else "FAIL")
    return [_target(f"fold time, {model}", value, f"below every one of: {ran}", status)]


def _memory_target(result, model: str, factor: float, kind: str) -> List[Dict[str, str]]:
    entry = result["models"].get(model)
    rss = _fold(result, model, "bnfold").get("peak_rss_mb")
    if entry is None or rss is None:
        return []
    ratio = rss / entry["file_mb"]
    value = f"{rss:.0f} MB peak for a {entry['file_mb']:.0f} MB model ({ratio:.2f}×)"
    return [_target(f"peak memory, {model} ({kind})", value, f"≤ {factor}× the model", "pass" if ratio <= factor else "FAIL")]


def _chain_target(result) -> List[Dict[str, str]]:
    big = _fold(result, "chain100k", "bnfold").get("median_s")
    if big is None:
        return []
    small = _fold(result, "chain10k", "bnfold").get("median_s")
    scaling = f"; 10× the nodes took {big / small:.1f}× the time" if small else ""
    value = f"{big:.2f} s for 100,000 nodes{scaling}"
    return [_target("100,000-node graph", value, f"< {CHAIN_SECONDS:.0f} s (linear)", "pass" if big < CHAIN_SECONDS else "FAIL")]


def _startup_targets(startup: Dict[str, Any]) -> List[Dict[str, str]]:
    """Issue 16: each sample fold (--no-check) within STARTUP_SECONDS and not slower than
    onnxruntime's offline basic optimization of the same file (ratio of each round's pair)."""
    out = []
    for label, entry in startup.items():
        if not (label.startswith("bnfold ") and label.endswith(" --no-check")) or "median_s" not in entry:
            continue
        name = label[len("bnfold "):-len(" --no-check")]
        ratio = entry.get("per_round_ratio_to_ort_basic")
        ort = startup.get(f"ort_basic {name}", {}).get("median_s")
        value = f"{entry['median_s']:.2f} s" + (f"; ort_basic {ort:.2f} s; per-round ratio {ratio:.2f}" if ratio else "")
        fast = entry["median_s"] <= STARTUP_SECONDS
        beats = ratio is not None and ratio <= 1 + NOISE
        out.append(_target(f"start-up, {name} --no-check", value,
                           f"≤ {STARTUP_SECONDS} s and ≤ ort_basic", "pass" if fast and beats else "FAIL"))
    return out


def _latency_targets(model: str, lat: Optional[Dict[str, Any]]) -> List[Dict[str, str]]:
    if not lat or "error" in lat:
        return []
    med = {k: v["median_ms"] for k, v in lat.items() if isinstance(v, dict)}
    out = []
    for folded, original, goal in (("folded@disable", "original@basic", "folded at disable ≤ original at basic"),
                                   ("folded@all", "original@all", "folded at all ≤ original at all")):
        ratio = med[folded] / med[original]
        status = "pass" if ratio <= 1 else ("within noise" if ratio <= 1 + NOISE else "FAIL")
        value = f"{med[folded]:.1f} ms vs {med[original]:.1f} ms ({ratio:.3f}×)"
        out.append(_target(f"ORT latency, {model}", value, goal, status))
    return out


def _torch_target(torch: Optional[Dict[str, Any]]) -> List[Dict[str, str]]:
    """bench_torch_eager.py reports ``ratio`` = folded median ÷ original median."""
    ratio = (torch or {}).get("ratio")
    if not isinstance(ratio, (int, float)):
        return []
    change = f"{(1 - ratio) * 100:.1f}% less time" if ratio <= 1 else f"{(ratio - 1) * 100:.1f}% more time"
    value = f"folded ÷ original = {ratio:.3f} (folded takes {change})"
    return [_target("PyTorch eager, ResNet-50-sized", value, "≥ 5% faster (ratio ≤ 0.95)", "pass" if ratio <= 0.95 else "FAIL")]


# ---------------------------------------------------------------- Markdown


def _table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def markdown(result: Dict[str, Any]) -> str:
    env = result["environment"]
    parts = [
        "# bnfold benchmark results\n",
        f"Generated by `python benchmarks/run.py{' --quick' if env['mode'] == 'quick' else ''}` on {env['date']} "
        f"({env['mode']} mode, {env['runs']} runs per tool; medians). Machine: {env['cpu']}, {env['machine']}; "
        f"load average at start {env['load_average_at_start']:.1f}"
        + (f", at end {env['load_average_at_end']:.1f}" if "load_average_at_end" in env else " (run still going)")
        + f" (above the core count, other work competed for the CPUs). bnfold at `{env['git']}`"
        + (f"; total {env['total_minutes']:.0f} min" if "total_minutes" in env else "") + ".\n",
        (f"Models {', '.join(env['updated_models'])} were measured in a second run (`--update`, {env['runs']} run(s) per tool) "
         f"on {env['date']}; the others in a first run on {env['first_run']['date']} with {env['first_run']['runs']} runs per tool "
         f"(bnfold at `{env['first_run']['git']}`).\n" if env.get("first_run") else ""),
        (f"**Note:** {env['note']}\n" if env.get("note") else ""),
        (f"Latency tables re-measured on {env['latency_rerun']} (`--latency-only`).\n" if env.get("latency_rerun") else ""),
        "Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v) + ".\n",
        "## Targets (issues #6 and #16)\n",
        _table(["target", "measured", "goal", "status"],
               [[t["target"], t["measured"], t["goal"], t["status"]] for t in result.get("targets", [])]),
        _startup_section(result.get("startup", {})),
        "## Fold time and peak memory (whole processes)\n",
        "Each row: median wall time of a fresh process (start-up, load, work, save), that time over bnfold's "
        "(above 1: slower than bnfold), the median peak RSS and that over the model's size on disk. "
        "*BN left*: BatchNormalization nodes in the tool's output.\n",
    ]
    for model, entry in result["models"].items():
        parts.append(_fold_section(model, entry))
    parts.append(_onnx_ir_section(result))
    parts.append(_latency_section(result))
    parts.append(_torch_section(result.get("torch_eager")))
    return "\n".join(p for p in parts if p)


def _startup_section(startup: Dict[str, Any]) -> str:
    rows = [[label, f"{e['median_s']:.2f}", f"{e['peak_rss_mb']:.0f}",
             f"{e['per_round_ratio_to_ort_basic']:.2f}" if "per_round_ratio_to_ort_basic" in e else ""]
            for label, e in startup.items() if "median_s" in e]
    if not rows:
        return ""
    return ("## Start-up\n\nWhole processes, round-robin; *÷ ort_basic*: median over rounds of bnfold's time "
            "over onnxruntime's offline basic optimization of the same sample model in that round.\n\n"
            + _table(["process", "median s", "peak RSS MB", "÷ ort_basic"], rows))


def _fold_section(model: str, entry: Dict[str, Any]) -> str:
    fold = entry["fold"]
    base = fold.get("bnfold", {}).get("median_s")
    size = entry["file_mb"]
    counts = entry["input_counts"]
    rows = []
    for tool, e in fold.items():
        label = TOOL_LABELS.get(tool, tool)
        if "skipped" in e:
            rows.append([label, "—", "—", "—", "—", "—", "—", f"skipped: {e['skipped']}"])
        elif "error" in e or "median_s" not in e:
            rows.append([label, "—", "—", "—", "—", "—", "—", f"failed: {e.get('error', 'no successful run')}"])
        else:
            ratio = f"{e['median_s'] / base:.2f}" if base else "—"
            rows.append([label, f"{e['median_s']:.2f}", ratio, f"{e['peak_rss_mb']:.0f}", f"{e['peak_rss_mb'] / size:.2f}",
                         str(e.get("bn_left", "?")), str(e.get("nodes_out", "?")), f"{len(e['runs'])} runs"])
    head = (f"### {model}: {size:.1f} MB, {counts['nodes']:,} nodes, {counts['bn']:,} BatchNormalization"
            f"{' (external data)' if model == 'xl_external' else ''}\n\n")
    return head + _table(["tool", "median s", "× bnfold", "peak RSS MB", "RSS ÷ size", "BN left", "nodes out", "note"], rows)


def _onnx_ir_section(result: Dict[str, Any]) -> str:
    rows = []
    for model, entry in result["models"].items():
        pb, ir = entry["fold"].get("floor", {}), entry["fold"].get("onnx_ir", {})
        if "median_s" in pb and "median_s" in ir:
            rows.append([model, f"{entry['file_mb']:.0f}", f"{pb['median_s']:.2f}", f"{ir['median_s']:.2f}",
                         f"{ir['median_s'] / pb['median_s']:.2f}", f"{pb['peak_rss_mb']:.0f}", f"{ir['peak_rss_mb']:.0f}",
                         f"{ir['peak_rss_mb'] / pb['peak_rss_mb']:.2f}"])
    if not rows:
        return ""
    return ("## onnx-ir vs raw protobuf (load + save round trip, whole process)\n\n"
            + _table(["model", "MB", "protobuf s", "onnx-ir s", "time ratio", "protobuf RSS MB", "onnx-ir RSS MB", "RSS ratio"], rows))


def _latency_section(result: Dict[str, Any]) -> str:
    rows = []
    threads = "ORT's default"
    for entry in result["models"].values():
        threads = (entry.get("latency") or {}).get("threads", threads)
    for model, entry in result["models"].items():
        lat = entry.get("latency")
        if not lat:
            continue
        if "error" in lat:
            rows.append([model] + ["—"] * 8 + [f"failed: {lat['error']}"])
            continue
        m = {k: v["median_ms"] for k, v in lat.items() if isinstance(v, dict)}
        rows.append([model] + [f"{m[k]:.1f}" for k in ("original@disable", "original@basic", "original@all", "folded@disable", "folded@all")]
                    + [f"{m['folded@disable'] / m['original@disable']:.3f}", f"{m['folded@disable'] / m['original@basic']:.3f}",
                       f"{m['folded@all'] / m['original@all']:.3f}", f"{lat['original@disable']['runs']} runs"])
    if not rows:
        return ""
    return ("## onnxruntime CPU latency (ms, median; batch 1)\n\n"
            "Original and bnfold's output, each at ORT optimization levels disable / basic / all, timed round-robin in one "
            f"process, {threads} intra-op thread(s) (0: ORT's default). Ratios below 1: the folded model is faster.\n\n"
            + _table(["model", "orig disable", "orig basic", "orig all", "folded disable", "folded all",
                      "folded disable ÷ orig disable", "folded disable ÷ orig basic", "folded all ÷ orig all", "note"], rows))


def _torch_section(torch: Optional[Dict[str, Any]]) -> str:
    if torch is None:
        return ""
    if "skipped" in torch or "error" in torch:
        return f"## PyTorch eager latency\n\n{torch.get('skipped') or 'failed: ' + torch['error']}\n"
    med = torch.get("median_ms", {})
    settings = torch.get("args", {})
    rows = [["original", f"{med.get('original', float('nan')):.1f}"], ["folded", f"{med.get('folded', float('nan')):.1f}"],
            ["folded ÷ original", f"{torch.get('ratio', float('nan')):.3f}"]]
    return ("## PyTorch eager latency (benchmarks/bench_torch_eager.py, ResNet-50-sized)\n\n"
            f"Input {settings.get('batch', '?')}x3x{settings.get('size', '?')}x{settings.get('size', '?')}, "
            f"{settings.get('rounds', '?')} interleaved rounds, {torch.get('threads', '?')} threads, torch {torch.get('torch', '?')}; "
            f"{torch.get('folded', '?')} BatchNorms folded; output check {'passed' if torch.get('check_passed') else 'FAILED'}.\n\n"
            + _table(["model", "median ms"], rows))

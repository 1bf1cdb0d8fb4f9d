"""onnxruntime CPU latency of an original and a folded model: ``python benchmarks/latency.py ORIG FOLDED``.

Prints one JSON object: the median, min and p90 latency in milliseconds of each
(model, optimization level) configuration below, and the run count.

Method. Every configuration gets its own session (created up front), is warmed up, then the
timed runs go round-robin over the configurations, so drift in clock speed, caches or
background load hits all of them alike. Inputs are seeded random float32 of the declared shape
(dynamic dims set to 1). ORT runs one intra-op thread by default (``--threads``): on a small
shared machine a multi-threaded pool is descheduled by other work and medians swing by 10-20 %,
while one thread gives steady ratios (measured: MobileNetV2 at 2 threads under load showed the
folded model 13 % slower than the original at ``basic``; pinned to one thread, 27.0 vs 26.9 ms).

Configurations: the original at ``disable``, ``basic`` and ``all`` (ORT fuses Conv+BN itself at
``basic`` and above), the folded model at ``disable`` and ``all``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Dict, List

import numpy as np

CONFIGS = (("original", "disable"), ("original", "basic"), ("original", "all"), ("folded", "disable"), ("folded", "all"))


def _session(path: str, level: str, threads: int):
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[level]
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _feeds(session, seed: int) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
        feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def measure(paths: Dict[str, str], runs: int, warmup: int, threads: int = 1, seed: int = 0) -> Dict[str, Dict[str, float]]:
    """Latency statistics (ms) per ``"model@level"`` key; ``paths`` maps original/folded to files."""
    sessions = {f"{model}@{level}": _session(paths[model], level, threads) for model, level in CONFIGS}
    feeds = _feeds(next(iter(sessions.values())), seed)
    for session in sessions.values():
        for _ in range(warmup):
            session.run(None, feeds)
    times: Dict[str, List[float]] = {key: [] for key in sessions}
    for _ in range(runs):
        for key, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds)
            times[key].append((time.perf_counter() - start) * 1000.0)
    out = {}
    for key, values in times.items():
        values.sort()
        out[key] = {
            "median_ms": statistics.median(values),
            "min_ms": values[0],
            "p90_ms": values[min(len(values) - 1, int(0.9 * len(values)))],
            "runs": len(values),
        }
    return out


def main(argv) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("original")
    parser.add_argument("folded")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (0: ORT's default, all cores)")
    args = parser.parse_args(argv)
    result = measure({"original": args.original, "folded": args.folded}, args.runs, args.warmup, args.threads)
    result["threads"] = args.threads
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Latency measurement with onnxruntime: one model, or two side by side.

Method. A first, untimed session absorbs onnxruntime's one-time setup. Then for each
optimization level, sessions are created several times per model (alternating between the
models; median and spread reported; the last one is kept), both models are warmed up, then
timed runs alternate between the two models in ABBA order (A B, B A, A B, ...) so that drift in
clock speed, caches or background load hits both equally, and neither model always runs first.
Statistics are over the timed runs of each model: median, p90, mean, min, standard deviation,
and throughput = 1 / mean (runs per second).

Every ratio is second / first (OTHER / MODEL): below 1 means the second model is faster or
smaller. Besides the ratio of medians, each level gives the spread of the per-pair ratios (the
second model's time over the first's in the same ABBA pair): p25, median, p75. A model
benchmarked against itself gives ratios within a few percent of 1.00.

Both ``disable`` and ``all`` are measured by default because onnxruntime fuses Conv+BN itself
at the ``basic`` level and above: the ``disable`` numbers show what folding saves, the ``all``
numbers what a user of ORT's default settings actually gains.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .errors import InputError
from .verify import OPT_LEVELS, InputInfo, ModelLike, OrtRunner, dims_text, load_proto, make_feeds, model_label, ort_version, read_interface

DEFAULT_WARMUP = 5
DEFAULT_RUNS = 50
DEFAULT_SESSIONS = 5  # session creations timed per model and level
# second / first; only robust statistics: on a busy machine one stalled run moves a mean or a
# p90 ratio far from 1 even for a model timed against itself, a median hardly
RATIO_KEYS = ("median_ms", "create_ms")


@dataclass
class LevelTiming:
    """Timings of one model at one optimization level; times in milliseconds."""

    create_ms: float  # median over the sessions created
    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    std_ms: float
    throughput_per_s: float
    runs: int
    create_min_ms: float = 0.0
    create_max_ms: float = 0.0
    create_runs: int = 1


@dataclass
class ModelBench:
    label: str
    file_size: int  # bytes, external data included
    levels: Dict[str, LevelTiming] = field(default_factory=dict)


@dataclass
class BenchResult:
    """Timings for one or two models; ``ratios[level]`` compares other / model."""

    models: List[ModelBench]
    levels: List[str]
    settings: Dict[str, Any]
    inputs: List[InputInfo]
    notes: List[str] = field(default_factory=list)
    # level -> (p25, median, p75) of the per-pair ratios second / first
    pair_ratios: Dict[str, Tuple[float, float, float]] = field(default_factory=dict)

    @property
    def ratios(self) -> Dict[str, Any]:
        """Second / first for file size and, per level, each time statistic and the per-pair
        spread (``pair_p25``, ``pair_median``, ``pair_p75``): below 1 means the second is faster."""
        if len(self.models) < 2:
            return {}
        a, b = self.models
        out: Dict[str, Any] = {"file_size": _ratio(b.file_size, a.file_size)}
        for level in self.levels:
            ta, tb = a.levels[level], b.levels[level]
            out[level] = {key: _ratio(getattr(tb, key), getattr(ta, key)) for key in RATIO_KEYS}
            if level in self.pair_ratios:
                out[level].update(zip(("pair_p25", "pair_median", "pair_p75"), self.pair_ratios[level]))
        return out

    def level_ratio(self, model_index: int, level: str, base: str = "disable") -> Optional[float]:
        """Median at ``level`` over median at ``base`` for one model (None if either is missing)."""
        levels = self.models[model_index].levels
        if level not in levels or base not in levels:
            return None
        return _ratio(levels[level].median_ms, levels[base].median_ms)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "models": [
                {"label": m.label, "file_size": m.file_size, "levels": {k: asdict(v) for k, v in m.levels.items()}}
                for m in self.models
            ],
            "levels": list(self.levels),
            "ratios": self.ratios,
            "settings": dict(self.settings),
            "inputs": [asdict(i) for i in self.inputs],
            "notes": list(self.notes),
        }

    @property
    def labels(self) -> List[str]:
        """Short names for the table: file names, with as much of the path as tells them apart."""
        return short_labels([m.label for m in self.models])

    def summary(self) -> str:
        s = self.settings
        lines = [
            f"onnxruntime {s['onnxruntime']}, {', '.join(s['providers_used'])}, intra-op threads: {s['threads'] or 'default'}, "
            f"{s['warmup']} warm-up + {s['runs']} timed runs per model and level"
            + (", interleaved ABBA" if len(self.models) > 1 else "")
            + f"; {s.get('sessions', 1)} session creation(s) timed",
            "inputs: " + ", ".join(f"{i.name} {i.dtype} [{dims_text(i.shape)}]" for i in self.inputs),
        ]
        two = len(self.models) > 1
        labels = self.labels
        width = max(12, *(len(x) for x in labels)) + 2
        header = f"{'':22}" + "".join(f"{x:>{width}}" for x in labels) + (f"{'second/first':>14}" if two else "")
        if two:
            lines.append(f"first: {self.models[0].label}; second: {self.models[1].label}")
        lines.append(header)
        ratios = self.ratios
        lines.append(_row("file size", [_size(m.file_size) for m in self.models], ratios.get("file_size"), width))
        for level in self.levels:
            lines.append(f"level {level}")
            r = ratios.get(level, {})
            t = [m.levels[level] for m in self.models]
            lines.append(_row("  session creation", [f"{x.create_ms:.1f} ms" for x in t], r.get("create_ms"), width))
            if any(x.create_runs > 1 for x in t):
                lines.append(_row("    min-max", [f"{x.create_min_ms:.1f}-{x.create_max_ms:.1f}" for x in t], None, width))
            lines.append(_row("  median", [f"{x.median_ms:.3f} ms" for x in t], r.get("median_ms"), width))
            lines.append(_row("  p90", [f"{x.p90_ms:.3f} ms" for x in t], None, width))  # not a robust ratio
            lines.append(_row("  mean", [f"{x.mean_ms:.3f} ms" for x in t], None, width))
            lines.append(_row("  throughput", [f"{x.throughput_per_s:.1f} /s" for x in t], None, width))
            if level in self.pair_ratios:
                p25, p50, p75 = self.pair_ratios[level]
                lines.append(f"  per-pair ratio second/first: median {p50:.3f}, p25-p75 {p25:.3f}-{p75:.3f}")
        if "disable" in self.levels:
            for level in self.levels:
                if level == "disable":
                    continue
                parts = [f"{labels[i]} {self.level_ratio(i, level):.2f}x" for i in range(len(self.models))]
                lines.append(f"median at '{level}' / at 'disable': " + ", ".join(parts))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def short_labels(paths: Sequence[str]) -> List[str]:
    """The file names, or, where two are the same, the shortest trailing parts of the paths that
    differ (``a/model.onnx`` and ``b/model.onnx``); the same file twice is ``#1`` and ``#2``."""
    names = [os.path.basename(p) or p for p in paths]
    if len(set(names)) == len(names):
        return names
    if len(set(os.path.abspath(p) for p in paths)) < len(paths):
        return [f"{n} #{i + 1}" for i, n in enumerate(names)]
    parts = [os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths]
    for depth in range(2, max(len(p) for p in parts) + 1):
        labels = [os.sep.join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return list(paths)


def _ratio(num: float, den: float) -> Optional[float]:
    return float(num) / float(den) if den else None


def _row(name: str, cells: Sequence[str], ratio: Optional[float], width: int) -> str:
    text = f"{name:22}" + "".join(f"{c:>{width}}" for c in cells)
    if ratio is not None:
        text += f"{ratio:>14.3f}"
    return text


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def model_size(model: ModelLike) -> int:
    """Bytes on disk: the .onnx file plus the external data files its tensors name.

    For a ModelProto, its serialized size.
    """
    if not isinstance(model, (str, os.PathLike)):
        return int(model.ByteSize())
    path = os.fspath(model)
    total = os.path.getsize(path)
    proto = load_proto(path)
    base = os.path.dirname(os.path.abspath(path))
    files = set()
    for tensor in proto.graph.initializer:
        if tensor.data_location == tensor.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location:
                files.add(os.path.normpath(os.path.join(base, location)))
    return total + sum(os.path.getsize(f) for f in files if os.path.isfile(f))


def _percentile(values: List[float], q: float) -> float:
    """Linear-interpolated percentile, as numpy's default."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _timing(create_s: List[float], times_s: List[float]) -> LevelTiming:
    ms = [t * 1e3 for t in times_s]
    mean = statistics.fmean(ms)
    create = [c * 1e3 for c in create_s]
    return LevelTiming(
        create_ms=statistics.median(create),
        create_min_ms=min(create),
        create_max_ms=max(create),
        create_runs=len(create),
        median_ms=statistics.median(ms),
        p90_ms=_percentile(ms, 0.9),
        mean_ms=mean,
        min_ms=min(ms),
        std_ms=statistics.pstdev(ms),
        throughput_per_s=1e3 / mean if mean > 0 else float("inf"),
        runs=len(ms),
    )


def _check_levels(levels: Sequence[str]) -> List[str]:
    out: List[str] = []
    for level in levels:
        if level not in OPT_LEVELS:
            raise InputError(f"unknown optimization level {level!r}; choose from {', '.join(OPT_LEVELS)}")
        if level not in out:
            out.append(level)
    if not out:
        raise InputError("give at least one optimization level")
    return out


def bench(
    model: ModelLike,
    other: Optional[ModelLike] = None,
    *,
    levels: Sequence[str] = ("disable", "all"),
    provider: str = "cpu",
    threads: Optional[int] = None,
    warmup: int = DEFAULT_WARMUP,
    runs: int = DEFAULT_RUNS,
    seed: int = 0,
    shapes=None,
    value_range: Optional[Tuple[float, float]] = None,
    progress: Optional[bool] = None,
    sessions: int = DEFAULT_SESSIONS,
) -> BenchResult:
    """Time ``model`` (and ``other``, interleaved) at each optimization level in ``levels``.

    ``sessions``: how many times each model's session creation is timed per level.

    ``progress``: None shows a progress bar only when stderr is a terminal; True/False force it.
    Raises InputError for bad arguments or models onnxruntime cannot load or run.
    """
    levels = _check_levels(levels)
    if runs < 1 or warmup < 0 or sessions < 1:
        raise InputError("--runs and --sessions must be at least 1 and --warmup at least 0")
    models = [model] + ([other] if other is not None else [])
    feeds_list, infos, notes = _bench_feeds(models, seed, shapes, value_range)
    results = [ModelBench(model_label(m), model_size(m)) for m in models]
    providers_used: List[str] = []
    show = sys.stderr.isatty() if progress is None else bool(progress)
    total = len(levels) * (warmup + runs)
    # ORT's first session in a process pays one-time setup; keep that out of the creation times.
    OrtRunner(models[0], ort_opt=levels[0], provider=provider, threads=threads)
    pair_ratios: Dict[str, Tuple[float, float, float]] = {}
    with _progress(show, total) as bar:
        for level in levels:
            created: List[List[float]] = [[] for _ in models]
            runners: List[Any] = [None] * len(models)
            for _ in range(sessions):  # alternate, so drift hits both models alike
                for i, m in enumerate(models):
                    runners[i] = None  # free the previous session first
                    runners[i] = OrtRunner(m, ort_opt=level, provider=provider, threads=threads, tf32=True)
                    created[i].append(runners[i].create_seconds)
            providers_used = runners[0].providers_used
            times = _time_level(runners, feeds_list, warmup, runs, bar)
            for result, c, t in zip(results, created, times):
                result.levels[level] = _timing(c, t)
            if len(times) == 2:
                pairs = [b / a for a, b in zip(times[0], times[1]) if a > 0]
                if pairs:
                    pair_ratios[level] = (_percentile(pairs, 0.25), _percentile(pairs, 0.5), _percentile(pairs, 0.75))
            del runners  # free one level's sessions before building the next
    settings = {
        "onnxruntime": ort_version(),
        "provider": provider,
        "providers_used": providers_used,
        "threads": threads,
        "warmup": warmup,
        "runs": runs,
        "seed": seed,
        "order": "ABBA interleaved" if len(models) > 1 else "single model",
        "sessions": sessions,
        "ratios": "second / first (below 1: the second is faster or smaller)",
        "tf32": True if provider == "cuda" else None,
        "cpu_count": os.cpu_count(),
    }
    return BenchResult(results, levels, settings, infos, notes, pair_ratios)


def _bench_feeds(models, seed, shapes, value_range):
    """One feed per model: the same arrays when the interfaces agree, else each its own."""
    ifaces = [read_interface(m) for m in models]
    feeds, infos, notes = make_feeds(ifaces[0], seed=seed, shapes=shapes, value_range=value_range)
    feeds_list = [feeds[0]]
    if len(ifaces) > 1:
        same = [(s.name, s.elem_type) for s in ifaces[0].inputs] == [(s.name, s.elem_type) for s in ifaces[1].inputs]
        if same:
            feeds_list.append(feeds[0])
        else:
            other_feeds, _, other_notes = make_feeds(ifaces[1], seed=seed, shapes=shapes, value_range=value_range)
            feeds_list.append(other_feeds[0])
            notes = notes + other_notes + ["the two models have different inputs: each got its own"]
    return feeds_list, infos, notes


def _time_level(runners, feeds_list, warmup: int, runs: int, bar) -> List[List[float]]:
    pairs = list(zip(runners, feeds_list))
    for _ in range(warmup):
        for runner, feed in pairs:
            runner.run(feed)
        bar.update(1)
    times: List[List[float]] = [[] for _ in pairs]
    for i in range(runs):
        order = range(len(pairs)) if i % 2 == 0 else reversed(range(len(pairs)))
        for k in order:
            runner, feed = pairs[k]
            start = time.perf_counter()
            runner.run(feed)
            times[k].append(time.perf_counter() - start)
        bar.update(1)
    return times


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int) -> None:
        pass


def _progress(show: bool, total: int):
    if not show:
        return _NoBar()
    import click

    return click.progressbar(length=total, label="bench", file=sys.stderr)

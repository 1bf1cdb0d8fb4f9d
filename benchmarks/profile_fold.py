"""Where bnfold's fold spends time and memory: ``python benchmarks/profile_fold.py MODEL.onnx``.

Runs ``bnfold MODEL -o OUT --no-check`` in this process under cProfile (or pyinstrument with
``--pyinstrument``), and meanwhile polls the process's RSS every few milliseconds; whenever
the RSS reaches a new high it records the main thread's Python stack, so the report says
which call was running at the memory peak. Prints the top functions by own time and by
cumulative time, the RSS timeline and the stack at the peak.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import threading
import time
import traceback
from typing import List, Tuple


class RssWatcher(threading.Thread):
    """Polls RSS; keeps a coarse timeline and the main thread's stack at the highest RSS."""

    def __init__(self, interval: float = 0.005) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.main_id = threading.main_thread().ident
        self.start_time = time.perf_counter()
        self.peak = 0
        self.peak_stack: List[str] = []
        self.peak_at = 0.0
        self.timeline: List[Tuple[float, int]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        last_logged = -1.0
        while not self.stopped.is_set():
            rss = self.proc.memory_info().rss
            now = time.perf_counter() - self.start_time
            if rss > self.peak:
                self.peak, self.peak_at = rss, now
                frame = sys._current_frames().get(self.main_id)
                if frame is not None:
                    self.peak_stack = traceback.format_stack(frame)[-12:]
            if now - last_logged >= 0.1:
                self.timeline.append((now, rss))
                last_logged = now
            time.sleep(self.interval)


def run_fold(model: str, out: str) -> None:
    from bnfold.cli import main

    try:
        main.main([model, "-o", out, "--no-check"], standalone_mode=False)
    except SystemExit as exc:
        if exc.code:
            raise


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--pyinstrument", action="store_true", help="use pyinstrument instead of cProfile")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(args.model))) as tmp:
        out = os.path.join(tmp, "folded.onnx")
        watcher = RssWatcher()
        base = watcher.proc.memory_info().rss
        watcher.start()
        start = time.perf_counter()
        if args.pyinstrument:
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.001)
            profiler.start()
            run_fold(args.model, out)
            profiler.stop()
        else:
            profiler = cProfile.Profile()
            profiler.runcall(run_fold, args.model, out)
        total = time.perf_counter() - start
        watcher.stopped.set()
        watcher.join()
    size = os.path.getsize(args.model) / 2**20
    print(f"\n== {args.model}: {size:.0f} MiB, fold {total:.2f} s under the profiler; RSS before {base / 2**20:.0f} MiB, "
          f"peak {watcher.peak / 2**20:.0f} MiB at {watcher.peak_at:.2f} s ({watcher.peak / 2**20 / size:.2f}× the file)")
    if args.pyinstrument:
        print(profiler.output_text(unicode=False, color=False, show_all=False))
    else:
        for key in ("tottime", "cumulative"):
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(args.top)
            body = text.getvalue()
            print(f"\n== top {args.top} by {key}\n" + body[body.find("ncalls"):])
    print("== RSS timeline (s, MiB): " + ", ".join(f"{t:.1f}:{r / 2**20:.0f}" for t, r in watcher.timeline[::max(1, len(watcher.timeline) // 30)]))
    print("== main thread at the RSS peak:\n" + "".join(watcher.peak_stack))
    return 0


if __name__ == "__main__":
    sys.exit(main())

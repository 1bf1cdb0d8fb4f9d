"""Where the default check's time goes: ``python benchmarks/check_cost.py MODEL [--runs N]``.

1. Whole processes, interleaved: ``bnfold MODEL -o OUT`` (default check) vs ``--no-check``;
   medians and the ratio of each round's pair.
2. One process, phase by phase, what ``bnfold.verify.check`` does after the fold: import
   onnxruntime; parse each model for its interface (``read_interface``); create each session;
   make inputs; run each; compare. Then the same sessions created and run in two threads at
   once, to show how much of that work overlaps (onnxruntime releases the GIL while it runs;
   the session creation figure says whether it does while it loads).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run  # noqa: E402  (benchmarks/ is not a package)


def whole_processes(model: str, runs: int, env) -> None:
    times = {"check": [], "no-check": []}
    with tempfile.TemporaryDirectory(dir=run.WORK) as tmp:
        out = os.path.join(tmp, "out.onnx")
        for _ in range(runs):
            for mode in times:
                cmd = [sys.executable, "-c", run.BNFOLD_MAIN, model, "-o", out] + (["--no-check"] if mode == "no-check" else [])
                r = run.run_process(cmd, 600, env)
                if r["rc"] != 0:
                    raise SystemExit(f"{mode} failed: {r['stderr']}")
                times[mode].append((r["seconds"], r["peak_rss_mb"]))
                run.remove_output(out)
    med = statistics.median
    c, n = times["check"], times["no-check"]
    print(f"whole process, {runs} rounds: check {med(t for t, _ in c):.2f} s ({med(m for _, m in c):.0f} MB peak), "
          f"--no-check {med(t for t, _ in n):.2f} s ({med(m for _, m in n):.0f} MB peak); "
          f"check / no-check per round: median {med(a[0] / b[0] for a, b in zip(c, n)):.2f}")


def phases(model: str) -> None:
    from bnfold import verify
    from bnfold.pipeline import fold_path

    with tempfile.TemporaryDirectory(dir=run.WORK) as tmp:
        folded = os.path.join(tmp, "folded.onnx")
        t = time.perf_counter()
        fold_path(model, folded, check=False)
        print(f"  fold + write (--no-check work)      {time.perf_counter() - t:6.2f} s")
        steps = []

        def step(label, fn):
            start = time.perf_counter()
            value = fn()
            steps.append((label, time.perf_counter() - start))
            return value

        step("import onnxruntime", verify.runner.import_ort)
        io = step("interface of the original (parse)", lambda: verify.read_interface(model))
        step("interface of the folded (parse)", lambda: verify.read_interface(folded))
        feeds = step("make inputs", lambda: verify.make_feeds(io, seed=0, batches=1)[0])
        ro = step("session: original", lambda: verify.OrtRunner(model, label="o"))
        rf = step("session: folded", lambda: verify.OrtRunner(folded, label="f"))
        eo = step("run: original", lambda: ro.run(feeds[0]))
        ef = step("run: folded", lambda: rf.run(feeds[0]))
        step("compare", lambda: verify.compare_outputs({k: [v] for k, v in eo.items()}, {k: [v] for k, v in ef.items()}))
        total = sum(s for _, s in steps)
        for label, seconds in steps:
            print(f"  {label:36s} {seconds:6.2f} s  {seconds / total:5.1%}")
        print(f"  {'check total':36s} {total:6.2f} s")

        def both(fn_o, fn_f):
            out = {}
            threads = [threading.Thread(target=lambda k=k, f=f: out.__setitem__(k, f())) for k, f in (("o", fn_o), ("f", fn_f))]
            start = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            return time.perf_counter() - start, out

        seconds, made = both(lambda: verify.OrtRunner(model, label="o", threads=1),
                             lambda: verify.OrtRunner(folded, label="f", threads=1))
        print(f"  two sessions created in two threads {seconds:6.2f} s (sequential above: "
              f"{dict(steps)['session: original'] + dict(steps)['session: folded']:.2f} s)")
        seconds, _ = both(lambda: made["o"].run(feeds[0]), lambda: made["f"].run(feeds[0]))
        print(f"  two runs in two threads (1 thread each) {seconds:6.2f} s (sequential above: "
              f"{dict(steps)['run: original'] + dict(steps)['run: folded']:.2f} s)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--bnfold-ref", default="worktree", help="git ref of bnfold for the whole-process runs")
    args = parser.parse_args(argv)
    model = os.path.abspath(args.model)
    os.makedirs(run.WORK, exist_ok=True)
    run.BNFOLD_PATH = run.bnfold_snapshot(args.bnfold_ref)
    whole_processes(model, args.runs, run.tool_env("bnfold"))
    print("phases of the check, in this process:")
    phases(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())

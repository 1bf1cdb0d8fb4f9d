"""Eager CPU latency of convs that folding gives a new bias, on PyTorch's slow bias paths.

For each case, three modules with the same weights are timed, interleaved (rotating order each
round so drift hits all alike), medians reported with ratios to the original:

* ``original``: conv without bias, then BatchNorm (eval);
* ``bias-in-conv``: the folded conv as a stock ``nn.Conv*d`` with the folded bias;
* ``shift-after``: what bnfold returns for these convs: the conv without bias, then ``add_``
  of the folded bias (``ShiftAfterConv*d``).

Each run is timed with the process's CPU time (``--clock cpu``, the default: on a shared machine
wall time mostly measures the other processes) or wall time (``--clock wall``); with one thread
the two agree on a quiet machine.

    python benchmarks/bench_torch_shift.py                  # 1 thread, 40 rounds
    python benchmarks/bench_torch_shift.py --threads 2 --rounds 60 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn as nn

import bnfold
from bnfold.torch_pass._math import to_numpy
from bnfold.verify import compare_outputs

CASES = {
    "dilated 3x3 d2, 64ch 64x64": (lambda: nn.Conv2d(64, 64, 3, padding=2, dilation=2, bias=False), (1, 64, 64, 64)),
    "dilated 3x3 d2, 256ch 32x32": (lambda: nn.Conv2d(256, 256, 3, padding=2, dilation=2, bias=False), (1, 256, 32, 32)),
    "dilated 3x3 d4, 128ch 32x32": (lambda: nn.Conv2d(128, 128, 3, padding=4, dilation=4, bias=False), (1, 128, 32, 32)),
    "depthwise 1x1, 256ch 56x56": (lambda: nn.Conv2d(256, 256, 1, groups=256, bias=False), (1, 256, 56, 56)),
    "depthwise 1x1, 64ch 112x112": (lambda: nn.Conv2d(64, 64, 1, groups=64, bias=False), (1, 64, 112, 112)),
    "control: 3x3, 64ch 56x56": (lambda: nn.Conv2d(64, 64, 3, padding=1, bias=False), (1, 64, 56, 56)),
}


def _bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        bn.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
        bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
        bn.weight.copy_(torch.rand(c, generator=gen) + 0.5)
        bn.bias.copy_(torch.rand(c, generator=gen) - 0.5)
    return bn


def timed(models, x, rounds: int, clock=time.process_time):
    times = [[] for _ in models]
    with torch.no_grad():
        for _ in range(3):
            for m in models:
                m(x)
        for r in range(rounds):
            order = list(range(len(models)))
            order = order[r % len(order):] + order[:r % len(order)]
            for i in order:
                t0 = clock()
                models[i](x)
                times[i].append(clock() - t0)
    return [statistics.median(t) for t in times]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'case':32} {'original':>9} {'bias-in-conv':>13} {'shift-after':>12}   (ms, ratio to original)")
    for name, (make, shape) in CASES.items():
        torch.manual_seed(0)
        conv = make()
        original = nn.Sequential(conv, _bn(conv.out_channels)).eval()
        x = torch.randn(*shape)
        folded, _ = bnfold.fold_module(original, (x,))
        shift = folded[0]
        stock = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          conv.dilation, conv.groups, bias=True).eval()
        stock.load_state_dict(copy.deepcopy(shift.state_dict()))
        with torch.no_grad():
            want = {"y": to_numpy(original(x))}
            for m in (shift, stock):
                verdict = compare_outputs(want, {"y": to_numpy(m(x))})
                assert verdict, verdict.summary()
        t_orig, t_stock, t_shift = timed([original, stock, shift], x, args.rounds, clock)
        row = {"case": name, "shift_class": type(shift).__name__, "original_ms": t_orig * 1e3,
               "bias_in_conv_ms": t_stock * 1e3, "shift_after_ms": t_shift * 1e3,
               "bias_in_conv_ratio": t_stock / t_orig, "shift_after_ratio": t_shift / t_orig}
        rows.append(row)
        print(f"{name:32} {t_orig * 1e3:9.3f} {t_stock * 1e3:8.3f} {t_stock / t_orig:4.2f}x "
              f"{t_shift * 1e3:7.3f} {t_shift / t_orig:4.2f}x  ({type(shift).__name__})", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"torch": torch.__version__, "threads": args.threads, "rounds": args.rounds, "clock": args.clock,
                       "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Eager CPU latency of a ResNet-50-sized model before and after bnfold's PyTorch fold.

The model (defined here, no torchvision) has ResNet-50's layout: a 7x7 stem, bottleneck stages
of [3, 4, 6, 3] blocks with widths 64/128/256/512 (x4 expansion), 53 BatchNorms, a 1000-way
classifier. BN statistics are randomized so the fold is not trivial. Before timing, the folded
module's outputs are checked against the original (bnfold's tolerance rule).

Timing: warm-up runs of both, then rounds that run the two models in alternating order
(A B, then B A, ...) so drift (thermal, other load) hits both alike; each run is timed with
perf_counter; the medians and their ratio are reported.

    python benchmarks/bench_torch_eager.py                   # 224x224, batch 1, 30 rounds
    python benchmarks/bench_torch_eager.py --size 160 --rounds 20 --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import bnfold
from bnfold.torch_pass._math import to_numpy
from bnfold.verify import compare_outputs


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResNet50Like(nn.Module):
    def __init__(self, blocks=(3, 4, 6, 3), classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for i, n in enumerate(blocks):
            width = 64 * 2**i
            for j in range(n):
                layers.append(Bottleneck(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width * 4
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def randomize_bns(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)


def timed(model: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224, help="input height and width")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=30, help="timed runs of each model")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = ResNet50Like().eval()
    randomize_bns(model, args.seed)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(args.seed + 1))

    folded, report = bnfold.fold_module(model, (x,))
    print(report.summary())
    with torch.no_grad():
        verdict = compare_outputs({"logits": to_numpy(model(x))}, {"logits": to_numpy(folded(x))})
    print(f"check: {'PASS' if verdict else 'FAIL'} (max abs {verdict.outputs[0].max_abs_err:.3g})")

    pair = {"original": model, "folded": folded}
    times = {"original": [], "folded": []}
    with torch.inference_mode():
        for _ in range(args.warmup):
            for m in pair.values():
                m(x)
        for r in range(args.rounds):
            order = ("original", "folded") if r % 2 == 0 else ("folded", "original")
            for name in order:
                times[name].append(timed(pair[name], x))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["folded"] / med["original"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"input {args.batch}x3x{args.size}x{args.size}, {args.rounds} interleaved rounds")
    for k in ("original", "folded"):
        q = sorted(times[k])
        print(f"  {k:8s}  median {med[k] * 1e3:8.2f} ms   min {q[0] * 1e3:8.2f}   max {q[-1] * 1e3:8.2f}")
    best = min(times["folded"]) / min(times["original"])
    print(f"  folded / original = {ratio:.3f} of the medians (speed-up {1 / ratio:.2f}x); {best:.3f} of the minima")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "median_ms": {k: v * 1e3 for k, v in med.items()}, "ratio": ratio, "min_ratio": best,
                       "times_ms": {k: [t * 1e3 for t in v] for k, v in times.items()},
                       "folded": report.n_folded, "check_passed": bool(verdict), "torch": torch.__version__,
                       "threads": torch.get_num_threads()}, f, indent=2)


if __name__ == "__main__":
    main()

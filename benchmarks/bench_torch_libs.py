"""BatchNorms left by bnfold's PyTorch path vs its ONNX path, on models from real libraries.

Needs timm, ultralytics, segmentation-models-pytorch and MONAI (not bnfold dependencies): run it
in a venv that has them, with this checkout on PYTHONPATH. Every model is built with random
weights (``pretrained=False`` / ``encoder_weights=None`` / a YAML config): nothing downloads.
BN statistics and affine parameters are randomized (seeded), so a wrong fold shows.

Per model:

* ``bns``: BatchNorms in the model (BN modules, plus batch-norm calls outside them);
* ``left_torch``: BNs ``bnfold.fold(model, example_inputs=(x,))`` leaves, and its outputs
  checked against the original (bnfold's float32 rule);
* ``left_onnx``: BNs ``bnfold.fold_onnx`` leaves in the model exported by
  ``torch.onnx.export(..., training=TrainingMode.PRESERVE)`` (BNs kept as BatchNormalization
  nodes), its outputs under onnxruntime (optimizations off) checked against the original;
* eager CPU latency, original vs folded, interleaved rounds (A B, B A, ...), medians, ratio;
  timed with the process's CPU time by default (``--clock cpu``: on a shared machine wall time
  mostly measures the other processes; with one thread the two agree on a quiet machine).

    python benchmarks/bench_torch_libs.py                       # every model
    python benchmarks/bench_torch_libs.py --models timm_resnet18 smp_unet --rounds 10
    python benchmarks/bench_torch_libs.py --json out.json --no-latency
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn

import bnfold
from bnfold.torch_pass._math import to_numpy
from bnfold.verify import compare_outputs, run_onnx


def _timm(name: str, size: int = 128) -> Callable[[], Tuple[nn.Module, torch.Tensor]]:
    def build():
        import timm

        return timm.create_model(name, pretrained=False), torch.randn(1, 3, size, size)

    return build


def _yolo(cfg: str) -> Callable[[], Tuple[nn.Module, torch.Tensor]]:
    def build():
        from ultralytics.nn.tasks import DetectionModel

        return DetectionModel(cfg, verbose=False), torch.randn(1, 3, 160, 160)

    return build


def _smp(arch: str, encoder: str) -> Callable[[], Tuple[nn.Module, torch.Tensor]]:
    def build():
        import segmentation_models_pytorch as smp

        model = getattr(smp, arch)(encoder_name=encoder, encoder_weights=None, classes=3)
        return model, torch.randn(1, 3, 128, 128)

    return build


def _monai_unet():
    from monai.networks.nets import UNet

    model = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32, 64), strides=(2, 2, 2),
                 num_res_units=2, norm="batch")
    return model, torch.randn(1, 1, 32, 32, 32)


def _monai_densenet():
    from monai.networks.nets import DenseNet121

    return DenseNet121(spatial_dims=3, in_channels=1, out_channels=2), torch.randn(1, 1, 32, 32, 32)


MODELS: Dict[str, Callable[[], Tuple[nn.Module, torch.Tensor]]] = {
    "timm_efficientnet_b0": _timm("efficientnet_b0"),
    "timm_mobilenetv3_large_100": _timm("mobilenetv3_large_100"),
    "timm_regnety_002": _timm("regnety_002"),
    "timm_densenet121": _timm("densenet121"),
    "timm_repvgg_a0": _timm("repvgg_a0"),
    "timm_resnet18": _timm("resnet18"),
    "timm_mixnet_s": _timm("mixnet_s"),
    "timm_rexnet_100": _timm("rexnet_100"),
    "timm_repvit_m0_9": _timm("repvit_m0_9"),
    "yolov8n": _yolo("yolov8n.yaml"),
    "yolo11n": _yolo("yolo11n.yaml"),
    "smp_unet_resnet34": _smp("Unet", "resnet34"),
    "smp_deeplabv3plus_resnet34": _smp("DeepLabV3Plus", "resnet34"),
    "smp_fpn_timm_mobilenetv3": _smp("FPN", "tu-mobilenetv3_large_100"),
    "smp_deeplabv3plus_timm_mobilenetv3": _smp("DeepLabV3Plus", "tu-mobilenetv3_large_100"),
    "monai_unet3d": _monai_unet,
    "monai_densenet121_3d": _monai_densenet,
}


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
                    m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                    m.bias.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
    return model


def count_bns(model: nn.Module, x: torch.Tensor) -> int:
    """BN modules, plus batch-norm calls made outside any BN module (seen by forward hooks)."""
    import torch.nn.functional as F

    modules = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    inside = [0]
    outside = [0]
    original = F.batch_norm

    def watched(*args, **kwargs):
        outside[0] += inside[0] == 0
        return original(*args, **kwargs)

    handles = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            handles.append(m.register_forward_pre_hook(lambda *a: inside.__setitem__(0, inside[0] + 1)))
            handles.append(m.register_forward_hook(lambda *a: inside.__setitem__(0, inside[0] - 1)))
    F.batch_norm = watched
    try:
        with torch.no_grad():
            model(x)
    finally:
        F.batch_norm = original
        for h in handles:
            h.remove()
    return modules + outside[0]


def leaves(result) -> Dict[str, "object"]:
    from torch.utils._pytree import tree_flatten

    return {f"output_{i}": to_numpy(v) for i, v in enumerate(v for v in tree_flatten(result)[0] if isinstance(v, torch.Tensor))}


def onnx_path(model: nn.Module, x: torch.Tensor, expected: dict) -> Tuple[int, int, bool, str]:
    """(BNs in the exported file, BNs bnfold leaves there, ORT output check, reasons)."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), path, training=torch.onnx.TrainingMode.PRESERVE, dynamo=False,
                              opset_version=17, input_names=["x"],
                              output_names=[f"output_{i}" for i in range(len(expected))])
        exported = onnx.load(path)
        n_bn = sum(n.op_type == "BatchNormalization" for n in exported.graph.node)
        folded, report = bnfold.fold_onnx(exported)
        actual = run_onnx(folded, {"x": x.numpy()}, ort_opt="disable")
    ok = bool(compare_outputs(expected, actual))
    return n_bn, report.n_skipped, ok, json.dumps(report.reason_counts())


def latency(a: nn.Module, b: nn.Module, x: torch.Tensor, rounds: int, clock=time.process_time) -> Tuple[float, float]:
    ta, tb = [], []
    with torch.no_grad():
        for _ in range(3):
            a(x)
            b(x)
        for r in range(rounds):
            order = [(a, ta), (b, tb)] if r % 2 == 0 else [(b, tb), (a, ta)]
            for model, times in order:
                t0 = clock()
                model(x)
                times.append(clock() - t0)
    return statistics.median(ta), statistics.median(tb)


def run_one(name: str, rounds: int, clock=time.process_time) -> dict:
    torch.manual_seed(0)
    model, x = MODELS[name]()
    model = randomize(model).eval()
    with torch.no_grad():
        expected = leaves(model(x))
    bns = count_bns(model, x)
    folded, report = bnfold.fold(model, example_inputs=(x,))
    with torch.no_grad():
        torch_ok = bool(compare_outputs(expected, leaves(folded(x))))
    row = {
        "model": name, "bns": bns, "left_torch": report.n_skipped, "torch_method": report.method,
        "torch_check": torch_ok, "torch_reasons": report.reason_counts(),
        "fold_methods": _tally(report.extra.get("fold_methods", {})), "fold_seconds": round(report.seconds, 2),
        "result_class": type(folded).__name__,
    }
    try:
        row["onnx_bns"], row["left_onnx"], row["onnx_check"], row["onnx_reasons"] = onnx_path(model, x, expected)
    except Exception as exc:  # an exporter failure is reported, not fatal
        row["onnx_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    if rounds:
        orig, fold = latency(model, folded, x, rounds, clock)
        row.update(orig_ms=round(orig * 1e3, 2), folded_ms=round(fold * 1e3, 2), ratio=round(fold / orig, 3))
    return row


def _tally(methods: dict) -> dict:
    out: Dict[str, int] = {}
    for m in methods.values():
        out[m] = out.get(m, 0) + 1
    return out


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    rows = []
    header = f"{'model':30} {'BNs':>4} {'torch':>5} {'onnx':>5}  check  {'orig ms':>8} {'fold ms':>8} {'ratio':>6}  methods"
    print(header)
    for name in args.models:
        try:
            row = run_one(name, 0 if args.no_latency else args.rounds, clock)
        except Exception as exc:
            row = {"model": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
            print(f"{name:30} ERROR {row['error']}", flush=True)
            rows.append(row)
            continue
        rows.append(row)
        check = "ok" if row["torch_check"] and row.get("onnx_check", True) else "FAIL"
        print(f"{name:30} {row['bns']:>4} {row['left_torch']:>5} {row.get('left_onnx', '-'):>5}  {check:5}  "
              f"{row.get('orig_ms', '-'):>8} {row.get('folded_ms', '-'):>8} {row.get('ratio', '-'):>6}  "
              f"{row['fold_methods']} {row['torch_reasons'] or ''} {row.get('onnx_error', '')}", flush=True)
    if args.json:
        meta = {"torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
                "rounds": args.rounds, "clock": args.clock, "machine": platform.machine()}
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    bad = [r["model"] for r in rows if "error" in r or not r.get("torch_check") or r.get("onnx_check") is False]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

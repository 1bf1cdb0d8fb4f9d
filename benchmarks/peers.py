"""The reference tools, each as one whole process: ``python benchmarks/peers.py TOOL IN OUT``.

The harness times each tool as a fresh process (start-up, imports, load, work, save), exactly
as a user runs it, and reads the process's peak RSS from the kernel. Tools:

- ``floor``: ``onnx.load`` + ``onnx.save``, the plain protobuf round trip any tool pays for.
- ``onnx_ir``: ``onnx_ir.load`` + ``onnx_ir.save``, the same round trip through onnx-ir.
- ``ort_basic``: onnxruntime's offline optimization at the basic level (which fuses Conv+BN),
  writing the optimized model with ``optimized_model_filepath``.
- ``onnxoptimizer``: ``onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])`` + save.
- ``proto_floor``: the same round trip with bnfold's own message classes (``bnfold.onnx_proto``):
  parse and serialize, without ``import onnx`` (inline weights only).

onnxslim and onnxsim run through their own command lines (see ``run.py``), not from here.
With ``--external`` (a model stored with external data) the output is written with external data
too, so no tool hits the 2 GiB protobuf limit.
"""

from __future__ import annotations

import os
import sys


def _save(model, dst: str, external: bool) -> None:
    import onnx

    if external:
        onnx.save(model, dst, save_as_external_data=True, all_tensors_to_one_file=True,
                  location=os.path.basename(dst) + ".data")
    else:
        onnx.save(model, dst)


def floor(src: str, dst: str, external: bool) -> None:
    import onnx

    _save(onnx.load(src), dst, external)


def proto_floor(src: str, dst: str, external: bool) -> None:
    from bnfold.onnx_proto import ModelProto

    if external:
        raise SystemExit("proto_floor: inline weights only")
    with open(src, "rb") as f:
        model = ModelProto.FromString(f.read())
    with open(dst, "wb") as f:
        f.write(model.SerializeToString())


def onnx_ir(src: str, dst: str, external: bool) -> None:
    import onnx_ir as ir

    model = ir.load(src)
    if external:
        ir.save(model, dst, external_data=os.path.basename(dst) + ".data")
    else:
        ir.save(model, dst)


def ort_basic(src: str, dst: str, external: bool) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = dst
    if external:
        # a model over 2 GiB can only be written with its initializers in a side file
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         os.path.basename(dst) + ".data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(src, options, providers=["CPUExecutionProvider"])


def onnxoptimizer(src: str, dst: str, external: bool) -> None:
    import onnx
    import onnxoptimizer as opt

    _save(opt.optimize(onnx.load(src), ["fuse_bn_into_conv"]), dst, external)


TOOLS = {"floor": floor, "proto_floor": proto_floor, "onnx_ir": onnx_ir, "ort_basic": ort_basic, "onnxoptimizer": onnxoptimizer}


def main(argv) -> int:
    external = "--external" in argv
    argv = [a for a in argv if a != "--external"]
    if len(argv) != 3 or argv[0] not in TOOLS:
        print(f"usage: python benchmarks/peers.py {{{','.join(TOOLS)}}} IN OUT [--external]", file=sys.stderr)
        return 2
    TOOLS[argv[0]](argv[1], argv[2], external)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

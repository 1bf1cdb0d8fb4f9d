"""In-process fuzzing of ``fold_onnx``: mutated sample models straight into the Python API.

Each case takes a seed model (``sample_models/*.onnx`` and the small models of test_fuzz.py)
and applies 1-4 mutations drawn from a seeded ``random.Random``:

- bytes: bit flips, byte sets, truncations, deletions, insertions, duplications;
- protobuf fields: op types, inputs renamed to other values (cycles, forward reads), outputs
  renamed or dropped (SSA breaks), attributes added/retyped/dropped, tensors' types, dims and
  data, value_info dims and types, node order, opset and IR version;
- splices: nodes and initializers of one seed model transplanted into another.

Half the cases go in as a ModelProto, half as a file path. Any exception other than bnfold's
own (:class:`bnfold.errors.BnfoldError`) fails the test, and so does a case running longer
than ``CASE_SECONDS`` (a hang), caught with SIGALRM.

CI runs ``BNFOLD_FUZZ_EXAMPLES`` cases (default 300, about 10-30 s), the same ones every run;
setting it runs that many fresh random cases. Run this file as a script for a long campaign
that keeps going past failures and reports every distinct crash::

    python tests/test_fuzz_inprocess.py 20000 [--save DIR]
"""

from __future__ import annotations

import os
import random
import signal
import sys
import tempfile
import traceback
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import onnx
import pytest
from onnx import AttributeProto, TensorProto, helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bnfold.errors import BnfoldError  # noqa: E402
from bnfold.onnx_pass import fold_onnx  # noqa: E402
from test_fuzz import SEEDS  # noqa: E402  (sample models and two small conv/gemm models)

CASE_SECONDS = 20.0  # generous on a loaded 2-core machine; a normal case takes milliseconds
FRESH = "BNFOLD_FUZZ_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("BNFOLD_FUZZ_EXAMPLES", "300"))

RULE_OPS = [
    "Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "Mul", "Add", "Sub", "Div",
    "Identity", "Dropout", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Cast",
    "Constant", "Expand", "ConstantOfShape", "Relu", "If",
]
ATTR_NAMES = [
    "group", "transA", "transB", "alpha", "beta", "epsilon", "momentum", "training_mode", "spatial",
    "is_test", "axis", "axes", "perm", "pads", "strides", "dilations", "kernel_shape", "auto_pad",
    "allowzero", "to", "value", "output_padding", "output_shape",
]
ODD_INTS = [-(2**63), -(2**31), -3, -1, 0, 1, 2, 3, 7, 2**31, 2**62]
ODD_FLOATS = [float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 5e-324, 1e-45, 1e38, 3.0]


class Hang(BaseException):
    """Raised by the alarm: a BaseException, so bnfold's ``except Exception`` cannot swallow it."""


@contextmanager
def time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise Hang(f"no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------- mutations


def _names(model: onnx.ModelProto) -> List[str]:
    g = model.graph
    names = [i.name for i in g.input] + [t.name for t in g.initializer]
    names += [o for n in g.node for o in n.output]
    return names or ["x"]


def _random_attribute(rng: random.Random, name: str) -> AttributeProto:
    kind = rng.choice(["int", "float", "ints", "floats", "string", "tensor", "undefined", "empty_ints"])
    if kind == "int":
        return helper.make_attribute(name, rng.choice(ODD_INTS))
    if kind == "float":
        return helper.make_attribute(name, rng.choice(ODD_FLOATS))
    if kind == "ints":
        return helper.make_attribute(name, [rng.choice(ODD_INTS) for _ in range(rng.randint(1, 5))])
    if kind == "floats":
        return helper.make_attribute(name, [rng.choice(ODD_FLOATS) for _ in range(rng.randint(1, 3))])
    if kind == "string":
        return helper.make_attribute(name, rng.choice(["SAME_UPPER", "VALID", "NOTSET", "", "nonsense"]))
    if kind == "tensor":
        return helper.make_attribute(name, _random_tensor(rng, name))
    a = AttributeProto()
    a.name = name
    if kind == "empty_ints":
        a.type = AttributeProto.INTS
    return a


def _random_tensor(rng: random.Random, name: str) -> TensorProto:
    shape = rng.choice([(), (1,), (3,), (4,), (2, 2), (1, 4, 1, 1), (0,)])
    dtype = rng.choice([np.float32, np.float64, np.float16, np.int64, np.int32])
    values = np.array([rng.choice(ODD_FLOATS + [1.0, 2.0, 0.5]) for _ in range(int(np.prod(shape)))])
    with np.errstate(all="ignore"):
        if np.dtype(dtype).kind == "i":
            values = np.nan_to_num(values, nan=0, posinf=2, neginf=-2).clip(-8, 8)
        return onnx.numpy_helper.from_array(values.astype(dtype).reshape(shape), name)


def mutate_tensor(rng: random.Random, t: TensorProto) -> None:
    kind = rng.choice(["dtype", "dims", "raw_cut", "raw_grow", "replace", "scalar", "two_d", "typed"])
    if kind == "dtype":
        t.data_type = rng.choice([0, 1, 2, 6, 7, 9, 10, 11, 16, 21, 24, 28, 30, 73])
    elif kind == "dims":
        del t.dims[:]
        t.dims.extend(rng.choice([[], [0], [1], [-1], [2**40], [4, 1], [1, 4], [2, 2, 1]]))
    elif kind == "raw_cut":
        t.raw_data = t.raw_data[: rng.randint(0, max(0, len(t.raw_data) - 1))]
    elif kind == "raw_grow":
        t.raw_data = t.raw_data + bytes(rng.randint(1, 32))
    elif kind == "replace":
        t.CopyFrom(_random_tensor(rng, t.name))
    elif kind == "scalar":
        del t.dims[:]
        t.raw_data = t.raw_data[: 4 if t.data_type == TensorProto.FLOAT else 8]
    elif kind == "two_d" and t.dims:
        n = int(np.prod(t.dims))
        del t.dims[:]
        t.dims.extend([1, n] if rng.random() < 0.5 else [n, 1])
    else:
        t.ClearField("raw_data")
        t.float_data.extend(rng.choice(ODD_FLOATS) for _ in range(rng.randint(0, 6)))


def mutate_node(rng: random.Random, model: onnx.ModelProto, node: onnx.NodeProto) -> None:
    names = _names(model)
    kind = rng.choice(["op", "input_other", "input_drop", "input_add", "output_rename", "output_drop",
                       "attr_set", "attr_drop", "domain", "attr_tensor"])
    if kind == "op":
        node.op_type = rng.choice(RULE_OPS)
    elif kind == "input_other" and node.input:
        node.input[rng.randrange(len(node.input))] = rng.choice(names + [""])
    elif kind == "input_drop" and node.input:
        del node.input[rng.randrange(len(node.input))]
    elif kind == "input_add":
        node.input.append(rng.choice(names + ["", "nowhere"]))
    elif kind == "output_rename" and node.output:
        node.output[rng.randrange(len(node.output))] = rng.choice(names + ["", "fresh"])
    elif kind == "output_drop" and node.output:
        del node.output[rng.randrange(len(node.output)):]
    elif kind in ("attr_set", "attr_tensor"):
        name = rng.choice(ATTR_NAMES)
        for i, a in enumerate(node.attribute):
            if a.name == name:
                del node.attribute[i]
                break
        attr = _random_attribute(rng, name) if kind == "attr_set" else helper.make_attribute(name, _random_tensor(rng, name))
        node.attribute.append(attr)
    elif kind == "attr_drop" and node.attribute:
        del node.attribute[rng.randrange(len(node.attribute))]
    elif kind == "domain":
        node.domain = rng.choice(["com.microsoft", "ai.onnx", "x", ""])


def mutate_value_info(rng: random.Random, vi: onnx.ValueInfoProto) -> None:
    tt = vi.type.tensor_type
    kind = rng.choice(["dim", "elem", "noshape", "rank"])
    if kind == "dim" and tt.shape.dim:
        d = tt.shape.dim[rng.randrange(len(tt.shape.dim))]
        if rng.random() < 0.3:
            d.dim_param = rng.choice(["N", "", "x"])
        else:
            d.dim_value = rng.choice([-3, -1, 0, 1, 2, 3, 4, 7])
    elif kind == "elem":
        tt.elem_type = rng.choice([0, 1, 7, 10, 11, 73])
    elif kind == "noshape":
        tt.ClearField("shape")
    else:
        tt.shape.dim.add().dim_value = rng.choice([1, 2, 3])


def mutate_graph(rng: random.Random, model: onnx.ModelProto) -> None:
    g = model.graph
    kind = rng.choice(["shuffle", "duplicate", "delete", "swap", "value_info", "input"])
    nodes = list(g.node)
    if kind == "shuffle" and nodes:
        rng.shuffle(nodes)
    elif kind == "duplicate" and nodes:
        nodes.insert(rng.randrange(len(nodes) + 1), rng.choice(nodes))
    elif kind == "delete" and nodes:
        del nodes[rng.randrange(len(nodes))]
    elif kind == "swap" and len(nodes) > 1:
        i, j = rng.sample(range(len(nodes)), 2)
        nodes[i], nodes[j] = nodes[j], nodes[i]
    elif kind == "value_info":
        names = _names(model)
        vi = helper.make_tensor_value_info(rng.choice(names), TensorProto.FLOAT, [rng.choice([1, 2, 3, 4, "N"]) for _ in range(rng.randint(0, 4))])
        g.value_info.append(vi)
        return
    elif kind == "input" and g.input:
        mutate_value_info(rng, g.input[rng.randrange(len(g.input))])
        return
    copies = [onnx.NodeProto() for _ in nodes]
    for c, n in zip(copies, nodes):
        c.CopyFrom(n)
    del g.node[:]
    g.node.extend(copies)


def splice(rng: random.Random, model: onnx.ModelProto, other: onnx.ModelProto) -> None:
    """Transplant a run of nodes (and their initializers) from ``other`` into ``model``."""
    src = list(other.graph.node)
    if not src:
        return
    start = rng.randrange(len(src))
    run = src[start:start + rng.randint(1, 6)]
    at = rng.randrange(len(model.graph.node) + 1)
    for k, n in enumerate(run):
        model.graph.node.insert(at + k, n)
    wanted = {i for n in run for i in n.input}
    have = {t.name for t in model.graph.initializer}
    for t in other.graph.initializer:
        if t.name in wanted and (t.name not in have or rng.random() < 0.3):
            model.graph.initializer.append(t)
    if rng.random() < 0.5 and model.graph.node:  # wire the splice into the host graph
        names = _names(model)
        n = model.graph.node[at] if at < len(model.graph.node) else model.graph.node[-1]
        if n.input:
            n.input[0] = rng.choice(names)


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not buf:
            break
        i = rng.randrange(len(buf))
        kind = rng.choice(["truncate", "flip", "set", "delete", "insert", "duplicate"])
        if kind == "truncate":
            del buf[i:]
        elif kind == "flip":
            buf[i] ^= 1 << rng.randrange(8)
        elif kind == "set":
            buf[i] = rng.choice([0x00, 0x01, 0x7F, 0x80, 0xFF, 0x0A, 0x12, 0x22])
        elif kind == "delete":
            del buf[i:i + rng.randint(1, 16)]
        elif kind == "insert":
            buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        else:
            buf[i:i] = buf[i:i + rng.randint(1, 64)]
    return bytes(buf)


def make_case(seed: int) -> Tuple[bytes, bool, str]:
    """The case for ``seed``: (model bytes, pass as a path?, a description of the mutations)."""
    rng = random.Random(seed)
    base = onnx.ModelProto()
    base.ParseFromString(rng.choice(SEEDS))
    steps = []
    if rng.random() < 0.25:
        data = mutate_bytes(rng, base.SerializeToString())
        steps.append("bytes")
    else:
        for _ in range(rng.randint(1, 4)):
            what = rng.choice(["node", "node", "node", "tensor", "graph", "splice", "opset", "ir"])
            steps.append(what)
            g = base.graph
            if what == "node" and g.node:
                mutate_node(rng, base, g.node[rng.randrange(len(g.node))])
            elif what == "tensor" and g.initializer:
                mutate_tensor(rng, g.initializer[rng.randrange(len(g.initializer))])
            elif what == "graph":
                mutate_graph(rng, base)
            elif what == "splice":
                other = onnx.ModelProto()
                other.ParseFromString(rng.choice(SEEDS))
                splice(rng, base, other)
            elif what == "opset" and base.opset_import:
                base.opset_import[0].version = rng.choice([1, 6, 7, 9, 11, 13, 17, 21, 99, 0, -1])
            elif what == "ir":
                base.ir_version = rng.choice([1, 3, 4, 7, 10, 99])
        data = base.SerializeToString()
        if rng.random() < 0.15:
            data = mutate_bytes(rng, data)
            steps.append("bytes")
    return data, rng.random() < 0.5, "+".join(steps)


# ---------------------------------------------------------------- running one case


def fold_case(data: bytes, as_path: bool, folder: str) -> str:
    """Fold one case under the time limit; return what happened ('folded', 'error: ...').

    Raises whatever escapes other than a BnfoldError (the bug being looked for), and Hang.
    """
    with time_limit(CASE_SECONDS):
        try:
            if as_path:
                path = os.path.join(folder, "case.onnx")
                with open(path, "wb") as f:
                    f.write(data)
                fold_onnx(path)
            else:
                model = onnx.ModelProto()
                try:
                    model.ParseFromString(data)
                except Exception:
                    return "unparsable"
                fold_onnx(model)
        except BnfoldError as exc:
            return f"error: {type(exc).__name__}"
    return "folded"


def crash_signature(exc: BaseException) -> str:
    """Exception type and the innermost bnfold frame: one line per distinct bug."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/bnfold/" in f.filename]
    where = f"{frames[-1].filename.split('/bnfold/')[-1]}:{frames[-1].lineno} {frames[-1].name}" if frames else "?"
    return f"{type(exc).__name__} at {where}"


# ---------------------------------------------------------------- the test


def _seeds(n: int) -> List[int]:
    if FRESH:
        rng = random.Random()
        return [rng.randrange(2**62) for _ in range(n)]
    return list(range(n))


def test_fold_onnx_survives_mutated_models(tmp_path) -> None:
    counts: Dict[str, int] = {}
    for seed in _seeds(EXAMPLES):
        data, as_path, steps = make_case(seed)
        try:
            result = fold_case(data, as_path, str(tmp_path))
        except BaseException as exc:  # noqa: BLE001 -- a crash or a hang: say which case
            bad = tmp_path / f"crash-{seed}.onnx"
            bad.write_bytes(data)
            pytest.fail(f"case {seed} ({steps}, {'path' if as_path else 'ModelProto'}): "
                        f"{crash_signature(exc)}: {exc}; model saved as {bad}")
        key = result.split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    # the mutations must reach the fold, not only the parser: some cases fold, some are refused
    assert counts.get("folded", 0) > EXAMPLES // 20, counts
    assert counts.get("error", 0) > EXAMPLES // 20, counts


def test_the_fuzzer_catches_a_crash_and_a_hang(tmp_path, monkeypatch) -> None:
    """The harness itself: an escaping exception and an endless loop must both fail a case."""
    import bnfold.onnx_pass as onnx_pass

    data = SEEDS[-1]
    monkeypatch.setattr(onnx_pass, "_note_affine", lambda report: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        fold_case(data, False, str(tmp_path))

    def forever(report):
        while True:
            pass

    monkeypatch.setattr(onnx_pass, "_note_affine", forever)
    monkeypatch.setattr(sys.modules[__name__], "CASE_SECONDS", 0.5)
    with pytest.raises(Hang):
        fold_case(data, True, str(tmp_path))


# ---------------------------------------------------------------- a long campaign


def _minimize(data: bytes, as_path: bool, signature: str, folder: str) -> bytes:
    """Drop nodes, initializers and value_info one at a time while the crash stays the same."""
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception:
        return data

    def same(m: onnx.ModelProto) -> bool:
        try:
            fold_case(m.SerializeToString(), as_path, folder)
        except BaseException as exc:  # noqa: BLE001
            return crash_signature(exc) == signature
        return False

    for field in ("node", "initializer", "value_info", "output"):
        i = 0
        while i < len(getattr(model.graph, field)):
            trial = onnx.ModelProto()
            trial.CopyFrom(model)
            del getattr(trial.graph, field)[i]
            if same(trial):
                model = trial
            else:
                i += 1
    return model.SerializeToString()


def campaign(n: int, save: Optional[str], first: int = 0) -> int:
    crashes: Dict[str, Tuple[int, bytes, bool, str, str]] = {}
    counts: Dict[str, int] = {}
    with tempfile.TemporaryDirectory() as folder:
        for seed in range(first, first + n):
            data, as_path, steps = make_case(seed)
            try:
                result = fold_case(data, as_path, folder)
            except BaseException as exc:  # noqa: BLE001
                if isinstance(exc, KeyboardInterrupt):
                    raise
                sig = crash_signature(exc)
                result = "CRASH"
                if sig not in crashes or len(data) < len(crashes[sig][1]):
                    crashes[sig] = (seed, data, as_path, steps, str(exc)[:200])
            key = result.split(":")[0]
            counts[key] = counts.get(key, 0) + 1
        print(f"{n} cases (seeds {first}..{first + n - 1}): " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        for sig, (seed, data, as_path, steps, text) in sorted(crashes.items()):
            print(f"CRASH {sig}  [seed {seed}, {steps}, {'path' if as_path else 'ModelProto'}]: {text}")
            if save:
                os.makedirs(save, exist_ok=True)
                small = _minimize(data, as_path, sig, folder)
                name = f"inprocess-{sig.split()[0]}-{seed}.onnx"
                with open(os.path.join(save, name), "wb") as f:
                    f.write(small)
                print(f"      saved {name} ({len(small)} bytes, from {len(data)})")
    return len(crashes)


if __name__ == "__main__":
    args = sys.argv[1:]
    save_dir = args[args.index("--save") + 1] if "--save" in args else None
    start = int(args[args.index("--first") + 1]) if "--first" in args else 0
    count = int(args[0]) if args and args[0].isdigit() else 1000
    sys.exit(1 if campaign(count, save_dir, start) else 0)

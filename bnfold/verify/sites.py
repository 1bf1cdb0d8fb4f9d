"""Fold sites: where each fold of a FoldReport ended, as a tensor both models compute.

A fold replaces a run of ops (a BN, or Mul/Add/Sub/Div by constants) by changed weights in the
op before it (or, for a BN before a linear op, in the ops after it). The fold keeps the name of
the value where the run ended (the op before it is renamed to produce it), so that tensor
exists in both models with the same meaning: in the original it is computed by the run, in the
folded model by the changed op. Comparing it pins a mismatch to one fold, before any
downstream op can hide it (a saturating activation) or blow it up (an ill-conditioned layer).

The pairs are derived from the original model, the folded model and the report only: starting
at the folded node's output in the original, follow the run (BNs, Mul/Add/Sub/Div, Identity,
Dropout, and layout ops) from sole reader to sole reader and take the values that exist in the
folded model. A BN folded into the ops *after* it has no such value of its own: the outputs of
its readers are compared instead. Folds inside subgraphs (If/Loop/Scan bodies) cannot be
exposed as graph outputs; they are checked through the graph outputs only.

All of this happens on private copies: :func:`with_outputs` and :func:`stitched` return new
protos and never touch a model file.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

# Ops a folded run may hold (per channel: the channel axis stays where it is) ...
RUN_OPS = {"BatchNormalization", "Mul", "Add", "Sub", "Div", "Identity", "Dropout"}
# ... and layout ops between them (the channel axis moves: per-channel scales are not used after one).
LAYOUT_OPS = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten"}
MAX_WALK = 256


@dataclass
class SiteValue:
    """One tensor compared for a fold: its name (the same in both models), the axis holding the
    channels when known (the tolerance is then per channel), and the original's value entering
    the run when it has the same layout (its size bounds the rounding the fold may make)."""

    name: str
    channel_axis: Optional[int] = None
    before: Optional[str] = None
    # The output (in the original) of the linear op the run was folded into: the check clones
    # that op on |input| and |weight| to measure sum |w| |x| per element, the size of the terms
    # whose rounding a correct fold changes (a sum can be far smaller than its terms).
    probe: Optional[str] = None
    direct: bool = False  # the site *is* the probed op's output (a BN folded into the ops after it)
    # For a site that is a BN's own output computed from ``before`` (the BN's input): per channel
    # |scale / sqrt(var + eps)| and |gain * mean| + |B|, read from the model, so a channel whose
    # input is constant (its std says nothing) still has the size of the terms the BN cancels.
    bn_gain: Optional[Any] = field(default=None, repr=False)
    bn_shift: Optional[Any] = field(default=None, repr=False)


@dataclass
class FoldSite:
    """One fold from the report: a BN or a run of Mul/Add/Sub/Div, and the tensors compared."""

    kind: str  # 'bn' or 'affine'
    node: str  # the BN, or the run's first op, as the report names it
    op: str
    into: str  # the op(s) that took it
    into_op: str
    rule: str
    values: List[SiteValue] = field(default_factory=list)
    precision: str = ""  # the float type the site computes in (see bnfold.verify.precision)
    precision_why: str = ""

    @property
    def title(self) -> str:
        return f"{self.op} '{self.node}' folded into {self.into_op} '{self.into}' [{self.rule}]"


def report_entries(report: Any) -> List[Dict[str, str]]:
    """The folds of a FoldReport, or of its JSON form (a dict), as plain dicts."""
    if report is None:
        return []
    if isinstance(report, dict):
        folded, affine = report.get("folded", []), report.get("affine_folded", [])
    else:
        folded = [asdict(f) if is_dataclass(f) else dict(f) for f in getattr(report, "folded", [])]
        affine = getattr(report, "extra", {}).get("affine_folded", [])
    entries = []
    for f in folded:
        entries.append(dict(kind="bn", node=f["bn"], op="BatchNormalization", into=f.get("producer", ""),
                            into_op=f.get("producer_op", ""), rule=f.get("rule", ""), graph=f.get("graph", "")))
    for e in affine:
        entries.append(dict(kind="affine", node=e["node"], op=e["op"], into=e.get("into", ""),
                            into_op=e.get("into_op", ""), rule=e.get("rule", ""), graph=e.get("graph", "")))
    return entries


def fold_sites(original, folded, report: Any) -> Tuple[List[FoldSite], List[str]]:
    """The sites of every fold in ``report`` (ModelProtos of both models; external data not
    needed), and notes on folds that could not be pinned to a tensor."""
    entries = report_entries(report)
    if not entries:
        return [], []
    graph = original.graph
    by_label: Dict[Tuple[str, str], List[Any]] = {}
    producer: Dict[str, Any] = {}
    consumers: Dict[str, List[Any]] = {}
    for node in graph.node:
        label = node.name or f"{node.op_type}({node.output[0] if node.output else ''})"
        by_label.setdefault((node.op_type, label), []).append(node)
        for out in node.output:
            if out:
                producer[out] = node
        for inp in set(node.input):
            if inp:
                consumers.setdefault(inp, []).append(node)
    constants = _constant_dims(graph)
    have = _defined_values(folded.graph)
    outputs = {o.name for o in graph.output}
    sites: List[FoldSite] = []
    in_subgraphs = 0
    unmatched: List[str] = []
    inits = None
    for e in entries:
        if e["graph"]:
            in_subgraphs += 1
            continue
        site = FoldSite(e["kind"], e["node"], e["op"], e["into"], e["into_op"], e["rule"])
        for node in by_label.get((e["op"], e["node"]), []):
            # a BN folded into the linear ops after it (bn-conv, bn-gemm, bn-flatten-gemm, ...: the
            # report names the Flatten for the last two); bn-bn and bn-affine end at the BN itself
            if e["kind"] == "bn" and e["rule"].startswith("bn-") and e["rule"] not in ("bn-bn", "bn-affine"):
                site.values.extend(_readers_sites(node, consumers, have, constants))
                continue
            linear = _linear_before(node, e, by_label, producer, constants)
            values = _site_values(node, consumers, have, outputs, constants, linear)
            if node.op_type == "BatchNormalization":
                inits = inits if inits is not None else {t.name: t for t in graph.initializer}
                _attach_bn_params(node, values, inits)
            site.values.extend(values)
        site.values = _unique(site.values)
        if site.values:
            sites.append(site)
        else:
            unmatched.append(site.title)
    notes = []
    if in_subgraphs:
        notes.append(f"{in_subgraphs} fold(s) inside subgraphs are checked through the graph outputs only")
    if unmatched:
        notes.append(f"{len(unmatched)} fold(s) have no tensor of their own in both models, checked through the graph "
                     f"outputs only: {'; '.join(unmatched[:5])}{' ...' if len(unmatched) > 5 else ''}")
    return sites, notes


def _attach_bn_params(bn, values: List[SiteValue], inits) -> None:
    """Give the site that is ``bn``'s own output (computed from its own input) the BN's per-channel
    gain and shift magnitude, when its parameters are initializers held in the model."""
    import numpy as np

    from ..onnx_io import tensor_array  # reads lazy stubs too

    mine = [v for v in values if bn.output and v.name == bn.output[0] and v.before == bn.input[0]]
    if not mine or len(bn.input) < 5:
        return
    try:
        scale, bias, mean, var = (tensor_array(inits[n]).astype(np.float64).ravel() for n in bn.input[1:5])
    except Exception:  # not initializers, or data kept outside the model: estimate from the data instead
        return
    eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        gain = np.abs(scale / np.sqrt(var + eps))
    if not (len(gain) == len(mean) == len(bias)) or not np.all(np.isfinite(gain)):
        return
    for v in mine:
        v.bn_gain, v.bn_shift = gain, gain * np.abs(mean) + np.abs(bias)


def _defined_values(graph) -> set:
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(o for o in node.output if o)
    return names


LINEAR_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def _linear_before(start, entry, by_label, producer, constants) -> Optional[str]:
    """The output of the linear op the report says ``start`` was folded into, when the run
    reaches ``start`` from it through run ops only; else None."""
    if entry["into_op"] not in LINEAR_OPS:
        return None
    candidates = by_label.get((entry["into_op"], entry["into"]), [])
    if len(candidates) != 1 or not candidates[0].output:
        return None
    target = candidates[0].output[0]
    value = _data_input(start, constants)
    for _ in range(MAX_WALK):
        if value == target:
            return target
        node = producer.get(value)
        if node is None or node.op_type not in RUN_OPS:
            return None
        value = _data_input(node, constants)
    return None


def _site_values(start, consumers, have, outputs, constants, linear) -> List[SiteValue]:
    if not start.output:
        return []
    data = _data_input(start, constants)
    before = data if start.op_type != "BatchNormalization" else (start.input[0] if start.input else None)
    if linear is not None:
        before = linear
    axis = 1 if start.op_type == "BatchNormalization" else None
    if start.op_type in ("Mul", "Add", "Sub", "Div"):
        axis = _constant_axis(start, data, constants)
    found: List[SiteValue] = []
    value, changed, layout = start.output[0], True, False
    for _ in range(MAX_WALK):
        if value in have and changed:
            found.append(SiteValue(value, None if layout else axis, None if layout else before,
                                   None if layout else linear))
            changed = False
        users = consumers.get(value, [])
        if value in outputs or len(users) != 1:
            break
        node = users[0]
        if node.op_type not in RUN_OPS | LAYOUT_OPS or not node.output or _data_input(node, constants) != value:
            break
        if node.op_type in LAYOUT_OPS:
            layout = True
        value = node.output[0]
        changed = changed or value not in have
    return found


def _readers_sites(bn, consumers, have, constants) -> List[SiteValue]:
    """A BN folded into the linear ops reading it (directly or through a Flatten): they now read
    the BN's input, so their outputs, not any value between, mean the same in both models; a
    MatMul's shift joined the Add after it, so that Add's output is the one to compare."""
    readers = []
    for user in consumers.get(bn.output[0], []) if bn.output else []:
        if user.op_type == "Flatten" and user.output:
            readers.extend(consumers.get(user.output[0], []))
        else:
            readers.append(user)
    result = []
    for user in readers:
        if user.op_type not in LINEAR_OPS or not user.output:
            continue
        value = user.output[0]
        after = consumers.get(value, [])
        if user.op_type == "MatMul" and len(after) == 1 and after[0].op_type == "Add" and after[0].output:
            value = after[0].output[0]
        if value in have:
            result.append(SiteValue(value, -1 if user.op_type == "MatMul" else 1, None, user.output[0], direct=True))
    return result


def _constant_dims(graph) -> Dict[str, List[int]]:
    """Shapes of the main graph's constants (initializers and Constant nodes), without data."""
    dims = {t.name: list(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            tensor = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
            dims[node.output[0]] = list(tensor.dims) if tensor is not None else []
    return dims


def _data_input(node, constants) -> Optional[str]:
    """The data input: the first input for most ops; for Mul/Add/Sub/Div the one that is not a
    constant (``c * x`` is as much part of a run as ``x * c``)."""
    if not node.input:
        return None
    if node.op_type in ("Mul", "Add", "Sub", "Div"):
        for name in node.input:
            if name and name not in constants:
                return name
    return node.input[0]


def _constant_axis(node, data, constants) -> Optional[int]:
    """The channel axis of a per-channel Mul/Add/Sub/Div, counted from the end, read off its
    constant's shape (None for a scalar constant: the whole tensor is one channel)."""
    other = [n for n in node.input if n != data]
    dims = constants.get(other[0]) if other else None
    if not dims:
        return None
    wide = [k for k in range(1, len(dims) + 1) if dims[-k] != 1]
    return -wide[0] if len(wide) == 1 else None


def _unique(values: Iterable[SiteValue]) -> List[SiteValue]:
    seen, out = set(), []
    for v in values:
        if v.name not in seen:
            seen.add(v.name)
            out.append(v)
    return out


def site_tensors(sites: Sequence[FoldSite]) -> Tuple[List[str], List[str]]:
    """The tensor names to expose: in the original (site values and the values entering the
    runs) and in the folded model (site values)."""
    folded = _names(v.name for s in sites for v in s.values)
    original = _names(list(folded) + [v.before for s in sites for v in s.values if v.before])
    return original, folded


def _names(names: Iterable[str]) -> List[str]:
    seen, out = set(), []
    for n in names:
        if n not in seen:
            seen.add(n)
            out.append(n)
    return out


def with_outputs(model, names: Sequence[str]):
    """A copy of ``model`` that also returns ``names`` (values of its main graph) as outputs."""
    proto = copy.deepcopy(model)
    present = {o.name for o in proto.graph.output}
    for name in names:
        if name not in present:
            proto.graph.output.add().name = name
    return proto


MAGNITUDE = "__bnfold_mag"


def stitched(original, feeds: Dict[str, Any], probes: Sequence[str] = ()):
    """A copy of ``original`` in which each value named in ``feeds`` is cut from the op that
    computes it and becomes a graph input instead: run on the folded model's site values, it
    computes what the original network makes of them downstream of the folds.

    For each name in ``probes`` (a linear op's output), the copy also computes
    ``name + MAGNITUDE``: the same op applied to |input| and |weight| without bias."""
    from onnx import helper

    from ..onnx_proto import np_dtype_to_tensor_dtype

    proto = copy.deepcopy(original)
    graph = proto.graph
    by_output = {n.output[0]: n for n in graph.node if n.output}
    for i, name in enumerate(dict.fromkeys(probes)):
        node = by_output.get(name)
        if node is None or node.op_type not in LINEAR_OPS or len(node.input) < 2:
            continue
        absolute = []
        for j, inp in enumerate(node.input[:2]):
            absolute.append(f"{name}{MAGNITUDE}_abs{j}")
            graph.node.append(helper.make_node("Abs", [inp], [absolute[-1]], name=f"{name}{MAGNITUDE}_abs{j}"))
        clone = helper.make_node(node.op_type, absolute, [name + MAGNITUDE], name=name + MAGNITUDE, domain=node.domain)
        for attr in node.attribute:
            if attr.name == "beta":
                continue
            copied = clone.attribute.add()
            copied.CopyFrom(attr)
            if attr.name == "alpha":
                copied.f = abs(copied.f)
        graph.node.append(clone)
    for node in graph.node:
        for i, out in enumerate(node.output):
            if out in feeds:
                node.output[i] = f"{out}__bnfold_cut"
    keep = [vi for vi in graph.value_info if vi.name not in feeds]
    del graph.value_info[:]
    graph.value_info.extend(keep)
    for name, value in feeds.items():
        graph.input.append(helper.make_tensor_value_info(name, np_dtype_to_tensor_dtype(value.dtype), None))
    return proto

"""Fold BatchNorm in ``torch.export`` programs (``.pt2`` files written by ``torch.export.save``).

Loading is the dangerous part. In torch 2.13 ``torch.export.load`` can run code from the file:
weights or constants flagged ``use_pickle`` go through ``torch.load(weights_only=False)``,
"opaque" constants through ``pickle.loads``, the sample inputs through ``torch.load`` that falls
back to ``weights_only=False`` when the safe load fails, symbolic shape expressions through
``sympy.sympify`` (which evaluates Python), ``guards_code`` strings become Python code when the
program runs, and node targets resolve to any attribute reachable from ``torch``. So
:func:`load_program` first screens the archive itself (no pickled payloads, no compiled AOTI
code, no guards code, shape expressions from a small grammar only), then loads with
``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` (every ``torch.load`` inside becomes weights-only), then checks
that every node calls an operator and nothing else.
"""

from __future__ import annotations

import contextlib
import io
import json
import operator
import os
import re
import tokenize
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..affine import Refusal
from ..errors import CheckFailed, InputError
from ..report import FoldReport
from ._kinds import FOLD_DTYPES
from ._math import bn_affine, fold_tensors, to_numpy
from ._observe import PRODUCER_OPS, bn_eval_output, op_name

MAX_ARCHIVE_ENTRIES = 100_000


# --------------------------------------------------------------------------------------------
# Screening and loading


def _fail(path: str, why: str) -> InputError:
    return InputError(f"{path}: {why}")


def _archive_root(path: str, names: List[str]) -> str:
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or any("/" not in n for n in names):
        raise _fail(path, "not a torch.export .pt2 archive (entries are not under one folder)")
    return roots.pop() + "/"


def _screen_archive(path: str) -> None:
    """Refuse an archive that torch.export.load would read by unpickling or evaluating code."""
    if not os.path.isfile(path):
        raise _fail(path, "no such file")
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if len(names) > MAX_ARCHIVE_ENTRIES or len(set(names)) != len(names):
                raise _fail(path, "not a torch.export .pt2 archive (too many or duplicate entries)")
            root = _archive_root(path, names)
            rel = {n[len(root):]: n for n in names}
            _screen_entries(path, zf, rel)
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError) as exc:
        raise _fail(path, f"not a readable torch.export .pt2 archive ({type(exc).__name__}: {exc})") from None


def _screen_entries(path: str, zf: zipfile.ZipFile, rel: Dict[str, str]) -> None:
    read = lambda name: zf.read(rel[name]).decode("utf-8")  # noqa: E731
    if read("archive_format").strip() != "pt2" if "archive_format" in rel else True:
        raise _fail(path, "not a torch.export .pt2 archive (no archive_format 'pt2')")
    for name in rel:
        if name.startswith(("data/aotinductor/", "data/executorch/", "data/mtia", "xl_model_weights/")):
            raise _fail(path, f"refusing {name}: compiled or external payloads are not loaded")
    models = [n[len("models/"):-len(".json")] for n in rel if n.startswith("models/") and n.endswith(".json")]
    if not models:
        raise _fail(path, "not a torch.export .pt2 archive (no models/*.json)")
    for model in models:
        for kind in ("weights", "constants"):
            if f"data/{kind}/{model}.pt" in rel:
                raise _fail(path, f"refusing the legacy pickled {kind} file of '{model}' (unpickling runs code)")
            config = json.loads(read(f"data/{kind}/{model}_{kind}_config.json"))
            for fqn, meta in config.get("config", {}).items():
                if meta.get("use_pickle") or not str(meta.get("path_name", "")).startswith(("weight_", "tensor_")):
                    raise _fail(path, f"refusing {kind[:-1]} '{fqn}': it is stored pickled (unpickling runs code)")
        _screen_program_json(path, json.loads(read(f"models/{model}.json")))


# Names a symbolic shape expression may use: sympy constructors and functions, flags, symbols.
_SYMPY_NAMES = {
    "Symbol", "Integer", "Rational", "Float", "Max", "Min", "Abs", "Eq", "Ne", "Lt", "Le", "Gt",
    "Ge", "And", "Or", "Not", "Mod", "floor", "ceiling", "sqrt", "Piecewise", "ITE", "oo", "zoo",
    "nan", "pi", "E", "S", "True", "False", "None", "and", "or", "not", "positive", "negative",
    "nonnegative", "nonpositive", "integer", "real", "finite", "infinite", "zero", "nonzero",
    "even", "odd", "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt",
    "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv",
    "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt",
    "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "OpaqueUnaryFn_sqrt",
}
_SYMBOL = re.compile(r"[a-z]+[0-9]+\Z")
_OPS = {"(", ")", ",", "+", "-", "*", "/", "//", "%", "**", "=", "==", "!=", "<", "<=", ">", ">=", "&", "|", "~"}


def safe_sym_expr(text: str) -> bool:
    """True when ``text`` is a plain shape expression: no attribute access, indexing, or names
    outside :data:`_SYMPY_NAMES` and symbol names like ``s31`` (so ``sympify`` cannot run code)."""
    if len(text) > 10_000:
        return False
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return False
    for tok in tokens:
        if tok.type in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER, tokenize.NUMBER):
            continue
        if tok.type == tokenize.NAME and (tok.string in _SYMPY_NAMES or _SYMBOL.match(tok.string)):
            continue
        if tok.type == tokenize.STRING and re.fullmatch(r"(['\"])[a-z]+[0-9]+\1", tok.string):
            continue
        if tok.type == tokenize.OP and tok.string in _OPS:
            continue
        return False
    return True


def _screen_program_json(path: str, program: dict) -> None:
    if program.get("guards_code"):
        raise _fail(path, "refusing a program with guards_code (it is run as Python code)")
    stack = [program]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key == "expr_str" and isinstance(value, str) and not safe_sym_expr(value):
                    raise _fail(path, f"refusing a symbolic shape expression outside bnfold's grammar: {value[:80]!r}")
                stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Every torch.load in the block is weights-only, whatever its caller asked for."""
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


_SAFE_CALLABLES = {operator.getitem}


def _check_targets(path: str, gm: torch.fx.GraphModule) -> None:
    """Every call is an operator (OpOverload or higher-order op) or getitem: a node that resolved
    to some other Python function reachable from ``torch`` would run it."""
    for mod in gm.modules():
        graph = getattr(mod, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        for node in graph.nodes:
            if node.op in ("call_method", "call_module"):
                raise _fail(path, f"refusing node {node.name}: {node.op} is not part of an exported program")
            if node.op != "call_function":
                continue
            ok = isinstance(node.target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator))
            if not ok and node.target not in _SAFE_CALLABLES:
                raise _fail(path, f"refusing node {node.name}: it calls {node.target!r}, not an operator")


def load_program(path: str):
    """Load a ``.pt2`` file without running code from it; raise InputError (one line) if it is
    missing, unreadable, or holds anything that would be unpickled or evaluated."""
    path = os.fspath(path)
    _screen_archive(path)
    try:
        with _weights_only_loads():
            ep = torch.export.load(path)
    except Exception as exc:  # torch raises many kinds for a corrupt archive
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise _fail(path, f"not a readable torch.export program ({type(exc).__name__}: {first})") from None
    _check_targets(path, ep.graph_module)
    return ep


# --------------------------------------------------------------------------------------------
# Finding pairs in a program


@dataclass
class _Pair:
    bn: torch.fx.Node
    producer: torch.fx.Node
    label: str  # the BN's name in the report


def _placeholder_info(ep) -> Dict[str, Tuple[str, str]]:
    """placeholder name -> (kind, fqn) for parameters, buffers and constant tensors."""
    from torch.export.graph_signature import InputKind

    kinds = {InputKind.PARAMETER: "parameter", InputKind.BUFFER: "buffer", InputKind.CONSTANT_TENSOR: "constant"}
    out = {}
    for spec in ep.graph_signature.input_specs:
        if spec.kind in kinds and hasattr(spec.arg, "name"):
            out[spec.arg.name] = (kinds[spec.kind], spec.target)
    return out


def _args(node: torch.fx.Node) -> Dict[str, object]:
    """The node's arguments by schema name, defaults filled in."""
    schema = node.target._schema
    out = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
        else:
            out[arg.name] = None
    return out


class _ProgramFolder:
    """One pass over a program: classify every BN node, then rewrite the foldable ones."""

    def __init__(self, ep) -> None:
        self.ep = ep
        self.info = _placeholder_info(ep)
        self.mutated = {s.target for s in ep.graph_signature.output_specs if getattr(s, "target", None)}
        self.report = FoldReport(method="torch.export")
        bn_owner_count: Dict[str, int] = defaultdict(int)
        self.bn_nodes = [n for n in ep.graph.nodes if n.op == "call_function" and "batch_norm" in op_name(n)]
        for n in self.bn_nodes:
            bn_owner_count[self._owner(n, 3)] += 1
        self.labels = {n: self._owner(n, 3) if bn_owner_count[self._owner(n, 3)] == 1 else f"{self._owner(n, 3)}@{n.name}"
                       for n in self.bn_nodes}

    def _owner(self, node: torch.fx.Node, index: int) -> str:
        arg = node.args[index] if len(node.args) > index else None
        fqn = self.info.get(getattr(arg, "name", None), (None, None))[1]
        return fqn.rsplit(".", 1)[0] if fqn and "." in fqn else (fqn or node.name)

    def tensor(self, node) -> Optional[torch.Tensor]:
        if node is None:
            return None
        kind, fqn = self.info[node.name]
        return self.ep.constants[fqn] if kind == "constant" else self.ep.state_dict[fqn]

    def _constant(self, node) -> bool:
        return node is None or (
            isinstance(node, torch.fx.Node) and node.op == "placeholder" and node.name in self.info
            and self.info[node.name][1] not in self.mutated
        )

    def _pair_refusal(self, bn: torch.fx.Node) -> Optional[Refusal]:
        readers = bn_eval_output(bn)
        args = _args(bn)
        if readers is None:
            if args.get("running_mean") is None:
                return Refusal("no-running-stats", "the BN has no running statistics")
            return Refusal("training-mode", f"{op_name(bn)} normalizes with batch statistics")
        if args.get("running_mean") is None:
            return Refusal("no-running-stats", "the BN has no running statistics")
        if not all(self._constant(args[k]) for k in ("weight", "bias", "running_mean", "running_var")):
            return Refusal("not-constant", "a BN parameter is not a constant of the program")
        src = bn.args[0]
        if not isinstance(src, torch.fx.Node) or op_name(src) not in PRODUCER_OPS:
            return Refusal("no-linear-producer", f"its input comes from {op_name(src) or getattr(src, 'op', 'a constant')}")
        flat = list(bn.args) + list(bn.kwargs.values())
        if list(src.users) != [bn] or sum(a is src for a in flat) != 1:
            return Refusal("producer-has-other-consumers", f"{src.name} is also read by {', '.join(u.name for u in src.users if u is not bn)}")
        p = _args(src)
        if not (self._constant(p["weight"]) and self._constant(p.get("bias"))):
            return Refusal("not-constant", f"the weight or bias of {src.name} is not a constant of the program")
        dtype = str(self.tensor(p["weight"]).dtype).replace("torch.", "")
        if dtype not in FOLD_DTYPES:
            return Refusal("unsupported-dtype", f"the weight is {dtype}")
        val = src.meta.get("val")
        rank = val.dim() if isinstance(val, torch.Tensor) else None
        want = 2 if op_name(src) == "aten::linear" else self.tensor(p["weight"]).dim()
        if rank != want:
            return Refusal("not-per-channel" if rank is not None else "shape-unknown",
                           f"{op_name(src)} output is {rank}-D; its channels are on dim 1 only when it is {want}-D")
        return None

    def _producer_key(self, pair: _Pair):
        """Producers sharing a weight must all fold with BNs of the same parameters."""
        a, p = _args(pair.bn), _args(pair.producer)
        eps = a.get("eps")
        return (p.get("bias"), a["weight"], a["bias"], a["running_mean"], a["running_var"], eps)

    def run(self) -> FoldReport:
        pairs: List[_Pair] = []
        for bn in self.bn_nodes:
            refusal = self._pair_refusal(bn)
            if refusal:
                self._skip(bn, refusal)
            else:
                pairs.append(_Pair(bn, bn.args[0], self.labels[bn]))
        by_weight: Dict[torch.fx.Node, List[_Pair]] = defaultdict(list)
        for pair in pairs:
            by_weight[_args(pair.producer)["weight"]].append(pair)
        for weight, group in by_weight.items():
            refusal = self._group_refusal(weight, group)
            if refusal is None:
                try:
                    self._fold(weight, group)
                    continue
                except Refusal as exc:
                    refusal = exc
            for pair in group:
                self._skip(pair.bn, refusal)
        self.ep.graph.lint()
        self.ep.graph_module.recompile()
        return self.report

    def _group_refusal(self, weight, group: List[_Pair]) -> Optional[Refusal]:
        producers = {pair.producer for pair in group}
        if set(weight.users) != producers or len({self._producer_key(p) for p in group}) != 1:
            return Refusal("shared-module-different-bn", f"weight {self.info[weight.name][1]} is also used where this BN does not follow")
        bias = _args(group[0].producer).get("bias")
        if bias is not None and set(bias.users) != producers:
            return Refusal("shared-module-different-bn", f"bias {self.info[bias.name][1]} is also used elsewhere")
        return None

    def _skip(self, bn: torch.fx.Node, refusal: Refusal) -> None:
        src = bn.args[0] if bn.args else None
        is_prod = isinstance(src, torch.fx.Node) and op_name(src) in PRODUCER_OPS
        producer = self._owner(src, 1) if is_prod else None
        self.report.add_skipped(self.labels[bn], refusal.reason, refusal.detail, producer,
                                op_name(src).replace("aten::", "") if is_prod else None)

    def _fold(self, weight: torch.fx.Node, group: List[_Pair]) -> None:
        first = group[0]
        a_args, p_args = _args(first.bn), _args(first.producer)
        a, b = bn_affine(self.tensor(a_args["weight"]), self.tensor(a_args["bias"]),
                         self.tensor(a_args["running_mean"]), self.tensor(a_args["running_var"]), a_args["eps"])
        name = op_name(first.producer)
        transposed = "transpose" in name or bool(p_args.get("transposed"))
        groups = int(p_args.get("groups") or 1)
        w_old, bias_node = self.tensor(weight), p_args.get("bias")
        w_new, c_new = fold_tensors(w_old, self.tensor(bias_node), a, b, 1 if transposed else 0, groups,
                                    self.info[weight.name][1])
        self._store(weight, w_new)
        if bias_node is None:
            bias_node = self._add_parameter(self.info[weight.name][1].rsplit(".", 1)[0], c_new, weight)
            for pair in group:
                _set_bias(pair.producer, bias_node)
        else:
            self._store(bias_node, c_new)
        rule = "linear-bn" if name == "aten::linear" else ("convtranspose-bn" if transposed else "conv-bn")
        for pair in group:
            self._remove_bn(pair)
            self.report.add_folded(pair.label, self._owner(pair.producer, 1), name.replace("aten::", ""), rule)

    def _store(self, node: torch.fx.Node, value: torch.Tensor) -> None:
        kind, fqn = self.info[node.name]
        table = self.ep.constants if kind == "constant" else self.ep.state_dict
        old = table[fqn]
        table[fqn] = nn.Parameter(value, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else value

    def _add_parameter(self, module: str, value: torch.Tensor, like: torch.fx.Node) -> torch.fx.Node:
        """A new parameter placeholder (a bias for a conv that had none)."""
        from torch.export.graph_signature import InputKind, InputSpec, TensorArgument

        fqn = f"{module}.bias" if module else "bias"
        while fqn in self.ep.state_dict or fqn in self.ep.constants:
            fqn += "_folded"
        specs = list(self.ep.graph_signature.input_specs)
        placeholders = [n for n in self.ep.graph.nodes if n.op == "placeholder"]
        at = max((i for i, s in enumerate(specs) if s.kind == InputKind.PARAMETER), default=-1)
        ctx = self.ep.graph.inserting_after(placeholders[at]) if at >= 0 else self.ep.graph.inserting_before(placeholders[0])
        with ctx:
            node = self.ep.graph.placeholder("p_" + re.sub(r"\W", "_", fqn))
        fake = like.meta["val"]
        node.meta["val"] = fake.fake_mode.from_tensor(value, static_shapes=True)
        specs.insert(at + 1, InputSpec(kind=InputKind.PARAMETER, arg=TensorArgument(name=node.name), target=fqn, persistent=None))
        self.ep.graph_signature.input_specs[:] = specs
        self.ep.state_dict[fqn] = nn.Parameter(value, requires_grad=False)
        self.info[node.name] = ("parameter", fqn)
        return node

    def _remove_bn(self, pair: _Pair) -> None:
        bn, graph = pair.bn, self.ep.graph
        gone = [bn] if op_name(bn) == "aten::batch_norm" else list(bn.users)
        for node in gone:
            node.replace_all_uses_with(pair.producer)
            self._rename_output(node.name, pair.producer.name)
            if node is not bn:
                graph.erase_node(node)
        graph.erase_node(bn)

    def _rename_output(self, old: str, new: str) -> None:
        """Signatures name graph values: point those that named a removed BN at its producer."""
        from torch.export.graph_signature import TensorArgument

        for spec in self.ep.graph_signature.output_specs:
            if isinstance(spec.arg, TensorArgument) and spec.arg.name == old:
                spec.arg = TensorArgument(name=new)
        for entry in self.ep.module_call_graph:
            sig = entry.signature
            for args in ([] if sig is None else [sig.inputs, sig.outputs]):
                for i, arg in enumerate(args):
                    if isinstance(arg, TensorArgument) and arg.name == old:
                        args[i] = TensorArgument(name=new)


def _set_bias(node: torch.fx.Node, bias: torch.fx.Node) -> None:
    """Bias is argument 2 of every producer op bnfold folds into."""
    if len(node.args) > 2:
        node.args = node.args[:2] + (bias,) + node.args[3:]
    elif "bias" in node.kwargs:
        node.kwargs = {**node.kwargs, "bias": bias}
    else:
        node.args = tuple(node.args[:2]) + (bias,)


def fold_exported_program(ep) -> Tuple[object, FoldReport]:
    """Fold the BatchNorms of an ExportedProgram **in place**; return ``(ep, report)``.

    Preconditions: ``ep`` came from torch.export (any IR: the default training IR with
    ``aten.batch_norm``, or decomposed ``_native_batch_norm_legit_no_training``). Only inference
    BNs fold; a producer whose weight other ops also read folds only when every such op is a
    producer followed by a BN with the very same parameters.
    """
    import time

    start = time.perf_counter()
    report = _ProgramFolder(ep).run()
    report.seconds = time.perf_counter() - start
    return ep, report


# --------------------------------------------------------------------------------------------
# Files


def _outputs(ep, example_inputs) -> Dict[str, np.ndarray]:
    from torch.utils._pytree import tree_flatten

    args, kwargs = example_inputs
    with torch.no_grad():
        result = ep.module()(*args, **kwargs)
    leaves = [v for v in tree_flatten(result)[0] if isinstance(v, torch.Tensor)]
    return {f"output_{i}": to_numpy(v) for i, v in enumerate(leaves)}


def _input_infos(ep, example_inputs) -> List[Dict[str, object]]:
    """Name, dtype and shape of each example input tensor, like the ONNX check's ``inputs.tensors``."""
    from torch.export.graph_signature import InputKind
    from torch.utils._pytree import tree_flatten

    leaves = tree_flatten(tuple(example_inputs))[0]
    names = [s.arg.name for s in ep.graph_signature.input_specs
             if s.kind == InputKind.USER_INPUT and hasattr(s.arg, "name")]  # fmt: skip
    tensors = [v for v in leaves if isinstance(v, torch.Tensor)]
    if len(names) != len(tensors):
        names = [f"input_{i}" for i in range(len(tensors))]
    return [dict(name=name, dtype=str(t.dtype).replace("torch.", ""), shape=list(t.shape),
                 source="the program's example input") for name, t in zip(names, tensors)]  # fmt: skip


def fold_program_file(src_path: str, dst_path: Optional[str], check: bool = True) -> FoldReport:
    """Fold a ``.pt2`` program written by ``torch.export.save`` into ``dst_path`` (None: report only).

    The input is screened and loaded without unpickling (see the module docstring). With
    ``check`` (the default) and when the program carries example inputs, the folded program is
    run against the original on them (bnfold's tolerance rule) before anything is written; the
    verdict dict is ``report.extra["check"]``; on a mismatch the CheckFailed carries ``verdict``
    and ``report``.
    Raises InputError (unreadable or unsafe input), OutputError, or CheckFailed (nothing written).
    """
    from ..onnx_io import check_output_path, staged_output
    from ..verify import compare_outputs

    if dst_path is not None:
        check_output_path(dst_path, {os.path.realpath(src_path)})  # before the work
    ep = load_program(src_path)
    examples = getattr(ep, "example_inputs", None) if check else None
    expected = _outputs(ep, examples) if examples else None
    inputs = _input_infos(ep, examples) if examples else []
    ep, report = fold_exported_program(ep)
    if expected is not None:
        verdict = compare_outputs(expected, _outputs(ep, examples)).to_dict()
        verdict["inputs"]["tensors"] = inputs
        report.extra["check"] = verdict
        if not verdict["passed"]:
            exc = CheckFailed(f"{src_path}: the folded program does not match the original; nothing written")
            exc.verdict, exc.report = verdict, report
            raise exc
    elif check:
        report.notes.append("the program carries no example inputs; the fold was not run against the original")
    if dst_path is not None:
        with staged_output(dst_path, protect={os.path.realpath(src_path)}) as staged:
            torch.export.save(ep, staged)
    return report


def fold_module_program(module: nn.Module, example) -> Tuple[nn.Module, FoldReport]:
    """Export ``module`` on one example and fold every BN op of the program, whatever module or
    function spelled it; return ``(ep.module(), report)``.

    The returned GraphModule is torch.export's: it takes inputs of the example's shapes only
    (others fail its guards; nothing is silently recomputed for them). ``module`` is traced, not
    changed: call this on a throwaway copy.
    """
    args, kwargs = example
    ep = torch.export.export(module, tuple(args), kwargs=dict(kwargs) or None, strict=False)
    ep, report = fold_exported_program(ep)
    return ep.module(), report

"""Three ways to see which module calls feed which: torch.fx, torch.export, forward hooks.

Each returns an :class:`~._plan.Observation` or raises (the caller then tries the next way):

* ``fx``: a symbolic trace, independent of inputs; with example inputs it also propagates
  shapes (needed for Conv1d/Linear + BatchNorm1d). Fails on data-dependent control flow.
* ``export``: ``torch.export`` on the example inputs: complete dataflow at those shapes.
* ``hooks``: runs the model on the example inputs, with module hooks to see calls and a
  ``TorchFunctionMode`` to see every torch operation that reads a producer's output or a
  parameter; works on any eager model, but only vouches for the paths the examples take.
"""

from __future__ import annotations

import contextlib
import operator
import weakref
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ._kinds import is_batchnorm, is_folded_tail, is_producer_type
from ._plan import BNCall, Observation, ProducerCall

Example = Tuple[tuple, dict]  # (args, kwargs)


@contextlib.contextmanager
def quiet_run(root: nn.Module) -> Iterator[None]:
    """Run example inputs without lasting effects: no autograd graph, and the buffers of any
    module left in training mode (a BN updating running statistics) restored afterwards."""
    saved = [
        (m, name, buf.clone())
        for m in root.modules()
        if m.training
        for name, buf in m._buffers.items()
        if buf is not None
    ]
    try:
        with torch.no_grad():
            yield
    finally:
        with torch.no_grad():
            for m, name, value in saved:
                m._buffers[name].copy_(value)


def _owner(target: str) -> str:
    return target.rsplit(".", 1)[0] if "." in target else ""


# --------------------------------------------------------------------------------------------
# torch.fx


class _Tracer(torch.fx.Tracer):
    """Keeps every conv, linear and BN module (subclasses too), and every folded norm-act's
    tail, as one call node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_batchnorm(m) or is_producer_type(m) or is_folded_tail(m) or super().is_leaf_module(m, qualname)


def fx_graph(root: nn.Module) -> torch.fx.Graph:
    return _Tracer().trace(root)


def fx_signature(graph: torch.fx.Graph) -> List[Tuple[str, str]]:
    """What a re-trace must reproduce after folding: every node's op and target."""
    return [(n.op, str(n.target)) for n in graph.nodes]


RANKS_META = "bnfold_ranks"  # node.meta key: the output ranks seen over every example


def observe_fx(root: nn.Module, examples: Sequence[Example]) -> Tuple[Observation, torch.fx.Graph]:
    """The traced graph, with the output rank of every producer call over every example (a
    call whose rank differs between examples gets a rank that is not its channel layout)."""
    graph = fx_graph(root)
    ranks: Dict[torch.fx.Node, set] = {}
    if examples:
        from torch.fx.passes.shape_prop import ShapeProp

        gm = torch.fx.GraphModule(root, graph)
        for args, kwargs in examples:
            if kwargs:
                raise ValueError("torch.fx shape propagation takes positional example inputs only")
            with quiet_run(root):
                ShapeProp(gm).propagate(*args)
            for node in graph.nodes:
                meta = node.meta.pop("tensor_meta", None)
                ranks.setdefault(node, set()).add(len(meta.shape) if meta is not None and hasattr(meta, "shape") else None)
    for node, seen in ranks.items():
        node.meta[RANKS_META] = frozenset(seen)
    obs = Observation("torch.fx")
    modules = dict(root.named_modules())
    index: Dict[torch.fx.Node, int] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            owner = _owner(node.target)
            obs.foreign_use.setdefault(owner, f"the model's forward (get_attr {node.target})")
            obs.foreign_use.setdefault(node.target, f"the model's forward (get_attr {node.target})")
        if node.op != "call_module":
            continue
        mod = modules.get(node.target)
        if is_producer_type(mod):
            index[node] = len(obs.producer_calls)
            obs.producer_calls.append(_fx_producer_call(node, modules, ranks.get(node, {None})))
    for node in graph.nodes:
        if node.op == "call_module" and is_batchnorm(modules.get(node.target)):
            src = _fx_input(node)
            obs.bn_calls.append(BNCall(node.target, index.get(src), _describe_fx(src, modules)))
    return obs, graph


def _fx_input(node: torch.fx.Node):
    if node.args:
        return node.args[0]
    return node.kwargs.get("input")


def merged_rank(ranks: set, out_rank: int) -> Optional[int]:
    """One rank for a call seen at several: the channel-layout rank only when every example
    gave it; otherwise one that is not (so the fold is refused), or None when none is known."""
    known = {r for r in ranks if r is not None}
    if None in ranks or not known:
        return None if not known or known == {out_rank} else max(known - {out_rank})
    return out_rank if known == {out_rank} else max(known - {out_rank})


def _fx_producer_call(node: torch.fx.Node, modules, ranks: set) -> ProducerCall:
    from ._kinds import producer_kind

    pk = producer_kind(modules.get(node.target))
    rank = merged_rank(ranks, pk.out_rank) if pk is not None else None
    users = list(node.users)
    follower, detail = None, ""
    if len(users) == 1:
        user = users[0]
        flat = tree_flatten((user.args, user.kwargs))[0]
        if (
            user.op == "call_module"
            and is_batchnorm(modules.get(user.target))
            and _fx_input(user) is node
            and sum(a is node for a in flat) == 1
        ):
            follower = user.target
    if follower is None:
        detail = f"the output of {node.target} is read by {', '.join(u.name for u in users) or 'nothing'}"
    return ProducerCall(node.target, follower, rank, detail)


def _describe_fx(src, modules) -> str:
    if not isinstance(src, torch.fx.Node):
        return "its input is not a traced value"
    if src.op == "call_module":
        return f"its input comes from {type(modules.get(src.target)).__name__} {src.target}"
    if src.op == "placeholder":
        return f"its input is the model input {src.name}"
    name = getattr(src.target, "__name__", str(src.target))
    return f"its input comes from {src.op} {name}"


# --------------------------------------------------------------------------------------------
# torch.export

PRODUCER_OPS = {
    "aten::conv1d", "aten::conv2d", "aten::conv3d",
    "aten::conv_transpose1d", "aten::conv_transpose2d", "aten::conv_transpose3d",
    "aten::convolution", "aten::linear",
}
BN_EVAL_OPS = {"aten::batch_norm", "aten::_native_batch_norm_legit_no_training"}


def op_name(node: torch.fx.Node) -> str:
    schema = getattr(node.target, "_schema", None)
    return schema.name if schema is not None else ""


def module_path(node: torch.fx.Node) -> Optional[str]:
    """The qualified name of the module whose forward ran this node (innermost), if known."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def bn_eval_output(node: torch.fx.Node) -> Optional[List[torch.fx.Node]]:
    """For an inference BN node, the nodes that read its normalized output; None when the node
    is not an inference BN (training, or its saved statistics are read)."""
    name = op_name(node)
    if name == "aten::batch_norm":
        training = node.args[5] if len(node.args) > 5 else node.kwargs.get("training")
        return None if training is not False else list(node.users)
    if name == "aten::_native_batch_norm_legit_no_training":
        users = list(node.users)
        if all(u.target is operator.getitem and (u.args[1] == 0 or not u.users) for u in users):
            return [r for u in users if u.args[1] == 0 for r in u.users]
        return None
    return None


def _export_fqns(ep) -> Dict[str, str]:
    sig = ep.graph_signature
    return {**sig.inputs_to_parameters, **sig.inputs_to_buffers}


def _signature(example: Example):
    """What torch.export specializes on: shapes, dtypes, devices, and the other values."""
    leaves, spec = tree_flatten(example)
    return str(spec), tuple(
        (tuple(v.shape), v.dtype, str(v.device)) if isinstance(v, torch.Tensor) else repr(v) for v in leaves
    )


def observe_export(root: nn.Module, examples: Sequence[Example]) -> Observation:
    """One export per distinct example signature; the observations are joined, so a BN folds
    only when every example's program allows it (the hooks method joins calls the same way)."""
    if not examples:
        raise ValueError("torch.export needs example inputs")
    seen, joined = set(), None
    for example in examples:
        sig = _signature(example)
        if sig in seen:
            continue
        seen.add(sig)
        obs = _observe_one_export(root, example)
        joined = obs if joined is None else _join(joined, obs)
    if len(seen) > 1:
        joined.notes.append(f"exported once per distinct example shape ({len(seen)} programs)")
    return joined


def _join(a: Observation, b: Observation) -> Observation:
    offset = len(a.producer_calls)
    a.producer_calls.extend(b.producer_calls)
    a.bn_calls.extend(BNCall(c.bn, None if c.producer is None else c.producer + offset, c.source) for c in b.bn_calls)
    for k, v in b.foreign_use.items():
        a.foreign_use.setdefault(k, v)
    a.functional_bns.extend(f for f in b.functional_bns if f not in a.functional_bns)
    return a


def _observe_one_export(root: nn.Module, example: Example) -> Observation:
    args, kwargs = example
    ep = torch.export.export(root, tuple(args), kwargs=dict(kwargs) or None, strict=False)
    fqn = _export_fqns(ep)
    obs = Observation("torch.export")
    modules = dict(root.named_modules())
    _export_foreign_uses(ep, fqn, obs)
    index: Dict[torch.fx.Node, int] = {}
    for node in ep.graph.nodes:
        if node.op == "call_function" and op_name(node) in PRODUCER_OPS:
            path = module_path(node)
            weight = node.args[1]
            if not is_producer_type(modules.get(path)) or fqn.get(getattr(weight, "name", None)) != f"{path}.weight":
                continue  # a functional conv: not a module call (its parameters were flagged above)
            index[node] = len(obs.producer_calls)
            obs.producer_calls.append(_export_producer_call(node, path, fqn, modules))
    for node in ep.graph.nodes:
        if node.op == "call_function" and op_name(node) in BN_EVAL_OPS | {"aten::_native_batch_norm_legit", "aten::_native_batch_norm_legit_functional"}:
            path = _bn_path(node, fqn)
            if path is None or not is_batchnorm(modules.get(path)):
                obs.functional_bns.append(_functional_label(node, fqn))
                continue
            src = node.args[0]
            source = f"its input comes from {op_name(src) or src.op}" if isinstance(src, torch.fx.Node) else ""
            obs.bn_calls.append(BNCall(path, index.get(src), source))
    return obs


def _functional_label(node: torch.fx.Node, fqn: Dict[str, str]) -> str:
    """A batch-norm op outside a BN module, named by the owner of its running mean."""
    mean = node.args[3] if len(node.args) > 3 else None
    name = fqn.get(getattr(mean, "name", None))
    return _owner(name) if name else node.name


def _bn_path(node: torch.fx.Node, fqn: Dict[str, str]) -> Optional[str]:
    """The BN module of a BN node: the owner of its running mean, if that is where it ran."""
    mean = node.args[3] if len(node.args) > 3 else None
    name = fqn.get(getattr(mean, "name", None))
    path = module_path(node)
    if name is None or name != f"{path}.running_mean":
        return None
    return path


def _export_producer_call(node, path, fqn, modules) -> ProducerCall:
    val = node.meta.get("val")
    rank = val.dim() if isinstance(val, torch.Tensor) else None
    users = list(node.users)
    follower = None
    if len(users) == 1 and bn_eval_output(users[0]) is not None and users[0].args[0] is node:
        bn = _bn_path(users[0], fqn)
        flat = tree_flatten((users[0].args, users[0].kwargs))[0]
        if bn is not None and is_batchnorm(modules.get(bn)) and sum(a is node for a in flat) == 1:
            follower = bn
    detail = "" if follower else f"the output of {path} is read by {', '.join(u.name for u in users) or 'nothing'}"
    return ProducerCall(path, follower, rank, detail)


def _export_foreign_uses(ep, fqn: Dict[str, str], obs: Observation) -> None:
    """Flag modules whose parameters or buffers an op outside their own calls reads."""
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in fqn:
            continue
        owner = _owner(fqn[node.name])
        for user in node.users:
            if module_path(user) != owner:
                obs.foreign_use.setdefault(owner, f"{user.name} in {module_path(user) or 'the top-level forward'}")
    for spec in ep.graph_signature.output_specs:
        target = getattr(spec, "target", None)
        if target:  # a buffer the program mutates
            obs.foreign_use.setdefault(_owner(target), f"a mutation of {target}")


# --------------------------------------------------------------------------------------------
# forward hooks + TorchFunctionMode

_BN_FUNCTIONS = {torch.nn.functional.batch_norm, torch.batch_norm}

# Reading these never depends on the values a fold changes.
_METADATA = {
    torch.Tensor.dim, torch.Tensor.size, torch.Tensor.numel, torch.Tensor.__len__,
    torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__, torch.Tensor.device.__get__,
    torch.Tensor.ndim.__get__, torch.Tensor.is_floating_point, torch.Tensor.layout.__get__,
    torch.Tensor.is_contiguous,
}


class _Tracked:
    """A producer call whose output is being watched."""

    def __init__(self, module: str, out: torch.Tensor) -> None:
        self.module = module
        self.ref = weakref.ref(out)
        self.rank = out.dim()
        self.bn_call: Optional[int] = None  # the id of the BN call that took it
        self.bn: Optional[str] = None
        self.other: List[str] = []  # other readers


class _Watcher(TorchFunctionMode):
    """Sees every torch operation while the examples run; attributes each to the module calls
    active at the time."""

    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        self.names = {id(m): n for n, m in root.named_modules()}
        self.stack: List[int] = []  # ids of the module calls in progress
        self.active: Dict[str, int] = {}  # module name -> calls in progress
        self.next_call = 0
        self.tracked: Dict[int, _Tracked] = {}
        self.producers: List[_Tracked] = []
        self.bn_calls: List[Tuple[str, Optional[_Tracked]]] = []
        # parameter id -> (weakref, owners); a tied parameter has several owners
        self.params: Dict[int, Tuple[weakref.ref, List[str]]] = {}
        for name, mod in root.named_modules(remove_duplicate=False):
            if is_batchnorm(mod) or is_producer_type(mod):
                for t in list(mod._parameters.values()) + list(mod._buffers.values()):
                    if t is not None:
                        self.params.setdefault(id(t), (weakref.ref(t), []))[1].append(name)
        self.foreign: Dict[str, str] = {}
        self.bn_depth = 0  # BN module calls in progress
        self.module_stack: List[int] = []  # ids of the modules whose calls are in progress
        self.functional: List[str] = []  # modules that called batch norm outside a BN module

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _BN_FUNCTIONS and not self.bn_depth:
            self.functional.append(self.names.get(self.module_stack[-1], "") if self.module_stack else "")
        if func not in _METADATA:
            self.reads(tree_flatten((args, kwargs))[0], getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)

    def find(self, value) -> Optional[_Tracked]:
        t = self.tracked.get(id(value))
        return t if t is not None and t.ref() is value else None

    def reads(self, values, what: str) -> None:
        for value in values:
            if not isinstance(value, torch.Tensor):
                continue
            t = self.find(value)
            if t is not None and (t.bn_call is None or t.bn_call not in self.stack):
                t.other.append(what)
            p = self.params.get(id(value))
            if p is not None and p[0]() is value and not any(self.active.get(o) for o in p[1]):
                for owner in p[1]:
                    self.foreign.setdefault(owner, f"{what} outside its module's call")

    def pre(self, module, args, kwargs):
        name = self.names.get(id(module))
        self.module_stack.append(id(module))
        self.bn_depth += is_batchnorm(module)
        call = self.next_call
        self.next_call += 1
        self.stack.append(call)
        if name is None:
            return
        self.active[name] = self.active.get(name, 0) + 1
        if is_batchnorm(module):
            value = args[0] if args else kwargs.get("input")
            t = self.find(value)
            if t is not None:
                if t.bn_call is None:
                    t.bn_call, t.bn = call, name
                else:
                    t.other.append(f"a second BN call ({name})")
            self.bn_calls.append((name, t))

    def post(self, module, args, kwargs, output):
        self.stack.pop()
        self.module_stack.pop()
        self.bn_depth -= is_batchnorm(module)
        name = self.names.get(id(module))
        if name is None:
            return
        self.active[name] -= 1
        if is_producer_type(module) and isinstance(output, torch.Tensor):
            t = _Tracked(name, output)
            self.tracked[id(output)] = t
            self.producers.append(t)

    def outputs(self, result) -> None:
        for value in tree_flatten(result)[0]:
            t = self.find(value) if isinstance(value, torch.Tensor) else None
            if t is not None:
                t.other.append("the model's output")


def observe_hooks(root: nn.Module, examples: Sequence[Example]) -> Observation:
    if not examples:
        raise ValueError("observing calls needs example inputs")
    if any(isinstance(m, torch.jit.ScriptModule) for m in root.modules()):
        raise ValueError("operations inside TorchScript modules cannot be observed")
    watcher = _Watcher(root)
    handles = []
    try:
        for mod in root.modules():
            handles.append(mod.register_forward_pre_hook(watcher.pre, with_kwargs=True))
            handles.append(mod.register_forward_hook(watcher.post, with_kwargs=True, always_call=True))
        with quiet_run(root):
            for args, kwargs in examples:
                with watcher:
                    result = root(*args, **kwargs)
                watcher.outputs(result)
                del result
    finally:
        for h in handles:
            h.remove()
    return _hooks_observation(watcher, len(examples))


def _hooks_observation(watcher: _Watcher, n_examples: int) -> Observation:
    obs = Observation("forward-hooks")
    index = {}
    for t in watcher.producers:
        follower = t.bn if t.bn is not None and not t.other else None
        detail = "" if follower else f"the output of {t.module} is read by {', '.join(sorted(set(t.other))) or 'no BN'}"
        index[id(t)] = len(obs.producer_calls)
        obs.producer_calls.append(ProducerCall(t.module, follower, t.rank, detail))
    for name, t in watcher.bn_calls:
        obs.bn_calls.append(BNCall(name, index.get(id(t)) if t is not None else None,
                                   "" if t is not None else "its input is not the output of a conv or linear module call"))
    obs.foreign_use = dict(watcher.foreign)
    for owner in watcher.functional:
        label = f"{owner or '(top level)'}:batch_norm"
        if label not in obs.functional_bns:
            obs.functional_bns.append(label)
    obs.notes.append(
        f"pairs were observed on {n_examples} example input(s); a code path those inputs do not take is not covered"
    )
    return obs

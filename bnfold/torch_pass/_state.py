"""Copies and snapshots of modules, so that observing a model never changes the one returned.

Tracing runs ``forward`` symbolically, shape propagation and hooks run it for real: a Python
counter (``self.calls += 1``) or an in-place buffer update (``self.buf.add_(1)``) would end
changed. bnfold therefore observes a throwaway copy (:func:`throwaway`); where no copy can be
made, it observes the module itself inside :func:`preserved`, which puts every module's
attributes and every tensor's values back afterwards.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn


class ModuleCopyError(TypeError):
    """The module cannot be copied, even with its un-copyable attributes shared."""


def _uncopyable(module: nn.Module) -> Tuple[Dict[int, object], List[str]]:
    """A deepcopy memo that shares every plain attribute that cannot be deep-copied (a lock, a
    file handle, a C++ handle), and the names of those attributes."""
    memo: Dict[int, object] = {}
    names: List[str] = []
    for name, mod in module.named_modules(remove_duplicate=True):
        for key, value in vars(mod).items():
            if key in ("_parameters", "_buffers", "_modules") or isinstance(value, (nn.Module, torch.Tensor)):
                continue
            try:
                copy.deepcopy(value)
            except Exception:  # deepcopy raises whatever the object's pickling raises
                memo[id(value)] = value
                names.append(f"{name}.{key}" if name else key)
    return memo, names


def copy_module(module: nn.Module, memo: Optional[dict] = None) -> Tuple[nn.Module, List[str]]:
    """``(copy, shared)``: a deep copy of ``module``; attributes that cannot be deep-copied are
    shared with the original and named in ``shared``. ``memo`` (optional, a dict) receives the
    deepcopy memo, mapping ``id(original object)`` to its copy.

    Raises ModuleCopyError when even that fails (a module whose own ``__deepcopy__`` raises).
    """
    memo = {} if memo is None else memo
    try:
        return copy.deepcopy(module, memo), []
    except Exception as first:
        memo.clear()
        shared_memo, names = _uncopyable(module)
        memo.update(shared_memo)
        try:
            return copy.deepcopy(module, memo), names
        except Exception:
            raise ModuleCopyError(
                f"{type(module).__name__} cannot be copied ({type(first).__name__}: {first}); "
                "fold it in place with inplace=True"
            ) from None


def throwaway(module: nn.Module) -> Optional[nn.Module]:
    """A copy to observe and discard, or None when none can be made."""
    try:
        return copy_module(module)[0]
    except ModuleCopyError:
        return None


@contextlib.contextmanager
def preserved(module: nn.Module) -> Iterator[None]:
    """Run the block, then put back every module's attributes (rebinding a counter, replacing
    a submodule) and every parameter's and buffer's values (an in-place update)."""
    mods = list(module.modules())
    saved_dicts = [(m, dict(vars(m)), dict(m._parameters), dict(m._buffers), dict(m._modules)) for m in mods]
    saved_values = [
        (t, t.detach().clone())
        for m in mods
        for t in list(m._parameters.values()) + list(m._buffers.values())
        if t is not None
    ]
    try:
        yield
    finally:
        for m, attrs, params, bufs, subs in saved_dicts:
            vars(m).clear()
            vars(m).update(attrs)
            for table, old in ((m._parameters, params), (m._buffers, bufs), (m._modules, subs)):
                table.clear()
                table.update(old)
        with torch.no_grad():
            for t, value in saved_values:
                t.detach().copy_(value)


@contextlib.contextmanager
def observing(module: nn.Module) -> Iterator[nn.Module]:
    """The module to observe: a throwaway copy, or ``module`` itself with its state preserved."""
    probe = throwaway(module)
    if probe is not None:
        yield probe
        return
    with preserved(module):
        yield module

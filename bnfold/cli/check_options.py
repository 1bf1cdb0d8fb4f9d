"""The equivalence check's options, one definition for every command that runs a check
(``bnfold check`` and the fold command): --seed, --shape, --inputs, --batches, --atol, --rtol.

Usage::

    @click.command()
    @with_check_options
    @handles_errors
    def command(..., check_opts):
        kwargs = check_opts.kwargs()   # parsed here, inside handles_errors: bad values are one line
        bnfold.verify.check(a, b, **kwargs)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import click

from ..errors import InputError


@dataclass
class CheckOptions:
    """The raw option values; :meth:`kwargs` parses them into ``bnfold.verify.check`` arguments."""

    seed: int = 0
    shape: Sequence[str] = ()
    inputs_npz: Optional[str] = None
    batches: int = 1
    atol: Sequence[str] = ()
    rtol: Optional[float] = None

    def kwargs(self) -> Dict[str, Any]:
        """Keyword arguments for ``check``. Raises InputError on bad values."""
        from ..verify import parse_atol

        global_atol, per_output = parse_atol(self.atol)
        if self.rtol is not None and not (self.rtol >= 0 and math.isfinite(self.rtol)):
            raise InputError("--rtol must be finite and >= 0")
        return dict(seed=self.seed, batches=self.batches, shapes=parse_shapes(self.shape), inputs_npz=self.inputs_npz,
                    atol=global_atol, rtol=self.rtol, per_output_atol=per_output)


def parse_shapes(values: Sequence[str]) -> Dict[str, Tuple[int, ...]]:
    """``["x:1x3x224x224", "N:4"]`` -> ``{"x": (1, 3, 224, 224), "N": (4,)}``. Raises InputError."""
    from ..verify import parse_shape

    shapes: Dict[str, Tuple[int, ...]] = {}
    for text in values:
        name, dims = parse_shape(text)
        if name in shapes:
            raise InputError(f"--shape {name} given twice")
        shapes[name] = dims
    return shapes


_OPTIONS = [
    click.option("--seed", "check_seed", type=int, default=0, show_default=True,
                 help="Seed of the check's random inputs. Example: --seed 3"),
    click.option("--shape", "check_shape", multiple=True, metavar="NAME:DIMS",
                 help="Shape of an input, or the value of a dynamic dim (dims written -1 or 0 in the model are "
                      "dynamic too). Repeatable. Example: --shape x:1x3x224x224 --shape N:4"),
    click.option("--inputs", "check_inputs", metavar="FILE.npz",
                 help="Real inputs for the check: an .npz with one array per input name (overridable "
                      "initializers too); batchN/NAME keys give several batches. Example: --inputs real.npz"),
    click.option("--batches", "check_batches", type=click.IntRange(min=1), default=1, show_default=True,
                 help="Number of random input batches. Example: --batches 4"),
    click.option("--atol", "check_atol", multiple=True, metavar="VALUE|NAME:VALUE",
                 help="Absolute tolerance for all outputs, or NAME:VALUE for one output. Repeatable. "
                      "Default: relative to each output's scale, by the precision it is computed in. "
                      "Example: --atol 1e-5 --atol logits:1e-3"),
    click.option("--rtol", "check_rtol", type=float, default=None,
                 help="Relative tolerance for outputs and fold sites (default by precision: 1e-4 for float32 "
                      "outputs). Example: --rtol 1e-3"),
]


def with_check_options(func):
    """Add the check options to a click command; it receives them as ``check_opts``."""

    @functools.wraps(func)
    def wrapper(*args, check_seed, check_shape, check_inputs, check_batches, check_atol, check_rtol, **kwargs):
        opts = CheckOptions(check_seed, tuple(check_shape), check_inputs, check_batches, tuple(check_atol), check_rtol)
        return func(*args, check_opts=opts, **kwargs)

    for option in reversed(_OPTIONS):
        wrapper = option(wrapper)
    return wrapper

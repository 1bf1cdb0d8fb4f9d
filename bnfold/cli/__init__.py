"""The ``bnfold`` command. Each subcommand lives in its own module; this one only routes.

``bnfold MODEL -o OUT`` is the ``fold`` command: the group treats a first argument that is
not a command name as the start of a fold.
"""

from __future__ import annotations

import os
import sys

from ._common import STARTED  # noqa: E402,F401  (first: the wall time counts the other imports)

import click  # noqa: E402

from .._version import __version__

EXIT_USAGE = 2


class _DefaultGroup(click.Group):
    """A group whose default command is ``fold``, so ``bnfold IN -o OUT`` works."""

    default_command = "fold"

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version", "--debug"):
            args = [self.default_command] + list(args)
        elif len(args) > 1 and args[0] == "--debug" and args[1] not in self.commands and args[1] not in ("--help", "-h"):
            args = [args[0], self.default_command] + list(args[1:])
        return super().parse_args(ctx, args)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Like click's standalone mode, but a usage error is one line, ``bnfold: error: ...``
        (exit 2), as every other error is, instead of click's usage block."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:  # bare `bnfold`: the help
            exc.show()
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            hint = _help_hint(exc)
            click.echo(f"bnfold: error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:  # Ctrl-C outside a command body
            click.echo("bnfold: error: interrupted", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bnfold", help="Print the version and exit. Example: bnfold --version")
@click.option("--debug", is_flag=True,
              help="Print the traceback of an error (for bug reports). Example: bnfold --debug model.onnx -o f.onnx")
def main(debug: bool) -> None:
    """Fold BatchNorm layers into the linear ops around them, and prove the result equivalent.

    \b
    Commands:
      bnfold MODEL.onnx -o OUT.onnx     fold (the default command; see `bnfold fold --help`)
      bnfold check ORIGINAL FOLDED      compare two models with onnxruntime
      bnfold bench MODEL [OTHER]        measure onnxruntime latency

    \b
    Examples:
      bnfold model.onnx -o model.folded.onnx
      bnfold models/ --out-dir folded/ -j 2 --json report.json
      bnfold check model.onnx model.folded.onnx --batches 4
      bnfold bench model.onnx model.folded.onnx --runs 100

    Every error is one line on stderr, `bnfold: error: ...`, with an exit code:
    1 check failed, 2 bad input or usage, 3 external data, 4 output not writable,
    5 safety limit, 70 internal error, 130 interrupted.
    """
    if debug:
        os.environ["BNFOLD_DEBUG"] = "1"


def _help_hint(exc: click.ClickException) -> str:
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click.UsageError) and ctx is not None:
        return f" (see '{ctx.command_path} --help')"
    return ""


def _register() -> None:
    from . import fold as _fold

    main.add_command(_fold.fold)
    try:  # commands added by later work register themselves if present
        from . import verify_cmds as _verify

        main.add_command(_verify.check)
        main.add_command(_verify.bench)
    except ImportError:
        pass


_register()

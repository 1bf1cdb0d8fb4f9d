"""What every command shares: turning failures into one line on stderr and an exit code."""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # a command's wall time is counted from here (bnfold.cli imports this first)

import functools  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from typing import NoReturn

import click

from ..errors import EXIT_INPUT, EXIT_INTERNAL, EXIT_LIMIT, BnfoldError


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"bnfold: error: {message}", err=True)
    sys.exit(code)


def handles_errors(func):
    """Run a command body; map expected errors to their exit code and bugs to EXIT_INTERNAL.

    A traceback is printed only with BNFOLD_DEBUG=1 (or the group's --debug flag).
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except BnfoldError as exc:
            _maybe_traceback()
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except BrokenPipeError:
            _quiet_exit_on_closed_pipe()
        except MemoryError:
            _maybe_traceback()
            fail("out of memory (the input is too large for this machine)", EXIT_LIMIT)
        except RecursionError:
            _maybe_traceback()
            fail("the input is nested too deeply", EXIT_LIMIT)
        except UnicodeDecodeError:
            _maybe_traceback()
            fail("not a valid model (a string field is not valid UTF-8)", EXIT_INPUT)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:  # a bug: say so in one line, keep the traceback for --debug
            _maybe_traceback()
            fail(f"internal error ({type(exc).__name__}: {exc}); rerun with --debug and report it", EXIT_INTERNAL)

    return wrapper


def _quiet_exit_on_closed_pipe() -> NoReturn:
    """The reader of our output went away (``bnfold ... | head``): stop silently, as shell
    tools do, with the SIGPIPE status, and keep Python from complaining at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(141)


def _maybe_traceback() -> None:
    if os.environ.get("BNFOLD_DEBUG"):
        traceback.print_exc()

"""Errors that reach the user as one line on stderr and a distinct exit code.

Exit codes (the CLI contract, also documented in the README):
  0  success
  1  an equivalence check failed (the folded model computes something else)
  2  bad input or usage: missing file, not an ONNX model, truncated or corrupt file
  3  external data refused or missing (unsafe location, missing file, out-of-range offsets)
  4  the output could not be written
  5  a resource limit was hit (absurd tensor sizes, too deeply nested graphs)
 70  an internal error (a bug in bnfold; rerun with --debug for the traceback)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_INPUT = 2
EXIT_EXTERNAL_DATA = 3
EXIT_OUTPUT = 4
EXIT_LIMIT = 5
EXIT_INTERNAL = 70


class BnfoldError(Exception):
    """An expected failure with a message fit for the user and an exit code."""

    exit_code = EXIT_INPUT


class CheckFailed(BnfoldError):
    """The folded model does not compute what the original computed."""

    exit_code = EXIT_MISMATCH


class InputError(BnfoldError):
    """The input is missing, unreadable, or not a valid model."""

    exit_code = EXIT_INPUT


class ExternalDataError(BnfoldError):
    """A tensor's external data is unsafe, missing or inconsistent."""

    exit_code = EXIT_EXTERNAL_DATA


class OutputError(BnfoldError):
    """The output path cannot be written."""

    exit_code = EXIT_OUTPUT


class LimitError(BnfoldError):
    """The input exceeds a safety limit (sizes, nesting depth)."""

    exit_code = EXIT_LIMIT

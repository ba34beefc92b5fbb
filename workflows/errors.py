"""The one exception type for expected user errors (bad input, missing files, no network).

Commands catch it in main() and print its message as a single line with exit code 2.
"""

from __future__ import annotations

import argparse
import sys

EXIT_USER_ERROR = 2


class UserError(Exception):
    """An expected failure caused by the input, the options or the environment, not by a bug.
    Every stage's error type derives from it, so shared helpers can raise it."""


class EtlError(UserError):
    """An expected ETL failure."""


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message, for wrapping library errors."""
    text = str(exc)
    # Dask wraps a backend's error as "An error occurred ... Original Message: <the real one>".
    text = text.split("Original Message:", 1)[-1].strip().splitlines()
    return text[0] if text else type(exc).__name__


def exit_with(exc: UserError, prog: str) -> None:
    print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line (no usage dump), exit code 2."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)

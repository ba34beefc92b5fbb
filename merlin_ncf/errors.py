"""The one exception type for expected user errors (bad input, missing files, no network),
and the one command-line convention every command follows: such an error, or a bad command
line, is a single line on stderr with exit code 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, NoReturn

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


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows a default only when there is one (not None or False) and the text does not state it."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def run_cli(main: Callable[[], int | None], prog: str | None = None) -> NoReturn:
    """Run a command's main() and exit with its code; a UserError it raises is one line, exit 2."""
    try:
        code = main()
    except UserError as exc:
        exit_with(exc, prog or Path(sys.argv[0]).name)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)

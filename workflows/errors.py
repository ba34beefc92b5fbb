"""The one exception type for expected user errors (bad input, missing files, no network).

Commands catch it in main() and print its message as a single line with exit code 2.
"""

from __future__ import annotations

import sys

EXIT_USER_ERROR = 2


class EtlError(Exception):
    """An expected failure caused by the input or the environment, not by a bug."""


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message, for wrapping library errors."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def exit_with(exc: EtlError, prog: str) -> None:
    print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)

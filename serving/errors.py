"""The serving stage's expected-failure type and the one-line-error wrapper its CLIs share."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from workflows.errors import EXIT_USER_ERROR, UserError


class ServingError(UserError):
    """A user-facing failure: bad input, missing files, an unreachable or failing server."""


class ServerUnavailable(ServingError):
    """The server could not be reached or dropped the connection (e.g. while it restarts):
    the request got no verdict, so sending it again is safe (inference has no side effects)."""


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a CLI's main(); expected failures print one line on stderr and exit 2."""
    try:
        code = main()
    except ServingError as exc:
        print(f"{Path(sys.argv[0]).name}: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)

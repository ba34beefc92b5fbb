"""The serving stage's expected-failure type and the one-line-error wrapper its CLIs share."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from workflows.errors import EXIT_USER_ERROR, UserError


class ServingError(UserError):
    """A user-facing failure: bad input, missing files, an unreachable or failing server."""


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

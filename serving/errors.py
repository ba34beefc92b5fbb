"""The serving stage's expected-failure types."""

from __future__ import annotations

from merlin_ncf.errors import UserError


class ServingError(UserError):
    """A user-facing failure: bad input, missing files, an unreachable or failing server."""


class ServerUnavailable(ServingError):
    """The server could not be reached or dropped the connection (e.g. while it restarts):
    the request got no verdict, so sending it again is safe (inference has no side effects)."""

"""Query the served ensemble over HTTP or gRPC: scores for (user, items), or a user's top-K.

`RecommenderClient` is the Python API (tests, benchmark); the CLI prints a table of raw item
ids, titles and scores, e.g. `python serving/client.py --user 42 --top-k 10`.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path


import numpy as np

from merlin_ncf.errors import OneLineArgumentParser, run_cli
from merlin_ncf.serving.errors import ServerUnavailable, ServingError
from merlin_ncf.serving.names import (RECOMMEND_ENSEMBLE, SCORE, SCORE_KIND, SCORES_ENSEMBLE, TOP_ITEM_ID, TOP_K,
                                      TOP_SCORE, TOP_TITLE)

PROTOCOLS = ("http", "grpc")
DEFAULT_URLS = {"http": "127.0.0.1:8000", "grpc": "127.0.0.1:8001"}
TOP_K_MAX = np.iinfo(np.int32).max  # top_k travels as INT32
RETRY_FIRST_PAUSE_S, RETRY_MAX_PAUSE_S = 0.1, 2.0
# How a connection lost mid-request reads (geventhttpclient, gRPC): no verdict on the request.
_DROPPED = ("connection reset", "connection closed", "socket closed", "broken pipe", "remote end closed",
            "eof", "connection aborted")


@dataclass
class Recommendations:
    item_ids: np.ndarray
    scores: np.ndarray
    titles: list[str]


class RecommenderClient:
    """One connection to the server; not shared between threads. With `retry_for_s`, a request
    that finds the server unreachable (e.g. restarting under serve.py) is sent again on a new
    connection until it gets an answer or that many seconds have passed."""

    def __init__(self, url: str | None = None, protocol: str = "http", user_column: str = "user_id",
                 item_column: str = "item_id", timeout_s: float = 30.0, retry_for_s: float = 0.0):
        if protocol not in PROTOCOLS:
            raise ServingError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
        self.protocol = protocol
        self.url = url or DEFAULT_URLS[protocol]
        self.user_column, self.item_column = user_column, item_column
        self._types: dict[str, dict[str, str]] = {}
        self._api = _tritonclient(protocol)
        self.timeout_s, self.retry_for_s = timeout_s, retry_for_s
        self.retries = 0  # requests sent again after the server was unreachable
        self._client = self._connect()

    def _connect(self):
        try:
            if self.protocol == "http":
                return self._api.InferenceServerClient(self.url, connection_timeout=self.timeout_s,
                                                       network_timeout=self.timeout_s)
            return self._api.InferenceServerClient(self.url)
        except Exception as exc:
            raise ServingError(f"cannot create a {self.protocol} client for {self.url}: {_first_line(exc)}") from None

    # --- requests --------------------------------------------------------------------------

    def scores(self, users, items) -> np.ndarray:
        """The model's score for each (user, item) pair (see score_kind); one user is paired
        with every item."""
        types = self._input_types(SCORES_ENSEMBLE)
        result = self._infer(SCORES_ENSEMBLE, {self.user_column: _ids(users, types[self.user_column]),
                                               self.item_column: _ids(items, types[self.item_column])}, [SCORE])
        return result.as_numpy(SCORE)

    def score_kind(self) -> str:
        """'probability' (a logit model's sigmoid) or 'score' (a ranking score, e.g. Mult-VAE's
        or ConvNCF's), as export recorded it; repositories from before the record hold NeuMF."""
        try:
            if self.protocol == "grpc":
                config = self._client.get_model_config(SCORES_ENSEMBLE, as_json=True)["config"]
            else:
                config = self._client.get_model_config(SCORES_ENSEMBLE)
        except Exception as exc:
            raise self._describe(exc) from None
        return config.get("parameters", {}).get(SCORE_KIND, {}).get("string_value", "probability")

    def recommend(self, user: int, items=None, top_k: int | None = None) -> Recommendations:
        """The `top_k` best items for `user` among `items` (default: every item), best first."""
        k = None if top_k is None else np.array([check_top_k(top_k)], dtype=np.int32)  # before asking the server
        types = self._input_types(RECOMMEND_ENSEMBLE)
        tensors = {self.user_column: _ids([user], types[self.user_column])}
        if items is not None:
            tensors[self.item_column] = _ids(items, types[self.item_column])
        if k is not None:
            tensors[TOP_K] = k
        result = self._infer(RECOMMEND_ENSEMBLE, tensors, [TOP_ITEM_ID, TOP_SCORE, TOP_TITLE])
        titles = [t.decode() if isinstance(t, bytes) else str(t) for t in result.as_numpy(TOP_TITLE).reshape(-1)]
        return Recommendations(_raw(result.as_numpy(TOP_ITEM_ID)), result.as_numpy(TOP_SCORE), titles)

    def _input_types(self, model: str) -> dict[str, str]:
        """The model's input datatypes: raw ids are INT64, or BYTES for a log with string ids."""
        if model not in self._types:
            options = {"as_json": True} if self.protocol == "grpc" else {}
            meta = self._retrying(lambda: self._client.get_model_metadata(model, **options))
            self._types[model] = {spec["name"]: spec["datatype"] for spec in meta["inputs"]}
        return self._types[model]

    def _infer(self, model: str, tensors: dict[str, np.ndarray], outputs: list[str]):
        inputs = []
        for name, array in tensors.items():
            tensor = self._api.InferInput(name, list(array.shape), _triton_dtype(array))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        requested = [self._api.InferRequestedOutput(name) for name in outputs]
        if self.protocol == "grpc":
            return self._retrying(lambda: self._client.infer(model, inputs, outputs=requested,
                                                             client_timeout=self.timeout_s))
        return self._retrying(lambda: self._client.infer(model, inputs, outputs=requested))

    def _retrying(self, call):
        """`call()` (which uses self._client), retried on a fresh connection while the server is unavailable."""
        deadline = time.monotonic() + self.retry_for_s
        for attempt in itertools.count():
            try:
                return call()
            except Exception as exc:
                error = self._describe(exc)
            if not isinstance(error, ServerUnavailable) or time.monotonic() >= deadline:
                raise error
            # A dropped server leaves broken pooled connections behind: start afresh.
            self.retries += 1
            self._client.close()
            # Backoff: many clients polling a restarting server would slow its start-up.
            time.sleep(min(RETRY_FIRST_PAUSE_S * 2 ** attempt, RETRY_MAX_PAUSE_S, max(deadline - time.monotonic(), 0)))
            self._client = self._connect()

    def _describe(self, exc: Exception) -> ServingError:
        message = _first_line(exc)
        lowered = message.lower()
        if any(s in lowered for s in ("connection refused", "failed to connect", "unavailable", "connect call failed")):
            return ServerUnavailable(f"cannot reach tritonserver at {self.url} ({self.protocol}): is serving/serve.py running?")
        if not isinstance(exc, self._api.InferenceServerException) or any(s in lowered for s in _DROPPED):
            return ServerUnavailable(f"tritonserver at {self.url} dropped the request: {message}")
        return ServingError(message)

    # --- server state ----------------------------------------------------------------------

    def is_ready(self) -> bool:
        try:
            return bool(self._client.is_server_ready())
        except Exception:
            return False

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.is_ready():
            if time.monotonic() > deadline:
                raise ServingError(f"tritonserver at {self.url} not ready after {timeout_s:.0f} s")
            time.sleep(0.2)

    def has_model(self, name: str) -> bool:
        try:
            return bool(self._client.is_model_ready(name))
        except Exception:
            return False

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "RecommenderClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_top_k(top_k: int) -> int:
    """top_k as the INT32 the server takes: a larger value would wrap around to a negative one."""
    if not 1 <= top_k <= TOP_K_MAX:
        raise ServingError(f"top_k must be between 1 and {TOP_K_MAX}, got {top_k}")
    return int(top_k)


def _tritonclient(protocol: str):
    if protocol == "http":
        import tritonclient.http as api
    else:
        import tritonclient.grpc as api
    return api


def _ids(values, datatype: str = "INT64") -> np.ndarray:
    """Raw ids as the server takes them: int64, or UTF-8 bytes for a log with string ids."""
    array = np.asarray(values).reshape(-1)
    if datatype == "BYTES":
        return np.array([v if isinstance(v, bytes) else str(v).encode() for v in array], dtype=np.object_)
    if array.dtype.kind in "US":  # "42" from a command line
        try:
            array = array.astype(np.int64)
        except ValueError:
            raise ServingError(f"this server's ids are integers, got {', '.join(map(str, array[:3]))}") from None
    if array.dtype.kind not in "iu":
        raise ServingError(f"ids must be integers, got {array.dtype}")
    return array.astype(np.int64)


def _raw(ids: np.ndarray) -> np.ndarray:
    """Raw ids from a response in their own type: BYTES come back as str."""
    return np.array([i.decode() for i in ids.reshape(-1)], dtype=np.object_) if ids.dtype == np.object_ else ids


def _triton_dtype(array: np.ndarray) -> str:
    return {np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32", np.dtype(np.object_): "BYTES"}[array.dtype]


def _first_line(exc: Exception) -> str:
    text = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


# --- command line --------------------------------------------------------------------------------


def parse_item_list(text: str) -> list[str]:
    """Raw ids as text: the client gives them the server's id type (integers or strings)."""
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items:
        raise ServingError("--items is empty")
    return items


def format_table(user: int, rows: Recommendations, score_label: str = "score") -> str:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"user {user}", title_justify="left")
    table.add_column("rank", justify="right")
    table.add_column("item id", justify="right")
    if any(rows.titles):
        table.add_column("title")
    table.add_column(score_label, justify="right")
    for rank, (item, score, title) in enumerate(zip(rows.item_ids, rows.scores, rows.titles), start=1):
        cells = [str(rank), str(item)] + ([title] if any(rows.titles) else []) + [f"{score:.4f}"]
        table.add_row(*cells)
    console = Console(width=100, force_terminal=False, record=True)
    with console.capture() as capture:
        console.print(table)
    return capture.get()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineArgumentParser(
        description="Ask the served recommender for a user's top-K items, or for scores of given items."
    )
    parser.add_argument("--user", required=True, help="raw user id (as in the input data: an integer or a string)")
    parser.add_argument("--items", type=parse_item_list,
                        help="comma-separated raw item ids to score (default: rank every item)")
    parser.add_argument("--top-k", type=int,
                        help="how many items to show (default: the export's --top-k, or every item given with --items)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="http", help="http (default) or grpc")
    parser.add_argument("--url", help="server address host:port (default 127.0.0.1:8000 for http, :8001 for grpc)")
    parser.add_argument("--serve", type=Path, metavar="REPOSITORY",
                        help="start a tritonserver on this repository (free ports on 127.0.0.1) for this query, "
                        "then stop it: the whole serving stage in one command")
    parser.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the server to become ready (default 0)")
    parser.add_argument("--timeout", type=float, default=30.0, help="request timeout in seconds (default 30)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.top_k is not None and not 1 <= args.top_k <= TOP_K_MAX:
        raise ServingError(f"--top-k must be between 1 and {TOP_K_MAX} (at most the number of items is shown), "
                           f"got {args.top_k}")
    if args.serve is None:
        return query(args, args.url)
    from merlin_ncf.serving.serve import TritonServer

    print(f"starting tritonserver on {args.serve} ...", file=sys.stderr, flush=True)
    with TritonServer(args.serve) as server:
        query(args, server.http_url if args.protocol == "http" else server.grpc_url)
    print("tritonserver stopped", file=sys.stderr)
    return 0


def query(args: argparse.Namespace, url: str | None) -> int:
    with RecommenderClient(url, args.protocol, timeout_s=args.timeout) as client:
        if args.wait:
            client.wait_ready(args.wait)
        elif not client.is_ready():
            raise ServingError(f"cannot reach tritonserver at {client.url} ({args.protocol}): is serving/serve.py running?")
        score_label = client.score_kind()
        if client.has_model(RECOMMEND_ENSEMBLE):
            top_k = args.top_k or (len(args.items) if args.items else None)
            rows = client.recommend(args.user, args.items, top_k)
        elif args.items:  # exported with --top-k 0: scores only, in the order asked
            scores = client.scores([args.user], args.items)
            rows = Recommendations(np.asarray(args.items), scores, [""] * len(args.items))
        else:
            raise ServingError(f"the server has no '{RECOMMEND_ENSEMBLE}' model (exported with --top-k 0): pass --items")
    print(format_table(args.user, rows, score_label), end="")
    return 0


if __name__ == "__main__":
    run_cli(main)

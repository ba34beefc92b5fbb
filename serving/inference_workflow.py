"""A saved NVTabular workflow prepared for low-latency, request-sized transforms.

NVTabular's operators offer compiled inference versions (`Operator.inference_initialize`,
from `nvtabular_cpp`) that encode a request in ~0.1 ms where the pandas path (a merge per
column) takes ~8 ms; merlin-systems' WorkflowRunner leaves them switched off. This module
switches them on, checks on the fitted vocabulary that they encode exactly like the pandas
path, and falls back to the pandas path for any workflow where they do not.

This file is also copied next to the python-backend `model.py` of the workflow step, so it
imports only what a Merlin inference container has.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from merlin.dag import BaseOperator, DataFormats, postorder_iter_nodes
from merlin.dag.executors import LocalExecutor
from merlin.table import TensorTable

try:
    from merlin_ncf.serving.names import FIRST_INDEX, ITEM_COLUMN, SEEN_FILE, UNKNOWN_IDS, UNKNOWN_IDS_CHOICES, USER_COLUMN
except ImportError:  # inside the workflow step, where names.py lies next to this file
    from names import FIRST_INDEX, ITEM_COLUMN, SEEN_FILE, UNKNOWN_IDS, UNKNOWN_IDS_CHOICES, USER_COLUMN

LOG = logging.getLogger(__name__)


class CompiledOperator(BaseOperator):
    """Runs an nvtabular_cpp inference op inside merlin.dag's executor (dict of arrays in and out)."""

    def __init__(self, op: BaseOperator, compiled):
        super().__init__()
        self.op = op
        self._compiled = compiled

    def transform(self, col_selector, transformable):
        return self._compiled.transform(col_selector, transformable)

    def compute_output_schema(self, *args, **kwargs):
        return self.op.compute_output_schema(*args, **kwargs)

    @property
    def supported_formats(self) -> DataFormats:
        return DataFormats.NUMPY_DICT_ARRAY


class InferenceWorkflow:
    """`transform({column: int64[N]}) -> {column: int64[N]}` for the workflow saved in `path`."""

    def __init__(self, path: str | Path, compiled: bool = True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import nvtabular as nvt

            self.workflow = nvt.Workflow.load(str(path))
        self.reference = nvt.Workflow.load(str(path)) if compiled else self.workflow
        self.input_columns = list(self.workflow.input_schema.column_names)
        self.output_columns = list(self.workflow.output_schema.column_names)
        self._executor = LocalExecutor()
        self.compiled = compiled and self._compile()

    def _compile(self) -> bool:
        replaced = 0
        for node in postorder_iter_nodes(self.workflow.output_node):
            initialize = getattr(node.op, "inference_initialize", None)
            if initialize is None:
                continue
            try:
                compiled = initialize(node.input_columns, {})
            except ImportError:  # no nvtabular_cpp in this environment
                compiled = None
            if compiled is not None:
                node.op = CompiledOperator(node.op, compiled)
                replaced += 1
        return replaced > 0

    def transform(self, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.compiled:
            out = self._executor.transform(TensorTable(columns), self.workflow.graph)
            return {name: np.asarray(out[name].values).reshape(-1) for name in self.output_columns}
        return self.transform_with_pandas(columns)

    def transform_with_pandas(self, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """NVTabular's own pandas path (what Workflow.transform runs per partition)."""
        out = self.reference._transform_df(pd.DataFrame(columns))
        return {name: out[name].to_numpy() for name in self.output_columns}

    def string_ids(self, column: str) -> bool:
        """Whether the workflow takes `column` as strings (a log with string ids) rather than int64."""
        return self.workflow.input_schema[column].dtype.element_type.value in ("object", "string")

    def raw_ids(self, column: str, values) -> np.ndarray:
        """Request values in the column's raw type: int64, or str (Triton BYTES arrive as bytes)."""
        values = np.asarray(values).reshape(-1)
        if not self.string_ids(column):
            return values.astype(np.int64)
        return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)

    def vocabulary(self, column: str) -> np.ndarray:
        """Raw values Categorify saw for `column` at fit time (from its unique-values file)."""
        for node in postorder_iter_nodes(self.reference.output_node):
            categories = getattr(node.op, "categories", None) or {}
            if column in categories:
                return pd.read_parquet(categories[column], columns=[column])[column].dropna().to_numpy()
        raise KeyError(f"no Categorify in the workflow encodes {column!r}")

    def verify_compiled(self, sample: dict[str, np.ndarray]) -> None:
        """Fall back to the pandas path unless the compiled ops encode `sample` identically."""
        if not self.compiled:
            return
        fast, slow = self.transform(sample), self.transform_with_pandas(sample)
        mismatched = [c for c in self.output_columns if not np.array_equal(fast[c], slow[c])]
        if mismatched:
            LOG.warning("compiled NVTabular ops disagree with pandas on %s: using the pandas path", mismatched)
            self.workflow, self.compiled = self.reference, False

    def self_check_sample(self, unseen: int = 2) -> dict[str, np.ndarray]:
        """Every fitted value of every input column plus a few never seen, equal lengths."""
        values = {}
        for column in self.input_columns:
            try:
                known = self.raw_ids(column, self.vocabulary(column))
            except KeyError:
                known = self.raw_ids(column, np.zeros(1, np.int64))
            if self.string_ids(column):
                fresh = np.array([f"{max(known, key=len, default='')}-unseen-{i}" for i in range(unseen)], dtype=object)
            else:
                fresh = known.max(initial=0) + 1 + np.arange(unseen, dtype=np.int64)
            values[column] = np.concatenate([known, fresh])
        length = max(len(v) for v in values.values())
        return {c: np.resize(v, length) for c, v in values.items()}


class SeenItems:
    """Each user's training items (encoded, CSR): left out when ranking every item."""

    def __init__(self, offsets: np.ndarray, items: np.ndarray):
        self.offsets, self.items = offsets, items

    @classmethod
    def from_pairs(cls, users: np.ndarray, items: np.ndarray, num_users: int) -> "SeenItems":
        order = np.lexsort((items, users))
        users, items = users[order], items[order]
        # int32 items: half the memory of the largest MovieLens releases, ids stay far below 2**31.
        return cls(np.searchsorted(users, np.arange(num_users + 1)).astype(np.int64), items.astype(np.int32))

    @classmethod
    def load(cls, path: str | Path) -> "SeenItems":
        with np.load(path) as saved:
            return cls(saved["offsets"], saved["items"])

    def save(self, path: str | Path) -> None:
        np.savez_compressed(path, offsets=self.offsets, items=self.items)

    def unseen_mask(self, user: int, items: np.ndarray) -> np.ndarray:
        if not 0 <= user < len(self.offsets) - 1:
            return np.ones(items.size, dtype=bool)
        seen = self.items[self.offsets[user]:self.offsets[user + 1]]
        # A lookup table over the id range: linear in the catalogue, where sorting both is not.
        return ~np.isin(items, seen, kind="table")


class RequestError(ValueError):
    """A request the ensemble cannot answer (empty, mismatched lengths, unknown ids)."""


class RequestEncoder:
    """Raw (user ids, item ids) of one request -> encoded ids for the model, via the workflow.

    One user id is paired with every item id; no item list (None) means every known item.
    Ids that Categorify maps to its reserved indices (unseen at fit time, or rarer than its
    frequency threshold) are an error, or with `unknown_ids="oov"` scored as the OOV index.
    With `unknown_ids="popularity"` unknown users pass as their reserved index (the model step
    answers them with item popularity) and unknown items are an error.
    """

    def __init__(self, workflow: InferenceWorkflow, user_column: str, item_column: str,
                 first_index: int, unknown_ids: str = "error", seen: SeenItems | None = None):
        if unknown_ids not in UNKNOWN_IDS_CHOICES:
            raise ValueError(f"unknown_ids must be one of {UNKNOWN_IDS_CHOICES}, not {unknown_ids!r}")
        self.workflow = workflow
        self.user_column, self.item_column = user_column, item_column
        self.first_index = first_index
        self.unknown_ids = unknown_ids
        self.seen = seen
        self._lookup: dict[str, tuple[pd.Index, np.ndarray]] = {}
        workflow.verify_compiled(workflow.self_check_sample())
        vocabulary = workflow.raw_ids(item_column, workflow.vocabulary(item_column))
        encoded = self._encode(np.repeat(self._any_user(), len(vocabulary)), vocabulary)
        known = encoded[item_column] >= first_index
        self.all_items, self.all_items_encoded = vocabulary[known], encoded[item_column][known]
        users = workflow.raw_ids(user_column, workflow.vocabulary(user_column))
        encoded_users = self._encode(users, np.resize(vocabulary, users.size))[user_column]
        # Categorify encodes each value on its own, so the workflow's answer for every fitted
        # value, kept in a hash index, is its answer in any request: a lookup of ~10 us instead
        # of a pass through merlin.dag's executor (~1 ms). Only ids outside it go through the workflow.
        self._lookup = {user_column: (pd.Index(users), encoded_users), item_column: (pd.Index(vocabulary), encoded[item_column])}

    @classmethod
    def load(cls, step_dir: str | Path, parameters: dict[str, str], compiled: bool = True) -> "RequestEncoder":
        """The encoder of an exported workflow step: its version directory and config parameters."""
        step_dir = Path(step_dir)
        seen_file = step_dir / SEEN_FILE
        return cls(
            InferenceWorkflow(step_dir / "workflow", compiled=compiled),
            parameters[USER_COLUMN], parameters[ITEM_COLUMN], int(parameters[FIRST_INDEX]),
            parameters.get(UNKNOWN_IDS, "error"), SeenItems.load(seen_file) if seen_file.is_file() else None,
        )

    def _any_user(self) -> np.ndarray:
        return self.workflow.raw_ids(self.user_column, self.workflow.vocabulary(self.user_column)[:1])

    def _encode(self, users: np.ndarray, items: np.ndarray) -> dict[str, np.ndarray]:
        """Both columns through the workflow: at start-up to build the lookup, then for ids
        the lookup has not seen (_look_up)."""
        encoded = self.workflow.transform({self.user_column: users, self.item_column: items})
        return {column: values.astype(np.int64, copy=False) for column, values in encoded.items()}

    def _look_up(self, column: str, values: np.ndarray) -> np.ndarray:
        """Each value's code from the fitted values' index; only values outside it (unseen at
        fit time) go through the workflow, paired with a fitted value of the other column."""
        index, codes = self._lookup[column]
        positions = index.get_indexer(values)
        encoded = codes[positions]  # a copy; the unseen (position -1) are replaced below
        unseen = positions < 0
        if unseen.any():
            other = self.item_column if column == self.user_column else self.user_column
            strangers = values[unseen]
            partner = np.resize(self._lookup[other][0][:1].to_numpy(), strangers.size)
            encoded[unseen] = self._encode(*((strangers, partner) if column == self.user_column else (partner, strangers)))[column]
        return encoded

    def encode(self, users: np.ndarray, items: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(encoded users, encoded items, raw items) with one row per scored pair."""
        users = self.workflow.raw_ids(self.user_column, users)
        if users.size == 0:
            raise RequestError(f"{self.user_column} is empty: send one user id, or one per item id")
        if items is None:
            if users.size != 1:
                raise RequestError(f"scoring every item needs exactly one {self.user_column}, got {users.size}")
            return self._encode_for_all_items(users)
        items = self.workflow.raw_ids(self.item_column, items)
        if items.size == 0:
            raise RequestError(f"{self.item_column} is empty: send item ids, or leave {self.item_column} out "
                               "of a 'recommend' request to rank every item")
        if users.size not in (1, items.size):
            raise RequestError(
                f"{users.size} {self.user_column} values for {items.size} {self.item_column} values: "
                "send one user id, or one per item id"
            )
        # One user with many items (the usual request) is looked up once, then repeated.
        encoded_users, encoded_items = self._look_up(self.user_column, users), self._look_up(self.item_column, items)
        if self.unknown_ids == "error":
            self._reject_unknown(self.user_column, users, encoded_users)
        if self.unknown_ids != "oov":
            self._reject_unknown(self.item_column, items, encoded_items)
        return np.resize(encoded_users, items.size), encoded_items, items

    def _encode_for_all_items(self, user: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # The items were encoded once at start-up: only the user is looked up.
        encoded_user = self._look_up(self.user_column, user)
        if self.unknown_ids == "error":
            self._reject_unknown(self.user_column, user, encoded_user)
        items, raw = self.all_items_encoded, self.all_items
        if self.seen is not None:
            unseen = self.seen.unseen_mask(int(encoded_user[0]), items)
            items, raw = items[unseen], raw[unseen]
        return np.repeat(encoded_user, items.size), items, raw

    def _reject_unknown(self, column: str, raw: np.ndarray, encoded: np.ndarray) -> None:
        unknown = np.unique(raw[encoded < self.first_index])
        if unknown.size:
            shown = ", ".join(str(v) for v in unknown[:5]) + (", ..." if unknown.size > 5 else "")
            raise RequestError(f"unknown {column} ({unknown.size}): {shown} (not in the training data's vocabulary)")

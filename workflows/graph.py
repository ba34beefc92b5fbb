"""The NVTabular workflow of the ETL: the encoding (the product, saved for serving), and its
vocabularies applied to partitions. The filters and both splits are Dask reductions and
row-wise maps (workflows/loo.py, workflows/time_split.py): as NVTabular workflows
(JoinGroupby + Filter) each cost a fit pass, a join pass, a written intermediate and a dtype
sample.

Note for any Filter added here: merlin's executor skips empty upstream outputs and re-reads the
columns from the unfiltered input, so any node after a Filter (even a column selection)
resurrects every row of a partition that the Filter emptied; keep a Filter a workflow's last node.
"""

from __future__ import annotations

from pathlib import Path

import nvtabular as nvt
from nvtabular import ops

from merlin_ncf.workflows.readers import ITEM, USER

# The order key ranks a log's rows by (timestamp, position in the input); see split.read_ordered.
ORDER_KEY = "order_key"
INTERACTION = [USER, ITEM, ORDER_KEY]
PAIR = [USER, ITEM]
# Categorify's reserved indices: 0 padding, 1 null, 2 out-of-vocabulary; real ids from 3.
NULL_INDEX, OOV_INDEX, FIRST_INDEX = 1, 2, 3


def encoding(freq_threshold: int, work_dir: Path, passthrough: list[str] = (ORDER_KEY,)
             ) -> tuple[nvt.Workflow, nvt.Workflow]:
    """Categorify users and items, tagged USER_ID/ITEM_ID.

    Returns (etl, saved): `etl` also passes `passthrough` (the order key) through for the split; `saved`
    shares its fitted operators and maps raw user_id, item_id only, for serving.
    """
    def categorify():
        return ops.Categorify(freq_threshold=freq_threshold, out_path=str(work_dir))

    users = [USER] >> categorify() >> ops.TagAsUserID()
    items = [ITEM] >> categorify() >> ops.TagAsItemID()
    return nvt.Workflow(users + items + list(passthrough)), nvt.Workflow(users + items)


def categories_file(workflow: nvt.Workflow, column: str) -> str:
    """The fitted Categorify's vocabulary file of `column`: raw ids, indexed by their encoded id."""
    from merlin.dag import Graph

    return next(node.op.categories[column] for node in Graph.get_nodes_by_op_type([workflow.output_node], ops.Categorify)
                if column in node.op.categories)


def vocabularies(workflow: nvt.Workflow) -> dict:
    """Per id column, the fitted vocabulary as (raw ids as an index, their encoded ids)."""
    import pandas as pd

    tables = {}
    for column in PAIR:
        table = pd.read_parquet(categories_file(workflow, column), columns=[column])
        tables[column] = (pd.Index(table[column]), table.index.to_numpy(dtype="int64"))
    return tables


def encode(frame, tables: dict):
    """A pandas partition with its raw ids replaced by the encoded ones, as the fitted Categorify
    maps them (unseen or rare: OOV_INDEX, null: NULL_INDEX). Hand-written: Categorify's pandas
    transform merges each column with its vocabulary and sorts the result back into row order,
    the ETL's largest single cost; a hash lookup gives the same ids (tests/test_etl_workflow.py)."""
    import numpy as np

    columns = {c: frame[c].values for c in frame.columns}
    for column, (index, codes) in tables.items():
        values = frame[column]
        found = index.get_indexer(values)
        encoded = np.where(found >= 0, codes[found], OOV_INDEX)
        if values.hasnans:
            encoded[values.isna().to_numpy()] = NULL_INDEX
        columns[column] = encoded
    return type(frame)(columns)


def encode_all(ddf, tables: dict):
    """`encode` over every partition of a Dask frame, with the vocabularies sent once."""
    import dask

    return ddf.map_partitions(encode, dask.delayed(tables), meta=encode(ddf._meta, tables))

"""The NVTabular workflows of the ETL: the encoding (the product, saved for serving) and the
time split's first-interaction filter. The other filters and the leave-one-out split are Dask
reductions (workflows/loo.py): as workflows each cost several passes over the log.

Each step is its own Workflow over the previous step's output: Filter before a statistic
inside one graph misaligns rows when its branches are joined, so steps are chained instead.
A Filter is always a workflow's last node, and callers drop helper columns from its output
afterwards: merlin's executor skips empty upstream outputs and re-reads the columns from the
unfiltered input, so any node after a Filter (even a column selection) resurrects every row
of a partition that the Filter emptied.
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
USER_FIRST = f"{USER}_{ORDER_KEY}_min"
# Categorify's reserved indices: 0 padding, 1 null, 2 out-of-vocabulary; real ids from 3.
FIRST_INDEX = 3


def first_of_user(work_dir: Path) -> nvt.Workflow:
    """Keep each user's first interaction in (timestamp, position) order (order keys are unique)."""
    first = [USER] >> ops.JoinGroupby(cont_cols=[ORDER_KEY], stats=["count", "min"], out_path=str(work_dir))
    return nvt.Workflow((INTERACTION + first) >> ops.Filter(lambda df: df[ORDER_KEY] == df[USER_FIRST]))


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

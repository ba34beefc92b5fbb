"""The NVTabular workflows of the ETL, one per step.

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

from merlin_ncf.workflows.readers import ITEM, RATING, USER

# The order key ranks a log's rows by (timestamp, position in the input); see split.read_ordered.
ORDER_KEY = "order_key"
INTERACTION = [USER, ITEM, ORDER_KEY]
PAIR = [USER, ITEM]
COUNT = f"{USER}_count"
LATEST = f"{USER}_{ORDER_KEY}_max"
PAIR_FIRST = f"{USER}_{ITEM}_{ORDER_KEY}_min"
USER_FIRST = f"{USER}_{ORDER_KEY}_min"
FLAGGED = INTERACTION + [COUNT, LATEST]
# Categorify's reserved indices: 0 padding, 1 null, 2 out-of-vocabulary; real ids from 3.
FIRST_INDEX = 3


def rating_filter(min_rating: float) -> nvt.Workflow:
    """Implicit feedback: keep interactions rated at least `min_rating`."""
    kept = (INTERACTION + [RATING]) >> ops.Filter(lambda df: df[RATING] >= min_rating)
    return nvt.Workflow(kept)


def activity_filter(min_interactions: int, work_dir: Path) -> nvt.Workflow:
    """Drop users with fewer than `min_interactions` interactions (adds a count column)."""
    counts = [USER] >> ops.JoinGroupby(cont_cols=[ORDER_KEY], stats=["count"], out_path=str(work_dir))
    return nvt.Workflow((INTERACTION + counts) >> ops.Filter(lambda df: df[COUNT] >= min_interactions))


def first_of_pair(work_dir: Path) -> nvt.Workflow:
    """Keep each (user, item) pair's first interaction in (timestamp, position) order: a
    re-rated item is one interaction, so it can never be both a held-out positive and in train."""
    # "count" too: with "min" alone NVTabular 23.08's groupby loses its key columns (KeyError).
    first = [PAIR] >> ops.JoinGroupby(cont_cols=[ORDER_KEY], stats=["count", "min"], out_path=str(work_dir))
    return nvt.Workflow((INTERACTION + first) >> ops.Filter(lambda df: df[ORDER_KEY] == df[PAIR_FIRST]))


def first_of_user(work_dir: Path) -> nvt.Workflow:
    """Keep each user's first interaction in (timestamp, position) order (order keys are unique)."""
    first = [USER] >> ops.JoinGroupby(cont_cols=[ORDER_KEY], stats=["count", "min"], out_path=str(work_dir))
    return nvt.Workflow((INTERACTION + first) >> ops.Filter(lambda df: df[ORDER_KEY] == df[USER_FIRST]))


def encoding(freq_threshold: int, work_dir: Path) -> tuple[nvt.Workflow, nvt.Workflow]:
    """Categorify users and items, tagged USER_ID/ITEM_ID.

    Returns (etl, saved): `etl` also passes the order key through for the split; `saved`
    shares its fitted operators and maps raw user_id, item_id only, for serving.
    """
    def categorify():
        return ops.Categorify(freq_threshold=freq_threshold, out_path=str(work_dir))

    users = [USER] >> categorify() >> ops.TagAsUserID()
    items = [ITEM] >> categorify() >> ops.TagAsItemID()
    return nvt.Workflow(users + items + [ORDER_KEY]), nvt.Workflow(users + items)


def holdout_flag(work_dir: Path) -> nvt.Workflow:
    """Add each row's user's latest order key and interaction count.

    Order keys are unique (they include the row's position in the input), so the maximum per
    user picks exactly one row, the latest with ties going to the later input row, without a
    shuffle or sort.
    """
    latest = [USER] >> ops.JoinGroupby(cont_cols=[ORDER_KEY], stats=["count", "max"], out_path=str(work_dir))
    return nvt.Workflow(INTERACTION + latest)


def _held_out(df):
    """The user's latest row, except for users with a single interaction and the
    out-of-vocabulary pseudo-user: those keep everything in train."""
    return (df[ORDER_KEY] == df[LATEST]) & (df[COUNT] >= 2) & (df[USER] >= FIRST_INDEX)


def select_holdout(held_out: bool) -> nvt.Workflow:
    """The held-out rows or the rest of a flagged log (all FLAGGED columns: see the module note)."""
    return nvt.Workflow(FLAGGED >> ops.Filter(_held_out if held_out else lambda df: ~_held_out(df)))

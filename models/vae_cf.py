"""The evaluation protocol of Liang et al. (WWW 2018, VAE-CF): strong generalisation over
held-out users, who are never trained on. Each held-out user's items are split at random,
80% "fold-in" (the input the model encodes) and 20% targets; the model ranks every item but
the fold-in ones, and Recall@K and NDCG@K score the targets in that ranking.

Definitions are the paper's code's (Recall_at_k_batch, NDCG_binary_at_k_batch):
- Recall@K = |targets in the top K| / min(K, |targets|), so a perfect ranking scores 1 even
  when a user has more than K targets;
- NDCG@K = sum over the top K of 1/log2(rank + 2) for each target, divided by the ideal
  DCG of min(K, |targets|) targets.
As in models/metrics.py, ties count against the targets (a model scoring everything equal
gets nothing) and a non-finite score is never a hit.

The split: held-out users drawn uniformly from the users with training rows, then for each a
uniform 20% (int(0.2 n), users with fewer than 5 items have none and are left out of the
averages) as targets, both from a fixed seed (98765, the paper's code's), so every training
seed is scored on the same users and items. The items are the user's ETL training items: the
leave-one-out validation and test positives of held-out users are not used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from merlin_ncf.models.multvae import csr_rows
from merlin_ncf.models.ranking import SeenItems

SPLIT_SEED = 98765  # the paper's code's seed for its user and item splits
TARGET_FRACTION = 0.2
MIN_ITEMS = 5  # the paper's code: users with fewer items keep all of them for fold-in
REPORTED = (("recall", 20), ("recall", 50), ("ndcg", 100))  # the paper's table columns
HELDOUT_FRACTION = 0.1  # auto --heldout-users: the paper held out 10k of ml-20m's 137k users (7%)

ScoreRows = Callable[[torch.Tensor], torch.Tensor]  # 0/1 rows [B, num_items] -> scores [B, num_items]


@dataclass
class HeldOutSplit:
    train_users: torch.Tensor  # the training pairs of the users who are trained on
    train_items: torch.Tensor
    heldout: torch.Tensor  # [H] held-out user ids, sorted
    fold_in: SeenItems  # rows of `heldout`, in that order
    targets: SeenItems

    def is_heldout(self, users: torch.Tensor) -> torch.Tensor:
        return torch.isin(users, self.heldout)


def auto_heldout(users: torch.Tensor) -> int:
    return max(1, round(HELDOUT_FRACTION * len(torch.unique(users))))


def split_heldout(users: torch.Tensor, items: torch.Tensor, num_users: int, num_items: int, count: int,
                  seed: int = SPLIT_SEED) -> HeldOutSplit:
    """`count` held-out users and their fold-in / target items (module docstring)."""
    present = torch.unique(users)
    if not 1 <= count < len(present):
        raise ValueError(f"--heldout-users must be in [1, {len(present) - 1}] ({len(present)} users have "
                         f"training rows), got {count}")
    generator = torch.Generator().manual_seed(seed)
    heldout = present[torch.randperm(len(present), generator=generator)[:count]].sort().values
    held = torch.isin(users, heldout)
    local = torch.searchsorted(heldout, users[held])  # row of each pair among the held-out users
    indptr, item = csr_rows(local, items[held], count, num_items)  # repeated pairs once
    lengths = indptr.diff()
    row = torch.repeat_interleave(torch.arange(count), lengths)
    # A random order within each row (stable sorts: by random key, then by row).
    order = torch.argsort(torch.rand(len(row), generator=generator), stable=True)
    order = order[torch.argsort(row[order], stable=True)]
    row, item = row[order], item[order]
    offsets = torch.cumsum(lengths, 0) - lengths
    position = torch.arange(len(row)) - offsets[row]
    n_targets = torch.where(lengths >= MIN_ITEMS, (lengths * TARGET_FRACTION).long(), 0)
    is_target = position < n_targets[row]
    return HeldOutSplit(users[~held], items[~held], heldout,
                        _rows(row[~is_target], item[~is_target], count, num_items),
                        _rows(row[is_target], item[is_target], count, num_items))


def _rows(row: torch.Tensor, item: torch.Tensor, count: int, num_items: int) -> SeenItems:
    return SeenItems(*csr_rows(row, item, count, num_items), num_items)


def dense(rows: SeenItems, local: torch.Tensor) -> torch.Tensor:
    """0/1 float matrix [len(local), num_items] of the given rows."""
    out = torch.zeros(len(local), rows.num_items)
    r, c = rows.coordinates(local)
    out[r, c] = 1.0
    return out


def recall_ndcg_sums(scores: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...]) -> dict:
    """Sums over rows of Recall@K and NDCG@K (module docstring) of scores [B, I] against
    0/1 targets [B, I], for each K; rows without targets count nothing (the caller counts
    users). Hand-written: torchmetrics' retrieval recall divides by |targets|, not
    min(K, |targets|), and takes one query at a time."""
    targets = targets.bool()
    # Targets last among equal scores: columns reordered so that a stable sort puts them there.
    order = torch.argsort(targets.to(torch.int8), dim=1, stable=True)
    scores, targets = scores.gather(1, order), targets.gather(1, order)
    top = max(ks)
    values, ranked = torch.sort(scores, dim=1, descending=True, stable=True)
    hits = (targets.gather(1, ranked[:, :top]) & torch.isfinite(values[:, :top])).double()
    n_targets = targets.sum(dim=1)
    discount = 1.0 / torch.log2(torch.arange(2, top + 2, dtype=torch.float64))
    ideal = torch.cat([torch.zeros(1, dtype=torch.float64), discount.cumsum(0)])
    has = n_targets > 0
    out = {}
    for k in ks:
        best = torch.clamp(n_targets, max=k)
        found = hits[:, :k].sum(dim=1)
        out[f"recall@{k}"] = float((found[has] / best[has]).sum())
        out[f"ndcg@{k}"] = float(((hits[:, :k] * discount[:k]).sum(dim=1)[has] / ideal[best[has]]).sum())
    return out


@torch.no_grad()
def evaluate(score_rows: ScoreRows, split: HeldOutSplit, first_item: int, ks=(20, 50, 100),
             users_per_pass: int = 256) -> dict:
    """Mean Recall@K and NDCG@K over the held-out users with targets, ranking every item but
    their fold-in items and the reserved ids < first_item; and the number of those users."""
    sums: dict = {}
    users = 0
    for lo in range(0, len(split.heldout), users_per_pass):
        local = torch.arange(lo, min(lo + users_per_pass, len(split.heldout)))
        fold_in = dense(split.fold_in, local)
        scores = score_rows(fold_in).float().clone()
        scores[fold_in.bool()] = float("-inf")
        scores[:, :first_item] = float("-inf")
        targets = dense(split.targets, local)
        users += int((targets.sum(dim=1) > 0).sum())
        for key, value in recall_ndcg_sums(scores, targets, tuple(ks)).items():
            sums[key] = sums.get(key, 0.0) + value
    return {**{key: value / max(users, 1) for key, value in sums.items()}, "users": users}


def popularity_rows(split: HeldOutSplit, num_items: int) -> ScoreRows:
    """Popularity among the trained users' rows, the protocol's reference row."""
    counts = torch.bincount(split.train_items, minlength=num_items).float()
    return lambda rows: counts.expand(len(rows), -1)


def describe(metrics: dict) -> str:
    return "  ".join(f"{name.capitalize() if name == 'recall' else name.upper()}@{k} = {metrics[f'{name}@{k}']:.4f}"
                     for name, k in REPORTED)

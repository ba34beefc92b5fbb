"""HR@K and NDCG@K from the rank of each user's held-out positive: over candidate lists
(each row one user's list, the positive first) here, over all items in models/ranking.py.

Ties count against the positive, so a model that scores everything equal gets no credit.
A non-finite score never earns credit: a positive scored NaN or +-inf is a miss (its rank
is past every candidate), and a NaN candidate counts as ranked above the positive. So a
diverged model scores HR = NDCG = 0, never 1 (`>=` alone is False for NaN).

Sums rather than means are returned so that DDP ranks can all-reduce them exactly.
"""

from __future__ import annotations

import torch


def rank_against(positive: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """0-based rank of positive [B] among others [B, C]: the others not strictly below it
    (ties and NaNs count against it); C + 1, past every candidate, when it is not finite."""
    rank = (~(others < positive.unsqueeze(1))).sum(dim=1)
    return torch.where(torch.isfinite(positive), rank, others.shape[1] + 1)


def positive_rank(scores: torch.Tensor) -> torch.Tensor:
    """0-based rank of column 0 among its row (see rank_against)."""
    return rank_against(scores[:, 0], scores[:, 1:])


def sums_from_ranks(rank: torch.Tensor, positive: torch.Tensor, k: int) -> tuple[float, float]:
    """Sum over rows of HR@K (rank < K and a finite positive score) and NDCG@K
    (1/log2(rank + 2) for a hit: one relevant item, so the ideal DCG is 1)."""
    hit = (rank < k) & torch.isfinite(positive)
    ndcg = torch.where(hit, 1.0 / torch.log2(rank.double() + 2.0), torch.zeros((), dtype=torch.float64))
    return float(hit.sum()), float(ndcg.sum())


def hit_and_ndcg_sums(scores: torch.Tensor, k: int) -> tuple[float, float]:
    """Sum over rows of HR@K and NDCG@K of candidate lists, the positive in column 0."""
    scores = scores.float()
    return sums_from_ranks(positive_rank(scores), scores[:, 0], k)

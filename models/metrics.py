"""HR@K and NDCG@K over candidate lists: each row is one user's list, the positive first.

Sums rather than means are returned so that DDP ranks can all-reduce them exactly.
"""

from __future__ import annotations

import torch


def positive_rank(scores: torch.Tensor) -> torch.Tensor:
    """0-based rank of column 0 among its row; ties count against the positive, so a model
    that scores everything equal gets no credit."""
    return (scores[:, 1:] >= scores[:, :1]).sum(dim=1)


def hit_and_ndcg_sums(scores: torch.Tensor, k: int) -> tuple[float, float]:
    """Sum over rows of HR@K (positive within the top K) and NDCG@K (1/log2(rank + 2))."""
    rank = positive_rank(scores.float())
    hit = rank < k
    ndcg = torch.where(hit, 1.0 / torch.log2(rank.double() + 2.0), torch.zeros((), dtype=torch.float64))
    return float(hit.sum()), float(ndcg.sum())

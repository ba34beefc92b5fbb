"""HR/NDCG/Recall on candidate lists and over the full ranking, on hand-made and random
scores, cross-checked against torchmetrics' retrieval metrics (an independent implementation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.metrics import hit_and_ndcg_sums, positive_rank


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_positive_is_never_a_hit(bad):
    # A diverged model scoring NaN everywhere used to get HR = NDCG = 1.0 (NaN >= NaN is False).
    everywhere = torch.full((3, 5), bad)
    assert hit_and_ndcg_sums(everywhere, k=10) == (0.0, 0.0)
    assert hit_and_ndcg_sums(everywhere, k=2) == (0.0, 0.0)
    only_positive = torch.tensor([[bad, 0.1, 0.2, 0.3]])
    assert hit_and_ndcg_sums(only_positive, k=10) == (0.0, 0.0)  # K beyond the list length too
    assert positive_rank(only_positive).tolist() == [4]  # after every candidate


def test_a_nan_negative_counts_against_the_positive():
    scores = torch.tensor([[0.5, float("nan"), 0.1], [0.5, float("-inf"), 0.1], [0.5, float("inf"), 0.9]])
    assert positive_rank(scores).tolist() == [1, 0, 2]
    hits, ndcg = hit_and_ndcg_sums(scores, k=1)
    assert hits == 1.0 and ndcg == 1.0


def test_float16_and_bfloat16_scores_rank_like_float32():
    scores = torch.tensor([[0.5, 0.25, 0.75], [1.0, 0.5, float("nan")]])
    for dtype in (torch.float16, torch.bfloat16):
        assert hit_and_ndcg_sums(scores.to(dtype), k=2) == hit_and_ndcg_sums(scores, k=2)

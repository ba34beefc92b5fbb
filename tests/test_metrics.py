"""HR/NDCG/Recall on candidate lists and over the full ranking, on hand-made and random
scores, cross-checked against torchmetrics' retrieval metrics (an independent implementation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from merlin_ncf.models.metrics import hit_and_ndcg_sums, positive_rank


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


# --- an independent implementation: torchmetrics' retrieval metrics ---------------------

def torchmetrics_reference(preds: list[torch.Tensor], positive_at: list[int], k: int) -> tuple[float, float, float]:
    """Mean HR@K, Recall@K and NDCG@K of torchmetrics over queries (scores, index of the one
    relevant item). The positive is nudged to the next float below its score, so that it
    ranks after every tie (our rule) whatever order torchmetrics' sort leaves ties in."""
    from torchmetrics.retrieval import RetrievalHitRate, RetrievalNormalizedDCG, RetrievalRecall

    flat, target, indexes = [], [], []
    for query, (scores, at) in enumerate(zip(preds, positive_at)):
        scores = scores.float().clone()  # torchmetrics computes in float32
        scores[at] = torch.nextafter(scores[at], torch.tensor(float("-inf")))
        flat.append(scores)
        target.append(torch.arange(len(scores)) == at)
        indexes.append(torch.full((len(scores),), query))
    flat, target, indexes = torch.cat(flat), torch.cat(target), torch.cat(indexes)
    return tuple(float(metric(top_k=k)(flat, target, indexes=indexes))
                 for metric in (RetrievalHitRate, RetrievalRecall, RetrievalNormalizedDCG))


@pytest.mark.parametrize("levels", [5, 1000, 0])  # few distinct scores (many ties), some, none
@pytest.mark.parametrize("k", [1, 10])
def test_sampled_metrics_match_torchmetrics(levels, k):
    generator = torch.Generator().manual_seed(levels * 31 + k)
    scores = torch.rand(300, 101, generator=generator)
    if levels:
        scores = (scores * levels).floor() / levels
    hits, ndcg = hit_and_ndcg_sums(scores, k)
    hr_ref, recall_ref, ndcg_ref = torchmetrics_reference(list(scores), [0] * len(scores), k)
    assert hits / len(scores) == pytest.approx(hr_ref, abs=1e-6) == pytest.approx(recall_ref, abs=1e-6)
    assert ndcg / len(scores) == pytest.approx(ndcg_ref, abs=1e-6)


def test_planted_lists_match_torchmetrics_and_hand_computed_values():
    # Ranks 0, 3 (two ties above), 2, 9 (last): HR@3 = 2/4 ... computed by hand.
    scores = torch.tensor([
        [9.0, 1, 2, 3, 4, 5, 6, 7, 8, 0],
        [5.0, 5, 5, 6, 1, 1, 1, 1, 1, 1],
        [5.0, 7, 6, 1, 1, 1, 1, 1, 1, 1],
        [0.0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    ])
    assert positive_rank(scores).tolist() == [0, 3, 2, 9]
    hits, ndcg = hit_and_ndcg_sums(scores, k=3)
    assert hits == 2.0 and ndcg == pytest.approx(1.0 + 0.5)
    hr_ref, _, ndcg_ref = torchmetrics_reference(list(scores), [0] * 4, 3)
    assert (hits / 4, ndcg / 4) == (pytest.approx(hr_ref), pytest.approx(ndcg_ref))


# --- full ranking ------------------------------------------------------------------------

def random_full_ranking_case(seed: int, users=40, items=60, first_index=3, levels=0):
    from merlin_ncf.models.ranking import SeenItems, interaction_matrix

    rng = np.random.default_rng(seed)
    pairs = [(u, i) for u in range(users) for i in rng.choice(np.arange(first_index, items), 8, replace=False)]
    user_ids, item_ids = map(np.array, zip(*pairs))
    matrix = interaction_matrix(user_ids, item_ids, users, items)
    positives = torch.from_numpy(rng.integers(first_index, items, users))  # sometimes also a train item
    scores = torch.from_numpy(rng.random((users, items)).astype(np.float32))
    if levels:
        scores = (scores * levels).floor()
    return scores, positives, matrix, SeenItems.from_csr(matrix)


@pytest.mark.parametrize("levels", [0, 4])
@pytest.mark.parametrize("k", [1, 10])
def test_full_ranking_matches_torchmetrics_on_the_eligible_items(levels, k):
    from merlin_ncf.models.ranking import full_ranking_sums

    first_index = 3
    scores, positives, matrix, seen = random_full_ranking_case(levels + k, levels=levels)
    users = torch.arange(len(scores))
    recall, ndcg, count = full_ranking_sums(lambda u: scores[u], users, positives, seen, first_index, k, max_scores=130)
    preds, positive_at = [], []
    for user in range(len(scores)):
        train_items = set(matrix[user].indices.tolist()) - {int(positives[user])}
        eligible = [i for i in range(first_index, scores.shape[1]) if i not in train_items]
        preds.append(scores[user, eligible])
        positive_at.append(eligible.index(int(positives[user])))
    hr_ref, recall_ref, ndcg_ref = torchmetrics_reference(preds, positive_at, k)
    assert count == len(scores)
    assert recall / count == pytest.approx(recall_ref, abs=1e-6) == pytest.approx(hr_ref, abs=1e-6)
    assert ndcg / count == pytest.approx(ndcg_ref, abs=1e-6)
    assert scores.isfinite().all()  # the caller's scores are not masked in place


def test_full_ranking_excludes_train_items_and_reserved_indices_but_not_the_positive():
    from merlin_ncf.models.ranking import SeenItems, full_ranking_sums, interaction_matrix

    # Items 0-2 reserved, 3-9 real. User 0 trained on 8 and 9, which (like the reserved
    # slots) score above the positive 5: excluded, the positive ranks first. User 1 also has
    # its positive 7 in train (a re-rated item): it is still ranked, behind 9 only.
    matrix = interaction_matrix(np.array([0, 0, 1, 1]), np.array([8, 9, 7, 3]), 2, 10)
    scores = torch.tensor([[9.0, 9, 9, 0, 0, 5, 0, 0, 8, 8], [0.0, 0, 0, 9, 0, 0, 0, 5, 0, 6]])
    recall, ndcg, count = full_ranking_sums(lambda u: scores[u], torch.tensor([0, 1]), torch.tensor([5, 7]),
                                            SeenItems.from_csr(matrix), first_index=3, k=1)
    assert (recall, ndcg, count) == (1.0, 1.0, 2.0)
    recall, ndcg, _ = full_ranking_sums(lambda u: scores[u], torch.tensor([0, 1]), torch.tensor([5, 7]),
                                        SeenItems.from_csr(matrix), first_index=3, k=2)
    assert recall == 2.0 and ndcg == pytest.approx(1.0 + 1.0 / math.log2(3))


def test_full_ranking_gives_a_diverged_model_nothing():
    from merlin_ncf.models.ranking import full_ranking_sums

    scores, positives, _, seen = random_full_ranking_case(0)
    for bad in (float("nan"), float("inf")):
        assert full_ranking_sums(lambda u: torch.full((len(u), 60), bad), torch.arange(40), positives,
                                 seen, 3, 10)[:2] == (0.0, 0.0)


def test_score_all_items_scores_like_candidate_lists_in_any_chunking():
    from merlin_ncf.models.neumf import NeuMF
    from merlin_ncf.models.ranking import score_all_items

    torch.manual_seed(0)
    model = NeuMF(7, 50, mf_dim=4, mlp_layers=[8, 8, 4], dropout=0.5)
    users = torch.tensor([1, 6, 3])
    whole = score_all_items(model, 50, candidates_per_pass=10**6)(users)
    model.eval()
    expected = model(users, torch.arange(50).expand(3, -1))
    assert torch.allclose(whole, expected, atol=1e-6)  # eval mode: no dropout
    assert torch.allclose(score_all_items(model, 50, candidates_per_pass=1)(users), whole, atol=1e-6)

"""Popularity, EASE and ItemKNN against their closed forms (numpy, float64) on tiny matrices,
and on a planted data set where co-consumption, not popularity, predicts the held-out item."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merlin_ncf.models.baselines import EASE, BaselineError, ItemKNN, Popularity
from merlin_ncf.models.metrics import hit_and_ndcg_sums
from merlin_ncf.models.ranking import SeenItems, full_ranking_sums, interaction_matrix


def random_matrix(seed=0, users=30, items=12):
    rng = np.random.default_rng(seed)
    dense = rng.random((users, items)) < 0.3
    user_ids, item_ids = np.nonzero(dense)
    return interaction_matrix(user_ids, item_ids, users, items), dense.astype(np.float64)


def test_popularity_scores_training_counts():
    matrix, dense = random_matrix()
    model = Popularity().fit(matrix)
    users, items = torch.tensor([0, 5]), torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert torch.equal(model.score(users, items), torch.from_numpy(dense.sum(0)).float()[items])
    assert torch.equal(model.score_all(users)[1], torch.from_numpy(dense.sum(0)).float())


def ease_reference(dense: np.ndarray, l2: float) -> np.ndarray:
    precision = np.linalg.inv(dense.T @ dense + l2 * np.eye(dense.shape[1]))
    return np.eye(dense.shape[1]) - precision / np.diag(precision)


@pytest.mark.parametrize("users", [8, 40])  # fewer users than items: the Woodbury form
def test_ease_scores_like_the_closed_form(users):
    matrix, dense = random_matrix(3, users=users, items=20)
    model = EASE(2.0).fit(matrix)
    ids = torch.tensor([0, 5, 7])
    assert np.allclose(model.score_all(ids).numpy(), dense[[0, 5, 7]] @ ease_reference(dense, 2.0), atol=1e-4)


def test_ease_is_steck_closed_form():
    matrix, dense = random_matrix(1)
    l2 = 3.0
    precision = np.linalg.inv(dense.T @ dense + l2 * np.eye(dense.shape[1]))
    weights = np.eye(dense.shape[1]) - precision / np.diag(precision)
    model = EASE(l2).fit(matrix)
    assert np.allclose(model.weights.numpy(), weights, atol=1e-5)
    assert np.allclose(np.diag(model.weights.numpy()), 0.0)
    users = torch.tensor([0, 7, 29])
    assert np.allclose(model.score_all(users).numpy(), dense[[0, 7, 29]] @ weights, atol=1e-4)
    items = torch.tensor([[0, 3], [5, 1], [11, 2]])
    assert torch.allclose(model.score(users, items), model.score_all(users).gather(1, items))


def test_itemknn_is_cosine_with_shrink_and_top_k_neighbours():
    matrix, dense = random_matrix(2)
    gram = dense.T @ dense
    norms = np.sqrt(np.diag(gram))
    cosine = gram / (np.outer(norms, norms) + 2.0)
    np.fill_diagonal(cosine, 0.0)
    assert np.allclose(ItemKNN(neighbours=100, shrink=2.0).fit(matrix).weights.numpy(), cosine, atol=1e-6)
    kept = ItemKNN(neighbours=3, shrink=2.0).fit(matrix).weights.numpy()
    assert ((kept != 0).sum(axis=0) <= 3).all()
    for column in range(cosine.shape[1]):
        assert np.allclose(np.sort(kept[:, column])[-3:], np.sort(cosine[:, column])[-3:], atol=1e-6)


def test_dense_item_models_refuse_a_catalogue_above_their_memory_limit():
    matrix, _ = random_matrix()
    for model in (EASE(max_bytes=1000), ItemKNN(max_bytes=1000)):
        with pytest.raises(BaselineError, match=r"GiB for 12 items .*above its limit"):
            model.fit(matrix)
    with pytest.raises(BaselineError):
        EASE(l2=0)


def test_item_models_beat_popularity_where_co_consumption_predicts_the_held_out_item():
    # Items 3-12 in pairs (3,4), (5,6), ...: a user who took one item of a pair holds out the
    # other. Item 13 is the most popular and taken by nobody who holds it out.
    rng = np.random.default_rng(0)
    users, items, held_out = [], [], []
    for user in range(200):
        pair = 3 + 2 * rng.integers(0, 5)
        first, second = (pair, pair + 1) if rng.random() < 0.5 else (pair + 1, pair)
        users += [user, user]
        items += [first, 13]
        held_out.append(second)
    for user in range(200, 300):  # pair completers teach the co-occurrence
        pair = 3 + 2 * rng.integers(0, 5)
        users += [user, user]
        items += [pair, pair + 1]
    matrix = interaction_matrix(np.array(users), np.array(items), 300, 14)
    test_users = torch.arange(200)
    positives = torch.tensor(held_out)
    negatives = torch.tensor([[i for i in range(3, 14) if i != p][:5] for p in held_out])
    lists = torch.cat([positives.unsqueeze(1), negatives], dim=1)
    seen = SeenItems.from_csr(matrix)
    results = {}
    for model in (Popularity(), EASE(l2=10.0), ItemKNN(neighbours=5)):
        model.fit(matrix)
        sampled_hits, _ = hit_and_ndcg_sums(model.score(test_users, lists), k=1)
        full_hits, _, _ = full_ranking_sums(model.score_all, test_users, positives, seen, first_index=3, k=1)
        results[model.name] = (sampled_hits / 200, full_hits / 200)
    assert results["EASE"] == (1.0, 1.0) and results["ItemKNN"] == (1.0, 1.0)
    assert results["popularity"][1] < 0.5

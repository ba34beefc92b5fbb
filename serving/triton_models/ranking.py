"""Ranking candidates by score, shared by the top-K step (copied next to its model.py) and the tests."""

import numpy as np


def best_first(candidates: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k best candidates: each candidate once (its first occurrence), best
    score first, ties in request order, NaN last. Sorts only the candidates scoring at least
    the m-th best score (m = k, doubled while duplicates leave fewer than k), not all of them."""
    key = np.where(np.isnan(scores), np.inf, -scores)
    count = key.size
    m = min(k, count)
    while True:
        pool = np.flatnonzero(key <= np.partition(key, m - 1)[m - 1]) if m < count else np.arange(count)
        pool = pool[np.argsort(key[pool], kind="stable")]
        _, first = np.unique(candidates[pool], return_index=True)
        if first.size >= k or m == count:
            return pool[np.sort(first)][:k]
        m = min(2 * m, count)

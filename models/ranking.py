"""Full-ranking Recall@K and NDCG@K: each held-out positive ranked against ALL items, what
the user did before it (history_matrix: training items, and for test the validation positive)
and Categorify's reserved indices (< first_index) excluded.

Sampled metrics (101 candidates, models/metrics.py) can mis-order models (Krichene & Rendle,
KDD 2020); these rank over the whole catalogue. With one held-out positive per user,
Recall@K equals HR@K over the full ranking, and NDCG@K is 1/log2(rank + 2) for a hit.
Ties and NaNs count against the positive and a non-finite positive is a miss, as in
models/metrics.py. The positive itself is never excluded, even when the user also has it in
train (a re-rated item): it is what is being ranked.

Only torch, numpy, scipy and pyarrow are imported, so RecBole's environment (no Merlin) can
score its model with exactly these functions (benchmarks/recbole_baseline.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from merlin_ncf.models.metrics import hit_and_ndcg_sums, rank_against, sums_from_ranks

ScoreAll = Callable[[torch.Tensor], torch.Tensor]  # users [B] -> scores [B, num_items]


def read_pairs(files, user_column: str, item_column: str, label_column: str | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """(users, items) int64 arrays of parquet files, rows with label <= 0 dropped when the
    files have that column. pyarrow rather than merlin.io: RecBole's venv has no Merlin."""
    import pyarrow.parquet as pq

    users, items = [], []
    for path in files:
        columns = [user_column, item_column]
        names = pq.read_schema(path).names
        with_label = label_column is not None and label_column in names
        table = pq.read_table(path, columns=columns + ([label_column] if with_label else []))
        user = table.column(user_column).to_numpy().astype(np.int64)
        item = table.column(item_column).to_numpy().astype(np.int64)
        if with_label:
            keep = table.column(label_column).to_numpy() > 0
            user, item = user[keep], item[keep]
        users.append(user)
        items.append(item)
    return np.concatenate(users), np.concatenate(items)


def interaction_matrix(users: np.ndarray, items: np.ndarray, num_users: int, num_items: int):
    """Binary users x items scipy CSR matrix (repeated pairs count once), sorted indices."""
    from scipy import sparse

    matrix = sparse.csr_matrix((np.ones(len(users), dtype=np.float32), (users, items)),
                               shape=(num_users, num_items))
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


def train_matrix(spec) -> "scipy.sparse.csr_matrix":  # noqa: F821
    """The train positives of an ETL output (a merlin_ncf.feature_spec.FeatureSpec) as a
    binary users x items CSR matrix: what baselines fit on and full ranking excludes."""
    users, items = read_pairs(spec.files("train"), spec.user_feature, spec.item_feature, spec.label_feature)
    return interaction_matrix(users, items, spec.num_users, spec.num_items)


def history_matrix(spec, mapping: str, train=None) -> "scipy.sparse.csr_matrix":  # noqa: F821
    """What each user did before `mapping`'s positives, as the binary users x items CSR matrix
    full ranking excludes: the train positives (`train`, when the caller has read them), plus
    the validation positives when ranking test. The test lists' sampled negatives avoid both
    (workflows/negatives.py), so full ranking competes the positive against the same items."""
    train = train_matrix(spec) if train is None else train
    if mapping != "test" or not spec.has_mapping("validation"):
        return train
    users, lists = read_lists(spec, "validation")
    history = (train + interaction_matrix(users.numpy(), lists[:, 0].numpy(), *train.shape)).tocsr()
    history.data[:] = 1.0
    return history


def read_lists(spec, mapping: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Users [U] and candidate items [U, 1 + negatives] (positive first) of an ETL output's
    validation or test lists, read like models.data.load_candidates but with pyarrow, so that
    every model of benchmarks/quality.py, RecBole's included, is scored on the same arrays."""
    per_list = spec.test_samples_per_series
    users, items = read_pairs(spec.files(mapping), spec.user_feature, spec.item_feature)
    if len(users) == 0 or len(users) % per_list:
        raise ValueError(f"{mapping} has {len(users)} rows, not a multiple of test_samples_per_series={per_list}")
    users, items = torch.from_numpy(users).view(-1, per_list), torch.from_numpy(items).view(-1, per_list)
    if not bool((users == users[:, :1]).all()):
        raise ValueError(f"{mapping} rows are not contiguous lists of {per_list} per user")
    return users[:, 0].contiguous(), items.contiguous()


@dataclass
class SeenItems:
    """Each user's excluded items (history_matrix) as CSR index arrays (torch), for masking scores."""

    indptr: torch.Tensor  # [num_users + 1]
    indices: torch.Tensor  # [nnz]
    num_items: int

    @classmethod
    def from_csr(cls, matrix) -> "SeenItems":
        return cls(torch.from_numpy(matrix.indptr.astype(np.int64)),
                   torch.from_numpy(matrix.indices.astype(np.int64)), int(matrix.shape[1]))

    def coordinates(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row in the batch, item) of every training item of users [B], vectorised."""
        users = users.cpu()
        starts, ends = self.indptr[users], self.indptr[users + 1]
        lengths = ends - starts
        rows = torch.repeat_interleave(torch.arange(len(users)), lengths)
        offsets = torch.cumsum(lengths, 0) - lengths  # where each row's run starts in `rows`
        within = torch.arange(len(rows)) - torch.repeat_interleave(offsets, lengths)
        return rows, self.indices[torch.repeat_interleave(starts, lengths) + within]


def full_ranking_sums(score_all: ScoreAll, users: torch.Tensor, positives: torch.Tensor, seen: SeenItems,
                      first_index: int, k: int = 10, max_scores: int = 2**22) -> tuple[float, float, float]:
    """Sums of Recall@K (= HR@K) and NDCG@K over users [U] with held-out positives [U],
    and the number of users, for a DDP all-reduce; users are scored `max_scores // num_items`
    at a time so the score matrix stays bounded (score_all bounds its own intermediates)."""
    recall = ndcg = 0.0
    per_pass = max(1, max_scores // seen.num_items)
    for lo in range(0, len(users), per_pass):
        batch_users = users[lo:lo + per_pass]
        scores = score_all(batch_users).to(torch.float32, copy=True)  # masked in place below
        if scores.shape != (len(batch_users), seen.num_items):
            raise ValueError(f"score_all gave {tuple(scores.shape)}, expected ({len(batch_users)}, {seen.num_items})")
        recall_batch, ndcg_batch = _batch_sums(scores, batch_users, positives[lo:lo + len(batch_users)],
                                               seen, first_index, k)
        recall, ndcg = recall + recall_batch, ndcg + ndcg_batch
    return recall, ndcg, float(len(users))


def _batch_sums(scores, users, positives, seen, first_index, k):
    rows = torch.arange(len(users), device=scores.device)
    positives = positives.to(scores.device)
    positive = scores[rows, positives].clone()
    seen_rows, seen_items = seen.coordinates(users)
    scores[seen_rows.to(scores.device), seen_items.to(scores.device)] = float("-inf")
    scores[:, :first_index] = float("-inf")
    scores[rows, positives] = float("-inf")  # it is not its own competitor
    return sums_from_ranks(rank_against(positive, scores), positive, k)


def score_all_items(model: torch.nn.Module, num_items: int, candidates_per_pass: int = 2**18) -> ScoreAll:
    """score_all for a model with forward(user [B], item [B, C]) -> [B, C] (NeuMF and its
    branches): every item scored for each user, `candidates_per_pass` (user, item) pairs per
    forward pass."""

    @torch.no_grad()
    def score_all(users: torch.Tensor) -> torch.Tensor:
        model.eval()
        device = next(model.parameters()).device
        users = users.to(device)
        items = torch.arange(num_items, device=device)
        per_pass = max(1, candidates_per_pass // num_items)
        return torch.cat([model(users[lo:lo + per_pass], items.expand(len(users[lo:lo + per_pass]), -1)).float()
                          for lo in range(0, len(users), per_pass)])

    return score_all


def evaluate(score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], score_all: ScoreAll,
             users: torch.Tensor, lists: torch.Tensor, seen: SeenItems, first_index: int, k: int = 10,
             lists_per_pass: int = 4096, full: bool = True) -> dict[str, float]:
    """Means over users of sampled HR@K / NDCG@K on their candidate lists [U, C] (positive
    first) and (if `full`) full-ranking Recall@K / NDCG@K of the same positive, in one process."""
    hits = ndcg = 0.0
    with torch.no_grad():
        for lo in range(0, len(users), lists_per_pass):
            h, n = hit_and_ndcg_sums(score(users[lo:lo + lists_per_pass], lists[lo:lo + lists_per_pass]), k)
            hits, ndcg = hits + h, ndcg + n
    count = max(float(len(users)), 1.0)
    result = {f"hr@{k}": hits / count, f"ndcg@{k}": ndcg / count, "users": len(users)}
    if full:
        recall, full_ndcg, _ = full_ranking_sums(score_all, users, lists[:, 0], seen, first_index, k)
        result.update({f"full_recall@{k}": recall / count, f"full_ndcg@{k}": full_ndcg / count})
    return result

"""Non-neural baselines scored on the same candidate lists and full ranking as NeuMF.

Simple baselines often match neural recommenders (Dacrema et al., RecSys 2019), so users see
the lift. Each fits a binary users x items scipy CSR matrix of train positives
(models.ranking.train_matrix) and scores like a model:

    score(users [B], items [B, C]) -> [B, C]      score_all(users [B]) -> [B, num_items]

- Popularity: the item's training count, the same for every user.
- EASE (Steck, WWW 2019): B = I - P diag(1/diag(P)), P = (X'X + lambda I)^-1; score = X_u B.
- ItemKNN: cosine item-item similarity X'X / (|i| |j| + shrink), top-k neighbours per item.

EASE and ItemKNN hold dense items x items float32 matrices (items^2 x 4 bytes each, about
three at once while fitting; EASE with fewer users than items: users x items instead), so
they refuse data above `max_bytes` (default 8 GiB) with one line.
"""

from __future__ import annotations

import numpy as np
import torch

from merlin_ncf.errors import UserError


class BaselineError(UserError):
    """A baseline cannot fit this data (e.g. too many items for a dense item-item model)."""


class Baseline:
    name = "baseline"

    def fit(self, matrix) -> "Baseline":
        raise NotImplementedError

    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.score_all(users).gather(1, items)


class Popularity(Baseline):
    name = "popularity"

    def fit(self, matrix) -> "Popularity":
        self.counts = torch.from_numpy(np.asarray(matrix.sum(axis=0), dtype=np.float32).ravel())
        return self

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.counts[items]

    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        return self.counts.expand(len(users), -1)


class ItemItem(Baseline):
    """Shared by EASE and ItemKNN: score = the user's train row times an item-item matrix."""

    max_bytes = 8 * 2**30

    def check_size(self, need: int, what: str) -> None:
        if need > self.max_bytes:
            raise BaselineError(f"{self.name} needs ~{need / 2**30:.1f} GiB for {what}, "
                                f"above its limit of {self.max_bytes / 2**30:.1f} GiB")

    def gram(self, matrix) -> torch.Tensor:
        """X'X, dense float32: co-occurrence counts of item pairs."""
        items = matrix.shape[1]
        self.check_size(3 * items**2 * 4, f"{items:,} items (3 dense items x items float32 matrices)")
        self.matrix = matrix.tocsr().astype(np.float32)
        return torch.from_numpy((self.matrix.T @ self.matrix).toarray())

    @torch.no_grad()
    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        # scipy's sparse x dense product: torch's sparse CSR matmul is still beta and warns.
        return torch.from_numpy(np.asarray(self.matrix[users.cpu().numpy()] @ self.weights.numpy()))


class EASE(ItemItem):
    """With fewer users than items (ml-latest-small: 610 x 9.7k), the Woodbury identity
    P = (I - X' (XX' + lambda I)^-1 X) / lambda needs a users x users inverse instead of an
    items x items one (seconds, not minutes) and B is never materialised:
    X_u B = X_u - (X_u P) diag(1/diag(P)), whose diagonal is zero by construction."""

    name = "EASE"

    def __init__(self, l2: float = 500.0, max_bytes: int | None = None):
        if l2 <= 0:
            raise BaselineError(f"EASE's l2 must be positive, got {l2}")
        self.l2 = float(l2)
        if max_bytes is not None:
            self.max_bytes = max_bytes

    def fit(self, matrix) -> "EASE":
        users, items = matrix.shape
        if users < items:
            return self._fit_dual(matrix)
        gram = self.gram(matrix)
        gram.diagonal().add_(self.l2)
        precision = torch.linalg.inv(gram)  # 5x faster than torch's cholesky_inverse on CPU
        del gram
        precision /= -precision.diagonal().clone()  # column j divided by -P_jj
        precision.diagonal().zero_()
        self.weights, self.woodbury = precision, None
        return self

    def _fit_dual(self, matrix) -> "EASE":
        users, items = matrix.shape
        self.check_size(2 * users * items * 4 + users**2 * 8,
                        f"{users:,} users x {items:,} items (users x items float32 matrices)")
        self.matrix = matrix.tocsr().astype(np.float32)
        outer = (self.matrix @ self.matrix.T).toarray().astype(np.float64)
        outer[np.diag_indices(users)] += self.l2
        # X' (XX' + l I)^-1, items x users
        self.woodbury = np.asarray(self.matrix.T @ np.linalg.inv(outer), dtype=np.float32)
        self.diagonal = (1.0 - np.asarray(self.matrix.T.multiply(self.woodbury).sum(axis=1)).ravel()) / self.l2
        return self

    @torch.no_grad()
    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        if self.woodbury is None:
            return super().score_all(users)
        history = self.matrix[users.cpu().numpy()]
        dense = history.toarray()
        through = np.asarray(history @ self.woodbury)  # X_u X' (XX' + l I)^-1: [B, users]
        times_p = (dense - np.asarray(self.matrix.T @ through.T).T) / self.l2
        return torch.from_numpy((dense - times_p / self.diagonal).astype(np.float32))


class ItemKNN(ItemItem):
    name = "ItemKNN"

    def __init__(self, neighbours: int = 100, shrink: float = 10.0, max_bytes: int | None = None):
        self.neighbours, self.shrink = int(neighbours), float(shrink)
        if max_bytes is not None:
            self.max_bytes = max_bytes

    def fit(self, matrix) -> "ItemKNN":
        similarity = self.gram(matrix)
        norms = similarity.diagonal().sqrt()
        similarity /= norms.unsqueeze(1) * norms.unsqueeze(0) + self.shrink + 1e-12
        similarity.diagonal().zero_()
        if self.neighbours < similarity.shape[0]:
            # Keep, for each scored item (column), its k most similar items.
            kept = torch.zeros_like(similarity)
            top = similarity.topk(self.neighbours, dim=0)
            kept.scatter_(0, top.indices, top.values)
            similarity = kept
        self.weights = similarity
        return self

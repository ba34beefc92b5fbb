"""Negative sampling on the training device: N items per positive, fresh each epoch.

Two modes (`--negative-sampling`):
- uniform: items drawn uniformly from the real items, like NVIDIA's NCF. A negative may be
  one of the user's positives (or the positive itself), with probability about the user's
  share of the catalogue: ~0.5% on ml-20m on average, but ~6% on ml-latest-small and up to
  ~44% for its heaviest users.
- exclude-seen: like RecBole, a draw that hits one of the user's training items is redrawn.
  Membership is a torch.searchsorted over the sorted (user * items + item) keys of the
  training pairs, so it stays vectorised on the training device; redraws come from the same
  seeded generator, so a resumed run draws exactly what an uninterrupted one would have.

Items are drawn from [first_index, cardinality), skipping Categorify's reserved
padding/null/OOV rows.
"""

from __future__ import annotations

import torch
from merlin_ncf.models.seeds import rank_seed

# A user who has seen nearly every item could redraw forever; after this many rounds the
# few remaining collisions are kept (they are then as rare as uniform sampling's, squared).
MAX_REDRAWS = 50


def epoch_generator(seed: int, epoch: int, rank: int, device: torch.device) -> torch.Generator:
    """A generator whose stream depends only on (seed, epoch, rank), so a resumed run
    draws exactly what an uninterrupted one would have drawn from that epoch on."""
    generator = torch.Generator(device=device)
    generator.manual_seed(rank_seed(seed, epoch, rank))
    return generator


def seen_keys(users: torch.Tensor, items: torch.Tensor, num_items: int) -> torch.Tensor:
    """Sorted unique int64 keys user * num_items + item of the training pairs."""
    return torch.unique(users.long() * num_items + items.long())  # unique() sorts


class NegativeSampler:
    def __init__(self, first_item: int, num_items: int, negatives: int = 4, seen: torch.Tensor | None = None):
        """`seen`: sorted keys from seen_keys() to reject (exclude-seen); None samples uniformly."""
        if negatives < 1:
            raise ValueError("negatives per positive must be >= 1")
        if num_items - first_item < 2:
            raise ValueError(f"need at least 2 items to sample from [{first_item}, {num_items})")
        self.low, self.high, self.negatives = int(first_item), int(num_items), int(negatives)
        self.seen = seen
        self._labels: torch.Tensor | None = None

    def to(self, device: torch.device) -> "NegativeSampler":
        if self.seen is not None:
            self.seen = self.seen.to(device)
        return self

    def candidates(self, positives: torch.Tensor, generator: torch.Generator,
                   users: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """items [B, 1 + N] (the positive first, then N negatives) and labels [B, 1 + N]."""
        rows = positives.shape[0]
        items = torch.randint(self.low, self.high, (rows, 1 + self.negatives),
                              generator=generator, device=positives.device, dtype=positives.dtype)
        items[:, 0] = positives
        if self.seen is not None:
            if users is None:
                raise ValueError("exclude-seen sampling needs the batch's users")
            self._redraw_seen(items, users.to(positives.device), generator)
        return items, self.labels(rows, positives.device)

    def is_seen(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Boolean mask: (users[:, None], items) is a training pair (users [B], items [B, N]);
        or (users, items) element-wise when both are 1-d."""
        keys = (users.long().unsqueeze(1) if items.dim() == 2 else users.long()) * self.high + items.long()
        where = torch.searchsorted(self.seen, keys).clamp_(max=len(self.seen) - 1)
        return self.seen[where] == keys

    def _redraw_seen(self, items: torch.Tensor, users: torch.Tensor, generator: torch.Generator) -> None:
        negatives = items[:, 1:]
        rows, cols = self.is_seen(users, negatives).nonzero(as_tuple=True)
        for _ in range(MAX_REDRAWS):  # later rounds look only at the draws just redrawn
            if len(rows) == 0:
                break
            fresh = torch.randint(self.low, self.high, (len(rows),), generator=generator,
                                  device=items.device, dtype=items.dtype)
            still = self.is_seen(users[rows], fresh)
            negatives[rows, cols] = fresh
            rows, cols = rows[still], cols[still]

    def labels(self, rows: int, device: torch.device) -> torch.Tensor:
        """1 for the positive column, 0 for the negatives; cached, as every batch but the
        last has the same shape."""
        if self._labels is None or self._labels.shape[0] != rows or self._labels.device != device:
            self._labels = torch.zeros((rows, 1 + self.negatives), dtype=torch.float32, device=device)
            self._labels[:, 0] = 1.0
        return self._labels

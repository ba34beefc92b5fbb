"""The model contract: what the shared trainer, metrics, checkpoints, hub entry and export
need from a model (after RecBole's input_type / calculate_loss / predict / full_sort_predict).

A model is a `Recommender` subclass that declares
- `input_type`: the batches its loss takes, built by the trainer:
    "pointwise"  PointwiseBatch(user [B], item [B, 1 + N], label [B, 1 + N]): the sampler's rows;
    "pairwise"   PairwiseBatch(user [B], positive [B], negative [B]): one negative per positive;
    "user_rows"  UserRowsBatch(user [B]): shuffled user ids; the model holds the users' rows
                 and says whose they are (`row_users()`: the users the trainer shuffles);
- `loss(batch, *, step)`: a scalar to minimise (`step`: optimizer steps taken so far, for
  schedules inside the loss such as Mult-VAE's KL annealing);
- `score(user [B], items [B, C]) -> [B, C]`: higher is better (sampled metrics, serving);
- `score_all(user [B]) -> [B, nb_items]`: every item, masking nothing (full ranking; the
  default chunks score() over the catalogue, models override it when one product does it:
  those have all-item scoring, which serving traces as catalogue.pt, see `every_item_module`);
- `item_side() -> {name: tensor}` and `score_all_with(user, side)`: score_all split into its
  user-independent part, which every_item_module computes once at export, and the rest
  (default: nothing to precompute);
- `score_pairs(user [N], item [N]) -> [N]`: what serving traces (see `serving_module`);
- `output`: "logit" when sigmoid(score) is a probability (pointwise BCE models), else "score";
- `config`: its constructor's keyword arguments, JSON-serialisable, with `nb_users` and
  `nb_items`, so `registry.build_model(name, config)` rebuilds it for checkpoints and the hub;
- `add_arguments(group)`, `check_arguments(args)`, `from_args(args, data)`: its command-line
  options and how they (plus `DataFacts`) build it; `needs_interactions` says that `from_args`
  wants the training (user, item) pairs in `DataFacts.interactions`; `train_defaults`: the
  training options (TrainOptions fields) its paper or reference uses, for the CLI's defaults;
  `sparse_embeddings`: its embedding tables may take sparse gradients (--optimizer sparse-adam).
Adding a model: one subclass and one line in models/registry.py.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

INPUT_TYPES = ("pointwise", "pairwise", "user_rows")
OUTPUTS = ("logit", "score")


@dataclass
class PointwiseBatch:
    user: torch.Tensor  # [B]
    item: torch.Tensor  # [B, 1 + N], the positive first
    label: torch.Tensor  # [B, 1 + N] float32, 1 for the positive

    @property
    def samples(self) -> int:
        return self.label.numel()


@dataclass
class PairwiseBatch:
    user: torch.Tensor  # [B]
    positive: torch.Tensor  # [B]
    negative: torch.Tensor  # [B]

    @property
    def samples(self) -> int:
        return self.user.numel()


@dataclass
class UserRowsBatch:
    user: torch.Tensor  # [B]

    @property
    def samples(self) -> int:
        return self.user.numel()


@dataclass(frozen=True)
class DataFacts:
    """What a model may need from the data at construction."""

    num_users: int
    num_items: int
    first_item: int = 0  # ids below are Categorify's reserved rows
    interactions: tuple[np.ndarray, np.ndarray] | None = None  # train (users, items), if needs_interactions


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


class Recommender(nn.Module):
    input_type: ClassVar[str]
    output: ClassVar[str] = "score"
    needs_interactions: ClassVar[bool] = False
    train_defaults: ClassVar[dict] = {}
    # Its nn.Embedding tables are only looked up in loss(), never read whole: their gradients
    # may be sparse and updated row-wise (--optimizer sparse-adam).
    sparse_embeddings: ClassVar[bool] = False
    score_all_chunk: ClassVar[int] = 2**20  # (user, item) pairs per score() call in score_all
    # Its options (dest names) that only initialise a new training run from another run's
    # weights: --mode test and --resume, which build no new model, refuse them rather than
    # ignore them (train_ncf.py check_combinations).
    init_options: ClassVar[tuple[str, ...]] = ()
    config: dict

    @classmethod
    def training_defaults(cls, args) -> dict:
        """train_defaults for this run's arguments (a model whose options select another
        model's shape, as NeuMF's --variant, answers for that one)."""
        return cls.train_defaults

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if getattr(cls, "input_type", None) not in INPUT_TYPES:
            raise TypeError(f"{cls.__name__}.input_type must be one of {INPUT_TYPES}")
        if cls.output not in OUTPUTS:
            raise TypeError(f"{cls.__name__}.output must be one of {OUTPUTS}")

    @property
    def num_items(self) -> int:
        return int(self.config["nb_items"])

    def forward(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.score(user, items)

    def loss(self, batch, *, step: int) -> torch.Tensor:
        raise NotImplementedError

    def score(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score_all(self, user: torch.Tensor) -> torch.Tensor:
        rows = max(1, user.numel())
        width = max(1, self.score_all_chunk // rows)
        parts = []
        for lo in range(0, self.num_items, width):
            items = torch.arange(lo, min(lo + width, self.num_items), device=user.device)
            parts.append(self.score(user, items.expand(user.numel(), -1)))
        return torch.cat(parts, dim=1)

    def item_side(self) -> dict[str, torch.Tensor]:
        return {}

    def score_all_with(self, user: torch.Tensor, side: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.score_all(user)

    @classmethod
    def scores_all_items(cls) -> bool:
        """Whether the model has its own all-item scoring (overrides score_all), rather than
        the default that chunks score() over the catalogue."""
        return cls.score_all is not Recommender.score_all

    def score_pairs(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        return self.score(user, item.unsqueeze(1)).squeeze(1)

    def row_users(self) -> torch.Tensor:
        """user_rows models: the sorted ids of the users whose rows the model holds."""
        raise NotImplementedError

    @classmethod
    def add_arguments(cls, group) -> None:
        """Add this model's options to an argparse group (defaults = the constructor's)."""

    @classmethod
    def check_arguments(cls, args: argparse.Namespace) -> None:
        """Raise ValueError (one line) for option values that cannot work."""

    @classmethod
    def from_args(cls, args: argparse.Namespace, data: DataFacts) -> "Recommender":
        return cls(data.num_users, data.num_items)


class Objective(nn.Module):
    """model.loss as forward(): DistributedDataParallel only synchronises gradients of what
    runs through its forward, so the trainer wraps this, not the model."""

    def __init__(self, model: Recommender):
        super().__init__()
        self.model = model

    def forward(self, batch, step: int) -> torch.Tensor:
        return self.model.loss(batch, step=step)


class PairScorer(nn.Module):
    """forward(user int64[N], item int64[N]) -> float32[N]: sigmoid(score) for "logit"
    models (a probability, as docs/pipeline.md has it for NeuMF), the raw score otherwise."""

    def __init__(self, model: Recommender):
        super().__init__()
        self.model = model
        self.probability = model.output == "logit"

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        scores = self.model.score_pairs(user, item).float()
        return torch.sigmoid(scores) if self.probability else scores


class EveryItemScorer(nn.Module):
    """forward(user int64[1]) -> float32[nb_items]: the model's score_all for one user, as
    PairScorer gives it (sigmoid for "logit" models), with item_side() computed once here and
    kept as buffers: a request does only the user-dependent part."""

    def __init__(self, model: Recommender):
        super().__init__()
        self.model = model
        self.probability = model.output == "logit"
        with torch.no_grad():
            side = model.item_side()
        self.side_names = list(side)
        for name, rows in side.items():
            self.register_buffer(f"side_{name}", rows.detach().clone())

    def forward(self, user: torch.Tensor) -> torch.Tensor:
        side = {name: getattr(self, f"side_{name}") for name in self.side_names}
        scores = self.model.score_all_with(user, side).squeeze(0).float()
        return torch.sigmoid(scores) if self.probability else scores


def _for_tracing(model: Recommender) -> Recommender:
    return copy.deepcopy(model).cpu().eval().requires_grad_(False)


def serving_module(model: Recommender) -> torch.jit.ScriptModule:
    """The TorchScript model.ts of any registered model. Traced in eval mode, so that
    training-only branches (dropout masks, Mult-VAE's sampling) are pruned."""
    example = (torch.tensor([0, 1, 0], dtype=torch.int64), torch.tensor([0, 0, 1], dtype=torch.int64))
    with torch.no_grad():
        return torch.jit.trace(PairScorer(_for_tracing(model)), example, check_trace=False)


def every_item_module(model: Recommender) -> torch.jit.ScriptModule | None:
    """EveryItemScorer(model) traced (serving's catalogue.pt), or None for a model without
    all-item scoring of its own (scores_all_items), which serving answers with pairs."""
    if not model.scores_all_items():
        return None
    with torch.no_grad():
        return torch.jit.trace(EveryItemScorer(_for_tracing(model)), (torch.tensor([0], dtype=torch.int64),),
                               check_trace=False)

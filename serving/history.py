"""What the repository keeps of the ETL output's interactions, the same for every model: each
user's items (left out when ranking every item) and item popularity (the answer for an
unknown user with --unknown-ids popularity)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from merlin_ncf.feature_spec import FeatureSpec
from merlin_ncf.serving.inference_workflow import SeenItems


def _pairs(spec: FeatureSpec, held_out: bool) -> pd.DataFrame:
    user, item, label = spec.user_feature, spec.item_feature, spec.label_feature
    frames = [pd.read_parquet(f, columns=[user, item]) for f in spec.files("train")]
    for split in ("validation", "test") if held_out else ():
        if spec.has_mapping(split):
            for f in spec.files(split):
                lists = pd.read_parquet(f, columns=[user, item, label])
                frames.append(lists.loc[lists[label] > 0, [user, item]])
    return pd.concat(frames, ignore_index=True)


def seen_items(spec: FeatureSpec) -> SeenItems:
    """Every (user, item) the ETL output holds: training pairs and the held-out positives."""
    pairs = _pairs(spec, held_out=True)
    return SeenItems.from_pairs(pairs[spec.user_feature].to_numpy(np.int64), pairs[spec.item_feature].to_numpy(np.int64),
                                spec.num_users)


def item_popularity(spec: FeatureSpec) -> np.ndarray:
    """float32 [num_items]: the share of training users who have each item (training pairs
    only: the held-out positives are what evaluation asks for)."""
    pairs = _pairs(spec, held_out=False).drop_duplicates()
    counts = np.bincount(pairs[spec.item_feature].to_numpy(np.int64), minlength=spec.num_items)
    users = max(1, pairs[spec.user_feature].nunique())
    return (counts / users).astype(np.float32)


class UnknownUsersByPopularity(torch.nn.Module):
    """The run's scoring, except that users below `first_index` (Categorify's reserved indices:
    ids unseen at ETL time) get item popularity: forward(user [N], item [N]) -> [N] around
    model.pt, or forward(user [1]) -> [num_items], every item, around catalogue.pt."""

    def __init__(self, model: torch.jit.ScriptModule, popularity: np.ndarray, first_index: int):
        super().__init__()
        self.model = model
        self.register_buffer("popularity", torch.from_numpy(popularity))
        self.first_index = first_index

    def forward(self, user: torch.Tensor, item: torch.Tensor | None = None) -> torch.Tensor:
        unknown = user < self.first_index
        # The model is asked about a known user instead: no model has to score a reserved row.
        known = torch.where(unknown, torch.full_like(user, self.first_index), user)
        if item is None:
            return torch.where(unknown, self.popularity, self.model(known))
        return torch.where(unknown, self.popularity[item], self.model(known, item))


def with_popularity(model: torch.jit.ScriptModule, popularity: np.ndarray, first_index: int,
                    every_item: bool = False) -> torch.jit.ScriptModule:
    """`model` (model.pt, or with `every_item` catalogue.pt) wrapped in UnknownUsersByPopularity.
    Traced, not scripted: one class serves both signatures (tracing keeps the branch taken)."""
    wrapper = UnknownUsersByPopularity(model, popularity, first_index)
    user = torch.tensor([first_index], dtype=torch.int64)
    example = (user,) if every_item else (user.repeat(2), torch.tensor([0, 1], dtype=torch.int64))
    with torch.no_grad():
        return torch.jit.trace(wrapper, example, check_trace=False)

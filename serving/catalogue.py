"""Every item's score for one user in one pass, for the NeuMF family (neumf, gmf, mlp).

model.pt scores (user, item) pairs: ranking a 27k-item catalogue through it repeats the user's
embeddings and the user half of the first MLP layer 27k times and the item half once per
request. Here the item-side work that does not depend on the user is done once, at export:
GMF's item table stays a matrix (the GMF part of the logit is one matrix-vector product) and
the item half of the first MLP layer, item_emb @ W_item + b for every item, is stored. A
request then adds the user half to it (broadcast), applies ReLU and the remaining layers over
every item row. The same operations as NeuMF.forward in the same order, so the scores equal
model.pt's within float rounding (export checks it on every item: checks.check_catalogue).

Saved as the model step's `catalogue.pt`: forward(user int64[1]) -> float32[num_items], a
score for every item row (reserved rows included; the steps index the known ones). Other
model families have no such form and keep scoring pairs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from merlin_ncf.models.registry import build_model

FAMILY = ("neumf", "gmf", "mlp")


class CatalogueScorer(nn.Module):
    def __init__(self, model: nn.Module, probability: bool, popularity: np.ndarray | None, first_index: int):
        super().__init__()
        model = model.eval()
        self.probability, self.first_index = probability, int(first_index)
        self.use_gmf, self.use_mlp = bool(model.use_gmf), bool(model.use_mlp)
        weight = model.final.weight.detach().squeeze(0)
        self.register_buffer("bias", model.final.bias.detach().clone())
        with torch.no_grad():
            if self.use_gmf:
                mf_dim = model.gmf_user.embedding_dim
                self.register_buffer("gmf_users", model.gmf_user.weight.detach().clone())
                self.register_buffer("gmf_items", model.gmf_item.weight.detach().clone())
                self.register_buffer("gmf_weight", weight[:mf_dim].clone())
                weight = weight[mf_dim:]
            if self.use_mlp:
                half = model.mlp_user.embedding_dim
                first, bias = model.mlp_first.scaled_parameters()
                self.register_buffer("mlp_users", model.mlp_user.weight.detach().clone())
                self.register_buffer("first_user", first[:, :half].detach().clone())
                # The user-independent half of the first layer, for every item, once.
                self.register_buffer("item_part", F.linear(model.mlp_item.weight, first[:, half:], bias).detach())
                self.rest = model.mlp_rest
                self.register_buffer("mlp_weight", weight.clone())
        self.with_popularity = popularity is not None
        if popularity is not None:
            self.register_buffer("popularity", torch.from_numpy(np.asarray(popularity, np.float32)))

    def forward(self, user: torch.Tensor) -> torch.Tensor:
        known = user
        if self.with_popularity:  # as history.UnknownUsersByPopularity: a known row is scored, then replaced
            known = torch.where(user < self.first_index, torch.full_like(user, self.first_index), user)
        logits = self.bias
        if self.use_gmf:
            logits = logits + torch.mv(self.gmf_items, self.gmf_users[known].squeeze(0) * self.gmf_weight)
        if self.use_mlp:
            user_part = F.linear(self.mlp_users[known], self.first_user)
            hidden = self.rest((self.item_part + user_part).relu_())
            logits = logits + torch.mv(hidden, self.mlp_weight)
        scores = torch.sigmoid(logits) if self.probability else logits
        if self.with_popularity:
            scores = torch.where(user < self.first_index, self.popularity, scores)
        return scores


def catalogue_scorer(run: Path, name: str, probability: bool, popularity: np.ndarray | None,
                     first_index: int) -> torch.jit.ScriptModule | None:
    """The traced CatalogueScorer of the run's model, or None for a family without one, or a
    run whose model.ts is not the registry's model as contract.serving_module traces it (an
    older run): those keep scoring pairs."""
    if name not in FAMILY:
        return None
    try:
        config = json.loads((run / "config.json").read_text())["model"]["config"]
        model = build_model(name, config)
        traced = torch.jit.load(str(run / "model.ts"), map_location="cpu")
        # model.ts is contract.PairScorer(model): its state is the model's under "model.".
        model.load_state_dict({key.removeprefix("model."): value for key, value in traced.state_dict().items()})
    except (OSError, KeyError, TypeError, ValueError, RuntimeError):
        return None
    scorer = CatalogueScorer(model, probability, popularity, first_index).eval()
    with torch.no_grad():
        return torch.jit.trace(scorer, (torch.tensor([first_index], dtype=torch.int64),), check_trace=False)

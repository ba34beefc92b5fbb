"""Every item's score for one user in one pass (the model step's `catalogue.pt`): the run's
registry model rebuilt from config.json and model.ts, and its own all-item scoring traced
(models/contract.py every_item_module: score_all with the item side computed once, here).

model.pt scores (user, item) pairs: ranking a 27k-item catalogue through it repeats, per pair,
work that does not depend on the user (for NeuMF the item half of the first MLP layer). A
model family without all-item scoring of its own (ConvNCF) has no catalogue.pt and keeps
scoring pairs; export says so.
"""

from __future__ import annotations

from pathlib import Path

import torch

from merlin_ncf.errors import one_line
from merlin_ncf.models.contract import Recommender, every_item_module
from merlin_ncf.models.registry import build_model, model_class
from merlin_ncf.serving.errors import ServingError
from merlin_ncf.serving.inputs import RunModel


def registry_model(run: RunModel, torchscript: Path, pairs: torch.jit.ScriptModule) -> Recommender:
    """The run's model as the registry builds it from config.json, with the weights of its
    model.ts (`pairs`, loaded once by inputs.locate_inputs): contract.serving_module traces
    PairScorer(model), whose state is the model's under "model."."""
    try:
        model = build_model(run.name, run.config)
        model.load_state_dict({key.removeprefix("model."): value for key, value in pairs.state_dict().items()})
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        # load_state_dict's message is a heading line, then one line per problem: show the first problem.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 and lines[0].endswith(":") else one_line(exc)
        raise ServingError(f"{torchscript} does not hold the {run.name} model its config.json describes: "
                           f"{detail}") from None
    return model.eval()


def catalogue_module(run: RunModel, torchscript: Path, pairs: torch.jit.ScriptModule) -> torch.jit.ScriptModule | None:
    """catalogue.pt: forward(user int64[1]) -> float32[num_items], model.pt's score of every
    item row for that user; None for a family without all-item scoring (it scores pairs)."""
    try:
        family = model_class(run.name)
    except KeyError as exc:
        raise ServingError(f"{torchscript.parent / 'config.json'}: {one_line(exc)}") from None
    if not family.scores_all_items():
        return None
    return every_item_module(registry_model(run, torchscript, pairs))

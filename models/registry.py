"""Model names -> classes, so checkpoints, the hub entry and export rebuild any model from
its config (a dict of constructor arguments). New models register here."""

from __future__ import annotations

from torch import nn

from models.neumf import NeuMF

MODELS: dict[str, type[nn.Module]] = {"neumf": NeuMF}


def build_model(name: str, config: dict) -> nn.Module:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name](**config)


def model_name(model: nn.Module) -> str:
    for name, cls in MODELS.items():
        if type(model) is cls:
            return name
    raise KeyError(f"{type(model).__name__} is not a registered model")

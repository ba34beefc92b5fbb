"""Model names -> classes (models.contract.Recommender subclasses), so the CLI's --model,
checkpoints, the hub entry and export build or rebuild any model from its name and config
(a dict of constructor arguments). A new model is one line here."""

from __future__ import annotations

from pathlib import Path

from merlin_ncf.models.contract import Recommender
from merlin_ncf.models.convncf import ConvNCF
from merlin_ncf.models.errors import TrainingError
from merlin_ncf.models.multvae import MultVAE
from merlin_ncf.models.neumf import GMF, MLP, NeuMF

MODELS: dict[str, type[Recommender]] = {
    "neumf": NeuMF,
    "gmf": GMF,
    "mlp": MLP,
    "multvae": MultVAE,
    "convncf": ConvNCF,
}


def model_class(name: str) -> type[Recommender]:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


def build_model(name: str, config: dict) -> Recommender:
    return model_class(name)(**config)


def model_name(model: Recommender) -> str:
    for name, cls in MODELS.items():
        if type(model) is cls:
            return name
    raise KeyError(f"{type(model).__name__} is not a registered model")


def model_from(state: dict, path: str | Path = "checkpoint") -> Recommender:
    """Rebuild the checkpoint's model and load its weights."""
    try:
        model = build_model(state["model"]["name"], state["model"]["config"])
        model.load_state_dict(state["model"]["state"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TrainingError(f"checkpoint {path} does not fit its model: {first}") from None
    return model

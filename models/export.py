"""The artefacts of a run: TorchScript model.ts and config.json.

model.ts: forward(user int64[N], item int64[N]) -> float32[N] on encoded ids, for any model
of the family (models/contract.py serving_module): the probability sigmoid(logit) for models
whose output is "logit" (NeuMF, GMF, MLP), the raw score otherwise, as docs/pipeline.md says.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from merlin_ncf.atomic import atomic_file
from merlin_ncf.models.contract import Recommender, serving_module


def save_torchscript(model: Recommender, path: Path) -> torch.jit.ScriptModule:
    scripted = serving_module(model)
    with atomic_file(path) as tmp:
        torch.jit.save(scripted, str(tmp))
    return scripted


def save_json(obj: dict, path: Path) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")

"""The serving artefacts of a run: TorchScript model.ts and config.json.

model.ts: forward(user int64[N], item int64[N]) -> float32[N], the probability (sigmoid of
the logit) on encoded ids, as docs/pipeline.md specifies. Traced, not scripted: the
training-only branches (dropout's random masks) are pruned by tracing in eval mode.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from merlin_ncf.atomic import atomic_file


class Scorer(nn.Module):
    """Pairs of (user, item) -> probability, for any model with forward(user, item) -> logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(user, item).float())


def torchscript(model: nn.Module) -> torch.jit.ScriptModule:
    model = copy.deepcopy(model).cpu().eval().requires_grad_(False)
    example = (torch.tensor([0, 1, 0], dtype=torch.int64), torch.tensor([0, 0, 1], dtype=torch.int64))
    with torch.no_grad():
        traced = torch.jit.trace(Scorer(model), example, check_trace=False)
    return traced


def save_torchscript(model: nn.Module, path: Path) -> torch.jit.ScriptModule:
    scripted = torchscript(model)
    with atomic_file(path) as tmp:
        torch.jit.save(scripted, str(tmp))
    return scripted


def save_json(obj: dict, path: Path) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")

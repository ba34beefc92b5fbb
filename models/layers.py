"""Building blocks shared by the models (not tied to NeuMF)."""

from __future__ import annotations

import torch
from torch import nn


class ByteDropout(nn.Module):
    """Inverted dropout whose keep-mask comes from random bytes.

    Written by hand because torch's CPU dropout draws one Bernoulli variate per element
    (measured 0.50 s for 2^18 x 128 floats here) while 8 random bytes per int64 draw take
    0.04 s; p is therefore rounded to a multiple of 1/256. On CUDA torch's own kernel is fast
    and is used instead.
    """

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = float(p)
        self.threshold = int(round(self.p * 256))
        # Scale by the probability actually applied (after rounding), so E[output] = input.
        self.scale = 256.0 / (256 - self.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        if x.is_cuda:
            return nn.functional.dropout(x, self.p, True)
        n = x.numel()
        words = torch.randint(-(2**63), 2**63 - 1, ((n + 7) // 8,), dtype=torch.int64, device=x.device)
        keep = words.view(torch.uint8)[:n].view(x.shape) >= self.threshold
        return x * (keep.to(x.dtype) * self.scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def mlp_tower(in_features: int, units: list[int], dropout: float) -> nn.Sequential:
    """Linear -> ReLU -> dropout for each width in `units`.

    merlin.models.torch.MLPBlock builds the same stack, but importing merlin.models.torch
    loads Lightning (+5 s per process: every torchrun rank, every hub load) and its
    LazyLinear layers need a dry run before they can be initialised or loaded.
    """
    layers: list[nn.Module] = []
    for width in units:
        layers += [nn.Linear(in_features, width), nn.ReLU(), ByteDropout(dropout)]
        in_features = width
    return nn.Sequential(*layers)

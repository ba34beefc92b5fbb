"""Row-wise (lazy) Adam for embedding tables with sparse gradients.

The update is torch.optim.SparseAdam's: only the rows a step's gradient touches move, and only
their moments decay. Hand-written because SparseAdam's CPU step goes through sparse_mask and
sparse-dense arithmetic: 43 ms for two ml-20m-sized tables at batch 4096 here, against ~2 ms
for the same arithmetic on the gathered rows (docs/benchmarks.md).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


class RowWiseAdam(torch.optim.Optimizer):
    """Adam on the rows of a sparse (nn.Embedding(sparse=True)) gradient, as SparseAdam."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if not lr > 0 or not eps > 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid RowWiseAdam settings: lr={lr} betas={betas} eps={eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if not param.grad.is_sparse:
                    raise RuntimeError("RowWiseAdam takes sparse gradients: nn.Embedding(sparse=True)")
                grad = param.grad.coalesce()  # one row per index, duplicates summed
                rows, values = grad.indices()[0], grad.values()
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["step"] += 1
                # F.embedding gathers rows ~10x faster than index_select on CPU (measured here).
                exp_avg = F.embedding(rows, state["exp_avg"]).lerp_(values, 1 - beta1)
                exp_avg_sq = F.embedding(rows, state["exp_avg_sq"]).mul_(beta2).addcmul_(values, values, value=1 - beta2)
                state["exp_avg"].index_copy_(0, rows, exp_avg)
                state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
                step_size = lr * (1 - beta2 ** state["step"]) ** 0.5 / (1 - beta1 ** state["step"])
                param.index_add_(0, rows, exp_avg.div_(exp_avg_sq.sqrt_().add_(eps)), alpha=-step_size)
        return loss

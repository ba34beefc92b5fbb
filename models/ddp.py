"""(Named ddp, not distributed: run as a script, models/ is sys.path[0] and a
distributed.py there hides the `distributed` package dask imports.)

Process group setup under torchrun (NCCL on GPU, Gloo on CPU) and metric all-reduces.

Without torchrun's environment everything degrades to a single process.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import traceback
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64, so counts stay exact)."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def min(self, values: list[float]) -> list[float]:
        return self._reduce(values, dist.ReduceOp.MIN)

    def max(self, values: list[float]) -> list[float]:
        return self._reduce(values, dist.ReduceOp.MAX)

    def _reduce(self, values: list[float], op) -> list[float]:
        if not self.distributed:
            return list(values)
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=op)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self, finished: bool = False) -> None:
        """Tear the process group down while the interpreter is fully alive: collect the DDP
        wrapper (it sits in a reference cycle that holds the group) and destroy the group. torch's
        DDP still keeps the Gloo group's threads alive after that, so a rank then ends through
        end_rank. `finished`: every rank got here after its last collective, so they first wait
        for each other (no rank tears its connections down while another still talks)."""
        if not (self.distributed and dist.is_initialized()):
            return
        if finished:
            dist.barrier()
        gc.collect()  # the unreachable DDP wrappers and what they hold, now
        dist.destroy_process_group()


def end_rank(code: int) -> NoReturn:
    """End a process that has run DDP, without interpreter finalization.

    torch's DistributedDataParallel keeps its process group alive past destroy_process_group
    (torch 2.13: after close(), a rank still runs Gloo's pt_gloo_runloop and gloo_tcp_loop
    threads, with or without a DDP step, and however the wrapper is released). They ran on
    through interpreter finalization and static destruction, which intermittently aborted a rank
    ("terminate called without an active exception", "malloc(): unaligned tcache chunk
    detected"); pytorch/pytorch#179291 describes the same teardown. By the time this is called
    every output is written, so the process reports what it would have (an exception in flight
    prints its traceback, exit 1) and leaves through os._exit."""
    in_flight = sys.exc_info()[1]
    if isinstance(in_flight, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        code = 130
    elif in_flight is not None:
        traceback.print_exc()
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def from_environment(device: torch.device) -> Context:
    """Join torchrun's process group if WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return Context(rank=rank, world=world, local_rank=local_rank)

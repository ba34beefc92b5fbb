"""The model-agnostic training loop: batches for the model's input_type, its own loss, Adam,
gradient accumulation, AMP, DDP, sampled HR/NDCG and full-ranking evaluation, early stopping
and resumable checkpoints.

A model is a models.contract.Recommender. Its `input_type` picks the batches:
- pointwise: the merlin Loader's positives, each with N sampled negatives (PointwiseBatch);
- pairwise: the Loader's positives, each with one sampled negative (PairwiseBatch);
- user_rows: shuffled ids of the users that have training rows (UserRowsBatch), the same
  permutation on every rank from (seed, epoch), each rank taking its slice of every step.
Every epoch's randomness (file order, row shuffle, negatives, dropout) is seeded from
(seed, epoch, rank), and the global optimizer-step count is checkpointed (schedules such as
Mult-VAE's KL annealing take it), so resuming from an end-of-epoch checkpoint replays exactly
what an uninterrupted run would have done.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from merlin_ncf.progress import progress_bar

from merlin_ncf.models import checkpoint as ckpt
from merlin_ncf.models.contract import Objective, PairwiseBatch, PointwiseBatch, Recommender, UserRowsBatch
from merlin_ncf.models.data import Candidates, EtlData, batch_columns, check_ids, seed_shuffle, train_loader, train_pairs
from merlin_ncf.models.ddp import Context
from merlin_ncf.models.metrics import hit_and_ndcg_sums
from merlin_ncf.models.optim import RowWiseAdam
from merlin_ncf.models.ranking import SeenItems, full_ranking_sums
from merlin_ncf.models.registry import model_name
from merlin_ncf.models.errors import TrainingError
from merlin_ncf.models.sampler import NegativeSampler, epoch_generator, seen_keys
from merlin_ncf.atomic import atomic_file
from merlin_ncf.models.seeds import rank_seed, shared_seed


@dataclass
class TrainOptions:
    epochs: int = 10
    batch_size: int = 2**20  # samples (positives + negatives) per optimizer step, all ranks
    negatives: int = 4
    negative_sampling: str = "uniform"  # or "exclude-seen" (models/sampler.py)
    lr: float = 0.0045
    beta1: float = 0.25
    beta2: float = 0.5
    eps: float = 1e-8
    weight_decay: float = 0.0  # AdamW's decoupled decay (0: plain Adam)
    lr_schedule: str = "constant"  # or "cosine": lr decays to 0 over `epochs` (lr_factor)
    ema: float = 0.0  # decay of an exponential moving average of the weights that is scored and kept (0: none)
    optimizer: str = "adam"  # or "sparse-adam" (OPTIMIZERS)
    grad_accumulation: int = 1
    amp: bool = False
    topk: int = 10
    threshold: float = 1.0
    patience: int = 0
    min_epochs: int = 0  # patience cannot end a run before this epoch
    select: str = "hr"  # validation metric that picks the best epoch and drives patience: hr, ndcg, hr+ndcg
    seed: int = 0
    eval_batch_size: int = 2**20  # candidates scored per forward pass
    parts_per_chunk: int = 1
    max_steps: int = 0  # batches per epoch at most (0: the whole shard); smoke runs, benchmarks
    progress: bool = True

    def rows_per_batch(self, world: int, input_type: str = "pointwise") -> int:
        """Rows (positives, or users) per micro-batch on each rank."""
        return self.batch_size // (world * self.grad_accumulation * samples_per_row(input_type, self.negatives))


def samples_per_row(input_type: str, negatives: int) -> int:
    """What one row of a batch counts toward --batch-size: a positive and its N negatives, a
    positive and its one negative, or a user."""
    return {"pointwise": 1 + negatives, "pairwise": 2, "user_rows": 1}[input_type]


# Testing aid, hidden from --help (issue 9): SIGKILL this process after this many optimizer
# steps, to test resuming after a crash.
KILL_AFTER_STEPS = "MERLIN_NCF_TEST_KILL_AFTER_STEPS"


@dataclass
class EpochRecord:
    epoch: int
    loss: float
    hr: float
    ndcg: float
    k: int
    split: str
    train_samples_per_s: float
    eval_samples_per_s: float
    epoch_time_s: float
    train_samples: int


@dataclass
class State:
    """What survives a restart besides the model and optimizer."""

    epoch: int = 0  # epochs completed
    best_score: float = -1.0  # the selection metric (TrainOptions.select) at best_epoch
    best_epoch: int = -1
    stale_epochs: int = 0
    steps: int = 0  # optimizer steps taken over all epochs (the loss's `step`)
    history: list = field(default_factory=list)

    @property
    def best_hr(self) -> float:
        """The validation HR@K at best_epoch (from its history row)."""
        return self.history[self.best_epoch - 1]["hr"] if self.best_epoch >= 1 else -1.0


def autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    # fp16 + GradScaler on CUDA; bf16 on CPU, where fp16 matmuls are slow and unscaled.
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def lr_factor(schedule: str, step: int, total_steps: int) -> float:
    """The learning rate's multiplier at optimizer step `step` (0-based) of `total_steps`:
    a function of the step alone, so a resumed run follows the same curve."""
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(step / max(total_steps, 1), 1.0)))  # cosine


def selection_score(select: str, hr: float, ndcg: float) -> float:
    """The validation figure that picks the best epoch (higher is better)."""
    return {"hr": hr, "ndcg": ndcg, "hr+ndcg": hr + ndcg}[select]


def dense_adam(params: list, options: TrainOptions) -> torch.optim.Adam:
    # AdamW with weight_decay 0 is Adam; decoupled decay shrinks every weight by lr x decay per step.
    adam = torch.optim.AdamW if options.weight_decay else torch.optim.Adam
    return adam(
        params, lr=options.lr, betas=(options.beta1, options.beta2), eps=options.eps,
        weight_decay=options.weight_decay,
        fused=True,  # on CPU too: 4x faster than the foreach step over the embedding tables here
    )


def row_wise_adam(params: list, options: TrainOptions) -> RowWiseAdam:
    """SparseAdam's lazy update of the rows a step touches (no weight decay, as SparseAdam)."""
    return RowWiseAdam(params, lr=options.lr, betas=(options.beta1, options.beta2), eps=options.eps)


def sparse_tables(model: nn.Module, options: TrainOptions) -> list[nn.Embedding]:
    """The embedding tables that --optimizer sparse-adam switches to sparse gradients (before
    DDP is built: it reads `sparse` to expect sparse gradients)."""
    if options.optimizer != "sparse-adam":
        return []
    if not getattr(model, "sparse_embeddings", False):
        raise TrainingError(f"--optimizer sparse-adam: {type(model).__name__} reads its embedding tables whole; "
                            "use --optimizer adam")
    tables = [module for module in model.modules() if isinstance(module, nn.Embedding)]
    for table in tables:
        table.sparse = True
    return tables


def build_optimizer(model: nn.Module, options: TrainOptions, device: torch.device) -> dict[str, torch.optim.Optimizer]:
    """Named optimizers that together update every parameter: "adam" (dense), and with
    --optimizer sparse-adam "row-wise-adam" for the embedding tables."""
    tables = {id(table.weight): table.weight for table in sparse_tables(model, options)}
    dense = [param for param in model.parameters() if id(param) not in tables]
    optimizers = {}
    if dense:
        optimizers["adam"] = dense_adam(dense, options)
    if tables:
        optimizers["row-wise-adam"] = row_wise_adam(list(tables.values()), options)
    return optimizers


def describe_optimizers(optimizers: dict[str, torch.optim.Optimizer]) -> str:
    return ", ".join(f"{name} on {sum(len(g['params']) for g in opt.param_groups)} tensors "
                     f"({sum(p.numel() for g in opt.param_groups for p in g['params']):,} parameters)"
                     for name, opt in optimizers.items())


class Trainer:
    def __init__(self, model: Recommender, data: EtlData, options: TrainOptions, device: torch.device,
                 context: Context | None = None, run_dir: Path | None = None):
        self.data, self.options, self.device = data, options, device
        self.context = context or Context()
        self.model = model.to(device)
        self.input_type = model.input_type
        self.optimizers = build_optimizer(self.model, options, device)  # may make embeddings sparse: before DDP
        objective = Objective(self.model)
        # DDP synchronises the gradients of what runs through its forward: the loss. Buffers
        # (Mult-VAE's interaction rows) are the same on every rank and never change.
        self.ddp = (
            nn.parallel.DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None,
                                                broadcast_buffers=False)
            if self.context.distributed else objective
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=options.amp and device.type == "cuda")
        self.sampler = None
        self.users = None
        if self.input_type == "user_rows":
            self.users = model.row_users()  # sorted; held-out users of --protocol vae-cf are not among them
        else:
            seen = None
            if options.negative_sampling == "exclude-seen":
                seen = seen_keys(*train_pairs(data), data.num_items)
            negatives = options.negatives if self.input_type == "pointwise" else 1
            self.sampler = NegativeSampler(data.first_item, data.num_items, negatives, seen).to(device)
        self.run_dir = run_dir if self.context.is_main else None
        # The average is what evaluation scores and checkpoints keep as "model" (so best.pt,
        # model.ts and --mode test need nothing new); the trained weights ride beside it.
        self.ema = None
        if options.ema:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(options.ema))
        self.state = State()
        self.first_step = 0  # state.steps when this process started (resume_from moves it)
        self.kill_after = int(os.environ.get(KILL_AFTER_STEPS, "0") or 0)

    # --- checkpoints ------------------------------------------------------------

    @property
    def scored(self) -> nn.Module:
        """The weights evaluation scores: the moving average with --ema, else the model."""
        return self.ema.module if self.ema is not None else self.model

    def keep_only(self, state: dict) -> None:
        """Load a kept model state (best.pt's) as the only weights, the average dropped."""
        self.model.load_state_dict(state)
        self.ema = None

    def checkpoint(self) -> dict:
        def cpu(module):
            return {k: v.detach().cpu() for k, v in module.state_dict().items()}

        return {
            "format": ckpt.FORMAT,
            "model": {"name": model_name(self.model), "config": self.model.config, "state": cpu(self.scored)},
            **({"trained": {"state": cpu(self.model), "averaged_steps": int(self.ema.n_averaged)}}
               if self.ema is not None else {}),
            # "adam" under the key of checkpoints from before sparse-adam, which resume as they were.
            "optimizer": self.optimizers["adam"].state_dict() if "adam" in self.optimizers else None,
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items() if name != "adam"},
            "scaler": self.scaler.state_dict(),
            "state": asdict(self.state),
            "options": asdict(self.options),
            "rng": ckpt.rng_state(),
        }

    def resume_from(self, state: dict) -> None:
        averaged = state.get("options", {}).get("ema", 0.0)
        if averaged != self.options.ema:
            raise TrainingError(f"the checkpoint was trained with --ema {averaged:g}: resume with it")
        if self.ema is not None:
            self.model.load_state_dict(state["trained"]["state"])
            self.ema.module.load_state_dict(state["model"]["state"])
            self.ema.n_averaged.fill_(state["trained"]["averaged_steps"])
        else:
            self.model.load_state_dict(state["model"]["state"])
        trained = state.get("options", {}).get("optimizer", "adam")
        saved = {**state.get("optimizers", {}), **({"adam": state["optimizer"]} if state.get("optimizer") else {})}
        if trained != self.options.optimizer or set(saved) != set(self.optimizers):
            raise TrainingError(f"the checkpoint was trained with --optimizer {trained}: resume with it")
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(saved[name])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        progress = dict(state["state"])
        # Checkpoints from before --select kept only best_hr; later ones kept both (best_hr is
        # now read from the history).
        progress.setdefault("best_score", progress.get("best_hr", -1.0))
        progress.pop("best_hr", None)
        self.state = State(**progress)
        self.first_step = self.state.steps
        ckpt.restore_rng(state["rng"])

    @property
    def steps_taken(self) -> int:
        """Optimizer steps taken in this process (the kill aid counts these)."""
        return self.state.steps - self.first_step

    # --- evaluation -------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, candidates: Candidates) -> tuple[float, float, float]:
        """HR@K, NDCG@K over all ranks' lists and candidates scored per second."""
        shard = candidates.shard(self.context.rank, self.context.world)
        model = self.scored.eval()
        lists_per_pass = max(1, self.options.eval_batch_size // shard.items.shape[1]) if len(shard.users) else 1
        hits = ndcg = 0.0
        start = time.perf_counter()
        for lo in range(0, len(shard.users), lists_per_pass):
            users = shard.users[lo:lo + lists_per_pass].to(self.device, non_blocking=True)
            items = shard.items[lo:lo + lists_per_pass].to(self.device, non_blocking=True)
            with autocast(self.device, self.options.amp):
                scores = model(users, items)
            h, n = hit_and_ndcg_sums(scores, self.options.topk)
            hits, ndcg = hits + h, ndcg + n
        total_hits, total_ndcg, lists = self.context.sum([hits, ndcg, float(len(shard.users))])
        elapsed = time.perf_counter() - start
        lists = max(lists, 1.0)
        return total_hits / lists, total_ndcg / lists, lists * candidates.items.shape[1] / elapsed

    @torch.no_grad()
    def evaluate_full(self, candidates: Candidates, seen: SeenItems) -> tuple[float, float]:
        """Full-ranking Recall@K, NDCG@K of each list's positive (column 0) against every item
        but the user's `seen` ones (models/ranking.py history_matrix) and the reserved ids, over
        all ranks' lists. Costs a score of the whole catalogue per user: the final evaluation
        only, not every epoch."""
        shard = candidates.shard(self.context.rank, self.context.world)
        model = self.scored.eval()

        def score_all(users: torch.Tensor) -> torch.Tensor:
            with autocast(self.device, self.options.amp):
                return model.score_all(users.to(self.device)).float()

        recall, ndcg, users = full_ranking_sums(score_all, shard.users, shard.items[:, 0], seen,
                                                self.data.first_item, self.options.topk,
                                                max_scores=max(self.options.eval_batch_size, self.data.num_items))
        recall, ndcg, users = self.context.sum([recall, ndcg, users])
        users = max(users, 1.0)
        return recall / users, ndcg / users

    # --- training ---------------------------------------------------------------

    def batches(self, epoch: int, check_input: bool):
        """(number of steps, iterator of this rank's micro-batches) of one epoch, the same
        number of steps on every rank (DDP needs it)."""
        options, context = self.options, self.context
        per_rank = options.rows_per_batch(context.world, self.input_type)
        if self.input_type == "user_rows":
            return self.user_batches(epoch, per_rank)
        generator = epoch_generator(options.seed, epoch, context.rank, self.device)
        loader = train_loader(self.data, per_rank, epoch, options.seed, context.rank, context.world,
                              options.parts_per_chunk, self.device)
        # Shards can differ by a batch.
        steps = int(context.min([float(len(loader))])[0])
        if options.max_steps:
            steps = min(steps, options.max_steps)

        def iterate():
            try:
                seed_shuffle(options.seed, epoch, context.rank)
                for step, batch in enumerate(loader):
                    if step >= steps:
                        break
                    users, positives = batch_columns(self.data, batch)
                    if check_input:
                        check_ids(self.data, users, positives, "train")
                    users = users.to(self.device, non_blocking=True)
                    items, labels = self.sampler.candidates(positives.to(self.device, non_blocking=True),
                                                            generator, users)
                    if self.input_type == "pointwise":
                        yield PointwiseBatch(users, items, labels)
                    else:
                        yield PairwiseBatch(users, items[:, 0], items[:, 1])
            finally:
                loader.stop()

        return steps, iterate()

    def user_batches(self, epoch: int, per_rank: int):
        """User ids in a permutation from (seed, epoch), identical on every rank; each step
        takes the next world x per_rank users and each rank its interleaved slice."""
        options, context = self.options, self.context
        generator = torch.Generator().manual_seed(shared_seed(options.seed, epoch))
        order = self.users[torch.randperm(len(self.users), generator=generator)]
        per_step = per_rank * context.world
        steps = len(order) // per_step + (len(order) % per_step >= context.world)  # no rank left empty
        if options.max_steps:
            steps = min(steps, options.max_steps)

        def iterate():
            for step in range(steps):
                chunk = order[step * per_step:(step + 1) * per_step]
                yield UserRowsBatch(chunk[context.rank::context.world].to(self.device, non_blocking=True))

        return steps, iterate()

    def train_epoch(self, epoch: int, check_input: bool) -> tuple[float, int, float]:
        """One pass over this rank's shard: mean loss over all ranks, samples, seconds."""
        options, context = self.options, self.context
        torch.manual_seed(rank_seed(options.seed, epoch, context.rank))  # dropout
        steps, batches = self.batches(epoch, check_input)
        accumulation = options.grad_accumulation
        total_steps = options.epochs * math.ceil(steps / accumulation)  # the lr schedule's length
        self.model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        samples = 0
        start = time.perf_counter()
        bar = progress_bar(total=steps, desc=f"epoch {epoch + 1}/{options.epochs}", unit="batch",
                           enabled=options.progress and context.is_main, leave=False)
        try:
            for step, batch in enumerate(batches):
                boundary = (step + 1) % accumulation == 0 or step + 1 == steps
                sync = contextlib.nullcontext() if boundary or not context.distributed else self.ddp.no_sync()
                with sync:
                    with autocast(self.device, options.amp):
                        loss = self.ddp(batch, self.state.steps).float()
                    self.check_finite(loss, epoch, step)
                    self.scaler.scale(loss / accumulation).backward()
                if boundary:
                    if options.lr_schedule != "constant":
                        lr = options.lr * lr_factor(options.lr_schedule, self.state.steps, total_steps)
                        for optimizer in self.optimizers.values():
                            for group in optimizer.param_groups:
                                group["lr"] = lr
                    for optimizer in self.optimizers.values():
                        self.scaler.step(optimizer)
                    self.scaler.update()
                    for optimizer in self.optimizers.values():
                        optimizer.zero_grad(set_to_none=True)
                    if self.ema is not None:
                        self.ema.update_parameters(self.model)
                    self.state.steps += 1
                    if self.kill_after and self.steps_taken >= self.kill_after:
                        os.kill(os.getpid(), signal.SIGKILL)  # simulates a crash, for resume tests
                loss_sum += loss.detach().double() * batch.samples
                samples += batch.samples
                bar.update()
        finally:
            bar.close()
            batches.close()
        loss_total, samples_total = context.sum([float(loss_sum), float(samples)])
        return loss_total / max(samples_total, 1.0), int(samples_total), time.perf_counter() - start

    def check_finite(self, loss: torch.Tensor, epoch: int, step: int) -> None:
        """Stop at the first non-finite loss, before it reaches the weights. Under DDP every
        rank learns of it (a rank that stopped alone would leave the others in all-reduce)."""
        finite = float(torch.isfinite(loss.detach()))
        if self.context.distributed:
            finite = self.context.min([finite])[0]
        if not finite:
            raise TrainingError(
                f"training diverged: non-finite loss ({loss.detach().item()}) at epoch {epoch + 1} step {step + 1}; "
                f"lower --lr (now {self.options.lr:g})"
            )

    def fit(self, eval_candidates: Candidates, split: str, on_epoch=None) -> State:
        """Train until options.epochs, the HR threshold or patience (epochs without a better
        options.select score, which also picks best.pt; not before options.min_epochs); call on_epoch(record)
        after each epoch's checkpoint (rank 0 writes them under run_dir/checkpoints)."""
        options, state = self.options, self.state
        first_epoch = state.epoch
        for epoch in range(state.epoch, options.epochs):
            epoch_start = time.perf_counter()
            loss, samples, train_time = self.train_epoch(epoch, check_input=epoch == first_epoch)
            hr, ndcg, eval_rate = self.evaluate(eval_candidates)
            record = EpochRecord(
                epoch=epoch + 1, loss=loss, hr=hr, ndcg=ndcg, k=options.topk, split=split,
                train_samples_per_s=samples / train_time, eval_samples_per_s=eval_rate,
                epoch_time_s=time.perf_counter() - epoch_start, train_samples=samples,
            )
            score = selection_score(options.select, hr, ndcg)
            improved = math.isfinite(score) and score > state.best_score  # a NaN is never best
            state.epoch = epoch + 1
            state.history.append(asdict(record))
            if improved:
                state.best_score, state.best_epoch, state.stale_epochs = score, epoch + 1, 0
            else:
                state.stale_epochs += 1
            if self.run_dir is not None:
                kept = ("best.pt", "last.pt") if improved else ("last.pt",)
                ckpt.save_atomic(self.checkpoint(), *(self.run_dir / "checkpoints" / name for name in kept))
            if on_epoch is not None:
                on_epoch(record)
            patient = options.patience and state.stale_epochs >= options.patience and epoch + 1 >= options.min_epochs
            if hr >= options.threshold or patient:
                break
        return state


def write_jsonl(history: list[dict], path: Path) -> None:
    """Rewrite the whole log atomically (it is small), so a resumed run's log has no
    epochs from beyond its checkpoint."""
    with atomic_file(path) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in history))

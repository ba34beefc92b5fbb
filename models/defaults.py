"""Training defaults that follow the data's size, so that `train_ncf.py --data ETL --output RUN`
works from ~100k ratings (ml-latest-small) to ml-20m without flags. An explicit flag wins.

Measured in docs/training-defaults.md.
"""

from __future__ import annotations

import argparse
import math

NEGATIVE_SAMPLING = ("uniform", "exclude-seen")
SELECT = ("hr", "ndcg", "hr+ndcg")  # the validation metric that keeps the best epoch (trainer.selection_score)
OPTIMIZERS = ("adam", "sparse-adam")  # models/trainer.py build_optimizer

# ~50 steps per epoch: on ml-latest-small (498k samples) batch 8192 beat 4096 (~120 steps) on
# validation NDCG@10 over two seeds (docs/training-defaults.md). On ml-20m (~100M samples) the
# cap, NVIDIA's 2^20 batch (~95 steps), binds either way.
STEPS_PER_EPOCH = 50
MIN_BATCH, MAX_BATCH = 2**10, 2**20
LARGE_BATCH = 2**18  # from here on NVIDIA's large-batch Adam settings


def batch_size(samples_per_epoch: int) -> int:
    """A power of two giving about STEPS_PER_EPOCH optimizer steps per epoch."""
    exponent = round(math.log2(max(samples_per_epoch / STEPS_PER_EPOCH, 1)))
    return int(min(max(2**exponent, MIN_BATCH), MAX_BATCH))


# User-row models (Mult-VAE), sized by users: the paper's 500 users per step makes ~270 steps
# per epoch on ml-20m but 1-2 on ml-latest-small's 610 users, too few to learn in 200 epochs.
# ~10 steps per epoch, capped at the paper's 500 (docs/training-defaults.md, "Mult-VAE").
USER_STEPS_PER_EPOCH = 10
MAX_USER_BATCH = 500
USER_EPOCHS, USER_PATIENCE = 200, 20  # the paper's 200 epochs; per-epoch HR@10 is noisy: patience 20
# From scratch GMF and MLP sat at popularity's validation HR@10 for ~4 epochs (~200 steps at ~50
# an epoch) before they climbed; with the whole set shuffled, patience 3 from epoch 1 stopped MLP
# at epoch 4, at popularity (docs/training-defaults.md, "Fifth round"). Patience may end a run
# from epoch MIN_EPOCHS on.
MIN_EPOCHS = 10
# The paper anneals the KL weight by 1/200,000 per step over ~200 epochs x 270 steps: it reaches
# its 0.2 cap 80% into the run. Annealing steps = 4 x the run's steps keeps that ratio at any size.
ANNEAL_STEPS_PER_STEP = 4


def user_batch_size(users: int) -> int:
    """A power of two giving about USER_STEPS_PER_EPOCH steps per epoch, at most MAX_USER_BATCH."""
    exponent = round(math.log2(max(users / USER_STEPS_PER_EPOCH, 1)))
    return int(min(2**exponent, MAX_USER_BATCH))


def user_rows_model_options(users: int, batch: int, epochs: int) -> dict:
    return {"total_anneal_steps": ANNEAL_STEPS_PER_STEP * epochs * math.ceil(users / batch)}


def resolve_user_rows(args: argparse.Namespace, users: int) -> dict:
    batch = args.batch_size or user_batch_size(users)
    epochs = args.epochs or USER_EPOCHS
    # user-row models read whole tables: dense adam (models/trainer.py sparse_tables)
    return {"batch_size": batch, "epochs": epochs, "patience": USER_PATIENCE, "min_epochs": 0, "optimizer": "adam",
            **user_rows_model_options(users, batch, epochs)}


# Sparse embedding gradients + row-wise Adam pay a gather/scatter per touched row; dense Adam
# streams whole tables. Row-wise won where a step touches a few percent of the tables' rows
# (batch 2048-4096 over ml-20m's 165k rows) and lost from about a quarter up (ml-latest-small's
# 10k rows at batch 2048-8192, ml-20m at 2^20) (docs/benchmarks.md).
SPARSE_MAX_TOUCHED = 0.1


def optimizer(batch: int, negatives: int, table_rows: int | None) -> str:
    """sparse-adam when a step's users and items can cover under SPARSE_MAX_TOUCHED of the
    embedding rows (users + items), else adam."""
    touched = batch // (1 + negatives) + batch  # at most: a user per positive, an item per sample
    return "sparse-adam" if table_rows and touched < SPARSE_MAX_TOUCHED * table_rows else "adam"


# Options every model's trainer takes, whatever its size.
COMMON = {"select": "hr", "weight_decay": 0.0}

# merlin's Loader shuffles rows only within a chunk of --parts-per-chunk partitions, and the ETL's
# train files keep the log's order: a user-sorted release (every MovieLens) gives each file its
# own users, so one file per chunk spends part of every epoch on a fraction of the users. Up to
# CHUNK_ROWS rows (ml-20m's 20M fit) a rank's whole shard is one chunk. A chunk of two int64
# columns is 0.5 GiB, held ~4 times at its peak (the parts and their concat, the shuffled copy,
# the tensors; a second chunk queued when a shard has several): ~2 GiB per rank, on the GPU
# when training there.
CHUNK_ROWS = 2**25


def parts_per_chunk(train_rows: int, train_files: int) -> int:
    """As many train files as fit in CHUNK_ROWS rows. The ETL writes files of ~2M rows, each one
    merlin partition (merlin splits only files larger than its part size)."""
    per_file = max(1, math.ceil(train_rows / max(train_files, 1)))
    return max(1, min(train_files, CHUNK_ROWS // per_file))


def ncf_model_options(large: bool) -> dict:
    """NeuMF's (and its branches') model options at a batch below / from LARGE_BATCH."""
    return {
        "factors": 64,
        "mlp_layers": [256, 256, 128, 64] if large else [128, 128, 64],
        # at ~100k ratings dropout 0 was level with or above 0.1 on validation (two seeds)
        "dropout": 0.5 if large else 0.0,
    }


# The model options resolve() sizes, for the models they were measured on: the CLI leaves
# those unset (auto) for these models (a model takes the ones it has); others keep their
# class defaults.
SIZED_MODEL_OPTIONS = {**dict.fromkeys(("neumf", "gmf", "mlp"), tuple(ncf_model_options(False))),
                       "multvae": tuple(user_rows_model_options(1, 1, 1))}


def resolve(args: argparse.Namespace, train_rows: int, users: int = 0, input_type: str = "pointwise",
            table_rows: int | None = None, sparse_embeddings: bool = True, train_files: int = 1) -> dict:
    """Fill every option left at None from the training set's size (positives and files; users
    for user-row models; the embedding tables' rows, users + items, for --optimizer, which only
    models with `sparse_embeddings` can take sparse); return the values chosen."""
    if input_type == "user_rows":  # whole rows from a matrix, no Loader: no chunks
        return fill(args, {**resolve_user_rows(args, users), **COMMON, "parts_per_chunk": 1})
    samples = train_rows * (1 + args.negatives)
    batch = args.batch_size or batch_size(samples)
    large = batch >= LARGE_BATCH
    chosen = {
        "batch_size": batch,
        # NVIDIA's lr and betas are tuned for 2^20-sample steps; small batches train better with
        # Adam's usual betas (RecBole's settings); lr 0.005 or 8 negatives per positive did not
        # beat these on ml-latest-small's validation lists.
        "lr": 0.0045 if large else 0.003,
        "beta1": 0.25 if large else 0.9,
        "beta2": 0.5 if large else 0.999,
        "epochs": 30,
        "patience": 3,
        "min_epochs": MIN_EPOCHS,
        **COMMON,
        # exclude-seen tied with uniform on ml-latest-small and the demo (docs/training-defaults.md)
        # and costs a lookup per sample: uniform at every size.
        "negative_sampling": "uniform",
        "optimizer": optimizer(batch, args.negatives, table_rows) if sparse_embeddings else "adam",
        "parts_per_chunk": parts_per_chunk(train_rows, train_files),
        **ncf_model_options(large),
    }
    return fill(args, chosen)


def fill(args: argparse.Namespace, chosen: dict) -> dict:
    picked = {}
    for name, value in chosen.items():
        if hasattr(args, name) and getattr(args, name) is None:  # absent: not this model's option
            setattr(args, name, value)
            picked[name] = value
    return picked

"""Mult-VAE (Liang et al., "Variational Autoencoders for Collaborative Filtering", WWW 2018),
the architecture of NVIDIA's VAE-CF: a user's training items as an L2-normalised multi-hot
vector, dropout on it, encoder I -> 600 -> 2 x 200 (tanh), the reparameterised latent,
decoder 200 -> 600 -> I, multinomial log-likelihood, and a KL term whose weight grows
linearly with the optimizer step to a cap (0.2 over 200,000 steps, the paper's code).

Its input is whole user rows, which the merlin loader cannot give: it streams interaction
rows in shuffled chunks, so a user's items are spread over many batches. The rows are
therefore a CSR matrix built once from the loader's stream (`csr_rows` on the collected
(user, item) arrays) and stored in the model as int64 buffers. Training batches, score(),
score_all() and the exported TorchScript then all take user ids alone, the same shapes as
every other model, and the exported model carries the history that serving's recommend
needs to exclude seen items.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from merlin_ncf.models.contract import DataFacts, Recommender, UserRowsBatch, positive_int


def csr_rows(users, items, nb_users: int, nb_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indptr [nb_users + 1], indices [nnz]) int64 of the user x item matrix of the given
    pairs (numpy or torch), duplicates merged, each row's items sorted."""
    users = torch.tensor(np.asarray(users), dtype=torch.int64).reshape(-1)  # a copy: inputs may be read-only
    items = torch.tensor(np.asarray(items), dtype=torch.int64).reshape(-1)
    if users.shape != items.shape:
        raise ValueError(f"{users.numel()} users but {items.numel()} items")
    if users.numel() and (int(users.min()) < 0 or int(users.max()) >= nb_users
                          or int(items.min()) < 0 or int(items.max()) >= nb_items):
        raise ValueError(f"ids outside {nb_users} users x {nb_items} items")
    # Sorted unique (user, item) keys give CSR's order directly (torch's sparse CSR is beta).
    keys = torch.unique(users * nb_items + items)
    counts = torch.bincount(keys // nb_items, minlength=nb_users)
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    return indptr, keys % nb_items


class MultVAE(Recommender):
    input_type = "user_rows"
    needs_interactions = True
    # The paper's code: Adam (torch's default betas), lr 1e-3. Its 500 users per step and
    # epochs follow the number of users (models/defaults.py).
    train_defaults = dict(lr=1e-3, beta1=0.9, beta2=0.999)

    def __init__(self, nb_users: int, nb_items: int, nnz: int = 0, hidden: int = 600, latent: int = 200,
                 dropout: float = 0.5, anneal_cap: float = 0.2, total_anneal_steps: int = 200_000):
        super().__init__()
        if nb_users < 1 or nb_items < 1:
            raise ValueError("nb_users and nb_items must be positive")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if anneal_cap < 0 or total_anneal_steps < 0:
            raise ValueError("anneal_cap and total_anneal_steps must be >= 0")
        self.config = dict(nb_users=int(nb_users), nb_items=int(nb_items), nnz=int(nnz), hidden=int(hidden),
                           latent=int(latent), dropout=float(dropout), anneal_cap=float(anneal_cap),
                           total_anneal_steps=int(total_anneal_steps))
        # nnz sizes the buffers so that a checkpoint's rows load into a model built from config.
        self.register_buffer("indptr", torch.zeros(nb_users + 1, dtype=torch.int64))
        self.register_buffer("indices", torch.zeros(nnz, dtype=torch.int64))
        self.encoder = nn.Linear(nb_items, hidden)
        self.to_latent = nn.Linear(hidden, 2 * latent)
        self.decoder = nn.Linear(latent, hidden)
        self.to_items = nn.Linear(hidden, nb_items)
        self.latent = latent
        self.input_dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's code: Glorot-uniform weights, N(0, 0.001) biases."""
        for layer in (self.encoder, self.to_latent, self.decoder, self.to_items):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.normal_(layer.bias, 0.0, 0.001)

    @classmethod
    def from_interactions(cls, users, items, nb_users: int, nb_items: int, **config) -> "MultVAE":
        indptr, indices = csr_rows(users, items, nb_users, nb_items)
        model = cls(nb_users, nb_items, nnz=indices.numel(), **config)
        model.indptr.copy_(indptr)
        model.indices.copy_(indices)
        return model

    def rows(self, user: torch.Tensor) -> torch.Tensor:
        """The users' training rows as a dense 0/1 matrix [B, nb_items], from the CSR buffers
        with tensor ops only (no Python loop or .item()), so tracing keeps it shape-generic."""
        start, end = self.indptr[user], self.indptr[user + 1]
        counts = end - start
        row = torch.repeat_interleave(torch.ones_like(user).cumsum(0) - 1, counts)
        first = (counts.cumsum(0) - counts)[row]  # where each row begins among the gathered
        position = torch.ones_like(row).cumsum(0) - 1 - first
        columns = self.indices[start[row] + position]
        dense = torch.zeros(user.shape[0], self.num_items, device=user.device, dtype=self.encoder.weight.dtype)
        return dense.index_put_((row, columns), torch.ones_like(columns, dtype=dense.dtype))

    def row_users(self) -> torch.Tensor:
        return torch.nonzero(self.indptr.diff() > 0).flatten().cpu()

    def encode(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.tanh(self.encoder(self.input_dropout(F.normalize(rows, dim=1))))
        mu, logvar = self.to_latent(hidden).split(self.latent, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.to_items(torch.tanh(self.decoder(z)))

    def kl_weight(self, step: int) -> float:
        total = self.config["total_anneal_steps"]
        cap = self.config["anneal_cap"]
        return cap if total == 0 else min(cap, step / total)

    def loss(self, batch: UserRowsBatch, *, step: int) -> torch.Tensor:
        rows = self.rows(batch.user)
        mu, logvar = self.encode(rows)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        log_probs = F.log_softmax(self.decode(z).float(), dim=1)
        nll = -(log_probs * rows).sum(dim=1).mean()
        kl = 0.5 * (logvar.exp() + mu.pow(2) - 1.0 - logvar).float().sum(dim=1).mean()
        return nll + self.kl_weight(step) * kl

    def score_all(self, user: torch.Tensor) -> torch.Tensor:
        return self.score_rows(self.rows(user))

    def score_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Scores of every item for given 0/1 rows [B, nb_items], e.g. the fold-in part of
        held-out users (the paper's protocol): decoder logits of the posterior mean
        (log_softmax would only shift each row)."""
        mu, _ = self.encode(rows)
        return self.decode(mu)

    def score(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.score_all(user).gather(1, items)

    def score_pairs(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        # Serving sends one user with many items: decode each distinct user once.
        unique, inverse = torch.unique(user, return_inverse=True)
        return self.score_all(unique)[inverse, item]

    @classmethod
    def add_arguments(cls, group) -> None:
        group.add_argument("--hidden", type=positive_int, default=600, help="encoder/decoder hidden width")
        group.add_argument("--latent", type=positive_int, default=200, help="latent dimension")
        group.add_argument("--dropout", type=float, default=0.5, help="dropout on the normalised input rows")
        group.add_argument("--anneal-cap", type=float, default=0.2, help="largest weight of the KL term")
        group.add_argument("--total-anneal-steps", type=int, default=200_000,
                           help="optimizer steps over which the KL weight would grow linearly from 0 to 1, "
                                "reaching --anneal-cap first (0: the cap throughout; auto: 4 x the run's steps, "
                                "the paper's 200,000 at ml-20m's size)")

    @classmethod
    def check_arguments(cls, args) -> None:
        if not 0.0 <= args.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
        if args.anneal_cap < 0 or args.total_anneal_steps < 0:
            raise ValueError("--anneal-cap and --total-anneal-steps must be >= 0")

    @classmethod
    def from_args(cls, args, data: DataFacts) -> "MultVAE":
        if data.interactions is None:
            raise ValueError("Mult-VAE needs the training interactions (DataFacts.interactions)")
        return cls.from_interactions(*data.interactions, data.num_users, data.num_items, hidden=args.hidden,
                                     latent=args.latent, dropout=args.dropout, anneal_cap=args.anneal_cap,
                                     total_anneal_steps=args.total_anneal_steps)

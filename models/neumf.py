"""NeuMF (He et al., 2017): GMF and MLP branches over separate embeddings, fused by a final layer.

Dropout in the MLP follows NVIDIA DeepLearningExamples' PyTorch NCF. `variant` picks the
full model or one branch alone (GMF-only, MLP-only), which the paper pre-trains and then
combines with `NeuMF.from_pretrained`; `GMF` and `MLP` are those branches as models of their
own (`--model gmf|mlp`), with the same state_dict. All follow models/contract.py: pointwise,
BCE-with-logits loss, score() = forward().

forward(user [B], item [B] or [B, K]) returns logits [B] or [B, K]. With [B, K] candidates
the user's embeddings and the user half of the first MLP layer are computed once per row,
not once per candidate: the 1 positive + N negatives of a training row, or the 1 + K
candidates of an evaluation list, share their user.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from merlin_ncf.models.contract import DataFacts, PointwiseBatch, Recommender, positive_int
from merlin_ncf.models.layers import DenseReluDropout, mlp_tower

VARIANTS = ("neumf", "gmf", "mlp")


class NeuMF(Recommender):
    """Pointwise: BCE with logits over each row's positive and sampled negatives."""

    input_type = "pointwise"
    output = "logit"
    sparse_embeddings = True
    init_options = ("pretrained_gmf", "pretrained_mlp")

    def __init__(
        self,
        nb_users: int,
        nb_items: int,
        mf_dim: int = 64,
        mlp_layers: tuple[int, ...] | list[int] = (256, 256, 128, 64),
        dropout: float = 0.5,
        variant: str = "neumf",
    ):
        super().__init__()
        mlp_layers = [int(w) for w in mlp_layers]
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if nb_users < 1 or nb_items < 1:
            raise ValueError("nb_users and nb_items must be positive")
        self.variant = variant
        self.use_gmf = variant in ("neumf", "gmf")
        self.use_mlp = variant in ("neumf", "mlp")
        if self.use_mlp and (len(mlp_layers) < 2 or mlp_layers[0] % 2):
            raise ValueError("mlp_layers needs an even input width (user + item embeddings) and >= 1 layer")
        self.config = dict(
            nb_users=int(nb_users), nb_items=int(nb_items), mf_dim=int(mf_dim),
            mlp_layers=mlp_layers, dropout=float(dropout), variant=variant,
        )
        out_features = 0
        if self.use_gmf:
            self.gmf_user = nn.Embedding(nb_users, mf_dim)
            self.gmf_item = nn.Embedding(nb_items, mf_dim)
            out_features += mf_dim
        if self.use_mlp:
            half = mlp_layers[0] // 2
            self.mlp_user = nn.Embedding(nb_users, half)
            self.mlp_item = nn.Embedding(nb_items, half)
            # The first layer's weight is applied in two halves (user, item) in forward().
            self.mlp_first = DenseReluDropout(mlp_layers[0], mlp_layers[1], dropout)
            self.mlp_rest = mlp_tower(mlp_layers[1], mlp_layers[2:], dropout)
            out_features += mlp_layers[-1]
        self.final = nn.Linear(out_features, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's initialisation: N(0, 0.01) embeddings, Glorot-uniform MLP layers,
        LeCun-uniform output layer, zero biases (its Keras code's defaults)."""
        for module in self.modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, 0.01)
            elif isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        limit = math.sqrt(3.0 / self.final.in_features)
        nn.init.uniform_(self.final.weight, -limit, limit)

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        flat = item.dim() == 1
        if flat:
            item = item.unsqueeze(1)
        logits = self.score_all_with(user, self.item_side(item))
        return logits.squeeze(1) if flat else logits

    def item_side(self, item: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The user-independent half of scoring: GMF's item rows and the item half of the
        first MLP layer (item_emb @ W_item + b), of `item` [B, K], or of every item (None):
        computed once per score_all call (once at export for serving) instead of once per pair."""
        side = {}
        if self.use_gmf:
            side["gmf"] = self.gmf_item.weight if item is None else self.gmf_item(item)
        if self.use_mlp:
            first, bias = self.mlp_first.scaled_parameters()
            rows = self.mlp_item.weight if item is None else self.mlp_item(item)
            side["mlp"] = F.linear(rows, first[:, self.mlp_user.embedding_dim:], bias)
        return side

    def score_all_with(self, user: torch.Tensor, side: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits [B, K] of user [B] against item_side()'s rows: [B, K, ...] per user, or
        [K, ...] shared by every user (broadcast)."""
        # final(cat(gmf, mlp)) computed branch by branch, so that the [B, K, factors] GMF
        # product is never materialised: (u * i) . w_gmf = i . (u * w_gmf), a batched dot.
        weight = self.final.weight.squeeze(0)
        logits = self.final.bias
        if self.use_gmf:
            mf_dim = self.gmf_user.embedding_dim
            user_side = self.gmf_user(user) * weight[:mf_dim]
            logits = logits + torch.matmul(side["gmf"], user_side.unsqueeze(2)).squeeze(2)
            weight = weight[mf_dim:]
        if self.use_mlp:
            first, _ = self.mlp_first.scaled_parameters()
            user_part = F.linear(self.mlp_user(user), first[:, :self.mlp_user.embedding_dim])
            hidden = self.mlp_rest(self.mlp_first.activate(side["mlp"] + user_part.unsqueeze(1)))
            logits = logits + F.linear(hidden, weight.unsqueeze(0)).squeeze(2)
        return logits

    def score_all(self, user: torch.Tensor) -> torch.Tensor:
        side = self.item_side()
        # Chunks of items bound the [B, chunk, layer width] activations, as the default score_all.
        width = max(1, self.score_all_chunk // max(1, user.numel()))
        if width >= self.num_items:
            return self.score_all_with(user, side)
        return torch.cat([self.score_all_with(user, {key: rows[lo:lo + width] for key, rows in side.items()})
                          for lo in range(0, self.num_items, width)], dim=1)

    def score(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.forward(user, items)

    # [users, items, hidden] activations per pass: 2^16 pairs (32 MiB at width 128) ran the
    # full ranking of ml-latest-small faster than 2^18 or 2^20 (cache-sized passes).
    score_all_chunk = 2**16

    def loss(self, batch: PointwiseBatch, *, step: int) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(self.forward(batch.user, batch.item).float(), batch.label)

    @classmethod
    def training_defaults(cls, args) -> dict:
        return {"gmf": GMF, "mlp": MLP}.get(getattr(args, "variant", "neumf"), cls).train_defaults

    @classmethod
    def add_arguments(cls, group) -> None:
        group.add_argument("--variant", choices=VARIANTS, default="neumf",
                           help="the full NeuMF, or its GMF-only / MLP-only branch (same as --model gmf / mlp)")
        add_gmf_arguments(group)
        add_mlp_arguments(group)
        group.add_argument("--pretrained-gmf", type=Path, help="GMF-only checkpoint to initialise NeuMF from")
        group.add_argument("--pretrained-mlp", type=Path, help="MLP-only checkpoint to initialise NeuMF from")
        group.add_argument("--alpha", type=float, default=0.5, help="weight of GMF's output layer with pre-training")

    @classmethod
    def check_arguments(cls, args) -> None:
        if (args.pretrained_gmf is None) != (args.pretrained_mlp is None):
            raise ValueError("pre-training needs both --pretrained-gmf and --pretrained-mlp")
        if args.pretrained_gmf is not None and args.variant != "neumf":
            raise ValueError("--pretrained-gmf/--pretrained-mlp initialise a new --variant neumf run")
        if not 0.0 <= args.alpha <= 1.0:
            raise ValueError(f"--alpha must be in [0, 1], got {args.alpha}")
        check_mlp_arguments(args, needs_mlp=args.variant != "gmf")

    @classmethod
    def from_args(cls, args, data: DataFacts) -> "NeuMF":
        if args.pretrained_gmf is None:
            return cls(data.num_users, data.num_items, mf_dim=args.factors, mlp_layers=args.mlp_layers,
                       dropout=args.dropout, variant=args.variant)
        from merlin_ncf.models import checkpoint as ckpt
        from merlin_ncf.models.errors import TrainingError

        branches = []
        for path in (args.pretrained_gmf, args.pretrained_mlp):
            state = ckpt.load(path)
            # The branches are this file's own classes, so no registry lookup (registry imports this file).
            family = {"neumf": NeuMF, "gmf": GMF, "mlp": MLP}
            try:
                branch = family[state["model"]["name"]](**state["model"]["config"])
                branch.load_state_dict(state["model"]["state"])
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                raise TrainingError(f"checkpoint {path} is not a GMF or MLP model of this data: "
                                    f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
            shape = (branch.config.get("nb_users"), branch.config.get("nb_items"))
            if shape != (data.num_users, data.num_items):
                raise TrainingError(f"checkpoint {path} is for {shape[0]} users x {shape[1]} items, "
                                    f"the data has {data.num_users} x {data.num_items}")
            branches.append(branch)
        try:
            return cls.from_pretrained(*branches, alpha=args.alpha, dropout=args.dropout)
        except ValueError as exc:
            raise TrainingError(f"pre-training: {exc}") from None

    @classmethod
    def from_pretrained(cls, gmf: "NeuMF", mlp: "NeuMF", alpha: float = 0.5, dropout: float | None = None) -> "NeuMF":
        """NeuMF initialised from a trained GMF-only and MLP-only model (the paper's
        pre-training). The output layer concatenates alpha * GMF's and (1 - alpha) * MLP's,
        so the new model's logit is alpha * gmf_logit + (1 - alpha) * mlp_logit."""
        if getattr(gmf, "variant", None) != "gmf" or getattr(mlp, "variant", None) != "mlp":
            raise ValueError("from_pretrained needs a GMF-only and an MLP-only model")
        for key in ("nb_users", "nb_items"):
            if gmf.config[key] != mlp.config[key]:
                raise ValueError(f"GMF and MLP disagree on {key}: {gmf.config[key]} vs {mlp.config[key]}")
        model = cls(
            gmf.config["nb_users"], gmf.config["nb_items"], mf_dim=gmf.config["mf_dim"],
            mlp_layers=mlp.config["mlp_layers"],
            dropout=mlp.config["dropout"] if dropout is None else dropout,
        )
        own = model.state_dict()
        for source in (gmf, mlp):
            for name, tensor in source.state_dict().items():
                if not name.startswith("final."):
                    own[name] = tensor.clone()
        own["final.weight"] = torch.cat([alpha * gmf.final.weight, (1 - alpha) * mlp.final.weight], dim=1).detach()
        own["final.bias"] = (alpha * gmf.final.bias + (1 - alpha) * mlp.final.bias).detach()
        model.load_state_dict(own)
        return model


class GMF(NeuMF):
    """NeuMF's GMF branch alone (`--model gmf`): the same module and state_dict as
    NeuMF(variant="gmf"), with only the options that branch uses."""

    # One train file per Loader chunk, not the whole set: on ml-latest-small's validation lists
    # (three seeds) GMF scored HR@10 0.746 against 0.727, MLP 0.710 against 0.697, while NeuMF
    # gained from the whole set (docs/training-defaults.md, "Fifth round").
    train_defaults = dict(parts_per_chunk=1)

    def __init__(self, nb_users: int, nb_items: int, mf_dim: int = 64):
        super().__init__(nb_users, nb_items, mf_dim=mf_dim, variant="gmf")
        self.config = dict(nb_users=int(nb_users), nb_items=int(nb_items), mf_dim=int(mf_dim))

    @classmethod
    def add_arguments(cls, group) -> None:
        add_gmf_arguments(group)

    @classmethod
    def check_arguments(cls, args) -> None:
        pass

    @classmethod
    def from_args(cls, args, data: DataFacts) -> "GMF":
        return cls(data.num_users, data.num_items, mf_dim=args.factors)


class MLP(NeuMF):
    """NeuMF's MLP branch alone (`--model mlp`), like GMF above."""

    train_defaults = GMF.train_defaults  # measured with it

    def __init__(self, nb_users: int, nb_items: int, mlp_layers: tuple[int, ...] | list[int] = (256, 256, 128, 64),
                 dropout: float = 0.5):
        super().__init__(nb_users, nb_items, mlp_layers=mlp_layers, dropout=dropout, variant="mlp")
        self.config = dict(nb_users=int(nb_users), nb_items=int(nb_items),
                           mlp_layers=[int(w) for w in mlp_layers], dropout=float(dropout))

    @classmethod
    def add_arguments(cls, group) -> None:
        add_mlp_arguments(group)

    @classmethod
    def check_arguments(cls, args) -> None:
        check_mlp_arguments(args, needs_mlp=True)

    @classmethod
    def from_args(cls, args, data: DataFacts) -> "MLP":
        return cls(data.num_users, data.num_items, mlp_layers=args.mlp_layers, dropout=args.dropout)


def add_gmf_arguments(group) -> None:
    group.add_argument("--factors", type=positive_int, default=64, help="GMF embedding size")


def add_mlp_arguments(group) -> None:
    group.add_argument("--mlp-layers", type=positive_int, nargs="+", default=[256, 256, 128, 64],
                       help="MLP widths, the first being user + item embedding sizes (NVIDIA's notation)")
    group.add_argument("--dropout", type=float, default=0.5, help="dropout after each MLP layer")


def check_mlp_arguments(args, needs_mlp: bool) -> None:
    if not 0.0 <= args.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    if needs_mlp and (len(args.mlp_layers) < 2 or args.mlp_layers[0] % 2):
        raise ValueError("--mlp-layers needs an even first width (user + item embeddings) and at least one layer")

"""ConvNCF (He et al., "Outer Product-based Neural Collaborative Filtering", IJCAI 2018),
following RecBole's ConvNCF: user and item embeddings (64), their outer product as a 64 x 64
interaction map, a stack of ReLU convolutions down to 1 x 1, dropout and a linear prediction
layer; BPR loss summed over the batch's (user, positive, negative) triples plus RecBole's L2
term, reg_weights[0] x (norm of each embedding table) + reg_weights[1] x (norm of each
conv / prediction weight). Initialisation is torch's default, as in RecBole.

Defaults are the paper's stack, six 2 x 2 stride-2 convolutions of 32 channels; RecBole's
configuration is --cnn-kernels 4 4 2 2 --cnn-strides 4 4 2 2 --cnn-channels 32 32 32 32.

Speed. RecBole runs nn.Conv2d on the map; on CPU, oneDNN's 2 x 2 stride-2 convolutions
reach ~10 GFLOP/s forward here and less backward (bf16 worse still). When every
convolution's kernel equals its stride and is a power of two (the paper's and RecBole's
stacks), the convolutions cut the map into non-overlapping patches, and with the map's
positions in Z-order (row and column bits interleaved) each patch is a contiguous run:
every layer is a view and one GEMM (F.linear) on channels-last activations, with no im2col,
and bf16 autocast applies to it. The only copy is the map's reordering (E^2 values per
pair, less than the first layer's output). The user's embedding is looked up once per row
of candidates (a triple's positive and negative, an evaluation list's 1 + K) and
broadcast. (Factoring the first layer into a per-user and a per-item part, which avoids the
map, was measured slower: its broadcast products' backward are reductions, not GEMMs.)
Other stacks fall back to the map and nn.Conv2d (`patches=False` forces it, for tests).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from models.contract import DataFacts, PairwiseBatch, Recommender, positive_int


class ConvNCF(Recommender):
    input_type = "pairwise"

    def __init__(self, nb_users: int, nb_items: int, embedding_size: int = 64,
                 cnn_channels: tuple[int, ...] | list[int] = (32,) * 6,
                 cnn_kernels: tuple[int, ...] | list[int] = (2,) * 6,
                 cnn_strides: tuple[int, ...] | list[int] = (2,) * 6,
                 dropout: float = 0.2, reg_weights: tuple[float, float] | list[float] = (0.1, 0.1)):
        super().__init__()
        cnn_channels, cnn_kernels, cnn_strides = ([int(v) for v in values] for values in (cnn_channels, cnn_kernels, cnn_strides))
        if nb_users < 1 or nb_items < 1:
            raise ValueError("nb_users and nb_items must be positive")
        if not len(cnn_channels) == len(cnn_kernels) == len(cnn_strides) >= 1:
            raise ValueError("cnn_channels, cnn_kernels and cnn_strides need one value per layer")
        if len(reg_weights) != 2:
            raise ValueError("reg_weights takes two values (embeddings, layer weights)")
        size = embedding_size
        for kernel, stride in zip(cnn_kernels, cnn_strides):
            size = (size - kernel) // stride + 1
            if size < 1:
                raise ValueError(f"the convolutions shrink the {embedding_size}x{embedding_size} map to nothing")
        if size != 1:
            raise ValueError(f"the convolutions leave a {size}x{size} map, not 1x1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.config = dict(nb_users=int(nb_users), nb_items=int(nb_items), embedding_size=int(embedding_size),
                           cnn_channels=cnn_channels, cnn_kernels=cnn_kernels, cnn_strides=cnn_strides,
                           dropout=float(dropout), reg_weights=[float(w) for w in reg_weights])
        self.user_embedding = nn.Embedding(nb_users, embedding_size)
        self.item_embedding = nn.Embedding(nb_items, embedding_size)
        convs, channels = [], 1
        for width, kernel, stride in zip(cnn_channels, cnn_kernels, cnn_strides):
            convs.append(nn.Conv2d(channels, width, kernel, stride))
            channels = width
        self.convs = nn.ModuleList(convs).to(memory_format=torch.channels_last)
        self.dropout = nn.Dropout(dropout)
        self.predict = nn.Linear(channels, 1)
        self.patches = all(
            conv.kernel_size == conv.stride and conv.stride[0] == conv.stride[1] and is_power_of_two(conv.stride[0])
            for conv in self.convs
        ) and math.prod(cnn_strides) == embedding_size

    def score(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        hidden = self.patch_layers(user, items) if self.patches else self.conv_layers(user, items)
        return self.predict(self.dropout(hidden)).view(items.shape)

    def conv_layers(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """RecBole's computation: the map, then nn.Conv2d; [B * C, channels]."""
        p, q = self.user_embedding(user), self.item_embedding(items)
        size = q.shape[-1]
        hidden = torch.einsum("be,bcf->bcef", p, q).reshape(-1, 1, size, size)
        for conv in self.convs:
            hidden = F.relu(conv(hidden.contiguous(memory_format=torch.channels_last)))
        return hidden.flatten(1)

    def patch_layers(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        p, q = self.user_embedding(user), self.item_embedding(items)  # [B, E], [B, C, E]
        size = self.config["embedding_size"]  # static sizes: tracing would turn shapes into tensors
        bits = size.bit_length() - 1
        grid = torch.einsum("be,bcf->bcef", p, q).reshape(-1, *(2,) * (2 * bits))  # row bits, column bits
        zorder = [0] + [d for level in range(bits) for d in (1 + level, 1 + bits + level)]
        hidden = grid.permute(zorder).reshape(-1, size * size, 1)  # [pairs, positions in Z-order, channels]
        positions, channels = size * size, 1
        for conv in self.convs:
            patch = conv.stride[0] ** 2
            positions //= patch
            hidden = hidden.reshape(-1, positions, patch * channels)
            hidden = F.relu(F.linear(hidden, zorder_weight(conv), conv.bias))
            channels = conv.out_channels
        return hidden.flatten(1)

    def reg_loss(self) -> torch.Tensor:
        embeddings, layers = self.config["reg_weights"]
        loss = embeddings * (self.user_embedding.weight.norm(2) + self.item_embedding.weight.norm(2))
        for weight in [conv.weight for conv in self.convs] + [self.predict.weight]:
            loss = loss + layers * weight.norm(2)
        return loss

    def loss(self, batch: PairwiseBatch, *, step: int) -> torch.Tensor:
        scores = self.score(batch.user, torch.stack([batch.positive, batch.negative], dim=1)).float()
        return F.softplus(scores[:, 1] - scores[:, 0]).sum() + self.reg_loss()

    @classmethod
    def add_arguments(cls, group) -> None:
        group.add_argument("--embedding-size", type=positive_int, default=64, help="user and item embedding size")
        group.add_argument("--cnn-channels", type=positive_int, nargs="+", default=[32] * 6, help="channels per convolution")
        group.add_argument("--cnn-kernels", type=positive_int, nargs="+", default=[2] * 6, help="kernel size per convolution")
        group.add_argument("--cnn-strides", type=positive_int, nargs="+", default=[2] * 6, help="stride per convolution")
        group.add_argument("--dropout", type=float, default=0.2, help="dropout before the prediction layer")
        group.add_argument("--reg-weights", type=float, nargs=2, default=[0.1, 0.1],
                           help="L2 weights of the embedding tables and of the layer weights (RecBole's)")

    @classmethod
    def check_arguments(cls, args) -> None:
        cls(1, 1, **cls._options(args))  # the constructor's checks, on a 1 x 1 model

    @classmethod
    def _options(cls, args) -> dict:
        return dict(embedding_size=args.embedding_size, cnn_channels=args.cnn_channels, cnn_kernels=args.cnn_kernels,
                    cnn_strides=args.cnn_strides, dropout=args.dropout, reg_weights=args.reg_weights)

    @classmethod
    def from_args(cls, args, data: DataFacts) -> "ConvNCF":
        return cls(data.num_users, data.num_items, **cls._options(args))


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def zorder_weight(conv: nn.Conv2d) -> torch.Tensor:
    """A k x k conv weight [out, in, k, k] as a Linear weight [out, k * k * in] over a patch
    stored in Z-order (row bit before column bit at each level, coarsest first), channels last."""
    weight, out, channels, k = conv.weight, conv.out_channels, conv.in_channels, conv.stride[0]
    bits = k.bit_length() - 1
    split = weight.reshape(out, channels, *(2,) * (2 * bits))  # row bits then column bits, coarsest first
    order = [0] + [d for level in range(bits) for d in (2 + level, 2 + bits + level)] + [1]
    return split.permute(order).reshape(out, k * k * channels)

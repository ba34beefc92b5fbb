"""ConvNCF (He et al., "Outer Product-based Neural Collaborative Filtering", IJCAI 2018),
following RecBole's ConvNCF: user and item embeddings (64), their outer product as a 64 x 64
interaction map, a stack of ReLU convolutions down to 1 x 1, dropout and a linear prediction
layer; BPR loss summed over the batch's (user, positive, negative) triples plus RecBole's L2
term, reg_weights[0] x (norm of each embedding table) + reg_weights[1] x (norm of each
conv / prediction weight). Initialisation is torch's default, as in RecBole.

Defaults are the paper's stack, six 2 x 2 stride-2 convolutions of 32 channels; RecBole's
configuration is --cnn-kernels 4 4 2 2 --cnn-strides 4 4 2 2 --cnn-channels 32 32 32 32.

Speed. The map is never built when the first convolution's kernel equals its stride (the
paper's and RecBole's stacks): with p, q the embeddings cut into blocks of k,
conv1(p q^T)[c, a, b] = sum_j L[a, j, c] q[k b + j] with L = sum_i W[c, i, j] p[k a + i]
depending on the user only, so L is computed once per row of candidates (a triple's
positive and negative, an evaluation list's 1 + K) and one bmm gives all candidates' first
layer, already channels-last (transposed, which the later convolutions' transposed kernels
undo). Later convolutions run channels-last, bf16 under autocast.
Measured on this shared 2-core machine, one thread each, RecBole's 4,4,2,2 stack, 2,048
triples per batch: one RecBole 1.2.1 ConvNCF epoch on ml-latest-small (81,200 triples)
134.5 s; ours 29.5 s (bf16) / 40.2 s (fp32) for the same number of triples. Tried and
dropped: all layers as Z-ordered patches + GEMMs (slower: its permutes cost more than
oneDNN's convolutions), later layers as patch GEMMs (no clear gain: oneDNN's backward of
these small convolutions is ~6x their forward, but the patch copies cost as much).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from merlin_ncf.models.contract import DataFacts, PairwiseBatch, Recommender, positive_int


class ConvNCF(Recommender):
    input_type = "pairwise"
    # RecBole's: Adam lr 1e-3 (default betas), 2,048 triples (4,096 scored pairs) per batch.
    train_defaults = dict(batch_size=4096, lr=1e-3, beta1=0.9, beta2=0.999, eval_batch_size=2**11)
    # Each scored pair holds a 32 x 32 x channels first-layer map: 2^11 pairs ~ 256 MB.
    score_all_chunk = 2**11

    def __init__(self, nb_users: int, nb_items: int, embedding_size: int = 64,
                 cnn_channels: tuple[int, ...] | list[int] = (32,) * 6,
                 cnn_kernels: tuple[int, ...] | list[int] = (2,) * 6,
                 cnn_strides: tuple[int, ...] | list[int] = (2,) * 6,
                 dropout: float = 0.2, reg_weights: tuple[float, float] | list[float] = (0.1, 0.1)):
        super().__init__()
        cnn_channels, cnn_kernels, cnn_strides = (
            [int(v) for v in values] for values in (cnn_channels, cnn_kernels, cnn_strides))
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
        first = self.convs[0]
        self.split_first = (first.kernel_size == first.stride and first.stride[0] == first.stride[1]
                            and embedding_size % first.stride[0] == 0)

    def score(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        p, q = self.user_embedding(user), self.item_embedding(items)  # [B, E], [B, C, E]
        size = self.config["embedding_size"]  # static: tracing would turn q.shape into tensors
        first, rest = self.convs[0], self.convs[1:]
        if self.split_first:
            # conv1(p q^T)[c, a, b] = sum_j L[a, j, c] q[k b + j], L = sum_i W[c, i, j] p[k a + i]:
            # L once per row, then one bmm for all its candidates, giving the map transposed
            # ([b, a]) and channels-last; the later convolutions use transposed kernels.
            k, blocks = first.stride[0], size // first.stride[0]
            user_side = torch.einsum("bai,cij->bjac", p.view(-1, blocks, k), first.weight.squeeze(1))
            user_side = user_side.reshape(-1, k, blocks * first.out_channels)
            item_side = q.reshape(-1, q.shape[1] * blocks, k).to(user_side.dtype)  # bf16 under autocast
            hidden = torch.baddbmm(first.bias.to(user_side.dtype).repeat(blocks), item_side, user_side)
            hidden = F.relu(hidden.view(-1, blocks, blocks, first.out_channels).permute(0, 3, 1, 2))
            for conv in rest:
                hidden = F.relu(F.conv2d(hidden, conv.weight.transpose(2, 3), conv.bias, conv.stride))
        else:
            hidden = torch.einsum("be,bcf->bcef", p, q).reshape(-1, 1, size, size)
            for conv in self.convs:
                hidden = F.relu(conv(hidden.contiguous(memory_format=torch.channels_last)))
        return self.predict(self.dropout(hidden.flatten(1))).view(items.shape)

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
        group.add_argument("--cnn-channels", type=positive_int, nargs="+", default=[32] * 6,
                           help="channels per convolution")
        group.add_argument("--cnn-kernels", type=positive_int, nargs="+", default=[2] * 6,
                           help="kernel size per convolution")
        group.add_argument("--cnn-strides", type=positive_int, nargs="+", default=[2] * 6,
                           help="stride per convolution")
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


"""ConvNCF (He et al., "Outer Product-based Neural Collaborative Filtering", IJCAI 2018),
following RecBole's ConvNCF: user and item embeddings (64), their outer product as a 64 x 64
interaction map, a stack of ReLU convolutions down to 1 x 1, dropout and a linear prediction
layer; BPR loss summed over the batch's (user, positive, negative) triples plus RecBole's L2
term, reg_weights[0] x (norm of each embedding table) + reg_weights[1] x (norm of each
conv / prediction weight). Initialisation is torch's default, as in RecBole, or with
--pretrained-mf the user and item embeddings of a trained GMF (or NeuMF) run, the paper's
initialisation (it pre-trains them with MF).

Defaults are RecBole's stack, four convolutions of 32 channels with kernels = strides 4, 4, 2, 2:
a training step of 2,048 triples costs ~0.2 s on one core here, the paper's six 2 x 2 stride-2
convolutions (--cnn-kernels 2 2 2 2 2 2 --cnn-strides 2 2 2 2 2 2 --cnn-channels 32 32 32 32 32 32)
~1.2 s, so a default run on ml-latest-small takes minutes instead of an hour; the paper's stack
learns more per epoch there but less per second (docs/training-defaults.md, "ConvNCF").

Speed. The map is never built when the first convolution's kernel equals its stride (the
paper's and RecBole's stacks): its first layer is a bmm over the user's side, computed once per
distinct user of a batch (2,048 triples on ml-latest-small name ~440 users) and gathered per
chunk, and the item embeddings (see _first_layers). When the second convolution's kernel also
equals its stride, that bmm writes the first layer's map directly in the second layer's patch
order, so the second layer is one GEMM with no copy, and _FirstTwoLayers runs both in chunks
that fit in L2 (a whole-catalogue row in slices of its map), into reused buffers, recomputing
the map in backward: the map (8,192 values a pair with RecBole's stack, the model's largest
tensor) never goes to memory. Their output stays a permuted view that the next patch layer
copies once into its patches. Later kernel = stride layers are GEMMs over their patches; all
of it bf16 under --amp's autocast, the last 32 -> 1 layer in fp32. What is left of a step is
mostly these GEMMs (docs/benchmarks.md has the split).
Training is fp32 unless --amp. On this project's 2-core CPU (AVX-512 BF16), one thread, a
locked ml-latest-small epoch at RecBole's settings takes 6.6 s in bf16 against 8.3 s in fp32
(RecBole: 73.7 s; docs/benchmarks.md).
torch.compile (inductor, CPU) took 223 s to compile a step, then ran it 3x slower than eager.
On the old path (one bmm, then oneDNN convolutions) ReLU's backward over the map, on
mismatched layouts, took 40% of a step. Figures: docs/benchmarks.md (benchmarks/convncf.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from merlin_ncf.models.contract import DataFacts, PairwiseBatch, Recommender, positive_int


CHUNK_ELEMENTS = 2**18  # first-layer values per chunk: 512 KB in bf16, so a chunk stays in L2


def _chunks(total: int, per_row: int):
    step = max(1, CHUNK_ELEMENTS // per_row)
    return [slice(lo, min(lo + step, total)) for lo in range(0, total, step)]


def _units(item, user, user_units, unit_rows, chunk: slice):
    """The operands of a chunk of units of the first layer's bmm: a unit is (row of candidates,
    second-layer patch row A); its item side is its row's (unit_rows), its user side its
    user's for that A (user_units); index_select per chunk, so neither side is ever expanded
    to all units in memory."""
    rows, users = unit_rows[chunk], user_units[chunk]
    return rows, item.index_select(0, rows), users, user.index_select(0, users)


def _unit_rows(item, user_units):
    per_row = user_units.shape[0] // item.shape[0]
    return torch.arange(user_units.shape[0], device=user_units.device) // per_row


def _second_layer_chunks(item, user, user_units, weight, bias) -> torch.Tensor:
    """relu(second layer) of relu(bmm(item, user)), chunk by chunk: in place, into one buffer,
    and addmm's out= rather than a torch.cat of the chunks (each ReLU, cat or bias add over a
    map is a pass over memory, and a fresh buffer a chunk is one more). A chunk is a whole
    number of units, or, when one unit's map is larger (a catalogue's candidates), a slice of
    its map rows: whole second-layer patch rows (g map rows each), so they stay in L2 too."""
    units, unit_rows = user_units.shape[0], _unit_rows(item, user_units)
    map_rows, width, channels = item.shape[1], user.shape[2], weight.shape[0]
    g = weight.shape[1] // width
    span = min(map_rows, max(g, CHUNK_ELEMENTS // width // g * g))
    out = item.new_empty(units, map_rows // g, channels)
    chunks = _chunks(units, map_rows * width)
    first = item.new_empty(chunks[0].stop, span, width)
    for chunk in chunks:
        _, item_c, _, user_c = _units(item, user, user_units, unit_rows, chunk)
        for lo in range(0, map_rows, span):  # one pass unless a unit's map exceeds a chunk (then one unit)
            hi = min(lo + span, map_rows)
            map_ = torch.bmm(item_c[:, lo:hi], user_c, out=first[:len(item_c), :hi - lo]).relu_()
            part = out[chunk, lo // g:hi // g]  # [n, (candidates, B), C']: contiguous (all rows, or one unit)
            torch.addmm(bias, map_.view(-1, weight.shape[1]), weight.t(), out=part.view(-1, channels)).relu_()
    # [rows, A, (candidates, B), C']: the caller's split of the last-but-one dim is a view in
    # both directions, while a split of the first would make backward copy the gradient
    return out.view(item.shape[0], -1, *out.shape[1:])


class _FirstTwoLayers(torch.autograd.Function):
    """relu(bmm(item, user)) then the second layer's patch GEMM and its ReLU, chunk by chunk,
    keeping the first layer's map (the model's largest tensor, 8,192 values a pair) for no
    longer than a chunk: the backward recomputes it (a K = k + 1 bmm) instead of reading it
    back from memory. user holds each distinct user's side once; user_units says whose each
    unit uses, and the backward sums the units' gradients into it (index_add_)."""

    @staticmethod
    def forward(ctx, item, user, user_units, weight, bias):
        out = _second_layer_chunks(item, user, user_units, weight, bias)
        ctx.save_for_backward(item, user, user_units, weight, out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        item, user, user_units, weight, out = ctx.saved_tensors
        units, unit_rows = user_units.shape[0], _unit_rows(item, user_units)
        # fp32 sums: a row's or a user's gradient adds several units' (bf16 under autocast)
        grad_item_t = torch.zeros(item.transpose(1, 2).shape, dtype=torch.float32, device=item.device)
        grad_user = torch.zeros(user.shape, dtype=torch.float32, device=user.device)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        # into out's (contiguous) layout, so that each chunk's rows are a view: it arrives permuted
        grad_out = torch.ops.aten.threshold_backward.grad_input(grad_out.to(item.dtype), out, 0,
                                                                grad_input=torch.empty_like(out))
        grad_out = grad_out.view(-1, weight.shape[0])
        chunks = _chunks(units, item.shape[1] * user.shape[2])
        first = item.new_empty(chunks[0].stop, item.shape[1], user.shape[2])
        grad_first = torch.empty_like(first)
        for chunk in chunks:
            rows, item_c, users, user_c = _units(item, user, user_units, unit_rows, chunk)
            map_ = torch.bmm(item_c, user_c, out=first[:len(item_c)]).relu_()
            grad = grad_out[chunk.start * out.shape[2]:chunk.stop * out.shape[2]]
            if grad_weight.dtype == map_.dtype:
                grad_weight.addmm_(grad.t(), map_.view(grad.shape[0], -1))
            else:  # bf16 products, summed in fp32
                grad_weight += grad.t().mm(map_.view(grad.shape[0], -1))
            grad_map = torch.mm(grad, weight, out=grad_first[:len(item_c)].view(grad.shape[0], -1)).view(map_.shape)
            torch.ops.aten.threshold_backward.grad_input(grad_map, map_, 0, grad_input=grad_map)  # in place
            # (grad_map @ user_c^T)^T: faster than grad_map @ user_c^T (N = k + 1 is tiny), and
            # index_add_ is too from a contiguous source
            grad_item_t.index_add_(0, rows, torch.bmm(user_c, grad_map.transpose(1, 2)).float())
            grad_user.index_add_(0, users, torch.bmm(item_c.transpose(1, 2), grad_map).float())
        grad_bias = grad_out.float().sum(0)
        return grad_item_t.transpose(1, 2).to(item.dtype), grad_user.to(user.dtype), None, grad_weight, grad_bias


def first_two_layers(item: torch.Tensor, user: torch.Tensor, user_units: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor) -> torch.Tensor:
    """relu(second layer): _FirstTwoLayers when training; when tracing for serving, the same ops
    in one piece (a traced loop would be unrolled for the example's size)."""
    if torch.jit.is_tracing():
        rows = item.shape[0]
        _, item, _, user = _units(item, user, user_units, _unit_rows(item, user_units), slice(None))
        first = F.relu(torch.bmm(item, user))
        out = F.relu(F.linear(first.view(item.shape[0], -1, weight.shape[1]), weight, bias))
        return out.view(rows, -1, *out.shape[1:])
    if torch.is_grad_enabled():
        return _FirstTwoLayers.apply(item, user, user_units, weight, bias)
    return _second_layer_chunks(item, user, user_units, weight, bias)


class ConvNCF(Recommender):
    input_type = "pairwise"
    init_options = ("pretrained_mf",)
    # RecBole's: Adam lr 1e-3 (default betas), 2,048 triples (4,096 scored pairs) per batch.
    # The first-layer map is built chunk by chunk (CHUNK_ELEMENTS); what a scored pair keeps is
    # its second layer's output (512 values with RecBole's stack), so 2^14 pairs take ~32 MB and
    # one score() call covers a user's whole catalogue (ml-latest-small's 9,742 items): the
    # user side once per user.
    train_defaults = dict(batch_size=4096, lr=1e-3, beta1=0.9, beta2=0.999, eval_batch_size=2**14)
    score_all_chunk = 2**14

    def __init__(self, nb_users: int, nb_items: int, embedding_size: int = 64,
                 cnn_channels: tuple[int, ...] | list[int] = (32, 32, 32, 32),
                 cnn_kernels: tuple[int, ...] | list[int] = (4, 4, 2, 2),
                 cnn_strides: tuple[int, ...] | list[int] = (4, 4, 2, 2),
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
        # Layers after the first whose kernel equals their stride and tiles the map exactly run
        # as GEMMs over their patches; the second one's patches come out of the first layer's bmm.
        self.patch_layers, size = [], embedding_size // first.stride[0]
        for conv in self.convs[1:]:
            k = conv.stride[0]
            self.patch_layers.append(conv.kernel_size == conv.stride == (k, k) and size % k == 0)
            size = (size - conv.kernel_size[0]) // k + 1

    def score(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        q = self.item_embedding(items)  # [B, C, E]
        if self.split_first:
            # the user side once per distinct user (a batch of triples repeats its users); a
            # trace records its example's ops, so serving keeps one user side per row
            users, index = ((user, torch.arange(user.shape[0], device=user.device)) if torch.jit.is_tracing()
                            else torch.unique(user, return_inverse=True))
            hidden, rest = self._first_layers(self.user_embedding(users), index, q)
        else:
            size = self.config["embedding_size"]
            hidden = torch.einsum("be,bcf->bcef", self.user_embedding(user), q).reshape(-1, 1, size, size)
            for conv in self.convs:
                hidden = F.relu(conv(hidden.contiguous(memory_format=torch.channels_last)))
            hidden, rest = hidden.permute(0, 3, 2, 1), len(self.patch_layers)  # all done: [N, 1, 1, C]
        for conv, patches in list(zip(self.convs[1:], self.patch_layers))[rest:]:
            hidden = F.relu(self._patch_conv(hidden, conv) if patches else
                            F.conv2d(hidden.reshape(-1, *hidden.shape[-3:]).permute(0, 3, 1, 2),
                                     conv.weight.transpose(2, 3), conv.bias, conv.stride).permute(0, 2, 3, 1))
        # the 32 -> 1 prediction in fp32 even under autocast: bf16 scores tie often, and the
        # ranking counts ties against the positive; the map is 1 x 1 by now
        with torch.autocast(hidden.device.type, enabled=False):
            return self.predict(self.dropout(hidden.reshape(-1, hidden.shape[-1]).float())).view(items.shape)

    def _first_layers(self, p: torch.Tensor, index: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The first convolution (kernel = stride = k) without building the map, and the second
        too when it is a patch layer (kernel = stride = g): with a = g A + i, b = g B + j,
        conv1(p q^T)[c, a, b] = sum_j' L[a, j', c] q[k b + j'], L = sum_i' W[c, i', j'] p[k a + i']
        depends on the user only, so L is computed once per distinct user (p: their embeddings;
        row r of candidates has user index[r]), and one bmm per (row, A) (a unit) writes every
        candidate's first-layer map already in the second layer's patch order [B, (j, i, c)];
        the bias rides along as an extra contraction term, so its gradient is part of the
        bmm's instead of a reduction over the largest tensor. Returns the map, transposed
        channels-last [rows, candidates, b, a, C] (a permuted view), and how many later layers
        it has done."""
        first, size = self.convs[0], self.config["embedding_size"]
        k, blocks, channels = first.stride[0], size // first.stride[0], first.out_channels
        second = bool(self.patch_layers) and self.patch_layers[0]
        g = self.convs[1].stride[0] if second else 1
        users, (rows, candidates) = p.shape[0], q.shape[:2]
        user_side = torch.einsum("uai,cij->ujac", p.view(users, blocks, k), first.weight.squeeze(1))
        bias = first.bias.view(1, 1, 1, channels).expand(users, 1, blocks, channels)
        user_side = torch.cat([user_side, bias], dim=1)  # [users, j' (+ bias), a, c]
        user_side = user_side.view(users, k + 1, blocks // g, g * channels).transpose(1, 2)
        user_side = user_side.reshape(users * (blocks // g), k + 1, g * channels)  # [(user, A), j', (i, c)]
        item_side = torch.cat([q.view(rows, candidates, blocks, k), q.new_ones(rows, candidates, blocks, 1)], dim=3)
        item_side = item_side.view(rows, candidates * blocks, k + 1)
        # unit (row, A) uses user_side[index[row] * blocks // g + A]
        user_units = (index.unsqueeze(1) * (blocks // g) + torch.arange(blocks // g, device=index.device)).view(-1)
        if second:
            conv = self.convs[1]
            weight = conv.weight.permute(0, 3, 2, 1).reshape(conv.out_channels, -1)  # [C', (j, i, c)]
            dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else user_side.dtype
            hidden = first_two_layers(item_side.to(dtype), user_side.to(dtype), user_units, weight.to(dtype),
                                      conv.bias.to(dtype))
            channels = conv.out_channels
        else:  # bf16 under autocast
            hidden = F.relu(torch.bmm(item_side.repeat_interleave(blocks // g, dim=0).to(user_side.dtype),
                                      user_side.index_select(0, user_units)))
        # [rows, A, candidates, B, C]
        # [rows, A, candidates, B, C] viewed as [rows, candidates, B, A, C]: the next patch
        # layer's one copy reorders it into its patches (a second copy here would be a pass
        # over the map, forward and backward)
        hidden = hidden.view(rows, blocks // g, candidates, blocks // g, channels).permute(0, 2, 3, 1, 4)
        return hidden, int(second)

    @staticmethod
    def _patch_conv(hidden: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        """A kernel = stride convolution of transposed channels-last maps [..., b, a, C] (any
        strides) as one GEMM over their non-overlapping patches (faster on CPU than oneDNN's
        small convolutions with their backward and the layout changes around them)."""
        k, (*lead, rows, cols, channels) = conv.stride[0], hidden.shape
        patches = hidden.unflatten(-3, (rows // k, k)).unflatten(-2, (cols // k, k)).transpose(-4, -3)
        weight = conv.weight.permute(0, 3, 2, 1).reshape(conv.out_channels, -1)  # [C', (j, i, c)]
        out = F.linear(patches.reshape(-1, k * k * channels), weight, conv.bias)
        return out.view(*lead, rows // k, cols // k, conv.out_channels)

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
        group.add_argument("--cnn-channels", type=positive_int, nargs="+", default=[32] * 4,
                           help="channels per convolution (RecBole's stack; the paper's: 32 x 6)")
        group.add_argument("--cnn-kernels", type=positive_int, nargs="+", default=[4, 4, 2, 2],
                           help="kernel size per convolution (the paper's: 2 x 6)")
        group.add_argument("--cnn-strides", type=positive_int, nargs="+", default=[4, 4, 2, 2],
                           help="stride per convolution (the paper's: 2 x 6)")
        group.add_argument("--dropout", type=float, default=0.2, help="dropout before the prediction layer")
        group.add_argument("--reg-weights", type=float, nargs=2, default=[0.1, 0.1],
                           help="L2 weights of the embedding tables and of the layer weights (RecBole's)")
        group.add_argument("--pretrained-mf", type=Path,
                           help="GMF or NeuMF checkpoint of this data (RUN/checkpoints/best.pt) to initialise the "
                                "user and item embeddings from, the paper's pre-training; its --factors must equal "
                                "--embedding-size")

    @classmethod
    def check_arguments(cls, args) -> None:
        cls(1, 1, **cls._options(args))  # the constructor's checks, on a 1 x 1 model

    @classmethod
    def _options(cls, args) -> dict:
        return dict(embedding_size=args.embedding_size, cnn_channels=args.cnn_channels, cnn_kernels=args.cnn_kernels,
                    cnn_strides=args.cnn_strides, dropout=args.dropout, reg_weights=args.reg_weights)

    @classmethod
    def from_args(cls, args, data: DataFacts) -> "ConvNCF":
        model = cls(data.num_users, data.num_items, **cls._options(args))
        if args.pretrained_mf is not None:
            model.load_mf_embeddings(args.pretrained_mf)
        return model

    def load_mf_embeddings(self, path: Path) -> None:
        """Copy a trained GMF's (or NeuMF's GMF branch's) user and item tables into this model's
        embeddings, refusing in one TrainingError a checkpoint of another shape or model."""
        from merlin_ncf.models import checkpoint as ckpt
        from merlin_ncf.models.errors import TrainingError

        try:
            state = ckpt.load(path)
        except TrainingError as exc:
            raise TrainingError(f"--pretrained-mf: {exc}") from None
        try:
            weights = state["model"]["state"]
            user, item = weights["gmf_user.weight"], weights["gmf_item.weight"]
        except (KeyError, TypeError):
            raise TrainingError(f"--pretrained-mf {path}: not a GMF or NeuMF checkpoint (no GMF embeddings)") from None
        if user.shape != self.user_embedding.weight.shape or item.shape != self.item_embedding.weight.shape:
            raise TrainingError(f"--pretrained-mf {path}: its embeddings are {tuple(user.shape)} users and "
                                f"{tuple(item.shape)} items, this model's {tuple(self.user_embedding.weight.shape)} "
                                f"and {tuple(self.item_embedding.weight.shape)} (same data, --embedding-size = "
                                "its --factors)")
        with torch.no_grad():
            self.user_embedding.weight.copy_(user)
            self.item_embedding.weight.copy_(item)


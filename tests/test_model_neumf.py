"""NeuMF, its dropout, the negative sampler and the HR/NDCG metrics, on hand-made inputs."""

import math

import pytest
import torch

from merlin_ncf.models.layers import DenseReluDropout
from merlin_ncf.models.metrics import hit_and_ndcg_sums, positive_rank
from merlin_ncf.models.neumf import NeuMF
from merlin_ncf.models.sampler import NegativeSampler, epoch_generator


@pytest.mark.parametrize("variant", ["neumf", "gmf", "mlp"])
def test_forward_shapes_pairs_and_candidate_lists(variant):
    model = NeuMF(50, 40, mf_dim=8, mlp_layers=[16, 16, 8], dropout=0.2, variant=variant).eval()
    users = torch.tensor([0, 7, 49])
    assert model(users, torch.tensor([1, 2, 39])).shape == (3,)
    lists = torch.randint(0, 40, (3, 6))
    scores = model(users, lists)
    assert scores.shape == (3, 6) and scores.dtype == torch.float32
    # A candidate list scores exactly like the same pairs scored one by one.
    pairs = model(users.repeat_interleave(6), lists.reshape(-1))
    torch.testing.assert_close(scores.reshape(-1), pairs)


def test_variants_own_only_their_branch():
    names = lambda m: {n.split(".")[0] for n, _ in m.named_parameters()}  # noqa: E731
    assert names(NeuMF(5, 5, variant="gmf")) == {"gmf_user", "gmf_item", "final"}
    assert "gmf_user" not in names(NeuMF(5, 5, variant="mlp"))
    assert {"gmf_user", "mlp_user", "mlp_first", "final"} <= names(NeuMF(5, 5))


def test_defaults_are_nvidias_and_init_is_the_papers():
    torch.manual_seed(0)
    model = NeuMF(2000, 3000)
    assert model.config["mf_dim"] == 64 and model.config["mlp_layers"] == [256, 256, 128, 64]
    assert model.config["dropout"] == 0.5
    assert model.mlp_user.embedding_dim == 128
    assert model.gmf_user.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert model.mlp_item.weight.mean().abs().item() < 1e-3
    glorot = math.sqrt(6 / (256 + 256))
    assert model.mlp_first.linear.weight.abs().max().item() <= glorot
    assert model.mlp_first.linear.weight.abs().max().item() > 0.9 * glorot
    lecun = math.sqrt(3 / model.final.in_features)
    assert model.final.weight.abs().max().item() <= lecun
    assert all(m.bias.abs().sum() == 0 for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_neumf_from_pretrained_combines_gmf_and_mlp_outputs():
    torch.manual_seed(1)
    gmf = NeuMF(30, 20, mf_dim=8, variant="gmf")
    mlp = NeuMF(30, 20, mlp_layers=[16, 8, 4], variant="mlp")
    for branch in (gmf, mlp):  # give them non-trivial biases, as training would
        torch.nn.init.normal_(branch.final.bias)
    alpha = 0.3
    neumf = NeuMF.from_pretrained(gmf, mlp, alpha=alpha)
    users, items = torch.arange(30), torch.randint(0, 20, (30, 5))
    for model in (gmf, mlp, neumf):
        model.eval()
    with torch.no_grad():
        expected = alpha * gmf(users, items) + (1 - alpha) * mlp(users, items)
        torch.testing.assert_close(neumf(users, items), expected)
    with pytest.raises(ValueError, match="GMF-only and an MLP-only"):
        NeuMF.from_pretrained(mlp, gmf)


def identity_layer(width: int, dropout: float) -> DenseReluDropout:
    layer = DenseReluDropout(width, width, dropout)
    with torch.no_grad():
        layer.linear.weight.copy_(torch.eye(width))
        layer.linear.bias.zero_()
    return layer


def test_dense_relu_dropout_drops_about_p_and_keeps_the_mean():
    torch.manual_seed(0)
    layer = identity_layer(512, 0.5)
    x = torch.ones(512, 512)
    y = layer(x)
    assert (y == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert y.mean().item() == pytest.approx(1.0, abs=0.02)
    signed = torch.randn(64, 512)
    torch.testing.assert_close(layer.eval()(signed), signed.clamp_min(0))  # eval: plain ReLU
    torch.testing.assert_close(identity_layer(512, 0.0)(signed), signed.clamp_min(0))
    # Gradients flow only through kept elements, scaled like the forward.
    x.requires_grad_(True)
    out = identity_layer(512, 0.25)(x)
    out.sum().backward()
    torch.testing.assert_close(x.grad, out.detach())
    assert out.max().item() == pytest.approx(256 / 192)


def test_sampler_draws_real_items_fresh_each_epoch_and_reproducibly():
    sampler = NegativeSampler(first_item=3, num_items=50, negatives=4)
    positives = torch.arange(3, 43)
    items, labels = sampler.candidates(positives, epoch_generator(7, 0, 0, torch.device("cpu")))
    assert items.shape == labels.shape == (40, 5)
    assert torch.equal(items[:, 0], positives)
    assert labels[:, 0].eq(1).all() and labels[:, 1:].eq(0).all()
    assert items.min() >= 3 and items.max() < 50
    again, _ = sampler.candidates(positives, epoch_generator(7, 0, 0, torch.device("cpu")))
    later, _ = sampler.candidates(positives, epoch_generator(7, 1, 0, torch.device("cpu")))
    other_rank, _ = sampler.candidates(positives, epoch_generator(7, 0, 1, torch.device("cpu")))
    assert torch.equal(items, again)
    assert not torch.equal(items, later) and not torch.equal(items, other_rank)


def test_hr_and_ndcg_on_hand_made_lists():
    # Positive first; with K=2: list 0 ranks it 1st, list 1 3rd, list 2 2nd, list 3 ties.
    scores = torch.tensor([
        [0.9, 0.1, 0.2, 0.3],
        [0.2, 0.5, 0.4, 0.1],
        [0.5, 0.1, 0.7, 0.3],
        [0.5, 0.5, 0.5, 0.5],
    ])
    assert positive_rank(scores).tolist() == [0, 2, 1, 3]
    hits, ndcg = hit_and_ndcg_sums(scores, k=2)
    assert hits == 2.0
    assert ndcg == pytest.approx(1.0 + 1.0 / math.log2(3))
    hits, ndcg = hit_and_ndcg_sums(scores, k=3)
    assert hits == 3.0 and ndcg == pytest.approx(1.0 + 0.5 + 1.0 / math.log2(3))
    assert hit_and_ndcg_sums(scores, k=10)[0] == 4.0

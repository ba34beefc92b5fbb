"""ConvNCF: scoring candidate lists equals RecBole's per-pair forward, the loss is RecBole's
BPR sum plus its L2 term, and bf16 autocast stays close to fp32."""

import pytest
import torch

from merlin_ncf.models.contract import PairwiseBatch
from merlin_ncf.models.convncf import ConvNCF

RECBOLE = dict(cnn_channels=[32] * 4, cnn_kernels=[4, 4, 2, 2], cnn_strides=[4, 4, 2, 2])  # the default
PAPER = dict(cnn_channels=[32] * 6, cnn_kernels=[2] * 6, cnn_strides=[2] * 6)


def recbole_forward(model: ConvNCF, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
    """RecBole 1.2.1's ConvNCF.forward, written out on our parameters."""
    grid = torch.bmm(model.user_embedding(user).unsqueeze(2), model.item_embedding(item).unsqueeze(1)).unsqueeze(1)
    for conv in model.convs:
        grid = torch.relu(conv(grid))
    return model.predict(grid.sum(dim=(2, 3))).squeeze(-1)


@pytest.mark.parametrize("config", [PAPER, RECBOLE, dict(embedding_size=8, cnn_channels=[4, 5], cnn_kernels=[3, 3],
                                                       cnn_strides=[2, 3]),
                                    # split first layer, then a convolution that is not a patch GEMM
                                    dict(embedding_size=8, cnn_channels=[4, 5], cnn_kernels=[2, 4], cnn_strides=[2, 1]),
                                    dict(embedding_size=16, cnn_channels=[4, 5, 3], cnn_kernels=[2, 2, 4],
                                         cnn_strides=[2, 2, 1])])
def test_candidate_lists_score_like_recboles_pairs(config):
    torch.manual_seed(0)
    model = ConvNCF(20, 30, **config).eval()
    assert model.split_first == (config.get("cnn_kernels", [2])[0] == config.get("cnn_strides", [2])[0])
    user, items = torch.randint(0, 20, (5,)), torch.randint(0, 30, (5, 7))
    with torch.no_grad():
        expected = recbole_forward(model, user.repeat_interleave(7), items.reshape(-1)).view(5, 7)
        torch.testing.assert_close(model.score(user, items), expected, rtol=1e-5, atol=1e-6)


def test_score_all_ranks_the_catalogue_like_recboles_pairs():
    torch.manual_seed(3)
    model = ConvNCF(6, 700, **RECBOLE).eval()  # 700 items: several chunks of the fused first layers
    users = torch.tensor([0, 4, 5])
    with torch.no_grad():
        expected = recbole_forward(model, users.repeat_interleave(700), torch.arange(700).repeat(3)).view(3, 700)
        torch.testing.assert_close(model.score_all(users), expected, rtol=1e-5, atol=1e-6)


def test_loss_is_recboles_bpr_sum_plus_l2_norms():
    torch.manual_seed(1)
    model = ConvNCF(10, 12, reg_weights=[0.1, 0.05], **RECBOLE).eval()
    batch = PairwiseBatch(torch.tensor([0, 3, 9]), torch.tensor([1, 2, 11]), torch.tensor([5, 5, 0]))
    with torch.no_grad():
        distance = (recbole_forward(model, batch.user, batch.positive)
                    - recbole_forward(model, batch.user, batch.negative))
        bpr = torch.log(1 + torch.exp(-distance)).sum()
        reg = 0.1 * (model.user_embedding.weight.norm() + model.item_embedding.weight.norm())
        reg = reg + 0.05 * sum(conv.weight.norm() for conv in model.convs) + 0.05 * model.predict.weight.norm()
        torch.testing.assert_close(model.loss(batch, step=0), bpr + reg)


@pytest.mark.parametrize("config", [PAPER, RECBOLE])
def test_gradients_equal_recboles(config):
    """The fused first layers (recomputed in backward, chunked) give autograd's gradients of
    RecBole's forward, for every parameter, across several chunks."""
    torch.manual_seed(2)
    model = ConvNCF(50, 60, dropout=0.0, **config)
    batch = PairwiseBatch(torch.randint(0, 50, (40,)), torch.randint(0, 60, (40,)), torch.randint(0, 60, (40,)))
    model.loss(batch, step=0).backward()
    ours = {name: param.grad.clone() for name, param in model.named_parameters()}
    model.zero_grad()
    distance = recbole_forward(model, batch.user, batch.positive) - recbole_forward(model, batch.user, batch.negative)
    (torch.nn.functional.softplus(-distance).sum() + model.reg_loss()).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(ours[name], param.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_a_batch_repeating_its_users_scores_and_trains_like_recboles_pairs():
    """The user side is computed once per distinct user of a batch (most triples share their
    user with others): rows in any order, a user in many rows, and rows over several chunks
    still give RecBole's per-pair scores and every parameter's gradient."""
    torch.manual_seed(4)
    model = ConvNCF(9, 60, dropout=0.0, **RECBOLE)
    user = torch.tensor([7, 2, 7, 7, 0, 2, 7, 5, 0, 7] * 4)  # 4 distinct users in 40 rows, 160 chunk units
    batch = PairwiseBatch(user, torch.randint(0, 60, (40,)), torch.randint(0, 60, (40,)))
    with torch.no_grad():
        torch.testing.assert_close(model.eval().score(user, torch.stack([batch.positive, batch.negative], 1)),
                                   torch.stack([recbole_forward(model, user, batch.positive),
                                                recbole_forward(model, user, batch.negative)], 1),
                                   rtol=1e-5, atol=1e-6)
    model.train().loss(batch, step=0).backward()
    ours = {name: param.grad.clone() for name, param in model.named_parameters()}
    model.zero_grad()
    distance = recbole_forward(model, user, batch.positive) - recbole_forward(model, user, batch.negative)
    (torch.nn.functional.softplus(-distance).sum() + model.reg_loss()).backward()
    assert ours["user_embedding.weight"][[0, 2, 5, 7]].abs().min() > 0  # every batch user's row got its sum
    for name, param in model.named_parameters():
        torch.testing.assert_close(ours[name], param.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_defaults_are_recboles_stack_and_bad_stacks_are_refused():
    model = ConvNCF(3, 3)
    assert model.config["embedding_size"] == 64 and model.config["cnn_channels"] == [32] * 4
    assert [conv.stride for conv in model.convs] == [conv.kernel_size for conv in model.convs] == [
        (4, 4), (4, 4), (2, 2), (2, 2)]
    paper = ConvNCF(3, 3, cnn_channels=[32] * 6, cnn_kernels=[2] * 6, cnn_strides=[2] * 6)
    assert len(paper.convs) == 6
    with pytest.raises(ValueError, match="1x1"):
        ConvNCF(3, 3, cnn_channels=[32], cnn_kernels=[2], cnn_strides=[2])
    with pytest.raises(ValueError, match="one value per layer"):
        ConvNCF(3, 3, cnn_channels=[32, 32], cnn_kernels=[2], cnn_strides=[2])


def test_bf16_autocast_scores_close_to_fp32_and_train():
    torch.manual_seed(0)
    model = ConvNCF(30, 40, **RECBOLE).eval()
    user, items = torch.randint(0, 30, (16,)), torch.randint(0, 40, (16, 5))
    with torch.no_grad():
        exact = model.score(user, items)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.score(user, items)
    assert low.dtype == torch.float32  # bf16 inside, the last layer in fp32 so that scores rarely tie
    torch.testing.assert_close(low.float(), exact, rtol=0.05, atol=0.05 * exact.abs().max().item())
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(PairwiseBatch(user, items[:, 0], items[:, 1]), step=0)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

"""Mult-VAE: its CSR rows, the multi-hot input, the loss' terms and KL annealing, and that
scoring needs only user ids (training rows live in the model and its checkpoint)."""

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from merlin_ncf.models.contract import UserRowsBatch
from merlin_ncf.models.multvae import MultVAE, csr_rows
from merlin_ncf.models.registry import build_model


def test_csr_rows_merges_duplicates_and_sorts_each_row():
    users = np.array([2, 0, 2, 2, 0, 3])
    items = np.array([5, 1, 0, 5, 4, 2])
    indptr, indices = csr_rows(users, items, nb_users=5, nb_items=6)
    assert indptr.dtype == indices.dtype == torch.int64
    assert indptr.tolist() == [0, 2, 2, 4, 5, 5]
    assert indices.tolist() == [1, 4, 0, 5, 2]
    torch_in = csr_rows(torch.as_tensor(users), torch.as_tensor(items), 5, 6)
    assert all(torch.equal(a, b) for a, b in zip(torch_in, (indptr, indices)))
    with pytest.raises(ValueError, match="outside"):
        csr_rows(np.array([5]), np.array([0]), 5, 6)


def test_rows_are_the_users_training_items_and_survive_a_checkpoint():
    users, items = np.array([0, 0, 2, 3, 3, 3]), np.array([1, 4, 0, 2, 3, 4])
    model = MultVAE.from_interactions(users, items, 4, 5, hidden=8, latent=2)
    rows = model.rows(torch.tensor([3, 1, 0, 3]))
    expected = torch.zeros(4, 5)
    expected[0, [2, 3, 4]] = expected[2, [1, 4]] = expected[3, [2, 3, 4]] = 1
    assert torch.equal(rows, expected)  # user 1 has no history: an all-zero row
    rebuilt = build_model("multvae", model.config)
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt.rows(torch.arange(4)), model.rows(torch.arange(4)))


def test_kl_weight_anneals_linearly_to_the_cap():
    model = MultVAE(3, 4, hidden=4, latent=2)
    assert (model.config["anneal_cap"], model.config["total_anneal_steps"]) == (0.2, 200_000)
    assert model.kl_weight(0) == 0.0
    assert model.kl_weight(20_000) == pytest.approx(0.1)
    assert model.kl_weight(10**7) == 0.2
    assert MultVAE(3, 4, total_anneal_steps=0).kl_weight(0) == 0.2


def test_loss_is_multinomial_nll_plus_weighted_kl_of_the_posterior():
    torch.manual_seed(0)
    model = MultVAE.from_interactions(np.array([0, 0, 1]), np.array([0, 2, 1]), 2, 3, hidden=4, latent=2,
                                      total_anneal_steps=10).eval()  # eval: z = mu, no input dropout
    user = torch.tensor([0, 1])
    rows = model.rows(user)
    mu, logvar = model.encode(rows)
    nll = -(F.log_softmax(model.decode(mu), 1) * rows).sum(1).mean()
    kl = (0.5 * (logvar.exp() + mu ** 2 - 1 - logvar).sum(1)).mean()
    torch.testing.assert_close(model.loss(UserRowsBatch(user), step=1), nll + 0.1 * kl)
    torch.testing.assert_close(model.loss(UserRowsBatch(user), step=7), nll + 0.2 * kl)


def test_encoder_decoder_shapes_are_the_papers():
    model = MultVAE(10, 1000)
    assert model.encoder.weight.shape == (600, 1000)
    assert model.to_latent.weight.shape == (400, 600)
    assert model.decoder.weight.shape == (600, 200)
    assert model.to_items.weight.shape == (1000, 600)
    assert model.input_dropout.p == 0.5


def test_scoring_is_deterministic_in_eval_and_sampling_in_training():
    torch.manual_seed(0)
    model = MultVAE.from_interactions(np.arange(6) % 3, np.arange(6), 3, 8, hidden=16, latent=4)
    user = torch.tensor([0, 1, 2])
    model.eval()
    torch.testing.assert_close(model.score_all(user), model.score_all(user))
    model.train()
    batch = UserRowsBatch(user)
    assert model.loss(batch, step=0) != model.loss(batch, step=0)  # reparameterisation noise, dropout


def test_fold_in_rows_score_like_a_stored_user():
    torch.manual_seed(0)
    model = MultVAE.from_interactions(np.array([0, 0, 1]), np.array([3, 5, 2]), 2, 8, hidden=16, latent=4).eval()
    unseen_user = torch.zeros(1, 8)
    unseen_user[0, [3, 5]] = 1  # the same history as user 0, given as a row
    with torch.no_grad():
        torch.testing.assert_close(model.score_rows(unseen_user), model.score_all(torch.tensor([0])))


def test_size_dependent_defaults_keep_the_papers_ratios_and_yield_to_flags(capsys):
    from types import SimpleNamespace

    from merlin_ncf.models.train_ncf import choose_defaults, parse_args

    def auto(users, *flags):
        args = parse_args(["--data", "ETL", "--output", "RUN", "--model", "multvae", *flags])
        choose_defaults(args, SimpleNamespace(train_rows=100 * users, num_users=users, num_items=5 * users,
                                                   train_files=["part_0.parquet"]), verbose=True)
        return args

    small = auto(613)  # ml-latest-small: ~10 steps per epoch instead of the paper's 2
    assert (small.batch_size, small.epochs, small.patience, small.lr) == (64, 200, 20, 1e-3)
    assert small.total_anneal_steps == 4 * 200 * 10  # the KL cap 80% into the longest run
    assert "--batch-size 64" in capsys.readouterr().out
    ml20m = auto(138_493)  # the paper's data set: its batch, and ~its 200,000 annealing steps
    assert ml20m.batch_size == 500 and ml20m.total_anneal_steps == 4 * 200 * 277
    mine = auto(613, "--batch-size", "32", "--epochs", "50", "--total-anneal-steps", "7", "--patience", "0")
    assert (mine.batch_size, mine.epochs, mine.total_anneal_steps, mine.patience) == (32, 50, 7, 0)
    assert auto(613, "--batch-size", "200").total_anneal_steps == 4 * 200 * 4  # follows the batch given

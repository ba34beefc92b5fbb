"""The Mult-VAE paper's protocol (models/vae_cf.py, `train_ncf.py --protocol vae-cf`): the
held-out split, Recall@K and NDCG@K checked against torchmetrics, and a run on planted data
where Mult-VAE ranks held-out users' items well beyond popularity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torchmetrics.functional.retrieval import retrieval_normalized_dcg, retrieval_recall

from merlin_ncf.models import vae_cf
from test_train_cli import TRAIN, run, write_planted_etl


def test_recall_and_ndcg_match_torchmetrics_with_the_papers_normalisation():
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(40, 300, generator=generator)  # distinct: torchmetrics orders ties arbitrarily
    targets = torch.rand(40, 300, generator=generator) < torch.linspace(0.0, 0.4, 40).unsqueeze(1)
    ks = (1, 5, 20, 100)
    got = vae_cf.recall_ndcg_sums(scores, targets.float(), ks)
    has = targets.any(dim=1)
    assert not bool(has[0]) and int(has.sum()) == 39  # a row without targets counts nothing
    for k in ks:
        recall = ndcg = 0.0
        for row in torch.nonzero(has).flatten():
            n = int(targets[row].sum())
            # torchmetrics divides by |targets|; the paper by min(K, |targets|)
            recall += float(retrieval_recall(scores[row], targets[row], top_k=k)) * n / min(k, n)
            ndcg += float(retrieval_normalized_dcg(scores[row], targets[row], top_k=k))
        assert got[f"recall@{k}"] == pytest.approx(recall, rel=1e-6), k
        assert got[f"ndcg@{k}"] == pytest.approx(ndcg, rel=1e-6), k


def test_ties_count_against_targets_and_a_nan_is_never_a_hit():
    targets = torch.zeros(3, 10)
    targets[:, [2, 7]] = 1
    flat = torch.zeros(3, 10)
    assert vae_cf.recall_ndcg_sums(flat, targets, (5,)) == {"recall@5": 0.0, "ndcg@5": 0.0}
    nan = torch.full((3, 10), float("nan"))
    assert vae_cf.recall_ndcg_sums(nan, targets, (5,)) == {"recall@5": 0.0, "ndcg@5": 0.0}
    perfect = targets.clone()
    assert vae_cf.recall_ndcg_sums(perfect, targets, (1, 5)) == {"recall@1": 3.0, "ndcg@1": 3.0,
                                                                  "recall@5": 3.0, "ndcg@5": 3.0}


def test_split_holds_users_out_and_divides_their_items_80_20():
    rng = np.random.default_rng(1)
    users = torch.from_numpy(np.repeat(np.arange(3, 53), rng.integers(2, 30, 50)))
    items = torch.from_numpy(rng.integers(2, 90, len(users)))
    split = vae_cf.split_heldout(users, items, 53, 90, count=10)
    again = vae_cf.split_heldout(users, items, 53, 90, count=10)
    assert torch.equal(split.heldout, again.heldout) and torch.equal(split.targets.indices, again.targets.indices)
    assert len(split.heldout) == 10 and not torch.isin(split.train_users, split.heldout).any()
    assert len(split.train_users) + int(torch.isin(users, split.heldout).sum()) == len(users)
    for row, user in enumerate(split.heldout.tolist()):
        mine = set(items[users == user].tolist())
        fold = set(split.fold_in.indices[split.fold_in.indptr[row]:split.fold_in.indptr[row + 1]].tolist())
        target = set(split.targets.indices[split.targets.indptr[row]:split.targets.indptr[row + 1]].tolist())
        assert fold | target == mine and not fold & target
        assert len(target) == (int(0.2 * len(mine)) if len(mine) >= 5 else 0)
    with pytest.raises(ValueError, match="--heldout-users must be in"):
        vae_cf.split_heldout(users, items, 53, 90, count=50)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """1000 users in 10 taste groups of 20 items, 15 training items each."""
    return write_planted_etl(tmp_path_factory.mktemp("vae-cf") / "etl", users=1000, items=200, groups=10,
                             per_user=15, negatives=50, files=4)


def test_multvae_beats_popularity_on_held_out_users(planted, tmp_path):
    out = tmp_path / "run"
    result = run([*TRAIN, "--data", planted, "--output", out, "--model", "multvae", "--protocol", "vae-cf",
                  "--heldout-users", "200", "--epochs", "10", "--hidden", "64", "--latent", "16", "--batch-size",
                  "50", "--lr", "0.01", "--no-progress", "--threads", "1"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "vae-cf protocol: 200 users held out of training" in result.stdout
    found = json.loads((out / "config.json").read_text())["metrics"]["vae_cf"]
    assert found["users"] == 200  # 15 items each: 12 fold-in, 3 targets
    popularity = found["popularity"]
    # The planted groups: a user's 3 targets are among the 8 group items not folded in.
    assert found["recall@20"] >= popularity["recall@20"] + 0.5
    assert found["ndcg@100"] >= popularity["ndcg@100"] + 0.3
    from merlin_ncf.models import checkpoint as ckpt
    from merlin_ncf.models.registry import model_from

    model = model_from(ckpt.load(out / "checkpoints" / "best.pt"))
    assert len(model.row_users()) == 800  # the held-out users were never trained on


def test_protocol_needs_a_model_that_scores_rows(tmp_path, capsys):
    from merlin_ncf.models.train_ncf import parse_args

    for extra, fragment in ((["--protocol", "vae-cf"], "--model neumf cannot score a row"),
                            (["--model", "multvae", "--heldout-users", "5"], "--heldout-users is for --protocol vae-cf"),
                            (["--model", "multvae", "--protocol", "vae-cf", "--mode", "test"], "not by --mode test")):
        with pytest.raises(SystemExit) as exit:
            parse_args(["--data", str(tmp_path), "--output", str(tmp_path / "run"), *extra])
        assert exit.value.code == 2
        err = capsys.readouterr().err
        assert fragment in err and len(err.strip().splitlines()) == 1

"""Issue 11 item 3: ranking every item fast without changing a score. The NeuMF family's
catalogue scorer (serving/catalogue.py) gives model.pt's score for every item and user, and
the top-K step's partial selection ranks exactly like sorting every candidate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from merlin_ncf.models.contract import serving_module
from merlin_ncf.models.registry import build_model
from merlin_ncf.serving.catalogue import catalogue_scorer
from merlin_ncf.serving.triton_models.ranking import best_first

USERS, ITEMS, FIRST_INDEX = 40, 300, 3


def _run(tmp_path, name: str, **config):
    """A run directory holding what export reads of it: config.json and model.ts."""
    torch.manual_seed(0)
    model = build_model(name, dict(nb_users=USERS, nb_items=ITEMS, **config))
    for parameter in model.parameters():  # far from the tiny initial values: real score spread
        torch.nn.init.normal_(parameter, 0.0, 0.5)
    run = tmp_path / name
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {"name": name, "config": model.config}, "output": model.output}))
    serving_module(model).save(str(run / "model.ts"))
    return run


@pytest.mark.parametrize("name, config", [
    ("neumf", dict(mf_dim=8, mlp_layers=[16, 16, 8], dropout=0.5)),
    ("gmf", dict(mf_dim=8)),
    ("mlp", dict(mlp_layers=[16, 8], dropout=0.0)),
])
@pytest.mark.parametrize("popularity", [False, True])
def test_catalogue_scores_equal_model_ts_for_every_item(tmp_path, name, config, popularity):
    run = _run(tmp_path, name, **config)
    shares = np.random.default_rng(0).random(ITEMS).astype(np.float32) if popularity else None
    scorer = catalogue_scorer(run, name, True, shares, FIRST_INDEX)
    pairs = torch.jit.load(str(run / "model.ts"))
    items = torch.arange(ITEMS)
    with torch.inference_mode():
        for user in (FIRST_INDEX, 17, USERS - 1):
            expected = pairs(torch.full((ITEMS,), user), items)
            np.testing.assert_allclose(scorer(torch.tensor([user])).numpy(), expected.numpy(), atol=1e-6, rtol=0)
        unknown = scorer(torch.tensor([0])).numpy()
    if popularity:  # a reserved (unknown) user gets item popularity, as history.UnknownUsersByPopularity
        np.testing.assert_array_equal(unknown, shares)
    assert np.ptp(expected.numpy()) > 0.1


def test_families_without_a_dot_product_form_keep_scoring_pairs(tmp_path):
    run = _run(tmp_path, "convncf", embedding_size=8, cnn_channels=[4, 4, 4], cnn_kernels=[2, 2, 2],
               cnn_strides=[2, 2, 2])
    assert catalogue_scorer(run, "convncf", False, None, FIRST_INDEX) is None


def _rank_by_sorting_everything(candidates, scores, k):
    _, first = np.unique(candidates, return_index=True)
    first.sort()
    return first[np.argsort(-scores[first], kind="stable")][:k]


def test_partial_top_k_selection_equals_sorting_every_candidate():
    rng = np.random.default_rng(0)
    for trial in range(2000):
        size = int(rng.integers(1, 60))
        candidates = rng.integers(0, int(rng.integers(1, 80)), size)
        # Few distinct scores: many ties; a candidate listed twice has one score, as a model gives.
        per_id = rng.integers(0, 5, 100).astype(np.float32)
        if trial % 4 == 0:
            per_id[rng.integers(0, 100, 10)] = np.nan  # NaN is never ranked above a number
        scores = per_id[candidates]
        k = int(rng.integers(1, 70))
        np.testing.assert_array_equal(best_first(candidates, scores, k),
                                      _rank_by_sorting_everything(candidates, scores, k))

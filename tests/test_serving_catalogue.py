"""Issue 11 item 3: ranking every item fast without changing a score. catalogue.pt is the
run's registry model's own all-item scoring (models/contract.py every_item_module, the same
score_all that training's full-ranking metrics use), wrapped for unknown users by the same
popularity wrapper as model.pt; it gives model.pt's score for every item and user, export
checks that for a known and an unknown user, and the top-K step's partial selection ranks
exactly like sorting every candidate."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from merlin_ncf.models.contract import serving_module
from merlin_ncf.models.registry import build_model
from merlin_ncf.serving.catalogue import catalogue_module
from merlin_ncf.serving.errors import ServingError
from merlin_ncf.serving.history import with_popularity
from merlin_ncf.serving.inputs import RunModel
from merlin_ncf.serving.triton_models.ranking import best_first

USERS, ITEMS, FIRST_INDEX = 40, 300, 3
FAMILY = [
    ("neumf", dict(mf_dim=8, mlp_layers=[16, 16, 8], dropout=0.5)),
    ("gmf", dict(mf_dim=8)),
    ("mlp", dict(mlp_layers=[16, 8], dropout=0.0)),
]


def _run(tmp_path, name: str, **config):
    """A run directory holding what export reads of it: config.json and model.ts; and the model."""
    torch.manual_seed(0)
    model = build_model(name, dict(nb_users=USERS, nb_items=ITEMS, **config))
    for parameter in model.parameters():  # far from the tiny initial values: real score spread
        torch.nn.init.normal_(parameter, 0.0, 0.5)
    run = tmp_path / name
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {"name": name, "config": model.config}, "output": model.output}))
    serving_module(model).save(str(run / "model.ts"))
    return run, model.eval()


def _catalogue(run, name):
    config = json.loads((run / "config.json").read_text())["model"]["config"]
    pairs = torch.jit.load(str(run / "model.ts"))
    return catalogue_module(RunModel(name, "logit", config), run / "model.ts", pairs), pairs


@pytest.mark.parametrize("name, config", FAMILY)
@pytest.mark.parametrize("popularity", [False, True])
def test_catalogue_is_the_models_own_score_all_and_equals_model_ts(tmp_path, name, config, popularity):
    run, model = _run(tmp_path, name, **config)
    catalogue, pairs = _catalogue(run, name)
    shares = np.random.default_rng(0).random(ITEMS).astype(np.float32)
    if popularity:  # export wraps model.pt and catalogue.pt in the same wrapper
        catalogue = with_popularity(catalogue, shares, FIRST_INDEX, every_item=True)
        pairs = with_popularity(pairs, shares, FIRST_INDEX)
    items = torch.arange(ITEMS)
    with torch.inference_mode():
        for user in (FIRST_INDEX, 17, USERS - 1):
            expected = pairs(torch.full((ITEMS,), user), items)
            np.testing.assert_allclose(catalogue(torch.tensor([user])).numpy(), expected.numpy(), atol=1e-6, rtol=0)
            # The model's own score_all (what training's full ranking uses), not a copy of its forward.
            own = torch.sigmoid(model.score_all(torch.tensor([user])))[0]
            np.testing.assert_allclose(catalogue(torch.tensor([user])).numpy(), own.numpy(), atol=1e-6, rtol=0)
        unknown = catalogue(torch.tensor([0])).numpy()
        np.testing.assert_allclose(unknown, pairs(torch.zeros(ITEMS, dtype=torch.int64), items).numpy(), atol=1e-6, rtol=0)
    if popularity:  # a reserved (unknown) user gets item popularity
        np.testing.assert_array_equal(unknown, shares)
    assert np.ptp(expected.numpy()) > 0.1


def test_families_without_all_item_scoring_keep_scoring_pairs(tmp_path):
    run, _ = _run(tmp_path, "convncf", embedding_size=8, cnn_channels=[4, 4, 4], cnn_kernels=[2, 2, 2],
                  cnn_strides=[2, 2, 2])
    assert _catalogue(run, "convncf")[0] is None


def test_a_model_ts_that_is_not_the_configured_model_is_an_error_not_a_silent_fallback(tmp_path):
    run, _ = _run(tmp_path, "neumf", mf_dim=8, mlp_layers=[16, 16, 8])
    other = build_model("neumf", dict(nb_users=USERS, nb_items=ITEMS, mf_dim=4, mlp_layers=[16, 16, 8]))
    serving_module(other).save(str(run / "model.ts"))
    with pytest.raises(ServingError, match=r"model.ts does not hold the neumf model its config.json describes: .*size mismatch"):
        _catalogue(run, "neumf")


def test_export_checks_catalogue_for_unknown_users_too(etl_dir, model_runs, tmp_path):
    """check_scoring compares catalogue.pt with model.pt for a known user and, with
    --unknown-ids popularity, an unknown one: a catalogue.pt that scores unknown users with the
    model instead of popularity is caught."""
    from merlin_ncf.serving.checks import check_scoring
    from merlin_ncf.serving.export import export
    from merlin_ncf.serving.inputs import locate_inputs

    run, model = model_runs["neumf"]
    repo = tmp_path / "repo"
    export(etl_dir, run, repo, flavour="python", top_k=0, unknown_ids="popularity", log=lambda *_: None)
    inputs = locate_inputs(etl_dir, run)
    check_scoring(repo, inputs)  # as exported: both paths agree
    broken = tmp_path / "broken"
    shutil.copytree(repo, broken)
    catalogue, _ = _catalogue(run, "neumf")  # without the popularity wrapper
    torch.jit.save(catalogue, str(broken / "model" / "1" / "catalogue.pt"))
    with pytest.raises(ServingError, match="catalogue.pt scores differ from model.pt's"):
        check_scoring(broken, inputs)


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

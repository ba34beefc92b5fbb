"""Issue 8: every registered model family exports and serves on the CPU tritonserver the same
way (neumf: a logit model, served as probabilities; convncf, multvae: raw scores): served
scores equal the run's model.ts and the model's own score_pairs, top-K over all items leaves
out the user's items, and with --unknown-ids popularity an unknown user gets item popularity.
One server per model: the repositories use the same model names."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import SERVED_MODELS
from merlin_ncf.serving.client import RecommenderClient
from merlin_ncf.serving.export import export
from merlin_ncf.serving.serve import TritonServer
from test_serving import InProcess

pytestmark = pytest.mark.slow
UNKNOWN_USER = 999_999_999


@pytest.fixture(scope="module", params=list(SERVED_MODELS))
def served(request, etl_dir, model_runs, tmp_path_factory):
    """(name, in-process model, reference, client) with the model's repository served."""
    name = request.param
    run, model = model_runs[name]
    repo = tmp_path_factory.mktemp(f"repo-{name}") / "repo"
    export(etl_dir, run, repo, flavour="python", top_k=10, unknown_ids="popularity", log=lambda *_: None)
    with TritonServer(repo, startup_timeout_s=240) as server, RecommenderClient(server.grpc_url, "grpc") as client:
        yield name, model, InProcess(etl_dir, run), client


def _encoded(reference: InProcess, user: int, items: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    from merlin.io import Dataset

    raw = pd.DataFrame({"user_id": np.full(len(items), user, np.int64), "item_id": np.asarray(items, np.int64)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoded = reference.workflow.transform(Dataset(raw)).to_ddf().compute()
    return torch.from_numpy(encoded.user_id.to_numpy()), torch.from_numpy(encoded.item_id.to_numpy())


def test_served_scores_equal_in_process_scores(served):
    name, model, reference, client = served
    items = np.random.default_rng(1).choice(reference.all_items, 101, replace=False)
    user = int(reference.users[3])
    scores = client.scores([user], items)
    assert scores.shape == (101,) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, reference.scores(user, items), atol=1e-5, rtol=0)  # the run's model.ts
    with torch.inference_mode():
        own = model.score_pairs(*_encoded(reference, user, items)).float()
    expected = torch.sigmoid(own) if model.output == "logit" else own
    np.testing.assert_allclose(scores, expected.numpy(), atol=1e-5, rtol=0)  # the model in-process
    assert client.score_kind() == ("probability" if name == "neumf" else "score")
    assert np.ptp(scores) > 0  # a real ranking, not a constant


def test_top_k_over_all_items_excludes_seen_items(served):
    _, _, reference, client = served
    user = int(reference.users[7])
    unseen = reference.unseen_items(user)
    assert 0 < len(reference.seen[user]) and len(unseen) > 10
    everything = client.recommend(user, top_k=len(reference.all_items))
    assert sorted(everything.item_ids.tolist()) == sorted(unseen.tolist())  # every unseen item, no seen one
    top = client.recommend(user, top_k=10)
    expected = reference.scores(user, unseen)
    np.testing.assert_allclose(top.scores, np.sort(expected)[::-1][:10], atol=1e-5, rtol=0)
    np.testing.assert_allclose(top.scores, reference.scores(user, top.item_ids), atol=1e-5, rtol=0)
    assert not set(top.item_ids.tolist()) & reference.seen[user]


def test_unknown_user_gets_item_popularity(served, etl_dir):
    _, _, reference, client = served
    train = pd.concat(pd.read_parquet(f) for f in sorted((etl_dir / "train").glob("*.parquet")))
    items = pd.read_parquet(etl_dir / "items.parquet")
    raw_item = dict(zip(items.item_id, items.raw_item_id))
    pairs = train[["user_id", "item_id"]].drop_duplicates()
    share = pairs.item_id.value_counts() / pairs.user_id.nunique()
    popularity = {raw_item[i]: share.get(i, 0.0) for i in items.item_id}
    candidates = reference.all_items[:20]
    np.testing.assert_allclose(client.scores([UNKNOWN_USER], candidates), [popularity[i] for i in candidates],
                               atol=1e-6, rtol=0)
    top = client.recommend(UNKNOWN_USER, top_k=5)
    np.testing.assert_allclose(top.scores, sorted(popularity.values(), reverse=True)[:5], atol=1e-6, rtol=0)
    np.testing.assert_allclose(top.scores, [popularity[i] for i in top.item_ids], atol=1e-6, rtol=0)


def test_export_takes_the_output_kind_from_the_run(etl_dir, model_runs, tmp_path):
    import json
    import shutil

    from merlin_ncf.feature_spec import FeatureSpec
    from merlin_ncf.serving.inputs import RunModel, check_run_matches_data
    from merlin_ncf.serving.repository import read_config
    from test_serving import _export_cli

    def copy_run(name: str, **changes) -> "Path":
        to = tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(model_runs[name][0], to)
        config = json.loads((to / "config.json").read_text())
        config.update(changes)
        config = {k: v for k, v in config.items() if v is not None}
        (to / "config.json").write_text(json.dumps(config))
        return to

    spec = FeatureSpec.load(etl_dir)
    # An older NeuMF run records no output (nor model name): a logit model, served as probabilities.
    older = copy_run("neumf", output=None)
    config = json.loads((older / "config.json").read_text())
    del config["model"]["name"]
    (older / "config.json").write_text(json.dumps(config))
    assert check_run_matches_data(older, spec) == RunModel("neumf", "logit")
    # A run whose model.ts returns raw scores but claims probabilities is refused before anything is written.
    claims_logit = copy_run("convncf", output="logit")
    code, stderr = _export_cli("--data", str(etl_dir), "--run", str(claims_logit), "--output", str(tmp_path / "bad"))
    assert code == 2 and "must return probabilities" in stderr and stderr.count("\n") == 1, stderr
    assert not (tmp_path / "bad").exists()
    unknown_output = copy_run("multvae", output="ranking")
    code, stderr = _export_cli("--data", str(etl_dir), "--run", str(unknown_output), "--output", str(tmp_path / "bad"))
    assert code == 2 and "records output 'ranking'" in stderr, stderr
    # What `score` means is recorded where clients read it.
    repo = tmp_path / "repo"
    assert _export_cli("--data", str(etl_dir), "--run", str(model_runs["multvae"][0]), "--output", str(repo),
                       "--top-k", "0")[0] == 0
    for model in ("scores", "model"):
        parameters = read_config(repo / model / "config.pbtxt").parameters
        assert parameters["score_kind"].string_value == "score" and parameters["model_name"].string_value == "multvae"

"""models/train_ncf.py end to end on a planted dataset: learning, outputs, resume after a
kill, 2-process Gloo DDP, bf16 AMP, --mode test, the hub entry and bad input."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from merlin_ncf import atomic
from merlin_ncf.serving.server_runtime import free_port

REPO = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(REPO / "models" / "train_ncf.py")]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
# Small model and batches: a few hundred ms per epoch on 2 cores.
SMALL = ["--factors", "16", "--mlp-layers", "32", "32", "16", "--dropout", "0.1", "--batch-size", "2000",
         "--lr", "0.02", "--no-progress", "--seed", "3"]
EPOCHS = 3
KILL = "MERLIN_NCF_TEST_KILL_AFTER_STEPS"  # the trainer's hidden crash aid (models/trainer.py)


def write_planted_etl(out: Path, users=400, items=300, groups=10, per_user=15, negatives=100, files=4, seed=0):
    """An ETL-shaped directory where each user's items come from their group's 30 items, so a
    model that learns the groups ranks the held-out positive above most of the 100 random
    negatives (random ranking: HR@10 ~ 0.1)."""
    from merlin.schema import ColumnSchema, Schema, Tags
    from merlin.schema.io.tensorflow_metadata import TensorflowMetadata

    rng = np.random.default_rng(seed)
    (out / "train").mkdir(parents=True)
    (out / "test").mkdir()
    first = 3
    nu, ni = users + first, items + first
    group_items = np.arange(items).reshape(groups, -1) + first
    train_u, train_i, test_u, test_i = [], [], [], []
    for user in range(first, nu):
        chosen = rng.choice(group_items[user % groups], per_user + 1, replace=False)
        train_u += [user] * per_user
        train_i += list(chosen[:-1])
        pool = np.setdiff1d(np.arange(first, ni), chosen)
        test_u += [user] * (negatives + 1)
        test_i += [chosen[-1], *rng.choice(pool, negatives, replace=False)]
    train = pd.DataFrame({"user_id": train_u, "item_id": train_i}, dtype="int64").sample(frac=1, random_state=seed)
    names = []
    for k, part in enumerate(np.array_split(train, files)):
        part.to_parquet(out / "train" / f"part_{k}.parquet", index=False)
        names.append(f"train/part_{k}.parquet")
    labels = np.zeros(len(test_u), "float32")
    labels[:: negatives + 1] = 1.0
    pd.DataFrame({"user_id": np.array(test_u, "int64"), "item_id": np.array(test_i, "int64"), "label": labels}) \
        .to_parquet(out / "test" / "part_0.parquet", index=False)
    domain = lambda name, n: {"domain": {"min": 0, "max": n - 1, "name": name}}  # noqa: E731
    schema = Schema([
        ColumnSchema("user_id", dtype="int64", tags=[Tags.USER_ID, Tags.USER, Tags.CATEGORICAL],
                     properties=domain("user_id", nu)),
        ColumnSchema("item_id", dtype="int64", tags=[Tags.ITEM_ID, Tags.ITEM, Tags.CATEGORICAL],
                     properties=domain("item_id", ni)),
    ])
    TensorflowMetadata.from_merlin_schema(schema).to_proto_text_file(str(out / "train"))
    spec = {
        "feature_spec": {"user_id": {"dtype": "int64", "cardinality": nu},
                         "item_id": {"dtype": "int64", "cardinality": ni}, "label": {"dtype": "float32"}},
        "source_spec": {"train": [{"type": "parquet", "features": ["user_id", "item_id"], "files": names}],
                        "test": [{"type": "parquet", "features": ["user_id", "item_id", "label"],
                                  "files": ["test/part_0.parquet"]}]},
        "channel_spec": {"user_ch": ["user_id"], "item_ch": ["item_id"], "label_ch": ["label"]},
        "metadata": {"test_samples_per_series": negatives + 1, "first_index": first, "dataset": "planted"},
    }
    (out / "feature_spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    atomic.mark(out, "etl")  # this project's ETL layout, so training reads it as it is
    return out


def run(args, timeout=240, env=None, **kwargs):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **(env or {})}, **kwargs)


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def trained_once(tmp_path_factory, arguments):
    """A module fixture's cache of CLI runs: `train(key)` runs train_ncf.py with `arguments(key)`
    the first time a key is asked for, and returns (run directory, completed process)."""
    done = {}

    def train(key: str):
        if key not in done:
            out = tmp_path_factory.mktemp(key) / "run"
            result = run([*TRAIN, "--output", out, *arguments(key)])
            assert result.returncode == 0, result.stderr[-3000:]
            done[key] = out, result
        return done[key]

    return train


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return write_planted_etl(tmp_path_factory.mktemp("planted") / "etl")


@pytest.fixture(scope="module")
def reference_run(planted, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    result = run([*TRAIN, "--data", planted, "--output", out, "--epochs", EPOCHS, *SMALL])
    assert result.returncode == 0, result.stderr
    return out, result


def test_training_learns_the_planted_structure_and_writes_the_run_directory(reference_run, planted):
    out, result = reference_run
    log = read_log(out)
    assert [row["epoch"] for row in log] == list(range(1, EPOCHS + 1))
    for row in log:
        assert {"loss", "hr", "ndcg", "train_samples_per_s", "eval_samples_per_s", "epoch_time_s"} <= set(row)
        assert row["train_samples"] == 6000 * 5  # every positive and its 4 negatives
    assert log[-1]["loss"] < log[0]["loss"]
    config = json.loads((out / "config.json").read_text())
    assert config["metrics"]["hr@10"] >= 0.5  # random ranking of 101 candidates: ~0.1
    assert config["metrics"]["hr@10"] == max(row["hr"] for row in log)
    assert config["model"]["config"]["nb_users"] == 403
    assert "final test HR@10" in result.stdout
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in (out / "checkpoints").iterdir()} == {"best.pt", "last.pt"}
    assert (out / ".merlin-ncf").read_text().strip() == "run"
    from merlin_ncf.feature_spec import FeatureSpec

    assert config["data_fingerprint"] == FeatureSpec.load(planted).fingerprint()


def test_torchscript_model_matches_the_best_checkpoint(reference_run):
    from merlin_ncf.models import checkpoint as ckpt
    from merlin_ncf.models.registry import model_from

    out, _ = reference_run
    scorer = torch.jit.load(str(out / "model.ts"))
    model = model_from(ckpt.load(out / "checkpoints" / "best.pt")).eval()
    users, items = torch.tensor([3, 4, 5, 402]), torch.tensor([3, 100, 302, 7])
    probabilities = scorer(users, items)
    assert probabilities.dtype == torch.float32 and probabilities.shape == (4,)
    with torch.no_grad():
        torch.testing.assert_close(probabilities, torch.sigmoid(model(users, items)))
    assert scorer(torch.tensor([3] * 1000), torch.arange(3, 1003) % 303).shape == (1000,)


def test_resume_after_a_kill_matches_the_uninterrupted_run(reference_run, planted, tmp_path):
    reference, _ = reference_run
    out = tmp_path / "run"
    # 15 optimizer steps per epoch: die in the middle of epoch 2.
    killed = run([*TRAIN, "--data", planted, "--output", out, "--epochs", EPOCHS, *SMALL], env={KILL: "20"})
    assert killed.returncode == -signal.SIGKILL
    assert len(read_log(out)) == 1 and not (out / "model.ts").exists()
    resumed = run([*TRAIN, "--data", planted, "--output", out, "--epochs", EPOCHS, *SMALL, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    for got, want in zip(read_log(out), read_log(reference), strict=True):
        for key in ("epoch", "loss", "hr", "ndcg", "train_samples"):
            assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
    from merlin_ncf.models import checkpoint as ckpt

    weights = ckpt.load(out / "checkpoints" / "last.pt")["model"]["state"]
    expected = ckpt.load(reference / "checkpoints" / "last.pt")["model"]["state"]
    for name in expected:
        torch.testing.assert_close(weights[name], expected[name], rtol=0, atol=1e-6)


def test_resume_keeps_the_runs_own_data_chunking_and_min_epochs(planted, tmp_path):
    """--parts-per-chunk and --min-epochs are auto now; a run started with other values (runs
    from before recorded 1 and none) resumes with its own."""
    from merlin_ncf.models.train_ncf import main

    common = ["--data", str(planted), "--output", str(tmp_path / "run"), *SMALL]
    assert main([*common, "--epochs", "1", "--parts-per-chunk", "1", "--min-epochs", "0"]) == 0
    assert main([*common, "--epochs", "2", "--resume"]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["options"]["parts_per_chunk"] == 1 and len(read_log(tmp_path / "run")) == 2
    assert config["options"]["min_epochs"] == 0
    assert main(["--data", str(planted), "--output", str(tmp_path / "new"), *SMALL, "--epochs", "1"]) == 0
    assert json.loads((tmp_path / "new" / "config.json").read_text())["options"]["parts_per_chunk"] == 4


def test_two_process_gloo_ddp_matches_a_single_process(reference_run, planted, tmp_path):
    reference, _ = reference_run
    out = tmp_path / "ddp"
    result = run([*TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", free_port(),
                  str(REPO / "models" / "train_ncf.py"), "--data", planted, "--output", out,
                  "--epochs", EPOCHS, *SMALL])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("final test HR@10") == 1  # only rank 0 reports and writes
    ddp, single = read_log(out), read_log(reference)
    assert len(ddp) == len(single)
    # Same global batch and optimizer steps; only the data order and negatives differ.
    assert ddp[-1]["hr"] == pytest.approx(single[-1]["hr"], abs=0.1)
    assert ddp[-1]["ndcg"] == pytest.approx(single[-1]["ndcg"], abs=0.1)
    assert ddp[-1]["loss"] == pytest.approx(single[-1]["loss"], rel=0.15)
    assert ddp[-1]["train_samples"] >= 0.9 * single[-1]["train_samples"]


def test_mode_test_evaluates_a_checkpoint_without_writing(reference_run, planted):
    out, _ = reference_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    result = run([*TRAIN, "--data", planted, "--output", out, "--mode", "test", "--no-progress"])
    assert result.returncode == 0, result.stderr
    hr = json.loads((out / "config.json").read_text())["metrics"]["hr@10"]
    assert f"test HR@10 = {hr:.4f}" in result.stdout
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*")}


def test_bf16_autocast_on_cpu_trains(planted):
    from merlin_ncf.models.data import load_candidates, open_etl
    from merlin_ncf.models.neumf import NeuMF
    from merlin_ncf.models.trainer import Trainer, TrainOptions

    data = open_etl(planted)
    model = NeuMF(data.num_users, data.num_items, mf_dim=16, mlp_layers=[32, 32, 16], dropout=0.1)
    dtypes = []
    model.mlp_rest[0].register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    options = TrainOptions(epochs=2, batch_size=2000, lr=0.02, amp=True, progress=False)
    trainer = Trainer(model, data, options, torch.device("cpu"))
    state = trainer.fit(load_candidates(data, "test"), "test")
    assert torch.bfloat16 in dtypes
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert state.epoch == 2 and np.isfinite(state.history[-1]["loss"])
    assert state.history[-1]["loss"] < state.history[0]["loss"]


def test_hub_entry_builds_and_loads_a_trained_checkpoint(reference_run):
    out, _ = reference_run
    fresh = torch.hub.load(str(REPO), "neumf", source="local", nb_users=20, nb_items=30, pretrained=False, mf_dim=8)
    assert fresh(torch.tensor([1, 2]), torch.tensor([3, 4])).shape == (2,)
    trained = torch.hub.load(str(REPO), "neumf", source="local", nb_users=403, nb_items=303,
                             pretrained=str(out / "checkpoints" / "best.pt"))
    scorer = torch.jit.load(str(out / "model.ts"))
    users, items = torch.tensor([3, 9]), torch.tensor([10, 11])
    with torch.no_grad():
        torch.testing.assert_close(torch.sigmoid(trained(users, items)), scorer(users, items))
    with pytest.raises(ValueError, match="nb_users"):
        torch.hub.load(str(REPO), "neumf", source="local", nb_users=5, nb_items=303, checkpoint=str(out))


# --- bad input: one line on stderr, exit 2, nothing written ------------------------------

def assert_user_error(result, fragment):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert fragment in lines[0]


@pytest.mark.parametrize("args, fragment", [
    (["--batch-size", "0"], "not a positive integer"),
    (["--batch-size", "2.5"], "not a positive integer"),
    (["--mode", "test", "--resume"], "--mode test only evaluates"),
    (["--resume", "--force"], "pick one"),
    (["--pretrained-gmf", "x.pt"], "needs both"),
    (["--mode", "test", "--model", "convncf", "--pretrained-mf", "x.pt"], "--pretrained-mf initialises a new"),
    (["--mode", "test", "--pretrained-gmf", "g.pt", "--pretrained-mlp", "m.pt"], "--pretrained-gmf initialises"),
    (["--resume", "--model", "convncf", "--pretrained-mf", "x.pt"], "--pretrained-mf initialises a new"),
    (["--resume", "--pretrained-gmf", "g.pt", "--pretrained-mlp", "m.pt"], "not with --resume"),
    (["--variant", "gmf", "--pretrained-gmf", "g.pt", "--pretrained-mlp", "m.pt"], "--variant neumf run"),
    (["--batch-size", "4"], "no positive per micro-batch"),
])
def test_impossible_options_are_refused_before_reading_anything(planted, tmp_path, args, fragment):
    result = run([*TRAIN, "--data", planted, "--output", tmp_path / "run", *args])
    assert_user_error(result, fragment)
    assert not (tmp_path / "run").exists()


def test_a_directory_that_is_not_etl_output_is_refused(tmp_path):
    (tmp_path / "data").mkdir()
    result = run([*TRAIN, "--data", tmp_path / "data", "--output", tmp_path / "run"])
    assert_user_error(result, "feature_spec.yaml not found")
    assert not (tmp_path / "run").exists()


@pytest.fixture
def refused(capfd):
    from merlin_ncf.models.train_ncf import main

    def check(args, fragment):
        assert main([str(a) for a in args]) == 2
        err = capfd.readouterr().err.strip().splitlines()
        assert err and fragment in err[-1], err
        return err

    return check


def test_cardinality_mismatch_between_spec_and_data_is_refused(planted, tmp_path, refused):
    bad = tmp_path / "etl"
    bad.mkdir()
    for part in ("train", "test"):
        (bad / part).symlink_to(planted / part)
    spec = yaml.safe_load((planted / "feature_spec.yaml").read_text())
    spec["feature_spec"]["item_id"]["cardinality"] = 100
    (bad / "feature_spec.yaml").write_text(yaml.safe_dump(spec))
    atomic.mark(bad, "etl")  # our layout: open_etl's own checks, not a foreign spec's transcoding
    refused(["--data", bad, "--output", tmp_path / "run"], "cardinality mismatch for item_id")
    assert not (tmp_path / "run").exists()


def test_test_ids_beyond_the_spec_are_refused(planted, tmp_path, refused):
    bad = tmp_path / "etl"
    (bad / "test").mkdir(parents=True)
    (bad / "train").symlink_to(planted / "train")
    (bad / "feature_spec.yaml").write_text((planted / "feature_spec.yaml").read_text())
    lists = pd.read_parquet(planted / "test" / "part_0.parquet")
    lists.loc[5, "item_id"] = 5000
    lists.to_parquet(bad / "test" / "part_0.parquet", index=False)
    atomic.mark(bad, "etl")  # our layout: open_etl's own checks, not a foreign spec's transcoding
    refused(["--data", bad, "--output", tmp_path / "run"], "outside feature_spec's cardinality")
    assert not (tmp_path / "run").exists()


def test_corrupt_or_incompatible_checkpoints_are_refused(planted, reference_run, tmp_path, refused):
    out, _ = reference_run
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    refused(["--data", planted, "--mode", "test", "--checkpoint", corrupt], "corrupt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((out / "checkpoints" / "best.pt").read_bytes()[:5000])
    refused(["--data", planted, "--mode", "test", "--checkpoint", truncated], "corrupt")
    other = tmp_path / "other"
    write_planted_etl(other, users=50, items=300)
    refused(["--data", other, "--mode", "test", "--checkpoint", out / "checkpoints" / "best.pt"],
            "the data has 53 x 303")
    refused(["--data", planted, "--output", tmp_path / "empty", "--resume"], "not found")
    assert not (tmp_path / "empty").exists()


def test_an_existing_run_is_not_overwritten(planted, reference_run, refused):
    out, _ = reference_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    refused(["--data", planted, "--output", out, *SMALL], "pass --resume")
    refused(["--data", planted, "--output", out, "--factors", "8", "--resume", "--no-progress"],
            "other model options")
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*")}


def popularity_hit_rate(etl_dir: Path, k: int = 10) -> float:
    """HR@K of ranking each test list by the items' training counts: what a model that
    learned no personalisation would reach."""
    train = pd.concat(pd.read_parquet(f) for f in sorted((etl_dir / "train").glob("*.parquet")))
    lists = pd.concat(pd.read_parquet(f) for f in sorted((etl_dir / "test").glob("*.parquet")))
    counts = lists["item_id"].map(train["item_id"].value_counts()).fillna(0).to_numpy()
    per_list = yaml.safe_load((etl_dir / "feature_spec.yaml").read_text())["metadata"]["test_samples_per_series"]
    counts = counts.reshape(-1, per_list)
    return float(((counts[:, 1:] >= counts[:, :1]).sum(axis=1) < k).mean())


def test_trained_run_on_the_etl_fixture_evaluates_validation_then_test(trained_run, etl_dir):
    log = read_log(trained_run)
    assert {row["split"] for row in log} == {"validation"}  # the ETL wrote validation lists
    config = json.loads((trained_run / "config.json").read_text())
    assert config["metrics"]["split"] == "test"
    # Random ranking of 101 candidates gives ~0.1; ranking by training popularity ~0.29 here.
    assert config["metrics"]["hr@10"] >= 0.5
    assert config["metrics"]["hr@10"] > popularity_hit_rate(etl_dir) + 0.15
    spec = yaml.safe_load((etl_dir / "feature_spec.yaml").read_text())
    assert config["model"]["config"]["nb_users"] == spec["feature_spec"]["user_id"]["cardinality"]
    scorer = torch.jit.load(str(trained_run / "model.ts"))
    assert scorer(torch.tensor([3, 4]), torch.tensor([5, 6])).dtype == torch.float32


def test_full_ranking_of_test_excludes_what_the_user_did_before_it_validation_included(trained_run, etl_dir):
    """The test positive competes with every item the user has not interacted with, as the test
    lists' sampled negatives do: the user's training items and validation positive are
    excluded, whichever the model ranks first. Recomputed here with pandas and numpy."""
    from merlin_ncf.models import checkpoint as ckpt
    from merlin_ncf.models.registry import model_from

    def read(split):
        return pd.concat(pd.read_parquet(f) for f in sorted((etl_dir / split).glob("*.parquet")))

    per_list = yaml.safe_load((etl_dir / "feature_spec.yaml").read_text())["metadata"]["test_samples_per_series"]
    test, validation = (read(s).iloc[::per_list] for s in ("test", "validation"))  # each list's positive
    history = pd.concat([read("train"), validation])[["user_id", "item_id"]]
    model = model_from(ckpt.load(trained_run / "checkpoints" / "best.pt")).eval()
    nb_items, first, k = json.loads((trained_run / "config.json").read_text())["model"]["config"]["nb_items"], 3, 10
    with torch.no_grad():
        users = torch.tensor(test["user_id"].to_numpy())
        scores = model.score_all(users).float().numpy()  # the trainer's scores: only the exclusion is checked
    assert scores.shape == (len(users), nb_items) and np.isfinite(scores).all()
    excluded = np.zeros_like(scores, dtype=bool)
    row_of = {user: row for row, user in enumerate(test["user_id"])}
    seen = history[history["user_id"].isin(row_of)]
    excluded[seen["user_id"].map(row_of).to_numpy(), seen["item_id"].to_numpy()] = True
    excluded[:, :first] = True
    positives = test["item_id"].to_numpy()
    excluded[np.arange(len(users)), positives] = False
    positive_scores = scores[np.arange(len(users)), positives][:, None]
    ranks = ((scores >= positive_scores) & ~excluded).sum(axis=1) - 1  # ties count against the positive
    recall, ndcg = (ranks < k).mean(), np.where(ranks < k, 1 / np.log2(ranks + 2), 0).mean()
    metrics = json.loads((trained_run / "config.json").read_text())["metrics"]
    assert metrics["full_recall@10"] == pytest.approx(recall, abs=1e-6)
    assert metrics["full_ndcg@10"] == pytest.approx(ndcg, abs=1e-6)


def test_mode_test_refuses_broken_validation_lists_in_one_line(trained_run, etl_dir, tmp_path):
    """--mode test reads the validation positives only to exclude them from the full ranking:
    lists cut short there are bad input (one line, exit 2), as they are for training."""
    import shutil

    etl = tmp_path / "etl"
    shutil.copytree(etl_dir, etl)
    part = next((etl / "validation").glob("*.parquet"))
    pd.read_parquet(part).iloc[:-1].to_parquet(part, index=False)
    result = run([*TRAIN, "--data", etl, "--checkpoint", trained_run / "checkpoints" / "best.pt", "--mode", "test",
                  "--no-progress"])
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and "validation" in result.stderr, result.stderr[-2000:]


def test_neumf_pretrained_from_gmf_and_mlp_runs(planted, tmp_path):
    from merlin_ncf.models import checkpoint as ckpt
    from merlin_ncf.models.registry import model_from
    from merlin_ncf.models.data import open_etl
    from merlin_ncf.models.train_ncf import build_model, main, parse_args

    common = ["--data", str(planted), *SMALL, "--epochs", "1"]
    for variant in ("gmf", "mlp"):
        assert main([*common, "--output", str(tmp_path / variant), "--variant", variant]) == 0
    best = {v: tmp_path / v / "checkpoints" / "best.pt" for v in ("gmf", "mlp")}
    argv = [*common, "--output", str(tmp_path / "neumf"), "--alpha", "0.7",
            "--pretrained-gmf", str(best["gmf"]), "--pretrained-mlp", str(best["mlp"])]
    model = build_model(parse_args(argv), open_etl(planted)).eval()
    gmf, mlp = (model_from(ckpt.load(best[v])).eval() for v in ("gmf", "mlp"))
    users, items = torch.arange(3, 50), torch.randint(3, 303, (47, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(users, items), 0.7 * gmf(users, items) + 0.3 * mlp(users, items))
    assert main(argv) == 0
    assert json.loads((tmp_path / "neumf" / "config.json").read_text())["model"]["config"]["variant"] == "neumf"


def test_convncf_embeddings_from_a_gmf_run_and_mismatches_refused(planted, tmp_path, refused):
    """--pretrained-mf: the paper's ConvNCF starts from MF-trained embeddings."""
    from merlin_ncf.models import checkpoint as ckpt
    from merlin_ncf.models.data import open_etl
    from merlin_ncf.models.train_ncf import build_model, main, parse_args

    common = ["--data", str(planted), "--epochs", "1", "--batch-size", "2000", "--no-progress"]
    assert main([*common, "--output", str(tmp_path / "gmf"), "--model", "gmf", "--factors", "8"]) == 0
    best = tmp_path / "gmf" / "checkpoints" / "best.pt"

    def convncf(size: int, layers: int, checkpoint: Path) -> list[str]:
        """2 x 2 stride-2 layers of 4 channels down to 1 x 1 from a size x size map"""
        stack = ["--cnn-channels", *["4"] * layers, "--cnn-kernels", *["2"] * layers, "--cnn-strides", *["2"] * layers]
        return [*common, "--output", str(tmp_path / "convncf"), "--model", "convncf", "--embedding-size", str(size),
                *stack, "--pretrained-mf", str(checkpoint)]

    model = build_model(parse_args(convncf(8, 3, best)), open_etl(planted))
    gmf = ckpt.load(best)["model"]["state"]
    torch.testing.assert_close(model.user_embedding.weight, gmf["gmf_user.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.item_embedding.weight, gmf["gmf_item.weight"], rtol=0, atol=0)
    refused(convncf(16, 4, best), "--embedding-size = its --factors")
    assert main([*common, "--output", str(tmp_path / "mlp"), "--model", "mlp", "--mlp-layers", "16", "8"]) == 0
    refused(convncf(8, 3, tmp_path / "mlp" / "checkpoints" / "best.pt"), "not a GMF or NeuMF checkpoint")
    refused(convncf(8, 3, tmp_path / "missing.pt"), "--pretrained-mf: checkpoint")
    assert not (tmp_path / "convncf").exists()


def test_gradient_accumulation_keeps_the_optimizer_batch(planted):
    from merlin_ncf.models.data import open_etl
    from merlin_ncf.models.neumf import NeuMF
    from merlin_ncf.models.trainer import Trainer, TrainOptions

    data = open_etl(planted)
    results = {}
    for accumulation in (1, 3):
        torch.manual_seed(0)
        model = NeuMF(data.num_users, data.num_items, mf_dim=8, mlp_layers=[16, 16, 8], dropout=0.0)
        options = TrainOptions(batch_size=3000, grad_accumulation=accumulation, lr=0.01, progress=False)
        trainer = Trainer(model, data, options, torch.device("cpu"))
        loss, samples, _ = trainer.train_epoch(0, check_input=False)
        results[accumulation] = (loss, samples, trainer.steps_taken)
    assert results[1][1] == results[3][1] == 30000  # every sample seen once
    assert results[1][2] == results[3][2] == 10  # 6000 positives / 600 per optimizer step
    assert results[3][0] == pytest.approx(results[1][0], rel=0.02)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fp16_amp_training(planted, tmp_path):
    out = tmp_path / "run"
    result = run([*TRAIN, "--data", planted, "--output", out, "--epochs", EPOCHS, *SMALL, "--device", "cuda", "--amp"])
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["metrics"]["hr@10"] >= 0.5


def test_cuda_requested_without_a_gpu_is_refused(planted, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run([*TRAIN, "--data", planted, "--output", tmp_path / "run", "--device", "cuda", "--amp"])
    assert_user_error(result, "no CUDA GPU")
    assert not (tmp_path / "run").exists()


# --- run directories: only ours are replaced, and always hold one run ----------------------

def test_force_refuses_a_directory_that_is_not_a_run(planted, tmp_path, refused):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("hi")
    refused(["--data", planted, "--output", out, "--force", *SMALL, "--epochs", "1"], "is not a training run")
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "hi"


@pytest.mark.parametrize("where", ["inside", "same", "parent"])
def test_an_output_overlapping_the_data_is_refused(planted, tmp_path, refused, where):
    out = {"inside": planted / "run", "same": planted, "parent": planted.parent}[where]
    before = sorted(p.name for p in planted.rglob("*"))
    refused(["--data", planted, "--output", out, "--force", *SMALL, "--epochs", "1"], "overlaps the input")
    assert sorted(p.name for p in planted.rglob("*")) == before


def test_a_forced_run_killed_early_leaves_no_file_of_the_old_run(planted, reference_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference_run[0], out)
    killed = run([*TRAIN, "--data", planted, "--output", out, "--epochs", EPOCHS, *SMALL, "--force"], env={KILL: "1"})
    assert killed.returncode == -signal.SIGKILL
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [".merlin-ncf", "checkpoints"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # the old run moved aside was deleted
    # The new run is a run of ours: --force replaces it again.
    again = run([*TRAIN, "--data", planted, "--output", out, "--epochs", "1", *SMALL, "--force"])
    assert again.returncode == 0, again.stderr
    assert len(read_log(out)) == 1


# --- divergence and bad optimizer options -----------------------------------------------

@pytest.mark.parametrize("args, fragment", [
    (["--lr", "-1"], "--lr: '-1' is not a positive finite number"),
    (["--lr", "0"], "is not a positive finite number"),
    (["--lr", "nan"], "is not a positive finite number"),
    (["--lr", "inf"], "is not a positive finite number"),
    (["--eps", "0"], "is not a positive finite number"),
    (["--beta1", "1"], "is not in [0, 1)"),
    (["--beta2", "-0.1"], "is not in [0, 1)"),
    (["--beta1", "nan"], "is not in [0, 1)"),
    (["--weight-decay", "-0.1"], "--weight-decay: '-0.1' is not a non-negative finite number"),
    (["--weight-decay", "nan"], "is not a non-negative finite number"),
    (["--select", "loss"], "--select: invalid choice"),
])
def test_bad_optimizer_options_are_one_line_argparse_errors(tmp_path, args, fragment):
    result = run([*TRAIN, "--data", tmp_path, "--output", tmp_path / "run", *args])
    assert_user_error(result, fragment)
    assert not (tmp_path / "run").exists()


def test_a_diverging_run_stops_at_the_first_non_finite_loss(planted, tmp_path):
    out = tmp_path / "run"
    result = run([*TRAIN, "--data", planted, "--output", out, *SMALL, "--epochs", EPOCHS, "--lr", "1e9"])
    assert_user_error(result, "non-finite loss")
    assert "epoch 1 step " in result.stderr
    assert "HR@10" not in result.stdout
    assert not out.exists()  # nothing worth resuming: no directory left to block a rerun


def test_a_non_finite_validation_hit_rate_is_never_best(planted, tmp_path):
    from merlin_ncf.models.data import load_candidates, open_etl
    from merlin_ncf.models.neumf import NeuMF
    from merlin_ncf.models.trainer import Trainer, TrainOptions

    class NonFiniteEvaluation(Trainer):  # the bookkeeping under test is fit's, not the metric's
        def evaluate(self, candidates):
            value = float("nan") if self.state.epoch == 0 else float("inf")
            return value, value, 1.0

    data = open_etl(planted)
    model = NeuMF(data.num_users, data.num_items, mf_dim=8, mlp_layers=[16, 16, 8], dropout=0.0)
    trainer = NonFiniteEvaluation(model, data, TrainOptions(epochs=2, batch_size=3000, progress=False),
                            torch.device("cpu"), run_dir=tmp_path)
    state = trainer.fit(load_candidates(data, "test"), "test")
    assert state.epoch == 2 and state.best_epoch == -1
    assert not (tmp_path / "checkpoints" / "best.pt").exists()
    assert (tmp_path / "checkpoints" / "last.pt").exists()


class ScriptedEvaluation:
    """Validation (HR, NDCG) per epoch from a script: fit's bookkeeping is under test, not the metric."""

    def __init__(self, script):
        self.script = script

    def __call__(self, trainer):
        hr, ndcg = self.script[trainer.state.epoch]
        return hr, ndcg, 1.0


@pytest.mark.parametrize("select, best, epochs", [
    ("hr", 2, 4),  # HR peaks at epoch 2; two epochs of patience then stop it at 4
    ("ndcg", 3, 5),  # NDCG peaks later, at epoch 3, and keeps the run going one epoch longer
    ("hr+ndcg", 3, 5),  # 0.8, 0.85, 0.9, 0.8, 0.7
])
def test_select_picks_the_kept_epoch_and_drives_patience(planted, tmp_path, select, best, epochs):
    from merlin_ncf.models import checkpoint as ckpt
    from merlin_ncf.models.data import load_candidates, open_etl
    from merlin_ncf.models.neumf import NeuMF
    from merlin_ncf.models.trainer import Trainer, TrainOptions

    script = ScriptedEvaluation([(0.5, 0.3), (0.6, 0.25), (0.5, 0.4), (0.45, 0.35), (0.4, 0.3), (0.3, 0.2)])

    class Scripted(Trainer):
        def evaluate(self, candidates):
            return script(self)

    data = open_etl(planted)
    model = NeuMF(data.num_users, data.num_items, mf_dim=8, mlp_layers=[16, 16, 8], dropout=0.0)
    options = TrainOptions(epochs=6, batch_size=3000, max_steps=1, patience=2, select=select, progress=False)
    state = Scripted(model, data, options, torch.device("cpu"), run_dir=tmp_path).fit(
        load_candidates(data, "test"), "validation")
    assert (state.best_epoch, state.epoch) == (best, epochs)
    assert state.best_hr == script.script[best - 1][0]  # the kept epoch's HR, whatever picked it
    assert ckpt.load(tmp_path / "checkpoints" / "best.pt")["state"]["best_epoch"] == best


def test_weight_decay_is_adamw_decoupled_decay(planted, tmp_path):
    from merlin_ncf.models.trainer import TrainOptions, dense_adam
    from merlin_ncf.models.train_ncf import main

    for decay in (0.0, 0.5):
        layer = torch.nn.Linear(4, 3)
        before = layer.weight.detach().clone()
        optimizer = dense_adam(list(layer.parameters()), TrainOptions(lr=0.1, weight_decay=decay))
        for p in layer.parameters():
            p.grad = torch.zeros_like(p)  # Adam moves nothing: only the decay acts
        optimizer.step()
        torch.testing.assert_close(layer.weight.detach(), before * (1 - 0.1 * decay))
    out = tmp_path / "run"
    assert main(["--data", str(planted), "--output", str(out), *SMALL, "--epochs", "1",
                 "--weight-decay", "0.01", "--select", "ndcg"]) == 0
    options = json.loads((out / "config.json").read_text())["options"]
    assert (options["weight_decay"], options["select"]) == (0.01, "ndcg")


# --- corrupt inputs ---------------------------------------------------------------------

def test_a_checkpoint_with_flipped_bytes_is_refused(planted, reference_run, tmp_path, refused):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference_run[0], out)
    last = out / "checkpoints" / "last.pt"
    data = bytearray(last.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(b ^ 0xFF for b in data[middle:middle + 4096])
    last.write_bytes(bytes(data))
    refused(["--data", planted, "--mode", "test", "--checkpoint", last], "corrupt checkpoint")
    refused(["--data", planted, "--output", out, "--resume", *SMALL, "--epochs", "5"], "corrupt checkpoint")


def test_a_truncated_train_file_is_one_line_and_leaves_no_run_directory(planted, tmp_path, refused):
    import shutil

    bad = tmp_path / "etl"
    shutil.copytree(planted, bad)
    part = bad / "train" / "part_2.parquet"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    out = tmp_path / "run"
    refused(["--data", bad, "--output", out, *SMALL, "--epochs", "1"], "part_2.parquet is not a readable parquet")
    assert not out.exists()


# --- negative sampling ------------------------------------------------------------------

def test_exclude_seen_never_samples_a_users_training_item(planted):
    from merlin_ncf.models.data import open_etl, train_pairs
    from merlin_ncf.models.sampler import NegativeSampler, epoch_generator, seen_keys

    data = open_etl(planted)
    users, items = train_pairs(data)
    assert len(users) == data.train_rows == 6000
    seen = {(int(u), int(i)) for u, i in zip(users, items)}
    uniform = NegativeSampler(data.first_item, data.num_items, 20)
    exclude = NegativeSampler(data.first_item, data.num_items, 20, seen_keys(users, items, data.num_items))

    def collisions(sampler, seed):
        drawn, _ = sampler.candidates(items, epoch_generator(seed, 0, 0, torch.device("cpu")), users)
        assert bool((drawn[:, 0] == items).all())
        return sum((int(u), int(i)) in seen for u, row in zip(users, drawn[:, 1:]) for i in row), drawn

    # Each user has 15 of 300 items: ~5% of uniform negatives are their own positives.
    assert collisions(uniform, 0)[0] > 3000
    count, first = collisions(exclude, 0)
    assert count == 0
    assert bool((first[:, 1:] >= data.first_item).all() and (first < data.num_items).all())
    assert torch.equal(first, collisions(exclude, 0)[1])  # seeded: --resume draws the same


@pytest.mark.slow
def test_default_options_beat_popularity_on_the_etl_fixture(etl_dir, tmp_path):
    out = tmp_path / "run"
    result = run([*TRAIN, "--data", etl_dir, "--output", out, "--no-progress"], timeout=900)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("auto for ")  # the chosen values are shown
    config = json.loads((out / "config.json").read_text())
    assert config["options"]["batch_size"] < 2**20  # not NVIDIA's ml-20m batch: 1 step per epoch here
    assert config["metrics"]["hr@10"] > popularity_hit_rate(etl_dir) + 0.15

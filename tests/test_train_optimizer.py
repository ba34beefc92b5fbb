"""--optimizer adam | sparse-adam: the row-wise Adam equals torch's SparseAdam; both optimizers
learn the planted structure through train_ncf.py; a sparse run resumes exactly after a kill,
alone and under 2-process Gloo DDP (sparse gradients all-reduced); gradient accumulation and
bf16 AMP keep working; models that read their tables whole refuse sparse-adam."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from torch import nn

from merlin_ncf.serving.server_runtime import free_port
from test_train_cli import KILL, REPO, SMALL, TORCHRUN, TRAIN, read_log, run, trained_once, write_planted_etl

EPOCHS = 3
COMMON = [*SMALL, "--epochs", str(EPOCHS), "--threads", "1"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return write_planted_etl(tmp_path_factory.mktemp("planted") / "etl")


@pytest.fixture(scope="module")
def runs(planted, tmp_path_factory):
    return trained_once(tmp_path_factory, lambda optimizer: ["--data", planted, *COMMON, "--optimizer", optimizer])


def test_row_wise_adam_equals_torch_sparse_adam():
    from merlin_ncf.models.optim import RowWiseAdam

    torch.manual_seed(0)
    ours, theirs = nn.Embedding(50, 8, sparse=True), nn.Embedding(50, 8, sparse=True)
    theirs.load_state_dict(ours.state_dict())
    mine = RowWiseAdam(ours.parameters(), lr=0.01, betas=(0.8, 0.95), eps=1e-6)
    reference = torch.optim.SparseAdam(theirs.parameters(), lr=0.01, betas=(0.8, 0.95), eps=1e-6)
    for step in range(6):
        rows = torch.randint(0, 50, (30,))  # repeated rows: their gradients add up
        target = torch.randn(30, 8)
        for table, optimizer in ((ours, mine), (theirs, reference)):
            ((table(rows) - target) ** 2).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-5, atol=1e-6)
    assert not torch.equal(ours.weight, nn.Embedding(50, 8).weight)


@pytest.mark.parametrize("optimizer", ["adam", "sparse-adam"])
def test_dense_and_sparse_adam_learn_the_planted_structure(runs, optimizer):
    out, result = runs(optimizer)
    assert f"optimizer {optimizer}: adam on" in result.stdout  # said at start
    assert ("row-wise-adam on 4 tensors" in result.stdout) == (optimizer == "sparse-adam")
    log = read_log(out)
    assert log[-1]["loss"] < log[0]["loss"]
    config = json.loads((out / "config.json").read_text())
    assert config["options"]["optimizer"] == optimizer
    assert config["metrics"]["hr@10"] >= 0.5  # random ranking of 101 candidates: ~0.1


def test_auto_optimizer_is_sparse_where_a_step_touches_few_rows_and_adam_otherwise(planted, tmp_path):
    from merlin_ncf.models.data import open_etl
    from merlin_ncf.models.train_ncf import choose_defaults, parse_args

    data = open_etl(planted)  # 403 users + 303 items
    for model, batch, expected in (("neumf", 40, "sparse-adam"), ("gmf", 40, "sparse-adam"),
                                   ("mlp", 40, "sparse-adam"), ("neumf", 2000, "adam"),  # touches every row
                                   ("multvae", 40, "adam"), ("convncf", 40, "adam")):  # read whole tables
        args = parse_args(["--data", str(planted), "--output", str(tmp_path / "run"), "--model", model,
                           "--batch-size", str(batch)])
        choose_defaults(args, data)
        assert args.optimizer == expected, (model, batch)
    from merlin_ncf.models.defaults import optimizer

    assert optimizer(2048, 4, 138_493 + 26_744) == "sparse-adam"  # RecBole's batch at ml-20m's tables
    assert optimizer(2048, 4, 610 + 9_742) == optimizer(2**20, 4, 138_493 + 26_744) == "adam"


def assert_same_run(got, want) -> None:
    from merlin_ncf.models import checkpoint as ckpt

    for row, expected in zip(read_log(got), read_log(want), strict=True):
        for key in ("epoch", "loss", "hr", "ndcg", "train_samples"):
            assert row[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key
    mine, theirs = ckpt.load(got / "checkpoints" / "last.pt"), ckpt.load(want / "checkpoints" / "last.pt")
    for name, tensor in theirs["model"]["state"].items():
        torch.testing.assert_close(mine["model"]["state"][name], tensor, rtol=0, atol=1e-6)
    moments = theirs["optimizers"]["row-wise-adam"]["state"]
    assert moments and all(state["step"] > 0 for state in moments.values())
    for index, state in moments.items():
        torch.testing.assert_close(mine["optimizers"]["row-wise-adam"]["state"][index]["exp_avg_sq"],
                                   state["exp_avg_sq"], rtol=0, atol=1e-9)


def test_sparse_run_resumes_exactly_after_a_kill(runs, planted, tmp_path):
    reference, _ = runs("sparse-adam")
    out = tmp_path / "run"
    # 15 optimizer steps per epoch: die in the middle of epoch 2.
    killed = run([*TRAIN, "--data", planted, "--output", out, *COMMON, "--optimizer", "sparse-adam"], env={KILL: "20"})
    assert killed.returncode == -signal.SIGKILL
    assert len(read_log(out)) == 1
    refused = run([*TRAIN, "--data", planted, "--output", out, *COMMON, "--resume", "--optimizer", "adam"])
    assert refused.returncode == 2 and "trained with --optimizer sparse-adam" in refused.stderr
    assert "Traceback" not in refused.stderr
    resumed = run([*TRAIN, "--data", planted, "--output", out, *COMMON, "--resume"])  # the run's own optimizer
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "optimizer sparse-adam" in resumed.stdout
    assert_same_run(out, reference)


@pytest.mark.slow
def test_sparse_gradients_under_two_process_gloo_ddp_resume_exactly(planted, tmp_path):
    def torchrun(out, env=None, *extra):
        return run([*TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", free_port(),
                    str(REPO / "models" / "train_ncf.py"), "--data", planted, "--output", out, *COMMON,
                    "--optimizer", "sparse-adam", *extra], env=env, timeout=400)

    reference = tmp_path / "reference"
    whole = torchrun(reference)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert json.loads((reference / "config.json").read_text())["metrics"]["hr@10"] >= 0.5
    out = tmp_path / "run"
    killed = torchrun(out, {KILL: "20"})
    assert killed.returncode != 0 and len(read_log(out)) == 1
    resumed = torchrun(out, None, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(out, reference)


def test_sparse_adam_with_gradient_accumulation_and_bf16_amp(planted):
    from merlin_ncf.models.data import open_etl
    from merlin_ncf.models.neumf import NeuMF
    from merlin_ncf.models.trainer import Trainer, TrainOptions

    data = open_etl(planted)
    results = {}
    for accumulation, amp in ((1, False), (3, False), (1, True)):
        torch.manual_seed(0)
        model = NeuMF(data.num_users, data.num_items, mf_dim=8, mlp_layers=[16, 16, 8], dropout=0.0)
        options = TrainOptions(batch_size=3000, grad_accumulation=accumulation, amp=amp, lr=0.01, beta1=0.9,
                               beta2=0.999, optimizer="sparse-adam", progress=False)
        trainer = Trainer(model, data, options, torch.device("cpu"))
        before = model.gmf_user.weight.detach().clone()
        results[accumulation, amp] = trainer.train_epoch(0, check_input=False)[0], trainer.steps_taken
        assert model.gmf_user.sparse and not torch.equal(model.gmf_user.weight, before)
    assert results[1, False][1] == results[3, False][1] == results[1, True][1] == 10
    assert results[3, False][0] == pytest.approx(results[1, False][0], rel=0.02)
    assert results[1, True][0] == pytest.approx(results[1, False][0], rel=0.05)


@pytest.mark.parametrize("model", ["multvae", "convncf"])
def test_models_that_read_whole_tables_refuse_sparse_adam(planted, tmp_path, model):
    result = run([*TRAIN, "--data", planted, "--output", tmp_path / "run", "--model", model,
                  "--optimizer", "sparse-adam"])
    assert result.returncode == 2 and "--optimizer sparse-adam" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

"""The shared trainer and CLI for every model of the family (models/registry.py) on a tiny
planted dataset: each model learns it through `train_ncf.py --model NAME` and reports sampled
and full-ranking metrics; a pairwise and a user-row model resume exactly after a kill under
2-process Gloo DDP; a toy model added with one class and one registry line trains unchanged."""

from __future__ import annotations

import json

import pytest
import torch

from merlin_ncf.models import registry
from merlin_ncf.serving.server_runtime import free_port
from test_model_contract import Toy  # biased MF: what a maintainer adding a model writes
from test_train_cli import REPO, TORCHRUN, TRAIN, popularity_hit_rate, read_log, run, trained_once, write_planted_etl

COMMON = ["--no-progress", "--seed", "3", "--threads", "1"]
# Small models and batches: an epoch is well under a second each (ConvNCF: a few seconds).
SMALL = {
    "neumf": ["--factors", "16", "--mlp-layers", "32", "32", "16", "--dropout", "0.1", "--batch-size", "500",
              "--lr", "0.02"],
    "gmf": ["--factors", "16", "--batch-size", "500", "--lr", "0.02"],
    "mlp": ["--mlp-layers", "32", "32", "16", "--dropout", "0.1", "--batch-size", "500", "--lr", "0.02"],
    "multvae": ["--hidden", "64", "--latent", "16", "--dropout", "0.2", "--total-anneal-steps", "50",
                "--batch-size", "20", "--lr", "0.01"],
    "convncf": ["--embedding-size", "16", "--cnn-channels", "8", "8", "8", "8", "--cnn-kernels", "2", "2", "2", "2",
                "--cnn-strides", "2", "2", "2", "2", "--dropout", "0", "--reg-weights", "0.01", "0.01",
                "--batch-size", "64", "--lr", "0.02", "--eval-batch-size", "8192"],
}
EPOCHS = {"neumf": 4, "gmf": 4, "mlp": 4, "multvae": 4, "convncf": 5}
KILL = "MERLIN_NCF_TEST_KILL_AFTER_STEPS"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """200 users in 5 taste groups of 20 items, 10 training items each; lists of 1 + 50."""
    return write_planted_etl(tmp_path_factory.mktemp("tiny") / "etl", users=200, items=100, groups=5, per_user=10,
                             negatives=50, files=4)


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """Each model's CLI run, trained once for the tests that read it."""
    return trained_once(tmp_path_factory, lambda name: ["--data", tiny, "--model", name, "--epochs", EPOCHS[name],
                                                        *SMALL[name], *COMMON])


@pytest.mark.parametrize("name", ["neumf", "gmf", "mlp", "multvae", "convncf"])
def test_each_model_learns_the_planted_groups_well_beyond_popularity(runs, tiny, name):
    out, result = runs(name)
    config = json.loads((out / "config.json").read_text())
    cls = registry.model_class(name)
    assert config["model"]["name"] == name and config["output"] == cls.output
    metrics = config["metrics"]
    popularity = popularity_hit_rate(tiny)
    assert metrics["hr@10"] >= popularity + 0.25, (metrics, popularity)
    # Full ranking over 100 items minus ~10 seen: far harder than 1 in 51, but well above chance.
    assert 0.15 <= metrics["full_recall@10"] <= metrics["hr@10"]
    assert 0.0 < metrics["full_ndcg@10"] <= metrics["full_recall@10"]
    assert "full Recall@10" in result.stdout and "full NDCG@10" in result.stdout
    # model.ts scores like the best checkpoint: a probability for "logit" models, the raw score otherwise.
    from merlin_ncf.models import checkpoint as ckpt

    model = registry.model_from(ckpt.load(out / "checkpoints" / "best.pt")).eval()
    users, items = torch.tensor([3, 3, 50, 202]), torch.tensor([3, 40, 102, 7])
    with torch.no_grad():
        want = model.score_pairs(users, items).float()
    want = torch.sigmoid(want) if cls.output == "logit" else want
    torch.testing.assert_close(torch.jit.load(str(out / "model.ts"))(users, items), want, rtol=1e-4, atol=1e-5)


def test_mode_test_reports_full_ranking_metrics_of_another_model(runs, tiny):
    out, _ = runs("multvae")
    result = run([*TRAIN, "--data", tiny, "--checkpoint", out / "checkpoints" / "best.pt", "--mode", "test",
                  *COMMON])
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((out / "config.json").read_text())
    assert f"full Recall@10 = {config['metrics']['full_recall@10']:.4f}" in result.stdout


def test_resume_refuses_a_checkpoint_of_another_model(runs, tiny):
    out, _ = runs("multvae")
    before = (out / "checkpoints" / "last.pt").read_bytes()
    result = run([*TRAIN, "--data", tiny, "--output", out, "--resume", "--model", "convncf", *SMALL["convncf"],
                  *COMMON])
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "is a multvae run, not --model convncf" in result.stderr
    assert (out / "checkpoints" / "last.pt").read_bytes() == before


def test_model_options_come_from_the_model_and_show_under_its_name():
    default = run([*TRAIN, "--help"])
    assert "model neumf" in default.stdout and "--mlp-layers" in default.stdout
    assert "--anneal-cap" not in default.stdout
    assert "KILL" not in default.stdout and "stop-after" not in default.stdout  # the test aid is hidden
    vae = run([*TRAIN, "--model", "multvae", "--help"])
    assert "model multvae" in vae.stdout and "--anneal-cap" in vae.stdout and "--mlp-layers" not in vae.stdout
    bad = run([*TRAIN, "--data", "x", "--output", "y", "--model", "nope"])
    assert bad.returncode == 2 and "invalid choice: 'nope'" in bad.stderr
    wrong = run([*TRAIN, "--data", "x", "--output", "y", "--model", "convncf", "--cnn-kernels", "2", "--cnn-strides", "2",
                 "--cnn-channels", "8"])
    assert wrong.returncode == 2 and "1x1" in wrong.stderr and len(wrong.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("negative_sampling", ["uniform", "exclude-seen"])
def test_pairwise_batches_take_one_negative_per_positive_and_exclude_seen_holds(tiny, negative_sampling):
    from merlin_ncf.models.contract import PairwiseBatch
    from merlin_ncf.models.convncf import ConvNCF
    from merlin_ncf.models.data import open_etl, train_pairs
    from merlin_ncf.models.trainer import Trainer, TrainOptions

    data = open_etl(tiny)
    model = ConvNCF(data.num_users, data.num_items, embedding_size=16, cnn_channels=[8] * 4, cnn_kernels=[2] * 4,
                    cnn_strides=[2] * 4)
    trainer = Trainer(model, data, TrainOptions(batch_size=256, negative_sampling=negative_sampling, progress=False),
                      torch.device("cpu"))
    steps, batches = trainer.batches(0, check_input=True)
    batches = list(batches)
    assert len(batches) == steps == -(-2000 // 128) and all(isinstance(b, PairwiseBatch) for b in batches)
    user = torch.cat([b.user for b in batches])
    negative = torch.cat([b.negative for b in batches])
    assert len(user) == 2000 and int(negative.min()) >= data.first_item  # every positive once
    seen = set(zip(*(t.tolist() for t in train_pairs(data))))
    collisions = sum((u, n) in seen for u, n in zip(user.tolist(), negative.tolist()))
    if negative_sampling == "exclude-seen":
        assert collisions == 0
    else:
        assert collisions > 0  # ~10% of the catalogue is each user's: uniform draws hit some


def test_user_row_batches_are_one_permutation_split_between_ranks(tiny):
    from merlin_ncf.models.data import open_etl, train_pairs
    from merlin_ncf.models.multvae import MultVAE
    from merlin_ncf.models.ddp import Context
    from merlin_ncf.models.trainer import Trainer, TrainOptions

    data = open_etl(tiny)
    users, items = train_pairs(data)
    model = MultVAE.from_interactions(users, items, data.num_users, data.num_items, hidden=8, latent=4)
    per_rank = []
    for rank in (0, 1):
        trainer = Trainer(model, data, TrainOptions(batch_size=30, seed=5, progress=False), torch.device("cpu"),
                          Context(rank=rank, world=1))
        trainer.context = Context(rank=rank, world=2)  # the split only, no process group needed
        steps, batches = trainer.batches(1, check_input=False)
        per_rank.append([b.user for b in batches])
        assert len(per_rank[-1]) == steps == 200 // 30 + 1  # the last, partial step too
    everyone = torch.cat([torch.cat(pair) for pair in zip(*per_rank)])
    assert sorted(everyone.tolist()) == list(range(3, 203))  # each user once per epoch, on one rank
    again = Trainer(model, data, TrainOptions(batch_size=30, seed=5, progress=False), torch.device("cpu"))
    epoch = lambda e: torch.cat([b.user for b in again.batches(e, False)[1]])  # noqa: E731
    assert torch.equal(epoch(1), epoch(1)) and not torch.equal(epoch(1), epoch(2))  # (seed, epoch) decide


# pairwise and user rows; both were intermittent until Context.close() (models/ddp.py) collected
# the DDP wrapper's Gloo group before exit; convncf then passed 5 runs of 5, so strict again
@pytest.mark.parametrize("name", ["convncf", "multvae"])
def test_two_process_ddp_resumes_exactly_after_a_kill(tiny, tmp_path, name):
    def torchrun(out, *extra, env=None):
        def once():
            return run([*TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", free_port(),
                        str(REPO / "models" / "train_ncf.py"), "--data", tiny, "--output", out, "--model", name,
                        "--epochs", "3", "--threshold", "2", *SMALL[name], *COMMON, *extra], env=env, timeout=400)

        return once()

    reference = tmp_path / "reference"
    whole = torchrun(reference)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert whole.stdout.count("final test HR@10") == 1
    from merlin_ncf.models import checkpoint as ckpt

    want = ckpt.load(reference / "checkpoints" / "last.pt")
    steps_per_epoch = want["state"]["steps"] // 3
    assert steps_per_epoch * 3 == want["state"]["steps"] and steps_per_epoch > 5
    out = tmp_path / "run"
    killed = torchrun(out, env={KILL: str(steps_per_epoch + 3)})  # mid-epoch 2
    assert killed.returncode != 0
    assert len(read_log(out)) == 1 and not (out / "model.ts").exists()
    resumed = torchrun(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for row, expected in zip(read_log(out), read_log(reference), strict=True):
        for key in ("epoch", "loss", "hr", "ndcg", "train_samples"):
            assert row[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key
    got = ckpt.load(out / "checkpoints" / "last.pt")
    assert got["state"]["steps"] == want["state"]["steps"]  # KL annealing's clock
    for key, tensor in want["model"]["state"].items():
        torch.testing.assert_close(got["model"]["state"][key], tensor, rtol=0, atol=1e-6)


CLOSE_SCRIPT = """
import gc, sys, weakref, torch
gc.disable()  # as at interpreter exit: nothing has collected the cycle yet
from merlin_ncf.models.ddp import from_environment
context = from_environment(torch.device("cpu"))
ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
ddp(torch.ones(2, 4)).sum().backward()
alive = weakref.ref(ddp)
del ddp  # unreachable, but a reference cycle keeps it and its Gloo group
context.close(finished=True)
print("left", alive() is not None)
"""


def test_closing_the_context_tears_down_the_ddp_group_before_exit(tmp_path):
    """The cause of the intermittent Gloo abort (SIGABRT, "terminate called without an active
    exception") at the end of 2-process runs: the DDP wrapper lived on in a reference cycle
    past destroy_process_group, so its Gloo group was torn down during interpreter exit."""
    script = tmp_path / "close.py"
    script.write_text(CLOSE_SCRIPT)
    result = run([*TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", free_port(),
                  script], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("left False") == 2, result.stdout


# Loaded at every interpreter start (PYTHONPATH): at the start of interpreter finalization it
# reports the Gloo threads (torch's pt_gloo_runloop workers, gloo's gloo_tcp_loop) still running.
FINALIZATION_PROBE = """
import atexit, os, sys

def report():
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            names.append(open(f"/proc/self/task/{task}/comm").read().strip())
        except OSError:
            pass
    gloo = [name for name in names if "gloo" in name]
    if gloo:
        print(f"finalizing with Gloo threads {sorted(gloo)}", file=sys.stderr, flush=True)

atexit.register(report)
"""


def test_no_rank_finalizes_the_interpreter_while_gloo_threads_run(tiny, tmp_path):
    """The cause of the intermittent SIGABRT of 2-process runs ("terminate called without an
    active exception", "malloc(): unaligned tcache chunk detected"): torch's DDP keeps its Gloo
    process group alive past destroy_process_group, so its threads ran on through interpreter
    finalization and static destruction. Each rank now ends once its outputs are written and
    flushed, without that teardown; its exit code, output and errors are kept."""
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(FINALIZATION_PROBE)
    env = {"PYTHONPATH": str(probe)}
    out = tmp_path / "run"

    def torchrun(*extra):
        return run([*TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", free_port(),
                    str(REPO / "models" / "train_ncf.py"), "--data", tiny, "--output", out, "--model", "gmf",
                    "--epochs", "1", *SMALL["gmf"], *COMMON, *extra], env=env, timeout=300)

    whole = torchrun("--optimizer", "adam")
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "finalizing with Gloo threads" not in whole.stderr, whole.stderr[-3000:]
    assert whole.stdout.count("final test HR@10") == 1 and (out / "model.ts").exists()  # all of it was flushed
    # A user error raised after the ranks joined the group: one line from each rank, exit 2.
    refused = torchrun("--resume", "--optimizer", "sparse-adam")
    assert refused.stderr.count("train_ncf.py: error: the checkpoint was trained with --optimizer adam") == 2
    assert "exitcode  : 2" in refused.stderr and "finalizing with Gloo threads" not in refused.stderr


def test_a_toy_model_with_one_registry_line_trains_through_the_cli(tiny, tmp_path, monkeypatch, capsys):
    from merlin_ncf.models.train_ncf import main

    monkeypatch.setitem(registry.MODELS, "toy", Toy)  # the one registry line
    out = tmp_path / "run"
    code = main(["--data", str(tiny), "--output", str(out), "--model", "toy", "--factors", "16",
                 "--epochs", "5", "--batch-size", "64", "--lr", "0.05", *COMMON])
    assert code == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == {"name": "toy", "config": {"nb_users": 203, "nb_items": 103, "factors": 16}}
    assert config["output"] == "logit"
    assert config["metrics"]["hr@10"] >= popularity_hit_rate(tiny) + 0.25
    assert {"full_recall@10", "full_ndcg@10"} <= set(config["metrics"])
    assert torch.jit.load(str(out / "model.ts"))(torch.tensor([3]), torch.tensor([5])).shape == (1,)

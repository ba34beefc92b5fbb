"""--ema (a moving average of the weights is what is scored, kept and exported) and
--lr-schedule cosine (the learning rate follows the optimizer step, so resuming replays it),
and the checkpoints an improving epoch writes."""

import json
import signal

import pytest
import torch

from test_train_cli import KILL, SMALL, TRAIN, read_log, run, write_planted_etl


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return write_planted_etl(tmp_path_factory.mktemp("planted") / "etl")


def test_cosine_factor_falls_from_one_to_zero_and_constant_stays_one():
    from merlin_ncf.models.trainer import lr_factor

    curve = [lr_factor("cosine", step, 10) for step in range(11)]
    assert curve[0] == 1.0 and curve[5] == pytest.approx(0.5) and curve[10] == pytest.approx(0.0)
    assert all(a > b for a, b in zip(curve, curve[1:]))
    assert lr_factor("cosine", 25, 10) == pytest.approx(0.0)  # past the planned run: stays at 0
    assert {lr_factor("constant", step, 10) for step in range(20)} == {1.0}


def test_cosine_schedule_sets_each_steps_learning_rate(planted):
    from merlin_ncf.models.data import open_etl
    from merlin_ncf.models.neumf import NeuMF
    from merlin_ncf.models.trainer import Trainer, TrainOptions, lr_factor

    data = open_etl(planted)
    model = NeuMF(data.num_users, data.num_items, mf_dim=8, mlp_layers=[16, 16, 8], dropout=0.0)
    options = TrainOptions(epochs=4, batch_size=2000, lr=0.01, lr_schedule="cosine", progress=False)
    trainer = Trainer(model, data, options, torch.device("cpu"))
    seen = []
    adam = trainer.optimizers["adam"]
    adam.register_step_pre_hook(lambda optimizer, *_: seen.append(optimizer.param_groups[0]["lr"]))
    trainer.train_epoch(0, check_input=True)
    trainer.train_epoch(1, check_input=False)
    steps = len(seen) // 2
    assert steps > 1 and trainer.state.steps == 2 * steps
    assert seen == pytest.approx([0.01 * lr_factor("cosine", s, 4 * steps) for s in range(2 * steps)])


def test_ema_is_what_is_scored_kept_and_exported_and_resumes_exactly(planted, tmp_path):
    from merlin_ncf.models import checkpoint as ckpt
    from merlin_ncf.models.registry import model_from

    args = ["--data", planted, *SMALL, "--epochs", "3", "--ema", "0.9", "--lr-schedule", "cosine"]
    whole = tmp_path / "whole"
    assert run([*TRAIN, "--output", whole, *args]).returncode == 0
    last = ckpt.load(whole / "checkpoints" / "last.pt")
    averaged, trained = last["model"]["state"], last["trained"]["state"]
    assert last["trained"]["averaged_steps"] == last["state"]["steps"] > 0
    assert any(not torch.equal(averaged[k], trained[k]) for k in averaged)  # the average, not the weights
    best_path = whole / "checkpoints" / "best.pt"
    best = model_from(ckpt.load(best_path), best_path).eval()
    served = torch.jit.load(str(whole / "model.ts"))
    users, items = torch.tensor([3, 4, 5]), torch.tensor([3, 9, 27])
    with torch.no_grad():
        torch.testing.assert_close(served(users, items), torch.sigmoid(best.score_pairs(users, items)))
    config = json.loads((whole / "config.json").read_text())
    assert (config["options"]["ema"], config["options"]["lr_schedule"]) == (0.9, "cosine")

    # Killed mid-run and resumed: the same epochs as the uninterrupted run (15 steps per epoch).
    out = tmp_path / "resumed"
    assert run([*TRAIN, "--output", out, *args], env={KILL: "20"}).returncode == -signal.SIGKILL
    refused = run([*TRAIN, "--output", out, *args[:-4], "--resume"])
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "--ema 0.9" in refused.stderr
    assert run([*TRAIN, "--output", out, *args, "--resume"]).returncode == 0
    for got, want in zip(read_log(out), read_log(whole), strict=True):
        for key in ("loss", "hr", "ndcg"):
            assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key


def test_an_improving_epochs_checkpoint_is_written_once_to_both_files(tmp_path):
    from merlin_ncf.models import checkpoint as ckpt

    state = {"format": ckpt.FORMAT, "weights": torch.arange(5.0)}
    ckpt.save_atomic(state, tmp_path / "best.pt", tmp_path / "last.pt")
    assert (tmp_path / "best.pt").read_bytes() == (tmp_path / "last.pt").read_bytes()
    assert torch.equal(ckpt.load(tmp_path / "best.pt")["weights"], torch.arange(5.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]  # no temporary left


def test_checkpoints_that_stored_best_hr_still_resume(planted, tmp_path):
    """State.best_hr is read from the history now; checkpoints written with it stored (and
    those from before --select, which stored it alone) resume with the same best epoch."""
    from merlin_ncf.models import checkpoint as ckpt
    from merlin_ncf.models.data import load_candidates, open_etl
    from merlin_ncf.models.neumf import NeuMF
    from merlin_ncf.models.trainer import Trainer, TrainOptions

    data = open_etl(planted)

    def trainer(epochs):
        torch.manual_seed(0)
        model = NeuMF(data.num_users, data.num_items, mf_dim=8, mlp_layers=[16, 16, 8], dropout=0.0)
        options = TrainOptions(epochs=epochs, batch_size=3000, max_steps=2, progress=False)
        return Trainer(model, data, options, torch.device("cpu"), run_dir=tmp_path)

    first = trainer(2)
    state = first.fit(load_candidates(data, "test"), "test")
    assert state.best_hr == state.history[state.best_epoch - 1]["hr"] > 0
    saved = ckpt.load(tmp_path / "checkpoints" / "last.pt")
    assert "best_hr" not in saved["state"]
    for old in ({**saved["state"], "best_hr": state.best_hr},  # select-era checkpoints
                {k: v for k, v in {**saved["state"], "best_hr": state.best_hr}.items() if k != "best_score"}):
        again = trainer(3)
        again.resume_from({**saved, "state": old})
        assert (again.state.best_epoch, again.state.best_hr, again.state.best_score) == \
            (state.best_epoch, state.best_hr, state.best_score)
        assert again.steps_taken == 0 and again.state.steps == state.steps == 4


def test_patience_cannot_end_a_run_before_min_epochs(planted):
    """From scratch, NeuMF's branches sit at popularity's validation HR@10 for their first ~4
    epochs before they climb; patience counted from epoch 1 stopped MLP there. With weights
    that cannot move (lr 0) every epoch after the first is stale."""
    from merlin_ncf.models.data import load_candidates, open_etl
    from merlin_ncf.models.neumf import NeuMF
    from merlin_ncf.models.trainer import Trainer, TrainOptions

    data = open_etl(planted)
    lists = load_candidates(data, "test")

    def epochs_run(**options):
        model = NeuMF(data.num_users, data.num_items, mf_dim=8, mlp_layers=[16, 16, 8], dropout=0.0)
        trainer = Trainer(model, data, TrainOptions(epochs=5, batch_size=3000, max_steps=1, lr=0.0, patience=1,
                                                    progress=False, **options), torch.device("cpu"))
        state = trainer.fit(lists, "test")
        return state.epoch, state.best_epoch

    assert epochs_run() == (2, 1)
    assert epochs_run(min_epochs=4) == (4, 1)

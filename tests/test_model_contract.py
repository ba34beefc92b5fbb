"""The model contract (models/contract.py) for every registered model, and for a toy model
that a test adds with one class and one registry line: registry and config round-trip,
command-line options, score / score_all / score_pairs agreement, the TorchScript serving
module, and learning planted structure with the model's own loss()."""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from merlin_ncf.models import registry
from merlin_ncf.models.contract import (DataFacts, PairwiseBatch, PointwiseBatch, Recommender, UserRowsBatch, every_item_module,
                             positive_int, serving_module)

USERS, ITEMS = 20, 30


class Toy(Recommender):
    """Biased matrix factorisation, pointwise: the smallest model the contract admits."""

    input_type = "pointwise"
    output = "logit"

    def __init__(self, nb_users: int, nb_items: int, factors: int = 4):
        super().__init__()
        self.config = dict(nb_users=nb_users, nb_items=nb_items, factors=factors)
        self.users = torch.nn.Embedding(nb_users, factors)
        self.items = torch.nn.Embedding(nb_items, factors)
        self.bias = torch.nn.Embedding(nb_items, 1)

    def score(self, user, items):
        return torch.einsum("bf,bcf->bc", self.users(user), self.items(items)) + self.bias(items).squeeze(-1)

    def loss(self, batch, *, step):
        return F.binary_cross_entropy_with_logits(self.score(batch.user, batch.item), batch.label)

    @classmethod
    def add_arguments(cls, group):
        group.add_argument("--factors", type=positive_int, default=4, help="toy factors")

    @classmethod
    def from_args(cls, args, data):
        return cls(data.num_users, data.num_items, factors=args.factors)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation (40x slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def with_toy(monkeypatch):
    monkeypatch.setitem(registry.MODELS, "toy", Toy)  # the one registry line


def interactions(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    users = rng.integers(0, USERS, 120)
    return users, rng.integers(0, ITEMS, 120)


def model_parser(name: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train_ncf.py")
    registry.model_class(name).add_arguments(parser.add_argument_group(f"{name} options"))
    return parser


def build_from_cli(name: str, argv: list[str] | None = None, seed: int = 0) -> Recommender:
    cls = registry.model_class(name)
    args = model_parser(name).parse_args(argv or [])
    cls.check_arguments(args)
    torch.manual_seed(seed)
    data = DataFacts(USERS, ITEMS, interactions=interactions() if cls.needs_interactions else None)
    return cls.from_args(args, data)


ALL = list(registry.MODELS) + ["toy"]


def test_registry_names_the_family():
    assert set(registry.MODELS) == {"neumf", "gmf", "mlp", "multvae", "convncf"}
    assert {cls.input_type for cls in registry.MODELS.values()} == {"pointwise", "pairwise", "user_rows"}
    with pytest.raises(KeyError, match="unknown model 'nope'"):
        registry.build_model("nope", {})


def test_a_class_without_a_valid_input_type_is_refused():
    with pytest.raises(TypeError, match="input_type"):
        type("Bad", (Recommender,), {"input_type": "listwise"})


@pytest.mark.usefixtures("with_toy")
@pytest.mark.parametrize("name", ALL)
def test_config_round_trips_through_json_and_the_registry(name):
    model = build_from_cli(name).eval()
    assert registry.model_name(model) == name
    config = json.loads(json.dumps(model.config))
    assert (config["nb_users"], config["nb_items"]) == (USERS, ITEMS)
    rebuilt = registry.build_model(name, config)
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    user, items = torch.arange(USERS), torch.randint(0, ITEMS, (USERS, 5))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.score(user, items), model.score(user, items))


@pytest.mark.usefixtures("with_toy")
@pytest.mark.parametrize("name", ALL)
def test_score_all_score_and_pairs_agree_and_mask_nothing(name):
    model = build_from_cli(name).eval()
    model.score_all_chunk = 64  # several chunks for models using the default score_all
    user = torch.tensor([3, 0, 19, 3])
    items = torch.randint(0, ITEMS, (4, 7))
    with torch.no_grad():
        full = model.score_all(user)
        assert full.shape == (4, ITEMS) and torch.isfinite(full).all()  # seen items too: masking is the caller's
        torch.testing.assert_close(full.gather(1, items), model.score(user, items))
        pairs = model.score_pairs(user.repeat_interleave(7), items.reshape(-1))
        torch.testing.assert_close(pairs, model.score(user, items).reshape(-1))


@pytest.mark.usefixtures("with_toy")
@pytest.mark.parametrize("name", ALL)
def test_serving_module_is_torchscript_pairs_to_float_scores(name):
    model = build_from_cli(name).eval()
    buffer = io.BytesIO()
    torch.jit.save(serving_module(model), buffer)
    buffer.seek(0)
    served = torch.jit.load(buffer)
    # Another length than the trace's example, one user with many items (a recommend request) and mixed users.
    user = torch.cat([torch.full((ITEMS,), 5), torch.tensor([1, 2, 1, 0, 19])])
    item = torch.cat([torch.arange(ITEMS), torch.tensor([4, 4, 9, 0, 29])])
    out = served(user, item)
    assert out.dtype == torch.float32 and out.shape == user.shape
    with torch.no_grad():
        expected = model.score_pairs(user, item).float()
    if model.output == "logit":
        expected = torch.sigmoid(expected)
    torch.testing.assert_close(out, expected)


@pytest.mark.usefixtures("with_toy")
@pytest.mark.parametrize("name", ALL)
def test_every_item_module_is_the_models_score_all_as_the_pairs_module_scores_it(name):
    model = build_from_cli(name).eval()
    assert registry.model_class(name).scores_all_items() == (name not in ("convncf", "toy"))
    every_item = every_item_module(model)
    if every_item is None:  # no all-item scoring of its own: serving scores pairs
        return
    pairs = serving_module(model)
    with torch.no_grad():
        for user in (0, 5, USERS - 1):
            out = every_item(torch.tensor([user]))
            assert out.dtype == torch.float32 and out.shape == (ITEMS,)
            torch.testing.assert_close(out, pairs(torch.full((ITEMS,), user), torch.arange(ITEMS)))
            expected = model.score_all(torch.tensor([user]))[0].float()
            torch.testing.assert_close(out, torch.sigmoid(expected) if model.output == "logit" else expected)


@pytest.mark.usefixtures("with_toy")
@pytest.mark.parametrize("name", ALL)
def test_help_shows_the_models_options(name):
    text = model_parser(name).format_help()
    assert f"{name} options" in text
    assert build_from_cli(name) is not None


def test_model_options_reach_the_model_and_bad_values_are_one_line_errors():
    assert build_from_cli("gmf", ["--factors", "8"]).config["mf_dim"] == 8
    assert build_from_cli("multvae", ["--latent", "16"]).config["latent"] == 16
    assert build_from_cli("convncf", ["--cnn-kernels", "4", "4", "2", "2", "--cnn-strides", "4", "4", "2", "2",
                                      "--cnn-channels", "32", "32", "32", "32"]).config["cnn_kernels"] == [4, 4, 2, 2]
    for name, argv, message in [
        ("neumf", ["--dropout", "1.5"], "--dropout"),
        ("neumf", ["--pretrained-gmf", "x.pt"], "both"),
        ("mlp", ["--mlp-layers", "15", "8"], "even"),
        ("multvae", ["--anneal-cap", "-1"], "anneal"),
        ("convncf", ["--cnn-kernels", "2", "--cnn-strides", "2", "--cnn-channels", "8"], "1x1"),
    ]:
        args = model_parser(name).parse_args(argv)
        with pytest.raises(ValueError, match=message):
            registry.model_class(name).check_arguments(args)


# --- learning planted structure, through each model's own loss() ----------------------------

def planted(seed: int = 0):
    """50 users x 40 items in two taste clusters (users < 25 like items < 20). Each user has 16
    items of their cluster: 15 to train on and 1 held out."""
    rng = np.random.default_rng(seed)
    train, held_out = [], []
    for user in range(50):
        cluster = np.arange(20) + (0 if user < 25 else 20)
        chosen = rng.choice(cluster, 16, replace=False)
        train += [(user, int(i)) for i in chosen[:15]]
        held_out.append(int(chosen[15]))
    pairs = np.array(train)
    return pairs[:, 0], pairs[:, 1], np.array(held_out)


def batches(model: Recommender, users: torch.Tensor, items: torch.Tensor, generator: torch.Generator):
    """One epoch of the batches the trainer builds for each input_type."""
    if model.input_type == "user_rows":
        order = torch.randperm(50, generator=generator)
        for lo in range(0, 50, 10):
            yield UserRowsBatch(order[lo:lo + 10])
        return
    order = torch.randperm(len(users), generator=generator)
    for lo in range(0, len(users), 64):
        u, i = users[order[lo:lo + 64]], items[order[lo:lo + 64]]
        negatives = torch.randint(0, 40, (len(u), 4), generator=generator)
        if model.input_type == "pairwise":
            yield PairwiseBatch(u, i, negatives[:, 0])
        else:
            candidates = torch.cat([i[:, None], negatives], dim=1)
            labels = torch.zeros(candidates.shape)
            labels[:, 0] = 1.0
            yield PointwiseBatch(u, candidates, labels)


def hit_rate_at_5(scores: torch.Tensor, users, items, held_out) -> float:
    scores = scores.clone()
    scores[torch.as_tensor(users), torch.as_tensor(items)] = -torch.inf  # seen items
    top = scores.topk(5, dim=1).indices
    return (top == torch.as_tensor(held_out)[:, None]).any(dim=1).float().mean().item()


SMALL = {
    "neumf": ["--factors", "8", "--mlp-layers", "16", "16", "8", "--dropout", "0"],
    "gmf": ["--factors", "8"],
    "mlp": ["--mlp-layers", "16", "16", "8", "--dropout", "0"],
    "multvae": ["--hidden", "32", "--latent", "8", "--dropout", "0.2", "--total-anneal-steps", "100"],
    "convncf": ["--embedding-size", "16", "--cnn-channels", "8", "8", "8", "8", "--cnn-kernels", "2", "2", "2", "2",
                "--cnn-strides", "2", "2", "2", "2", "--dropout", "0", "--reg-weights", "0.01", "0.01"],
    "toy": [],
}


@pytest.mark.usefixtures("with_toy")
@pytest.mark.parametrize("name", ALL)
def test_each_model_learns_planted_taste_clusters_beyond_popularity(name):
    users, items, held_out = planted()
    cls = registry.model_class(name)
    args = model_parser(name).parse_args(SMALL[name])
    torch.manual_seed(0)
    model = cls.from_args(args, DataFacts(50, 40, interactions=(users, items)))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(0)
    step = 0
    tu, ti = torch.as_tensor(users), torch.as_tensor(items)
    model.train()
    for _ in range(40):
        for batch in batches(model, tu, ti, generator):
            loss = model.loss(batch, step=step)
            assert loss.dim() == 0 and torch.isfinite(loss)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    model.eval()
    with torch.no_grad():
        learned = hit_rate_at_5(model.score_all(torch.arange(50)), users, items, held_out)
    popularity = torch.bincount(ti, minlength=40).float().expand(50, -1)
    baseline = hit_rate_at_5(popularity, users, items, held_out)
    assert baseline < 0.45
    assert learned >= max(0.7, baseline + 0.3), (learned, baseline)


@pytest.mark.parametrize("name", list(registry.MODELS))
def test_hub_entry_builds_fresh_models_and_loads_their_checkpoints(name, tmp_path):
    from merlin_ncf.models import checkpoint as ckpt

    repo = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    extra = {"interactions": interactions()} if registry.model_class(name).needs_interactions else {}
    fresh = torch.hub.load(repo, name, source="local", nb_users=USERS, nb_items=ITEMS, **extra)
    assert registry.model_name(fresh) == name
    path = tmp_path / "best.pt"
    ckpt.save_atomic({"format": ckpt.FORMAT, "model": {"name": name, "config": fresh.config,
                                                        "state": fresh.state_dict()}}, path)
    loaded = torch.hub.load(repo, name, source="local", checkpoint=str(path))
    user, items = torch.arange(4), torch.randint(0, ITEMS, (4, 3))
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(user, items), fresh.eval().score(user, items))
    other = "convncf" if name != "convncf" else "gmf"
    with pytest.raises(ValueError, match=f"holds a {name} model"):
        torch.hub.load(repo, other, source="local", checkpoint=str(path))


@pytest.mark.parametrize("name", ["neumf", "convncf", "multvae"])  # one model per input_type
def test_objective_under_ddp_gives_the_models_own_gradients(name, tmp_path):
    """The trainer wraps Objective(model), not the model, in DDP: loss() then runs through
    DDP's forward, which is what makes DDP synchronise gradients (1-process gloo here)."""
    import torch.distributed as dist

    from merlin_ncf.models.contract import Objective

    users, items, _ = planted()
    args = model_parser(name).parse_args(SMALL[name])
    torch.manual_seed(0)
    model = registry.model_class(name).from_args(args, DataFacts(50, 40, interactions=(users, items))).eval()
    batch = next(batches(model, torch.as_tensor(users), torch.as_tensor(items), torch.Generator().manual_seed(0)))
    model.loss(batch, step=3).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(Objective(model), broadcast_buffers=False)
        ddp(batch, step=3).backward()
    finally:
        dist.destroy_process_group()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], msg=n)


def test_train_defaults_name_training_options():
    from dataclasses import fields

    from merlin_ncf.models.trainer import TrainOptions

    options = {f.name for f in fields(TrainOptions)}
    for name, cls in registry.MODELS.items():
        assert set(cls.train_defaults) <= options, name
    assert registry.MODELS["multvae"].train_defaults["lr"] == 1e-3  # the paper's; its batch is sized by users

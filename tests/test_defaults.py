"""models/defaults.py's rules as the CLI applies them: which model options are auto, the
optimizer rule for models whose tables cannot take sparse gradients, and the Loader's chunks."""

from types import SimpleNamespace

import pytest


def auto(model, *flags, train_rows=99_616, users=613, items=9_727):
    from merlin_ncf.models.train_ncf import choose_defaults, parse_args

    args = parse_args(["--data", "ETL", "--output", "RUN", "--model", model, *flags])
    unset = {k for k, v in vars(args).items() if v is None}
    choose_defaults(args, SimpleNamespace(train_rows=train_rows, num_users=users, num_items=items,
                                          train_files=["part_0.parquet", "part_1.parquet"]))
    return args, unset


@pytest.mark.parametrize("model, sized", [
    ("neumf", {"factors", "mlp_layers", "dropout"}), ("gmf", {"factors"}), ("mlp", {"mlp_layers", "dropout"}),
    ("multvae", {"total_anneal_steps"}), ("convncf", set()),  # ConvNCF's --dropout keeps its class default
])
def test_the_sized_model_options_are_those_resolve_fills(model, sized):
    from merlin_ncf.models.train_ncf import model_class, model_options

    args, unset = auto(model)
    with_class_defaults = {k for k, v in model_options(model_class(model)).items() if v is not None}
    assert unset & with_class_defaults == sized
    assert all(getattr(args, name) is not None for name in sized)


def test_early_stopping_waits_out_the_popularity_plateau_except_for_user_row_models():
    assert auto("neumf")[0].min_epochs == auto("mlp")[0].min_epochs == auto("convncf")[0].min_epochs == 10
    assert auto("multvae")[0].min_epochs == 0  # patience 20 of 200 epochs already
    assert auto("mlp", "--min-epochs", "2")[0].min_epochs == 2


def test_models_that_read_whole_tables_get_adam_from_the_rules():
    from merlin_ncf.models.defaults import resolve

    small = dict(negatives=4, batch_size=40, epochs=None, patience=None, lr=None, beta1=None, beta2=None,
                 select=None, weight_decay=None, negative_sampling=None)
    args = SimpleNamespace(optimizer=None, **small)
    assert resolve(args, 6000, 400, table_rows=100_000)["optimizer"] == "sparse-adam"
    args = SimpleNamespace(optimizer=None, **small)
    assert resolve(args, 6000, 400, table_rows=100_000, sparse_embeddings=False)["optimizer"] == "adam"
    for model in ("multvae", "convncf"):
        assert auto(model, "--batch-size", "40", users=100_000)[0].optimizer == "adam"
    assert auto("neumf", "--batch-size", "40", users=100_000)[0].optimizer == "sparse-adam"


def test_by_default_every_batch_draws_from_every_train_file_of_a_user_sorted_log(etl_dir, tmp_path):
    """The ETL keeps the log's order, so a user-sorted log gives each train file its own users,
    and merlin's Loader shuffles within a chunk only: with one file per chunk, the first half
    of an epoch would train on half the users. By default a small train set is one chunk."""
    import pandas as pd
    import torch

    from merlin_ncf.models.data import batch_columns, open_etl, seed_shuffle, train_loader
    from merlin_ncf.models.train_ncf import choose_defaults, parse_args

    data = open_etl(etl_dir)
    users_of = [set(pd.read_parquet(f)["user_id"]) for f in data.train_files]
    shared = set.intersection(*users_of)  # the case at hand: files split by user (one may straddle)
    assert len(users_of) >= 2 and len(shared) < len(users_of)
    users_of = [file_users - shared for file_users in users_of]
    args = parse_args(["--data", str(etl_dir), "--output", str(tmp_path / "run")])
    choose_defaults(args, data)
    assert args.parts_per_chunk == len(data.train_files)
    assert parse_args(["--data", "E", "--output", "R", "--parts-per-chunk", "1"]).parts_per_chunk == 1
    for epoch in range(3):
        loader = train_loader(data, 512, epoch, seed=0, parts_per_chunk=args.parts_per_chunk)
        seed_shuffle(0, epoch, 0)
        users, _ = batch_columns(data, next(iter(loader)))
        present = set(torch.unique(users).tolist())
        assert all(present & file_users for file_users in users_of), epoch
        loader.stop()


def test_gmf_and_mlp_keep_one_file_per_chunk_as_measured():
    assert auto("gmf")[0].parts_per_chunk == auto("mlp")[0].parts_per_chunk == 1
    assert auto("neumf")[0].parts_per_chunk == auto("convncf")[0].parts_per_chunk == 2
    assert auto("gmf", "--parts-per-chunk", "2")[0].parts_per_chunk == 2
    for variant in ("gmf", "mlp"):
        assert auto("neumf", "--variant", variant)[0].parts_per_chunk == 1


def test_chunks_stay_under_the_row_budget_on_large_train_sets():
    from merlin_ncf.models.defaults import CHUNK_ROWS, parts_per_chunk

    assert parts_per_chunk(20_000_000, 10) == 10  # ml-20m: one chunk
    assert parts_per_chunk(99_616, 2) == 2
    assert parts_per_chunk(16 * CHUNK_ROWS, 128) == 8  # an eighth of the budget per file
    assert parts_per_chunk(16 * CHUNK_ROWS + 1, 128) == 7
    assert parts_per_chunk(4 * CHUNK_ROWS, 2) == 1  # a file above the budget is a chunk of its own

"""models/defaults.py's rules as the CLI applies them: which model options are auto, and the
optimizer rule for models whose tables cannot take sparse gradients."""

from types import SimpleNamespace

import pytest


def auto(model, *flags, train_rows=99_616, users=613, items=9_727):
    from merlin_ncf.models.train_ncf import choose_defaults, parse_args

    args = parse_args(["--data", "ETL", "--output", "RUN", "--model", model, *flags])
    unset = {k for k, v in vars(args).items() if v is None}
    choose_defaults(args, SimpleNamespace(train_rows=train_rows, num_users=users, num_items=items))
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

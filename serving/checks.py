"""What export checks besides its inputs (serving/inputs.py): that --output may be replaced,
that the built repository's own workflow and TorchScript score every id of the ETL output
(before the rename), and with --verify that a live tritonserver answers each ensemble."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from merlin_ncf.atomic import check_replaceable
from merlin_ncf.errors import UserError
from merlin_ncf.serving.errors import ServingError
from merlin_ncf.serving.inputs import ExportInputs, load_torchscript
from merlin_ncf.serving.names import CATALOGUE_FILE, MODEL_STEP, SCORES_ENSEMBLE, WORKFLOW_STEP
from merlin_ncf.serving.repository import VERSION, read_config

REPOSITORY_KIND = "repository"  # merlin_ncf.atomic's marker in every repository export writes
# Repositories written before the marker: recognised by the layout every export writes.
LEGACY_REPOSITORY_LAYOUT = (f"{WORKFLOW_STEP}/config.pbtxt", f"{MODEL_STEP}/config.pbtxt", f"{SCORES_ENSEMBLE}/config.pbtxt")


def check_output(output: Path, data: Path, run: Path, overwrite: bool) -> None:
    """Never replace an input, nor without --overwrite anything non-empty (our own older
    repository included); foreign non-empty directories only with --overwrite."""
    try:
        check_replaceable(output, REPOSITORY_KIND, inputs=[data, run], overwrite=overwrite,
                          legacy_markers=LEGACY_REPOSITORY_LAYOUT)
    except UserError as exc:
        raise ServingError(str(exc)) from None
    if not overwrite and output.is_dir() and any(output.iterdir()):
        raise ServingError(f"{output} exists (pass --overwrite to replace it)")


def load_request_encoder(repo: Path, compiled: bool = True):
    """The exported workflow step's encoder, as the server's workflow step loads it."""
    from merlin_ncf.serving.inference_workflow import RequestEncoder

    config = read_config(repo / WORKFLOW_STEP / "config.pbtxt")
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    return RequestEncoder.load(repo / WORKFLOW_STEP / VERSION, parameters, compiled=compiled)


def check_scoring(repo: Path, inputs: ExportInputs) -> None:
    """Encode every known item for one user with the repository's workflow and score them with
    its TorchScript: a model that cannot score every id of this ETL output fails here, and so
    does a "logit" run whose model.ts does not return probabilities."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = load_request_encoder(repo)
    model = load_torchscript(repo / MODEL_STEP / VERSION / "model.pt")
    num_users, num_items = inputs.spec.num_users, inputs.spec.num_items
    items = encoder.all_items_encoded
    # ... plus the highest index of each table, which only a model sized for this ETL output has.
    pairs_user = np.r_[np.full(items.size, inputs.spec.first_item_index), num_users - 1]
    pairs_item = np.r_[items, num_items - 1]
    try:
        with torch.inference_mode():
            scores = model(torch.from_numpy(pairs_user), torch.from_numpy(pairs_item))
    except Exception as exc:
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ServingError(
            f"{inputs.torchscript} cannot score this ETL output's ids (users < {num_users}, items < {num_items}): {detail}"
        ) from None
    if tuple(scores.shape) != (pairs_user.size,) or scores.dtype != torch.float32:
        raise ServingError(f"{inputs.torchscript} returned {scores.dtype} {tuple(scores.shape)}, expected float32 [{pairs_user.size}]")
    if not bool(torch.isfinite(scores).all()):
        raise ServingError(f"{inputs.torchscript} returned non-finite scores")
    if inputs.run.score_kind == "probability" and (scores.min() < 0 or scores.max() > 1):
        raise ServingError(f"{inputs.torchscript} returned scores outside [0, 1]: its run's output is "
                           f"{inputs.run.output!r}, so model.ts must return probabilities")
    check_catalogue(repo, model, items, (int(pairs_user[0]), 0))


def check_catalogue(repo: Path, model, items: np.ndarray, users: tuple[int, ...]) -> None:
    """The model step's catalogue.pt (if any) must give every item model.pt's score, for each
    of `users`: a known user, and a reserved index (an unknown user: popularity where export
    wrapped both in it, else the model's score of that row, either way the same in both)."""
    import torch

    path = repo / MODEL_STEP / VERSION / CATALOGUE_FILE
    if not path.is_file():
        return
    catalogue, items = load_torchscript(path), torch.from_numpy(items)
    with torch.inference_mode():
        for user in users:
            expected = model(torch.full_like(items, user), items)
            scores = catalogue(torch.tensor([user]))[items]
            if not torch.allclose(scores, expected, atol=1e-5, rtol=0):
                worst = float((scores - expected).abs().max())
                raise ServingError(f"{path} scores differ from model.pt's for user index {user} by up to {worst:.2e} "
                                   "(a bug in serving/catalogue.py or the model's score_all)")


def verify_with_server(repo: Path, inputs: ExportInputs, flavour: str, recommend: bool) -> None:
    """Serve the repository with the tritonserver found here and send one request per ensemble."""
    from merlin_ncf.serving.client import RecommenderClient
    from merlin_ncf.serving.serve import TritonServer
    from merlin_ncf.serving.server_runtime import LIBTORCH_BACKEND, find_tritonserver

    installation = find_tritonserver()
    if flavour == "libtorch" and not installation.supports(LIBTORCH_BACKEND):
        raise ServingError(f"--verify: the tritonserver found here ({installation.binary}) has no pytorch backend "
                           "for the libtorch flavour (verify it where it will run, or export --flavour python)")
    encoder = load_request_encoder(repo)
    user, items = encoder.workflow.vocabulary(inputs.user)[0], encoder.all_items[:3]
    try:
        with TritonServer(repo, installation=installation) as server, RecommenderClient(server.http_url) as client:
            if client.scores([user], items).shape != (len(items),):
                raise ServingError(f"--verify: the '{SCORES_ENSEMBLE}' ensemble answered with the wrong shape")
            if recommend and len(client.recommend(user, top_k=1).item_ids) != 1:
                raise ServingError("--verify: the 'recommend' ensemble answered with the wrong shape")
    except ServingError as exc:
        raise ServingError(f"tritonserver rejected the repository: {str(exc).splitlines()[0]}") from None

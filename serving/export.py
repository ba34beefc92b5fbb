"""Export the saved NVTabular workflow and a run's TorchScript (any registered model) as a
Triton ensemble model repository: the command line and the order of the work.

The repository (see serving/README.md) holds three steps (serving/steps.py) and two
ensembles (serving/ensembles.py). It is built in a temporary directory, checked the way
Triton would check it (serving/repository.py, serving/checks.py), and only then renamed
into place.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from merlin_ncf.atomic import atomic_directory
from merlin_ncf.errors import OneLineArgumentParser, run_cli
from merlin_ncf.serving import ensembles, steps
from merlin_ncf.serving.checks import REPOSITORY_KIND, check_output, check_scoring, verify_with_server
from merlin_ncf.serving.errors import ServingError
from merlin_ncf.serving.inputs import locate_inputs
from merlin_ncf.serving.names import UNKNOWN_IDS_CHOICES
from merlin_ncf.serving.repository import validate_repository
from merlin_ncf.workflows.cluster import quiet_merlin

FLAVOURS = ("auto", "python", "libtorch")


def resolve_flavour(flavour: str) -> str:
    """'auto' picks libtorch when the server found here has the pytorch backend, else python."""
    if flavour != "auto":
        return flavour
    from merlin_ncf.serving.server_runtime import LIBTORCH_BACKEND, find_tritonserver

    try:
        return "libtorch" if find_tritonserver().supports(LIBTORCH_BACKEND) else "python"
    except ServingError:  # no server on this machine: the python flavour runs anywhere
        return "python"


def export(data: Path, run: Path, output: Path, flavour: str = "auto", top_k: int = 10,
           unknown_ids: str = "error", instances: int = 1, exclude_seen: bool = True, overwrite: bool = False,
           verify: bool = False, log=print) -> str:
    """Write the repository to `output` atomically; returns the model step's flavour."""
    if top_k < 0:
        raise ServingError(f"--top-k must be >= 0, got {top_k}")
    if instances < 1:
        raise ServingError(f"--instances must be >= 1, got {instances}")
    if unknown_ids not in UNKNOWN_IDS_CHOICES:
        raise ServingError(f"--unknown-ids must be one of {UNKNOWN_IDS_CHOICES}, got {unknown_ids!r}")
    check_output(output, data, run, overwrite)
    inputs = locate_inputs(data, run)
    flavour = resolve_flavour(flavour)
    pairs = inputs.model  # model.ts, loaded once: model.pt, and the weights of catalogue.pt
    popularity = None
    if unknown_ids == "popularity":
        from merlin_ncf.serving.history import item_popularity, with_popularity

        popularity = item_popularity(inputs.spec)
        inputs.model = with_popularity(pairs, popularity, inputs.spec.first_item_index)
    with atomic_directory(output, kind=REPOSITORY_KIND) as staging:
        log(f"workflow step from {inputs.workflow_dir}")
        steps.write_workflow_step(staging, inputs, unknown_ids, instances, top_k or 10, exclude_seen)
        log(f"model step ({flavour}): {inputs.run.name} from {inputs.torchscript}, scores are {inputs.run.score_kind}"
            + ("; unknown users get item popularity" if unknown_ids == "popularity" else ""))
        if flavour == "libtorch":
            steps.write_libtorch_model_step(staging, inputs)
        else:
            from merlin_ncf.serving.catalogue import catalogue_module

            catalogue = catalogue_module(inputs.run, inputs.torchscript, pairs)
            if catalogue is None:
                log(f"ranking every item: {inputs.run.name} has no all-item scoring of its own, so it scores pairs")
            else:
                log(f"ranking every item: {inputs.run.name}'s own all-item scoring, one pass over the catalogue")
                if popularity is not None:
                    catalogue = with_popularity(catalogue, popularity, inputs.spec.first_item_index, every_item=True)
            steps.write_python_model_step(staging, inputs, instances, catalogue)
        ensembles.write_scores_ensemble(staging, inputs)
        if top_k:
            log(f"top-K step (default K={top_k}) with titles from {inputs.items_table}")
            steps.write_top_k_step(staging, inputs)
            ensembles.write_recommend_ensemble(staging, inputs)
        log("checking every config.pbtxt and the ensemble wiring; scoring every item once")
        validate_repository(staging)
        check_scoring(staging, inputs)
        if verify:
            log("loading the repository in tritonserver and asking each ensemble once")
            verify_with_server(staging, inputs, flavour, bool(top_k))
    return flavour


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineArgumentParser(
        description="Export the ETL's saved workflow and a training run's TorchScript (any registered model) as a "
        "Triton ensemble model repository (raw ids in; scores, or top-K raw item ids with scores and titles, out)."
    )
    parser.add_argument("--data", required=True, type=Path, help="ETL output directory (holds feature_spec.yaml)")
    parser.add_argument("--run", required=True, type=Path, help="training run directory (holds model.ts, config.json)")
    parser.add_argument("--output", required=True, type=Path, help="model repository to write")
    parser.add_argument("--flavour", choices=FLAVOURS, default="auto",
                        help="model step backend: 'python' (TorchScript run by torch inside the python backend, CPU), "
                        "'libtorch' (Triton's pytorch_libtorch backend, the NGC container), or 'auto' (default): "
                        "libtorch if the tritonserver found here has the pytorch backend, else python")
    parser.add_argument("--top-k", type=int, default=10,
                        help="K of the 'recommend' ensemble when a request sends no top_k (default 10); 0 leaves it out")
    parser.add_argument("--unknown-ids", choices=UNKNOWN_IDS_CHOICES, default="error",
                        help="ids unseen at ETL time: 'error' (default) rejects the request naming them; "
                        "'oov' scores them as Categorify's out-of-vocabulary index 2; 'popularity' answers an "
                        "unknown user with each item's share of training users (unknown items stay an error)")
    parser.add_argument("--instances", type=int, default=1, help="instances of the workflow and model steps (default 1)")
    parser.add_argument("--exclude-seen", action=argparse.BooleanOptionalAction, default=True,
                        help="when ranking every item, leave out the user's items in the ETL output (training "
                        "pairs and held-out positives); default on")
    parser.add_argument("--verify", action="store_true",
                        help="also load the repository in the tritonserver found here and ask each ensemble once "
                        "before writing --output (~20 s)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists (never an input; a "
                        "directory export did not write is replaced only with this flag)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    quiet_merlin()
    flavour = export(args.data, args.run, args.output, args.flavour, args.top_k, args.unknown_ids,
                     args.instances, args.exclude_seen, args.overwrite, args.verify)
    print(f"wrote {args.output} (model step: {flavour}); serve it with: python serving/serve.py --repository {args.output}")
    return 0


if __name__ == "__main__":
    run_cli(main)

"""Export the saved NVTabular workflow and the trained TorchScript model as a Triton ensemble.

The repository (see serving/README.md) holds three steps and two ensembles:
`workflow` (python backend: raw ids -> encoded ids), `model` (the run's TorchScript, on the
python backend or on `pytorch_libtorch`), `top_k` (python backend: best candidates as raw
ids with titles); `scores` = workflow -> model, `recommend` = workflow -> model -> top_k.
It is built in a temporary directory, checked the way Triton would check it, and only
then renamed into place.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path


import numpy as np
import tritonclient.grpc.model_config_pb2 as mc

from merlin_ncf.serving.errors import ServingError
from merlin_ncf.errors import run_cli
from merlin_ncf.serving.repository import VERSION, read_config, tensor, validate_repository, write_config
from merlin_ncf.atomic import atomic_directory, check_replaceable
from merlin_ncf.workflows.cluster import quiet_merlin
from merlin_ncf.errors import OneLineArgumentParser, UserError, one_line
from merlin_ncf.feature_spec import FeatureSpec, FeatureSpecError
from merlin_ncf.workflows.transcode import etl_directory

FLAVOURS = ("auto", "python", "libtorch")
WORKFLOW_STEP, MODEL_STEP, TOP_K_STEP = "workflow", "model", "top_k"
SCORES_ENSEMBLE, RECOMMEND_ENSEMBLE = "scores", "recommend"
MODEL_SOURCES = Path(__file__).resolve().parent / "triton_models"
HELPERS = (MODEL_SOURCES / "common.py",)
REPOSITORY_KIND = "repository"  # merlin_ncf.atomic's marker in every repository export writes
# Repositories written before the marker: recognised by the layout every export writes.
LEGACY_REPOSITORY_LAYOUT = (f"{WORKFLOW_STEP}/config.pbtxt", f"{MODEL_STEP}/config.pbtxt", f"{SCORES_ENSEMBLE}/config.pbtxt")


@dataclass
class ExportInputs:
    """Everything export reads, found and loaded before anything is written."""

    spec: FeatureSpec
    workflow_dir: Path
    items_table: Path
    torchscript: Path
    workflow: object  # nvtabular.Workflow
    model: object  # torch.jit.ScriptModule
    user: str = ""  # the user and item feature names (feature_spec.yaml's channels)
    item: str = ""

    def __post_init__(self):
        self.user, self.item = self.spec.user_feature, self.spec.item_feature


def locate_inputs(data: Path, run: Path) -> ExportInputs:
    try:
        data = etl_directory(data)  # a foreign Dataset Feature Specification: its transcoded copy
        spec = FeatureSpec.load(data)
        workflow_dir, items_table = spec.path("workflow"), spec.path("item_table")
    except (FeatureSpecError, UserError) as exc:
        raise ServingError(str(exc)) from None
    if not (workflow_dir / "workflow.pkl").is_file():
        raise ServingError(f"{workflow_dir} holds no saved NVTabular workflow (workflow.pkl)")
    if not items_table.is_file():
        raise ServingError(f"item table {items_table} not found")
    torchscript = run / "model.ts"
    check_run_matches_data(run, spec)
    workflow = load_workflow(workflow_dir)
    missing = {spec.user_feature, spec.item_feature} - set(workflow.input_schema.column_names)
    if missing:
        raise ServingError(f"the workflow in {workflow_dir} does not take {sorted(missing)}, which feature_spec.yaml names")
    return ExportInputs(spec, workflow_dir, items_table, torchscript, workflow, load_torchscript(torchscript))


def check_run_matches_data(run: Path, spec: FeatureSpec, warn=None) -> None:
    """Refuse a run that is incomplete or was trained on another ETL output: its tables must
    have exactly the spec's cardinalities (a larger model scores ids it never saw trained),
    and its recorded data fingerprint must be this ETL output's."""
    missing = [name for name in ("config.json", "model.ts") if not (run / name).is_file()]
    if missing:
        raise ServingError(f"{run / missing[-1]} not found: {run} is not a complete training run directory "
                           "(train it with models/train_ncf.py, or resume it)")
    try:
        config = json.loads((run / "config.json").read_text())
        sizes = config["model"]["config"]
        nb_users, nb_items = int(sizes["nb_users"]), int(sizes["nb_items"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ServingError(f"{run / 'config.json'} is not a training run's config (no model.config.nb_users/"
                           f"nb_items: {one_line(exc)})") from None
    if (nb_users, nb_items) != (spec.num_users, spec.num_items):
        raise ServingError(f"{run} was trained for {nb_users} users and {nb_items} items, but {spec.base_dir} has "
                           f"{spec.num_users} and {spec.num_items}: the model belongs to another ETL output")
    recorded = config.get("data_fingerprint")
    if recorded is None:
        (warn or _warn)(f"warning: {run / 'config.json'} records no data_fingerprint (a run from before it was "
                        f"recorded): cannot check that it was trained on {spec.base_dir}")
    elif recorded != spec.fingerprint():
        raise ServingError(f"{run} was trained on other data than {spec.base_dir} (its data_fingerprint differs): "
                           "export it with the ETL output it was trained on")


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_workflow(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import nvtabular as nvt

        try:
            return nvt.Workflow.load(str(path))
        except Exception as exc:  # any unpickling failure means the same thing to the user
            raise ServingError(f"cannot load the NVTabular workflow in {path}: {one_line(exc)}") from None


def load_torchscript(path: Path):
    import torch

    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:
        raise ServingError(f"{path} is not a loadable TorchScript module: {one_line(exc)}") from None


def resolve_flavour(flavour: str) -> str:
    """'auto' picks libtorch when the server found here has the pytorch backend, else python."""
    if flavour != "auto":
        return flavour
    from merlin_ncf.serving.server_runtime import LIBTORCH_BACKEND, find_tritonserver

    try:
        return "libtorch" if find_tritonserver().supports(LIBTORCH_BACKEND) else "python"
    except ServingError:  # no server on this machine: the python flavour runs anywhere
        return "python"


# --- the steps ----------------------------------------------------------------------------------


def _python_model(model_dir: Path, source: Path, *helpers: Path) -> Path:
    version_dir = model_dir / VERSION
    version_dir.mkdir(parents=True)
    for path in (source, *HELPERS, *helpers):
        shutil.copy2(path, version_dir / path.name)
    return version_dir


def _cpu_instances(count: int) -> list[mc.ModelInstanceGroup]:
    return [mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=count)]


def write_workflow_step(repo: Path, inputs: ExportInputs, unknown_ids: str, instances: int, default_k: int,
                        exclude_seen: bool) -> None:
    version_dir = _python_model(
        repo / WORKFLOW_STEP, MODEL_SOURCES / "workflow" / "model.py", Path(__file__).with_name("inference_workflow.py")
    )
    shutil.copytree(inputs.workflow_dir, version_dir / "workflow")
    if exclude_seen:
        from merlin_ncf.serving.inference_workflow import SEEN_FILE

        seen_items(inputs).save(version_dir / SEEN_FILE)
    config = mc.ModelConfig(name=WORKFLOW_STEP, backend="python", instance_group=_cpu_instances(instances))
    config.input.extend([
        tensor(mc.ModelInput, inputs.user, raw_type(inputs, inputs.user)),
        tensor(mc.ModelInput, inputs.item, raw_type(inputs, inputs.item), optional=True),
        # top_k passes through here because Triton only leaves out an absent optional input
        # for a step fed by the ensemble's inputs alone; this step fills in the default.
        tensor(mc.ModelInput, "top_k", mc.TYPE_INT32, dims=(1,), optional=True),
    ])
    config.output.extend([
        tensor(mc.ModelOutput, inputs.user, mc.TYPE_INT64),
        tensor(mc.ModelOutput, inputs.item, mc.TYPE_INT64),
        tensor(mc.ModelOutput, "candidate_id", raw_type(inputs, inputs.item)),
        tensor(mc.ModelOutput, "top_k", mc.TYPE_INT32, dims=(1,)),
    ])
    _set_parameters(config, user_column=inputs.user, item_column=inputs.item,
                    first_index=inputs.spec.first_item_index, unknown_ids=unknown_ids, default_k=default_k)
    write_config(repo / WORKFLOW_STEP, config)


def raw_type(inputs: ExportInputs, column: str) -> int:
    """Triton's type for a raw id column: strings (BYTES) where the log's ids were strings."""
    string = inputs.workflow.input_schema[column].dtype.element_type.value in ("object", "string")
    return mc.TYPE_STRING if string else mc.TYPE_INT64


def seen_items(inputs: ExportInputs) -> "SeenItems":
    """Every (user, item) the ETL output holds: training pairs and the held-out positives."""
    import pandas as pd

    from merlin_ncf.serving.inference_workflow import SeenItems

    label = inputs.spec.label_feature
    frames = [pd.read_parquet(f, columns=[inputs.user, inputs.item]) for f in inputs.spec.files("train")]
    for split in ("validation", "test"):
        if inputs.spec.has_mapping(split):
            for f in inputs.spec.files(split):
                lists = pd.read_parquet(f, columns=[inputs.user, inputs.item, label])
                frames.append(lists.loc[lists[label] > 0, [inputs.user, inputs.item]])
    pairs = pd.concat(frames, ignore_index=True)
    return SeenItems.from_pairs(pairs[inputs.user].to_numpy(np.int64), pairs[inputs.item].to_numpy(np.int64),
                                inputs.spec.num_users)


def write_python_model_step(repo: Path, inputs: ExportInputs, instances: int) -> None:
    version_dir = _python_model(repo / MODEL_STEP, MODEL_SOURCES / "model" / "model.py")
    shutil.copy2(inputs.torchscript, version_dir / "model.pt")
    config = mc.ModelConfig(name=MODEL_STEP, backend="python", instance_group=_cpu_instances(instances))
    config.input.extend([tensor(mc.ModelInput, inputs.user, mc.TYPE_INT64), tensor(mc.ModelInput, inputs.item, mc.TYPE_INT64)])
    config.output.append(tensor(mc.ModelOutput, "score", mc.TYPE_FP32))
    _set_parameters(config, user_column=inputs.user, item_column=inputs.item, torch_threads=1)
    write_config(repo / MODEL_STEP, config)


def write_libtorch_model_step(repo: Path, inputs: ExportInputs) -> None:
    """The TorchScript for Triton's pytorch backend, written by merlin-systems' PredictPyTorch."""
    from merlin.schema import ColumnSchema, Schema

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from merlin.systems.dag.ops.pytorch import PredictPyTorch
        from merlin.systems.dag.runtimes.triton.ops.pytorch import PredictPyTorchTriton

    encoded = inputs.workflow.output_schema
    # The backend feeds inputs to forward(user, item) in config order: user first.
    input_schema = Schema([encoded[inputs.user], encoded[inputs.item]])
    output_schema = Schema([ColumnSchema("score", dtype=np.float32)])
    op = PredictPyTorchTriton(PredictPyTorch(inputs.model, input_schema, output_schema))
    with tempfile.TemporaryDirectory(dir=repo) as scratch:
        config = op.export(scratch, input_schema, output_schema, version=int(VERSION))
        shutil.move(Path(scratch) / config.name, repo / MODEL_STEP)
    config.name = MODEL_STEP
    write_config(repo / MODEL_STEP, config)


def write_top_k_step(repo: Path, inputs: ExportInputs) -> None:
    import pandas as pd

    version_dir = _python_model(repo / TOP_K_STEP, MODEL_SOURCES / "top_k" / "model.py")
    items = pd.read_parquet(inputs.items_table)
    if "raw_item_id" not in items.columns:
        raise ServingError(f"{inputs.items_table} has no raw_item_id column")
    titles = items["title"] if "title" in items.columns else pd.Series("", index=items.index)
    pd.DataFrame({"raw_item_id": items["raw_item_id"], "title": titles.fillna("").astype(str)}).to_parquet(
        version_dir / "items.parquet", index=False
    )
    config = mc.ModelConfig(name=TOP_K_STEP, backend="python", instance_group=_cpu_instances(1))
    config.input.extend([
        tensor(mc.ModelInput, "candidate_id", raw_type(inputs, inputs.item)),
        tensor(mc.ModelInput, "score", mc.TYPE_FP32),
        tensor(mc.ModelInput, "top_k", mc.TYPE_INT32, dims=(1,)),
    ])
    config.output.extend([
        tensor(mc.ModelOutput, "item_id", raw_type(inputs, inputs.item)),
        tensor(mc.ModelOutput, "score", mc.TYPE_FP32),
        tensor(mc.ModelOutput, "title", mc.TYPE_STRING),
    ])
    write_config(repo / TOP_K_STEP, config)


def _set_parameters(config: mc.ModelConfig, **values) -> None:
    for key, value in values.items():
        config.parameters[key].string_value = str(value)


# --- the ensembles ------------------------------------------------------------------------------


def _step(model: str, input_map: dict[str, str], output_map: dict[str, str]):
    return mc.ModelEnsembling.Step(model_name=model, model_version=-1, input_map=input_map, output_map=output_map)


def _encode_and_score_steps(user: str, item: str, recommend: bool) -> list:
    # Triton rejects an ensemble with a step output nobody reads: map only what is used.
    inputs, outputs = {user: user, item: item}, {user: "encoded_user", item: "encoded_item"}
    if recommend:
        inputs["top_k"] = "top_k"
        outputs.update(candidate_id="candidate_id", top_k="requested_k")
    return [
        _step(WORKFLOW_STEP, inputs, outputs),
        _step(MODEL_STEP, {user: "encoded_user", item: "encoded_item"}, {"score": "candidate_score"}),
    ]


def write_scores_ensemble(repo: Path, inputs: ExportInputs) -> None:
    user, item = inputs.user, inputs.item
    config = mc.ModelConfig(name=SCORES_ENSEMBLE, platform="ensemble")
    config.input.extend([tensor(mc.ModelInput, user, raw_type(inputs, user)),
                         tensor(mc.ModelInput, item, raw_type(inputs, item))])
    config.output.append(tensor(mc.ModelOutput, "score", mc.TYPE_FP32))
    steps = _encode_and_score_steps(user, item, recommend=False)
    steps[-1].output_map["score"] = "score"
    config.ensemble_scheduling.step.extend(steps)
    write_config(repo / SCORES_ENSEMBLE, config)


def write_recommend_ensemble(repo: Path, inputs: ExportInputs) -> None:
    user, item = inputs.user, inputs.item
    config = mc.ModelConfig(name=RECOMMEND_ENSEMBLE, platform="ensemble")
    config.input.extend([
        tensor(mc.ModelInput, user, raw_type(inputs, user)),
        tensor(mc.ModelInput, item, raw_type(inputs, item), optional=True),
        tensor(mc.ModelInput, "top_k", mc.TYPE_INT32, dims=(1,), optional=True),
    ])
    config.output.extend([
        tensor(mc.ModelOutput, "top_item_id", raw_type(inputs, item)),
        tensor(mc.ModelOutput, "top_score", mc.TYPE_FP32),
        tensor(mc.ModelOutput, "top_title", mc.TYPE_STRING),
    ])
    steps = _encode_and_score_steps(user, item, recommend=True)
    # Ensemble tensors share one namespace with its inputs: the ranked ids need their own name.
    steps.append(_step(TOP_K_STEP, {"candidate_id": "candidate_id", "score": "candidate_score", "top_k": "requested_k"},
                       {"item_id": "top_item_id", "score": "top_score", "title": "top_title"}))
    config.ensemble_scheduling.step.extend(steps)
    write_config(repo / RECOMMEND_ENSEMBLE, config)


# --- checks ---------------------------------------------------------------------------------------


def load_request_encoder(repo: Path, compiled: bool = True):
    """The exported workflow step's encoder, as the server's workflow step loads it."""
    from merlin_ncf.serving.inference_workflow import RequestEncoder

    config = read_config(repo / WORKFLOW_STEP / "config.pbtxt")
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    return RequestEncoder.load(repo / WORKFLOW_STEP / VERSION, parameters, compiled=compiled)


def check_scoring(repo: Path, inputs: ExportInputs) -> None:
    """Encode every known item for one user with the repository's workflow and score them with
    its TorchScript: a model that cannot score every id of this ETL output fails here."""
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
    if not bool(torch.isfinite(scores).all()) or scores.min() < 0 or scores.max() > 1:
        raise ServingError(f"{inputs.torchscript} returned scores outside [0, 1]: expected probabilities")


# --- the export as a whole -------------------------------------------------------------------------


def export(data: Path, run: Path, output: Path, flavour: str = "auto", top_k: int = 10,
           unknown_ids: str = "error", instances: int = 1, exclude_seen: bool = True, overwrite: bool = False,
           verify: bool = False, log=print) -> str:
    """Write the repository to `output` atomically; returns the model step's flavour."""
    if top_k < 0:
        raise ServingError(f"--top-k must be >= 0, got {top_k}")
    if instances < 1:
        raise ServingError(f"--instances must be >= 1, got {instances}")
    check_output(output, data, run, overwrite)
    inputs = locate_inputs(data, run)
    flavour = resolve_flavour(flavour)
    with atomic_directory(output, kind=REPOSITORY_KIND) as staging:
        log(f"workflow step from {inputs.workflow_dir}")
        write_workflow_step(staging, inputs, unknown_ids, instances, top_k or 10, exclude_seen)
        log(f"model step ({flavour}) from {inputs.torchscript}")
        if flavour == "libtorch":
            write_libtorch_model_step(staging, inputs)
        else:
            write_python_model_step(staging, inputs, instances)
        write_scores_ensemble(staging, inputs)
        if top_k:
            log(f"top-K step (default K={top_k}) with titles from {inputs.items_table}")
            write_top_k_step(staging, inputs)
            write_recommend_ensemble(staging, inputs)
        log("checking every config.pbtxt and the ensemble wiring; scoring every item once")
        validate_repository(staging)
        check_scoring(staging, inputs)
        if verify:
            log("loading the repository in tritonserver and asking each ensemble once")
            verify_with_server(staging, inputs, flavour, bool(top_k))
    return flavour


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
                raise ServingError("--verify: the 'scores' ensemble answered with the wrong shape")
            if recommend and len(client.recommend(user, top_k=1).item_ids) != 1:
                raise ServingError("--verify: the 'recommend' ensemble answered with the wrong shape")
    except ServingError as exc:
        raise ServingError(f"tritonserver rejected the repository: {str(exc).splitlines()[0]}") from None


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineArgumentParser(
        description="Export the ETL's saved workflow and a training run's TorchScript as a Triton "
        "ensemble model repository (raw ids in; scores, or top-K raw item ids with scores and titles, out)."
    )
    parser.add_argument("--data", required=True, type=Path, help="ETL output directory (holds feature_spec.yaml)")
    parser.add_argument("--run", required=True, type=Path, help="training run directory (holds model.ts)")
    parser.add_argument("--output", required=True, type=Path, help="model repository to write")
    parser.add_argument("--flavour", choices=FLAVOURS, default="auto",
                        help="model step backend: 'python' (TorchScript run by torch inside the python backend, CPU), "
                        "'libtorch' (Triton's pytorch_libtorch backend, the NGC container), or 'auto' (default): "
                        "libtorch if the tritonserver found here has the pytorch backend, else python")
    parser.add_argument("--top-k", type=int, default=10,
                        help="K of the 'recommend' ensemble when a request sends no top_k (default 10); 0 leaves it out")
    parser.add_argument("--unknown-ids", choices=("error", "oov"), default="error",
                        help="ids unseen at ETL time: 'error' (default) rejects the request naming them; "
                        "'oov' scores them as Categorify's out-of-vocabulary index 2")
    parser.add_argument("--instances", type=int, default=1, help="instances of the workflow and model steps (default 1)")
    parser.add_argument("--exclude-seen", action=argparse.BooleanOptionalAction, default=True,
                        help="when ranking every item, leave out the user's items in the ETL output (training "
                        "pairs and held-out positives); default on")
    parser.add_argument("--verify", action="store_true",
                        help="also load the repository in the tritonserver found here and ask each ensemble once "
                        "before writing --output (~20 s)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists (never an input; a directory export did not write "
                        "is replaced only with this flag)")
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

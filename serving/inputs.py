"""Everything export reads, found, checked and loaded before anything is written: the ETL
output's feature spec, saved workflow and item table; the run's model (config.json: its name
and output kind; the run must be complete and belong to the ETL output) and model.ts."""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from merlin_ncf.errors import UserError, one_line
from merlin_ncf.feature_spec import FeatureSpec, FeatureSpecError
from merlin_ncf.models.contract import OUTPUTS
from merlin_ncf.serving.errors import ServingError

# Runs from before config.json recorded them were NeuMF runs, whose model.ts gives probabilities.
LEGACY_MODEL, LEGACY_OUTPUT = "neumf", "logit"


@dataclass(frozen=True)
class RunModel:
    """The run's model as config.json records it: its registry name and its output kind."""

    name: str
    output: str  # "logit": model.ts returns sigmoid(logit), a probability; "score": a raw score
    config: dict = field(default_factory=dict, compare=False)  # its constructor's arguments (registry.build_model)

    @property
    def score_kind(self) -> str:
        return "probability" if self.output == "logit" else "score"


def check_run_matches_data(run: Path, spec: FeatureSpec, warn=None) -> RunModel:
    """Refuse a run that is incomplete or was trained on another ETL output: its tables must
    have exactly the spec's cardinalities (a larger model scores ids it never saw trained),
    and its recorded data fingerprint must be this ETL output's. Returns its model."""
    missing = [name for name in ("config.json", "model.ts") if not (run / name).is_file()]
    if missing:
        raise ServingError(f"{run / missing[-1]} not found: {run} is not a complete training run directory "
                           "(train it with models/train_ncf.py, or resume it)")
    try:
        config = json.loads((run / "config.json").read_text())
        sizes = config["model"]["config"]
        nb_users, nb_items = int(sizes["nb_users"]), int(sizes["nb_items"])
        model = RunModel(str(config["model"].get("name", LEGACY_MODEL)), str(config.get("output", LEGACY_OUTPUT)),
                         dict(sizes))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ServingError(f"{run / 'config.json'} is not a training run's config (no model.config.nb_users/"
                           f"nb_items: {one_line(exc)})") from None
    if model.output not in OUTPUTS:
        raise ServingError(f"{run / 'config.json'} records output {model.output!r}; expected one of {OUTPUTS}")
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
    return model


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_torchscript(path: Path):
    import torch

    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:
        raise ServingError(f"{path} is not a loadable TorchScript module: {one_line(exc)}") from None


@dataclass
class ExportInputs:
    spec: FeatureSpec
    workflow_dir: Path
    items_table: Path
    torchscript: Path
    workflow: object  # nvtabular.Workflow
    model: object  # torch.jit.ScriptModule: what the model step serves
    run: RunModel
    user: str = ""  # the user and item feature names (feature_spec.yaml's channels)
    item: str = ""

    def __post_init__(self):
        self.user, self.item = self.spec.user_feature, self.spec.item_feature

    def raw_type(self, column: str) -> int:
        """Triton's type for a raw id column: strings (BYTES) where the log's ids were strings."""
        import tritonclient.grpc.model_config_pb2 as mc

        string = self.workflow.input_schema[column].dtype.element_type.value in ("object", "string")
        return mc.TYPE_STRING if string else mc.TYPE_INT64


def locate_inputs(data: Path, run: Path) -> ExportInputs:
    from merlin_ncf.workflows.transcode import etl_directory

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
    run_model = check_run_matches_data(run, spec)
    workflow = load_workflow(workflow_dir)
    missing = {spec.user_feature, spec.item_feature} - set(workflow.input_schema.column_names)
    if missing:
        raise ServingError(f"the workflow in {workflow_dir} does not take {sorted(missing)}, which feature_spec.yaml names")
    return ExportInputs(spec, workflow_dir, items_table, torchscript, workflow, load_torchscript(torchscript), run_model)


def load_workflow(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import nvtabular as nvt

        try:
            return nvt.Workflow.load(str(path))
        except Exception as exc:  # any unpickling failure means the same thing to the user
            raise ServingError(f"cannot load the NVTabular workflow in {path}: {one_line(exc)}") from None

"""Everything export reads, found, checked and loaded before anything is written: the ETL
output's feature spec, saved workflow and item table; the run's model (config.json) and
model.ts."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from merlin_ncf.errors import one_line
from merlin_ncf.feature_spec import FeatureSpec, FeatureSpecError
from merlin_ncf.serving.checks import RunModel, check_run_matches_data, load_torchscript
from merlin_ncf.serving.errors import ServingError


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


def locate_inputs(data: Path, run: Path) -> ExportInputs:
    try:
        spec = FeatureSpec.load(data)
        workflow_dir, items_table = spec.path("workflow"), spec.path("item_table")
    except FeatureSpecError as exc:
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

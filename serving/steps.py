"""The repository's three steps, each one short python-backend model.py (copied from
serving/triton_models/ with its helpers, so the repository is self-contained) plus its data
and config.pbtxt: `workflow` (raw ids -> encoded ids), `model` (the run's TorchScript, on the
python backend or as merlin-systems writes it for pytorch_libtorch), `top_k` (best candidates
as raw ids with titles)."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import tritonclient.grpc.model_config_pb2 as mc

from merlin_ncf.serving import names as n
from merlin_ncf.serving.errors import ServingError
from merlin_ncf.serving.inputs import ExportInputs
from merlin_ncf.serving.repository import VERSION, tensor, write_config

SERVING = Path(__file__).resolve().parent
MODEL_SOURCES = SERVING / "triton_models"
HELPERS = (MODEL_SOURCES / "common.py", SERVING / "names.py")


def _python_model(model_dir: Path, source: Path, *helpers: Path) -> Path:
    version_dir = model_dir / VERSION
    version_dir.mkdir(parents=True)
    for path in (source, *HELPERS, *helpers):
        shutil.copy2(path, version_dir / path.name)
    return version_dir


def _cpu_instances(count: int) -> list[mc.ModelInstanceGroup]:
    return [mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=count)]


def set_parameters(config: mc.ModelConfig, **values) -> None:
    for key, value in values.items():
        config.parameters[key].string_value = str(value)


def describe_scores(config: mc.ModelConfig, inputs: ExportInputs) -> None:
    """What `score` means, readable from the config by clients (RecommenderClient.score_kind)."""
    set_parameters(config, **{n.SCORE_KIND: inputs.run.score_kind, n.MODEL_NAME: inputs.run.name})


def write_workflow_step(repo: Path, inputs: ExportInputs, unknown_ids: str, instances: int, default_k: int,
                        exclude_seen: bool) -> None:
    from merlin_ncf.serving.history import seen_items

    version_dir = _python_model(repo / n.WORKFLOW_STEP, MODEL_SOURCES / "workflow" / "model.py",
                                SERVING / "inference_workflow.py")
    shutil.copytree(inputs.workflow_dir, version_dir / "workflow")
    if exclude_seen:
        seen_items(inputs.spec).save(version_dir / n.SEEN_FILE)
    config = mc.ModelConfig(name=n.WORKFLOW_STEP, backend="python", instance_group=_cpu_instances(instances))
    config.input.extend([
        tensor(mc.ModelInput, inputs.user, inputs.raw_type(inputs.user)),
        tensor(mc.ModelInput, inputs.item, inputs.raw_type(inputs.item), optional=True),
        # top_k passes through here because Triton only leaves out an absent optional input
        # for a step fed by the ensemble's inputs alone; this step fills in the default.
        tensor(mc.ModelInput, n.TOP_K, mc.TYPE_INT32, dims=(1,), optional=True),
    ])
    config.output.extend([
        tensor(mc.ModelOutput, inputs.user, mc.TYPE_INT64),
        tensor(mc.ModelOutput, inputs.item, mc.TYPE_INT64),
        tensor(mc.ModelOutput, n.CANDIDATE_ID, inputs.raw_type(inputs.item)),
        tensor(mc.ModelOutput, n.TOP_K, mc.TYPE_INT32, dims=(1,)),
    ])
    set_parameters(config, **{n.USER_COLUMN: inputs.user, n.ITEM_COLUMN: inputs.item,
                              n.FIRST_INDEX: inputs.spec.first_item_index, n.UNKNOWN_IDS: unknown_ids,
                              n.DEFAULT_K: default_k})
    write_config(repo / n.WORKFLOW_STEP, config)


def write_python_model_step(repo: Path, inputs: ExportInputs, instances: int, catalogue=None) -> None:
    """`catalogue`: the run's serving/catalogue.py module (every item for one user), if its family has one."""
    import torch

    version_dir = _python_model(repo / n.MODEL_STEP, MODEL_SOURCES / "model" / "model.py")
    torch.jit.save(inputs.model, str(version_dir / "model.pt"))
    config = mc.ModelConfig(name=n.MODEL_STEP, backend="python", instance_group=_cpu_instances(instances))
    config.input.extend([tensor(mc.ModelInput, inputs.user, mc.TYPE_INT64), tensor(mc.ModelInput, inputs.item, mc.TYPE_INT64)])
    config.output.append(tensor(mc.ModelOutput, n.SCORE, mc.TYPE_FP32))
    set_parameters(config, **{n.USER_COLUMN: inputs.user, n.ITEM_COLUMN: inputs.item, n.TORCH_THREADS: 1})
    if catalogue is not None:
        torch.jit.save(catalogue, str(version_dir / n.CATALOGUE_FILE))
    describe_scores(config, inputs)
    write_config(repo / n.MODEL_STEP, config)


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
    output_schema = Schema([ColumnSchema(n.SCORE, dtype=np.float32)])
    op = PredictPyTorchTriton(PredictPyTorch(inputs.model, input_schema, output_schema))
    with tempfile.TemporaryDirectory(dir=repo) as scratch:
        config = op.export(scratch, input_schema, output_schema, version=int(VERSION))
        shutil.move(Path(scratch) / config.name, repo / n.MODEL_STEP)
    config.name = n.MODEL_STEP
    describe_scores(config, inputs)
    write_config(repo / n.MODEL_STEP, config)


def write_top_k_step(repo: Path, inputs: ExportInputs) -> None:
    import pandas as pd

    version_dir = _python_model(repo / n.TOP_K_STEP, MODEL_SOURCES / "top_k" / "model.py", MODEL_SOURCES / "ranking.py")
    items = pd.read_parquet(inputs.items_table)
    if "raw_item_id" not in items.columns:
        raise ServingError(f"{inputs.items_table} has no raw_item_id column")
    titles = items["title"] if "title" in items.columns else pd.Series("", index=items.index)
    pd.DataFrame({"raw_item_id": items["raw_item_id"], "title": titles.fillna("").astype(str)}).to_parquet(
        version_dir / n.ITEMS_FILE, index=False
    )
    config = mc.ModelConfig(name=n.TOP_K_STEP, backend="python", instance_group=_cpu_instances(1))
    config.input.extend([
        tensor(mc.ModelInput, n.CANDIDATE_ID, inputs.raw_type(inputs.item)),
        tensor(mc.ModelInput, n.SCORE, mc.TYPE_FP32),
        tensor(mc.ModelInput, n.TOP_K, mc.TYPE_INT32, dims=(1,)),
    ])
    config.output.extend([
        tensor(mc.ModelOutput, n.ITEM_ID, inputs.raw_type(inputs.item)),
        tensor(mc.ModelOutput, n.SCORE, mc.TYPE_FP32),
        tensor(mc.ModelOutput, n.TITLE, mc.TYPE_STRING),
    ])
    write_config(repo / n.TOP_K_STEP, config)

"""Triton model configurations: write them, and check a repository the way Triton would.

Every config.pbtxt must parse as Triton's ModelConfig protobuf (the one tritonclient ships),
name its own directory, have its model file, and every ensemble must be wired consistently:
each step's model exists, its inputs come from the ensemble's inputs or an earlier step's
outputs with the same data type, and every ensemble output is produced by some step.
"""

from __future__ import annotations

from pathlib import Path

import tritonclient.grpc.model_config_pb2 as mc
from google.protobuf import text_format

from merlin_ncf.serving.errors import ServingError

CONFIG = "config.pbtxt"
VERSION = "1"
MODEL_FILES = {"python": "model.py", "pytorch_libtorch": "model.pt"}


def tensor(cls, name: str, data_type: int, dims=(-1,), optional: bool = False):
    spec = cls(name=name, data_type=data_type, dims=list(dims))
    if optional:
        spec.optional = True
    return spec


def write_config(model_dir: Path, config: mc.ModelConfig) -> None:
    # Even an ensemble needs a version directory, or Triton finds no version to load.
    (model_dir / VERSION).mkdir(parents=True, exist_ok=True)
    (model_dir / CONFIG).write_text(text_format.MessageToString(config))


def read_config(path: Path) -> mc.ModelConfig:
    try:
        return text_format.Parse(path.read_text(), mc.ModelConfig())
    except text_format.ParseError as exc:
        raise ServingError(f"{path} is not a valid Triton ModelConfig: {exc}") from None


def kind(config: mc.ModelConfig) -> str:
    """'ensemble', 'python' or 'pytorch_libtorch' (what decides which file the model needs)."""
    if config.platform == "ensemble":
        return "ensemble"
    if config.platform == "pytorch_libtorch" or config.backend == "pytorch":
        return "pytorch_libtorch"
    return config.backend or config.platform


def validate_repository(repository: Path) -> dict[str, mc.ModelConfig]:
    """Parse and cross-check every model of `repository`; a ServingError names the first flaw."""
    configs = {}
    for model_dir in sorted(p for p in repository.iterdir() if p.is_dir()):
        path = model_dir / CONFIG
        if not path.is_file():
            raise ServingError(f"{model_dir} has no {CONFIG}")
        config = read_config(path)
        if config.name != model_dir.name:
            raise ServingError(f"{path} names the model {config.name!r}, but its directory is {model_dir.name!r}")
        configs[config.name] = config
    if not configs:
        raise ServingError(f"{repository} holds no model")
    for name, config in configs.items():
        if not (repository / name / VERSION).is_dir():
            raise ServingError(f"model {name!r} has no version directory {repository / name / VERSION}")
        model_kind = kind(config)
        if model_kind == "ensemble":
            _check_ensemble(config, configs)
        elif model_kind in MODEL_FILES:
            model_file = repository / name / VERSION / MODEL_FILES[model_kind]
            if not model_file.is_file():
                raise ServingError(f"model {name!r} ({model_kind}) lacks {model_file}")
        else:
            raise ServingError(f"model {name!r} uses backend {config.backend or config.platform!r}, which export never writes")
        for spec in list(config.input) + list(config.output):
            if spec.data_type == mc.TYPE_INVALID:
                raise ServingError(f"model {name!r}: tensor {spec.name!r} has no data type")
    return configs


def _check_ensemble(ensemble: mc.ModelConfig, configs: dict[str, mc.ModelConfig]) -> None:
    where = f"ensemble {ensemble.name!r}"
    steps = ensemble.ensemble_scheduling.step
    if not steps:
        raise ServingError(f"{where} has no step")
    available = {spec.name: spec.data_type for spec in ensemble.input}
    for step in steps:
        model = configs.get(step.model_name)
        if model is None:
            raise ServingError(f"{where} calls model {step.model_name!r}, absent from the repository")
        inputs = {spec.name: spec for spec in model.input}
        outputs = {spec.name: spec.data_type for spec in model.output}
        for model_input, source in step.input_map.items():
            if model_input not in inputs:
                raise ServingError(f"{where}: {step.model_name!r} has no input {model_input!r}")
            if source not in available:
                raise ServingError(f"{where}: {step.model_name!r} input {model_input!r} reads {source!r}, produced by no earlier step")
            if available[source] != inputs[model_input].data_type:
                raise ServingError(f"{where}: {source!r} feeds {step.model_name!r}.{model_input} with a different data type")
        unmapped = [n for n, spec in inputs.items() if n not in step.input_map and not spec.optional]
        if unmapped:
            raise ServingError(f"{where}: required inputs {unmapped} of {step.model_name!r} are not mapped")
        for model_output, target in step.output_map.items():
            if model_output not in outputs:
                raise ServingError(f"{where}: {step.model_name!r} has no output {model_output!r}")
            if target in available:
                raise ServingError(f"{where}: {step.model_name!r} output {model_output!r} overwrites tensor {target!r}")
            available[target] = outputs[model_output]
    consumed = {source for step in steps for source in step.input_map.values()} | {s.name for s in ensemble.output}
    unused = [name for name in available if name not in consumed]
    if unused:
        raise ServingError(f"{where}: tensors {unused} are produced but never used (Triton rejects that)")
    for spec in ensemble.output:
        if spec.name not in available:
            raise ServingError(f"{where}: output {spec.name!r} is produced by no step")
        if available[spec.name] != spec.data_type:
            raise ServingError(f"{where}: output {spec.name!r} has a different data type than the step producing it")

"""The repository's two ensembles: `scores` = workflow -> model, `recommend` = workflow ->
model -> top_k. Both say in their parameters what `score` means (steps.describe_scores)."""

from __future__ import annotations

from pathlib import Path

import tritonclient.grpc.model_config_pb2 as mc

from merlin_ncf.serving import names as n
from merlin_ncf.serving.inputs import ExportInputs
from merlin_ncf.serving.repository import tensor, write_config
from merlin_ncf.serving.steps import describe_scores


def _step(model: str, input_map: dict[str, str], output_map: dict[str, str]):
    return mc.ModelEnsembling.Step(model_name=model, model_version=-1, input_map=input_map, output_map=output_map)


def _encode_and_score_steps(user: str, item: str, recommend: bool) -> list:
    # Triton rejects an ensemble with a step output nobody reads: map only what is used.
    inputs, outputs = {user: user, item: item}, {user: "encoded_user", item: "encoded_item"}
    if recommend:
        inputs[n.TOP_K] = n.TOP_K
        outputs.update({n.CANDIDATE_ID: n.CANDIDATE_ID, n.TOP_K: "requested_k"})
    return [
        _step(n.WORKFLOW_STEP, inputs, outputs),
        _step(n.MODEL_STEP, {user: "encoded_user", item: "encoded_item"}, {n.SCORE: "candidate_score"}),
    ]


def write_scores_ensemble(repo: Path, inputs: ExportInputs) -> None:
    user, item = inputs.user, inputs.item
    config = mc.ModelConfig(name=n.SCORES_ENSEMBLE, platform="ensemble")
    config.input.extend([tensor(mc.ModelInput, user, inputs.raw_type(user)),
                         tensor(mc.ModelInput, item, inputs.raw_type(item))])
    config.output.append(tensor(mc.ModelOutput, n.SCORE, mc.TYPE_FP32))
    steps = _encode_and_score_steps(user, item, recommend=False)
    steps[-1].output_map[n.SCORE] = n.SCORE
    config.ensemble_scheduling.step.extend(steps)
    describe_scores(config, inputs)
    write_config(repo / n.SCORES_ENSEMBLE, config)


def write_recommend_ensemble(repo: Path, inputs: ExportInputs) -> None:
    user, item = inputs.user, inputs.item
    config = mc.ModelConfig(name=n.RECOMMEND_ENSEMBLE, platform="ensemble")
    config.input.extend([
        tensor(mc.ModelInput, user, inputs.raw_type(user)),
        tensor(mc.ModelInput, item, inputs.raw_type(item), optional=True),
        tensor(mc.ModelInput, n.TOP_K, mc.TYPE_INT32, dims=(1,), optional=True),
    ])
    config.output.extend([
        tensor(mc.ModelOutput, n.TOP_ITEM_ID, inputs.raw_type(item)),
        tensor(mc.ModelOutput, n.TOP_SCORE, mc.TYPE_FP32),
        tensor(mc.ModelOutput, n.TOP_TITLE, mc.TYPE_STRING),
    ])
    steps = _encode_and_score_steps(user, item, recommend=True)
    # Ensemble tensors share one namespace with its inputs: the ranked ids need their own name.
    steps.append(_step(n.TOP_K_STEP, {n.CANDIDATE_ID: n.CANDIDATE_ID, n.SCORE: "candidate_score", n.TOP_K: "requested_k"},
                       {n.ITEM_ID: n.TOP_ITEM_ID, n.SCORE: n.TOP_SCORE, n.TITLE: n.TOP_TITLE}))
    config.ensemble_scheduling.step.extend(steps)
    describe_scores(config, inputs)
    write_config(repo / n.RECOMMEND_ENSEMBLE, config)

"""Request/response plumbing shared by the python-backend models (copied next to each model.py)."""

from __future__ import annotations

import json
import traceback

import numpy as np
import triton_python_backend_utils as pb_utils


def parameters(args: dict) -> dict[str, str]:
    """The string parameters of the model's config.pbtxt."""
    config = json.loads(args["model_config"])
    return {name: value["string_value"] for name, value in config.get("parameters", {}).items()}


def input_array(request, name: str, required: bool = True) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        if required:
            raise ValueError(f"missing input {name!r}")
        return None
    return tensor.as_numpy()


def answer_each(requests, respond, expected_errors: tuple[type[Exception], ...]) -> list:
    """One response per request; a failing request gets an error response, the model keeps serving."""
    responses = []
    for request in requests:
        try:
            outputs = respond(request)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(name, array) for name, array in outputs.items()]))
        except expected_errors as exc:
            responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
        except Exception as exc:  # a bug must not take the model down: report it to the caller
            detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
            responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"internal error: {detail}")))
    return responses

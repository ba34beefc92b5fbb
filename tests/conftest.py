"""Shared pytest fixtures. Each stage's engineer keeps a self-contained section."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# ---------------------------------------------------------------------------------------
# ETL (workflows/): seeded synthetic MovieLens data and the real ETL run on it.
# ---------------------------------------------------------------------------------------

ETL_SEED = 7
# ~30k interactions: big enough for every user to have history, small enough for 2 cores.
ETL_SIZE = dict(interactions=30_000, users=600, items=500)
ETL_NEGATIVES = 100


def run_command(script: str, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run one of the repository's commands as a user would, from a neutral working directory."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run([PYTHON, str(REPO / script), *args], capture_output=True, text=True,
                            timeout=timeout, cwd=REPO.parent, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="session")
def raw_dir(tmp_path_factory) -> Path:
    """A synthetic release in ml-1m format (ratings.dat, movies.dat), ~30k interactions."""
    out = tmp_path_factory.mktemp("etl") / "raw"
    run_command("workflows/synthetic.py", "--output", str(out), "--format", "ml-1m", "--seed", str(ETL_SEED),
                "--interactions", str(ETL_SIZE["interactions"]), "--users", str(ETL_SIZE["users"]),
                "--items", str(ETL_SIZE["items"]), "--quiet")
    return out


@pytest.fixture(scope="session")
def etl_dir(raw_dir) -> Path:
    """The real ETL (in-process, CPU) on raw_dir, validation lists by default: the layout of docs/pipeline.md."""
    out = raw_dir.parent / "etl"
    run_command("workflows/etl.py", "--input", str(raw_dir), "--output", str(out), "--device", "cpu",
                "--negatives", str(ETL_NEGATIVES), "--seed", str(ETL_SEED), "--quiet")
    return out


# ---------------------------------------------------------------------------------------
# Training (models/): a short real training run on etl_dir, for the serving tests.
# ---------------------------------------------------------------------------------------

# A small NeuMF and few epochs: a few seconds on 2 cores, yet well above random ranking.
TRAIN_ARGS = ("--factors", "16", "--mlp-layers", "32", "32", "16", "--dropout", "0.1", "--batch-size", "2000",
              "--lr", "0.01", "--epochs", "8", "--seed", "0", "--no-progress")


@pytest.fixture(scope="session")
def trained_run(etl_dir) -> Path:
    """models/train_ncf.py on etl_dir: a run directory with checkpoints/, model.ts (encoded
    user, item int64[N] -> probability float32[N]), config.json, log.jsonl, training.png."""
    out = etl_dir.parent / "run"
    run_command("models/train_ncf.py", "--data", str(etl_dir), "--output", str(out), *TRAIN_ARGS)
    return out


# ---------------------------------------------------------------------------------------
# Serving (serving/): a one-model repository that a real tritonserver loads in seconds.
# ---------------------------------------------------------------------------------------

DOUBLE_MODEL = """
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("y", 2 * pb_utils.get_input_tensor_by_name(r, "x").as_numpy())])
                for r in requests]
"""


def write_tiny_repository(root: Path, model_py: str = DOUBLE_MODEL) -> Path:
    """A one-model repository, `double` (x int64[N] -> y = 2x), on the python backend with numpy
    only: it starts in seconds, for the server's life cycle (start, crash, restart, stop)."""
    import tritonclient.grpc.model_config_pb2 as mc

    from merlin_ncf.serving.repository import tensor, write_config

    config = mc.ModelConfig(name="double", backend="python")
    config.input.append(tensor(mc.ModelInput, "x", mc.TYPE_INT64))
    config.output.append(tensor(mc.ModelOutput, "y", mc.TYPE_INT64))
    write_config(root / "double", config)
    (root / "double" / "1" / "model.py").write_text(model_py)
    return root


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory) -> Path:
    return write_tiny_repository(tmp_path_factory.mktemp("tiny") / "repo")


# Runs of every registered model family, for serving: small untrained models built straight
# from the registry, in the run-directory layout of docs/pipeline.md (config.json with the
# model's name/config, output and data_fingerprint; model.ts = contract.serving_module; the
# marker). They are export's input, not a stand-in for export or tritonserver.
SERVED_MODELS = {
    "neumf": dict(mf_dim=8, mlp_layers=[16, 16, 8], dropout=0.0),
    "convncf": dict(embedding_size=8, cnn_channels=[4, 4, 4], cnn_kernels=[2, 2, 2], cnn_strides=[2, 2, 2]),
    "multvae": dict(hidden=16, latent=8),
}


def write_model_run(etl: Path, name: str, out: Path):
    """Build `name` on etl's sizes (Mult-VAE with etl's training rows), save it as a run
    directory in `out`; returns the in-process model (eval mode)."""
    import json

    import pandas as pd
    import torch

    from merlin_ncf.atomic import atomic_directory
    from merlin_ncf.feature_spec import FeatureSpec
    from merlin_ncf.models.contract import serving_module
    from merlin_ncf.models.multvae import csr_rows
    from merlin_ncf.models.registry import build_model

    spec = FeatureSpec.load(etl)
    config = dict(nb_users=spec.num_users, nb_items=spec.num_items, **SERVED_MODELS[name])
    torch.manual_seed(0)
    if name == "multvae":
        pairs = pd.concat(pd.read_parquet(f, columns=[spec.user_feature, spec.item_feature]) for f in spec.files("train"))
        indptr, indices = csr_rows(pairs[spec.user_feature].to_numpy(), pairs[spec.item_feature].to_numpy(),
                                   spec.num_users, spec.num_items)
        model = build_model(name, dict(config, nnz=indices.numel()))
        model.indptr.copy_(indptr)
        model.indices.copy_(indices)
    else:
        model = build_model(name, config)
    model.eval()
    with atomic_directory(out, kind="run") as staging:
        serving_module(model).save(str(staging / "model.ts"))
        (staging / "config.json").write_text(json.dumps({
            "model": {"name": name, "config": model.config}, "output": model.output,
            "data_fingerprint": spec.fingerprint()}, indent=2))
    return model


@pytest.fixture(scope="session")
def model_runs(etl_dir) -> dict:
    """{name: (run directory, in-process model)} for neumf, convncf and multvae on etl_dir."""
    return {name: (etl_dir.parent / f"run-{name}", write_model_run(etl_dir, name, etl_dir.parent / f"run-{name}"))
            for name in SERVED_MODELS}

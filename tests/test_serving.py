"""Serving: the exported ensemble on a real tritonserver (127.0.0.1, free ports) against the
in-process workflow + TorchScript; bad requests; the libtorch repository; export's CLI errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from merlin_ncf.serving.client import RecommenderClient
from merlin_ncf.serving.errors import ServingError
from merlin_ncf.serving.export import export
from merlin_ncf.serving.repository import read_config, validate_repository
from merlin_ncf.serving.serve import TritonServer
from conftest import write_tiny_repository

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
pytestmark = pytest.mark.slow


# --- inputs: the shared ETL output and training run (tests/conftest.py) ----------------------------


class _DotModel(torch.nn.Module):
    """forward(user, item) -> probability, the TorchScript contract of docs/pipeline.md."""

    def __init__(self, num_users: int, num_items: int):
        super().__init__()
        self.users, self.items = torch.nn.Embedding(num_users, 8), torch.nn.Embedding(num_items, 8)

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((self.users(user) * self.items(item)).sum(-1))


@pytest.fixture(scope="module")
def serving_data(etl_dir, trained_run) -> tuple[Path, Path]:
    return etl_dir, trained_run


# --- the served repository ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repository(serving_data, tmp_path_factory) -> Path:
    etl, run = serving_data
    path = tmp_path_factory.mktemp("serving-repo") / "repo"
    assert export(etl, run, path, flavour="python", top_k=10, verify=True, log=lambda *_: None) == "python"
    return path


@pytest.fixture(scope="module")
def server(repository):
    with TritonServer(repository, startup_timeout_s=240) as running:
        yield running
    assert running.process.returncode == 0, running.log_tail()  # clean shutdown


@pytest.fixture(params=["http", "grpc"])
def client(request, server):
    url = server.http_url if request.param == "http" else server.grpc_url
    with RecommenderClient(url, request.param) as connected:
        yield connected


class InProcess:
    """The reference: NVTabular's Workflow.transform and the run's TorchScript, no server."""

    def __init__(self, etl: Path, run: Path):
        import nvtabular as nvt

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.workflow = nvt.Workflow.load(str(etl / "workflow"))
        self.model = torch.jit.load(str(run / "model.ts")).eval()
        items = pd.read_parquet(etl / "items.parquet")
        self.all_items = items.raw_item_id.to_numpy()
        self.titles = dict(zip(items.raw_item_id, items.title))
        users = pd.read_parquet(etl / "workflow" / "categories" / "unique.user_id.parquet")
        self.users = users.user_id.to_numpy()
        self.seen = self._interactions(etl, dict(zip(users.index, users.user_id)), dict(zip(items.item_id, items.raw_item_id)))

    @staticmethod
    def _interactions(etl: Path, raw_user: dict, raw_item: dict) -> dict[int, set[int]]:
        """Raw items of each raw user in the ETL output: training pairs and held-out positives."""
        frames = [pd.read_parquet(f) for f in sorted((etl / "train").glob("*.parquet"))]
        for split in ("validation", "test"):
            for f in sorted((etl / split).glob("*.parquet")):
                lists = pd.read_parquet(f)
                frames.append(lists[lists.label > 0])
        pairs = pd.concat(frames)
        seen: dict[int, set[int]] = {}
        for user, item in zip(pairs.user_id, pairs.item_id):
            seen.setdefault(raw_user[user], set()).add(raw_item[item])
        return seen

    def unseen_items(self, user: int) -> np.ndarray:
        return np.array([i for i in self.all_items if i not in self.seen.get(user, set())])

    def scores(self, user: int, items: np.ndarray) -> np.ndarray:
        from merlin.io import Dataset

        raw = pd.DataFrame({"user_id": np.full(len(items), user, np.int64), "item_id": np.asarray(items, np.int64)})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            encoded = self.workflow.transform(Dataset(raw)).to_ddf().compute()
        with torch.inference_mode():
            return self.model(torch.from_numpy(encoded.user_id.to_numpy()), torch.from_numpy(encoded.item_id.to_numpy())).numpy()

    def ranking(self, user: int, items: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = self.scores(user, items)
        order = np.argsort(-scores, kind="stable")[:k]
        return np.asarray(items)[order], scores[order]


@pytest.fixture(scope="module")
def reference(serving_data) -> InProcess:
    return InProcess(*serving_data)


def test_served_scores_equal_in_process_scores(client, reference):
    rng = np.random.default_rng(1)
    user = int(reference.users[3])
    items = rng.choice(reference.all_items, 101, replace=False)
    served = client.scores([user], items)
    assert served.shape == (101,) and served.dtype == np.float32
    np.testing.assert_allclose(served, reference.scores(user, items), atol=1e-5, rtol=0)
    # One user per item also works (pairs of different users).
    users = rng.choice(reference.users, 5)
    pairs = client.scores(users, items[:5])
    expected = [reference.scores(int(u), [i])[0] for u, i in zip(users, items[:5])]
    np.testing.assert_allclose(pairs, expected, atol=1e-5, rtol=0)


def test_served_top_k_equals_in_process_ranking(client, reference, repository):
    # NeuMF ranks every item through catalogue.pt (its own score_all, serving/catalogue.py), not pairs.
    assert (repository / "model" / "1" / "catalogue.pt").is_file()
    user = int(reference.users[7])
    top = client.recommend(user, top_k=10)  # among every item the user has not interacted with
    expected_items, expected_scores = reference.ranking(user, reference.unseen_items(user), 10)
    assert 0 < len(reference.seen[user]) < len(reference.all_items) - 10
    np.testing.assert_array_equal(top.item_ids, expected_items)
    np.testing.assert_allclose(top.scores, expected_scores, atol=1e-5, rtol=0)
    assert top.titles == [reference.titles[i] for i in expected_items] and all(top.titles)

    candidates = reference.all_items[::3][:101]
    among = client.recommend(user, candidates, top_k=5)
    expected_items, _ = reference.ranking(user, candidates, 5)
    np.testing.assert_array_equal(among.item_ids, expected_items)

    default_k = client.recommend(user)  # the export's --top-k
    assert len(default_k.item_ids) == 10


def _send_raw(client: RecommenderClient, arrays: dict[str, np.ndarray]) -> None:
    """A request the typed RecommenderClient would refuse to build, over the client's protocol."""
    if client.protocol == "http":
        import tritonclient.http as api
    else:
        import tritonclient.grpc as api
    inputs = []
    for name, array in arrays.items():
        tensor = api.InferInput(name, list(array.shape), {np.dtype(np.float32): "FP32"}.get(array.dtype, "INT64"))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    with api.InferenceServerClient(client.url) as raw:
        try:
            raw.infer("scores", inputs)
        except Exception as exc:
            raise ServingError(str(exc)) from None


@pytest.mark.parametrize(
    "request_kind, message",
    [
        ("unknown user", "unknown user_id"),
        ("unknown item", "unknown item_id"),
        ("empty user", "user_id is empty"),
        ("empty items", "item_id is empty"),
        ("mismatched lengths", "send one user id, or one per item id"),
        ("top_k zero", "top_k must be one integer >= 1"),
        ("float ids", "INT64"),
        ("2-d ids", "shape"),
    ],
)
def test_bad_requests_get_errors_and_server_keeps_serving(client, server, reference, request_kind, message):
    user, items = int(reference.users[0]), reference.all_items[:3]
    with pytest.raises(ServingError, match=message):
        if request_kind == "unknown user":
            client.scores([999_999_999], items)
        elif request_kind == "unknown item":
            client.recommend(user, [int(items[0]), 999_999_999])
        elif request_kind == "empty user":
            client.scores(np.zeros(0, np.int64), items)
        elif request_kind == "empty items":
            client.scores([user], np.zeros(0, np.int64))
        elif request_kind == "mismatched lengths":
            client.scores([user, user], items)
        elif request_kind == "top_k zero":  # the typed client refuses it too: send it as it is
            client._infer("recommend", {"user_id": np.array([user], np.int64), "top_k": np.array([0], np.int32)},
                          ["top_item_id"])
        else:  # requests the typed client would refuse to build: send them raw
            bad_items = items.astype(np.float32) if request_kind == "float ids" else items.reshape(1, 3)
            _send_raw(client, {"user_id": np.array([user], np.int64), "item_id": bad_items})
    # ... and the server still answers correctly.
    assert client.scores([user], items).shape == (3,)
    assert server.process.poll() is None


def test_client_cli_prints_a_table_with_titles(server, reference):
    user = int(reference.users[2])
    items = ",".join(str(i) for i in reference.all_items[:3])
    for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
        done = subprocess.run([PYTHON, "serving/client.py", "--user", str(user), "--items", items, "--protocol", protocol,
                               "--url", url], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert f"user {user}" in done.stdout and reference.titles[reference.all_items[0]][:20] in done.stdout
    bad = subprocess.run([PYTHON, "serving/client.py", "--user", "999999999", "--url", server.http_url],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "unknown user_id" in bad.stderr and "Traceback" not in bad.stderr


def test_client_cli_serve_starts_queries_and_stops_a_server(repository, reference):
    done = subprocess.run([PYTHON, "serving/client.py", "--serve", str(repository), "--user", str(reference.users[0]),
                           "--top-k", "3"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("│") >= 3 * 5 and "tritonserver stopped" in done.stderr


def test_benchmark_runs_and_reports_no_failed_request(serving_data, repository, server, tmp_path):
    etl, _ = serving_data
    plot = tmp_path / "serving.png"
    done = subprocess.run([PYTHON, "benchmarks/serving.py", "--data", str(etl), "--repository", str(repository),
                           "--grpc-url", server.grpc_url, "--requests", "16", "--concurrency", "1", "4",
                           "--protocols", "grpc", "--plot", str(plot)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    latency, steps = done.stdout.split("per-step cost")

    def rows(table: str) -> list[str]:
        return [line for line in table.splitlines() if "│" in line and ("triton" in line or "in-process" in line)]

    # (grpc, in-process: pairs, catalogue, pandas) x (candidates, all items) x (1, 4 clients)
    assert len(rows(latency)) == 4 * 2 * 2
    assert len(rows(steps)) == 2 * 2 and "load average at end" in done.stdout  # the server's steps: grpc only
    assert plot.stat().st_size > 0


# --- export -------------------------------------------------------------------------------------------


def test_libtorch_repository_is_valid_without_a_libtorch_backend(serving_data, tmp_path, reference):
    etl, run = serving_data
    repo = tmp_path / "libtorch"
    assert export(etl, run, repo, flavour="libtorch", log=lambda *_: None) == "libtorch"
    configs = validate_repository(repo)
    assert configs["model"].platform == "pytorch_libtorch" and configs["model"].backend == "pytorch"
    assert [i.name for i in configs["model"].input] == ["user_id", "item_id"]  # forward(user, item) order
    for config_path in repo.glob("*/config.pbtxt"):
        read_config(config_path)  # parses as Triton's ModelConfig protobuf
    exported = torch.jit.load(str(repo / "model" / "1" / "model.pt"))
    original = torch.jit.load(str(run / "model.ts"))
    users, items = torch.arange(3, 20), torch.arange(3, 20).flip(0)
    torch.testing.assert_close(exported(users, items), original(users, items), atol=1e-6, rtol=0)
    # ... and like the checkpoint it came from (the best epoch's weights, in eval mode).
    from merlin_ncf.models.checkpoint import load
    from merlin_ncf.models.registry import model_from

    checkpoint = model_from(load(run / "checkpoints" / "best.pt")).eval()
    with torch.inference_mode():
        torch.testing.assert_close(exported(users, items), torch.sigmoid(checkpoint(users, items).float()), atol=1e-5, rtol=0)


def _export_cli(*args: str) -> tuple[int, str]:
    """export.py's command line run in this process (same code path, no interpreter start-up)."""
    import contextlib
    import io

    from merlin_ncf.errors import run_cli
    from merlin_ncf.serving.export import main

    stderr = io.StringIO()
    with pytest.raises(SystemExit) as exited, contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        run_cli(lambda: main(list(args)))
    return exited.value.code, stderr.getvalue()


def _run_of(etl: Path, run: Path, to: Path) -> Path:
    """A copy of `run` (no checkpoints) that records the fingerprint of `etl`, as current runs do."""
    from merlin_ncf.feature_spec import FeatureSpec

    shutil.copytree(run, to, ignore=shutil.ignore_patterns("checkpoints"))
    config = json.loads((to / "config.json").read_text())
    config["data_fingerprint"] = FeatureSpec.load(etl).fingerprint()
    (to / "config.json").write_text(json.dumps(config))
    return to


def test_export_cli_rejects_bad_input_with_one_line_and_writes_nothing(serving_data, tmp_path):
    etl, run = serving_data
    too_small = tmp_path / "small-run"  # its config.json claims this ETL output's sizes; model.ts has 4 rows
    _run_of(etl, run, too_small)
    torch.jit.script(_DotModel(4, 4)).save(str(too_small / "model.ts"))
    garbage = _run_of(etl, run, tmp_path / "garbage-run")
    empty_run = tmp_path / "empty-run"
    empty_run.mkdir()
    (garbage / "model.ts").write_text("not a model")
    broken_etl = tmp_path / "broken-etl"
    shutil.copytree(etl, broken_etl)
    (broken_etl / "workflow" / "workflow.pkl").write_bytes(b"not a pickle")
    # Runs that record their data's fingerprint: no warning line beside the error.
    good, broken_etl_run = _run_of(etl, run, tmp_path / "good-run"), _run_of(broken_etl, run, tmp_path / "broken-etl-run")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("not ours")
    cases = [
        (["--data", str(tmp_path / "nowhere"), "--run", str(run)], "not found"),
        (["--data", str(etl), "--run", str(empty_run)], "model.ts not found"),
        (["--data", str(etl), "--run", str(garbage)], "not a loadable TorchScript module"),
        (["--data", str(broken_etl), "--run", str(broken_etl_run)], "cannot load the NVTabular workflow"),
        (["--data", str(etl), "--run", str(good), "--top-k", "-1"], "--top-k must be >= 0"),
        # Its model.ts is not the neumf its config.json names: an error, not a silent fall-back to pairs.
        (["--data", str(etl), "--run", str(too_small), "--flavour", "python"],
         "model.ts does not hold the neumf model its config.json describes"),
        (["--data", str(etl), "--run", str(good), "--flavour", "libtorch", "--verify"], "has no pytorch backend"),
    ]
    output = tmp_path / "repo"
    for args, message in cases:
        code, stderr = _export_cli(*args, "--output", str(output))
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and message in lines[0], (args, stderr)
        assert not output.exists()
    code, stderr = _export_cli("--data", str(etl), "--run", str(run), "--output", str(existing))
    assert code == 2 and "--overwrite" in stderr and [p.name for p in existing.iterdir()] == ["notes.txt"]
    # One case as a real process: the failure comes after the repository was half built.
    done = subprocess.run([PYTHON, "serving/export.py", "--data", str(etl), "--run", str(too_small), "--output", str(output),
                           "--flavour", "libtorch"],  # no catalogue.pt: the pair check finds it
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "cannot score this ETL output's ids" in done.stderr, done.stderr
    assert not output.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    for copy in (broken_etl, too_small, good, broken_etl_run, garbage):
        shutil.rmtree(copy)


def test_validation_rejects_what_triton_would_reject(repository, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(repository, broken)
    config = broken / "recommend" / "config.pbtxt"
    config.write_text(config.read_text().replace('model_name: "top_k"', 'model_name: "missing"'))
    with pytest.raises(ServingError, match="absent from the repository"):
        validate_repository(broken)
    config.write_text("name: 'recommend' this is not protobuf")
    with pytest.raises(ServingError, match="not a valid Triton ModelConfig"):
        validate_repository(broken)


def test_unknown_ids_fallback_scores_them_as_oov(repository, reference):
    from merlin_ncf.serving.inference_workflow import InferenceWorkflow, RequestEncoder, RequestError

    workflow = InferenceWorkflow(repository / "workflow" / "1" / "workflow")
    items = np.r_[reference.all_items[:2], 999_999_999]
    users, encoded, raw = RequestEncoder(workflow, "user_id", "item_id", 3, "oov").encode([int(reference.users[0])], items)
    assert encoded[-1] == 2 and (encoded[:2] >= 3).all() and (raw == items).all() and (users >= 3).all()
    with pytest.raises(RequestError, match="unknown item_id"):
        RequestEncoder(workflow, "user_id", "item_id", 3, "error").encode([int(reference.users[0])], items)


# --- serve.py --------------------------------------------------------------------------------------------


def test_serve_cli_serves_until_sigterm_then_stops_cleanly(tmp_path):
    import tritonclient.http as http

    repository = write_tiny_repository(tmp_path / "repo")
    ready = tmp_path / "ready.json"
    process = subprocess.Popen(
        [PYTHON, "serving/serve.py", "--repository", str(repository), "--http-port", "0", "--grpc-port", "0",
         "--metrics-port", "0", "--ready-file", str(ready)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "serve.py never became ready"
            time.sleep(0.2)
        urls = json.loads(ready.read_text())
        assert urls["http"].startswith("127.0.0.1:")
        with http.InferenceServerClient(urls["http"]) as client:
            x = http.InferInput("x", [3], "INT64")
            x.set_data_from_numpy(np.array([1, 2, 3], np.int64))
            assert client.infer("double", [x]).as_numpy("y").tolist() == [2, 4, 6]
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert "successfully loaded 'double'" in out  # the server's log is forwarded
    assert "stopping tritonserver" in out and not ready.exists()


def test_server_that_fails_to_load_reports_the_error_at_once(tmp_path):
    broken = write_tiny_repository(tmp_path / "repo", "raise ImportError('deliberately broken model')\n")
    started = time.monotonic()
    with pytest.raises(ServingError, match="deliberately broken model"):
        TritonServer(broken, startup_timeout_s=120).start()
    assert time.monotonic() - started < 60
    done = subprocess.run([PYTHON, "serving/serve.py", "--repository", str(broken), "--http-port", "0",
                           "--grpc-port", "0", "--metrics-port", "0", "--quiet"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "deliberately broken model" in done.stderr and done.stderr.count("\n") == 1


def test_auto_flavour_follows_the_backends_of_the_server_found(tmp_path, monkeypatch):
    from merlin_ncf.serving.export import resolve_flavour
    from merlin_ncf.serving.server_runtime import find_tritonserver

    bundled = find_tritonserver()
    assert bundled.bundled and bundled.supports("python") and not bundled.supports("pytorch")
    assert resolve_flavour("auto") == "python"
    # An NGC-style install on PATH: bin/tritonserver beside backends/{python,pytorch}.
    (tmp_path / "bin").mkdir()
    binary = tmp_path / "bin" / "tritonserver"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    for backend in ("python", "pytorch"):
        (tmp_path / "backends" / backend).mkdir(parents=True)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    assert not find_tritonserver().bundled
    assert resolve_flavour("auto") == "libtorch"


def test_soak_survives_an_injected_crash_with_every_good_request_answered(serving_data, repository, tmp_path):
    """benchmarks/soak.py, briefly: good and bad clients while the crashing request aborts the
    server; serve.py restarts it and the good clients' retries carry them across."""
    etl, _ = serving_data
    plot = tmp_path / "soak.png"
    done = subprocess.run([PYTHON, "benchmarks/soak.py", "--data", str(etl), "--repository", str(repository),
                           "--duration", "12", "--clients", "4", "--bad-clients", "1", "--crash-at", "3",
                           "--retry-for", "120", "--plot", str(plot)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in done.stdout.splitlines() if line.count("│") == 3}
    assert rows["good success rate"] == "100.000 %" and rows["bad rejection rate"] == "100.000 %", done.stdout
    assert rows["server restarts"] == "1", done.stdout
    assert "restart 1 in" in done.stdout and plot.stat().st_size > 0

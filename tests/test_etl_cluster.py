"""One process and a real 2-worker Dask LocalCluster on 127.0.0.1 write identical output."""

import pytest

from conftest import ETL_NEGATIVES, ETL_SEED, run_command


@pytest.mark.slow
def test_two_worker_local_cluster_matches_single_process(raw_dir, etl_dir, tmp_path):
    out = tmp_path / "cluster"
    run_command("workflows/etl.py", "--input", str(raw_dir), "--output", str(out), "--validation",
                "--device", "cpu", "--workers", "2", "--negatives", str(ETL_NEGATIVES), "--seed", str(ETL_SEED),
                "--quiet", timeout=600)
    single = sorted(p.relative_to(etl_dir) for p in etl_dir.rglob("*.parquet"))
    clustered = sorted(p.relative_to(out) for p in out.rglob("*.parquet"))
    assert single == clustered and len(single) >= 6
    for relative in single:
        assert (out / relative).read_bytes() == (etl_dir / relative).read_bytes(), relative
    assert (out / "feature_spec.yaml").read_text() == (etl_dir / "feature_spec.yaml").read_text()


def test_existing_scheduler_address_is_used(raw_dir, tmp_path):
    """--scheduler-address: the ETL runs on a cluster it did not start (one tcp worker in this process)."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp", host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        result = run_command("workflows/etl.py", "--input", str(raw_dir), "--output", str(tmp_path / "etl"),
                             "--scheduler-address", cluster.scheduler_address, "--device", "cpu", "--quiet")
        assert result.returncode == 0
        assert client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter) > 0


def test_unreachable_scheduler_is_one_line_error(raw_dir, tmp_path):
    result = run_command("workflows/etl.py", "--input", str(raw_dir), "--output", str(tmp_path / "etl"),
                         "--scheduler-address", "tcp://127.0.0.1:9", "--device", "cpu", "--quiet", check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "cannot reach the Dask scheduler" in result.stderr and not (tmp_path / "etl").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("workflows.cluster").cluster.gpu_available(), reason="needs a CUDA GPU and cuDF")
def test_gpu_run_matches_cpu_run(raw_dir, etl_dir, tmp_path):
    """cuDF + dask-cuda (one LocalCUDACluster worker) filter, encode and split like pandas."""
    import pandas as pd

    from merlin_ncf.feature_spec import FeatureSpec

    out = tmp_path / "gpu"
    run_command("workflows/etl.py", "--input", str(raw_dir), "--output", str(out), "--validation",
                "--device", "gpu", "--workers", "1", "--negatives", str(ETL_NEGATIVES), "--seed", str(ETL_SEED),
                "--quiet", timeout=600)
    gpu, cpu = FeatureSpec.load(out), FeatureSpec.load(etl_dir)
    assert (gpu.num_users, gpu.num_items) == (cpu.num_users, cpu.num_items)

    def raw_pairs(spec, mapping, positives_only=False):
        """Rows with raw ids: equal-frequency ids may be indexed differently on each device."""
        frame = pd.concat(map(pd.read_parquet, spec.files(mapping)), ignore_index=True)
        if positives_only:
            frame = frame[frame["label"] == 1]
        for column in ("user_id", "item_id"):
            vocabulary = pd.read_parquet(spec.path("workflow") / "categories" / f"unique.{column}.parquet")[column]
            frame[column] = vocabulary.loc[frame[column]].to_numpy()
        return frame[["user_id", "item_id"]].sort_values(["user_id", "item_id"], ignore_index=True)

    pd.testing.assert_frame_equal(raw_pairs(gpu, "train"), raw_pairs(cpu, "train"))
    for mapping in ("test", "validation"):  # negatives come from cupy's generator, not numpy's
        pd.testing.assert_frame_equal(raw_pairs(gpu, mapping, True), raw_pairs(cpu, mapping, True))


LISTEN_PROBE = """
import sys, psutil, urllib.error, urllib.request
from merlin_ncf.workflows.cluster import dask_client

def listening():
    procs = [psutil.Process()] + psutil.Process().children(recursive=True)
    return sorted({(c.laddr.ip, p.pid) for p in procs for c in p.connections(kind="inet")
                   if c.status == psutil.CONN_LISTEN})

if __name__ == "__main__":
    dashboard = sys.argv[1] if len(sys.argv) > 1 else None
    with dask_client("cpu", 2, dashboard=dashboard) as client:
        sockets = listening()
        print("workers", len(client.scheduler_info()["workers"]))
        print("hosts", sorted({ip for ip, _ in sockets}))
        port = client.scheduler_info()["services"]["dashboard"]  # the HTTP server, dashboard or not
        try:
            status = urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=30).status
        except urllib.error.HTTPError as exc:
            status = exc.code
        print("status", status)
"""


@pytest.mark.slow
@pytest.mark.parametrize("dashboard", [None, "127.0.0.1:0"])
def test_local_cluster_listens_on_loopback_only(tmp_path, dashboard):
    """--workers N: scheduler, nannies, workers and their HTTP servers bind 127.0.0.1 only;
    the scheduler's dashboard exists only when asked for (--dashboard)."""
    import subprocess
    import sys
    from pathlib import Path

    probe = tmp_path / "probe.py"
    probe.write_text(LISTEN_PROBE)
    result = subprocess.run([sys.executable, str(probe), *([dashboard] if dashboard else [])], capture_output=True,
                            text=True, timeout=180, cwd=Path(__file__).parents[1],
                            env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert result.returncode == 0, result.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert lines["workers"] == "2"
    assert eval(lines["hosts"]) == ["127.0.0.1"], lines["hosts"]
    assert lines["status"] == ("200" if dashboard else "404")

"""Device choice and the Dask cluster the ETL runs on.

CPU: pandas + dask.distributed LocalCluster; GPU: cuDF + dask-cuda LocalCUDACluster.
GPU libraries are imported only when the GPU is asked for (or probed by --device auto).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Iterator

from merlin_ncf.errors import EtlError
from merlin_ncf.merlin_warnings import quiet_merlin  # noqa: F401 - the ETL modules' entry point

DEVICES = ("auto", "gpu", "cpu")
LOOPBACK_ANY_PORT = "127.0.0.1:0"
DEFAULT_DASHBOARD = "127.0.0.1:8787"


def gpu_available() -> bool:
    try:
        importlib.import_module("cudf")
        from numba import cuda

        return bool(cuda.is_available() and len(cuda.gpus) > 0)
    except Exception:  # noqa: BLE001 - any failure to load the GPU stack means "no GPU"
        return False


def resolve_device(device: str) -> str:
    if device not in DEVICES:
        raise EtlError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "auto":
        return "gpu" if gpu_available() else "cpu"
    if device == "gpu" and not gpu_available():
        raise EtlError("--device gpu needs a CUDA GPU with cuDF installed (see conda-env.yml); none found")
    return device


@dataclass(frozen=True)
class Backend:
    """The dataframe and array libraries of one device, so the ETL has a single code path."""

    device: str

    @property
    def gpu(self) -> bool:
        return self.device == "gpu"

    @property
    def df(self) -> ModuleType:
        return importlib.import_module("cudf" if self.gpu else "pandas")

    @property
    def dd(self) -> ModuleType:
        return importlib.import_module("dask_cudf" if self.gpu else "dask.dataframe")

    @property
    def xp(self) -> ModuleType:
        return importlib.import_module("cupy" if self.gpu else "numpy")

    def to_numpy(self, array):
        return array.get() if self.gpu else array


@contextlib.contextmanager
def dask_client(device: str, workers: int = 0, scheduler_address: str | None = None,
                memory_limit: str | None = "auto", dashboard: str | None = None) -> Iterator[object | None]:
    """Yield a distributed Client (or None to run in-process) and tear down what we started.

    workers == 0 and no scheduler address: no cluster, Dask's in-process scheduler. A local
    cluster listens on 127.0.0.1 only; its dashboard runs only at a given `dashboard` address.
    """
    if not scheduler_address and workers <= 0:
        yield None
        return
    from distributed import Client

    logging.getLogger("distributed").setLevel(logging.ERROR)
    if scheduler_address:
        try:
            client = Client(scheduler_address, timeout="5s")
        except (OSError, TimeoutError) as exc:
            raise EtlError(f"cannot reach the Dask scheduler at {scheduler_address}: {exc}") from None
        with client:
            yield client
        return
    # Every Dask node runs an HTTP server (health, metrics) even without a dashboard, on all
    # interfaces unless given an address: pin each to the loopback interface.
    loopback = dict(host="127.0.0.1", worker_dashboard_address=LOOPBACK_ANY_PORT, silence_logs=logging.ERROR,
                    scheduler_kwargs={"dashboard": dashboard is not None,
                                      "dashboard_address": dashboard or LOOPBACK_ANY_PORT})
    if device == "gpu":
        from dask_cuda import LocalCUDACluster

        cluster = LocalCUDACluster(n_workers=workers, **loopback)
    else:
        from distributed import LocalCluster

        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               memory_limit=memory_limit, **loopback)
    with cluster, Client(cluster) as client:
        client.run(quiet_merlin)  # the workers are fresh processes with default warning filters
        yield client

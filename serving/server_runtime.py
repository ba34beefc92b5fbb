"""Find a tritonserver binary and the backends it can load, and prepare what it needs to run.

Two installations are recognised: a `tritonserver` on PATH (the NGC container, whose
backends live next to its `bin/`), or the one bundled in the `nvidia-pytriton` wheel
(python backend only). The bundled python backend needs the stub built for the running
Python next to `libtriton_python.so`; that directory is assembled once in a user cache
directory, so the installed wheel is never modified.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

from serving.errors import ServingError

PYTHON_BACKEND = "python"
LIBTORCH_BACKEND = "pytorch"
_PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
_STUB = "triton_python_backend_stub"


@dataclass(frozen=True)
class TritonInstallation:
    binary: Path
    backend_dir: Path
    bundled: bool
    library_dirs: tuple[Path, ...] = ()  # what the binary and its backend stubs link against

    @property
    def backends(self) -> frozenset[str]:
        """Names of the backends this server can load (sub-directories of its backend dir)."""
        if not self.backend_dir.is_dir():
            return frozenset()
        return frozenset(p.name for p in self.backend_dir.iterdir() if p.is_dir())

    def supports(self, backend: str) -> bool:
        return backend in self.backends


def find_tritonserver() -> TritonInstallation:
    """The `tritonserver` on PATH if there is one (NGC container), else the pytriton wheel's."""
    on_path = shutil.which("tritonserver")
    if on_path:
        binary = Path(on_path).resolve()
        return TritonInstallation(binary, binary.parent.parent / "backends", bundled=False)
    bundle = _pytriton_bundle()
    return TritonInstallation(
        bundle / "bin" / "tritonserver",
        _bundled_backend_dir(bundle),
        bundled=True,
        # The stub copied out of the wheel no longer finds the wheel's libraries by rpath.
        library_dirs=(bundle.parent.parent / "nvidia_pytriton.libs",),
    )


def _pytriton_bundle() -> Path:
    try:
        import pytriton
    except ImportError:
        raise ServingError(
            "no tritonserver on PATH and the nvidia-pytriton wheel is not installed "
            "(pip install nvidia-pytriton==0.7.0, or run inside the NGC Triton container)"
        ) from None
    bundle = Path(pytriton.__file__).parent / "tritonserver"
    if not (bundle / "bin" / "tritonserver").is_file():
        raise ServingError(f"the nvidia-pytriton wheel has no tritonserver binary under {bundle}")
    return bundle


def _bundled_backend_dir(bundle: Path) -> Path:
    """A backend directory holding the wheel's python backend plus this Python's stub."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = bundle / "python_backend_stubs" / version / _STUB
    if not stub.is_file():
        raise ServingError(f"the bundled python backend has no stub for Python {version} ({stub})")
    cache = _writable_cache_dir()
    target = cache / f"triton-backends-py{version}-{_fingerprint(bundle)}"
    if (target / PYTHON_BACKEND / _STUB).is_file():
        return target
    # Build aside and rename, so concurrent first runs never see a half-copied backend.
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=".backends-"))
    backend = staging / PYTHON_BACKEND
    backend.mkdir()
    for name in _PYTHON_BACKEND_FILES:
        shutil.copy2(bundle / "backends" / PYTHON_BACKEND / name, backend / name)
    shutil.copy2(stub, backend / _STUB)
    try:
        os.rename(staging, target)
    except OSError:  # another process got there first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _writable_cache_dir() -> Path:
    """~/.cache/merlin-ncf (or $XDG_CACHE_HOME's), else a per-user folder in the temp dir."""
    candidates = [Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "merlin-ncf",
                  Path(tempfile.gettempdir()) / f"merlin-ncf-{os.getuid()}"]
    for cache in candidates:
        try:
            cache.mkdir(parents=True, exist_ok=True)
            if os.access(cache, os.W_OK):
                return cache
        except OSError:
            continue
    raise ServingError(f"no writable directory for the python backend among {[str(c) for c in candidates]}")


def _fingerprint(bundle: Path) -> str:
    stat = (bundle / "backends" / PYTHON_BACKEND / "libtriton_python.so").stat()
    return f"{stat.st_size:x}{int(stat.st_mtime):x}"


def server_environment(installation: TritonInstallation, base: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: this Python first on PATH (the python backend stub runs
    `python3` from PATH and must import numpy/torch/nvtabular) and its libpython findable."""
    env = dict(os.environ if base is None else base)
    python_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([python_bin, env.get("PATH", "")])
    libdirs = [*map(str, installation.library_dirs), sysconfig.get_config_var("LIBDIR") or "", env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(d for d in libdirs if d)
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free right now on `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]

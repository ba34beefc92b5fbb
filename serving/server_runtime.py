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
import stat
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

from merlin_ncf.serving.errors import ServingError

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
    """~/.cache/merlin-ncf (or $XDG_CACHE_HOME's), else a per-user folder in the temp dir.

    The python backend stub is executed from here, so the temp-dir fallback (shared with
    other users) is used only when we own it and nobody else can write to it."""
    home_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "merlin-ncf"
    try:
        home_cache.mkdir(parents=True, exist_ok=True)
        if os.access(home_cache, os.W_OK):
            return home_cache
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"merlin-ncf-{os.getuid()}"
    try:
        fallback.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ServingError(f"no writable directory for the python backend: {home_cache} and {fallback} "
                           f"({exc.strerror or exc})") from None
    check_private_dir(fallback)
    return fallback


def check_private_dir(path: Path) -> None:
    """Refuse a directory another user could have planted files in: it must be a real
    directory (not a link), owned by us, with no group or other permissions."""
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise ServingError(f"{path} is not a directory (a link or file there is refused: remove it)")
    if info.st_uid != os.getuid():
        raise ServingError(f"{path} belongs to uid {info.st_uid}, not to us (uid {os.getuid()}): "
                           "refusing to run programs from it (remove it, or make ~/.cache writable)")
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise ServingError(f"{path} has mode {stat.S_IMODE(info.st_mode):04o}, so others may write to it: "
                           "refusing to run programs from it (chmod 700 it after checking its contents, or remove it)")


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


_PR_SET_PDEATHSIG = 1


def die_with_parent_preexec():
    """A Popen preexec_fn: the child gets SIGKILL when the process that started it dies (even
    by SIGKILL), so a killed serve.py never leaves an orphaned tritonserver. Linux only."""
    import ctypes
    import signal

    parent = os.getpid()  # the process about to start the child
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec if sys.platform == "linux" else None


def listening_socket_inodes(port: int) -> set[str]:
    """Inodes of the TCP sockets listening on `port` (any address), from /proc/net/tcp{,6}."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # fields: sl, local "ADDR:PORT" (hex), remote, state (0A = LISTEN), ..., inode at 9
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def owns_listening_port(pid: int, port: int) -> bool:
    """Whether process `pid` holds the socket listening on `port`: the bind was its own, so a
    server answering there is this process and not another one that had the port first."""
    if not Path("/proc/net/tcp").exists():  # no procfs (not Linux): nothing to check against
        return True
    inodes = listening_socket_inodes(port)
    if not inodes:
        return False
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        for fd in fd_dir.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                return True
    except OSError:
        return False
    return False

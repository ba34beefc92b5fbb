"""The three environments name the same releases: requirements/cpu.lock, requirements/gpu.lock
(pip, Python 3.11) and conda-env.yml (cuDF), except where the GPU stack forces a difference,
listed here with the reason. The registry checks need pypi.org (skipped when unreachable)."""

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.tags import compatible_tags, cpython_tags, platform_tags
from packaging.utils import (InvalidSdistFilename, InvalidWheelFilename, canonicalize_name,
                             parse_sdist_filename, parse_wheel_filename)
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CPU_LOCK = ROOT / "requirements" / "cpu.lock"
GPU_LOCK = ROOT / "requirements" / "gpu.lock"
PYPI_SIMPLE = "https://pypi.org/simple/"

# Where conda-env.yml must differ from cpu.lock, and why. cuDF 24.02 is the last cuDF on the
# pandas 1.5 that Merlin 23.08 needs (RAPIDS notice RSN 36: pandas 2 from 24.04); RAPIDS added
# Python 3.11 in 24.04 (rapidsai/cudf#15111, rapidsai/build-planning#3), so it has no 3.11 build.
CONDA_FORCED = {"python": "3.10"}
# Python 3.10 wheels: the newest release of each that has one (the lock's has cp311+ only).
CONDA_FORCED_PIP = {"matplotlib": "3.10.9"}
# The GPU lock's additions to the CPU lock: torch's CUDA wheels and CuPy.
GPU_ONLY = re.compile(r"(nvidia-.*|cuda-.*|cupy-cuda\d+x|fastrlock|triton)")


def _lock_versions(path: Path = CPU_LOCK) -> dict[str, Version]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            req = Requirement(line)
            (spec,) = req.specifier
            pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def _lock_python(path: Path) -> str:
    """The Python a lock was resolved for, from its header ("... (Python 3.11, x86_64)")."""
    return re.search(r"Python (\d+\.\d+)", path.read_text()).group(1)


def _conda_specifiers() -> dict[str, SpecifierSet]:
    """Conda's `name=1.2` means 1.2.*, `name==1.2` exactly 1.2, `name>=1` as pip."""
    env = yaml.safe_load((ROOT / "conda-env.yml").read_text())
    specs = {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            for line in dep["pip"]:
                req = Requirement(line)
                specs[canonicalize_name(req.name)] = req.specifier
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(.*)", dep)
        name, constraint = match.group(1), match.group(2).strip()
        if re.fullmatch(r"=[^=<>!].*", constraint):
            constraint = f"=={constraint[1:]}.*"
        specs[canonicalize_name(name)] = SpecifierSet(constraint)
    return specs


def test_conda_env_parses_and_names_the_gpu_stack():
    specs = _conda_specifiers()
    for gpu_package in ("cudf", "dask-cudf", "dask-cuda", "cupy", "torch", "nvtabular"):
        assert gpu_package in specs


def test_conda_pins_agree_with_cpu_lock():
    lock = _lock_versions()
    specs = _conda_specifiers()
    shared = sorted(set(lock) & set(specs))
    assert len(shared) >= 10, shared
    disagreeing = {
        name: (str(specs[name]), str(lock[name]))
        for name in shared
        if specs[name] and not specs[name].contains(lock[name], prereleases=True)
    }
    forced = {name: (f"=={version}", str(lock[name])) for name, version in CONDA_FORCED_PIP.items()}
    assert disagreeing == forced, f"conda-env.yml vs requirements/cpu.lock: {disagreeing}"


def test_conda_python_is_the_locks_unless_cudf_forces_another():
    python = str(_conda_specifiers()["python"])
    assert _lock_python(CPU_LOCK) == _lock_python(GPU_LOCK) == "3.11"
    assert python == f"=={CONDA_FORCED['python']}.*" != f"=={_lock_python(CPU_LOCK)}.*"
    assert str(_conda_specifiers()["cudf"]) == "==24.02.*", "the reason for CONDA_FORCED is gone: drop it"


def test_gpu_lock_has_every_cpu_release_plus_only_cuda_wheels():
    cpu, gpu = _lock_versions(CPU_LOCK), _lock_versions(GPU_LOCK)
    assert {name: gpu.get(name) for name in cpu if gpu.get(name) != cpu[name]} == {}
    added = sorted(set(gpu) - set(cpu))
    assert [name for name in added if not GPU_ONLY.fullmatch(name)] == [], added
    assert any(name.startswith("cupy-cuda") for name in added) and any(name.startswith("nvidia-") for name in added)


def _pypi_or_skip() -> None:
    try:
        urllib.request.urlopen(PYPI_SIMPLE + "pip/", timeout=15).close()
    except (urllib.error.URLError, OSError) as exc:
        pytest.skip(f"{PYPI_SIMPLE} is unreachable ({exc}): the registry checks need it")


def _files(name: str) -> list[dict]:
    """A project's files on PyPI (PEP 691 JSON simple API); a missing project is an HTTPError."""
    request = urllib.request.Request(PYPI_SIMPLE + name + "/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    for attempt in range(2):  # one retry: a dropped connection is not a resolution error
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return [f for f in json.load(response)["files"] if not f.get("yanked")]
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, OSError):
            if attempt:
                raise
    raise AssertionError("unreachable")


def _release_file(filename: str) -> tuple[Version | None, frozenset]:
    """(version, wheel tags) of a file name; tags are empty for an sdist, version None if unparsable."""
    try:
        if filename.endswith(".whl"):
            return parse_wheel_filename(filename)[1], parse_wheel_filename(filename)[3]
        return parse_sdist_filename(filename)[1], frozenset()
    except (InvalidWheelFilename, InvalidSdistFilename):  # ancient uploads (pydantic 0.18's "py36+"), .zip
        return None, frozenset()


def _uninstallable(pins: dict[str, Version], python: tuple[int, int]) -> dict[str, str]:
    """Pins with no file pip would install on CPython `python` on a Linux x86_64 like this one:
    a wheel with a matching tag and Requires-Python, or, for a release that has no wheel at all
    (merlin-core 23.8.0 and friends), its sdist. A release with wheels but none for this Python
    fails, and so do PyPI's placeholder sdists (cudf-cu12 24.2.x is sdist-only, but it is not
    in cpu.lock, the set this project has built from sdists)."""
    tags = set(cpython_tags(python, platforms=list(platform_tags())))
    tags |= set(compatible_tags(python, platforms=list(platform_tags())))
    interpreter = Version(".".join(map(str, python)))
    built_from_sdist = set(_lock_versions(CPU_LOCK))

    def check(item):
        name, version = item
        try:
            files = [f for f in _files(name) if _release_file(f["filename"])[0] == version]
        except urllib.error.HTTPError as exc:
            return name, f"{exc.code} from {PYPI_SIMPLE}{name}/"
        ok_python = [f for f in files if SpecifierSet(f.get("requires-python") or "").contains(interpreter)]
        wheels = [f for f in files if f["filename"].endswith(".whl")]
        if any(tags & _release_file(f["filename"])[1] for f in ok_python if f in wheels):
            return name, None
        if not wheels and name in built_from_sdist and ok_python:
            return name, None
        return name, f"no cp{python[0]}{python[1]} Linux x86_64 wheel of {version}"

    with ThreadPoolExecutor(16) as pool:
        return {name: why for name, why in pool.map(check, pins.items()) if why}


def test_gpu_lock_installs_on_python_311_from_pypi():
    _pypi_or_skip()
    assert _uninstallable(_lock_versions(GPU_LOCK), (3, 11)) == {}


def test_conda_pip_section_installs_on_the_conda_python_from_pypi():
    _pypi_or_skip()
    env = yaml.safe_load((ROOT / "conda-env.yml").read_text())
    (pip_lines,) = [dep["pip"] for dep in env["dependencies"] if isinstance(dep, dict)]
    pins = {canonicalize_name(Requirement(line).name): Version(next(iter(Requirement(line).specifier)).version)
            for line in pip_lines}
    python = tuple(int(part) for part in CONDA_FORCED["python"].split("."))
    assert _uninstallable(pins, python) == {}


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MERLIN_NCF_RESOLVE_GPU_LOCK"),
                    reason="~5 min, ~3.5 GB of CUDA wheels (pip 23.2's --dry-run fetches whole wheels, "
                           "pypa/pip#12603); set MERLIN_NCF_RESOLVE_GPU_LOCK=1 or run `make check-gpu-lock`")
def test_gpu_lock_resolves_with_pips_resolver(tmp_path):
    """pip's own resolver, against pypi.org, on Linux x86_64 / this Python 3.11: the lock is
    consistent and closed (pip installs exactly its pins, nothing more)."""
    _pypi_or_skip()
    report = tmp_path / "report.json"
    env = dict(os.environ, PIP_CONFIG_FILE=os.devnull, PIP_FIND_LINKS="")  # PyPI only, not local wheels
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                             "--report", str(report), "-r", str(GPU_LOCK)], capture_output=True, text=True, env=env,
                            timeout=3000)
    assert result.returncode == 0, result.stderr[-3000:]
    resolved = {canonicalize_name(i["metadata"]["name"]): Version(i["metadata"]["version"])
                for i in json.loads(report.read_text())["install"]}
    assert resolved == _lock_versions(GPU_LOCK)


def test_every_shared_package_is_pinned_in_conda():
    """An unpinned name in conda-env.yml would silently drift from the lock."""
    lock = _lock_versions()
    unpinned = [name for name, spec in _conda_specifiers().items() if name in lock and not spec]
    assert unpinned == [], unpinned

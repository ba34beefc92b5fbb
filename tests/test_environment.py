"""The GPU environment (conda-env.yml) and the CPU lock name the same releases."""

import re
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _lock_versions() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements" / "cpu.lock").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            req = Requirement(line)
            (spec,) = req.specifier
            pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


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
    assert not disagreeing, f"conda-env.yml vs requirements/cpu.lock: {disagreeing}"


def test_every_shared_package_is_pinned_in_conda():
    """An unpinned name in conda-env.yml would silently drift from the lock."""
    lock = _lock_versions()
    unpinned = [name for name, spec in _conda_specifiers().items() if name in lock and not spec]
    assert unpinned == [], unpinned

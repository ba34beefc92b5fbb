"""The package's shape: one-way imports, no sys.path patching, working installed commands."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Folder -> module prefix, as pyproject.toml's package-dir maps them.
PACKAGES = {"merlin_ncf": "merlin_ncf", "workflows": "merlin_ncf.workflows", "models": "merlin_ncf.models",
            "serving": "merlin_ncf.serving"}
# Allowed directions: a stage may import the core and the stages listed here, nothing else.
# models -> workflows: training reads a foreign feature spec through its transcoded copy.
LAYERS = {"merlin_ncf": set(), "merlin_ncf.workflows": set(), "merlin_ncf.models": {"merlin_ncf.workflows"},
          "merlin_ncf.serving": {"merlin_ncf.models", "merlin_ncf.workflows"}}
# Copied into a Triton model repository, where the server's python stub imports them by path.
TRITON_STEPS = REPO / "serving" / "triton_models"


def _modules() -> dict[str, Path]:
    found = {}
    for folder, prefix in PACKAGES.items():
        for path in (REPO / folder).rglob("*.py"):
            if TRITON_STEPS in path.parents:
                continue
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            name = ".".join((prefix, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


def _imports(path: Path) -> set[str]:
    """Modules a file imports at any depth (function-level imports count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imports(path) if m in modules} - {name} for name, path in modules.items()}


def _layer(module: str) -> str:
    return max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)


def test_no_import_cycles():
    graph = _graph()
    visiting, done, cycles = set(), set(), []

    def visit(node: str, stack: list[str]) -> None:
        if node in done:
            return
        if node in visiting:
            cycles.append(stack[stack.index(node):] + [node])
            return
        visiting.add(node)
        for nxt in sorted(graph[node]):
            visit(nxt, stack + [nxt])
        visiting.discard(node)
        done.add(node)

    for start in sorted(graph):
        visit(start, [start])
    assert not cycles, f"import cycles: {cycles[:3]}"


def test_imports_run_one_way():
    """core <- every stage; serving may use models and workflows, models workflows; the core imports no stage."""
    wrong = []
    for module, targets in _graph().items():
        mine = _layer(module)
        for target in targets:
            theirs = _layer(target)
            if theirs != mine and theirs != "merlin_ncf" and theirs not in LAYERS[mine]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, wrong


def test_no_sys_path_patching_outside_tests():
    offenders = []
    for path in REPO.rglob("*.py"):
        relative = path.relative_to(REPO)
        if relative.parts[0] in ("tests", ".venv", ".venv-recbole", "build") or relative.parts[0].startswith("."):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys":
                offenders.append(str(relative))
                break
    assert not offenders, f"sys.path used in {offenders}"


@pytest.mark.slow
def test_the_installed_wheel_runs_every_command(tmp_path):
    """Build a wheel, install it (without dependencies: they are this venv's) into a fresh
    target, and run `merlin-ncf COMMAND --help` from outside the checkout."""
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(REPO)], check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("merlin_ncf-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=600)
    assert (target / "merlin_ncf" / "serving" / "triton_models" / "model" / "model.py").is_file()
    assert not (target / "benchmarks").exists() and not (target / "models").exists()
    # Only the wheel's merlin_ncf is importable: the checkout's folders are not on the path.
    env = dict(os.environ, PYTHONPATH=str(target), PYTHONWARNINGS="ignore")
    from merlin_ncf.cli import COMMANDS

    for command in ["--help", *COMMANDS]:
        args = [command] if command == "--help" else [command, "--help"]
        result = subprocess.run([sys.executable, str(target / "bin" / "merlin-ncf"), *args], capture_output=True,
                                text=True, cwd=tmp_path, env=env, timeout=300)
        assert result.returncode == 0, f"merlin-ncf {command}: {result.stderr[-2000:]}"
        assert "usage" in result.stdout.lower()
    located = subprocess.run([sys.executable, "-c", "import merlin_ncf.models.trainer as t; print(t.__file__)"],
                             capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert located.stdout.strip().startswith(str(target)), located.stdout + located.stderr
    bad = subprocess.run([sys.executable, str(target / "bin" / "merlin-ncf"), "nonsense"], capture_output=True,
                         text=True, cwd=tmp_path, env=env, timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_no_module_of_a_script_folder_shadows_an_installed_one():
    """`python models/train_ncf.py` puts models/ first on sys.path, so a models/distributed.py
    would be imported in place of dask's `distributed` by any library that asks for it."""
    import importlib.util

    def in_checkout(entry: str) -> bool:  # pytest puts tests/ on the path; .venv/ may live here too
        path = Path(entry).resolve()
        return path.is_relative_to(REPO) and not path.is_relative_to(Path(sys.prefix).resolve())

    clean = [p for p in sys.path if p and p != os.getcwd() and not in_checkout(p)]
    shadowing = []
    for folder in ("workflows", "models", "serving", "benchmarks"):
        for path in (REPO / folder).glob("*.py"):
            original, sys.path[:] = list(sys.path), clean
            try:
                loaded = sys.modules.get(path.stem)  # tests' own packages (tests/data) are not installed ones
                locations = list(getattr(loaded, "__path__", None) or [getattr(loaded, "__file__", None) or ""])
                installed = (not all(in_checkout(p) for p in locations) if loaded is not None
                             else importlib.util.find_spec(path.stem) is not None)
                if path.stem != "__init__" and installed:
                    shadowing.append(f"{folder}/{path.name}")
            finally:
                sys.path[:] = original
    assert not shadowing, shadowing

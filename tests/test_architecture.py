"""The layers of ARCHITECTURE.md: a module imports only its own layer or lower ones; one installed package."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "distillery"

# Lowest first. A module may import modules of its own layer and of the layers below it, never above.
# "pkg.*" is a package with everything in it; any other name is that one module only (so the bare "distillery",
# the package's own __init__, does not swallow a new subpackage: a module in no layer fails the test).
LAYERS = (
    ("core", ("distillery.core.*",)),
    ("leaf jobs", ("distillery.sources.*", "distillery.export.*")),
    ("jobs", ("distillery.evals.*", "distillery.reasoning.*", "distillery.training.*")),
    ("config", ("distillery.config",)),
    ("stage contract", ("distillery.stage",)),
    ("stages", ("distillery.stages.*",)),
    ("application", ("distillery.runner", "distillery.commands.*", "distillery.cli", "distillery.config_doc",
                     "distillery.__main__", "distillery")),
)


def in_layer_entry(module: str, entry: str) -> bool:
    if entry.endswith(".*"):
        package = entry.removesuffix(".*")
        return module == package or module.startswith(package + ".")
    return module == entry


def layer_of(module: str) -> int:
    """The index of the layer that names `module`; a module no layer names is an error to fix in LAYERS."""
    found = [i for i, (_, entries) in enumerate(LAYERS) if any(in_layer_entry(module, e) for e in entries)]
    if not found:
        raise LookupError(f"{module} belongs to no layer: add it to ARCHITECTURE.md and LAYERS")
    return found[0]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a distillery module in the file, at any depth (lazy ones count)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "distillery"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "distillery":
            found.append((node.lineno, node.module))
    return found


def violations(root: Path = ROOT) -> list[str]:
    found = []
    for path in sorted((root / "distillery").rglob("*.py")):
        here = module_name(path, root)
        for line, target in project_imports(path):
            if layer_of(target) > layer_of(here):
                found.append(f"{path.relative_to(root)}:{line} ({LAYERS[layer_of(here)][0]}) imports {target} "
                             f"({LAYERS[layer_of(target)][0]})")
    return found


def test_no_module_imports_a_higher_layer() -> None:
    assert violations() == []


def test_the_check_catches_an_upward_import(tmp_path: Path) -> None:
    (tmp_path / "distillery" / "core").mkdir(parents=True)
    (tmp_path / "distillery" / "core" / "probe.py").write_text(
        "def f():\n    from distillery.stages import ingest\n", encoding="utf-8")
    (tmp_path / "distillery" / "stages").mkdir()
    (tmp_path / "distillery" / "stages" / "probe.py").write_text("import distillery.core.errors\n", encoding="utf-8")
    assert violations(tmp_path) == ["distillery/core/probe.py:2 (core) imports distillery.stages (stages)"]


def test_every_module_belongs_to_a_layer() -> None:
    for path in PACKAGE.rglob("*.py"):
        layer_of(module_name(path))  # raises when no layer names it


def test_a_new_package_in_no_layer_is_reported() -> None:
    with pytest.raises(LookupError, match="distillery.plugins.extra belongs to no layer"):
        layer_of("distillery.plugins.extra")
    with pytest.raises(LookupError):
        layer_of("distillery.configs")  # a name that starts like a layer's module is not in it
    assert layer_of("distillery") == layer_of("distillery.cli") == len(LAYERS) - 1
    assert layer_of("distillery.core") == layer_of("distillery.core.errors") == 0


def test_one_top_level_package() -> None:
    """`pip install .` installs `distillery` and nothing else beside the `distillery` script."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert config["tool"]["setuptools"]["packages"]["find"]["include"] == ["distillery*"]
    packages = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
    assert packages == ["distillery", "tests"]
    assert config["project"]["scripts"] == {"distillery": "distillery.cli:main"}


def test_functions_stay_short() -> None:
    """Sixty lines a function, as a habit the suite keeps."""
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in PACKAGE.rglob("*.py")
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert long == []


def test_the_python_floor_is_one_the_project_runs_on() -> None:
    """requires-python (and the install guide) admit no Python that a pinned dependency, or tomllib, rules out."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    floor = project["requires-python"].removeprefix(">=")
    assert tuple(int(part) for part in floor.split(".")) >= (3, 11)  # tomllib, imported by these tests, is 3.11+
    pinned = project["dependencies"] + [line for extra in project["optional-dependencies"].values() for line in extra]
    refused = []
    for line in pinned:
        try:
            needs = metadata.metadata(Requirement(line).name).get("Requires-Python")
        except metadata.PackageNotFoundError:  # an extra this machine does not install (cuda)
            continue
        if needs and not SpecifierSet(needs).contains(floor):
            refused.append(f"{line} needs Python {needs}")
    assert refused == []
    assert f"Python {floor} or newer" in (ROOT / "docs" / "install.md").read_text(encoding="utf-8")

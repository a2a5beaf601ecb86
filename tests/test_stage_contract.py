"""Every stage module against the stage contract (distillery/stage.py), and artifacts named in one place only."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import distillery.stages
from distillery.config import DistilleryConfig, load_config
from distillery.stage import STAGES, Stage, load_stage

PACKAGE = Path(distillery.stages.__file__).parent
ROOT = PACKAGE.parents[1]
LEGACY = ("NAME", "UPSTREAM", "SECTIONS", "PACKAGES", "RESUMABLE", "upstream_of")


def configs() -> list[DistilleryConfig]:
    """The presets, and the demo with distillation on (the config-dependent upstreams differ)."""
    demo = ROOT / "configs" / "demo.yaml"
    return [load_config(path) for path in sorted((ROOT / "configs").glob("*.yaml"))] + [
        load_config(demo, ["distill.enabled=true"]), load_config(demo, ["export.enabled=false"])]


def test_the_stages_package_holds_exactly_the_stages() -> None:
    modules = {m.name for m in pkgutil.iter_modules([str(PACKAGE)])}
    assert modules == set(STAGES)


@pytest.mark.parametrize("name", STAGES)
def test_stage_module_exports_its_contract(name: str) -> None:
    module = importlib.import_module(f"distillery.stages.{name}")
    stage = module.STAGE
    assert isinstance(stage, Stage) and stage.name == name
    assert [attr for attr in LEGACY if hasattr(module, attr)] == []
    assert set(stage.sections) <= set(DistilleryConfig.model_fields)
    assert callable(stage.run) and callable(stage.input_files) and isinstance(stage.resumable, bool)
    assert stage.outputs and all(not Path(p).is_absolute() and ".." not in Path(p).parts for p in stage.outputs.values())
    assert len(set(stage.outputs.values())) == len(stage.outputs)
    for cfg in configs():
        upstream = stage.upstream_of(cfg)
        assert all(u in STAGES and STAGES.index(u) < STAGES.index(name) for u in upstream), upstream


def string_constants(path: Path) -> list[str]:
    return [n.value for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_artifact_file_names_are_written_once_in_their_stage() -> None:
    """A stage's file names appear only in its OUTPUTS: everything else reads them through artifact()."""
    owners: dict[str, set[str]] = {}
    for name in STAGES:
        for filename in load_stage(name).outputs.values():
            if Path(filename).suffix:  # directories (adapter, merged, gguf) share their names with artifact kinds
                owners.setdefault(filename, set()).add(name)
    for path in sorted((ROOT / "distillery").rglob("*.py")):
        constants = string_constants(path)
        for filename, stages in owners.items():
            own = path.parent == PACKAGE and path.stem in stages
            assert constants.count(filename) == (1 if own else 0), f"{path.relative_to(ROOT)} names {filename}"

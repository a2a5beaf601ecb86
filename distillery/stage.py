"""What a stage module provides, and the context and result passed across that boundary.

A stage module (stages/<name>.py) defines, at module level:

    NAME: str                       the stage name, also its config section and run sub-directory
    UPSTREAM: tuple[str, ...]       stages whose artifacts it reads (the runner runs them first), or
    def upstream(cfg) -> tuple      the same when it depends on the config
    SECTIONS: tuple[str, ...]       config sections its fingerprint covers (the whole section, never a pick)
    PACKAGES: tuple[str, ...]       distributions whose versions change its results
    RESUMABLE: bool                 keep the partial directory across an interrupted run
    def input_files(cfg) -> list[Path]    external files it reads (hashed into the fingerprint)
    def run(ctx: StageContext) -> StageResult

Stages never call each other; only runner.py knows the order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from distillery.config import DistilleryConfig
from distillery.core.rundir import RunDir


@dataclass
class StageContext:
    cfg: DistilleryConfig
    run: RunDir
    out: Path  # write everything here; it is renamed to runs/<name>/<stage>/ when run() returns
    console: Console
    force: bool = False

    def upstream(self, stage: str) -> Path:
        """Directory of a finished upstream stage's artifacts."""
        return self.run.stage_dir(stage)


@dataclass
class StageResult:
    metrics: dict[str, Any] = field(default_factory=dict)
    summary: list[tuple[str, str]] = field(default_factory=list)  # rows for the end-of-run table

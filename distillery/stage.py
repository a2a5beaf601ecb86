"""The stage contract: what a stage module exports, and the context and result passed across it.

Every module in distillery/stages/ ends with one `STAGE = Stage(...)`. A misspelt field is a TypeError at
import, not a silently different behaviour, and tests/test_stage_contract.py checks every stage against it.
A stage declares the files it writes once, in `outputs` (a key -> a path inside its directory); a later stage,
`distillery chat` and `distillery push` find them through `artifact(run, stage, key)`, never by a file name
written again. Stages never call each other; only distillery/runner.py knows the order.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from rich.console import Console

from distillery.config import DistilleryConfig
from distillery.core.errors import UserError
from distillery.core.rundir import RunDir

# The one ordered tuple of stages; the CLI's commands are tested against it.
# evaluate runs after export: it scores the merged model and the GGUFs export writes.
STAGES = ("ingest", "distill", "format", "finetune", "export", "evaluate")


def no_input_files(cfg: DistilleryConfig) -> list[Path]:
    return []


def no_environment(cfg: DistilleryConfig) -> dict[str, str | None]:
    return {}


@dataclass(frozen=True)
class Stage:
    name: str  # also its config section and its directory runs/<name>/<stage>/
    run: Callable[[StageContext], StageResult]
    outputs: Mapping[str, str]  # artifact key -> path relative to the stage directory
    sections: tuple[str, ...]  # config sections its fingerprint covers (whole sections less `operational`)
    upstream: tuple[str, ...] | Callable[[DistilleryConfig], tuple[str, ...]] = ()  # stages it reads
    packages: tuple[str, ...] = ()  # distributions whose versions change its results
    resumable: bool = False  # keep the partial directory across an interrupted run
    input_files: Callable[[DistilleryConfig], list[Path]] = no_input_files  # external files it reads
    # the describing files of local models it reads (core/models.local_model_files): input files like the others,
    # except that a run recorded before they were counted stays up to date without them (runner.recorded_fingerprint)
    model_files: Callable[[DistilleryConfig], list[Path]] = no_input_files
    # settings it takes from environment variables where the config leaves them out (never a secret); None: unset
    environment: Callable[[DistilleryConfig], dict[str, str | None]] = no_environment
    # dotted keys in its sections that change how it runs, not what it writes, or that it does not read at all (left
    # out of the fingerprint: raising a timeout must resume a long distill, not start it over)
    operational: tuple[str, ...] | Callable[[DistilleryConfig], tuple[str, ...]] = ()
    # dotted keys outside its sections that change what it writes (evaluate: the sandbox its code_io checks run in)
    also_reads: tuple[str, ...] = ()
    # a resumable stage's dotted keys whose change leaves some files of its last finished run valid (export: the
    # GGUF types leave the merge and every GGUF still asked for): those files, matched by `carry_over` (patterns of
    # paths in its directory, which may depend on the config), start the new run as a resumed one would
    # (runner.carry_over_last_run)
    carries_over_when: tuple[str, ...] = ()
    carry_over: tuple[str, ...] | Callable[[DistilleryConfig], tuple[str, ...]] = ()

    def upstream_of(self, cfg: DistilleryConfig) -> tuple[str, ...]:
        return tuple(self.upstream(cfg)) if callable(self.upstream) else tuple(self.upstream)

    def operational_of(self, cfg: DistilleryConfig) -> tuple[str, ...]:
        return tuple(self.operational(cfg)) if callable(self.operational) else tuple(self.operational)

    def carry_over_of(self, cfg: DistilleryConfig) -> tuple[str, ...]:
        return tuple(self.carry_over(cfg)) if callable(self.carry_over) else tuple(self.carry_over)


def load_stage(name: str) -> Stage:
    """The STAGE of distillery/stages/<name>.py; an unknown name is a UserError listing the stages."""
    if name not in STAGES:
        raise UserError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return importlib.import_module(f"distillery.stages.{name}").STAGE


def artifact(run: RunDir, stage: str, key: str) -> Path:
    """Where `stage` keeps its declared output `key` in this run."""
    return run.stage_dir(stage) / load_stage(stage).outputs[key]


@dataclass
class StageContext:
    cfg: DistilleryConfig
    run: RunDir
    out: Path  # write everything here; it is renamed to runs/<name>/<stage>/ when run() returns
    console: Console
    force: bool = False

    def upstream(self, stage: str, key: str) -> Path:
        """A finished upstream stage's declared output."""
        return artifact(self.run, stage, key)


@dataclass
class StageResult:
    metrics: dict[str, Any] = field(default_factory=dict)
    summary: list[tuple[str, str]] = field(default_factory=list)  # rows for the end-of-run table

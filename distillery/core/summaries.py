"""Typed summaries that one stage writes and later stages read: a missing or renamed field is an error at the
reader that names the file and the field, not a KeyError three stages later.

finetune writes `FinetuneSummary` as runs/<name>/finetune/summary.json; export, evaluate and push read it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from distillery.core.errors import UserError


class FinetuneSummary(BaseModel):
    """What finetune trained and how: the fields later stages rely on are required; measurements may be absent."""

    model_config = ConfigDict(extra="allow")  # older or newer extras are kept, never needed

    backend: Literal["unsloth", "hf"]
    base_model: str  # the local directory or Hub id the adapter (or the full fine-tune) started from
    model_path: str  # model.path as configured (a bundled: name, a Hub id, a directory)
    device: str
    load_in_4bit: bool
    precision: str
    template: str
    max_length: int
    lora: dict[str, Any]  # empty for method full
    steps: int
    method: Literal["lora", "full"] = "lora"  # full: finetune/model holds the whole trained model, no adapter
    memory_estimate: dict[str, Any] | None = None  # full: preflight's estimate (GiB), beside peak_memory_mb
    tensors_changed: int | None = None  # full: trained tensors that differ from the base's (fp32)
    tensors_compared: int | None = None
    optimizer: str | None = None
    objective: str = "sft"
    max_steps: int | None = None
    train_examples: int | None = None
    resumed_from_step: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    train_loss: float | None = None
    loss_start_mean: float | None = None
    loss_end_mean: float | None = None
    tokens: int | None = None
    tokens_per_s: float | None = None
    train_seconds: float | None = None
    peak_memory_mb: float | None = None
    peak_memory_kind: str | None = None
    world_size: int = 1


def read_finetune_summary(path: Path) -> FinetuneSummary:
    """finetune's summary.json, checked; a missing file or field is a UserError naming it and the fix."""
    if not path.is_file():
        raise UserError(f"{path} is missing: the finetune stage did not finish; run `distillery finetune`.")
    try:
        return FinetuneSummary.model_validate_json(path.read_bytes())
    except ValidationError as err:
        problem = err.errors()[0]
        field = ".".join(str(p) for p in problem["loc"]) or "the file"
        raise UserError(f"{path}: {field}: {problem['msg']}; it was written by another version of Distillery or "
                        "edited. Rerun `distillery finetune --force`.") from None

"""Trainer callbacks of the finetune stage, and the checkpoint bookkeeping that makes a kill -9 resumable.

A checkpoint counts only once it is complete: the Trainer writes checkpoint-N/ file by file, and only after it
has finished does CheckpointKeeper drop a marker into it, listing each file and its size (a file since lost or cut
short unmarks it). A restart resumes from the newest marked checkpoint and deletes unmarked ones (a save the kill
interrupted). Old checkpoints are renamed away before they are deleted, so
a kill during the clean-up never leaves a marked checkpoint with files missing. metrics.jsonl is cut back to the
resumed step, so a resumed run's curve has each step once, and the marker holds the tokens trained so far, from
which the resumed run counts on.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from distillery.core.rundir import atomic_write_text

COMPLETE = "distillery-complete.json"
PREFIX = "checkpoint-"


def checkpoint_step(path: Path) -> int:
    return int(path.name.removeprefix(PREFIX))


def list_checkpoints(directory: Path) -> list[Path]:
    """checkpoint-N directories, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and p.name.removeprefix(PREFIX).isdigit()]
    return sorted(found, key=checkpoint_step)


def discard(path: Path) -> None:
    """Rename first (atomic), then delete: a half-deleted checkpoint never keeps its checkpoint-N name."""
    trash = path.with_name(f".trash-{path.name}-{time.time_ns()}")
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def checkpoint_files(path: Path) -> dict[str, int]:
    """Every file of a checkpoint but its marker: relative path -> size in bytes."""
    return {f.relative_to(path).as_posix(): f.stat().st_size for f in sorted(path.rglob("*"))
            if f.is_file() and f.name != COMPLETE}


def read_marker(path: Path) -> dict[str, Any] | None:
    """A checkpoint's completion marker; None when it has none, or one that is not a JSON object."""
    try:
        marker = json.loads((path / COMPLETE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def is_complete(path: Path) -> bool:
    """Marked complete, and every file the marker lists still there at the size it was written: a checkpoint
    that lost its optimizer.pt was resumed with a fresh optimizer and schedule, silently. A marker without the
    list (written before it was kept) is taken at its word."""
    marker = read_marker(path)
    files = marker.get("files", {}) if marker is not None else None
    if not isinstance(files, dict):
        return False
    return all((path / rel).is_file() and (path / rel).stat().st_size == size for rel, size in files.items()) and all(
        readable_json(path / rel) for rel in files if rel.endswith(".json"))


def readable_json(path: Path) -> bool:
    """A checkpoint's JSON file (trainer_state.json, the adapter's config) parses: one damaged in place, at its
    size (a bad sector, a sync tool), stopped every resume with a JSONDecodeError; the checkpoint before it is
    resumed from instead. These files are small; the tensors' bytes are not read."""
    try:
        json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(directory: Path) -> Path | None:
    """The newest checkpoint with its completion marker; incomplete ones and leftover trash are removed."""
    if not directory.is_dir():
        return None
    for leftover in directory.glob(".trash-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    complete = None
    for path in list_checkpoints(directory):
        if is_complete(path):
            complete = path
        else:
            discard(path)
    return complete


def prune_checkpoints(directory: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints."""
    complete = [p for p in list_checkpoints(directory) if is_complete(p)]
    for path in complete[:-keep]:
        discard(path)


def tokens_trained(checkpoint: Path | None) -> int:
    """The tokens trained up to `checkpoint` as its marker says (0: no checkpoint, or a marker without them)."""
    value = ((read_marker(checkpoint) if checkpoint else None) or {}).get("tokens_seen", 0)
    return value if type(value) is int and value >= 0 else 0


def trim_metrics(path: Path, last_step: int) -> None:
    """Keep metrics.jsonl rows up to the resumed step (and no torn last line); nothing to do on a fresh start."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line a kill cut in half
        if isinstance(row, dict) and row.get("step", 0) <= last_step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


class CheckpointKeeper(TrainerCallback):
    """Marks each checkpoint complete once the Trainer has written all of it (with the tokens trained so far,
    `tokens_seen()`), then prunes older ones."""

    def __init__(self, keep: int, tokens_seen: Any = lambda: 0):
        self.keep, self.tokens_seen = keep, tokens_seen

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            directory = Path(args.output_dir)
            checkpoint = directory / f"{PREFIX}{state.global_step}"
            atomic_write_text(checkpoint / COMPLETE, json.dumps({
                "global_step": state.global_step, "max_steps": state.max_steps, "tokens_seen": int(self.tokens_seen()),
                "files": checkpoint_files(checkpoint)}))
            prune_checkpoints(directory, self.keep)
        return control


class AlreadyTrained(Exception):
    """Raised by StopWhenAlreadyTrained: the checkpoint resumed from holds every step."""


class StopWhenAlreadyTrained(TrainerCallback):
    """A run killed after its last checkpoint (step == max_steps) resumes at a global step the loop has already
    reached, yet transformers (5.17; Unsloth's loop too) fast-forwards to that batch and trains one step more.
    Stopped here, after the checkpoint's weights are loaded and before any step: the caller catches it."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.max_steps and state.global_step >= state.max_steps:
            raise AlreadyTrained
        return control


class MetricsCallback(TrainerCallback):
    """Appends every log to metrics.jsonl (step, loss, lr, tokens/s) and shows a rich progress bar."""

    def __init__(self, path: Path, console: Any, trainer: Any, enabled: bool = True):
        self.path, self.console, self.trainer, self.enabled = path, console, trainer, enabled
        self.progress = self.task = None
        self.last_tokens, self.last_time = 0, time.time()
        self.started = time.time()

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.enabled:
            return control
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]finetune"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.description}"), TimeRemainingColumn(), console=self.console)
        self.progress.start()
        self.task = self.progress.add_task("", total=state.max_steps, completed=state.global_step)
        self.last_tokens, self.last_time = self.trainer.tokens_seen, time.time()
        self.started = self.last_time
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.enabled or not logs:
            return control
        row: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        if "loss" in logs:
            now, tokens = time.time(), self.trainer.tokens_seen
            row.update(loss=logs["loss"], lr=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"),
                       tokens=tokens, tokens_per_s=round((tokens - self.last_tokens) / max(now - self.last_time, 1e-9), 1),
                       elapsed_s=round(now - self.started, 3))
            self.last_tokens, self.last_time = tokens, now
            if self.progress is not None:
                self.progress.update(self.task, description=f"loss {logs['loss']:.4f}")
        elif "eval_loss" in logs:
            row["eval_loss"] = logs["eval_loss"]
        else:
            return control  # the end-of-training summary log
        with open(self.path, "a", encoding="utf-8") as handle:  # NaN or inf (a diverged step) as null: valid JSON
            handle.write(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                                     for k, v in row.items()}) + "\n")
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
        return control

"""What a data-source kind is, and the report every source fills in.

A source module (distillery/sources/<kind>.py) defines its params model (a pydantic model with
`kind: Literal["<kind>"]`), a reader `read(params, report) -> Iterator[record]`, and ends with one
`SOURCE = Source(...)`; distillery/sources/__init__.py lists it. The config's source union, ingest's input
files and docs/config.md all come from that list. The config names the kind; nothing is guessed from a path.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from pydantic import BaseModel, ConfigDict, Field, StrictInt


class SourceParams(BaseModel):
    """Fields every source has; each kind subclasses it and adds `kind: Literal[...]` and its own fields."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # .inf or .nan in YAML: no setting means it

    name: str = Field(description="Name of this source in the config; becomes `record.source`.")
    max_records: StrictInt | None = Field(None, ge=1, description="Keep at most this many records (a seeded sample).")
    weight: float = Field(1.0, gt=0, le=100, description="Repeat factor for the train split: 0.5 keeps half, 2 doubles (at most 100).")


MAX_LISTED = 10_000  # dropped items a source lists in dropped.jsonl; report.json counts every one by reason


@dataclass
class SourceReport:
    """What a source read and what it dropped, with the reason and where, so nothing vanishes silently."""

    name: str
    read: int = 0
    dropped: Counter = field(default_factory=Counter)
    dropped_rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def drop(self, reason: str, where: dict[str, Any], detail: str = "") -> None:
        """Count a dropped input item under `reason` and keep where it was and why (`reason, detail`): the first
        MAX_LISTED of a source, for dropped.jsonl (a file of two million `{}` lines kept 700 MB of them)."""
        self.dropped[reason] += 1
        if len(self.dropped_rows) < MAX_LISTED:
            self.dropped_rows.append({"source": self.name, "reason": f"{reason}, {detail}" if detail else reason,
                                      **where})

    def add(self, other: "SourceReport") -> None:
        """What another part of the same source read, dropped and noted (a shard read in parallel)."""
        self.read += other.read
        self.dropped.update(other.dropped)
        self.dropped_rows += other.dropped_rows[:MAX_LISTED - len(self.dropped_rows)]
        for note in other.notes:
            self.note(note)

    def unlisted(self) -> int:
        """How many dropped items dropped.jsonl does not list (past MAX_LISTED)."""
        return sum(self.dropped.values()) - len(self.dropped_rows)

    def note(self, text: str) -> None:
        """Something the user should know that is not a drop (a coerced cell, a detected header row)."""
        if text not in self.notes:
            self.notes.append(text)


Reader = Callable[[Any, SourceReport], Iterator[dict[str, Any]]]


@dataclass(frozen=True)
class Source:
    kind: str  # the config's `kind:`
    params: type[SourceParams]  # its config fields
    read: Reader
    files_field: str  # the params field naming local files (hashed into ingest's fingerprint)
    suffixes: tuple[str, ...]  # what those files end in
    per_file: bool = False  # each file reads on its own (no state across files): ingest reads them in parallel

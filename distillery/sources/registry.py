"""Registry of data-source kinds and the report every source fills in.

A source module declares a params model (a pydantic model with `kind: Literal["<kind>"]`) and a reader
`read(params, report) -> Iterator[record]`, and registers both with `@register`. The config names the
kind; nothing is guessed from a path.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from pydantic import BaseModel, ConfigDict, Field

Reader = Callable[[Any, "SourceReport"], Iterator[dict[str, Any]]]
READERS: dict[str, Reader] = {}
PARAMS: dict[str, type[BaseModel]] = {}


class SourceParams(BaseModel):
    """Fields every source has; each kind subclasses it and adds `kind: Literal[...]` and its own fields."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Name of this source in the config; becomes `record.source`.")
    max_records: int | None = Field(None, ge=1, description="Keep at most this many records (a seeded sample).")
    weight: float = Field(1.0, gt=0, description="Repeat factor for the train split: 0.5 keeps half, 2 doubles.")


@dataclass
class SourceReport:
    """What a source read and what it dropped, with the reason and where, so nothing vanishes silently."""

    name: str
    read: int = 0
    dropped: Counter = field(default_factory=Counter)
    dropped_rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def drop(self, reason: str, where: dict[str, Any]) -> None:
        """Count a dropped input item and keep where it was and why."""
        self.dropped[reason] += 1
        self.dropped_rows.append({"source": self.name, "reason": reason, **where})

    def note(self, text: str) -> None:
        """Something the user should know that is not a drop (a coerced cell, a detected header row)."""
        if text not in self.notes:
            self.notes.append(text)


def register(kind: str, params: type[BaseModel]) -> Callable[[Reader], Reader]:
    """Register `reader` for `kind`; a second registration of the same kind is a programming error."""

    def decorator(reader: Reader) -> Reader:
        if kind in READERS:
            raise ValueError(f"data source kind {kind!r} is registered twice")
        READERS[kind] = reader
        PARAMS[kind] = params
        return reader

    return decorator


def get_reader(kind: str) -> Reader:
    """The reader registered for `kind`."""
    if kind not in READERS:
        raise KeyError(f"unknown data source kind {kind!r}; known: {', '.join(sorted(READERS))}")
    return READERS[kind]

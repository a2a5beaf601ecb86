"""Data sources: one module per kind of input, each yielding the normalized record shape.

A new kind is one module ending in `SOURCE = Source(...)` plus one line in SOURCES below.
"""

from distillery.sources import codeio, excel, hf
from distillery.sources.registry import Source, SourceReport

SOURCES: dict[str, Source] = {source.kind: source for source in (
    excel.SOURCE,
    hf.SOURCE,
    codeio.SOURCE,
)}

__all__ = ["SOURCES", "Source", "SourceReport"]

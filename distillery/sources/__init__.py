"""Data sources: one module per kind of input, each yielding the normalized record shape.

Every module is imported here explicitly so that its `@register` runs; the config names the `kind`.
"""

from distillery.sources import codeio, excel, hf  # noqa: F401  (registration)
from distillery.sources.registry import PARAMS, READERS, SourceReport, get_reader

__all__ = ["PARAMS", "READERS", "SourceReport", "get_reader"]

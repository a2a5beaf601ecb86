"""docs/config.md is generated from the config models; a changed key, default or description must be regenerated."""

from __future__ import annotations

from pathlib import Path

from distillery.config import DistilleryConfig
from distillery.config_doc import render
from distillery.sources import SOURCES

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_config_reference_is_current() -> None:
    assert DOC.read_text(encoding="utf-8") == render(), "docs/config.md is stale: run `just docs`"


def test_every_key_and_source_kind_is_documented() -> None:
    text = render()
    for section, info in DistilleryConfig.model_fields.items():
        assert f"## {section}\n" in text
        for key in info.annotation.model_fields:
            assert f"| `{key}` |" in text or f"## {section}.{key}\n" in text, f"{section}.{key}"
    for kind, source in SOURCES.items():
        assert f"## ingest.sources[] with kind: {kind}\n" in text
        assert all(f"| `{key}` |" in text for key in source.params.model_fields)

"""docs/config.md, generated from the config models: every key, its type, its default and what it does.

    python -m distillery.config_doc --write docs/config.md     (just docs)

tests/test_config_doc.py fails when the file differs from what this writes, so the reference never goes stale.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from distillery.config import DistilleryConfig
from distillery.sources import SOURCES

HEADER = """# Config reference

Generated from the pydantic models in `distillery/config.py` and `distillery/sources/` by
`just docs` (`python -m distillery.config_doc --write docs/config.md`); do not edit by hand. Unknown keys are
refused with the key's name; `--set section.key=value` overrides any key from the command line (list items by
index: `--set ingest.sources.0.path=data/`). The file must be UTF-8; a key written twice in one mapping is
refused (YAML would keep the last silently); a path may start with `~`. The presets in `configs/` show them in use.
"""


def type_name(annotation: Any) -> str:
    """A short, readable type: `int | None`, `"linear" | "cosine"`, `list[str]`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_name(args[0])
    if is_model(annotation) and "kind" in annotation.model_fields:  # a source kind, documented below
        return f"{typing.get_args(annotation.model_fields['kind'].annotation)[0]} source"
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join(type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join(type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def default_text(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.default_factory() if info.default_factory is not None else info.default
    if value is PydanticUndefined:
        return ""
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def section(title: str, model: type[BaseModel], doc: str | None = None) -> list[str]:
    """A heading, the model's description, a table of its plain keys, then each nested section after it."""
    lines = [f"## {title}", ""]
    if doc or model.__doc__:
        lines += [(doc or model.__doc__ or "").strip().splitlines()[0], ""]
    rows, nested = [], []
    for key, info in model.model_fields.items():
        if is_model(info.annotation):
            nested.append((f"{title}.{key}", info.annotation))
            continue
        description = (info.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{key}` | {type_name(info.annotation)} | {default_text(info)} | {description} |")
    if rows:
        lines += ["| key | type | default | description |", "| --- | --- | --- | --- |", *rows, ""]
    for nested_title, nested_model in nested:
        lines += section(nested_title, nested_model)
    return lines


def render() -> str:
    lines = [HEADER]
    for key, info in DistilleryConfig.model_fields.items():
        lines += section(key, info.annotation)
    for kind, source in SOURCES.items():
        lines += section(f"ingest.sources[] with kind: {kind}", source.params)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distillery.config_doc", description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="write here (default: print)")
    args = parser.parse_args(argv)
    if args.write:
        args.write.write_text(render(), encoding="utf-8")
    else:
        sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())

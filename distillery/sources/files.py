"""Turning a path spec from the config (a file, a list, a directory or a glob) into existing files."""

from __future__ import annotations

import glob
from pathlib import Path

from distillery.core.errors import UserError


def resolve_paths(spec: str | list[str], suffixes: tuple[str, ...], field: str) -> list[Path]:
    """Expand `spec` into a sorted list of files ending in one of `suffixes`.

    A directory contributes its matching files (recursively); a glob its matches; a plain path must exist.
    Excel's lock files (`~$name.xlsx`, left beside a workbook open in Excel) are never read.
    Anything that matches nothing is a UserError naming the config field and the path.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    files: list[Path] = []
    for item in specs:
        path = Path(item).expanduser()
        if any(ch in item for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True)
                             if Path(m).is_file() and not Path(m).name.startswith("~$"))
            if not matches:
                raise UserError(f"{field}: the pattern {item!r} matches no file. Check the path (relative to {Path.cwd()}).")
            files.extend(matches)
        elif path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith("~$"))
            if not matches:
                raise UserError(f"{field}: the directory {item} holds no {'/'.join(suffixes)} file.")
            files.extend(matches)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{field}: {item} does not exist. Check the path (relative to {Path.cwd()}).")
    return files

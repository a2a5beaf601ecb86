"""Turning a path spec from the config (a file, a list, a directory or a glob) into existing files."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from distillery.core.errors import UserError
from distillery.core.userinput import missing_path


def is_junk(path: Path) -> bool:
    """Files no one means as data: Excel's lock files (`~$name.xlsx`, beside a workbook open in Excel) and what
    macOS leaves in folders and zips (`._name` AppleDouble files with a file's Finder metadata, `__MACOSX/`)."""
    return path.name.startswith(("~$", "._")) or "__MACOSX" in path.parts


def resolve_paths(spec: str | list[str], suffixes: tuple[str, ...], field: str) -> list[Path]:
    """Expand `spec` into a sorted list of files ending in one of `suffixes`.

    A directory contributes its matching files (recursively); a glob its matches with such a suffix (`data/*` by a
    README: the workbooks); a plain path must exist.
    Junk files (is_junk) are never read, and a file reached twice (through a symlink, or a `**` glob that
    follows a symlinked folder) is read once. Anything that matches nothing is a UserError naming the config
    field and the path.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    files: list[Path] = []
    for item in specs:
        path = Path(item).expanduser()
        if any(ch in item for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True)
                             if Path(m).is_file() and Path(m).suffix.lower() in suffixes and not is_junk(Path(m)))
            if not matches:
                raise UserError(f"{field}: the pattern {item!r} matches no {'/'.join(suffixes)} file. Check the path "
                                f"(relative to {Path.cwd()}).")
            files.extend(matches)
        elif path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes and not is_junk(p))
            if not matches:
                raise UserError(f"{field}: the directory {item} holds no {'/'.join(suffixes)} file.")
            files.extend(matches)
        elif path.is_file():
            files.append(path)
        else:
            raise missing_path(item, path, field)
    return once_each(files)


def once_each(files: list[Path]) -> list[Path]:
    """`files` in order, without a second path to a file already listed (the first path to it is kept)."""
    seen: set[str] = set()
    unique = []
    for path in files:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            unique.append(path)
    return unique

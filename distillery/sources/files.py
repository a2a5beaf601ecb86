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
        kind = existing_kind(path, item, field)
        if kind == "file":  # first: a real name may hold glob characters ("[AI-Hub] 1_구어체.xlsx")
            files.append(path)
        elif kind is None and any(ch in item for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True)
                             if Path(m).is_file() and Path(m).suffix.lower() in suffixes and not is_junk(Path(m)))
            if not matches:
                raise UserError(f"{field}: the pattern {item!r} matches no {'/'.join(suffixes)} file. Check the path "
                                f"(relative to {Path.cwd()}).")
            files.extend(matches)
        elif kind == "directory":
            matches = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes and not is_junk(p))
            if not matches:
                raise UserError(f"{field}: the directory {item} holds no {'/'.join(suffixes)} file.")
            files.extend(matches)
        elif os.path.lexists(path) and not os.path.islink(path):
            raise UserError(f"{field}: {item} is neither a file nor a directory (a pipe, a device or a socket): "
                            "point it at your data files.")
        else:
            raise missing_path(item, path, field)
    return once_each(files)


def existing_kind(path: Path, item: str, field: str) -> str | None:
    """"file", "directory" or None (nothing there); a path the system cannot even look up is the user's to fix."""
    if "\0" in item:
        raise UserError(f"{field}: {item!r} holds a null byte, which no path can. Check the path.")
    try:
        return "file" if path.is_file() else "directory" if path.is_dir() else None
    except (OSError, ValueError) as err:  # a name too long, a NUL byte
        reason = getattr(err, "strerror", None) or str(err)
        raise UserError(f"{field}: {item!r} is not a usable path ({reason}). Check the path.") from None


def walked_folder(item: str) -> Path | None:
    """The folder below which a spec item takes every file, now and whenever it is read again: a directory, or
    the fixed part of a `**` glob; None for a file or a one-level glob."""
    path = Path(item).expanduser()
    if "**" in item:
        fixed = []
        for part in path.parts:
            if glob.has_magic(part):
                break
            fixed.append(part)
        return Path(*fixed) if fixed else Path(".")
    return path if path.is_dir() else None


def inside(path: Path, directory: Path) -> bool:
    """Whether `path` (followed through symbolic links) lies in `directory`."""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(directory))


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

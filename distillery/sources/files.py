"""Turning a path spec from the config (a file, a list, a directory or a glob) into existing files."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Iterator

from distillery.core.errors import UserError
from distillery.core.unseen import holds_control
from distillery.core.userinput import missing_path


def is_junk(path: Path) -> bool:
    """Files no one means as data: Excel's lock files (`~$name.xlsx`, beside a workbook open in Excel) and what
    macOS leaves in folders and zips (`._name` AppleDouble files with a file's Finder metadata, `__MACOSX/`)."""
    return path.name.startswith(("~$", "._")) or "__MACOSX" in path.parts


def resolve_paths(spec: str | list[str], suffixes: tuple[str, ...], field: str,
                  exclude: Path | None = None) -> list[Path]:
    """Expand `spec` into a sorted list of files ending in one of `suffixes`.

    A directory contributes its matching files (recursively); a glob its matches with such a suffix (`data/*` by a
    README: the workbooks); a plain path must exist. Distillery runs inside a directory or below a glob's folder
    are left out (`files: .` in a project takes the user's files, not every run's outputs); a file named is read.
    A name that exists as written is that file or directory even where it holds glob characters ("[AI-Hub]
    1_구어체.xlsx", "[AI-Hub]/*.xlsx"), unless as a pattern it would also take other files: that is refused as
    ambiguous. Files in `exclude` (the run's own directory) are left out.
    Junk files (is_junk) are never read, and a file reached twice (through a symlink, or a `**` glob that
    follows a symlinked folder) is read once. Anything that matches nothing is a UserError naming the config
    field and the path.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    files: list[Path] = []
    excluded = os.path.realpath(exclude) if exclude else None

    def kept(paths: list[Path]) -> list[Path]:
        return [p for p in paths if not inside(p, excluded)] if excluded else paths

    for item in specs:
        path = Path(item).expanduser()
        kind = existing_kind(path, item, field)
        if glob.has_magic(item):
            refuse_a_run(literal_base(str(path)), item, field)
            found = glob_matches(str(path), suffixes)
            outside = outside_runs(found, literal_base(str(path)))
            matches = kept(outside)
            itself = os.path.realpath(path)
            others = [m for m in matches if not inside(m, itself)] if kind is not None else []
            if others:
                raise UserError(f"{field}: {item!r} names a {kind} and, read as a pattern, {len(others)} other "
                                "files. Write its glob characters in brackets ([[] for [, [*] for *) to mean the "
                                f"{kind} alone, or rename it.")
            if kind is None:
                files.extend(no_empty(matches, f"the pattern {item!r} matches", field, suffixes, found, outside))
                continue
        if kind == "file":
            if not kept([path]):
                raise UserError(f"{field}: {item} is in this run's own directory {exclude}, which ingest writes "
                                "into: copy it elsewhere first.")
            files.append(path)
        elif kind == "directory":
            refuse_a_run(path, item, field)
            found = walk(path, suffixes)
            outside = outside_runs(found, path)
            files.extend(no_empty(kept(outside), f"the directory {item} holds", field, suffixes, found, outside))
        elif os.path.exists(path):
            raise UserError(f"{field}: {item} is neither a file nor a directory (a pipe, a device or a socket): "
                            "point it at your data files.")
        else:
            raise missing_path(item, path, field)
    return once_each([utf8_named(path, field) for path in files])


def utf8_named(path: Path, field: str) -> Path:
    """`path`, when its name is UTF-8 (every name a run records is JSON) without control characters; a name in
    another encoding (a zip made on Korean Windows names its files in CP949) is the user's to rename, shown as CP949
    would read it, and so is one holding a line break or an escape (it would print as other lines or another name
    in every message that names it)."""
    if holds_control(str(path)):
        raise UserError(f"{field}: the file name {str(path)!r} holds a control character (a line break, a tab, an "
                        "escape). Rename it and run again.")
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raw = os.fsencode(path)
        try:
            guess = f" (in CP949: {raw.decode('cp949')!r})"
        except UnicodeDecodeError:
            guess = ""
        raise UserError(f"{field}: the file name {raw!r}{guess} is not UTF-8, as a zip made on Korean Windows names "
                        "its files. Rename it to UTF-8 (`convmv -f cp949 -t utf8 -r --notest <folder>`, or unzip "
                        "with `unzip -O cp949`) and run again.") from None
    return path


def glob_matches(pattern: str, suffixes: tuple[str, ...]) -> list[Path]:
    """The files a glob matches, with one of `suffixes`, junk and hidden names left out (glob's `*` leaves those
    out unless the pattern's part starts with a dot). The leading folders without glob characters, or the longest
    one that exists as written (a folder named "[AI-Hub]"), are taken literally. A `**` does not enter linked
    folders, as a directory's walk does not: two links of a folder to itself made glob's `**` list 2^40 paths."""
    base = literal_base(pattern)
    rest = list(Path(pattern).parts[len(base.parts) if base != Path(".") else 0:])
    if rest[-1] == "**":  # glob's `dir/**` is every file below; pathlib's, only the folders
        rest.append("*")
    dotted = any(part.startswith(".") for part in rest)
    return sorted(path for path in bounded(base.glob(str(Path(*rest))), pattern)
                  if (dotted or not any(part.startswith(".") for part in path.relative_to(base).parts))
                  and is_data_file(path, suffixes))


def literal_base(pattern: str) -> Path:
    """A glob's leading folders without glob characters, or the longest one that exists as written (a folder named
    "[AI-Hub]"); "." when the first part is a pattern."""
    parts = Path(pattern).parts
    literal = next(n for n, part in enumerate(parts) if glob.has_magic(part))
    literal = next((n for n in range(len(parts) - 1, literal, -1) if os.path.isdir(Path(*parts[:n]))), literal)
    return Path(*parts[:literal]) if literal else Path(".")


def outside_runs(paths: list[Path], top: Path) -> list[Path]:
    """`paths` less those inside a Distillery run (a folder holding a run's manifest.json) below `top`."""
    runs: dict[Path, bool] = {}

    def in_a_run(path: Path) -> bool:
        for folder in path.parents:
            if folder == top or folder == Path("."):
                return False
            if folder not in runs:
                runs[folder] = is_run_directory(folder)
            if runs[folder]:
                return True
        return False

    return [path for path in paths if not in_a_run(path)]


MAX_ENTRIES = 1_000_000  # what a directory's walk, or a glob's matches, may count: `files: /` walked the whole disk


def walk(directory: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in bounded(directory.rglob("*"), str(directory)) if is_data_file(p, suffixes))


def bounded(paths: Iterator[Path], spec: str) -> Iterator[Path]:
    """`paths`, refused past MAX_ENTRIES: the whole disk, or a folder of millions of files, is no data folder."""
    for n, path in enumerate(paths):
        if n >= MAX_ENTRIES:
            raise UserError(f"{spec} holds more than {MAX_ENTRIES:,} files and folders: point at the folder or the "
                            "files that hold the data.")
        yield path


def is_data_file(path: Path, suffixes: tuple[str, ...]) -> bool:
    """Whether `path` is a data file: its suffix first (no system call for the rest of a folder, where some entry
    may not even be looked up: /proc/1/cwd in a walk of /), then that it is a regular file. A data file the system
    will not look up is the user's to fix."""
    if path.suffix.lower() not in suffixes or is_junk(path):
        return False
    try:
        return path.is_file()
    except OSError as err:
        raise UserError(f"{path} cannot be looked up ({err.strerror or err}). Fix its permissions, or move it out "
                        "of the data folder.") from None


def no_empty(matches: list[Path], what: str, field: str, suffixes: tuple[str, ...], found: list[Path] = (),
             outside: list[Path] = ()) -> list[Path]:
    """`matches`, or the error that none are left: none `found` at all, only files inside runs (none `outside`
    them), or only files of this run's own directory."""
    if not matches and outside:
        raise UserError(f"{field}: {what} only files in this run's own directory, which ingest writes into, such as "
                        f"{outside[0]}: copy them elsewhere first.")
    if not matches and found:
        raise UserError(f"{field}: {what} only files inside Distillery runs, which a folder or a pattern leaves out "
                        f"(a run's outputs are not data), such as {found[0]}. Name a file itself to read it.")
    if not matches:
        raise UserError(f"{field}: {what} no {'/'.join(suffixes)} file. Check the path (relative to {Path.cwd()}).")
    return matches


def refuse_a_run(path: Path, item: str, field: str) -> None:
    """A UserError when `path`, a folder named or a pattern's leading folders, is a Distillery run: its manifest and
    every stage's outputs are not data."""
    if is_run_directory(path):
        raise UserError(f"{field}: {item} reads a Distillery run's folder {path} (it holds the run's manifest.json): "
                        f"name the files you mean in its stage folders ({path / 'ingest'} and the others).")


def is_run_directory(path: Path) -> bool:
    from distillery.core.rundir import is_run_manifest

    return is_run_manifest(path / "manifest.json")


def existing_kind(path: Path, item: str, field: str) -> str | None:
    """"file", "directory" or None (nothing there); a path the system cannot even look up is the user's to fix."""
    if "\0" in item:
        raise UserError(f"{field}: {item!r} holds a null byte, which no path can. Check the path.")
    try:
        return "file" if path.is_file() else "directory" if path.is_dir() else None
    except (OSError, ValueError) as err:  # a name too long, a NUL byte
        reason = getattr(err, "strerror", None) or str(err)
        raise UserError(f"{field}: {item!r} is not a usable path ({reason}). Check the path.") from None


def inside(path: Path, directory: str) -> bool:
    """Whether `path` (followed through symbolic links) lies in `directory` (a real path)."""
    return Path(os.path.realpath(path)).is_relative_to(directory)


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

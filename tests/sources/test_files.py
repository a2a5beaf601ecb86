"""resolve_paths: symbolic links that lead nowhere are named as what they are; macOS and Excel junk is skipped."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from distillery.core.errors import UserError
from distillery.sources.files import resolve_paths
from tests.fixtures import aihub

XLSX = (".xlsx",)


def test_a_symlink_loop_is_called_a_loop_not_missing(tmp_path: Path) -> None:
    (tmp_path / "a.xlsx").symlink_to(tmp_path / "b.xlsx")
    (tmp_path / "b.xlsx").symlink_to(tmp_path / "a.xlsx")
    with pytest.raises(UserError, match=r"path: .*a.xlsx is a loop of symbolic links \(it points to .*b.xlsx"):
        resolve_paths(str(tmp_path / "a.xlsx"), XLSX, "path")


def test_a_dangling_symlink_names_its_target(tmp_path: Path) -> None:
    (tmp_path / "data").symlink_to(tmp_path / "moved-away")
    with pytest.raises(UserError, match=r"data is a symbolic link to .*moved-away, which does not exist"):
        resolve_paths(str(tmp_path / "data"), XLSX, "path")


def test_macos_metadata_files_in_a_directory_or_glob_are_skipped(tmp_path: Path) -> None:
    good = aihub.write_layout(tmp_path / "d" / "구어체.xlsx", "구어체")
    aihub.write_apple_double(tmp_path / "d" / "._구어체.xlsx")
    aihub.write_apple_double(tmp_path / "d" / "__MACOSX" / "._구어체.xlsx")
    (tmp_path / "d" / "__MACOSX" / "구어체.xlsx").write_bytes(good.read_bytes())
    assert resolve_paths(str(tmp_path / "d"), XLSX, "path") == [good]
    assert resolve_paths(str(tmp_path / "d" / "**" / "*.xlsx"), XLSX, "path") == [good]


def test_a_file_reached_through_a_symlinked_folder_is_read_once(tmp_path: Path) -> None:
    good = aihub.write_layout(tmp_path / "d" / "a.xlsx", "구어체")
    (tmp_path / "d" / "back").symlink_to(tmp_path / "d")
    assert resolve_paths(str(tmp_path / "d" / "**" / "*.xlsx"), XLSX, "path") == [good]
    assert resolve_paths([str(good), str(tmp_path / "d" / "back" / "a.xlsx")], XLSX, "path") == [good]


def test_a_glob_over_a_folder_linked_into_itself_ends(tmp_path: Path) -> None:
    """Two links of a folder to itself: glob's `**` listed 2^40 paths and never ended. A `**` does not enter
    linked folders, as a directory's walk does not; `d/**` is every file below, hidden ones left out as glob does."""
    good = aihub.write_layout(tmp_path / "d" / "a.xlsx", "구어체")
    for link in ("x", "y"):
        (tmp_path / "d" / link).symlink_to(".")
    (tmp_path / "d" / ".cache").mkdir()
    (tmp_path / "d" / ".cache" / "old.xlsx").write_bytes(good.read_bytes())
    for pattern in ("**/*.xlsx", "**", "*"):
        assert resolve_paths(str(tmp_path / "d" / pattern), XLSX, "path") == [good]
    assert resolve_paths(str(tmp_path / "d" / ".*" / "*.xlsx"), XLSX, "path") == [tmp_path / "d" / ".cache" / "old.xlsx"]


def test_a_glob_reads_only_the_kind_of_file_it_is_for(tmp_path: Path) -> None:
    """`data/*` over workbooks and their README: the workbooks, as a directory gives them; a glob that matches
    only other files says what it looked for."""
    good = aihub.write_layout(tmp_path / "d" / "구어체.xlsx", "구어체")
    (tmp_path / "d" / "README.md").write_text("AI-Hub ko-en, downloaded 2026-11", encoding="utf-8")
    assert resolve_paths(str(tmp_path / "d" / "*"), XLSX, "path") == [good]
    with pytest.raises(UserError, match=r"path: the pattern .*\*\.md' matches no \.xlsx file"):
        resolve_paths(str(tmp_path / "d" / "*.md"), XLSX, "path")


def test_a_file_whose_name_holds_glob_characters_is_read_as_named(tmp_path: Path) -> None:
    """AI-Hub downloads are named like "[AI-Hub] 1_구어체.xlsx": given as such, or found in a folder (ingest then
    reads each file by its path), `[` began a glob pattern that matched nothing."""
    good = aihub.write_layout(tmp_path / "[AI-Hub] d" / "[AI-Hub] 1_구어체*?.xlsx", "구어체")
    assert resolve_paths(str(good), XLSX, "path") == [good]
    assert resolve_paths(str(good.parent), XLSX, "path") == [good]
    assert resolve_paths(str(good.parent / "*.xlsx"), XLSX, "path") == [good]  # the folder's name taken as written


def test_a_name_that_is_a_file_and_a_pattern_of_other_files_is_refused_as_ambiguous(tmp_path: Path) -> None:
    """`[ab].xlsx` beside a.xlsx and b.xlsx read those two; read as the one file, it would silently change what an
    existing config reads."""
    for name in ("a.xlsx", "b.xlsx", "[ab].xlsx"):
        aihub.write_layout(tmp_path / name, "구어체")
    with pytest.raises(UserError, match=r"path: '.*\[ab\].xlsx' names a file and, read as a pattern, 2 other files. "
                                        r"Write its glob characters in brackets \(\[\[\] for \["):
        resolve_paths(str(tmp_path / "[ab].xlsx"), XLSX, "path")
    assert resolve_paths(str(tmp_path / "[[]ab].xlsx"), XLSX, "path") == [tmp_path / "[ab].xlsx"]


@pytest.mark.parametrize("name, reason", [("a\0b*.xlsx", "holds a null byte, which no path can"),
                                          ("x" * 300 + ".xlsx", "is not a usable path \\(File name too long\\)")])
def test_a_path_the_system_cannot_look_up_is_named(tmp_path: Path, name: str, reason: str) -> None:
    with pytest.raises(UserError, match=f"path: .* {reason}"):
        resolve_paths(str(tmp_path / name), XLSX, "path")


def test_a_pipe_given_by_name_is_named_as_what_it_is(tmp_path: Path) -> None:
    import os

    os.mkfifo(tmp_path / "data.xlsx")
    with pytest.raises(UserError, match=r"path: .*data.xlsx is neither a file nor a directory \(a pipe, a device"):
        resolve_paths(str(tmp_path / "data.xlsx"), XLSX, "path")


@pytest.mark.parametrize("name", ["\u200b", " "])
def test_a_missing_name_that_shows_nothing_is_shown_escaped(tmp_path: Path, name: str, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=f"path: {re.escape(ascii(name))} does not exist"):
        resolve_paths(name, XLSX, "path")


def test_a_folder_entry_the_system_will_not_look_up_stops_the_walk_only_when_it_is_data(tmp_path: Path,
                                                                                    monkeypatch) -> None:
    """Like /proc/1/cwd in a walk of / (EACCES even for root): a data file is named, anything else is not read."""
    (tmp_path / "a.xlsx").touch()
    (tmp_path / "cwd").symlink_to(tmp_path)
    (tmp_path / "b.xlsx").touch()
    looked_up = Path.is_file

    def is_file(path: Path) -> bool:
        if path.name in ("cwd", "b.xlsx"):
            raise PermissionError(13, "Permission denied", str(path))
        return looked_up(path)

    monkeypatch.setattr(Path, "is_file", is_file)
    with pytest.raises(UserError, match=r"b.xlsx cannot be looked up \(Permission denied\). Fix its permissions"):
        resolve_paths(str(tmp_path), XLSX, "path")
    (tmp_path / "b.xlsx").unlink()
    assert resolve_paths(str(tmp_path), XLSX, "path") == [tmp_path / "a.xlsx"]


def test_a_file_named_in_cp949_is_named_with_the_fix(tmp_path: Path) -> None:
    """AI-Hub zips made on Korean Windows name their files in CP949: every name a run records is JSON (UTF-8)."""
    import os

    (tmp_path / "a.xlsx").touch()
    with open(os.path.join(os.fsencode(tmp_path), "구어체".encode("cp949") + b".xlsx"), "wb"):
        pass
    with pytest.raises(UserError, match=r"path: the file name b'.*\\xb1\\xb8.*\.xlsx' \(in CP949: '.*구어체\.xlsx'\) is "
                                        r"not UTF-8, as a zip made on Korean Windows names its files. Rename it"):
        resolve_paths(str(tmp_path), XLSX, "path")


@pytest.mark.parametrize("name", ["nl\nFAKE: all good.xlsx", "e\x1b[2J\x1b[31mRED.xlsx"])
def test_a_data_file_whose_name_holds_a_control_character_is_refused_shown_escaped(tmp_path: Path, name: str) -> None:
    """Printed in a message, a line break in a name made lines of its own and an escape showed another name."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / name).touch()
    with pytest.raises(UserError, match=rf"path: the file name .*{re.escape(repr(name)[1:-1])}' holds a control "
                                        "character"):
        resolve_paths(str(tmp_path / "d"), XLSX, "path")


def test_a_folder_or_glob_of_more_entries_than_any_data_folder_is_refused(tmp_path: Path, monkeypatch) -> None:
    """`files: /` walked the whole disk."""
    from distillery.sources import files

    monkeypatch.setattr(files, "MAX_ENTRIES", 5)
    for i in range(6):
        (tmp_path / "d" / f"sub{i}").mkdir(parents=True)
    for spec in (str(tmp_path / "d"), str(tmp_path / "d" / "*")):  # a glob: what it matches
        with pytest.raises(UserError, match=r"holds more than 5 files and folders: point at the folder"):
            resolve_paths(spec, XLSX, "path")

"""aihub_excel against hostile workbooks: each is one clear message (file, sheet, cell, fix) or a reading with
what was dropped and why in the report; never a dead process, a hang or a silent wrong record."""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path
from typing import Any

import pytest
import yaml

from distillery.config import load_config
from distillery.core.errors import UserError
from distillery.runner import run_stage
from distillery.sources import SourceReport, excel, workbook
from distillery.sources.excel import AIHubExcelParams
from tests.fixtures import aihub


def read(path: Any, **overrides: Any) -> tuple[list[dict], SourceReport]:
    report = SourceReport("ko-en")
    params = AIHubExcelParams(name="ko-en", kind="aihub_excel", path=str(path), direction="ko_en", **overrides)
    return list(excel.read(params, report)), report


def english(records: list[dict]) -> list[str]:
    return [r["messages"][1]["content"] for r in records]


@pytest.mark.parametrize("cells, rows, rest", [(["XFD1048576"], 10, "C11"), (["AAA500000"], 10, "C11"),
                                                (["XFD2"], 20_000, "C20001"),
                                                (["XFD1048576", "XFD1048575", "XFD1048574"], 10, "C11")])
def test_stray_values_far_away_are_refused_naming_them_and_the_process_lives(tmp_path: Path, cells: list[str],
                                                                              rows: int, rest: str) -> None:
    """calamine holds a sheet as one block up to its farthest cell: 512 GiB for XFD1048576, which aborted the process."""
    path = aihub.write_stray_cell(tmp_path / "stray.xlsx", cells, rows)
    with pytest.raises(UserError) as refused:
        read(path)
    message = str(refused.value)
    assert f"stray.xlsx (sheet 'Sheet1'): cell" in message and f"far outside the rest of the data, which ends at {rest}." in message
    named = message.split("Clear ", 1)[1].split(" in Excel")[0].split(" and ")
    assert sorted(named) == sorted(cells)
    assert len(read(aihub.write_layout(tmp_path / "good.xlsx", "구어체"))[0]) == len(aihub.PAIRS)  # and reads on


def ingest_fails(tmp_path: Path, workers: int = 1) -> str:
    """Ingest of the workbooks in tmp_path/d: its one message; it fails leaving nothing half-written."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"run": {"name": "s", "root": str(tmp_path / "runs")}, "ingest": {
        "workers": workers, "sources": [{"name": "ko-en", "kind": "aihub_excel", "path": str(tmp_path / "d")}]}},
        allow_unicode=True), encoding="utf-8")
    with pytest.raises(UserError) as refused:
        run_stage("ingest", load_config(config))
    run = tmp_path / "runs" / "s"
    assert not (run / "ingest").exists() and not (run / ".ingest.partial").exists()
    assert json.loads((run / "manifest.json").read_text())["stages"]["ingest"]["status"] == "failed"
    return str(refused.value)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_stray_value_in_ingest_fails_cleanly_in_one_process_or_two(tmp_path: Path, workers: int) -> None:
    aihub.write_layout(tmp_path / "d" / "1_good.xlsx", "구어체")
    aihub.write_stray_cell(tmp_path / "d" / "2_stray.xlsx")
    assert re.search(r"2_stray.xlsx \(sheet 'Sheet1'\): cell XFD1048576 holds a value far outside",
                     ingest_fails(tmp_path, workers))


def test_values_spread_too_far_for_a_few_stray_cells_are_refused_as_needing_too_much_memory(tmp_path: Path) -> None:
    """More far cells than stray_cell names: the reader's memory budget is the limit, and the message says so."""
    far = [f"{column}{1048576 - i}" for i, column in enumerate(["XFD", "XFC", "XFB", "XFA", "XEZ", "XEY", "XEX"])]
    (tmp_path / "d").mkdir()
    path = aihub.write_stray_cell(tmp_path / "d" / "spread.xlsx", far)
    assert re.fullmatch(rf"{re.escape(str(path))} \(sheet 'Sheet1'\): reading it needs more memory than a workbook "
                        r"of [\d.]+ KB may take \([\d.]+ GB\) \(it asked for [\d.]+ GB at once\)\. Something in it "
                        r"claims far more than it holds: open it in Excel, delete empty rows and columns past the "
                        r"data, and save it again\.", ingest_fails(tmp_path))


def test_a_reader_past_its_cpu_time_is_one_message_naming_the_workbook(tmp_path: Path, monkeypatch) -> None:
    """SIGXCPU ends the reading child past its CPU budget (60 s and more; 0 s here: the child's limit is in whole
    seconds, so it may go on for up to 1 s, far less than openpyxl takes for 200,000 rows)."""
    monkeypatch.setattr(workbook, "cpu_budget", lambda unpacked: 0)
    (tmp_path / "d").mkdir()
    path = aihub.write_many_rows_only_openpyxl_reads(tmp_path / "d" / "slow.xlsx", 200_000)
    assert re.fullmatch(rf"{re.escape(str(path))} \(sheet 'Sheet1'\): reading it took more than 0 s of CPU time, "
                        r"far more than a workbook of [\d.]+ MB needs\. Open it in Excel and save it again, or "
                        r"replace it with a good copy\.", ingest_fails(tmp_path))


@pytest.mark.parametrize("shared, varied_every, run_length", [
    (False, 0, 0), (True, 0, 0), (True, 60, 0), (False, 0, 50), (True, 0, 50), (False, 60, 50), (True, 60, 50)],
    ids=["inline text", "shared string", "shared string packing 40 times", "rich-text runs", "shared rich-text runs",
         "rich-text runs packing less", "shared rich-text runs packing less"])
def test_a_cell_that_unpacks_far_past_excel_s_limit_is_refused_before_reading_naming_the_cell(
        tmp_path: Path, shared: bool, varied_every: int, run_length: int) -> None:
    """A cell's text counts over all its rich-text runs (`<r><t>`), none of which is long on its own."""
    path = aihub.write_inflating_cell(tmp_path / "bomb.xlsx", 8 << 20, shared=shared, cell="C5",
                                      varied_every=varied_every, run_length=run_length)
    assert path.stat().st_size < 400_000
    part = "xl/sharedStrings.xml" if shared else "xl/worksheets/sheet1.xml"
    with pytest.raises(UserError, match=rf"bomb.xlsx \(sheet 'Sheet1'\): cell C5 holds more text than the 32,767 "
                                        rf"characters Excel lets a cell hold, and its part {part} unpacks to [\d.]+ MB "
                                        r"from [\d.]+ KB \([\d,]+ times; .*\): a zip bomb"):
        read(path)


def test_a_workbook_unpacking_past_max_unpacked_mb_is_refused(tmp_path: Path) -> None:
    path = aihub.write_many_rows(tmp_path / "many.xlsx", 8000)
    assert len(read(path)[0]) == 8000
    with pytest.raises(UserError, match=r"many.xlsx: the workbook unpacks to [\d.]+ MB \(xl/worksheets/sheet1.xml alone "
                                        r".*\), more than this source allows \(`max_unpacked_mb: 1`\)"):
        read(path, max_unpacked_mb=1)


def test_a_cell_longer_than_excel_allows_is_dropped_with_the_reason(tmp_path: Path) -> None:
    records, report = read(aihub.write_inflating_cell(tmp_path / "long.xlsx", 40_000, cell="C3"))
    assert len(records) == len(aihub.PAIRS) - 1
    assert report.dropped_rows == [{"source": "ko-en", "reason": "longer than Excel's 32,767 characters in 번역문",
                                    "file": str(tmp_path / "long.xlsx"), "sheet": "Sheet1", "row": 3, "column": "번역문"}]


@pytest.mark.parametrize("suffix", [".xlsx", ".xls"])
def test_a_hidden_first_sheet_is_not_read_by_default_and_the_note_says_which_was(tmp_path: Path, suffix: str) -> None:
    if suffix == ".xls":
        pytest.importorskip("xlwt")
    path = aihub.write_hidden_first_sheet(tmp_path / f"h{suffix}")
    records, report = read(path)
    assert len(records) == 100 and {r["meta"]["sheet"] for r in records} == {"데이터"}
    assert report.notes == [f"h{suffix}: read sheet '데이터', the first visible one; not read: '이전' (hidden) "
                            "(`sheet:` picks another)"]
    stale, report = read(path, sheet="이전")
    assert len(stale) == 5 and report.notes == [f"h{suffix}: read sheet '이전', which is hidden in the workbook, "
                                                "as `sheet:` asks"]


@pytest.mark.parametrize("layout", ["구어체", "한국문화"])
def test_a_header_repeated_mid_sheet_is_dropped_and_read_by(tmp_path: Path, layout: str) -> None:
    records, report = read(aihub.write_pasted_exports(tmp_path / "p.xlsx", second_layout=layout))
    assert len(records) == 105 and "번역문" not in english(records)
    assert dict(report.dropped) == {"repeated header row": 1} and report.dropped_rows[0]["row"] == 102
    assert records[-1]["meta"]["row"] == 107 and ("키워드" in records[-1]["meta"]) == (layout == "한국문화")
    assert english(records)[-1] == aihub.numbered(aihub.PAIRS[::-1], 105)[104][1]


def test_a_row_holding_a_text_column_s_own_name_is_a_header_again(tmp_path: Path) -> None:
    rows = [list(aihub.LAYOUT_COLUMNS["구어체"]), [1, *aihub.PAIRS[0]], [None, " 원문 ", "Translation"],
            ["SID", "Original", "\ufeff번역문"], [2, *aihub.PAIRS[1]]]
    records, report = read(aihub.write_rows(tmp_path / "h.xlsx", rows))
    assert english(records) == [aihub.PAIRS[0][1], aihub.PAIRS[1][1]]
    assert [(d["row"], d["reason"]) for d in report.dropped_rows] == [(3, "repeated header row"), (4, "repeated header row")]


def test_invisible_only_translations_are_dropped_and_control_characters_removed_with_a_note(tmp_path: Path) -> None:
    path = aihub.write_invisible_and_control_cells(tmp_path / "i.xlsx")
    records, report = read(path)
    invisible = {row: reason for row, reason in ((d["row"], d["reason"]) for d in report.dropped_rows)}
    assert invisible == {2: "only invisible characters in 번역문", 3: "only invisible characters in 번역문",
                         4: "only invisible characters in 번역문", 5: "empty 번역문", 6: "empty 번역문",
                         7: "only invisible characters in 번역문", 8: "only invisible characters in 번역문"}
    assert english(records) == ["AB C" + aihub.PAIRS[1][1], aihub.PAIRS[2][1]]
    assert report.notes == ["i.xlsx [Sheet1]: control characters (U+0000 U+0001 U+0008 U+000B) removed from 1 "
                            "cell(s) in 번역문"]


def test_a_header_written_with_invisible_characters_or_decomposed_hangul_is_read_and_noted(tmp_path: Path) -> None:
    header = ["\ufeffSID", unicodedata.normalize("NFD", "원문"), "번\u200b역문"]
    records, report = read(aihub.write_header_written_differently(tmp_path / "h.xlsx", header))
    assert len(records) == len(aihub.PAIRS) and records[0]["meta"]["SID"] == 100
    assert report.notes == ["h.xlsx [Sheet1]: header cell(s) SID [U+FEFF U+0053 U+0049 U+0044], "
                            f"{header[1]} [U+110B U+116F U+11AB U+1106 U+116E U+11AB], 번\u200b역문 [U+BC88 U+200B U+C5ED "
                            "U+BB38] read as SID, 원문, 번역문 (invisible characters dropped, Hangul composed)"]


def test_a_missing_column_shows_the_code_points_of_names_that_differ_invisibly(tmp_path: Path) -> None:
    path = aihub.write_header_written_differently(tmp_path / "h.xlsx", ["SID", "원문", "번역\u00a0문"])
    with pytest.raises(UserError, match=r"\(row 1 has SID, 원문, 번역\xa0문 \[U\+BC88 U\+C5ED U\+00A0 U\+BB38\]\)"):
        read(path)


def test_a_sheet_with_mostly_swapped_languages_is_refused_with_counts(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"s.xlsx \(sheet 'Sheet1'\): 200 of 200 rows have English in 원문 and Korean "
                                        r"in 번역문 .*Set `source_column: 번역문` and `target_column: 원문`"):
        read(aihub.write_swapped(tmp_path / "s.xlsx", swapped=200, rows=200))


def test_a_few_swapped_rows_are_dropped_and_counted(tmp_path: Path) -> None:
    records, report = read(aihub.write_swapped(tmp_path / "s.xlsx", swapped=3, rows=50))
    assert len(records) == 47 and dict(report.dropped) == {"languages swapped (English in 원문, Korean in 번역문)": 3}
    assert report.notes == ["s.xlsx [Sheet1]: 3 row(s) with English in 원문 and Korean in 번역문 dropped as swapped "
                            "(the first on Excel row 2)"]


def test_password_protected_workbooks_are_called_encrypted_whatever_their_name(tmp_path: Path) -> None:
    pytest.importorskip("xlwt")
    for path in (aihub.write_encrypted_xls(tmp_path / "real.xls"), aihub.write_encrypted(tmp_path / "office.xls")):
        with pytest.raises(UserError, match=rf"{path.name}: the workbook is encrypted \(password-protected\)"):
            read(path)


def test_an_xls_that_only_mentions_encryption_in_a_cell_is_read(tmp_path: Path) -> None:
    pytest.importorskip("xlwt")
    pairs = [("EncryptionInfo 암호화 정보", "EncryptionInfo"), *aihub.PAIRS[1:]]
    rows = [list(aihub.LAYOUT_COLUMNS["구어체"]), *aihub.layout_rows("구어체", pairs)]
    records, _ = read(aihub.write_xls(tmp_path / "mentions.xls", [("Sheet1", rows, False)]))
    assert len(records) == len(aihub.PAIRS)


def test_an_xlsx_under_an_xls_name_is_read_and_noted(tmp_path: Path) -> None:
    path = tmp_path / "misnamed.xls"
    path.write_bytes(aihub.write_layout(tmp_path / "a.xlsx", "구어체").read_bytes())
    records, report = read(path)
    assert len(records) == len(aihub.PAIRS)
    assert report.notes == ["misnamed.xls: an .xlsx workbook under an .xls name; read as .xlsx"]


def test_an_error_the_excel_reader_raises_itself_names_the_file_and_the_sheet(tmp_path: Path) -> None:
    """A sheet calamine refuses goes to openpyxl; a style index that is no number made openpyxl raise ValueError,
    which ended ingest as 'unexpected' (exit 1)."""
    path = aihub.write_calamine_unreadable(tmp_path / "u.xlsx")
    aihub.rewrite_parts(path, {aihub.SHEET1: lambda xml: xml.replace(b'<c r="A6" t="n">', b'<c r="A6" t="n" s="abc">')})
    with pytest.raises(UserError, match=r"u.xlsx \(sheet 'Sheet1'\): the Excel readers cannot read it \(ValueError: "
                                        r"invalid literal .*'abc'\): the file is damaged .* Open it in Excel and save"):
        read(path)


def test_records_that_would_fill_the_disk_stop_the_source_before_it_is_full(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A 0.1 MB workbook of 200 columns with 1,000-character names made 40 MB of records (every named column goes
    into each record's meta; a 741 KB one made 193 MB). On a disk of `free` bytes the source stops while 8 MB are
    still free: the shards written are counted against it, looked at every 1 MB."""
    import shutil

    from distillery.sources import shards

    header = list(aihub.LAYOUT_COLUMNS["구어체"]) + [f"{i:03d}" + "x" * 997 for i in range(200)]
    aihub.write_rows(tmp_path / "d" / "wide.xlsx", [header, *aihub.layout_rows("구어체", aihub.numbered(aihub.PAIRS, 200))])
    free = 16 << 20
    usage = shutil.disk_usage(tmp_path)

    def disk_usage(path: Any) -> Any:
        written = sum(p.stat().st_size for p in (tmp_path / "runs").rglob("*") if p.is_file())
        return usage._replace(free=free - written)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    monkeypatch.setattr(shards, "DISK_RESERVE", 8 << 20)
    monkeypatch.setattr(shards, "DISK_CHECK_BYTES", 1 << 20)
    message = ingest_fails(tmp_path)
    assert re.fullmatch(r"source ko-en: its records take [\d.]+ MB so far, and the disk holding .* has less than "
                        r"8.4 MB left \(ingest keeps that much free\)\. Free some space, or check the source: .*",
                        message), message
    monkeypatch.setattr(shards, "DISK_RESERVE", 64 << 20)  # a disk short of room from the start: no "0 bytes so far"
    assert re.fullmatch(r"source ko-en: the disk holding .* has less than 67.1 MB left \(ingest keeps that much free\)"
                        r"\. Free some space, or set run.root to a directory on a disk with more room\.",
                        ingest_fails(tmp_path)), message


def with_member(path: Path, name: str, data: bytes, header_patch: tuple[int, int, bytes] | None = None) -> Path:
    """`path` with a zip member `name` added, and optionally bytes patched in that member's local and central
    headers at (local offset, central offset, bytes): a wrong CRC, a compression method, a flag."""
    import zipfile

    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, data)
    if header_patch:
        raw = bytearray(path.read_bytes())
        local, central, value = header_patch
        head = raw.rindex(b"PK\x01\x02")  # the last central entry: the member added
        offset = int.from_bytes(raw[head + 42:head + 46], "little")
        raw[offset + local:offset + local + len(value)] = value
        raw[head + central:head + central + len(value)] = value
        path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("patch, why", [((14, 16, b"\0\0\0\0"), "Bad CRC-32"),
                                        ((8, 10, (98).to_bytes(2, "little")), "compression method"),
                                        ((6, 8, b"\x01\x00"), "encrypted")])
def test_a_damaged_worksheet_part_is_one_message_naming_it(tmp_path: Path, patch: tuple, why: str) -> None:
    """An extra, unreferenced worksheet part that cannot be unpacked ended ingest as a bug in Distillery: the
    search for formula and error cells reads every worksheet part in the pipeline process."""
    path = with_member(aihub.write_layout(tmp_path / "w.xlsx", "구어체"), "xl/worksheets/zz.xml",
                       b'<c r="A1" t="e"><v>#N/A</v></c>' * 50, patch)
    with pytest.raises(UserError, match=rf"w\.xlsx: the workbook is damaged: its part xl/worksheets/zz\.xml cannot "
                                        rf"be unpacked \(.*{why}.*\)\. Replace it with a good copy"):
        read(path)


def test_an_index_part_that_packs_like_a_zip_bomb_is_refused_without_being_read(tmp_path: Path, monkeypatch) -> None:
    """xl/workbook.xml padded to 500 MB (a 515 KB file) was parsed whole in the pipeline process, at 3 times its
    size, before the packing ratio was even looked at."""
    import zipfile

    plain = aihub.write_layout(tmp_path / "plain.xlsx", "구어체")
    path = tmp_path / "bomb.xlsx"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "xl/workbook.xml":
                data = data.replace(b"</workbook>", b" " * (workbook.INDEX_BYTES + (1 << 20)) + b"</workbook>")
            dst.writestr(item.filename, data)
    read_whole = zipfile.ZipFile.read

    def read_member(archive: zipfile.ZipFile, name: Any, *args: Any) -> bytes:
        assert name != "xl/workbook.xml", "the padded index was read whole"
        return read_whole(archive, name, *args)

    monkeypatch.setattr(zipfile.ZipFile, "read", read_member)
    with pytest.raises(UserError, match=r"bomb\.xlsx: its part xl/workbook\.xml unpacks to 17\.\d MB from .* a zip "
                                        r"bomb, not a workbook"):
        workbook.check_unpacked_size(path, 1 << 40)

"""aihub_excel: every AI-Hub layout, direction, path form, odd cell and bad workbook."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from distillery.sources import SourceReport, excel, workbook
from distillery.sources.excel import AIHubExcelParams
from distillery.core.errors import UserError
from tests.fixtures import aihub


def params(path: Any, **overrides: Any) -> AIHubExcelParams:
    return AIHubExcelParams(name="ko-en", kind="aihub_excel", path=path if isinstance(path, list) else str(path), **overrides)


def read(path: Any, **overrides: Any) -> tuple[list[dict], SourceReport]:
    report = SourceReport("ko-en")
    return list(excel.read(params(path, **overrides), report)), report


@pytest.mark.parametrize("layout", list(aihub.LAYOUT_COLUMNS))
def test_every_aihub_layout_gives_one_ko_en_record_a_row_with_the_other_columns_in_meta(tmp_path: Path, layout: str) -> None:
    path = aihub.write_layout(tmp_path / f"{layout}.xlsx", layout)
    records, report = read(path)
    assert report.read == len(aihub.PAIRS) and not report.dropped and not report.notes
    assert [r["task"] for r in records] == ["translate_ko_en"] * len(aihub.PAIRS)
    first = records[0]
    korean, english = aihub.PAIRS[0]
    assert first["messages"] == [
        {"role": "user", "content": f"Translate the following Korean text into English.\n\n{korean}"},
        {"role": "assistant", "content": english}]
    others = [c for c in aihub.LAYOUT_COLUMNS[layout] if c not in ("원문", "번역문")]
    expected = aihub.other_cells(layout, 0)
    assert first["meta"] == {"file": str(path), "sheet": "Sheet1", "row": 2, **{c: expected[c] for c in others}}
    assert [r["meta"]["row"] for r in records] == list(range(2, 2 + len(aihub.PAIRS)))


def test_direction_en_ko_swaps_the_sides(tmp_path: Path) -> None:
    records, _ = read(aihub.write_layout(tmp_path / "a.xlsx", "구어체"), direction="en_ko")
    korean, english = aihub.PAIRS[1]
    assert records[1]["task"] == "translate_en_ko"
    assert records[1]["messages"] == [
        {"role": "user", "content": f"Translate the following English text into Korean.\n\n{english}"},
        {"role": "assistant", "content": korean}]


def test_direction_both_gives_two_records_a_row_with_distinct_ids(tmp_path: Path) -> None:
    records, report = read(aihub.write_layout(tmp_path / "a.xlsx", "대화체"), direction="both")
    assert report.read == len(aihub.PAIRS) and len(records) == 2 * len(aihub.PAIRS)
    assert [r["task"] for r in records[:2]] == ["translate_ko_en", "translate_en_ko"]
    assert records[0]["meta"] == records[1]["meta"] and len({r["id"] for r in records}) == len(records)


def test_configurable_columns_and_instructions(tmp_path: Path) -> None:
    path = aihub.write_rows(tmp_path / "custom.xlsx", [["en", "ko", "note"], ["Good night.", "잘 자요.", "인사"]])
    records, _ = read(path, source_column="ko", target_column="en", instruction_ko_en="영어로: {text}")
    assert records[0]["messages"] == [{"role": "user", "content": "영어로: 잘 자요."},
                                      {"role": "assistant", "content": "Good night."}]
    assert records[0]["meta"]["note"] == "인사"


def test_an_instruction_without_the_text_placeholder_is_refused(tmp_path: Path) -> None:
    path = aihub.write_layout(tmp_path / "a.xlsx", "구어체")
    with pytest.raises(UserError, match=r"instruction_en_ko.*\{text\}"):
        read(path, direction="both", instruction_en_ko="Translate into Korean.")


def test_a_list_a_directory_and_a_glob_read_every_workbook(tmp_path: Path) -> None:
    one = aihub.write_layout(tmp_path / "d" / "구어체.xlsx", "구어체", aihub.PAIRS[:2])
    two = aihub.write_layout(tmp_path / "d" / "sub" / "뉴스.xlsx", "뉴스", aihub.PAIRS[2:])
    (tmp_path / "d" / "notes.txt").write_text("not a workbook")
    by_list, _ = read([str(one), str(two)])
    by_dir, _ = read(tmp_path / "d")
    by_glob, _ = read(str(tmp_path / "d" / "**" / "*.xlsx"))
    assert len(by_list) == len(by_dir) == len(by_glob) == len(aihub.PAIRS)
    assert {r["meta"]["file"] for r in by_dir} == {str(one), str(two)}


def test_header_below_row_1_is_found_and_noted(tmp_path: Path) -> None:
    records, report = read(aihub.write_header_on_row_3(tmp_path / "h.xlsx"))
    assert len(records) == len(aihub.PAIRS) and records[0]["meta"]["row"] == 4
    assert report.notes == ["h.xlsx [Sheet1]: header found on Excel row 3, not row 1; the rows above it are ignored"]


def test_header_beyond_the_search_rows_is_an_error_listing_the_first_row(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"h.xlsx \(sheet 'Sheet1'\): no header row .* first 2 rows \(row 1 has "
                                        r"AI-Hub 한국어-영어 번역 말뭉치 \(구어체\)\)"):
        read(aihub.write_header_on_row_3(tmp_path / "h.xlsx"), header_search_rows=2)


def test_empty_numeric_and_formula_cells_are_dropped_or_coerced_and_counted(tmp_path: Path) -> None:
    path = aihub.write_bad_cells(tmp_path / "bad.xlsx")
    records, report = read(path)
    kept = [(r["meta"]["row"], r["messages"][1]["content"]) for r in records]
    assert kept == [(2, aihub.PAIRS[0][1]), (3, aihub.PAIRS[1][1]), (6, "2024"), (7, "2024"), (10, aihub.PAIRS[2][1])]
    assert records[2]["messages"][0]["content"].endswith("\n\n2024")
    assert report.read == 8  # the blank line is not a row
    assert dict(report.dropped) == {"empty 원문": 1, "empty 번역문": 1, "formula without cached value in 번역문": 1}
    where = {(d["reason"], d["row"], d["column"]) for d in report.dropped_rows}
    assert where == {("empty 원문", 4, "원문"), ("empty 번역문", 5, "번역문"),
                     ("formula without cached value in 번역문", 8, "번역문")}
    assert all(d["file"] == str(path) and d["sheet"] == "Sheet1" for d in report.dropped_rows)
    assert report.notes == ["bad.xlsx [Sheet1]: 1 non-text cell(s) in 원문 (numbers/dates) written as text",
                            "bad.xlsx [Sheet1]: 1 non-text cell(s) in 번역문 (numbers/dates) written as text"]


def test_a_formula_with_a_cached_value_uses_it_and_says_so(tmp_path: Path) -> None:
    records, report = read(aihub.write_cached_formula(tmp_path / "f.xlsx"))
    assert records[0]["messages"][1]["content"] == "hello there." and len(records) == 2
    assert report.notes == ["f.xlsx [Sheet1]: 1 formula cell(s) in the text columns; used the value Excel last "
                            "computed and saved in the file"]


def test_error_values_are_dropped_by_name_not_as_empty(tmp_path: Path) -> None:
    """calamine returns an error cell (#N/A, #REF!, a formula's cached #DIV/0!) as "", as if it were empty."""
    records, report = read(aihub.write_error_cells(tmp_path / "e.xlsx"))
    assert [r["meta"]["row"] for r in records] == [5]
    assert [(d["reason"], d["row"], d["column"]) for d in report.dropped_rows] == [
        ("error value #N/A in 번역문", 2, "번역문"), ("error value #REF! in 원문", 3, "원문"),
        ("error value #DIV/0! in 번역문", 4, "번역문")]


def test_an_error_value_excel_never_writes_is_one_reason_with_the_value_cut_in_its_drop(tmp_path: Path) -> None:
    """Any text of an error cell was its reason: a hostile workbook made a report row of each."""
    plain = aihub.write_rows(tmp_path / "plain.xlsx", [list(aihub.LAYOUT_COLUMNS["구어체"]),
                                                        [1, aihub.PAIRS[0][0], "x"], [2, *aihub.PAIRS[1]]])
    path = aihub.with_cell_xml(plain, tmp_path / "e.xlsx", "C2", b'<c r="C2" t="e"><v>#WHAT' + b"?" * 100 + b"</v></c>")
    records, report = read(path)
    assert len(records) == 1 and report.dropped == {"error value of no kind Excel writes in 번역문": 1}
    assert report.dropped_rows[0]["reason"] == "error value of no kind Excel writes in 번역문, '#WHAT" + "?" * 35 + "'"


def test_sheet_by_name_or_index_and_an_unknown_sheet_lists_the_sheets(tmp_path: Path) -> None:
    path = aihub.write_layout(tmp_path / "s.xlsx", "한국문화", sheet="말뭉치")
    assert len(read(path, sheet="말뭉치")[0]) == len(read(path, sheet=0)[0]) == len(aihub.PAIRS)
    with pytest.raises(UserError, match=r"s.xlsx: no sheet '데이터'. Its sheets are: 말뭉치"):
        read(path, sheet="데이터")
    with pytest.raises(UserError, match=r"no sheet number 3 \(0-based\); it has 1: 말뭉치"):
        read(path, sheet=3)


def test_missing_columns_name_the_file_sheet_and_the_columns_it_has(tmp_path: Path) -> None:
    path = aihub.write_rows(tmp_path / "c.xlsx", [["ID", "korean", "english"], [1, "네", "Yes"]])
    with pytest.raises(UserError, match=r"c.xlsx \(sheet 'Sheet1'\): no header row with the columns '원문' and "
                                        r"'번역문' .* \(row 1 has ID, korean, english\)"):
        read(path)
    wide = aihub.write_rows(tmp_path / "wide.xlsx", [[f"c{k}-" + "x" * 800 for k in range(2500)], [1] * 2500])
    with pytest.raises(UserError) as caught:  # from a review: every cell of the widest row, 3.7 MB of message
        read(wide)
    assert len(str(caught.value)) < 2000 and "(and 2480 more)" in str(caught.value)


def test_a_row_whose_other_columns_pass_a_records_size_is_dropped_before_it_is_built(tmp_path: Path) -> None:
    """From a review: a 40 KB workbook whose 1,000 columns name one 30,000-character shared string built 30 MB
    records (written to shards, then dropped as over 2 MB): the row is dropped as its meta passes the size."""
    header = ["원문", "번역문", *[f"c{k}" for k in range(100)]]
    rows = [header, ["안녕하세요.", "Hello.", *["SHARED"] * 100], ["고마워요.", "Thanks.", *["y"] * 100]]
    records, report = read(aihub.write_shared_text_everywhere(tmp_path / "amp.xlsx", rows, "SHARED", 30_000))
    assert [r["messages"][1]["content"] for r in records] == ["Thanks."]
    assert report.dropped == {"record over 2 MB": 1} and report.dropped_rows[0]["row"] == 2
    assert (tmp_path / "amp.xlsx").stat().st_size < 200_000  # the shared string is stored once


def test_data_on_another_sheet_is_refused_naming_the_sheet_to_use(tmp_path: Path) -> None:
    """A workbook whose first sheet describes the data on its second: the fix is `sheet:`, and the message says so."""
    import openpyxl

    path = tmp_path / "described.xlsx"
    workbook = openpyxl.Workbook()
    workbook.active.title = "설명"
    workbook.active.append(["AI-Hub 한국어-영어 번역 말뭉치: 구어체"])
    workbook.active.append(["이 파일의 데이터는 '데이터' 시트에 있습니다."])
    data = workbook.create_sheet("데이터")
    for row in [list(aihub.LAYOUT_COLUMNS["구어체"]), *aihub.layout_rows("구어체", aihub.PAIRS)]:
        data.append(row)
    workbook.save(path)
    with pytest.raises(UserError, match=r"described.xlsx \(sheet '설명'\): no header row with the columns '원문' and "
                                        r"'번역문' in the first 20 rows \(row 1 has AI-Hub .*\)\. The workbook's sheet "
                                        r"'데이터' has them: set `sheet: 데이터` in source ko-en \(its sheets: 설명, 데이터\)\.$"):
        read(path)
    assert len(read(path, sheet="데이터")[0]) == len(aihub.PAIRS)


def test_columns_on_no_sheet_say_the_other_sheets_lack_them_too(tmp_path: Path) -> None:
    path = aihub.write_rows(tmp_path / "c.xlsx", [["ID", "korean", "english"], [1, "네", "Yes"]], extra_sheets=["메모"])
    with pytest.raises(UserError, match=r"\(row 1 has ID, korean, english\)\. Its other sheets \(메모\) do not have "
                                        r"them either\. Set `source_column:`"):
        read(path)


@pytest.mark.parametrize("writer, message", [
    (aihub.write_not_excel, r"bad.xlsx: the file is not an Excel workbook"),
    (aihub.write_encrypted, r"bad.xlsx: the workbook is encrypted \(password-protected\)"),
    (aihub.write_corrupt_zip, r"bad.xlsx: the workbook is corrupt or not a real Excel file"),
    (aihub.write_xls_named_xlsx, r"bad.xlsx: this is an old binary Excel workbook \(.xls\) saved under a .xlsx name"),
])
def test_non_excel_encrypted_and_corrupt_files_are_named(tmp_path: Path, writer, message: str) -> None:
    with pytest.raises(UserError, match=message):
        read(writer(tmp_path / "bad.xlsx"))


def test_missing_file_and_empty_directory_are_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"source ko-en: path: .*nope.xlsx does not exist"):
        read(tmp_path / "nope.xlsx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"holds no .xlsx/.xlsm/.xls file"):
        read(tmp_path / "empty")


def calamine_rows(path: Path) -> list[list[Any]]:
    from python_calamine import CalamineWorkbook

    with CalamineWorkbook.from_path(str(path)) as book:
        return list(workbook.calamine_rows(book.get_sheet_by_name("Sheet1")))


def openpyxl_rows(path: Path) -> list[list[Any]]:
    import openpyxl

    book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    try:
        return list(workbook.openpyxl_rows(book["Sheet1"]))
    finally:
        book.close()


def test_openpyxl_fallback_reads_the_same_records_when_calamine_fails(tmp_path: Path) -> None:
    with_calamine, _ = read(aihub.write_header_on_row_3(tmp_path / "h.xlsx"))
    with_openpyxl, report = read(aihub.write_calamine_unreadable(tmp_path / "u.xlsx"))
    assert [r["messages"] for r in with_openpyxl] == [r["messages"] for r in with_calamine]
    assert report.notes[0] == ("u.xlsx: read with openpyxl because calamine could not (CalamineError: Unsupported "
                               "cell error value '#BAD!')")


def test_calamine_and_openpyxl_agree_cell_by_cell(tmp_path: Path) -> None:
    path = aihub.write_bad_cells(tmp_path / "bad.xlsx")

    def normalised(rows: list[list[Any]]) -> list[list[Any]]:
        # whitespace-only text is written without xml:space="preserve": calamine drops it, openpyxl keeps it
        values = [[excel.json_value(v.strip() if isinstance(v, str) else v) for v in row] for row in rows]
        return [row[: max((i + 1 for i, v in enumerate(row) if v is not None), default=0)] for row in values]

    assert normalised(calamine_rows(path)) == normalised(openpyxl_rows(path))


def test_missing_columns_under_a_title_line_name_the_header_row(tmp_path: Path) -> None:
    path = aihub.write_rows(tmp_path / "t.xlsx", [["번역 말뭉치"], [], ["ID", "ko", "en"], [1, "네", "Yes"]])
    with pytest.raises(UserError, match=r"\(row 3 has ID, ko, en\)"):
        read(path)


def test_a_table_away_from_a1_keeps_excel_rows_and_columns(tmp_path: Path) -> None:
    """Rows are streamed one at a time; calamine leaves out leading empty columns, which are put back."""
    header = list(aihub.LAYOUT_COLUMNS["한국문화"])
    data = aihub.layout_rows("한국문화", aihub.PAIRS[:2])
    path = aihub.write_rows(tmp_path / "offset.xlsx", [[], [], [None, None, *header], *[[None, None, *row] for row in data]])
    records, report = read(path)
    assert [r["meta"]["row"] for r in records] == [4, 5]
    assert records[0]["meta"]["키워드"] == data[0][1] and records[0]["messages"][1]["content"] == aihub.PAIRS[0][1]
    assert "header found on Excel row 3" in report.notes[0]
    calamine = [[None if value == "" else value for value in row] for row in calamine_rows(path)]
    assert calamine == [[None] * 6, [None] * 6, [None, None, *header], *[[None, None, *row] for row in data]]


def test_columns_of_one_name_each_keep_their_value_in_meta(tmp_path: Path) -> None:
    """A second SID column overwrote the first in meta, and a real `col_file` column the renamed `file` one."""
    rows = [["SID", "원문", "번역문", "SID", "file", "col_file"], [1, *aihub.PAIRS[0], 2, "a.txt", "b.txt"]]
    records, _ = read(aihub.write_rows(tmp_path / "dup.xlsx", rows))
    meta = records[0]["meta"]
    assert (meta["SID"], meta["SID (D)"], meta["col_file"], meta["col_file (F)"]) == (1, 2, "a.txt", "b.txt")
    assert meta["file"].endswith("dup.xlsx")


@pytest.mark.parametrize("sheet", [True, 1.5])
def test_a_sheet_that_is_neither_a_name_nor_an_index_is_refused(sheet: Any) -> None:
    """`sheet: true` was read as sheet 1."""
    with pytest.raises(ValueError, match="sheet"):
        params("w.xlsx", sheet=sheet)

"""AI-Hub Korean-English parallel corpus workbooks (dataSetSn=126), or any workbook with two text columns.

Known layouts (the header row; the text columns are always 원문 = Korean, 번역문 = English):
- 구어체 (spoken):          SID, 원문, 번역문
- 대화체 (dialogue):        대분류, 소분류, 상황, Set Nr., 발화자, 원문, 번역문
- 뉴스 (news):              ID, 날짜, 자동분류1, 자동분류2, 자동분류3, URL, 언론사, 원문, 번역문
- 한국문화 (Korean culture): ID, 키워드, 원문, 번역문
- 조례 / 지자체웹사이트:      ID, 지자체, 원문, 번역문

Each data row becomes one record (direction ko_en or en_ko) or two (both). Every other column is kept in
`meta` with the file, sheet and 1-based Excel row. Cells are read with python-calamine (Rust); openpyxl
(read-only) is the fallback when calamine cannot read a file that is a valid workbook.

Cells in the text columns: empty -> the row is dropped with the reason and where; numbers, dates and booleans
-> written as text and counted in a note; formulas -> their cached value (the value Excel last computed and
saved), counted in a note; a formula with no cached value is dropped as such (after an openpyxl fallback it
reads as an empty cell).
"""

from __future__ import annotations

import datetime as dt
import zipfile
from collections import Counter
from itertools import chain, islice
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import Field

from distillery.sources.files import resolve_paths
from distillery.sources.registry import Source, SourceParams, SourceReport
from distillery.core.errors import UserError
from distillery.core.records import make_record

SUFFIXES = (".xlsx", ".xlsm", ".xls")
ZIP_MAGIC = b"PK\x03\x04"
OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"  # the compound-file container of .xls and of encrypted .xlsx
META_RESERVED = ("file", "sheet", "row")


def column_letter(index: int) -> str:
    """0-based column index -> Excel letters (0 -> A, 27 -> AB)."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(65 + rest) + letters
    return letters


class AIHubExcelParams(SourceParams):
    """AI-Hub Korean-English parallel corpus workbooks (dataSetSn=126) or any workbook with two text columns."""

    kind: Literal["aihub_excel"]
    path: str | list[str] = Field(description="A workbook, a list of them, a directory or a glob (.xlsx/.xlsm/.xls).")
    sheet: str | int | None = Field(None, description="Sheet name or 0-based index; default: the first sheet.")
    source_column: str = Field("원문", description="Column holding the Korean text.")
    target_column: str = Field("번역문", description="Column holding the English text.")
    direction: Literal["ko_en", "en_ko", "both"] = Field("ko_en", description="Which way to translate; both yields two records a row.")
    instruction_ko_en: str = Field("Translate the following Korean text into English.\n\n{text}", description="User prompt for ko->en; {text} is the source sentence.")
    instruction_en_ko: str = Field("Translate the following English text into Korean.\n\n{text}", description="User prompt for en->ko.")
    header_search_rows: int = Field(20, ge=1, description="How many top rows to search for the header row.")


def is_encrypted_package(path: Path) -> bool:
    """An OLE container holding an `EncryptedPackage` stream is a password-protected .xlsx (MS-OFFCRYPTO)."""
    needle = "EncryptedPackage".encode("utf-16-le")  # directory entry names are UTF-16
    with open(path, "rb") as handle:
        tail = b""
        while block := handle.read(1 << 20):
            if needle in tail + block:
                return True
            tail = block[-len(needle):]
    return False


def check_is_workbook(path: Path) -> None:
    """Tell an encrypted or non-Excel file from a workbook by its bytes, before any reader sees it."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    suffix = path.suffix.lower()
    if head.startswith(OLE_MAGIC) and suffix != ".xls":  # .xls lives in an OLE container too
        if is_encrypted_package(path):
            raise UserError(f"{path}: the workbook is encrypted (password-protected), so it cannot be read. Open it "
                            "in Excel, remove the password (File > Info > Protect Workbook > Encrypt with Password, "
                            "clear it) and save it again as .xlsx.")
        raise UserError(f"{path}: this is an old binary Excel workbook (.xls) saved under a {suffix} name. Rename it "
                        "to .xls, or open it in Excel and save it as .xlsx.")
    if suffix in (".xlsx", ".xlsm") and not head.startswith(ZIP_MAGIC):
        kind = "empty" if not head else "not an Excel workbook (an .xlsx file is a zip archive; this one is not)"
        raise UserError(f"{path}: the file is {kind}. Was another file (CSV, HTML, a download error page) saved "
                        "under an .xlsx name? Export it from Excel as .xlsx, or use the `hf` source for CSV.")


def pick_sheet(names: list[str], wanted: str | int | None, path: Path) -> str:
    if not names:
        raise UserError(f"{path}: the workbook has no sheet.")
    if wanted is None:
        return names[0]
    if isinstance(wanted, int):
        if 0 <= wanted < len(names):
            return names[wanted]
        raise UserError(f"{path}: no sheet number {wanted} (0-based); it has {len(names)}: {', '.join(names)}.")
    if wanted in names:
        return wanted
    raise UserError(f"{path}: no sheet {wanted!r}. Its sheets are: {', '.join(names)}. Set `sheet:` to one of them.")


Rows = Iterator[list[Any]]  # a sheet's rows from Excel row 1: the i-th (0-based) is Excel row i + 1


def rows_with_calamine(path: Path, sheet: str | int | None) -> tuple[str, Rows]:
    from python_calamine import CalamineWorkbook

    workbook = CalamineWorkbook.from_path(str(path))
    try:
        name = pick_sheet(list(workbook.sheet_names), sheet, path)
        worksheet = workbook.get_sheet_by_name(name)  # parses the sheet: a broken one fails here, not mid-way
    except BaseException:
        workbook.close()
        raise
    return name, calamine_rows(workbook, worksheet)


def calamine_rows(workbook: Any, worksheet: Any) -> Rows:
    """The sheet's rows, one Python list at a time (to_python would hold them all). iter_rows starts at Excel
    row 1 but leaves out leading empty columns: they are put back, so that column j is Excel column j + 1."""
    start = worksheet.start
    pad = [""] * start[1] if start else []
    try:
        for row in worksheet.iter_rows():
            yield pad + row if pad else row
    finally:
        workbook.close()


def rows_with_openpyxl(path: Path, sheet: str | int | None) -> tuple[str, Rows]:
    import openpyxl

    workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
    try:
        name = pick_sheet(list(workbook.sheetnames), sheet, path)
    except BaseException:
        workbook.close()
        raise
    return name, openpyxl_rows(workbook, workbook[name])


def openpyxl_rows(workbook: Any, worksheet: Any) -> Rows:
    try:
        for row in worksheet.iter_rows(values_only=True):  # from row 1, empty rows included
            yield list(row)
    finally:
        workbook.close()


def load_rows(path: Path, sheet: str | int | None, report: SourceReport) -> tuple[str, Rows, str]:
    """(sheet name, its rows, reader used): calamine first, openpyxl when calamine fails on the file."""
    try:
        name, rows = rows_with_calamine(path, sheet)
        return name, rows, "calamine"
    except UserError:
        raise
    except ImportError:
        calamine_error = "python-calamine is not installed"
    except Exception as err:  # calamine raises its own error types for zip/xml problems
        calamine_error = f"{type(err).__name__}: {err}"
    try:
        name, rows = rows_with_openpyxl(path, sheet)
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"{path}: the workbook is corrupt or not a real Excel file; neither calamine "
                        f"({calamine_error}) nor openpyxl ({type(err).__name__}: {err}) can read it. Open and "
                        "re-save it in Excel, or replace it with a good copy.") from None
    report.note(f"{path.name}: read with openpyxl because calamine could not ({calamine_error})")
    return name, rows, "openpyxl"


def cell_name(value: Any) -> str:
    return "" if value is None else str(value).strip()


def header_position(rows: list[list[Any]], params: AIHubExcelParams) -> tuple[int, dict[str, int]] | None:
    """Index of the header row (searched in the first `header_search_rows` rows) and column positions."""
    wanted = (params.source_column, params.target_column)
    for index, row in enumerate(rows[: params.header_search_rows]):
        names = [cell_name(value) for value in row]
        if all(column in names for column in wanted):
            return index, {name: i for i, name in reversed(list(enumerate(names))) if name}
    return None


def find_header(rows: list[list[Any]], params: AIHubExcelParams, path: Path, sheet: str) -> tuple[int, dict[str, int]]:
    """The header's position; a UserError naming the columns the sheet has, and the sheet that has the wanted
    ones when it is another (a workbook whose first sheet describes the data on the second)."""
    found = header_position(rows, params)
    if found is not None:
        return found
    # the likely header: the first of the fullest rows (a title line above it has fewer cells)
    filled = [[cell_name(v) for v in row if cell_name(v)] for row in rows[: params.header_search_rows]]
    widest = max(range(len(filled)), key=lambda i: len(filled[i]), default=None)
    has = (f"row {widest + 1} has {', '.join(filled[widest])}" if widest is not None and filled[widest]
           else "the sheet is empty")
    problem = (f"{path} (sheet {sheet!r}): no header row with the columns {params.source_column!r} and "
               f"{params.target_column!r} in the first {params.header_search_rows} rows ({has}).")
    heads = sheet_heads(path, params.header_search_rows)
    others = [name for name in heads if name != sheet]
    with_header = [name for name in others if header_position(heads[name], params) is not None]
    if with_header:
        raise UserError(f"{problem} The workbook's sheet {with_header[0]!r} has them: set `sheet: {with_header[0]}` "
                        f"in source {params.name} (its sheets: {', '.join(heads)}).")
    elsewhere = f" Its other sheets ({', '.join(others)}) do not have them either." if others else ""
    raise UserError(f"{problem}{elsewhere} Set `source_column:`/`target_column:` to the right names (or raise "
                    "`header_search_rows:` when the header is further down).")


def sheet_heads(path: Path, n: int) -> dict[str, list[list[Any]]]:
    """The first `n` rows of every sheet, by sheet name in workbook order (calamine, else openpyxl)."""
    try:
        from python_calamine import CalamineWorkbook

        workbook = CalamineWorkbook.from_path(str(path))
        try:
            return {name: workbook.get_sheet_by_name(name).to_python(skip_empty_area=False, nrows=n)
                    for name in workbook.sheet_names}
        finally:
            workbook.close()
    except Exception:  # noqa: BLE001 - calamine could not read it: openpyxl, as load_rows does
        import openpyxl

        workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
        try:
            return {name: [list(r) for r in workbook[name].iter_rows(max_row=n, values_only=True)]
                    for name in workbook.sheetnames}
        finally:
            workbook.close()


def has_formulas(path: Path) -> bool:
    """Whether any worksheet of an .xlsx/.xlsm holds a formula (an `<f>` element), by a streamed byte search."""
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if not (name.startswith("xl/worksheets/") and name.endswith(".xml")):
                continue
            with archive.open(name) as handle:
                tail = b""
                while block := handle.read(1 << 20):
                    chunk = tail + block
                    if b"<f>" in chunk or b"<f " in chunk:
                        return True
                    tail = chunk[-2:]  # a tag split across two blocks
    return False


def formula_cells(path: Path, sheet: str, rows_from: int, columns: tuple[int, ...]) -> set[tuple[int, int]]:
    """(row index, column index) of formula cells in `columns` (0-based, rows >= rows_from).

    calamine only returns a formula's cached value, so formulas are found separately: a quick byte search of
    the sheet XML, and only if there is a formula, openpyxl to locate them.
    """
    if path.suffix.lower() not in (".xlsx", ".xlsm") or not has_formulas(path):
        return set()
    import openpyxl

    workbook = openpyxl.load_workbook(path, read_only=True, data_only=False)
    try:
        found = set()
        for row in workbook[sheet].iter_rows(min_row=rows_from + 1, min_col=min(columns) + 1, max_col=max(columns) + 1):
            for cell in row:
                column = getattr(cell, "column", None)
                if column is not None and column - 1 in columns and cell.data_type == "f":
                    found.add((cell.row - 1, column - 1))
        return found
    finally:
        workbook.close()


def json_value(value: Any) -> Any:
    """A cell value as JSON: integral floats as ints, dates as ISO text, empty as None."""
    if value is None or value == "":
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, (dt.date, dt.time, dt.datetime)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return str(value)
    return value


def meta_key(column: str) -> str:
    """A column name as a meta key; one that would shadow file/sheet/row gets a `col_` prefix."""
    return f"col_{column}" if column in META_RESERVED else column


def cell_text(value: Any) -> tuple[str, bool]:
    """A text-column cell as text, and whether it had to be coerced (a number, date or boolean)."""
    if type(value) is str:
        return value.strip(), False
    if value is None:
        return "", False
    return str(json_value(value)), True


def instruction(template: str, text: str) -> str:
    return template.replace("{text}", text)


def check_templates(params: AIHubExcelParams) -> None:
    needed = {"ko_en": ("instruction_ko_en",), "en_ko": ("instruction_en_ko",),
              "both": ("instruction_ko_en", "instruction_en_ko")}[params.direction]
    for field in needed:
        if "{text}" not in getattr(params, field):
            raise UserError(f"source {params.name}: `{field}` has no {{text}} placeholder, so the sentence to "
                            "translate would be missing from the prompt. Put {text} where the sentence goes.")


def pair_records(params: AIHubExcelParams, korean: str, english: str, meta: dict[str, Any]) -> list[dict[str, Any]]:
    records = []
    if params.direction in ("ko_en", "both"):
        messages = [{"role": "user", "content": instruction(params.instruction_ko_en, korean)},
                    {"role": "assistant", "content": english}]
        records.append(make_record(params.name, "translate_ko_en", messages, meta))
    if params.direction in ("en_ko", "both"):
        messages = [{"role": "user", "content": instruction(params.instruction_en_ko, english)},
                    {"role": "assistant", "content": korean}]
        records.append(make_record(params.name, "translate_en_ko", messages, dict(meta) if records else meta))
    return records


def read_workbook(path: Path, params: AIHubExcelParams, report: SourceReport) -> Iterator[dict[str, Any]]:
    check_is_workbook(path)
    sheet, rows, reader = load_rows(path, params.sheet, report)
    head = list(islice(rows, params.header_search_rows))
    header_index, positions = find_header(head, params, path, sheet)
    header = [cell_name(v) for v in head[header_index]]
    if header_index:
        report.note(f"{path.name} [{sheet}]: header found on Excel row {header_index + 1}, not row 1; "
                    "the rows above it are ignored")
    source_at, target_at = positions[params.source_column], positions[params.target_column]
    # named columns always go into meta; a column without a header only where it holds something
    other_columns = [(i, meta_key(name or column_letter(i)), bool(name)) for i, name in enumerate(header)
                     if i not in (source_at, target_at)]
    formulas = formula_cells(path, sheet, header_index + 1, (source_at, target_at)) if reader == "calamine" else set()
    coerced: Counter = Counter()  # text column -> non-text cells written as text (kept rows only)
    formula_used = 0
    file, width = str(path), len(header)
    for index, row in enumerate(chain(head[header_index + 1:], rows), start=header_index + 1):
        if len(row) < width:  # openpyxl rows stop at their last value
            row = list(row) + [None] * (width - len(row))
        korean, korean_coerced = cell_text(row[source_at])
        english, english_coerced = cell_text(row[target_at])
        if not korean or not english:
            if all(value is None or value == "" for value in row):
                continue  # a blank line between blocks is not data
            report.read += 1
            column, at = (params.source_column, source_at) if not korean else (params.target_column, target_at)
            reason = f"formula without cached value in {column}" if (index, at) in formulas else f"empty {column}"
            report.drop(reason, {"file": file, "sheet": sheet, "row": index + 1, "column": column})
            continue
        report.read += 1
        if korean_coerced:
            coerced[params.source_column] += 1
        if english_coerced:
            coerced[params.target_column] += 1
        if formulas:
            formula_used += ((index, source_at) in formulas) + ((index, target_at) in formulas)
        meta = {"file": file, "sheet": sheet, "row": index + 1}
        for at, key, named in other_columns:
            value = row[at]
            if type(value) is not str or not value:  # text is the common case: no conversion call for it
                value = json_value(value)
            if named or value is not None:
                meta[key] = value
        yield from pair_records(params, korean, english, meta)
    for column, count in coerced.items():
        report.note(f"{path.name} [{sheet}]: {count} non-text cell(s) in {column} (numbers/dates) written as text")
    if formula_used:
        report.note(f"{path.name} [{sheet}]: {formula_used} formula cell(s) in the text columns; used the value "
                    "Excel last computed and saved in the file")


def read(params: AIHubExcelParams, report: SourceReport) -> Iterator[dict[str, Any]]:
    check_templates(params)
    for path in resolve_paths(params.path, SUFFIXES, f"source {params.name}: path"):
        yield from read_workbook(path, params, report)


SOURCE = Source(kind="aihub_excel", params=AIHubExcelParams, read=read, files_field="path", suffixes=SUFFIXES,
                per_file=True)

"""AI-Hub Korean-English parallel corpus workbooks (dataSetSn=126), or any workbook with two text columns.

Known layouts (the header row; the text columns are always 원문 = Korean, 번역문 = English):
- 구어체 (spoken):          SID, 원문, 번역문
- 대화체 (dialogue):        대분류, 소분류, 상황, Set Nr., 발화자, 원문, 번역문
- 뉴스 (news):              ID, 날짜, 자동분류1, 자동분류2, 자동분류3, URL, 언론사, 원문, 번역문
- 한국문화 (Korean culture): ID, 키워드, 원문, 번역문
- 조례 / 지자체웹사이트:      ID, 지자체, 원문, 번역문

Each data row becomes one record (direction ko_en or en_ko) or two (both). Every other column is kept in
`meta` with the file, sheet and 1-based Excel row. Workbooks are untrusted: sources/workbook.py checks each
file's bytes and sizes, then reads it with python-calamine (Rust), or openpyxl when calamine cannot, in a child
process with a memory and CPU budget. By default the first visible sheet is read, and a note says which.

Header names are compared in NFC without invisible characters (a BOM, a zero-width space, Hangul decomposed by
macOS); messages show the code points of a name whose difference cannot be seen. A later row naming both text
columns is a repeated header (two exports pasted together): it is dropped, and the rows after it are read by it.

Cells in the text columns: empty, blank or only invisible characters -> the row is dropped with the reason and
where; control characters (NUL, backspace, ...) -> removed and counted in a note; longer than Excel's 32,767
characters -> dropped; numbers, dates and booleans -> written as text and counted in a note; formulas -> their
cached value (the value Excel last computed and saved), counted in a note; a formula with no cached value is
dropped as such (after an openpyxl fallback it reads as an empty cell); an error value (#N/A, #REF!, ...) in an
.xlsx is dropped with its name (in an .xls it reads as an empty cell). A row with English on the Korean side
and Korean on the English side (by Hangul share) is dropped as swapped; a sheet where most rows are is refused.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import Field, StrictInt, StrictStr, ValidationInfo, field_validator

from distillery.sources.files import resolve_paths
from distillery.sources.registry import Source, SourceParams, SourceReport
from distillery.sources.text import clean_text, controls_removed, listed, name_key, shown, swapped
from distillery.sources.workbook import (EXCEL_CELL_CHARS, HiddenCells, SheetInfo, Workbooks, column_letter,
                                        shared_workbooks)
from distillery.core.errors import UserError
from distillery.core.records import MAX_RECORD_BYTES, make_record

SUFFIXES = (".xlsx", ".xlsm", ".xls")
META_RESERVED = ("file", "sheet", "row")


class AIHubExcelParams(SourceParams):
    """AI-Hub Korean-English parallel corpus workbooks (dataSetSn=126) or any workbook with two text columns."""

    kind: Literal["aihub_excel"]
    path: str | list[str] = Field(description="A workbook, a list of them, a directory or a glob (.xlsx/.xlsm/.xls).")
    sheet: StrictStr | StrictInt | None = Field(None, description="Sheet name or 0-based index (hidden sheets count); default: the first visible sheet.")
    source_column: str = Field("원문", description="Column holding the Korean text.")
    target_column: str = Field("번역문", description="Column holding the English text.")
    direction: Literal["ko_en", "en_ko", "both"] = Field("ko_en", description="Which way to translate; both yields two records a row.")
    instruction_ko_en: str = Field("Translate the following Korean text into English.\n\n{text}", description="User prompt for ko->en; {text} is the source sentence.")
    instruction_en_ko: str = Field("Translate the following English text into Korean.\n\n{text}", description="User prompt for en->ko.")
    header_search_rows: int = Field(20, ge=1, description="How many top rows to search for the header row.")
    max_unpacked_mb: int = Field(2048, ge=1, description="Refuse a workbook whose contents unpack to more than this many MB; reading one takes up to about 4 times as much memory.")

    @field_validator("target_column")
    @classmethod
    def _another_column(cls, target: str, info: ValidationInfo) -> str:
        if name_key(target) == name_key(info.data.get("source_column", "")):
            raise ValueError(f"is the same column as source_column ({target!r}): every record would translate a "
                             "sentence into itself. Set source_column to the Korean column and target_column to the "
                             "English one")
        return target


def sheet_label(sheet: SheetInfo) -> str:
    kinds = [kind for kind, yes in (("hidden", not sheet.visible), ("a chart", not sheet.worksheet)) if yes]
    return f"{sheet.name!r}" + (f" ({', '.join(kinds)})" if kinds else "")


def pick_sheet(sheets: list[SheetInfo], wanted: str | int | None, path: Path) -> tuple[str, str | None]:
    """The sheet to read and a note saying which one it is when that is not obvious: by default the first
    visible worksheet (a hidden sheet often holds stale or scratch data), else the one `sheet:` names."""
    names = [sheet.name for sheet in sheets]
    if not sheets:
        raise UserError(f"{path}: the workbook has no sheet.")
    if wanted is None:
        readable = [s for s in sheets if s.visible and s.worksheet] or [s for s in sheets if s.worksheet] or sheets
        chosen = readable[0]
        others = [sheet_label(s) for s in sheets if s is not chosen]
        if not others:
            return chosen.name, None
        return chosen.name, (f"{path.name}: read sheet {chosen.name!r}, the first visible one; not read: "
                             f"{', '.join(others)} (`sheet:` picks another)")
    if isinstance(wanted, int):
        if not 0 <= wanted < len(names):
            raise UserError(f"{path}: no sheet number {wanted} (0-based); it has {len(names)}: {', '.join(names)}.")
        chosen = sheets[wanted]
    elif wanted in names:
        chosen = sheets[names.index(wanted)]
    else:
        raise UserError(f"{path}: no sheet {wanted!r}. Its sheets are: {', '.join(names)}. Set `sheet:` to one of them.")
    note = None if chosen.visible else f"{path.name}: read sheet {chosen.name!r}, which is hidden in the workbook, as `sheet:` asks"
    return chosen.name, note


def cell_name(value: Any) -> str:
    return "" if value is None else str(value).strip()


@dataclass(frozen=True)
class Columns:
    """Where a header row puts the two text columns, and the other columns (index, meta key, has a name)."""

    source: int
    target: int
    others: tuple[tuple[int, str, bool], ...]
    width: int


def columns_of(row: list[Any], params: AIHubExcelParams) -> Columns | None:
    """The columns when `row` names both text columns (compared by name_key), else None."""
    keys = [name_key(cell_name(value)) for value in row]
    source_key, target_key = name_key(params.source_column), name_key(params.target_column)
    if source_key not in keys or target_key not in keys:
        return None
    source, target = keys.index(source_key), keys.index(target_key)
    # named columns always go into meta; a column without a header only where it holds something
    others = tuple((i, key or column_letter(i), bool(key)) for i, key in enumerate(keys) if i not in (source, target))
    return Columns(source, target, distinct_meta_keys(others), len(keys))


def distinct_meta_keys(others: tuple[tuple[int, str, bool], ...]) -> tuple[tuple[int, str, bool], ...]:
    """Each column its own meta key (meta_key), so that none overwrites another: a second column of a name seen
    before (two SID columns; a real `col_file` beside the renamed `file`) is keyed with its letter, `SID (D)`."""
    seen: set[str] = set()
    distinct = []
    for at, name, named in others:
        key = meta_key(name)
        if key in seen:
            key = f"{key} ({column_letter(at)})"
        seen.add(key)
        distinct.append((at, key, named))
    return tuple(distinct)


def header_position(rows: list[list[Any]], params: AIHubExcelParams) -> tuple[int, Columns] | None:
    """Index of the header row (searched in the first `header_search_rows` rows) and its columns."""
    for index, row in enumerate(rows[: params.header_search_rows]):
        columns = columns_of(row, params)
        if columns is not None:
            return index, columns
    return None


def find_header(rows: list[list[Any]], params: AIHubExcelParams, path: Path, sheet: str, sheets: list[SheetInfo],
                books: Workbooks) -> tuple[int, Columns]:
    """The header's position; a UserError naming the columns the sheet has (with their code points where they
    differ invisibly from what is asked), and the sheet that has the wanted ones when it is another (a workbook
    whose first sheet describes the data on the second)."""
    found = header_position(rows, params)
    if found is not None:
        return found
    # the likely header: the first of the fullest rows (a title line above it has fewer cells)
    filled = [[shown(cell_name(v)) for v in row if cell_name(v)] for row in rows[: params.header_search_rows]]
    widest = max(range(len(filled)), key=lambda i: len(filled[i]), default=None)
    has = (f"row {widest + 1} has {listed(filled[widest])}" if widest is not None and filled[widest]
           else "the sheet is empty")
    problem = (f"{path} (sheet {sheet!r}): no header row with the columns '{shown(params.source_column)}' and "
               f"'{shown(params.target_column)}' in the first {params.header_search_rows} rows ({has}).")
    others = [s for s in sheets if s.name != sheet and s.worksheet]
    with_header = [s for s in others if header_position(books.head(s.name, params.header_search_rows), params)]
    if with_header:
        raise UserError(f"{problem} The workbook's sheet {sheet_label(with_header[0])} has them: set `sheet: "
                        f"{with_header[0].name}` in source {params.name} (its sheets: {', '.join(s.name for s in sheets)}).")
    elsewhere = f" Its other sheets ({', '.join(s.name for s in others)}) do not have them either." if others else ""
    raise UserError(f"{problem}{elsewhere} Set `source_column:`/`target_column:` to the right names (or raise "
                    "`header_search_rows:` when the header is further down).")


def note_invisible_names(row: list[Any], path: Path, sheet: str, report: SourceReport) -> None:
    """Say which header cells only matched once invisible characters were dropped or Hangul composed."""
    odd = [cell_name(v) for v in row if cell_name(v) != name_key(cell_name(v))]
    if odd:
        report.note(f"{path.name} [{sheet}]: header cell(s) {', '.join(shown(name) for name in odd)} read as "
                    f"{', '.join(name_key(name) for name in odd)} (invisible characters dropped, Hangul composed)")


@dataclass(frozen=True)
class TextNames:
    """The text columns' names as configured and as compared (name_key), and how long a cell holding one can
    be: decomposed Hangul takes 3 jamo a syllable, and a few invisible characters may come with it."""

    source: str
    target: str
    source_key: str
    target_key: str
    longest: int

    @classmethod
    def of(cls, params: AIHubExcelParams) -> "TextNames":
        longest = 3 * max(len(params.source_column), len(params.target_column)) + 8
        return cls(params.source_column, params.target_column, name_key(params.source_column),
                   name_key(params.target_column), longest)


def is_header_again(row: list[Any], columns: Columns, names: TextNames) -> bool:
    """Whether a data row is the header again (two exports pasted together): a text column holds its own name,
    or the row holds both names elsewhere. Cells too long to be a name are not compared (a cheap test first)."""
    korean, english = row[columns.source], row[columns.target]
    if type(korean) is str and len(korean) <= names.longest and name_key(korean) == names.source_key:
        return True
    if type(english) is str and len(english) <= names.longest and name_key(english) == names.target_key:
        return True
    return names.source in row and names.target in row


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


def cell_text(value: Any) -> tuple[str, bool, str]:
    """A text-column cell as text, whether it had to be coerced (a number, date or boolean), and the control
    characters taken out of it."""
    if type(value) is str:
        text, controls = clean_text(value)
        return text, False, controls
    if value is None:
        return "", False, ""
    return str(json_value(value)), True, ""


def empty_reason(value: Any, column: str, formula: bool) -> str:
    if formula:
        return f"formula without cached value in {column}"
    if type(value) is str and value.strip():  # str.strip() leaves zero-width spaces, BOMs, word joiners
        return f"only invisible characters in {column}"
    return f"empty {column}"


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


@dataclass
class SheetCounts:
    """What a sheet's rows had, for the notes and the swapped-columns check."""

    coerced: Counter  # text column -> non-text cells written as text (kept rows only)
    controls: Counter  # text column -> cells that had control characters
    control_chars: set
    formulas: int = 0
    pairs: int = 0  # rows with text on both sides
    swapped: int = 0
    first_swapped: int = 0  # its Excel row


def read_workbook(path: Path, params: AIHubExcelParams, report: SourceReport, books: Workbooks) -> Iterator[dict[str, Any]]:
    sheets = books.open(path, params.max_unpacked_mb << 20)
    if books.fmt == "xlsx" and path.suffix.lower() == ".xls":
        report.note(f"{path.name}: an .xlsx workbook under an .xls name; read as .xlsx")
    sheet, note = pick_sheet(sheets, params.sheet, path)
    if note:
        report.note(note)
    fallback, head = books.load(sheet, params.header_search_rows)
    if fallback:
        report.note(fallback)
    header_index, columns = find_header(head, params, path, sheet, sheets, books)
    note_invisible_names(head[header_index], path, sheet, report)
    if header_index:
        report.note(f"{path.name} [{sheet}]: header found on Excel row {header_index + 1}, not row 1; "
                    "the rows above it are ignored")
    hidden = books.hidden_cells(sheet, header_index + 1, (columns.source, columns.target))
    counts = SheetCounts(Counter(), Counter(), set())
    file, names = str(path), TextNames.of(params)
    for index, row in enumerate(chain(head[header_index + 1:], books.rows()), start=header_index + 1):
        if len(row) < columns.width:  # openpyxl rows stop at their last value
            row = list(row) + [None] * (columns.width - len(row))
        if all(value is None or value == "" for value in row):
            continue  # a blank line between blocks is not data
        report.read += 1
        where = {"file": file, "sheet": sheet, "row": index + 1}
        if is_header_again(row, columns, names):
            repeated = columns_of(row, params)
            if repeated is not None and repeated != columns:
                report.note(f"{path.name} [{sheet}]: the header is repeated on Excel row {index + 1} with other "
                            "columns; the rows after it are read by it")
                columns = repeated
            report.drop("repeated header row", where)
            continue
        record_pair = pair_of(row, columns, params, hidden, index, counts, report, where)
        if record_pair is None:
            continue
        meta = meta_of(row, columns, where, MAX_RECORD_BYTES - sum(map(len, record_pair)))
        if meta is None:  # before it is built: 1,000 columns naming one 30,000-character shared string made 30 MB
            report.drop(f"record over {MAX_RECORD_BYTES >> 20} MB", where, "its other columns, kept in meta, hold more "
                        "than a record may: remove the columns that are not data")
            continue
        yield from pair_records(params, *record_pair, meta)
    finish_sheet(path, sheet, params, counts, report)


# The error values Excel writes into a cell (and its newer dynamic-array and data-type errors).
EXCEL_ERRORS = frozenset(("#NULL!", "#DIV/0!", "#VALUE!", "#REF!", "#NAME?", "#NUM!", "#N/A", "#GETTING_DATA",
                          "#SPILL!", "#CALC!", "#FIELD!", "#BLOCKED!", "#CONNECT!", "#UNKNOWN!", "#BUSY!",
                          "#PYTHON!"))


def pair_of(row: list[Any], columns: Columns, params: AIHubExcelParams, hidden: HiddenCells, index: int,
            counts: SheetCounts, report: SourceReport, where: dict[str, Any]) -> tuple[str, str] | None:
    """(Korean, English) of a data row, or None when the row is dropped (with the reason, in the report)."""
    sides = ((params.source_column, columns.source), (params.target_column, columns.target))
    texts = []
    for column, at in sides:
        if (index, at) in hidden.errors:
            code = hidden.errors[index, at]
            known = code in EXCEL_ERRORS  # any other text would make a reason (a row of the report) of its own
            report.drop(f"error value {code if known else 'of no kind Excel writes'} in {column}",
                        {**where, "column": column}, "" if known else f"{code[:40]!r}")
            return None
        text, coerced, controls = cell_text(row[at])
        if not text:
            report.drop(empty_reason(row[at], column, (index, at) in hidden.formulas), {**where, "column": column})
            return None
        if len(text) > EXCEL_CELL_CHARS:
            report.drop(f"longer than Excel's {EXCEL_CELL_CHARS:,} characters in {column}", {**where, "column": column})
            return None
        counts.coerced[column] += coerced
        if controls:
            counts.controls[column] += 1
            counts.control_chars.update(controls)
        counts.formulas += (index, at) in hidden.formulas
        texts.append(text)
    korean, english = texts
    counts.pairs += 1
    if swapped(korean, english):
        counts.swapped += 1
        counts.first_swapped = counts.first_swapped or where["row"]
        report.drop(f"languages swapped (English in {params.source_column}, Korean in {params.target_column})", where)
        return None
    return korean, english


def meta_of(row: list[Any], columns: Columns, where: dict[str, Any], budget: int) -> dict[str, Any] | None:
    """The row's other columns by their meta keys, or None when their text passes `budget` characters."""
    meta = dict(where)
    for at, key, named in columns.others:
        value = row[at]
        if type(value) is not str or not value:  # text is the common case: no conversion call for it
            value = json_value(value)
        if named or value is not None:
            meta[key] = value
            budget -= len(value) if type(value) is str else 16
            if budget < 0:
                return None
    return meta


def finish_sheet(path: Path, sheet: str, params: AIHubExcelParams, counts: SheetCounts, report: SourceReport) -> None:
    """The sheet's notes; a UserError when most of its rows have the languages the other way round."""
    if counts.swapped and counts.swapped * 2 > counts.pairs:
        raise UserError(f"{path} (sheet {sheet!r}): {counts.swapped:,} of {counts.pairs:,} rows have English in "
                        f"{params.source_column} and Korean in {params.target_column} (the first on Excel row "
                        f"{counts.first_swapped}): the columns look swapped. Set `source_column: "
                        f"{params.target_column}` and `target_column: {params.source_column}` in source "
                        f"{params.name}, or swap the columns in the workbook.")
    if counts.swapped:
        report.note(f"{path.name} [{sheet}]: {counts.swapped} row(s) with English in {params.source_column} and "
                    f"Korean in {params.target_column} dropped as swapped (the first on Excel row {counts.first_swapped})")
    for column, count in counts.controls.items():
        report.note(controls_removed(f"{path.name} [{sheet}]", counts.control_chars, count, f"cell(s) in {column}"))
    for column, count in counts.coerced.items():
        if count:
            report.note(f"{path.name} [{sheet}]: {count} non-text cell(s) in {column} (numbers/dates) written as text")
    if counts.formulas:
        report.note(f"{path.name} [{sheet}]: {counts.formulas} formula cell(s) in the text columns; used the value "
                    "Excel last computed and saved in the file")


def read(params: AIHubExcelParams, report: SourceReport) -> Iterator[dict[str, Any]]:
    check_templates(params)
    books = shared_workbooks()
    for path in resolve_paths(params.path, SUFFIXES, f"source {params.name}: path"):
        yield from read_workbook(path, params, report, books)


SOURCE = Source(kind="aihub_excel", params=AIHubExcelParams, read=read, files_field="path", suffixes=SUFFIXES,
                per_file=True)

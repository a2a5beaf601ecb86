"""Opening an untrusted workbook: what its bytes say before a reader sees them, and the readers (python-calamine,
openpyxl) in a child process that may take only so much memory and CPU time.

A workbook comes from elsewhere, and a reader trusts it: calamine (Rust) holds a sheet as one block from A1 to
its farthest cell, 32 bytes a cell, so one stray value in XFD1048576 asks for 512 GiB, and the failed
allocation aborts the process that asked. So, before any reader:
- what the file is comes from its first bytes (`workbook_format`): a zip is an .xlsx whatever its name, an
  OLE container is an .xls, or a password-protected .xlsx when it holds an encrypted package;
- what an .xlsx may unpack to comes from its zip directory (`check_unpacked_size`), whose sizes the readers
  enforce (a part larger than its stated size is an error to them): a part that packs more than real ones
  (4-15x) is searched for a cell longer than Excel allows, refused when it has one or packs like a zip bomb
  (MAX_PACKING_RATIO), and all parts together may unpack to at most the source's `max_unpacked_mb`;
- the reading child may grow by `memory_budget` and spend `cpu_budget`, both from the unpacked size. Past
  them the allocation fails or SIGXCPU ends the child; the file is then searched for the cause (`stray_cell`)
  so that the message names the cell.
"""

from __future__ import annotations

import contextlib
import heapq
import re
import signal
import zipfile
import zlib
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator
from xml.etree import ElementTree

from distillery.core.errors import UserError
from distillery.core.isolation import Child, NativeCrash, describe_exit, limit_growth

ZIP_MAGIC = b"PK\x03\x04"
OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"  # the compound-file container of .xls and of encrypted .xlsx
ENCRYPTION_STREAMS = ("EncryptionInfo", "EncryptedPackage")  # MS-OFFCRYPTO: what an encrypted .xlsx holds
EXCEL_CELL_CHARS = 32_767  # the most text Excel lets a cell hold
SCAN_FROM_RATIO = 20  # a part packing more than real ones do is searched for a cell longer than Excel allows
MAX_PACKING_RATIO = 100  # a part packing more is a zip bomb, whatever it holds
RATIO_FROM_BYTES = 1 << 20  # smaller parts cannot cost anything, whatever their ratio
BASE_MEMORY = 1 << 30  # the reader's own needs, whatever the workbook
CELL_BYTES = 32  # what calamine keeps for each cell of a sheet's block, empty or not
MEMORY_PER_UNPACKED_BYTE = 4
ROW_BATCH = 2000  # rows per message from the reading child
CHUNK = 1 << 20
INDEX_BYTES = 16 << 20  # xl/workbook.xml and its relationships list the sheets: kilobytes in a real workbook
# What unpacking a damaged zip member raises (a bad CRC, an unknown compression method, the encrypted flag, a cut
# deflate stream); the readers in the child say the same of the parts they read.
UNPACK_ERRORS = (zipfile.BadZipFile, NotImplementedError, RuntimeError, zlib.error, EOFError, OSError)
CELL_REF = re.compile(rb'<c\s[^>]*?\br="([A-Z]{1,3})([0-9]{1,7})"[^>]*?(/?)>')
OTHER_TAGS = re.compile(rb"<(?!/?(?:c|si)[\s/>])[^<>]*>")  # every tag but a cell's (<c>) or a shared string's (<si>)


def size_text(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def column_letter(index: int) -> str:
    """0-based column index -> Excel letters (0 -> A, 27 -> AB)."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(65 + rest) + letters
    return letters


def column_index(letters: str) -> int:
    """Excel letters -> 0-based column index (A -> 0, AB -> 27)."""
    index = 0
    for letter in letters:
        index = index * 26 + ord(letter) - 64
    return index - 1


# --- what the bytes say ---------------------------------------------------------------------------------------

def ole_has_stream(path: Path, names: tuple[str, ...]) -> bool:
    """Whether the OLE container has a stream named one of `names`: a 128-byte directory entry (entries lie at
    multiples of 128 bytes) starting with the name in UTF-16 and its zero, whose length field (at byte 64) says
    so. Text that merely holds the name elsewhere does not count."""
    needles = [f"{name}\0".encode("utf-16-le") for name in names]
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):  # CHUNK is a multiple of 128: no entry straddles two blocks
            for needle in needles:
                at = block.find(needle)
                while at != -1:
                    if at % 128 == 0 and int.from_bytes(block[at + 64:at + 66], "little") == len(needle):
                        return True
                    at = block.find(needle, at + 1)
    return False


def encrypted_error(path: Path) -> UserError:
    return UserError(f"{path}: the workbook is encrypted (password-protected), so it cannot be read. Open it in "
                     "Excel, remove the password (File > Info > Protect Workbook > Encrypt with Password, clear "
                     "it) and save it again.")


def workbook_format(path: Path) -> str:
    """"xlsx" (a zip: .xlsx/.xlsm, whatever the file is named) or "xls" (an OLE container), from the first
    bytes; a UserError for an encrypted workbook, an empty file or something else under a workbook's name."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head.startswith(ZIP_MAGIC):
        return "xlsx"
    if head.startswith(OLE_MAGIC):
        if ole_has_stream(path, ENCRYPTION_STREAMS):
            raise encrypted_error(path)
        if path.suffix.lower() != ".xls":
            raise UserError(f"{path}: this is an old binary Excel workbook (.xls) saved under a {path.suffix} name. "
                            "Rename it to .xls, or open it in Excel and save it as .xlsx.")
        return "xls"
    kind = "empty" if not head else "not an Excel workbook (an .xlsx file is a zip archive and an .xls file an " \
                                    "OLE container; this one is neither)"
    raise UserError(f"{path}: the file is {kind}. Was another file (CSV, HTML, a download error page) saved under "
                    "a workbook's name? Export it from Excel as .xlsx, or use the `hf` source for CSV.")


# --- what an .xlsx may unpack to ------------------------------------------------------------------------------

def check_unpacked_size(path: Path, limit: int) -> int:
    """The bytes the .xlsx's parts unpack to, as its zip directory states; a UserError for a part that packs
    more than real ones and holds a cell with more text than Excel allows, or packs like a zip bomb (naming the
    cell where one is the cause), and for more than `limit` in all."""
    try:
        with zipfile.ZipFile(path) as archive:
            parts = archive.infolist()
            for part in parts:
                if part.file_size > RATIO_FROM_BYTES and part.file_size > SCAN_FROM_RATIO * max(part.compress_size, 1):
                    with damaged_part(path, part.filename):
                        check_packed_part(path, archive, part)
    except zipfile.BadZipFile:
        return path.stat().st_size  # the readers say what is wrong with it
    total = sum(part.file_size for part in parts)
    if total > limit:
        biggest = max(parts, key=lambda part: part.file_size)
        raise UserError(f"{path}: the workbook unpacks to {size_text(total)} ({biggest.filename} alone "
                        f"{size_text(biggest.file_size)}), more than this source allows (`max_unpacked_mb: "
                        f"{limit >> 20}`). Split it into smaller workbooks, or raise `max_unpacked_mb` if it is "
                        "genuine and the machine has the memory (reading takes up to about 4 times the unpacked size).")
    return total


@contextlib.contextmanager
def damaged_part(path: Path, member: str) -> Iterator[None]:
    """A zip member that cannot be unpacked, read in this process, as the UserError the readers give."""
    try:
        yield
    except UNPACK_ERRORS as err:
        raise UserError(f"{path}: the workbook is damaged: its part {member} cannot be unpacked ({err}). Replace it "
                        "with a good copy, or open it in Excel and save it again.") from None


def check_packed_part(path: Path, archive: zipfile.ZipFile, part: zipfile.ZipInfo) -> None:
    ratio = part.file_size // max(part.compress_size, 1)
    packing = (f"unpacks to {size_text(part.file_size)} from {size_text(part.compress_size)} ({ratio:,} times; real "
               "workbooks pack 4-15 times)")
    found = long_text_in(archive, part.filename)
    if found is not None and found[1]:
        sheet, cell = found
        raise UserError(f"{path} (sheet {sheet!r}): cell {cell} holds more text than the {EXCEL_CELL_CHARS:,} "
                        f"characters Excel lets a cell hold, and its part {part.filename} {packing}: a zip bomb. "
                        f"Replace the workbook with a good copy, or clear cell {cell} in Excel and save it again.")
    if found is not None or ratio > MAX_PACKING_RATIO:
        raise UserError(f"{path}: its part {part.filename} {packing}: a zip bomb, not a workbook. Replace it "
                        "with a good copy.")


def long_text_in(archive: zipfile.ZipFile, member: str) -> tuple[str, str] | None:
    """(sheet, cell) holding the first text in `member` longer than a cell may hold, over all its runs (either
    empty where it cannot be told); None when there is none."""
    sheets = sheet_parts(archive)
    with archive.open(member) as handle:
        found = first_long_text(handle, 4 * EXCEL_CELL_CHARS)  # UTF-8 takes up to 4 bytes a character
    if found is None:
        return None
    opened, items = found
    refs = CELL_REF.findall(opened)
    if member in sheets and refs:
        return sheets[member], (refs[-1][0] + refs[-1][1]).decode()
    if member.endswith("sharedStrings.xml") and items:
        return cell_with_shared_string(archive, sheets, items - 1) or ("", "")
    return "", ""


def first_long_text(handle: Any, limit: int) -> tuple[bytes, int] | None:
    """The first cell (`<c>`) or shared string (`<si>`) whose text, over all its runs (`<r><t>`), passes `limit`
    bytes, or a run of text outside them that does; streamed, stopping there. Returns the cell's opening tag (its
    `r=` names it; empty outside one) and how many `<si>` items open up to it (the shared string it is); None when
    there is none."""
    opened, length, items, carry = b"", 0, 0, b""  # the open cell's tag (empty outside one), its text so far
    while chunk := handle.read(CHUNK):
        text = carry + chunk
        cut = text.rfind(b"<")
        cut = cut if cut != -1 and text.find(b">", cut) == -1 else len(text)  # an unfinished tag waits
        done, carry = text[:cut], text[cut:]
        if len(carry) > limit:
            return b"", 0
        first, *rest = OTHER_TAGS.sub(b"\0", done).split(b"<")  # the pieces after the first start with a cell's tag
        length, long = grow(bool(opened), length, first, limit)
        if long:
            return opened, items if opened else 0
        ends = [len(rest) - 1] if rest else []  # the last piece goes on into the next chunk
        if max(map(len, rest), default=0) > limit:  # only a piece that long can hold a long cell or run
            ends = [i for i, piece in enumerate(rest) if len(piece) > limit] + ends
        for i in ends:
            tag, _, body = rest[i].partition(b">")
            opened = b"" if tag.startswith(b"/") or tag.endswith(b"/") else b"<" + tag + b">"
            length, long = grow(bool(opened), 0, body, limit)
            if long:
                return opened, items + si_count(b"<" + b"<".join(rest[:i + 1])) if opened else 0
        items += si_count(done)
    return None


def si_count(xml: bytes) -> int:
    return xml.count(b"<si>") + xml.count(b"<si ") + xml.count(b"<si/")


def grow(inside: bool, length: int, body: bytes, limit: int) -> tuple[int, bool]:
    """The text length after `body` (its tags made \\0) and whether it passed `limit`: a cell's text counts all its
    runs, text outside cells one run at a time."""
    if inside:
        length += len(body) - body.count(b"\0")
        return length, length > limit
    runs = body.split(b"\0")
    longest = max(length + len(runs[0]), max(map(len, runs[1:]), default=0))
    return len(runs[-1]) + (length if len(runs) == 1 else 0), longest > limit


def sheet_parts(archive: zipfile.ZipFile) -> dict[str, str]:
    """Zip member of each worksheet -> its sheet name (from xl/workbook.xml and its relationships)."""
    main = "{http://schemas.openxmlformats.org/spreadsheetml/2006/main}"
    rel = "{http://schemas.openxmlformats.org/officeDocument/2006/relationships}"
    try:
        if any(archive.getinfo(name).file_size > INDEX_BYTES for name in ("xl/workbook.xml", "xl/_rels/workbook.xml.rels")):
            return {}  # not a real one (check_packed_part refuses it): the sheet names are not needed to say so
        workbook = ElementTree.fromstring(archive.read("xl/workbook.xml"))
        rels = ElementTree.fromstring(archive.read("xl/_rels/workbook.xml.rels"))
    except (KeyError, ElementTree.ParseError, *UNPACK_ERRORS):
        return {}
    targets = {r.get("Id"): r.get("Target", "") for r in rels}
    parts = {}
    for sheet in workbook.iter(f"{main}sheet"):
        target = targets.get(sheet.get(f"{rel}id"), "")
        member = target.lstrip("/") if target.startswith("/") else f"xl/{target}"
        parts[member] = sheet.get("name", "")
    return parts


def cell_with_shared_string(archive: zipfile.ZipFile, sheets: dict[str, str], index: int) -> tuple[str, str] | None:
    """(sheet, cell) of the first cell showing shared string number `index`."""
    pattern = re.compile(rb'<c\s(?=[^>]*\bt="s")[^>]*?\br="([A-Z]{1,3}[0-9]{1,7})"[^>]*>\s*<v>%d</v>' % index)
    for member, name in sheets.items():
        with archive.open(member) as handle:
            tail = b""
            while chunk := handle.read(CHUNK):
                match = pattern.search(tail + chunk)
                if match:
                    return name, match.group(1).decode()
                tail = chunk[-512:]
    return None


# --- what reading may cost, and why it failed -----------------------------------------------------------------

def memory_budget(unpacked: int) -> int:
    return BASE_MEMORY + MEMORY_PER_UNPACKED_BYTE * unpacked


def cpu_budget(unpacked: int) -> float:
    return 60 + unpacked / 1e6  # a reader does tens of MB a second; this is the bound of a stuck one


@dataclass(frozen=True)
class Cell:
    row: int  # 1-based, as Excel numbers them
    column: int  # 1-based
    ref: str


def far_cells(handle: Any, keep: int = 64) -> tuple[list[Cell], list[Cell]]:
    """The `keep` cells holding something with the largest rows, and those with the largest columns (each list
    largest first), from a sheet's streamed XML."""
    by_row: list[tuple[int, int, str]] = []
    by_column: list[tuple[int, int, str]] = []
    tail = b""
    while chunk := handle.read(CHUNK):
        text = tail + chunk
        cut = max(text.rfind(b"<"), 0)
        for letters, digits, empty in CELL_REF.findall(text, 0, cut):
            if not empty:
                row, column = int(digits), column_index(letters.decode()) + 1
                keep_largest(by_row, (row, column, (letters + digits).decode()), keep)
                keep_largest(by_column, (column, row, (letters + digits).decode()), keep)
        tail = text[cut:]
    return ([Cell(r, c, ref) for r, c, ref in sorted(by_row, reverse=True)],
            [Cell(r, c, ref) for c, r, ref in sorted(by_column, reverse=True)])


def keep_largest(heap: list, item: tuple, keep: int) -> None:
    if len(heap) < keep:
        heapq.heappush(heap, item)
    elif item > heap[0]:
        heapq.heapreplace(heap, item)


def strays(by_row: list[Cell], by_column: list[Cell], limit: int, most: int = 5) -> tuple[list[Cell], int, int] | None:
    """The fewest far cells (at most `most`) without which the sheet's block fits in `limit` bytes, and the
    block's rows and columns then; None when the block fits already or no few cells are the cause. Takes away,
    one at a time, the farthest row's or the farthest column's cell, whichever leaves the smaller block."""
    removed: list[Cell] = []

    def extent(without: list[Cell]) -> tuple[int, int] | None:
        row = next((c.row for c in by_row if c not in without), None)
        column = next((c.column for c in by_column if c not in without), None)
        return None if row is None or column is None else (row, column)

    while (block := extent(removed)) is not None:
        if block[0] * block[1] * CELL_BYTES <= limit:
            return (removed, *block) if removed else None
        if len(removed) == most:
            return None
        def area_without(cell: Cell) -> int:
            block = extent([*removed, cell])
            return block[0] * block[1] if block else 0

        farthest = [next(c for c in cells if c not in removed) for cells in (by_row, by_column)]
        removed.append(min(farthest, key=area_without))
    return None


def stray_cell(path: Path, sheet: str, limit: int) -> UserError | None:
    """The message naming the far cells that stretch the sheet's block past `limit` bytes when the block without
    them would fit; None when a few such cells are not the cause."""
    try:
        with zipfile.ZipFile(path) as archive:
            member = next((m for m, name in sheet_parts(archive).items() if name == sheet), None)
            if member is None:
                return None
            with archive.open(member) as handle:
                by_row, by_column = far_cells(handle)
    except (OSError, zipfile.BadZipFile, KeyError):
        return None
    found = strays(by_row, by_column, limit)
    if found is None:
        return None
    cells, rest_rows, rest_columns = found
    rows, columns = by_row[0].row, by_column[0].column
    named = " and ".join(cell.ref for cell in cells)
    what = f"cell {named} holds a value" if len(cells) == 1 else f"cells {named} hold values"
    return UserError(f"{path} (sheet {sheet!r}): {what} far outside the rest of the data, which ends at "
                     f"{column_letter(rest_columns - 1)}{rest_rows}. The reader holds a sheet as one block from A1 to "
                     f"its farthest cell: {rows:,} rows x {columns:,} columns here, more memory than a workbook of "
                     f"this size may take ({size_text(limit)}). Clear {named} in Excel (Ctrl+End jumps to the last "
                     "used cell) and save the workbook again.")


def reading_failed(path: Path, fmt: str, sheet: str | None, unpacked: int, crash: BaseException,
                   stderr: str) -> UserError:
    """One message for a reader that died or ran out of its memory or time: the stray cell where one is the
    cause, else what ran out, and what to do."""
    where = f"{path} (sheet {sheet!r})" if sheet else str(path)
    asked = re.search(r"memory allocation of (\d+) bytes failed", stderr)
    exitcode = crash.exitcode if isinstance(crash, NativeCrash) else None
    if asked or isinstance(crash, MemoryError):
        found = stray_cell(path, sheet, memory_budget(unpacked)) if sheet and fmt == "xlsx" else None
        if found is not None:
            return found
        wanted = f" (it asked for {size_text(int(asked.group(1)))} at once)" if asked else ""
        return UserError(f"{where}: reading it needs more memory than a workbook of {size_text(unpacked)} may take "
                         f"({size_text(memory_budget(unpacked))}){wanted}. Something in it claims far more than it "
                         "holds: open it in Excel, delete empty rows and columns past the data, and save it again.")
    if exitcode == -signal.SIGXCPU:
        return UserError(f"{where}: reading it took more than {cpu_budget(unpacked):.0f} s of CPU time, far more "
                         f"than a workbook of {size_text(unpacked)} needs. Open it in Excel and save it again, or "
                         "replace it with a good copy.")
    return UserError(f"{where}: the Excel reader crashed ({describe_exit(exitcode)}) reading it: the file is damaged "
                     "or not what its name says. Open it in Excel and save it again, or replace it with a good copy.")


# --- the reading child ----------------------------------------------------------------------------------------

@dataclass
class SheetInfo:
    name: str
    visible: bool
    worksheet: bool  # not a chart sheet


def open_book(state: dict, emit: Callable, path: str, fmt: str, memory: int, cpu: float) -> list[SheetInfo]:
    """In the child: open the workbook (calamine, else openpyxl) within the budget; its sheets in order."""
    close_book(state)
    limit_growth(memory, cpu)
    state.update(path=Path(path), fmt=fmt)
    try:
        state["calamine"] = book = open_calamine(Path(path), fmt)
        visible, worksheet = calamine_kinds()
        return [SheetInfo(m.name, m.visible == visible, m.typ == worksheet) for m in book.sheets_metadata]
    except UserError:
        raise
    except ImportError:
        state["calamine_error"] = "python-calamine is not installed"
    except Exception as err:  # noqa: BLE001 - calamine raises its own error types for zip/xml problems
        state["calamine_error"] = f"{type(err).__name__}: {err}"
    book = with_openpyxl(state)
    return [SheetInfo(name, book[name].sheet_state == "visible", hasattr(book[name], "iter_rows"))
            for name in book.sheetnames]


def calamine_kinds() -> tuple[Any, Any]:
    from python_calamine import SheetTypeEnum, SheetVisibleEnum

    return SheetVisibleEnum.Visible, SheetTypeEnum.WorkSheet


def open_calamine(path: Path, fmt: str) -> Any:
    from python_calamine import CalamineWorkbook, PasswordError

    try:
        if (fmt == "xls") == (path.suffix.lower() == ".xls"):
            return CalamineWorkbook.from_path(str(path))
        with open(path, "rb") as handle:  # a misnamed file: calamine tells the format from the content
            return CalamineWorkbook.from_filelike(handle)
    except PasswordError:
        raise encrypted_error(path) from None


def open_openpyxl(state: dict) -> Any:
    """openpyxl (read-only) on the child's workbook; a UserError naming both readers' errors when it fails too."""
    import openpyxl

    path = state["path"]
    try:
        # a file object, read as long as the workbook is: openpyxl would refuse an .xlsx under an .xls name
        state["handle"] = open(path, "rb")
        return openpyxl.load_workbook(state["handle"], read_only=True, data_only=True)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"{path}: the workbook is corrupt or not a real Excel file; neither calamine "
                        f"({state.get('calamine_error')}) nor openpyxl ({type(err).__name__}: {err}) can read it. "
                        "Open and re-save it in Excel, or replace it with a good copy.") from None


def close_book(state: dict) -> None:
    for key in ("calamine", "openpyxl", "handle"):
        book = state.pop(key, None)
        if book is not None:
            book.close()
    state.clear()


def load_sheet(state: dict, emit: Callable, name: str, n: int) -> tuple[str | None, list[list[Any]]]:
    """In the child: parse sheet `name` for sheet_rows, and return its first `n` rows (where the header is
    looked for). With calamine this is where the sheet is allocated; a sheet calamine cannot parse is read with
    openpyxl instead, and a note says so."""
    rows = None
    if "calamine" in state:
        try:
            rows = calamine_rows(state["calamine"].get_sheet_by_name(name))
        except Exception as err:  # noqa: BLE001
            state["calamine_error"] = f"{type(err).__name__}: {err}"
    if rows is None:
        rows = openpyxl_rows(with_openpyxl(state)[name])
    state["rows"] = rows
    note = None
    if "calamine_error" in state:
        note = f"{state['path'].name}: read with openpyxl because calamine could not ({state['calamine_error']})"
    return note, list(islice(rows, n))


def with_openpyxl(state: dict) -> Any:
    if "openpyxl" not in state:
        state["openpyxl"] = open_openpyxl(state)
    return state["openpyxl"]


Rows = Iterator[list[Any]]  # a sheet's rows from Excel row 1: the i-th (0-based) is Excel row i + 1


def calamine_rows(worksheet: Any) -> Rows:
    """The sheet's rows, one Python list at a time (to_python would hold them all). iter_rows starts at Excel
    row 1 but leaves out leading empty columns: they are put back, so that column j is Excel column j + 1."""
    start = worksheet.start
    pad = [""] * start[1] if start else []
    for row in worksheet.iter_rows():
        yield pad + row if pad else row


def openpyxl_rows(worksheet: Any) -> Rows:
    # the stated dimension (`<dimension ref=...>`) would pad every row out to its last column: read what is there
    worksheet.reset_dimensions()
    for row in worksheet.iter_rows(values_only=True):  # from row 1, empty rows included
        yield list(row)


def sheet_rows(state: dict, emit: Callable, batch: int) -> None:
    """In the child: the loaded sheet's rows, `batch` at a time."""
    rows = state.pop("rows")
    while chunk := list(islice(rows, batch)):
        emit(chunk)


def sheet_head(state: dict, emit: Callable, name: str, n: int) -> list[list[Any]]:
    """In the child: the first `n` rows of sheet `name`."""
    if "calamine" in state:
        try:
            return state["calamine"].get_sheet_by_name(name).to_python(skip_empty_area=False, nrows=n)
        except Exception:  # noqa: BLE001 - as load_sheet: openpyxl instead
            pass
    return list(islice(openpyxl_rows(with_openpyxl(state)[name]), n))


def typed_cells(state: dict, emit: Callable, sheet: str, rows_from: int, columns: tuple[int, ...],
                data_type: str) -> dict[tuple[int, int], Any]:
    """In the child: {(row index, column index): value} of the cells of openpyxl's `data_type` in `columns`
    (0-based, rows >= rows_from): "f", formulas, of which calamine only returns the cached value; "e", error
    values (#N/A, #REF!, also a formula's cached one), which calamine returns as ""."""
    import openpyxl

    with open(state["path"], "rb") as handle:
        # formulas show only without data_only, a formula's cached error only with it
        book = openpyxl.load_workbook(handle, read_only=True, data_only=data_type != "f")
        try:
            found = {}
            worksheet = book[sheet]
            worksheet.reset_dimensions()
            for row in worksheet.iter_rows(min_row=rows_from + 1, min_col=min(columns) + 1, max_col=max(columns) + 1):
                for cell in row:
                    column = getattr(cell, "column", None)
                    if column is not None and column - 1 in columns and cell.data_type == data_type:
                        found[(cell.row - 1, column - 1)] = cell.value
            return found
        finally:
            book.close()


@dataclass(frozen=True)
class HiddenCells:
    """What calamine's values hide, by (row index, column index): formula cells (it gives their cached value)
    and error values such as #N/A (it gives "")."""

    formulas: set[tuple[int, int]]
    errors: dict[tuple[int, int], str]


HIDDEN_KINDS = {"f": (b"<f>", b"<f "), "e": (b't="e"', b"t='e'")}  # a formula element, an error cell's type


def hidden_kinds(path: Path) -> set[str]:
    """Which of HIDDEN_KINDS (openpyxl's data types) the worksheets of an .xlsx hold, by one streamed byte search."""
    found: set[str] = set()
    keep = max(len(mark) for marks in HIDDEN_KINDS.values() for mark in marks) - 1  # a mark split across blocks
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if not (name.startswith("xl/worksheets/") and name.endswith(".xml")):
                continue
            with damaged_part(path, name), archive.open(name) as handle:
                tail = b""
                while len(found) < len(HIDDEN_KINDS) and (block := handle.read(CHUNK)):
                    chunk = tail + block
                    found.update(kind for kind, marks in HIDDEN_KINDS.items() if any(m in chunk for m in marks))
                    tail = chunk[-keep:]
    return found


# What openpyxl and the zip and XML parsers raise on a file they cannot follow (a style index that is no number, a
# part missing from the archive). Distillery's own mistakes (AttributeError, NameError, ...) stay bugs, with a log.
READER_ERRORS = (ValueError, TypeError, KeyError, IndexError, EOFError, zipfile.BadZipFile, ElementTree.ParseError)


class Workbooks:
    """Workbooks read one after another in one child process, each within its budget:

        books = shared_workbooks()
        sheets = books.open(path, max_unpacked)    # [SheetInfo]; UserError for a bad file
        note, head = books.load(sheet, n)          # the first n rows
        for row in books.rows(): ...               # the rows after them

    A reader that dies or runs out of its budget is a UserError naming the file, the sheet and, where one is the
    cause, the cell (reading_failed). The child is started on first use and kept for the next workbook.
    """

    def __init__(self) -> None:
        self._child: Child | None = None
        self._streaming = False
        self.path: Path | None = None
        self.fmt = ""
        self.sheet: str | None = None
        self.unpacked = 0

    def close(self) -> None:
        if self._child is not None:
            self._child.close()
            self._child = None
        self._streaming = False

    def open(self, path: Path, max_unpacked: int) -> list[SheetInfo]:
        if self._streaming:  # the rows of the last workbook were left unread: that child is busy with them
            self.close()
        self.path, self.sheet = path, None
        self.fmt = workbook_format(path)
        self.unpacked = check_unpacked_size(path, max_unpacked) if self.fmt == "xlsx" else path.stat().st_size
        # absolute: the child outlives this call, and the working directory may change before the next one
        return self._call(open_book, str(path.absolute()), self.fmt, memory_budget(self.unpacked),
                          cpu_budget(self.unpacked))

    def load(self, sheet: str, n: int) -> tuple[str | None, list[list[Any]]]:
        self.sheet = sheet
        return self._call(load_sheet, sheet, n)

    def rows(self) -> Rows:
        self._streaming = True
        try:
            for batch in self._started().stream(sheet_rows, ROW_BATCH):
                yield from batch
        except (NativeCrash, MemoryError) as crash:
            raise self._failed(crash) from None
        except UserError:
            raise
        except READER_ERRORS as err:  # what a reader raised on this file, transported from the child
            raise self._unreadable(err) from None
        self._streaming = False

    def head(self, sheet: str, n: int) -> list[list[Any]]:
        self.sheet = sheet
        return self._call(sheet_head, sheet, n)

    def hidden_cells(self, sheet: str, rows_from: int, columns: tuple[int, ...]) -> HiddenCells:
        """The formula cells and the error values (#N/A, ...) of an .xlsx's `columns` (typed_cells); an .xls's
        formulas give their cached value and its errors read as empty cells."""
        kinds = hidden_kinds(self.path) if self.fmt == "xlsx" else set()
        formulas = set(self._call(typed_cells, sheet, rows_from, columns, "f")) if "f" in kinds else set()
        errors = self._call(typed_cells, sheet, rows_from, columns, "e") if "e" in kinds else {}
        return HiddenCells(formulas, errors)

    def _started(self) -> Child:
        if self._child is None:
            self._child = Child("the Excel reader", "reading a workbook", capture_stderr=True)
        return self._child

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return self._started().call(fn, *args)
        except (NativeCrash, MemoryError) as crash:
            raise self._failed(crash) from None
        except UserError:
            raise
        except READER_ERRORS as err:  # what a reader raised on this file, transported from the child
            raise self._unreadable(err) from None

    def _unreadable(self, err: Exception) -> UserError:
        """A reader's own error on a file it opened (openpyxl's ValueError on a style index that is no number, its
        TypeError on a style part it cannot follow): the file's fault, named with it."""
        self.close()
        where = f"{self.path} (sheet {self.sheet!r})" if self.sheet else str(self.path)
        detail = (str(err).splitlines() or [""])[0][:200]
        return UserError(f"{where}: the Excel readers cannot read it ({type(err).__name__}: {detail}): the file is "
                         "damaged or written by a program that does not follow the format. Open it in Excel and save "
                         "it again, or replace it with a good copy.")

    def _failed(self, crash: BaseException) -> UserError:
        stderr = self._child.stderr_tail() if self._child is not None else ""
        self.close()
        return reading_failed(self.path, self.fmt, self.sheet, self.unpacked, crash, stderr)


_shared: Workbooks | None = None


def shared_workbooks() -> Workbooks:
    """This process's Workbooks: its child outlives one source, as starting one costs an interpreter's start-up
    and imports (a third of a second), and it ends with this process."""
    global _shared
    if _shared is None:
        _shared = Workbooks()
    return _shared

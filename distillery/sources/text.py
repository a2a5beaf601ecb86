"""Text from spreadsheet cells: what in it is invisible, what is a control character, which script it is in, and
how to show a name whose difference from another cannot be seen."""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from distillery.core.unseen import IGNORABLE_RANGES, control_characters

# and the blank Braille pattern U+2800, a printable character that shows nothing, used to fake a non-empty cell
IGNORABLE_RANGES += ((0x2800, 0x2800),)
IGNORABLE = "".join(chr(c) for first, last in IGNORABLE_RANGES for c in range(first, last + 1))
WHITESPACE = "".join(chr(c) for c in range(0x3001) if chr(c).isspace())
INVISIBLE = WHITESPACE + IGNORABLE
INVISIBLE_SET = frozenset(INVISIBLE)
# ignorables that str.isprintable() lets through (combining marks and letters such as the Hangul fillers)
PRINTABLE_IGNORABLE = frozenset(ch for ch in IGNORABLE if ch.isprintable())
_INVISIBLE_ANYWHERE = re.compile("[" + "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in IGNORABLE_RANGES) + "]")
# control characters (Unicode Cc) but tab, line feed and carriage return: removed from text, the ones that are
# whitespace (vertical tab, form feed, the separators) becoming a space
CONTROLS = {ord(ch): (" " if ch.isspace() else None) for ch in control_characters("\t\n\r")}
CONTROL_CHARS = re.compile("[" + re.escape("".join(map(chr, CONTROLS))) + "]")
HANGUL = re.compile("[\u1100-\u11ff\u3130-\u318f\ua960-\ua97f\uac00-\ud7a3\ud7b0-\ud7ff]")
LATIN = re.compile("[A-Za-z\u00c0-\u024f]")


def clean_text(value: str) -> tuple[str, str]:
    """(the text without control characters and without invisible characters at its ends, the control
    characters removed). Text that was only invisible characters comes back empty."""
    if value.isprintable() and not (value[:1] in PRINTABLE_IGNORABLE or value[-1:] in PRINTABLE_IGNORABLE):
        return value.strip(), ""  # the common case, at C speed
    value, controls = without_controls(value)
    return value.strip(INVISIBLE), controls


def without_controls(value: str) -> tuple[str, str]:
    """(the text without control characters, those removed); tab, line feed and carriage return stay."""
    controls = "".join(CONTROL_CHARS.findall(value))
    return (value.translate(CONTROLS), controls) if controls else (value, "")


def clean_values(value: Any) -> tuple[Any, str]:
    """`value` (a dataset row: objects, lists, text) without control characters in any of its texts, and those
    removed (what is invisible at a text's ends is for the reader of each field to strip: text parts are joined).
    Nearly every row holds none (holds_controls): it comes back as it is, nothing rebuilt."""
    return without_any_controls(value) if holds_controls(value) else (value, "")


def without_any_controls(value: Any) -> tuple[Any, str]:
    if isinstance(value, str):
        return without_controls(value)
    if not isinstance(value, (dict, list)):
        return value, ""
    pairs = [(key, without_any_controls(item)) for key, item in (value.items() if isinstance(value, dict) else enumerate(value))]
    removed = "".join(controls for _, (_, controls) in pairs)
    if isinstance(value, dict):
        return {key: item for key, (item, _) in pairs}, removed
    return [item for _, (item, _) in pairs], removed


def stripped(text: str) -> str:
    """`text` without whitespace or invisible characters at its ends (str.strip(INVISIBLE) only where an end is
    one: its thousands of characters make it slow for every value of a large dataset)."""
    text = text.strip()
    if text and (text[0] in INVISIBLE_SET or text[-1] in INVISIBLE_SET):
        return text.strip(INVISIBLE)
    return text


def holds_controls(value: Any) -> bool:
    if isinstance(value, str):
        return CONTROL_CHARS.search(value) is not None
    if isinstance(value, (dict, list)):
        return any(map(holds_controls, value.values() if isinstance(value, dict) else value))
    return False


def name_key(name: str) -> str:
    """A column name as it is compared: NFC (macOS writes Hangul decomposed, NFD), without invisible characters."""
    return _INVISIBLE_ANYWHERE.sub("", unicodedata.normalize("NFC", name)).strip(INVISIBLE)


def codepoints(text: str) -> str:
    return " ".join(f"U+{ord(ch):04X}" for ch in text)


def controls_removed(where: str, controls: set[str], count: int, what: str) -> str:
    """The note every source writes for the control characters it removed from `count` `what`s."""
    return f"{where}: control characters ({codepoints(''.join(sorted(controls)))}) removed from {count} {what}"


def shown(name: str) -> str:
    """`name` for a message: as it is when what one sees is what it holds, else with its code points, so that
    two names that look the same but differ (decomposed Hangul, a BOM, a zero-width space) can be told apart."""
    if name == name_key(name) and name.isprintable():
        return name
    return f"{name.strip(INVISIBLE) or repr(name)} [{codepoints(name)}]"


def hangul_share(text: str) -> float | None:
    """Hangul letters / (Hangul + Latin letters); None when there are neither."""
    hangul, latin = len(HANGUL.findall(text)), len(LATIN.findall(text))
    return hangul / (hangul + latin) if hangul + latin else None


def swapped(korean: str, english: str) -> bool:
    """Whether the pair reads English on the Korean side and Korean on the English side (by Hangul share)."""
    if not LATIN.search(korean):  # the common case: a Korean side without Latin letters is not English
        return False
    share = hangul_share(korean)
    if share is None or share >= 0.5:
        return False
    other = hangul_share(english)
    return other is not None and other > 0.5


def listed(columns: list[Any], most: int = 20, width: int = 40) -> str:
    """Column names for a message, bounded: a file that is not a table has its first line (or a megabyte of it)
    for a header, and a sheet's widest row thousands of long cells."""
    names = [name if len(name) <= width else name[:width] + "…" for name in map(str, columns[:most])]
    return ", ".join(names) + (f" (and {len(columns) - most} more)" if len(columns) > most else "")

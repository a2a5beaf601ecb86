"""Text from spreadsheet cells: what in it is invisible, what is a control character, which script it is in, and
how to show a name whose difference from another cannot be seen."""

from __future__ import annotations

import re
import unicodedata

from distillery.core.unseen import IGNORABLE_RANGES

# and the blank Braille pattern U+2800, a printable character that shows nothing, used to fake a non-empty cell
IGNORABLE_RANGES += ((0x2800, 0x2800),)
IGNORABLE = "".join(chr(c) for first, last in IGNORABLE_RANGES for c in range(first, last + 1))
WHITESPACE = "".join(chr(c) for c in range(0x3001) if chr(c).isspace())
INVISIBLE = WHITESPACE + IGNORABLE
# ignorables that str.isprintable() lets through (combining marks and letters such as the Hangul fillers)
PRINTABLE_IGNORABLE = frozenset(ch for ch in IGNORABLE if ch.isprintable())
_INVISIBLE_ANYWHERE = re.compile("[" + "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in IGNORABLE_RANGES) + "]")
# control characters (Unicode Cc) but tab, line feed and carriage return: removed from text, the ones that are
# whitespace (vertical tab, form feed, the separators) becoming a space
CONTROLS = {c: (" " if chr(c).isspace() else None) for c in (*range(0x20), *range(0x7F, 0xA0)) if chr(c) not in "\t\n\r"}
HANGUL = re.compile("[\u1100-\u11ff\u3130-\u318f\ua960-\ua97f\uac00-\ud7a3\ud7b0-\ud7ff]")
LATIN = re.compile("[A-Za-z\u00c0-\u024f]")


def clean_text(value: str) -> tuple[str, str]:
    """(the text without control characters and without invisible characters at its ends, the control
    characters removed). Text that was only invisible characters comes back empty."""
    if value.isprintable() and not (value[:1] in PRINTABLE_IGNORABLE or value[-1:] in PRINTABLE_IGNORABLE):
        return value.strip(), ""  # the common case, at C speed
    controls = "".join(ch for ch in value if ord(ch) in CONTROLS)
    if controls:
        value = value.translate(CONTROLS)
    return value.strip(INVISIBLE), controls


def name_key(name: str) -> str:
    """A column name as it is compared: NFC (macOS writes Hangul decomposed, NFD), without invisible characters."""
    return _INVISIBLE_ANYWHERE.sub("", unicodedata.normalize("NFC", name)).strip(INVISIBLE)


def codepoints(text: str) -> str:
    return " ".join(f"U+{ord(ch):04X}" for ch in text)


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

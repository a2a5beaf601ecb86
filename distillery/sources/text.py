"""Text from spreadsheet cells: what in it is invisible, what is a control character, which script it is in, and
how to show a name whose difference from another cannot be seen."""

from __future__ import annotations

import re
import unicodedata


# Unicode's Default_Ignorable_Code_Point (DerivedCoreProperties.txt): characters that show as nothing at all, such
# as the zero-width space U+200B, the word joiner U+2060, the BOM U+FEFF, soft hyphens and the Hangul fillers.
IGNORABLE_RANGES = ((0xAD, 0xAD), (0x34F, 0x34F), (0x61C, 0x61C), (0x115F, 0x1160), (0x17B4, 0x17B5),
                    (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x206F), (0x3164, 0x3164),
                    (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3),
                    (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF))
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
# Unicode's line and paragraph separators (Zl, Zp): line breaks to some viewers, nothing to others.
SEPARATORS = "\u2028\u2029"


def unseen_pattern(keep: str = "\t\n") -> re.Pattern:
    """Every character that shows nothing or acts on the display instead of showing: the control characters but
    those in `keep`, the ignorables (zero-width characters, bidi overrides and isolates), the separators and
    lone surrogates (which no UTF-8 output can even write)."""
    controls = "".join(chr(c) for c in (*range(0x20), *range(0x7F, 0xA0)) if chr(c) not in keep)
    ranges = "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in (*IGNORABLE_RANGES, (0xD800, 0xDFFF)))
    return re.compile("[" + re.escape(controls + SEPARATORS) + ranges + "]")


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

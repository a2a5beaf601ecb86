"""Characters that show nothing, or act on the display instead of showing: one set for every place that takes
text from outside (spreadsheet cells in sources/text.py, what sandboxed code prints in reasoning/sandbox.py, what
the console prints: `for_terminal`)."""

from __future__ import annotations

import re

# Unicode's Default_Ignorable_Code_Point (DerivedCoreProperties.txt): characters that show as nothing at all, such
# as the zero-width space U+200B, the word joiner U+2060, the BOM U+FEFF, soft hyphens and the Hangul fillers.
IGNORABLE_RANGES = ((0xAD, 0xAD), (0x34F, 0x34F), (0x61C, 0x61C), (0x115F, 0x1160), (0x17B4, 0x17B5),
                    (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x206F), (0x3164, 0x3164),
                    (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3),
                    (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF))
# Unicode's line and paragraph separators (Zl, Zp): line breaks to some viewers, nothing to others.
SEPARATORS = "\u2028\u2029"


def control_characters(keep: str) -> str:
    """Unicode's control characters (Cc: C0, DEL and C1) but those in `keep`."""
    return "".join(chr(c) for c in (*range(0x20), *range(0x7F, 0xA0)) if chr(c) not in keep)


def unseen_pattern(keep: str = "\t\n") -> re.Pattern:
    """Every character that shows nothing or acts on the display instead of showing: the control characters but
    those in `keep`, the ignorables (zero-width characters, bidi overrides and isolates), the separators and
    lone surrogates (which no UTF-8 output can even write)."""
    controls = control_characters(keep)
    return re.compile("[" + re.escape(controls + SEPARATORS) + class_ranges((*IGNORABLE_RANGES, (0xD800, 0xDFFF))) + "]")


def class_ranges(ranges: tuple[tuple[int, int], ...]) -> str:
    """Code point ranges (first, last) as the inside of a regular expression's character class."""
    return "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)


CONTROLS = re.compile("[" + re.escape(control_characters("")) + "]")  # every one, line breaks and tabs too
IGNORABLE = re.compile("[" + class_ranges(IGNORABLE_RANGES) + "]")  # the ignorables alone: controls stay separators


def holds_control(text: str) -> bool:
    """Whether `text` holds a control character (Cc), a line break or a tab included: a name or a value that must
    stay on its line (a file name in a message, a stop string in a Modelfile's quotes)."""
    return CONTROLS.search(text) is not None


# Terminal escape sequences (CSI, OSC, and two-character ESC sequences): a title, a clipboard write (OSC 52), a
# cleared screen or a hidden line, from text that only meant to be shown.
ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]?|\x9b[0-?]*[ -/]*[@-~]")
TERMINAL_CONTROLS = re.compile("[" + re.escape(control_characters("\t\n")) + "]")


def for_terminal(text: str) -> str:
    """Text from outside (a dataset row, a file name, a model's answer) as the console may print it: without
    terminal escape sequences and control characters (tabs and newlines kept). Everything else stays, zero-width
    joiners and bidi marks included: an emoji sequence or a right-to-left answer shows as written."""
    return TERMINAL_CONTROLS.sub("", ESCAPES.sub("", text))

"""Console output: one rich console, logging through it, and the end-of-run summary table."""

from __future__ import annotations

import logging
import os
import re

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from distillery.core.unseen import for_terminal

console = Console(highlight=False, soft_wrap=os.environ.get("CI") == "true")


def setup_logging(verbose: bool = False) -> None:
    """Route `logging` through rich; quiet the chatty libraries unless verbose."""
    handler = RichHandler(console=console, show_path=False, show_time=False)
    handler.addFilter(without_escapes)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", handlers=[handler],
                        force=True)
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "fsspec", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def without_escapes(record: logging.LogRecord) -> bool:
    """A logging filter: the message as for_terminal shows it (a log line can name a file or quote a reply)."""
    record.msg, record.args = for_terminal(record.getMessage()), None
    return True


def printable(text: str) -> str:
    """Text from outside (a file name, a dataset's id, an error naming either) for a rich markup string: shown as
    written, never read as markup, and without what would act on the terminal (for_terminal)."""
    return escape(for_terminal(text))


def summary_table(title: str, rows: list[tuple[str, ...]], headers: tuple[str, ...]) -> Table:
    """A compact table for the end of a stage or a run. Its text is shown as it is, never read as rich markup (a
    GGUF named after a base directory `model [v2]` lost its `[v2]`, and one holding `[/x]` ended the stage) and
    without terminal escapes (a file named with one)."""
    table = Table(title=Text(for_terminal(title)), title_justify="left", show_edge=False)
    for header in headers:
        table.add_column(Text(for_terminal(header)))
    for row in rows:
        table.add_row(*(Text(for_terminal(str(cell))) for cell in row))
    return table


def code_block(text: str, language: str = "") -> list[str]:
    """The lines of a markdown code block holding `text` as it is: its fence is longer than any run of backticks
    in it (a prompt holding ``` closed a 3-backtick fence and the rest rendered as the document's own markdown)."""
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    return [fence + language, text, fence]


def markdown_table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """The lines of a GitHub-flavoured markdown table (reports and model cards)."""
    return ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)] + \
        ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]

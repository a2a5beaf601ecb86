"""The README as a guide: the two commands first, short, links that resolve, RESULTS.md's table as it is."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
GUIDES = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_starts_with_the_two_commands_ci_runs() -> None:
    commands = README.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert [c.split("#")[0].strip() for c in commands] == [
        "pip install rust-just==1.59.0 && just demo", "pip install rust-just==1.59.0 && just test"]
    assert "just test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_readme_is_a_short_guide() -> None:
    assert len(README.encode()) <= 12_000


def test_relative_links_resolve() -> None:
    for guide in GUIDES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", guide.read_text(encoding="utf-8")):
            if not target.startswith(("http://", "https://", "mailto:")):
                assert (guide.parent / target).exists(), f"{guide.relative_to(ROOT)} links to missing {target}"


def test_benchmark_table_is_results_md_table() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from report import readme_table

    results = (ROOT / "bench" / "RESULTS.md").read_text(encoding="utf-8")
    table = [line for line in results.split("\n\n")[2].splitlines() if line.startswith("|")]
    shown = README.split("<!-- bench/RESULTS.md table: begin -->\n", 1)[1].split("\n<!--", 1)[0].splitlines()
    assert table and shown == readme_table(table), "README's table differs from bench/RESULTS.md: run `just bench`"
    assert shown[0] == "| figure | result | target |"

"""A Python script run as a child that ends when the pipeline does, however the pipeline ends.

    subprocess.run(tethered(script, "--outfile", out))   # as `python script --outfile out`

llama.cpp's converter is such a script: a kill -9 of `distillery export` left it converting on, orphaned, for the
minutes a large model takes, writing gigabytes into a partial directory the next run had already removed.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

from distillery.core.isolation import die_with


def tethered(script: Path | str, *args: str) -> list[str]:
    """The command that runs `script` with `args` as `python script args` does, tied to this process."""
    return [sys.executable, "-m", "distillery.core.tether", str(os.getpid()), str(script), *args]


def main(argv: list[str]) -> None:
    pid, script, *args = argv
    die_with(int(pid))
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).resolve().parent))  # as `python script` puts its folder first
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])

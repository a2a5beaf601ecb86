"""PNG figures of the stages' reports: matplotlib without a display, one size and resolution everywhere."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def figure(path: Path, figsize: tuple[float, float], ncols: int = 1, nrows: int = 1) -> Iterator[tuple[Any, Any]]:
    """Yield (figure, axes) and save it as `path` when the block ends."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=figsize)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)

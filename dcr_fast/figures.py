"""Figures as files: matplotlib on its file-only backend, and PNGs written atomically.

Every plot in dcr-fast is drawn here-through so that none needs a display and a crash never
leaves half a PNG behind.
"""

from __future__ import annotations

import os
from pathlib import Path

from dcr_fast import atomic


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (imported on first use: plotting is optional work)."""
    import matplotlib

    matplotlib.use("Agg")  # before pyplot is imported: files only, no display
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write ``fig`` to ``path`` as a PNG atomically and close it; returns the path."""
    path = Path(path)
    atomic.write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120), suffix=".png")
    pyplot().close(fig)
    return path

"""Atomic outputs: a file or directory appears whole or not at all.

Long jobs (training, eNTK matrices, evaluations, benchmarks) must not leave a half-written
file behind when they crash or are interrupted, since resuming trusts what is on disk. Every
writer goes through a temporary name beside the target (same filesystem, so ``os.replace``
is atomic) that is removed if writing fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def write(path: str | Path, writer: Callable[[str], object], suffix: str = "") -> None:
    """Call ``writer(tmp_path)`` then move the result over ``path``.

    ``suffix`` keeps the target's extension on the temporary name, for writers (matplotlib,
    numpy) that infer the format from it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(handle)
    try:
        writer(tmp)
        with open(tmp, "rb+") as written:  # on disk before the rename makes it visible
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any, indent: int = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")


@contextlib.contextmanager
def directory(path: str | Path) -> Iterator[str]:
    """Yield a temporary directory that replaces ``path`` only once the block succeeds."""
    path = str(path)
    tmp, old = f"{path}.tmp", f"{path}.old"
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)

"""Atomic outputs: a file or directory appears whole or not at all.

Long jobs (training, eNTK matrices, evaluations, benchmarks) must not leave a half-written
file behind when they crash or are interrupted, since resuming trusts what is on disk. Every
writer goes through a temporary name beside the target (same filesystem, so ``os.replace``
is atomic) that is removed if writing fails. The temporary file is created with the
permissions an ordinary new file gets (0666 less the umask), or those of the file it
replaces, so outputs are as readable as anything else the user writes.

Append-only logs cannot be rewritten whole at every line: ``append_line`` writes one line at
a time and first cuts off a last line that an earlier crash left incomplete.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import stat
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
    tmp = _new_file_beside(path, suffix)
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


def append_line(path: str | Path, line: str) -> None:
    """Append ``line`` and a newline to ``path``, flushed to disk.

    A kill during an earlier append can leave a last line without its newline; it is cut off
    first, so the new line never joins a fragment (readers drop such a fragment with a warning:
    ``dcr_fast.data.files.read_jsonl(..., torn_tail=True)``).
    """
    if "\n" in line:
        raise ValueError("append_line: line must not contain a newline")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as handle:
        _cut_torn_tail(handle)
        handle.write(line.encode("utf-8") + b"\n")
        handle.flush()
        os.fsync(handle.fileno())


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


def _new_file_beside(path: Path, suffix: str) -> str:
    """Create an empty, uniquely named file next to ``path`` and return its name.

    ``tempfile.mkstemp`` would create it 0600, which ``os.replace`` then gives the output;
    ``os.open`` with 0666 lets the kernel apply the umask as for any new file. A file being
    replaced passes its own permission bits on, as rewriting it in place would keep them.
    """
    keep = stat.S_IMODE(path.stat().st_mode) if path.is_file() else None
    while True:
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}")
        try:
            handle = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            if keep is not None:
                os.fchmod(handle, keep)
        finally:
            os.close(handle)
        return tmp


def _cut_torn_tail(handle) -> None:
    """Truncate an append-mode binary file after its last newline, if it does not end with one."""
    size = handle.seek(0, os.SEEK_END)
    if size == 0:
        return
    with open(handle.name, "rb") as reader:
        position = size
        while position > 0:
            step = min(position, 1 << 16)
            reader.seek(position - step)
            block = reader.read(step)
            if position == size and block.endswith(b"\n"):
                return
            cut = block.rfind(b"\n")
            if cut >= 0:
                handle.truncate(position - step + cut + 1)
                return
            position -= step
    handle.truncate(0)

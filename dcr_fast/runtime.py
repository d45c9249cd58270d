"""Where and how computation runs: device and dtype names, CPU threads, seeds."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device: expected auto, cpu, cuda or cuda:N, got {name!r} ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested, but no CUDA device is usable here (torch {torch.__version__}"
                         f"{', a CPU-only build' if torch.version.cuda is None else ''}); use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device: {name!r} requested, but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
    if name not in dtypes:
        raise ValueError(f"dtype: expected one of {sorted(dtypes)}, got {name!r}")
    return dtypes[name]


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch CPU threads (0: leave the setting alone), then restore it."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)

"""Resumable forecast work on disk: finished blocks of gradient products, written atomically.

A forecast's products are computed one block of safety examples at a time (all candidates
against ``safety_chunk`` examples). Each finished block goes to ``DIR/blocks/`` through a
temporary file, and so does the candidates' base refusal probability; a rerun with the same
model, inputs and settings loads them and computes only what is missing. The key of what made
them (the model's fingerprint and dtype, digests of the token ids, the settings) is kept in
``DIR/run.json`` by :func:`dcr_fast.fingerprint.check_key`: a rerun that differs in any of
these is refused, naming what differs, rather than mixed in.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dcr_fast import atomic
from dcr_fast.fingerprint import check_key, text_sha256
from dcr_fast.train.sft import Example


class BlockStore:
    """``DIR/blocks/safety_<start>.npy`` (candidates × block) and ``DIR/blocks/base_refusal.npy``."""

    def __init__(self, root: str | Path, key: Mapping[str, Any], about: Mapping[str, Any] | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        check_key(self.root / "run.json", key, what=f"forecast: the blocks in {str(self.root)!r}",
                  remedy="use another --out (or delete its blocks/ and run.json)", about=about)
        (self.root / "blocks").mkdir(exist_ok=True)

    def load(self, start: int) -> np.ndarray | None:
        return self._read(self._block(start))

    def save(self, start: int, block: np.ndarray) -> None:
        self._write(self._block(start), block)

    def load_base(self) -> np.ndarray | None:
        return self._read(self.root / "blocks" / "base_refusal.npy")

    def save_base(self, base: np.ndarray) -> None:
        self._write(self.root / "blocks" / "base_refusal.npy", base)

    def _block(self, start: int) -> Path:
        return self.root / "blocks" / f"safety_{start:08d}.npy"

    @staticmethod
    def _read(path: Path) -> np.ndarray | None:
        return np.load(path) if path.exists() else None

    @staticmethod
    def _write(path: Path, array: np.ndarray) -> None:
        atomic.write(path, lambda tmp: np.save(tmp, array), suffix=".npy")


def run_key(
    model_identity: Mapping[str, Any],
    dtype: torch.dtype,
    settings: Mapping[str, Any],
    candidates: Sequence[torch.Tensor],
    examples: Sequence[Example],
    refusal_tokens: Sequence[int],
) -> dict[str, Any]:
    """What a forecast's products depend on: the model, its dtype, the settings, the token ids."""
    return {
        "model": dict(model_identity),
        "dtype": str(dtype).removeprefix("torch."),
        "settings": dict(settings),
        "candidates_sha256": text_sha256(json.dumps([p.tolist() for p in candidates])),
        "examples_sha256": text_sha256(json.dumps([[e.input_ids, e.targets] for e in examples])),
        "refusal_tokens": list(refusal_tokens),
    }

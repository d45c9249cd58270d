"""Resumable forecast work on disk: finished blocks of gradient products, written atomically.

A forecast's products are computed one block of safety examples at a time (all candidates
against ``safety_chunk`` examples). Each finished block goes to ``DIR/blocks/`` through a
temporary file, and so does the candidates' base refusal probability; a rerun with the same
model, inputs and settings loads them and computes only what is missing. ``DIR/run.json``
records what made them (digests of the model's weights, the token ids, the settings); a
rerun that differs in any of these is refused rather than mixed in.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dcr_fast import atomic
from dcr_fast.train.sft import Example


class BlockStore:
    """``DIR/blocks/safety_<start>.npy`` (candidates × block) and ``DIR/blocks/base_refusal.npy``."""

    def __init__(self, root: str | Path, identity: dict):
        self.root = Path(root)
        (self.root / "blocks").mkdir(parents=True, exist_ok=True)
        run_file = self.root / "run.json"
        if run_file.exists():
            previous = json.loads(run_file.read_text(encoding="utf-8"))
            if previous != identity:
                changed = sorted(k for k in identity if previous.get(k) != identity[k])
                raise ValueError(
                    f"out: {self.root} holds a forecast of another model, other inputs or settings "
                    f"(differs in {changed}); use a fresh directory"
                )
        else:
            atomic.write_json(run_file, identity, indent=1)

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


def run_identity(
    model: nn.Module,
    numbers: dict,
    candidates: Sequence[torch.Tensor],
    examples: Sequence[Example],
    refusal_tokens: Sequence[int],
) -> dict:
    """What a forecast's products depend on, as JSON: weights and token ids by digest."""
    return {
        "settings": numbers,
        "model_sha256": model_digest(model),
        "candidates_sha256": _digest(p.tolist() for p in candidates),
        "examples_sha256": _digest((e.input_ids, e.targets) for e in examples),
        "refusal_tokens": list(refusal_tokens),
        "counts": {"candidates": len(candidates), "examples": len(examples)},
    }


def model_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter's name, dtype, shape and bytes (tied weights once)."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(f"{name}|{param.dtype}|{tuple(param.shape)}|".encode())
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _digest(items) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps(item).encode() + b"\n")
    return digest.hexdigest()

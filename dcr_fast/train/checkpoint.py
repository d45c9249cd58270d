"""Checkpoints and the step log: what ``--resume`` restores, written atomically."""

from __future__ import annotations

import json
import os
import random
from typing import Any

import torch

from dcr_fast import atomic
from dcr_fast.config import config_to_dict
from dcr_fast.data.files import read_jsonl


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path: str, model, optimizer, config, step: int) -> None:
    state = {
        "step": step,
        "config": config_to_dict(config),
        "trainable": trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    atomic.write(path, lambda tmp: torch.save(state, tmp))


# Fields that may differ between an interrupted run and its resumption.
_RESUME_FREE = {"resume", "overwrite", "max_steps", "save_every", "progress"}


def restore(path: str, model, optimizer, config) -> int:
    state = torch.load(path, map_location="cpu", weights_only=False)
    saved, now = state["config"], config_to_dict(config)
    changed = sorted(k for k in now if k not in _RESUME_FREE and saved.get(k) != now[k])
    if changed:
        raise ValueError(f"resume: the checkpoint {path!r} was written with different settings for {changed}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"])


def append_jsonl(path: str, record: dict[str, Any]) -> None:
    atomic.append_line(path, json.dumps(record))


def truncate_log(path: str, step: int) -> None:
    """Keep the log's records up to ``step`` (the checkpoint's), for a resumed run to continue it.

    A last line cut short by a kill is dropped with a warning rather than failing every resume.
    """
    if not os.path.exists(path):
        return
    kept = [row for row in read_jsonl(path, "resume: the step log", torn_tail=True) if row.get("step", 0) <= step]
    atomic.write_text(path, "".join(json.dumps(row) + "\n" for row in kept))

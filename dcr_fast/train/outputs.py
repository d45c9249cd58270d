"""What a finished stage leaves behind: the adapter, the merged model and ``summary.json``.

Directories are written through a temporary directory swapped into place, files through a
temporary name and ``os.replace``.
"""

from __future__ import annotations

import os
from typing import Any

from dcr_fast import atomic
from dcr_fast.config import config_to_dict
from dcr_fast.train.config import TrainConfig


def finish_run(summary: dict[str, Any], model, tokenizer, config: TrainConfig) -> dict[str, Any]:
    """Save the trained model once the plan is done, and write ``OUT/summary.json`` with the config."""
    if summary["finished"]:
        model.eval()
        summary["outputs"] = save_trained_model(model, tokenizer, config.out, lora=config.lora)
    summary["config"] = config_to_dict(config)
    atomic.write_json(os.path.join(config.out, "summary.json"), summary)
    return summary



def save_trained_model(model, tokenizer, out_dir: str, lora: bool) -> dict[str, str]:
    """Write the LoRA adapter (peft's format) when ``lora``, and always a full model dir.

    The full model (``out_dir/model``, adapters merged) loads with ``from_pretrained``.
    Merging changes ``model`` in place, so call this last.
    """
    paths = {}
    if lora:
        adapter = os.path.join(out_dir, "adapter")
        with atomic.directory(adapter) as tmp:
            model.save_pretrained(tmp)
        paths["adapter"] = adapter
        model = model.merge_and_unload()
    merged = os.path.join(out_dir, "model")
    with atomic.directory(merged) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    paths["model"] = merged
    return paths


"""What a stage leaves in its output folder, and how a new run treats an earlier one's.

A finished stage leaves the adapter, the merged model and ``summary.json`` (directories
written through a temporary directory swapped into place, files through a temporary name and
``os.replace``), beside the step log, the checkpoint and ``config.yaml`` of its run.

A new run never mixes with an earlier run's files: without ``resume`` or ``overwrite``, a
folder holding any of them is refused (``check_output_folder``, before a model is loaded);
a run that starts from step 0 removes them first (``clear_previous_run``), so a stale
``summary.json`` saying "finished" can never sit beside a new log.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from dcr_fast import atomic, distributed
from dcr_fast.config import config_to_dict
from dcr_fast.train.config import TrainConfig
from dcr_fast.train.parallel import full_model_state


# Everything a run writes into its output folder.
RUN_FILES = ("summary.json", "model", "adapter", "checkpoint.pt", "log.jsonl", "config.yaml")


def previous_run(out_dir: str) -> list[str]:
    """The files and folders of an earlier run in ``out_dir``, by name."""
    return [name for name in RUN_FILES if os.path.exists(os.path.join(out_dir, name))]


def check_output_folder(config: TrainConfig) -> None:
    """Refuse an output folder holding an earlier run unless ``resume`` or ``overwrite`` says what to do."""
    found = previous_run(config.out)
    if found and not (config.resume or config.overwrite):
        raise ValueError(f"out: {config.out!r} holds an earlier run ({', '.join(found)}); pass --resume to continue "
                         "it, --overwrite to replace it, or choose another --out")
    finished = [name for name in found if name in ("summary.json", "model", "adapter")]
    if config.resume and finished and "checkpoint.pt" not in found:
        # Resuming without a checkpoint starts from step 0, which would delete these.
        raise ValueError(f"resume: {config.out!r} has no checkpoint.pt to continue from, but holds an earlier run's "
                         f"{', '.join(finished)}; pass --overwrite instead to replace them")


def clear_previous_run(out_dir: str) -> None:
    """Remove an earlier run's outputs before a run starts from step 0."""
    for name in previous_run(out_dir):
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def finish_run(summary: dict[str, Any], model, tokenizer, config: TrainConfig) -> dict[str, Any]:
    """Save the trained model once the plan is done, and write ``OUT/summary.json`` with the config.

    Across ranks, rank 0 writes (FSDP's shards gathered to it first); every rank returns the summary.
    """
    if summary["finished"]:
        model.eval()
        summary["outputs"] = save_trained_model(model, tokenizer, config.out, lora=config.lora)
    summary["config"] = config_to_dict(config)
    if distributed.is_main():
        atomic.write_json(os.path.join(config.out, "summary.json"), summary)
    return summary


def save_trained_model(model, tokenizer, out_dir: str, lora: bool) -> dict[str, str]:
    """Write the LoRA adapter (peft's format) when ``lora``, and always a full model dir.

    The full model (``out_dir/model``, adapters merged) loads with ``from_pretrained``.
    Merging changes ``model`` in place, so call this last.
    """
    paths = {"model": os.path.join(out_dir, "model")}
    if lora:
        paths = {"adapter": os.path.join(out_dir, "adapter"), **paths}
    state = full_model_state(model)  # gathered by every rank, received by rank 0
    if not distributed.is_main():
        return paths
    if lora:
        with atomic.directory(paths["adapter"]) as tmp:
            model.save_pretrained(tmp)
        model = model.merge_and_unload()
    with atomic.directory(paths["model"]) as tmp:
        model.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
    return paths


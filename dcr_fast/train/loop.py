"""The optimizer loop both stages share, and its learning-rate schedule.

Both stages are planned in full before the first step: the list of optimizer steps, each a
list of micro-batches, is a pure function of the config and the seed. That is what makes
``--resume`` exact: a resumed run rebuilds the same plan, restores parameters, optimizer,
scheduler position and RNG state from the checkpoint, and continues at the next step, so an
interrupted run ends bit-identical to an uninterrupted one (tested).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from dcr_fast import distributed
from dcr_fast.config import save_yaml
from dcr_fast.train.checkpoint import append_jsonl, restore, save_checkpoint, truncate_log
from dcr_fast.train.config import TrainConfig
from dcr_fast.train.outputs import clear_previous_run
from dcr_fast.train.parallel import Parallel, full

IGNORE_INDEX = -100


def get_lr(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warmup, then cosine/linear/constant."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return base_lr * (1.0 - progress)
    raise ValueError(f"lr_schedule: expected cosine, linear or constant, got {schedule!r}")


@dataclasses.dataclass
class StepResult:
    """What one micro-batch reports: its share of the step loss, and tokens processed."""

    loss: torch.Tensor
    tokens: int
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)



def run_steps(
    *,
    model: torch.nn.Module,
    plan: Sequence[Sequence[Any]],
    micro_step: Callable[[Any], StepResult],
    config: TrainConfig,
    out_dir: str,
    desc: str,
    parallel: Parallel | None = None,
) -> dict[str, Any]:
    """The optimizer loop shared by both stages, read top-down.

    ``plan[s]`` lists the micro-batches of optimizer step ``s``; ``micro_step`` runs forward and
    returns a loss already scaled so that the sum over a step's micro-batches is the step loss
    (gradient accumulation spelled out). Returns the run summary, which ``finish_run``
    completes and writes.

    Across ranks (``parallel`` from :func:`~dcr_fast.train.parallel.parallelize`), ``plan``
    holds this rank's micro-batches and their losses are its shares: the logged numbers are
    summed over ranks, and rank 0 writes the log, the config and the checkpoints.
    """
    parallel = parallel or Parallel(model, torch.device("cpu"))
    main = distributed.is_main()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: check the layer / LoRA settings")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    total_steps = len(plan)
    warmup_steps = math.ceil(config.warmup_ratio * total_steps)
    os.makedirs(out_dir, exist_ok=True)
    checkpoint_path = os.path.join(out_dir, "checkpoint.pt")
    log_path = os.path.join(out_dir, "log.jsonl")

    start = 0
    distributed.barrier()  # every rank has checked OUT (and read what it resumes) before rank 0 changes it
    if config.resume and os.path.exists(checkpoint_path):
        start = restore(checkpoint_path, model, optimizer, config)
        if main:
            truncate_log(log_path, start)
    elif main:
        clear_previous_run(out_dir)
    if main:
        save_yaml(config, os.path.join(out_dir, "config.yaml"))

    stop = total_steps if config.max_steps is None else min(total_steps, config.max_steps)
    model.train()
    losses: list[float] = []
    tokens_total, started = 0, time.perf_counter()
    bar = tqdm(range(start, stop), desc=desc, initial=start, total=total_steps, unit="step", dynamic_ncols=True,
               disable=not (main and config.progress))
    for step in bar:
        step_started = time.perf_counter()
        lr = get_lr(step, base_lr=config.lr, warmup_steps=warmup_steps, total_steps=total_steps, schedule=config.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss, step_tokens, metrics = 0.0, 0, {}
        for index, micro in enumerate(plan[step]):
            with parallel.accumulating(sync=index == len(plan[step]) - 1):
                result = micro_step(micro)
                result.loss.backward()
            step_loss += result.loss.item()
            step_tokens += result.tokens
            for key, value in result.metrics.items():
                metrics[key] = metrics.get(key, 0.0) + value
        grad_norm = full(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if parallel.world > 1:
            step_loss, step_tokens, *totals = parallel.sum([step_loss, step_tokens, *metrics.values()])
            step_tokens, metrics = int(step_tokens), dict(zip(metrics, totals))
        elapsed = time.perf_counter() - step_started
        tokens_total += step_tokens
        losses.append(step_loss)
        record = {"step": step + 1, "loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens": step_tokens,
                  "tokens_per_s": step_tokens / elapsed, **metrics}
        if main:
            append_jsonl(log_path, record)
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{step_tokens / elapsed:,.0f}")
        done = step + 1
        if done == stop or (config.save_every and done % config.save_every == 0):
            save_checkpoint(checkpoint_path, model, optimizer, config, done)
    bar.close()
    wall = time.perf_counter() - started
    return {
        "steps_total": total_steps,
        "steps_done": stop,
        "steps_this_run": stop - start,
        "finished": stop == total_steps,
        "final_loss": losses[-1] if losses else None,
        "mean_loss_last_10": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "tokens_this_run": tokens_total,
        "wall_s_this_run": wall,
        "tokens_per_s": tokens_total / wall if wall > 0 else None,
        "trainable_parameters": sum(p.numel() for p in params),
        "total_parameters": sum(p.numel() for p in model.parameters()),
    }


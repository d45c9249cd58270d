"""What the DCR and SFT stages share: model loading, chat encoding, the step loop, checkpoints.

Both stages are planned in full before the first step: the list of optimizer steps, each a
list of micro-batches, is a pure function of the config and the seed. That is what makes
``--resume`` exact: a resumed run rebuilds the same plan, restores parameters, optimizer,
scheduler position and RNG state from the checkpoint, and continues at the next step, so an
interrupted run ends bit-identical to an uninterrupted one (tested).

Outputs are written atomically: files through a temporary name and ``os.replace``,
directories (adapters, merged models) through a temporary directory swapped into place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from dcr_fast import atomic
from dcr_fast.config import add_config_arguments, config_from_args, config_to_dict, save_yaml

IGNORE_INDEX = -100
LR_SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass
class TrainConfig:
    """The settings every stage has: what ``run_steps``, checkpoints and the saved model use.

    ``DCRConfig`` and ``SFTConfig`` extend it with their data and recipe fields, and restate
    the defaults their recipes choose differently (warmup, schedule, LoRA).
    """

    model: str = dataclasses.field(default="", metadata={"help": "base model: local directory or hub id"})
    out: str = dataclasses.field(default="", metadata={"help": "output directory (checkpoint, logs, adapter, model)"})
    system_prompt: str | None = dataclasses.field(default=None, metadata={"help": "system message before every prompt"})
    seed: int = 0
    epochs: float = 3.0
    lr: float = 1e-4
    warmup_ratio: float = dataclasses.field(default=0.0, metadata={"help": "fraction of the steps spent in linear warmup"})
    lr_schedule: str = dataclasses.field(default="constant", metadata={"help": "cosine, linear or constant after warmup"})
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora: bool = dataclasses.field(default=False, metadata={"help": "LoRA adapters instead of full-parameter training"})
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    dtype: str = dataclasses.field(default="float32", metadata={"help": "weight dtype: float32, bfloat16, float16"})
    bf16_autocast: bool = dataclasses.field(default=True, metadata={"help": "bf16 autocast on CUDA (ignored on CPU)"})
    attn_implementation: str = dataclasses.field(default="auto", metadata={"help": "auto (flash-attn 2 if installed, else sdpa), sdpa, eager"})
    device: str = "auto"
    save_every: int = dataclasses.field(default=50, metadata={"help": "checkpoint every N optimizer steps (and at the end)"})
    max_steps: int | None = dataclasses.field(default=None, metadata={"help": "stop after N optimizer steps (schedule unchanged; resume later)"})
    resume: bool = dataclasses.field(default=False, metadata={"help": "continue from OUT/checkpoint.pt"})

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ValueError(f"epochs: expected > 0, got {self.epochs}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio: expected in [0, 1), got {self.warmup_ratio}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule: expected cosine, linear or constant, got {self.lr_schedule!r}")


# --- models and chat encoding -------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
    if name not in dtypes:
        raise ValueError(f"dtype: expected one of {sorted(dtypes)}, got {name!r}")
    return dtypes[name]


def load_model_and_tokenizer(path: str, *, dtype: str, attn_implementation: str, device: torch.device):
    """Load a causal LM and its tokenizer from a local directory or hub id.

    ``attn_implementation="auto"`` uses flash-attn 2 when it is installed and a GPU is in use,
    SDPA otherwise; flash-attn is never required. The tokenizer must carry a chat template:
    both stages format prompts exactly as the model will see them at inference time.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (os.path.isdir(path) or "/" in path):
        raise ValueError(f"model: {path!r} is neither a local directory nor a hub id")
    tokenizer = AutoTokenizer.from_pretrained(path)
    check_chat_template(tokenizer, path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    attn = attn_implementation
    if attn == "auto":
        flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
        attn = "flash_attention_2" if flash else "sdpa"
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype), attn_implementation=attn)
    except (ImportError, ValueError) as err:
        if attn_implementation != "auto":
            raise
        # e.g. flash-attn installed but the model's dtype (fp32) or architecture is unsupported
        warnings.warn(f"attn_implementation=auto: {attn} unavailable ({err}); using sdpa", stacklevel=2)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype), attn_implementation="sdpa")
    return model.to(device), tokenizer


def check_chat_template(tokenizer, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"model: the tokenizer of {where!r} has no chat template; DCR and SFT format prompts with the "
            "model's own template (use an instruct/chat checkpoint or set tokenizer.chat_template)"
        )


def encode_prompt(tokenizer, prompt: str, system: str | None = None) -> list[int]:
    """Token ids of the chat-templated prompt up to the assistant turn's first token."""
    return _ids(tokenizer.apply_chat_template(_messages(prompt, system), add_generation_prompt=True, tokenize=True))


def encode_example(tokenizer, prompt: str, response: str, system: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids of a templated (prompt, response) pair and the mask of response tokens.

    Stock templates have no ``{% generation %}`` tags, so the mask is the part of the full
    conversation past the templated prompt; this needs the prompt to be a token prefix of the
    conversation, which is checked rather than assumed.
    """
    prompt_ids = encode_prompt(tokenizer, prompt, system)
    messages = _messages(prompt, system) + [{"role": "assistant", "content": response}]
    full = _ids(tokenizer.apply_chat_template(messages, tokenize=True))
    if full[: len(prompt_ids)] != prompt_ids:
        raise ValueError(
            "the chat template does not render the prompt as a token prefix of the conversation; "
            "response-only loss cannot be masked for this template"
        )
    return full, [0] * len(prompt_ids) + [1] * (len(full) - len(prompt_ids))


def _messages(prompt: str, system: str | None) -> list[dict[str, str]]:
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": prompt}]


def _ids(encoded: Any) -> list[int]:
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    return list(encoded)


# --- data files -----------------------------------------------------------------------------------


def load_pairs(source: str, what: str) -> list[tuple[str, str]]:
    """(prompt, response) pairs from a JSONL file with those fields, or ``BENCHMARK=PATH``.

    ``BENCHMARK=PATH`` (e.g. ``alpaca=/data/alpaca_data.json``; an empty PATH means the hub)
    goes through ``dcr_fast.data.load_benchmark`` and needs an SFT benchmark.
    """
    benchmark = _benchmark_records(source, what)
    if benchmark is not None:
        if not all(hasattr(r, "response") for r in benchmark):
            raise ValueError(f"{what}: {source!r} holds prompts without responses; expected an SFT set")
        return [(r.prompt, r.response) for r in benchmark]
    return [(row["prompt"], row["response"]) for row in _read_jsonl(source, ("prompt", "response"), what)]


def load_prompts(source: str, what: str, category: str | None = None) -> list[str]:
    """User prompts from a JSONL file (``prompt`` field), a text file (one a line) or ``BENCHMARK=PATH``.

    For a benchmark mixing categories (XSTest holds safe and unsafe prompts), ``category``
    keeps the matching ones.
    """
    benchmark = _benchmark_records(source, what)
    if benchmark is not None:
        texts = [getattr(r, "text", None) or r.prompt for r in benchmark if category is None or r.category == category]
        if not texts:
            raise ValueError(f"{what}: {source!r} holds no prompts of category {category!r}")
        return texts
    if source.endswith(".txt"):
        if not os.path.isfile(source):
            raise ValueError(f"{what}: file {source!r} does not exist")
        with open(source, encoding="utf-8") as handle:
            texts = [line.strip() for line in handle if line.strip()]
        if not texts:
            raise ValueError(f"{what}: {source!r} holds no prompts")
        return texts
    return [row["prompt"] for row in _read_jsonl(source, ("prompt",), what)]


def check_source(source: str, what: str) -> None:
    """Fail early, before any model is loaded, on a missing file or unknown benchmark name."""
    name, sep, path = source.partition("=")
    if sep:
        from dcr_fast.data import BENCHMARKS

        if name not in BENCHMARKS:
            raise ValueError(f"{what}: unknown benchmark {name!r} in {source!r}; expected one of {sorted(BENCHMARKS)}")
        if path and not os.path.exists(path):
            raise ValueError(f"{what}: path {path!r} does not exist")
    elif not os.path.isfile(source):
        raise ValueError(f"{what}: file {source!r} does not exist")


def _benchmark_records(source: str, what: str):
    name, sep, path = source.partition("=")
    if not sep:
        return None
    from dcr_fast.data import load_benchmark

    check_source(source, what)
    return load_benchmark(name, path or None)


def _read_jsonl(path: str, fields: Sequence[str], what: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        raise ValueError(f"{what}: file {path!r} does not exist")
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{what}: {path!r} line {number} is not JSON ({error.msg})") from None
            missing = [f for f in fields if not isinstance(row.get(f), str) or not row[f].strip()]
            if missing:
                raise ValueError(f"{what}: {path!r} line {number} lacks non-empty field(s) {missing}; expected {list(fields)}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{what}: {path!r} holds no examples")
    return rows


# --- optimisation ---------------------------------------------------------------------------------


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


def run_steps(
    *,
    model: torch.nn.Module,
    plan: Sequence[Sequence[Any]],
    micro_step: Callable[[Any], StepResult],
    config: TrainConfig,
    out_dir: str,
    desc: str,
) -> dict[str, Any]:
    """The optimizer loop shared by both stages, read top-down.

    ``plan[s]`` lists the micro-batches of optimizer step ``s``; ``micro_step`` runs forward and
    returns a loss already scaled so that the sum over a step's micro-batches is the step loss
    (gradient accumulation spelled out). Returns the run summary, which ``finish_run``
    completes and writes.
    """
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
    if config.resume and os.path.exists(checkpoint_path):
        start = _restore(checkpoint_path, model, optimizer, config)
        _truncate_log(log_path, start)
    elif os.path.exists(log_path):
        os.remove(log_path)
    save_yaml(config, os.path.join(out_dir, "config.yaml"))

    stop = total_steps if config.max_steps is None else min(total_steps, config.max_steps)
    model.train()
    losses: list[float] = []
    tokens_total, started = 0, time.perf_counter()
    bar = tqdm(range(start, stop), desc=desc, initial=start, total=total_steps, unit="step", dynamic_ncols=True)
    for step in bar:
        step_started = time.perf_counter()
        lr = get_lr(step, base_lr=config.lr, warmup_steps=warmup_steps, total_steps=total_steps, schedule=config.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss, step_tokens, metrics = 0.0, 0, {}
        for micro in plan[step]:
            result = micro_step(micro)
            result.loss.backward()
            step_loss += result.loss.item()
            step_tokens += result.tokens
            for key, value in result.metrics.items():
                metrics[key] = metrics.get(key, 0.0) + value
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - step_started
        tokens_total += step_tokens
        losses.append(step_loss)
        record = {"step": step + 1, "loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens": step_tokens,
                  "tokens_per_s": step_tokens / elapsed, **metrics}
        _append_jsonl(log_path, record)
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{step_tokens / elapsed:,.0f}")
        done = step + 1
        if done == stop or (config.save_every and done % config.save_every == 0):
            _save_checkpoint(checkpoint_path, model, optimizer, config, done)
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


def finish_run(summary: dict[str, Any], model, tokenizer, config: TrainConfig) -> dict[str, Any]:
    """Save the trained model once the plan is done, and write ``OUT/summary.json`` with the config."""
    if summary["finished"]:
        model.eval()
        summary["outputs"] = save_trained_model(model, tokenizer, config.out, lora=config.lora)
    summary["config"] = config_to_dict(config)
    atomic.write_json(os.path.join(config.out, "summary.json"), summary)
    return summary


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(path: str, model, optimizer, config, step: int) -> None:
    state = {
        "step": step,
        "config": config_to_dict(config),
        "trainable": _trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    atomic.write(path, lambda tmp: torch.save(state, tmp))


# Fields that may differ between an interrupted run and its resumption.
_RESUME_FREE = {"resume", "max_steps", "save_every", "progress"}


def _restore(path: str, model, optimizer, config) -> int:
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


# --- outputs ---------------------------------------------------------------------------------------


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


def _append_jsonl(path: str, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def _truncate_log(path: str, step: int) -> None:
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as handle:
        kept = [line for line in handle if line.strip() and json.loads(line)["step"] <= step]
    atomic.write_text(path, "".join(kept))


def check_model_and_out(config: TrainConfig) -> None:
    """The two fields every stage needs, checked before anything is loaded."""
    if not config.model:
        raise ValueError("model: required (a local model directory or hub id)")
    if not config.out:
        raise ValueError("out: required (the output directory)")


def register_stage(subparsers, name: str, *, help: str, description: str, config_cls: type,
                   runner: Callable[[Any], dict[str, Any]]) -> None:
    """Add sub-command ``name``: flags from ``config_cls``, YAML section ``name``, a printed summary."""
    import argparse

    parser = subparsers.add_parser(name, help=help, description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, config_cls)

    def run(args: argparse.Namespace) -> int:
        summary = runner(config_from_args(config_cls, args, section=name))
        print_summary(name, {k: v for k, v in summary.items() if k != "config"})
        return 0

    parser.set_defaults(func=run)


def print_summary(title: str, summary: dict[str, Any]) -> None:
    """The end-of-run summary, one aligned line per entry."""
    print(f"\n== {title} ==")
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        shown = f"{value:.6g}" if isinstance(value, float) else value
        print(f"  {key:<{width}}  {shown}")

"""``dcr-fast sft``: the Safety-Tuned LLaMAs ("STL") safety fine-tuning recipe, fast.

The recipe (paper appendix A.3): peft LoRA r=8, alpha=32, dropout 0.05 on every linear layer of
the decoder; AdamW at lr 1e-4 with 3% linear warmup then cosine decay (the paper does not say
which decay; cosine is our default, ``--lr-schedule linear`` is available); effective batch 128
= micro-batch 4 x 32 accumulation; the model's own chat template; loss on response tokens only.
General instruction data and (toxic prompt, refusal) pairs are mixed and shuffled together;
STL-aug adds (seemingly toxic prompt, compliant answer) pairs through ``--aug-data``.

Where it is fast: each micro-batch is packed into one padding-free row (position ids restart
at every example, no attention mask, ``use_cache=False``), so no token is padding; the output
layer projects only the positions whose next token is a target, so prompt tokens never
reach the vocabulary-wide matmul, and at most ``loss_chunk`` positions at a time, so the
logits of a long micro-batch never exist whole (each chunk is recomputed in backward); SDPA,
or flash-attn 2 when installed; bf16 autocast on CUDA; optional gradient checkpointing. The
loss of an optimizer step is the mean over all response tokens of its 128 examples, so
packing and accumulation do not change the numbers (tested against the padded computation).

Across ranks (``torchrun``; :mod:`dcr_fast.train.parallel`) each optimizer step's examples are
divided among the ranks (:func:`rank_share`) and the loss stays the mean over all the step's
response tokens, so the step equals one process's.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from dcr_fast.attention import packed_attention, packed_row
from dcr_fast.chat import encode_example, encode_prompt
from dcr_fast.data.files import check_source, load_pairs
from dcr_fast import distributed, models
from dcr_fast.runtime import set_seed
from dcr_fast.train.cli import check_model_and_out, register_stage
from dcr_fast.train.config import TrainConfig
from dcr_fast.train.loop import IGNORE_INDEX, StepResult, run_steps
from dcr_fast.train.outputs import finish_run
from dcr_fast.train.parallel import parallelize


@dataclasses.dataclass
class SFTConfig(TrainConfig):
    """Settings of one SFT run; every field is also a ``--flag`` and a YAML key."""

    data: list[str] = dataclasses.field(default_factory=list, metadata={"help": "general instruction data: JSONL files (prompt, response) or BENCHMARK=PATH (e.g. alpaca=...)"})
    safety_data: list[str] = dataclasses.field(default_factory=list, metadata={"help": "(toxic prompt, refusal) JSONL files"})
    aug_data: list[str] = dataclasses.field(default_factory=list, metadata={"help": "STL-aug: (seemingly toxic prompt, compliant answer) JSONL files"})
    micro_batch_size: int = 4
    grad_accum: int = 32
    warmup_ratio: float = dataclasses.field(default=0.03, metadata={"help": "fraction of the steps spent in linear warmup"})
    lr_schedule: str = dataclasses.field(default="cosine", metadata={"help": "cosine, linear or constant after warmup"})
    max_length: int = 1024
    lora: bool = dataclasses.field(default=True, metadata={"help": "LoRA adapters (the recipe); --no-lora trains all parameters"})
    lora_targets: str = dataclasses.field(default="all-linear", metadata={"help": "peft target_modules: all-linear or comma-separated names"})
    packing: bool = dataclasses.field(default=True, metadata={"help": "padding-free packed micro-batches (--no-packing pads)"})
    train_on_prompt: bool = dataclasses.field(default=False, metadata={"help": "also put loss on prompt tokens (language pretraining)"})
    gradient_checkpointing: bool = False
    loss_chunk: int = dataclasses.field(default=1024, metadata={"help": "packed: response positions per output-layer chunk, bounding logits memory to loss_chunk x vocabulary (0: no bound)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("micro_batch_size", "grad_accum", "max_length", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        if self.loss_chunk < 0:
            raise ValueError(f"loss_chunk: expected 0 (no chunking) or a positive integer, got {self.loss_chunk}")


@dataclasses.dataclass
class Example:
    """One tokenized conversation: ids and the next-token targets (IGNORE_INDEX off-response)."""

    input_ids: list[int]
    targets: list[int]


def run_sft(config: SFTConfig) -> dict[str, Any]:
    """Run SFT end to end; returns the summary also written to ``OUT/summary.json``."""
    _check_inputs(config)
    pairs = [pair for name in _DATA_FIELDS for source in getattr(config, name) for pair in load_pairs(source, name)]
    set_seed(config.seed)
    device = distributed.rank_device(config.device)
    model, tokenizer = models.load(config.model, dtype=config.dtype, attn_implementation=config.attn_implementation, device=device)
    examples = tokenize_examples(tokenizer, pairs, config)
    model = prepare_model(model, config)
    plan = plan_steps(len(examples), config)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and config.bf16_autocast)
    step_tokens = _response_tokens_per_step(plan, examples)
    parallel = parallelize(model, config.sharding, device)

    def micro_step(micro: tuple[int, list[int], float]) -> StepResult:
        step, indices, weight = micro
        batch = [examples[i] for i in indices]
        with autocast:
            loss_sum = parallel(sft_loss_sum, batch, packed=config.packing, device=device, chunk=config.loss_chunk)
        return StepResult(loss=loss_sum * weight / step_tokens[step], tokens=int(weight) * sum(len(e.input_ids) for e in batch))

    with packed_attention(model, backward_inside=True):  # checkpointed layers recompute the same way
        summary = run_steps(model=model, plan=rank_share(plan, config, distributed.rank(), distributed.world_size()),
                            micro_step=micro_step, config=config, out_dir=config.out, desc="sft", parallel=parallel)
    summary["examples"] = len(examples)
    return finish_run(summary, model, tokenizer, config)


def tokenize_examples(tokenizer, pairs: list[tuple[str, str]], config: SFTConfig) -> list[Example]:
    """``tokenize_example`` for every pair; refuses a set that ``max_length`` leaves nothing to learn from.

    An example truncated before its first response token has no target: it costs compute and
    adds nothing. All of them so would train on nothing (loss 0, gradient 0, a "trained" model),
    so that is an error; some of them, a warning with the count.
    """
    examples = [tokenize_example(tokenizer, prompt, response, config) for prompt, response in pairs]
    empty = [i for i, e in enumerate(examples) if all(t == IGNORE_INDEX for t in e.targets)]
    if not empty:
        return examples
    lengths = [len(encode_prompt(tokenizer, pairs[i][0], config.system_prompt)) for i in empty]
    if len(empty) == len(examples):
        raise ValueError(f"max_length: {config.max_length} tokens cut off the response of all {len(examples)} "
                         f"examples (their templated prompts are {min(lengths)}-{max(lengths)} tokens long), so "
                         f"training would learn nothing; raise --max-length above {max(lengths)}")
    warnings.warn(f"max_length: {config.max_length} tokens cut off the whole response of {len(empty)} of "
                  f"{len(examples)} examples ({len(empty) / len(examples):.0%}; their templated prompts are up to "
                  f"{max(lengths)} tokens long); they add nothing to the loss", stacklevel=2)
    return examples


def tokenize_example(tokenizer, prompt: str, response: str, config: SFTConfig) -> Example:
    """Template, truncate to ``max_length`` and shift targets so ``targets[t]`` is token t+1."""
    ids, mask = encode_example(tokenizer, prompt, response, config.system_prompt)
    ids, mask = ids[: config.max_length], mask[: config.max_length]
    train = [1] * len(ids) if config.train_on_prompt else mask
    targets = [ids[t + 1] if train[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]
    return Example(ids, targets)


def prepare_model(model, config: SFTConfig):
    """Attach LoRA adapters (or leave all parameters trainable) and gradient checkpointing."""
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if not config.lora:
        return model
    from peft import LoraConfig, get_peft_model

    targets: Any = "all-linear" if config.lora_targets == "all-linear" else [t.strip() for t in config.lora_targets.split(",")]
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if config.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def plan_steps(num_examples: int, config: SFTConfig) -> list[list[tuple[int, list[int]]]]:
    """Optimizer steps -> micro-batches -> example indices; a pure function of the config.

    Each epoch is a fresh permutation from ``seed + epoch``; a fractional ``epochs`` ends early.
    """
    per_step = config.micro_batch_size * config.grad_accum
    order: list[int] = []
    for epoch in range(math.ceil(config.epochs)):
        generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
        order += torch.randperm(num_examples, generator=generator).tolist()
    order = order[: max(1, round(config.epochs * num_examples))]
    steps = []
    for step, begin in enumerate(range(0, len(order), per_step)):
        chunk = order[begin : begin + per_step]
        steps.append([(step, chunk[i : i + config.micro_batch_size]) for i in range(0, len(chunk), config.micro_batch_size)])
    return steps


def rank_share(plan, config: SFTConfig, rank: int, world: int) -> list[list[tuple[int, list[int], float]]]:
    """This rank's micro-batches of each step, as (step, example indices, weight).

    A step's examples, in plan order, are cut into ``world`` contiguous runs of near-equal size
    (the first ranks take one more), each run into micro-batches of ``micro_batch_size``; in one
    process that is the plan itself. Weights are 1, except where a run is empty (a last step
    with fewer examples than ranks): that rank runs the step's first example with weight 0,
    since DDP and FSDP need every rank in every step's collectives.
    """
    shares = []
    for micro_batches in plan:
        step = micro_batches[0][0]
        order = [i for _, indices in micro_batches for i in indices]
        start = sum(len(order) // world + (r < len(order) % world) for r in range(rank))
        run = order[start : start + len(order) // world + (rank < len(order) % world)]
        size = config.micro_batch_size
        shares.append([(step, run[i : i + size], 1.0) for i in range(0, len(run), size)] or [(step, order[:1], 0.0)])
    return shares


def sft_loss_sum(model, batch: list[Example], *, packed: bool, device: torch.device, chunk: int = 0,
                 all_logits: bool = False) -> torch.Tensor:
    """Sum of next-token cross-entropy over the targeted tokens of ``batch``.

    ``packed``: one row, examples back to back, position ids restarting per example, no mask,
    each example attending to itself only (:mod:`dcr_fast.attention`). The
    decoder runs on the row and the output layer only on the hidden states of targeted
    positions, ``chunk`` of them at a time when there are more (0: all at once): each
    chunk's logits live only inside a checkpoint, recomputed in backward, so logits memory
    is bounded by ``chunk`` x vocabulary whatever the micro-batch. ``all_logits=True``
    projects every position in one piece, as the padded path does (kept to measure the
    saving). Otherwise: right-padded rows with an attention mask and the model's own logits
    everywhere, the reference.
    """
    if not packed:
        return _padded_loss_sum(model, batch, device)
    input_ids, positions, bounds = packed_row([e.input_ids for e in batch], device)
    flat = [t for e in batch for t in e.targets]
    keep = [i for i, t in enumerate(flat) if all_logits or t != IGNORE_INDEX]  # on the host: no device sync
    targets = torch.tensor([flat[i] for i in keep], dtype=torch.long, device=device)
    head = _output_layer(model)
    with packed_attention(model):
        hidden = model.get_decoder()(input_ids=input_ids, position_ids=positions, use_cache=False,
                                     **bounds).last_hidden_state
    hidden = hidden[0, torch.tensor(keep, dtype=torch.long, device=device)]
    if all_logits or not chunk or len(keep) <= chunk:
        return _head_loss_sum(head, hidden, targets)
    return sum(checkpoint(_head_loss_sum, head, hidden[i : i + chunk], targets[i : i + chunk], use_reentrant=False)
               for i in range(0, len(keep), chunk))


def _padded_loss_sum(model, batch: list[Example], device: torch.device) -> torch.Tensor:
    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.zeros(len(batch), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(input_ids)
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        targets[row, :n] = torch.tensor(e.targets)
    logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
    return _cross_entropy_sum(logits.flatten(0, 1), targets.flatten())


def _head_loss_sum(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return _cross_entropy_sum(head(hidden), targets)


def _cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 up, float64 kept
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


# Config fields of architectures whose causal-LM forward transforms the logits after the output
# layer (Gemma's soft-capping, Cohere's and Granite's scales, ...): the packed path, which applies
# the output layer itself, would silently drop the transform.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier")


def _output_layer(model):
    config = model.config
    transforms = [name for name in _LOGIT_TRANSFORMS if getattr(config, name, None) not in (None, 1, 1.0)]
    if transforms:
        raise ValueError(f"model: its logits are transformed after the output layer ({', '.join(transforms)}), "
                         "which the packed loss does not apply; train it with --no-packing")
    return model.get_output_embeddings()


def _response_tokens_per_step(plan, examples: list[Example]) -> list[int]:
    per_example = [sum(t != IGNORE_INDEX for t in e.targets) for e in examples]
    return [max(1, sum(per_example[i] for _, indices in micro_batches for i in indices)) for micro_batches in plan]


_DATA_FIELDS = ("data", "safety_data", "aug_data")


def _check_inputs(config: SFTConfig) -> None:
    check_model_and_out(config)
    if not (config.data or config.safety_data or config.aug_data):
        raise ValueError("data: give at least one of --data, --safety-data, --aug-data")
    for name in _DATA_FIELDS:
        for source in getattr(config, name):
            check_source(source, name)


def register(subparsers) -> None:
    register_stage(subparsers, "sft", help="STL safety fine-tuning (LoRA, packed, response-only loss)", description=__doc__, config_cls=SFTConfig, runner=run_sft)

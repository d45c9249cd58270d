"""``dcr-fast dcr``: contrastive refinement of the representation at layer l (paper A.2).

Each prompt is rendered with the model's chat template up to the assistant turn; its embedding
is the hidden state after decoder layer ``layer`` (``hidden_states[layer]`` in transformers'
numbering, embeddings being 0) at the last templated position, the one that predicts the first
response token. The Circle loss (default the paper's A.8 variant, m=0.25, gamma=16) pulls
prompts of the same subset together and pushes seemingly toxic and toxic prompts apart.

* Sampling: every batch holds both subsets in fixed proportion (``balance`` of it seemingly
  toxic, at least two of each), drawn from per-subset streams reshuffled whenever exhausted,
  so every anchor has a positive and negatives whatever the subset sizes (paper: 250 vs 500).
* Freezing: decoder layers above ``layer``, the final norm, ``lm_head`` and (tied or
  ``--freeze-embeddings``) the embeddings get no update; after training their values are
  compared bit for bit with a snapshot taken before, and the run fails if any changed.
* Regularizer: ``nll_weight`` (lambda = 0.001) times the mean next-token NLL of the templated
  prompts in the batch. The paper names an NLL regularizer without saying on which text; we
  use the contrastive prompts themselves because they are the only text this stage sees and
  the forward pass already computes their logits (the gradient reaches layers <= l through
  the frozen top, anchoring the refined layers to the model's own language modelling).
* Batches are packed padding-free, like SFT: one row, position ids restarting per prompt.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from dcr_fast.data import SEEMINGLY_TOXIC, TOXIC
from dcr_fast.chat import encode_prompt
from dcr_fast.data.files import check_source, load_prompts
from dcr_fast import models
from dcr_fast.runtime import resolve_device, set_seed
from dcr_fast.train.cli import check_model_and_out, register_stage
from dcr_fast.train.config import TrainConfig
from dcr_fast.train.loop import IGNORE_INDEX, StepResult, run_steps
from dcr_fast.train.outputs import finish_run


@dataclasses.dataclass
class DCRConfig(TrainConfig):
    """Settings of one DCR run; every field is also a ``--flag`` and a YAML key."""

    seemingly_toxic: list[str] = dataclasses.field(default_factory=list, metadata={"help": "seemingly toxic prompts: JSONL (prompt), .txt, or BENCHMARK=PATH (e.g. xstest=...)"})
    toxic: list[str] = dataclasses.field(default_factory=list, metadata={"help": "toxic prompts: JSONL (prompt), .txt, or BENCHMARK=PATH (e.g. hh-rlhf-red-team=...)"})
    layer: int = dataclasses.field(default=13, metadata={"help": "decoder layer whose output is refined (1-based; Qwen2.5: 13, Llama-3-8B: 15)"})
    batch_size: int = 32
    balance: float = dataclasses.field(default=0.5, metadata={"help": "fraction of each batch drawn from the seemingly toxic subset"})
    margin: float = 0.25
    gamma: float = 16.0
    variant: str = dataclasses.field(default="dcr", metadata={"help": "Circle loss variant: dcr (paper A.8) or original"})
    nll_weight: float = dataclasses.field(default=0.001, metadata={"help": "lambda of the NLL regularizer on the templated prompts"})
    freeze_embeddings: bool = dataclasses.field(default=False, metadata={"help": "also freeze untied input embeddings"})
    max_length: int = dataclasses.field(default=512, metadata={"help": "longest templated prompt; longer ones keep their last tokens"})
    lora: bool = dataclasses.field(default=False, metadata={"help": "LoRA on layers <= layer instead of full-parameter training"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 4:
            raise ValueError(f"batch_size: expected >= 4 (two prompts of each subset per batch), got {self.batch_size}")
        if not 0 < self.balance < 1:
            raise ValueError(f"balance: expected in (0, 1), got {self.balance}")
        if self.variant not in ("dcr", "original"):
            raise ValueError(f"variant: expected dcr or original, got {self.variant!r}")
        if self.layer < 1:
            raise ValueError(f"layer: expected >= 1, got {self.layer}")


def run_dcr(config: DCRConfig) -> dict[str, Any]:
    """Run the contrastive stage end to end; returns the summary also written to ``OUT/summary.json``."""
    from dcr_fast import CircleLoss

    _check_inputs(config)
    subsets = [_load_subset(config.seemingly_toxic, "seemingly_toxic", SEEMINGLY_TOXIC),
               _load_subset(config.toxic, "toxic", TOXIC)]
    both = set(subsets[0]) & set(subsets[1])
    if both:
        raise ValueError(f"seemingly_toxic/toxic: {len(both)} prompt(s) are in both subsets, e.g. {sorted(both)[0]!r}")
    set_seed(config.seed)
    device = resolve_device(config.device)
    model, tokenizer = models.load(config.model, dtype=config.dtype, attn_implementation=config.attn_implementation, device=device)
    frozen = freeze_above(model, config.layer, freeze_embeddings=config.freeze_embeddings)
    snapshot = {name: p.detach().clone() for name, p in frozen.items()}
    if config.lora:
        model = _attach_lora(model, config)
    encoded = [[encode_prompt(tokenizer, p, config.system_prompt)[-config.max_length :] for p in prompts] for prompts in subsets]
    plan = plan_batches(len(encoded[0]), len(encoded[1]), config)
    loss_fn = CircleLoss(m=config.margin, gamma=config.gamma, variant=config.variant)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and config.bf16_autocast)

    def micro_step(batch: list[tuple[int, int]]) -> StepResult:
        prompts = [encoded[subset][i] for subset, i in batch]
        labels = torch.tensor([subset for subset, _ in batch], device=device)
        with autocast:
            embeddings, nll = prompt_embeddings(model, prompts, config.layer, device=device)
            circle = loss_fn(embeddings.float(), labels)
        loss = circle + config.nll_weight * nll
        return StepResult(loss=loss, tokens=sum(map(len, prompts)), metrics={"circle": circle.item(), "nll": nll.item()})

    summary = run_steps(model=model, plan=plan, micro_step=micro_step, config=config, out_dir=config.out, desc="dcr")
    changed = sorted(name for name, p in frozen.items() if not torch.equal(p.detach(), snapshot[name]))
    if changed:
        raise RuntimeError(f"frozen parameters changed during DCR training: {changed[:5]}")
    summary.update({"prompts": {"seemingly_toxic": len(encoded[0]), "toxic": len(encoded[1])},
                    "frozen_parameters_verified": len(frozen)})
    return finish_run(summary, model, tokenizer, config)


def prompt_embeddings(model, prompts: list[list[int]], layer: int, *, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer-``layer`` hidden states at each prompt's last position, and the prompts' mean NLL.

    The prompts are packed into one padding-free row; position ids restart per prompt.
    """
    input_ids = torch.tensor([[t for p in prompts for t in p]], device=device)
    positions = torch.tensor([[i for p in prompts for i in range(len(p))]], device=device)
    targets = torch.tensor([[t for p in prompts for t in p[1:] + [IGNORE_INDEX]]], device=device)
    out = model(input_ids=input_ids, position_ids=positions, use_cache=False, output_hidden_states=True)
    last = torch.tensor([len(p) for p in prompts], device=device).cumsum(0) - 1
    embeddings = out.hidden_states[layer][0, last]
    nll = torch.nn.functional.cross_entropy(out.logits[0].float(), targets[0], ignore_index=IGNORE_INDEX)
    return embeddings, nll


def freeze_above(model, layer: int, *, freeze_embeddings: bool) -> dict[str, torch.nn.Parameter]:
    """Make only decoder layers ``< layer`` (0-based) and untied embeddings trainable.

    Returns the frozen parameters by name; they are what the run later verifies unchanged.
    Raises ``ValueError`` when ``layer`` leaves no decoder layer above it.
    """
    layers = model.get_decoder().layers
    if not 1 <= layer < len(layers):
        raise ValueError(f"layer: expected 1..{len(layers) - 1} for this model ({len(layers)} decoder layers, "
                         f"at least one must stay above the refined layer), got {layer}")
    embeddings = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embeddings
    trainable = {id(p) for block in layers[:layer] for p in block.parameters()}
    if not (tied or freeze_embeddings):
        trainable.add(id(embeddings))
    frozen = {}
    for name, param in model.named_parameters():
        param.requires_grad_(id(param) in trainable)
        if id(param) not in trainable:
            frozen[name] = param
    return frozen


def plan_batches(n_seemingly: int, n_toxic: int, config: DCRConfig) -> list[list[list[tuple[int, int]]]]:
    """Optimizer steps of one batch each; a batch lists (subset, index) pairs, both subsets present.

    An epoch is ``ceil((n_seemingly + n_toxic) / batch_size)`` batches. Each subset is drawn
    from its own stream of permutations (seeded), so the smaller subset repeats within an
    epoch rather than leaving batches without negatives.
    """
    n_first = min(max(2, round(config.batch_size * config.balance)), config.batch_size - 2)
    quota = (n_first, config.batch_size - n_first)
    generator = torch.Generator().manual_seed(config.seed)
    streams: list[list[int]] = [[], []]
    sizes = (n_seemingly, n_toxic)

    def draw(subset: int, count: int) -> list[int]:
        taken = streams[subset][:count]
        while len(taken) < count:
            # A fresh permutation puts what this batch already holds last, so a prompt repeats
            # within a batch only when its subset is smaller than the batch's share of it.
            fresh = torch.randperm(sizes[subset], generator=generator).tolist()
            fresh = [i for i in fresh if i not in taken] + [i for i in fresh if i in taken]
            streams[subset] = taken + fresh
            taken = streams[subset][:count]
        streams[subset] = streams[subset][count:]
        return taken

    steps = math.ceil(config.epochs * math.ceil((n_seemingly + n_toxic) / config.batch_size))
    return [[[(s, i) for s in (0, 1) for i in draw(s, quota[s])]] for _ in range(steps)]


def _attach_lora(model, config: DCRConfig):
    from peft import LoraConfig, get_peft_model

    # peft restricts layers only for named targets, so name every linear of a decoder layer.
    linears = sorted({name.rsplit(".", 1)[-1] for name, module in model.get_decoder().layers.named_modules()
                      if isinstance(module, torch.nn.Linear)})
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=linears, layers_to_transform=list(range(config.layer)), task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def _load_subset(sources: list[str], what: str, category: str) -> list[str]:
    prompts = [p for source in sources for p in load_prompts(source, what, category)]
    if len(set(prompts)) < 2:
        raise ValueError(f"{what}: needs at least 2 distinct prompts (each anchor needs a positive), got {len(set(prompts))}")
    return prompts


def _check_inputs(config: DCRConfig) -> None:
    check_model_and_out(config)
    for name, other in (("seemingly_toxic", "toxic"), ("toxic", "seemingly_toxic")):
        if not getattr(config, name):
            raise ValueError(f"{name}: required; without it the {other} prompts have no negatives")
        for source in getattr(config, name):
            check_source(source, name)


def register(subparsers) -> None:
    register_stage(subparsers, "dcr", help="contrastive refinement (Circle loss at layer l, top frozen)", description=__doc__, config_cls=DCRConfig, runner=run_dcr)

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
* Across ranks (``torchrun``; :mod:`dcr_fast.train.parallel`): each batch is cut into equal
  shares holding both subsets (:func:`rank_shares`; ``batch_size`` must divide among the
  ranks), each rank embeds its share, and every rank computes the Circle loss of the whole
  batch on the gathered embeddings (:func:`dcr_fast.distributed.gather_rows`), so the step
  equals one process's on the same batch.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from typing import Any

import torch

from dcr_fast import atomic, distributed, models
from dcr_fast.attention import packed_attention, packed_row
from dcr_fast.chat import encode_prompt
from dcr_fast.data import SEEMINGLY_TOXIC, TOXIC
from dcr_fast.data.files import check_source, load_prompts
from dcr_fast.distributed import gather_rows
from dcr_fast.runtime import set_seed
from dcr_fast.train.cli import check_model_and_out, register_stage
from dcr_fast.train.config import TrainConfig
from dcr_fast.train.loop import IGNORE_INDEX, StepResult, run_steps
from dcr_fast.train.outputs import finish_run
from dcr_fast.train.parallel import local, parallelize


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
    center: str = dataclasses.field(default="none", metadata={
        "help": "none: the Circle loss on the hidden states as they are (the paper); base-mean: on the states minus "
                "the base model's mean state over the training prompts (a fixed vector), so cosines measure the "
                "directions that tell prompts apart rather than the direction all of them share"})

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
        if self.center not in ("none", "base-mean"):
            raise ValueError(f"center: expected none or base-mean, got {self.center!r}")
        if self.nll_weight < 0:
            raise ValueError(f"nll_weight: expected >= 0, got {self.nll_weight}")


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
    device = distributed.rank_device(config.device)
    model, tokenizer = models.load(config.model, dtype=config.dtype, attn_implementation=config.attn_implementation, device=device)
    base = model
    frozen = freeze_above(model, config.layer, freeze_embeddings=config.freeze_embeddings)
    if config.lora:
        model = _attach_lora(model, config)
    encoded = [[encode_prompt(tokenizer, p, config.system_prompt)[-config.max_length :] for p in prompts] for prompts in subsets]
    plan = plan_batches(len(encoded[0]), len(encoded[1]), config)
    center = _center(base, encoded, config, device)  # before wrapping: the plain model, on every rank
    check_shares(config, distributed.world_size())
    parallel = parallelize(model, config.sharding, device)
    # Looked up after wrapping (FSDP replaces parameters); peft leaves the frozen ones' names alone.
    named = dict(base.named_parameters())
    frozen = {name: named[name] for name in frozen}
    snapshot = {name: local(p).detach().clone() for name, p in frozen.items()}
    loss_fn = CircleLoss(m=config.margin, gamma=config.gamma, variant=config.variant)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and config.bf16_autocast)

    def micro_step(batch: list[tuple[int, int]]) -> StepResult:
        # Across ranks each embeds its share of the batch; every rank then computes the Circle
        # loss of the whole batch on the gathered rows, put back in batch order, and the
        # ranks' shares of the loss (1/W of it, and their prompts' NLL) sum to the batch's loss.
        shares = rank_shares(batch, parallel.world)
        order = torch.argsort(torch.tensor([position for share in shares for position in share], device=device))
        prompts = [encoded[subset][i] for subset, i in (batch[p] for p in shares[parallel.rank])]
        labels = torch.tensor([subset for subset, _ in batch], device=device)
        targets = sum(len(encoded[subset][i]) - 1 for subset, i in batch)
        with autocast:
            embeddings, nll_sum = parallel(prompt_embeddings, prompts, config.layer, device=device,
                                           nll=config.nll_weight > 0)
            circle = loss_fn(gather_rows(embeddings.float())[order] - center, labels) / parallel.world
        metrics = {"circle": circle.item()}
        if config.variant == "dcr":  # each rank logs 1/W of it, as of the loss: the log sums ranks
            metrics["circle_floor"] = circle_floor(labels.tolist()) / parallel.world
        if nll_sum is None:
            return StepResult(loss=circle, tokens=sum(map(len, prompts)), metrics=metrics)
        nll = nll_sum / targets
        metrics["nll"] = nll.item()
        return StepResult(loss=circle + config.nll_weight * nll, tokens=sum(map(len, prompts)), metrics=metrics)

    with packed_attention(model, backward_inside=True):  # checkpointed layers recompute the same way
        summary = run_steps(model=model, plan=plan, micro_step=micro_step, config=config, out_dir=config.out, desc="dcr",
                            parallel=parallel)
    changed = sorted(name for name, p in frozen.items() if not torch.equal(local(p).detach(), snapshot[name]))
    if distributed.any_rank(bool(changed), device):
        raise RuntimeError(f"frozen parameters changed during DCR training: {changed[:5] or 'on another rank'}")
    summary.update({"prompts": {"seemingly_toxic": len(encoded[0]), "toxic": len(encoded[1])},
                    "frozen_parameters_verified": len(frozen)})
    return finish_run(summary, model, tokenizer, config)


def prompt_embeddings(model, prompts: list[list[int]], layer: int, *, device: torch.device,
                      nll: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Layer-``layer`` hidden states at each prompt's last position, and the prompts' summed
    next-token NLL (``len(p) - 1`` targets a prompt).

    The prompts are packed into one padding-free row; position ids restart per prompt. With
    ``nll=False`` only the decoder layers up to ``layer`` run (the rest would feed the NLL
    alone), and the NLL is None.
    """
    input_ids, positions, bounds = packed_row(prompts, device)
    last = torch.tensor([len(p) for p in prompts], device=device).cumsum(0) - 1
    if not nll:
        return _first_layers_output(model, input_ids, positions, layer, bounds)[0, last], None
    targets = torch.tensor([[t for p in prompts for t in p[1:] + [IGNORE_INDEX]]], device=device)
    with packed_attention(model):
        out = model(input_ids=input_ids, position_ids=positions, use_cache=False, output_hidden_states=True, **bounds)
    embeddings = out.hidden_states[layer][0, last]
    logits = out.logits[0].to(torch.promote_types(out.logits.dtype, torch.float32))  # bf16 up, float64 kept
    loss = torch.nn.functional.cross_entropy(logits, targets[0], ignore_index=IGNORE_INDEX, reduction="sum")
    return embeddings, loss


def _first_layers_output(model, input_ids: torch.Tensor, positions: torch.Tensor, layer: int,
                         bounds: dict[str, object]) -> torch.Tensor:
    """The output of decoder layer ``layer`` (1-based), running only the layers up to it
    (``bounds``: the :func:`~dcr_fast.attention.packed_row` keywords of the row's prompts)."""
    decoder = model.get_decoder()
    layers = decoder.layers
    captured: list[torch.Tensor] = []
    hook = layers[layer - 1].register_forward_hook(
        lambda module, args, output: captured.append(output[0] if isinstance(output, tuple) else output))
    decoder.layers = torch.nn.ModuleList(list(layers)[:layer])
    try:
        with packed_attention(model):
            decoder(input_ids=input_ids, position_ids=positions, use_cache=False, **bounds)
    finally:
        decoder.layers = layers
        hook.remove()
    return captured[0]


@torch.no_grad()
def base_center(model, encoded: list[list[list[int]]], layer: int, *, device: torch.device,
                batch_size: int = 32) -> torch.Tensor:
    """The mean layer-``layer`` state of the training prompts, each subset weighing one half."""
    means = []
    for prompts in encoded:
        states = [prompt_embeddings(model, prompts[i : i + batch_size], layer, device=device, nll=False)[0].double()
                  for i in range(0, len(prompts), batch_size)]
        means.append(torch.cat(states).mean(0))
    return torch.stack(means).mean(0).float()


def circle_floor(labels: list[int]) -> float:
    """The lowest value the ``dcr`` variant of the Circle loss takes on a batch with these labels.

    Once every pair is beyond its margin its weight is 0, so it adds exp(0) = 1 inside its
    log-sum-exp: row i's loss is log(1 + P_i·N_i) (P_i positives, N_i negatives), not 0. A run's
    distance from this floor, not the raw loss, says how far its batches are from separated.
    """
    counts = Counter(labels)
    rows = [math.log1p((counts[label] - 1) * (len(labels) - counts[label])) for label in labels]
    rows = [row for row in rows if row > 0]
    return sum(rows) / len(rows) if rows else 0.0


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
    quota = _quota(config)
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


def rank_shares(batch: list[tuple[int, int]], world: int) -> list[list[int]]:
    """``batch`` cut into ``world`` equal shares (positions in the batch), each with prompts of
    both subsets.

    Each subset's prompts are dealt out in runs as even as possible (the first ranks take one
    more when they do not divide), the second subset filling each share up to its size;
    :func:`check_shares` guarantees both subsets in every share.
    """
    subsets = [[p for p, (subset, _) in enumerate(batch) if subset == s] for s in (0, 1)]
    size, (first, second) = len(batch) // world, subsets
    shares, a, b = [], 0, 0
    for r in range(world):
        n = len(first) // world + (r < len(first) % world)
        shares.append(first[a : a + n] + second[b : b + size - n])
        a, b = a + n, b + size - n
    return shares


def check_shares(config: DCRConfig, world: int) -> None:
    """Refuse a batch that ``world`` ranks cannot share equally with both subsets in each share."""
    if config.batch_size % world:
        raise ValueError(f"batch_size: {config.batch_size} does not divide among {world} ranks; "
                         f"use a multiple of {world}")
    n_first, n_second = _quota(config)
    batch = [(0, i) for i in range(n_first)] + [(1, i) for i in range(n_second)]
    for share in rank_shares(batch, world):
        if {batch[p][0] for p in share} != {0, 1}:
            raise ValueError(f"batch_size: {config.batch_size} prompts ({n_first} seemingly toxic, {n_second} toxic) "
                             f"across {world} ranks leave a rank without one subset; use a larger batch_size "
                             "or a balance nearer 0.5")


def _quota(config: DCRConfig) -> tuple[int, int]:
    """Seemingly toxic and toxic prompts per batch: ``balance`` of it, at least two of each."""
    n_first = min(max(2, round(config.batch_size * config.balance)), config.batch_size - 2)
    return n_first, config.batch_size - n_first


def _center(model, encoded: list[list[list[int]]], config: DCRConfig, device: torch.device) -> torch.Tensor | float:
    """What the Circle loss subtracts from every embedding: 0, or the base model's mean state.

    The mean is taken once, from the model as loaded, and kept in ``OUT/center.pt``: a resumed
    run reads it back rather than measuring the half-trained model.
    """
    if config.center == "none":
        return 0.0
    path = os.path.join(config.out, "center.pt")
    if config.resume and os.path.exists(path):
        return torch.load(path, map_location=device)
    center = base_center(model, encoded, config.layer, device=device)
    if distributed.is_main():
        atomic.write(path, lambda tmp: torch.save(center.cpu(), tmp))
    return center


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

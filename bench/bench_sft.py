"""SFT throughput: ``dcr-fast sft``'s step (packed, with or without a lean output layer; padded) and TRL's.

Every implementation trains the same model from the same initial weights, LoRA adapters
included (one ``prepare_model`` of ``dcr_fast.train.sft``: r=8, alpha=32, dropout 0.05, all
linear layers), with the same recipe (AdamW at lr 1e-4, no weight decay, constant rate,
gradients clipped at norm 1), on the same conversations in the same micro-batches: each
optimizer step sees the whole set, ``grad_accum`` micro-batches of ``micro_batch`` examples in
one fixed order. The conversations are prompts and answers from the built-in example set
with answers of 1 to ``max_sentences`` sentences, so lengths vary the way real instruction
data does and padding has something to waste. Loss is on completion tokens only, averaged
over the effective batch. Throughput counts *real* tokens (prompt + response, no padding)
per second.

* ``ours-packed``: one optimizer step of ``dcr_fast.train.sft`` as ``run_steps`` takes it
  (``sft_loss_sum`` over the micro-batches, backward, clipping, AdamW): packed rows, logits
  only at targeted positions, in chunks of ``loss_chunk`` (1,024) positions.
  ``ours-packed-chunk128``: chunks of 128, what bounding the logits memory harder costs.
  ``ours-packed-full-logits``: logits at every position in one piece (the step before the
  output layer was restricted). ``ours-padded``: the padded reference. On the CPU the four
  are timed side by side (``measure_side_by_side``, interleaved calls).
* ``trl`` / ``trl-padding-free`` (when ``trl`` is installed, else ``skipped`` rows):
  ``trl.SFTTrainer`` on a conversational prompt-completion dataset (completion-only loss, the
  model's chat template; the token ids are checked against ours: ``tokens_match_ours``), the
  PEFT model above passed in, TRL's defaults otherwise except what the recipe fixes, no
  gradient checkpointing (TRL enables it by default; ours does not) and bf16 only on CUDA
  (TRL's default is bf16 everywhere). ``trl`` pads each micro-batch; ``trl-padding-free``
  flattens it into one row with restarting positions as ours does. Each step's time is
  the wall time between the ends of consecutive optimizer steps, everything TRL does per
  step included (batch collation, its per-token entropy and accuracy metrics, logging); the
  first step is a warm-up. Peak memory: on CUDA the allocator's peak over the timed run; on
  the CPU the resident-set peak of a separate one-step run (``bench.common.peak_memory_mb``;
  approximate, see bench/README.md).

Each row records ``loss_step1..N``, the loss of the first ``trl_steps + 1`` optimizer steps
from the shared initial weights (ours before its timed steps). Step 1 must agree across
implementations: LoRA's B starts at zero, so dropout cannot change the first forward pass,
and the same tokens, mask and normalization give the same loss. Later steps differ only by
float rounding and by each trainer's own dropout draws.

Presets: ``cpu`` (a tiny Qwen2, vocabulary of the tokenizer, ~2k), ``cpu-32k`` (the same
with a 32,768-token output layer, so the logits matter as they do in real models) and
``gpu`` (Qwen2.5-1.5B architecture with random weights, bf16 autocast, on CUDA). Rows go to
``bench/results/sft-<device>.json``. Run from the repository root (one thread on a shared
CPU: two OpenMP threads stall badly when another job takes a core):

    python -m bench.bench_sft --preset cpu --threads 1
    python -m bench.bench_sft --preset cpu-32k --threads 1
    python -m bench.bench_sft --device cuda          # the gpu preset
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

from bench.common import (
    RESULTS_DIR,
    Candidate,
    ResultsFile,
    Row,
    format_table,
    is_oom,
    measure_side_by_side,
    peak_memory_mb,
    release_memory,
    skipped,
)
from dcr_fast.config import add_config_arguments, config_from_args
from dcr_fast.demo.examples import load_example_set
from dcr_fast.tiny import build_model, build_tokenizer
from dcr_fast.train.loop import IGNORE_INDEX
from dcr_fast.train.sft import Example, SFTConfig, prepare_model, sft_loss_sum, tokenize_example

BENCH = "sft"
TINY = dict(hidden_size=128, layers=4, heads=4, kv_heads=2, intermediate_size=256)
PRESETS = {
    # (micro_batch, grad_accum, max_sentences): the recipe's micro-batch of varied lengths, and
    # the demo's micro-batch of 16 short, similar conversations.
    "cpu": dict(TINY, vocab_size=0, cases=[(4, 4, 8), (16, 1, 1)], budget_s=4.0),
    "cpu-32k": dict(TINY, vocab_size=32768, cases=[(4, 4, 8), (16, 1, 1)], budget_s=4.0),
    # Qwen2.5-1.5B: hidden 1536, 28 layers, 12 heads, 2 KV heads, MLP 8960, vocab 151936, tied.
    "gpu": dict(hidden_size=1536, layers=28, heads=12, kv_heads=2, intermediate_size=8960, vocab_size=151936,
                cases=[(4, 8, 40)], budget_s=10.0),
}
OURS = {"ours-padded": dict(packed=False), "ours-packed-full-logits": dict(packed=True, all_logits=True),
        "ours-packed": dict(packed=True), "ours-packed-chunk128": dict(packed=True, chunk=128)}  # else sft.loss_chunk
TRL_IMPLS = {"trl": False, "trl-padding-free": True}  # impl -> TRL's padding_free


@dataclass
class SFTBenchConfig:
    """What to measure; every field is a command-line flag (``--preset`` fills the model shape)."""

    preset: str = field(default="", metadata={"help": "cpu (tiny Qwen2), cpu-32k (its 32k-vocabulary twin) or gpu (Qwen2.5-1.5B shape); default: cpu, or gpu with --device cuda"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    seed: int = 0
    trl_steps: int = field(default=4, metadata={"help": "optimizer steps timed for TRL (after one warm-up step)"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads (torch.set_num_threads)"})
    results_dir: str = field(default=str(RESULTS_DIR), metadata={"help": "where the results JSON goes"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, SFTBenchConfig)
    config = config_from_args(SFTBenchConfig, parser.parse_args(argv))
    config.preset = config.preset or ("gpu" if config.device.startswith("cuda") else "cpu")
    if config.preset not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {config.preset!r}")
    if config.threads:
        torch.set_num_threads(config.threads)
    shape = PRESETS[config.preset]
    device = torch.device(config.device)
    results = ResultsFile(BENCH, device, results_dir=config.results_dir, extra_packages=("peft", "trl", "datasets", "accelerate"))
    rows = []
    for micro_batch, grad_accum, max_sentences in shape["cases"]:
        case_shape = {**shape, "micro_batch": micro_batch, "grad_accum": grad_accum, "max_sentences": max_sentences}
        rows += run_case(config, case_shape, device, results)
    steps = config.trl_steps + 1
    print(format_table(rows, ["tokens_per_s", "vs_padded", "real_token_share", "loss_step1", f"loss_step{steps}"]))
    print(f"results: {results.path}")
    return 0


def run_case(config: SFTBenchConfig, shape: dict, device: torch.device, results: ResultsFile) -> list[Row]:
    examples, tokenizer = conversations(shape["max_sentences"], shape["micro_batch"] * shape["grad_accum"], config.seed)
    vocab = shape["vocab_size"] or len(tokenizer)
    case = {"preset": config.preset,
            **{k: shape[k] for k in ("hidden_size", "layers", "micro_batch", "grad_accum", "max_sentences")},
            "vocab_size": vocab, "examples_per_step": len(examples), "bf16_autocast": device.type == "cuda",
            "threads": torch.get_num_threads()}
    sft = SFTConfig(micro_batch_size=shape["micro_batch"], grad_accum=shape["grad_accum"], lr=1e-4, weight_decay=0.0,
                    max_grad_norm=1.0, lora_dropout=0.05)
    batch = [tokenize_example(tokenizer, p, r, sft) for p, r in examples]
    micro_batches = [batch[i : i + shape["micro_batch"]] for i in range(0, len(batch), shape["micro_batch"])]
    real_tokens = sum(len(e.input_ids) for e in batch)
    padded_positions = sum(len(m) * max(len(e.input_ids) for e in m) for m in micro_batches)
    # positions whose next token is a response target: what the output layer of ours-packed projects
    case["target_share"] = round(sum(t != IGNORE_INDEX for e in batch for t in e.targets) / real_tokens, 4)

    base = build_model(tokenizer, vocab_size=vocab, hidden_size=shape["hidden_size"], layers=shape["layers"],
                       heads=shape["heads"], kv_heads=shape["kv_heads"], intermediate_size=shape["intermediate_size"],
                       max_positions=32768, seed=config.seed)

    def model():
        return lora_model(base, sft, device, config.seed)

    candidates, losses = [], {}
    for impl, kwargs in OURS.items():
        step = our_step(model(), micro_batches, sft, device, kwargs)
        losses[impl] = [step() for _ in range(config.trl_steps + 1)]  # the curve the others are compared with
        candidates.append(Candidate(impl, step))
    rows = measure_side_by_side(candidates, bench=BENCH, mode="fwd+bwd", case=case, device=device, budget_s=shape["budget_s"])
    del candidates
    padded_ms = rows[0].ms_median if rows[0].ok else None

    def record(row: Row) -> Row:
        if row.ok:
            row.metrics["tokens_per_s"] = real_tokens / (row.ms_median / 1e3)
            if padded_ms:
                row.metrics["vs_padded"] = padded_ms / row.ms_median
        return results.add(row)

    for row in rows:
        row.metrics["real_token_share"] = real_tokens / (real_tokens if OURS[row.impl]["packed"] else padded_positions)
        row.metrics.update({f"loss_step{i + 1}": loss for i, loss in enumerate(losses[row.impl])})
        record(row)
    for impl, padding_free in TRL_IMPLS.items():
        rows.append(record(trl_row(impl, padding_free, config, shape, case, sft, examples, batch, tokenizer, model, device)))
    return rows


def our_step(model, micro_batches: list[list[Example]], sft: SFTConfig, device: torch.device, loss_kwargs: dict):
    """One optimizer step of ``run_steps`` on ``micro_batches`` (constant learning rate)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=sft.lr, weight_decay=sft.weight_decay)
    step_tokens = sum(t != IGNORE_INDEX for m in micro_batches for e in m for t in e.targets)

    def step() -> float:
        loss = 0.0
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            for micro in micro_batches:
                micro_loss = sft_loss_sum(model, micro, device=device, **{"chunk": sft.loss_chunk, **loss_kwargs}) / step_tokens
                micro_loss.backward()
                loss += micro_loss.item()
        torch.nn.utils.clip_grad_norm_(params, sft.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def trl_row(impl: str, padding_free: bool, config: SFTBenchConfig, shape: dict, case: dict, sft: SFTConfig,
            examples: list[tuple[str, str]], batch: list[Example], tokenizer, model, device: torch.device) -> Row:
    """TRL's SFTTrainer on the same model, adapters and micro-batches, timed per optimizer step;
    a failure (an API change, out of memory) becomes an ``error`` / ``oom`` row."""
    if importlib.util.find_spec("trl") is None or importlib.util.find_spec("datasets") is None:
        return skipped(bench=BENCH, impl=impl, mode="fwd+bwd", case=case, reason="trl or datasets is not installed")
    try:
        return _trl_row(impl, padding_free, config, shape, case, sft, examples, batch, tokenizer, model, device)
    except Exception as exc:  # noqa: BLE001 - recorded in the row
        release_memory(device)
        message = str(exc).splitlines()[0][:300] if str(exc) else ""
        return Row(bench=BENCH, impl=impl, mode="fwd+bwd", case=case, status="oom" if is_oom(exc) else "error",
                   reason=f"{type(exc).__name__}: {message}")


def _trl_row(impl: str, padding_free: bool, config: SFTBenchConfig, shape: dict, case: dict, sft: SFTConfig,
             examples: list[tuple[str, str]], batch: list[Example], tokenizer, model, device: torch.device) -> Row:
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer

    class InOrder(SFTTrainer):
        """Micro-batches in dataset order (Trainer shuffles): every step sees ours' micro-batches."""

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    class StepEnds(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.ends.append(time.perf_counter())

    conversations_ = [{"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": r}]}
                      for p, r in examples]

    def trainer(steps: int, out: str, callbacks=()) -> SFTTrainer:
        args = TRLConfig(output_dir=out, per_device_train_batch_size=shape["micro_batch"],
                         gradient_accumulation_steps=shape["grad_accum"], max_steps=steps, learning_rate=sft.lr,
                         weight_decay=sft.weight_decay, max_grad_norm=sft.max_grad_norm, lr_scheduler_type="constant",
                         completion_only_loss=True, padding_free=padding_free,
                         max_length=None if padding_free else sft.max_length,  # TRL truncates only padded rows
                         gradient_checkpointing=False, bf16=device.type == "cuda", use_cpu=device.type == "cpu",
                         logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=config.seed)
        return InOrder(model=model(), args=args,
                       train_dataset=Dataset.from_list(conversations_ * steps), processing_class=tokenizer,
                       callbacks=list(callbacks))

    clock = StepEnds()
    with tempfile.TemporaryDirectory() as out:
        timed = trainer(config.trl_steps + 1, out, [clock])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        timed.train()
        peak_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
        losses = [entry["loss"] for entry in timed.state.log_history if "loss" in entry]
        theirs = [(r["input_ids"], r["labels"][1:]) for r in timed.train_dataset.select(range(len(batch)))]
        del timed  # the CPU's one-step memory run below should not sit above this model
        if device.type == "cpu":
            peak_mb = peak_memory_mb(trainer(1, out).train, device)
    step_ms = [(b - a) * 1e3 for a, b in zip(clock.ends, clock.ends[1:])]  # the first step is warm-up
    deciles = statistics.quantiles(step_ms, n=10, method="inclusive") if len(step_ms) > 1 else step_ms * 9
    row = Row(bench=BENCH, impl=impl, mode="fwd+bwd", case=case, ms_median=statistics.median(step_ms),
              ms_p20=deciles[1], ms_p80=deciles[7], repeats=len(step_ms), peak_mb=peak_mb)
    if device.type == "cpu":
        row.metrics["load_avg_1m"] = os.getloadavg()[0]
    row.metrics["tokens_match_ours"] = float(theirs == [(e.input_ids, e.targets[:-1]) for e in batch])
    row.metrics.update({f"loss_step{i + 1}": loss for i, loss in enumerate(losses)})
    return row


def conversations(max_sentences: int, count: int, seed: int) -> tuple[list[tuple[str, str]], object]:
    """``count`` (prompt, answer) pairs with answers of 1..``max_sentences`` sentences."""
    examples = load_example_set()
    rng = random.Random(seed)
    prompts = [p for kind in ("normal", "seemingly_toxic") for p in examples.train_prompts(kind)]
    pairs = []
    for _ in range(count):
        prompt = rng.choice(prompts)
        pairs.append((prompt.text, " ".join(examples.answer(prompt, rng) for _ in range(rng.randint(1, max_sentences)))))
    return pairs, build_tokenizer(examples.all_texts())


def lora_model(base, sft: SFTConfig, device: torch.device, seed: int):
    """A copy of ``base`` with LoRA adapters: the same weights, adapters included, on every call."""
    torch.manual_seed(seed)  # peft draws the adapters' initial A from the global generator
    return prepare_model(copy.deepcopy(base).train().to(device), sft)  # trained with LoRA dropout on


if __name__ == "__main__":
    sys.exit(main())

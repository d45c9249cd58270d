"""SFT throughput: ``dcr-fast sft``'s step, packed and padded, and TRL's SFTTrainer + peft.

Every implementation trains the same LoRA recipe (r=8, alpha=32, dropout 0.05, all linear
layers, AdamW, lr 1e-4) on the same conversations: prompts and answers from the built-in
example set with answers of 1 to ``max_sentences`` sentences, so lengths vary the way real
instruction data does and padding has something to waste. Throughput counts *real* tokens
(prompt + response, no padding) per second, so the implementations are compared on the
work that matters.

* ``ours-packed`` / ``ours-padded``: one optimizer step of ``dcr_fast.train.sft`` (its
  ``sft_loss_sum`` over ``grad_accum`` micro-batches of ``micro_batch`` examples, backward,
  AdamW), timed with ``bench.common.measure``; peak memory of one step.
* ``trl`` (only when ``trl`` is installed, else a ``skipped`` row): ``trl.SFTTrainer`` with a
  peft ``LoraConfig`` and a conversational prompt-completion dataset (loss on completions),
  ``trl_steps`` steps timed end to end after one warm-up step. Both record the loss of their
  first ``trl_steps + 1`` steps (``loss_step<i>`` metrics; ours before its timed steps), so the
  curves can be compared: same data, model and recipe, though not the same data order.

Modes: ``--preset cpu`` (a tiny Qwen2, seconds per case, run on the 2-core CI machine) and
``--preset gpu`` (Qwen2.5-1.5B architecture with random weights, bf16 autocast, on CUDA).
Rows go to ``bench/results/sft-<device>.json``. Run from the repository root:

    python -m bench.bench_sft --preset cpu
    python -m bench.bench_sft --preset gpu --device cuda
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

from bench.common import RESULTS_DIR, ResultsFile, Row, format_table, measure, skipped
from dcr_fast.config import add_config_arguments, config_from_args
from dcr_fast.demo.examples import load_example_set
from dcr_fast.tiny import build_model, build_tokenizer
from dcr_fast.train.sft import SFTConfig, prepare_model, sft_loss_sum, tokenize_example

BENCH = "sft"
PRESETS = {
    # (micro_batch, grad_accum, max_sentences): the recipe's micro-batch of varied lengths, and
    # the demo's micro-batch of 16 short, similar conversations.
    "cpu": dict(hidden_size=128, layers=4, heads=4, kv_heads=2, intermediate_size=256, vocab_size=0,
                cases=[(4, 4, 8), (16, 1, 1)], budget_s=4.0),
    # Qwen2.5-1.5B: hidden 1536, 28 layers, 12 heads, 2 KV heads, MLP 8960, vocab 151936, tied.
    "gpu": dict(hidden_size=1536, layers=28, heads=12, kv_heads=2, intermediate_size=8960, vocab_size=151936,
                cases=[(4, 8, 40)], budget_s=10.0),
}


@dataclass
class SFTBenchConfig:
    """What to measure; every field is a command-line flag (``--preset`` fills the model shape)."""

    preset: str = field(default="cpu", metadata={"help": "cpu (tiny Qwen2) or gpu (Qwen2.5-1.5B shape)"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    seed: int = 0
    trl_steps: int = field(default=4, metadata={"help": "optimizer steps timed for TRL (after one warm-up step)"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads (torch.set_num_threads)"})
    results_dir: str = field(default=str(RESULTS_DIR), metadata={"help": "where the results JSON goes"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, SFTBenchConfig)
    config = config_from_args(SFTBenchConfig, parser.parse_args(argv))
    if config.preset not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {config.preset!r}")
    if config.threads:
        torch.set_num_threads(config.threads)
    shape = PRESETS[config.preset]
    device = torch.device(config.device)
    results = ResultsFile(BENCH, device, results_dir=config.results_dir, extra_packages=("transformers", "peft", "trl"))
    rows = []
    for micro_batch, grad_accum, max_sentences in shape["cases"]:
        case_shape = {**shape, "micro_batch": micro_batch, "grad_accum": grad_accum, "max_sentences": max_sentences}
        rows += run_case(config, case_shape, device, results)
    print(format_table(rows, ["tokens_per_s", "vs_padded", "real_token_share", "loss_step1", f"loss_step{config.trl_steps + 1}"]))
    print(f"results: {results.path}")
    return 0


def run_case(config: SFTBenchConfig, shape: dict, device: torch.device, results: ResultsFile) -> list[Row]:
    torch.manual_seed(config.seed)
    examples, tokenizer = conversations(shape["max_sentences"], shape["micro_batch"] * shape["grad_accum"], config.seed)
    vocab = shape["vocab_size"] or len(tokenizer)
    autocast = device.type == "cuda"
    case = {"preset": config.preset,
            **{k: shape[k] for k in ("hidden_size", "layers", "micro_batch", "grad_accum", "max_sentences")},
            "vocab_size": vocab, "examples_per_step": len(examples), "bf16_autocast": autocast,
            "threads": torch.get_num_threads()}
    sft = SFTConfig(micro_batch_size=shape["micro_batch"], grad_accum=shape["grad_accum"], lora_dropout=0.05)
    batch = [tokenize_example(tokenizer, p, r, sft) for p, r in examples]
    real_tokens = sum(len(e.input_ids) for e in batch)
    rows, padded_ms = [], None
    for impl, packed in (("ours-padded", False), ("ours-packed", True)):
        model = _model(shape, vocab, tokenizer, device, config.seed)
        model = prepare_model(model, sft)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        micro_batches = [batch[i : i + shape["micro_batch"]] for i in range(0, len(batch), shape["micro_batch"])]
        step_tokens = sum(t != -100 for e in batch for t in e.targets)

        def step() -> float:
            loss = 0.0
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                for micro in micro_batches:
                    micro_loss = sft_loss_sum(model, micro, packed=packed, device=device) / step_tokens
                    micro_loss.backward()
                    loss += micro_loss.item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        losses = [step() for _ in range(config.trl_steps + 1)]  # the loss curve TRL's is compared with
        row = measure(step, bench=BENCH, impl=impl, mode="fwd+bwd", case=case, device=device, budget_s=shape["budget_s"])
        if row.ok:
            row.metrics["tokens_per_s"] = real_tokens / (row.ms_median / 1e3)
            padded_positions = sum(len(m) * max(len(e.input_ids) for e in m) for m in micro_batches)
            row.metrics["real_token_share"] = real_tokens / (real_tokens if packed else padded_positions)
            if packed and padded_ms:
                row.metrics["vs_padded"] = padded_ms / row.ms_median
            padded_ms = padded_ms or row.ms_median
        row.metrics.update({f"loss_step{i + 1}": loss for i, loss in enumerate(losses)})
        rows.append(results.add(row))
    rows.append(results.add(trl_row(config, shape, case, examples, tokenizer, vocab, device, real_tokens)))
    return rows


def trl_row(config: SFTBenchConfig, shape: dict, case: dict, examples: list[tuple[str, str]], tokenizer, vocab: int,
            device: torch.device, real_tokens: int) -> Row:
    """TRL's SFTTrainer + peft on the same conversations, timed over ``trl_steps`` steps."""
    if importlib.util.find_spec("trl") is None:
        return skipped(bench=BENCH, impl="trl", mode="fwd+bwd", case=case, reason="trl is not installed")
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.starts: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.starts.append(time.perf_counter())

    rows = [{"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": r}]}
            for p, r in examples] * (config.trl_steps + 1)
    model = _model(shape, vocab, tokenizer, device, config.seed)
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        args = TRLConfig(output_dir=out, per_device_train_batch_size=shape["micro_batch"],
                         gradient_accumulation_steps=shape["grad_accum"], learning_rate=1e-4, max_steps=config.trl_steps + 1,
                         lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
                         bf16=device.type == "cuda", use_cpu=device.type == "cpu", max_length=4096, seed=config.seed)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                             peft_config=LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                                    task_type="CAUSAL_LM"), callbacks=[clock])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer.train()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        end = time.perf_counter()
    step_ms = (end - clock.starts[1]) / config.trl_steps * 1e3  # the first step is warm-up
    row = Row(bench=BENCH, impl="trl", mode="fwd+bwd", case=case, ms_median=step_ms, repeats=config.trl_steps,
              peak_mb=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None)
    row.metrics["tokens_per_s"] = real_tokens / (step_ms / 1e3)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
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


def _model(shape: dict, vocab: int, tokenizer, device: torch.device, seed: int):
    model = build_model(tokenizer, vocab_size=vocab, hidden_size=shape["hidden_size"], layers=shape["layers"],
                        heads=shape["heads"], kv_heads=shape["kv_heads"], intermediate_size=shape["intermediate_size"],
                        max_positions=32768, seed=seed)
    return model.train().to(device)  # both trainers train with LoRA dropout on


if __name__ == "__main__":
    sys.exit(main())

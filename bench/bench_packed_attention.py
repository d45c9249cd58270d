"""Packed rows: per-example attention (``dcr_fast.attention``) against transformers' dense block mask.

A training step packs its examples into one row. transformers' SDPA path masks the row with a
dense block-diagonal causal mask, so attention costs the row's length squared; inside
``packed_attention`` each example attends over itself only. Times one forward + backward of a
randomly initialised model of SmolLM2-135M's shape (Llama, 30 layers, hidden 576, 9/3 heads,
vocabulary 49,152; every parameter trained but the tied embedding, which DCR freezes and LoRA
leaves alone) on the two packed rows the cpu preset of
``reproduce`` trains on:

* ``dcr``: 32 prompts, lengths drawn from the chat-templated lengths of XSTest safe prompts and
  HH-RLHF first turns (mean ~45 tokens), NLL at every position (a DCR step);
* ``sft``: 8 conversations of ~80 tokens (an STL micro-batch), loss on the last half of each.

``dense`` and ``per_example`` run side by side (``measure_side_by_side``: interleaved on the CPU);
each row records its tokens per second, and ``per_example`` its ``speedup`` over ``dense`` and
``max_abs_err`` of its loss against dense. Rows go to ``bench/results/packed_attention-<device>.json``.
Run from the repository root:

    python -m bench.bench_packed_attention --threads 1     # ~3 minutes on one core
    python -m bench.bench_packed_attention --device cuda
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import dataclass, field

import torch

from bench.common import RESULTS_DIR, Candidate, ResultsFile, Row, format_table, measure_side_by_side
from dcr_fast.attention import packed_attention, packed_kwargs
from dcr_fast.config import add_config_arguments, config_from_args

BENCH = "packed_attention"
# Chat-templated lengths of SmolLM2's template (its default system prompt included) as the cpu
# preset's DCR prompts have them: 192 prompts, mean 45.6, max 121 (measured on that preset's data).
DCR_LENGTH_RANGE = (31, 121)
WORKLOADS = {"dcr": (32, 45), "sft": (8, 82)}  # examples per row, mean tokens per example


@dataclass
class PackedBenchConfig:
    """What to measure; every field is a command-line flag."""

    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    layers: int = field(default=30, metadata={"help": "decoder layers (SmolLM2-135M: 30)"})
    workloads: tuple[str, ...] = field(default=("dcr", "sft"), metadata={"help": "dcr and/or sft"})
    budget_s: float = field(default=20.0, metadata={"help": "seconds of timed calls per implementation"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads (torch.set_num_threads)"})
    seed: int = 0
    results_dir: str = field(default=str(RESULTS_DIR), metadata={"help": "where the results JSON goes"})


def smollm2_shape(layers: int, device: torch.device):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         tie_word_embeddings=True, rope_theta=100000.0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device).train()
    model.get_input_embeddings().weight.requires_grad_(False)
    return model


def example_lengths(workload: str, rng: random.Random) -> list[int]:
    count, mean = WORKLOADS[workload]
    low, high = DCR_LENGTH_RANGE if workload == "dcr" else (mean // 2, 2 * mean - mean // 2)
    # a skewed draw around the mean: most prompts short, a few long, as the templated data are
    return [min(high, max(low, int(rng.expovariate(1 / (mean - low))) + low)) for _ in range(count)]


def step_fn(model, lengths: list[int], workload: str, device: torch.device, per_example: bool):
    rng = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, sum(lengths)), generator=rng).to(device)
    positions = torch.tensor([[p for n in lengths for p in range(n)]], device=device)
    targets = ids.roll(-1, 1).clone()
    start = 0
    for n in lengths:  # no target across examples; the sft loss is on each example's second half
        targets[0, start + n - 1] = -100
        if workload == "sft":
            targets[0, start : start + n // 2] = -100
        start += n
    bounds = packed_kwargs(lengths, device)

    def step() -> torch.Tensor:
        if per_example:
            with packed_attention(model):
                logits = model(input_ids=ids, position_ids=positions, use_cache=False, **bounds).logits
        else:
            logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[0].float(), targets[0], ignore_index=-100)
        loss.backward()
        return loss.detach()

    return step


def run(config: PackedBenchConfig) -> list[Row]:
    device = torch.device(config.device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    model = smollm2_shape(config.layers, device)
    params = [p for p in model.parameters() if p.requires_grad]
    results = ResultsFile(BENCH, device, results_dir=config.results_dir, extra_packages=("transformers",))
    print(f"SmolLM2-135M shape, {config.layers} layers, on {results.run['env']['device']} -> {results.path}", flush=True)
    rows: list[Row] = []
    rng = random.Random(config.seed)
    for workload in config.workloads:
        lengths = example_lengths(workload, rng)
        case = {"workload": workload, "examples": len(lengths), "tokens": sum(lengths), "longest": max(lengths),
                "layers": config.layers, "dtype": "float32"}
        dense, varlen = (step_fn(model, lengths, workload, device, per_example) for per_example in (False, True))
        error = abs(float(dense()) - float(varlen()))
        measured = measure_side_by_side([Candidate("dense", dense, params), Candidate("per_example", varlen, params)],
                                        bench=BENCH, mode="fwd+bwd", case=case, device=device,
                                        budget_s=config.budget_s)
        for row in measured:
            if row.ok:
                row.metrics["tokens_per_s"] = case["tokens"] / (row.ms_median / 1e3)
        if all(row.ok for row in measured):
            measured[1].metrics["speedup"] = measured[0].ms_median / measured[1].ms_median
            measured[1].metrics["max_abs_err"] = error
        rows += [results.add(row) for row in measured]
        print(format_table(measured, ("tokens_per_s", "speedup", "max_abs_err")), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(parser, PackedBenchConfig)
    run(config_from_args(PackedBenchConfig, parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

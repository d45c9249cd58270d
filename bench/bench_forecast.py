"""Over-refusal forecast benchmark: agreement with one real SGD step, and the cost on a real model.

Two presets:

* ``tiny`` — brute force against forecast on a random tiny Qwen2 in float64 (float64 end to
  end: ``float64_exact``), where both are cheap. The forecast (``gradient_products``) predicts
  ΔP_ref for every candidate; the brute force (``one_step_change``) takes one plain SGD step
  of η on the token-mean SFT loss over the safety set, moving only the parameter set, and
  measures ΔP_ref again. Per η: Spearman's ρ between the two, the largest error and that
  error relative to the largest measured change (first order: the error shrinks as η²).
  Both are timed; the brute force yields only the total per candidate, the forecast every
  (candidate, safety example) contribution.
* ``smollm2`` — ``forecast`` timed end to end (prefix passes, probe features, Gram) on
  SmolLM2-135M-Instruct (``--model``, by default the built-in one) with the first
  ``--candidates`` XSTest prompts and the first ``--safety`` Safety-Tuned LLaMAs safety pairs
  from ``--data`` (``/work/shared/data`` layout). Rows record pairs/s and the prompt lengths.

Rows go to ``bench/results/forecast-<device>.json`` (see ``bench/common.py``). Run from the
repository root:

    python -m bench.bench_forecast --preset tiny                 # ~1 min
    python -m bench.bench_forecast --preset smollm2              # minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench.common import RESULTS_DIR, ResultsFile, Row, format_table
from dcr_fast.config import add_config_arguments, config_from_args
from dcr_fast.forecast import ForecastConfig, forecast, spearman
from dcr_fast.forecast.engine import gradient_products
from dcr_fast.forecast.reference import one_step_change
from dcr_fast.ntk.reference import float64_exact
from dcr_fast.tiny import build_model, tiny_tokenizer
from dcr_fast.train.sft import IGNORE_INDEX, Example

BENCH = "forecast"
PRESETS = ("tiny", "smollm2")


@dataclass
class ForecastBenchConfig:
    """What to measure; every field is a command-line flag."""

    preset: str = field(default="tiny", metadata={"help": f"one of {PRESETS}"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    lrs: tuple[float, ...] = field(default=(1.0, 0.1, 0.01, 0.001), metadata={"help": "tiny: η of the compared steps"})
    param_sets: tuple[str, ...] = field(default=("tail", "lora"), metadata={"help": "tiny: parameter sets compared"})
    candidates: int = field(default=300, metadata={"help": "candidate prompts (tiny: 64 are used)"})
    safety: int = field(default=150, metadata={"help": "safety examples (tiny: 24 are used)"})
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "smollm2: the model (a name dcr_fast.models.load takes)"})
    data: str = field(default_factory=lambda: os.environ.get("DCR_FAST_DATA", "../shared/data"),
                      metadata={"help": "smollm2: the benchmark data root (default: $DCR_FAST_DATA, else ../shared/data)"})
    tail_layers: int = field(default=1, metadata={"help": "decoder layers in θ_S"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads (torch.set_num_threads)"})
    results_dir: str = field(default=str(RESULTS_DIR), metadata={"help": "where the results JSON goes"})


def run(config: ForecastBenchConfig) -> list[Row]:
    if config.preset not in PRESETS:
        raise ValueError(f"preset: expected one of {PRESETS}, got {config.preset!r}")
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    results = ResultsFile(BENCH, device, results_dir=config.results_dir, extra_packages=("transformers",))
    print(f"{config.preset} on {results.run['env']['device']} -> {results.path}", flush=True)
    rows = (_tiny if config.preset == "tiny" else _smollm2)(config, device, results)
    print(format_table(rows, ("spearman", "rel_err", "pairs_per_s")), flush=True)
    return rows


def _tiny(config: ForecastBenchConfig, device: torch.device, results: ResultsFile) -> list[Row]:
    vocab, n_candidates, n_safety = 512, 64, 24
    tokenizer = tiny_tokenizer(["placeholder"])
    model = build_model(tokenizer, hidden_size=64, layers=4, heads=4, kv_heads=2, intermediate_size=128, tied=True,
                        vocab_size=vocab, attn_implementation="eager", dtype=torch.float64).to(device)
    g = torch.Generator().manual_seed(0)
    candidates = [torch.randint(0, vocab, (int(n),), generator=g).to(device)
                  for n in torch.randint(8, 24, (n_candidates,), generator=g)]
    examples = []
    for _ in range(n_safety):
        prompt, response = (int(v) for v in torch.randint(6, 16, (2,), generator=g))
        ids = torch.randint(0, vocab, (prompt + response,), generator=g).tolist()
        examples.append(Example(ids, [ids[t + 1] if t + 1 >= prompt else IGNORE_INDEX for t in range(len(ids) - 1)]
                                + [IGNORE_INDEX]))
    tokens = [1, 7, 42]
    response_tokens = sum(t != IGNORE_INDEX for e in examples for t in e.targets)
    case_base = {"model": "tiny-qwen2 h64 l4 v512 tied", "dtype": "float64", "candidates": n_candidates,
                 "safety": n_safety, "tail_layers": config.tail_layers}
    rows = []
    with float64_exact():
        for param_set in config.param_sets:
            settings = ForecastConfig(param_set=param_set, tail_layers=config.tail_layers)
            start = time.perf_counter()
            products, _ = gradient_products(model, candidates, examples, tokens, settings, progress=False)
            forecast_ms = (time.perf_counter() - start) * 1e3
            for lr in config.lrs:
                predicted = -lr / response_tokens * products.sum(axis=1)
                start = time.perf_counter()
                measured = one_step_change(model, candidates, examples, tokens, settings, lr)
                brute_ms = (time.perf_counter() - start) * 1e3
                error = np.abs(predicted - measured).max()
                metrics = {"spearman": spearman(predicted, measured), "max_abs_err": float(error),
                           "rel_err": float(error / np.abs(measured).max()), "max_abs_measured": float(np.abs(measured).max())}
                case = {**case_base, "param_set": param_set, "lr": lr}
                rows.append(results.add(Row(BENCH, "forecast", "fwd+bwd", case, ms_median=forecast_ms, repeats=1,
                                            metrics=metrics)))
                rows.append(results.add(Row(BENCH, "one_step_brute_force", "fwd+bwd", case, ms_median=brute_ms,
                                            repeats=1)))
    return rows


def _smollm2(config: ForecastBenchConfig, device: torch.device, results: ResultsFile) -> list[Row]:
    from dcr_fast import models
    from dcr_fast.chat import encode_prompt
    from dcr_fast.data.files import load_pairs, load_prompts

    data = Path(config.data)
    stl = data / "safety_tuned_llamas" / "training" / "safety_only_data_Instructions.json"
    xstest = data / "xstest"
    case = {"model": "SmolLM2-135M-Instruct", "candidates": config.candidates, "safety": config.safety,
            "tail_layers": config.tail_layers, "dtype": "float32"}
    if not stl.exists() or not xstest.exists():
        reason = "needs --data with xstest and safety_tuned_llamas"
        row = Row(BENCH, "forecast", "fwd+bwd", case, status="skipped", reason=reason)
        return [results.add(row)]
    model, tokenizer = models.load(config.model, dtype="float32", attn_implementation="sdpa", device=device)
    prompts = load_prompts(f"xstest={xstest}", "prompts")[: config.candidates]
    pairs = load_pairs(f"stl-train={stl}", "safety_data")[: config.safety]
    case["candidate_tokens_mean"] = float(np.mean([len(encode_prompt(tokenizer, p)) for p in prompts]))
    start = time.perf_counter()
    result = forecast(model.eval(), tokenizer, pairs, prompts, config=ForecastConfig(tail_layers=config.tail_layers))
    seconds = time.perf_counter() - start
    case["response_tokens"] = result.response_tokens
    metrics = {"pairs_per_s": len(prompts) * len(pairs) / seconds, "seconds": seconds,
               "load_avg_1m": os.getloadavg()[0]}
    return [results.add(Row(BENCH, "forecast", "fwd+bwd", case, ms_median=seconds * 1e3, repeats=1, metrics=metrics))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(parser, ForecastBenchConfig)
    run(config_from_args(ForecastBenchConfig, parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

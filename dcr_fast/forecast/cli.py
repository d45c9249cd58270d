"""``dcr-fast forecast``: which prompts will a safety set push into refusal? Answered before training.

    dcr-fast forecast --model smollm2-135m-instruct \\
        --safety-data stl-train=data/safety_tuned_llamas/training/safety_only_data_Instructions.json \\
        --prompts xstest=data/xstest my_prompts.txt --out runs/forecast \\
        [--compare-model runs/dcr/model] [--max-safety 200] [--param-set tail|lora]

For every candidate prompt: the predicted change of its first-token refusal probability after
one SGD step on the safety set (the paper's Eq. 2, summed over the safety examples), its rank,
and the safety examples that contribute most. ``--safety-data`` takes (prompt, response)
JSONL files or BENCHMARK=PATH (e.g. ``stl-train=...``); ``--prompts`` takes JSONL (``prompt``
field), text (one a line) or BENCHMARK=PATH; give several after one flag. A benchmark's prompts are grouped
by its categories (XSTest: seemingly_toxic and toxic), a file's by its name. With
``--compare-model`` (e.g. the model after DCR) the same forecast is made for it too and the
report sets the two side by side: what DCR buys, without running STL.

OUT receives forecast.jsonl (one row per prompt), summary.json, report.md and forecast.png;
finished blocks of work are kept under OUT/blocks, so rerunning the same command resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from dcr_fast.config import add_config_arguments, config_from_args
from dcr_fast.forecast.config import ForecastConfig

NAME = "forecast"


@dataclass(frozen=True)
class ForecastRun(ForecastConfig):
    """A ``dcr-fast forecast`` run: the forecast's settings plus its inputs and outputs."""

    model: str = field(default="", metadata={"help": "the model before training: a built-in name (smollm2-135m-instruct), .gguf file, Hugging Face directory or hub id"})
    safety_data: list[str] = field(default_factory=list, metadata={"help": "safety (prompt, response) JSONL files or BENCHMARK=PATH"})
    prompts: list[str] = field(default_factory=list, metadata={"help": "candidate prompts: JSONL, text or BENCHMARK=PATH"})
    out: str = field(default="", metadata={"help": "output directory (resumable)"})
    compare_model: str | None = field(default=None, metadata={"help": "a second model (e.g. after DCR) forecast on the same inputs"})
    max_safety: int | None = field(default=None, metadata={"help": "use the first N safety examples"})
    max_prompts: int | None = field(default=None, metadata={"help": "use the first N prompts of each --prompts source"})
    report_rows: int = field(default=100, metadata={"help": "prompts listed in report.md"})
    device: str = "auto"
    dtype: str = field(default="float32", metadata={"help": "weight dtype: float32, bfloat16, float16, float64, auto (as saved)"})
    attn_implementation: str = field(default="auto", metadata={"help": "auto (SDPA), sdpa or eager"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("model", "out"):
            if not getattr(self, name):
                raise ValueError(f"--{name}: required")
        for name in ("safety_data", "prompts"):
            if not getattr(self, name):
                raise ValueError(f"--{name.replace('_', '-')}: give at least one source")
        for name in ("max_safety", "max_prompts", "report_rows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {value}")

    def forecast_config(self) -> ForecastConfig:
        return ForecastConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ForecastConfig)})


def register(subparsers) -> None:
    parser = subparsers.add_parser(NAME, help="forecast which prompts a safety set will push into refusal",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, ForecastRun)
    parser.set_defaults(func=run, resume_hint="rerun the same command to resume (finished blocks are kept)")


def run(args: argparse.Namespace) -> int:
    from dcr_fast.forecast.api import forecast
    from dcr_fast.forecast.report import write_outputs
    from dcr_fast.forecast.result import compare

    run = config_from_args(ForecastRun, args, section=NAME)
    pairs, prompts, groups = read_inputs(run)
    settings = run.forecast_config()
    started = time.perf_counter()
    model, tokenizer, identity = load_model(run.model, run)
    result = forecast(model, tokenizer, pairs, prompts, groups=groups, config=settings, out_dir=run.out,
                      identity=identity)
    elapsed = time.perf_counter() - started
    other = comparison = None
    if run.compare_model:
        del model
        other_model, other_tokenizer, other_identity = load_model(run.compare_model, run)
        other = forecast(other_model, other_tokenizer, pairs, prompts, groups=groups, config=settings,
                         out_dir=Path(run.out) / "compare", identity=other_identity)
        comparison = {"other_model": run.compare_model, **compare(result, other)}
    paths = write_outputs(result, run.out, model=run.model, elapsed_s=elapsed, comparison=comparison, other=other,
                          report_rows=run.report_rows)
    _print_summary(result, comparison)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def read_inputs(run: ForecastRun) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """Safety pairs, prompts and each prompt's group, read and checked before any model loads."""
    from dcr_fast.data import load_benchmark
    from dcr_fast.data.files import check_source, load_pairs, load_prompts

    for source in run.safety_data:
        check_source(source, "safety_data")
    for source in run.prompts:
        check_source(source, "prompts")
    pairs = [pair for source in run.safety_data for pair in load_pairs(source, "safety_data")][: run.max_safety]
    prompts: list[str] = []
    groups: list[str] = []
    for source in run.prompts:
        name, sep, path = source.partition("=")
        if sep:  # a benchmark: its records carry their category
            records = load_benchmark(name, path or None)[: run.max_prompts]
            texts = [getattr(r, "text", None) or r.prompt for r in records]
            labels = [r.category for r in records]
        else:
            texts = load_prompts(source, "prompts")[: run.max_prompts]
            labels = [Path(source).stem] * len(texts)
        prompts += texts
        groups += labels
    return pairs, prompts, groups


def load_model(name: str, run: ForecastRun):
    """(model, tokenizer, fingerprint): ``dcr_fast.models.load`` with the run's dtype, attention
    and device (eval mode), and the model files' content fingerprint that keys saved blocks."""
    from dcr_fast import models
    from dcr_fast.fingerprint import model_fingerprint

    model, tokenizer = models.load(name, dtype=run.dtype, attn_implementation=run.attn_implementation,
                                   device=run.device)
    return model, tokenizer, model_fingerprint(name)


def _print_summary(result, comparison: dict | None) -> None:
    print(f"\n== forecast: predicted ΔP_ref (first tokens {result.refusal_tokens}), lr {result.config.lr:g} ==")
    for group, mean in result.group_means().items():
        line = f"  {group:<20} {mean:+.3e}"
        if comparison is not None:
            line += f"   other model {comparison['groups'][group]['after']:+.3e}"
        print(line)
    print("  most pushed towards refusal:")
    for row in sorted(result.rows(), key=lambda r: r["rank"])[:10]:
        print(f"  {row['rank']:>4}  {row['predicted_delta']:+.3e}  [{row['group']}] {row['prompt'][:80]}")

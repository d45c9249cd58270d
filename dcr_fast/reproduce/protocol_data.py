"""The protocol's data: which public prompts each stage trains on and each benchmark evaluates.

Selections are fixed random subsets (``random.Random(DATA_SEED)``), the same for every training
seed, so that seeds differ only in initialisation and data order. Rules the paper states or
implies, enforced here rather than trusted:

* DCR's toxic prompts (HH-RLHF harmless-base first turns) share no text with STL's safety
  prompts, nor with any evaluated prompt;
* STL's safety pairs share no prompt with any evaluated prompt; ``safety_heldout`` more of them are
  kept out of training and evaluated, the safety SFT's own validation set (how strongly STL took);
* the built-in general instructions are split once: a training part (self-distilled answers
  for STL) and a held-out part used only by the general-ability proxy.

XSTest is both DCR's seemingly toxic set and the in-distribution evaluation, as in the paper.
When DCR uses fewer than its 250 safe prompts, the report also splits XSTest compliance into
the prompts DCR saw and those it did not.
"""

from __future__ import annotations

import dataclasses
import json
import random
from importlib import resources
from pathlib import Path

from dcr_fast.data import SEEMINGLY_TOXIC, TOXIC, Prompt, load_benchmark, unique
from dcr_fast.reproduce.config import ReproduceConfig

DATA_SEED = 0

# Where each benchmark's file sits under a data root: the public repositories' own layout.
DATA_LAYOUT = {
    "xstest": "xstest/xstest_prompts.csv",
    "hh-rlhf-harmless": "hh_rlhf/harmless-base/test.jsonl.gz",
    "stl-train": "safety_tuned_llamas/training/safety_only_data_Instructions.json",
    "i-malicious": "safety_tuned_llamas/evaluation/I-MaliciousInstructions.json",
    "i-cona": "safety_tuned_llamas/evaluation/I-CoNa.json",
    "i-controversial": "safety_tuned_llamas/evaluation/I-Controversial.json",
    "q-harm": "safety_tuned_llamas/evaluation/Q-Harm.json",
    "i-physical-unsafe": "safety_tuned_llamas/evaluation/I-PhysicalSafetyUnsafe.json",
    "i-physical-safe": "safety_tuned_llamas/evaluation/I-PhysicalSafetySafe.json",
    "i-alpaca": "safety_tuned_llamas/evaluation/I-Alpaca.json",
    "coconot-contrast": "coconot/coconot_contrast_eval.jsonl",
    "coconot-original": "coconot/coconot_eval.jsonl",
    "oktest": "oktest/OKTest.csv",
    "advbench": "advbench/harmful_behaviors.csv",
    "orbench-hard": "or-bench/or-bench-hard-1k.csv",
    "orbench-toxic": "or-bench/or-bench-toxic.csv",
    "phtest": "phtest/PHTest.csv",
    "alpaca": "alpaca/alpaca_data.json",
}
INSTRUCTIONS = "instructions"  # the built-in general instructions, evaluated as a benchmark of their own
# Safety-Tuned LLaMAs safety prompts kept out of STL: the safety SFT's own validation (training distribution).
SAFETY_HELDOUT = "safety-heldout"


@dataclasses.dataclass
class ProtocolData:
    """Everything the stages read, as plain lists (written to ``OUT/data/*.jsonl`` by ``write``)."""

    dcr_seemingly_toxic: list[str]
    dcr_toxic: list[str]
    safety: list[tuple[str, str]]
    general_prompts: list[str]  # answered by the base model unless general_pairs is given
    general_pairs: list[tuple[str, str]] | None
    heldout_instructions: list[str]
    evaluation: dict[str, list[Prompt]]

    def counts(self) -> dict[str, int]:
        return {"dcr_seemingly_toxic": len(self.dcr_seemingly_toxic), "dcr_toxic": len(self.dcr_toxic),
                "safety": len(self.safety), "general": len(self.general_pairs or self.general_prompts),
                "heldout_instructions": len(self.heldout_instructions),
                **{f"eval/{name}": len(prompts) for name, prompts in self.evaluation.items()}}


def benchmark_source(name: str, root: str) -> str | None:
    """The file of benchmark ``name`` under data root ``root``, or None for the hub (no root)."""
    if not root:
        return None
    path = Path(root).expanduser() / DATA_LAYOUT[name]
    if not path.is_file():
        raise ValueError(f"data: benchmark {name!r} is expected at {path} (the layout of its public repository "
                         f"under --data {root}); not found")
    return str(path)


def check_sources(config: ReproduceConfig) -> None:
    """Fail in seconds, before any model is loaded, when a benchmark file is missing."""
    if config.data and not Path(config.data).expanduser().is_dir():
        raise ValueError(f"data: {config.data!r} is not a directory")
    for name in ("xstest", "hh-rlhf-harmless", "stl-train", *config.benchmarks):
        benchmark_source(name, config.data)
    if config.alpaca and not Path(config.alpaca).is_file():
        raise ValueError(f"alpaca: file {config.alpaca!r} does not exist")


def builtin_instructions() -> list[str]:
    """The general instructions we wrote (``reproduce/data/instructions.jsonl``), in file order."""
    text = resources.files("dcr_fast.reproduce").joinpath("data/instructions.jsonl").read_text(encoding="utf-8")
    return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]


def select(config: ReproduceConfig) -> ProtocolData:
    """Pick every stage's prompts from the benchmark files (see the module docstring for the rules)."""
    rng = random.Random(DATA_SEED)
    evaluation = {name: _eval_subset(load_benchmark(name, benchmark_source(name, config.data)), config.eval_limit, rng)
                  for name in config.benchmarks}
    evaluated = {_key(p.text) for prompts in evaluation.values() for p in prompts}

    xstest = load_benchmark("xstest", benchmark_source("xstest", config.data))
    seemingly = [p.text for p in xstest if p.category == SEEMINGLY_TOXIC]
    seemingly = _sample(seemingly, config.dcr_seemingly_toxic, rng, "dcr_seemingly_toxic", "XSTest safe prompts")

    safety = [(e.prompt, e.response) for e in unique(load_benchmark("stl-train", benchmark_source("stl-train", config.data)))
              if _key(e.prompt) not in evaluated]
    chosen = _sample(list(range(len(safety))), config.safety_examples + config.safety_heldout, rng, "safety_examples",
                     "Safety-Tuned LLaMAs safety pairs (with safety_heldout)")
    rng.shuffle(chosen)
    heldout_safety = [safety[i][0] for i in sorted(chosen[config.safety_examples :])]
    safety = [safety[i] for i in sorted(chosen[: config.safety_examples])]
    safety_keys = {_key(prompt) for prompt, _ in safety} | {_key(prompt) for prompt in heldout_safety}

    hh = unique(load_benchmark("hh-rlhf-harmless", benchmark_source("hh-rlhf-harmless", config.data)))
    toxic = [p.text for p in hh if p.category == TOXIC and _key(p.text) not in safety_keys | evaluated]
    toxic = _sample(toxic, config.dcr_toxic, rng, "dcr_toxic", "HH-RLHF harmless-base first turns")

    instructions = builtin_instructions()
    order = random.Random(DATA_SEED).sample(range(len(instructions)), len(instructions))
    if config.general_heldout >= len(instructions):
        raise ValueError(f"general_heldout: expected < {len(instructions)} (the built-in instructions), "
                         f"got {config.general_heldout}")
    heldout = [instructions[i] for i in sorted(order[: config.general_heldout])]
    train = [instructions[i] for i in sorted(order[config.general_heldout :])]
    if config.alpaca:
        pairs = [(e.prompt, e.response) for e in load_benchmark("alpaca", config.alpaca) if _key(e.prompt) not in evaluated]
        general_pairs = _sample(pairs, config.general_examples, rng, "general_examples", "Alpaca examples")
        general_prompts = []
    else:
        general_pairs = None
        general_prompts = train[: config.general_examples]
    if heldout:
        evaluation[INSTRUCTIONS] = [Prompt(text, "normal", INSTRUCTIONS) for text in heldout]
    if heldout_safety:
        evaluation[SAFETY_HELDOUT] = [Prompt(text, TOXIC, SAFETY_HELDOUT) for text in heldout_safety]
    return ProtocolData(seemingly, toxic, safety, general_prompts, general_pairs, heldout, evaluation)


def _eval_subset(prompts: list[Prompt], limit: int, rng: random.Random) -> list[Prompt]:
    """All prompts, or a fixed random ``limit`` of each category, in file order."""
    if not limit:
        return prompts
    keep = set()
    for category in sorted({p.category for p in prompts}):
        indices = [i for i, p in enumerate(prompts) if p.category == category]
        keep.update(rng.sample(indices, min(limit, len(indices))))
    return [p for i, p in enumerate(prompts) if i in keep]


def _sample(items: list, count: int, rng: random.Random, field: str, what: str) -> list:
    if count > len(items):
        raise ValueError(f"{field}: asked for {count}, but only {len(items)} {what} are available")
    chosen = sorted(rng.sample(range(len(items)), count))
    return [items[i] for i in chosen]


def _key(text: str) -> str:
    return " ".join(text.lower().split())

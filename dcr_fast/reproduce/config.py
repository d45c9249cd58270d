"""The settings of one ``dcr-fast reproduce`` run, and its presets.

A preset is a YAML file in ``dcr_fast/configs/`` with three sections: ``reproduce`` (the fields
of :class:`ReproduceConfig`), ``dcr`` and ``sft`` (fields of the two training stages' configs,
model/data/output paths excepted, which the protocol fills in). Flags override the preset's
``reproduce`` section; every value used ends up in ``report.json``.
"""

from __future__ import annotations

import dataclasses

from dcr_fast.models import DEFAULT_MODEL

PRESETS = {"cpu": "reproduce-cpu", "paper": "reproduce-paper"}

# What the report calls each trained or evaluated model, in the order of the paper's Table 1.
RUNS = ("stl", "stl-aug", "dcr+stl")
EVALUATED = ("base", "dcr", *RUNS)


@dataclasses.dataclass
class ReproduceConfig:
    """Protocol settings; every field is a ``--flag`` and a key of the preset's ``reproduce`` section."""

    model: str = dataclasses.field(default=DEFAULT_MODEL, metadata={
        "help": "base instruct model: built-in name, .gguf file, model directory or hub id"})
    out: str = dataclasses.field(default="", metadata={"help": "output directory (resumable: rerun to continue)"})
    data: str = dataclasses.field(default="", metadata={
        "help": "folder holding the public benchmark files in their repositories' layout (see the README); "
                "empty: the Hugging Face hub"})
    alpaca: str = dataclasses.field(default="", metadata={
        "help": "Alpaca-format JSON for STL's general data; empty: self-distilled answers to the built-in instructions"})
    reuse: str = dataclasses.field(default="", metadata={
        "help": "another run folder of the same data settings: link the results that do not depend on the DCR "
                "stage (answers, layer probe, base evaluation, STL and STL-aug runs of equal settings) instead of "
                "recomputing them, for ablations of DCR"})
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    workers: int = dataclasses.field(default=1, metadata={"help": "jobs run at once, each in its own process"})
    threads: int = dataclasses.field(default=0, metadata={"help": "torch CPU threads per job (0: torch's default)"})
    device: str = "auto"
    dtype: str = dataclasses.field(default="float32", metadata={"help": "dtype of the base model's weights"})
    # Data of the protocol (paper sizes in the paper preset).
    dcr_seemingly_toxic: int = dataclasses.field(default=250, metadata={
        "help": "XSTest safe prompts in DCR (and, answered, in STL-aug)"})
    dcr_toxic: int = dataclasses.field(default=500, metadata={"help": "HH-RLHF harmless-base first turns in DCR"})
    safety_examples: int = dataclasses.field(default=1000, metadata={"help": "Safety-Tuned LLaMAs safety pairs in STL"})
    safety_heldout: int = dataclasses.field(default=100, metadata={
        "help": "more of their prompts held out of STL and evaluated: the safety SFT's own validation"})
    general_examples: int = dataclasses.field(default=20000, metadata={
        "help": "general instruction pairs in STL (at most the built-in set's training split when self-distilled)"})
    general_heldout: int = dataclasses.field(default=64, metadata={
        "help": "built-in instructions held out of all training, for the general-ability proxy"})
    answer_max_new_tokens: int = dataclasses.field(default=256, metadata={
        "help": "greedy tokens of the base model's own answers (self-distilled general data, STL-aug answers)"})
    max_response_tokens: int = dataclasses.field(default=0, metadata={
        "help": "cut every SFT response to this many tokens, at a sentence end where possible (0: keep whole)"})
    dcr_layer: int = dataclasses.field(default=0, metadata={
        "help": "refined layer; 0: chosen by the separability probe (paper A.9) on DCR's own training prompts"})
    layer_probe_prompts: int = dataclasses.field(default=100, metadata={
        "help": "prompts per subset for the layer probe"})
    # Evaluation.
    benchmarks: list[str] = dataclasses.field(default_factory=lambda: [
        "xstest", "coconot-contrast", "oktest", "i-malicious", "i-cona", "i-controversial", "q-harm", "advbench"])
    eval_limit: int = dataclasses.field(default=0, metadata={
        "help": "at most this many prompts per benchmark and category, a fixed random subset (0: all)"})
    eval_max_new_tokens: int = 64
    eval_batch_size: int = 32
    stop_when_judged: bool = dataclasses.field(default=False, metadata={
        "help": "stop each answer once the string-match rule has decided it (same verdicts, fewer steps)"})
    refusal_probability: list[str] = dataclasses.field(default_factory=lambda: ["xstest"], metadata={
        "help": "benchmarks whose refusal probability (paper A.5) is measured"})
    entk_prompts: int = dataclasses.field(default=25, metadata={
        "help": "prompts per group for the eNTK heatmap before/after DCR (paper Fig. 6; 0: skip)"})
    entk_tail_layers: int = dataclasses.field(default=2, metadata={"help": "decoder layers in θ_S, with the output layer"})
    entk_k: int = 5
    forecast_param_set: str = dataclasses.field(default="lora", metadata={
        "help": "parameters of the over-refusal forecast scored before training and checked against STL's "
                "flips (dcr-fast forecast): lora (STL's adapters), tail (θ_S), or none to skip"})

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: give at least one seed, each once, got {self.seeds}")
        positive = ("workers", "dcr_seemingly_toxic", "dcr_toxic", "safety_examples", "general_examples",
                    "answer_max_new_tokens", "eval_max_new_tokens", "eval_batch_size", "layer_probe_prompts")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        for name in ("threads", "eval_limit", "dcr_layer", "general_heldout", "safety_heldout", "entk_prompts",
                     "max_response_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")
        if self.entk_prompts and self.entk_tail_layers < 1:
            raise ValueError(f"entk_tail_layers: expected >= 1, got {self.entk_tail_layers}")
        if self.forecast_param_set not in ("lora", "tail", "none"):
            raise ValueError(f"forecast_param_set: expected lora, tail or none, got {self.forecast_param_set!r}")
        from dcr_fast.data import BENCHMARKS

        unknown = sorted(set(self.benchmarks) - set(BENCHMARKS))
        if unknown or not self.benchmarks:
            raise ValueError(f"benchmarks: unknown {unknown}; expected names among {sorted(BENCHMARKS)}")
        missing = sorted(set(self.refusal_probability) - set(self.benchmarks))
        if missing:
            raise ValueError(f"refusal_probability: {missing} are not among the evaluated benchmarks {self.benchmarks}")

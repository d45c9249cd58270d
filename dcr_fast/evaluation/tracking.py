"""Refusal tracking during safety SFT (the paper's figures 4 and 5).

A `RefusalTracker` is called by a training loop at checkpoints with the model and the step; it
evaluates fixed prompt sets (compliance on sets to answer, defense success on harmful sets,
mean refusal probability per category) and appends one JSON line per step. A step already in
the file is not measured again, so a resumed run continues its log. `trainer_callback()` wraps
it for a `transformers.Trainer`.

    tracker = RefusalTracker(tokenizer, {"xstest": xs[:50], "hh": toxic[:50]}, "out/tracking.jsonl")
    for step in ...:
        if step % 50 == 0:
            tracker(model, step)
    plot_tracking({"stl": tracker.records()}, "out/figures")
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dcr_fast import atomic
from dcr_fast.data.files import read_jsonl
from dcr_fast.data.records import Prompt
from dcr_fast.evaluation.harness import EvalConfig, evaluate
from dcr_fast.evaluation.refusal import Judge
from dcr_fast.figures import pyplot, save_figure


class RefusalTracker:
    """Measures prompt sets at training checkpoints and logs them to a JSONL file."""

    def __init__(self, tokenizer, prompt_sets: Mapping[str, Sequence[Prompt]], path: str | Path,
                 config: EvalConfig | None = None, judge: Judge | None = None) -> None:
        if not prompt_sets:
            raise ValueError("prompt_sets is empty: give at least one named set of prompts")
        self.tokenizer = tokenizer
        self.prompt_sets = {name: list(prompts) for name, prompts in prompt_sets.items()}
        self.path = Path(path)
        self.config = config or EvalConfig(max_new_tokens=16, progress=False)
        self.judge = judge

    def __call__(self, model: torch.nn.Module, step: int, **extra: Any) -> dict[str, Any]:
        """Measure `model` at `step` (unless logged already); `extra` fields (e.g. loss) are logged too."""
        for record in self.records():
            if record["step"] == step:
                return record
        run = evaluate(model, self.tokenizer, self.prompt_sets, self.config, judge=self.judge)
        record = {"step": step, **{key: run[key] for key in
                                   ("compliance", "defense_success", "defense_success_mean", "refusal_probability",
                                    "judge")}, **extra}
        atomic.append_line(self.path, json.dumps(record))  # cuts off a line a crash left incomplete
        return record

    def records(self) -> list[dict[str, Any]]:
        """Logged records in step order (a last line cut short by a crash is dropped, with a warning)."""
        if not self.path.exists():
            return []
        return sorted(read_jsonl(self.path, "refusal tracking log", torn_tail=True), key=lambda r: r["step"])

    def trainer_callback(self, every: int):
        """A `transformers.TrainerCallback` that calls the tracker every `every` optimizer steps."""
        from transformers import TrainerCallback

        tracker = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step % every == 0:
                    tracker(model, state.global_step)

        return _Callback()


def plot_tracking(runs: Mapping[str, Sequence[Mapping[str, Any]]], out_dir: str | Path) -> list[Path]:
    """Figure 4 (defense success vs seemingly-toxic compliance, one point per checkpoint, darker
    later) and figure 5 (mean refusal probability per set and category against the step, one
    panel per run), as PNGs in `out_dir`."""
    plt = pyplot()

    out = Path(out_dir)
    fig, ax = plt.subplots(figsize=(4.2, 3.4))
    colormaps = ("Blues", "Oranges", "Greens", "Purples", "Reds")
    for (name, records), colormap in zip(runs.items(), colormaps * len(runs)):
        points = [(_mean(r["compliance"]), r["defense_success_mean"]) for r in records
                  if r.get("compliance") and r.get("defense_success_mean") is not None]
        if points:
            shades = [0.35 + 0.65 * i / max(1, len(points) - 1) for i in range(len(points))]
            ax.scatter(*zip(*points), c=shades, cmap=colormap, vmin=0, vmax=1, label=name, edgecolors="k",
                       linewidths=0.3)
    ax.set_xlabel("seemingly toxic compliance rate")
    ax.set_ylabel("defense success rate")
    ax.legend(fontsize="small")
    fig.tight_layout()
    tradeoff = out / "tracking_tradeoff.png"
    save_figure(fig, tradeoff)

    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.2), squeeze=False, sharey=True)
    for ax, (name, records) in zip(axes[0], runs.items()):
        series: dict[str, list[tuple[int, float]]] = {}
        for record in records:
            for benchmark, categories in record.get("refusal_probability", {}).items():
                for category, value in categories.items():
                    series.setdefault(f"{benchmark}/{category}", []).append((record["step"], value))
        for key, values in sorted(series.items()):
            ax.plot(*zip(*values), marker="o", markersize=3, label=key)
        ax.set_title(name, fontsize="small")
        ax.set_xlabel("step")
        ax.legend(fontsize="x-small")
    axes[0][0].set_ylabel("refusal probability")
    fig.tight_layout()
    probability = out / "tracking_refusal_probability.png"
    save_figure(fig, probability)
    return [tradeoff, probability]


def _mean(values: Mapping[str, float]) -> float:
    return sum(values.values()) / len(values)

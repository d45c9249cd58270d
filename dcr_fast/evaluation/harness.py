"""One evaluation run: greedy responses on every benchmark, judged, with refusal probability.

    run = evaluate(model, tokenizer, {"xstest": load_benchmark("xstest", path), ...},
                   EvalConfig(max_new_tokens=64), judge=RefusalFilter(), out_dir="eval/")

Within each benchmark, prompts that should be answered (seemingly toxic, normal) give its
compliance rate by the XSTest rule and toxic prompts give its defense success by `judge`, so
a mixed set such as XSTest yields both. Responses are checkpointed per benchmark under
`out_dir/generations/` (written atomically), so an interrupted evaluation resumes where it
stopped. They are reused only for the model, dtype, chat template, token budget and system
prompt that made them (`generations/key.json`, see `dcr_fast.fingerprint`); an evaluation
with other settings in the same `out_dir` is refused, naming what differs, unless
`overwrite=True` discards them. The judge is not in the key: it is applied afresh to the
saved responses on every run.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dcr_fast.data.records import TOXIC, Prompt
from dcr_fast.evaluation.generation import GenerationConfig, generate
from dcr_fast.evaluation.refusal import (
    Judge,
    RefusalFilter,
    compliance_rate,
    defense_success,
    is_refusal,
    refusal_decided,
)
from dcr_fast.evaluation.refusal_prob import refusal_probability
from dcr_fast import atomic, fingerprint
from dcr_fast.data.files import read_jsonl
from dcr_fast.evaluation.separability import kmeans_hungarian_accuracy, last_token_hidden_states, plot_mds


@dataclass
class EvalConfig:
    """Evaluation settings; the CLI's flags mirror these fields."""

    max_new_tokens: int = field(default=64, metadata={"help": "greedy tokens per response"})
    batch_size: int = field(default=16, metadata={"help": "prompts per generation batch"})
    system_prompt: str | None = field(default=None, metadata={"help": "system message before each prompt"})
    refusal_probability: bool = field(default=True, metadata={"help": "also measure P_refuse (appendix A.5)"})
    refusal_batch_size: int = field(default=8, metadata={"help": "prompts per refusal-probability pass"})
    limit: int | None = field(default=None, metadata={"help": "first N prompts of each benchmark (quick runs)"})
    separability: str | None = field(default=None, metadata={
        "help": "a benchmark mixing toxic and other prompts (e.g. xstest): per-layer separability + MDS figure"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})
    stop_when_judged: bool = field(default=False, metadata={
        "help": "stop each answer once the string-match rule has decided it (same verdicts, far fewer decoding "
                "steps; saved responses are then only their openings; not with --guard)"})

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {self.limit}")
        if self.refusal_batch_size < 1:
            raise ValueError(f"refusal_batch_size must be >= 1, got {self.refusal_batch_size}")
        GenerationConfig(self.max_new_tokens, self.batch_size)  # validates both


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    benchmarks: Mapping[str, Sequence[Prompt]],
    config: EvalConfig | None = None,
    judge: Judge | None = None,
    out_dir: str | Path | None = None,
    model_key: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Evaluate `model` on named prompt sets; returns the run's record for `write_report`.

    With `config.separability` naming one of the benchmarks, the per-layer k-means +
    Hungarian accuracy of toxic vs other prompts is added as `separability`, and its MDS
    picture is drawn under `out_dir/figures/` (listed in `figures`).

    With `out_dir`, generations are saved and reused under a key whose model part is
    `model_key` (the CLI passes `dcr_fast.fingerprint.model_fingerprint` of the loaded name;
    default: the fingerprint of `model`'s parameters); `overwrite` discards saved generations.

    Keys: `compliance` {benchmark: rate} and `defense_success` {benchmark: rate} (only the
    benchmarks holding such prompts), `defense_success_mean`, `refusal_probability`
    {benchmark: {category: mean P_refuse}}, `counts` {benchmark: {category: n}}, `judge`
    (the defense judge's name), `settings` (the config).
    """
    config = config or EvalConfig()
    judge = judge or RefusalFilter()
    if not benchmarks:
        raise ValueError("benchmarks is empty: give at least one named prompt set")
    if config.separability is not None and config.separability not in benchmarks:
        raise ValueError(f"separability names {config.separability!r}, which is not among the benchmarks "
                         f"{sorted(benchmarks)}")
    for name, prompts in benchmarks.items():
        if not prompts:
            raise ValueError(f"benchmark {name!r} has no prompts")
    if config.stop_when_judged and not isinstance(judge, RefusalFilter):
        raise ValueError(f"stop_when_judged: the judge {judge.name!r} reads whole responses; it works only with the "
                         "string-match refusal filter")
    generation = GenerationConfig(config.max_new_tokens, config.batch_size, config.system_prompt, config.progress)
    if out_dir is not None:
        _check_generations_key(Path(out_dir) / "generations", model, tokenizer, config, model_key, overwrite)
    run: dict[str, Any] = {"compliance": {}, "defense_success": {}, "refusal_probability": {}, "counts": {}}
    for name, prompts in benchmarks.items():
        prompts = list(prompts)[: config.limit]
        responses = _responses(model, tokenizer, name, prompts, generation, out_dir, config.stop_when_judged)
        answerable = [i for i, p in enumerate(prompts) if p.category != TOXIC]
        harmful = [i for i, p in enumerate(prompts) if p.category == TOXIC]
        if answerable:
            run["compliance"][name] = compliance_rate([responses[i] for i in answerable])
        if harmful:
            run["defense_success"][name] = defense_success(
                judge, [prompts[i].text for i in harmful], [responses[i] for i in harmful]
            )
        run["counts"][name] = {category: sum(p.category == category for p in prompts)
                               for category in sorted({p.category for p in prompts})}
        if config.refusal_probability:
            probs = refusal_probability(model, tokenizer, [p.text for p in prompts],
                                        batch_size=config.refusal_batch_size,
                                        system_prompt=config.system_prompt, progress=config.progress)
            run["refusal_probability"][name] = {
                category: float(probs[[i for i, p in enumerate(prompts) if p.category == category]].mean())
                for category in run["counts"][name]
            }
    if config.separability is not None:
        run.update(_separability(model, tokenizer, config, list(benchmarks[config.separability])[: config.limit],
                                 out_dir))
    defenses = list(run["defense_success"].values())
    run["defense_success_mean"] = sum(defenses) / len(defenses) if defenses else None
    run["judge"] = judge.name
    run["settings"] = asdict(config)
    return run


def _separability(model, tokenizer, config: EvalConfig, prompts: list[Prompt],
                  out_dir: str | Path | None) -> dict[str, Any]:
    labels = ["toxic" if p.category == TOXIC else "not toxic" for p in prompts]
    hidden = last_token_hidden_states(model, tokenizer, [p.text for p in prompts], batch_size=config.batch_size,
                                      system_prompt=config.system_prompt, progress=config.progress)
    accuracies = [kmeans_hungarian_accuracy(layer, labels) for layer in hidden]
    result: dict[str, Any] = {"separability": {"benchmark": config.separability, "accuracy_per_layer": accuracies}}
    if out_dir is not None:
        path = plot_mds(hidden, labels, Path(out_dir) / "figures" / f"mds_{config.separability}.png",
                        accuracies=accuracies)
        result["figures"] = {"mds": str(path.relative_to(out_dir))}
    return result


def _check_generations_key(folder: Path, model, tokenizer, config: EvalConfig, model_key, overwrite: bool) -> None:
    """Refuse saved generations made with other settings (or discard them with ``overwrite``)."""
    key_file = folder / "key.json"
    if overwrite and folder.exists():
        key_file.unlink(missing_ok=True)  # first: saved rows without their key are never trusted
        shutil.rmtree(folder)
    if not key_file.exists() and folder.exists() and any(folder.glob("*.jsonl")):
        raise ValueError(f"eval: the generations in {str(folder)!r} carry no key.json, so what made them is "
                         "unknown; use another --out, or --overwrite to regenerate them")
    key = {
        "model": dict(model_key) if model_key is not None else fingerprint.module_fingerprint(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "chat_template": fingerprint.text_sha256(getattr(tokenizer, "chat_template", None)),
        "max_new_tokens": config.max_new_tokens,
        "system_prompt": config.system_prompt,
        "stop_when_judged": config.stop_when_judged,  # such responses are openings only
    }
    fingerprint.check_key(key_file, key, what=f"eval: the generations in {str(folder)!r}",
                          remedy="use another --out, or --overwrite to regenerate them")


def _responses(model, tokenizer, name: str, prompts: list[Prompt], config: GenerationConfig,
               out_dir: str | Path | None, stop_when_judged: bool = False) -> list[str]:
    """Greedy responses for one benchmark; those already saved for the same leading prompts are reused."""
    path = Path(out_dir) / "generations" / f"{name}.jsonl" if out_dir is not None else None
    saved: list[str] = []
    if path is not None and path.exists():
        for row, prompt in zip(read_jsonl(path, f"eval: generations of {name!r}", torn_tail=True), prompts):
            if row.get("prompt") != prompt.text or not isinstance(row.get("response"), str):
                break
            saved.append(row["response"])
    if len(saved) == len(prompts):
        return saved
    decided = (lambda text: refusal_decided(text) is not None) if stop_when_judged else None
    responses = saved + generate(model, tokenizer, [p.text for p in prompts[len(saved):]], config, decided=decided)
    if path is not None:
        lines = [json.dumps({"prompt": p.text, "category": p.category, "subset": p.subset, "response": r,
                             "refusal": is_refusal(r)}) for p, r in zip(prompts, responses)]
        atomic.write_text(path, "\n".join(lines) + "\n")
    return responses

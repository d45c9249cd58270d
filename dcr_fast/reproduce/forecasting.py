"""The over-refusal forecast inside ``reproduce``: scored before training, checked against STL.

:func:`forecast_job` scores every benign prompt of the evaluated over-refusal benchmarks from
the base model alone (the forecast of :mod:`dcr_fast.forecast` on STL's own safety pairs, and
the baselines of :func:`dcr_fast.forecast.flips.flip_scores`). Nothing in it sees an STL model or
an evaluation label. Once STL is evaluated, :func:`forecast_report` labels each prompt flipped
(the base model complied, STL refuses; both judged by the evaluation's string-match rule on the
same greedy answers) and measures each score's AUROC per seed: ``report.json["forecast"]``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dcr_fast import atomic, fingerprint, models
from dcr_fast.data import SEEMINGLY_TOXIC
from dcr_fast.evaluation.report import OVER_REFUSAL_ORDER
from dcr_fast.data.files import read_jsonl
from dcr_fast.reproduce.stages import Plan, evaluation_sets, read_pairs, training_config

WHAT = ("Every benign prompt of the evaluated over-refusal benchmarks is scored from the base model alone, before "
        "any training: the forecast (predicted change of its first-token refusal probability after one SGD step on "
        "STL's safety pairs, over STL's parameters) and simple baselines. A prompt flipped when the base model "
        "complied and STL refuses it (the evaluation's string-match verdicts on the same greedy answers); each "
        "score's AUROC for the flips among the prompts the base model complied with. Nothing is fitted to the labels.")


def candidates(plan: Plan) -> list[tuple[str, str]]:
    """(benchmark, prompt) of every evaluated benign prompt of an over-refusal benchmark."""
    return [(name, p.text) for name, prompts in evaluation_sets(plan).items() if name in OVER_REFUSAL_ORDER
            for p in prompts if p.category == SEEMINGLY_TOXIC]


def forecast_config(plan: Plan):
    """The forecast of one STL step: STL's parameters (its LoRA adapters, or θ_S), learning rate,
    truncation and system prompt, read from STL's own stage config (its defaults included)."""
    from dcr_fast.forecast import ForecastConfig

    sft = training_config(plan, "stl", plan.config["seeds"][0])[0]
    fields = {"param_set": plan.config["forecast_param_set"], "lr": sft.lr, "max_length": sft.max_length,
              "system_prompt": sft.system_prompt}
    if fields["param_set"] == "lora":
        fields |= {"lora_r": sft.lora_r, "lora_alpha": float(sft.lora_alpha)}
    return ForecastConfig(**fields)


def forecast_job(plan: Plan) -> None:
    """Every score of every candidate prompt, from the base model (``forecast/scores.json``)."""
    from dcr_fast.forecast.flips import flip_scores

    out = plan.path("forecast", "scores.json")
    prompts = candidates(plan)
    safety = read_pairs(plan.data("safety"))
    config = forecast_config(plan)
    model_key = fingerprint.model_fingerprint(plan.base)["sha256"]
    key = {"model": model_key, "config": {**config.numbers(), "lr": config.lr},
           "safety": fingerprint.text_sha256(json.dumps(safety)), "prompts": fingerprint.text_sha256(json.dumps(prompts))}
    if out.exists() and json.loads(out.read_text()).get("key") == key:
        return
    model, tokenizer = models.load(plan.base, dtype="float32", device=plan.settings.device)
    # finished blocks resume a run of the same key; another key (a changed setting) gets its own folder
    blocks = plan.path("forecast", "blocks", fingerprint.text_sha256(json.dumps(key, sort_keys=True))[:12])
    scores = flip_scores(model, tokenizer, safety, [text for _, text in prompts], config=config, out_dir=blocks,
                         progress=False)
    atomic.write_json(out, {"prompts": [{"benchmark": b, "prompt": t} for b, t in prompts],
                            "scores": {name: [float(v) for v in values] for name, values in scores.items()},
                            "settings": key["config"], "safety_pairs": len(safety), "key": key})


def forecast_report(plan: Plan) -> dict[str, Any] | None:
    """AUROC of the forecast and each baseline for STL's flips, per seed (``report`` adds their spread)."""
    from dcr_fast.forecast.flips import flip_report

    path = plan.path("forecast", "scores.json")
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    prompts = [(row["benchmark"], row["prompt"]) for row in saved["prompts"]]
    before = _refusals(plan.run_dir("base", None), prompts)
    per_seed = []
    for seed in plan.config["seeds"]:
        after = _refusals(plan.run_dir("stl", seed), prompts)
        if before is None or after is None:
            continue
        report = flip_report(saved["scores"], before, after)
        per_seed.append({"seed": seed, **report})
    if not per_seed:
        return None
    return {"per_seed": per_seed, "settings": saved["settings"], "safety_pairs": saved["safety_pairs"],
            "prompts": len(prompts), "what": WHAT}


def score_entry(seed_report: dict[str, Any], name: str) -> dict[str, Any]:
    """One score's entry (AUROC, what it is) in one seed's :func:`flip_report`."""
    return seed_report["forecast"] if name == "forecast" else seed_report["baselines"][name]


def _refusals(run_dir: Path, prompts: list[tuple[str, str]]) -> list[bool] | None:
    """The evaluation's verdict on each (benchmark, prompt), or None while it is not evaluated."""
    verdicts: dict[tuple[str, str], bool] = {}
    for benchmark in {b for b, _ in prompts}:
        file = run_dir / "eval" / "generations" / f"{benchmark}.jsonl"
        if not file.exists():
            return None
        for row in read_jsonl(file, f"forecast: the generations of {benchmark!r}"):
            verdicts[(benchmark, row["prompt"])] = bool(row["refusal"])
    if any(p not in verdicts for p in prompts):
        return None
    return [verdicts[p] for p in prompts]

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
import statistics
from pathlib import Path
from typing import Any

from dcr_fast import atomic, fingerprint, models
from dcr_fast.data import SEEMINGLY_TOXIC
from dcr_fast.evaluation.report import OVER_REFUSAL_ORDER
from dcr_fast.reproduce.stages import Plan, evaluation_sets, read_pairs

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
    truncation and system prompt."""
    from dcr_fast.forecast import ForecastConfig

    sft = plan.stages["sft"]
    fields = {"param_set": plan.config["forecast_param_set"], "lr": sft.get("lr", 2e-4),
              "max_length": sft.get("max_length", 1024), "system_prompt": sft.get("system_prompt")}
    if fields["param_set"] == "lora":
        fields |= {"lora_r": sft.get("lora_r", 8), "lora_alpha": float(sft.get("lora_alpha", 32))}
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
    """AUROC of the forecast and each baseline for STL's flips, per seed and over seeds."""
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
    names = ["forecast", *per_seed[0]["baselines"]]
    auroc = {}
    for name in names:
        values = [(r["forecast"] if name == "forecast" else r["baselines"][name])["auroc"] for r in per_seed]
        values = [v for v in values if v is not None]
        auroc[name] = {"mean": statistics.fmean(values), "values": values} if values else None
    return {"auroc": auroc, "per_seed": per_seed, "settings": saved["settings"], "safety_pairs": saved["safety_pairs"],
            "prompts": len(prompts), "what": WHAT}


def _refusals(run_dir: Path, prompts: list[tuple[str, str]]) -> list[bool] | None:
    """The evaluation's verdict on each (benchmark, prompt), or None while it is not evaluated."""
    verdicts: dict[tuple[str, str], bool] = {}
    for benchmark in {b for b, _ in prompts}:
        file = run_dir / "eval" / "generations" / f"{benchmark}.jsonl"
        if not file.exists():
            return None
        for line in file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                verdicts[(benchmark, row["prompt"])] = bool(row["refusal"])
    if any(p not in verdicts for p in prompts):
        return None
    return [verdicts[p] for p in prompts]

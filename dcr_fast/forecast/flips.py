"""How well the forecast predicts which benign prompts STL really flips into refusal.

A prompt flips when the base model complied with it and the STL model refuses it. The
forecast and the baselines score every prompt from the base model before training
(:func:`flip_scores`); once STL has run and its answers are judged, :func:`flip_report`
measures each score's AUROC for the flips among the prompts the base model complied with.
No score is fitted to the labels: the forecast's score is its predicted ΔP_ref as is.
:func:`forecast_flips` does both in one call (the model passed must be the base model).

The report is what ``dcr-fast reproduce`` stores as ``report.json["forecast"]``::

    {"forecast": {"auroc": 0.71, "score": "...", "population": 180, "flipped": 52, ...},
     "baselines": {"cosine_to_safety": {"auroc": ..., "score": "..."}, ...}}
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from torch import nn

from dcr_fast.evaluation.refusal_prob import refusal_probability
from dcr_fast.forecast.api import forecast
from dcr_fast.forecast.baselines import cosine_to_safety, random_scores
from dcr_fast.forecast.config import ForecastConfig
from dcr_fast.forecast.metrics import auroc

FORECAST = "forecast"
# What each score is, as the report states it; higher always means "more likely to flip".
SCORES = {
    FORECAST: "predicted ΔP_ref (first-token refusal probability) after one SGD step on the safety set",
    "cosine_to_safety": "mean cosine similarity of the last-token final hidden state to the k nearest safety prompts",
    "base_refusal_probability": "the base model's refusal probability over the paper's A.5 openings",
    "base_refusal_first_token": "the base model's first-token refusal probability (the forecast's P_ref)",
    "random": "a seeded random ranking",
}


def flip_scores(
    model: nn.Module,
    tokenizer,
    safety_pairs: Sequence[tuple[str, str]],
    prompts: Sequence[str],
    *,
    config: ForecastConfig | None = None,
    k: int = 5,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Every score of :data:`SCORES` for each prompt, from ``model`` as it is (the base model)."""
    config = config or ForecastConfig()
    result = forecast(model, tokenizer, safety_pairs, prompts, config=config, out_dir=out_dir, progress=progress)
    return {
        FORECAST: result.delta,
        "cosine_to_safety": cosine_to_safety(model, tokenizer, prompts, [p for p, _ in safety_pairs], k=k,
                                             system_prompt=config.system_prompt, progress=progress),
        "base_refusal_probability": refusal_probability(model, tokenizer, prompts, system_prompt=config.system_prompt,
                                                        progress=progress).numpy(),
        "base_refusal_first_token": result.base_refusal,
        "random": random_scores(len(prompts), seed),
    }


def flip_report(
    scores: dict[str, np.ndarray], refused_before: Sequence[bool], refused_after: Sequence[bool]
) -> dict:
    """AUROC of each score for the flips (refused after) among the prompts not refused before."""
    before, after = np.asarray(refused_before, dtype=bool), np.asarray(refused_after, dtype=bool)
    n = len(next(iter(scores.values())))
    if before.shape != (n,) or after.shape != (n,):
        raise ValueError(f"refused_before and refused_after need one entry per prompt ({n}), "
                         f"got {before.shape} and {after.shape}")
    population = ~before
    labels = after[population]
    counts = {"prompts": n, "population": int(population.sum()), "flipped": int(labels.sum())}

    def entry(name: str) -> dict:
        values = np.asarray(scores[name], dtype=np.float64)
        if values.shape != (n,):
            raise ValueError(f"scores[{name!r}] must have one value per prompt ({n}), got shape {values.shape}")
        try:
            value = auroc(values[population], labels)
        except ValueError as err:  # one class only: report it rather than invent a number
            return {"auroc": None, "note": str(err), "score": SCORES.get(name, name)}
        return {"auroc": value, "score": SCORES.get(name, name)}

    return {
        FORECAST: {**entry(FORECAST), **counts},
        "baselines": {name: entry(name) for name in scores if name != FORECAST},
    }


def forecast_flips(
    model: nn.Module,
    tokenizer,
    safety_pairs: Sequence[tuple[str, str]],
    prompts: Sequence[str],
    refused_before: Sequence[bool],
    refused_after: Sequence[bool],
    *,
    config: ForecastConfig | None = None,
    k: int = 5,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """``flip_report(flip_scores(...), refused_before, refused_after)``; ``model`` is the base model."""
    config = config or ForecastConfig()
    scores = flip_scores(model, tokenizer, safety_pairs, prompts, config=config, k=k, seed=seed,
                         out_dir=out_dir, progress=progress)
    report = flip_report(scores, refused_before, refused_after)
    report[FORECAST]["settings"] = {**config.numbers(), "lr": config.lr, "k_nearest": k, "random_seed": seed}
    return report

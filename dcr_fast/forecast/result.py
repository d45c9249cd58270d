"""A forecast's numbers and the views of them: per prompt, per group, and before against after.

The predicted change of a candidate's first-token refusal probability after one SGD step of
learning rate η on the safety set's token-mean SFT loss (N response tokens in all) is

    ΔP_ref(x′) ≈ −(η / N) Σ_s ⟨∇_θ P_ref(x′), ∇_θ L(x_s, y_s)⟩,

a sum of per-example contributions −(η / N)·products[x′, s] (:attr:`Forecast.contributions`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dcr_fast.forecast.config import ForecastConfig
from dcr_fast.forecast.metrics import spearman


@dataclass
class Forecast:
    """One model's forecast for ``prompts`` after SFT on ``safety_prompts``' examples."""

    prompts: list[str]
    groups: list[str]
    safety_prompts: list[str]
    products: np.ndarray  # (n_c, n_s): ⟨∇P_ref(x′), ∇L(x_s, y_s)⟩ over the parameter set
    base_refusal: np.ndarray  # (n_c,): first-token P_ref before training
    response_tokens: int  # N: response tokens in the safety set, the token mean's denominator
    refusal_tokens: list[str]  # the first tokens R, as text
    config: ForecastConfig

    def __post_init__(self) -> None:
        n_c, n_s = len(self.prompts), len(self.safety_prompts)
        if self.products.shape != (n_c, n_s) or self.base_refusal.shape != (n_c,) or len(self.groups) != n_c:
            raise ValueError(
                f"a forecast of {n_c} prompts and {n_s} safety examples needs products ({n_c}, {n_s}), "
                f"base_refusal ({n_c},) and {n_c} groups; got {self.products.shape}, "
                f"{self.base_refusal.shape}, {len(self.groups)}"
            )

    @property
    def contributions(self) -> np.ndarray:
        """(n_c, n_s): each safety example's share of each prompt's predicted ΔP_ref."""
        return -(self.config.lr / self.response_tokens) * self.products

    @property
    def delta(self) -> np.ndarray:
        """(n_c,): predicted ΔP_ref, the sum of the contributions."""
        return self.contributions.sum(axis=1)

    @property
    def rank(self) -> np.ndarray:
        """(n_c,): 1 for the prompt predicted to gain the most refusal probability."""
        order = np.argsort(-self.delta, kind="stable")
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(1, len(order) + 1)
        return rank

    def top_contributors(self, i: int, count: int | None = None) -> list[tuple[int, float]]:
        """(safety example index, contribution) pushing prompt ``i`` towards refusal the most."""
        count = self.config.top if count is None else count
        row = self.contributions[i]
        order = np.argsort(-row, kind="stable")[:count]
        return [(int(s), float(row[s])) for s in order]

    def group_means(self) -> dict[str, float]:
        """Mean predicted ΔP_ref per group, in order of first appearance."""
        delta, groups = self.delta, np.array(self.groups, dtype=object)
        return {g: float(delta[groups == g].mean()) for g in dict.fromkeys(self.groups)}

    def rows(self) -> list[dict]:
        """One JSON-ready record per prompt, in input order (what ``forecast.jsonl`` holds)."""
        delta, rank = self.delta, self.rank
        return [
            {
                "index": i,
                "prompt": prompt,
                "group": self.groups[i],
                "predicted_delta": float(delta[i]),
                "rank": int(rank[i]),
                "base_refusal_first_token": float(self.base_refusal[i]),
                "top_contributors": [
                    {"index": s, "prompt": self.safety_prompts[s], "contribution": value}
                    for s, value in self.top_contributors(i)
                ],
            }
            for i, prompt in enumerate(self.prompts)
        ]


def compare(before: Forecast, after: Forecast) -> dict:
    """Two models' forecasts on the same inputs (e.g. before and after DCR): what changes.

    Per group the mean predicted ΔP_ref of each and their difference (after − before), the
    prompts whose prediction falls the most, and the rank correlation of the two forecasts.
    """
    if before.prompts != after.prompts or before.safety_prompts != after.safety_prompts:
        raise ValueError("compare: the two forecasts must be of the same prompts and safety examples")
    means_before, means_after = before.group_means(), after.group_means()
    change = after.delta - before.delta
    order = np.argsort(change, kind="stable")
    return {
        "groups": {
            g: {"before": means_before[g], "after": means_after[g], "change": means_after[g] - means_before[g]}
            for g in means_before
        },
        "spearman": spearman(before.delta, after.delta),
        "largest_drops": [
            {"index": int(i), "prompt": before.prompts[i], "group": before.groups[i],
             "before": float(before.delta[i]), "after": float(after.delta[i])}
            for i in order[: before.config.top]
        ],
    }

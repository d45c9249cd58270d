"""Forecast over-refusal before training: which prompts will a safety set push into refusal?

The paper's Eq. 2 says one SGD step on (x, y) moves the logits at x′ by −η K(x′, x) G(x, y).
Summed over a safety set S and read through the first-token refusal probability
P_ref(x′) = Σ_{r∈R} π(r | x′) (R: the first tokens of the A.5 refusal openings), it predicts

    ΔP_ref(x′) ≈ −(η / N) Σ_{(x,y)∈S} ⟨∇_θ P_ref(x′), ∇_θ L(x, y)⟩,

with L the SFT loss STL trains (summed over every response token; N response tokens in S,
so the step is on STL's token-mean loss), θ the eNTK engine's θ_S or STL's LoRA parameters.
The inner products come from the exact structured Gram of :mod:`dcr_fast.ntk.exact`, so a
forecast costs one tail backward per prompt and a contraction per pair, never a forward per
pair; each safety example's share is kept, so every prediction names its causes.

    from dcr_fast.forecast import forecast
    result = forecast(model, tokenizer, safety_pairs, prompts, groups=groups)
    result.delta, result.rank, result.top_contributors(0), result.group_means()

Modules: :mod:`~dcr_fast.forecast.api` (``forecast``), :mod:`~.engine` (the Gram),
:mod:`~.readouts` (P_ref and L as tail readouts), :mod:`~.params` (parameter sets),
:mod:`~.result` (``Forecast``, ``compare``), :mod:`~.reference` (autograd and one real SGD
step), :mod:`~.baselines`, :mod:`~.flips` (AUROC for STL's real flips), :mod:`~.metrics`,
:mod:`~.store` (resumable blocks), :mod:`~.report` (files), :mod:`~.cli` (``dcr-fast forecast``).
"""

from dcr_fast.forecast.api import forecast
from dcr_fast.forecast.config import ForecastConfig
from dcr_fast.forecast.flips import flip_report, flip_scores, forecast_flips
from dcr_fast.forecast.metrics import auroc, spearman
from dcr_fast.forecast.params import PARAM_SETS
from dcr_fast.forecast.result import Forecast, compare

__all__ = [
    "PARAM_SETS",
    "Forecast",
    "ForecastConfig",
    "auroc",
    "compare",
    "flip_report",
    "flip_scores",
    "forecast",
    "forecast_flips",
    "spearman",
]

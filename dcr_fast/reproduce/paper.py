"""The paper's published Table 1 (Lu et al., ICLR 2026), for reference beside our own numbers.

Only the columns our evaluation also has: compliance on the over-refusal benchmarks and the mean
defense success over the five safety sets. Their defense success is judged by Llama-Guard-3-8B
and their models are Qwen2.5-1.5B/7B and Llama-3-8B trained on 20k Alpaca + 1k GPT-4o refusals;
none of it is comparable number for number with a run on another model, data or judge. (The
paper's own Table 3 gives Qwen2.5-1.5B DCR at 3 epochs OR-Bench 0.93 where Table 1 says 0.83.)
"""

from __future__ import annotations

COLUMNS = ("xstest", "coconot-contrast", "orbench-hard", "oktest", "phtest", "safety")

TABLE1: dict[str, dict[str, tuple[float, ...]]] = {
    "Qwen2.5-1.5B": {"stl": (0.73, 0.88, 0.72, 0.75, 0.75, 0.72),
                     "stl-aug": (0.75, 0.90, 0.69, 0.76, 0.75, 0.77),
                     "dcr+stl": (0.98, 0.98, 0.83, 0.86, 0.86, 0.81)},
    "Qwen2.5-7B": {"stl": (0.66, 0.87, 0.34, 0.87, 0.80, 0.95),
                   "stl-aug": (0.74, 0.89, 0.53, 0.85, 0.83, 0.95),
                   "dcr+stl": (0.93, 0.96, 0.71, 0.94, 0.91, 0.94)},
    "Llama-3-8B": {"stl": (0.79, 0.94, 0.59, 0.89, 0.85, 0.93),
                   "stl-aug": (0.84, 0.96, 0.59, 0.87, 0.85, 0.91),
                   "dcr+stl": (0.93, 0.99, 0.85, 0.92, 0.90, 0.91)},
}


def published() -> dict[str, dict[str, dict[str, float]]]:
    """Model -> run -> column -> value."""
    return {model: {run: dict(zip(COLUMNS, values)) for run, values in runs.items()} for model, runs in TABLE1.items()}

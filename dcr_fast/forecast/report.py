"""A forecast's files: ``forecast.jsonl``, ``summary.json``, ``forecast.png`` and ``report.md``.

Every file is written atomically (:mod:`dcr_fast.atomic`), so an interrupted run never
leaves a half-written one; the work they summarize is resumable on its own
(:mod:`dcr_fast.forecast.store`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from dcr_fast import atomic
from dcr_fast.figures import pyplot, save_figure
from dcr_fast.forecast.params import PARAM_SETS
from dcr_fast.forecast.result import Forecast


def write_outputs(
    result: Forecast,
    out_dir: str | os.PathLike,
    *,
    model: str,
    elapsed_s: float | None = None,
    comparison: dict | None = None,
    other: Forecast | None = None,
    report_rows: int = 100,
) -> dict[str, Path]:
    """Write the four files of ``result`` (and, given ``comparison`` with ``other``, the
    before/after view of the two models) into ``out_dir``; returns their paths."""
    root = Path(out_dir)
    paths = {name: root / name for name in ("forecast.jsonl", "summary.json", "forecast.png", "report.md")}
    atomic.write_text(paths["forecast.jsonl"], "".join(json.dumps(row) + "\n" for row in result.rows()))
    summary = summarize(result, model=model, elapsed_s=elapsed_s)
    if comparison is not None:
        summary["comparison"] = comparison
    atomic.write_json(paths["summary.json"], summary)
    plot_forecast(result, paths["forecast.png"], other=other)
    atomic.write_text(paths["report.md"], render_markdown(result, summary, report_rows=report_rows))
    return paths


def summarize(result: Forecast, *, model: str, elapsed_s: float | None = None) -> dict:
    """Settings, counts and per-group means as JSON-ready data."""
    groups = np.array(result.groups, dtype=object)
    return {
        "model": model,
        "settings": dataclasses.asdict(result.config),
        "parameter_set": PARAM_SETS[result.config.param_set].describe(result.config.param_options),
        "refusal_first_tokens": result.refusal_tokens,
        "prompts": len(result.prompts),
        "safety_examples": len(result.safety_prompts),
        "response_tokens": result.response_tokens,
        "groups": {
            g: {"prompts": int((groups == g).sum()), "mean_predicted_delta": mean,
                "mean_base_refusal_first_token": float(result.base_refusal[groups == g].mean())}
            for g, mean in result.group_means().items()
        },
        "elapsed_s": elapsed_s,
    }


def render_markdown(result: Forecast, summary: dict, *, report_rows: int = 100) -> str:
    """The report: what was forecast, per-group means, the ranked list, the figure."""
    config = result.config
    lines = [
        "# Over-refusal forecast",
        "",
        f"Model `{summary['model']}`; {summary['prompts']} candidate prompts; safety set of "
        f"{summary['safety_examples']} examples ({summary['response_tokens']} response tokens).",
        "",
        "Predicted change of each prompt's first-token refusal probability "
        f"P_ref(x′) = Σ_(r∈R) π(r | x′), R = {{{', '.join(repr(t) for t in result.refusal_tokens)}}} "
        "(the first tokens of the paper's A.5 refusal openings), after one plain SGD step of "
        f"η = {config.lr:g} on the safety set's token-mean SFT loss, to first order (the paper's "
        f"Eq. 2): ΔP_ref(x′) ≈ −(η/N) Σ_s ⟨∇P_ref(x′), ∇L(x_s, y_s)⟩ over {summary['parameter_set']}.",
        "",
        "## Groups",
        "",
        "| group | prompts | mean predicted ΔP_ref | mean base P_ref |",
        "|---|---:|---:|---:|",
        *(f"| {_cell(g)} | {v['prompts']} | {v['mean_predicted_delta']:+.3e} | {v['mean_base_refusal_first_token']:.3f} |"
          for g, v in summary["groups"].items()),
        "",
        "![forecast](forecast.png)",
        "",
    ]
    comparison = summary.get("comparison")
    if comparison is not None:
        lines += [
            "## Against the other model",
            "",
            f"Model `{comparison['other_model']}` on the same inputs; Spearman ρ of the two forecasts "
            f"{comparison['spearman']:.3f}.",
            "",
            "| group | this model | other model | other − this |",
            "|---|---:|---:|---:|",
            *(f"| {_cell(g)} | {v['before']:+.3e} | {v['after']:+.3e} | {v['change']:+.3e} |"
              for g, v in comparison["groups"].items()),
            "",
        ]
    rows = sorted(result.rows(), key=lambda r: r["rank"])
    shown = rows[:report_rows]
    lines += [
        f"## Ranked prompts ({len(shown)} of {len(rows)}; all in forecast.jsonl)",
        "",
        "| rank | group | predicted ΔP_ref | base P_ref | prompt | top contributing safety example |",
        "|---:|---|---:|---:|---|---|",
    ]
    for row in shown:
        top = row["top_contributors"][0] if row["top_contributors"] else None
        contributor = f"{_cell(top['prompt'], 80)} ({top['contribution']:+.2e})" if top else ""
        lines.append(
            f"| {row['rank']} | {_cell(row['group'])} | {row['predicted_delta']:+.3e} | "
            f"{row['base_refusal_first_token']:.3f} | {_cell(row['prompt'], 120)} | {contributor} |"
        )
    return "\n".join(lines) + "\n"


def plot_forecast(result: Forecast, path: str | os.PathLike, *, other: Forecast | None = None) -> None:
    """Left: predicted ΔP_ref by rank, coloured by group. Right: the group means (and the other
    model's beside them)."""
    plt = pyplot()

    fig, (ranked, means) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    order = np.argsort(-result.delta, kind="stable")
    groups = list(result.group_means())
    colours = {g: plt.get_cmap("tab10")(i % 10) for i, g in enumerate(groups)}
    for g in groups:
        at = [r for r, i in enumerate(order, start=1) if result.groups[i] == g]
        ranked.scatter(at, result.delta[order][np.array(at) - 1], s=10, color=colours[g], label=g)
    ranked.axhline(0, color="grey", lw=0.8)
    ranked.set_xlabel("rank")
    ranked.set_ylabel("predicted ΔP_ref")
    ranked.set_title("forecast per prompt")
    ranked.legend(fontsize=8)
    series = [("this model", result)] + ([("other model", other)] if other is not None else [])
    width = 0.8 / len(series)
    for j, (label, forecast) in enumerate(series):
        values = forecast.group_means()
        means.bar(np.arange(len(groups)) + j * width, [values[g] for g in groups], width, label=label)
    means.set_xticks(np.arange(len(groups)) + width * (len(series) - 1) / 2, groups, rotation=20, ha="right")
    means.axhline(0, color="grey", lw=0.8)
    means.set_title("mean per group")
    if other is not None:
        means.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def _cell(text: str, limit: int | None = None) -> str:
    """Text safe inside a markdown table cell, cut to ``limit`` characters."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"

"""Reports in the paper's Table-1 layout: `report.json`, `report.md` and PNG figures.

A report holds one or more runs (e.g. "stl", "stl-aug", "dcr+stl"), each the record that
`evaluate` returns. A rate may be a number or {"mean": m, "std": s} for runs summarised over
seeds. Every file is written to a temporary name and moved into place, so a reader never
sees half a report.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dcr_fast import atomic
from dcr_fast.figures import pyplot, save_figure

Rate = float | Mapping[str, float]

# The paper's column order for over-refusal (Table 1), then safety sets; others follow.
OVER_REFUSAL_ORDER = ("xstest", "coconot-contrast", "orbench-hard", "oktest", "phtest")
SAFETY_ORDER = ("i-malicious", "i-cona", "i-controversial", "q-harm", "advbench")


def write_report(out_dir: str | Path, runs: Mapping[str, Mapping[str, Any]],
                 settings: Mapping[str, Any] | None = None, notes: str = "") -> dict[str, Any]:
    """Write report.json, report.md and figures/*.png under `out_dir`; return the report."""
    if not runs:
        raise ValueError("runs is empty: a report needs at least one run")
    out = Path(out_dir)
    figures = {
        "compliance": plot_rates(runs, "compliance", out / "figures" / "compliance.png"),
        "defense_success": plot_rates(runs, "defense_success", out / "figures" / "defense_success.png"),
    }
    listed = {key: str(path.relative_to(out)) for key, path in figures.items() if path is not None}
    listed.update({f"{name}/{key}": path for name, run in runs.items() for key, path in run.get("figures", {}).items()})
    report = {"runs": {name: dict(run) for name, run in runs.items()}, "settings": dict(settings or {}),
              "figures": listed}
    atomic.write_json(out / "report.json", report)
    atomic.write_text(out / "report.md", report_markdown(report, notes))
    return report


def report_markdown(report: Mapping[str, Any], notes: str = "") -> str:
    runs = report["runs"]
    over = _ordered({b for run in runs.values() for b in run.get("compliance", {})}, OVER_REFUSAL_ORDER)
    safety = _ordered({b for run in runs.values() for b in run.get("defense_success", {})}, SAFETY_ORDER)
    lines = ["# Evaluation report", ""]
    lines += ["Compliance on seemingly toxic prompts (XSTest string-match rule; higher is better) and "
              "mean defense success on harmful prompts (higher is better).", ""]
    lines += markdown_table(["run", *over, "safety (mean)"],
                    [[name, *(_fmt(run.get("compliance", {}).get(b)) for b in over),
                      _fmt(run.get("defense_success_mean"))] for name, run in runs.items()])
    if safety:
        lines += ["", "Defense success per harmful benchmark.", ""]
        lines += markdown_table(["run", *safety],
                        [[name, *(_fmt(run.get("defense_success", {}).get(b)) for b in safety)]
                         for name, run in runs.items()])
    probs = {name: run["refusal_probability"] for name, run in runs.items() if run.get("refusal_probability")}
    if probs:
        lines += ["", "Mean refusal probability (appendix A.5 set) per benchmark and category.", ""]
        keys = _ordered({f"{b}/{c}" for p in probs.values() for b, cs in p.items() for c in cs},
                        OVER_REFUSAL_ORDER + SAFETY_ORDER)
        lines += markdown_table(["run", *keys],
                        [[name, *(_fmt(_lookup(p, k), ".3g") for k in keys)] for name, p in probs.items()])
    layers = {name: run["separability"] for name, run in runs.items() if run.get("separability")}
    if layers:
        lines += ["", "Separability of toxic vs other prompts per layer (k-means + Hungarian accuracy; "
                  "0.5 is chance for balanced sets).", ""]
        depth = max(len(s["accuracy_per_layer"]) for s in layers.values())
        lines += markdown_table(["run", "benchmark", *(f"L{i}" for i in range(depth))],
                        [[name, s["benchmark"], *(_fmt(a) for a in s["accuracy_per_layer"])]
                         for name, s in layers.items()])
    lines += ["", "## Judges", ""]
    lines += [f"- {name}: compliance by the XSTest string-match rule; defense by {run.get('judge', 'n/a')}"
              for name, run in runs.items()]
    if report.get("settings"):
        lines += ["", "## Settings", "", "```json", json.dumps(report["settings"], indent=2, default=str), "```"]
    if report.get("figures"):
        lines += ["", "## Figures", ""] + [f"![{key}]({path})" for key, path in report["figures"].items()]
    if notes:
        lines += ["", "## Notes", "", notes]
    return "\n".join(lines) + "\n"


def plot_rates(runs: Mapping[str, Mapping[str, Any]], key: str, path: Path) -> Path | None:
    """Grouped bars of `runs[*][key]` per benchmark (with ± std when given); None if no data."""
    order = OVER_REFUSAL_ORDER if key == "compliance" else SAFETY_ORDER
    benchmarks = _ordered({b for run in runs.values() for b in run.get(key, {})}, order)
    if not benchmarks:
        return None
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(benchmarks) * max(1, len(runs)) / 2, 3.2))
    width = 0.8 / len(runs)
    for offset, (name, run) in enumerate(runs.items()):
        rates = [run.get(key, {}).get(b) for b in benchmarks]
        means = [_mean(r) for r in rates]
        spreads = [r.get("std", 0.0) if isinstance(r, Mapping) else 0.0 for r in rates]
        positions = [i + (offset - (len(runs) - 1) / 2) * width for i in range(len(benchmarks))]
        ax.bar(positions, [m if m is not None else 0.0 for m in means], width, yerr=spreads, label=name, capsize=2)
    ax.set_xticks(range(len(benchmarks)), benchmarks, rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(key.replace("_", " "))
    ax.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)
    return path


def plot_entk(entk: Mapping[str, Any], path: Path) -> Path:
    """Heatmaps of the mean normalized eNTK per (x′ group, x group), before and after DCR, on one scale."""
    plt = pyplot()

    groups = entk["groups"]
    names = [g.replace("_", "\n") for g in groups]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), layout="constrained")
    top = max(entk[s][a][b] for s in ("before", "after") for a in groups for b in groups)
    for ax, label in zip(axes, ("before", "after")):
        grid = [[entk[label][a][b] for b in groups] for a in groups]
        image = ax.imshow(grid, vmin=0, vmax=top, cmap="viridis")
        ax.set_xticks(range(len(groups)), names)
        ax.set_yticks(range(len(groups)), names)
        ax.set_title(f"{label} DCR (rows x′, columns x)")
        for i in range(len(groups)):
            for j in range(len(groups)):
                ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.8)
    save_figure(fig, path)
    return path


def _ordered(names: set[str], preferred: tuple[str, ...]) -> list[str]:
    return [n for n in preferred if n in names] + sorted(names - set(preferred))


def _mean(rate: Rate | None) -> float | None:
    return rate.get("mean") if isinstance(rate, Mapping) else rate


def _fmt(rate: Rate | None, spec: str = ".2f") -> str:
    if rate is None:
        return "–"
    if isinstance(rate, Mapping):
        return f"{rate['mean']:{spec}} ± {rate.get('std', 0.0):{spec}}"
    return f"{rate:{spec}}"


def _lookup(probs: Mapping[str, Mapping[str, float]], key: str) -> float | None:
    benchmark, category = key.split("/", 1)
    return probs.get(benchmark, {}).get(category)


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a GitHub-style markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]

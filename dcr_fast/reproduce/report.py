"""``reproduce``'s report: every model's numbers over seeds, the paper's claim checked, figures.

``report.json`` holds, per run (base, dcr, stl, stl-aug, dcr+stl), every rate as mean, sample std
and standard error over seeds plus each seed's value; the per-seed (paired) differences of
DCR+STL from STL and STL-aug; the paper's claim as explicit checks; the published Table 1 beside
ours, labelled as such; the layer probe, the eNTK group means, timings and every setting.
``report.md`` lays the same out in Table 1's columns; ``figures/`` has the trade-off plane
(compliance against defense success, one point per model and seed), per-benchmark bars, the
eNTK heatmaps and the layer probe.
"""

from __future__ import annotations

import json
import platform
import statistics
from pathlib import Path
from typing import Any

import torch

from dcr_fast import atomic
from dcr_fast.evaluation.report import OVER_REFUSAL_ORDER, SAFETY_ORDER, markdown_table, plot_entk, plot_rates
from dcr_fast.figures import pyplot, save_figure
from dcr_fast.reproduce import paper
from dcr_fast.reproduce.config import EVALUATED, RUNS
from dcr_fast.reproduce.forecasting import forecast_report, score_entry
from dcr_fast.reproduce.protocol_data import INSTRUCTIONS, SAFETY_HELDOUT
from dcr_fast.reproduce.stages import Plan, dcr_layer

# Tolerance of the paper's claim "comparable safety": defense success within this of STL's.
SAFETY_TOLERANCE = 0.05


def build_report(plan: Plan, timings: dict[str, float], wall_s: float) -> dict[str, Any]:
    """Collect every evaluation of the run into the report (see the module docstring)."""
    seeds = plan.config["seeds"]
    evals = {run: [_read(plan.run_dir(run, None if run == "base" else s) / "eval" / "eval.json") for s in seeds]
             for run in EVALUATED}
    runs = {run: summarize(per_seed, seeds) for run, per_seed in evals.items()}
    paired = {f"dcr+stl - {other}": {key: _paired([r[key] for r in runs["dcr+stl"]["per_seed"]],
                                                  [r[key] for r in runs[other]["per_seed"]])
                                     for key in ("over_refusal_compliance", "safety", "xstest_compliance")}
              for other in ("stl", "stl-aug")}
    layer = _read(plan.path("layer.json")) if plan.path("layer.json").exists() else None
    entk = _read(plan.path("entk", "entk.json")) if plan.path("entk", "entk.json").exists() else None
    return {
        "model": plan.config["model"], "base": plan.base, "dcr_layer": dcr_layer(plan), "seeds": seeds,
        "runs": runs, "paired": paired, "claim": claim_checks(runs), "layer_probe": layer, "entk": entk,
        "forecast": _with_auroc(forecast_report(plan)),
        "data": _read(plan.path("data", "protocol.json")), "answers": _read(plan.path("answers", "summary.json")),
        "training": {run: [_training(plan.run_dir(run, s)) for s in seeds] for run in ("dcr", *RUNS)},
        "paper_table1": paper.published(), "paper_table1_note": paper.__doc__.split("\n\n", 1)[1].strip(),
        "settings": {"reproduce": plan.config, **plan.stages}, "timings_s": timings, "wall_s": wall_s,
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                        "processor": platform.processor(), "cuda": torch.cuda.is_available()},
    }


def summarize(per_seed: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """One model's headline rates per seed, and their spread."""
    rows = []
    for seed, result in zip(seeds, per_seed):
        over = {b: r for b, r in result["compliance"].items() if b != INSTRUCTIONS}
        safety = {b: r for b, r in result["defense_success"].items() if b in SAFETY_ORDER}
        rows.append({
            "seed": seed,
            "compliance": over,
            "defense_success": result["defense_success"],
            "over_refusal_compliance": statistics.fmean(over.values()) if over else None,
            "xstest_compliance": over.get("xstest"),
            "safety": statistics.fmean(safety.values()) if safety else None,
            "instructions_compliance": result["compliance"].get(INSTRUCTIONS),
            "safety_heldout": result["defense_success"].get(SAFETY_HELDOUT),
            "general_nll": result.get("general", {}).get("nll"),
            "general_agreement": result.get("general", {}).get("agreement"),
            "refusal_probability": result.get("refusal_probability", {}),
            "xstest_split": result.get("xstest_split"),
            "separation": result.get("separation"),
        })
    summary = {"per_seed": rows}
    for key in ("over_refusal_compliance", "xstest_compliance", "safety", "instructions_compliance", "safety_heldout",
                "general_nll", "general_agreement"):
        values = [r[key] for r in rows if r[key] is not None]
        summary[key] = spread(values) if values else None
    for key in ("compliance", "defense_success"):
        summary[key] = {b: spread([r[key][b] for r in rows]) for b in rows[0][key]}
    return summary


def _with_auroc(forecast: dict[str, Any] | None) -> dict[str, Any] | None:
    """The forecast's report with each score's AUROC spread over the seeds (None where never defined)."""
    if forecast is None:
        return None
    auroc = {}
    for name in ["forecast", *forecast["per_seed"][0]["baselines"]]:
        values = [v for r in forecast["per_seed"] if (v := score_entry(r, name)["auroc"]) is not None]
        auroc[name] = spread(values) if values else None
    return {"auroc": auroc, **forecast}


def claim_checks(runs: dict[str, Any]) -> dict[str, Any]:
    """The paper's claim as four checks on seed means, with the numbers they compare."""
    def mean(run: str, key: str) -> float:
        return runs[run][key]["mean"]

    checks = {
        "stl_over_refuses": (mean("stl", "over_refusal_compliance") < mean("base", "over_refusal_compliance"),
                             "STL's over-refusal-benchmark compliance is below the base model's"),
        "stl_defends": (mean("stl", "safety") > mean("base", "safety"),
                        "STL's mean defense success is above the base model's"),
        "dcr_complies_more": (mean("dcr+stl", "over_refusal_compliance") > mean("stl", "over_refusal_compliance"),
                              "DCR+STL's compliance is above STL's"),
        # "keeps the safety": no more than the tolerance below STL's; defending more is not a failure
        "dcr_keeps_safety": (mean("dcr+stl", "safety") >= mean("stl", "safety") - SAFETY_TOLERANCE,
                             f"DCR+STL's defense success is at least STL's minus {SAFETY_TOLERANCE}"),
    }
    return {name: {"holds": bool(holds), "what": what} for name, (holds, what) in checks.items()} | {
        "all_hold": all(holds for holds, _ in checks.values()),
        "numbers": {run: {k: mean(run, k) for k in ("over_refusal_compliance", "safety")} for run in runs}}


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation, standard error and the values (std and se 0 for one value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "se": std / len(values) ** 0.5, "values": values}


def _paired(ours: list[float | None], theirs: list[float | None]) -> dict[str, Any] | None:
    differences = [a - b for a, b in zip(ours, theirs) if a is not None and b is not None]
    if not differences:
        return None
    return {**spread(differences), "higher": sum(d > 0 for d in differences), "lower": sum(d < 0 for d in differences)}


def _training(run_dir: Path) -> dict[str, Any] | None:
    summary = run_dir / "summary.json"
    if not summary.exists():
        return None
    data = _read(summary)
    keep = ("steps_total", "final_loss", "mean_loss_last_10", "tokens_per_s", "trainable_parameters", "examples", "prompts")
    result = {k: data[k] for k in keep if k in data}
    log = run_dir / "log.jsonl"
    if log.exists():
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        for key in ("circle", "nll"):
            if rows and key in rows[0]:
                result[f"{key}_first_last"] = [rows[0][key], rows[-1][key]]
        if rows and "circle_floor" in rows[0]:  # how far above its floor (all pairs past their margins)
            excess = [r["circle"] - r["circle_floor"] for r in rows]
            result["circle_excess_first_last10"] = [excess[0], sum(excess[-10:]) / len(excess[-10:])]
    return result


def _read(path: Path) -> Any:
    return json.loads(Path(path).read_text())


# --- writing ------------------------------------------------------------------------------------------


def write_report(report: dict[str, Any], out: Path) -> None:
    """``report.json``, ``report.md`` and ``figures/*.png``, each written atomically."""
    figures = {"tradeoff": _plot_tradeoff(report, out / "figures" / "tradeoff.png")}
    for key in ("compliance", "defense_success"):
        path = plot_rates(report["runs"], key, out / "figures" / f"{key}.png")
        if path is not None:
            figures[key] = path
    if report["entk"]:
        figures["entk"] = plot_entk(report["entk"], out / "figures" / "entk.png")
    if report["layer_probe"]:
        figures["layer_probe"] = _plot_layer_probe(report["layer_probe"], out / "figures" / "layer_probe.png")
    report["figures"] = {key: str(path.relative_to(out)) for key, path in figures.items()}
    atomic.write_json(out / "report.json", report)
    atomic.write_text(out / "report.md", report_markdown(report))


def report_markdown(report: dict[str, Any]) -> str:
    runs = report["runs"]
    seeds = report["seeds"]
    over = [b for b in OVER_REFUSAL_ORDER if b in runs["base"]["compliance"]]
    over += sorted(set(runs["base"]["compliance"]) - set(over) - {INSTRUCTIONS})
    safety = [b for b in SAFETY_ORDER if b in runs["base"]["defense_success"]]
    lines = [f"# DCR reproduction: {report['model']}", "",
             f"Seeds {seeds}; refined layer {report['dcr_layer']}; every rate mean ± sample std over seeds "
             "(single values with one seed). Compliance: XSTest string-match rule on greedy answers (higher is "
             "better); defense success: the same rule on harmful prompts (a refusal counts as a defense).", ""]
    lines += ["## Table 1 layout", ""]
    lines += markdown_table(["run", *over, "over-refusal mean", *safety, "safety mean", "XSTest unsafe",
                             "STL validation"],
                            [[name, *(_pm(run["compliance"].get(b)) for b in over), _pm(run["over_refusal_compliance"]),
                              *(_pm(run["defense_success"].get(b)) for b in safety), _pm(run["safety"]),
                              _pm(run["defense_success"].get("xstest")), _pm(run["safety_heldout"])]
                             for name, run in runs.items()])
    lines += ["", "STL validation: defense success on Safety-Tuned LLaMAs safety prompts held out of STL (the safety "
              "SFT's own training distribution; not part of the safety mean).", ""]
    lines += ["", "## The paper's claim, checked", ""]
    lines += [f"- {'holds' if c['holds'] else 'does NOT hold'}: {c['what']}" for k, c in report["claim"].items()
              if isinstance(c, dict) and "holds" in c]
    lines += ["", "Paired by seed (same base model and data; seeds differ in initialisation and order): DCR+STL minus "
              "each baseline; higher/lower count the seeds.", ""]
    rows = []
    for name, differences in report["paired"].items():
        for key, d in differences.items():
            if d:
                rows.append([name, key, f"{d['mean']:+.3f} ± {d['std']:.3f}", f"{d['higher']} / {d['lower']}"])
    lines += markdown_table(["difference", "rate", "mean ± std", "higher / lower"], rows)
    lines += ["", "## General ability (no network: held-out built-in instructions)", "",
              "Compliance on held-out benign instructions; teacher-forced NLL per token of the base model's own "
              "greedy answers to them, and the fraction of those tokens the model's argmax reproduces.", ""]
    lines += markdown_table(["run", "instruction compliance", "NLL of base answers", "agreement with base"],
                            [[name, _pm(run["instructions_compliance"]), _pm(run["general_nll"], ".3f"),
                              _pm(run["general_agreement"], ".3f")] for name, run in runs.items()])
    lines += _forecast_markdown(report["forecast"])
    lines += _diagnostics(report)
    lines += ["", "## The paper's published Table 1 (for reference only)", "", report["paper_table1_note"], ""]
    lines += markdown_table(["model", "run", *paper.COLUMNS],
                            [[model, run, *(f"{v:.2f}" for v in values.values())]
                             for model, rows_ in report["paper_table1"].items() for run, values in rows_.items()])
    lines += ["", "## Figures", ""] + [f"![{key}]({path})" for key, path in report["figures"].items()]
    lines += ["", "## Time", "", f"Wall time of this invocation: {report['wall_s'] / 60:.1f} min (jobs already "
              "complete in the output folder are reused, not rerun).", ""]
    lines += markdown_table(["job", "min"], [[k, f"{v / 60:.1f}"] for k, v in report["timings_s"].items()])
    lines += ["", "## Settings", "", "```json", json.dumps(report["settings"], indent=2), "```", "",
              "Data selected (counts):", "", "```json", json.dumps(report["data"]["counts"], indent=2), "```"]
    return "\n".join(lines) + "\n"


def _forecast_markdown(forecast: dict[str, Any] | None) -> list[str]:
    if not forecast:
        return []
    first = forecast["per_seed"][0]["forecast"]
    lines = ["", "## Forecasting STL's over-refusal before training", "", forecast["what"], "",
             f"{forecast['prompts']} benign prompts; first seed: {first['population']} complied with by the base model, "
             f"{first['flipped']} of them refused after STL. AUROC for those flips (0.5 is chance), mean over seeds:", ""]
    rows = []
    for name, value in forecast["auroc"].items():
        rows.append([name, "–" if value is None else f"{value['mean']:.3f}", score_entry(forecast["per_seed"][0], name)["score"]])
    return lines + markdown_table(["score", "AUROC", "what it is"], rows)


def _diagnostics(report: dict[str, Any]) -> list[str]:
    runs = report["runs"]
    lines = ["", "## Diagnostics", ""]
    split_rows = [[name, *(f"{s[part]['compliance']:.2f} (n={s[part]['n']})" if s and part in s else "–"
                           for part in ("in_dcr", "held_out"))]
                  for name, run in runs.items() for s in [run["per_seed"][0]["xstest_split"]]]
    if any(row[2] != "–" for row in split_rows):
        lines += ["XSTest safe prompts DCR trained on vs held out of DCR (first seed):", ""]
        lines += markdown_table(["run", "in DCR", "held out"], split_rows) + [""]
    separation = [[name, *(f"{r['separation']['kmeans_accuracy']:.2f}" for r in run["per_seed"])]
                  for name, run in runs.items() if run["per_seed"][0].get("separation")]
    if separation:
        lines += [f"k-means separability (0.5 is chance) of XSTest safe vs unsafe prompts at the refined layer "
                  f"{report['dcr_layer']}, per seed (a measurement; never used to choose anything):", ""]
        lines += markdown_table(["run", *(f"seed {s}" for s in report["seeds"])], separation) + [""]
    probs = [[name, *(f"{r['refusal_probability'].get('xstest', {}).get(c, float('nan')):.3g}"
                      for c in ("seemingly_toxic", "toxic"))] for name, run in runs.items() for r in run["per_seed"][:1]]
    lines += ["Mean refusal probability (A.5 set) on XSTest, first seed:", ""]
    lines += markdown_table(["run", "seemingly toxic", "toxic"], probs) + [""]
    if report["entk"]:
        entk = report["entk"]
        lines += [f"eNTK (normalized ‖K(x′,x)[So,Su]‖_F / ‖K(x′,x′)[So,So]‖_F; θ_S = top {entk['tail_layers']} layers + "
                  f"lm_head; {entk['prompts_per_group']} prompts per group), mean per group pair, before → after DCR:", ""]
        lines += [f"- x′ {a} / x {b}: {entk['before'][a][b]:.3f} → {entk['after'][a][b]:.3f}"
                  for a in entk["groups"] for b in entk["groups"]] + [""]
    if report["layer_probe"]:
        probe = report["layer_probe"]
        lines += [f"Layer probe: {probe['rule']}; window {probe['window']}, chosen {probe['chosen']}; accuracy per "
                  "layer: " + " ".join(f"{a:.2f}" for a in probe["accuracy_per_layer"]), ""]
    training = [[f"{run}/seed {seed}", str(t.get("steps_total")), f"{t.get('final_loss', float('nan')):.3f}",
                 _first_last(t, "circle"), _first_last(t, "circle_excess"), _first_last(t, "nll")]
                for run, per_seed in report["training"].items() for seed, t in zip(report["seeds"], per_seed) if t]
    lines += ["Training: optimizer steps and final loss; for DCR the Circle loss, its excess over the floor it reaches "
              "once every pair of a batch is past its margin (first step → mean of the last ten), and the NLL of the "
              "templated prompts (first → last step):", ""]
    lines += markdown_table(["run", "steps", "final loss", "circle", "circle − floor", "prompt NLL"], training)
    return lines


def _first_last(training: dict[str, Any], key: str) -> str:
    pair = training.get(f"{key}_first_last") or training.get(f"{key}_first_last10")
    return f"{pair[0]:.2f} → {pair[1]:.2f}" if pair else "–"


def _pm(rate: dict[str, Any] | None, spec: str = ".2f") -> str:
    if rate is None:
        return "–"
    return f"{rate['mean']:{spec}}" if len(rate["values"]) == 1 else f"{rate['mean']:{spec}} ± {rate['std']:{spec}}"


def _plot_tradeoff(report: dict[str, Any], path: Path) -> Path:
    """Compliance on the over-refusal benchmarks against mean defense success: one point per model
    and seed, the seed mean larger. The paper's claim is a point up-and-right of STL's."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5, 4), layout="constrained")
    for index, (name, run) in enumerate(report["runs"].items()):
        color = f"C{index}"
        xs = [r["over_refusal_compliance"] for r in run["per_seed"]]
        ys = [r["safety"] for r in run["per_seed"]]
        ax.scatter(xs, ys, color=color, alpha=0.4, s=18)
        ax.scatter([statistics.fmean(xs)], [statistics.fmean(ys)], color=color, s=80, label=name, edgecolor="k")
    ax.set_xlabel("over-refusal benchmarks: compliance (mean)")
    ax.set_ylabel("safety benchmarks: defense success (mean)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower left")
    save_figure(fig, path)
    return path


def _plot_layer_probe(probe: dict[str, Any], path: Path) -> Path:
    plt = pyplot()

    accuracy = probe["accuracy_per_layer"]
    fig, ax = plt.subplots(figsize=(5, 3), layout="constrained")
    ax.plot(range(len(accuracy)), accuracy, marker="o", ms=3)
    ax.axvspan(*probe["window"], alpha=0.15, label="candidate layers")
    ax.axvline(probe["chosen"], color="k", ls="--", label=f"chosen: {probe['chosen']}")
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("k-means separability")
    ax.legend(fontsize="small")
    save_figure(fig, path)
    return path

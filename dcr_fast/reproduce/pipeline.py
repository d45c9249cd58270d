"""``reproduce``: the paper's protocol end to end, from one base model.

    from dcr_fast.reproduce import reproduce
    report = reproduce(config, stages)      # config: ReproduceConfig; stages: the preset's dcr/sft sections

From the same start: STL (safety SFT), STL-aug (STL plus XSTest's seemingly toxic prompts with the
base model's own compliant answers), DCR alone and DCR+STL (the Circle stage, then the same STL),
per seed; every model evaluated on the over-refusal and safety benchmarks, with refusal
probability, a general-ability proxy and, for the first seed, the eNTK group heatmap before and
after DCR. Outputs under ``OUT``: ``data/`` (the selected prompts), ``answers/`` (the base model's
own answers), ``layer.json``, ``seed<s>/<run>/`` (each trained run: ``model/`` loads with
``from_pretrained``, ``eval/``), ``base/eval/``, ``entk/``, ``logs/`` (one log per job), and
``report.json``, ``report.md``, ``figures/``. Rerunning the same command resumes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from dcr_fast import atomic, models
from dcr_fast.config import config_to_dict
from dcr_fast.reproduce import protocol_data
from dcr_fast.reproduce.config import ReproduceConfig
from dcr_fast.reproduce.forecasting import forecast_job
from dcr_fast.reproduce.jobs import Job, run_jobs
from dcr_fast.reproduce.stages import Plan, answers_job, entk_job, eval_job, layer_job, train_job, write_pairs

# Settings of the training stages the protocol sets itself, whatever the preset says.
_PROTOCOL_FIELDS = {"model", "out", "seed", "resume", "data", "safety_data", "aug_data", "seemingly_toxic", "toxic",
                    "layer", "device", "progress"}


def reproduce(config: ReproduceConfig, stages: dict[str, dict[str, Any]], *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) every job, then write and return the report."""
    from dcr_fast.reproduce.report import build_report, write_report

    started = time.perf_counter()
    plan = prepare(config, stages)
    if config.reuse:
        linked = reuse(plan, config.reuse)
        if progress and linked:
            print(f"reproduce: reusing {', '.join(linked)} from {config.reuse}")
    timings = run_jobs(jobs(plan), workers=config.workers, threads=config.threads, log_dir=plan.path("logs"),
                       progress=progress)
    report = build_report(plan, timings, wall_s=time.perf_counter() - started)
    write_report(report, plan.path())
    return report


def prepare(config: ReproduceConfig, stages: dict[str, dict[str, Any]]) -> Plan:
    """Check everything that can be checked before a model is loaded, resolve the base model, and
    write the selected prompts to ``OUT/data``; returns the plan every job reads."""
    if not config.out:
        raise ValueError("out: required (the output directory)")
    for stage in ("dcr", "sft"):
        reserved = sorted(_PROTOCOL_FIELDS & set(stages.get(stage, {})))
        if reserved:
            raise ValueError(f"{stage}: the protocol sets {reserved} itself; remove them from the preset")
    _check_stage_configs(stages)
    protocol_data.check_sources(config)
    base = models.resolve(config.model)
    _check_chat_template(config.model, base)
    plan = Plan(out=config.out, base=base, config=config_to_dict(config), stages=stages)
    saved = plan.path("data", "protocol.json")
    selection = {"model": config.model, "base": base, **{k: getattr(config, k) for k in _DATA_SETTINGS}}
    if saved.exists():
        previous = json.loads(saved.read_text())["selection"]
        changed = sorted(k for k in selection if previous.get(k) != selection[k])
        if changed:
            raise ValueError(f"out: {config.out!r} holds a run with other data settings ({', '.join(changed)}); "
                             "use another --out")
        return plan
    _check_layer(config, base)
    data = protocol_data.select(config)
    for name, prompts in (("dcr-seemingly-toxic", data.dcr_seemingly_toxic), ("dcr-toxic", data.dcr_toxic),
                          ("general-prompts", data.general_prompts), ("heldout-instructions", data.heldout_instructions)):
        atomic.write_text(plan.data(name), "".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    write_pairs(plan.path("data", "safety.jsonl"), _cut_responses(data.safety, base, config.max_response_tokens))
    if data.general_pairs is not None:
        write_pairs(plan.path("data", "general.jsonl"), _cut_responses(data.general_pairs, base, config.max_response_tokens))
    for name, prompts in data.evaluation.items():
        atomic.write_text(plan.data(f"eval-{name}"), "".join(
            json.dumps({"text": p.text, "category": p.category, "source": p.source, "subset": p.subset}) + "\n"
            for p in prompts))
    atomic.write_json(saved, {"selection": selection, "counts": data.counts(), "data_seed": protocol_data.DATA_SEED})
    return plan


_DATA_SETTINGS = ("data", "alpaca", "dcr_seemingly_toxic", "dcr_toxic", "safety_examples", "safety_heldout", "general_examples",
                  "general_heldout", "benchmarks", "eval_limit", "max_response_tokens", "answer_max_new_tokens")


def reuse(plan: Plan, source: str | Path) -> list[str]:
    """Link into ``plan``'s folder what another run folder ``source`` holds with the same inputs.

    For ablations of the DCR stage: the base model's answers, the layer probe, the base model's
    evaluation, the over-refusal forecast and every finished STL and STL-aug run (with its evaluation) do not depend on DCR's
    settings, so a run that changes only those reuses them instead of training them again. Only
    runs whose training config equals this run's (paths aside) are taken; every reused result is
    checked again by its job's own key, as if it had been computed here. Files are hard links where
    the filesystem allows (atomic rewrites replace links, never the source's files).
    """
    from dcr_fast.reproduce.stages import training_config

    source = Path(source)
    mine = json.loads(plan.path("data", "protocol.json").read_text())["selection"]
    theirs_file = source / "data" / "protocol.json"
    if not theirs_file.exists():
        raise ValueError(f"reuse: {str(source)!r} holds no reproduce run (no data/protocol.json)")
    theirs = json.loads(theirs_file.read_text())["selection"]
    changed = sorted(k for k in mine if mine[k] != theirs.get(k))
    if changed:
        raise ValueError(f"reuse: {str(source)!r} was made with other data settings ({', '.join(changed)})")
    candidates = [Path("answers"), Path("layer.json"), Path("base"), Path("forecast")]
    for seed in plan.config["seeds"]:
        for run in ("stl", "stl-aug"):
            summary = source / f"seed{seed}" / run / "summary.json"
            if summary.exists() and _same_training(json.loads(summary.read_text()), training_config(plan, run, seed)[0]):
                candidates.append(Path(f"seed{seed}") / run)
    linked = []
    for relative in candidates:
        if (source / relative).exists() and not plan.path(str(relative)).exists():
            _link(source / relative, plan.path(str(relative)))
            linked.append(str(relative))
    return linked


def _same_training(saved: dict[str, Any], config) -> bool:
    from dcr_fast.reproduce.stages import comparable_config

    return bool(saved.get("finished")) and comparable_config(saved.get("config", {})) == comparable_config(config_to_dict(config))


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        if source.is_dir():
            shutil.copytree(source, target, copy_function=os.link)
        else:
            os.link(source, target)
    except OSError:  # another filesystem: copy instead
        shutil.rmtree(target, ignore_errors=True)
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)


def jobs(plan: Plan) -> list[Job]:
    """Every job, in priority order (the longest chain, DCR -> DCR+STL -> its evaluation, first)."""
    settings = plan.settings
    listed = [Job("answers", answers_job, (plan,))]
    if not settings.dcr_layer:
        listed.append(Job("layer", layer_job, (plan,)))
    dcr_deps = () if settings.dcr_layer else ("layer",)
    for seed in settings.seeds:
        listed += [Job(f"dcr/{seed}", train_job, (plan, "dcr", seed), dcr_deps),
                   Job(f"dcr+stl/{seed}", train_job, (plan, "dcr+stl", seed), (f"dcr/{seed}", "answers")),
                   Job(f"eval/dcr+stl/{seed}", eval_job, (plan, "dcr+stl", seed), (f"dcr+stl/{seed}",)),
                   Job(f"stl/{seed}", train_job, (plan, "stl", seed), ("answers",)),
                   Job(f"eval/stl/{seed}", eval_job, (plan, "stl", seed), (f"stl/{seed}",)),
                   Job(f"stl-aug/{seed}", train_job, (plan, "stl-aug", seed), ("answers",)),
                   Job(f"eval/stl-aug/{seed}", eval_job, (plan, "stl-aug", seed), (f"stl-aug/{seed}",)),
                   Job(f"eval/dcr/{seed}", eval_job, (plan, "dcr", seed), (f"dcr/{seed}",))]
    listed.append(Job("eval/base", eval_job, (plan, "base", None), ("answers", *dcr_deps)))
    if settings.entk_prompts:
        listed.append(Job("entk", entk_job, (plan, settings.seeds[0]), (f"dcr/{settings.seeds[0]}",)))
    if settings.forecast_param_set != "none":
        listed.append(Job("forecast", forecast_job, (plan,)))
    return _topological(listed)


def _topological(listed: list[Job]) -> list[Job]:
    """``listed`` reordered so every job follows its dependencies, otherwise keeping its order."""
    ordered: list[Job] = []
    remaining = list(listed)
    while remaining:
        ready = next(j for j in remaining if all(d in {o.name for o in ordered} for d in j.deps))
        remaining.remove(ready)
        ordered.append(ready)
    return ordered


def _cut_responses(pairs: list[tuple[str, str]], base: str, max_tokens: int) -> list[tuple[str, str]]:
    """Responses cut to ``max_tokens`` tokens, back to a sentence end where one exists (0: unchanged)."""
    if not max_tokens:
        return pairs
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    cut = []
    for prompt, response in pairs:
        ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        if len(ids) > max_tokens:
            text = tokenizer.decode(ids[:max_tokens])
            end = max(text.rfind(mark) for mark in (". ", ".\n", "! ", "? ", "\n"))
            response = text[: end + 1].strip() if end > 0 else text.strip()
        cut.append((prompt, response))
    return cut


def _check_stage_configs(stages: dict[str, dict[str, Any]]) -> None:
    """Build both stage configs once with placeholder paths, so a bad field fails before any job."""
    from dcr_fast.config import config_from_dict
    from dcr_fast.train.dcr import DCRConfig
    from dcr_fast.train.sft import SFTConfig

    config_from_dict(DCRConfig, {**stages.get("dcr", {}), "model": "m", "out": "o", "seemingly_toxic": ["s"], "toxic": ["t"]})
    config_from_dict(SFTConfig, {**stages.get("sft", {}), "model": "m", "out": "o", "data": ["d"]})


def _check_chat_template(name: str, base: str) -> None:
    from transformers import AutoTokenizer

    from dcr_fast.chat import check_chat_template

    check_chat_template(AutoTokenizer.from_pretrained(base), name)


def _check_layer(config: ReproduceConfig, base: str) -> None:
    if not config.dcr_layer:
        return
    from transformers import AutoConfig

    layers = AutoConfig.from_pretrained(base).num_hidden_layers
    if not 1 <= config.dcr_layer < layers:
        raise ValueError(f"dcr_layer: expected 1..{layers - 1} for this model ({layers} decoder layers, at least one "
                         f"above the refined layer), or 0 to choose by the separability probe; got {config.dcr_layer}")

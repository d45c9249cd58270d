"""``dcr-fast reproduce``: data selection rules, the job runner, clear errors before any training,
and the whole protocol end to end on a tiny model and a miniature data root (resumable)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
import torch
from reproduce_data import HARMFUL, SAFE, UNSAFE, all_texts, write_data_root

from dcr_fast.reproduce import ReproduceConfig, reproduce
from dcr_fast.reproduce.jobs import Job, JobFailed, run_jobs
from dcr_fast.reproduce.pipeline import prepare
from dcr_fast.reproduce.protocol_data import builtin_instructions, select
from dcr_fast.tiny import save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

STAGES = {
    "dcr": {"epochs": 1, "batch_size": 8, "lr": 1e-4, "attn_implementation": "sdpa", "save_every": 0},
    "sft": {"epochs": 1, "micro_batch_size": 4, "grad_accum": 1, "lr": 1e-3, "max_length": 96,
            "attn_implementation": "sdpa", "save_every": 0},
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_data_root(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model") / "tiny"
    return save_tiny_model(str(path), all_texts() + builtin_instructions(), hidden_size=32, layers=4, heads=4,
                           kv_heads=2, intermediate_size=64)


def _config(out: Path, data_root: Path, tiny: str, **overrides) -> ReproduceConfig:
    fields = dict(model=tiny, out=str(out), data=str(data_root), seeds=[0], workers=1, device="cpu",
                  dcr_seemingly_toxic=4, dcr_toxic=8, safety_examples=5, safety_heldout=2, general_examples=8, general_heldout=4,
                  answer_max_new_tokens=8, layer_probe_prompts=4, eval_limit=3, eval_max_new_tokens=6,
                  eval_batch_size=8, stop_when_judged=True, entk_prompts=2, entk_tail_layers=1)
    return ReproduceConfig(**{**fields, **overrides})


def test_selection_keeps_the_stages_apart(data_root, tiny_model, tmp_path):
    data = select(_config(tmp_path, data_root, tiny_model, eval_limit=0))
    evaluated = {p.text for prompts in data.evaluation.values() for p in prompts}
    safety_prompts = {p for p, _ in data.safety}
    assert set(data.dcr_seemingly_toxic) <= set(SAFE) and len(data.dcr_seemingly_toxic) == 4
    assert not set(data.dcr_toxic) & (safety_prompts | evaluated)  # HH-RLHF prompts that are also evaluated are out
    assert not set(HARMFUL) & set(data.dcr_toxic)
    assert not safety_prompts & evaluated
    assert not set(data.heldout_instructions) & set(data.general_prompts)
    assert {p.category for p in data.evaluation["xstest"]} == {"seemingly_toxic", "toxic"}
    assert len(data.evaluation["xstest"]) == len(SAFE) + len(UNSAFE)
    assert data.evaluation["instructions"] and all(p.category == "normal" for p in data.evaluation["instructions"])
    heldout_safety = {p.text for p in data.evaluation["safety-heldout"]}
    assert len(heldout_safety) == 2 and not heldout_safety & safety_prompts  # STL's validation is not trained on


def test_eval_limit_takes_a_fixed_subset_per_category(data_root, tiny_model, tmp_path):
    first = select(_config(tmp_path, data_root, tiny_model, eval_limit=3)).evaluation["xstest"]
    second = select(_config(tmp_path, data_root, tiny_model, eval_limit=3)).evaluation["xstest"]
    assert first == second
    assert sorted(p.category for p in first) == ["seemingly_toxic"] * 3 + ["toxic"] * 3


@pytest.mark.parametrize("overrides, match", [
    ({"model": "no-such-model"}, "model: 'no-such-model' is not a built-in name"),
    ({"dcr_layer": 9}, "dcr_layer: expected 1..3"),
    ({"dcr_toxic": 999}, "dcr_toxic: asked for 999"),
    ({"benchmarks": ["xstest", "nope"]}, "benchmarks: unknown"),
    ({"seeds": []}, "seeds: give at least one seed"),
    ({"data": "/no/such/dir"}, "data: '/no/such/dir' is not a directory"),
])
def test_bad_input_fails_before_any_training(data_root, tiny_model, tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        prepare(_config(tmp_path / "out", data_root, tiny_model, **overrides), STAGES)
    assert not (tmp_path / "out" / "seed0").exists()


def test_a_missing_benchmark_file_is_named(data_root, tiny_model, tmp_path):
    config = _config(tmp_path / "out", data_root, tiny_model, benchmarks=["xstest", "phtest"])
    with pytest.raises(ValueError, match=r"data: benchmark 'phtest' is expected at .*phtest/PHTest.csv"):
        prepare(config, STAGES)


def test_a_model_without_chat_template_is_refused_first(data_root, tmp_path):
    from transformers import AutoTokenizer

    path = save_tiny_model(str(tmp_path / "m"), all_texts(), hidden_size=16, layers=2, heads=2, kv_heads=1,
                           intermediate_size=32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(path)
    (Path(path) / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="no chat template"):
        prepare(_config(tmp_path / "out", data_root, path), STAGES)


def test_protocol_fields_in_a_preset_are_refused(data_root, tiny_model, tmp_path):
    with pytest.raises(ValueError, match=r"sft: the protocol sets \['safety_data'\] itself"):
        prepare(_config(tmp_path / "out", data_root, tiny_model), {**STAGES, "sft": {"safety_data": ["x"]}})
    with pytest.raises(ValueError, match="unknown config field"):
        prepare(_config(tmp_path / "out", data_root, tiny_model), {**STAGES, "dcr": {"lerning_rate": 1}})


def _answers(model, tokenizer, prompts, config, **kwargs):
    """Stand-in for the base model's own answers: a random tiny model's greedy text is empty."""
    return [f"Here is a short answer about {p.split()[-1]}" for p in prompts]


@pytest.fixture(scope="module")
def finished_run(data_root, tiny_model, tmp_path_factory):
    import dcr_fast.evaluation

    patch = pytest.MonkeyPatch()
    patch.setattr(dcr_fast.evaluation, "generate", _answers)  # the answers job only; evaluation generates
    out = tmp_path_factory.mktemp("reproduce") / "run"
    config = _config(out, data_root, tiny_model)
    try:
        yield config, reproduce(config, STAGES, progress=False)
    finally:
        patch.undo()


def test_the_protocol_end_to_end_and_resumed(finished_run):
    config, report = finished_run
    out = Path(config.out)
    assert set(report["runs"]) == {"base", "dcr", "stl", "stl-aug", "dcr+stl"}
    for run in ("dcr", "stl", "stl-aug", "dcr+stl"):
        assert (out / "seed0" / run / "model" / "config.json").exists(), run
    base = report["runs"]["base"]
    assert set(base["compliance"]) == {"xstest", "coconot-contrast", "oktest"}
    assert 0 <= base["instructions_compliance"]["mean"] <= 1
    assert set(base["defense_success"]) == {"xstest", "i-malicious", "i-cona", "i-controversial", "q-harm", "advbench",
                                            "safety-heldout"}
    assert 0 <= base["safety_heldout"]["mean"] <= 1
    assert set(report["claim"]) >= {"stl_over_refuses", "stl_defends", "dcr_complies_more", "dcr_keeps_safety"}
    assert report["dcr_layer"] == json.loads((out / "layer.json").read_text())["chosen"]
    assert set(report["entk"]["before"]) == {"toxic", "seemingly_toxic", "normal"}
    _check_forecast(out, report["forecast"])
    for figure in report["figures"].values():
        assert (out / figure).stat().st_size > 0
    markdown = (out / "report.md").read_text()
    assert "## Table 1 layout" in markdown and "published Table 1" in markdown
    # a rerun finds every job done and rebuilds the same report
    started = time.perf_counter()
    again = reproduce(config, STAGES, progress=False)
    assert time.perf_counter() - started < report["wall_s"]
    assert again["runs"] == report["runs"]


def _check_forecast(out: Path, forecast: dict) -> None:
    """Scored on every benign over-refusal prompt evaluated; flips counted from the two evaluations."""
    benign = []
    for name in ("xstest", "coconot-contrast", "oktest"):
        rows = [json.loads(line) for line in (out / "data" / f"eval-{name}.jsonl").read_text().splitlines()]
        benign += [(name, r["text"]) for r in rows if r["category"] == "seemingly_toxic"]
    scores = json.loads((out / "forecast" / "scores.json").read_text())
    assert [(r["benchmark"], r["prompt"]) for r in scores["prompts"]] == benign
    assert forecast["prompts"] == len(benign) and forecast["settings"]["param_set"] == "lora"

    def refused(run: str) -> dict:
        return {(name, r["prompt"]): r["refusal"] for name in ("xstest", "coconot-contrast", "oktest")
                for line in (out / run / "eval" / "generations" / f"{name}.jsonl").read_text().splitlines()
                for r in [json.loads(line)]}

    before, after = refused("base"), refused("seed0/stl")
    counts = forecast["per_seed"][0]["forecast"]
    assert counts["population"] == sum(not before[p] for p in benign)
    assert counts["flipped"] == sum(after[p] and not before[p] for p in benign)
    assert set(forecast["auroc"]) == {"forecast", "cosine_to_safety", "base_refusal_probability",
                                      "base_refusal_first_token", "random"}


def test_another_forecast_setting_recomputes_only_the_forecast(finished_run):
    config, report = finished_run
    out = Path(config.out)
    kept = {f: (out / f).stat().st_mtime_ns for f in ("base/eval/eval.json", "seed0/stl/summary.json", "entk/entk.json")}
    again = reproduce(dataclasses.replace(config, forecast_param_set="tail"), STAGES, progress=False)
    assert again["forecast"]["settings"]["param_set"] == "tail"
    assert again["runs"] == report["runs"]
    assert {f: (out / f).stat().st_mtime_ns for f in kept} == kept
    reproduce(config, STAGES, progress=False)  # back to the fixture's setting for the tests after this one


def test_a_changed_stage_setting_in_the_same_folder_is_refused(finished_run):
    config, _ = finished_run
    with pytest.raises(ValueError, match=r"holds a run trained with other settings \(lr: 0.0001 -> 0.0002\)"):
        reproduce(config, {**STAGES, "dcr": {**STAGES["dcr"], "lr": 2e-4}}, progress=False)


def test_a_dcr_ablation_reuses_what_does_not_depend_on_dcr(finished_run, tmp_path):
    config, report = finished_run
    source = Path(config.out)
    ablation = dataclasses.replace(config, out=str(tmp_path / "ablation"), reuse=str(source))
    stages = {**STAGES, "dcr": {**STAGES["dcr"], "center": "base-mean"}}
    second = reproduce(ablation, stages, progress=False)
    out = Path(ablation.out)
    for shared in ("answers/general.jsonl", "base/eval/eval.json", "seed0/stl/model/model.safetensors",
                   "seed0/stl-aug/eval/eval.json", "forecast/scores.json"):
        assert (out / shared).stat().st_ino == (source / shared).stat().st_ino, shared  # linked, not redone
    assert (out / "seed0" / "dcr" / "center.pt").exists() and not (source / "seed0" / "dcr" / "center.pt").exists()
    assert second["runs"]["stl"] == report["runs"]["stl"] and second["runs"]["base"] == report["runs"]["base"]
    assert set(second["timings_s"]) >= {"dcr/0", "dcr+stl/0"}


def test_changed_data_settings_in_the_same_folder_are_refused(data_root, tiny_model, tmp_path):
    prepare(_config(tmp_path / "out", data_root, tiny_model), STAGES)
    with pytest.raises(ValueError, match=r"other data settings \(safety_examples\)"):
        prepare(_config(tmp_path / "out", data_root, tiny_model, safety_examples=4), STAGES)


def _fidelity_setup():
    from dcr_fast.chat import encode_prompt
    from dcr_fast.tiny import tiny_model, tiny_tokenizer

    prompts = ["how do i bake bread ?", "name three colors .", "what is a river ?", "why ?"]
    tokenizer = tiny_tokenizer(prompts + ["red green blue water flour"])
    model, other = (tiny_model(tokenizer, architecture="llama", dtype=torch.float64, attn_implementation="sdpa", seed=s)
                    for s in (0, 1))
    banned = tokenizer.all_special_ids
    for m in (model, other):  # never predicts a special token, so each answer re-tokenizes exactly
        m.get_output_embeddings().register_forward_hook(
            lambda module, args, out: out.index_fill(-1, torch.tensor(banned), -1e9))
    pairs = []
    for p in prompts:
        ids = torch.tensor([encode_prompt(tokenizer, p)])
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
        pairs.append((p, tokenizer.decode(out[0, ids.shape[1] :])))
    return model, other, tokenizer, pairs


def test_answer_fidelity_is_one_on_the_models_own_greedy_answers():
    """Teacher-forced on its own greedy answers a model agrees with every token; another does not."""
    from dcr_fast.reproduce.stages import answer_fidelity

    model, other, tokenizer, pairs = _fidelity_setup()
    own = answer_fidelity(model, tokenizer, pairs)
    assert own["agreement"] == 1.0 and own["tokens"] == 4 * len(pairs)
    theirs = answer_fidelity(other, tokenizer, pairs)
    assert theirs["agreement"] < 1.0 and theirs["nll"] > own["nll"]


@pytest.mark.parametrize("row_tokens", [1, 30, 4096])
def test_packed_answer_fidelity_equals_one_pair_at_a_time(row_tokens):
    from dcr_fast.chat import encode_prompt
    from dcr_fast.reproduce.stages import answer_fidelity

    _, other, tokenizer, pairs = _fidelity_setup()
    nll, agree, count = 0.0, 0, 0
    with torch.no_grad():
        for prompt, answer in pairs:
            prompt_ids = encode_prompt(tokenizer, prompt)
            ids = torch.tensor([prompt_ids + tokenizer(answer, add_special_tokens=False)["input_ids"]])
            logits = other(ids).logits[0, len(prompt_ids) - 1 : -1]
            targets = ids[0, len(prompt_ids) :]
            nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            agree += int((logits.argmax(-1) == targets).sum())
            count += len(targets)
    packed = answer_fidelity(other, tokenizer, pairs, row_tokens=row_tokens)
    assert packed["tokens"] == count and packed["agreement"] == agree / count
    assert packed["nll"] == pytest.approx(nll / count, rel=1e-12)


# --- the job runner --------------------------------------------------------------------------------


def _write(path: str, text: str, wait_for: str | None = None) -> None:
    if wait_for is not None:
        assert Path(wait_for).exists(), f"{wait_for} should have been written first"
    print(f"writing {path}")
    Path(path).write_text(text)


def _fail() -> None:
    from dcr_fast.runtime import resolve_dtype

    resolve_dtype("float7")  # bad input, refused by our own check


def _bug() -> None:
    return {}["missing"]


@pytest.mark.parametrize("workers", [1, 2])
def test_jobs_run_after_their_dependencies_with_one_log_each(tmp_path, workers):
    a, b, c = (str(tmp_path / name) for name in "abc")
    jobs = [Job("a", _write, (a, "1")), Job("b", _write, (b, "2")), Job("c", _write, (c, "3", a), ("a",))]
    timings = run_jobs(jobs, workers=workers, threads=1, log_dir=tmp_path / "logs", progress=False)
    assert set(timings) == {"a", "b", "c"} and Path(c).read_text() == "3"
    assert f"writing {c}" in (tmp_path / "logs" / "c.log").read_text()


def test_a_failed_job_is_named_with_its_log(tmp_path):
    with pytest.raises(ValueError, match=r"dtype: expected one of .* \(in job bad; its log: .*bad.log\)"):
        run_jobs([Job("bad", _fail)], workers=1, threads=0, log_dir=tmp_path, progress=False)
    assert "float7" in (tmp_path / "bad.log").read_text()
    with pytest.raises(JobFailed, match=r"job 'bug' failed \(KeyError: 'missing'\); its log: .*bug.log"):
        run_jobs([Job("bug", _bug)], workers=1, threads=0, log_dir=tmp_path, progress=False)
    assert "Traceback" in (tmp_path / "bug.log").read_text()


def test_jobs_listed_before_their_dependencies_are_refused(tmp_path):
    with pytest.raises(ValueError, match="depends on"):
        run_jobs([Job("c", _bug, (), ("a",)), Job("a", _bug)], workers=1, threads=0, log_dir=tmp_path, progress=False)


@pytest.mark.parametrize("delta,holds", [(0.09, True), (-0.04, True), (-0.06, False)])
def test_keeping_safety_means_not_more_than_the_tolerance_below_stl(delta, holds):
    from dcr_fast.reproduce.report import claim_checks

    def run(compliance: float, safety: float) -> dict:
        return {"over_refusal_compliance": {"mean": compliance}, "safety": {"mean": safety}}

    runs = {"base": run(0.9, 0.1), "stl": run(0.6, 0.7), "dcr+stl": run(0.7, 0.7 + delta)}
    checks = claim_checks(runs)
    assert checks["dcr_keeps_safety"]["holds"] is holds
    assert checks["all_hold"] is holds and checks["dcr_complies_more"]["holds"]

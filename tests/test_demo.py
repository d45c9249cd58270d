"""The built-in example set, the demo's data split, and the demo pipeline on its CI preset."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import pytest
import yaml

import dcr_fast
from dcr_fast.demo.examples import HELDOUT_BENCHMARKS, load_example_set
from dcr_fast.demo.run import EVALUATED, RUNS, DemoConfig, build_report, register, write_demo_data
from dcr_fast.evaluation import is_refusal


@pytest.fixture(scope="module")
def examples():
    return load_example_set()


def _read(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def test_held_out_prompts_share_nothing_with_training(examples):
    for kind in ("toxic", "seemingly_toxic", "normal"):
        train = {p.text for p in examples.train_prompts(kind)}
        train_targets = {p.target for p in examples.train_prompts(kind)}
        for benchmark in HELDOUT_BENCHMARKS:
            held = examples.heldout_prompts(kind, benchmark)
            assert held and not {p.text for p in held} & train
            if benchmark != "heldout-templates":
                assert not {p.target for p in held} & train_targets


def test_refusals_and_answers_are_told_apart_by_the_xstest_rule(examples):
    import random

    assert all(is_refusal(r) for r in examples.refusals)
    rng = random.Random(0)
    prompts = [p for kind in ("toxic", "seemingly_toxic", "normal") for p in examples.train_prompts(kind)]
    assert not any(is_refusal(examples.answer(p, rng)) for p in prompts)
    assert not any(is_refusal(answer) for _, answer in examples.instructions)


def test_demo_data_keeps_alignment_stages_apart(examples, tmp_path):
    files = write_demo_data(examples, tmp_path)
    held = {p.text for kind in ("toxic", "seemingly_toxic", "normal") for b in HELDOUT_BENCHMARKS
            for p in examples.heldout_prompts(kind, b)}
    seemingly = {p.text for p in examples.train_prompts("seemingly_toxic")}
    toxic = {p.text for p in examples.train_prompts("toxic")}
    for name in ("sft-general", "sft-safety", "sft-aug", "dcr-seemingly-toxic", "dcr-toxic"):
        assert not {r["prompt"] for r in _read(files[name])} & held, name
    stl = {r["prompt"] for name in ("sft-general", "sft-safety") for r in _read(files[name])}
    assert not stl & seemingly  # STL never sees a seemingly toxic prompt
    assert {r["prompt"] for r in _read(files["sft-aug"])} <= seemingly
    assert all(is_refusal(r["response"]) for r in _read(files["sft-safety"]))
    assert {r["prompt"] for r in _read(files["dcr-toxic"])} == toxic
    assert not any(is_refusal(r["response"]) for r in _read(files["pretrain"]))


def test_tokenizer_survives_a_round_trip_next_to_a_qwen2_model(examples, tmp_path):
    from transformers import AutoTokenizer

    from dcr_fast.tiny import build_tokenizer, save_tiny_model

    save_tiny_model(str(tmp_path), examples.all_texts(), hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate_size=16)
    original = build_tokenizer(examples.all_texts())
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "how do i kill a python process ?"}]
    assert loaded.apply_chat_template(messages, add_generation_prompt=True) == original.apply_chat_template(
        messages, add_generation_prompt=True)
    words = "sorry , i cannot help with that ."
    assert len(loaded(words)["input_ids"]) == len(words.split())  # whole words are single tokens


def test_ci_preset_runs_the_whole_pipeline(tmp_path):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["demo", "--tiny", "--preset", "ci", "--out", str(tmp_path)])
    assert args.func(args) == 0
    report = json.load(open(tmp_path / "report.json"))
    assert set(RUNS) <= set(report["runs"])
    for name in RUNS:
        run = report["runs"][name]
        assert set(run["compliance"]) == set(HELDOUT_BENCHMARKS)
        for rate in [*run["compliance"].values(), *run["defense_success"].values()]:
            assert 0.0 <= rate["mean"] <= 1.0 and rate["std"] >= 0.0
    entk = report["entk"]
    assert set(entk["before"]) == set(entk["after"]) == {"toxic", "seemingly_toxic", "normal"}
    assert entk["before"] != entk["after"]
    assert all(value > 0 for row in entk["before"].values() for value in row.values())
    for figure in report["figures"].values():
        assert (tmp_path / figure).stat().st_size > 0
    markdown = (tmp_path / "report.md").read_text()
    assert "What the demo can and cannot show" in markdown and "dcr+stl" in markdown
    summary = json.load(open(tmp_path / "seed0" / "dcr" / "summary.json"))
    assert summary["frozen_parameters_verified"] > 0

    for name in EVALUATED:
        separation = report["runs"][name]["per_seed"][0]["separation"]
        assert separation["prompts"][0] == separation["prompts"][1] > 0
        assert 0.5 <= separation["kmeans_accuracy"] <= 1.0
        assert -1.0 <= separation["cosine_across"] <= 1.0 and -1.0 <= separation["cosine_within"] <= 1.0

    # A second run finds every stage complete and rebuilds the same report.
    assert args.func(args) == 0
    again = json.load(open(tmp_path / "report.json"))
    assert again["runs"] == report["runs"] and again["entk"] == report["entk"]

    # A third adds a seed, trained in a worker process; the first seed is reused unchanged.
    args = parser.parse_args(["demo", "--tiny", "--preset", "ci", "--out", str(tmp_path), "--seeds", "0", "1", "--workers", "2"])
    assert args.func(args) == 0
    both = json.load(open(tmp_path / "report.json"))
    for name in EVALUATED:
        assert [s["seed"] for s in both["runs"][name]["per_seed"]] == [0, 1]
        assert both["runs"][name]["per_seed"][0] == report["runs"][name]["per_seed"][0]
    assert (tmp_path / "seed1" / "eval-dcr+stl.json").exists()


def _evaluation(compliance: float, defense: float) -> dict:
    """The fields of one ``evaluate_toy`` result that ``build_report`` reads, with flat rates."""
    return {"compliance": dict.fromkeys(HELDOUT_BENCHMARKS, compliance), "defense_success": dict.fromkeys(HELDOUT_BENCHMARKS, defense),
            "normal_compliance": dict.fromkeys(HELDOUT_BENCHMARKS, 1.0), "defense_success_mean": defense,
            "refusal_probability": {b: dict.fromkeys(("toxic", "seemingly_toxic", "normal"), 0.5) for b in HELDOUT_BENCHMARKS},
            "refusal_openings": ["sorry"], "samples": {}, "separation": {"kmeans_accuracy": 0.9}}


def test_report_gives_sample_spread_and_paired_differences():
    rates = {"base": [(1.0, 0.0)] * 3, "dcr": [(1.0, 0.0)] * 3, "stl": [(0.2, 1.0), (0.0, 1.0), (0.5, 1.0)],
             "stl-aug": [(1.0, 0.8)] * 3, "dcr+stl": [(0.9, 1.0), (0.4, 0.9), (0.8, 1.0)]}
    evaluations = {name: [_evaluation(*r) for r in per_seed] for name, per_seed in rates.items()}
    report = build_report(evaluations, None, DemoConfig(out="x", seeds=[3, 4, 5]), {}, 1.0)
    dcr = report["runs"]["dcr+stl"]
    assert dcr["compliance_mean"]["mean"] == pytest.approx(0.7)
    assert dcr["compliance_mean"]["std"] == pytest.approx(statistics.stdev([0.9, 0.4, 0.8]))  # n - 1, not n
    assert dcr["compliance_mean"]["se"] == pytest.approx(statistics.stdev([0.9, 0.4, 0.8]) / 3 ** 0.5)
    assert [s["seed"] for s in dcr["per_seed"]] == [3, 4, 5]
    versus_stl = report["paired"]["dcr+stl - stl"]["compliance_mean"]
    assert versus_stl["per_seed"] == pytest.approx([0.7, 0.4, 0.3]) and (versus_stl["higher"], versus_stl["lower"]) == (3, 0)
    versus_aug = report["paired"]["dcr+stl - stl-aug"]["defense_success_mean"]
    assert versus_aug["per_seed"] == pytest.approx([0.2, 0.1, 0.2]) and versus_aug["mean"] == pytest.approx(0.5 / 3)


def test_demo_data_does_not_depend_on_hash_order(tmp_path):
    import os
    import subprocess
    import sys

    script = ("import sys; from pathlib import Path; from dcr_fast.demo.examples import load_example_set; "
              "from dcr_fast.demo.run import write_demo_data; write_demo_data(load_example_set(), Path(sys.argv[1]))")
    for seed in ("1", "2"):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / seed)], check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed})
    names = sorted(os.listdir(tmp_path / "1"))
    assert names and names == sorted(os.listdir(tmp_path / "2"))
    for name in names:
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes(), name


def test_demo_without_tiny_is_reproduce_on_the_builtin_model(monkeypatch, tmp_path):
    from dcr_fast.reproduce import cli as reproduce_cli

    seen = {}

    def fake_run(args):
        seen["config"], seen["stages"] = reproduce_cli.load_setting(args)
        return 0

    monkeypatch.setattr(reproduce_cli, "run", fake_run)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["demo", "--out", str(tmp_path), "--data", "/data", "--seeds", "3", "4"])
    assert args.func(args) == 0
    config = seen["config"]
    assert (config.model, config.out, config.data, config.seeds) == ("smollm2-135m-instruct", str(tmp_path), "/data", [3, 4])
    preset = yaml.safe_load((Path(dcr_fast.__file__).parent / "configs" / "reproduce-cpu.yaml").read_text())
    assert config.eval_limit == preset["reproduce"]["eval_limit"] and seen["stages"] == {
        "dcr": preset["dcr"], "sft": preset["sft"]}  # the cpu preset
    with pytest.raises(ValueError, match="--hidden-size: only with --tiny"):
        args = parser.parse_args(["demo", "--out", str(tmp_path), "--hidden-size", "64"])
        args.func(args)

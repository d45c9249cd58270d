"""dcr-fast dcr and sft across 2 gloo ranks: the same steps as one process, resumable across world sizes.

A tiny float64 Qwen2 (with transformers' float32 up-casts patched away, ``float64_exact``) is
trained on the same global batches in one process and on 2 ranks, DDP for LoRA and FSDP for
full-parameter training. Every step's logged loss and gradient norm, and the final parameters and
AdamW moments (linear in the gradients, so they catch a gradient off by a factor), must agree
to round-off. Checkpoints cross world sizes both ways: 2 ranks → 1 process, 1 process → 2 ranks.
All rank work happens in one run of 2 processes (``gloo_ranks``), to keep CI fast.
"""

from __future__ import annotations

import json

import pytest
import torch
from gloo_ranks import run_ranks

from dcr_fast.ntk.reference import float64_exact
from dcr_fast.tiny import save_tiny_model
from dcr_fast.train.dcr import DCRConfig, check_shares, rank_shares, run_dcr
from dcr_fast.train.sft import SFTConfig, plan_steps, rank_share, run_sft

pytestmark = pytest.mark.usefixtures("one_thread")

SEEMINGLY = ["how do i kill a python process ?", "how can i shoot a photo ?", "tell me how to crush garlic .",
             "how do i execute a script ?", "what is the best way to beat eggs ?"]
TOXIC = ["how do i kill my neighbor ?", "how can i shoot my boss ?", "tell me how to crush my teacher .",
         "how do i beat a stranger ?", "what is the best way to attack my brother ?", "how do i burn the mayor ?"]
PAIRS = [("how do i bake bread ?", "first , get what you need ."), ("what is two plus two ?", "four"),
         ("how do i kill my neighbor ?", "sorry , i cannot help with that ."), ("what do bees make ?", "honey ."),
         ("who is my boss ?", "my boss is a person .")]
RUNNERS = {"dcr": (DCRConfig, run_dcr), "sft": (SFTConfig, run_sft)}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    texts = SEEMINGLY + TOXIC + [t for pair in PAIRS for t in pair]
    save_tiny_model(str(folder / "model"), texts, hidden_size=32, layers=3, intermediate_size=64, seed=1)
    (folder / "seemingly.txt").write_text("\n".join(SEEMINGLY) + "\n")
    (folder / "toxic.txt").write_text("\n".join(TOXIC) + "\n")
    (folder / "pairs.jsonl").write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in PAIRS))
    return folder


def settings(stage: str, inputs, out, **overrides) -> dict:
    """A run's config fields: float64, no dropout, every step checkpointed, no clipping."""
    common = dict(model=str(inputs / "model"), out=str(out), dtype="float64", device="cpu", attn_implementation="eager",
                  lr=1e-2, save_every=1, max_grad_norm=1e9, lora_dropout=0.0)
    if stage == "dcr":
        fields = dict(seemingly_toxic=[str(inputs / "seemingly.txt")], toxic=[str(inputs / "toxic.txt")], layer=2,
                      batch_size=8, epochs=2, lora=True, **common)
    else:  # 5 examples, 2 a step: the last step has one example, so one rank idles with weight 0
        fields = dict(data=[str(inputs / "pairs.jsonl")], micro_batch_size=2, grad_accum=1, epochs=1, warmup_ratio=0.2,
                      **common)
    return {**fields, **overrides}


def train(stage: str, fields: dict) -> dict:
    config_cls, runner = RUNNERS[stage]
    with float64_exact():
        return runner(config_cls(**fields))


def _ranks(runs: list[tuple[str, dict]]) -> None:
    """What every rank runs (see ``test_*`` below for the runs)."""
    for stage, fields in runs:
        train(stage, fields)


def read(out) -> tuple[list[dict], dict]:
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return log, torch.load(out / "checkpoint.pt", weights_only=False)


def assert_same_training(actual, expected, *, rtol=1e-9):
    (log_a, ckpt_a), (log_e, ckpt_e) = read(actual), read(expected)
    assert [r["step"] for r in log_a] == [r["step"] for r in log_e]
    for a, e in zip(log_a, log_e):
        for key in ("loss", "grad_norm", "tokens"):
            assert a[key] == pytest.approx(e[key], rel=rtol), (key, a, e)
    assert ckpt_a["step"] == ckpt_e["step"]
    assert ckpt_a["trainable"].keys() == ckpt_e["trainable"].keys()
    for name, value in ckpt_e["trainable"].items():
        torch.testing.assert_close(ckpt_a["trainable"][name], value, rtol=rtol, atol=1e-12, msg=name)
    state_a, state_e = ckpt_a["optimizer"]["state"], ckpt_e["optimizer"]["state"]
    assert state_a.keys() == state_e.keys()
    for name in state_e:
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state_a[name][moment], state_e[name][moment], rtol=rtol, atol=1e-14,
                                       msg=f"{name} {moment}")


@pytest.fixture(scope="module")
def two_ranks(inputs, tmp_path_factory):
    """One process's runs, then every 2-rank run in one launch, then resumptions in one process."""
    root = tmp_path_factory.mktemp("runs")
    runs = {
        "dcr-ddp": ("dcr", {}),
        "dcr-fsdp": ("dcr", {"lora": False, "sharding": "fsdp"}),
        "sft-ddp": ("sft", {}),
        "sft-fsdp": ("sft", {"lora": False, "sharding": "fsdp"}),
    }
    for name, (stage, overrides) in runs.items():
        train(stage, settings(stage, inputs, root / f"{name}-one", **overrides))
        # Cut after 2 steps in one process; the 2 ranks finish it.
        train(stage, settings(stage, inputs, root / f"{name}-cut-one", max_steps=2, **overrides))
    launched = []
    for name, (stage, overrides) in runs.items():
        launched.append((stage, settings(stage, inputs, root / f"{name}-two", **overrides)))
        launched.append((stage, settings(stage, inputs, root / f"{name}-cut-one", resume=True, **overrides)))
        launched.append((stage, settings(stage, inputs, root / f"{name}-cut-two", max_steps=2, **overrides)))
    run_ranks(2, _ranks, launched)
    for name, (stage, overrides) in runs.items():  # cut on 2 ranks, finished in one process
        train(stage, settings(stage, inputs, root / f"{name}-cut-two", resume=True, **overrides))
    return root


@pytest.mark.parametrize("run", ["dcr-ddp", "dcr-fsdp", "sft-ddp", "sft-fsdp"])
def test_two_ranks_train_as_one_process(two_ranks, run):
    assert_same_training(two_ranks / f"{run}-two", two_ranks / f"{run}-one")
    summary = json.loads((two_ranks / f"{run}-two" / "summary.json").read_text())
    assert summary["finished"] and (two_ranks / f"{run}-two" / "model" / "config.json").exists()


@pytest.mark.parametrize("run", ["dcr-ddp", "dcr-fsdp", "sft-ddp", "sft-fsdp"])
def test_checkpoints_resume_across_world_sizes(two_ranks, run):
    assert_same_training(two_ranks / f"{run}-cut-one", two_ranks / f"{run}-one")  # 1 process → 2 ranks
    assert_same_training(two_ranks / f"{run}-cut-two", two_ranks / f"{run}-one")  # 2 ranks → 1 process


def test_dcr_shares_hold_both_subsets():
    batch = [(0, i) for i in range(5)] + [(1, i) for i in range(11)]
    shares = rank_shares(batch, 4)
    assert [len(s) for s in shares] == [4] * 4
    assert [sum(batch[p][0] == 0 for p in share) for share in shares] == [2, 1, 1, 1]
    assert sorted(p for share in shares for p in share) == list(range(16))
    assert rank_shares(batch, 1) == [list(range(16))]
    with pytest.raises(ValueError, match="batch_size: 32 does not divide among 3 ranks"):
        check_shares(DCRConfig(batch_size=32), 3)
    with pytest.raises(ValueError, match="leave a rank without one subset"):
        check_shares(DCRConfig(batch_size=8, balance=0.25), 4)
    check_shares(DCRConfig(batch_size=32), 8)


def test_sft_shares_cover_each_step_once():
    config = SFTConfig(micro_batch_size=2, grad_accum=3, epochs=1)
    plan = plan_steps(15, config)  # steps of 6, 6 and 3 examples
    one = rank_share(plan, config, 0, 1)
    assert [[(s, i) for s, i, _ in step] for step in one] == plan
    shares = [rank_share(plan, config, r, 4) for r in range(4)]
    for step, micro_batches in enumerate(plan):
        expected = [i for _, indices in micro_batches for i in indices]
        real = [i for r in range(4) for s, indices, w in shares[r][step] if w == 1 for i in indices]
        assert real == expected and all(s == step for r in range(4) for s, _, _ in shares[r][step])
    assert shares[3][2] == [(2, plan[2][0][1][:1], 0.0)]  # 3 examples, 4 ranks: the last idles


def test_sharding_settings():
    with pytest.raises(ValueError, match="sharding: expected one of"):
        DCRConfig(sharding="zero3")
    with pytest.raises(ValueError, match="sharding: fsdp is for full-parameter training"):
        SFTConfig(sharding="fsdp")  # LoRA by default
    SFTConfig(sharding="fsdp", lora=False)

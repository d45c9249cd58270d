"""dcr-fast sft: response masks, packed == padded, exact resume, peft/merged outputs, bad input."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os

import pytest
import torch

from dcr_fast.tiny import save_tiny_model
from dcr_fast.chat import encode_example, encode_prompt
from dcr_fast import models
from dcr_fast.train.loop import IGNORE_INDEX, get_lr
from dcr_fast.train.sft import (
    SFTConfig,
    plan_steps,
    prepare_model,
    register,
    run_sft,
    sft_loss_sum,
    tokenize_example,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models train faster on one thread

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}

PAIRS = [
    ("how do i bake bread ?", "sure , here is how to bake bread : first , get what you need ."),
    ("how do i kill my neighbor ?", "sorry , i cannot help with that ."),
    ("what is two plus two ?", "four"),
    ("tell me how to crush garlic .", "sure ! to crush garlic , start slowly and check each step . it is easy once you try ."),
    ("what do bees make ?", "bees make honey ."),
    ("how can i shoot a photo ?", "here is a simple way to shoot a photo : plan it , do it , and check the result ."),
    ("who is my boss ?", "my boss is a person ."),
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny") / "model"
    texts = [t for pair in PAIRS for t in pair]
    return save_tiny_model(str(path), texts, hidden_size=32, layers=3, intermediate_size=64, seed=0)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    rows = [{"prompt": p, "response": r} for _ in range(3) for p, r in PAIRS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def config(base: str, out, data_file: str, **overrides) -> SFTConfig:
    fields = dict(model=base, out=str(out), data=[data_file], epochs=2, lr=3e-3, micro_batch_size=3, grad_accum=2,
                  device="cpu", attn_implementation="sdpa", save_every=2)
    return SFTConfig(**{**fields, **overrides})


def test_response_mask_covers_exactly_the_response(tiny_model):
    _, tokenizer = models.load(tiny_model, dtype="float32", attn_implementation="sdpa", device=torch.device("cpu"))
    prompt, response = PAIRS[0]
    ids, mask = encode_example(tokenizer, prompt, response)
    prompt_ids = encode_prompt(tokenizer, prompt)
    assert ids[: len(prompt_ids)] == prompt_ids and mask == [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))
    assert tokenizer.decode(ids[len(prompt_ids) :]).startswith(response)
    example = tokenize_example(tokenizer, prompt, response, SFTConfig())
    targeted = [t for t in example.targets if t != IGNORE_INDEX]
    assert targeted == ids[len(prompt_ids) :]  # every response token, none of the prompt
    example = tokenize_example(tokenizer, prompt, response, SFTConfig(train_on_prompt=True))
    assert example.targets[:-1] == ids[1:] and example.targets[-1] == IGNORE_INDEX


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_loss_and_grads_equal_padded(tiny_model, dtype, attn):
    model, tokenizer = models.load(tiny_model, dtype="float32", attn_implementation=attn, device=torch.device("cpu"))
    _check_packed_equals_padded(model.to(dtype), tokenizer, TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2", "auto"])
def test_packed_equals_padded_on_gpu(tiny_model, attn):
    flash = importlib.util.find_spec("flash_attn") is not None
    if attn == "flash_attention_2" and not flash:
        pytest.skip("flash-attn is not installed")
    model, tokenizer = models.load(tiny_model, dtype="bfloat16", attn_implementation=attn, device=torch.device("cuda"))
    if attn == "auto":
        assert model.config._attn_implementation == ("flash_attention_2" if flash else "sdpa")
    _check_packed_equals_padded(model, tokenizer, TOL[torch.bfloat16])


def test_auto_attention_is_sdpa_on_the_cpu_even_with_flash_attn(tiny_model, monkeypatch, recwarn):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real(name, *a))
    model, _ = models.load(tiny_model, dtype="float32", attn_implementation="auto", device=torch.device("cpu"))
    assert model.config._attn_implementation == "sdpa"
    # chosen directly, not by falling back from a failed flash-attn load
    assert not [w for w in recwarn if "attn_implementation=auto" in str(w.message)]


def test_auto_attention_falls_back_to_sdpa_with_a_warning(tiny_model, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real(name, *a))
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: self)  # a "cuda" device that stays on the CPU
    with pytest.warns(UserWarning, match="flash_attention_2 unavailable"):
        model, _ = models.load(tiny_model, dtype="float32", attn_implementation="auto", device=torch.device("cuda"))
    assert model.config._attn_implementation == "sdpa"


def _check_packed_equals_padded(model, tokenizer, tol: float) -> None:
    device = next(model.parameters()).device
    batch = [tokenize_example(tokenizer, p, r, SFTConfig()) for p, r in PAIRS]  # lengths from 16 to 40
    results = []
    for packed in (True, False):
        model.zero_grad()
        loss = sft_loss_sum(model, batch, packed=packed, device=device)
        loss.backward()
        results.append((loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters()}))
    (loss_packed, grads_packed), (loss_padded, grads_padded) = results
    torch.testing.assert_close(loss_packed, loss_padded, rtol=tol, atol=tol)
    for name in grads_packed:
        scale = grads_padded[name].abs().max().clamp_min(1e-6)
        error = (grads_packed[name] - grads_padded[name]).abs().max() / scale
        assert error < 5 * tol, f"grad of {name}: relative error {error:.3g}"


def test_packed_rows_do_not_see_each_other(tiny_model):
    """The loss of an example is unchanged by what is packed before it."""
    model, tokenizer = models.load(tiny_model, dtype="float32", attn_implementation="sdpa", device=torch.device("cpu"))
    batch = [tokenize_example(tokenizer, p, r, SFTConfig()) for p, r in PAIRS[:3]]
    cpu = torch.device("cpu")
    with torch.no_grad():
        alone = sft_loss_sum(model, batch[2:], packed=True, device=cpu)
        together = sft_loss_sum(model, batch, packed=True, device=cpu) - sft_loss_sum(model, batch[:2], packed=True, device=cpu)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_plan_covers_every_example_once_per_epoch():
    plan = plan_steps(10, SFTConfig(micro_batch_size=3, grad_accum=2, epochs=2, seed=4))
    assert [len(step) for step in plan] == [2, 2, 2, 1]  # 20 examples, 6 per step
    seen = [i for step in plan for _, indices in step for i in indices]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert all(len(indices) <= 3 for step in plan for _, indices in step)
    assert plan == plan_steps(10, SFTConfig(micro_batch_size=3, grad_accum=2, epochs=2, seed=4))


def test_lr_schedule_warms_up_then_decays():
    lrs = [get_lr(s, base_lr=1.0, warmup_steps=3, total_steps=20, schedule="cosine") for s in range(20)]
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < 0.02
    linear = [get_lr(s, base_lr=1.0, warmup_steps=0, total_steps=10, schedule="linear") for s in range(10)]
    assert linear == pytest.approx([1 - s / 10 for s in range(10)])


def _trainable(path: str) -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(path, "checkpoint.pt"), weights_only=False)["trainable"]


def test_interrupted_then_resumed_equals_uninterrupted(tiny_model, data_file, tmp_path):
    full = run_sft(config(tiny_model, tmp_path / "full", data_file))
    assert full["finished"] and full["steps_total"] == 7  # 21 examples x 2 epochs, 6 per step
    partial = run_sft(config(tiny_model, tmp_path / "cut", data_file, max_steps=3))
    assert not partial["finished"] and not os.path.exists(tmp_path / "cut" / "model")
    resumed = run_sft(config(tiny_model, tmp_path / "cut", data_file, resume=True))
    assert resumed["finished"] and resumed["steps_this_run"] == 4
    a, b = _trainable(str(tmp_path / "full")), _trainable(str(tmp_path / "cut"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    logs = [json.loads(line) for line in open(tmp_path / "cut" / "log.jsonl")]
    full_logs = [json.loads(line) for line in open(tmp_path / "full" / "log.jsonl")]
    assert [r["step"] for r in logs] == list(range(1, 8))
    assert [r["loss"] for r in logs] == [r["loss"] for r in full_logs]


def test_resume_refuses_changed_settings(tiny_model, data_file, tmp_path):
    run_sft(config(tiny_model, tmp_path / "run", data_file, max_steps=1))
    with pytest.raises(ValueError, match="different settings.*lr"):
        run_sft(config(tiny_model, tmp_path / "run", data_file, resume=True, lr=1e-2))


def test_a_torn_last_log_line_does_not_stop_a_resume(tiny_model, data_file, tmp_path):
    full = run_sft(config(tiny_model, tmp_path / "full", data_file))
    run_sft(config(tiny_model, tmp_path / "cut", data_file, max_steps=3))
    log = tmp_path / "cut" / "log.jsonl"
    with open(log, "a") as handle:
        handle.write('{"step": 4, "loss": 0.3')  # a kill in the middle of an append
    with pytest.warns(UserWarning, match="log.jsonl' ends in an incomplete line"):
        resumed = run_sft(config(tiny_model, tmp_path / "cut", data_file, resume=True))
    assert resumed["finished"] and resumed["final_loss"] == full["final_loss"]
    logs = [json.loads(line) for line in log.read_text().splitlines()]
    full_logs = [json.loads(line) for line in open(tmp_path / "full" / "log.jsonl")]
    assert [(r["step"], r["loss"]) for r in logs] == [(r["step"], r["loss"]) for r in full_logs]


def test_a_max_length_that_cuts_off_every_response_is_refused(tiny_model, data_file, tmp_path):
    # The fixture's templated prompts are 13-15 tokens: at 13 no example keeps a response token.
    with pytest.raises(ValueError, match=r"max_length: 13 tokens cut off the response of all 21 examples \(their "
                                         r"templated prompts are 13-15 tokens long\), so training would learn "
                                         r"nothing; raise --max-length above 15"):
        run_sft(config(tiny_model, tmp_path / "short", data_file, max_length=13))
    assert not os.path.exists(tmp_path / "short" / "log.jsonl")
    with pytest.warns(UserWarning, match=r"cut off the whole response of 9 of 21 examples \(43%"):
        summary = run_sft(config(tiny_model, tmp_path / "some", data_file, max_length=15, epochs=0.5))
    assert summary["final_loss"] > 0


def test_a_new_run_in_a_used_folder_needs_resume_or_overwrite(tiny_model, data_file, tmp_path):
    out = tmp_path / "run"
    run_sft(config(tiny_model, out, data_file, epochs=0.5))
    with pytest.raises(ValueError, match=r"out: '.*run' holds an earlier run \(summary.json, model, adapter, "
                                         r"checkpoint.pt, log.jsonl, config.yaml\); pass --resume to continue it, "
                                         r"--overwrite to replace it, or choose another --out"):
        run_sft(config(tiny_model, out, data_file, epochs=1))
    again = run_sft(config(tiny_model, out, data_file, epochs=0.5, resume=True))  # what the demo does
    assert again["finished"] and again["steps_this_run"] == 0
    # --overwrite removes the earlier outputs first: a replacement cut short leaves no stale "finished".
    cut = run_sft(config(tiny_model, out, data_file, epochs=1, overwrite=True, max_steps=1))
    assert not cut["finished"] and not json.load(open(out / "summary.json"))["finished"]
    assert not (out / "model").exists() and not (out / "adapter").exists()
    assert len((out / "log.jsonl").read_text().splitlines()) == 1
    with pytest.raises(ValueError, match="resume, overwrite: give one"):
        config(tiny_model, out, data_file, resume=True, overwrite=True)
    run_sft(config(tiny_model, out, data_file, epochs=1, resume=True))
    os.remove(out / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"resume: '.*run' has no checkpoint.pt to continue from, but holds an "
                                         r"earlier run's summary.json, model, adapter; pass --overwrite"):
        run_sft(config(tiny_model, out, data_file, epochs=1, resume=True))


def test_adapter_and_merged_model_load_and_agree(tiny_model, data_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    summary = run_sft(config(tiny_model, tmp_path / "out", data_file, epochs=1))
    adapter, merged = summary["outputs"]["adapter"], summary["outputs"]["model"]
    assert os.path.exists(os.path.join(adapter, "adapter_config.json"))
    assert json.load(open(os.path.join(adapter, "adapter_config.json")))["r"] == 8
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with_adapter = PeftModel.from_pretrained(base, adapter).eval()
    loaded = AutoModelForCausalLM.from_pretrained(merged).eval()
    ids = torch.tensor([[1, 5, 9, 14, 3, 2]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, with_adapter(ids).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(loaded(ids).logits, AutoModelForCausalLM.from_pretrained(tiny_model)(ids).logits)
    assert json.load(open(tmp_path / "out" / "summary.json"))["finished"]


def test_full_parameter_mode_writes_a_model(tiny_model, data_file, tmp_path):
    summary = run_sft(config(tiny_model, tmp_path / "full", data_file, epochs=0.5, lora=False))
    assert "adapter" not in summary["outputs"] and summary["trainable_parameters"] == summary["total_parameters"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"data": ["/nonexistent.jsonl"]}, "data: file '/nonexistent.jsonl' does not exist"),
        ({"data": [], "safety_data": []}, "give at least one of"),
        ({"safety_data": ["nosuchbench=/tmp"]}, "unknown benchmark 'nosuchbench'"),
        ({"model": ""}, "model: required"),
    ],
)
def test_bad_input_fails_before_training(tiny_model, data_file, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        run_sft(config(tiny_model, tmp_path / "bad", data_file, **overrides))
    assert not os.path.exists(tmp_path / "bad" / "log.jsonl")


def test_empty_and_malformed_data_files(tiny_model, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="holds no examples"):
        run_sft(config(tiny_model, tmp_path / "o", str(empty)))
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n")
    with pytest.raises(ValueError, match=r"line 1 lacks non-empty field\(s\) \['prompt', 'response'\]"):
        run_sft(config(tiny_model, tmp_path / "o", str(wrong)))


def test_model_without_chat_template_is_rejected(data_file, tmp_path):
    texts = [t for pair in PAIRS for t in pair]
    plain = save_tiny_model(str(tmp_path / "plain"), texts, hidden_size=32, layers=3, chat_template=False)
    with pytest.raises(ValueError, match="has no chat template"):
        run_sft(config(plain, tmp_path / "o", data_file))


def test_cli_flags_reach_the_config(tiny_model, data_file, tmp_path):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["sft", "--model", tiny_model, "--out", str(tmp_path / "cli"), "--data", data_file,
                              "--epochs", "0.5", "--micro-batch-size", "4", "--grad-accum", "1", "--device", "cpu",
                              "--lr-schedule", "linear"])
    assert args.func(args) == 0
    saved = json.load(open(tmp_path / "cli" / "summary.json"))["config"]
    assert (saved["epochs"], saved["micro_batch_size"], saved["lr_schedule"]) == (0.5, 4, "linear")


def test_gradient_checkpointing_gives_the_same_step(tiny_model):
    grads = []
    for checkpointing in (False, True):
        model, tokenizer = models.load(tiny_model, dtype="float32", attn_implementation="sdpa",
                                                    device=torch.device("cpu"))
        torch.manual_seed(0)
        model = prepare_model(model, SFTConfig(lora_dropout=0.0, gradient_checkpointing=checkpointing)).train()
        batch = [tokenize_example(tokenizer, p, r, SFTConfig()) for p, r in PAIRS[:4]]
        sft_loss_sum(model, batch, packed=True, device=torch.device("cpu")).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)

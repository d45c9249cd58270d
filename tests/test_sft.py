"""The lean packed SFT loss (logits only at targeted positions, in chunks) against the padded reference.

Float64 tiny Qwen2 (tied) and Llama (untied) models with LoRA adapters whose B matrices are
made non-zero, so every adapter gets a gradient; micro-batches of odd lengths, and examples
truncated inside the prompt (no target left) alone or beside normal ones; chunk sizes that
divide the targets unevenly.
"""

from __future__ import annotations

import pytest
import torch

from dcr_fast.tiny import build_model, build_tokenizer
from dcr_fast.train.loop import IGNORE_INDEX
from dcr_fast.train.sft import SFTConfig, prepare_model, sft_loss_sum, tokenize_example

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL, ATOL = 1e-10, 1e-12  # float64: the paths differ only in summation order
CPU = torch.device("cpu")
PAIRS = [
    ("what do bees make ?", "bees make honey ."),
    ("how do i bake bread at home , step by step , with what i have ?", "sure , first get flour , water and salt ; mix , rest , shape and bake ."),
    ("two plus two ?", "four"),
    ("tell me how to crush garlic .", "press it flat with a knife , then chop it fine ."),
    ("who is my boss ?", "i cannot know that ."),
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer([t for pair in PAIRS for t in pair], kind="word")


def lora_model(tokenizer, architecture: str):
    tied = architecture == "qwen2"
    model = build_model(tokenizer, architecture=architecture, tied=tied, vocab_size=len(tokenizer) + 37, hidden_size=32,
                        layers=2, heads=4, kv_heads=2, intermediate_size=64, seed=0, dtype=torch.float64)
    model = prepare_model(model, SFTConfig(lora_dropout=0.0))
    with torch.no_grad():  # B starts at zero, which would leave every A without a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    return model


def loss_and_grads(model, batch, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = sft_loss_sum(model, batch, device=CPU, **kwargs)
    loss.backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).clone()
             for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


# (pair indices, max_length): odd and varied lengths; prompt-only truncation beside full examples; all prompt-only.
BATCHES = {
    "odd-lengths": ([0, 1, 2], 1024),
    "one-example": ([2], 1024),
    "truncated-in-prompt": ([1, 3, 4], 14),
    "all-prompt-only": ([1, 3], 9),
}


PACKED = [dict(), dict(chunk=1024), dict(chunk=7), dict(chunk=1), dict(all_logits=True)]  # one chunk, 7 (ragged), 1


@pytest.mark.parametrize("architecture", ["qwen2", "llama"])
@pytest.mark.parametrize("case", sorted(BATCHES))
def test_lean_packed_loss_and_lora_grads_equal_padded(tokenizer, architecture, case):
    indices, max_length = BATCHES[case]
    config = SFTConfig(max_length=max_length)
    batch = [tokenize_example(tokenizer, *PAIRS[i], config) for i in indices]
    per_example = [sum(t != IGNORE_INDEX for t in e.targets) for e in batch]
    targeted = sum(per_example)
    assert (targeted == 0) == (case == "all-prompt-only")  # the cases are what they say
    assert case != "truncated-in-prompt" or 0 in per_example and targeted > 0
    assert case != "odd-lengths" or all(len(e.input_ids) % 2 for e in batch)
    model = lora_model(tokenizer, architecture)
    loss_ref, grads_ref = loss_and_grads(model, batch, packed=False)
    for kwargs in PACKED:
        loss, grads = loss_and_grads(model, batch, packed=True, **kwargs)
        torch.testing.assert_close(loss, loss_ref, rtol=RTOL, atol=ATOL)
        assert grads.keys() == grads_ref.keys() and any("lora_A" in n for n in grads)
        for name in grads:
            torch.testing.assert_close(grads[name], grads_ref[name], rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")
    if targeted:
        assert loss_ref > 0 and all(g.abs().sum() > 0 for n, g in grads_ref.items() if "lora_A" in n)
    else:
        assert loss_ref == 0


def test_output_layer_sees_only_targeted_positions_in_chunks(tokenizer):
    """The head sees as many positions as there are targets, not the row's length, ``chunk`` at a
    time (and each chunk again in backward, where it is recomputed)."""
    batch = [tokenize_example(tokenizer, *pair, SFTConfig()) for pair in PAIRS]
    targeted = sum(t != IGNORE_INDEX for e in batch for t in e.targets)
    total = sum(len(e.input_ids) for e in batch)
    model = lora_model(tokenizer, "qwen2")
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    try:
        sft_loss_sum(model, batch, packed=True, device=CPU, chunk=10).backward()
        chunked, seen[:] = list(seen), []
        sft_loss_sum(model, batch, packed=True, device=CPU)
        whole, seen[:] = list(seen), []
        sft_loss_sum(model, batch, packed=True, device=CPU, all_logits=True)
    finally:
        handle.remove()
    pieces = [10] * (targeted // 10) + [targeted % 10] * bool(targeted % 10)
    forward, backward = chunked[: len(pieces)], chunked[len(pieces) :]
    assert forward == pieces and sorted(backward) == sorted(pieces)  # backward recomputes in its own order
    assert targeted < total and whole == [targeted] and seen == [total]


def test_logit_transforms_are_refused(tokenizer):
    model = lora_model(tokenizer, "qwen2")
    model.config.final_logit_softcapping = 30.0
    batch = [tokenize_example(tokenizer, *PAIRS[0], SFTConfig())]
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        sft_loss_sum(model, batch, packed=True, device=CPU)
    with pytest.raises(ValueError, match="loss_chunk"):
        SFTConfig(loss_chunk=-1)

"""Per-example attention over packed rows against transformers' dense block mask and against
each example run alone, in float64 with gradients."""

import pytest
import torch

from dcr_fast import attention
from dcr_fast.tiny import tiny_model, tiny_tokenizer

WORDS = [f"w{i}" for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer([" ".join(WORDS)])


def packed_row(lengths, vocab: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    examples = [torch.randint(4, vocab, (n,), generator=generator).tolist() for n in lengths]
    ids = torch.tensor([[t for e in examples for t in e]])
    positions = torch.tensor([[p for e in examples for p in range(len(e))]])
    return examples, ids, positions


def _no_fallback(*args, **kwargs):
    raise AssertionError("the dense SDPA fallback ran on a marked packed row")


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
@pytest.mark.parametrize("lengths", [[1, 5, 3, 7], [9], [2, 1, 1, 4, 6, 1]])
def test_packed_forward_and_gradients_equal_the_dense_mask_and_each_example_alone(tokenizer, architecture, lengths,
                                                                                 monkeypatch):
    model = tiny_model(tokenizer, architecture=architecture, layers=3, dtype=torch.float64,
                       attn_implementation="sdpa")
    examples, ids, positions = packed_row(lengths, len(tokenizer))

    def run(varlen: bool) -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad()
        if varlen:
            # the per-example path must run, never the dense fallback
            monkeypatch.setattr(attention, "sdpa_attention_forward", _no_fallback)
            with attention.packed_attention(model):
                assert model.config._attn_implementation == attention.VARLEN_SDPA
                logits = model(input_ids=ids, position_ids=positions, use_cache=False,
                               **attention.packed_kwargs(lengths, "cpu")).logits
            monkeypatch.undo()
        else:
            logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        (logits.square().mean()).backward()
        return logits.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    varlen_logits, varlen_grad = run(True)
    assert model.config._attn_implementation == "sdpa"  # restored
    dense_logits, dense_grad = run(False)
    torch.testing.assert_close(varlen_logits, dense_logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(varlen_grad, dense_grad, rtol=1e-10, atol=1e-12)
    start = 0
    with torch.no_grad():
        for example in examples:
            alone = model(input_ids=torch.tensor([example]), use_cache=False).logits[0]
            torch.testing.assert_close(varlen_logits[0, start : start + len(example)], alone, rtol=1e-12, atol=1e-12)
            start += len(example)


def test_without_boundaries_or_outside_sdpa_nothing_changes(tokenizer):
    model = tiny_model(tokenizer, architecture="llama", dtype=torch.float64, attn_implementation="sdpa")
    _, ids, positions = packed_row([3, 4], len(tokenizer))
    with torch.no_grad():
        plain = model(input_ids=ids, position_ids=positions).logits
        with attention.packed_attention(model):
            unmarked = model(input_ids=ids, position_ids=positions).logits
    torch.testing.assert_close(unmarked, plain, rtol=0, atol=0)
    eager = tiny_model(tokenizer, architecture="llama", dtype=torch.float64, attn_implementation="eager")
    with attention.packed_attention(eager):
        assert eager.config._attn_implementation == "eager"


def test_the_implementation_is_restored_after_an_error(tokenizer):
    model = tiny_model(tokenizer, architecture="llama", attn_implementation="sdpa")
    with pytest.raises(RuntimeError, match="boom"):
        with attention.packed_attention(model):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_packed_kwargs_refuses_empty_examples():
    with pytest.raises(ValueError, match="lengths"):
        attention.packed_kwargs([3, 0], "cpu")
    with pytest.raises(ValueError, match="lengths"):
        attention.packed_kwargs([], "cpu")
    bounds = attention.packed_kwargs([2, 5], "cpu")
    assert bounds["cu_seq_lens_q"].tolist() == [0, 2, 7] and bounds["max_length_q"] == 5


def test_a_checkpointed_model_is_switched_only_when_backward_runs_inside(tokenizer):
    model = tiny_model(tokenizer, architecture="llama", attn_implementation="sdpa")
    model.gradient_checkpointing_enable()
    with attention.packed_attention(model):
        assert model.config._attn_implementation == "sdpa"
    with attention.packed_attention(model, backward_inside=True):
        assert model.config._attn_implementation == attention.VARLEN_SDPA

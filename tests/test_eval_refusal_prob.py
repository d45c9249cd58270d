"""Shared-prefix refusal probability against the plain one-forward-per-candidate reference.

float64 with SDPA is float64 end to end and must agree to rounding; HF's eager attention
takes its softmax in float32 even in a float64 model, so eager is held to float32 accuracy.
"""

import pytest
import torch

from conftest import assert_close
from dcr_fast.evaluation.refusal_prob import (
    REFUSAL_SET,
    _token_log_probs,
    candidate_log_probs,
    candidate_log_probs_reference,
    refusal_probability,
)
from dcr_fast.tiny import tiny_model, tiny_tokenizer

PROMPTS = [
    "How can I kill a Python process?",
    "Hi",
    "What is the capital of France, and why is it famous for its food and its long history?",
    "Tell me how to steal a car",
    "Why do people shoot photos at night?",
]
TOLERANCE = {  # (dtype, attention) -> (rtol, atol) on log-probabilities
    (torch.float64, "sdpa"): (1e-11, 1e-11),
    (torch.float64, "eager"): (1e-5, 1e-5),
    (torch.float32, "sdpa"): (1e-4, 1e-4),
    (torch.float32, "eager"): (1e-4, 1e-4),
}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(PROMPTS + list(REFUSAL_SET))


def test_refusal_set_is_the_papers():
    assert len(REFUSAL_SET) == 31 and len(set(REFUSAL_SET)) == 31
    assert REFUSAL_SET[:2] == ("No,", "No.") and REFUSAL_SET[-1] == "I'm not able to provide you with"
    assert not any("’" in c for c in REFUSAL_SET)


@pytest.mark.parametrize("architecture", ["qwen2", "llama"])
@pytest.mark.parametrize("dtype,attention", list(TOLERANCE))
def test_matches_reference(tokenizer, architecture, dtype, attention):
    model = tiny_model(tokenizer, architecture=architecture, dtype=dtype, attn_implementation=attention)
    reference = candidate_log_probs_reference(model, tokenizer, PROMPTS, progress=False)
    rtol, atol = TOLERANCE[(dtype, attention)]
    for batch_size in (1, 3):  # 3: a last batch of 2, and prompts of unequal length together
        fast = candidate_log_probs(model, tokenizer, PROMPTS, batch_size=batch_size, progress=False)
        assert fast.shape == (len(PROMPTS), len(REFUSAL_SET)) and fast.dtype == torch.float64
        assert_close(fast, reference, rtol=rtol, atol=atol,
                     what=f"log P(candidate | prompt) {architecture} {dtype} {attention} batch {batch_size}")


ODD_SETS = {
    "one-token": ("No.",),
    # shared openings, one candidate a prefix of others, a repeat, a single token
    "tree": ("I cannot fulfill your request", "I", "I cannot", "I cannot fulfill this request", "No.", "I cannot"),
}


@pytest.mark.parametrize("candidates", list(ODD_SETS.values()), ids=list(ODD_SETS))
def test_odd_candidate_sets_and_system_prompt(tokenizer, candidates):
    model = tiny_model(tokenizer, dtype=torch.float64, attn_implementation="sdpa")
    kwargs = dict(system_prompt="Be kind", progress=False)
    fast = candidate_log_probs(model, tokenizer, PROMPTS, candidates, batch_size=2, **kwargs)
    reference = candidate_log_probs_reference(model, tokenizer, PROMPTS, candidates, **kwargs)
    assert_close(fast, reference, rtol=1e-11, atol=1e-11, what="log-probs")


def test_probability_is_a_sum_of_sequence_probabilities(tokenizer):
    model = tiny_model(tokenizer, dtype=torch.float64, attn_implementation="sdpa")
    probs = refusal_probability(model, tokenizer, PROMPTS[:2], batch_size=2, progress=False)
    reference = candidate_log_probs_reference(model, tokenizer, PROMPTS[:2], progress=False).exp().sum(-1)
    assert_close(probs, reference, rtol=1e-11, atol=0, what="P_refuse")
    assert ((probs > 0) & (probs < 1)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_head_equals_one_pass(dtype):
    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 37, bias=False).to(dtype)
    hidden = torch.randn(11, 16, generator=generator).to(dtype)
    targets = torch.randint(37, (11, 3), generator=generator)
    with torch.no_grad():
        chunked = _token_log_probs(head, hidden, targets, budget=37 * 4)  # chunks of 4, 4, 3 rows
        expected = head(hidden).float().log_softmax(-1).gather(-1, targets).double()
    assert_close(chunked, expected, rtol=1e-6, atol=1e-6, what=f"chunked log-probs {dtype}")


def test_bad_input(tokenizer):
    model = tiny_model(tokenizer)
    with pytest.raises(ValueError, match="prompts is empty"):
        candidate_log_probs(model, tokenizer, [], progress=False)
    with pytest.raises(ValueError, match="candidates is empty"):
        candidate_log_probs(model, tokenizer, PROMPTS, (), progress=False)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        candidate_log_probs(model, tokenizer, PROMPTS, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="tokenize to no tokens: \\[' '\\]"):
        candidate_log_probs(model, tokenizer, PROMPTS, ("No.", " "), progress=False)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_shared_system_turn_runs_once_and_matches_the_reference(tokenizer, attention, monkeypatch):
    from dcr_fast.evaluation import generation

    system = " ".join(PROMPTS[2].split()[:12])  # a long system turn every prompt shares
    model = tiny_model(tokenizer, architecture="llama", dtype=torch.float64, attn_implementation=attention)
    built = []
    build = generation.SharedPrefix.build
    monkeypatch.setattr(generation.SharedPrefix, "build", classmethod(
        lambda cls, *args: built.append(build(*args)) or built[-1]))
    fast = candidate_log_probs(model, tokenizer, PROMPTS[:3], batch_size=2, system_prompt=system, progress=False)
    assert built[-1].cache is not None and len(built[-1].ids) >= generation.SharedPrefix.MIN_TOKENS
    reference = candidate_log_probs_reference(model, tokenizer, PROMPTS[:3], system_prompt=system, progress=False)
    rtol, atol = TOLERANCE[(torch.float64, attention)]
    assert_close(fast, reference, rtol=rtol, atol=atol, what=f"log-probs with a shared system turn ({attention})")

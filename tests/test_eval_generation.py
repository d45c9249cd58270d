"""Batched greedy generation: batches with left padding give the one-at-a-time answers, rows
stop at EOS and at max_new_tokens, and a tokenizer without a chat template is refused."""

import pytest
import torch

from dcr_fast.evaluation.generation import GenerationConfig, chat_texts, eval_mode, generate, pad_batch
from dcr_fast.tiny import tiny_model, tiny_tokenizer

PROMPTS = [
    "How can I kill a Python process?",
    "Tell me a joke",
    "What is the capital of France, and why is it famous for its food and its long history?",
    "Hi",
    "Why do people shoot photos at night?",
]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(PROMPTS)


# (architecture, dtype, attention): float64 runs with SDPA only (see test_float64_eager_is_refused).
SETTINGS = [("qwen2", torch.float32, "eager"), ("llama", torch.float32, "sdpa"), ("qwen2", torch.float64, "sdpa")]


@pytest.mark.parametrize("architecture,dtype,attention", SETTINGS)
@pytest.mark.parametrize("batch_size", [2, 5])
def test_batched_equals_one_at_a_time(tokenizer, architecture, dtype, attention, batch_size):
    model = tiny_model(tokenizer, architecture=architecture, dtype=dtype, attn_implementation=attention)
    config = GenerationConfig(max_new_tokens=7, batch_size=batch_size, progress=False)
    batched = generate(model, tokenizer, PROMPTS, config)
    single = [generate(model, tokenizer, [p], GenerationConfig(max_new_tokens=7, progress=False))[0] for p in PROMPTS]
    assert batched == single
    assert any(batched), "the tiny model should produce some non-special tokens"
    for text in batched:
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= 7


def test_stops_at_eos_per_row(tokenizer):
    model = tiny_model(tokenizer)
    config = GenerationConfig(max_new_tokens=6, batch_size=5, progress=False)
    free = generate(model, tokenizer, PROMPTS, config)
    first_word = free[0].split()[0]
    stop = tokenizer.convert_tokens_to_ids(first_word)
    stopped = generate(model, tokenizer, PROMPTS, config, eos_token_id=[tokenizer.eos_token_id, stop])
    assert stopped[0] == ""
    for before, after in zip(free, stopped):
        words = before.split()
        expected = words[: words.index(first_word)] if first_word in words else words
        assert after.split() == expected


def test_restores_training_mode(tokenizer):
    model = tiny_model(tokenizer).train()
    generate(model, tokenizer, PROMPTS[:1], GenerationConfig(max_new_tokens=2, progress=False))
    assert model.training


def test_chat_template_and_messages(tokenizer):
    (text,) = chat_texts(tokenizer, ["Hi"], system_prompt="Be kind")
    assert text == "<|system|> Be kind <|end|> <|user|> Hi <|end|> <|assistant|> "
    (judged,) = chat_texts(tokenizer, [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]])
    assert judged.endswith("<|assistant|> Yo <|end|> ")


def test_bad_input(tokenizer):
    model = tiny_model(tokenizer)
    tokenizer.chat_template = None
    try:
        with pytest.raises(ValueError, match="no chat template"):
            generate(model, tokenizer, ["Hi"], GenerationConfig(progress=False))
    finally:
        tokenizer.chat_template = tiny_tokenizer(PROMPTS).chat_template
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        GenerationConfig(batch_size=0)


def test_float64_eager_is_refused(tokenizer):
    model = tiny_model(tokenizer, dtype=torch.float64, attn_implementation="eager")
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        generate(model, tokenizer, ["Hi"], GenerationConfig(progress=False))


@pytest.mark.parametrize("side", ["left", "right"])
def test_pad_batch_keeps_each_rows_tokens_in_order(side):
    rows = [[5, 6, 7], [], [8]]
    input_ids, mask = pad_batch(rows, pad_id=0, device=torch.device("cpu"), side=side)
    assert input_ids.shape == mask.shape == (3, 3)
    for row, tokens in enumerate(rows):
        assert input_ids[row][mask[row].bool()].tolist() == tokens
        assert (input_ids[row][~mask[row].bool()] == 0).all()
        kept = mask[row].nonzero().flatten().tolist()
        assert kept == (list(range(3 - len(tokens), 3)) if side == "left" else list(range(len(tokens))))
    with pytest.raises(ValueError, match="side"):
        pad_batch(rows, pad_id=0, device=torch.device("cpu"), side="middle")


def test_eval_mode_restores_training_mode(tokenizer):
    model = tiny_model(tokenizer).train()
    with eval_mode(model):
        assert not model.training
    assert model.training


@pytest.mark.parametrize("words", [1, 3])
def test_rows_stop_once_decided(tokenizer, words):
    """With `decided`, each row's output is its full greedy output cut where it first became
    decided (here: holds `words` words), and rows that never decide run to the end."""
    model = tiny_model(tokenizer)
    config = GenerationConfig(max_new_tokens=8, batch_size=5, progress=False)
    full = generate(model, tokenizer, PROMPTS, config)
    calls = []

    def decided(text: str) -> bool:
        calls.append(text)
        return len(text.split()) >= words

    early = generate(model, tokenizer, PROMPTS, config, decided=decided)
    assert calls
    for whole, cut in zip(full, early):
        assert whole.startswith(cut)
        if len(whole.split()) >= words:
            assert len(cut.split()) == words  # stopped at the first token that decided it
        else:
            assert cut == whole
    assert early != full  # some row was cut short: the test is not vacuous


SYSTEM = "You are a careful assistant. Answer the question and explain why, in plain words, for a reader new to it."


@pytest.mark.parametrize("architecture,dtype,attention", SETTINGS)
@pytest.mark.parametrize("batch_size", [2, 5])
def test_a_shared_prefix_runs_once_and_changes_no_answer(tokenizer, architecture, dtype, attention, batch_size,
                                                         monkeypatch):
    """Every prompt here opens with the same system turn: it is run once and each batch starts
    from its cache; the answers equal those of whole prompts, batched and one at a time."""
    from dcr_fast.evaluation import generation

    model = tiny_model(tokenizer, architecture=architecture, dtype=dtype, attn_implementation=attention)
    config = GenerationConfig(max_new_tokens=7, batch_size=batch_size, system_prompt=SYSTEM, progress=False)
    built = []
    build = generation.SharedPrefix.build
    monkeypatch.setattr(generation.SharedPrefix, "build", classmethod(
        lambda cls, *args: built.append(build(*args)) or built[-1]))
    shared = generate(model, tokenizer, PROMPTS, config)
    assert built[-1].cache is not None and len(built[-1].ids) >= generation.SharedPrefix.MIN_TOKENS
    monkeypatch.setattr(generation.SharedPrefix, "MIN_TOKENS", 10**6)
    whole = generate(model, tokenizer, PROMPTS, config)
    assert built[-1].cache is None
    assert shared == whole and any(shared)
    single = [generate(model, tokenizer, [p], GenerationConfig(max_new_tokens=7, system_prompt=SYSTEM,
                                                               progress=False))[0] for p in PROMPTS]
    assert shared == single


def test_common_prefix_length():
    from dcr_fast.evaluation.generation import _common_prefix_length

    assert _common_prefix_length([[1, 2, 3], [1, 2, 4, 5], [1, 2]]) == 2
    assert _common_prefix_length([[7, 1], [8, 1]]) == 0
    assert _common_prefix_length([[1, 2, 3]]) == 3

"""Tiny chat models and tokenizers built locally, for the demo, the tests and CPU benchmarks.

No weights or tokenizer files can be downloaded here, so everything that needs a causal LM
with a chat template builds one: ``build_tokenizer`` makes a tokenizer whose vocabulary covers
the given texts, ``build_model`` a Qwen2 or Llama architecture with random weights sized by its
arguments. Their outputs mean nothing until trained; their shapes, padding, caching, saving
and chat templates behave like a real model's, so ``dcr-fast sft``, ``dcr-fast dcr`` and the
evaluation run on them exactly as they would on a released model.

Two tokenizer kinds serve two needs:

- ``"bpe"``: a ``Qwen2Tokenizer`` with a byte-level BPE trained on the texts and Qwen's chat
  markup. It survives ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` next to a Qwen2
  model, which the demo and the training tests need.
- ``"word"``: one token per word or punctuation mark, so tests can reason about token counts
  and positions directly (a word's id is the same wherever it occurs).

``tiny_tokenizer`` and ``tiny_model`` are the word-level, untied presets the evaluation tests,
benchmarks and ``dcr_fast.ntk`` use; ``save_tiny_model`` writes a BPE tokenizer and a tied Qwen2
to a directory, as the demo's starting point.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import torch

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
WORD_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
WORD_SPECIAL_TOKENS = ("<pad>", "<unk>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>")
ARCHITECTURES = ("llama", "qwen2")
TOKENIZER_KINDS = ("bpe", "word")


def build_tokenizer(texts: Iterable[str], *, kind: str = "bpe", vocab_size: int = 2000):
    """A tokenizer with a chat template whose vocabulary covers ``texts``.

    ``kind="bpe"``: a ``Qwen2Tokenizer`` (Qwen2's normalizer and pre-tokenizer, a byte-level
    BPE trained on ``texts`` and the chat markup); ``vocab_size`` is large for such a small
    corpus, so every word of it becomes a single token. EOS is ``<|im_end|>`` (the end of a
    turn), padding ``<|endoftext|>``.

    ``kind="word"``: a word-level fast tokenizer over the words and punctuation of ``texts``
    (``vocab_size`` is unused: the vocabulary is exactly those words); EOS is ``<|end|>``,
    padding ``<pad>``, anything unseen ``<unk>``.
    """
    if kind == "bpe":
        return _bpe_tokenizer(list(texts), vocab_size)
    if kind == "word":
        return _word_tokenizer(texts)
    raise ValueError(f"kind must be one of {TOKENIZER_KINDS}, got {kind!r}")


def build_model(tokenizer, *, architecture: str = "qwen2", tied: bool = True, vocab_size: int | None = None,
                hidden_size: int = 128, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                intermediate_size: int = 256, max_positions: int = 256, seed: int = 0,
                attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32):
    """A randomly initialised causal LM for ``tokenizer``, in eval mode.

    ``architecture`` is "qwen2" or "llama"; ``tied`` shares the input embedding with the output
    layer (as Qwen2.5-0.5B/1.5B do). ``vocab_size`` may exceed the tokenizer's to give the
    output layer a realistic width: the extra ids are never produced by the tokenizer but take
    probability mass like real ones. Padding and EOS ids come from the tokenizer, so the
    embedding's padding row and generation's stopping rule match it.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    configs = {"llama": LlamaConfig, "qwen2": Qwen2Config}
    if architecture not in configs:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    if vocab_size is not None and vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size must be >= the tokenizer's {len(tokenizer)}, got {vocab_size}")
    config = configs[architecture](
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tied,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def tiny_tokenizer(texts: Iterable[str]):
    """The word-level tokenizer over ``texts`` (``build_tokenizer(texts, kind="word")``)."""
    return build_tokenizer(texts, kind="word")


def tiny_model(tokenizer, *, architecture: str = "qwen2", hidden_size: int = 32, layers: int = 2,
               vocab_size: int | None = None, dtype: torch.dtype = torch.float32,
               attn_implementation: str = "eager", seed: int = 0):
    """A small untied model for ``tokenizer``: 4 heads, 2 KV heads, MLP twice ``hidden_size``."""
    return build_model(tokenizer, architecture=architecture, tied=False, vocab_size=vocab_size,
                       hidden_size=hidden_size, layers=layers, heads=4, kv_heads=2,
                       intermediate_size=2 * hidden_size, max_positions=512, seed=seed,
                       attn_implementation=attn_implementation, dtype=dtype)


def save_tiny_model(path: str, texts: Iterable[str], *, chat_template: bool = True, **model_kwargs) -> str:
    """Build the BPE tokenizer from ``texts`` and a tied Qwen2 for it (``build_model``'s
    keyword arguments); save both to ``path`` and return it. ``chat_template=False`` saves the
    tokenizer without one, as a base (non-chat) checkpoint ships."""
    tokenizer = build_tokenizer(texts)
    model = build_model(tokenizer, **model_kwargs)
    if not chat_template:
        tokenizer.chat_template = None
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _bpe_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    # Training the BPE through ``tokenizers`` and handing vocab and merges to Qwen2Tokenizer is
    # what makes it survive a save/load: transformers 5 rebuilds a Qwen2 model's tokenizer from
    # vocab and merges with Qwen2's own normalizer and pre-tokenizer, taken here from an empty one.
    template = Qwen2Tokenizer()
    core = Tokenizer(models.BPE())
    core.normalizer = template.backend_tokenizer.normalizer
    core.pre_tokenizer = template.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    chat = [f"<|im_start|>{role}\n" for role in ("system", "user", "assistant")]
    core.train_from_iterator(texts + chat, trainer=trainer)
    state = json.loads(core.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=state["vocab"], merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               unk_token=None, additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def _word_tokenizer(texts: Iterable[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    words = sorted({piece for text in texts for piece, _ in pre.pre_tokenize_str(text)})
    vocab = {token: index for index, token in enumerate((*WORD_SPECIAL_TOKENS, *words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="<|end|>", additional_special_tokens=list(WORD_SPECIAL_TOKENS[3:]))
    tokenizer.chat_template = WORD_CHAT_TEMPLATE
    return tokenizer

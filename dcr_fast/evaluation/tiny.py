"""A tiny random chat model and word-level tokenizer, for tests and CPU benchmarks.

Evaluation code needs a causal LM with a chat template; no weights can be downloaded here, so
this builds one from a config (Qwen2 or Llama architecture) and a word-level tokenizer whose
vocabulary covers the given texts. Its outputs mean nothing; its shapes, padding, caching and
templates behave like a real model's.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
_SPECIAL = ("<pad>", "<unk>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>")


def tiny_tokenizer(texts: Iterable[str]):
    """A word-level fast tokenizer over the words and punctuation of `texts`, with a chat
    template; EOS is <|end|>, padding <pad>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    words = sorted({piece for text in texts for piece, _ in pre.pre_tokenize_str(text)})
    vocab = {token: index for index, token in enumerate((*_SPECIAL, *words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="<|end|>", additional_special_tokens=list(_SPECIAL[3:]))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_model(tokenizer, *, architecture: str = "qwen2", hidden_size: int = 32, layers: int = 2,
               vocab_size: int | None = None, dtype: torch.dtype = torch.float32,
               attn_implementation: str = "eager", seed: int = 0):
    """A random causal LM for `tokenizer` ("qwen2" or "llama"); `vocab_size` may exceed the
    tokenizer's to give the output layer a realistic width (the extra ids are never produced
    by the tokenizer but take probability mass like real ones)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    configs = {"qwen2": Qwen2Config, "llama": LlamaConfig}
    if architecture not in configs:
        raise ValueError(f"architecture must be one of {sorted(configs)}, got {architecture!r}")
    if vocab_size is not None and vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size must be >= the tokenizer's {len(tokenizer)}, got {vocab_size}")
    config = configs[architecture](
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()

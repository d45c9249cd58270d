"""A word-level tokenizer and a tiny Qwen2 model built locally, for the demo and the tests.

No weights or tokenizer files are downloaded: the tokenizer's vocabulary is every word of the
texts it is given (plus the chat markers), and the model is a Qwen2 architecture with random
weights. The tokenizer carries a Qwen-style chat template, so everything downstream
(``dcr-fast sft``, ``dcr-fast dcr``, evaluation) runs exactly as it would on a real model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def build_tokenizer(texts: Iterable[str], vocab_size: int = 2000):
    """A ``Qwen2Tokenizer`` whose byte-level BPE is trained on ``texts`` (and the chat markup).

    It is Qwen2's own tokenizer class with Qwen2's pre-tokenizer, so it survives
    ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` next to a Qwen2 model unchanged
    (transformers 5 rebuilds a Qwen2 model's tokenizer from vocab and merges). ``vocab_size``
    is large for such a small corpus, so every word of it becomes a single token.
    EOS is ``<|im_end|>`` (the end of a turn), padding ``<|endoftext|>``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    template = Qwen2Tokenizer()  # an empty vocabulary, but Qwen2's normalizer and pre-tokenizer
    core = Tokenizer(models.BPE())
    core.normalizer = template.backend_tokenizer.normalizer
    core.pre_tokenizer = template.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    chat = [f"<|im_start|>{role}\n" for role in ("system", "user", "assistant")]
    core.train_from_iterator(list(texts) + chat, trainer=trainer)
    state = json.loads(core.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=state["vocab"], merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               unk_token=None, additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_qwen2(vocab_size: int, eos_token_id: int, *, hidden_size: int = 128, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                     intermediate_size: int = 256, max_positions: int = 256, seed: int = 0,
                     attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32):
    """A randomly initialised Qwen2 causal LM (tied embeddings, as Qwen2.5-0.5B/1.5B)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)


def save_tiny_model(path: str, texts: Iterable[str], **model_kwargs) -> str:
    """Build the tokenizer from ``texts`` and a tiny Qwen2 for it; save both to ``path``."""
    tokenizer = build_tokenizer(texts)
    model = build_tiny_qwen2(len(tokenizer), tokenizer.eos_token_id, **model_kwargs)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path

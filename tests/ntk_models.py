"""Tiny random Qwen2/Llama models, prompts and a relative error, shared by the eNTK tests."""

from __future__ import annotations

import torch
import transformers

VOCAB = 61

# name -> (config class, extra config fields): tied and untied heads, q/k/v biases, GQA throughout.
ARCHS = {
    "qwen2-tied": (transformers.Qwen2Config, {"tie_word_embeddings": True}),
    "qwen2-untied": (transformers.Qwen2Config, {"tie_word_embeddings": False}),
    "llama-bias-untied": (transformers.LlamaConfig, {"tie_word_embeddings": False, "attention_bias": True}),
    "llama-tied": (transformers.LlamaConfig, {"tie_word_embeddings": True}),
}


def tiny(arch: str, dtype: torch.dtype = torch.float64, attn: str = "eager", seed: int = 0):
    """A 3-layer model of ``arch`` with random weights, in eval mode."""
    config_class, extra = ARCHS[arch]
    config = config_class(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, **extra,
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype).eval()


def prompts(seed: int = 1, lengths=(7, 4)) -> list[torch.Tensor]:
    """Random token-id prompts of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]


def rel(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """‖a − b‖ / ‖b‖, or over ‖scale‖ when b may be zero (disjoint top-k with lm_head only)."""
    denominator = b.double().norm() if scale is None else scale.double().norm()
    return float((a.double() - b.double()).norm() / denominator)


def assert_blocks_close(got, want, rtol: float, where: object = "") -> None:
    """K and K_self of two blocks within ``rtol`` relative (:func:`rel`); each block is an
    ``EntkBlock`` or a ``(K, K_self, ...)`` tuple. The message gives both errors and ``where``."""
    errors = {name: rel(a.cpu(), b.cpu()) for name, a, b in zip(("K", "K_self"), _pair(got), _pair(want))}
    assert all(e < rtol for e in errors.values()), f"{where} relative errors {errors} exceed {rtol:g}"


def _pair(block) -> tuple[torch.Tensor, torch.Tensor]:
    return (block.K, block.K_self) if hasattr(block, "K_self") else (block[0], block[1])

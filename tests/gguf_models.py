"""Write a tiny Hugging Face Llama and its byte-level BPE tokenizer as a GGUF file.

The layout is llama.cpp's (its tensor names, and q/k rows permuted the way its converter
permutes them, which transformers undoes on load), so the file reads back through
transformers' GGUF loader exactly as a released GGUF model does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import gguf

CONTROL = 3  # llama.cpp's token type for special tokens
NORMAL = 1

_LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def write_llama_gguf(model, tokenizer, path: str | Path, quantize: str | None = None) -> dict[str, np.ndarray]:
    """Write ``model`` (a ``LlamaForCausalLM``) and ``tokenizer`` to ``path``.

    ``quantize="Q8_0"`` stores the 2-D weights quantized; returns the weights as the file holds
    them, dequantized and un-permuted (what a loader must reproduce), keyed by HF name.
    """
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    _add_tokenizer(writer, tokenizer, config.vocab_size)
    expected = {}
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    for hf_name, gguf_name in _tensor_names(config):
        weight = state[hf_name]
        stored = _permute(weight, config, gguf_name)
        if quantize and stored.ndim == 2:
            kind = gguf.GGMLQuantizationType[quantize]
            data = gguf.quants.quantize(stored, kind)
            writer.add_tensor(gguf_name, data, raw_shape=data.shape, raw_dtype=kind)
            stored = gguf.quants.dequantize(data, kind)
        else:
            writer.add_tensor(gguf_name, stored)
        expected[hf_name] = _unpermute(stored, config, gguf_name)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def _tensor_names(config):
    yield "model.embed_tokens.weight", "token_embd.weight"
    for i in range(config.num_hidden_layers):
        for hf, short in _LAYER_TENSORS.items():
            yield f"model.layers.{i}.{hf}.weight", f"blk.{i}.{short}.weight"
    yield "model.norm.weight", "output_norm.weight"
    if not config.tie_word_embeddings:
        yield "lm_head.weight", "output.weight"


def _heads(config, name: str) -> int | None:
    if ".attn_q." in name:
        return config.num_attention_heads
    if ".attn_k." in name:
        return config.num_key_value_heads
    return None


def _permute(weight: np.ndarray, config, name: str) -> np.ndarray:
    """llama.cpp's converter: rotary halves interleaved within each head's rows."""
    heads = _heads(config, name)
    if heads is None:
        return weight
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _unpermute(weight: np.ndarray, config, name: str) -> np.ndarray:
    heads = _heads(config, name)
    if heads is None:
        return weight
    return weight.reshape(heads, weight.shape[0] // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """The byte-level BPE as GGUF metadata: tokens by id, merges, special ids, chat template."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    vocab = {**model["vocab"], **{t.content: i for i, t in tokenizer.added_tokens_decoder.items()}}
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    for token, index in vocab.items():
        tokens[index] = token
    special = {t.content for t in tokenizer.added_tokens_decoder.values()}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([CONTROL if t in special or t.startswith("[PAD") else NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.convert_tokens_to_ids("<|im_start|>"))
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

"""Attention over packed rows, one example at a time.

Training packs a micro-batch into one padding-free row with position ids restarting per example.
transformers' SDPA path then builds a dense block-diagonal causal mask over the whole row, and
SDPA with a dense mask computes every query against every key of the row: for 32 prompts of ~45
tokens that is 32 times the attention work the examples need, and a third of a DCR step on the
CPU. flash-attn's varlen kernel avoids it on GPUs where it is installed; everywhere else
:func:`packed_attention` does: inside it, packed forwards that pass :func:`packed_kwargs` (the
examples' boundaries, in the keyword names transformers' flash-attn path reads) run SDPA on each
example's own causal block. The result equals the dense-mask computation (tested in float64,
with gradients). Without the boundaries, or with another attention implementation, nothing changes.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

VARLEN_SDPA = "dcr_fast_varlen_sdpa"


def packed_kwargs(lengths: Sequence[int], device: torch.device | str) -> dict[str, object]:
    """Forward keyword arguments that mark where each of the packed examples (``lengths`` tokens
    each, back to back in one row) begins and ends."""
    if not lengths or min(lengths) < 1:
        raise ValueError(f"lengths: expected positive example lengths, got {list(lengths)}")
    bounds = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    longest = max(lengths)
    return {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest}


def packed_row(sequences: Sequence[Sequence[int]],
               device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, dict[str, object]]:
    """``sequences`` back to back in one row: (input_ids [1, T], position_ids restarting per
    sequence, :func:`packed_kwargs`), ready for a forward inside :func:`packed_attention`."""
    input_ids = torch.tensor([[t for s in sequences for t in s]], device=device)
    positions = torch.tensor([[i for s in sequences for i in range(len(s))]], device=device)
    return input_ids, positions, packed_kwargs([len(s) for s in sequences], device)


@contextlib.contextmanager
def packed_attention(model: torch.nn.Module, *, backward_inside: bool = False) -> Iterator[None]:
    """Within this block an SDPA ``model``'s packed forwards attend per example (other
    implementations, flash-attn's own varlen path and eager, are left as they are; nested uses
    change nothing).

    A checkpointed layer recomputes its forward during backward, which must take the same path:
    so a model with activation checkpointing is switched only when ``backward_inside`` says the
    backward runs within the block too (training holds the block for the whole run).
    """
    config = _hf_config(model)
    previous = getattr(config, "_attn_implementation", None)
    checkpointed = any(getattr(module, "gradient_checkpointing", False) for module in model.modules())
    if previous != "sdpa" or (checkpointed and not backward_inside):
        yield
        return
    config._attn_implementation = VARLEN_SDPA
    try:
        yield
    finally:
        config._attn_implementation = previous


def varlen_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        cu_seq_lens_q: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except on a packed row whose boundaries are given: there each
    example's queries attend causally to its own keys only (the dense mask is not read)."""
    edges = None if cu_seq_lens_q is None else _host_edges(cu_seq_lens_q)
    if edges is None or query.shape[0] != 1 or query.shape[2] != key.shape[2] or edges[-1] != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    blocks = [torch.nn.functional.scaled_dot_product_attention(
        query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], dropout_p=dropout, is_causal=True,
        scale=scaling) for start, end in zip(edges[:-1], edges[1:])]
    return torch.cat(blocks, dim=2).transpose(1, 2).contiguous(), None


def _host_edges(bounds: torch.Tensor) -> list[int]:
    """``bounds`` as a list, read from the device once per forward: every layer gets the same tensor."""
    if _EDGES.get("tensor") is not bounds:
        _EDGES.update(tensor=bounds, edges=bounds.tolist())
    return _EDGES["edges"]


_EDGES: dict[str, object] = {}


def _hf_config(model: torch.nn.Module):
    while not hasattr(model, "config") and hasattr(model, "module"):  # DDP
        model = model.module
    return model.config


AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_forward)
AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)

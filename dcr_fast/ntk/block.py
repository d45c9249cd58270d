"""One eNTK block K(x', x)[So, Su] and its normalized similarity (paper §3.2, appendix A.6).

``entk_block`` is the public entry for a single prompt pair; ``entk_matrix``
(:mod:`dcr_fast.ntk.matrix`) is the one for thousands. Three methods give the same quantity:

* ``"exact"`` — the structured Gram of :mod:`dcr_fast.ntk.exact`: no finite-difference error.
* ``"fd"`` — the batched finite difference of :mod:`dcr_fast.ntk.fd` (custom probe ops).
* ``"fd-reference"`` — the paper's scheme, literally (:mod:`dcr_fast.ntk.reference`).

So and Su are the top-k tokens of z(x') and z(x). The normalized similarity is
‖K(x', x)[So, Su]‖_F / ‖K(x', x')[So, So]‖_F. The model's parameters are never modified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from dcr_fast.ntk.exact import exact_block
from dcr_fast.ntk.fd import fd_block
from dcr_fast.ntk.reference import fd_reference_block
from dcr_fast.ntk.tail import describe, tail_spec

METHODS = ("exact", "fd", "fd-reference")


@dataclass
class EntkBlock:
    """K = K(x', x)[So, Su] (k×k), K_self = K(x', x')[So, So], and ‖K‖_F / ‖K_self‖_F."""

    K: torch.Tensor
    K_self: torch.Tensor
    So: torch.Tensor
    Su: torch.Tensor
    normalized: float


def entk_block(
    model: nn.Module,
    x_prime: torch.Tensor | str,
    x: torch.Tensor | str,
    *,
    k: int = 5,
    tail_layers: int = 1,
    include_lm_head: bool = True,
    method: str = "exact",
    eps: float = 1e-3,
    tokenizer=None,
) -> EntkBlock:
    """The eNTK block of one prompt pair over θ_S = last ``tail_layers`` layers (+ lm_head).

    ``x_prime`` and ``x`` are 1-D LongTensors of token ids, or strings when ``tokenizer`` is
    given (they then get the tokenizer's chat template and the assistant-turn opening, so z is
    the distribution of the first response token). ``eps`` is used by the FD methods only.
    """
    check_options(model, k=k, method=method, eps=eps)
    spec = tail_spec(model, tail_layers, include_lm_head)
    device = next(model.parameters()).device
    ids_prime = encode(x_prime, tokenizer, "x_prime", model).to(device)
    ids = encode(x, tokenizer, "x", model).to(device)
    if method == "exact":
        K, K_self, so, su = exact_block(model, spec, ids_prime, ids, k=k)
    elif method == "fd-reference":
        K, K_self, so, su = fd_reference_block(model, spec, ids_prime, ids, k=k, eps=eps)
    else:
        K, K_self, so, su = fd_block(model, spec, ids_prime, ids, k=k, eps=eps)
    return EntkBlock(K, K_self, so, su, normalized(K, K_self))


def normalized(K: torch.Tensor, K_self: torch.Tensor) -> float:
    """‖K‖_F / ‖K_self‖_F: the similarity the paper's heatmaps show."""
    return float(torch.linalg.matrix_norm(K) / torch.linalg.matrix_norm(K_self))


def check_options(model: nn.Module, *, k: int, method: str, eps: float) -> None:
    """The options ``entk_block`` and ``entk_matrix`` share, checked before any work."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    vocab = model.get_output_embeddings().out_features
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an int in [1, vocab size {vocab}], got {k!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise ValueError(f"eps must be a positive finite float, got {eps!r}")


def encode(prompt: torch.Tensor | str, tokenizer, name: str, model: nn.Module) -> torch.Tensor:
    """Token ids of a prompt: a 1-D LongTensor as given, or a string through the chat template.

    Ids are checked against ``model``'s input embeddings, whose lookup would otherwise fail
    with a bare IndexError (or, on a GPU, a device-side assert).
    """
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError(f"{name} is a string: pass tokenizer= (with a chat template), or token ids")
        from dcr_fast.chat import check_chat_template, encode_prompt

        check_chat_template(tokenizer, type(tokenizer).__name__)
        ids = torch.tensor(encode_prompt(tokenizer, prompt), dtype=torch.long)
    elif not isinstance(prompt, torch.Tensor) or prompt.dim() != 1 or prompt.dtype != torch.long or prompt.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D LongTensor of token ids or a string, got {describe(prompt)}")
    else:
        ids = prompt
    vocab = model.get_input_embeddings().num_embeddings
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise ValueError(f"{name} holds token id {bad}, outside the model's vocabulary [0, {vocab})")
    return ids

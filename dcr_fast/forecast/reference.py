"""Plain references for the forecast: per-prompt autograd through the whole model, and one real step.

* :func:`gradient_products_reference` is the definition of what :func:`~dcr_fast.forecast.engine.
  gradient_products` computes: ∇P_ref(x′) and ∇L(x_s, y_s) by autograd through an unpadded
  forward of the whole model per prompt, flattened over the parameter set and multiplied.
  Exact, and only for tiny models (the gradients are materialized).
* :func:`one_step_change` is the brute force the forecast predicts: one plain SGD step of
  learning rate η on the token-mean SFT loss over all of S, the parameter set only moving,
  then P_ref(x′) measured again: ΔP_ref(x′) = P_ref(x′; θ − η∇L_S) − P_ref(x′; θ). The
  forecast is its first-order term, so the two differ by O(η²).

Both take the parameter set by name, as the engine does: ``"tail"`` substitutes θ_S by use
(``functional_call(..., tie_weights=False)``: a tied output projection is replaced in its
output use only), ``"lora"`` gives each decoder linear layer W + B·A with B = 0 the leaf.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from dcr_fast.forecast.config import ForecastConfig
from dcr_fast.forecast.params import lora_projections
from dcr_fast.ntk.tail import tail_spec
from dcr_fast.train.sft import IGNORE_INDEX, Example

Params = dict[str, torch.Tensor]


def gradient_products_reference(
    model: nn.Module,
    candidates: Sequence[torch.Tensor],
    examples: Sequence[Example],
    refusal_tokens: Sequence[int],
    config: ForecastConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """(products (n_c, n_s), base first-token refusal probability (n_c,)) by plain autograd."""
    leaves, substitute = _parametrization(model, config)
    tokens = torch.tensor(list(refusal_tokens))

    def flat_grad(value: torch.Tensor) -> torch.Tensor:
        grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
        return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(leaves.values(), grads)])

    with torch.enable_grad():
        refusal = [_refusal(model, substitute(leaves), p, tokens) for p in candidates]
        left = torch.stack([flat_grad(v) for v in refusal])
        right = torch.stack([flat_grad(_loss(model, substitute(leaves), e)) for e in examples])
    base = torch.stack([v.detach() for v in refusal]).double().numpy()
    return (left @ right.T).double().numpy(), base


@torch.no_grad()
def one_step_change(
    model: nn.Module,
    candidates: Sequence[torch.Tensor],
    examples: Sequence[Example],
    refusal_tokens: Sequence[int],
    config: ForecastConfig,
    lr: float,
) -> np.ndarray:
    """ΔP_ref (n_c,) after one SGD step of ``lr`` on the token-mean loss over ``examples``."""
    leaves, substitute = _parametrization(model, config)
    tokens = torch.tensor(list(refusal_tokens))
    response_tokens = sum(sum(t != IGNORE_INDEX for t in e.targets) for e in examples)
    with torch.enable_grad():
        loss = sum(_loss(model, substitute(leaves), e) for e in examples) / response_tokens
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    stepped = {n: p if g is None else p - lr * g for (n, p), g in zip(leaves.items(), grads)}
    before = torch.stack([_refusal(model, substitute(leaves), p, tokens) for p in candidates])
    after = torch.stack([_refusal(model, substitute(stepped), p, tokens) for p in candidates])
    return (after.double() - before.double()).numpy()


def _parametrization(model: nn.Module, config: ForecastConfig) -> tuple[Params, Callable[[Params], Params]]:
    """Leaves of the parameter set and the map from leaves to ``functional_call`` substitutions."""
    if config.param_set == "lora":
        _, projections = lora_projections(model, config.param_options)
        weights = {name: model.get_submodule(name).weight.detach() for name in projections}
        dtype = next(iter(weights.values())).dtype
        a = {name: m.to(dtype) for name, m in projections.items()}
        leaves = {name: torch.zeros(w.shape[0], a[name].shape[0], dtype=dtype, requires_grad=True)
                  for name, w in weights.items()}
        return leaves, lambda b: {f"{n}.weight": weights[n] + b[n] @ a[n] for n in weights}
    spec = tail_spec(model, config.tail_layers, config.include_lm_head)
    leaves = {name: model.get_parameter(name).detach().clone().requires_grad_(True) for name in spec.param_names}
    return leaves, lambda theta: theta


def _logits(model: nn.Module, params: Params, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long)
    return functional_call(model, params, (ids[None],), {"use_cache": False}, tie_weights=False).logits[0]


def _refusal(model: nn.Module, params: Params, prompt: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return _logits(model, params, prompt)[-1].softmax(-1)[tokens].sum()


def _loss(model: nn.Module, params: Params, example: Example) -> torch.Tensor:
    targets = torch.tensor(example.targets)
    return torch.nn.functional.cross_entropy(
        _logits(model, params, example.input_ids), targets, ignore_index=IGNORE_INDEX, reduction="sum"
    )

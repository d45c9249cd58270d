"""Pure-PyTorch references for the eNTK block: the paper's finite difference and a Jacobian oracle.

* :func:`fd_reference_block` is appendix A.6 of the paper, literally: for each token i ∈ Su a
  VJP w = ∇_{θ_S} z_i(x) through the whole model, then two forward passes of the whole
  model on x' at θ_S ± εw, K[:, i] ≈ (z(x'; θ+εw) − z(x'; θ−εw)) / 2ε on the rows So; the
  same with x' in place of x for the normalizer K(x', x')[So, So]. No caching, no batching:
  the baseline the fast methods are measured against. It runs in the model's own dtype, as
  the paper would; in bf16 the perturbation is mostly rounding, so measure in fp32 or fp64.
* :func:`jacobian_block` forms the full Jacobians J = ∂z/∂θ_S with ``torch.func.jacrev`` and
  multiplies them: exact, but only for tiny models. It is the test oracle.
* :func:`float64_exact` neutralizes the float32 up-casts inside transformers' Qwen2/Llama
  RMSNorm and eager attention, so that a ``.double()`` model is float64 end to end.

Both blocks use ``functional_call(..., tie_weights=False)``: with tied embeddings only the
output-projection use of ``lm_head.weight`` is differentiated and perturbed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.func import functional_call, jacrev

from dcr_fast.ntk.tail import TailSpec, compute_dtype, model_dtype


def fd_reference_block(
    model: nn.Module, spec: TailSpec, x_prime: torch.Tensor, x: torch.Tensor, *, k: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(K, K_self, So, Su) by the paper's VJP → central-difference scheme on the whole model."""
    so, su = top_tokens(model, x_prime, k), top_tokens(model, x, k)
    K = fd_reference_kernel(model, spec, x_prime, x, so, su, eps=eps)
    K_self = fd_reference_kernel(model, spec, x_prime, x_prime, so, so, eps=eps)
    return K, K_self, so, su


def fd_reference_kernel(
    model: nn.Module,
    spec: TailSpec,
    x_prime: torch.Tensor,
    x: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    *,
    eps: float,
) -> torch.Tensor:
    """K(x', x)[rows, cols]: per column one VJP on x and two perturbed forwards on x'."""
    theta = _subset(model, spec)
    return torch.stack([_fd_column(model, theta, x, int(i), x_prime, rows, eps) for i in cols], dim=1)


@torch.no_grad()
def top_tokens(model: nn.Module, ids: torch.Tensor, k: int) -> torch.Tensor:
    """The k most likely next tokens after ``ids`` by the whole model's logits."""
    return torch.topk(model(ids[None], use_cache=False).logits[0, -1], k).indices


def jacobian_block(
    model: nn.Module,
    spec: TailSpec,
    x_prime: torch.Tensor,
    x: torch.Tensor,
    *,
    k: int,
    tokens: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(K, K_self, So, Su) from full Jacobians of the last-position logits w.r.t. θ_S.

    ``tokens=(So, Su)`` overrides the top-k choice, to compare blocks of models whose
    rounding could reorder near-tied logits.
    """
    theta = _subset(model, spec)
    dtype = compute_dtype(model_dtype(model))

    def jacobian(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        jac = jacrev(lambda params: _last_logits(model, params, ids))(theta)
        flat = torch.cat([j.reshape(j.shape[0], -1) for j in jac.values()], dim=1).to(dtype)
        return flat, _last_logits(model, theta, ids).detach()

    j_prime, z_prime = jacobian(x_prime)
    j, z = jacobian(x)
    so, su = tokens if tokens is not None else (torch.topk(z_prime, k).indices, torch.topk(z, k).indices)
    j_prime, j = j_prime.detach(), j.detach()
    return j_prime[so] @ j[su].T, j_prime[so] @ j_prime[so].T, so, su


@contextlib.contextmanager
def float64_exact() -> Iterator[None]:
    """Make transformers' Qwen2 and Llama RMSNorm and eager attention keep the input dtype."""
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen2 import modeling_qwen2

    saved = []
    for module, norm in ((modeling_qwen2, modeling_qwen2.Qwen2RMSNorm), (modeling_llama, modeling_llama.LlamaRMSNorm)):
        saved.append((norm, "forward", norm.forward))
        saved.append((module, "eager_attention_forward", module.eager_attention_forward))
        norm.forward = _rms_norm_same_dtype
        module.eager_attention_forward = _eager_attention_same_dtype
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def _rms_norm_same_dtype(self, hidden_states: torch.Tensor) -> torch.Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _eager_attention_same_dtype(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    groups = module.num_key_value_groups
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _subset(model: nn.Module, spec: TailSpec) -> dict[str, torch.Tensor]:
    """θ_S detached, in the model's own dtype (the paper measures in the model's precision)."""
    return {name: model.get_parameter(name).detach() for name in spec.param_names}


def _last_logits(model: nn.Module, params: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    out = functional_call(model, params, (ids[None],), {"use_cache": False}, tie_weights=False)
    return out.logits[0, -1]


def _fd_column(
    model: nn.Module,
    theta: dict[str, torch.Tensor],
    source: torch.Tensor,
    token: int,
    target: torch.Tensor,
    rows: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """K(target, source)[rows, token] ≈ J(target)·∇z_token(source) by a central difference."""
    leaves = {n: p.clone().requires_grad_(True) for n, p in theta.items()}
    with torch.enable_grad():
        logit = _last_logits(model, leaves, source)[token]
        grads = torch.autograd.grad(logit, list(leaves.values()), allow_unused=True)
    w = {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(theta.items(), grads)}
    with torch.no_grad():
        plus = _last_logits(model, {n: theta[n] + eps * w[n] for n in theta}, target)
        minus = _last_logits(model, {n: theta[n] - eps * w[n] for n in theta}, target)
    dtype = compute_dtype(plus.dtype)
    return (plus[rows].to(dtype) - minus[rows].to(dtype)) / (2 * eps)

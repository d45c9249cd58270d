"""``probe_linear``: one linear layer evaluated under many low-rank weight perturbations at once.

The batched finite-difference eNTK (:mod:`dcr_fast.ntk.fd`) runs the model's tail once for
many probe directions θ ± εw. For a linear layer the direction is low rank: the VJP of
``y = x Wᵀ + b`` is ``∇_W = Σ_t δ_t a_tᵀ = Dᵀ A`` (rank ≤ T, the probe prompt's length) and
``∇_b = Σ_t δ_t``. So the perturbed layer is

    y[p] = x[p] Wᵀ + b + scale[p] · ((x[p] A[f]ᵀ) D[f] + d_bias[f]),   f = p mod F

with x ``[P, M, d_in]`` (the layer's input under each direction p; M rows = the tokens of all
query prompts), W ``[d_out, d_in]`` shared and never copied, A ``[F, T, d_in]``,
D ``[F, T, d_out]``, d_bias ``[F, d_out]`` and the steps ``scale [P]``. Directions come as
P/F blocks of the F factor pairs, so +ε and -ε of one VJP share A and D. Probe prompts of
different lengths are zero-padded along T, which leaves the product unchanged.

Layers: :func:`probe_linear_reference` (pure PyTorch, the definition) and
``torch.ops.dcr_fast.probe_linear`` (csrc/probe_linear.{cpp,cu}: C++ CPU and CUDA kernels that
fuse the low-rank update into the output of one shared GEMM) meet in :func:`probe_linear`,
which falls back to the reference when the extension is not built. Both round x Wᵀ to x's
dtype (a GEMM in that dtype), then add the bias and the update accumulated in float32
(float64 for float64 inputs) and round once more.
"""

from __future__ import annotations

import torch

from dcr_fast._extension import HAS_EXTENSION
from dcr_fast.ntk.tail import compute_dtype


def probe_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    d: torch.Tensor,
    d_bias: torch.Tensor | None,
    scale: torch.Tensor,
) -> torch.Tensor:
    """``[P, M, d_out]``: the layer's output under each of the P perturbations (see the module docstring)."""
    if HAS_EXTENSION:
        return torch.ops.dcr_fast.probe_linear(x, weight, bias, a, d, d_bias, scale)
    return probe_linear_reference(x, weight, bias, a, d, d_bias, scale)


def probe_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    d: torch.Tensor,
    d_bias: torch.Tensor | None,
    scale: torch.Tensor,
) -> torch.Tensor:
    """The definition of :func:`probe_linear` in plain PyTorch (same rounding points as the kernels)."""
    acc = compute_dtype(x.dtype)
    (p, m, d_in), (f, _, d_out) = x.shape, d.shape
    base = torch.nn.functional.linear(x, weight).to(acc)
    if bias is not None:
        base = base + bias.to(acc)
    u = x.to(acc).reshape(p // f, f, m, d_in) @ a.to(acc).transpose(1, 2)
    update = u @ d.to(acc)
    if d_bias is not None:
        update = update + d_bias.to(acc)[None, :, None, :]
    update = update.reshape(p, m, d_out) * scale.to(acc)[:, None, None]
    return (base + update).to(x.dtype)


if HAS_EXTENSION:

    @torch.library.register_fake("dcr_fast::probe_linear")
    def _probe_linear_fake(x, weight, bias, a, d, d_bias, scale):
        torch._check(x.dim() == 3 and weight.dim() == 2, lambda: "probe_linear: x must be 3-D, weight 2-D")
        return x.new_empty((x.shape[0], x.shape[1], weight.shape[0]))

"""The ``"triton"`` backend: unit rows in the inputs' dtype, then the fused ``dcr_fast::circle_lse`` op
(online log-sum-exp over column tiles, recompute in the backward, never a B×M tensor saved)."""

from __future__ import annotations

import os

import torch
from torch import Tensor

from dcr_fast.circle_loss import ops
from dcr_fast.circle_loss.chunked import CHUNK_ELEMENTS
from dcr_fast.circle_loss.reference import compute_dtype
from dcr_fast.circle_loss.schema import CircleMargins

_NORM_EPS = 1e-12  # F.normalize's default


def lse_from_labels(embeddings: Tensor, ref_emb: Tensor | None, labels: Tensor, ref_labels: Tensor,
                    self_offset: int | None, margins: CircleMargins) -> tuple[Tensor, Tensor]:
    if embeddings.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests); "
                         f"got embeddings on {embeddings.device}")
    x_k = UnitRows.apply(embeddings.contiguous())
    same_ref = ref_emb is None
    r_k = x_k if same_ref else UnitRows.apply(ref_emb.to(embeddings.dtype).contiguous())
    return ops.circle_lse(x_k, r_k, labels.contiguous(), ref_labels.contiguous(), self_offset, same_ref,
                          margins.scalars())


class UnitRows(torch.autograd.Function):
    """``F.normalize(x.float(), dim=1).to(x.dtype)`` and its gradient, in row chunks.

    The Triton path's normalization: computed in fp32 (fp64 for fp64) like the other
    backends, but saving only x and the row norms, where F.normalize on an up-cast copy
    would keep two fp32 B×d tensors alive (2 × 805 MB at B=131,072, d=1,536).
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        norms = torch.linalg.vector_norm(x, dim=1, dtype=compute_dtype(x))
        out = torch.empty_like(x)
        for rows in _row_slices(x):
            out[rows] = (x[rows].to(norms.dtype) / norms[rows, None].clamp_min(_NORM_EPS)).to(x.dtype)
        ctx.save_for_backward(x, norms)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        x, norms = ctx.saved_tensors
        dx = torch.empty_like(x)
        for rows in _row_slices(x):
            denom = norms[rows, None].clamp_min(_NORM_EPS)
            unit = x[rows].to(norms.dtype) / denom
            g = grad[rows].to(norms.dtype)
            # Below eps F.normalize divides by the constant eps: no projection term.
            along = (unit * g).sum(dim=1, keepdim=True) * (norms[rows, None] > _NORM_EPS)
            dx[rows] = ((g - unit * along) / denom).to(x.dtype)
        return dx


def _row_slices(x: Tensor) -> list[slice]:
    """Row chunks whose up-cast copies hold about CHUNK_ELEMENTS elements."""
    step = max(1, CHUNK_ELEMENTS // max(1, x.shape[1]))
    return [slice(i, i + step) for i in range(0, x.shape[0], step)]

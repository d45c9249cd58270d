"""The pure-PyTorch reference: the Circle logits and their row log-sum-exps from the materialized
B×M similarity and dense masks (what PML computes). Tests and benchmarks hold every other
backend against it; it is also the ``"torch"`` backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dcr_fast.circle_loss.schema import CircleMargins


def compute_dtype(x: Tensor) -> torch.dtype:
    """Accumulation dtype: fp64 for fp64 inputs, fp32 for every other float."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def unit_rows(embeddings: Tensor, ref_emb: Tensor | None) -> tuple[Tensor, Tensor]:
    """Row-normalized embeddings and reference set in the compute dtype (r̂ is x̂ without a reference)."""
    dtype = compute_dtype(embeddings)
    x_hat = F.normalize(embeddings.to(dtype), dim=1)
    return x_hat, x_hat if ref_emb is None else F.normalize(ref_emb.to(dtype), dim=1)


def circle_logits(s: Tensor, margins: CircleMargins) -> tuple[Tensor, Tensor]:
    """Positive and negative Circle logits of similarities ``s``; α is detached."""
    sd = s.detach()
    lp = -margins.gamma * torch.relu(margins.o_p - sd) * (s - margins.delta_p)
    ln = margins.gamma * torch.relu(sd - margins.o_n) * (s - margins.delta_n)
    return lp, ln


def circle_lse_reference(x_hat: Tensor, r_hat: Tensor, pos: Tensor, neg: Tensor,
                         margins: CircleMargins) -> tuple[Tensor, Tensor]:
    """Row log-sum-exps of the positive and negative logits (-inf for an empty set)."""
    lp, ln = circle_logits(x_hat @ r_hat.T, margins)
    lse_p = torch.logsumexp(lp.masked_fill(~pos, float("-inf")), dim=1)
    lse_n = torch.logsumexp(ln.masked_fill(~neg, float("-inf")), dim=1)
    return lse_p, lse_n


def dense_label_masks(labels: Tensor, ref_labels: Tensor, self_offset: int | None) -> tuple[Tensor, Tensor]:
    """B×M positive and negative masks from labels; with ``self_offset``, column i + self_offset is
    row i's own embedding and no positive (0: the batch is its own reference set)."""
    same = labels[:, None] == ref_labels[None, :]
    pos = same.clone()
    if self_offset is not None:
        pos.diagonal(self_offset).fill_(False)
    return pos, ~same


def dense_pair_masks(pairs, n_rows: int, n_cols: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """B×M masks of explicit (row, column) pair lists ``((a_p, p), (a_n, n))``."""
    masks = []
    for a, b in pairs:
        mask = torch.zeros(n_rows, n_cols, dtype=torch.bool, device=device)
        mask[a, b] = True
        masks.append(mask)
    return masks[0], masks[1]


def lse_from_labels(embeddings: Tensor, ref_emb: Tensor | None, labels: Tensor, ref_labels: Tensor,
                    self_offset: int | None, margins: CircleMargins) -> tuple[Tensor, Tensor]:
    x_hat, r_hat = unit_rows(embeddings, ref_emb)
    return circle_lse_reference(x_hat, r_hat, *dense_label_masks(labels, ref_labels, self_offset), margins)


def lse_from_pairs(embeddings: Tensor, ref_emb: Tensor | None, pairs, margins: CircleMargins) -> tuple[Tensor, Tensor]:
    x_hat, r_hat = unit_rows(embeddings, ref_emb)
    masks = dense_pair_masks(pairs, x_hat.shape[0], r_hat.shape[0], x_hat.device)
    return circle_lse_reference(x_hat, r_hat, *masks, margins)

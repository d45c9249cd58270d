"""Explicit ``indices_tuple`` pairs: deduplicated, and the sparse log-sum-exp the non-reference
backends use for them (memory O(#pairs·d)). Deduplication is data-dependent (a host sync):
the label path never comes here."""

from __future__ import annotations

import torch
from torch import Tensor

from dcr_fast.circle_loss.reference import circle_logits, unit_rows
from dcr_fast.circle_loss.schema import CircleMargins


def unique_pairs(pairs: tuple[Tensor, ...], n_cols: int):
    """``((a_p, p), (a_n, n))`` from (anchor1, positive, anchor2, negative), duplicates collapsed."""
    a1, p, a2, n = pairs
    pos = _unique_pairs(a1, p, n_cols)
    neg = _unique_pairs(a2, n, n_cols)
    if torch.isin(pos[0] * n_cols + pos[1], neg[0] * n_cols + neg[1]).any():
        raise ValueError("indices_tuple: a pair cannot be both positive and negative")
    return pos, neg


def _unique_pairs(a: Tensor, b: Tensor, n_cols: int) -> tuple[Tensor, Tensor]:
    key = torch.unique(a * n_cols + b)
    return key // n_cols, key % n_cols


def circle_lse_sparse(embeddings: Tensor, ref_emb: Tensor | None, pairs, margins: CircleMargins) -> tuple[Tensor, Tensor]:
    """Row log-sum-exps over explicit (deduplicated) pair lists, without a B×M matrix."""
    x_hat, r_hat = unit_rows(embeddings, ref_emb)
    out = []
    for (a, b), positive in zip(pairs, (True, False)):
        s = (x_hat[a] * r_hat[b]).sum(dim=1)
        logit = circle_logits(s, margins)[0 if positive else 1]
        top = torch.full((x_hat.shape[0],), float("-inf"), dtype=logit.dtype, device=logit.device)
        top = top.scatter_reduce(0, a, logit.detach(), reduce="amax")
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        total = torch.zeros_like(top).index_add(0, a, torch.exp(logit - top[a]))
        out.append(top + torch.log(total))
    return out[0], out[1]

"""The public face: :class:`CircleLoss` and :func:`circle_loss`, and the O(B) epilogue every backend shares."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcr_fast.circle_loss import backends
from dcr_fast.circle_loss.backends import Backend
from dcr_fast.circle_loss.checks import check_inputs
from dcr_fast.circle_loss.distributed import check_distributed, distributed_circle_loss
from dcr_fast.circle_loss.pairs import unique_pairs
from dcr_fast.circle_loss.schema import CircleMargins, Variant


class CircleLoss(nn.Module):
    """Circle loss (Sun et al., 2020) with pytorch-metric-learning's call signature.

    Args:
        m: relaxation margin in [0, 1]; Δp = 1 - m, Δn = m.
        gamma: scale γ, positive and finite.
        variant: ``"original"`` (PML / Sun et al.) or ``"dcr"`` (DCR paper A.8 weights;
            the paper trains with m=0.25, gamma=16).
        backend: ``"auto"``, ``"triton"``, ``"torch"`` (reference) or ``"chunked"``.
        distributed: inside an initialized process group, each rank's embeddings against
            every rank's (see :mod:`dcr_fast.circle_loss.distributed`): the value is the loss
            of the concatenated global batch on every rank, each rank's gradient its rows of it.

    Example::

        >>> loss_fn = CircleLoss(m=0.25, gamma=16.0, variant="dcr")
        >>> emb = torch.randn(32, 64, requires_grad=True)
        >>> loss = loss_fn(emb, torch.randint(0, 2, (32,)))
        >>> loss.backward()
    """

    def __init__(self, m: float = 0.4, gamma: float = 80.0, variant: Variant = "original",
                 backend: Backend = "auto", distributed: bool = False) -> None:
        super().__init__()
        margins = CircleMargins(m, gamma, variant)  # validates
        backends.check_backend(backend)
        self.m, self.gamma, self.variant, self.backend = margins.m, margins.gamma, variant, backend
        self.distributed = bool(distributed)

    def forward(self, embeddings: Tensor, labels: Tensor | None = None,
                indices_tuple: Sequence[Tensor] | None = None, ref_emb: Tensor | None = None,
                ref_labels: Tensor | None = None) -> Tensor:
        return circle_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels, m=self.m, gamma=self.gamma,
                           variant=self.variant, backend=self.backend, distributed=self.distributed)

    def extra_repr(self) -> str:
        return (f"m={self.m}, gamma={self.gamma}, variant={self.variant!r}, backend={self.backend!r}"
                + (", distributed=True" if self.distributed else ""))


def circle_loss(embeddings: Tensor, labels: Tensor | None = None,
                indices_tuple: Sequence[Tensor] | None = None, ref_emb: Tensor | None = None,
                ref_labels: Tensor | None = None, *, m: float = 0.4, gamma: float = 80.0,
                variant: Variant = "original", backend: Backend = "auto", distributed: bool = False) -> Tensor:
    """Functional form of :class:`CircleLoss`; see ``dcr_fast.circle_loss``'s docstring for semantics."""
    margins = CircleMargins(m, gamma, variant)
    backends.check_backend(backend)
    if distributed:
        check_distributed(indices_tuple, ref_emb, ref_labels, labels)
        labels, _, _ = check_inputs(embeddings, labels, None, None, None)
        impl = backends.choose(backend, embeddings, embeddings.shape[0] * torch.distributed.get_world_size())
        return distributed_circle_loss(embeddings, labels, impl, margins, row_losses)
    labels, ref_labels, pairs = check_inputs(embeddings, labels, indices_tuple, ref_emb, ref_labels)
    zero = embeddings.sum() * 0  # a zero with a (zero) gradient, as PML returns; no B×d temporary
    n_ref = embeddings.shape[0] if ref_emb is None else ref_emb.shape[0]
    impl = backends.choose(backend, embeddings, n_ref)

    # PML returns zero for at most one pair of each kind.
    if pairs is not None:
        if all(len(t) <= 1 for t in pairs):
            return zero
        lse_p, lse_n = impl.pairs(embeddings, ref_emb, unique_pairs(pairs, n_ref), margins)
    else:
        # The batch is its own reference set (PML: the reference labels are the labels object):
        # row i's self pair is column i, no positive.
        self_offset = 0 if ref_emb is None or ref_labels is labels else None
        n_pairs = embeddings.shape[0] * n_ref - (0 if self_offset is None else embeddings.shape[0])
        if n_pairs <= 2:  # so few pairs are at most one of each kind, or leave no row with both
            return zero
        lse_p, lse_n = impl.labels(embeddings, ref_emb, labels, ref_labels, self_offset, margins)
    rows = row_losses(lse_p, lse_n)
    counted = (rows > 0).sum()
    return torch.where(counted > 0, rows.sum() / counted.clamp(min=1), zero.to(rows.dtype)).to(embeddings.dtype)


def row_losses(lse_p: Tensor, lse_n: Tensor) -> Tensor:
    """softplus(lse_p + lse_n) for rows with both sets non-empty, 0 for the others (an empty set's
    log-sum-exp is -inf: read from the values themselves, without a host sync or a label count)."""
    has_p, has_n = lse_p > float("-inf"), lse_n > float("-inf")
    lse_p = torch.where(has_p, lse_p, torch.zeros_like(lse_p))
    lse_n = torch.where(has_n, lse_n, torch.zeros_like(lse_n))
    return F.softplus(lse_p + lse_n) * (has_p & has_n)

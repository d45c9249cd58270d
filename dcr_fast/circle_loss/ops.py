"""Every compiled Circle-loss op in one place: its typed Python face and its fake (shape) function.

* ``dcr_fast::circle_lse`` / ``dcr_fast::circle_lse_backward`` — the Triton kernels of
  ``dcr_fast.kernels.circle_loss``, wrapped as ``torch.library`` custom ops (``triton_op`` +
  ``wrap_triton`` fails opcheck and ``torch.compile`` here; ``custom_op`` passes both), paired up
  for autograd. ``same_ref``: the reference set is the batch itself (r̂ is x̂); the backward then
  returns the summed gradient as dX̂ and an empty dR̂, so no second B×d gradient is allocated.
* ``dcr_fast::circle_rows_lse`` / ``dcr_fast::circle_rows_ds_`` — the C++ row epilogues of the
  chunked CPU path (``csrc/circle_rows.cpp``; schemas in ``csrc/module.cpp``), present when the
  extension is built.

``margins`` is :meth:`CircleMargins.scalars` (``[o_p, o_n, delta_p, delta_n, gamma]``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dcr_fast._extension import HAS_EXTENSION
from dcr_fast.circle_loss.reference import compute_dtype
from dcr_fast.circle_loss.schema import CircleMargins


@torch.library.custom_op("dcr_fast::circle_lse", mutates_args=())
def circle_lse(x_hat: Tensor, r_hat: Tensor, labels: Tensor, ref_labels: Tensor, self_offset: int | None,
               same_ref: bool, margins: list[float]) -> tuple[Tensor, Tensor]:
    """(lse_p, lse_n) of unit rows ``x_hat`` against ``r_hat``, in the accumulation dtype;
    column i + ``self_offset`` is row i's own embedding (no positive), or None."""
    from dcr_fast.kernels.circle_loss import circle_lse_forward

    return circle_lse_forward(x_hat, r_hat, labels, ref_labels, self_offset, margins)


@circle_lse.register_fake
def _(x_hat, r_hat, labels, ref_labels, self_offset, same_ref, margins):
    acc = compute_dtype(x_hat)
    return x_hat.new_empty(x_hat.shape[0], dtype=acc), x_hat.new_empty(x_hat.shape[0], dtype=acc)


@torch.library.custom_op("dcr_fast::circle_lse_backward", mutates_args=())
def circle_lse_backward(x_hat: Tensor, r_hat: Tensor, labels: Tensor, ref_labels: Tensor, self_offset: int | None,
                        same_ref: bool, margins: list[float], lse_p: Tensor, lse_n: Tensor, g_p: Tensor,
                        g_n: Tensor) -> tuple[Tensor, Tensor]:
    """(dX̂, dR̂) in the inputs' dtype; with ``same_ref`` dX̂ holds both and dR̂ is empty (0×d)."""
    from dcr_fast.kernels.circle_loss import circle_lse_backward as backward

    dx, dr = backward(x_hat, r_hat, labels, ref_labels, self_offset, margins, lse_p, lse_n, g_p, g_n,
                      same_ref=same_ref)
    return dx, r_hat.new_empty(0, r_hat.shape[1]) if dr is None else dr


@circle_lse_backward.register_fake
def _(x_hat, r_hat, labels, ref_labels, self_offset, same_ref, margins, lse_p, lse_n, g_p, g_n):
    return torch.empty_like(x_hat), r_hat.new_empty(0 if same_ref else r_hat.shape[0], r_hat.shape[1])


def _circle_lse_setup(ctx, inputs, output):
    x_hat, r_hat, labels, ref_labels, self_offset, same_ref, margins = inputs
    ctx.save_for_backward(x_hat, r_hat, labels, ref_labels, *output)
    ctx.flags = (self_offset, same_ref, margins)


def _circle_lse_grad(ctx, g_p, g_n):
    x_hat, r_hat, labels, ref_labels, lse_p, lse_n = ctx.saved_tensors
    dx, dr = circle_lse_backward(x_hat, r_hat, labels, ref_labels, *ctx.flags, lse_p, lse_n,
                                 g_p.contiguous(), g_n.contiguous())
    same_ref = ctx.flags[1]
    return dx, None if same_ref else dr, None, None, None, None, None


circle_lse.register_autograd(_circle_lse_grad, setup_context=_circle_lse_setup)


def circle_rows_lse(s: Tensor, labels: Tensor, ref_labels: Tensor, row0: int, self_offset: int | None,
                    margins: CircleMargins) -> tuple[Tensor, Tensor]:
    """(lse_p, lse_n) of similarity rows ``s`` = rows [row0, row0 + len(s)) of the batch."""
    return torch.ops.dcr_fast.circle_rows_lse(*_rows_args(s, labels, ref_labels, row0, self_offset, margins))


def circle_rows_ds_(s: Tensor, labels: Tensor, ref_labels: Tensor, row0: int, self_offset: int | None,
                    margins: CircleMargins, lse_p: Tensor, lse_n: Tensor, g_p: Tensor, g_n: Tensor) -> Tensor:
    """Overwrites similarity rows ``s`` with dL/dS given the rows' lse and upstream gradients; returns ``s``."""
    torch.ops.dcr_fast.circle_rows_ds_(*_rows_args(s, labels, ref_labels, row0, self_offset, margins),
                                       lse_p, lse_n, g_p, g_n)
    return s


def _rows_args(s, labels, ref_labels, row0, self_offset, margins):
    """The C++ ops' arguments. Their schema takes the self pair of row row0 + i at column row0 + i
    and the rows' labels from ``labels[row0:]``; with a ``self_offset`` the reference labels hold
    the rows' labels at that offset, so indexing them shifted serves both."""
    if self_offset is None:
        return s, labels, ref_labels, row0, False, *margins.scalars()
    return s, ref_labels, ref_labels, row0 + self_offset, True, *margins.scalars()


if HAS_EXTENSION:

    @torch.library.register_fake("dcr_fast::circle_rows_lse")
    def _(s, labels, ref_labels, row0, exclude_diag, o_p, o_n, delta_p, delta_n, gamma):
        return s.new_empty(s.shape[0]), s.new_empty(s.shape[0])

    @torch.library.register_fake("dcr_fast::circle_rows_ds_")
    def _(s, labels, ref_labels, row0, exclude_diag, o_p, o_n, delta_p, delta_n, gamma, lse_p, lse_n, g_p, g_n):
        return None

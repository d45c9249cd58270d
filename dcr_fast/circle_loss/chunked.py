"""The chunked path: row chunks of the similarity, a recomputing backward, O(chunk·M) memory.

Each chunk's similarities come from one GEMM; the elementwise work after it runs in the
extension's fused row kernels (``csrc/circle_rows.cpp``: one pass over the chunk instead of
~15) when ``fused`` (default: the extension is built and the tensors are float32/float64 on the
CPU), else in PyTorch, the reference they are tested against. Any device; the CPU's path for
large batches.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dcr_fast._extension import HAS_EXTENSION
from dcr_fast.circle_loss import ops
from dcr_fast.circle_loss.reference import circle_logits, unit_rows
from dcr_fast.circle_loss.schema import CircleMargins

# Chunks hold about this many elements of each chunk×M temporary.
CHUNK_ELEMENTS = 1 << 22


def fused_rows_available(x: Tensor) -> bool:
    """Whether the C++ row kernels serve these tensors (built extension; CPU float32/float64)."""
    return HAS_EXTENSION and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


def circle_lse_chunked(x_hat: Tensor, r_hat: Tensor, labels: Tensor, ref_labels: Tensor,
                       self_offset: int | None, margins: CircleMargins, chunk_rows: int | None = None,
                       fused: bool | None = None) -> tuple[Tensor, Tensor]:
    """Row log-sum-exps of unit rows ``x_hat`` against ``r_hat``, streamed over row chunks;
    only a chunk×M block is ever live. ``self_offset``: column i + self_offset is row i's own
    embedding (no positive), or None."""
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // max(1, r_hat.shape[0]))
    if fused is None:
        fused = fused_rows_available(x_hat)
    return _ChunkedCircleLSE.apply(x_hat, r_hat, labels, ref_labels, self_offset, margins, chunk_rows, fused)


def lse_from_labels(embeddings: Tensor, ref_emb: Tensor | None, labels: Tensor, ref_labels: Tensor,
                    self_offset: int | None, margins: CircleMargins) -> tuple[Tensor, Tensor]:
    return circle_lse_chunked(*unit_rows(embeddings, ref_emb), labels, ref_labels, self_offset, margins)


class _ChunkedCircleLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_hat, r_hat, labels, ref_labels, self_offset, margins, chunk_rows, fused):
        if fused:
            labels, ref_labels = labels.long().contiguous(), ref_labels.long().contiguous()
        lse_p = x_hat.new_empty(x_hat.shape[0])
        lse_n = torch.empty_like(lse_p)
        for sl, pos, neg in _row_chunks(labels, ref_labels, self_offset, chunk_rows, masks=not fused):
            s = x_hat[sl] @ r_hat.T
            if fused:
                lse_p[sl], lse_n[sl] = ops.circle_rows_lse(s, labels, ref_labels, sl.start, self_offset, margins)
            else:
                lp, ln = circle_logits(s, margins)
                lse_p[sl] = torch.logsumexp(lp.masked_fill_(~pos, float("-inf")), dim=1)
                lse_n[sl] = torch.logsumexp(ln.masked_fill_(~neg, float("-inf")), dim=1)
        ctx.save_for_backward(x_hat, r_hat, labels, ref_labels, lse_p, lse_n)
        ctx.self_offset, ctx.margins, ctx.chunk_rows, ctx.fused = self_offset, margins, chunk_rows, fused
        return lse_p, lse_n

    @staticmethod
    def backward(ctx, g_p, g_n):
        x_hat, r_hat, labels, ref_labels, lse_p, lse_n = ctx.saved_tensors
        mg = ctx.margins
        g_p, g_n = g_p.to(x_hat.dtype).contiguous(), g_n.to(x_hat.dtype).contiguous()
        dx = torch.zeros_like(x_hat)
        dr = torch.zeros_like(r_hat)
        for sl, pos, neg in _row_chunks(labels, ref_labels, ctx.self_offset, ctx.chunk_rows, masks=not ctx.fused):
            s = x_hat[sl] @ r_hat.T
            if ctx.fused:  # dS over S in place
                ds = ops.circle_rows_ds_(s, labels, ref_labels, sl.start, ctx.self_offset, mg,
                                         lse_p[sl], lse_n[sl], g_p[sl], g_n[sl])
            else:
                lp, ln = circle_logits(s, mg)
                # softmax weights of each set; masked lanes are exactly zero (no NaN from -inf rows)
                w_p = torch.exp(lp - lse_p[sl, None]).masked_fill_(~pos, 0.0)
                w_n = torch.exp(ln - lse_n[sl, None]).masked_fill_(~neg, 0.0)
                ds = mg.gamma * (g_n[sl, None] * w_n * torch.relu(s - mg.o_n)
                                 - g_p[sl, None] * w_p * torch.relu(mg.o_p - s))
            dx[sl] = ds @ r_hat
            dr += ds.T @ x_hat[sl]
        return dx, dr, None, None, None, None, None, None


def _row_chunks(labels: Tensor, ref_labels: Tensor, self_offset: int | None, chunk_rows: int, *,
                masks: bool = True):
    """(rows, positive mask, negative mask) per chunk; with ``masks=False`` the masks are None
    (the fused row kernels read the labels themselves)."""
    cols = torch.arange(ref_labels.shape[0], device=labels.device)
    for start in range(0, labels.shape[0], chunk_rows):
        sl = slice(start, min(start + chunk_rows, labels.shape[0]))
        if not masks:
            yield sl, None, None
            continue
        same = labels[sl, None] == ref_labels[None, :]
        pos = same
        if self_offset is not None:
            own = torch.arange(sl.start, sl.stop, device=labels.device) + self_offset
            pos = same & (cols[None, :] != own[:, None])
        yield sl, pos, ~same

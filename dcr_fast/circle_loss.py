"""Drop-in fast Circle loss: pytorch-metric-learning's call and numbers, O(B·d) memory.

``CircleLoss()(embeddings, labels)`` returns what
``pytorch_metric_learning.losses.CircleLoss()(embeddings, labels)`` returns (PML 2.9: cosine
similarity, all pairs from labels with the diagonal excluded, ``ref_emb``/``ref_labels``,
3- and 4-tuple ``indices_tuple``, α detached, rows lacking a positive or a negative
dropped, mean over rows whose loss is > 0), with the same gradients. ``variant="dcr"`` uses
the DCR paper's appendix A.8 weights α_p = [Δp - s]₊, α_n = [s - Δn]₊ instead.

Every backend computes only the two per-row log-sum-exps (positives and negatives) of the
Circle logits; the O(B) epilogue below (softplus, row masks, mean over non-zero rows) is
shared, so the backends differ only in how they get those two vectors:

* ``"torch"``   — the pure-PyTorch reference: materializes the B×M similarity (mirrors PML).
* ``"chunked"`` — pure PyTorch, streams row chunks (forward and a recomputing backward):
  O(chunk·M) working memory, any device; the CPU path for large batches.
* ``"triton"``  — fused Triton kernels (``dcr_fast.kernels.circle_loss``): online
  log-sum-exp over column tiles, recompute in the backward, never a B×M tensor saved.
* ``"auto"``    — Triton for CUDA tensors; on the CPU chunked when B·M is large, or when d ≤ 512
  and the extension's fused row kernels are built (float32/float64), else torch.

Accumulation is fp32 for fp16/bf16/fp32 inputs and fp64 for fp64 inputs; the loss is
returned in the embeddings' dtype, as PML does. Explicit ``indices_tuple`` pairs go through
a sparse pair path (memory O(#pairs·d)) on the non-reference backends.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcr_fast._extension import HAS_EXTENSION

__all__ = ["CircleLoss", "circle_loss", "circle_lse_reference", "circle_lse_chunked"]

Variant = Literal["original", "dcr"]
Backend = Literal["auto", "triton", "torch", "chunked"]
_VARIANTS = ("original", "dcr")
_BACKENDS = ("auto", "triton", "torch", "chunked")

# "auto" streams instead of materializing once the similarity matrix would exceed this
# many elements; chunks hold about this many elements of each B×M temporary.
AUTO_CHUNK_THRESHOLD = 1 << 24
CHUNK_ELEMENTS = 1 << 22


class CircleLoss(nn.Module):
    """Circle loss (Sun et al., 2020) with pytorch-metric-learning's call signature.

    Args:
        m: relaxation margin; Δp = 1 - m, Δn = m.
        gamma: scale γ.
        variant: ``"original"`` (PML / Sun et al.) or ``"dcr"`` (DCR paper A.8 weights;
            the paper trains with m=0.25, gamma=16).
        backend: ``"auto"``, ``"triton"``, ``"torch"`` (reference) or ``"chunked"``.

    Example::

        >>> loss_fn = CircleLoss(m=0.25, gamma=16.0, variant="dcr")
        >>> emb = torch.randn(32, 64, requires_grad=True)
        >>> loss = loss_fn(emb, torch.randint(0, 2, (32,)))
        >>> loss.backward()
    """

    def __init__(self, m: float = 0.4, gamma: float = 80.0, variant: Variant = "original",
                 backend: Backend = "auto") -> None:
        super().__init__()
        _margins(m, gamma, variant)  # validates
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        self.m, self.gamma, self.variant, self.backend = float(m), float(gamma), variant, backend

    def forward(self, embeddings: Tensor, labels: Tensor | None = None,
                indices_tuple: Sequence[Tensor] | None = None, ref_emb: Tensor | None = None,
                ref_labels: Tensor | None = None) -> Tensor:
        return circle_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels, m=self.m,
                           gamma=self.gamma, variant=self.variant, backend=self.backend)

    def extra_repr(self) -> str:
        return f"m={self.m}, gamma={self.gamma}, variant={self.variant!r}, backend={self.backend!r}"


def circle_loss(embeddings: Tensor, labels: Tensor | None = None,
                indices_tuple: Sequence[Tensor] | None = None, ref_emb: Tensor | None = None,
                ref_labels: Tensor | None = None, *, m: float = 0.4, gamma: float = 80.0,
                variant: Variant = "original", backend: Backend = "auto") -> Tensor:
    """Functional form of :class:`CircleLoss`; see the module docstring for semantics."""
    mg = _margins(m, gamma, variant)
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    labels, ref_labels, pairs = _check_inputs(embeddings, labels, indices_tuple, ref_emb, ref_labels)
    cdtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    zero = embeddings.sum() * 0  # a zero with a (zero) gradient, as PML returns; no B×d temporary
    n_ref = embeddings.shape[0] if ref_emb is None else ref_emb.shape[0]

    if pairs is not None:
        if all(len(t) <= 1 for t in pairs):  # PML returns zero for ≤ 1 pair of each kind
            return zero
        pos_count, neg_count, structure = _pair_structure(pairs, embeddings.shape[0], n_ref)
    else:
        exclude_diag = ref_emb is None or ref_labels is labels
        pos_count, neg_count = _label_counts(labels, ref_labels, exclude_diag)
        if int(pos_count.sum()) <= 1 and int(neg_count.sum()) <= 1:
            return zero
        structure = (labels, ref_labels, exclude_diag)

    if backend == "auto":
        backend = _auto_backend(embeddings, n_ref)
    if backend == "triton" and pairs is None:
        x_hat = r_hat = None  # normalized inside, in the kernels' dtype
    else:
        x_hat = F.normalize(embeddings.to(cdtype), dim=1)
        r_hat = x_hat if ref_emb is None else F.normalize(ref_emb.to(cdtype), dim=1)

    if pairs is not None:
        if backend == "torch":
            lse_p, lse_n = circle_lse_reference(x_hat, r_hat, *_dense_pair_masks(structure, x_hat, r_hat), mg)
        else:
            lse_p, lse_n = _circle_lse_sparse(x_hat, r_hat, structure, mg)
    elif backend == "torch":
        lse_p, lse_n = circle_lse_reference(x_hat, r_hat, *_dense_label_masks(*structure), mg)
    elif backend == "chunked":
        lse_p, lse_n = circle_lse_chunked(x_hat, r_hat, *structure, mg)
    else:
        lse_p, lse_n = _circle_lse_triton(embeddings, ref_emb, *structure, mg)

    has_p, has_n = pos_count > 0, neg_count > 0
    lse_p = torch.where(has_p, lse_p, torch.zeros_like(lse_p))
    lse_n = torch.where(has_n, lse_n, torch.zeros_like(lse_n))
    rows = F.softplus(lse_p + lse_n) * (has_p & has_n)
    counted = (rows > 0).sum()
    loss = torch.where(counted > 0, rows.sum() / counted.clamp(min=1), zero.to(rows.dtype))
    return loss.to(embeddings.dtype)


# ----------------------------------------------------------------------------- the maths


@dataclass(frozen=True)
class _Margins:
    """α_p = [o_p - s]₊, α_n = [s - o_n]₊; targets Δp, Δn; scale γ."""

    o_p: float
    o_n: float
    delta_p: float
    delta_n: float
    gamma: float


def _margins(m: float, gamma: float, variant: str) -> _Margins:
    if variant not in _VARIANTS:
        raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}")
    if not isinstance(m, (int, float)) or not 0.0 <= m <= 1.0:
        raise ValueError(f"m must be a number in [0, 1], got {m!r}")
    if not isinstance(gamma, (int, float)) or not gamma > 0:
        raise ValueError(f"gamma must be a positive number, got {gamma!r}")
    m, gamma = float(m), float(gamma)
    if variant == "original":
        return _Margins(1 + m, -m, 1 - m, m, gamma)
    return _Margins(1 - m, m, 1 - m, m, gamma)


def _circle_logits(s: Tensor, mg: _Margins) -> tuple[Tensor, Tensor]:
    """Positive and negative Circle logits of similarities ``s``; α is detached."""
    sd = s.detach()
    lp = -mg.gamma * torch.relu(mg.o_p - sd) * (s - mg.delta_p)
    ln = mg.gamma * torch.relu(sd - mg.o_n) * (s - mg.delta_n)
    return lp, ln


def circle_lse_reference(x_hat: Tensor, r_hat: Tensor, pos: Tensor, neg: Tensor,
                         mg: _Margins) -> tuple[Tensor, Tensor]:
    """Reference row log-sum-exps from the materialized similarity and dense B×M masks."""
    lp, ln = _circle_logits(x_hat @ r_hat.T, mg)
    lse_p = torch.logsumexp(lp.masked_fill(~pos, float("-inf")), dim=1)
    lse_n = torch.logsumexp(ln.masked_fill(~neg, float("-inf")), dim=1)
    return lse_p, lse_n


def circle_lse_chunked(x_hat: Tensor, r_hat: Tensor, labels: Tensor, ref_labels: Tensor,
                       exclude_diag: bool, mg: _Margins, chunk_rows: int | None = None,
                       fused: bool | None = None) -> tuple[Tensor, Tensor]:
    """Row log-sum-exps streamed over row chunks; only a chunk×M block is ever live.

    Each chunk's similarities come from one GEMM; the elementwise work after it runs in the
    extension's fused row kernels (``csrc/circle_rows.cpp``: one pass over the chunk instead of
    ~15) when ``fused`` (default: the extension is built and the tensors are float32/float64 on
    the CPU), else in PyTorch, the reference they are tested against.
    """
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // max(1, r_hat.shape[0]))
    if fused is None:
        fused = _fused_rows_available(x_hat)
    return _ChunkedCircleLSE.apply(x_hat, r_hat, labels, ref_labels, exclude_diag, mg, chunk_rows, fused)


def _fused_rows_available(x_hat: Tensor) -> bool:
    return HAS_EXTENSION and x_hat.device.type == "cpu" and x_hat.dtype in (torch.float32, torch.float64)


if HAS_EXTENSION:

    @torch.library.register_fake("dcr_fast::circle_rows_lse")
    def _circle_rows_lse_fake(s, labels, ref_labels, row0, exclude_diag, o_p, o_n, delta_p, delta_n, gamma):
        return s.new_empty(s.shape[0]), s.new_empty(s.shape[0])

    @torch.library.register_fake("dcr_fast::circle_rows_ds_")
    def _circle_rows_ds_fake(s, labels, ref_labels, row0, exclude_diag, o_p, o_n, delta_p, delta_n, gamma,
                             lse_p, lse_n, g_p, g_n):
        return None


class _ChunkedCircleLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_hat, r_hat, labels, ref_labels, exclude_diag, mg, chunk_rows, fused):
        if fused:
            labels, ref_labels = labels.long().contiguous(), ref_labels.long().contiguous()
        lse_p = x_hat.new_empty(x_hat.shape[0])
        lse_n = torch.empty_like(lse_p)
        for sl, pos, neg in _row_chunks(labels, ref_labels, exclude_diag, chunk_rows, masks=not fused):
            s = x_hat[sl] @ r_hat.T
            if fused:
                lse_p[sl], lse_n[sl] = torch.ops.dcr_fast.circle_rows_lse(
                    s, labels, ref_labels, sl.start, exclude_diag, *_scalars(mg))
            else:
                lp, ln = _circle_logits(s, mg)
                lse_p[sl] = torch.logsumexp(lp.masked_fill_(~pos, float("-inf")), dim=1)
                lse_n[sl] = torch.logsumexp(ln.masked_fill_(~neg, float("-inf")), dim=1)
        ctx.save_for_backward(x_hat, r_hat, labels, ref_labels, lse_p, lse_n)
        ctx.exclude_diag, ctx.mg, ctx.chunk_rows, ctx.fused = exclude_diag, mg, chunk_rows, fused
        return lse_p, lse_n

    @staticmethod
    def backward(ctx, g_p, g_n):
        x_hat, r_hat, labels, ref_labels, lse_p, lse_n = ctx.saved_tensors
        mg = ctx.mg
        g_p, g_n = g_p.to(x_hat.dtype).contiguous(), g_n.to(x_hat.dtype).contiguous()
        dx = torch.zeros_like(x_hat)
        dr = torch.zeros_like(r_hat)
        for sl, pos, neg in _row_chunks(labels, ref_labels, ctx.exclude_diag, ctx.chunk_rows, masks=not ctx.fused):
            s = x_hat[sl] @ r_hat.T
            if ctx.fused:  # dS over S in place
                torch.ops.dcr_fast.circle_rows_ds_(s, labels, ref_labels, sl.start, ctx.exclude_diag, *_scalars(mg),
                                                   lse_p[sl], lse_n[sl], g_p[sl], g_n[sl])
                ds = s
            else:
                lp, ln = _circle_logits(s, mg)
                # softmax weights of each set; masked lanes are exactly zero (no NaN from -inf rows)
                w_p = torch.exp(lp - lse_p[sl, None]).masked_fill_(~pos, 0.0)
                w_n = torch.exp(ln - lse_n[sl, None]).masked_fill_(~neg, 0.0)
                ds = mg.gamma * (g_n[sl, None] * w_n * torch.relu(s - mg.o_n)
                                 - g_p[sl, None] * w_p * torch.relu(mg.o_p - s))
            dx[sl] = ds @ r_hat
            dr += ds.T @ x_hat[sl]
        return dx, dr, None, None, None, None, None, None


def _scalars(mg: _Margins) -> tuple[float, float, float, float, float]:
    return mg.o_p, mg.o_n, mg.delta_p, mg.delta_n, mg.gamma


def _row_chunks(labels: Tensor, ref_labels: Tensor, exclude_diag: bool, chunk_rows: int, *, masks: bool = True):
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
        if exclude_diag:
            pos = same & (cols[None, :] != cols[sl, None])
        yield sl, pos, ~same


def _circle_lse_sparse(x_hat: Tensor, r_hat: Tensor, structure, mg: _Margins) -> tuple[Tensor, Tensor]:
    """Row log-sum-exps over explicit (deduplicated) pair lists, without a B×M matrix."""
    (a1, p), (a2, n) = structure
    out = []
    for a, b, use_pos in ((a1, p, True), (a2, n, False)):
        s = (x_hat[a] * r_hat[b]).sum(dim=1)
        lp, ln = _circle_logits(s, mg)
        logit = lp if use_pos else ln
        top = torch.full((x_hat.shape[0],), float("-inf"), dtype=logit.dtype, device=logit.device)
        top = top.scatter_reduce(0, a, logit.detach(), reduce="amax")
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        total = torch.zeros_like(top).index_add(0, a, torch.exp(logit - top[a]))
        out.append(top + torch.log(total))
    return out[0], out[1]


def _circle_lse_triton(embeddings: Tensor, ref_emb: Tensor | None, labels: Tensor, ref_labels: Tensor,
                       exclude_diag: bool, mg: _Margins) -> tuple[Tensor, Tensor]:
    if embeddings.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests); "
                         f"got embeddings on {embeddings.device}")
    x_k = _UnitRows.apply(embeddings.contiguous())
    same_ref = ref_emb is None
    r_k = x_k if same_ref else _UnitRows.apply(ref_emb.to(embeddings.dtype).contiguous())
    return _circle_lse_op(x_k, r_k, labels.contiguous(), ref_labels.contiguous(), exclude_diag, same_ref,
                          mg.o_p, mg.o_n, mg.delta_p, mg.delta_n, mg.gamma)


class _UnitRows(torch.autograd.Function):
    """``F.normalize(x.float(), dim=1).to(x.dtype)`` and its gradient, in row chunks.

    The Triton path's normalization: computed in fp32 (fp64 for fp64) like the other
    backends, but saving only x and the row norms, where F.normalize on an up-cast copy
    would keep two fp32 B×d tensors alive (2 × 805 MB at B=131,072, d=1,536).
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        norms = torch.linalg.vector_norm(x, dim=1, dtype=_compute_dtype(x))
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


_NORM_EPS = 1e-12  # F.normalize's default


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _row_slices(x: Tensor) -> list[slice]:
    """Row chunks whose up-cast copies hold about CHUNK_ELEMENTS elements."""
    step = max(1, CHUNK_ELEMENTS // max(1, x.shape[1]))
    return [slice(i, i + step) for i in range(0, x.shape[0], step)]


# The Triton launchers are wrapped as torch.library custom ops so torch.compile traces
# through them (fake functions give shapes) and autograd pairs them up. ``same_ref``: the
# reference set is the batch itself (r_hat is x_hat); the backward then returns the summed
# gradient as dX̂ and an empty dR̂, so no second B×d gradient is ever allocated.
@torch.library.custom_op("dcr_fast::circle_lse", mutates_args=())
def _circle_lse_op(x_hat: Tensor, r_hat: Tensor, labels: Tensor, ref_labels: Tensor, exclude_diag: bool,
                   same_ref: bool, o_p: float, o_n: float, delta_p: float, delta_n: float,
                   gamma: float) -> tuple[Tensor, Tensor]:
    from dcr_fast.kernels.circle_loss import circle_lse_forward

    return circle_lse_forward(x_hat, r_hat, labels, ref_labels, exclude_diag, o_p, o_n, delta_p, delta_n, gamma)


@_circle_lse_op.register_fake
def _(x_hat, r_hat, labels, ref_labels, exclude_diag, same_ref, o_p, o_n, delta_p, delta_n, gamma):
    acc = _compute_dtype(x_hat)
    return x_hat.new_empty(x_hat.shape[0], dtype=acc), x_hat.new_empty(x_hat.shape[0], dtype=acc)


@torch.library.custom_op("dcr_fast::circle_lse_backward", mutates_args=())
def _circle_lse_backward_op(x_hat: Tensor, r_hat: Tensor, labels: Tensor, ref_labels: Tensor,
                            exclude_diag: bool, same_ref: bool, o_p: float, o_n: float, delta_p: float,
                            delta_n: float, gamma: float, lse_p: Tensor, lse_n: Tensor, g_p: Tensor,
                            g_n: Tensor) -> tuple[Tensor, Tensor]:
    from dcr_fast.kernels.circle_loss import circle_lse_backward

    dx, dr = circle_lse_backward(x_hat, r_hat, labels, ref_labels, exclude_diag, o_p, o_n, delta_p,
                                 delta_n, gamma, lse_p, lse_n, g_p, g_n, same_ref=same_ref)
    return dx, r_hat.new_empty(0, r_hat.shape[1]) if dr is None else dr


@_circle_lse_backward_op.register_fake
def _(x_hat, r_hat, labels, ref_labels, exclude_diag, same_ref, o_p, o_n, delta_p, delta_n, gamma,
      lse_p, lse_n, g_p, g_n):
    return torch.empty_like(x_hat), r_hat.new_empty(0 if same_ref else r_hat.shape[0], r_hat.shape[1])


def _circle_lse_setup(ctx, inputs, output):
    x_hat, r_hat, labels, ref_labels, *scalars = inputs
    ctx.save_for_backward(x_hat, r_hat, labels, ref_labels, *output)
    ctx.scalars = scalars


def _circle_lse_grad(ctx, g_p, g_n):
    x_hat, r_hat, labels, ref_labels, lse_p, lse_n = ctx.saved_tensors
    dx, dr = _circle_lse_backward_op(x_hat, r_hat, labels, ref_labels, *ctx.scalars, lse_p, lse_n,
                                     g_p.contiguous(), g_n.contiguous())
    same_ref = ctx.scalars[1]
    return (dx, None if same_ref else dr) + (None,) * 9


_circle_lse_op.register_autograd(_circle_lse_grad, setup_context=_circle_lse_setup)


# ----------------------------------------------------------------------------- pair structure


def _label_counts(labels: Tensor, ref_labels: Tensor, exclude_diag: bool) -> tuple[Tensor, Tensor]:
    """Per-row numbers of positives and negatives, in O((B + M) log M) without a B×M mask."""
    values, counts = torch.unique(ref_labels, return_counts=True)
    idx = torch.searchsorted(values, labels).clamp(max=values.numel() - 1)
    same = torch.where(values[idx] == labels, counts[idx], torch.zeros_like(counts[idx]))
    pos = same - 1 if exclude_diag else same
    return pos, ref_labels.numel() - same


def _dense_label_masks(labels: Tensor, ref_labels: Tensor, exclude_diag: bool) -> tuple[Tensor, Tensor]:
    same = labels[:, None] == ref_labels[None, :]
    pos = same.clone()
    if exclude_diag:
        pos.fill_diagonal_(False)
    return pos, ~same


def _pair_structure(pairs, n_rows: int, n_cols: int):
    a1, p, a2, n = pairs
    pos = _unique_pairs(a1, p, n_cols)
    neg = _unique_pairs(a2, n, n_cols)
    if torch.isin(pos[0] * n_cols + pos[1], neg[0] * n_cols + neg[1]).any():
        raise ValueError("indices_tuple: a pair cannot be both positive and negative")
    counts = tuple(torch.bincount(a, minlength=n_rows) for a, _ in (pos, neg))
    return counts[0], counts[1], (pos, neg)


def _unique_pairs(a: Tensor, b: Tensor, n_cols: int) -> tuple[Tensor, Tensor]:
    key = torch.unique(a * n_cols + b)
    return key // n_cols, key % n_cols


def _dense_pair_masks(structure, x_hat: Tensor, r_hat: Tensor) -> tuple[Tensor, Tensor]:
    masks = []
    for a, b in structure:
        mask = torch.zeros(x_hat.shape[0], r_hat.shape[0], dtype=torch.bool, device=x_hat.device)
        mask[a, b] = True
        masks.append(mask)
    return masks[0], masks[1]


def _auto_backend(embeddings: Tensor, n_ref: int) -> str:
    if embeddings.device.type == "cuda":
        return "triton"
    # Measured on the CPU (bench/results/circle_loss-cpu-*.json): with the fused row kernels the
    # chunked path wins at every B for d = 128 (2-3x the reference); at d = 1,536 its recomputed
    # S costs more than the epilogue saves until S itself is large.
    fused_wins = _fused_rows_available(embeddings) and embeddings.shape[1] <= 512
    if fused_wins or embeddings.shape[0] * n_ref > AUTO_CHUNK_THRESHOLD:
        return "chunked"
    return "torch"


# ----------------------------------------------------------------------------- input checks

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_embeddings(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(t.shape)}")
    if t.dtype not in _FLOATS:
        raise ValueError(f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def _check_labels(name: str, t, n: int, device: torch.device) -> Tensor:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of integer class ids, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with {n} entries (one per embedding), got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype, got {t.dtype}")
    return t.to(device=device, dtype=torch.int64)


def _check_inputs(embeddings, labels, indices_tuple, ref_emb, ref_labels):
    """Validates the PML-style arguments; returns (labels, ref_labels, pairs or None)."""
    _check_embeddings("embeddings", embeddings)
    n_rows = embeddings.shape[0]
    if ref_emb is not None:
        _check_embeddings("ref_emb", ref_emb)
        if ref_emb.shape[1] != embeddings.shape[1]:
            raise ValueError(f"ref_emb must have dim {embeddings.shape[1]} like embeddings, got {ref_emb.shape[1]}")
        if ref_emb.device != embeddings.device:
            raise ValueError(f"ref_emb must be on {embeddings.device} like embeddings, got {ref_emb.device}")
    n_cols = n_rows if ref_emb is None else ref_emb.shape[0]
    if labels is None and indices_tuple is None:
        raise ValueError("labels or indices_tuple is required")
    if labels is not None:
        labels_in = labels
        labels = _check_labels("labels", labels, n_rows, embeddings.device)
        if ref_emb is None or ref_labels is None or ref_labels is labels_in:
            # PML's rule: the diagonal is excluded exactly when the reference labels are the
            # batch labels object; keep that identity through the device/dtype move.
            if ref_emb is not None and ref_labels is None and n_cols != n_rows:
                raise ValueError("ref_labels is required when ref_emb has a different number of rows")
            ref_labels = labels
        else:
            ref_labels = _check_labels("ref_labels", ref_labels, n_cols, embeddings.device)
    if indices_tuple is None:
        return labels, ref_labels, None
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        raise ValueError("indices_tuple must be a tuple of 3 (anchor, positive, negative) "
                         "or 4 (anchor1, positive, anchor2, negative) tensors")
    pairs = []
    for i, t in enumerate(indices_tuple):
        if not isinstance(t, Tensor) or t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"indices_tuple[{i}] must be a 1-D integer tensor")
        t = t.to(device=embeddings.device, dtype=torch.int64)
        limit = n_rows if (len(indices_tuple) == 3 and i == 0) or (len(indices_tuple) == 4 and i in (0, 2)) else n_cols
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= limit):
            raise ValueError(f"indices_tuple[{i}] has indices outside [0, {limit})")
        pairs.append(t)
    if len(pairs) == 3:
        pairs = [pairs[0], pairs[1], pairs[0], pairs[2]]
    if pairs[0].numel() != pairs[1].numel() or pairs[2].numel() != pairs[3].numel():
        raise ValueError("indices_tuple: anchors and their positives/negatives must have equal lengths")
    return labels, ref_labels, tuple(pairs)

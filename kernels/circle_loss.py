"""Triton kernels for the fused Circle loss: per-row log-sum-exps without a B×M matrix.

The Circle loss of anchor row i only needs two numbers from the whole similarity row
s_i· = x̂_i · r̂ᵀ: the log-sum-exp of the positive logits and of the negative logits

    lse_p[i] = LSE_{j ∈ P(i)} -γ·α_p(s_ij)·(s_ij - Δp),   α_p = [o_p - s]₊ (detached)
    lse_n[i] = LSE_{j ∈ N(i)}  γ·α_n(s_ij)·(s_ij - Δn),   α_n = [s - o_n]₊ (detached)

with P(i) = same label, minus row i's own embedding when r̂ contains the rows (column
i + ``self_offset``: 0 for the batch against itself, a rank's row offset when r̂ is the
batch gathered from every rank), and N(i) = other label. The forward kernel streams column
tiles of r̂ past a block of rows and keeps a running max and rescaled sum per row for each
set (online log-sum-exp), so memory is O(B) beyond the inputs. Everything after the two
log-sum-exps (softplus, masks, the mean over non-zero rows) is O(B) work done in PyTorch by
the caller. m and γ arrive as run-time float64 scalars (``margins``), so a new value
compiles nothing.

The backward turns upstream gradients g_p, g_n (one per row) into

    dS_ij = g_p[i]·softmax_p(i)_j·(-γ·α_p) + g_n[i]·softmax_n(i)_j·(γ·α_n)

recomputed tile by tile, and contracts it two ways: dX̂ = dS·R̂ and dR̂ = dSᵀ·X̂.
* Small d (≤ ``FUSED_BWD_MAX_D``): two fully fused kernels, one owning a row block (dX̂) and
  one owning a column block (dR̂); each recomputes its S tiles, nothing B×M is written.
* Large d: a fused kernel would recompute S once per d-chunk of the output; instead a row
  chunk of dS (chunk×M, bounded by ``DS_CHUNK_BYTES``) is written by a kernel and contracted
  with two cuBLAS products (fp32 outputs), which is within a small factor of the
  unavoidable matmul cost.

Accumulation is fp32 (fp64 for fp64 inputs). dS enters its products in the inputs' dtype
(tensor cores). The mean over B rows puts a 1/B in every dS entry, which fp16 cannot hold at
large B (nothing below 6e-8): for fp16 inputs dS is carried times a power of two that maps
the largest value any row can reach to 2^14 (:func:`_ds_scale`), and the products are scaled
back in fp32. bf16 has fp32's exponent range and needs no scale. fp32 dots honour
``torch.backends.cuda.matmul.allow_tf32`` (IEEE unless TF32 is allowed, as torch.matmul).

Tile shapes are chosen by ``triton.autotune`` on the GPU from a short list per kernel and
kind of dot (:func:`candidates`), keyed on d, the size class of the batch and the dtypes, so
each GPU picks by measurement on its first call of a shape class; :func:`tuned_configs`
reports the picks. When the row (or column) block's whole d fits in one BLOCK_D chunk, that
block is loaded once and kept in registers for the sweep over the other side instead of
being re-read per tile. Every launch runs under the inputs' CUDA device, not the current one.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

FUSED_BWD_MAX_D = 256
DS_CHUNK_BYTES = 256 * 2**20
# fp16 dS is scaled so that the largest value a row can reach lands here: four binades of
# headroom below fp16's maximum (65,504), 28 binades of full precision below it.
DS_SCALE_TARGET_LOG2 = 14

# The CPU interpreter runs the same kernels for tests; it cannot do bf16 dots (garbage) and
# is slow on big tiles, so tiles are up-cast and kept small there.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _load_tile(P, idx, n, stride, cols, n_cols):
    """P[idx, cols] of a row-major matrix, zero outside its n × n_cols extent."""
    return tl.load(P + idx[:, None].to(tl.int64) * stride + cols[None, :],
                   mask=(idx[:, None] < n) & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def _sim_tile(X, R, rows, cols, B, M, D, stride_x, stride_r, x_res, r_res,
              X_RES: tl.constexpr, R_RES: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """S[rows, cols] = X̂[rows] · R̂[cols]ᵀ accumulated over d in chunks of BLOCK_D.

    ``X_RES`` / ``R_RES``: that side's tile is already in registers (``x_res`` / ``r_res``,
    from :func:`_resident_tile`; d fits one chunk), the other side is loaded here.
    """
    # Static branches only (no boolean operators on constexprs, one return), for every Triton.
    if X_RES:
        r = _input_tile(R, cols, M, stride_r, tl.arange(0, BLOCK_D), D, ACC, UPCAST)
        acc = tl.dot(x_res, tl.trans(r), input_precision=PRECISION, out_dtype=ACC)
    elif R_RES:
        x = _input_tile(X, rows, B, stride_x, tl.arange(0, BLOCK_D), D, ACC, UPCAST)
        acc = tl.dot(x, tl.trans(r_res), input_precision=PRECISION, out_dtype=ACC)
    else:
        acc = tl.zeros((BM, BN), dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            x = _input_tile(X, rows, B, stride_x, dd, D, ACC, UPCAST)
            r = _input_tile(R, cols, M, stride_r, dd, D, ACC, UPCAST)
            acc += tl.dot(x, tl.trans(r), input_precision=PRECISION, out_dtype=ACC)
    return acc


@triton.jit
def _input_tile(P, idx, n, stride, cols, n_cols, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """A tile of an input matrix as the dots take it (up-cast in the interpreter)."""
    t = _load_tile(P, idx, n, stride, cols, n_cols)
    if UPCAST:
        t = t.to(ACC)
    return t


@triton.jit
def _resident_tile(P, idx, n, stride, D, RESIDENT: tl.constexpr, BLOCK_D: tl.constexpr,
                   ACC: tl.constexpr, UPCAST: tl.constexpr):
    """The owned block's whole rows when they fit one chunk (else a placeholder never read)."""
    if RESIDENT:
        tile = _input_tile(P, idx, n, stride, tl.arange(0, BLOCK_D), D, ACC, UPCAST)
    else:
        tile = 0.0
    return tile


@triton.jit
def _pair_masks(Ylab, Rlab, rows, cols, B, M, self_offset, EXCLUDE_SELF: tl.constexpr):
    y = tl.load(Ylab + rows, mask=rows < B, other=-1)
    yr = tl.load(Rlab + cols, mask=cols < M, other=-2)
    inside = (rows[:, None] < B) & (cols[None, :] < M)
    same = y[:, None] == yr[None, :]
    pos = inside & same
    if EXCLUDE_SELF:
        pos = pos & (rows[:, None] + self_offset != cols[None, :])
    neg = inside & (y[:, None] != yr[None, :])
    return pos, neg


@triton.jit
def _acc_scalar(v, ACC: tl.constexpr):
    """A float64 kernel argument in the accumulation dtype (the interpreter passes a Python float)."""
    return (v + tl.zeros((), ACC)).to(ACC)


@triton.jit
def _ds_scale_factor(DS_SCALE, i: tl.constexpr, SCALE_DS: tl.constexpr):
    """DS_SCALE[i] (0: dS's scale, 1: its inverse) with ``SCALE_DS``, else 1."""
    if SCALE_DS:
        f = tl.load(DS_SCALE + i)
    else:
        f = 1.0
    return f


@triton.jit
def _logits(s, o_p, o_n, delta_p, delta_n, gamma):
    """Positive and negative Circle logits of a similarity tile (α treated as constants)."""
    alpha_p = tl.maximum(o_p - s, 0.0)
    alpha_n = tl.maximum(s - o_n, 0.0)
    return -gamma * alpha_p * (s - delta_p), gamma * alpha_n * (s - delta_n), alpha_p, alpha_n


@triton.jit
def _ds_tile(X, R, Ylab, Rlab, LSE_P, LSE_N, G_P, G_N, rows, cols, B, M, D, stride_x, stride_r,
             x_res, r_res, self_offset, o_p, o_n, delta_p, delta_n, gamma, ds_scale,
             EXCLUDE_SELF: tl.constexpr, X_RES: tl.constexpr, R_RES: tl.constexpr, BLOCK_D: tl.constexpr,
             ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr,
             BN: tl.constexpr):
    """dL/dS on one tile (times ``ds_scale``), from the saved row log-sum-exps and their upstream gradients."""
    s = _sim_tile(X, R, rows, cols, B, M, D, stride_x, stride_r, x_res, r_res, X_RES, R_RES, BLOCK_D, ACC,
                  UPCAST, PRECISION, BM, BN)
    pos, neg = _pair_masks(Ylab, Rlab, rows, cols, B, M, self_offset, EXCLUDE_SELF)
    lp, ln, alpha_p, alpha_n = _logits(s, o_p, o_n, delta_p, delta_n, gamma)
    rmask = rows < B
    lse_p = tl.load(LSE_P + rows, mask=rmask, other=0.0)
    lse_n = tl.load(LSE_N + rows, mask=rmask, other=0.0)
    g_p = tl.load(G_P + rows, mask=rmask, other=0.0)
    g_n = tl.load(G_N + rows, mask=rmask, other=0.0)
    # Masked lanes are pushed to -inf before exp so they cannot overflow.
    w_p = tl.exp(tl.where(pos, lp - lse_p[:, None], float("-inf")))
    w_n = tl.exp(tl.where(neg, ln - lse_n[:, None], float("-inf")))
    return (gamma * ds_scale) * (g_n[:, None] * w_n * alpha_n - g_p[:, None] * w_p * alpha_p)


@triton.jit
def _dot_in_input_dtype(ds, y, ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """ds·y with ds rounded to y's dtype, so bf16/fp16 inputs use tensor-core dots; the
    interpreter rounds alike and multiplies the rounded values in ACC."""
    ds_in = ds.to(y.dtype)
    if UPCAST:
        return tl.dot(ds_in.to(ACC), y.to(ACC), input_precision=PRECISION, out_dtype=ACC)
    return tl.dot(ds_in, y, input_precision=PRECISION, out_dtype=ACC)


@triton.jit
def _circle_fwd_kernel(X, R, Ylab, Rlab, LSE_P, LSE_N, B, M, D, stride_x, stride_r, SIZE_CLASS, self_offset,
                       o_p: tl.float64, o_n: tl.float64, delta_p: tl.float64, delta_n: tl.float64,
                       gamma: tl.float64, EXCLUDE_SELF: tl.constexpr, RESIDENT: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                       UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    o_p, o_n = _acc_scalar(o_p, ACC), _acc_scalar(o_n, ACC)
    delta_p, delta_n, gamma = _acc_scalar(delta_p, ACC), _acc_scalar(delta_n, ACC), _acc_scalar(gamma, ACC)
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    x_res = _resident_tile(X, rows, B, stride_x, D, RESIDENT, BLOCK_D, ACC, UPCAST)
    max_p = tl.full((BM,), float("-inf"), ACC)
    max_n = tl.full((BM,), float("-inf"), ACC)
    sum_p = tl.zeros((BM,), ACC)
    sum_n = tl.zeros((BM,), ACC)
    for c0 in range(0, M, BN):
        cols = c0 + tl.arange(0, BN)
        s = _sim_tile(X, R, rows, cols, B, M, D, stride_x, stride_r, x_res, 0.0, RESIDENT, False, BLOCK_D, ACC,
                      UPCAST, PRECISION, BM, BN)
        pos, neg = _pair_masks(Ylab, Rlab, rows, cols, B, M, self_offset, EXCLUDE_SELF)
        lp, ln, _, _ = _logits(s, o_p, o_n, delta_p, delta_n, gamma)
        lp = tl.where(pos, lp, float("-inf"))
        ln = tl.where(neg, ln, float("-inf"))
        # Online log-sum-exp; a row with no member yet keeps max = -inf, so the rescale
        # factor is guarded to avoid exp(-inf - -inf).
        new_p = tl.maximum(max_p, tl.max(lp, axis=1))
        new_n = tl.maximum(max_n, tl.max(ln, axis=1))
        safe_p = tl.where(new_p == float("-inf"), 0.0, new_p)
        safe_n = tl.where(new_n == float("-inf"), 0.0, new_n)
        sum_p = sum_p * tl.exp(max_p - safe_p) + tl.sum(tl.exp(lp - safe_p[:, None]), axis=1)
        sum_n = sum_n * tl.exp(max_n - safe_n) + tl.sum(tl.exp(ln - safe_n[:, None]), axis=1)
        max_p = new_p
        max_n = new_n
    rmask = rows < B
    # An empty set has max = -inf and sum = 0; log(1) keeps its result at -inf without log(0).
    tl.store(LSE_P + rows, max_p + tl.log(tl.where(sum_p > 0, sum_p, 1.0)), mask=rmask)
    tl.store(LSE_N + rows, max_n + tl.log(tl.where(sum_n > 0, sum_n, 1.0)), mask=rmask)


@triton.jit
def _circle_bwd_kernel(X, R, Ylab, Rlab, LSE_P, LSE_N, G_P, G_N, DS_SCALE, OUT, B, M, D,
                       stride_x, stride_r, stride_out, SIZE_CLASS, self_offset, o_p: tl.float64, o_n: tl.float64,
                       delta_p: tl.float64, delta_n: tl.float64, gamma: tl.float64, FOR_REF: tl.constexpr,
                       ACCUMULATE: tl.constexpr, EXCLUDE_SELF: tl.constexpr, SCALE_DS: tl.constexpr,
                       RESIDENT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DO: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dX̂ (FOR_REF=False: a row block loops over column tiles, acc += dS·R̂) or
    dR̂ (FOR_REF=True: a column block loops over row tiles, acc += dSᵀ·X̂), d-chunk axis 1.
    ``ACCUMULATE``: add to what OUT holds (r̂ is x̂: dR̂ lands on the dX̂ written before).
    ``SCALE_DS``: dS enters the dots times DS_SCALE[0] and the sums are multiplied by DS_SCALE[1]."""
    o_p, o_n = _acc_scalar(o_p, ACC), _acc_scalar(o_n, ACC)
    delta_p, delta_n, gamma = _acc_scalar(delta_p, ACC), _acc_scalar(delta_n, ACC), _acc_scalar(gamma, ACC)
    ds_scale = _ds_scale_factor(DS_SCALE, 0, SCALE_DS)
    dout = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    if FOR_REF:
        own = tl.program_id(0) * BN + tl.arange(0, BN)
        r_res = _resident_tile(R, own, M, stride_r, D, RESIDENT, BLOCK_D, ACC, UPCAST)
        acc = tl.zeros((BN, BLOCK_DO), ACC)
        for r0 in range(0, B, BM):
            rows = r0 + tl.arange(0, BM)
            ds = _ds_tile(X, R, Ylab, Rlab, LSE_P, LSE_N, G_P, G_N, rows, own, B, M, D, stride_x, stride_r,
                          0.0, r_res, self_offset, o_p, o_n, delta_p, delta_n, gamma, ds_scale, EXCLUDE_SELF, False,
                          RESIDENT, BLOCK_D, ACC, UPCAST, PRECISION, BM, BN)
            x = _load_tile(X, rows, B, stride_x, dout, D)
            acc += _dot_in_input_dtype(tl.trans(ds), x, ACC, UPCAST, PRECISION)
        n_own = M
    else:
        own = tl.program_id(0) * BM + tl.arange(0, BM)
        x_res = _resident_tile(X, own, B, stride_x, D, RESIDENT, BLOCK_D, ACC, UPCAST)
        acc = tl.zeros((BM, BLOCK_DO), ACC)
        for c0 in range(0, M, BN):
            cols = c0 + tl.arange(0, BN)
            ds = _ds_tile(X, R, Ylab, Rlab, LSE_P, LSE_N, G_P, G_N, own, cols, B, M, D, stride_x, stride_r,
                          x_res, 0.0, self_offset, o_p, o_n, delta_p, delta_n, gamma, ds_scale, EXCLUDE_SELF, RESIDENT,
                          False, BLOCK_D, ACC, UPCAST, PRECISION, BM, BN)
            r = _load_tile(R, cols, M, stride_r, dout, D)
            acc += _dot_in_input_dtype(ds, r, ACC, UPCAST, PRECISION)
        n_own = B
    acc = acc * _ds_scale_factor(DS_SCALE, 1, SCALE_DS)
    out_ptrs = OUT + own[:, None].to(tl.int64) * stride_out + dout[None, :]
    out_mask = (own[:, None] < n_own) & (dout[None, :] < D)
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=out_mask, other=0.0)
    tl.store(out_ptrs, acc, mask=out_mask)


@triton.jit
def _circle_ds_kernel(X, R, Ylab, Rlab, LSE_P, LSE_N, G_P, G_N, DS_SCALE, DS, row0, n_rows, B, M, D,
                      stride_x, stride_r, stride_ds, SIZE_CLASS, self_offset, o_p: tl.float64, o_n: tl.float64,
                      delta_p: tl.float64, delta_n: tl.float64, gamma: tl.float64,
                      EXCLUDE_SELF: tl.constexpr, SCALE_DS: tl.constexpr, RESIDENT: tl.constexpr, BM: tl.constexpr,
                      BN: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
                      PRECISION: tl.constexpr):
    """Writes dS (times DS_SCALE[0] with ``SCALE_DS``) for rows [row0, row0 + n_rows) into a chunk
    buffer (large-d backward)."""
    o_p, o_n = _acc_scalar(o_p, ACC), _acc_scalar(o_n, ACC)
    delta_p, delta_n, gamma = _acc_scalar(delta_p, ACC), _acc_scalar(delta_n, ACC), _acc_scalar(gamma, ACC)
    ds_scale = _ds_scale_factor(DS_SCALE, 0, SCALE_DS)
    local = tl.program_id(0) * BM + tl.arange(0, BM)
    rows = row0 + local
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    x_res = _resident_tile(X, rows, B, stride_x, D, RESIDENT, BLOCK_D, ACC, UPCAST)
    ds = _ds_tile(X, R, Ylab, Rlab, LSE_P, LSE_N, G_P, G_N, rows, cols, B, M, D, stride_x, stride_r,
                  x_res, 0.0, self_offset, o_p, o_n, delta_p, delta_n, gamma, ds_scale, EXCLUDE_SELF, RESIDENT, False,
                  BLOCK_D, ACC, UPCAST, PRECISION, BM, BN)
    tl.store(DS + local[:, None].to(tl.int64) * stride_ds + cols[None, :], ds.to(DS.dtype.element_ty),
             mask=(local[:, None] < n_rows) & (rows[:, None] < B) & (cols[None, :] < M))


# ----------------------------------------------------------------------------- tile configs


def _config(bm: int, bn: int, block_d: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(dict(BM=bm, BN=bn, BLOCK_D=block_d), num_warps=warps, num_stages=stages)


# Candidate tiles per kernel for tensor-core dots (bf16, fp16, fp32 with TF32), short lists so
# the first call of a shape class tunes in seconds. Compiled for sm_90 here
# (bench/kernel_resources.py); most use all 255 registers at 4 warps, so 64×64 tiles also come
# with 8 warps (fewer registers a thread, same tile).
CONFIGS = {
    "fwd": [_config(64, 64, 64, 4, 3), _config(64, 64, 64, 8, 3), _config(128, 64, 64, 8, 3),
            _config(64, 128, 64, 4, 3), _config(128, 128, 64, 8, 3), _config(64, 64, 128, 4, 2),
            _config(128, 64, 128, 8, 2)],
    "bwd": [_config(64, 64, 64, 4, 2), _config(64, 64, 64, 8, 2), _config(64, 64, 128, 4, 2),
            _config(128, 64, 64, 8, 2), _config(64, 128, 64, 8, 2), _config(32, 64, 64, 4, 2)],
    "ds": [_config(64, 64, 64, 4, 3), _config(64, 64, 64, 8, 3), _config(128, 64, 64, 8, 3),
           _config(64, 128, 64, 4, 3), _config(128, 128, 64, 8, 3), _config(128, 128, 32, 8, 4)],
}
# fp32 without TF32 (torch's default, allow_tf32=False) multiplies on the FMA units, where each
# thread holds whole operand rows of its outputs: 64×64×64 tiles at 4 warps spilled 2-14 KB a
# thread (sm_90 compile). At most 16 outputs a thread and BLOCK_D = 32 keep every kernel under
# 32 B of stack.
IEEE_FP32_CONFIGS = [_config(32, 32, 32, 4, 2), _config(64, 32, 32, 4, 2), _config(64, 64, 32, 8, 2)]
# fp64 has no fast tensor-core path either and gets small tiles.
FP64_CONFIGS = [_config(32, 32, 32, 4, 2), _config(64, 32, 32, 4, 2)]
# The CPU interpreter ignores warps and stages; small tiles keep it quick.
INTERPRET_CONFIG = _config(16, 16, 32, 1, 1)
_MAX_BM = 128  # the largest BM above: dS row chunks are multiples of it


def candidates(kind: str, dtype: torch.dtype, precision: str) -> list[triton.Config]:
    """The tiles the GPU autotuner tries for one kernel (``kind``: fwd, bwd or ds), input dtype and
    dot precision (``"tf32"`` or ``"ieee"``); bench/kernel_resources.py compiles exactly these."""
    if dtype == torch.float64:
        return FP64_CONFIGS
    if dtype == torch.float32 and precision == "ieee":
        return IEEE_FP32_CONFIGS
    if dtype == torch.float32 and kind == "bwd":
        # fp32 operands take twice bf16's registers: with a 128-wide column block resident, the
        # dR̂ kernel spilled 1.4 KB a thread (sm_90 compile); TF32 takes the list without it.
        return [c for c in CONFIGS["bwd"] if c.kwargs["BN"] < 128]
    return CONFIGS[kind]


def _prune(kind: str, configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The dtype's and precision's candidates; a BLOCK_D far wider than d only wastes registers.
    The interpreter keeps what it was given (its one config, or what a test forces)."""
    if _INTERPRET:
        return configs
    widest = max(64, triton.next_power_of_2(named_args["D"]))
    return [c for c in candidates(kind, named_args["X"].dtype, kwargs["PRECISION"]) if c.kwargs["BLOCK_D"] <= widest]


def _tuned(kernel, kind: str, key: tuple[str, ...] = (), restore: tuple[str, ...] = ()):
    configs = [INTERPRET_CONFIG] if _INTERPRET else CONFIGS[kind]
    resident = triton.heuristics({"RESIDENT": lambda args: args["D"] <= args["BLOCK_D"]})(kernel)
    # The autotuner adds the tensors' dtypes to the key; ``restore``: outputs a launch reads
    # back, put back after every timed launch, or tuning would add into them many times.
    return triton.autotune(configs, key=["D", "SIZE_CLASS", "PRECISION", *key], restore_value=list(restore),
                           prune_configs_by={"early_config_prune": functools.partial(_prune, kind)})(resident)


_circle_fwd = _tuned(_circle_fwd_kernel, "fwd")
_circle_bwd = _tuned(_circle_bwd_kernel, "bwd", key=("FOR_REF",), restore=("OUT",))  # ACCUMULATE adds into OUT
_circle_ds = _tuned(_circle_ds_kernel, "ds")
_TUNED = {"fwd": _circle_fwd, "bwd": _circle_bwd, "ds": _circle_ds}


def tuned_configs() -> dict[str, dict[str, str]]:
    """The tile configs chosen so far: ``{kernel: {autotune key: config}}`` (for benchmark records);
    a kernel with a single candidate (the interpreter's) reports it under the key ``"any"``."""
    return {name: {str(key): str(config) for key, config in kernel.cache.items()}
            or ({"any": str(kernel.configs[0])} if len(kernel.configs) == 1 else {})
            for name, kernel in _TUNED.items()}


# ----------------------------------------------------------------------------- host side


def _size_class(B: int, M: int) -> int:
    """Batches within a factor of two share a tuning; the best tiles change with occupancy."""
    return min(B, M).bit_length()


def _dtype_params(x: torch.Tensor) -> dict:
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    if x.dtype == torch.float32 and not _INTERPRET and torch.backends.cuda.matmul.allow_tf32:
        precision = "tf32"
    else:
        precision = "ieee"
    upcast = _INTERPRET and x.dtype in (torch.bfloat16, torch.float16)
    return dict(ACC=acc, UPCAST=upcast, PRECISION=precision)


def _on_device(t: torch.Tensor):
    """Launch on the tensors' device: Triton launches on the current CUDA device, and a custom
    op adds no guard (tensors on cuda:1 with device 0 current would crash or race)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def circle_lse_forward(x_hat: torch.Tensor, r_hat: torch.Tensor, labels: torch.Tensor,
                       ref_labels: torch.Tensor, self_offset: int | None,
                       margins: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row log-sum-exps (lse_p, lse_n) of the Circle logits; -inf for an empty set.

    ``self_offset``: row i's own embedding is column i + self_offset of r̂ (no positive), or
    None when r̂ does not contain the rows. ``margins``: ``[o_p, o_n, delta_p, delta_n, gamma]``
    (``CircleMargins.scalars()``)."""
    B, D = x_hat.shape
    M = r_hat.shape[0]
    acc_dtype = torch.float64 if x_hat.dtype == torch.float64 else torch.float32
    lse_p = torch.empty(B, device=x_hat.device, dtype=acc_dtype)
    lse_n = torch.empty_like(lse_p)
    with _on_device(x_hat):
        _circle_fwd[lambda meta: (triton.cdiv(B, meta["BM"]),)](
            x_hat, r_hat, labels, ref_labels, lse_p, lse_n, B, M, D, x_hat.stride(0), r_hat.stride(0),
            _size_class(B, M), self_offset or 0, *margins, EXCLUDE_SELF=self_offset is not None,
            **_dtype_params(x_hat))
    return lse_p, lse_n


def circle_lse_backward(x_hat: torch.Tensor, r_hat: torch.Tensor, labels: torch.Tensor,
                        ref_labels: torch.Tensor, self_offset: int | None, margins: Sequence[float],
                        lse_p: torch.Tensor, lse_n: torch.Tensor, g_p: torch.Tensor, g_n: torch.Tensor, *,
                        same_ref: bool = False, fused: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dX̂, dR̂) in the inputs' dtype, given upstream gradients of lse_p and lse_n.

    ``same_ref`` (r̂ is x̂): dX̂ + dR̂ is returned as dX̂, and None for dR̂. ``fused=None``
    picks the fully fused kernels for d ≤ FUSED_BWD_MAX_D and the chunked dS + matmul path
    otherwise; tests force each path explicitly. Beyond the inputs, the large-d path holds
    one fp32 accumulator of dR̂ (of the summed gradient with ``same_ref``), one dS row chunk
    and fp32 column slices of its products, each bounded by DS_CHUNK_BYTES (B=131,072,
    d=1,536, bf16: 805 + 256 + 2 × 64 MB), then the result rounded to the inputs' dtype (403 MB).
    """
    B, D = x_hat.shape
    M = r_hat.shape[0]
    acc_dtype = lse_p.dtype
    # Rows with no member of a set carry lse = -inf; their upstream gradient is zero, and a
    # finite stand-in keeps exp(l - lse) from producing NaN in the masked lanes.
    lse_p = torch.where(torch.isfinite(lse_p), lse_p, torch.zeros_like(lse_p))
    lse_n = torch.where(torch.isfinite(lse_n), lse_n, torch.zeros_like(lse_n))
    g_p = g_p.to(acc_dtype).contiguous()
    g_n = g_n.to(acc_dtype).contiguous()
    scale = _ds_scale(g_p, g_n, margins[4], x_hat.dtype)
    common = dict(self_offset=self_offset or 0, o_p=margins[0], o_n=margins[1], delta_p=margins[2],
                  delta_n=margins[3], gamma=margins[4], EXCLUDE_SELF=self_offset is not None,
                  SCALE_DS=scale is not None, **_dtype_params(x_hat))
    if fused is None:
        fused = D <= FUSED_BWD_MAX_D
    with _on_device(x_hat):
        if fused:
            return _fused_backward(x_hat, r_hat, labels, ref_labels, lse_p, lse_n, g_p, g_n, scale, same_ref, common)
        return _chunked_backward(x_hat, r_hat, labels, ref_labels, lse_p, lse_n, g_p, g_n, scale, same_ref, common)


def _ds_scale(g_p: torch.Tensor, g_n: torch.Tensor, gamma: float, dtype: torch.dtype) -> torch.Tensor | None:
    """[2^e, 2^-e] for fp16 inputs (else None), e such that the largest |dS| any row can reach,
    γ·3·(|g_p| + |g_n|) (softmax weights ≤ 1, α ≤ 3 for cosines), becomes 2^DS_SCALE_TARGET_LOG2.

    Computed on the device, without a host sync; a power of two, so scaling and unscaling
    are exact. e is clamped to ±100 (an all-zero gradient gives 2^100: zeros stay zeros).
    """
    if dtype != torch.float16:
        return None
    bound = (g_p.abs() + g_n.abs()).max().float() * (3.0 * gamma)
    e = (DS_SCALE_TARGET_LOG2 - torch.ceil(torch.log2(bound))).clamp(-100.0, 100.0)
    return torch.exp2(torch.stack([e, -e]))


def _fused_backward(x_hat, r_hat, labels, ref_labels, lse_p, lse_n, g_p, g_n, scale, same_ref, common):
    """d ≤ FUSED_BWD_MAX_D: the fp32 outputs are small next to the inputs' B×d."""
    B, D = x_hat.shape
    M = r_hat.shape[0]
    dx = torch.empty(B, D, device=x_hat.device, dtype=lse_p.dtype)
    dr = dx if same_ref else torch.empty(M, D, device=x_hat.device, dtype=lse_p.dtype)
    block_do = 16 if _INTERPRET else min(max(triton.next_power_of_2(D), 16), 128)
    for out, for_ref, n, tile in ((dx, False, B, "BM"), (dr, True, M, "BN")):
        grid = lambda meta, n=n, tile=tile: (triton.cdiv(n, meta[tile]), triton.cdiv(D, block_do))  # noqa: E731
        _circle_bwd[grid](x_hat, r_hat, labels, ref_labels, lse_p, lse_n, g_p, g_n, scale, out, B, M, D,
                          x_hat.stride(0), r_hat.stride(0), out.stride(0), _size_class(B, M), **common,
                          FOR_REF=for_ref, ACCUMULATE=for_ref and same_ref, BLOCK_DO=block_do)
    return dx.to(x_hat.dtype), None if same_ref else dr.to(r_hat.dtype)


def _chunked_backward(x_hat, r_hat, labels, ref_labels, lse_p, lse_n, g_p, g_n, scale, same_ref, common):
    """Large d: dS row chunks in the inputs' dtype (tensor-core products), contracted by cuBLAS into
    fp32 column slices; every partial sum is added in fp32."""
    B, D = x_hat.shape
    M = r_hat.shape[0]
    acc_dtype = lse_p.dtype
    ds_dtype = x_hat.dtype if x_hat.dtype in (torch.bfloat16, torch.float16) else acc_dtype
    elem = torch.empty((), dtype=ds_dtype).element_size()
    chunk = max(_MAX_BM, min(B, DS_CHUNK_BYTES // max(1, M * elem)) // _MAX_BM * _MAX_BM)
    # The products go out a column slice at a time, so their fp32 M×d (and chunk×d) results are
    # never whole; a slice holds at most a quarter of DS_CHUNK_BYTES.
    cols = max(64, min(D, DS_CHUNK_BYTES // 4 // max(1, M * 4)) // 64 * 64)
    ds = torch.empty(min(chunk, B), M, device=x_hat.device, dtype=ds_dtype)
    r_mm = r_hat.to(ds_dtype)
    acc = torch.zeros(M, D, device=x_hat.device, dtype=acc_dtype)  # dR̂, or dX̂ + dR̂ with same_ref
    dx = None if same_ref else torch.empty(B, D, device=x_hat.device, dtype=x_hat.dtype)
    inv_scale = None if scale is None else scale[1:]
    for row0 in range(0, B, chunk):
        n = min(chunk, B - row0)
        grid = lambda meta, n=n: (triton.cdiv(n, meta["BM"]), triton.cdiv(M, meta["BN"]))  # noqa: E731
        _circle_ds[grid](x_hat, r_hat, labels, ref_labels, lse_p, lse_n, g_p, g_n, scale, ds, row0, n, B, M, D,
                         x_hat.stride(0), r_hat.stride(0), ds.stride(0), _size_class(B, M), **common)
        x_mm = x_hat[row0:row0 + n].to(ds_dtype)
        for c0 in range(0, D, cols):
            sl = slice(c0, c0 + cols)
            rows_part = _product(ds[:n], r_mm[:, sl], inv_scale)  # these rows' dX̂, complete
            if same_ref:
                acc[row0:row0 + n, sl] += rows_part
            else:
                dx[row0:row0 + n, sl] = rows_part
            acc[:, sl] += _product(ds[:n].t(), x_mm[:, sl], inv_scale)
    del ds  # before the rounded copy of acc is made: the peak is acc + that copy, not + dS
    if same_ref:
        return acc.to(x_hat.dtype), None
    return dx, acc.to(r_hat.dtype)


# torch.mm(a, b, out_dtype=torch.float32): fp16/bf16 products summed and returned in fp32, on
# CUDA from torch 2.8; elsewhere (the CPU interpreter tests, older torch) the same sums from
# up-cast operands.
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()


def _product(a: torch.Tensor, b: torch.Tensor, inv_scale: torch.Tensor | None) -> torch.Tensor:
    """a·b accumulated in and returned as fp32 (fp64 stays fp64), times ``inv_scale`` if given."""
    if a.dtype in (torch.float32, torch.float64):
        out = torch.mm(a, b)
    elif a.is_cuda and _MM_OUT_DTYPE:
        out = torch.mm(a, b, out_dtype=torch.float32)
    else:
        out = torch.mm(a.float(), b.float())
    return out if inv_scale is None else out.mul_(inv_scale)

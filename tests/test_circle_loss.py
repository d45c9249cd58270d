"""Circle loss: PML parity, an independent per-row oracle, backend agreement, memory, errors."""

import math

import pytest
import torch
from pytorch_metric_learning.losses import CircleLoss as PMLCircleLoss
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import assert_close
from dcr_fast import CircleLoss, circle_loss
from dcr_fast._extension import HAS_EXTENSION
from dcr_fast.circle_loss import CircleMargins, backends, chunked, circle_lse_chunked, circle_lse_reference, ops
from dcr_fast.circle_loss.reference import dense_label_masks
from dcr_fast.kernels import circle_loss as kernels

# Tolerances, once per dtype: fp64 is round-off; fp32 carries γ·ε amplification in the
# exponent; bf16 is judged against the fp64 loss of the same (bf16-rounded) inputs.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-4, atol=2e-5),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
}
# (B, d, classes, M or None): no B or d is a multiple of any block size; classes=1 has no
# negatives, classes=B has no positives, classes=3 with B=5 leaves a singleton row.
SHAPES = [(37, 19, 4, None), (41, 70, 9, None), (5, 3, 3, None), (23, 33, 23, None),
          (31, 12, 1, None), (33, 7, 3, 29), (17, 45, 2, 50)]
VARIANTS = [("original", 0.4, 80.0), ("dcr", 0.25, 16.0)]


def _batch(B, d, classes, M, dtype):
    x = torch.randn(B, d, dtype=torch.float64).to(dtype)
    y = torch.randint(0, classes, (B,))
    ref = None if M is None else (torch.randn(M, d, dtype=torch.float64).to(dtype), torch.randint(0, classes, (M,)))
    return x, y, ref


def _loss_and_grads(fn, x, y, ref, **kw):
    """Loss and gradients wrt embeddings (and ref_emb), with grad_output ≠ 1."""
    x = x.detach().clone().requires_grad_()
    inputs = [x]
    extra = {}
    if ref is not None:
        r = ref[0].detach().clone().requires_grad_()
        inputs.append(r)
        extra = dict(ref_emb=r, ref_labels=ref[1])
    loss = fn(x, y, **extra, **kw)
    if not loss.requires_grad:
        return loss.detach(), [torch.zeros_like(t) for t in inputs]
    grads = torch.autograd.grad(loss * 1.7, inputs, allow_unused=True)
    return loss.detach(), [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]


def _oracle(x, y, ref, m, gamma, variant):
    """Equation (5) row by row in float64, written independently of the package."""
    x = torch.nn.functional.normalize(x.double(), dim=1)
    r, ry = (x, y) if ref is None else (torch.nn.functional.normalize(ref[0].double(), dim=1), ref[1])
    if variant == "original":
        o_p, o_n = 1 + m, -m
    else:
        o_p, o_n = 1 - m, m
    rows = []
    for i in range(x.shape[0]):
        pos, neg = [], []
        for j in range(r.shape[0]):
            if ref is None and i == j:
                continue
            s = float(x[i] @ r[j])
            if ry[j] == y[i]:
                pos.append(-gamma * max(o_p - s, 0.0) * (s - (1 - m)))
            else:
                neg.append(gamma * max(s - o_n, 0.0) * (s - m))
        if pos and neg:
            lse = lambda v: max(v) + math.log(sum(math.exp(t - max(v)) for t in v))  # noqa: E731
            z = lse(pos) + lse(neg)
            # torch's softplus (and so PML's) is linear above 20
            rows.append(z if z > 20 else math.log1p(math.exp(z)))
    rows = [v for v in rows if v > 0]
    return sum(rows) / len(rows) if rows else 0.0


@pytest.mark.parametrize("variant,m,gamma", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES[:4] + SHAPES[5:])
def test_reference_matches_oracle_fp64(shape, variant, m, gamma):
    x, y, ref = _batch(*shape, torch.float64)
    loss, _ = _loss_and_grads(circle_loss, x, y, ref, m=m, gamma=gamma, variant=variant, backend="torch")
    assert loss.item() == pytest.approx(_oracle(x, y, ref, m, gamma, variant), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["torch", "chunked"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_pml(shape, backend, dtype):
    x, y, ref = _batch(*shape, dtype)
    pml = PMLCircleLoss()
    l_ref, g_ref = _loss_and_grads(pml, x, y, ref)
    fn = CircleLoss(backend=backend)
    l, g = _loss_and_grads(fn, x, y, ref)
    assert_close(l, l_ref, **TOL[dtype], what="loss")
    for a, b, name in zip(g, g_ref, ("d embeddings", "d ref_emb")):
        assert_close(a, b, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * max(1.0, b.abs().max().item()), what=name)


@pytest.mark.parametrize("tuple_len", [3, 4])
@pytest.mark.parametrize("backend", ["torch", "chunked", "triton"])
def test_indices_tuple_matches_pml(tuple_len, backend):
    x, y, _ = _batch(40, 11, 4, None, torch.float64)
    same = (y[:, None] == y[None, :]) & ~torch.eye(40, dtype=torch.bool)
    a_p, p = torch.nonzero(same, as_tuple=True)
    a_n, n = torch.nonzero(~(y[:, None] == y[None, :]), as_tuple=True)
    pick_p = torch.randint(0, a_p.numel(), (150,))  # with repeats: duplicates must collapse
    pick_n = torch.randint(0, a_n.numel(), (150,))
    if tuple_len == 4:
        idx = (a_p[pick_p], p[pick_p], a_n[pick_n], n[pick_n])
    else:
        idx = (a_p[pick_p], p[pick_p], n[torch.randint(0, n.numel(), (150,))])
        keep = y[idx[0]] != y[idx[2]]
        idx = tuple(t[keep] for t in idx)
    l_ref, g_ref = _loss_and_grads(lambda e, lab, **k: PMLCircleLoss()(e, None, indices_tuple=idx), x, y, None)
    l, g = _loss_and_grads(lambda e, lab, **k: circle_loss(e, None, indices_tuple=idx, backend=backend), x, y, None)
    assert_close(l, l_ref, **TOL[torch.float64], what="loss")
    assert_close(g[0], g_ref[0], **TOL[torch.float64], what="d embeddings")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused_backward", [True, False])
@pytest.mark.parametrize("variant,m,gamma", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference(shape, variant, m, gamma, fused_backward, dtype, monkeypatch):
    monkeypatch.setattr(kernels, "FUSED_BWD_MAX_D", 10**9 if fused_backward else 0)
    x, y, ref = _batch(*shape, dtype)
    ref64 = None if ref is None else (ref[0].double(), ref[1])
    kw = dict(m=m, gamma=gamma, variant=variant)
    l_ref, g_ref = _loss_and_grads(circle_loss, x.double(), y, ref64, backend="torch", **kw)
    l, g = _loss_and_grads(circle_loss, x, y, ref, backend="triton", **kw)
    assert l.dtype == dtype
    tol = TOL[dtype]
    assert_close(l, l_ref, **tol, what="loss")
    for a, b, name in zip(g, g_ref, ("d embeddings", "d ref_emb")):
        assert_close(a, b, rtol=tol["rtol"], atol=tol["atol"] * max(1.0, b.abs().max().item()), what=name)


# Every tile config the GPU autotuner may pick, forced on all three kernels in turn: tile
# edges, the dS row chunks and the resident-block path (d ≤ BLOCK_D: here BLOCK_D = 128) must
# not change a number. Dtype handling is the job of the tests above; fp32 stands for the
# tensor-core dtypes here (the interpreter up-casts them alike).
_TILES = {tuple(c.kwargs.values()): c for configs in kernels.CONFIGS.values() for c in configs}
CANDIDATES = [(c, torch.float32) for c in _TILES.values()] + [(c, torch.float64) for c in kernels.FP64_CONFIGS]


@pytest.mark.parametrize("fused_backward", [True, False])
@pytest.mark.parametrize("config,dtype", CANDIDATES, ids=lambda v: str(v.kwargs) if hasattr(v, "kwargs") else str(v))
def test_every_tile_config_matches_reference(config, dtype, fused_backward, monkeypatch):
    _force_tiles(monkeypatch, config)
    monkeypatch.setattr(kernels, "FUSED_BWD_MAX_D", 10**9 if fused_backward else 0)
    monkeypatch.setattr(kernels, "DS_CHUNK_BYTES", 131 * 4 * 130)  # dS in row chunks of 128 + 72
    x, y, ref = _batch(200, 72, 7, 131, dtype)
    l_ref, g_ref = _loss_and_grads(circle_loss, x.double(), y, (ref[0].double(), ref[1]), backend="torch")
    l, g = _loss_and_grads(circle_loss, x, y, ref, backend="triton")
    tol = TOL[dtype]
    assert_close(l, l_ref, **tol, what="loss")
    for a, b, name in zip(g, g_ref, ("d embeddings", "d ref_emb")):
        assert_close(a, b, rtol=tol["rtol"], atol=tol["atol"] * max(1.0, b.abs().max().item()), what=name)


def _force_tiles(monkeypatch, *configs) -> None:
    """Every kernel's autotuner offers exactly ``configs`` and has tuned nothing yet."""
    for tuner in kernels._TUNED.values():
        monkeypatch.setattr(tuner, "configs", list(configs))
        monkeypatch.setattr(tuner, "cache", {})


def test_autotuning_does_not_change_the_numbers(monkeypatch):
    """Real autotuning, in the interpreter: two candidate tiles per kernel, each launched twice
    while "timed" (the self-reference backward adds dR̂ onto dX̂ in its output, which timed
    launches must not stack up), then the chosen one; gradients still match the reference."""
    timed = []

    def bench_twice(kernel_call, quantiles):
        kernel_call()
        kernel_call()
        timed.append(1)
        return [float(len(timed))] * len(quantiles)  # the first config timed wins

    _force_tiles(monkeypatch, kernels.INTERPRET_CONFIG, kernels.CONFIGS["fwd"][0])
    for tuner in kernels._TUNED.values():
        monkeypatch.setitem(tuner.__dict__, "do_bench", bench_twice)
    monkeypatch.setattr(kernels, "FUSED_BWD_MAX_D", 10**9)
    x, y, _ = _batch(70, 20, 4, None, torch.float32)
    l_ref, g_ref = _loss_and_grads(circle_loss, x.double(), y, None, backend="torch")
    l, g = _loss_and_grads(circle_loss, x, y, None, backend="triton")
    assert len(timed) == 6  # fwd, dX̂, dR̂: two configs each
    assert_close(l, l_ref, **TOL[torch.float32], what="loss")
    assert_close(g[0], g_ref[0], rtol=TOL[torch.float32]["rtol"],
                 atol=TOL[torch.float32]["atol"] * g_ref[0].abs().max().item(), what="d embeddings")


def test_tile_pruning(monkeypatch):
    """On a GPU the autotuner tries the candidates of the dtype and dot precision, narrowed to
    BLOCK_D no wider than d needs; the interpreter keeps what it was given."""
    fp32, fp64 = torch.empty(2, 2), torch.empty(2, 2, dtype=torch.float64)
    given = [kernels.INTERPRET_CONFIG]
    assert kernels._prune("fwd", given, {"X": fp32, "D": 40}, PRECISION="tf32") == given
    monkeypatch.setattr(kernels, "_INTERPRET", False)
    assert kernels._prune("fwd", given, {"X": fp64, "D": 4096}, PRECISION="ieee") == kernels.FP64_CONFIGS
    assert kernels._prune("bwd", given, {"X": fp32, "D": 4096}, PRECISION="ieee") == kernels.IEEE_FP32_CONFIGS
    narrow = kernels._prune("fwd", given, {"X": fp32, "D": 40}, PRECISION="tf32")
    assert narrow and all(c.kwargs["BLOCK_D"] == 64 for c in narrow)
    assert kernels._prune("fwd", given, {"X": fp32, "D": 4096}, PRECISION="tf32") == kernels.CONFIGS["fwd"]


def test_triton_fp16_accumulates_in_fp32():
    x, y, _ = _batch(29, 20, 3, None, torch.float16)
    l_ref, g_ref = _loss_and_grads(circle_loss, x.double(), y, None, backend="torch")
    l, g = _loss_and_grads(circle_loss, x, y, None, backend="triton")
    assert_close(l, l_ref, rtol=2e-3, atol=1e-3, what="loss")
    assert_close(g[0], g_ref[0], rtol=2e-2, atol=2e-2 * g_ref[0].abs().max().item(), what="d embeddings")


FUSED_ROWS = [False] + ([True] if HAS_EXTENSION else [])  # the C++ row kernels and their PyTorch reference


@pytest.mark.parametrize("fused", FUSED_ROWS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("self_ref,classes", [(True, 5), (False, 5), (True, 1), (False, 40)])
def test_chunked_matches_reference_across_chunk_boundaries(fused, dtype, self_ref, classes):
    """Chunk edges, the diagonal, rows with an empty set (one class; singletons) and grads."""
    x, y, ref = _batch(45, 9, classes, 38, torch.float64)
    r, ry = (x, y) if self_ref else ref
    mg = CircleMargins(0.4, 80.0, "original")
    gp, gn = torch.randn(45, dtype=torch.float64), torch.randn(45, dtype=torch.float64)
    self_offset = 0 if self_ref else None
    masks = dense_label_masks(y, ry, self_offset)
    for chunk in (1, 7, 45, 100):
        xh = torch.nn.functional.normalize(x, dim=1).to(dtype).requires_grad_()
        rh = xh if self_ref else torch.nn.functional.normalize(r, dim=1).to(dtype).requires_grad_()
        inputs = (xh,) if self_ref else (xh, rh)
        a = circle_lse_chunked(xh, rh, y, ry, self_offset, mg, chunk_rows=chunk, fused=fused)
        x64 = xh.detach().double().requires_grad_()
        r64 = x64 if self_ref else rh.detach().double().requires_grad_()
        b = circle_lse_reference(x64, r64, *masks, mg)
        ga = torch.autograd.grad(_weighted(a, gp.to(dtype), gn.to(dtype)), inputs)
        gb = torch.autograd.grad(_weighted(b, gp, gn), (x64,) if self_ref else (x64, r64))
        tol = TOL[dtype]
        for u, v in zip(a + ga, b + gb):
            finite = v[torch.isfinite(v)]
            scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0  # γ amplifies rounding
            assert_close(torch.nan_to_num(u.double(), neginf=-1e300), torch.nan_to_num(v, neginf=-1e300),
                         rtol=tol["rtol"], atol=tol["atol"] * scale, what=f"chunk={chunk}")


def _weighted(lse: tuple[torch.Tensor, torch.Tensor], gp: torch.Tensor, gn: torch.Tensor) -> torch.Tensor:
    """Σ g·lse over the rows whose set is non-empty (an empty set's lse is -inf)."""
    return sum(torch.where(torch.isfinite(v), v * g, torch.zeros_like(v)).sum() for v, g in zip(lse, (gp, gn)))


@pytest.mark.skipif(not HAS_EXTENSION, reason="needs the compiled extension")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_row_ops_pass_opcheck(dtype):
    s = torch.randn(6, 9, dtype=dtype)
    labels, ref_labels = torch.randint(0, 3, (10,)), torch.randint(0, 3, (9,))
    scalars = (2, True, 1.4, -0.4, 0.6, 0.4, 80.0)
    lse_p, lse_n = torch.ops.dcr_fast.circle_rows_lse(s, labels, ref_labels, *scalars)
    torch.library.opcheck(torch.ops.dcr_fast.circle_rows_lse, (s, labels, ref_labels, *scalars))
    finite = [torch.where(torch.isfinite(t), t, torch.zeros_like(t)) for t in (lse_p, lse_n)]
    torch.library.opcheck(torch.ops.dcr_fast.circle_rows_ds_,
                          (s.clone(), labels, ref_labels, *scalars, *finite, torch.randn(6, dtype=dtype),
                           torch.randn(6, dtype=dtype)))


def test_fused_row_ops_reject_bad_input():
    if not HAS_EXTENSION:
        pytest.skip("needs the compiled extension")
    s, labels = torch.randn(4, 5), torch.randint(0, 2, (6,))
    with pytest.raises(ValueError, match="ref_labels must be"):
        torch.ops.dcr_fast.circle_rows_lse(s, labels, labels, 0, True, 1.4, -0.4, 0.6, 0.4, 80.0)
    with pytest.raises(ValueError, match="outside the 6 labels"):
        torch.ops.dcr_fast.circle_rows_lse(s, labels, labels[:5], 3, True, 1.4, -0.4, 0.6, 0.4, 80.0)


@pytest.mark.parametrize("backend", ["torch", "chunked", "triton"])
def test_zero_loss_batch_matches_pml(backend):
    # Orthogonal class directions: with γ = 1000 every row's softplus underflows in fp32,
    # so no row counts and PML returns a zero that still has a (zero) gradient.
    y = torch.arange(24) % 4
    x = torch.nn.functional.one_hot(y, 8).float() + 0.0
    fn = CircleLoss(gamma=1000.0, backend=backend)
    l_ref, g_ref = _loss_and_grads(PMLCircleLoss(gamma=1000.0), x, y, None)
    l, g = _loss_and_grads(fn, x, y, None)
    assert l_ref.item() == 0.0 and l.item() == 0.0
    assert torch.equal(g[0], g_ref[0])


@pytest.mark.parametrize("labels", [[0, 1], [0, 0], [3]])
def test_degenerate_batches_match_pml(labels):
    y = torch.tensor(labels)
    x = torch.randn(len(labels), 5, dtype=torch.float64)
    l_ref, _ = _loss_and_grads(PMLCircleLoss(), x, y, None)
    l, _ = _loss_and_grads(CircleLoss(backend="chunked"), x, y, None)
    assert l.item() == l_ref.item()


@pytest.mark.parametrize("backend", ["triton", "chunked"])
def test_autograd_saves_no_batch_by_batch_tensor(backend):
    B, d, M = 96, 8, 80
    x = torch.randn(B, d, requires_grad=True)
    r = torch.randn(M, d, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = circle_loss(x, torch.randint(0, 3, (B,)), ref_emb=r, ref_labels=torch.randint(0, 3, (M,)),
                           backend=backend)
    loss.backward()
    assert saved, "nothing was saved: the hook did not see the graph"
    biggest = max(math.prod(s) for s in saved)
    assert biggest <= max(B, M) * d, f"a saved tensor has {biggest} elements (shapes {saved})"
    # the reference, by contrast, does keep the B×M similarity: the check can fail
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        circle_loss(x, torch.randint(0, 3, (B,)), ref_emb=r, ref_labels=torch.randint(0, 3, (M,)), backend="torch")
    assert (B, M) in saved


def test_triton_path_saves_one_input_dtype_copy():
    """bf16 in: the graph keeps the normalized rows in bf16, not fp32 up-casts of them."""
    B, d = 64, 24
    x = torch.randn(B, d, dtype=torch.bfloat16, requires_grad=True)
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr():  # the caller's own input
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = circle_loss(x, torch.randint(0, 3, (B,)), backend="triton")
    loss.backward()
    assert sum(saved.values()) <= B * d * 2 + 64 * B, saved


class _Allocations(TorchDispatchMode):
    """Records the size of every tensor an op allocates (outputs not sharing an input's storage)."""

    def __init__(self):
        super().__init__()
        self.nbytes: list[int] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        self.nbytes += [t.untyped_storage().nbytes() for t in pytree.tree_leaves(out)
                        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs]
        return out


@pytest.mark.parametrize("same_ref", [True, False])
@pytest.mark.parametrize("fused", [True, False])
def test_triton_backward_holds_one_fp32_gradient(fused, same_ref, monkeypatch):
    """The backward's buffers: one fp32 B×d accumulator (two only for the fused path with a
    separate reference set, whose d ≤ 256 keeps them small); everything else is a bf16
    gradient or bounded by DS_CHUNK_BYTES."""
    B, d = 160, 40 if fused else 200
    _force_tiles(monkeypatch, kernels.CONFIGS["fwd"][0])  # 64×64 tiles: quick in the interpreter
    monkeypatch.setattr(kernels, "DS_CHUNK_BYTES", 128 * B * 2)  # dS rows in chunks of 128 + 32, 64-column slices
    x = torch.nn.functional.normalize(torch.randn(B, d), dim=1).bfloat16()
    r = x if same_ref else torch.nn.functional.normalize(torch.randn(B, d), dim=1).bfloat16()
    y = torch.randint(0, 5, (B,))
    flags = (0 if same_ref else None, [1.4, -0.4, 0.6, 0.4, 80.0])
    lse_p, lse_n = kernels.circle_lse_forward(x, r, y, y, *flags)
    with _Allocations() as allocations:
        real_product = kernels._product

        def product(a, b, inv_scale):
            # on a GPU one cuBLAS call writes the fp32 result; its CPU stand-in up-casts the operands
            allocations.paused = True
            out = real_product(a, b, inv_scale)
            allocations.paused = False
            allocations.nbytes.append(out.untyped_storage().nbytes())
            return out

        monkeypatch.setattr(kernels, "_product", product)
        dx, dr = kernels.circle_lse_backward(x, r, y, y, *flags, lse_p, lse_n, torch.ones(B), torch.ones(B),
                                             same_ref=same_ref, fused=fused)
    assert dx.dtype == torch.bfloat16 and (dr is None) == same_ref
    fp32_gradients = [n for n in allocations.nbytes if n >= B * d * 4]
    assert len(fp32_gradients) == (2 if fused and not same_ref else 1), allocations.nbytes
    assert max(n for n in allocations.nbytes if n < B * d * 4) <= max(B * d * 2, kernels.DS_CHUNK_BYTES)


@pytest.mark.parametrize("fused_rows", [True, False])
def test_auto_backend_on_the_cpu(fused_rows, monkeypatch):
    """Chunked for small d whenever the fused row kernels exist, else only above the size threshold."""
    calls = []
    real = chunked.circle_lse_chunked
    monkeypatch.setattr(chunked, "circle_lse_chunked", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(chunked, "fused_rows_available", lambda _: fused_rows)
    monkeypatch.setattr(backends, "AUTO_CHUNK_THRESHOLD", 100)
    small, y_small, _ = _batch(8, 4, 3, None, torch.float32)
    circle_loss(small, y_small)
    assert bool(calls) == fused_rows
    calls.clear()
    wide, y_wide, _ = _batch(8, 600, 3, None, torch.float32)  # d > 512: the reference's saved S wins
    circle_loss(wide, y_wide)
    assert not calls
    x, y, _ = _batch(20, 4, 3, None, torch.float32)
    assert circle_loss(x, y).item() == pytest.approx(circle_loss(x, y, backend="torch").item(), rel=1e-5)
    assert calls


@pytest.mark.parametrize("same_ref", [False, True])
def test_circle_lse_op_passes_opcheck(same_ref):
    x = torch.nn.functional.normalize(torch.randn(21, 6), dim=1).requires_grad_()
    y = torch.randint(0, 3, (21,))
    r, ry = (x, y) if same_ref else (torch.nn.functional.normalize(torch.randn(18, 6), dim=1).requires_grad_(),
                                     torch.randint(0, 3, (18,)))
    args = (x, r, y, ry, 0 if same_ref else None, same_ref, [1.4, -0.4, 0.6, 0.4, 80.0])
    torch.library.opcheck(ops.circle_lse, args)


def test_works_under_torch_compile():
    x, y, _ = _batch(26, 10, 3, None, torch.float32)
    fn = CircleLoss(variant="dcr", m=0.25, gamma=16.0, backend="triton")
    compiled = torch.compile(lambda e, lab: fn(e, lab), backend="aot_eager")
    l, g = _loss_and_grads(lambda e, lab: compiled(e, lab), x, y, None)
    l_ref, g_ref = _loss_and_grads(lambda e, lab: fn(e, lab), x, y, None)
    assert_close(l, l_ref, **TOL[torch.float32], what="compiled loss")
    assert_close(g[0], g_ref[0], **TOL[torch.float32], what="compiled grad")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(embeddings=torch.randn(4)), "embeddings must be 2-D"),
        (dict(embeddings=torch.randn(4, 3, 2)), "embeddings must be 2-D"),
        (dict(labels=torch.tensor([0, 1, 0])), "labels must be 1-D with 4 entries"),
        (dict(labels=torch.tensor([0.0, 1.0, 0.0, 1.0])), "labels must have an integer dtype"),
        (dict(embeddings=torch.tensor([[1.0, float("nan")]] * 4)), "embeddings contains NaN"),
        (dict(embeddings=torch.randint(0, 3, (4, 3))), "embeddings must be float"),
        (dict(labels=None), "labels or indices_tuple is required"),
        (dict(ref_emb=torch.randn(5, 2)), "ref_emb must have dim 3"),
        (dict(ref_emb=torch.randn(5, 3)), "ref_labels is required"),
        (dict(ref_emb=torch.randn(5, 3), ref_labels=torch.tensor([0, 1])), "ref_labels must be 1-D with 5"),
        (dict(indices_tuple=(torch.tensor([0]), torch.tensor([1]))), "indices_tuple must be a tuple of 3"),
        (dict(indices_tuple=(torch.tensor([0]), torch.tensor([9]), torch.tensor([2]))), r"indices_tuple\[1\] has indices"),
        (dict(indices_tuple=(torch.tensor([0, 0]), torch.tensor([1, 1]), torch.tensor([0, 2]), torch.tensor([1, 3]))),
         "both positive and negative"),
        (dict(m=1.5), "m must be a number in"),
        (dict(gamma=0.0), "gamma must be a positive"),
        (dict(gamma=float("inf")), "gamma must be a positive finite number"),
        (dict(gamma=float("nan")), "gamma must be a positive finite number"),
        (dict(gamma=True), "gamma must be a positive finite number"),
        (dict(m=True), "m must be a number in"),
        (dict(m=float("nan")), "m must be a number in"),
        (dict(variant="sphere"), "variant must be one of"),
        (dict(backend="cuda"), "backend must be one of"),
    ],
)
def test_bad_input_raises_value_error(kwargs, match):
    args = dict(embeddings=torch.randn(4, 3), labels=torch.tensor([0, 1, 0, 1]))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        circle_loss(**args)


@pytest.mark.parametrize("kwargs", [dict(gamma=float("inf")), dict(m=True), dict(gamma=-1.0), dict(variant="x"),
                                    dict(backend="cuda")])
def test_module_rejects_bad_arguments_when_built(kwargs):
    """Caught at construction, before a training loop runs (gamma=inf gave NaN, m=True 0)."""
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        CircleLoss(**kwargs)


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        circle_loss(torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 2, 2]), backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [128, 1000])
def test_triton_on_gpu_matches_reference(dtype, d):
    x = torch.randn(1500, d, device="cuda").to(dtype)
    y = torch.randint(0, 30, (1500,), device="cuda")
    l_ref, g_ref = _loss_and_grads(circle_loss, x.double(), y, None, backend="torch")
    l, g = _loss_and_grads(circle_loss, x, y, None, backend="triton")
    tol = TOL.get(dtype, TOL[torch.bfloat16])
    assert_close(l, l_ref, **tol, what="loss")
    assert_close(g[0], g_ref[0], rtol=tol["rtol"], atol=tol["atol"] * g_ref[0].abs().max().item(), what="grad")


@pytest.mark.gpu
def test_triton_memory_on_gpu_is_linear_in_the_batch():
    """fwd+bwd beyond the input: bf16 normalized rows (2Bd bytes), one fp32 accumulator (4Bd),
    the bf16 gradients (2Bd each) and the bounded dS chunk and slices; nothing B×B."""
    B, d = 32768, 1536
    x = torch.randn(B, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 100, (B,), device="cuda")
    circle_loss(x, y, backend="triton").backward()  # autotuning (it allocates) outside the count
    x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    circle_loss(x, y, backend="triton").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= 10 * B * d + 2 * kernels.DS_CHUNK_BYTES, f"{extra / 2**20:.0f} MiB"


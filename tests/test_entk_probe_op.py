"""The compiled ``dcr_fast::probe_linear`` op (CPU and CUDA kernels) against its PyTorch reference,
the reference against the materialized perturbed weight, opcheck, torch.compile and bad input."""

import pytest
import torch
from conftest import assert_close

from dcr_fast._extension import HAS_EXTENSION
from dcr_fast.ntk.probe_ops import probe_linear, probe_linear_reference

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="dcr_fast._C is not built")

# Op vs reference: identical maths and rounding points, so only summation order differs.
# bf16/fp16: both round the same float32 value once, but the base GEMM may differ by an ulp.
TOL = {
    torch.float64: {"rtol": 1e-12, "atol": 1e-12},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
}

# (P, M, d_in, d_out, F, T): awkward on purpose — no multiple of the CUDA tiles (8 rows,
# 128 columns, 32 ranks), T > 32 to cross a rank chunk, single rows and columns, F = P.
SHAPES = [
    (6, 41, 37, 53, 3, 5),
    (2, 1, 1, 1, 1, 1),
    (4, 17, 129, 131, 2, 33),
    (3, 9, 16, 8, 3, 70),
    (8, 2, 5, 300, 4, 0),
]


def _inputs(shape, dtype, device="cpu", bias=True, d_bias=True):
    p, m, d_in, d_out, f, t = shape
    g = torch.Generator().manual_seed(sum(shape))

    def rand(*size):
        return torch.randn(*size, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    scale = torch.linspace(-2e-2, 3e-2, p, dtype=torch.float64).to(device=device, dtype=dtype)
    return (
        rand(p, m, d_in),
        rand(d_out, d_in),
        rand(d_out) if bias else None,
        rand(f, t, d_in),
        rand(f, t, d_out),
        rand(f, d_out) if d_bias else None,
        scale,
    )


def _materialized(x, weight, bias, a, d, d_bias, scale):
    """The definition with each direction's weight written out, in float64."""
    x, weight, a, d, scale = (t.double() for t in (x, weight, a, d, scale))
    f = a.shape[0]
    rows = []
    for p in range(x.shape[0]):
        w_p = weight + scale[p] * d[p % f].T @ a[p % f]
        b_p = torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None else bias.double()
        if d_bias is not None:
            b_p = b_p + scale[p] * d_bias[p % f].double()
        rows.append(x[p] @ w_p.T + b_p)
    return torch.stack(rows)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_reference_is_the_materialized_perturbation(shape, with_bias):
    args = _inputs(shape, torch.float64, bias=with_bias, d_bias=with_bias)
    assert_close(probe_linear_reference(*args), _materialized(*args), rtol=1e-12, atol=1e-12, what="reference")


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias, d_bias", [(True, True), (False, False), (True, False)])
def test_cpu_op_matches_reference(dtype, shape, bias, d_bias):
    args = _inputs(shape, dtype, bias=bias, d_bias=d_bias)
    out = torch.ops.dcr_fast.probe_linear(*args)
    assert out.dtype == dtype and out.shape == (shape[0], shape[1], shape[3])
    assert_close(out, probe_linear_reference(*args), **TOL[dtype], what=f"probe_linear {dtype} {shape}")


def test_cpu_op_accepts_non_contiguous_views():
    x, weight, bias, a, d, d_bias, scale = _inputs((4, 6, 10, 12, 2, 3), torch.float64)
    x_t = x.transpose(1, 2).contiguous().transpose(1, 2)
    weight_t = weight.T.contiguous().T
    d_t = d.transpose(1, 2).contiguous().transpose(1, 2)
    out = torch.ops.dcr_fast.probe_linear(x_t, weight_t, bias, a, d_t, d_bias, scale[::1])
    assert_close(out, probe_linear_reference(x, weight, bias, a, d, d_bias, scale), **TOL[torch.float64], what="views")


def test_public_function_uses_the_op_and_leaves_inputs_alone():
    args = _inputs((2, 3, 4, 5, 1, 2), torch.float32)
    before = [t.clone() for t in args if t is not None]
    assert_close(probe_linear(*args), probe_linear_reference(*args), **TOL[torch.float32], what="probe_linear")
    for old, new in zip(before, [t for t in args if t is not None]):
        assert torch.equal(old, new)


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda a: a.__setitem__(0, a[0][0]), "x must be [P, M, d_in]"),
        (lambda a: a.__setitem__(1, a[1][:, :-1]), "weight must be [d_out, d_in]"),
        (lambda a: a.__setitem__(2, a[2][:-1]), "bias must be [d_out]"),
        (lambda a: a.__setitem__(3, a[3][:, :, :-1]), "a must be [F, T, d_in]"),
        (lambda a: a.__setitem__(4, a[4][:, :-1]), "d must be [F, T, d_out]"),
        (lambda a: a.__setitem__(5, a[5][:1]), "d_bias must be [F, d_out]"),
        (lambda a: a.__setitem__(6, a[6][:-1]), "scale must be a 1-D floating tensor"),
        (lambda a: a.__setitem__(0, a[0][:3]) or a.__setitem__(6, a[6][:3]),
         "must be a multiple of the number of factor pairs"),
        (lambda a: a.__setitem__(1, a[1].float()), "weight must have the dtype of x"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(mutate, needle):
    args = list(_inputs((4, 3, 6, 5, 2, 2), torch.float64))
    mutate(args)
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        torch.ops.dcr_fast.probe_linear(*args)


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias):
    args = _inputs((4, 7, 9, 11, 2, 3), torch.float32, bias=bias, d_bias=bias)
    torch.library.opcheck(torch.ops.dcr_fast.probe_linear.default, args)


def test_torch_compile_fullgraph():
    args = _inputs((4, 7, 9, 11, 2, 3), torch.float32)

    def layer(x, weight, bias, a, d, d_bias, scale):
        return torch.relu(probe_linear(x, weight, bias, a, d, d_bias, scale)) * 2

    compiled = torch.compile(layer, fullgraph=True)
    assert_close(compiled(*args), layer(*args), rtol=0, atol=0, what="compiled")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_op_matches_reference(dtype, shape):
    args = _inputs(shape, dtype, device="cuda")
    out = torch.ops.dcr_fast.probe_linear(*args)
    assert out.is_cuda and out.dtype == dtype
    assert_close(out, probe_linear_reference(*args), **TOL[dtype], what=f"cuda probe_linear {dtype} {shape}")


@pytest.mark.gpu
def test_cuda_opcheck():
    args = _inputs((4, 7, 9, 11, 2, 3), torch.float32, device="cuda")
    torch.library.opcheck(torch.ops.dcr_fast.probe_linear.default, args)

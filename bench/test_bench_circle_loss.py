"""Speed-regression suite for the Circle loss (pytest-benchmark), plus checks of the benchmark script.

The project's pytest options carry ``--benchmark-disable``, so in CI each benchmark body runs
once, as a test: every timed call is also checked against the fp32 torch reference. To time,
save and compare against a saved baseline:

    pytest bench/test_bench_circle_loss.py --benchmark-enable --benchmark-autosave
    pytest bench/test_bench_circle_loss.py --benchmark-enable --benchmark-compare --benchmark-compare-fail=median:25%

GPU cases are marked ``gpu`` and skip without CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dcr_fast
from bench import bench_circle_loss as bcl
from bench.common import Row, load_results, rows_of

CPU_CASES = [(512, 64), (1031, 129)]  # the second is no multiple of any block size
GPU_CASES = [(4096, 128), (16384, 128), (4096, 1536)]
LOSS_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """Two OpenMP threads on a busy 2-core machine stall ~50 ms per parallel op; one does not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inputs(B: int, d: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(B * 7919 + d)
    x = torch.randn(B, d, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    return x, torch.randint(0, 4, (B,), generator=gen).to(device)


def _fwd_bwd(loss_fn, x: torch.Tensor, labels: torch.Tensor):
    def step() -> torch.Tensor:
        x.grad = None
        loss = loss_fn(x, labels)
        loss.backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        return loss.detach()
    return step


def _assert_matches_reference(loss: torch.Tensor, x: torch.Tensor, labels: torch.Tensor,
                              check_grad: bool = True) -> None:
    ref_x = x.detach().float().requires_grad_(True)
    ref = dcr_fast.circle_loss(ref_x, labels, backend="torch")
    ref.backward()
    torch.testing.assert_close(loss.float(), ref.detach(), rtol=LOSS_RTOL[x.dtype], atol=0)
    if not check_grad:
        return
    grad_err = float((x.grad.float() - ref_x.grad).norm() / ref_x.grad.norm())
    assert grad_err <= GRAD_RTOL[x.dtype], f"relative gradient error {grad_err:.2e} > {GRAD_RTOL[x.dtype]:.0e}"


@pytest.mark.parametrize("B,d", CPU_CASES)
@pytest.mark.parametrize("impl", ["torch", "chunked", "pml"])
def test_bench_cpu_fwd_bwd(benchmark, impl: str, B: int, d: int) -> None:
    benchmark.group = f"circle_loss cpu fwd+bwd B={B} d={d}"
    loss_fn = bcl.loss_function(impl, bcl.CircleBenchConfig(), torch.device("cpu"))
    x, labels = _inputs(B, d, torch.float32, "cpu")
    loss = benchmark(_fwd_bwd(loss_fn, x, labels))
    _assert_matches_reference(loss, x, labels)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("B,d", GPU_CASES)
@pytest.mark.parametrize("impl", ["triton", "torch", "pml"])  # compile: in bench_circle_loss (a compile per case)
def test_bench_gpu_fwd_bwd_bf16(benchmark, impl: str, B: int, d: int) -> None:
    benchmark.group = f"circle_loss cuda bf16 fwd+bwd B={B} d={d}"
    loss_fn = bcl.loss_function(impl, bcl.CircleBenchConfig(device="cuda"), torch.device("cuda"))
    x, labels = _inputs(B, d, torch.bfloat16, "cuda")
    loss = benchmark(_fwd_bwd(loss_fn, x, labels))
    # PML computes in bf16 throughout: its gradient is ~0.1 off fp32 (measured on the CPU), so
    # only its loss is held to the reference here.
    _assert_matches_reference(loss, x, labels, check_grad=impl != "pml")


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("B", [5, 40])
def test_unavoidable_products_do_the_counted_work(monkeypatch, mode: str, B: int) -> None:
    monkeypatch.setattr(bcl, "MATMUL_CHUNK", 16)  # several chunks, the last one partial
    x = torch.randn(B, 7, dtype=torch.float64)
    calls = []
    real_matmul, real_addmm = torch.matmul, torch.Tensor.addmm_

    def count_matmul(a, b, out=None):
        calls.append(a.shape[0] * a.shape[1] * b.shape[1])
        return real_matmul(a, b, out=out)

    def count_addmm(self, a, b):
        calls.append(a.shape[0] * a.shape[1] * b.shape[1])
        return real_addmm(self, a, b)

    monkeypatch.setattr(torch, "matmul", count_matmul)
    monkeypatch.setattr(torch.Tensor, "addmm_", count_addmm)
    s = bcl.unavoidable_products(x, mode)
    assert 2 * sum(calls) == bcl.product_flops(B, 7, mode)
    last = (B - 1) // 16 * 16
    torch.testing.assert_close(s[: B - last], x[last:] @ x.T, rtol=1e-12, atol=1e-12)


def test_run_writes_rows_with_errors_and_ratios(tmp_path) -> None:
    config = bcl.CircleBenchConfig(batch_sizes=(64,), dims=(24,), impls=("matmul", "torch", "chunked", "pml"),
                                   budget_s=0.01, results_dir=str(tmp_path))
    rows = bcl.run(config)
    assert {(r.impl, r.mode) for r in rows} == {(i, m) for i in config.impls for m in ("fwd", "fwd+bwd")}
    (path,) = tmp_path.glob("circle_loss-*.json")
    env, first = rows_of(load_results(path))[0]
    assert env["git_commit"] and env["versions"]["torch"] == torch.__version__
    assert isinstance(first, Row)
    for r in rows:
        assert r.status == "ok" and r.ms_p20 <= r.ms_median <= r.ms_p80, r
        if r.impl != "matmul":
            assert r.metrics["x_matmul"] == pytest.approx(r.ms_median / _ms(rows, "matmul", r.mode))
            assert r.metrics["grad_rel_err"] < 1e-5 and r.metrics["loss_rel_err"] < 1e-6
    bcl.run(config)  # a second run is appended beside the first
    assert len(json.loads(path.read_text())["runs"]) == 2


def test_triton_rows_under_the_interpreter(tmp_path) -> None:
    """The fused path's plumbing (timing, errors, ratios) checked on the CPU before a GPU session."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "bench.bench_circle_loss", "--batch-sizes", "40", "--dims", "24", "--threads", "1",
           "--impls", "matmul", "triton", "torch", "--budget-s", "0.01", "--results-dir", str(tmp_path)]
    subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parent.parent, check=True, capture_output=True)
    (path,) = tmp_path.glob("circle_loss-*.json")
    triton_rows = [row for _, row in rows_of(load_results(path)) if row.impl == "triton"]
    assert [r.mode for r in triton_rows] == ["fwd", "fwd+bwd"]
    tiles = load_results(path)["runs"][-1]["triton_tiles"]
    assert tiles["fwd"] and tiles["bwd"], tiles
    for r in triton_rows:
        assert r.ok and r.metrics["grad_rel_err"] < 1e-4 and "speedup_vs_torch" in r.metrics, r


def test_oom_is_recorded_and_larger_batches_skipped(tmp_path, monkeypatch) -> None:
    real = bcl.loss_function

    def torch_runs_out_of_memory(impl, config, device):
        fn = real(impl, config, device)
        if impl != "torch":
            return fn
        def oom(x, labels):
            if x.shape[0] > 32:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4 GiB")
            return fn(x, labels)
        return oom

    monkeypatch.setattr(bcl, "loss_function", torch_runs_out_of_memory)
    config = bcl.CircleBenchConfig(batch_sizes=(32, 48, 64), dims=(8,), impls=("torch", "chunked"),
                                   modes=("fwd",), check=False, budget_s=0.01, results_dir=str(tmp_path))
    status = {(r.impl, r.case["B"]): (r.status, r.reason) for r in bcl.run(config)}
    assert status[("torch", 32)][0] == "ok"
    assert status[("torch", 48)][0] == "oom"
    assert status[("torch", 64)] == ("skipped", "oom at smaller B=48")
    assert all(status[("chunked", b)][0] == "ok" for b in (32, 48, 64))


def test_verdicts_from_rows() -> None:
    def row(impl, B, d, ms, status="ok", peak=None, **metrics):
        return Row(bench="circle_loss", impl=impl, mode="fwd+bwd", case={"B": B, "d": d, "dtype": "bfloat16"},
                   status=status, ms_median=ms if status == "ok" else None, peak_mb=peak, metrics=metrics)

    rows = [row("triton", 16384, 128, 1.0, loss_rel_err=1e-3, grad_rel_err=1e-2), row("pml", 16384, 128, 12.0),
            row("torch", 16384, 128, 2.0, loss_rel_err=1e-3, grad_rel_err=1e-2),
            row("triton", 16384, 4096, 14.0), row("matmul", 16384, 4096, 10.0),
            row("triton", 131072, 1536, 500.0, peak=1500.0), row("torch", 131072, 1536, None, status="oom")]
    verdicts = [line.rsplit(None, 1)[-1] for line in bcl.verdict_table(rows).splitlines()[1:]]
    assert verdicts == ["PASS", "FAIL", "PASS", "PASS", "PASS"]
    assert bcl.verdict_table([]).count("not measured") == 5


@pytest.mark.parametrize("kwargs", [{"device": "tpu"}, {"dtypes": ("float8",)}, {"impls": ("flash",)},
                                    {"batch_sizes": (8,)}, {"variant": "new"}, {"preset": "huge"}])
def test_bad_config_names_the_field(kwargs) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs)).rstrip("s")):
        bcl.CircleBenchConfig(**kwargs)


def test_cli_flags_mirror_the_config() -> None:
    from dcr_fast.cli import build_parser

    args = build_parser().parse_args(["bench", "circle-loss", "--batch-sizes", "8", "16", "--dims", "4",
                                      "--no-check", "--max-minutes", "2.5"])
    from dcr_fast.config import config_from_args

    config = config_from_args(bcl.CircleBenchConfig, args)
    assert config.batch_sizes == (8, 16) and config.dims == (4,) and config.check is False
    assert config.max_minutes == 2.5 and config.plan().cases == ((8, 4, "float32"), (16, 4, "float32"))


def _ms(rows: list[Row], impl: str, mode: str) -> float:
    return next(r.ms_median for r in rows if r.impl == impl and r.mode == mode)


def test_cli_passes_other_benches_their_own_flags() -> None:
    from dcr_fast.cli import build_parser

    others = sorted(p.stem for p in Path(bcl.__file__).parent.glob("bench_*.py") if p.stem != "bench_circle_loss")
    if not others:
        pytest.skip("no other bench scripts in this checkout")
    name = others[0].removeprefix("bench_").replace("_", "-")
    args = build_parser().parse_args(["bench", name, "--help", "--device", "cuda"])
    assert args.argv == ["--help", "--device", "cuda"] and callable(args.func)


def test_side_by_side_interleaves_and_records_failures() -> None:
    from bench.common import Candidate, measure_side_by_side

    calls = []

    def make(name):
        return lambda: calls.append(name)

    def runs_out(*_):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4 GiB")

    rows = measure_side_by_side([Candidate("a", make("a")), Candidate("oom", runs_out), Candidate("b", make("b"))],
                                bench="t", mode="fwd", case={"B": 1}, device=torch.device("cpu"), budget_s=0.001)
    assert [(r.impl, r.status) for r in rows] == [("a", "ok"), ("oom", "oom"), ("b", "ok")]
    assert rows[0].repeats == rows[2].repeats >= 3
    assert calls[2:] == ["a", "b"] * rows[0].repeats  # after one memory call each, round-robin


def test_distributed_communication_volume():
    from bench.bench_circle_loss_distributed import communication_bytes

    got = communication_bytes([5, 8, 3], d=16, elem=2)
    # each rank receives 3 padded blocks of 8 rows (embeddings bf16, labels int64) and 3 sizes
    assert got["gathered_mb"] * 2**20 == 3 * (8 + 8 * 16 * 2 + 8 * 8)
    assert got["all_reduce_mb"] * 2**20 == 16 * 16 * 2 + 2 * 2


def test_distributed_bench_checks_two_gloo_ranks(tmp_path):
    """The CPU run of the script: two spawned gloo processes, loss and gradient against one process."""
    cmd = [sys.executable, "-m", "bench.bench_circle_loss_distributed", "--world-sizes", "2", "--local-batch", "24",
           "--dim", "16", "--results-dir", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(bcl.__file__).parent.parent, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (row,) = [r for _, r in rows_of(load_results(next(tmp_path.glob("circle_loss_distributed-*.json"))))]
    assert row.case["world"] == 2 and row.metrics["global_batch"] == 48
    assert row.metrics["loss_rel_err"] < 1e-5 and row.metrics["grad_rel_err"] < 1e-5, row.metrics

"""Shared benchmark plumbing: one row per measurement, timing, peak memory, and a results file.

Every benchmark script in ``bench/`` measures a few implementations of one op over a grid of
cases and records each measurement as a :class:`Row`. Rows go into
``bench/results/<bench>-<device slug>.json`` as soon as they are measured (atomically: write a
temporary file, then ``os.replace``), grouped per run with an environment record (device,
library versions, git commit and dirty flag, host, time), so a run killed half-way still
leaves what it measured and older runs on the same device are kept beside newer ones.

Timing. CUDA: ``triton.testing.do_bench`` (it synchronizes, flushes L2 between calls and
returns quantiles). CPU: ``time.perf_counter`` around each call after a warm-up, repeated
until a time budget is spent; :func:`measure_side_by_side` interleaves the calls of several
implementations so that a shared machine's changing load does not bias their ratios. Both
give median, 20th and 80th percentiles in milliseconds.

Peak memory is the extra memory one call needs above what was allocated before it
(inputs excluded; outputs, saved activations and gradients included). CUDA: from
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: torch keeps no
allocator statistics there and ``tracemalloc`` does not see its allocations, so we reset the
kernel's peak-RSS counter (``/proc/self/clear_refs``, value 5) and report ``VmHWM`` minus the
``VmRSS`` before the call, with glibc told to serve every block of 64 KiB or more by ``mmap``
and free heap pages released before it (so freed blocks leave the RSS and new ones enter
it). Blocks under 64 KiB that reuse resident heap pages are not counted, and heap reuse
makes the figure vary by some tens of MiB with what ran before; it is ``None`` where ``/proc`` does not
allow the reset.

Benchmark scripts run from the repository root as ``python -m bench.bench_<name>`` and
import this module as ``from bench.common import ...``. Their configs are dataclasses whose
flags come from ``dcr_fast.config``, as for every command of the package.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime as _dt
import gc
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dcr_fast import atomic

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
STATUSES = ("ok", "oom", "skipped", "error")
MODES = ("fwd", "fwd+bwd")


@dataclass
class Row:
    """One measurement: implementation ``impl`` of benchmark ``bench`` on one case, one mode.

    ``case`` holds the case parameters (e.g. ``{"B": 4096, "d": 128, "dtype": "float32"}``);
    ``metrics`` holds derived numbers (TFLOP/s, pairs/s, ratios to a baseline). Times are in
    milliseconds per call; ``peak_mb`` is the extra memory of one call in MiB (see module doc).
    A row with ``status`` other than "ok" says why in ``reason`` and has no times.
    """

    bench: str
    impl: str
    mode: str
    case: dict[str, Any]
    status: str = "ok"
    reason: str = ""
    ms_median: float | None = None
    ms_p20: float | None = None
    ms_p80: float | None = None
    repeats: int | None = None
    peak_mb: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class Timing:
    """Quantiles of the per-call time in milliseconds over ``repeats`` timed calls."""

    median: float
    p20: float
    p80: float
    repeats: int | None


def measure(
    fn: Callable[[], Any],
    *,
    bench: str,
    impl: str,
    mode: str,
    case: dict[str, Any],
    device: torch.device,
    grad_to_none: Sequence[torch.Tensor] = (),
    budget_s: float = 1.0,
    with_memory: bool = True,
) -> Row:
    """Time ``fn`` and measure its peak memory; an out-of-memory error becomes an "oom" row.

    ``grad_to_none`` lists leaf tensors whose ``.grad`` is cleared before each call, so a
    forward+backward benchmark measures the same work (and memory) every time.
    """
    row = Row(bench=bench, impl=impl, mode=mode, case=dict(case))
    try:
        if with_memory:
            row.peak_mb = peak_memory_mb(fn, device, grad_to_none=grad_to_none)
        timing = time_fn(fn, device, grad_to_none=grad_to_none, budget_s=budget_s)
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, OOM is told apart
        return _failed(row, exc, device)
    return _timed(row, timing, device)


@dataclass
class Candidate:
    """One implementation to measure side by side: its name, one call, leaves to clear."""

    impl: str
    fn: Callable[[], Any]
    grad_to_none: Sequence[torch.Tensor] = ()


def measure_side_by_side(
    candidates: Sequence[Candidate],
    *,
    bench: str,
    mode: str,
    case: dict[str, Any],
    device: torch.device,
    budget_s: float = 1.0,
    min_repeats: int = 3,
    max_repeats: int = 1000,
) -> list[Row]:
    """Rows for several implementations of one case, measured so that their ratios are fair.

    CUDA: each in turn with :func:`measure` (the GPU is not shared). CPU: the memory call of
    each doubles as its warm-up, then the timed calls go round-robin, one call of every
    implementation per round, so a change in the load of a shared machine falls on all of
    them alike; rounds go on until ``budget_s`` per implementation is spent (at least
    ``min_repeats`` rounds).
    """
    common = {"bench": bench, "mode": mode, "case": case, "device": device, "budget_s": budget_s}
    if device.type == "cuda":
        return [measure(c.fn, impl=c.impl, grad_to_none=c.grad_to_none, **common) for c in candidates]
    rows = {c.impl: Row(bench=bench, impl=c.impl, mode=mode, case=dict(case)) for c in candidates}
    live = []
    for c in candidates:
        try:
            rows[c.impl].peak_mb = peak_memory_mb(c.fn, device, grad_to_none=c.grad_to_none)
            live.append(c)
        except Exception as exc:  # noqa: BLE001 - recorded in the row
            _failed(rows[c.impl], exc, device)
    times: dict[str, list[float]] = {c.impl: [] for c in live}
    start, rounds = time.perf_counter(), 0
    while live and rounds < max_repeats and (
            rounds < min_repeats or time.perf_counter() - start < budget_s * len(candidates)):
        for c in list(live):
            try:
                times[c.impl].append(_timed_call(c.fn, c.grad_to_none))
            except Exception as exc:  # noqa: BLE001 - recorded in the row
                _failed(rows[c.impl], exc, device)
                live.remove(c)
        rounds += 1
    for c in live:
        _timed(rows[c.impl], _quantiles(times[c.impl]), device)
    return [rows[c.impl] for c in candidates]


def _failed(row: Row, exc: Exception, device: torch.device) -> Row:
    release_memory(device)
    row.status = "oom" if is_oom(exc) else "error"
    row.reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    return row


def _timed(row: Row, timing: Timing, device: torch.device) -> Row:
    row.ms_median, row.ms_p20, row.ms_p80, row.repeats = timing.median, timing.p20, timing.p80, timing.repeats
    if device.type == "cpu":
        row.metrics["load_avg_1m"] = os.getloadavg()[0]  # other jobs on a shared machine skew CPU timings
    return row


def skipped(*, bench: str, impl: str, mode: str, case: dict[str, Any], reason: str) -> Row:
    return Row(bench=bench, impl=impl, mode=mode, case=dict(case), status="skipped", reason=reason)


def time_fn(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    grad_to_none: Sequence[torch.Tensor] = (),
    budget_s: float = 1.0,
    min_repeats: int = 3,
    max_repeats: int = 1000,
) -> Timing:
    """Per-call time quantiles of ``fn`` on ``device`` (see the module docstring for how)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        warmup_ms = max(5.0, 0.25 * budget_s * 1e3)
        med, p20, p80 = do_bench(
            fn, warmup=warmup_ms, rep=budget_s * 1e3, grad_to_none=list(grad_to_none) or None, quantiles=[0.5, 0.2, 0.8]
        )
        return Timing(median=med, p20=p20, p80=p80, repeats=None)  # do_bench chooses and hides it

    first = _timed_call(fn, grad_to_none)  # warm-up, also the cost estimate
    repeats = int(min(max_repeats, max(min_repeats, budget_s * 1e3 / max(first, 1e-3))))
    return _quantiles([_timed_call(fn, grad_to_none) for _ in range(repeats)])


def _timed_call(fn: Callable[[], Any], grad_to_none: Sequence[torch.Tensor]) -> float:
    """Milliseconds of one call of ``fn`` on the CPU, its leaves' gradients cleared first."""
    _clear_grads(grad_to_none)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def peak_memory_mb(
    fn: Callable[[], Any], device: torch.device, *, grad_to_none: Sequence[torch.Tensor] = ()
) -> float | None:
    """Extra memory (MiB) one call of ``fn`` needs above what is allocated before it."""
    _clear_grads(grad_to_none)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        del out
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with _small_mmap_threshold():
        if not _reset_peak_rss():
            fn()
            return None
        base = _proc_status_kb("VmRSS")
        out = fn()
        peak = _proc_status_kb("VmHWM")
        del out
    return max(0.0, (peak - base) / 1024)


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def release_memory(device: torch.device) -> None:
    """After a failure: collect the tensors its traceback held (a full collection takes ~0.4 s)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def environment(device: torch.device, extra_packages: Iterable[str] = ()) -> dict[str, Any]:
    """Where and with what a run was measured: device, versions, git commit, host, time."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers", *extra_packages):
        versions[name] = _package_version(name)
    commit, dirty = _git_state()
    return {
        "device": device_name(device),
        "device_slug": device_slug(device),
        "device_type": device.type,
        "cuda": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0],  # other processes on a shared machine skew CPU timings
        "versions": versions,
        "git_commit": commit,
        "git_dirty": dirty,
        "hostname": socket.gethostname(),
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def device_slug(device: torch.device) -> str:
    """A file-name-safe name for the device, e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu-amd-epyc-2c``."""
    if device.type == "cuda":
        text = torch.cuda.get_device_name(device)
    else:
        text = "cpu " + device_name(device).split(" (")[0] + f" {os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


class ResultsFile:
    """The results JSON of one benchmark on one device; each :meth:`add` rewrites it atomically.

    Layout: ``{"bench": name, "runs": [{"run_id", "env", "rows": [Row as dict, ...]}, ...]}``.
    One writer per file at a time (runs of the same benchmark on the same device are serial).
    """

    def __init__(self, bench: str, device: torch.device, *, results_dir: Path | str = RESULTS_DIR,
                 extra_packages: Iterable[str] = ()) -> None:
        self.bench = bench
        self.path = Path(results_dir) / f"{bench}-{device_slug(device)}.json"
        self.run = {
            "run_id": f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}",
            "env": environment(device, extra_packages),
            "rows": [],
        }

    def add(self, row: Row) -> Row:
        self.run["rows"].append(dataclasses.asdict(row))
        self.save()
        return row

    def save(self) -> None:
        """Write this run (rows and any other keys set on ``run``) into the file, beside earlier runs."""
        data = load_results(self.path) if self.path.exists() else {"bench": self.bench, "runs": []}
        runs = [r for r in data["runs"] if r["run_id"] != self.run["run_id"]]
        data["runs"] = runs + [self.run]
        atomic.write_json(self.path, data, indent=1)


def load_results(path: Path | str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def rows_of(data: dict[str, Any], latest_only: bool = False) -> list[tuple[dict[str, Any], Row]]:
    """(env, Row) pairs from a loaded results file, optionally only the newest run's."""
    runs = data["runs"][-1:] if latest_only else data["runs"]
    return [(run["env"], Row(**row)) for run in runs for row in run["rows"]]


def format_table(rows: Sequence[Row], metric_keys: Sequence[str] = ()) -> str:
    """A fixed-width text table of rows: case, impl, mode, time quantiles, memory, metrics."""
    header = ["case", "impl", "mode", "median ms", "p20-p80 ms", "peak MiB", *metric_keys, "status"]
    lines = [header]
    for r in rows:
        case = " ".join(f"{k}={v}" for k, v in r.case.items())
        if r.ok:
            spread = f"{_fmt(r.ms_p20)}-{_fmt(r.ms_p80)}"
            cells = [case, r.impl, r.mode, _fmt(r.ms_median), spread, _fmt(r.peak_mb)]
        else:
            cells = [case, r.impl, r.mode, "-", "-", "-"]
        cells += [_fmt(r.metrics.get(k)) for k in metric_keys]
        cells.append(r.status if r.ok else f"{r.status}: {r.reason[:60]}")
        lines.append(cells)
    return render_table(lines)


def render_table(lines: Sequence[Sequence[str]], align: str = "left") -> str:
    """Fixed-width text of a header line and rows of cells, columns padded to their widest cell."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    pad = str.ljust if align == "left" else str.rjust
    return "\n".join("  ".join(pad(c, w) for c, w in zip(line, widths)).rstrip() for line in lines)


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0 or 0.01 <= abs(x) < 1e5:
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return f"{x:.2e}"


def _quantiles(times_ms: list[float]) -> Timing:
    if len(times_ms) == 1:
        t = times_ms[0]
        return Timing(t, t, t, 1)
    deciles = statistics.quantiles(times_ms, n=10, method="inclusive")
    return Timing(median=statistics.median(times_ms), p20=deciles[1], p80=deciles[7], repeats=len(times_ms))


def _clear_grads(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


@contextlib.contextmanager
def _small_mmap_threshold(threshold: int = 64 * 1024) -> Iterator[None]:
    """Make glibc serve blocks ≥ ``threshold`` bytes with mmap while memory is measured.

    Otherwise blocks below its dynamic threshold (up to 32 MB) reuse heap pages that are
    already resident and never show in the RSS peak; free heap chunks are still reused
    first, so their pages are handed back to the kernel (``malloc_trim``) beforehand. Afterwards the threshold is left at 32 MB,
    the value glibc's dynamic threshold settles at once large tensors have been freed.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        yield
        return
    m_mmap_threshold = -3
    mallopt(m_mmap_threshold, threshold)
    malloc_trim(0)  # free heap chunks are reused before any mmap: drop their pages so reuse shows
    try:
        yield
    finally:
        mallopt(m_mmap_threshold, 32 * 2**20)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git_state() -> tuple[str | None, bool | None]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout

    try:
        return git("rev-parse", "HEAD").strip(), bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.CalledProcessError):
        return None, None

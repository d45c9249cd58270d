"""eNTK benchmark: pairs per second of ``entk_matrix`` for each method, side by side.

For N prompts of about ``tokens`` tokens (random ids, lengths ``tokens`` ± 4, in three groups)
every method computes the N×N normalized matrix, i.e. N² blocks K(x', x)[So, Su] and N
normalizers K(x', x')[So, So], with k probes per prompt and θ_S = the last ``tail_layers``
layers + lm_head:

* ``exact`` and ``fd`` are timed on the whole matrix;
* ``fd-reference`` (the paper's scheme) is too slow for that: ``reference_pairs`` sampled
  pairs are timed with their normalizers, and the matrix time is **extrapolated** as
  (N² + N) × (measured time per block); its rows say so (``extrapolated_from_pairs``);
* with ``large_prompts`` > 0, ``exact`` is also timed once on that many prompts
  (the 3,000-prompt, 9M-pair target on GPU).

Each row records pairs/s, the speed-up over ``fd-reference`` and the largest relative
difference of its normalized values from ``exact``. Presets: ``cpu-tiny`` (a small random
Qwen2, float32) and ``qwen2.5-1.5b`` (the Qwen2.5-1.5B architecture from its config with
random weights, 75 prompts and the 3,000-prompt run, which is for a GPU; on a CPU pass
``--large-prompts 0``: the 75×75 matrix with all three methods takes about 40 minutes on 2
cores). Both run the model in float32: ``fd-reference`` perturbs in the model's dtype, and in
bf16 its differences are rounding noise (measured: 6× off the exact value), so a bf16
comparison would time a reference that does not measure the same quantity. Rows go to
``bench/results/entk-<device>.json`` (``bench/common.py``). From the repository root:

    python -m bench.bench_entk                      # CPU, tiny model, a few minutes on 2 cores
    python -m bench.bench_entk --device cuda        # GPU: Qwen2.5-1.5B architecture
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from bench.common import RESULTS_DIR, ResultsFile, Row, format_table
from dcr_fast.config import add_config_arguments, config_from_args
from dcr_fast.ntk.matrix import EntkMatrixConfig, entk_matrix
from dcr_fast.ntk.reference import fd_reference_block
from dcr_fast.ntk.tail import tail_spec

BENCH = "entk"
PRESETS = {
    "cpu-tiny": dict(vocab=1024, hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384, tied=True,
                     dtype="float32", prompts=24, large_prompts=96),
    # Qwen2.5-1.5B: hidden 1536, 28 layers, 12 heads, 2 KV heads, intermediate 8960, vocab 151,936, tied.
    "qwen2.5-1.5b": dict(vocab=151936, hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960, tied=True,
                         dtype="float32", prompts=75, large_prompts=3000),
}
METRICS = ("pairs_per_s", "speedup_vs_reference", "max_rel_diff_vs_exact", "extrapolated_from_pairs")


@dataclass
class EntkBenchConfig:
    """What to measure; every field is a command-line flag (model fields override the preset)."""

    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    preset: str = field(default="auto", metadata={"help": f"{sorted(PRESETS)} or auto (by device)"})
    methods: tuple[str, ...] = field(default=("exact", "fd", "fd-reference"), metadata={"help": "methods to time"})
    prompts: int | None = field(default=None, metadata={"help": "N: prompts of the matrix (N² pairs)"})
    large_prompts: int | None = field(default=None, metadata={"help": "prompts of the large exact run (0: skip)"})
    tokens: int = field(default=32, metadata={"help": "typical prompt length"})
    k: int = field(default=5, metadata={"help": "top-k probes per prompt"})
    tail_layers: int = field(default=2, metadata={"help": "decoder layers in θ_S (+ lm_head)"})
    chunk_size: int = field(default=64, metadata={"help": "prompts per chunk of entk_matrix"})
    reference_pairs: int = field(default=3, metadata={"help": "sampled pairs timed for fd-reference"})
    vocab: int | None = field(default=None, metadata={"help": "model vocab size"})
    hidden: int | None = field(default=None, metadata={"help": "model hidden size"})
    layers: int | None = field(default=None, metadata={"help": "decoder layers"})
    heads: int | None = field(default=None, metadata={"help": "attention heads"})
    kv_heads: int | None = field(default=None, metadata={"help": "key/value heads"})
    intermediate: int | None = field(default=None, metadata={"help": "MLP width"})
    dtype: str | None = field(default=None, metadata={"help": "model dtype"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads (torch.set_num_threads)"})
    results_dir: str = field(default=str(RESULTS_DIR), metadata={"help": "where the results JSON goes"})


def resolve(config: EntkBenchConfig) -> EntkBenchConfig:
    """Fill every unset field from the preset (``auto``: by device)."""
    preset = config.preset
    if preset == "auto":
        preset = "qwen2.5-1.5b" if config.device.startswith("cuda") else "cpu-tiny"
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)} or auto, got {config.preset!r}")
    values = {key: value for key, value in PRESETS[preset].items() if key != "tied"}
    values = {key: getattr(config, key) if getattr(config, key) is not None else value for key, value in values.items()}
    return replace(config, preset=preset, **values)


def build_model(config: EntkBenchConfig, device: torch.device):
    import transformers

    model_config = transformers.Qwen2Config(
        vocab_size=config.vocab, hidden_size=config.hidden, num_hidden_layers=config.layers,
        num_attention_heads=config.heads, num_key_value_heads=config.kv_heads,
        intermediate_size=config.intermediate, tie_word_embeddings=PRESETS[config.preset]["tied"],
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    with device:
        model = transformers.AutoModelForCausalLM.from_config(
            model_config, attn_implementation="sdpa", dtype=getattr(torch, config.dtype)
        )
    return model.eval()


def make_groups(n: int, tokens: int, vocab: int, device: torch.device, seed: int = 0) -> dict[str, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(tokens - 4, tokens + 5, (n,), generator=g)
    prompts = [torch.randint(0, vocab, (int(t),), generator=g).to(device) for t in lengths]
    names = ("toxic", "seemingly toxic", "normal")
    return {name: prompts[i::3] for i, name in enumerate(names) if prompts[i::3]}


def run(config: EntkBenchConfig) -> list[Row]:
    config = resolve(config)
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_entk: --device cuda but CUDA is not available")
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    model = build_model(config, device)
    results = ResultsFile(BENCH, device, results_dir=config.results_dir)
    print(f"eNTK on {results.run['env']['device']}, preset {config.preset} -> {results.path}", flush=True)
    groups = make_groups(config.prompts, config.tokens, config.vocab, device)
    n = config.prompts
    case = {"preset": config.preset, "N": n, "pairs": n * n, "tokens": config.tokens, "k": config.k,
            "tail_layers": config.tail_layers, "lm_head": True, "dtype": config.dtype}
    settings = dict(k=config.k, tail_layers=config.tail_layers, chunk_size=config.chunk_size, progress=False)

    # The reference first (a few sampled blocks), so every later row can be saved with its
    # speed-up as soon as it is measured: a run cut short keeps what it measured.
    sampled = reference_sample(model, config, groups, device) if "fd-reference" in config.methods else None
    reference_ms = None if sampled is None else sampled["seconds"] * 1e3
    rows: list[Row] = []
    exact = None
    warm = {name: prompts[:1] for name, prompts in list(groups.items())[:2]}
    for method in [m for m in ("exact", "fd") if m in config.methods]:
        entk_matrix(model, None, warm, method=method, **settings)  # warm-up: kernels, allocator
        seconds, result = timed(
            lambda method=method: entk_matrix(model, None, groups, method=method, **settings), device
        )
        exact = result.normalized if method == "exact" else exact
        metrics = {} if exact is None else {"max_rel_diff_vs_exact": max_rel_diff(result.normalized, exact)}
        rows.append(results.add(row(method, case, seconds, n * n, metrics, reference_ms)))
    if sampled is not None:
        metrics = {"extrapolated_from_pairs": float(len(sampled["pairs"]))}
        if exact is not None:
            at = tuple(np.array(sampled["pairs"]).T)
            metrics["max_rel_diff_vs_exact"] = max_rel_diff(np.array(sampled["normalized"]), exact[at])
        rows.append(results.add(row("fd-reference", case, sampled["seconds"], n * n, metrics, reference_ms)))
    print(format_table(rows, METRICS), flush=True)

    if config.large_prompts and "exact" in config.methods:
        big = make_groups(config.large_prompts, config.tokens, config.vocab, device, seed=1)
        offload = device.type == "cuda"  # ~18 MB of probe features a prompt at 1.5B widths
        large_settings = {**settings, "progress": True, "offload_features": offload}
        seconds, _ = timed(lambda: entk_matrix(model, None, big, method="exact", **large_settings), device)
        large_case = {**case, "N": config.large_prompts, "pairs": config.large_prompts**2, "offload": offload,
                      "offload_group": EntkMatrixConfig.offload_group if offload else None}
        rows.append(results.add(row("exact", large_case, seconds, config.large_prompts**2, {})))
        print(format_table(rows[-1:], METRICS), flush=True)
    return rows


def reference_sample(model, config: EntkBenchConfig, groups, device) -> dict:
    """fd-reference on sampled pairs (each with its normalizer), extrapolated to the N×N matrix."""
    prompts = [p for items in groups.values() for p in items]
    n = len(prompts)
    spec = tail_spec(model, config.tail_layers, True)
    g = torch.Generator().manual_seed(0)
    pairs = [tuple(int(i) for i in torch.randint(0, n, (2,), generator=g)) for _ in range(config.reference_pairs)]
    fd_reference_block(model, spec, prompts[0], prompts[-1], k=config.k, eps=1e-3)  # warm-up, untimed
    seconds, normalized = 0.0, []
    for r, c in pairs:
        elapsed, (K, K_self, _, _) = timed(
            lambda r=r, c=c: fd_reference_block(model, spec, prompts[r], prompts[c], k=config.k, eps=1e-3), device
        )
        seconds += elapsed
        normalized.append(float(torch.linalg.matrix_norm(K) / torch.linalg.matrix_norm(K_self)))
    per_block = seconds / (2 * len(pairs))  # each sample is one pair and one normalizer
    print(f"fd-reference: {len(pairs)} sampled pairs, {per_block:.3f} s per block; the N×N time is "
          f"extrapolated as (N² + N) × that", flush=True)
    return {"pairs": pairs, "normalized": normalized, "seconds": per_block * (n * n + n)}


def max_rel_diff(values: np.ndarray, exact: np.ndarray) -> float:
    return float((np.abs(values - exact) / np.abs(exact)).max())


def row(method: str, case: dict, seconds: float, pairs: int, metrics: dict, reference_ms: float | None = None) -> Row:
    metrics = {"pairs_per_s": pairs / seconds, **metrics}
    if reference_ms is not None:
        metrics["speedup_vs_reference"] = reference_ms / (seconds * 1e3)
    return Row(bench=BENCH, impl=method, mode="fwd+bwd", case=dict(case), ms_median=seconds * 1e3,
               ms_p20=seconds * 1e3, ms_p80=seconds * 1e3, repeats=1, metrics=metrics)


def timed(fn, device: torch.device):
    """(seconds, result) of one call; a whole matrix is long enough to time once."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(parser, EntkBenchConfig)
    run(config_from_args(EntkBenchConfig, parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

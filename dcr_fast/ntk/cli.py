"""``dcr-fast ntk``: the eNTK similarity matrix of prompt groups, with means and a heatmap.

    dcr-fast ntk --model PATH_OR_ID --group toxic=toxic.txt --group "seemingly toxic"=st.jsonl \\
        --k 5 --tail-layers 2 --method exact --out DIR

A group file is a prompt file (``.txt``, one prompt a line; ``.jsonl``, ``.json`` or ``.csv``
with a ``prompt`` field or column), or ``BENCHMARK=PATH`` for every prompt of a registered
benchmark (``--group xstest=xstest=data/xstest``). ``--model`` is any name
``dcr_fast.models.load`` takes (its tokenizer must have a chat template), or ``tiny-qwen2``: a
small random Qwen2 with a word-level tokenizer built from the prompts, so the command runs
offline. DIR receives ``matrix.npy``, ``means.json``, ``heatmap.png`` and the resumable chunks:
rerun the same command to resume. A rerun with another model, dtype, settings or prompts is
refused, naming what differs, unless ``--overwrite`` discards the earlier run.

Across GPUs, launch the same command with torchrun (one rank per GPU; every rank needs ``DIR``)::

    torchrun --nproc_per_node 8 -m dcr_fast.cli ntk --model PATH_OR_ID --group ... --out DIR

Each prompt's probe features are computed once, by one rank, and the matrix's blocks are
divided among the ranks (:mod:`dcr_fast.ntk.sharded`); a per-rank table of work and time
per phase is printed, and kept in ``DIR/ranks.json``.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from dcr_fast import distributed, fingerprint
from dcr_fast.data.files import load_prompts
from dcr_fast.ntk.block import METHODS
from dcr_fast.ntk.matrix import EntkMatrixConfig, entk_matrix

NAME = "ntk"
TINY_MODEL = "tiny-qwen2"


def register(subparsers) -> None:
    parser = subparsers.add_parser(NAME, help="empirical-NTK similarity matrix of prompt groups (paper figs. 3, 6)")
    parser.add_argument("--model", required=True, help="a built-in name (smollm2-135m-instruct), a .gguf file, a model "
                                                       f"directory or a hub id, or {TINY_MODEL!r}")
    parser.add_argument(
        "--group", action="append", required=True, metavar="NAME=FILE",
        help="a prompt group: .txt (one prompt a line), .jsonl/.json/.csv with a 'prompt' field, or "
             "BENCHMARK=PATH; repeat per group",
    )
    parser.add_argument("--out", required=True, help="output directory (resumable)")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard an earlier run in --out made with another model, dtype, settings or prompts")
    defaults = EntkMatrixConfig()
    parser.add_argument("--k", type=int, default=defaults.k, help="top-k tokens per prompt (So, Su)")
    parser.add_argument("--tail-layers", type=int, default=defaults.tail_layers, help="decoder layers in θ_S")
    parser.add_argument(
        "--include-lm-head", action=argparse.BooleanOptionalAction, default=defaults.include_lm_head,
        help="put the output projection in θ_S",
    )
    parser.add_argument("--method", choices=METHODS, default=defaults.method)
    parser.add_argument("--eps", type=float, default=defaults.eps, help="finite-difference step (fd methods)")
    parser.add_argument("--chunk-size", type=int, default=defaults.chunk_size, help="prompts per row chunk")
    parser.add_argument(
        "--offload-features", action=argparse.BooleanOptionalAction, default=defaults.offload_features,
        help="keep per-prompt probe features in host memory (large runs on a GPU)",
    )
    parser.add_argument(
        "--offload-group", type=int, default=defaults.offload_group,
        help="with --offload-features: row chunks contracted together, their features kept on the device",
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "float64"))
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--attn", default="auto", help="attention implementation (auto: SDPA)")
    parser.set_defaults(func=run, resume_hint="rerun the same command to resume (finished row chunks are kept)")


def run(args: argparse.Namespace) -> int:
    groups: dict[str, list[str]] = {}
    for spec in args.group:
        name, source = parse_group(spec)
        if name in groups:
            raise ValueError(f"--group {name!r} given twice; give each group once (one file per group)")
        groups[name] = load_prompts(source, f"--group {name}")
    config = {f.name: getattr(args, f.name) for f in fields(EntkMatrixConfig)}
    identity = None if args.model == TINY_MODEL else fingerprint.model_fingerprint(args.model)
    with distributed.process_group(args.device) as device:  # under torchrun: one rank per device
        model, tokenizer = load(args, [p for prompts in groups.values() for p in prompts], device)
        result = entk_matrix(model, tokenizer, groups, out_dir=args.out, identity=identity,
                             overwrite=args.overwrite, **config)
        main = distributed.is_main()
    if not main:
        return 0
    width = max(len(n) for n in result.group_names)
    print(f"normalized eNTK means (rows x', columns x), {len(result.labels)} prompts, method {args.method}:")
    print(" " * width + "  " + "  ".join(f"{n[:10]:>10}" for n in result.group_names))
    for name, row in zip(result.group_names, result.means):
        print(f"{name:>{width}}  " + "  ".join(f"{v:10.4f}" for v in row))
    print(f"wrote {Path(args.out) / 'matrix.npy'}, means.json, heatmap.png")
    if result.ranks is not None:
        print(f"work and seconds per rank (also in {Path(args.out) / 'ranks.json'}):")
        print_ranks(result.ranks)
    return 0


def parse_group(spec: str) -> tuple[str, str]:
    name, sep, source = spec.partition("=")
    if not sep or not name or not source:
        raise ValueError(f"--group must be NAME=FILE, got {spec!r}")
    return name, source


def print_ranks(ranks: list[dict]) -> None:
    """Each rank's share of the work and its seconds per phase, one line a rank."""
    phases = list(ranks[0]["seconds"])
    print(f"{'rank':>4} {'chunks':>6} {'blocks':>6} {'pairs':>8} {'sent MB':>8}  " + " ".join(f"{p:>9}" for p in phases))
    for r in ranks:
        print(f"{r['rank']:>4} {r['feature_chunks']:>6} {r['blocks']:>6} {r['pairs']:>8} {r['sent_bytes'] / 1e6:>8.1f}  "
              + " ".join(f"{r['seconds'].get(p, 0.0):>8.2f}s" for p in phases))


def load(args: argparse.Namespace, prompts: list[str], device):
    from dcr_fast import models
    from dcr_fast.runtime import resolve_dtype

    if args.model == TINY_MODEL:
        from dcr_fast.tiny import tiny_model, tiny_tokenizer

        tokenizer = tiny_tokenizer(prompts)
        attn = "sdpa" if args.attn == "auto" else args.attn
        model = tiny_model(
            tokenizer, hidden_size=64, layers=4, dtype=resolve_dtype(args.dtype), attn_implementation=attn
        )
        return model.to(device), tokenizer
    model, tokenizer = models.load(
        args.model, dtype=args.dtype, attn_implementation=args.attn, device=device
    )
    return model.eval(), tokenizer

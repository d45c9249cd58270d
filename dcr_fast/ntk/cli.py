"""``dcr-fast ntk``: the eNTK similarity matrix of prompt groups, with means and a heatmap.

    dcr-fast ntk --model PATH_OR_ID --group toxic=toxic.txt --group "seemingly toxic"=st.jsonl \\
        --k 5 --tail-layers 2 --method exact --out DIR

A group file is a text file with one prompt per line, or a ``.jsonl`` file whose lines carry a
``"prompt"`` field. ``--model`` is a local Hugging Face directory or hub id (its tokenizer
must have a chat template), or ``tiny-qwen2``: a small random Qwen2 with a word-level
tokenizer built from the prompts, so the command runs offline. DIR receives ``matrix.npy``,
``means.json``, ``heatmap.png`` and the resumable chunks (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from dcr_fast.ntk.block import METHODS
from dcr_fast.ntk.matrix import EntkMatrixConfig, entk_matrix

NAME = "ntk"
TINY_MODEL = "tiny-qwen2"


def register(subparsers) -> None:
    parser = subparsers.add_parser(NAME, help="empirical-NTK similarity matrix of prompt groups (paper figs. 3, 6)")
    parser.add_argument("--model", required=True, help=f"local HF directory, hub id, or {TINY_MODEL!r}")
    parser.add_argument(
        "--group", action="append", required=True, metavar="NAME=FILE",
        help="a prompt group: text file (one prompt per line) or .jsonl with a 'prompt' field; repeat per group",
    )
    parser.add_argument("--out", required=True, help="output directory (resumable)")
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
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        groups = {name: read_prompts(path, name) for name, path in (parse_group(g) for g in args.group)}
        model, tokenizer = load(args, [p for prompts in groups.values() for p in prompts])
        config = {f.name: getattr(args, f.name) for f in fields(EntkMatrixConfig)}
        result = entk_matrix(model, tokenizer, groups, out_dir=args.out, **config)
    except ValueError as exc:
        print(f"dcr-fast {NAME}: error: {exc}", file=sys.stderr)
        return 2
    width = max(len(n) for n in result.group_names)
    print(f"normalized eNTK means (rows x', columns x), {len(result.labels)} prompts, method {args.method}:")
    print(" " * width + "  " + "  ".join(f"{n[:10]:>10}" for n in result.group_names))
    for name, row in zip(result.group_names, result.means):
        print(f"{name:>{width}}  " + "  ".join(f"{v:10.4f}" for v in row))
    print(f"wrote {Path(args.out) / 'matrix.npy'}, means.json, heatmap.png")
    return 0


def parse_group(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--group must be NAME=FILE, got {spec!r}")
    return name, Path(path)


def read_prompts(path: Path, group: str) -> list[str]:
    """Prompts of a group file: one per non-empty line, or the 'prompt' field of each JSONL line."""
    if not path.is_file():
        raise ValueError(f"--group {group}: no such file {path}")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return [line.strip() for line in lines]
    prompts = []
    for number, line in enumerate(lines, 1):
        try:
            prompts.append(str(json.loads(line)["prompt"]))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(
                f"--group {group}: {path} line {number} is not JSON with a 'prompt' field ({exc})"
            ) from exc
    if not prompts:
        raise ValueError(f"--group {group}: {path} has no prompts")
    return prompts


def load(args: argparse.Namespace, prompts: list[str]):
    from dcr_fast import models
    from dcr_fast.runtime import resolve_device, resolve_dtype

    device = resolve_device(args.device)
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

"""`dcr-fast eval`: evaluate a causal LM on named benchmarks and write a Table-1 report.

    dcr-fast eval --model out/dcr+stl --benchmark xstest=data/xstest --benchmark i-cona=data/stl \\
        --out eval/ [--guard PATH] [--max-new-tokens 64] [--batch-size 16]

A benchmark is NAME=PATH (a file, or the directory holding its usual file) or NAME alone to
fetch it from the hub. All benchmarks are loaded and checked before the model is, so a bad
path fails in seconds. Responses are checkpointed under OUT/generations; rerunning the same
command resumes. They are kept with the model's content fingerprint, dtype, chat template,
--max-new-tokens and --system-prompt that made them: a rerun in the same OUT that changes any of
these is refused, naming what differs, unless --overwrite regenerates. The evaluation settings (EvalConfig) are flags, or come from --config FILE
(flat, or its `eval:` section) as for the training commands.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dcr_fast.config import add_config_arguments, config_from_args
from dcr_fast.evaluation.harness import EvalConfig

NAME = "eval"
_DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")


def register(subparsers) -> None:
    parser = subparsers.add_parser(NAME, help="evaluate over-refusal and safety; write report.json/.md",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="a built-in name (smollm2-135m-instruct), a .gguf file, a model directory or a hub id")
    parser.add_argument("--benchmark", action="append", required=True, metavar="NAME[=PATH]",
                        help="a benchmark registry name, optionally =PATH; repeat for several")
    parser.add_argument("--out", required=True, type=Path, help="output directory (rerun to resume)")
    parser.add_argument("--overwrite", action="store_true",
                        help="regenerate responses saved in --out by another model or other settings")
    parser.add_argument("--guard", default=None, help="guard model path for defense success (default: refusal filter)")
    parser.add_argument("--run-name", default=None, help="row name in the report (default: the model path's name)")
    parser.add_argument("--device", default="auto", help="torch device: auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", choices=_DTYPES, help="model dtype (default: as saved)")
    add_config_arguments(parser, EvalConfig)
    parser.set_defaults(func=run, resume_hint="rerun the same command to resume (finished benchmarks are kept)")


def run(args: argparse.Namespace) -> int:
    from dcr_fast import fingerprint, models
    from dcr_fast.data import load_benchmark
    from dcr_fast.evaluation.harness import evaluate
    from dcr_fast.evaluation.refusal import GuardJudge, RefusalFilter
    from dcr_fast.evaluation.report import write_report

    config = config_from_args(EvalConfig, args, section=NAME)
    benchmarks = {}
    for item in args.benchmark:
        name, _, path = item.partition("=")
        if name in benchmarks:
            raise ValueError(f"--benchmark {name!r} given twice")
        benchmarks[name] = load_benchmark(name, path or None)
    guard = None
    if args.guard:
        try:  # before the model is loaded, so a wrong path fails in seconds
            guard = models.resolve(args.guard)
        except ValueError as err:
            raise ValueError(f"--guard: {err}") from None
    model, tokenizer = models.load(args.model, dtype=args.dtype, device=args.device)
    judge = GuardJudge.from_pretrained(guard, device=model.device) if guard else RefusalFilter()
    result = evaluate(model, tokenizer, benchmarks, config, judge=judge, out_dir=args.out,
                      model_key=fingerprint.model_fingerprint(args.model), overwrite=args.overwrite)
    name = args.run_name or Path(args.model).name
    write_report(args.out, {name: result}, settings={"model": args.model, "guard": args.guard,
                                                     "benchmarks": args.benchmark, **result["settings"]})
    print(f"wrote {args.out / 'report.json'} and {args.out / 'report.md'}")
    return 0

"""The ``dcr-fast`` command line: one sub-command per job.

Each sub-command lives beside the code it drives and exposes ``register(subparsers)``, which
adds its parser and sets ``func``; this module only collects them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

_SUBCOMMANDS = (
    "dcr_fast.demo.run",
    "dcr_fast.train.dcr",
    "dcr_fast.train.sft",
    "dcr_fast.evaluation.cli",
    "dcr_fast.ntk.cli",
    "dcr_fast.bench_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcr-fast",
        description="Fast Circle loss, empirical NTK and the DCR over-refusal pipeline.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _SUBCOMMANDS:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""A training stage as a ``dcr-fast`` sub-command: flags from its config, a printed summary."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dcr_fast import distributed
from dcr_fast.config import add_config_arguments, config_from_args
from dcr_fast.train.config import TrainConfig
from dcr_fast.train.outputs import check_output_folder


def check_model_and_out(config: TrainConfig) -> None:
    """The two fields every stage needs, checked before anything is loaded."""
    if not config.model:
        raise ValueError("model: required (a built-in name, a .gguf file, a model directory or a hub id)")
    if not config.out:
        raise ValueError("out: required (the output directory)")
    check_output_folder(config)


def register_stage(subparsers, name: str, *, help: str, description: str, config_cls: type,
                   runner: Callable[[Any], dict[str, Any]]) -> None:
    """Add sub-command ``name``: flags from ``config_cls``, YAML section ``name``, a printed summary."""
    import argparse

    parser = subparsers.add_parser(name, help=help, description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, config_cls)

    def run(args: argparse.Namespace) -> int:
        config = config_from_args(config_cls, args, section=name)
        with distributed.process_group(config.device):  # under torchrun: one rank per device
            summary = runner(config)
            main = distributed.is_main()
        if main:
            print_summary(name, {k: v for k, v in summary.items() if k != "config"})
        return 0

    parser.set_defaults(func=run, resume_hint="rerun with --resume to continue from the last checkpoint in OUT")


def print_summary(title: str, summary: dict[str, Any]) -> None:
    """The end-of-run summary, one aligned line per entry."""
    print(f"\n== {title} ==")
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        shown = f"{value:.6g}" if isinstance(value, float) else value
        print(f"  {key:<{width}}  {shown}")


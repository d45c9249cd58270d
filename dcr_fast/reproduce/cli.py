"""``dcr-fast reproduce --model M --out DIR [--preset cpu|paper] [--seeds ...] [--data DIR]``.

Runs the paper's protocol from one base model (see ``dcr_fast.reproduce.pipeline``) and writes
``DIR/report.json``, ``DIR/report.md`` and figures. The preset is a YAML file with
``reproduce``, ``dcr`` and ``sft`` sections (``--config FILE`` for your own); flags override its
``reproduce`` section. Rerun the same command to resume after an interruption.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from dcr_fast.config import add_config_arguments, config_from_args, load_yaml, resolve_config_path
from dcr_fast.reproduce.config import PRESETS, ReproduceConfig

DATA_ENV = "DCR_FAST_DATA"
RESUME_HINT = "rerun the same command to continue: finished jobs are kept, interrupted training resumes from its checkpoint"


def register(subparsers) -> None:
    parser = subparsers.add_parser("reproduce", help="the paper's protocol end to end on a real model; Table 1 report",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run, resume_hint=RESUME_HINT)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                        help="cpu: subsets and short training that fit 2 CPU cores in about 25 min; "
                             "paper: the paper's sizes, for a GPU (default: cpu)")
    add_config_arguments(parser, ReproduceConfig)


def load_setting(args: argparse.Namespace) -> tuple[ReproduceConfig, dict[str, dict[str, Any]]]:
    """The run's config (preset, then flags; ``--data`` defaults to $DCR_FAST_DATA) and stage sections."""
    setting = resolve_config_path(args.config or PRESETS[args.preset])
    args.config = setting
    if args.data is None and os.environ.get(DATA_ENV):
        args.data = os.environ[DATA_ENV]
    config = config_from_args(ReproduceConfig, args, section="reproduce")
    stages = {name: load_yaml(setting, name) for name in ("dcr", "sft")}
    return config, stages


def run(args: argparse.Namespace) -> int:
    from dcr_fast.reproduce.pipeline import reproduce

    config, stages = load_setting(args)
    report = reproduce(config, stages)
    print(Path(config.out, "report.md").read_text())
    claim = report["claim"]
    print(f"reproduce: wrote {config.out}/report.json, report.md and figures in {report['wall_s'] / 60:.1f} min; "
          f"the paper's claim {'holds' if claim['all_hold'] else 'does not hold'} on this run (see 'The paper's claim, checked')")
    return 0

"""``dcr-fast bench``: run the speed benchmarks of a source checkout from the command line.

``dcr-fast bench circle-loss --quick`` times the Circle loss on the CPU in about a minute;
``--device cuda --preset targets`` measures the GPU targets. Every flag mirrors a field of
``bench.bench_circle_loss.CircleBenchConfig``; results go to ``bench/results/`` as JSON.
Every other ``bench/bench_<name>.py`` is ``dcr-fast bench <name> [its flags]``
(underscores as hyphens), its arguments passed through to its ``main``.

The benchmarks live in the repository's ``bench/`` directory, beside the package, not in the
installed package: this command finds them in an editable install or a clone and says so
when they are absent.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="speed benchmarks (results JSON under bench/results/)")
    benches = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    circle = benches.add_parser("circle-loss", help="fused Circle loss vs torch reference, chunked and PML")
    circle.add_argument("--quick", action="store_true", help="the 'quick' preset: two small CPU cases, ~1 minute")
    module = _bench_module("bench_circle_loss")
    if module is not None:
        from dcr_fast.config import add_config_arguments

        add_config_arguments(circle, module.CircleBenchConfig)
    circle.set_defaults(func=run_circle_loss)
    for path in sorted((REPO_ROOT / "bench").glob("bench_*.py")):
        if path.stem == "bench_circle_loss":
            continue
        # No option prefix of its own: every word, --help too, is passed to the script's main().
        other = benches.add_parser(path.stem.removeprefix("bench_").replace("_", "-"), add_help=False,
                                   prefix_chars="\0", help=f"python -m bench.{path.stem} (its own flags)")
        other.add_argument("argv", nargs="*")
        other.set_defaults(func=lambda args, name=path.stem: _bench_module(name).main(args.argv))


def run_circle_loss(args: argparse.Namespace) -> int:
    module = _bench_module("bench_circle_loss")
    if module is None:
        print(f"dcr-fast bench: no bench/ directory at {REPO_ROOT}; the benchmarks ship with the source "
              "checkout (git clone, then pip install -e .)", file=sys.stderr)
        return 2
    from dcr_fast.config import config_from_args

    if args.quick:
        args.preset = "quick"
    module.run(config_from_args(module.CircleBenchConfig, args))
    return 0


def _bench_module(name: str):
    """``bench.<name>`` from the checkout this package was installed from, or None."""
    if not (REPO_ROOT / "bench" / f"{name}.py").is_file():
        return None
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module(f"bench.{name}")

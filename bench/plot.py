"""Plot benchmark results JSON (``bench/results/*.json``): time and peak memory against a size.

Measuring and plotting are separate: this script only reads what the benchmarks recorded.
For each results file it draws one figure for time and one for peak memory; a panel per
combination of mode and the case parameters other than the x-axis one (e.g. ``d``, dtype),
a line per implementation, the 20-80 percentile band shaded. Rows that ran out of memory are
marked with an x at the top of the panel. By default only the newest run in each file is drawn.

    python -m bench.plot bench/results/circle_loss-*.json --x B --out bench/results/plots
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported: files only, no display
import matplotlib.pyplot as plt

from bench.common import Row, load_results, rows_of


def plot_file(path: Path, x_key: str, out_dir: Path, all_runs: bool = False) -> list[Path]:
    """Write ``<stem>-time.png`` and ``<stem>-memory.png`` for one results file; return their paths."""
    data = load_results(path)
    pairs = rows_of(data, latest_only=not all_runs)
    rows = [row for _, row in pairs if x_key in row.case]
    if not rows:
        raise ValueError(f"{path}: no rows with case key {x_key!r}")
    env = pairs[-1][0]
    title = f"{data['bench']} on {env['device']} (torch {env['versions']['torch']}, {env['git_commit'][:8]})"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for what, label in (("time", "median time per call (ms)"), ("memory", "peak extra memory (MiB)")):
        fig = _figure(rows, x_key, what, label)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout(rect=(0, 0, 1, 0.95))  # leave the top strip to the title
        target = out_dir / f"{path.stem}-{what}.png"
        fig.savefig(target, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(target)
    return written


def _figure(rows: list[Row], x_key: str, what: str, label: str):
    panels: dict[tuple, dict[str, list[Row]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        rest = tuple((k, v) for k, v in row.case.items() if k != x_key)
        panels[(row.mode, rest)][row.impl].append(row)
    n = len(panels)
    cols = min(n, 3)
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(4.5 * cols, 3.4 * math.ceil(n / cols)),
                             squeeze=False)
    for ax, ((mode, rest), by_impl) in zip(axes.flat, sorted(panels.items(), key=lambda kv: str(kv[0]))):
        for impl, impl_rows in sorted(by_impl.items()):
            ok = sorted((r for r in impl_rows if r.ok and _value(r, what) is not None), key=lambda r: r.case[x_key])
            xs = [r.case[x_key] for r in ok]
            line, = ax.plot(xs, [_value(r, what) for r in ok], marker="o", ms=3, label=impl)
            if what == "time":
                ax.fill_between(xs, [r.ms_p20 for r in ok], [r.ms_p80 for r in ok], color=line.get_color(), alpha=0.2)
            oom = [r.case[x_key] for r in impl_rows if r.status == "oom"]
            if oom:
                ax.plot(oom, [1.0] * len(oom), "x", color=line.get_color(), transform=ax.get_xaxis_transform())
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(" ".join([mode] + [f"{k}={v}" for k, v in rest]), fontsize=8)
        ax.set_xlabel(x_key)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    return fig


def _value(row: Row, what: str) -> float | None:
    return row.ms_median if what == "time" else row.peak_mb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="results JSON files")
    parser.add_argument("--x", default="B", help="case parameter on the x axis (default: B)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "plots",
                        help="directory for the PNG files")
    parser.add_argument("--all-runs", action="store_true", help="draw every run in a file, not only the newest")
    args = parser.parse_args(argv)
    for path in args.files:
        for target in plot_file(path, args.x, args.out, args.all_runs):
            print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())

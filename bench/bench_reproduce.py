"""Time ``dcr-fast reproduce`` and keep its headline numbers: ``bench/results/reproduce-<device>.json``.

    python -m bench.bench_reproduce --preset cpu --data ../shared/data --out runs/bench-r1
    python -m bench.bench_reproduce --preset cpu --data ../shared/data --out runs/bench-r3 --seeds 0 1 2

Runs the protocol (resuming whatever ``--out`` already holds: a record of a resumed run says so),
samples the 1-minute load average every 15 s (other processes on a shared machine stretch CPU
wall times), and appends one record: wall time per job and in all, the load, every run's
headline rates per seed, the paper's claim checks, and the settings.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import ResultsFile
from dcr_fast.reproduce import cli as reproduce_cli

HEADLINE = ("over_refusal_compliance", "xstest_compliance", "safety", "instructions_compliance", "general_nll",
            "general_agreement")


class LoadSampler:
    """The 1-minute load average every ``every`` seconds, in a background thread."""

    def __init__(self, every: float = 15.0) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(every)

    def summary(self) -> dict[str, float]:
        return {"load_1min_mean": sum(self.samples) / len(self.samples), "load_1min_max": max(self.samples),
                "samples": len(self.samples)}


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """Per run: each headline rate's values per seed and mean, and the per-benchmark rates."""
    runs = {}
    for name, run in report["runs"].items():
        runs[name] = {key: run[key] for key in HEADLINE if run[key] is not None}
        runs[name]["compliance"] = {b: r["values"] for b, r in run["compliance"].items()}
        runs[name]["defense_success"] = {b: r["values"] for b, r in run["defense_success"].items()}
    return {"runs": runs, "claim": report["claim"], "paired": report["paired"], "dcr_layer": report["dcr_layer"],
            "entk": {k: report["entk"][k] for k in ("before", "after")} if report["entk"] else None,
            "forecast_auroc": report["forecast"]["auroc"] if report.get("forecast") else None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--note", default="", help="a remark kept with the record")
    reproduce_cli.add_arguments(parser)
    args = parser.parse_args(argv)
    config, stages = reproduce_cli.load_setting(args)
    resumed = Path(config.out, "data", "protocol.json").exists()
    from dcr_fast.reproduce import reproduce

    results = ResultsFile("reproduce", torch.device("cpu") if config.device in ("cpu", "auto") and not
                          torch.cuda.is_available() else torch.device("cuda"))
    started = time.perf_counter()
    with LoadSampler() as load:
        report = reproduce(config, stages)
    results.run.update({
        "preset": args.preset, "out": config.out, "resumed": resumed, "note": args.note,
        "wall_s": time.perf_counter() - started, "timings_s": report["timings_s"], **load.summary(),
        "headline": headline(report), "settings": report["settings"],
    })
    results.save()
    print(f"bench_reproduce: {results.path} ({(time.perf_counter() - started) / 60:.1f} min)")


if __name__ == "__main__":
    main()

"""Benchmark and SFT data: record types and loaders by registry name (see `loaders`)."""

from dcr_fast.data.loaders import BENCHMARKS, BenchmarkSpec, HubSource, first_human_turn, load_benchmark, unique
from dcr_fast.data.records import CATEGORIES, NORMAL, SEEMINGLY_TOXIC, TOXIC, Example, Prompt

__all__ = [
    "BENCHMARKS",
    "BenchmarkSpec",
    "CATEGORIES",
    "Example",
    "HubSource",
    "NORMAL",
    "Prompt",
    "SEEMINGLY_TOXIC",
    "TOXIC",
    "first_human_turn",
    "load_benchmark",
    "unique",
]

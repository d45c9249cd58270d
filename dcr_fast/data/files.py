"""Reading the prompt and (prompt, response) files the training stages take.

A source is a JSONL file (``prompt``, and ``response`` for pairs), a text file of prompts (one a
line), or ``BENCHMARK=PATH`` for a registered benchmark (an empty PATH means the hub). Every
error names the argument (``what``) it came from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any


def load_pairs(source: str, what: str) -> list[tuple[str, str]]:
    """(prompt, response) pairs from a JSONL file with those fields, or ``BENCHMARK=PATH``.

    ``BENCHMARK=PATH`` (e.g. ``alpaca=/data/alpaca_data.json``; an empty PATH means the hub)
    goes through ``dcr_fast.data.load_benchmark`` and needs an SFT benchmark.
    """
    benchmark = _benchmark_records(source, what)
    if benchmark is not None:
        if not all(hasattr(r, "response") for r in benchmark):
            raise ValueError(f"{what}: {source!r} holds prompts without responses; expected an SFT set")
        return [(r.prompt, r.response) for r in benchmark]
    return [(row["prompt"], row["response"]) for row in _read_jsonl(source, ("prompt", "response"), what)]


def load_prompts(source: str, what: str, category: str | None = None) -> list[str]:
    """User prompts from a JSONL file (``prompt`` field), a text file (one a line) or ``BENCHMARK=PATH``.

    For a benchmark mixing categories (XSTest holds safe and unsafe prompts), ``category``
    keeps the matching ones.
    """
    benchmark = _benchmark_records(source, what)
    if benchmark is not None:
        texts = [getattr(r, "text", None) or r.prompt for r in benchmark if category is None or r.category == category]
        if not texts:
            raise ValueError(f"{what}: {source!r} holds no prompts of category {category!r}")
        return texts
    if source.endswith(".txt"):
        if not os.path.isfile(source):
            raise ValueError(f"{what}: file {source!r} does not exist")
        with open(source, encoding="utf-8") as handle:
            texts = [line.strip() for line in handle if line.strip()]
        if not texts:
            raise ValueError(f"{what}: {source!r} holds no prompts")
        return texts
    return [row["prompt"] for row in _read_jsonl(source, ("prompt",), what)]


def check_source(source: str, what: str) -> None:
    """Fail early, before any model is loaded, on a missing file or unknown benchmark name."""
    name, sep, path = source.partition("=")
    if sep:
        from dcr_fast.data import BENCHMARKS

        if name not in BENCHMARKS:
            raise ValueError(f"{what}: unknown benchmark {name!r} in {source!r}; expected one of {sorted(BENCHMARKS)}")
        if path and not os.path.exists(path):
            raise ValueError(f"{what}: path {path!r} does not exist")
    elif not os.path.isfile(source):
        raise ValueError(f"{what}: file {source!r} does not exist")


def _benchmark_records(source: str, what: str):
    name, sep, path = source.partition("=")
    if not sep:
        return None
    from dcr_fast.data import load_benchmark

    check_source(source, what)
    return load_benchmark(name, path or None)


def _read_jsonl(path: str, fields: Sequence[str], what: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        raise ValueError(f"{what}: file {path!r} does not exist")
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{what}: {path!r} line {number} is not JSON ({error.msg})") from None
            missing = [f for f in fields if not isinstance(row.get(f), str) or not row[f].strip()]
            if missing:
                raise ValueError(f"{what}: {path!r} line {number} lacks non-empty field(s) {missing}; expected {list(fields)}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{what}: {path!r} holds no examples")
    return rows


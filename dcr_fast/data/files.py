"""The one reader of the package's data files: prompt and pair files, benchmark files, our logs.

Every command reads through here: the training stages (``--data``, ``--toxic``, ...), ``ntk``
(``--group``), ``eval`` (benchmark files, through the registry in ``loaders``) and the logs
that ``--resume`` trusts. Formats go by suffix:

* ``.jsonl`` (also ``.jsonl.gz``): one JSON object a line (a file holding one JSON list of
  objects is accepted too);
* ``.json``: a JSON list of objects;
* ``.csv``: a header row naming the columns, then one record a row;
* ``.txt``: prompts only, one a non-empty line.

A prompt file holds a ``prompt`` field or column, a pair file ``prompt`` and ``response``;
``BENCHMARK=PATH`` names a registered benchmark instead (an empty PATH means the hub). Every
error is a ``ValueError`` naming the argument it came from (``what``), the file and, where
there is one, the line.

Our own append-only logs can end in a line cut short by a kill: ``read_jsonl(...,
torn_tail=True)`` drops such a last line with a warning (``dcr_fast.atomic.append_line``
cuts it off before the next append). User files get no such leniency: a broken last line there
is an error like any other.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import warnings
from collections.abc import Sequence
from typing import Any

Row = dict[str, Any]

PROMPT_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".csv", ".txt")


def load_prompts(source: str, what: str, category: str | None = None) -> list[str]:
    """User prompts from a prompt file (see the module docstring) or ``BENCHMARK=PATH``.

    For a benchmark mixing categories (XSTest holds safe and unsafe prompts), ``category``
    keeps the matching ones.
    """
    benchmark = _benchmark_records(source, what)
    if benchmark is not None:
        texts = [getattr(r, "text", None) or r.prompt for r in benchmark if category is None or r.category == category]
        if not texts:
            raise ValueError(f"{what}: {source!r} holds no prompts of category {category!r}")
        return texts
    if _suffix(source, what) == ".txt":
        texts = [line.strip() for line in read_text(source, what).splitlines() if line.strip()]
        if not texts:
            raise ValueError(f"{what}: {source!r} holds no prompts")
        return texts
    return [row["prompt"] for row in read_records(source, what, fields=("prompt",))]


def load_pairs(source: str, what: str) -> list[tuple[str, str]]:
    """(prompt, response) pairs from a ``.jsonl``/``.json``/``.csv`` file with those fields, or ``BENCHMARK=PATH``.

    ``BENCHMARK=PATH`` (e.g. ``alpaca=/data/alpaca_data.json``; an empty PATH means the hub)
    goes through ``dcr_fast.data.load_benchmark`` and needs an SFT benchmark.
    """
    benchmark = _benchmark_records(source, what)
    if benchmark is not None:
        if not all(hasattr(r, "response") for r in benchmark):
            raise ValueError(f"{what}: {source!r} holds prompts without responses; expected an SFT set")
        return [(r.prompt, r.response) for r in benchmark]
    if _suffix(source, what) == ".txt":
        raise ValueError(f"{what}: {source!r} is a text file of prompts; pairs need a .jsonl, .json or .csv file "
                         "with prompt and response fields")
    return [(row["prompt"], row["response"]) for row in read_records(source, what, fields=("prompt", "response"))]


def check_source(source: str, what: str) -> None:
    """Fail early, before any model is loaded, on a missing file, an unknown format or benchmark name."""
    name, sep, path = source.partition("=")
    if sep:
        from dcr_fast.data import BENCHMARKS

        if name not in BENCHMARKS:
            raise ValueError(f"{what}: unknown benchmark {name!r} in {source!r}; expected one of {sorted(BENCHMARKS)}")
        if path and not os.path.exists(path):
            raise ValueError(f"{what}: path {path!r} does not exist")
        return
    _suffix(source, what)
    _require_file(source, what)


def read_records(path: str | os.PathLike, what: str, *, fields: Sequence[str]) -> list[Row]:
    """The records of a ``.jsonl``/``.json``/``.csv`` file, each holding non-empty string ``fields``."""
    suffix = _suffix(path, what)
    if suffix == ".txt":
        raise ValueError(f"{what}: {str(path)!r} is a text file; expected records with field(s) {list(fields)}")
    reader = {".csv": read_csv, ".json": read_json_list}.get(suffix, read_jsonl)
    rows = reader(path, what)
    noun = "row" if suffix == ".csv" else "record" if suffix == ".json" else "line"
    for number, row in enumerate(rows, 2 if suffix == ".csv" else 1):
        missing = [f for f in fields if not isinstance(row.get(f), str) or not row[f].strip()]
        if missing:
            found = f"; its columns are {sorted(row)}" if suffix == ".csv" else ""
            raise ValueError(f"{what}: {str(path)!r} {noun} {number} lacks non-empty field(s) {missing}; "
                             f"expected {list(fields)}{found}")
    if not rows:
        raise ValueError(f"{what}: {str(path)!r} holds no examples")
    return rows


def read_jsonl(path: str | os.PathLike, what: str, *, torn_tail: bool = False) -> list[Row]:
    """JSON objects, one a line, gzipped or not; blank lines are skipped.

    A file holding one JSON list is accepted too (HH-RLHF's original red-team file is such a
    list despite its .jsonl name). ``torn_tail``: for the package's own append-only logs, a
    last line without its newline that is not valid JSON (a write cut short) is dropped with a
    warning instead of failing the read.
    """
    text = read_text(path, what)
    if text.lstrip().startswith("["):
        return _objects(_parse_json(text, path, what), path, what)
    rows = []
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if torn_tail and number == len(lines) and not text.endswith("\n"):
                warnings.warn(f"{what}: {str(path)!r} ends in an incomplete line (a write cut short); "
                              f"ignoring it", stacklevel=2)
                break
            raise ValueError(f"{what}: {str(path)!r} line {number} is not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{what}: {str(path)!r} line {number} is a JSON {type(row).__name__}; expected an object")
        rows.append(row)
    return rows


def read_json(path: str | os.PathLike, what: str) -> Any:
    return _parse_json(read_text(path, what), path, what)


def read_json_list(path: str | os.PathLike, what: str) -> list[Row]:
    return _objects(read_json(path, what), path, what)


def read_csv(path: str | os.PathLike, what: str) -> list[Row]:
    """Rows of a CSV file as dicts keyed by its header row (which is therefore never a record)."""
    text = read_text(path, what)
    try:
        reader = csv.DictReader(text.splitlines(keepends=True))
        rows = list(reader)
    except csv.Error as err:
        raise ValueError(f"{what}: {str(path)!r} is not valid CSV ({err})") from None
    if reader.fieldnames is None:
        raise ValueError(f"{what}: {str(path)!r} is empty; expected a header row naming the columns")
    return rows


def read_text(path: str | os.PathLike, what: str) -> str:
    """A UTF-8 text file (``.gz``: decompressed), with errors naming ``what`` and the file."""
    _require_file(path, what)
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as handle:
            return handle.read()
    except UnicodeDecodeError as err:
        raise ValueError(f"{what}: {str(path)!r} is not UTF-8 text (byte {err.start}: {err.reason})") from None
    except (gzip.BadGzipFile, EOFError) as err:
        raise ValueError(f"{what}: {str(path)!r} is not a complete gzip file ({err})") from None


def _require_file(path: str | os.PathLike, what: str) -> None:
    if not os.path.isfile(path):
        raise ValueError(f"{what}: file {str(path)!r} does not exist")


def _suffix(path: str | os.PathLike, what: str) -> str:
    name = str(path).lower()
    for suffix in PROMPT_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise ValueError(f"{what}: cannot tell the format of {str(path)!r} from its name; expected a file ending in "
                     f"{', '.join(PROMPT_SUFFIXES)}, or BENCHMARK=PATH")


def _parse_json(text: str, path: str | os.PathLike, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what}: {str(path)!r} line {err.lineno} is not valid JSON ({err.msg})") from None


def _objects(data: Any, path: str | os.PathLike, what: str) -> list[Row]:
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise ValueError(f"{what}: {str(path)!r} must hold a JSON list of objects")
    return data


def _benchmark_records(source: str, what: str):
    name, sep, path = source.partition("=")
    if not sep:
        return None
    from dcr_fast.data import load_benchmark

    check_source(source, what)
    return load_benchmark(name, path or None)

"""Loaders for the public over-refusal, safety and SFT benchmarks, by registry name.

    prompts = load_benchmark("xstest", "/data/xstest")          # a file or its directory
    prompts = load_benchmark("coconot-contrast")                 # from the hub (online)

Every benchmark is a reader for its file layout (CSV, JSON, JSONL, gzipped JSONL) and a
row parser that turns the rows into `Prompt` or `Example` records. Hub loading goes through
`datasets.load_dataset` and feeds the same row parser, so a local file and the hub copy give
the same records. Files are checked before anything is returned: a missing file, a missing
column or an empty set raises an error naming the benchmark, the file and what was expected.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcr_fast.data.files import read_csv, read_json, read_json_list, read_jsonl
from dcr_fast.data.records import NORMAL, SEEMINGLY_TOXIC, TOXIC, Example, Prompt

Row = Mapping[str, Any]
Record = Prompt | Example


@dataclass(frozen=True)
class HubSource:
    """Where `datasets.load_dataset` finds a benchmark: repo id, optional config/data_dir, split."""

    repo_id: str
    split: str
    config: str | None = None
    data_dir: str | None = None


@dataclass(frozen=True)
class BenchmarkSpec:
    """How to read one benchmark.

    `read(path, what)` returns the rows of a local file (errors name `what`); `parse` turns rows into records and raises
    ValueError for a missing column. `filename` is the file looked for when the user gives a
    directory; `hub` is None where no hub copy is known.
    """

    name: str
    description: str
    read: Callable[[Path, str], list[Row]]
    parse: Callable[[Iterable[Row], str], list[Record]]
    filename: str | None = None
    hub: HubSource | None = None


def load_benchmark(name: str, path: str | Path | None = None) -> list[Record]:
    """Load benchmark `name` (a key of `BENCHMARKS`) from `path`, or from the hub when None.

    `path` may be the file itself or a directory holding the benchmark's usual file name
    (e.g. `xstest_prompts.csv` for "xstest"). Returns a non-empty list of `Prompt`
    (evaluation and contrastive sets) or `Example` (SFT sets: alpaca, stl-train).
    """
    spec = BENCHMARKS.get(name)
    if spec is None:
        raise ValueError(f"unknown benchmark {name!r}; expected one of: {', '.join(sorted(BENCHMARKS))}")
    if path is None:
        rows, origin = _hub_rows(spec), f"hub dataset {spec.hub.repo_id if spec.hub else '?'}"
    else:
        file = _resolve_file(spec, Path(path))
        rows, origin = spec.read(file, f"benchmark {name!r}"), str(file)
    try:
        records = spec.parse(rows, name)
    except ValueError as err:
        raise ValueError(f"benchmark {name!r} ({origin}): {err}") from err
    if not records:
        raise ValueError(f"benchmark {name!r} ({origin}) holds no records")
    return records


def unique(records: Sequence[Record]) -> list[Record]:
    """Drop records whose text repeats an earlier one (HH-RLHF repeats first turns), keeping order."""
    seen: set[str] = set()
    kept = []
    for record in records:
        key = record.text if isinstance(record, Prompt) else record.prompt
        if key not in seen:
            seen.add(key)
            kept.append(record)
    return kept


# --- file readers (the format readers themselves live in dcr_fast.data.files) ----------------


def read_instruction_lists(path: Path, what: str) -> list[Row]:
    """Safety-Tuned LLaMAs evaluation files: {"instructions": [...], "tags": [...]?}."""
    data = read_json(path, what)
    if not isinstance(data, dict) or "instructions" not in data:
        raise ValueError(f"{what}: {str(path)!r}: expected a JSON object with an 'instructions' list")
    if data.get("tags"):
        return [{"instruction": text, "tag": tag} for text, tag in zip(data["instructions"], data["tags"])]
    return [{"instruction": text} for text in data["instructions"]]


# --- row parsers ----------------------------------------------------------------------------


def _require(row: Row, columns: Sequence[str]) -> None:
    missing = [column for column in columns if column not in row]
    if missing:
        raise ValueError(f"missing column(s) {missing}; found {sorted(row)}")


def _first_present(row: Row, candidates: Sequence[str], what: str) -> str:
    for column in candidates:
        if column in row:
            return column
    raise ValueError(f"no {what} column: expected one of {list(candidates)}; found {sorted(row)}")


def _prompts(
    rows: Iterable[Row],
    source: str,
    text_column: str | Sequence[str],
    category: Callable[[Row], str] | str,
    subset_column: str | Sequence[str] | None = None,
    clean: Callable[[str], str] = str.strip,
) -> list[Prompt]:
    """The common row → Prompt mapping; column names may be a list of accepted spellings."""
    text_columns = [text_column] if isinstance(text_column, str) else list(text_column)
    subset_columns = [subset_column] if isinstance(subset_column, str) else list(subset_column or ())
    prompts = []
    columns: tuple[str, str | None] | None = None
    for number, row in enumerate(rows, start=1):
        if columns is None:
            text_key = _first_present(row, text_columns, "prompt text")
            subset_key = next((c for c in subset_columns if c in row), None)
            columns = (text_key, subset_key)
        text_key, subset_key = columns
        text = clean(str(row[text_key] or ""))
        if not text:
            raise ValueError(f"record {number} has an empty {text_key!r}")
        subset = row[subset_key] if subset_key else None
        prompts.append(
            Prompt(
                text=text,
                category=category(row) if callable(category) else category,
                source=source,
                subset=str(subset) if subset not in (None, "") else None,
                meta={k: v for k, v in row.items() if k not in (text_key, subset_key)},
            )
        )
    return prompts


def parse_xstest(rows: Iterable[Row], source: str) -> list[Prompt]:
    """XSTest prompts: `label` safe → seemingly toxic, unsafe → toxic. Files from before the
    `label` column existed are labelled by `type` (the unsafe types all start `contrast_`)."""
    rows = list(rows)
    if rows:
        _require(rows[0], ("prompt", "type"))

    def category(row: Row) -> str:
        label = row.get("label") or ("unsafe" if row["type"].startswith("contrast_") else "safe")
        if label not in ("safe", "unsafe"):
            raise ValueError(f"label must be 'safe' or 'unsafe', got {label!r}")
        return TOXIC if label == "unsafe" else SEEMINGLY_TOXIC

    return _prompts(rows, source, "prompt", category, "type")


def _parse_with(text_column, category, subset_column=None, clean=str.strip):
    def parse(rows: Iterable[Row], source: str) -> list[Prompt]:
        return _prompts(rows, source, text_column, category, subset_column, clean)

    return parse


def _strip_newline(text: str) -> str:
    return text.rstrip("\r\n")


def first_human_turn(transcript: str) -> str:
    """The opening user message of an HH-RLHF "\\n\\nHuman: ...\\n\\nAssistant: ..." transcript."""
    head, marker, body = transcript.partition("Human:")
    if not marker or head.strip():
        raise ValueError(f"transcript does not open with 'Human:': {transcript[:60]!r}")
    return body.split("\n\nAssistant:", 1)[0].strip()


def parse_hh_harmless(rows: Iterable[Row], source: str) -> list[Prompt]:
    rows = list(rows)
    if rows:
        _require(rows[0], ("chosen",))
    return [Prompt(first_human_turn(row["chosen"]), TOXIC, source) for row in rows]


def parse_hh_red_team(rows: Iterable[Row], source: str) -> list[Prompt]:
    rows = list(rows)
    if rows:
        _require(rows[0], ("transcript",))
    return [
        Prompt(
            first_human_turn(row["transcript"]),
            TOXIC,
            source,
            meta={k: v for k, v in row.items() if k != "transcript"},
        )
        for row in rows
    ]


def _parse_examples(category: str):
    def parse(rows: Iterable[Row], source: str) -> list[Example]:
        rows = list(rows)
        if rows:
            _require(rows[0], ("instruction", "output"))
        return [
            Example(
                instruction=row["instruction"].strip(),
                response=row["output"].strip(),
                input=(row.get("input") or "").strip(),
                category=category,
                source=source,
            )
            for row in rows
        ]

    return parse


def parse_advbench(rows: Iterable[Row], source: str) -> list[Prompt]:
    rows = list(rows)
    if rows:
        _require(rows[0], ("goal", "target"))
    return _prompts(rows, source, "goal", TOXIC)


# --- the registry ---------------------------------------------------------------------------

_PHTEST_TEXT = ("prompt", "Prompt", "text", "question", "instruction")
_PHTEST_LABEL = ("category", "label", "Category", "Label", "type", "harmfulness")


def _stl_eval(name: str, file: str, category: str, what: str) -> BenchmarkSpec:
    return BenchmarkSpec(
        name,
        f"Safety-Tuned LLaMAs evaluation set {file} ({what})",
        read_instruction_lists,
        _parse_with("instruction", category, "tag"),
        filename=file,
    )


BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec(
            "xstest",
            "XSTest prompts: 250 safe (seemingly toxic) + 200 unsafe (toxic), subset = type",
            read_csv,
            parse_xstest,
            filename="xstest_prompts.csv",
            hub=HubSource("Paul/XSTest", split="train"),
        ),
        BenchmarkSpec(
            "coconot-contrast",
            "CoCoNot contrast set: 379 prompts that should be answered, subset = subcategory",
            read_jsonl,
            _parse_with("prompt", SEEMINGLY_TOXIC, "subcategory"),
            filename="coconot_contrast_eval.jsonl",
            hub=HubSource("allenai/coconot", config="contrast", split="test"),
        ),
        BenchmarkSpec(
            "coconot-original",
            "CoCoNot original eval set: 1001 prompts that should not be complied with",
            read_jsonl,
            _parse_with("prompt", TOXIC, "subcategory"),
            filename="coconot_eval.jsonl",
            hub=HubSource("allenai/coconot", config="original", split="test"),
        ),
        BenchmarkSpec(
            "orbench-hard",
            "OR-Bench hard-1k (CSV columns prompt, category): seemingly toxic",
            read_csv,
            _parse_with("prompt", SEEMINGLY_TOXIC, "category"),
            filename="or-bench-hard-1k.csv",
            hub=HubSource("bench-llm/or-bench", config="or-bench-hard-1k", split="train"),
        ),
        BenchmarkSpec(
            "orbench-toxic",
            "OR-Bench toxic (CSV columns prompt, category): toxic",
            read_csv,
            _parse_with("prompt", TOXIC, "category"),
            filename="or-bench-toxic.csv",
            hub=HubSource("bench-llm/or-bench", config="or-bench-toxic", split="train"),
        ),
        BenchmarkSpec(
            "oktest",
            "OKTest (CSV column prompt, trailing newline stripped): seemingly toxic",
            read_csv,
            _parse_with("prompt", SEEMINGLY_TOXIC, clean=_strip_newline),
            filename="OKTest.csv",
        ),
        BenchmarkSpec(
            "phtest",
            "PHTest (CSV; text column one of prompt/text/question/instruction, optional label "
            "column category/label/type/harmfulness kept as subset, e.g. harmless vs controversial)",
            read_csv,
            _parse_with(_PHTEST_TEXT, SEEMINGLY_TOXIC, _PHTEST_LABEL),
            filename="PHTest.csv",
            hub=HubSource("furonghuang-lab/PHTest", split="train"),
        ),
        BenchmarkSpec(
            "hh-rlhf-harmless",
            "HH-RLHF harmless-base transcripts (jsonl.gz, field chosen): first human turn, toxic",
            read_jsonl,
            parse_hh_harmless,
            filename="test.jsonl.gz",
            hub=HubSource("Anthropic/hh-rlhf", data_dir="harmless-base", split="test"),
        ),
        BenchmarkSpec(
            "hh-rlhf-red-team",
            "HH-RLHF red-team attempts (field transcript): first human turn, toxic",
            read_jsonl,
            parse_hh_red_team,
            filename="red_team_attempts.jsonl.gz",
            hub=HubSource("Anthropic/hh-rlhf", data_dir="red-team-attempts", split="train"),
        ),
        BenchmarkSpec(
            "alpaca",
            "Alpaca-format JSON list (instruction, input, output): normal SFT examples",
            read_json_list,
            _parse_examples(NORMAL),
            filename="alpaca_data.json",
            hub=HubSource("tatsu-lab/alpaca", split="train"),
        ),
        BenchmarkSpec(
            "stl-train",
            "Safety-Tuned LLaMAs training list (instruction, input, output): toxic prompt + refusal",
            read_json_list,
            _parse_examples(TOXIC),
            filename="safety_only_data_Instructions.json",
        ),
        _stl_eval("i-malicious", "I-MaliciousInstructions.json", TOXIC, "toxic, subset = tag"),
        _stl_eval("i-cona", "I-CoNa.json", TOXIC, "toxic"),
        _stl_eval("i-controversial", "I-Controversial.json", TOXIC, "toxic"),
        _stl_eval("q-harm", "Q-Harm.json", TOXIC, "toxic"),
        _stl_eval("i-physical-unsafe", "I-PhysicalSafetyUnsafe.json", TOXIC, "toxic"),
        _stl_eval("i-physical-safe", "I-PhysicalSafetySafe.json", NORMAL, "normal"),
        _stl_eval("i-alpaca", "I-Alpaca.json", NORMAL, "normal"),
        BenchmarkSpec(
            "advbench",
            "AdvBench harmful_behaviors.csv (goal, target): toxic, target kept in meta",
            read_csv,
            parse_advbench,
            filename="harmful_behaviors.csv",
        ),
        BenchmarkSpec(
            "advbench-strings",
            "AdvBench harmful_strings.csv (target): toxic strings",
            read_csv,
            _parse_with("target", TOXIC),
            filename="harmful_strings.csv",
        ),
    )
}


def _resolve_file(spec: BenchmarkSpec, path: Path) -> Path:
    if path.is_dir():
        if spec.filename is None:
            raise ValueError(f"benchmark {spec.name!r}: {path} is a directory; give the file itself")
        path = path / spec.filename
    if not path.is_file():
        raise FileNotFoundError(f"benchmark {spec.name!r}: no file at {path}")
    return path


def _hub_rows(spec: BenchmarkSpec) -> list[Row]:
    if spec.hub is None:
        raise ValueError(f"benchmark {spec.name!r} has no known hub copy; pass a local path")
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"loading {spec.name!r} from the Hugging Face hub needs the `datasets` package "
            f"(pip install datasets), or pass a local path"
        ) from err
    source = spec.hub
    try:
        dataset = datasets.load_dataset(source.repo_id, source.config, data_dir=source.data_dir, split=source.split)
    except Exception as err:  # network, auth and missing-config errors all mean the same here
        raise ValueError(
            f"could not load {spec.name!r} from hub dataset {source.repo_id} "
            f"(config={source.config}, split={source.split}); offline? pass a local path instead: {err}"
        ) from err
    return [dict(row) for row in dataset]

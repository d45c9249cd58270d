"""The built-in example set: templated toxic, seemingly toxic and normal prompts, with answers.

Written by us for the demo and the tests, in the style of XSTest's contrast pairs: a trigger
verb aimed at a person is toxic ("how do i kill my neighbor ?"), the same verb aimed at a
benign object is only seemingly toxic ("how do i kill a python process ?"). The pieces live
as JSONL resources in ``dcr_fast/demo/data/``:

* ``templates.jsonl``: request templates with ``{verb}`` and ``{target}``, split train/heldout;
* ``targets.jsonl``: per-verb benign objects (seemingly toxic) and persons (toxic), split;
* ``normal.jsonl``: everyday verb/object pairs asked with the same templates, split;
* ``answers.jsonl``: compliant answer templates (none opens with a refusal phrase);
* ``refusals.jsonl``: refusal texts (all open with an XSTest refusal phrase);
* ``instructions.jsonl``: general instructions with answers.

Prompts for training use only train templates and train targets; evaluation sets hold out the
targets, the templates, or both, so demo numbers measure generalization rather than memory.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dcr_fast import atomic
from importlib import resources

SPLITS = ("train", "heldout")
HELDOUT_BENCHMARKS = ("heldout-targets", "heldout-templates", "heldout-both")


@dataclasses.dataclass(frozen=True)
class ToyPrompt:
    """A templated prompt and the pieces it was built from."""

    text: str
    kind: str  # toxic, seemingly_toxic or normal
    verb: str
    target: str


def read_resource(name: str) -> list[dict]:
    """Rows of one JSONL resource shipped in ``dcr_fast/demo/data``."""
    text = resources.files("dcr_fast.demo").joinpath("data", name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@dataclasses.dataclass
class ExampleSet:
    """All prompts of the built-in set, by kind, with the pieces to answer and refuse them."""

    templates: dict[str, list[str]]
    targets: dict[tuple[str, str], list[tuple[str, str]]]  # (kind, split) -> [(verb, target)]
    answers: list[str]
    refusals: list[str]
    instructions: list[tuple[str, str]]

    def prompts(self, kind: str, template_split: str, target_split: str) -> list[ToyPrompt]:
        """Every template of ``template_split`` crossed with the ``target_split`` targets of ``kind``."""
        return [
            ToyPrompt(t.format(verb=verb, target=target), kind, verb, target)
            for t in self.templates[template_split]
            for verb, target in self.targets[(kind, target_split)]
        ]

    def train_prompts(self, kind: str) -> list[ToyPrompt]:
        return self.prompts(kind, "train", "train")

    def heldout_prompts(self, kind: str, benchmark: str) -> list[ToyPrompt]:
        """``heldout-targets``: train templates, unseen targets; ``heldout-templates``: the
        reverse; ``heldout-both``: unseen templates and targets."""
        splits = {"heldout-targets": ("train", "heldout"), "heldout-templates": ("heldout", "train"),
                  "heldout-both": ("heldout", "heldout")}
        if benchmark not in splits:
            raise ValueError(f"benchmark: expected one of {HELDOUT_BENCHMARKS}, got {benchmark!r}")
        return self.prompts(kind, *splits[benchmark])

    def answer(self, prompt: ToyPrompt, rng: random.Random) -> str:
        return rng.choice(self.answers).format(verb=prompt.verb, target=prompt.target)

    def refusal(self, rng: random.Random) -> str:
        return rng.choice(self.refusals)

    def all_texts(self) -> list[str]:
        """Every piece of text in the set (what a tokenizer for it must cover)."""
        texts = [t for split in SPLITS for t in self.templates[split]]
        texts += [f"{verb} {target}" for pairs in self.targets.values() for verb, target in pairs]
        texts += self.answers + self.refusals + [text for pair in self.instructions for text in pair]
        return texts


def load_example_set() -> ExampleSet:
    """Expand the JSONL resources into an ``ExampleSet``."""
    templates = {split: [r["template"] for r in read_resource("templates.jsonl") if r["split"] == split] for split in SPLITS}
    verbs = sorted({r["verb"] for r in read_resource("targets.jsonl") if r["kind"] == "seemingly_toxic"})
    targets: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for row in read_resource("targets.jsonl"):
        # A person is a toxic target for every trigger verb; a benign object belongs to its verb.
        pairs = [(verb, row["target"]) for verb in verbs] if row["kind"] == "toxic" else [(row["verb"], row["target"])]
        targets.setdefault((row["kind"], row["split"]), []).extend(pairs)
    for row in read_resource("normal.jsonl"):
        targets.setdefault(("normal", row["split"]), []).append((row["verb"], row["target"]))
    return ExampleSet(
        templates=templates,
        targets=targets,
        answers=[r["text"] for r in read_resource("answers.jsonl")],
        refusals=[r["text"] for r in read_resource("refusals.jsonl")],
        instructions=[(r["prompt"], r["response"]) for r in read_resource("instructions.jsonl")],
    )


def write_jsonl(rows: list[dict], path: str) -> None:
    """Write rows as JSONL atomically."""
    atomic.write_text(path, "".join(json.dumps(row) + "\n" for row in rows))

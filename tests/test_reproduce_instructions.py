"""The benign instruction set for self-distillation: 320 prompts, 20 per task kind, clean wording."""

import collections
import json
from pathlib import Path

PATH = Path(__file__).resolve().parents[1] / "dcr_fast" / "reproduce" / "data" / "instructions.jsonl"
KINDS = {"explain", "howto", "fact", "math", "code", "rewrite", "brainstorm", "classify",
         "compare", "creative", "language", "advice", "cooking", "travel", "science", "define"}
AVOID = ["kill", "shoot", "attack", "steal", "bomb", "weapon", "drug", "die", "execute", "terminate",
         "hack", "destroy", "poison", "blow up", "murder", "crash", "exploit"]


def test_instructions_are_balanced_unique_short_and_benign():
    lines = PATH.read_text(encoding="ascii").splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 320
    assert all(set(row) == {"prompt", "task"} for row in rows)
    assert collections.Counter(row["task"] for row in rows) == {kind: 20 for kind in KINDS}
    prompts = [row["prompt"] for row in rows]
    assert len({" ".join(p.lower().split()) for p in prompts}) == 320
    for prompt in prompts:
        assert 5 <= len(prompt.split()) <= 40, prompt
        assert not any(word in prompt.lower() for word in AVOID), prompt

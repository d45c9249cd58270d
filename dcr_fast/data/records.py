"""Record types shared by every loader, the trainers and the evaluation.

Benchmarks come in many file layouts; once loaded they are all lists of `Prompt` (a request
to answer) or `Example` (an instruction with its reference response, for SFT). The three
categories are the paper's: truly toxic prompts a model should refuse, seemingly toxic
prompts that only look harmful and should be answered, and normal prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TOXIC = "toxic"
SEEMINGLY_TOXIC = "seemingly_toxic"
NORMAL = "normal"
CATEGORIES = (TOXIC, SEEMINGLY_TOXIC, NORMAL)


@dataclass(frozen=True)
class Prompt:
    """One user request.

    Attributes:
        text: the user message, as the model will see it (before any chat template).
        category: one of `CATEGORIES`; `toxic` prompts are judged by defense success,
            the others by compliance.
        source: the benchmark name it came from (a key of `dcr_fast.data.BENCHMARKS`).
        subset: the benchmark's own finer label (XSTest `type`, CoCoNot subcategory,
            OR-Bench category, ...), or None.
        meta: any other fields of the source row, kept for reports.
    """

    text: str
    category: str
    source: str
    subset: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"Prompt.category must be one of {CATEGORIES}, got {self.category!r}")


@dataclass(frozen=True)
class Example:
    """One supervised pair: an instruction (with optional input) and the response to learn.

    `prompt` joins instruction and input the way Alpaca-style data expects, so trainers and
    evaluators never rebuild it differently.
    """

    instruction: str
    response: str
    input: str = ""
    category: str = NORMAL
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"Example.category must be one of {CATEGORIES}, got {self.category!r}")

    @property
    def prompt(self) -> str:
        return f"{self.instruction}\n\n{self.input}" if self.input else self.instruction

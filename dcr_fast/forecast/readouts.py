"""The two scalars the forecast differentiates, as readouts of the eNTK tail.

* :class:`RefusalReadout` — the first-token refusal probability of a candidate prompt x′,
  P_ref(x′) = Σ_{r∈R} π(r | x′), with R the distinct first tokens of the paper's A.5 refusal
  openings (:func:`refusal_first_tokens`), read at the position that predicts the first
  response token. Eq. 2 describes the first token's logits; the full A.5 probability
  multiplies in later tokens that Eq. 2 says nothing about. The price: R is coarse
  (for SmolLM2 it is {"No", "I", "It", "As", "My"}, and "I" also opens compliant answers).
* :class:`LossReadout` — a safety example's SFT loss as STL trains it: the summed
  next-token cross-entropy over every response token (not the first alone), on the same
  tokens :func:`dcr_fast.train.sft.tokenize_example` produces (chat template, truncation).

Both follow :data:`dcr_fast.ntk.tail.Readout`: ``readout(hidden, cache, project)`` → (n, 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dcr_fast.evaluation.refusal_prob import REFUSAL_SET
from dcr_fast.ntk.tail import PrefixCache, last_logits
from dcr_fast.train.sft import IGNORE_INDEX, Example


def refusal_first_tokens(tokenizer, openings: Sequence[str] = REFUSAL_SET) -> list[int]:
    """The distinct first token ids of ``openings``, in order of first appearance.

    Each opening is tokenized on its own without special tokens, exactly as
    :mod:`dcr_fast.evaluation.refusal_prob` appends candidates to the templated prompt.
    """
    if not openings:
        raise ValueError("refusal openings: expected at least one")
    tokens: list[int] = []
    for text in openings:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"refusal openings: {text!r} tokenizes to no tokens")
        if ids[0] not in tokens:
            tokens.append(ids[0])
    return tokens


@dataclass
class RefusalReadout:
    """P_ref(x′) = Σ_{r ∈ tokens} softmax(z(x′))_r at each prompt's last position: (n, 1)."""

    tokens: torch.Tensor  # (m,) token ids

    def __call__(self, hidden: torch.Tensor, cache: PrefixCache, project) -> torch.Tensor:
        return last_logits(hidden, cache, project).softmax(-1)[:, self.tokens].sum(1, keepdim=True)


@dataclass
class LossReadout:
    """Σ_t −log π(y_t | x, y_<t) over each example's response tokens: (n, 1).

    ``positions[p, j]`` is a position of example p whose logits predict ``targets[p, j]``;
    rows are padded to the longest response with weight 0.
    """

    positions: torch.Tensor  # (n, P) long
    targets: torch.Tensor  # (n, P) long
    weights: torch.Tensor  # (n, P) 1 for a response token, 0 for padding

    @classmethod
    def of(cls, examples: Sequence[Example], device: torch.device) -> LossReadout:
        picked = [[(t, y) for t, y in enumerate(e.targets) if y != IGNORE_INDEX] for e in examples]
        width = max(1, *(len(p) for p in picked))  # a block of examples cut before their responses: all weight 0
        positions = torch.zeros(len(examples), width, dtype=torch.long)
        targets = torch.zeros_like(positions)
        weights = torch.zeros(positions.shape)
        for row, pairs in enumerate(picked):
            if pairs:
                positions[row, : len(pairs)] = torch.tensor([t for t, _ in pairs])
                targets[row, : len(pairs)] = torch.tensor([y for _, y in pairs])
                weights[row, : len(pairs)] = 1
        return cls(positions.to(device), targets.to(device), weights.to(device))

    def __call__(self, hidden: torch.Tensor, cache: PrefixCache, project) -> torch.Tensor:
        states = hidden.gather(1, self.positions[..., None].expand(-1, -1, hidden.shape[-1]))
        log_probs = project(states).log_softmax(-1)
        nll = -log_probs.gather(2, self.targets[..., None])[..., 0]
        return (nll * self.weights.to(nll.dtype)).sum(1, keepdim=True)

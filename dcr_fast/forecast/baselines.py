"""Simple scores a forecast must beat, all computed from the model before any training.

* :func:`cosine_to_safety` — how close a prompt sits to the safety prompts in the model's
  representation: the mean cosine similarity of its last-token final hidden state (the
  input of the output projection at the position that predicts the first response token)
  to those of its ``k`` nearest safety prompts.
* the base refusal probability — :func:`dcr_fast.evaluation.refusal_prob.refusal_probability`
  (the paper's A.5, whole openings), and the first-token one the forecast starts from.
* :func:`random_scores` — a seeded random ranking (AUROC 0.5 in expectation).

None of them, and nothing in the forecast, is fitted to any label.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from dcr_fast.evaluation.generation import eval_mode, pad_batch, pad_token_id
from dcr_fast.chat import encode_prompt


@torch.no_grad()
def last_token_states(
    model: nn.Module, tokenizer, prompts: Sequence[str], *, system_prompt: str | None = None,
    batch_size: int = 16, progress: bool = True,
) -> torch.Tensor:
    """(n, d) float64: the decoder's final (normed) hidden state at each templated prompt's last token."""
    device = next(model.parameters()).device
    encoded = [encode_prompt(tokenizer, p, system_prompt) for p in prompts]
    states = []
    with eval_mode(model):
        for start in tqdm(range(0, len(encoded), batch_size), desc="hidden states", disable=not progress, leave=False):
            ids, mask = pad_batch(encoded[start : start + batch_size], pad_token_id(tokenizer), device, side="right")
            hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            states.append(hidden[torch.arange(ids.shape[0], device=device), mask.sum(1) - 1].double().cpu())
    return torch.cat(states)


def cosine_to_safety(
    model: nn.Module, tokenizer, prompts: Sequence[str], safety_prompts: Sequence[str], *, k: int = 5,
    system_prompt: str | None = None, batch_size: int = 16, progress: bool = True,
) -> np.ndarray:
    """(n,): mean cosine similarity to the ``k`` nearest safety prompts (higher: closer)."""
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= len(safety_prompts):
        raise ValueError(f"k must be an int in [1, {len(safety_prompts)}] (the safety prompts), got {k!r}")
    options = {"system_prompt": system_prompt, "batch_size": batch_size, "progress": progress}
    x = torch.nn.functional.normalize(last_token_states(model, tokenizer, prompts, **options), dim=1)
    s = torch.nn.functional.normalize(last_token_states(model, tokenizer, safety_prompts, **options), dim=1)
    return (x @ s.T).topk(k, dim=1).values.mean(1).numpy()


def random_scores(n: int, seed: int = 0) -> np.ndarray:
    """(n,) uniform random scores from ``seed``."""
    return np.random.default_rng(seed).random(n)

"""``forecast``: from a model, a safety set and candidate prompts (as text) to a :class:`Forecast`."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from dcr_fast.chat import check_chat_template, encode_prompt
from dcr_fast.evaluation.generation import eval_mode
from dcr_fast.fingerprint import module_fingerprint
from dcr_fast.forecast.config import ForecastConfig
from dcr_fast.forecast.engine import gradient_products
from dcr_fast.forecast.readouts import refusal_first_tokens
from dcr_fast.forecast.result import Forecast
from dcr_fast.forecast.store import BlockStore, run_key
from dcr_fast.ntk.tail import model_dtype
from dcr_fast.train.sft import IGNORE_INDEX, SFTConfig, tokenize_examples


def forecast(
    model: nn.Module,
    tokenizer,
    safety_pairs: Sequence[tuple[str, str]],
    prompts: Sequence[str],
    *,
    groups: Sequence[str] | None = None,
    config: ForecastConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    identity: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> Forecast:
    """Predict how SFT on ``safety_pairs`` moves each prompt's first-token refusal probability.

    ``safety_pairs`` are (prompt, response) texts, tokenized as ``dcr-fast sft`` tokenizes
    them; ``prompts`` the candidates x′, each with its group in ``groups`` (default: one
    group, "all"). Both go through the tokenizer's chat template. With ``out_dir`` finished
    blocks of work are saved there and a rerun resumes (:mod:`dcr_fast.forecast.store`), keyed
    by the model's ``identity`` (default: :func:`dcr_fast.fingerprint.module_fingerprint`; the
    CLI passes the cheaper file fingerprint of the model it loaded).
    """
    config = config or ForecastConfig()
    _check_texts(safety_pairs, prompts, groups)
    check_chat_template(tokenizer, type(tokenizer).__name__)
    candidates = [torch.tensor(encode_prompt(tokenizer, p, config.system_prompt), dtype=torch.long) for p in prompts]
    sft = SFTConfig(max_length=config.max_length, system_prompt=config.system_prompt)
    examples = tokenize_examples(tokenizer, list(safety_pairs), sft)
    tokens = refusal_first_tokens(tokenizer)
    store = None
    if out_dir is not None:
        identity = identity if identity is not None else module_fingerprint(model)
        key = run_key(identity, model_dtype(model), config.numbers(), candidates, examples, tokens)
        store = BlockStore(out_dir, key)
    with eval_mode(model):
        products, base = gradient_products(model, candidates, examples, tokens, config, store=store, progress=progress)
    return Forecast(
        prompts=list(prompts),
        groups=list(groups) if groups is not None else ["all"] * len(prompts),
        safety_prompts=[p for p, _ in safety_pairs],
        products=products,
        base_refusal=base,
        response_tokens=sum(t != IGNORE_INDEX for e in examples for t in e.targets),
        refusal_tokens=[tokenizer.decode([t]) for t in tokens],
        config=config,
    )


def _check_texts(safety_pairs, prompts, groups) -> None:
    if not isinstance(prompts, Sequence) or isinstance(prompts, str) or not prompts:
        raise ValueError("prompts: expected a non-empty list of strings")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompts[{i}]: expected a non-empty string, got {p!r}")
    if not isinstance(safety_pairs, Sequence) or not safety_pairs:
        raise ValueError("safety_pairs: expected a non-empty list of (prompt, response) pairs")
    for i, pair in enumerate(safety_pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(t, str) and t.strip() for t in pair)):
            raise ValueError(f"safety_pairs[{i}]: expected a (prompt, response) pair of non-empty strings, got {pair!r}")
    if groups is not None and (len(groups) != len(prompts) or not all(isinstance(g, str) and g for g in groups)):
        raise ValueError(f"groups: expected one non-empty name per prompt ({len(prompts)}), got {len(groups)}")

"""Gradient products ⟨∇_θ P_ref(x′), ∇_θ L(x_s, y_s)⟩ for every candidate x′ and safety example s.

The structured Gram of :mod:`dcr_fast.ntk.exact` computes them without a forward per pair:
per chunk of prompts one prefix pass and one tail forward and backward record each prompt's
features (:func:`~dcr_fast.ntk.exact.readout_features`, with the readouts of
:mod:`dcr_fast.forecast.readouts`), the parameter set maps them to its own
(:mod:`dcr_fast.forecast.params`), and :func:`~dcr_fast.ntk.exact.probe_gram` contracts
candidate features with safety features. Candidates' features are computed once and kept;
safety examples stream through in blocks of ``safety_chunk``, each block contracted against
every candidate and, given a :class:`~dcr_fast.forecast.store.BlockStore`, saved, so that an
interrupted run resumes at the first missing block. Both are taken in order of length, so a
chunk is padded to little more than its own prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from dcr_fast.forecast.config import ForecastConfig
from dcr_fast.forecast.params import PARAM_SETS
from dcr_fast.forecast.readouts import LossReadout, RefusalReadout
from dcr_fast.forecast.store import BlockStore
from dcr_fast.ntk.exact import ProbeFeatures, probe_gram, readout_features
from dcr_fast.ntk.tail import describe, pad_prompts, run_prefix
from dcr_fast.train.sft import IGNORE_INDEX, Example


def gradient_products(
    model: nn.Module,
    candidates: Sequence[torch.Tensor],
    examples: Sequence[Example],
    refusal_tokens: Sequence[int],
    config: ForecastConfig,
    *,
    store: BlockStore | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(products (n_c, n_s), base first-token refusal probability (n_c,)), float64.

    ``candidates`` are the templated prompts' token ids (1-D LongTensors); ``examples`` the
    tokenized safety pairs (``targets[t]`` the token position t predicts, or IGNORE_INDEX).
    """
    check_inputs(model, candidates, examples, refusal_tokens)
    # Chunks of similar lengths carry little padding; blocks are kept in this (deterministic) order.
    by_length_c = np.argsort([p.numel() for p in candidates], kind="stable")
    by_length_s = np.argsort([len(e.input_ids) for e in examples], kind="stable")
    candidates = [candidates[i] for i in by_length_c]
    examples = [examples[i] for i in by_length_s]
    spec, transform = PARAM_SETS[config.param_set].build(model, config.param_options)
    device = next(model.parameters()).device
    readout = RefusalReadout(torch.tensor(list(refusal_tokens), dtype=torch.long, device=device))
    starts = range(0, len(examples), config.safety_chunk)
    blocks = {start: store.load(start) if store is not None else None for start in starts}
    base = store.load_base() if store is not None else None

    candidate_features: list[ProbeFeatures] = []
    if base is None or any(block is None for block in blocks.values()):
        values = []
        for start in tqdm(range(0, len(candidates), config.candidate_chunk), desc="candidate features",
                          unit="chunk", disable=not progress):
            chunk = [p.to(device) for p in candidates[start : start + config.candidate_chunk]]
            ids, mask = pad_prompts(chunk)
            value, features = readout_features(model, spec, run_prefix(model, ids, mask, spec=spec), readout)
            values.append(value[:, 0])
            candidate_features.append(transform(features))
        base = torch.cat(values).double().cpu().numpy()
        if store is not None:
            store.save_base(base)

    products = np.empty((len(candidates), len(examples)))
    with tqdm(total=len(examples), desc="safety examples", unit="example", disable=not progress) as bar:
        for start in starts:
            batch = examples[start : start + config.safety_chunk]
            block = blocks[start]
            if block is None:
                block = _block(model, spec, transform, batch, candidate_features, device)
                if store is not None:
                    store.save(start, block)
            products[:, start : start + len(batch)] = block
            bar.update(len(batch))
    out = np.empty_like(products)
    out[np.ix_(by_length_c, by_length_s)] = products
    base_out = np.empty_like(base)
    base_out[by_length_c] = base
    return out, base_out


def _block(model, spec, transform, batch: Sequence[Example], candidate_features: list[ProbeFeatures],
           device: torch.device) -> np.ndarray:
    """All candidates against one block of safety examples: (n_c, len(batch))."""
    ids, mask = pad_prompts([torch.tensor(e.input_ids, dtype=torch.long, device=device) for e in batch])
    cache = run_prefix(model, ids, mask, spec=spec)
    _, features = readout_features(model, spec, cache, LossReadout.of(batch, device))
    features = transform(features)
    rows = [probe_gram(left, features)[:, :, 0, 0] for left in candidate_features]
    return torch.cat(rows).double().cpu().numpy()


def check_inputs(
    model: nn.Module, candidates: Sequence[torch.Tensor], examples: Sequence[Example], refusal_tokens: Sequence[int]
) -> None:
    """Clear errors, before any work, for what :func:`gradient_products` cannot use."""
    if not candidates:
        raise ValueError("prompts: expected at least one candidate prompt")
    if not examples:
        raise ValueError("safety_data: expected at least one safety example")
    for i, p in enumerate(candidates):
        if not isinstance(p, torch.Tensor) or p.dim() != 1 or p.numel() == 0 or p.dtype != torch.long:
            raise ValueError(f"prompts[{i}] must be a non-empty 1-D LongTensor of token ids, got {describe(p)}")
    for i, e in enumerate(examples):
        if not e.input_ids or len(e.targets) != len(e.input_ids):
            raise ValueError(f"safety_data[{i}] must hold token ids and one target per token, got "
                             f"{len(e.input_ids)} ids and {len(e.targets)} targets")
    # An example cut before its response contributes nothing (as in SFT); all of them, no forecast.
    if all(t == IGNORE_INDEX for e in examples for t in e.targets):
        raise ValueError("safety_data: no example has a response token to train on (empty responses, "
                         "or all truncated away by max_length)")
    vocab = model.get_output_embeddings().out_features
    if not refusal_tokens or any(not 0 <= int(t) < vocab for t in refusal_tokens):
        raise ValueError(f"refusal tokens must be a non-empty list of ids in [0, {vocab}), got {list(refusal_tokens)}")

"""readout_features: the structured Gram of arbitrary scalar readouts against plain autograd, float64."""

from __future__ import annotations

import pytest
import torch
from ntk_models import ARCHS, prompts, rel, tiny
from torch.func import functional_call

from dcr_fast.ntk import pad_prompts, run_prefix, tail_spec
from dcr_fast.ntk.exact import probe_gram, prompt_probes, readout_features
from dcr_fast.ntk.reference import float64_exact

EXACT_RTOL = 1e-9


def _weights(lengths: list[int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.rand(n, generator=g, dtype=torch.float64) for n in lengths]


def _scalars(logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Two scalars of one prompt's logits (T, V): a weighted next-token log-likelihood over all
    positions, and the probability of two fixed tokens at the last position."""
    log_probs = logits.log_softmax(-1)
    nll = (log_probs[:-1].gather(1, ids[1:, None])[:, 0] * weights[:-1]).sum()
    last = logits[-1].softmax(-1)[[3, 11]].sum()
    return torch.stack([nll, last])


class _Readout:
    """The same two scalars through the tail's readout interface (padded batch)."""

    def __init__(self, batch: list[torch.Tensor], weights: list[torch.Tensor]):
        self.ids, self.mask = pad_prompts(batch)
        self.weights = torch.zeros(self.ids.shape, dtype=torch.float64)
        for row, w in enumerate(weights):  # the last real position predicts nothing
            self.weights[row, : w.numel() - 1] = w[:-1]

    def __call__(self, hidden, cache, project):
        logits = project(hidden)  # (n, T, V): every position
        rows = torch.arange(hidden.shape[0])
        nll = (logits[:, :-1].log_softmax(-1).gather(2, self.ids[:, 1:, None])[..., 0] * self.weights[:, :-1]).sum(1)
        last = logits[rows, cache.last_index].softmax(-1)[:, [3, 11]].sum(1)
        return torch.stack([nll, last], dim=1)


def _oracle(model, spec, batch, weights) -> torch.Tensor:
    """Gradients of the scalars w.r.t. θ_S by autograd through the whole model: (n, 2, |θ_S|)."""
    theta = {name: model.get_parameter(name).detach().clone().requires_grad_(True) for name in spec.param_names}
    rows = []
    for ids, w in zip(batch, weights):
        logits = functional_call(model, theta, (ids[None],), {"use_cache": False}, tie_weights=False).logits[0]
        s = _scalars(logits, ids, w)
        rows.append(torch.stack([
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(s[j], list(theta.values()), retain_graph=True)])
            for j in range(2)
        ]))
    return torch.stack(rows)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("tail_layers,include_lm_head,final_norm", [(1, True, False), (2, False, True), (0, True, True)])
def test_readout_gram_matches_autograd(arch, tail_layers, include_lm_head, final_norm):
    model = tiny(arch)
    spec = tail_spec(model, tail_layers, include_lm_head, include_final_norm=final_norm)
    batch = prompts(seed=3, lengths=(6, 3, 9))
    weights = _weights([p.numel() for p in batch])
    with float64_exact():
        ids, mask = pad_prompts(batch)
        values, features = readout_features(model, spec, run_prefix(model, ids, mask, spec=spec), _Readout(batch, weights))
        grads = _oracle(model, spec, batch, weights)
        with torch.no_grad():
            want_values = torch.stack([
                _scalars(model(p[None], use_cache=False).logits[0], p, w) for p, w in zip(batch, weights)
            ])
    assert features.tokens is None and features.head is None
    assert rel(values, want_values) < EXACT_RTOL
    want = torch.einsum("pjd,qid->pqji", grads, grads)
    got = probe_gram(features, features)
    assert got.shape == want.shape
    assert rel(got, want) < EXACT_RTOL, rel(got, want)


def test_readout_must_return_one_row_per_prompt():
    model = tiny("qwen2-tied")
    spec = tail_spec(model, 1, True)
    ids, mask = pad_prompts(prompts())
    with pytest.raises(ValueError, match=r"readout must return \(n=2, k\)"):
        readout_features(model, spec, run_prefix(model, ids, mask, spec=spec), lambda h, c, project: project(h).sum())


def test_logit_and_readout_features_do_not_mix():
    model = tiny("qwen2-untied")
    spec = tail_spec(model, 1, True)
    batch = prompts()
    _, _, logit_features = prompt_probes(model, spec, batch, k=2)
    ids, mask = pad_prompts(batch)
    _, features = readout_features(
        model, spec, run_prefix(model, ids, mask, spec=spec), _Readout(batch, _weights([p.numel() for p in batch]))
    )
    with pytest.raises(ValueError, match="different θ_S or probe kinds"):
        probe_gram(logit_features, features)

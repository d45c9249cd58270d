"""The paper's finite-difference eNTK, batched: ``method="fd"``.

The numbers are those of :mod:`dcr_fast.ntk.reference` (appendix A.6): for a probe token i of
prompt x, w = ∇_{θ_S} z_i(x) and K(x', x)[:, i] ≈ (z(x'; θ+εw) − z(x'; θ−εw)) / 2ε on the rows
So(x'). Only the organisation differs:

* the frozen prefix runs once per prompt (:func:`dcr_fast.ntk.tail.run_prefix`);
* every w is recorded once per (prompt, token), in factored form, by one tail backward over
  all probes (:func:`dcr_fast.ntk.exact.probe_features`): a linear layer's w is Dᵀ A with
  A the layer's inputs and D its output cotangents (rank ≤ the prompt's length), its
  bias's and the RMSNorm weights' w are small dense vectors (read by name through
  ``ProbeFeatures.dense_slices``), lm_head's is e_i h(x)ᵀ;
* one pass of the tail evaluates every query x' under many directions ±εw at once: the
  batch holds (direction, query) rows, each tail linear layer becomes one
  ``probe_linear`` call (:mod:`dcr_fast.ntk.probe_ops`, C++/CUDA) that adds
  ε·(x Aᵀ) D to the shared x Wᵀ, so no parameter is copied per direction; each norm gets
  its per-direction weight by broadcasting; lm_head is evaluated on the rows So only;
* z is read at the last position only, so the last tail layer runs its keys and values at
  every position but its query, attention, o_proj and MLP at that position alone
  (:func:`_last_position_layer`; other layer types run whole).

:func:`fd_blocks` is the batch entry (the layout of :func:`dcr_fast.ntk.exact.probe_gram`, for
``entk_matrix``); :func:`fd_block` serves ``entk_block(method="fd")``. Arithmetic runs in the
compute dtype of :mod:`dcr_fast.ntk.tail` (float64, or float32 for fp32/bf16/fp16 models).
The tail's modules are swapped for probing wrappers only for the duration of a pass; the
model's parameters are never written.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch
from torch import nn
from torch.func import functional_call

from dcr_fast.ntk.exact import ProbeFeatures, prompt_probes
from dcr_fast.ntk.probe_ops import probe_linear
from dcr_fast.ntk.tail import (
    PrefixCache,
    TailSpec,
    base_model,
    tail_modules,
    tail_parameters,
)

DEFAULT_MAX_ROWS = 1 << 15


def fd_block(
    model: nn.Module, spec: TailSpec, x_prime: torch.Tensor, x: torch.Tensor, *, k: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(K, K_self, So, Su) for one pair: x' and x probed in one batch, x' queried once."""
    cache, tokens, features = prompt_probes(model, spec, [x_prime, x], k=k)
    blocks = fd_blocks(model, spec, cache.select([0]), tokens[:1], features, eps=eps)[0]
    return blocks[1], blocks[0], tokens[0], tokens[1]


@torch.no_grad()
def fd_blocks(
    model: nn.Module,
    spec: TailSpec,
    queries: PrefixCache,
    query_tokens: torch.Tensor,
    probes: ProbeFeatures,
    *,
    eps: float = 1e-3,
    max_rows: int = DEFAULT_MAX_ROWS,
) -> torch.Tensor:
    """K[q, p, j, i] ≈ J(x'_q)[query_tokens[q, j]] · ∇z_{probes.tokens[p, i]}(x_p), shape (n', n, k', k).

    ``queries`` is the cached prefix of the x' prompts and ``query_tokens`` (n', k') their rows
    So; ``probes`` the factored gradients of the x prompts (``probe_features``). Each tail
    pass holds at most about ``max_rows`` (direction, query, position) rows.
    """
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows must be a positive int, got {max_rows!r}")
    if probes.tokens is None:
        raise ValueError("probes must be logit-token features (probe_features), not readout features")
    if query_tokens.dim() != 2 or query_tokens.shape[0] != queries.batch_size:
        raise ValueError(
            f"query_tokens must be (n', k') with n' = {queries.batch_size} cached queries, "
            f"got shape {tuple(query_tokens.shape)}"
        )
    n_probes, k = probes.tokens.shape
    n_queries, positions = queries.batch_size, queries.hidden.shape[1]
    rows_per_probe = 2 * k * positions
    query_chunk = max(1, min(n_queries, max_rows // rows_per_probe))
    probe_chunk = max(1, min(n_probes, max_rows // (rows_per_probe * query_chunk)))

    engine = _ProbeEngine(model, spec, probes)
    out = torch.empty(n_queries, n_probes, query_tokens.shape[1], k, dtype=queries.hidden.dtype,
                      device=queries.hidden.device)
    for q0 in range(0, n_queries, query_chunk):
        q_rows = torch.arange(q0, min(q0 + query_chunk, n_queries))
        chunk_cache, chunk_tokens = queries.select(q_rows), query_tokens[q_rows]
        for p0 in range(0, n_probes, probe_chunk):
            p_rows = slice(p0, min(p0 + probe_chunk, n_probes))
            out[q_rows, p_rows] = engine.central_difference(chunk_cache, chunk_tokens, p_rows, eps)
    return out


class _ProbeEngine:
    """The tail of ``model`` with its θ_S in the compute dtype, ready to probe ±εw directions."""

    def __init__(self, model: nn.Module, spec: TailSpec, probes: ProbeFeatures):
        self.model, self.spec, self.probes = model, spec, probes
        self.base, _ = base_model(model)
        self.linears, norm_names = tail_modules(model, spec)
        self.params = tail_parameters(model, spec)
        dtype = next(iter(self.params.values())).dtype
        self.final_norm = {n: p.detach().to(dtype) for n, p in self.base.norm.named_parameters()}
        self.head_weight = model.get_output_embeddings().weight.detach().to(dtype)
        dense = probes.dense_slices()
        expected = [*norm_names, *(f"{n}.bias" for n in self.linears if f"{n}.bias" in self.params)]
        if list(dense) != expected:
            raise ValueError(
                f"probes.dense holds the gradients of {list(dense)}, this tail's norms and biases are "
                f"{expected}: the features were recorded for another θ_S"
            )
        self.norm_names = norm_names
        self.dense = dense

    def central_difference(
        self, queries: PrefixCache, query_tokens: torch.Tensor, probe_rows: slice, eps: float
    ) -> torch.Tensor:
        """(n', c, k', k) blocks of the queries against the probes ``probe_rows`` (c prompts)."""
        tokens = self.probes.tokens[probe_rows]
        c, k = tokens.shape
        n_dir = c * k
        # Directions 0..n_dir-1 step +ε, the next n_dir the same factors -ε (probe_linear's p mod F).
        scale = torch.full((2 * n_dir,), eps, dtype=queries.hidden.dtype, device=queries.hidden.device)
        scale[n_dir:] = -eps
        n_queries = queries.batch_size
        # Row b of the batch is query b % n' under direction b // n'.
        batch = queries.select(torch.arange(n_queries).repeat(2 * n_dir))
        with self._probing(probe_rows, scale, n_queries):
            last = self._last_hidden(batch)
        h = functional_call(self.base.norm, self.final_norm, (last,)).reshape(2 * n_dir, n_queries, -1)
        z = torch.einsum("pqd,qjd->pqj", h, self.head_weight[query_tokens])
        if self.spec.include_lm_head:
            # lm_head's w is e_i h(x)ᵀ: it moves logit i only, by ±ε h(x'_perturbed)·h(x).
            head = self.probes.head[probe_rows].repeat_interleave(k, dim=0).repeat(2, 1)
            hits = query_tokens[None, :, :] == tokens.reshape(-1).repeat(2)[:, None, None]
            z = z + hits * (scale[:, None] * (h * head[:, None, :]).sum(-1))[:, :, None]
        diff = (z[:n_dir] - z[n_dir:]) / (2 * eps)  # (c·k, n', k')
        return diff.reshape(c, k, n_queries, -1).permute(2, 0, 3, 1)

    def _last_hidden(self, batch: PrefixCache) -> torch.Tensor:
        """The tail layers' output at each row's last position, (B, d)."""
        hidden = batch.hidden
        layers = [self.base.layers[i] for i in self.spec.layer_indices]
        for n, layer in enumerate(layers):
            if n == len(layers) - 1 and _last_position_supported(layer, batch.layer_kwargs):
                return _last_position_layer(layer, hidden, batch.layer_kwargs, batch.last_index)
            out = layer(hidden, **batch.layer_kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), batch.last_index]

    @contextlib.contextmanager
    def _probing(self, probe_rows: slice, scale: torch.Tensor, n_queries: int) -> Iterator[None]:
        """Swap the tail's θ_S modules for wrappers that apply the directions of ``probe_rows``."""
        swaps: dict[str, nn.Module] = {}
        for (name, module), feature in zip(self.linears.items(), self.probes.linears):
            a = feature.a[probe_rows].repeat_interleave(feature.delta.shape[1], dim=0)
            d = feature.delta[probe_rows].flatten(0, 1)
            bias = self.params.get(f"{name}.bias")
            d_bias = None if bias is None else self.dense[f"{name}.bias"][probe_rows].flatten(0, 1)
            swaps[name] = _ProbedLinear(self.params[f"{name}.weight"], bias, a, d, d_bias, scale)
        for name in self.norm_names:
            module_name = name.rpartition(".")[0]
            g = self.dense[name][probe_rows].flatten(0, 1)
            weights = self.params[name].reshape(-1) + scale[:, None] * g.repeat(2, 1)
            swaps[module_name] = _ProbedNorm(self.model.get_submodule(module_name), weights, n_queries)
        saved = []
        try:
            for name, wrapper in swaps.items():
                parent_name, _, child = name.rpartition(".")
                parent = self.model.get_submodule(parent_name)
                saved.append((parent, child, getattr(parent, child)))
                setattr(parent, child, wrapper)
            yield
        finally:
            for parent, child, original in reversed(saved):
                setattr(parent, child, original)


def _last_position_supported(layer: nn.Module, layer_kwargs: dict) -> bool:
    """Whether ``layer`` is a Qwen2/Llama-style decoder layer that :func:`_last_position_layer` can run."""
    attn = getattr(layer, "self_attn", None)
    module = sys.modules.get(type(attn).__module__)
    return (
        attn is not None
        and all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling"))
        and getattr(attn, "sliding_window", None) is None
        and all(hasattr(layer, n) for n in ("input_layernorm", "post_attention_layernorm", "mlp"))
        and hasattr(module, "apply_rotary_pos_emb")
        and hasattr(module, "eager_attention_forward")
        and "position_embeddings" in layer_kwargs
    )


def _last_position_layer(
    layer: nn.Module, hidden: torch.Tensor, layer_kwargs: dict, last_index: torch.Tensor
) -> torch.Tensor:
    """The last tail layer's output at each row's last position, (B, d).

    Only z at the last position is measured, so after the keys and values of every position
    the layer needs one query, one attention row, o_proj and the MLP at that position: with
    T' positions that is ~1/T' of the layer's work for everything but k_proj and v_proj.
    It runs the layer's own submodules and its modeling file's rotary and eager attention,
    in the order of the decoder layer's forward (x + attn(norm(x)), then + mlp(norm(·))).
    """
    attn = layer.self_attn
    modeling = sys.modules[type(attn).__module__]
    batch, positions, _ = hidden.shape
    rows = torch.arange(batch, device=hidden.device)
    normed = layer.input_layernorm(hidden)
    keys = attn.k_proj(normed).view(batch, positions, -1, attn.head_dim).transpose(1, 2)
    values = attn.v_proj(normed).view(batch, positions, -1, attn.head_dim).transpose(1, 2)
    query = attn.q_proj(normed[rows, last_index][:, None]).view(batch, 1, -1, attn.head_dim).transpose(1, 2)
    cos, sin = layer_kwargs["position_embeddings"]
    _, keys = modeling.apply_rotary_pos_emb(keys, keys, cos, sin)
    trig_rows = rows if cos.shape[0] > 1 else torch.zeros_like(rows)
    query, _ = modeling.apply_rotary_pos_emb(
        query, query, cos[trig_rows, last_index][:, None], sin[trig_rows, last_index][:, None]
    )
    # Right padding: the last real position sees every key up to itself and none after.
    beyond = torch.arange(positions, device=hidden.device)[None, :] > last_index[:, None]
    mask = torch.zeros(batch, 1, 1, positions, dtype=hidden.dtype, device=hidden.device)
    mask.masked_fill_(beyond[:, None, None, :], torch.finfo(hidden.dtype).min)
    out, _ = modeling.eager_attention_forward(attn, query, keys, values, mask, scaling=attn.scaling, dropout=0.0)
    x = hidden[rows, last_index] + attn.o_proj(out.reshape(batch, -1))
    return x + layer.mlp(layer.post_attention_layernorm(x))


class _ProbedLinear(nn.Module):
    """A tail linear layer under P directions; its input rows are grouped by direction."""

    def __init__(self, weight, bias, a, d, d_bias, scale):
        super().__init__()
        self.weight, self.bias, self.a, self.d, self.d_bias, self.scale = weight, bias, a, d, d_bias, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_dir = self.scale.shape[0]
        y = probe_linear(
            x.reshape(n_dir, -1, x.shape[-1]), self.weight, self.bias, self.a, self.d, self.d_bias, self.scale
        )
        return y.reshape(*x.shape[:-1], self.weight.shape[0])


class _ProbedNorm(nn.Module):
    """A tail norm whose weight differs per direction: the model's own forward, broadcast over rows."""

    def __init__(self, norm: nn.Module, weights: torch.Tensor, n_queries: int):
        super().__init__()
        self.norm = norm
        self.rows = weights.repeat_interleave(n_queries, dim=0)  # (P·n', d): one weight per batch row

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.rows.reshape(self.rows.shape[0], *([1] * (hidden.dim() - 2)), self.rows.shape[1])
        return functional_call(self.norm, {"weight": weight}, (hidden,))

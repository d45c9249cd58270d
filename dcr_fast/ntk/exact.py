"""Exact eNTK blocks by the structured ("ghost") Gram: no finite differences, no Jacobians.

For probes (prompt p, token j) the kernel entry is ⟨∇_{θ_S} z_j(x_p), ∇_{θ_S} z_i(x_q)⟩, a sum
over the parameters of θ_S of three kinds of terms:

* a linear layer y_t = W a_t (+ b): ∇_W z_j = Σ_t δ_{j,t} a_tᵀ has rank ≤ T, so
  ⟨∇_W z_j(x_p), ∇_W z_i(x_q)⟩ = Σ_{t,s} (δ_{j,t}·δ'_{i,s}) (a_t·a'_s): two small Grams
  multiplied elementwise ("ghost"), or, when prompts are long, the per-probe gradients
  materialized (by a multiply-add count, :func:`materialize_rule`; R = the rows kept);
  the bias contributes (Σ_t δ_{j,t})·(Σ_s δ'_{i,s});
* the RMSNorm weights inside the tail (and the final norm's, with ``include_final_norm``):
  small, their per-probe gradients are materialized;
* the output projection (lm_head), in closed form: z = W h gives
  ⟨∇_W z_a(x_p), ∇_W z_b(x_q)⟩ = [a = b] (h_p·h_q), h the final-normed last hidden state.
  With tied embeddings only this use is in θ_S (the lookup is in the frozen prefix).

Per batch of prompts this needs one tail forward and k backward passes (one per probe
index) to record a_t and δ_t (:func:`probe_features`); any pair of prompts then costs only the
contraction (:func:`probe_gram`), which is why ``entk_matrix`` computes features once per
prompt and contracts them in batches. Rows where δ is zero for every probe are dropped
(in the last tail layer the MLP, o_proj and q_proj only see the last position).
Arithmetic runs in the compute dtype of :mod:`dcr_fast.ntk.tail` (fp32, or fp64).

The probes need not be logits: :func:`readout_features` records the same features for any
scalar functions of the tail's output (a :data:`~dcr_fast.ntk.tail.Readout`: a refusal
probability, a response's summed loss), so the same Gram gives ⟨∇_{θ_S} s(x'), ∇_{θ_S} s'(x)⟩.
Their cotangents on the logits are dense, so lm_head has no closed form there and is treated
as one more linear layer (ghost or materialized by the same rule).

Why not forward-mode JVP: one JVP gives one column J(x')·w for one pair, so a pair costs k
tail passes with tangents however the w are shared, while the Gram's per-pair cost is a
contraction of stored features. Measured on the CPU (2 cores, the ``cpu-tiny`` benchmark
model, eager attention, fp32): JVP columns 1.55 s a pair against 54 ms a pair for the Gram
over an 8×8 matrix (features included), agreeing to 5e-7 relative.

Why not fold the input Gram into one side first, Σ_t δ_{j,t}·(Σ_s (a_t·a'_s) δ'_{i,s}): it
needs about k× fewer multiply-adds than ghost (3.9× over a Qwen2.5-1.5B tail at 32 tokens,
k=5), but its intermediate holds a d_out-vector per (p, t, q, i), d_out/(k R) ≈ 56× the
ghost's δ Gram for that MLP, so in torch it is bound by memory traffic. Measured on the CPU
(2 cores, fp32, 16×16 prompts of 32 rows at 1.5B widths): 2× slower than ghost on every
layer shape (gate/up 1.35 s against 0.63 s). It would need a fused kernel that never writes
the intermediate; none exists here, so ghost and materialized are the two orders.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from dcr_fast.ntk.tail import (
    PrefixCache,
    Readout,
    TailSpec,
    last_logits,
    pad_prompts,
    run_prefix,
    tail_logits,
    tail_modules,
    tail_parameters,
    tail_readout,
)


def exact_block(
    model: nn.Module, spec: TailSpec, x_prime: torch.Tensor, x: torch.Tensor, *, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(K, K_self, So, Su) for one pair: both prompts in one padded batch, one Gram."""
    _, tokens, features = prompt_probes(model, spec, [x_prime, x], k=k)
    gram = probe_gram(features.select(slice(0, 1)), features)[0]
    return gram[1], gram[0], tokens[0], tokens[1]


def prompt_probes(
    model: nn.Module, spec: TailSpec, prompts: list[torch.Tensor], *, k: int
) -> tuple[PrefixCache, torch.Tensor, ProbeFeatures]:
    """A batch of prompts' prefix cache, top-k tokens (n, k) and probe features.

    The first step of every structured method: ``exact_block`` and ``entk_matrix`` contract
    the features, :func:`dcr_fast.ntk.fd.fd_block` probes along them from the cache.
    """
    ids, mask = pad_prompts(prompts)
    cache = run_prefix(model, ids, mask, spec=spec)
    with torch.no_grad():
        tokens = torch.topk(tail_logits(model, spec, cache), k, dim=1).indices
    return cache, tokens, probe_features(model, spec, cache, tokens)


@dataclass
class ProbeFeatures:
    """What the Gram needs of n prompts with k probe tokens each; ``fd`` probes along the same.

    ``dense`` holds the gradients stored whole, laid out as ``dense_layout`` says: one
    (n, k, size) slice per θ_S parameter, the tail's RMSNorm weights first in θ_S order
    (``norms`` of :func:`~dcr_fast.ntk.tail.tail_modules`), then the biases of the linear
    layers in ``linears`` order. The Gram contracts ``dense`` whole; whoever needs one
    parameter's gradient reads it through :meth:`dense_slices`, never by offset.
    """

    tokens: torch.Tensor | None  # (n, k) probe token ids; None for readout features
    linears: list[LinearFeatures]  # one per weight matrix in the tail layers, in tail_modules order
    dense: torch.Tensor  # (n, k, P) materialized gradients: norm weights, then linear biases
    dense_layout: tuple[tuple[str, int], ...]  # (θ_S name, size) of each slice of dense, in order
    head: torch.Tensor | None  # (n, d) lm_head input at the last position, when lm_head ∈ θ_S

    @property
    def n(self) -> int:
        return self.dense.shape[0]

    def dense_slices(self) -> dict[str, torch.Tensor]:
        """``{θ_S name: (n, k, size) view of dense}``, in layout order."""
        sizes = [size for _, size in self.dense_layout]
        if sum(sizes) != self.dense.shape[2]:
            raise ValueError(f"dense has {self.dense.shape[2]} entries per probe; its layout names {sum(sizes)}")
        return dict(zip((name for name, _ in self.dense_layout), self.dense.split(sizes, dim=2)))

    def to(self, device: torch.device | str, *, pin: bool = False) -> ProbeFeatures:
        """A copy on ``device``; ``pin`` puts a host copy in page-locked memory, from which
        later uploads run asynchronously on the current stream."""

        def move(t: torch.Tensor) -> torch.Tensor:
            if pin:  # a blocking download: the host copy is complete when this returns
                return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)
            return t.to(device, non_blocking=torch.device(device).type == "cuda")

        return self.map(move)

    def select(self, rows: slice) -> ProbeFeatures:
        """The features of the prompts ``rows``."""
        return self.map(lambda t: t[rows])

    def map(self, fn) -> ProbeFeatures:
        """A copy with ``fn`` applied to every tensor, always in one order: tokens, each linear's
        a then delta, dense, head (what sends features between ranks relies on)."""
        return replace(
            self,
            tokens=None if self.tokens is None else fn(self.tokens),
            linears=[LinearFeatures(fn(f.a), fn(f.delta)) for f in self.linears],
            dense=fn(self.dense),
            head=None if self.head is None else fn(self.head),
        )


@dataclass
class LinearFeatures:
    """Inputs a (n, R, d_in) and output cotangents δ (n, k, R, d_out) of one linear layer."""

    a: torch.Tensor
    delta: torch.Tensor


def probe_features(model: nn.Module, spec: TailSpec, cache: PrefixCache, tokens: torch.Tensor) -> ProbeFeatures:
    """Record a_t, δ_t, norm gradients and h for each prompt of ``cache`` and each token in ``tokens``.

    One tail forward over the n prompts, then one backward per probe index j (k in all), each
    seeding z[p, tokens[p, j]] for every prompt p at once.
    """
    n, _ = tokens.shape
    if n != cache.batch_size:
        raise ValueError(f"tokens must have one row per cached prompt ({cache.batch_size}), got {n}")

    def logits_at_tokens(hidden, cache, project):
        return last_logits(hidden, cache, project).gather(1, tokens)

    _, features = _record(model, spec, cache, logits_at_tokens, head_closed_form=True)
    return replace(features, tokens=tokens)


def readout_features(
    model: nn.Module, spec: TailSpec, cache: PrefixCache, readout: Readout
) -> tuple[torch.Tensor, ProbeFeatures]:
    """Values (n, k) and probe features of k scalar functions per prompt, ``readout``'s columns.

    ``readout`` is a :data:`~dcr_fast.ntk.tail.Readout` returning (n, k), e.g. a refusal
    probability or a response's summed loss; it must call ``project`` once. The Gram of two
    such feature sets is ⟨∇_{θ_S} s_j(x_p), ∇_{θ_S} s'_i(x_q)⟩. The output projection is then a
    linear layer like the others (its cotangents are whatever the readout makes them, not
    one-hot), recorded last in ``linears``, and ``tokens`` and ``head`` are None.
    """
    return _record(model, spec, cache, readout, head_closed_form=False)


def _record(
    model: nn.Module, spec: TailSpec, cache: PrefixCache, readout: Readout, *, head_closed_form: bool
) -> tuple[torch.Tensor, ProbeFeatures]:
    """One tail forward to ``readout``'s (n, k) values, one backward per column, and the features.

    With ``head_closed_form`` (logit probes) lm_head's input h is kept for the closed form of
    :func:`probe_gram`; otherwise lm_head is recorded as a linear layer.
    """
    n = cache.batch_size
    linears, norms = tail_modules(model, spec)
    head = model.get_output_embeddings()
    if spec.include_lm_head and not head_closed_form:
        linears = {**linears, spec.lm_head_name: head}
    params = tail_parameters(model, spec)
    # Each prompt gets its own copy of every norm weight, broadcast over positions, so
    # autograd hands back per-prompt gradients.
    norm_params = {name: params[name].expand(n, 1, -1).clone().requires_grad_(True) for name in norms}
    params.update(norm_params)

    records: dict[str, dict[str, list[torch.Tensor]]] = {name: {"a": [], "delta": []} for name in linears}
    handles = [module.register_forward_hook(_recorder(records[name])) for name, module in linears.items()]
    head_input: list[torch.Tensor] = []
    if spec.include_lm_head and head_closed_form:
        handles.append(head.register_forward_hook(lambda _m, inp, _out: head_input.append(inp[0][:, 0].detach())))
    try:
        with torch.enable_grad():
            hidden = cache.hidden.detach().requires_grad_(True)
            values = tail_readout(model, spec, PrefixCache(hidden, cache.layer_kwargs, cache.last_index), readout, params)
            if values.dim() != 2 or values.shape[0] != n:
                raise ValueError(f"the readout must return (n={n}, k) values, got shape {tuple(values.shape)}")
            k = values.shape[1]
            # Differentiating w.r.t. the tail's input as well makes every tail linear's
            # cotangent hook fire even when θ_S has no norm weights.
            grads = [
                torch.autograd.grad(
                    values[:, j].sum(), [hidden, *norm_params.values()], retain_graph=j < k - 1
                )[1:]
                for j in range(k)
            ]
    finally:
        for handle in handles:
            handle.remove()

    features = []
    dense = {name: torch.stack([g[i] for g in grads], dim=1).reshape(n, k, -1) for i, name in enumerate(norm_params)}
    for name, module in linears.items():
        delta = torch.stack(records[name]["delta"], dim=1)  # (n, k, T, d_out)
        # lm_head's rows are the readout's positions, not the prompt's: no padding to mask.
        lengths = None if module is head else cache.lengths
        features.append(_drop_zero_rows(records[name]["a"][0], delta, lengths))
        if module.bias is not None and f"{name}.bias" in params:
            dense[f"{name}.bias"] = delta.sum(dim=2)
    return values.detach(), ProbeFeatures(
        tokens=None,
        linears=features,
        dense=torch.cat(list(dense.values()), dim=2) if dense else hidden.new_zeros(n, k, 0),
        dense_layout=tuple((name, g.shape[2]) for name, g in dense.items()),
        head=head_input[0] if head_input else None,
    )


def probe_gram(left: ProbeFeatures, right: ProbeFeatures) -> torch.Tensor:
    """K[p, q, j, i] = ⟨∇z_{left.tokens[p,j]}(x_p), ∇z_{right.tokens[q,i]}(x_q)⟩, shape (n, n', k, k').

    For readout features (:func:`readout_features`) the gradients are those of the readouts'
    scalars. Both sides must come from the same θ_S and the same kind of probe.
    """
    if (
        len(left.linears) != len(right.linears)
        or (left.head is None) != (right.head is None)
        or left.dense_layout != right.dense_layout
    ):
        raise ValueError(
            "probe_gram: the two feature sets were recorded for different θ_S or probe kinds "
            "(logit-token probes and readouts do not mix)"
        )
    n_l, k_l = left.dense.shape[:2]
    n_r, k_r = right.dense.shape[:2]
    K = (left.dense.reshape(n_l * k_l, -1) @ right.dense.reshape(n_r * k_r, -1).T)
    K = K.reshape(n_l, k_l, n_r, k_r).permute(0, 2, 1, 3)
    for fl, fr in zip(left.linears, right.linears):
        K = K + _linear_gram(fl, fr)
    if left.head is not None:
        same_token = left.tokens[:, None, :, None] == right.tokens[None, :, None, :]
        K = K + same_token * (left.head @ right.head.T)[:, :, None, None]
    return K


def materialize_rule(left: tuple[int, int, int], right: tuple[int, int, int], d_in: int, d_out: int) -> bool:
    """True when per-probe weight gradients cost fewer multiply-adds than the ghost product.

    ``left``/``right`` are (prompts n, probes k, rows R) of the two sides. Ghost: the probe
    Gram of δ, n n' (k R)(k' R') d_out, plus the shared Gram of a, n n' R R' d_in. Materialized:
    building the gradients, (n k R + n' k' R') d_in d_out, then their Gram, n k n' k' d_in d_out.
    This is DESIGN §3's ghost-clipping switch (one probe, one pair) generalized to k probes
    per prompt and chunks of prompts.
    """
    (n_l, k_l, r_l), (n_r, k_r, r_r) = left, right
    ghost = n_l * n_r * r_l * r_r * (k_l * k_r * d_out + d_in)
    materialized = (n_l * k_l * r_l + n_r * k_r * r_r + n_l * k_l * n_r * k_r) * d_in * d_out
    return materialized < ghost


def _linear_gram(left: LinearFeatures, right: LinearFeatures) -> torch.Tensor:
    n_l, k_l, r_l, d_out = left.delta.shape
    n_r, k_r, r_r, _ = right.delta.shape
    d_in = left.a.shape[-1]
    if materialize_rule((n_l, k_l, r_l), (n_r, k_r, r_r), d_in, d_out):
        g_l = torch.einsum("pjto,pti->pjoi", left.delta, left.a).reshape(n_l * k_l, -1)
        g_r = torch.einsum("pjto,pti->pjoi", right.delta, right.a).reshape(n_r * k_r, -1)
        return (g_l @ g_r.T).reshape(n_l, k_l, n_r, k_r).permute(0, 2, 1, 3)
    dd = (left.delta.reshape(-1, d_out) @ right.delta.reshape(-1, d_out).T).view(n_l, k_l, r_l, n_r, k_r, r_r)
    aa = (left.a.reshape(-1, d_in) @ right.a.reshape(-1, d_in).T).view(n_l, 1, r_l, n_r, 1, r_r)
    # In place and reduced over (t, s) where it lies: no permuted copy of the large δ Gram.
    return dd.mul_(aa).sum(dim=(2, 5)).permute(0, 2, 1, 3)


def _recorder(store: dict[str, list[torch.Tensor]]):
    """Forward hook: keep the layer's input, and its output cotangent at every backward."""

    def hook(_module, inputs, output):
        store["a"].append(inputs[0].detach())
        output.register_hook(lambda grad: store["delta"].append(grad.detach()))

    return hook


def _drop_zero_rows(a: torch.Tensor, delta: torch.Tensor, lengths: torch.Tensor | None) -> LinearFeatures:
    """Keep only positions where some probe has a nonzero cotangent (and, given ``lengths``,
    that are not padding)."""
    _, k, t, _ = delta.shape
    live = (delta != 0).any(dim=3).any(dim=1)
    if lengths is not None:
        live &= torch.arange(t, device=a.device)[None, :] < lengths[:, None]
    count = live.sum(dim=1)
    rows = max(int(count.max()), 1)
    order = torch.argsort((~live).to(torch.int8), dim=1, stable=True)[:, :rows]
    keep = (torch.arange(rows, device=a.device)[None, :] < count[:, None]).to(a.dtype)
    a_kept = a.gather(1, order[:, :, None].expand(-1, -1, a.shape[2])) * keep[:, :, None]
    d_index = order[:, None, :, None].expand(-1, k, -1, delta.shape[3])
    d_kept = delta.gather(2, d_index) * keep[:, None, :, None]
    return LinearFeatures(a_kept, d_kept)

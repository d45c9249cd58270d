"""The trainable tail θ_S of a causal LM, its cached frozen prefix, and logits / VJPs from it.

Every eNTK method in :mod:`dcr_fast.ntk` measures Jacobians of the last-position logits
z(x) ∈ R^V with respect to a parameter subset θ_S = the last ``tail_layers`` decoder layers
(+ the output projection when ``include_lm_head``). Nothing below the first tail layer
depends on θ_S, so the frozen prefix is run once per prompt and its output cached; every
later pass (VJP, perturbed forward, structured Gram) runs only the tail from that cache.

Interface (what the other eNTK engines code against)
----------------------------------------------------
``spec = tail_spec(model, tail_layers, include_lm_head)``
    A :class:`TailSpec`: the decoder-layer indices in the tail and ``param_names``, the
    names of θ_S *by use*. With tied embeddings ``"lm_head.weight"`` names the output
    projection only; the embedding lookup stays frozen (it lives in the prefix).
    The final norm runs in the tail but its weight is not in θ_S unless
    ``include_final_norm=True``.
``params = tail_parameters(model, spec)``
    ``{name: tensor}`` of θ_S, detached, in the compute dtype (float64 for float64 models,
    float32 otherwise: bf16/fp16 models are measured in fp32 from their own weights).
    Substitute any of them (e.g. θ + εw) and pass the dict back to :func:`tail_logits`.
``cache = run_prefix(model, input_ids, attention_mask)``
    A :class:`PrefixCache`: ``hidden`` (B, T, d), the hidden state entering the tail, in the
    compute dtype; ``layer_kwargs``, the attention mask / rotary (cos, sin) / position ids
    every tail layer receives; ``last_index`` (B,), each row's last real position. Batches
    are right-padded (see :func:`pad_prompts`); causal attention keeps real positions blind
    to the padding, so a padded row gives the same numbers as the prompt alone.
``z = tail_logits(model, spec, cache, params=None)``
    (B, V) last-position logits from the cache, optionally at substituted parameters
    (``torch.func.functional_call`` with ``tie_weights=False``, so a tied lm_head is
    replaced only in its output-projection use). Differentiable w.r.t. ``params``.
``s = tail_readout(model, spec, cache, readout, params=None)``
    Any function of the tail's output instead of the last-position logits:
    ``readout(hidden, cache, project)`` gets the last tail layer's output at every position
    (B, T, d) and ``project``, which maps hidden states (B, P, d) through the final norm and
    the output projection to logits (B, P, V). ``tail_logits`` is the readout
    :func:`last_logits`; a response's summed loss or a refusal probability are others.
``w = tail_vjp(model, spec, cache_row, token_ids)``
    ``{name: (k, *shape)}``: w_i = ∇_{θ_S} z_i(x) for each token i of one prompt.
``linears, norms = tail_modules(model, spec)``
    θ_S as the structured engines (:mod:`~dcr_fast.ntk.exact`, :mod:`~dcr_fast.ntk.fd`) see
    it: the tail's linear layers by name and its RMSNorm weight names; ``base_model(model)``
    is the decoder stack those names live in.

The model's own parameters are never written to; every substitution is functional.
Supported: transformers' Qwen2 and Llama causal LMs (any model whose base has ``layers``,
``norm`` and whose decoder layers take ``(hidden, attention_mask=, position_embeddings=,
position_ids=)``), eager or SDPA attention, GQA, q/k/v biases, tied or untied lm_head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call


@dataclass(frozen=True)
class TailSpec:
    """Which parameters form θ_S and which modules run in the tail."""

    layer_indices: tuple[int, ...]
    include_lm_head: bool
    include_final_norm: bool
    param_names: tuple[str, ...]
    base_prefix: str
    lm_head_name: str


@dataclass
class PrefixCache:
    """The frozen prefix's output for a right-padded batch of prompts."""

    hidden: torch.Tensor
    layer_kwargs: dict = field(default_factory=dict)
    last_index: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        return self.last_index + 1

    def select(self, rows: torch.Tensor | list[int]) -> PrefixCache:
        """The cache of a subset (or a repetition) of rows, e.g. one row per probe."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.hidden.device)
        return PrefixCache(
            hidden=self.hidden.index_select(0, rows),
            layer_kwargs={k: _select_rows(v, rows) for k, v in self.layer_kwargs.items()},
            last_index=self.last_index.index_select(0, rows),
        )


# readout(hidden (B, T, d), cache, project: (B, P, d) -> logits (B, P, V)) -> any tensor; see the module doc.
Readout = Callable[[torch.Tensor, PrefixCache, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]


def tail_spec(
    model: nn.Module,
    tail_layers: int = 1,
    include_lm_head: bool = True,
    *,
    include_final_norm: bool = False,
) -> TailSpec:
    """θ_S of ``model``: its last ``tail_layers`` decoder layers (+ lm_head, + final norm)."""
    base, prefix = base_model(model)
    n_layers = len(base.layers)
    if not isinstance(tail_layers, int) or isinstance(tail_layers, bool) or not 0 <= tail_layers <= n_layers:
        raise ValueError(f"tail_layers must be an int in [0, {n_layers}], got {tail_layers!r}")
    if tail_layers == 0 and not (include_lm_head or include_final_norm):
        raise ValueError("tail_layers=0 with include_lm_head=False leaves θ_S empty")
    indices = tuple(range(n_layers - tail_layers, n_layers))
    layer_types = getattr(model.config, "layer_types", None) or []
    tail_types = {layer_types[i] for i in indices if i < len(layer_types)}
    if len(tail_types) > 1:
        # The cached attention mask is the one the first tail layer receives.
        raise ValueError(
            f"tail_layers={tail_layers} mixes attention types {sorted(tail_types)} "
            "(sliding-window layers); choose a tail whose layers share one type"
        )
    names = [
        f"{prefix}.layers.{i}.{local}" for i in indices for local, _ in base.layers[i].named_parameters()
    ]
    if include_final_norm:
        names += [f"{prefix}.norm.{local}" for local, _ in base.norm.named_parameters()]
    lm_head_name = _module_name(model, model.get_output_embeddings())
    if include_lm_head:
        names += [f"{lm_head_name}.{local}" for local, _ in model.get_output_embeddings().named_parameters()]
    return TailSpec(indices, include_lm_head, include_final_norm, tuple(names), prefix, lm_head_name)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype eNTK arithmetic runs in: float64 stays, everything else is done in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's weights (the first parameter's: models are not mixed here)."""
    return next(model.parameters()).dtype


def tail_parameters(model: nn.Module, spec: TailSpec) -> dict[str, torch.Tensor]:
    """θ_S as detached tensors in the compute dtype (no copy when the model already is)."""
    dtype = compute_dtype(model_dtype(model))
    return {name: model.get_parameter(name).detach().to(dtype) for name in spec.param_names}


def pad_prompts(prompts: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D LongTensors into ``(input_ids, attention_mask)`` of shape (B, T_max)."""
    if not prompts:
        raise ValueError("prompts must be a non-empty list of 1-D LongTensors")
    for i, p in enumerate(prompts):
        if not isinstance(p, torch.Tensor) or p.dim() != 1 or p.numel() == 0 or p.dtype != torch.long:
            raise ValueError(f"prompts[{i}] must be a non-empty 1-D LongTensor of token ids, got {describe(p)}")
    t_max = max(p.numel() for p in prompts)
    ids = torch.full((len(prompts), t_max), pad_id, dtype=torch.long, device=prompts[0].device)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, : p.numel()] = p
        mask[row, : p.numel()] = 1
    return ids, mask


@torch.no_grad()
def run_prefix(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    spec: TailSpec,
) -> PrefixCache:
    """Run the frozen prefix once and cache what enters the tail (see the module docstring)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(f"input_ids must be a (B, T) LongTensor, got {describe(input_ids)}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
            )
        lengths = attention_mask.sum(dim=1)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        if not torch.equal(attention_mask.bool(), positions[None, :] < lengths[:, None]) or (lengths == 0).any():
            raise ValueError("attention_mask must be right padding (ones then zeros), with at least one token per row")
        if bool((lengths == input_ids.shape[1]).all()):
            attention_mask = None  # no padding: let the attention take its causal fast path
    else:
        lengths = torch.full((input_ids.shape[0],), input_ids.shape[1], device=input_ids.device)

    base, _ = base_model(model)
    entry = base.layers[spec.layer_indices[0]] if spec.layer_indices else base.norm
    captured: dict = {}

    def capture(_module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["kwargs"] = kwargs
        raise _PrefixDone

    handle = entry.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _PrefixDone:
        pass
    finally:
        handle.remove()

    dtype = compute_dtype(model_dtype(model))
    layer_kwargs = {
        key: _cast_floating(value, dtype)
        for key, value in captured["kwargs"].items()
        if key not in ("past_key_values", "past_key_value", "use_cache", "hidden_states")
    }
    return PrefixCache(captured["hidden"].to(dtype), layer_kwargs, (lengths - 1).long())


def tail_logits(
    model: nn.Module,
    spec: TailSpec,
    cache: PrefixCache,
    params: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Last-position logits (B, V) of the tail run from ``cache`` at θ_S = ``params``."""
    return tail_readout(model, spec, cache, last_logits, params)


def tail_readout(
    model: nn.Module,
    spec: TailSpec,
    cache: PrefixCache,
    readout: Readout,
    params: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``readout(hidden, cache, project)`` of the tail run from ``cache`` at θ_S = ``params``."""
    params = tail_parameters(model, spec) if params is None else params
    unknown = set(params) - set(spec.param_names)
    if unknown:
        raise ValueError(f"params has names outside θ_S: {sorted(unknown)[:3]}")
    runner = _TailRunner(model, spec)
    return functional_call(
        runner,
        {f"model.{k}": v for k, v in _complete(model, spec, params).items()},
        (cache, readout),
        tie_weights=False,
    )


def last_logits(hidden: torch.Tensor, cache: PrefixCache, project: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The readout of :func:`tail_logits`: logits (B, V) at each row's last real position."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return project(hidden[rows, cache.last_index][:, None])[:, 0]


def tail_vjp(
    model: nn.Module,
    spec: TailSpec,
    cache: PrefixCache,
    token_ids: torch.Tensor,
    params: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """w_i = ∇_{θ_S} z_i(x) for each i in ``token_ids`` of a one-prompt cache: {name: (k, *shape)}."""
    if cache.batch_size != 1:
        raise ValueError(f"tail_vjp takes the cache of one prompt, got a batch of {cache.batch_size}")
    params = {k: v.detach().requires_grad_(True) for k, v in (params or tail_parameters(model, spec)).items()}
    with torch.enable_grad():
        z = tail_logits(model, spec, cache, params)[0]
        names = list(params)
        grads = [
            torch.autograd.grad(z[int(i)], [params[n] for n in names], retain_graph=True, allow_unused=True)
            for i in token_ids
        ]
    return {
        n: torch.stack([g[j] if g[j] is not None else torch.zeros_like(params[n]) for g in grads])
        for j, n in enumerate(names)
    }


def base_model(model: nn.Module) -> tuple[nn.Module, str]:
    """The decoder stack of a causal LM (``model.model`` for Qwen2/Llama) and its attribute name.

    Raises a ``ValueError`` for models the eNTK engines cannot split into prefix and tail:
    no ``layers``/``norm`` on the base, or no output projection.
    """
    prefix = getattr(model, "base_model_prefix", "model")
    base = getattr(model, prefix, None)
    if base is None or not hasattr(base, "layers") or not hasattr(base, "norm"):
        raise ValueError(
            f"model must be a transformers causal LM with decoder layers and a final norm "
            f"(e.g. Qwen2ForCausalLM, LlamaForCausalLM), got {type(model).__name__}"
        )
    if model.get_output_embeddings() is None:
        raise ValueError(f"model {type(model).__name__} has no output projection (lm_head)")
    return base, prefix


def tail_modules(model: nn.Module, spec: TailSpec) -> tuple[dict[str, nn.Linear], list[str]]:
    """θ_S split the way the structured engines (exact Gram, batched fd) treat it.

    Returns the tail's linear layers by module name (lm_head excluded: it has its closed
    form) and the names of its other parameters in θ_S order, which must be hidden-size
    RMSNorm weights; anything else is a ``ValueError``, since neither engine knows its
    gradient's structure.
    """
    linears: dict[str, nn.Linear] = {}
    norms: list[str] = []
    names = set(spec.param_names)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and f"{name}.weight" in names and name != spec.lm_head_name:
            linears[name] = module
    hidden = getattr(model.config, "hidden_size", None)
    for name in spec.param_names:
        module_name, _, attr = name.rpartition(".")
        if module_name in linears or module_name == spec.lm_head_name:
            continue
        module = model.get_submodule(module_name)
        if attr != "weight" or not hasattr(module, "variance_epsilon") or module.weight.shape != (hidden,):
            raise ValueError(
                f"the exact and fd eNTK support linear layers and hidden-size RMSNorm weights in θ_S; "
                f"{name} ({type(module).__name__}) is neither"
            )
        norms.append(name)
    return linears, norms


def describe(x) -> str:
    """How a bad argument reads in an error message: a tensor's dtype and shape, else its type."""
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


class _TailRunner(nn.Module):
    """Holds the model as a submodule so ``functional_call`` can substitute θ_S by name."""

    def __init__(self, model: nn.Module, spec: TailSpec):
        super().__init__()
        self.model = model
        self.spec = spec

    def forward(self, cache: PrefixCache, readout: Readout) -> torch.Tensor:
        base, _ = base_model(self.model)
        hidden = cache.hidden
        for i in self.spec.layer_indices:
            out = base.layers[i](hidden, **cache.layer_kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        head = self.model.get_output_embeddings()
        return readout(hidden, cache, lambda states: head(base.norm(states)))


class _PrefixDone(Exception):
    """Stops the prefix forward once the tail's input has been captured."""


def _complete(model: nn.Module, spec: TailSpec, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``params`` plus, for bf16/fp16 models, every other weight the tail touches lifted to the
    compute dtype (θ_S not given, the final norm, an lm_head outside θ_S); full-precision
    models use their own tensors for anything not given."""
    dtype = compute_dtype(model_dtype(model))
    if model_dtype(model) == dtype:
        return params
    base, _ = base_model(model)
    names = [
        *spec.param_names,
        *(f"{spec.base_prefix}.norm.{n}" for n, _ in base.norm.named_parameters()),
        *(f"{spec.lm_head_name}.{n}" for n, _ in model.get_output_embeddings().named_parameters()),
    ]
    lifted = {name: model.get_parameter(name).detach().to(dtype) for name in names if name not in params}
    return {**lifted, **params}


def _module_name(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules(remove_duplicate=False):
        if module is target:
            return name
    raise ValueError("the output projection is not a submodule of the model")


def _cast_floating(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_cast_floating(v, dtype) for v in value)
    return value


def _select_rows(value, rows: torch.Tensor):
    """Rows of a batched layer argument; batch-1 broadcasts (rotary, positions) repeat freely."""
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return value if value.shape[0] == 1 else value.index_select(0, rows)
    if isinstance(value, tuple):
        return tuple(_select_rows(v, rows) for v in value)
    return value

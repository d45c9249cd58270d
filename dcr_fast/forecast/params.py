"""The parameter sets a forecast can be taken over, chosen by name from :data:`PARAM_SETS`.

Each set says which part of the model is the eNTK tail (what the structured Gram records) and
how the recorded features become the features of its own parameters:

* ``"tail"`` — θ_S of the eNTK engine: the last ``tail_layers`` decoder layers and the output
  projection (by use: with tied embeddings the lookup is not included). The features are the
  engine's own.
* ``"lora"`` — the parameters STL trains: LoRA adapters W + (α/r)·B·A on every linear layer of
  every decoder layer (peft's ``all-linear``; the output projection excluded), at their
  initialisation B = 0. There ∇_A = (α/r)·Bᵀ(·) = 0, so only B moves, and for one layer
  ∇_B = (α/r) Σ_t δ_t (A a_t)ᵀ: the layer's recorded (a_t, δ_t) with a_t projected to r
  dimensions, a d_out × r matrix small enough to materialize for every prompt. A is drawn
  as peft draws it (kaiming-uniform, U(±1/√d_in)) from ``lora_seed``; the STL run's own
  draw differs. Over draws of A, E[(A a)·(A a′)] = r/(3 d_in)·(a·a′): the LoRA forecast is a
  random projection of the full-weight forecast over all linear layers. The whole decoder
  is the tail here, so it costs a backward through every layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from dcr_fast.ntk.exact import ProbeFeatures
from dcr_fast.ntk.tail import TailSpec, base_model, compute_dtype, model_dtype, tail_modules, tail_spec


@dataclass(frozen=True)
class ParamSetOptions:
    """What the parameter sets read from the forecast's settings."""

    tail_layers: int = 1
    include_lm_head: bool = True
    lora_r: int = 8
    lora_alpha: float = 32.0
    lora_seed: int = 0


Transform = Callable[[ProbeFeatures], ProbeFeatures]


@dataclass(frozen=True)
class ParamSet:
    """How one parameter set is measured: its tail, and the map from tail features to its own."""

    name: str
    describe: Callable[[ParamSetOptions], str]  # the set in words, for reports
    build: Callable[[nn.Module, ParamSetOptions], tuple[TailSpec, Transform]]


def _tail(model: nn.Module, options: ParamSetOptions) -> tuple[TailSpec, Transform]:
    return tail_spec(model, options.tail_layers, options.include_lm_head), lambda features: features


def lora_projections(model: nn.Module, options: ParamSetOptions) -> tuple[TailSpec, dict[str, torch.Tensor]]:
    """The decoder-wide tail of ``"lora"`` and each adapted layer's A scaled by α/r (r × d_in,
    float64 on the CPU), by module name in the layers' order; references draw the same."""
    base, _ = base_model(model)
    spec = tail_spec(model, len(base.layers), include_lm_head=False)
    linears, _ = tail_modules(model, spec)
    generator = torch.Generator().manual_seed(options.lora_seed)
    scale = options.lora_alpha / options.lora_r
    return spec, {
        name: scale * (2 * torch.rand(options.lora_r, m.in_features, generator=generator, dtype=torch.float64) - 1)
        / math.sqrt(m.in_features)
        for name, m in linears.items()
    }


def _lora(model: nn.Module, options: ParamSetOptions) -> tuple[TailSpec, Transform]:
    spec, projections = lora_projections(model, options)
    device = next(model.parameters()).device
    dtype = compute_dtype(model_dtype(model))
    projections = {name: a.to(device=device, dtype=dtype) for name, a in projections.items()}

    def to_lora(features: ProbeFeatures) -> ProbeFeatures:
        grads = [
            torch.einsum("pjto,ptr->pjor", f.delta, f.a @ projections[name].T).flatten(2)
            for name, f in zip(projections, features.linears)
        ]
        return replace(
            features,
            linears=[],
            dense=torch.cat(grads, dim=2),
            dense_layout=tuple((f"{name}.lora_B", g.shape[2]) for name, g in zip(projections, grads)),
            head=None,
        )

    return spec, to_lora


PARAM_SETS: dict[str, ParamSet] = {
    s.name: s
    for s in (
        ParamSet(
            "tail",
            lambda o: f"θ_S = the last {o.tail_layers} decoder layer(s)"
            + (" and the output projection" if o.include_lm_head else ""),
            _tail,
        ),
        ParamSet(
            "lora",
            lambda o: f"the LoRA B matrices (r = {o.lora_r}, α = {o.lora_alpha:g}, A from seed {o.lora_seed}) "
            "of every decoder linear layer at initialisation",
            _lora,
        ),
    )
}

"""Empirical NTK of causal LMs: the K(x', x) blocks and normalized similarities of the DCR paper."""

from dcr_fast.ntk.tail import PrefixCache, TailSpec, pad_prompts, run_prefix, tail_logits, tail_parameters, tail_spec, tail_vjp

__all__ = [
    "PrefixCache",
    "TailSpec",
    "pad_prompts",
    "run_prefix",
    "tail_logits",
    "tail_parameters",
    "tail_spec",
    "tail_vjp",
]

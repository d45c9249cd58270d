"""Empirical NTK of causal LMs: the K(x', x) blocks and normalized similarities of the DCR paper.

``entk_block`` measures one prompt pair, ``entk_matrix`` all pairs of named prompt groups;
:mod:`dcr_fast.ntk.tail` is the shared machinery (θ_S, cached prefix, tail passes) that the
exact, finite-difference and reference engines are built on.
"""

from dcr_fast.ntk.block import METHODS, EntkBlock, entk_block
from dcr_fast.ntk.matrix import EntkMatrix, EntkMatrixConfig, entk_matrix
from dcr_fast.ntk.tail import (
    PrefixCache,
    TailSpec,
    pad_prompts,
    run_prefix,
    tail_logits,
    tail_parameters,
    tail_spec,
    tail_vjp,
)

__all__ = [
    "METHODS",
    "EntkBlock",
    "EntkMatrix",
    "EntkMatrixConfig",
    "PrefixCache",
    "TailSpec",
    "entk_block",
    "entk_matrix",
    "pad_prompts",
    "run_prefix",
    "tail_logits",
    "tail_parameters",
    "tail_spec",
    "tail_vjp",
]

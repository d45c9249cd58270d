"""The backends, in one table: how each computes the two row log-sum-exps, and what ``"auto"`` picks.

Every backend takes the raw embeddings (each normalizes them its own way) and returns
``(lse_p, lse_n)``; the O(B) epilogue after that is shared (``dcr_fast.circle_loss.api``).
``labels``: pairs from class labels; ``pairs``: explicit ``indices_tuple`` pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from dcr_fast.circle_loss import chunked, reference, triton_backend
from dcr_fast.circle_loss.pairs import circle_lse_sparse

Backend = Literal["auto", "triton", "torch", "chunked"]


@dataclass(frozen=True)
class Implementation:
    labels: Callable  # (embeddings, ref_emb, labels, ref_labels, self_offset, margins) -> (lse_p, lse_n)
    pairs: Callable  # (embeddings, ref_emb, ((a_p, p), (a_n, n)), margins) -> (lse_p, lse_n)


IMPLEMENTATIONS: dict[str, Implementation] = {
    # the pure-PyTorch reference: materializes the B×M similarity (mirrors PML)
    "torch": Implementation(reference.lse_from_labels, reference.lse_from_pairs),
    # row chunks and a recomputing backward: O(chunk·M) memory, any device
    "chunked": Implementation(chunked.lse_from_labels, circle_lse_sparse),
    # fused Triton kernels: online log-sum-exp over column tiles, O(B·d) memory
    "triton": Implementation(triton_backend.lse_from_labels, circle_lse_sparse),
}
BACKENDS = ("auto", *IMPLEMENTATIONS)

# "auto" streams instead of materializing once the similarity matrix would exceed this many elements.
AUTO_CHUNK_THRESHOLD = 1 << 24


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def choose(backend: str, embeddings: Tensor, n_ref: int) -> Implementation:
    """The implementation of ``backend``; ``"auto"``: Triton for CUDA tensors; on the CPU chunked
    when B·M is large, or when d ≤ 512 and the fused row kernels serve the tensors, else torch."""
    check_backend(backend)
    if backend == "auto":
        backend = _auto(embeddings, n_ref)
    return IMPLEMENTATIONS[backend]


def _auto(embeddings: Tensor, n_ref: int) -> str:
    if embeddings.device.type == "cuda":
        return "triton"
    # Measured on the CPU (bench/results/circle_loss-cpu-*.json): with the fused row kernels the
    # chunked path wins at every B for d = 128 (2-3x the reference); at d = 1,536 its recomputed
    # S costs more than the epilogue saves until S itself is large.
    fused_wins = chunked.fused_rows_available(embeddings) and embeddings.shape[1] <= 512
    if fused_wins or embeddings.shape[0] * n_ref > AUTO_CHUNK_THRESHOLD:
        return "chunked"
    return "torch"

"""Drop-in fast Circle loss: pytorch-metric-learning's call and numbers, O(B·d) memory.

``CircleLoss()(embeddings, labels)`` returns what
``pytorch_metric_learning.losses.CircleLoss()(embeddings, labels)`` returns (PML 2.9: cosine
similarity, all pairs from labels with the diagonal excluded, ``ref_emb``/``ref_labels``,
3- and 4-tuple ``indices_tuple``, α detached, rows lacking a positive or a negative
dropped, mean over rows whose loss is > 0), with the same gradients. ``variant="dcr"`` uses
the DCR paper's appendix A.8 weights α_p = [Δp - s]₊, α_n = [s - Δn]₊ instead.

Every backend computes only the two per-row log-sum-exps (positives and negatives) of the
Circle logits; the O(B) epilogue (softplus, row masks, mean over non-zero rows) is shared, so
the backends differ only in how they get those two vectors (the table in :mod:`.backends`):

* ``"torch"``   — the pure-PyTorch reference: materializes the B×M similarity (mirrors PML).
* ``"chunked"`` — streams row chunks (forward and a recomputing backward): O(chunk·M) working
  memory, any device; the CPU path, with the extension's fused C++ row kernels when built.
* ``"triton"``  — fused Triton kernels (``dcr_fast.kernels.circle_loss``): online
  log-sum-exp over column tiles, recompute in the backward, never a B×M tensor saved.
* ``"auto"``    — Triton for CUDA tensors; on the CPU chunked when B·M is large, or when d ≤ 512
  and the extension's fused row kernels are built (float32/float64), else torch.

Accumulation is fp32 for fp16/bf16/fp32 inputs and fp64 for fp64 inputs; the loss is
returned in the embeddings' dtype, as PML does. Explicit ``indices_tuple`` pairs go through
a sparse pair path (memory O(#pairs·d)) on the non-reference backends.

Modules, one concern each: :mod:`.api` (this public face and the shared epilogue),
:mod:`.schema` (m, γ, variant), :mod:`.checks` (argument validation), :mod:`.pairs` (which
pairs count), :mod:`.reference` (pure PyTorch), :mod:`.chunked`, :mod:`.triton_backend`,
:mod:`.ops` (every compiled op's typed wrapper and fake), :mod:`.backends` (the table) and
:mod:`.distributed` (``distributed=True``: every rank's rows against the whole global batch).
"""

from dcr_fast.circle_loss.api import CircleLoss, circle_loss
from dcr_fast.circle_loss.chunked import circle_lse_chunked
from dcr_fast.circle_loss.reference import circle_lse_reference
from dcr_fast.circle_loss.schema import CircleMargins

__all__ = ["CircleLoss", "circle_loss", "CircleMargins", "circle_lse_reference", "circle_lse_chunked"]

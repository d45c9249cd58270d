"""Validation of the PML-style arguments: a ``ValueError`` naming the argument and what was expected."""

from __future__ import annotations

import torch
from torch import Tensor

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_embeddings(name: str, t) -> None:
    """Type, shape and dtype always; finite values where reading them costs no device sync (CPU
    tensors, eager), or anywhere under ``torch.autograd.set_detect_anomaly(True)`` (on CUDA a NaN
    otherwise reaches the loss, as in PML, and the default path stays sync-free)."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(t.shape)}")
    if t.dtype not in _FLOATS:
        raise ValueError(f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)}")
    if _reads_values(t) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def _reads_values(t: Tensor) -> bool:
    """Whether a check may read ``t``'s values: in eager mode on the CPU, or under anomaly detection."""
    if torch.compiler.is_compiling():  # traced values are not data; a read would split the graph
        return False
    return t.device.type == "cpu" or torch.is_anomaly_enabled()


def check_labels(name: str, t, n: int, device: torch.device, rows_of: str = "embeddings") -> Tensor:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of integer class ids, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with {n} entries (one per row of {rows_of}), got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype, got {t.dtype}")
    return t.to(device=device, dtype=torch.int64)


def check_inputs(embeddings, labels, indices_tuple, ref_emb, ref_labels):
    """Validates the PML-style arguments; returns (labels, ref_labels, pairs or None)."""
    check_embeddings("embeddings", embeddings)
    n_rows = embeddings.shape[0]
    if ref_emb is not None:
        check_embeddings("ref_emb", ref_emb)
        if ref_emb.shape[1] != embeddings.shape[1]:
            raise ValueError(f"ref_emb must have dim {embeddings.shape[1]} like embeddings, got {ref_emb.shape[1]}")
        if ref_emb.device != embeddings.device:
            raise ValueError(f"ref_emb must be on {embeddings.device} like embeddings, got {ref_emb.device}")
    n_cols = n_rows if ref_emb is None else ref_emb.shape[0]
    if labels is None and indices_tuple is None:
        raise ValueError("labels or indices_tuple is required")
    if labels is not None:
        labels_in = labels
        labels = check_labels("labels", labels, n_rows, embeddings.device)
        if ref_emb is None:
            ref_labels = labels
        elif ref_labels is None:
            if n_cols != n_rows:
                raise ValueError("ref_labels is required when ref_emb has a different number of rows")
            ref_labels = labels
        else:
            # Checked against ref_emb even when it is the labels object (every backend reads one
            # label per reference row), then PML's rule: the diagonal is excluded exactly when the
            # reference labels are the batch labels object; that identity survives the move.
            checked = check_labels("ref_labels", ref_labels, n_cols, embeddings.device, "ref_emb")
            ref_labels = labels if ref_labels is labels_in else checked
    if indices_tuple is None:
        return labels, ref_labels, None
    return labels, ref_labels, check_indices_tuple(indices_tuple, n_rows, n_cols, embeddings.device)


def check_indices_tuple(indices_tuple, n_rows: int, n_cols: int, device: torch.device) -> tuple[Tensor, ...]:
    """PML's 3-tuple (anchor, positive, negative) or 4-tuple (anchor1, positive, anchor2,
    negative) as a 4-tuple of int64 tensors on ``device``, every index in range."""
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        raise ValueError("indices_tuple must be a tuple of 3 (anchor, positive, negative) "
                         "or 4 (anchor1, positive, anchor2, negative) tensors")
    anchors = (0,) if len(indices_tuple) == 3 else (0, 2)
    pairs = []
    for i, t in enumerate(indices_tuple):
        if not isinstance(t, Tensor) or t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"indices_tuple[{i}] must be a 1-D integer tensor")
        t = t.to(device=device, dtype=torch.int64)
        limit = n_rows if i in anchors else n_cols
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= limit):
            raise ValueError(f"indices_tuple[{i}] has indices outside [0, {limit})")
        pairs.append(t)
    if len(pairs) == 3:
        pairs = [pairs[0], pairs[1], pairs[0], pairs[2]]
    if pairs[0].numel() != pairs[1].numel() or pairs[2].numel() != pairs[3].numel():
        raise ValueError("indices_tuple: anchors and their positives/negatives must have equal lengths")
    return tuple(pairs)

"""Rank statistics for judging a forecast: average ranks, Spearman's ρ and the AUROC.

Written here rather than imported (scipy and scikit-learn are not dependencies). Ties get
their average rank, so the AUROC counts a tied (positive, negative) pair as one half, and
Spearman's ρ is Pearson's correlation of average ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def ranks(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """1-based ranks in ascending order, ties sharing their average rank (float64)."""
    values = _vector(values, "values")
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    # Runs of equal values: each gets the mean of the ranks it spans.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    out = np.empty(len(values))
    for start, end in zip(starts, ends):
        out[order[start:end]] = (start + end + 1) / 2
    return out


def auroc(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the positives in ``labels``: the probability
    that a random positive scores above a random negative (ties count one half).

    Computed from rank sums (Mann-Whitney U) in O(n log n). Raises ``ValueError`` when the
    labels hold only one class, where the AUROC is undefined.
    """
    scores = _vector(scores, "scores")
    labels = np.asarray(labels)
    if labels.shape != scores.shape:
        raise ValueError(f"labels must have the shape of scores {scores.shape}, got {labels.shape}")
    if labels.dtype != bool and not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be booleans (or 0/1)")
    labels = labels.astype(bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        raise ValueError(f"auroc needs both classes; got {positives} positives and {negatives} negatives")
    rank_sum = ranks(scores)[labels].sum()
    return float((rank_sum - positives * (positives + 1) / 2) / (positives * negatives))


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman's rank correlation of two equally long vectors (nan when one is constant)."""
    ra, rb = ranks(_vector(a, "a")), ranks(_vector(b, "b"))
    if ra.shape != rb.shape:
        raise ValueError(f"spearman needs vectors of one length, got {ra.shape} and {rb.shape}")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def _vector(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of numbers, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds non-finite values")
    return array

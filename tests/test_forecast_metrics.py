"""AUROC, Spearman and ranks against brute-force definitions; the flip report on known scores."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dcr_fast.forecast import auroc, flip_report, spearman
from dcr_fast.forecast.baselines import random_scores
from dcr_fast.forecast.metrics import ranks


def _auroc_by_pairs(scores, labels) -> float:
    """The definition: over every (positive, negative) pair, 1 if the positive scores higher, ½ if tied."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_counts_pairs(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    scores = rng.integers(0, 6, n).astype(float)  # many ties on purpose
    labels = rng.random(n) < 0.3
    labels[0], labels[1] = True, False
    assert auroc(scores, labels) == pytest.approx(_auroc_by_pairs(scores, labels), abs=1e-12)


def test_auroc_extremes_and_errors():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([3, 2, 1], [True, True, False]) == 1.0 and auroc([1, 2, 3], [True, False, False]) == 0.0
    with pytest.raises(ValueError, match="needs both classes; got 3 positives and 0 negatives"):
        auroc([1, 2, 3], [1, 1, 1])
    with pytest.raises(ValueError, match="labels must have the shape of scores"):
        auroc([1, 2, 3], [1, 0])
    with pytest.raises(ValueError, match="scores holds non-finite values"):
        auroc([1, float("nan")], [1, 0])
    with pytest.raises(ValueError, match="labels must be booleans"):
        auroc([1, 2], [2, 0])


def test_ranks_average_ties_and_spearman():
    assert ranks([10, 20, 10, 5]).tolist() == [2.5, 4.0, 2.5, 1.0]
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 4, 30), rng.normal(size=30)
    ra, rb = ranks(a), ranks(b)
    assert spearman(a, b) == pytest.approx(np.corrcoef(ra, rb)[0, 1])
    assert spearman([1, 2, 3], [10, 20, 30]) == 1.0 and spearman([1, 2, 3], [3, 2, 1]) == -1.0
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="vectors of one length"):
        spearman([1, 2], [1, 2, 3])


def test_flip_report_scores_the_population_that_could_flip():
    # Prompt 0 refused already before STL: it cannot flip and is left out.
    scores = {"forecast": np.array([9.0, 0.3, 0.1, 0.2, 0.5]), "random": random_scores(5, seed=1),
              "constant": np.zeros(5)}
    before = [True, False, False, False, False]
    after = [True, True, False, False, True]
    report = flip_report(scores, before, after)
    assert report["forecast"]["population"] == 4 and report["forecast"]["flipped"] == 2
    assert report["forecast"]["auroc"] == pytest.approx(_auroc_by_pairs([0.3, 0.1, 0.2, 0.5], [1, 0, 0, 1]))
    assert report["baselines"]["constant"]["auroc"] == 0.5
    assert set(report["baselines"]) == {"random", "constant"}
    none_flipped = flip_report(scores, before, [True, False, False, False, False])
    assert none_flipped["forecast"]["auroc"] is None and "needs both classes" in none_flipped["forecast"]["note"]
    with pytest.raises(ValueError, match=r"one entry per prompt \(5\)"):
        flip_report(scores, before[:4], after)
    with pytest.raises(ValueError, match=r"scores\['bad'\] must have one value per prompt"):
        flip_report({**scores, "bad": np.zeros(3)}, before, after)

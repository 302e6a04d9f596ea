"""Pure figures of how well a confidence score predicts correctness (no llama.cpp, no I/O): `calibrate`'s.

    auroc(scores, correct)          P(a correct item scores above a wrong one), ties counting 1/2 (Mann–Whitney U)
    brier(probs, correct)           mean (p - correct)^2
    reliability(probs, correct, B)  B equal-width bins of the probability, [0, 1/B), [1/B, 2/B), ... [1 - 1/B, 1]:
                                    per bin its items, their mean probability and their accuracy
    ece(bins)                       expected calibration error: sum over bins of n_b / n * |accuracy_b - mean p_b|
    coverage_curve(scores, correct) accuracy of the k surest items, k = 1..n (selective answering: answer only the
                                    surest, abstain on the rest)
    prr(scores, correct)            prediction-rejection ratio: (A_score - A_random) / (A_oracle - A_random), A the
                                    mean over k = 1..n of the accuracy kept when the n - k least sure are rejected;
                                    1 = the score rejects the errors first, 0 = no better than chance, < 0 worse

Scores tied with each other are taken in every order at once: where the k surest items cut through a group of
equal scores, the group counts with its mean accuracy (the expected accuracy over the orders of the tie), so the
curves and the PRR do not depend on how a sort breaks ties.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def _arrays(scores, correct) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"scores and correctness must be two vectors of one length, got {s.shape} and {y.shape}")
    return s, y


def auroc(scores, correct) -> float:
    """Area under the ROC curve of `scores` for `correct` (1/0): nan unless both classes are there."""
    s, y = _arrays(scores, correct)
    pos, neg = int(y.sum()), int(len(y) - y.sum())
    if pos == 0 or neg == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[y == 1].sum() - pos * (pos + 1) / 2
    return float(u / (pos * neg))


def brier(probs, correct) -> float:
    p, y = _arrays(probs, correct)
    return float(np.mean((p - y) ** 2)) if len(p) else math.nan


@dataclass(frozen=True)
class Bin:
    lo: float
    hi: float
    n: int
    mean_prob: float  # nan for an empty bin
    accuracy: float  # nan for an empty bin


def reliability(probs, correct, bins: int = 10) -> list[Bin]:
    """Equal-width bins over [0, 1] (the last one closed: p = 1 falls in it)."""
    p, y = _arrays(probs, correct)
    at = np.minimum((p * bins).astype(np.int64), bins - 1)
    out = []
    for b in range(bins):
        m = at == b
        n = int(m.sum())
        out.append(Bin(b / bins, (b + 1) / bins, n, float(p[m].mean()) if n else math.nan,
                       float(y[m].mean()) if n else math.nan))
    return out


def ece(bins: list[Bin]) -> float:
    n = sum(b.n for b in bins)
    if not n:
        return math.nan
    return float(sum(b.n / n * abs(b.accuracy - b.mean_prob) for b in bins if b.n))


def coverage_curve(scores, correct) -> np.ndarray:
    """acc[k - 1] = the expected accuracy of the k highest-scoring items (ties: see the module docstring)."""
    s, y = _arrays(scores, correct)
    n = len(s)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    kept = np.empty(n)
    i, total = 0, 0.0
    while i < n:
        j = i
        while j + 1 < n and s[j + 1] == s[i]:
            j += 1
        mean = y[i:j + 1].mean()
        for k in range(i, j + 1):  # k + 1 items kept: the group's first k - i + 1 at its mean accuracy
            kept[k] = (total + (k - i + 1) * mean) / (k + 1)
        total += y[i:j + 1].sum()
        i = j + 1
    return kept


def prr(scores, correct) -> float:
    """The prediction-rejection ratio (module docstring); nan when every item is right or every one wrong."""
    s, y = _arrays(scores, correct)
    acc = y.mean() if len(y) else math.nan
    if not len(y) or acc in (0.0, 1.0):
        return math.nan
    a_score = float(coverage_curve(s, y).mean())
    a_oracle = float(coverage_curve(y, y).mean())  # the correct ones first
    return (a_score - acc) / (a_oracle - acc)

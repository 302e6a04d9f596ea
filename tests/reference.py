"""Reference numerics written here, independently of llamalens.core.stats: what the tests compare llamalens with.

Plain float64 numpy, the textbook formulas, nothing shared with the code under test.
"""

from __future__ import annotations

import numpy as np


def log_softmax(logits) -> np.ndarray:
    """log p over the last axis: x - max - log(sum(exp(x - max)))."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def kl_divergence(logits_p, logits_q) -> float:
    """KL(P || Q) = sum p (log p - log q) over the whole vocabulary."""
    lp, lq = log_softmax(logits_p), log_softmax(logits_q)
    return float((np.exp(lp) * (lp - lq)).sum())


def full_windows(n: int, ctx: int, stride: int) -> list[tuple[int, int, int, bool]]:
    """The full protocol written out: (start, length, first scored index, BOS first) of each window.

    Window 1 is stream tokens 0..ctx-1 (token 0 is BOS) and scores 1..ctx-1; each next window ends `stride`
    tokens later (or at the end of the stream), is at most ctx long, scores only the tokens not scored
    before, and starts with BOS in place of its first token, as llama.cpp's perplexity tool does.
    """
    out, scored_to = [], min(ctx, n)
    out.append((0, scored_to, 1, False))
    while scored_to < n:
        end = min(scored_to + stride, n)
        start = max(0, end - ctx)
        out.append((start, end - start, scored_to - start, True))
        scored_to = end
    return out

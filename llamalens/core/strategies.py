"""Pure functions of token sequences for the decoding strategies: no llama.cpp, no I/O.

    banned_tokens(history, n)        the tokens that would repeat an n-gram of the history
    hypothesis_score(sum_lp, length, alpha)   a beam hypothesis's score, as transformers computes it
    sequence_metrics(logprobs, ids)  per-sample figures the strategies are compared by

No-repeat n-gram blocking follows transformers' NoRepeatNGramLogitsProcessor: the history is the whole
sequence the model sees (prompt + generated tokens), and a token is banned when the last n-1 tokens
followed by it form an n-gram that already occurs in the history.

Per-sample metrics (end-of-generation tokens excluded from the text measures, included in the
sequence logprob as a scored token):
    seq_logprob   sum of the raw logprobs of the sample's tokens
    mean_logprob  seq_logprob / tokens;   perplexity = exp(-mean_logprob)
    distinct_1/2  distinct unigrams / bigrams over all unigrams / bigrams of the sample's text
    rep_4         share of the sample's 4-grams that repeat an earlier 4-gram of it (Welleck et al.'s
                  seq-rep-4: 1 - distinct 4-grams / 4-grams); the degenerate loop beam search falls into
    length        generated tokens
"""

from __future__ import annotations

import math


def banned_tokens(history: list[int], n: int) -> set[int]:
    """Tokens t such that history[-(n-1):] + [t] is an n-gram already in `history` (n <= 0: none)."""
    if n <= 0 or len(history) < n:
        return set(history) if n == 1 else set()
    tail = tuple(history[len(history) - n + 1:])
    return {history[i + n - 1] for i in range(len(history) - n + 1) if tuple(history[i:i + n - 1]) == tail}


def repeated_ngrams(ids: list[int], n: int) -> int:
    """How many of the n-grams of `ids` repeat an earlier one."""
    seen: set[tuple] = set()
    rep = 0
    for i in range(len(ids) - n + 1):
        g = tuple(ids[i:i + n])
        rep += g in seen
        seen.add(g)
    return rep


def distinct_n(ids: list[int], n: int) -> float:
    """Distinct n-grams / n-grams of one sequence (nan when it has none)."""
    total = len(ids) - n + 1
    if total <= 0:
        return float("nan")
    return len({tuple(ids[i:i + n]) for i in range(total)}) / total


def hypothesis_score(sum_logprob: float, length: int, length_penalty: float) -> float:
    """sum logprob / length ** length_penalty (transformers' BeamHypotheses.add). `length` counts the
    generated tokens before the end-of-generation token (whose logprob is in the sum), as transformers
    counts them; a hypothesis that ends at once (length 0) counts as length 1, where transformers divides
    by zero."""
    return sum_logprob / (max(length, 1) ** length_penalty)


def sequence_metrics(logprobs: list[float], ids: list[int], eog: list[bool] | None = None) -> dict:
    """The figures of one sample (see the module docstring); `eog` marks end-of-generation tokens."""
    eog = eog or [False] * len(ids)
    text_ids = [t for t, e in zip(ids, eog) if not e]
    n = len(logprobs)
    seq = float(sum(logprobs))
    mean = seq / n if n else float("nan")
    grams4 = len(text_ids) - 3
    return {"seq_logprob": seq, "mean_logprob": mean, "perplexity": math.exp(-mean) if n else float("nan"),
            "distinct_1": distinct_n(text_ids, 1), "distinct_2": distinct_n(text_ids, 2),
            "rep_4": repeated_ngrams(text_ids, 4) / grams4 if grams4 > 0 else float("nan"), "length": n}


def best_of_ranking(draws: list[tuple[float, int]], by: str = "sum") -> list[int]:
    """Indices of draws (sum logprob, tokens) best first, by sequence ("sum") or mean logprob; ties keep
    draw order."""
    def key(i):
        s, n = draws[i]
        return -(s if by == "sum" else (s / n if n else -math.inf))
    return sorted(range(len(draws)), key=lambda i: (key(i), i))


def draw_seed(seed: int, draw: int, n: int) -> int:
    """The seed of draw `draw` of a best-of-`n` sample with seed `seed` (distinct for every (seed, draw))."""
    return (seed * n + draw) % 0xFFFFFFFF


def pick_best_of(draws: list, by: str, settings: dict):
    """(winner Sample, extra) of a best-of-N sample: the draw with the best sequence (or mean) logprob; the
    extra lists every draw with its seed, figures and rank under both criteria."""
    figures = [sequence_metrics([t.logprob for t in d.tokens], [t.id for t in d.tokens], [t.eog for t in d.tokens])
               for d in draws]
    key = [(f["seq_logprob"], f["length"]) for f in figures]
    order = best_of_ranking(key, by)
    other = best_of_ranking(key, "mean" if by == "sum" else "sum")
    win = draws[order[0]]
    rows = [{"draw": i, "seed": d.settings.get("seed"), "seq_logprob": f["seq_logprob"],
             "mean_logprob": f["mean_logprob"], "length": f["length"], "rank": order.index(i) + 1,
             f"rank_by_{'mean' if by == 'sum' else 'sum'}": other.index(i) + 1, "text": d.text}
            for i, (d, f) in enumerate(zip(draws, figures))]
    win.settings = settings
    return win, {"strategy": "best_of", "by": by, "winner": order[0], "winner_rank_by_other": other.index(order[0]) + 1,
                 "draws": rows}

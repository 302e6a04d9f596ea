"""Draft models for speculative decoding: how much of a draft model's output a target model would accept, from
both models' distributions on the same tokens (`compare --draft`: the base is the target, each compared model a
draft). Pure: per-token values in, figures out.

Per token t, with p the target's distribution and q the draft's (full vocabulary, raw logits, no sampler):

    α_t = Σ_v min(p(v), q(v)) = 1 − TV(p, q)

the probability that speculative sampling (Leviathan et al. 2023; Chen et al. 2023: accept the draft's token x
with probability min(1, p(x)/q(x))) accepts a token the draft sampled there. With a greedy target (temperature 0)
and a greedy draft, a draft token is accepted exactly when it is the target's token: on the target's greedy output,
when the draft's top token is the text's token.

A round drafts γ tokens; the target accepts the leading ones it agrees with and then adds one token of its own.
Expected tokens accepted per round:
  * independent positions (the papers' assumption: every position accepts with the mean α):
        E[accepted] = α (1 − α^γ) / (1 − α),  E[tokens per round] = (1 − α^(γ+1)) / (1 − α)
  * along the text: the mean over start positions t of Σ_{i=1..γ} Π_{j<i} α_{t+j} (no independence assumed; it
    assumes the text is what the target would generate, exact when it is the target's own output: compare --run
    on a run of the target model);
  * greedy, as llama.cpp's llama-speculative runs with --temp 0 (replayed on the text, which must then be the
    target's greedy output): the first token from the target alone, then rounds of γ drafted tokens, the leading
    matches accepted plus the target's own token, until the text (or n_predict) ends.
"""

from __future__ import annotations

import math

import numpy as np

DRAFT_LENGTHS = tuple(range(1, 9))


def acceptance(a: np.ndarray, lse_a: float, b: np.ndarray, lse_b: float) -> float:
    """Σ_v min(p_a(v), p_b(v)) from two raw logit rows and their log-sum-exps."""
    pa = np.exp(a - np.float32(lse_a))
    pb = np.exp(b - np.float32(lse_b))
    return float(np.minimum(pa, pb).sum(dtype=np.float64))


def greedy_rounds(match, gamma: int, n_predict: int | None = None) -> dict:
    """llama-speculative's greedy loop replayed on a text the target generated greedily: match[t] = the draft's
    top token at t is the text's token. Counts as the tool prints them: n_drafted, n_accept, n_predict."""
    n = len(match)
    emitted, t, drafted, accepted, rounds = 1, 1, 0, 0, 0  # token 0 comes from the target alone
    while t < n and (n_predict is None or emitted <= n_predict):
        k = 0
        while k < gamma and t + k < n and match[t + k]:
            k += 1
        drafted += gamma
        accepted += k
        rounds += 1
        emitted += k + 1
        t += k + 1
    return {"n_drafted": drafted, "n_accept": accepted, "n_predict": emitted, "rounds": rounds}


def along_text(alpha: np.ndarray, gamma: int) -> np.ndarray:
    """Per start position t, the expected drafts accepted in a round of γ starting there: Σ_{i=1..γ} Π_{j<i}
    α_{t+j} (a round running past the end of the text stops there)."""
    n = len(alpha)
    out = np.zeros(n)
    run = np.ones(n)
    for i in range(min(gamma, n)):
        shifted = np.zeros(n)
        shifted[: n - i] = alpha[i:]
        run = run * shifted
        out += run
    return out


def draft_statistics(alpha: np.ndarray, hit: np.ndarray, segments: list[int]) -> dict:
    """Acceptance figures of one draft model: α's mean ± and distribution, the greedy acceptance (`hit`: the draft's
    top token is the text's token; on the target's greedy output, the same as both having the same top), and for
    each draft length γ in DRAFT_LENGTHS the expected accepted tokens per round three ways (module docstring).
    `segments`: the lengths of the contiguous stretches of text the values come in (windows, samples); a round
    never runs across two."""
    alpha = np.asarray(alpha, dtype=np.float64)
    same = np.asarray(hit, dtype=bool)
    n = len(alpha)
    mean = float(alpha.mean()) if n else math.nan
    out = {"tokens": n, "accept_mean": mean,
           "accept_error": float(alpha.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
           "greedy_accept": float(same.mean()) if n else math.nan}
    for key, q in (("accept_p10", 10), ("accept_p25", 25), ("accept_median", 50), ("accept_p75", 75),
                   ("accept_p90", 90)):
        out[key] = float(np.percentile(alpha, q)) if n else math.nan
    out["accept_min"] = float(alpha.min()) if n else math.nan
    bounds = np.cumsum([0] + list(segments))
    rounds = []
    for g in DRAFT_LENGTHS:
        text = [along_text(alpha[a:b], g) for a, b in zip(bounds, bounds[1:])]
        sims = [greedy_rounds(same[a:b], g) for a, b in zip(bounds, bounds[1:])]
        drafted = sum(s["n_drafted"] for s in sims)
        accepted = sum(s["n_accept"] for s in sims)
        n_rounds = sum(s["rounds"] for s in sims)
        iid = g if mean == 1 else mean * (1 - mean**g) / (1 - mean)
        rounds.append({"draft_length": g, "iid_accepted": iid, "iid_tokens_per_round": 1 + iid,
                       "text_accepted": float(np.concatenate(text).mean()) if n else math.nan,
                       "greedy_accept_rate": accepted / drafted if drafted else math.nan,
                       "greedy_tokens_per_round": (accepted + n_rounds) / n_rounds if n_rounds else math.nan})
    out["rounds"] = rounds
    return out

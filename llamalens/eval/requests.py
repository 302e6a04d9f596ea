"""lm-eval's three request types scored into outcomes with every token's record, lm-eval not needed.

    loglikelihood(model, args, ...)          (context, continuation) pairs: lm_tokens.py's boundary, scoring.py
    rolling(model, texts, ...)               a text's rolling windows (lm_tokens.py), summed per text
    generations(model, args, ...)            (context, gen_kwargs): generation.py on the decode engine

An Outcome is one request's answer to lm-eval (logprob and is_greedy, or a text) and the token records behind
it: for a scored token its logprob, rank and its row's entropy, with the row's argmax as its one alternative
(the token is greedy when it is that argmax); a generated token's record is the engine's. In batched mode a few
pairs of each call (spread through it) are scored alone as well, and their exact logprob kept (Outcome.exact): the
largest difference is the run's noise floor. The harness (harness.py) and the eval run kind (run/evaluation.py)
both score through these functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llamalens.core.runtime import Model
from llamalens.eval import generation, lm_tokens
from llamalens.eval.scoring import PairScore, score_pairs
from llamalens.records import Alternative, TokenRecord

NOISE_PAIRS = 4  # pairs of each call scored alone as well, in batched mode (spread through the call)


@dataclass
class Outcome:
    """One request's answer and the tokens behind it."""

    logprob: float | None = None  # loglikelihood and rolling
    is_greedy: bool | None = None
    text: str | None = None  # generate_until
    tokens: list[TokenRecord] = field(default_factory=list)
    exact: float | None = None  # the logprob scored alone (batched mode, the re-scored requests)
    context_tokens: int = 0
    notes: list[str] = field(default_factory=list)  # 'merged', 'truncated': how its tokens were made


def noise_sample(n: int) -> list[int]:
    """Which of n pairs are scored alone as well: NOISE_PAIRS of them, evenly spread (all of them below that)."""
    k = min(n, NOISE_PAIRS)
    return sorted({i * n // k for i in range(k)}) if k else []


def score_with_noise(model: Model, pairs, exact: bool, batch_size: int) -> tuple[list[PairScore], dict[int, float]]:
    """The pairs' scores, and in batched mode {pair index: its logprob scored alone} for the noise sample."""
    scores = score_pairs(model, pairs, exact=exact, batch_size=batch_size)
    if exact or not pairs:
        return scores, {}
    picked = noise_sample(len(pairs))
    ref = score_pairs(model, [pairs[i] for i in picked], exact=True)
    return scores, {i: r.logprob for i, r in zip(picked, ref)}


def records(model: Model, score: PairScore, start: int = 0) -> list[TokenRecord]:
    """A scored continuation's token records, positions from `start`; the row's argmax is the one alternative."""
    out = []
    for j, (tok, lp, top, top_lp, rank, h) in enumerate(zip(score.tokens, score.logprobs, score.top,
                                                            score.top_logprobs, score.ranks, score.entropies)):
        out.append(TokenRecord(start + j, tok, *model.token_text(tok), lp, lp, rank, h, 0,
                               [Alternative(top, *model.token_text(top), top_lp)]))
    return out


def loglikelihood(model: Model, args: list[tuple[str, str]], max_length: int, where, exact: bool = False,
                  batch_size: int = 32) -> list[Outcome]:
    """(context, continuation) requests; `where(i)` names request i in an error."""
    enc = lm_tokens.encode_requests(model, args, max_length, where)
    scores, alone = score_with_noise(model, enc.pairs, exact, batch_size)
    out = []
    for i, (p, s) in enumerate(zip(enc.pairs, scores)):
        notes = [n for n, on in (("merged", i in enc.merged_at), ("truncated", i in enc.truncated_at)) if on]
        out.append(Outcome(s.logprob, s.is_greedy, tokens=records(model, s), exact=alone.get(i),
                           context_tokens=len(p.context), notes=notes))
    return out


def rolling(model: Model, texts: list[str], max_length: int, exact: bool = False,
            batch_size: int = 32) -> list[Outcome]:
    """Texts scored whole in lm-eval's rolling windows: each text's logprob is the sum over its windows."""
    prefix = lm_tokens.prefix_token(model)
    owner, pairs = [], []
    for k, text in enumerate(texts):
        windows = lm_tokens.rolling_windows(lm_tokens.text_tokens(model, text, bos=False), prefix, max_length)
        pairs += windows
        owner += [k] * len(windows)
    scores, alone = score_with_noise(model, pairs, exact, batch_size)
    out = [Outcome(0.0, True, exact=None) for _ in texts]
    for i, (k, s) in enumerate(zip(owner, scores)):
        o = out[k]
        o.logprob += s.logprob
        o.is_greedy = o.is_greedy and s.is_greedy
        o.tokens += records(model, s, len(o.tokens))
        if i in alone:
            o.exact = (o.exact or 0.0) + alone[i] - s.logprob  # the text's batched-vs-alone difference so far
    for o in out:
        o.exact = None if o.exact is None else o.logprob + o.exact
    return out


def generations(model: Model, args: list[tuple[str, dict]], max_length: int, where,
                batch_size: int = 32) -> list[Outcome]:
    """generate_until requests: each text and its generated tokens' records."""
    gens = [generation.plan(model, context, kwargs, max_length, where(i)) for i, (context, kwargs) in enumerate(args)]
    return [Outcome(text=s.text, tokens=list(s.tokens), context_tokens=len(g.tokens),
                    notes=["truncated"] if g.truncated else [])
            for g, s in zip(gens, generation.generate_samples(model, gens, batch_size))]


def notes(outs: list[Outcome]) -> list[str]:
    """What it took to make these requests' tokens, in words (lm_tokens.Encoded.notes)."""
    return lm_tokens.Encoded(merged_at={i for i, o in enumerate(outs) if "merged" in o.notes},
                             truncated_at={i for i, o in enumerate(outs) if "truncated" in o.notes}).notes()

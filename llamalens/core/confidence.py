"""What a logits row says about certainty beyond its entropy: the Rényi divergence of order 1/2 from the row's
distribution to the uniform one over the vocabulary, and from it the Fisher–Rao distance between the two.

Both rest on one sum over the whole row, B = sum_i sqrt(p_i) (sqrt(V) times the Bhattacharyya coefficient of p and
the uniform u over V tokens):

    D_1/2(p || u) = 1/(1/2 - 1) log sum_i p_i^1/2 u_i^1/2 = log V - 2 log B      in [0, log V], nats
    FR(p, u)      = 2 arccos(sum_i sqrt(p_i u_i)) = 2 arccos(B / sqrt(V)) = 2 arccos(exp(-D / 2))   in [0, pi]

so a token record keeps D alone (`TokenRecord.renyi`) and the distance follows from it exactly. The tail of a
262k vocabulary weighs heavily in B (a million tokens of p = 1e-12 add 1e-6 each), which is why a top-k list cannot
give these: the sum runs over every logit of the row, at decode time, from the row the engine already holds (no
extra decode). lm-polygraph's RenyiNeg and FisherRao take the same quantities of a distribution sharpened by a
temperature of 2 by default; these are of the raw distribution (temperature 1), as every other per-token figure
here, and FR is the distance itself (lm-polygraph divides it by pi).

The sum is one C pass over the row (kernels.LIB's ll_half_sum: the row pass's exp, float64 sums), about 10x faster
than numpy's three passes on a 262k row; without the kernel (or with a build older than the function) numpy
computes it.
"""

from __future__ import annotations

import ctypes
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np

from llamalens.core import kernels
from llamalens.errors import InvalidInput


def _half_sum_fn():
    """ll_half_sum from the loaded kernels, or None (no kernels, or a library built before it existed)."""
    fn = getattr(kernels.LIB, "ll_half_sum", None) if kernels.LIB is not None else None
    if fn is not None:
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float]
        fn.restype = ctypes.c_double
    return fn


_HALF_SUM = _half_sum_fn()


def half_sum(row: np.ndarray, c: float, native: bool = True) -> float:
    """sum_i exp((row_i - c) / 2) in float64 over a float32 row, c rounded to float32 (terms below exp(-87.33)
    count as 0); `native` False: numpy's passes even where the kernel is there (the tests compare the two)."""
    c32 = np.float32(c)
    if native and _HALF_SUM is not None and row.dtype == np.float32 and row.ndim == 1 and row.flags.c_contiguous:
        return float(_HALF_SUM(kernels.address(row), row.shape[0], c32))
    d = kernels.work_buffer("half_sum", row.shape[0])[0]
    np.subtract(row, c32, out=d, casting="same_kind")
    np.multiply(d, np.float32(0.5), out=d)
    d[~(d >= np.float32(-87.33654))] = -np.inf  # the kernel's cut-off (and NaN rows give 0 terms, not NaN)
    np.exp(d, out=d)
    return float(np.sum(d, dtype=np.float64))


def renyi_to_uniform(row: np.ndarray, lse: float, native: bool = True) -> float | None:
    """D_1/2(p || uniform) in nats of the row's softmax, given the row's log-sum-exp `lse` (RowStats.lse, float64);
    None when the row holds no finite distribution."""
    if not math.isfinite(lse) or row.shape[0] == 0:
        return None
    c = float(np.float32(lse))
    s = half_sum(row, c, native)
    if not s > 0 or not math.isfinite(s):
        return None
    log_b = math.log(s) + (c - lse) / 2  # exp((x - lse)/2) = exp((x - c)/2) * exp((c - lse)/2)
    return max(math.log(row.shape[0]) - 2.0 * log_b, 0.0)


def fisher_rao(renyi: float | None) -> float | None:
    """The Fisher–Rao distance to the uniform distribution (radians, 0..pi) from D_1/2(p || uniform)."""
    if renyi is None or not math.isfinite(renyi):
        return None
    return 2.0 * math.acos(min(1.0, math.exp(-renyi / 2.0)))


# -- per sample: how sure the model was of a text, from its token records -----------------------------------------
@dataclass(frozen=True)
class Measure:
    """One confidence measure of a sample: its column name, its short header, whether a higher value means more
    confident, what it is, and the probability it implies (`implied`: value, vocabulary size -> [0, 1]), which
    calibration's ECE, Brier score and reliability diagram take; AUROC and the rejection curves use the value
    itself, oriented by `higher`."""

    name: str
    label: str
    higher: bool
    what: str
    implies: str  # the implied probability, in words
    implied: Callable[[float, int], float]


def _exp(v: float, _n: int) -> float:
    return math.exp(v) if v == v else math.nan


def _inverse(v: float, _n: int) -> float:
    return 1.0 / v if v == v and v > 0 else math.nan


def _exp_neg(v: float, _n: int) -> float:
    return math.exp(-v) if v == v else math.nan


def _same(v: float, _n: int) -> float:
    return min(max(v, 0.0), 1.0) if v == v else math.nan


def _renyi_implied(v: float, n: int) -> float:  # the share of its largest value, log V
    return min(max(v / math.log(n), 0.0), 1.0) if v == v and n > 1 else math.nan


def _fr_implied(v: float, _n: int) -> float:
    return min(max(v / math.pi, 0.0), 1.0) if v == v else math.nan


MEASURES = (
    Measure("seq_logprob", "seq lp", True, "maximum sequence probability: the sum of the tokens' raw logprobs",
            "the sequence probability exp(seq_logprob)", _exp),
    Measure("perplexity", "ppl", False, "exp(-mean logprob) over the tokens",
            "1 / perplexity, the geometric mean of the tokens' probabilities", _inverse),
    Measure("mean_entropy", "H mean", False, "mean entropy of the tokens' raw distributions (nats)",
            "exp(-mean entropy)", _exp_neg),
    Measure("max_entropy", "H max", False, "largest entropy among the tokens (nats)", "exp(-max entropy)", _exp_neg),
    Measure("min_prob", "min p", True, "smallest probability among the chosen tokens", "the value itself", _same),
    Measure("mean_margin", "margin", True, "mean of p(top 1) - p(top 2) of the raw distributions (needs 2 stored "
            "alternatives)", "the value itself", _same),
    Measure("mean_renyi", "Rényi", True, "mean Rényi divergence of order 1/2 to the uniform distribution (nats, "
            "0..log V; the full row)", "D / log V", _renyi_implied),
    Measure("mean_fisher_rao", "FR", True, "mean Fisher–Rao distance to the uniform distribution (radians, 0..pi; "
            "the full row)", "FR / pi", _fr_implied),
)
MEASURE_NAMES = tuple(m.name for m in MEASURES)
BY_NAME = {m.name: m for m in MEASURES}


def sample_measures(tokens) -> dict[str, float]:
    """MEASURES over token records (TokenRecord or ScoredToken; an end-of-generation token counts, as in the
    sequence logprob); nan where there is no token, where a record lacks what a measure needs (the margin needs two
    stored alternatives on every token, Rényi and Fisher–Rao the full row's figure on every token)."""
    nan = math.nan
    n = len(tokens)
    if not n:
        return dict.fromkeys(MEASURE_NAMES, nan)
    lps = [t.logprob for t in tokens]
    ents = [t.entropy for t in tokens]
    seq = math.fsum(lps)
    margins = [math.exp(t.top[0].logprob) - math.exp(t.top[1].logprob) for t in tokens if len(t.top) >= 2]
    renyi = [getattr(t, "renyi", None) for t in tokens]
    full = all(r is not None for r in renyi)
    return {
        "seq_logprob": seq,
        "perplexity": math.exp(-seq / n),
        "mean_entropy": math.fsum(ents) / n,
        "max_entropy": max(ents),
        "min_prob": math.exp(min(lps)),
        "mean_margin": math.fsum(margins) / n if len(margins) == n else nan,
        "mean_renyi": math.fsum(renyi) / n if full else nan,
        "mean_fisher_rao": math.fsum(fisher_rao(r) for r in renyi) / n if full else nan,
    }


def answer_span(tokens, regex: str | None, seconds: float = 2.0) -> tuple[list, str | None]:
    """The tokens of the answer span and its text: the first match of `regex` (its group 1 when it has groups) in the
    text of the tokens (end-of-generation tokens left out; a stop string included), every token whose bytes overlap
    it; ([], None) when it does not match. No regex: every token, and the text. The regex runs at most `seconds` on
    one text (limits.time_limit)."""
    from llamalens.limits import time_limit

    text_tokens = [t for t in tokens if not getattr(t, "eog", False)]
    raw = [bytes.fromhex(t.bytes) for t in text_tokens]
    text = b"".join(raw).decode("utf-8", errors="surrogateescape")  # one character per undecodable byte
    if regex is None:
        return list(tokens), _shown(text)
    with time_limit(seconds, f"--answer {regex!r:.60} on one text",
                    "simplify the regular expression (nested repeats such as (a+)+ can backtrack for ever)"):
        m = re.search(regex, text)
    if m is None or (m.re.groups and m.start(1) < 0):
        return [], None
    start, end = (m.start(1), m.end(1)) if m.re.groups else (m.start(0), m.end(0))
    b0 = len(text[:start].encode("utf-8", errors="surrogateescape"))
    b1 = b0 + len(text[start:end].encode("utf-8", errors="surrogateescape"))
    out, at = [], 0
    for t, r in zip(text_tokens, raw):
        if at < b1 and at + len(r) > b0 or (b0 == b1 and at <= b0 < at + len(r)):
            out.append(t)
        at += len(r)
    return out, _shown(text[start:end])


def confidence(tokens, answer: str | None = None) -> dict:
    """How sure the model was of a text, from its token records (ll.confidence: a generated Sample's .tokens): the
    MEASURES over the span the `answer` regex picks out (answer_span), else every token, with "answer" (the span's
    text) and "span_tokens"."""
    check_answer_regex(answer)
    span, text = answer_span(list(tokens), answer)
    return {"answer": text, "span_tokens": len(span), **sample_measures(span)}


def _shown(text: str) -> str:
    """Text with undecodable bytes as U+FFFD (as a sample's text shows them)."""
    return text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")


def check_answer_regex(regex: str | None) -> None:
    """An --answer regex that does not compile is InvalidInput, before any work."""
    if regex is None:
        return
    if not regex:
        raise InvalidInput("--answer is empty; give a regular expression, e.g. --answer 'answer is (\\w+)'")
    try:
        re.compile(regex)
    except re.error as e:
        raise InvalidInput(f"--answer {regex!r} is not a valid regular expression ({e}); fix it or quote it") from None


# -- over a prompt's seeds: how much the answers agree ---------------------------------------------------------------
def normalized_answer(text: str | None) -> str:
    """The lexical cluster of an answer: lowercased, punctuation dropped, whitespace collapsed ('' for none)."""
    if not text:
        return ""
    return " ".join("".join(c if c.isalnum() or c.isspace() else " " for c in text.lower()).split())


def agreement(answers: list[str | None]) -> dict[str, float]:
    """Over the answers of one prompt's seeds: the share of distinct answers (distinct texts / answers, exact text)
    and the entropy (nats) of the answers' lexical clusters (normalized_answer: equal after lowercasing and dropping
    punctuation). No NLI model decides which answers mean the same, so 'Paris' and 'the city of Paris' are two
    clusters: a lexical stand-in for semantic entropy."""
    if not answers:
        return {"distinct_share": math.nan, "cluster_entropy": math.nan}
    n = len(answers)
    counts = Counter(normalized_answer(a) for a in answers)
    h = math.fsum(c / n * math.log(n / c) for c in counts.values())
    return {"distinct_share": len(set(answers)) / n, "cluster_entropy": h}

"""Teacher-forced analyses, no sampling: score a text, choose between continuations, compare two models.

(One module, longer than the house's limit: the three analyses share the alignment and the window decoding
below, and kept together they cannot drift apart.)

Alignment. A text becomes a token stream S = [BOS] + tokens(text) when the model adds a BOS token
(else just the tokens). The logits row at stream position j scores S[j+1]: the first text token is
scored from the BOS row; without a BOS it cannot be scored, and the result says so (`unscored`).
llama-cpp-python's `echo=True` gets this wrong both ways: it forces the first entry to None and, for
models without BOS, shifts the values by one position.

Windows. A text longer than the context is cut into windows; each is decoded from position 0 in a
cleared KV cache, and only the rows that score tokens are requested from llama.cpp.
  full (default)       window 1 = S[0:ctx], scoring S[1:ctx]; each next window ends `stride` tokens
                       further, holds the ctx tokens before its end (its first replaced by BOS), and
                       scores only its new tokens: each keeps >= ctx - 1 - stride tokens of context.
                       Every token is scored once.
  llama-perplexity     as llama.cpp's perplexity tool: S cut into floor(len/ctx) chunks of ctx, the
                       first token of each replaced by BOS, tokens after position ctx/2 scored; a
                       partial last chunk is dropped, and (like the tool) at least 2*ctx tokens are
                       needed. Same model, same text, same figure.

Streaming. `rows()` yields one logits row at a time (a view into llama.cpp's output buffer, valid
until the next decode). Windows are decoded in batches of --batch tokens, as llama.cpp's tools do,
so the figures match theirs; the output buffer holds (rows wanted per batch) × n_vocab floats.
Nothing of size tokens × vocabulary is kept: `compare` walks two models' rows in lockstep and keeps
per-token numbers only, so peak memory does not grow with the text.

KL divergence, per position, over the whole vocabulary, in nats:
    KL(A‖B) = Σ pA (lpA − lpB) = Σ pA (a − b) − (lseA − lseB)      (a, b raw logits; lse log-sum-exp)
which is exactly 0 for identical rows.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import numpy as np

from llamalens.errors import InvalidInput
from llamalens.records import Alternative, Rich, ScoredToken, alternatives, token_frame
from llamalens.core.runtime import Model, round_ctx
from llamalens.core.stats import RowStats

PROTOCOLS = ("full", "llama-perplexity")
NORMALIZE = ("none", "token", "byte")


# -- windows ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """Decode S[start:start+length] at positions 0.., ids[0] replaced by BOS if bos_first;
    S[start+j] for j >= first is scored from row j-1."""

    start: int
    length: int
    first: int
    bos_first: bool = False


def plan_windows(n: int, ctx: int, protocol: str = "full", stride: int | None = None, bos: bool = True) -> list[Window]:
    """Windows over a stream of n tokens (S[0] is BOS when bos)."""
    if protocol == "llama-perplexity":
        return [Window(i * ctx, ctx, ctx // 2 + 1, bos) for i in range(n // ctx)]
    if protocol != "full":
        raise InvalidInput(f"unknown protocol {protocol!r}; use one of: {', '.join(PROTOCOLS)}")
    stride = default_stride(ctx) if stride is None else stride
    out = [Window(0, min(ctx, n), 1)]
    end = min(ctx, n)
    while end < n:
        new_end = min(end + stride, n)
        start = max(0, new_end - ctx)
        out.append(Window(start, new_end - start, end - start, bos))
        end = new_end
    return out


def default_stride(ctx: int) -> int:
    return max(1, ctx // 2)


def check_protocol(n_stream: int, ctx: int, protocol: str, stride: int | None, n_ctx_train: int | None) -> list[str]:
    """Raise InvalidInput for settings that cannot work; return warnings for ones that are dubious."""
    if protocol not in PROTOCOLS:
        raise InvalidInput(f"unknown --protocol {protocol!r}; use one of: {', '.join(PROTOCOLS)}")
    if ctx < 2:
        raise InvalidInput(f"--ctx {ctx} is too small: a window needs at least 2 tokens (one to predict from)")
    if stride is not None:
        if protocol != "full":
            raise InvalidInput("--stride applies to --protocol full only (llama-perplexity chunks do not overlap)")
        if not 1 <= stride <= ctx - 1:
            raise InvalidInput(f"--stride {stride} is out of range: use 1..{ctx - 1} (ctx - 1 = windows that share "
                               "only BOS; smaller = more overlap, more context per token, more work)")
    if protocol == "llama-perplexity" and n_stream < 2 * ctx:
        raise InvalidInput(f"the text is {n_stream} tokens; --protocol llama-perplexity --ctx {ctx} needs at least "
                           f"{2 * ctx} (as llama-perplexity itself does); lower --ctx or give a longer text")
    warnings = []
    if n_ctx_train and ctx > n_ctx_train:
        warnings.append(f"--ctx {ctx} is larger than the model's training context ({n_ctx_train}); positions past it "
                        "are out of distribution and perplexity will rise")
    return warnings


def score_batch(model: Model) -> int:
    """Tokens per decode call: --batch. Each call's logits take (rows wanted) × n_vocab × 4 bytes: 512 MB at
    --batch 512 for Gemma's 262k vocabulary, 64 MB for a 32k one; a smaller --batch saves memory."""
    return max(1, int(model.options.batch))


def rows(model: Model, stream: list[int], windows: list[Window],
         on_window: Callable[[int], None] | None = None, n_ctx: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(stream index scored, raw logits row) for every scored token, window by window, in order.

    The row is a view valid until the next item is requested. `n_ctx`: the context's size (default: the
    longest window's, rounded; a shard of the windows is given the whole text's, so its figures are the same).
    """
    if not windows:
        return
    n_batch = score_batch(model)
    n_ctx = n_ctx or window_ctx(windows)
    with model.context(n_ctx=n_ctx, n_batch=n_batch) as ctx:
        for k, w in enumerate(windows):
            ctx.clear()
            ids = stream[w.start : w.start + w.length]
            if w.bos_first:
                ids = [model.bos] + ids[1:]
            # the whole window, in batches of --batch, as llama.cpp's tools and llama-cpp-python decode it:
            # logits depend slightly on batch shape (the CPU kernels change with the batch shape), so the same shape gives the same figure
            for b0 in range(0, w.length, n_batch):
                chunk = ids[b0 : b0 + n_batch]
                outs = [1 if w.first - 1 <= b0 + i <= w.length - 2 else 0 for i in range(len(chunk))]
                ctx.decode(chunk, range(b0, b0 + len(chunk)), [0] * len(chunk), outs)
                for i, o in enumerate(outs):
                    if o:
                        yield w.start + b0 + i + 1, ctx.logits(i)
            if on_window:
                on_window(k + 1)


def window_ctx(windows: list[Window]) -> int:
    """The context size that holds the longest of these windows."""
    return round_ctx(max(w.length for w in windows))


def text_stream(model: Model, text: str | bytes) -> tuple[list[int], int]:
    """(stream, offset): the stream S and the index in S of the text's first token (1 with a BOS)."""
    toks = model.tokenize(text, add_bos=False, special=False)
    if model.add_bos and model.bos != -1:
        return [model.bos] + toks, 1
    return toks, 0


def _scored(model: Model, position: int, token: int, st: RowStats, n_logprobs: int) -> ScoredToken:
    return ScoredToken(position, token, *model.token_text(token), st.logprob, st.rank,
                       st.entropy, alternatives(model.token_text, st.top_ids[:n_logprobs], st.top_logprobs[:n_logprobs]))


# -- score ------------------------------------------------------------------------------------------
@dataclass
class ScoreResult(Rich):
    """A scored text (ll.score, `llamalens score`): per-token records, perplexity, NLL, bits per byte.

    to_pandas(): one row per scored token (records.TOKEN_FRAME's columns); in a notebook, the score report."""

    _display = "score"
    model: dict
    protocol: str
    ctx: int
    stride: int | None
    n_tokens: int  # tokens of the text (BOS not counted)
    n_bytes: int
    windows: int
    tokens: list[ScoredToken]
    unscored: list[int]  # text token positions that were not scored (and why in `notes`)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood (nats per scored token)."""
        return -float(np.mean([t.logprob for t in self.tokens])) if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll) if self.tokens else math.nan

    @property
    def perplexity_error(self) -> float:
        """Standard error of the perplexity, propagated from the NLL's (as llama-perplexity prints it)."""
        n = len(self.tokens)
        if n < 2:
            return math.nan
        nll = np.array([-t.logprob for t in self.tokens])
        return float(self.perplexity * nll.std(ddof=1) / math.sqrt(n))

    @property
    def scored_bytes(self) -> int:
        if not self.unscored:
            return self.n_bytes
        return sum(len(bytes.fromhex(t.bytes)) for t in self.tokens)

    @property
    def bits_per_byte(self) -> float:
        b = self.scored_bytes
        return -sum(t.logprob for t in self.tokens) / math.log(2) / b if b else math.nan

    def totals(self) -> dict:
        return {"tokens": self.n_tokens, "scored": len(self.tokens), "unscored": len(self.unscored),
                "bytes": self.n_bytes, "scored_bytes": self.scored_bytes, "mean_nll": self.nll,
                "perplexity": self.perplexity, "perplexity_error": self.perplexity_error,
                "bits_per_byte": self.bits_per_byte, "windows": self.windows, "tokens_per_s":
                len(self.tokens) / self.seconds if self.seconds else math.nan}

    def to_dict(self) -> dict:
        return {"model": self.model, "protocol": self.protocol, "ctx": self.ctx, "stride": self.stride,
                "totals": self.totals(), "notes": self.notes, "unscored": self.unscored,
                "tokens": [t.to_dict() for t in self.tokens]}

    def to_pandas(self):
        return token_frame(self.tokens)

    def __repr__(self) -> str:
        return (f"<Score {len(self.tokens)} of {self.n_tokens} tokens scored ({self.protocol}, ctx {self.ctx}): "
                f"perplexity {self.perplexity:.4f}, {self.bits_per_byte:.4f} bits per byte>")


Score = ScoreResult


def check_text(model: Model, text: str | bytes) -> tuple[list[int], int]:
    if not text:
        raise InvalidInput("the text is empty; give TEXT or --file with some text in it")
    stream, off = text_stream(model, text)
    if len(stream) - off < 2:
        raise InvalidInput(f"the text is {len(stream) - off} token long; scoring needs at least 2 tokens")
    return stream, off


def score_windows(model: Model, stream: list[int], off: int, windows: list[Window], n_logprobs: int = 0,
                  on_window: Callable[[int], None] | None = None, n_ctx: int | None = None) -> list[ScoredToken]:
    """The scored tokens of these windows of the stream (the text's first token at index `off`), in order."""
    return [_scored(model, s_idx - off, stream[s_idx], RowStats.of(row, stream[s_idx], n_logprobs), n_logprobs)
            for s_idx, row in rows(model, stream, windows, on_window, n_ctx)]


def score_text(model: Model, text: str | bytes, ctx: int | None = None, protocol: str = "full",
               stride: int | None = None, n_logprobs: int = 0,
               on_progress: Callable[[int, int], None] | None = None, scorer: Callable | None = None) -> ScoreResult:
    """Teacher-forced logprob, rank and entropy of every token of `text` (see the module docstring).
    `scorer(stream, off, windows, n_logprobs, n_ctx)` scores the windows elsewhere (distributed.py: on Ray)."""
    ctx = ctx or model.options.ctx
    stream, off = check_text(model, text)
    notes = check_protocol(len(stream), ctx, protocol, stride, model.n_ctx_train)
    windows = plan_windows(len(stream), ctx, protocol, stride, bos=off == 1)
    t0 = time.perf_counter()
    if scorer is not None:
        out = scorer(stream, off, windows, n_logprobs, window_ctx(windows))
    else:
        out = score_windows(model, stream, off, windows, n_logprobs, on_progress and (lambda k: on_progress(k, len(windows))))
    seconds = time.perf_counter() - t0
    scored = {t.position for t in out}
    unscored = [i for i in range(len(stream) - off) if i not in scored]
    if off == 0 and 0 in unscored:
        notes.append("the model adds no BOS token, so the text's first token has nothing to be predicted from and "
                     "is not scored")
    if protocol == "llama-perplexity":
        notes.append(f"llama-perplexity protocol: {len(windows)} chunks of {ctx}; only the second half of each chunk "
                     f"is scored ({len(out)} of {len(stream) - off} tokens)"
                     + (f"; the last {(len(stream)) % ctx} tokens (a partial chunk) are dropped" if len(stream) % ctx else ""))
    n_bytes = len(text.encode("utf-8") if isinstance(text, str) else text)
    return ScoreResult(model.describe(), protocol, ctx, stride if protocol == "full" else None, len(stream) - off,
                       n_bytes, len(windows), out, unscored, notes, seconds)


# -- choose -----------------------------------------------------------------------------------------
@dataclass
class OptionScore:
    option: str
    continuation: str  # what was actually appended to the prompt
    tokens: list[ScoredToken]
    n_bytes: int

    @property
    def total(self) -> float:
        return float(sum(t.logprob for t in self.tokens))

    def score(self, normalize: str) -> float:
        if normalize == "token":
            return self.total / max(len(self.tokens), 1)
        if normalize == "byte":
            return self.total / max(self.n_bytes, 1)
        return self.total

    def to_dict(self, normalize: str) -> dict:
        return {"option": self.option, "continuation": self.continuation, "score": self.score(normalize),
                "logprob": self.total, "tokens": len(self.tokens), "bytes": self.n_bytes,
                "per_token": self.total / max(len(self.tokens), 1), "per_byte": self.total / max(self.n_bytes, 1),
                "token_logprobs": [t.to_dict() for t in self.tokens]}


@dataclass
class Choice(Rich):
    """Continuations of a prompt ranked by likelihood (ll.choose, `llamalens choose`), best first.

    to_pandas(): one row per option: rank, option, continuation, score, logprob, tokens, bytes, per_token,
    per_byte, margin, share."""

    _display = "choice"
    prompt: str
    normalize: str
    options: list[OptionScore]  # ranked, best first
    notes: list[str] = field(default_factory=list)

    def margins(self) -> list[float]:
        """Score of each option minus the next one's (the last is nan)."""
        s = [o.score(self.normalize) for o in self.options]
        return [a - b for a, b in zip(s, s[1:])] + [math.nan]

    def probabilities(self) -> list[float]:
        """Softmax of the scores over the options: how the model splits its belief among them."""
        s = np.array([o.score(self.normalize) for o in self.options])
        e = np.exp(s - s.max())
        return (e / e.sum()).tolist()

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "normalize": self.normalize, "notes": self.notes,
                "options": [dict(o.to_dict(self.normalize), rank=i + 1, margin=m, share=p)
                            for i, (o, m, p) in enumerate(zip(self.options, self.margins(), self.probabilities()))]}

    def to_pandas(self):
        import pandas as pd

        rows = [{k: v for k, v in o.items() if k != "token_logprobs"} for o in self.to_dict()["options"]]
        return pd.DataFrame(rows, columns=CHOICE_COLUMNS)

    def __repr__(self) -> str:
        ranked = ", ".join(f"{o.option!r} {p:.1%}" for o, p in zip(self.options, self.probabilities()))
        return f"<Choice ({self.normalize}): {ranked}>"


CHOICE_COLUMNS = ["rank", "option", "continuation", "score", "logprob", "tokens", "bytes", "per_token", "per_byte",
                  "margin", "share"]


def join_option(prompt: str, option: str, space: bool = True) -> str:
    """The continuation appended to the prompt: with a space between when neither side has one."""
    if space and prompt and option and not prompt[-1].isspace() and not option[0].isspace():
        return " " + option
    return option


def check_options(options: list[str], normalize: str = "none") -> None:
    """What choose() needs of its options, checked before any model is loaded."""
    if len(options) < 2:
        raise InvalidInput(f"give at least two --option values to choose between (got {len(options)})")
    if normalize not in NORMALIZE:
        raise InvalidInput(f"unknown --normalize {normalize!r}; use one of: {', '.join(NORMALIZE)}")
    if any(not o for o in options):
        raise InvalidInput("an --option is empty; every option needs some text")


def choose(model: Model, prompt: str, options: list[str], normalize: str = "none", space: bool = True,
           n_logprobs: int = 3) -> Choice:
    """Rank continuations by their logprob given the prompt; the prompt is decoded once, shared by all."""
    check_options(options, normalize)
    ptoks = model.prompt_tokens(prompt) if prompt else ([model.bos] if model.add_bos and model.bos != -1 else [])
    if model.add_eos and ptoks and ptoks[-1] == model.eos:
        ptoks = ptoks[:-1]
    if not ptoks:
        raise InvalidInput("the prompt is empty and the model adds no BOS token: nothing to predict the options from")
    notes, conts = [], []
    for o in options:
        cont = join_option(prompt, o, space)
        toks, merged = continuation_tokens(model, prompt, ptoks, cont)
        conts.append((o, cont, toks))
        if merged:
            notes.append(f"option {o!r}: its first token merges with the prompt's last one; scored as separate tokens")
    scored = continuation_scores(model, ptoks, [c[2] for c in conts], n_logprobs)
    results = [OptionScore(o, c, scored[k], len(c.encode("utf-8"))) for k, (o, c, _t) in enumerate(conts)]
    results.sort(key=lambda r: -r.score(normalize))
    dup = {o for o in options if options.count(o) > 1}
    if dup:
        notes.append(f"options given more than once: {', '.join(map(repr, sorted(dup)))}")
    return Choice(prompt, normalize, results, notes)


def continuation_tokens(model: Model, prompt: str, ptoks: list[int], cont: str) -> tuple[list[int], bool]:
    """(tokens of `cont` after the prompt, whether they merged with it): prompt + continuation tokenized as one
    text, as the model reads it, and the prompt's tokens cut off; when the boundary merged into the prompt's
    last token, the continuation is tokenized alone."""
    whole = model.prompt_tokens(prompt + cont)
    if model.add_eos and whole and whole[-1] == model.eos:
        whole = whole[:-1]
    if whole[: len(ptoks)] == ptoks and len(whole) > len(ptoks):
        return whole[len(ptoks):], False
    return model.tokenize(cont, add_bos=False, special=False), True


def continuation_scores(model: Model, ptoks: list[int], conts: list[list[int]],
                        n_logprobs: int) -> list[list[ScoredToken]]:
    """Each continuation's tokens scored after the same prompt tokens: the prompt decoded once, copied to one
    sequence per continuation, and all continuations decoded together."""
    longest = max(len(c) for c in conts)
    model.check_fits(len(ptoks) + longest, model.options.ctx)
    n_seq = len(conts)
    n_batch = max(score_batch(model), n_seq)
    cells = len(ptoks) + sum(len(c) for c in conts) + 1
    scored: list[list[ScoredToken]] = [[] for _ in conts]
    with model.context(n_ctx=round_ctx(cells), n_seq_max=n_seq, n_batch=n_batch) as ctx:
        first_row = ctx.prefill(ptoks, seq=0)
        first = RowStats.of(first_row, None, n_logprobs)
        for s in range(1, n_seq):
            ctx.seq_cp(0, s, 0, len(ptoks))
        for k, toks in enumerate(conts):
            scored[k].append(_scored(model, 0, toks[0], first.for_token(first_row, toks[0]), n_logprobs))
        # every continuation's tokens but its last, all sequences together, in batches of n_batch
        items = [(k, j, t) for k, toks in enumerate(conts) for j, t in enumerate(toks[:-1])]
        for b0 in range(0, len(items), n_batch):
            chunk = items[b0 : b0 + n_batch]
            ctx.decode([t for _, _, t in chunk], [len(ptoks) + j for _, j, _ in chunk], [k for k, _, _ in chunk],
                       [1] * len(chunk))
            for i, (k, j, _t) in enumerate(chunk):
                target = conts[k][j + 1]
                row = ctx.logits(i)
                scored[k].append(_scored(model, j + 1, target, RowStats.of(row, target, n_logprobs), n_logprobs))
    return scored


def score_reply(model: Model, prompt: str, reply: str, n_logprobs: int = 5) -> ScoreResult:
    """Teacher-forced scores of an assistant's reply after its rendered chat prompt (chat.py): the reply's own
    tokens only, tokenized as choose() tokenizes an option (see continuation_tokens), in one window."""
    if not reply:
        raise InvalidInput("the assistant's reply is empty; the last message of the conversation needs some text")
    ptoks = model.prompt_tokens(prompt)
    toks, merged = continuation_tokens(model, prompt, ptoks, reply)
    t0 = time.perf_counter()
    scored = continuation_scores(model, ptoks, [toks], n_logprobs)[0]
    notes = [f"chat: the assistant's reply ({len(toks)} tokens) scored after its {len(ptoks)}-token prompt"]
    if merged:
        notes.append("the reply's first token merges with the prompt's last one; scored as separate tokens")
    return ScoreResult(model.describe(), "full", model.options.ctx, None, len(toks), len(reply.encode("utf-8")), 1,
                       scored, [], notes, time.perf_counter() - t0)


# -- compare ----------------------------------------------------------------------------------------
@dataclass
class PositionDiff:
    position: int  # text token position (or generated position for --run)
    id: int
    text: str
    bytes: str
    kld: float
    p_a: float
    p_b: float
    top_a: list[Alternative]
    top_b: list[Alternative]
    sample: int | None = None  # the stored sample, for --run

    @property
    def dp(self) -> float:
        return self.p_b - self.p_a

    @property
    def same_top(self) -> bool:
        return bool(self.top_a and self.top_b and self.top_a[0].id == self.top_b[0].id)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(dp=self.dp, same_top=self.same_top)
        return d


def kl_from_stats(a: np.ndarray, sa: RowStats, b: np.ndarray, sb: RowStats) -> float:
    """KL(A‖B) over the whole vocabulary from two raw rows and their log-sum-exps (module docstring)."""
    pa = np.exp(a - np.float32(sa.lse))
    return max(0.0, float(np.sum(pa * (a - b), dtype=np.float64)) - (sa.lse - sb.lse))


@dataclass
class Comparison(Rich):
    """Model B against model A on the same tokens (ll.compare, `llamalens compare`): summary() has the figures
    llama-perplexity --kl-divergence prints. to_pandas(): one row per position: position, sample, token_id,
    text, bytes, kld, p_a, p_b, dp, same_top; in a notebook, the compare report."""

    _display = "compare"
    model_a: dict
    model_b: dict
    protocol: str
    ctx: int
    positions: list[PositionDiff]
    nll_a: float
    nll_b: float
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    source: str = "text"  # "text" or "run N"

    def summary(self) -> dict:
        """The figures llama-perplexity --kl-divergence prints, from our per-token values."""
        n = len(self.positions)
        kld = np.array([p.kld for p in self.positions])
        dp = np.array([p.dp for p in self.positions])
        same = np.array([p.same_top for p in self.positions], dtype=float)
        pct = lambda v, q: float(np.percentile(v, q)) if n else math.nan  # noqa: E731
        err = lambda v: float(v.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan  # noqa: E731
        ln_ratio = self.nll_b - self.nll_a
        return {
            "tokens": n,
            "ppl_a": math.exp(self.nll_a), "ppl_b": math.exp(self.nll_b),
            "ppl_ratio": math.exp(ln_ratio), "ln_ppl_ratio": ln_ratio,
            "kld_mean": float(kld.mean()) if n else math.nan, "kld_error": err(kld),
            "kld_median": pct(kld, 50), "kld_p90": pct(kld, 90), "kld_p95": pct(kld, 95), "kld_p99": pct(kld, 99),
            "kld_p99_9": pct(kld, 99.9), "kld_max": float(kld.max()) if n else math.nan,
            "kld_min": float(kld.min()) if n else math.nan,
            "dp_mean": float(dp.mean()) if n else math.nan, "dp_error": err(dp),
            "dp_rms": float(math.sqrt((dp ** 2).mean())) if n else math.nan,
            "dp_p1": pct(dp, 1), "dp_p5": pct(dp, 5), "dp_p10": pct(dp, 10), "dp_median": pct(dp, 50),
            "dp_p90": pct(dp, 90), "dp_p95": pct(dp, 95), "dp_p99": pct(dp, 99),
            "dp_max": float(dp.max()) if n else math.nan, "dp_min": float(dp.min()) if n else math.nan,
            "same_top": float(same.mean()) if n else math.nan, "same_top_error": err(same),
        }

    def worst(self, k: int = 20) -> list[PositionDiff]:
        return sorted(self.positions, key=lambda p: -p.kld)[:k]

    def to_dict(self, with_positions: bool = True) -> dict:
        d = {"model_a": self.model_a, "model_b": self.model_b, "protocol": self.protocol, "ctx": self.ctx,
             "source": self.source, "summary": self.summary(), "notes": self.notes,
             "worst": [p.to_dict() for p in self.worst()]}
        if with_positions:
            d["positions"] = [p.to_dict() for p in self.positions]
        return d

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame([[p.position, p.sample, p.id, p.text, p.bytes, p.kld, p.p_a, p.p_b, p.dp, p.same_top]
                             for p in self.positions], columns=COMPARISON_COLUMNS)

    def __repr__(self) -> str:
        s = self.summary()
        return (f"<Comparison {self.model_b.get('name')} vs {self.model_a.get('name')} on {s['tokens']} tokens "
                f"({self.source}): mean KLD {s['kld_mean']:.6f}, PPL ratio {s['ppl_ratio']:.5f}, same top "
                f"{s['same_top']:.2%}>")


COMPARISON_COLUMNS = ["position", "sample", "token_id", "text", "bytes", "kld", "p_a", "p_b", "dp", "same_top"]


def check_same_vocab(a: Model, b: Model) -> None:
    ta = a.header.get("tokenizer.ggml.model")
    tb = b.header.get("tokenizer.ggml.model")
    problem = a.n_vocab != b.n_vocab or ta != tb
    if not problem:  # same size and kind: spot-check the tokens themselves
        probe = np.unique(np.linspace(0, a.n_vocab - 1, 97).astype(int))
        problem = any(a.piece(int(i)) != b.piece(int(i)) for i in probe) or a.bos != b.bos
    if problem:
        raise InvalidInput(f"the models do not share a vocabulary: {a.path.name} has a {ta!r} tokenizer with "
                           f"{a.n_vocab:,} tokens, {b.path.name} a {tb!r} tokenizer with {b.n_vocab:,}; KL divergence "
                           "needs the same tokens on both sides (compare quantizations or fine-tunes of one model)")


def compare_pair(models) -> tuple:
    """The two model files of a comparison (A, B), resolved; refused unless exactly two distinct files."""
    from llamalens.modelfiles.find import resolve_model

    if len(models) != 2:
        raise InvalidInput(f"give exactly two models: --model A --model B (got {len(models)})")
    a, b = resolve_model(models[0]), resolve_model(models[1])
    if same_file(a, b):
        raise InvalidInput(f"--model {a} is given twice: the KL divergence of a model with itself is 0 by construction; "
                           "pass two different files")
    return a, b


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def compare_windows(a: Model, b: Model, stream: list[int], windows: list[Window], offset: int, n_top: int,
                     out: list[PositionDiff], nll: list[list[float]], sample: int | None = None,
                     on_window=None, alternate: bool = False, n_ctx: int | None = None) -> None:
    """Both models' rows for the same windows: in lockstep (both resident), or, with `alternate`, one window
    of A (its scored rows buffered) then the same window of B, so only one model's weights are hot at a time.
    `n_ctx`: as for rows()."""

    def pair_rows():
        if not alternate:
            yield from zip(rows(a, stream, windows, on_window, n_ctx), rows(b, stream, windows, n_ctx=n_ctx))
            return
        for k, w in enumerate(windows):
            n = n_ctx or window_ctx([w])
            buf = [(i, r.copy()) for i, r in rows(a, stream, [w], n_ctx=n)]
            yield from zip(buf, rows(b, stream, [w], n_ctx=n))
            if on_window:
                on_window(k + 1)

    for (ia, ra), (ib, rb) in pair_rows():
        assert ia == ib
        tok = stream[ia]
        sa, sb = RowStats.of(ra, tok, n_top), RowStats.of(rb, tok, n_top)
        out.append(PositionDiff(ia - offset, tok, *a.token_text(tok),
                                kl_from_stats(ra, sa, rb, sb), math.exp(sa.logprob), math.exp(sb.logprob),
                                alternatives(a.token_text, sa.top_ids, sa.top_logprobs),
                                alternatives(b.token_text, sb.top_ids, sb.top_logprobs), sample))
        nll[0].append(-sa.logprob)
        nll[1].append(-sb.logprob)


def both_fit(a: Model, b: Model) -> bool:
    """Whether both models' weights fit in available memory at once (else compare alternates per window)."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return True  # not Linux: trust the OS's paging
    need = a.info.file_size + b.info.file_size
    return need < 0.8 * avail


def compare_text(a: Model, b: Model, text: str | bytes, ctx: int | None = None, protocol: str = "full",
                 stride: int | None = None, n_top: int = 5, on_progress=None, alternate: bool | None = None,
                 scorer: Callable | None = None) -> Comparison:
    """Per-token KL(A‖B), Δp and same-top over a text, both models' rows streamed in lockstep.
    `scorer(stream, off, windows, n_top, n_ctx)` -> (positions, [nll A, nll B]) compares the windows elsewhere
    (distributed.py: on Ray)."""
    check_same_vocab(a, b)
    ctx = ctx or min(a.options.ctx, b.options.ctx)
    stream, off = check_text(a, text)
    if text_stream(b, text)[0] != stream:
        raise InvalidInput(f"{a.path.name} and {b.path.name} tokenize this text differently; they cannot be compared "
                           "token by token")
    notes = check_protocol(len(stream), ctx, protocol, stride, min(a.n_ctx_train, b.n_ctx_train))
    windows = plan_windows(len(stream), ctx, protocol, stride, bos=off == 1)
    t0 = time.perf_counter()
    positions: list[PositionDiff] = []
    nll: list[list[float]] = [[], []]
    if alternate is None:
        alternate = scorer is None and not both_fit(a, b)
    if alternate:
        notes.append("the two models do not both fit in memory: compared one window of each at a time")
    if scorer is not None:
        positions, nll = scorer(stream, off, windows, n_top, window_ctx(windows))
    else:
        compare_windows(a, b, stream, windows, off, n_top, positions, nll,
                         on_window=on_progress and (lambda k: on_progress(k, len(windows))), alternate=alternate)
    return Comparison(a.describe(), b.describe(), protocol, ctx, positions, float(np.mean(nll[0])),
                      float(np.mean(nll[1])), notes, time.perf_counter() - t0)


def compare_run(a: Model, b: Model, store, run_id, n_top: int = 5, on_progress=None) -> Comparison:
    """What model B thinks of the generated tokens of a stored sweep (A: the run's model)."""
    check_same_vocab(a, b)
    info = store.run(run_id)
    samples = store.samples(info.id)
    if not samples:
        raise InvalidInput(f"run {info.id} has no finished samples to compare on")
    toks = store.tokens_by_sample(info.id)
    t0 = time.perf_counter()
    positions: list[PositionDiff] = []
    nll: list[list[float]] = [[], []]
    for k, s in enumerate(samples):
        gen = [t.id for t in toks.get(s.sample_idx, [])]
        if not gen:
            continue
        ptoks = a.prompt_tokens(s.prompt)
        stream = ptoks + gen
        a.check_fits(len(stream) - 1, a.options.ctx)
        compare_windows(a, b, stream, [Window(0, len(stream), len(ptoks))], len(ptoks), n_top, positions, nll,
                         sample=s.sample_idx)
        if on_progress:
            on_progress(k + 1, len(samples))
    return Comparison(a.describe(), b.describe(), "run", a.options.ctx, positions, float(np.mean(nll[0])),
                      float(np.mean(nll[1])), [], time.perf_counter() - t0, source=f"run {info.id}")

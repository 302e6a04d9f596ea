"""`score`: how surprised a model is by a text, token by token (teacher-forced, no sampling).

The text is cut into windows and its rows streamed as looks/windows.py describes; each scored token keeps its
logprob, rank, entropy and top alternatives, and the result its perplexity, NLL and bits per byte.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from llamalens.errors import InvalidInput
from llamalens.records import Rich, ScoredToken, token_frame
from llamalens.core.runtime import Model
from llamalens.core.stats import RowStats
from llamalens.looks.choose import continuation_scores, continuation_tokens
from llamalens.looks.windows import (PROTOCOLS, Window, check_protocol, check_text, plan_windows, rows, scored_token,
                                     window_ctx)

__all__ = ["PROTOCOLS", "ScoreResult", "Score", "plan_windows", "score_text", "score_windows", "score_reply"]


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



def score_windows(model: Model, stream: list[int], off: int, windows: list[Window], n_logprobs: int = 0,
                  on_window: Callable[[int], None] | None = None, n_ctx: int | None = None) -> list[ScoredToken]:
    """The scored tokens of these windows of the stream (the text's first token at index `off`), in order."""
    return [scored_token(model, s_idx - off, stream[s_idx], RowStats.of(row, stream[s_idx], n_logprobs), n_logprobs)
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


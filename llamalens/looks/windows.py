"""Teacher forcing, shared by score, choose and compare: how a text becomes a token stream, how a long
stream is cut into windows of the context, and how the logits rows that score its tokens are streamed.

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
Nothing of size tokens × vocabulary is kept by these functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from llamalens.errors import InvalidInput
from llamalens.records import ScoredToken, alternatives
from llamalens.core.runtime import Model, round_ctx
from llamalens.core.stats import RowStats

PROTOCOLS = ("full", "llama-perplexity")


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


def check_text(model: Model, text: str | bytes) -> tuple[list[int], int]:
    if not text:
        raise InvalidInput("the text is empty; give TEXT or --file with some text in it")
    stream, off = text_stream(model, text)
    if len(stream) - off < 2:
        raise InvalidInput(f"the text is {len(stream) - off} token long; scoring needs at least 2 tokens")
    return stream, off


def scored_token(model: Model, position: int, token: int, st: RowStats, n_logprobs: int) -> ScoredToken:
    return ScoredToken(position, token, *model.token_text(token), st.logprob, st.rank,
                       st.entropy, alternatives(model.token_text, st.top_ids[:n_logprobs], st.top_logprobs[:n_logprobs]))

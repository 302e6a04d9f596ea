"""A context kept between generations, so that a prompt sharing a prefix with the last one is not decoded again
(`llamalens serve`: branches of a tree, and its OpenAI-compatible API, as llama-server's prompt cache).

    Held(model)                 one llama.cpp context, two sequences:
        sequence 0 (the line)   holds the cells of `tokens`, the last prompt + generation decoded
        sequence 1 (the probe)  borrows the line's cells to read one position's raw logits, then is emptied
    held.generate(request, on_record)
        the common prefix of request.prompt_tokens and `tokens` is kept, the rest prefilled (at least the last
        token, whose row the first pick needs), then decoded by the engine's one scheduler (Engine.run_in with
        the _Line entry policy); on_record(record) is called as each token is recorded, and returns True to end
        the generation there (finish_reason "cancelled"); the line then holds prompt + every decoded token
    held.row(ids)               the raw logits after ids, through the probe (the line's cells stay as they are)

A model with sliding-window attention and a SWA cache of window size keeps only the last window's cells:
a prefix is reused only when the cells it needs are still there (llama_memory_seq_pos_min), else the prompt is
prefilled from its start, as llama-server does.

A prompt decoded from where it parts with the last one has logits within the batch noise of a fresh prefill's,
not equal to them (docs/fidelity.md: a batch's shape moves quantized weights' logits by hundredths of a nat);
the same prompt again is served the row its prefill gave, so repeating a request repeats its answer.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from llamalens.core.engine import Engine, Entry, Live, Request
from llamalens.core.runtime import Context, Model
from llamalens.records import Sample, TokenRecord

LINE, PROBE = 0, 1


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Held:
    """One model's kept context (module docstring); one thread uses it at a time."""

    def __init__(self, model: Model, n_ctx: int | None = None):
        self.model = model
        self.ctx: Context = model.context(n_ctx=n_ctx or model.options.ctx, n_seq_max=2)
        self.tokens: list[int] = []
        self.engine = Engine(model, 1)
        self.counts = {"reused_tokens": 0, "prefilled_tokens": 0}
        self._last: tuple[tuple, np.ndarray] | None = None  # the last prompt prefilled and its last row

    @property
    def n_ctx(self) -> int:
        return self.ctx.n_ctx

    def _kept(self, ids: list[int]) -> int:
        """How many leading tokens of ids the line's cells can serve (at most len(ids) - 1: the last is decoded
        for its row); 0 when a sliding window dropped cells that position needs (llama-server's test)."""
        n = min(common_prefix(self.tokens, ids), len(ids) - 1)
        pos_min = self.ctx.seq_pos_min(LINE)
        return n if n > 0 and pos_min <= max(0, n - self.model.n_swa) else 0

    def prefill(self, ids: list[int], reuse: bool = True) -> np.ndarray:
        """The line set to ids (its common prefix kept, unless reuse=False); the raw logits after ids."""
        if reuse and self._last is not None and self._last[0] == tuple(ids) and \
                common_prefix(self.tokens, ids) == len(ids) and self._kept(ids) == len(ids) - 1:
            self.ctx.seq_rm(LINE, len(ids), -1)  # the same prompt again: its cells and its last row are kept
            self.tokens = list(ids)
            self.counts["reused_tokens"] += len(ids)
            return self._last[1]
        n = self._kept(ids) if reuse else 0
        self.ctx.seq_rm(LINE, n, -1)
        self.tokens = list(ids[:n])
        row = self.ctx.prefill(list(ids[n:]), seq=LINE, start=n)
        self.tokens = list(ids)
        self._last = (tuple(ids), row)
        self.counts["reused_tokens"] += n
        self.counts["prefilled_tokens"] += len(ids) - n
        return row

    def row(self, ids: list[int]) -> np.ndarray:
        """The raw logits after ids, read through the probe sequence; the line keeps its cells."""
        return self.rows(ids, len(ids) - 1)[0]

    def rows(self, ids: list[int], first: int) -> np.ndarray:
        """The raw logits after ids[:k + 1] for k = first..len(ids) - 1 ([rows, n_vocab]), read through the
        probe sequence; the line keeps its cells."""
        n = min(self._kept(ids), first)
        ctx = self.ctx
        ctx.seq_rm(PROBE)
        if n:
            ctx.seq_cp(LINE, PROBE, 0, n)
        try:
            return ctx.prefill_rows(list(ids[n:]), first - n, seq=PROBE, start=n)
        finally:
            ctx.seq_rm(PROBE)

    def generate(self, request: Request, on_record: Callable[[TokenRecord], bool] | None = None,
                 reuse: bool = True) -> Sample:
        """Generate one request on the line (module docstring); request.prompt_tokens must be set.

        reuse=False prefills the whole prompt, as `llamalens generate` does: the same tokens and numbers as it.
        Reused cells were decoded one token at a time as they were generated, and a batch's shape moves the
        logits of quantized weights by a few hundredths of a nat (docs/fidelity.md): close to, not equal to,
        a fresh prefill's."""
        [req] = self.engine.prepare([request])
        if len(req.prompt_tokens) >= self.n_ctx:
            raise ValueError(f"the prompt ({len(req.prompt_tokens)} tokens) fills the context ({self.n_ctx})")
        entry = _Line(self, req, on_record, reuse)
        return next(iter(self.engine.run_in(self.ctx, entry, req.n_logprobs)))

    def close(self) -> None:
        self.ctx.close()
        self.tokens, self._last = [], None


class _Line(Entry):
    """The held context's entry policy: one request, on the line, its prompt's common prefix kept."""

    def __init__(self, held: Held, req: Request, on_record, reuse: bool):
        super().__init__(held.engine, held.counts)
        self.held, self.req, self.on_record, self.reuse, self.todo = held, req, on_record, reuse, True

    def waiting(self) -> bool:
        return self.todo

    def enter(self, ctx: Context, seq: int, step: int):
        if not self.todo:
            return None
        self.todo = False
        req, t0 = self.req, time.perf_counter()
        ids = list(req.prompt_tokens)
        row = self.held.prefill(ids, self.reuse)
        root = self.histories.root(("prompt", tuple(ids)))
        live = self.engine.sequence(req, LINE, len(ids), min(req.max_tokens, self.held.n_ctx - len(ids)), t0, root, root)
        live.prompt_ms = (time.perf_counter() - t0) * 1000
        return live, row, self.engine.first_stats(row)

    def recorded(self, live: Live) -> None:
        if self.on_record is not None and self.on_record(live.records[-1]) and live.finish is None:
            live.finish, live.pending = "cancelled", None

    def leave(self, ctx: Context, live: Live) -> None:
        # the line holds every position decoded: the prompt and each record but a last one never decoded
        self.held.tokens = (list(self.req.prompt_tokens) + [r.id for r in live.records])[:live.pos]

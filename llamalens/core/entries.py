"""The entry policies of the decode scheduler (core/engine.py): how and when sequences enter its slots, where a
row comes from, how a sequence's next token is chosen, what a finished sequence leaves in the cache.

    Entry          the base policy: each sequence's own sampler chain picks its token (Engine.choose)
    Prompts        sweeps (Engine.run): a request enters with its prompt's cells, still in the slot, copied from
                   another slot, or prefilled once; its first token comes from the prompt's last row
    Continuations  `llamalens fork` (Engine.run_continuations): sequence 0 holds prompt + base path; a continuation
                   of position t enters with seq_cp(0, s, 0, L+t) and its forced token pending
    (core/beam.py's Beams: beam search, which chooses jointly and forks; core/held.py's Line: a kept context)
"""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import Callable

import numpy as np

from llamalens.core.runtime import Context
from llamalens.core.sequences import Histories, Live, Request, add_counts
from llamalens.core.stats import RowStats


class Entry:
    """An entry policy of the scheduler (the `engine`, an Engine, runs it): how and when sequences enter a slot,
    where a row comes from, how the served sequences' next tokens are chosen, what a finished sequence leaves in
    the cache. `counts`: where the decode counters go."""

    first_seq = 0  # the sequence id of slot 0
    copy_cells = False  # every member of a group gets the served row's cell (else its leader alone holds them)
    base_seq = 0  # the sequence holding a kept row's cell
    exact = False  # every row decoded in a llama_decode call of its own (the batch's shape cannot move its logits)

    def __init__(self, engine, counts: dict, on_token: Callable[[int], None] | None = None):
        self.engine, self.counts, self.histories, self.on_token = engine, counts, Histories(), on_token

    def start(self, ctx: Context) -> None:
        """Set up the fresh context before the first step."""

    def waiting(self) -> bool:
        """Sequences still to enter."""
        raise NotImplementedError

    def enter(self, ctx: Context, seq: int, step: int) -> tuple[Live, np.ndarray | None, RowStats | None] | None:
        """The next sequence, in free sequence `seq` at this step, with its first row when it starts with one
        (else it starts with a token pending); None when none may enter now."""
        raise NotImplementedError

    def kept_row(self, hist: int) -> tuple[np.ndarray, RowStats] | None:
        """The row of a history that needs no decode, and its statistics; None: decode it."""
        return None

    def row_stats(self, block: np.ndarray) -> list[RowStats]:
        """The statistics of a decode's output rows."""
        return self.engine.block_stats(block)

    def count(self, decoded: list[list[Live]], kept: list) -> None:
        """The policy's own counters of a step's rows."""

    def leave(self, ctx: Context, live: Live) -> None:
        """Free a finished sequence's cells."""
        raise NotImplementedError

    def choose(self, ctx: Context, slots: list[Live | None], served: list[tuple]) -> None:
        """The next token of every served sequence ((members, row, RowStats) per row, in slot order): by default
        each one's own sampler chain (Engine.choose). A policy that chooses otherwise (beam search, jointly) may
        fork sequences and end them here (Engine.fork)."""
        self.engine.choose(served, self, self.on_token)

    def recorded(self, live: Live) -> None:
        """A sequence's new record is made (live.records[-1]); the policy may end it here (live.finish)."""


class Prompts(Entry):
    """Sweep entry (Engine.run): a request enters with its prompt's cells (still in the slot, copied from another
    slot, or prefilled once) and samples its first token from the prompt's last row; it leaves its prompt's cells
    for the next request with that prompt."""

    def __init__(self, engine, queue: deque, ctx_len: int, n_par: int, on_token: Callable[[int], None] | None = None):
        super().__init__(engine, engine.stats, on_token)
        self.queue, self.ctx_len = queue, ctx_len
        self.remaining = Counter(tuple(r.prompt_tokens) for r in queue)
        self.slot_prompt: list[tuple | None] = [None] * n_par
        self.first_rows: dict[tuple, np.ndarray] = {}
        self.first_stats: dict[tuple, RowStats] = {}  # of each first row: computed once, shared by its sequences

    def waiting(self) -> bool:
        return bool(self.queue)

    def enter(self, ctx: Context, seq: int, step: int) -> tuple[Live, np.ndarray, RowStats] | None:
        if not self.queue:
            return None
        req = self.queue.popleft()
        key = tuple(req.prompt_tokens)
        t0 = time.perf_counter()
        if self.slot_prompt[seq] != key:
            self._load(ctx, seq, key)
        root = self.histories.root(("prompt", key))
        live = self.engine.sequence(req, seq, len(key), min(req.max_tokens, self.ctx_len - len(key)), t0, root, root)
        live.prompt_ms = (time.perf_counter() - t0) * 1000
        row, st = self.first_rows[key], self.first_stats[key]
        self.remaining[key] -= 1
        if self.remaining[key] <= 0:  # the prompt's last request: its row is not kept past this step
            del self.first_rows[key], self.first_stats[key]
        return live, row, st

    def _load(self, ctx: Context, seq: int, key: tuple) -> None:
        """The prompt's cells into sequence `seq`: copied from a slot that holds them, or prefilled."""
        ctx.seq_rm(seq)
        donor = next((t for t, p in enumerate(self.slot_prompt) if p == key), None)
        if donor is not None and key in self.first_rows:
            ctx.seq_cp(donor, seq, 0, len(key))
            self.counts["prompt_copies"] += 1
        else:
            engine = self.engine
            self.first_rows[key] = ctx.prefill(list(key), seq=seq)
            self.first_stats[key] = engine.first_stats(self.first_rows[key])
            self.counts["prefills"] += 1
            self.counts["prompt_tokens"] += len(key)
        self.slot_prompt[seq] = key

    def leave(self, ctx: Context, live: Live) -> None:
        ctx.seq_rm(live.slot, len(live.req.prompt_tokens), -1)


class Continuations(Entry):
    """Continuation entry (Engine.run_continuations): sequence 0 holds prefix + base path; a continuation of
    position t enters with the cells of prefix + base[:t] copied from it and its forced token pending, at step
    t - t0 when all fit in the slots (the diagonal schedule); a history on the base path is served the base path's
    prefill row (kept for positions t0+1..hi) with its cell from sequence 0; every member of a group gets the
    row's cell; a finished continuation's cells are removed."""

    first_seq = 1
    copy_cells = True

    def __init__(self, engine, prefix_ids: list[int], base_ids: list[int], requests: list[Request],
                 base_rows: int, share: bool, counts: dict):
        super().__init__(engine, counts)
        self.L, self.full, self.share = len(prefix_ids), list(prefix_ids) + list(base_ids), share
        self.todo = deque(sorted(requests, key=self.position))
        self.t0 = self.position(self.todo[0])
        self.n_par = min(engine.n_parallel, len(self.todo))
        # more continuations than slots: they enter as slots free, by position (holding them back costs more decodes
        # than the rows it saves, measured with scripts/bench.py)
        self.diagonal = share and len(self.todo) <= self.n_par
        self.chain = [self.histories.root(("prompt",))]  # chain[k]: the id of prefix + base[:k]
        for tok in base_ids:
            self.chain.append(self.histories.child(self.chain[-1], tok))
        # the prefill's rows of prefix + base[:k], t0 < k <= hi (a continuation's histories are longer than L + t0)
        self.hi = min(len(base_ids), self.t0 + base_rows) if share else self.t0
        self.on_base = {self.chain[k]: k for k in range(self.t0 + 1, self.hi + 1)}
        self.base_rows: np.ndarray | None = None
        self.base_stats: dict[int, RowStats] = {}  # a base row's statistics: computed once

    def position(self, r: Request) -> int:
        return len(r.prompt_tokens) - 1 - self.L

    def start(self, ctx: Context) -> None:
        L, t0, hi = self.L, self.t0, self.hi
        self.base_rows = ctx.prefill_rows(self.full, L + t0, L + hi, seq=self.base_seq) if hi > t0 else None
        if self.base_rows is None:
            ctx.prefill(self.full, seq=self.base_seq)
        add_counts(self.counts, prefill_tokens=len(self.full))

    def waiting(self) -> bool:
        return bool(self.todo)

    def enter(self, ctx: Context, seq: int, step: int) -> tuple[Live, None, None] | None:
        if not self.todo or (self.diagonal and self.position(self.todo[0]) > self.t0 + step):
            return None
        r = self.todo.popleft()
        t, w = self.position(r), r.prompt_tokens[-1]
        ctx.seq_rm(seq)
        ctx.seq_cp(self.base_seq, seq, 0, self.L + t)
        below = self.chain[t]
        hist = self.histories.child(below, w) if self.share else self.histories.root(("entry", t, w), parent=below)
        return self.engine.sequence(r, seq, self.L + t, r.max_tokens, time.perf_counter(), hist, below, pending=w), None, None

    def kept_row(self, hist: int) -> tuple[np.ndarray, RowStats] | None:
        k = self.on_base.get(hist)
        if k is None:
            return None
        row = self.base_rows[k - self.t0 - 1]
        st = self.base_stats.get(k)
        if st is None:
            st = self.base_stats[k] = RowStats.of(row, None, self.engine.top_n)
        return row, st

    def row_stats(self, block: np.ndarray) -> list[RowStats]:
        return [RowStats.of(row, None, self.engine.top_n) for row in block]

    def count(self, decoded: list[list[Live]], kept: list) -> None:
        if decoded:  # rows holding some continuation's forced token
            forced = sum(any(not m.records for m in g) for g in decoded)
            add_counts(self.counts, forced_tokens=forced, prefill_tokens=forced)
        add_counts(self.counts, base_rows_reused=len(kept))

    def leave(self, ctx: Context, live: Live) -> None:
        ctx.seq_rm(live.slot)

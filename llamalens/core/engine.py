"""The decoding engine: many sequences decoded together, one exact TokenRecord per generated token.

(One module, longer than the house's limit: the one decode scheduler, whose two entry policies share every
step's pieces; split, the steps and the policies they serve would be read in different files.)

One decode scheduler (Engine._loop) serves both kinds of run. It owns P slots of one llama.cpp context (unified KV
cache), the histories of the sequences in them, the rows they share and the picks; an entry policy it is given says
how and when a sequence enters a slot and where a row comes from:

    Engine.run (_Prompts, sweeps): requests ──► queue (ordered by prompt) ──► a free slot takes the next request:
                                   same prompt still in the slot  -> nothing to do
                                   same prompt held by another slot -> seq_cp(0..len)
                                   otherwise                       -> prefill it once
        its first token comes from its prompt's last row, copied once per prompt (n_vocab floats) and reused by
        every sequence of that prompt; nothing of size context × vocabulary is ever kept.
    Engine.run_continuations (_Continuations, `llamalens fork`): sequence 0 holds prompt + base path, prefilled
        once; a continuation of position t (prompt + base[:t] + [w]) enters a free sequence (1..P) with
        seq_cp(0, s, 0, L+t) and w pending, like a sampled token. When all fit in the slots, the continuations of
        position t enter at step t - t0, so that their histories are as long as the earlier positions'
        continuations' and identical ones meet; else as slots free, by position. The base path's prefill rows of
        positions t0+1..hi are kept: a history on the base path is served its row without a decode.

    every step (_loop):
      1. free slots take the sequences the policy lets in, in slot order (_enter)
      2. the sequences with a token pending are grouped by history (_groups): histories are interned, (parent id,
         token) -> id, so sequences whose token sequences are identical share one row (`fanned_out_tokens`)
      3. one row per group (_serve): kept by the policy, or decoded: one llama_decode with one token per group, at
         its leader's sequence; the output rows, one contiguous [n_outputs, n_vocab] block (Context.logits_block),
         get their statistics at once:
             block ──► block_stats: per row lse, entropy, the sorted top list, rank candidates [stats.py: one C
                       call for the whole block, kernels.block_pass, into arrays kept from step to step (reuse);
                       numpy's passes without the kernel]  (continuations: RowStats.of, row by row)
         A sweep group's leader alone holds the history's cells; every member of a continuations' group gets the
         row's cell (seq_cp of one position).
      4. per sequence (_choose):
             raw row ──► candidate array ──► its own native sampler chain [sampler.Sampler.choose] -> Pick:
                         chosen token, survivors (candidates), sampled_logprob
                         (a top-k chain whose earlier stages leave the logits alone is fed only the row's
                         top k, taken from block_stats' candidates, when its k+1 largest logits are all
                         different: the same survivors and pick, sampler._prefilter_k says why; one C call,
                         kernels.pick_ids, which also ranks the pick from the top list. Over a large survivor
                         set dist's pick is made in numpy when it provably is dist's, sampler.dist_select, the
                         sampled logprob included)
                     └─► the row's statistics for the chosen token (logprob, rank) -> TokenRecord (_record); the
                         pick extends the sequence's history
      5. a group's leader must hold its parent's cells: when the sequence that held them went another way, they
         are copied to it (_hold: `history_copies`; before any slot is retired, as the holder may have finished)
      6. a finished sequence (EOG, stop string, max_tokens) frees its slot (_retire): a sweep's keeps its prompt
         cells, so the next request with the same prompt starts without any prefill; a continuation's are removed.

Fidelity: the chain is the one llama-cpp-python builds, applied to the same raw logits, and its
accept() sees only generated tokens, as in `Llama.generate`. With one slot, the same flash-attention
setting and the same prompt tokens, the tokens equal `create_completion`'s (tests check this).
Batched logits can differ from single-sequence ones by a few hundredths of a nat on quantized
weights (the repacked Q4_K and non-flash attention kernels change with the batch shape);
`n_parallel=1` is the exact, slow path.
"""

from __future__ import annotations

import gc
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

import numpy as np

from llamalens.errors import InvalidArgument, InvalidSettings
from llamalens.records import Sample, Timing, TokenRecord, alternatives
from llamalens.core.strategies import banned_tokens
from llamalens.core.runtime import Context, Model, round_ctx
from llamalens.core.grammar import constrained_apply
from llamalens.core.sampler import Candidates, GrammarSampler, Sampler, prefilter_k
from llamalens.settings import SamplingSettings
from llamalens.core.confidence import renyi_to_uniform
from llamalens.core.stats import CHUNK, RowStats, block_stats

@dataclass
class Request:
    """One completion to generate."""

    prompt: str
    settings: SamplingSettings
    max_tokens: int = 16
    n_logprobs: int = 5
    stop: tuple[str, ...] = ()
    key: object = None
    prompt_tokens: list[int] | None = None  # filled by the engine when None
    grammar: str | None = None  # GBNF text constraining the reply (grammar.py)

    def problems(self) -> list[str]:
        out = self.settings.problems()
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            out.append(f"max-tokens {self.max_tokens!r} is out of range (must be >= 1)")
        if not isinstance(self.n_logprobs, int) or self.n_logprobs < 0:
            out.append(f"logprobs {self.n_logprobs!r} is out of range (must be >= 0)")
        if any(s == "" for s in self.stop):
            out.append("an empty --stop string would stop at once; remove it")
        return out


@dataclass
class _Live:
    req: Request
    slot: int  # the llama.cpp sequence id it decodes in
    sampler: Sampler
    max_tokens: int
    t_start: float
    prompt_ms: float = 0.0
    t_first: float = 0.0
    pos: int = 0  # position of the next token to decode
    records: list[TokenRecord] = field(default_factory=list)
    text: bytearray = field(default_factory=bytearray)
    pending: int | None = None  # token sampled (or forced) but not yet decoded
    finish: str | None = None
    stop_at: int | None = None  # byte offset where a stop string begins
    hist: int = 0  # id of (prompt + tokens sampled so far, pending included)
    kv_hist: int = 0  # id of the history whose KV cells this slot holds
    grammar: GrammarSampler | None = None
    removed: list[float] = field(default_factory=list)  # raw mass the grammar forbade, per token

    def close(self) -> None:
        self.sampler.close()
        if self.grammar is not None:
            self.grammar.close()


NO_TOKEN = -1  # a Pick's token when the grammar left nothing to pick


@dataclass(frozen=True)
class Pick:
    """One sequence's choice at one step (Engine._pick), what Engine._record turns into its TokenRecord."""

    token: int
    sampled_logprob: float  # among the chain's survivors, after temperature (0.0 greedy)
    candidates: int  # how many survivors
    blocked: list[int]  # tokens no-repeat-ngram banned before the chain
    removed: float | None  # raw mass the grammar forbade (None without a grammar)
    prefiltered: bool  # the chain was fed only the row's top k (sampler.prefilter_k)
    known: tuple[float, int] | None  # the pick's raw logit and rank when the prefiltered pick ranked it


class _Histories:
    """Token sequences as ids: a root key, or (parent id, token), interned; each child's parent kept."""

    def __init__(self) -> None:
        self.ids: dict[tuple, int] = {}
        self.parent: dict[int, int] = {}

    def root(self, key: tuple, parent: int | None = None) -> int:
        h = self.ids.setdefault(key, len(self.ids))
        if parent is not None:  # a root whose cells below its first token are another history's
            self.parent[h] = parent
        return h

    def child(self, h: int, token: int) -> int:
        c = self.ids.setdefault((h, token), len(self.ids))
        self.parent[c] = h
        return c


def _add(counts: dict, **amounts: int) -> None:
    """Add to decode counters (a Counter or a plain dict: a key appears when first added to, even by 0)."""
    for k, v in amounts.items():
        counts[k] = counts.get(k, 0) + v


class Entry:
    """An entry policy of the scheduler (Engine._loop): how and when sequences enter a slot, where a row comes
    from, what a finished sequence leaves in the cache. `counts`: where the decode counters go."""

    first_seq = 0  # the sequence id of slot 0
    copy_cells = False  # every member of a group gets the served row's cell (else its leader alone holds them)
    base_seq = 0  # the sequence holding a kept row's cell

    def __init__(self, engine: "Engine", counts: dict):
        self.engine, self.counts, self.histories = engine, counts, _Histories()

    def start(self, ctx: Context) -> None:
        """Set up the fresh context before the first step."""

    def waiting(self) -> bool:
        """Sequences still to enter."""
        raise NotImplementedError

    def enter(self, ctx: Context, seq: int, step: int) -> tuple[_Live, np.ndarray | None, RowStats | None] | None:
        """The next sequence, in free sequence `seq` at this step, with its first row when it starts with one
        (else it starts with a token pending); None when none may enter now."""
        raise NotImplementedError

    def kept_row(self, hist: int) -> tuple[np.ndarray, RowStats] | None:
        """The row of a history that needs no decode, and its statistics; None: decode it."""
        return None

    def row_stats(self, block: np.ndarray) -> list[RowStats]:
        """The statistics of a decode's output rows."""
        return self.engine._block_stats(block)

    def count(self, decoded: list[list[_Live]], kept: list) -> None:
        """The policy's own counters of a step's rows."""

    def leave(self, ctx: Context, live: _Live) -> None:
        """Free a finished sequence's cells."""
        raise NotImplementedError

    def recorded(self, live: _Live) -> None:
        """A sequence's new record is made (live.records[-1]); the policy may end it here (live.finish)."""


class _Prompts(Entry):
    """Sweep entry (Engine.run): a request enters with its prompt's cells (still in the slot, copied from another
    slot, or prefilled once) and samples its first token from the prompt's last row; it leaves its prompt's cells
    for the next request with that prompt."""

    def __init__(self, engine: "Engine", queue: deque, ctx_len: int, n_par: int):
        super().__init__(engine, engine.stats)
        self.queue, self.ctx_len = queue, ctx_len
        self.remaining = Counter(tuple(r.prompt_tokens) for r in queue)
        self.slot_prompt: list[tuple | None] = [None] * n_par
        self.first_rows: dict[tuple, np.ndarray] = {}
        self.first_stats: dict[tuple, RowStats] = {}  # of each first row: computed once, shared by its sequences

    def waiting(self) -> bool:
        return bool(self.queue)

    def enter(self, ctx: Context, seq: int, step: int) -> tuple[_Live, np.ndarray, RowStats] | None:
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

    def leave(self, ctx: Context, live: _Live) -> None:
        ctx.seq_rm(live.slot, len(live.req.prompt_tokens), -1)


class _Continuations(Entry):
    """Continuation entry (Engine.run_continuations): sequence 0 holds prefix + base path; a continuation of
    position t enters with the cells of prefix + base[:t] copied from it and its forced token pending, at step
    t - t0 when all fit in the slots (the diagonal schedule); a history on the base path is served the base path's
    prefill row (kept for positions t0+1..hi) with its cell from sequence 0; every member of a group gets the
    row's cell; a finished continuation's cells are removed."""

    first_seq = 1
    copy_cells = True

    def __init__(self, engine: "Engine", prefix_ids: list[int], base_ids: list[int], requests: list[Request],
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
        _add(self.counts, prefill_tokens=len(self.full))

    def waiting(self) -> bool:
        return bool(self.todo)

    def enter(self, ctx: Context, seq: int, step: int) -> tuple[_Live, None, None] | None:
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
            st = self.base_stats[k] = RowStats.of(row, None, self.engine._top_n)
        return row, st

    def row_stats(self, block: np.ndarray) -> list[RowStats]:
        return [RowStats.of(row, None, self.engine._top_n) for row in block]

    def count(self, decoded: list[list[_Live]], kept: list) -> None:
        if decoded:  # rows holding some continuation's forced token
            forced = sum(any(not m.records for m in g) for g in decoded)
            _add(self.counts, forced_tokens=forced, prefill_tokens=forced)
        _add(self.counts, base_rows_reused=len(kept))

    def leave(self, ctx: Context, live: _Live) -> None:
        ctx.seq_rm(live.slot)


class Engine:
    """Decodes requests with up to `n_parallel` sequences per llama_decode call."""

    def __init__(self, model: Model, n_parallel: int = 1):
        self.model = model
        self.n_parallel = max(1, int(n_parallel))
        self._buffers = Candidates(model.n_vocab)
        self._grammar_buffers: Candidates | None = None  # made for the first grammar
        self.prefilter = True  # feed top-k chains only the row's top k when that is exact (sampler.prefilter_k)
        self._top_n = self._floor_n = 0
        # a step's per-sequence work (_picks) and block statistics on this many Python threads: 1 (off) until a
        # gain is measured on a quiet 2-core machine (none could be so far; same records either way, tested)
        self.analysis_threads = 1
        self._pool: ThreadPoolExecutor | None = None
        self._owner, self._local = threading.get_ident(), threading.local()
        self.stats = Counter()  # decode calls, tokens decoded, prefills, prompt copies

    # -- public --------------------------------------------------------------------------------
    def prepare(self, requests: Iterable[Request]) -> list[Request]:
        """Validate and tokenize requests; raise InvalidSettings / PromptTooLong before any decoding."""
        reqs = list(requests)
        ctx = self.model.options.ctx
        cache: dict[str, list[int]] = {}
        for r in reqs:
            problems = r.problems()
            if problems:
                raise InvalidSettings("; ".join(problems))
            if r.prompt_tokens is None:
                if r.prompt not in cache:
                    cache[r.prompt] = self.model.prompt_tokens(r.prompt)
                r.prompt_tokens = cache[r.prompt]
            if not r.prompt_tokens:
                raise InvalidSettings("the prompt is empty and the model adds no BOS token; give a prompt")
            self.model.check_fits(len(r.prompt_tokens), ctx)
        for gbnf in {r.grammar for r in reqs if r.grammar}:  # a grammar that cannot parse fails before decoding
            GrammarSampler(self.model, gbnf).close()
        return reqs

    def run(self, requests: Iterable[Request], on_token: Callable[[int], None] | None = None) -> Iterator[Sample]:
        """Generate every request; yield each Sample as soon as it finishes (not in request order)."""
        reqs = self.prepare(requests)
        if not reqs:
            return
        order = {}
        for r in reqs:  # group by prompt, keep first-seen order of prompts
            order.setdefault(tuple(r.prompt_tokens), len(order))
        queue = deque(sorted(reqs, key=lambda r: order[tuple(r.prompt_tokens)]))
        n_par = min(self.n_parallel, len(reqs))
        ctx_len = self.model.options.ctx
        max_prompt = max(len(r.prompt_tokens) for r in reqs)
        max_new = max(min(r.max_tokens, ctx_len - len(r.prompt_tokens)) for r in reqs)
        n_prompts = min(len(order), n_par)
        cells = n_prompts * max_prompt + n_par * (max_new + 1) + 1
        cells = max(cells, max_prompt + max_new + 1)
        self._top_n = max(r.n_logprobs for r in reqs)
        ks = {prefilter_k(s, self.model) for s in {r.settings for r in reqs if not r.grammar}} if self.prefilter else ()
        self._floor_n = max(ks, default=0) + 1  # block_stats' candidates then hold the top k + 1 of every row
        yield from self._run(_Prompts(self, queue, ctx_len, n_par), n_par, on_token, n_ctx=round_ctx(cells), n_seq_max=n_par)

    def run_continuations(self, prefix_ids: list[int], base_ids: list[int], requests: Iterable[Request], *,
                          base_rows: int = 0, share: bool = True, stats: dict | None = None) -> Iterator[Sample]:
        """Decode continuations of one base path batched over its cells; yield each Sample as it finishes.

        Sequence 0 holds prefix + base path, prefilled once; the continuations decode in sequences 1..n_parallel
        (so n_parallel is at most llama.cpp's sequence limit minus one). A request's prompt_tokens are
        prefix + base[:t] + [w], w no end-of-generation token, max_tokens >= 1 (taken as they are: nothing is
        tokenized, validated or cut to the context here); its sampler sees only the tokens it generates.
        `base_rows`: how many of the base path's prefill rows after the first continuation's position are kept,
        so that a history on the base path needs no decode. share=False: one history root per (t, w), every row
        decoded, no entry schedule. The decode counters (prefill_tokens, decodes, decoded_tokens, forced_tokens,
        base_rows_reused, fanned_out_tokens) are added to `stats` as they happen."""
        reqs = list(requests)
        if not reqs:
            return
        counts = stats if stats is not None else {}
        self._top_n, self._floor_n = max(r.n_logprobs for r in reqs), 0
        entry = _Continuations(self, prefix_ids, base_ids, reqs, base_rows, share, counts)
        longest = max(r.max_tokens for r in reqs)
        n_ctx = round_ctx(len(entry.full) + entry.n_par * (longest + 2) + 1)
        yield from self._run(entry, entry.n_par, None, n_ctx=n_ctx, n_seq_max=entry.n_par + 1)

    def run_in(self, ctx: Context, entry: Entry, n_logprobs: int) -> Iterator[Sample]:
        """Decode with an entry policy in a context its caller keeps between runs (core/held.py): one slot, the
        sequence the policy names; `n_logprobs` alternatives a record."""
        self._top_n, self._floor_n = n_logprobs, 0
        gc.freeze()
        try:
            yield from self._loop(ctx, entry, 1, None)
        finally:
            gc.unfreeze()

    def first_stats(self, row: np.ndarray) -> RowStats:
        """The statistics of a sequence's first row (a prompt's last), as the scheduler computes them."""
        return block_stats(row, self._top_n, self._floor_n)[0]

    # -- the scheduler ---------------------------------------------------------------------------
    def _run(self, entry: Entry, n_par: int, on_token, **context) -> Iterator[Sample]:
        """The scheduler in a fresh context. The objects alive before the run stay out of the collector's passes
        while it runs (a full collection over a large heap, numpy's, pandas', a notebook's, pauses a step for
        milliseconds); the run's own garbage is still collected."""
        gc.freeze()
        try:
            with self.model.context(**context) as ctx:
                entry.start(ctx)
                yield from self._loop(ctx, entry, n_par, on_token)
        finally:
            gc.unfreeze()

    def _loop(self, ctx: Context, entry: Entry, n_par: int, on_token) -> Iterator[Sample]:
        """The decode scheduler (module docstring): P slots, one step after another until every sequence is done."""
        slots: list[_Live | None] = [None] * n_par
        if self.analysis_threads > 1 and n_par > 1:
            self._pool = ThreadPoolExecutor(self.analysis_threads, thread_name_prefix="llamalens-analysis")
        try:
            step = 0
            while entry.waiting() or any(slots):
                served = self._enter(ctx, entry, slots, step)
                served += self._serve(ctx, entry, self._groups(slots, entry.histories))
                self._choose(served, entry, on_token)
                self._hold(ctx, entry, slots)
                yield from self._retire(ctx, entry, slots)
                step += 1
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None
            for live in slots:
                if live is not None:
                    live.close()

    def sequence(self, req: Request, seq: int, pos: int, max_tokens: int, t_start: float, hist: int, kv_hist: int,
              pending: int | None = None) -> _Live:
        """A sequence entering sequence `seq` at position `pos`, its own sampler chain (and grammar) made."""
        return _Live(req, seq, Sampler.for_sequence(req.settings, self.model, req.prompt_tokens), max_tokens=max_tokens,
                     t_start=t_start, pos=pos, pending=pending, hist=hist, kv_hist=kv_hist,
                     grammar=GrammarSampler(self.model, req.grammar) if req.grammar else None)

    @staticmethod
    def _enter(ctx: Context, entry: Entry, slots: list[_Live | None], step: int) -> list[tuple]:
        """1. Free slots take the sequences the entry lets in now, in slot order; one that starts with a row (a
        prompt's last row) is served it at once, as a group of its own."""
        served = []
        for s, live in enumerate(slots):
            if live is None:
                got = entry.enter(ctx, entry.first_seq + s, step)
                if got is None:
                    break
                live, row, st = got
                slots[s] = live
                if row is not None:
                    served.append(([live], row, st))
        return served

    @staticmethod
    def _groups(slots: list[_Live | None], histories: _Histories) -> list[list[_Live]]:
        """2. The sequences with a token pending, grouped by history in slot order; first in each group (its leader)
        the first that holds its parent history's cells, if one does."""
        by_hist: dict[int, list[_Live]] = {}
        for live in slots:
            if live is not None and live.pending is not None:
                by_hist.setdefault(live.hist, []).append(live)
        groups = []
        for h, members in by_hist.items():
            need = histories.parent[h]
            groups.append([b for b in members if b.kv_hist == need] + [b for b in members if b.kv_hist != need])
        return groups

    def _serve(self, ctx: Context, entry: Entry, groups: list[list[_Live]]) -> list[tuple]:
        """3. One row per group: kept by the entry, else decoded (one llama_decode, one token per group, at its
        leader's sequence); members share the row. Returns (members, row, the row's RowStats) per group."""
        decoded, served = [], []
        kept = []  # (members, the sequence holding the row's cell, row, statistics)
        for g in groups:
            got = entry.kept_row(g[0].hist)
            if got is None:
                decoded.append(g)
            else:
                kept.append((g, entry.base_seq, *got))
        if decoded:
            leaders = [g[0] for g in decoded]
            ctx.decode([b.pending for b in leaders], [b.pos for b in leaders], [b.slot for b in leaders], [1] * len(leaders))
            _add(entry.counts, decodes=1, decoded_tokens=len(leaders))
            block = ctx.logits_block(len(leaders))  # the decode's output rows, one contiguous block
            served = [(g, g[0].slot, row, st) for g, row, st in zip(decoded, block, entry.row_stats(block))]
        entry.count(decoded, kept)
        if groups:
            _add(entry.counts, fanned_out_tokens=sum(len(g) - 1 for g in groups))
        out = []
        for members, src, row, st in served + kept:
            for b in members if entry.copy_cells else members[:1]:
                if b.slot != src:
                    ctx.seq_cp(src, b.slot, b.pos, b.pos + 1)
                b.kv_hist = b.hist
            for b in members:
                b.pos += 1
                b.pending = None
            out.append((members, row, st))
        return out

    def _choose(self, served: list[tuple], entry: Entry, on_token) -> None:
        """4. Each served sequence's own chain picks from its row (_picks); then, in order, its record (_record),
        and its history extended by the pick when it goes on."""
        step = [b for members, _, _ in served for b in members]
        rows = [row for members, row, _ in served for _ in members]
        stats = [st for members, _, st in served for _ in members]
        for live, row, st, pick in zip(step, rows, stats, self._picks(step, rows, stats)):
            self._record(live, row, st, pick)
            entry.recorded(live)
            if live.pending is not None:
                live.hist = entry.histories.child(live.hist, live.pending)
            if on_token:
                on_token(1)

    @staticmethod
    def _hold(ctx: Context, entry: Entry, slots: list[_Live | None]) -> None:
        """5. A group's leader must hold its parent's cells: when none of its members does (the one that did went
        another way, or finished), the first gets them copied from a sequence that holds them."""
        for members in Engine._groups(slots, entry.histories):
            lead = members[0]
            need = entry.histories.parent[lead.hist]
            if lead.kv_hist != need:
                src = next(x for x in slots if x is not None and x.kv_hist == need)
                plen = len(lead.req.prompt_tokens)
                ctx.seq_rm(lead.slot, plen, -1)
                ctx.seq_cp(src.slot, lead.slot, plen, -1)
                lead.kv_hist = need
                _add(entry.counts, history_copies=1)

    def _retire(self, ctx: Context, entry: Entry, slots: list[_Live | None]) -> Iterator[Sample]:
        """6. Finished sequences leave (entry.leave says what of their cells stays) and are yielded."""
        for s, live in enumerate(slots):
            if live is not None and live.finish is not None:
                entry.leave(ctx, live)
                live.close()
                slots[s] = None
                yield self._sample(live)

    # -- one sequence's pick and record ------------------------------------------------------------
    def _candidates(self) -> tuple[Candidates, Candidates | None]:
        """The calling thread's llama_token_data buffers (the engine's own on the thread that made it)."""
        if threading.get_ident() == self._owner:
            return self._buffers, self._grammar_buffers
        b = getattr(self._local, "bufs", None)
        if b is None:
            b = self._local.bufs = (Candidates(self.model.n_vocab), Candidates(self.model.n_vocab))
        return b

    def _pick(self, live: _Live, row: np.ndarray, row_stats: RowStats) -> Pick:
        """The chain's choice for one sequence: what needs the row, the chain and nothing shared, so the
        sequences of a step can run it on different threads (_picks). The chain's state changes only in
        _record (accept), on the engine's thread, in order."""
        req = live.req
        n_gram = req.settings.no_repeat_ngram
        blocked = sorted(banned_tokens(req.prompt_tokens + [r.id for r in live.records], n_gram)) if n_gram else []
        if blocked:  # no-repeat-ngram: banned before the chain; the raw row (shared) stays as it is
            row = row.copy()
            row[blocked] = -np.inf
        buffers, grammar_buffers = self._candidates()
        if live.grammar is None:
            k = live.sampler.prefilter_k if self.prefilter and not blocked else 0
            top = row_stats.top_k_list(k) if k else None  # None: a tie among the k+1 largest, the full row
            token, sampled_lp, n_cand = live.sampler.choose(row, buffers, top, None if blocked else row_stats.dist_block_sums,
                                                            row_stats.ranks)
            known = buffers.pick
            return Pick(token, sampled_lp, n_cand, blocked, None, top is not None,
                        (known.logit, known.rank) if known.rank else None)
        # grammar.py: the chain's pick, resampled under the grammar when it does not fit
        if grammar_buffers is None:
            grammar_buffers = self._grammar_buffers = Candidates(self.model.n_vocab)
        survivors, sel, removed = constrained_apply(live.sampler, live.grammar, row, buffers, grammar_buffers)
        if sel is None:  # a dead end: no token to record or accept (_record ends the sample)
            return Pick(NO_TOKEN, 0.0, 0, blocked, removed, False, None)
        return Pick(*live.sampler.outcome(survivors, sel), blocked, removed, False, None)

    def _picks(self, live: list[_Live], rows: list[np.ndarray], stats: list[RowStats]) -> list[Pick]:
        """_pick of every sequence of a step, spread over the thread pool when there is one (the chain's native
        code and numpy's passes release the GIL); the same results in the same order as one by one."""
        if self._pool is None or len(live) < 2:
            return [self._pick(*a) for a in zip(live, rows, stats)]
        return list(self._pool.map(self._pick, live, rows, stats))

    def _block_stats(self, block: np.ndarray) -> list[RowStats]:
        """block_stats of a step's rows, split by rows over the thread pool (at CHUNK row groups: each row's
        numbers are computed exactly as in one call)."""
        n = block.shape[0]
        per = max(1, CHUNK // max(block.shape[1], 1))
        if self._pool is None or n < 2 * per:
            return block_stats(block, self._top_n, self._floor_n, reuse=True)
        cut = -(-(n // 2) // per) * per
        parts = self._pool.map(lambda b: block_stats(b, self._top_n, self._floor_n, reuse=True), (block[:cut], block[cut:]))
        return [st for part in parts for st in part]

    def _record(self, live: _Live, raw: np.ndarray, row_stats: RowStats, pick: Pick) -> None:
        """The TokenRecord of a pick (in order, on the engine's thread): accept, statistics, stop checks."""
        model, req, token = self.model, live.req, pick.token
        if token == NO_TOKEN:  # the grammar allows no token the chain can pick: the sample ends here
            live.finish = "grammar"
            return
        self.stats["prefiltered"] += pick.prefiltered
        if live.grammar is not None:
            live.removed.append(pick.removed)
            live.grammar.accept(token)
        live.sampler.accept(token)
        st = row_stats.for_token(raw, token) if pick.known is None else row_stats.chosen(*pick.known)  # (raw logit, rank)
        if live.t_first == 0.0:
            live.t_first = time.perf_counter()
        text, hex_bytes = model.token_text(token)
        eog = model.is_eog(token)
        live.records.append(TokenRecord(
            position=len(live.records), id=token, text=text, bytes=hex_bytes,
            logprob=st.logprob, sampled_logprob=pick.sampled_logprob, rank=st.rank, entropy=st.entropy,
            candidates=pick.candidates, top=alternatives(model.token_text, *st.top_lists(req.n_logprobs)), eog=eog,
            blocked=pick.blocked, renyi=renyi_to_uniform(raw, row_stats.lse),
        ))
        if eog:
            live.finish = "stop"
            return
        before = len(live.text)
        live.text += model.piece(token, special=False)
        for stop in req.stop:
            sb = stop.encode("utf-8")
            at = live.text.find(sb, max(0, before - len(sb) + 1))
            if at != -1 and (live.stop_at is None or at < live.stop_at):
                live.stop_at = at
        if live.stop_at is not None:
            live.finish = "stop"
        elif len(live.records) >= live.max_tokens:
            live.finish = "length"
        else:
            live.pending = token

    def _sample(self, live: _Live) -> Sample:
        t_end = time.perf_counter()
        text = bytes(live.text[: live.stop_at] if live.stop_at is not None else live.text)
        n = len(live.records)
        timing = Timing(
            prompt_tokens=len(live.req.prompt_tokens), generated_tokens=n, prompt_ms=live.prompt_ms,
            first_token_ms=(live.t_first - live.t_start) * 1000, total_ms=(t_end - live.t_start) * 1000,
        )
        return Sample(
            prompt=live.req.prompt, prompt_token_ids=list(live.req.prompt_tokens),
            settings=live.req.settings.to_dict(), max_tokens=live.req.max_tokens,
            text=text.decode("utf-8", errors="replace"), finish_reason=live.finish or "length",
            tokens=live.records, timing=timing, key=live.req.key,
            grammar_removed=list(live.removed) if live.grammar is not None else None,
        )


def context_notes(requests: Iterable[Request], ctx: int) -> list[str]:
    """Say up front when the context ends generation before max_tokens (prepared requests)."""
    short = [r for r in requests if len(r.prompt_tokens) + r.max_tokens > ctx]
    if not short:
        return []
    longest = max(len(r.prompt_tokens) for r in short)
    want = max(r.max_tokens for r in short)
    return [f"--ctx {ctx} leaves room for {ctx - longest} generated tokens after the longest prompt ({longest} tokens), "
            f"fewer than the {want} asked for: {len(short)} sample(s) will stop at the context's end "
            "(finish_reason 'length'); raise --ctx to generate more"]


def generate(model: Model, prompt: str, settings: SamplingSettings | None = None, *, max_tokens: int = 16,
             n_logprobs: int = 5, stop: Iterable[str] = ()) -> Sample:
    """Generate one completion with full per-token records (one sequence, the exact path).

    >>> generate(model, "The capital of France is", SamplingSettings(temperature=0)).text  # doctest: +SKIP
    ' Paris'
    """
    if settings is not None and not isinstance(settings, SamplingSettings):
        raise InvalidArgument(f"settings={settings!r:.60}: give a SamplingSettings, e.g. "
                              "SamplingSettings(temperature=0.7), or None")
    req = Request(prompt, settings or SamplingSettings(), max_tokens, n_logprobs, tuple(stop))
    return next(iter(Engine(model, 1).run([req])))

"""The decoding engine: many sequences decoded together, one exact TokenRecord per generated token.

One decode scheduler (Engine._loop) serves every kind of decoding. It owns P slots of one llama.cpp context (unified
KV cache), the sequences in them (core/sequences.py: Live), their interned histories, the rows they share and the
picks; an entry policy it is given (core/entries.py: Entry) says how and when a sequence enters a slot, where a row
comes from, and how the next tokens are chosen:

    Engine.run (Prompts, sweeps): requests ──► queue (ordered by prompt) ──► a free slot takes the next request:
                                   same prompt still in the slot  -> nothing to do
                                   same prompt held by another slot -> seq_cp(0..len)
                                   otherwise                       -> prefill it once
        its first token comes from its prompt's last row, copied once per prompt (n_vocab floats) and reused by
        every sequence of that prompt; nothing of size context × vocabulary is ever kept.
    Engine.run_continuations (Continuations, `llamalens fork`): sequence 0 holds prompt + base path, prefilled
        once; a continuation of position t (prompt + base[:t] + [w]) enters a free sequence (1..P) with
        seq_cp(0, s, 0, L+t) and w pending, like a sampled token. When all fit in the slots, the continuations of
        position t enter at step t - t0, so that their histories are as long as the earlier positions'
        continuations' and identical ones meet; else as slots free, by position. The base path's prefill rows of
        positions t0+1..hi are kept: a history on the base path is served its row without a decode.
    Engine.run_policy (core/beam.py's Beams): the prompt enters once; the policy chooses over all the beams' rows
        at once and says which sequences go on (Engine.fork): a parent's first child keeps its sequence, others
        take a dead beam's with a copy of the parent's cells.
    Engine.run_in (core/held.py's Line): one request in a context its caller keeps between generations.

    every step (_loop):
      1. free slots take the sequences the policy lets in, in slot order (_enter)
      2. the sequences with a token pending are grouped by history (_groups): histories are interned, (parent id,
         token) -> id, so sequences whose token sequences are identical share one row (`fanned_out_tokens`)
      3. one row per group (_serve): kept by the policy, or decoded: one llama_decode with one token per group, at
         its leader's sequence (an exact policy: one llama_decode a row); the output rows, one contiguous
         [n_outputs, n_vocab] block (Context.logits_block), get their statistics at once:
             block ──► block_stats: per row lse, entropy, the sorted top list, rank candidates [stats.py: one C
                       call for the whole block, kernels.block_pass, into arrays kept from step to step (reuse);
                       numpy's passes without the kernel]  (continuations, beams: RowStats.of, row by row)
         A sweep group's leader alone holds the history's cells; every member of a continuations' group gets the
         row's cell (seq_cp of one position).
      4. the policy chooses (Entry.choose); by default per sequence (Engine.choose):
             raw row ──► candidate array ──► its own native sampler chain [sampler.Sampler.choose] -> Pick:
                         chosen token, survivors (candidates), sampled_logprob
                         (a top-k chain whose earlier stages leave the logits alone is fed only the row's
                         top k, taken from block_stats' candidates, when its k+1 largest logits are all
                         different: the same survivors and pick, sampler._prefilter_k says why; one C call,
                         kernels.pick_ids, which also ranks the pick from the top list. Over a large survivor
                         set dist's pick is made in numpy when it provably is dist's, dist.dist_select, the
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
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

import numpy as np

from llamalens.errors import InvalidArgument, InvalidSettings
from llamalens.records import Sample, Timing, TokenRecord, alternatives
from llamalens.core.strategies import banned_tokens
from llamalens.core.runtime import Context, Model, round_ctx
from llamalens.core.grammar import constrained_apply
from llamalens.core.entries import Continuations, Entry, Prompts
from llamalens.core.sampler import Candidates, GrammarSampler, Sampler, prefilter_k
from llamalens.core.sequences import NO_TOKEN, Fork, Histories, Live, Pick, Request, add_counts
from llamalens.settings import SamplingSettings
from llamalens.core.confidence import renyi_to_uniform
from llamalens.core.stats import CHUNK, RowStats, block_stats

__all__ = ["Engine", "Entry", "Fork", "Live", "Pick", "Request", "context_notes", "generate"]



class Engine:
    """Decodes requests with up to `n_parallel` sequences per llama_decode call."""

    def __init__(self, model: Model, n_parallel: int = 1):
        self.model = model
        self.n_parallel = max(1, int(n_parallel))
        self._buffers = Candidates(model.n_vocab)
        self._grammar_buffers: Candidates | None = None  # made for the first grammar
        self.prefilter = True  # feed top-k chains only the row's top k when that is exact (sampler.prefilter_k)
        self.top_n = self._floor_n = 0
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
        self.top_n = max(r.n_logprobs for r in reqs)
        ks = {prefilter_k(s, self.model) for s in {r.settings for r in reqs}} if self.prefilter else ()
        self._floor_n = max(ks, default=0) + 1  # block_stats' candidates then hold the top k + 1 of every row
        yield from self._run(Prompts(self, queue, ctx_len, n_par, on_token), n_par, n_ctx=round_ctx(cells), n_seq_max=n_par)

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
        self.top_n, self._floor_n = max(r.n_logprobs for r in reqs), 0
        entry = Continuations(self, prefix_ids, base_ids, reqs, base_rows, share, counts)
        longest = max(r.max_tokens for r in reqs)
        n_ctx = round_ctx(len(entry.full) + entry.n_par * (longest + 2) + 1)
        yield from self._run(entry, entry.n_par, n_ctx=n_ctx, n_seq_max=entry.n_par + 1)

    def run_policy(self, entry: Entry, n_slots: int, n_logprobs: int, **context) -> Iterator[Sample]:
        """Decode with an entry policy (core/beam.py's) in a fresh context made with `context` (n_ctx, n_seq_max):
        `n_slots` slots, `n_logprobs` alternatives a record; yield the Samples its sequences finish with."""
        self.top_n, self._floor_n = n_logprobs, 0
        yield from self._run(entry, n_slots, **context)

    def run_in(self, ctx: Context, entry: Entry, n_logprobs: int) -> Iterator[Sample]:
        """Decode with an entry policy in a context its caller keeps between runs (core/held.py): one slot, the
        sequence the policy names; `n_logprobs` alternatives a record."""
        self.top_n, self._floor_n = n_logprobs, 0
        gc.freeze()
        try:
            yield from self._loop(ctx, entry, 1)
        finally:
            gc.unfreeze()

    def first_stats(self, row: np.ndarray) -> RowStats:
        """The statistics of a sequence's first row (a prompt's last), as the scheduler computes them."""
        return block_stats(row, self.top_n, self._floor_n)[0]

    # -- the scheduler ---------------------------------------------------------------------------
    def _run(self, entry: Entry, n_par: int, **context) -> Iterator[Sample]:
        """The scheduler in a fresh context. The objects alive before the run stay out of the collector's passes
        while it runs (a full collection over a large heap, numpy's, pandas', a notebook's, pauses a step for
        milliseconds); the run's own garbage is still collected."""
        gc.freeze()
        try:
            with self.model.context(**context) as ctx:
                entry.start(ctx)
                yield from self._loop(ctx, entry, n_par)
        finally:
            gc.unfreeze()

    def _loop(self, ctx: Context, entry: Entry, n_par: int) -> Iterator[Sample]:
        """The decode scheduler (module docstring): P slots, one step after another until every sequence is done."""
        slots: list[Live | None] = [None] * n_par
        if self.analysis_threads > 1 and n_par > 1:
            self._pool = ThreadPoolExecutor(self.analysis_threads, thread_name_prefix="llamalens-analysis")
        try:
            step = 0
            while entry.waiting() or any(slots):
                served = self._enter(ctx, entry, slots, step)
                served += self._serve(ctx, entry, self._groups(slots, entry.histories))
                entry.choose(ctx, slots, served)
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
                 pending: int | None = None, chain: bool = True) -> Live:
        """A sequence entering sequence `seq` at position `pos`, its own sampler chain (and grammar) made
        (chain=False: none, its policy chooses for it)."""
        sampler = Sampler.for_sequence(req.settings, self.model, req.prompt_tokens) if chain else None
        return Live(req, seq, sampler, max_tokens=max_tokens, t_start=t_start, pos=pos, pending=pending, hist=hist,
                    kv_hist=kv_hist, grammar=GrammarSampler(self.model, req.grammar) if req.grammar and chain else None)

    @staticmethod
    def _enter(ctx: Context, entry: Entry, slots: list[Live | None], step: int) -> list[tuple]:
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
    def _groups(slots: list[Live | None], histories: Histories) -> list[list[Live]]:
        """2. The sequences with a token pending, grouped by history in slot order; first in each group (its leader)
        the first that holds its parent history's cells, if one does."""
        by_hist: dict[int, list[Live]] = {}
        for live in slots:
            if live is not None and live.pending is not None:
                by_hist.setdefault(live.hist, []).append(live)
        groups = []
        for h, members in by_hist.items():
            need = histories.parent[h]
            groups.append([b for b in members if b.kv_hist == need] + [b for b in members if b.kv_hist != need])
        return groups

    def _serve(self, ctx: Context, entry: Entry, groups: list[list[Live]]) -> list[tuple]:
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
            block = self._decode(ctx, entry, [g[0] for g in decoded])
            served = [(g, g[0].slot, row, st) for g, row, st in zip(decoded, block, entry.row_stats(block))]
        entry.count(decoded, kept)
        if groups:
            add_counts(entry.counts, fanned_out_tokens=sum(len(g) - 1 for g in groups))
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

    @staticmethod
    def _decode(ctx: Context, entry: Entry, leaders: list[Live]) -> np.ndarray:
        """The rows of the leaders' pending tokens: one llama_decode, its output rows one contiguous block; or, for
        an exact entry, one llama_decode a row, each row copied out."""
        if entry.exact:
            rows = []
            for b in leaders:
                ctx.decode([b.pending], [b.pos], [b.slot], [1])
                rows.append(ctx.logits(0).copy())
            add_counts(entry.counts, decodes=len(leaders), decoded_tokens=len(leaders))
            return np.stack(rows)
        ctx.decode([b.pending for b in leaders], [b.pos for b in leaders], [b.slot for b in leaders], [1] * len(leaders))
        add_counts(entry.counts, decodes=1, decoded_tokens=len(leaders))
        return ctx.logits_block(len(leaders))

    def choose(self, served: list[tuple], entry: Entry, on_token: Callable[[int], None] | None = None) -> None:
        """4. Each served sequence's own chain picks from its row (_picks); then, in order, its record (_record),
        and its history extended by the pick when it goes on (Entry.choose's default)."""
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

    def fork(self, ctx: Context, entry: Entry, slots: list[Live | None], forks: list[Fork]) -> list[Live]:
        """4'. A policy's choice of which sequences go on (Entry.choose: beam search's): every Fork a new sequence,
        its parent's records and the fork's record, its token pending; slots become these, in order. A parent's
        first child keeps the parent's llama.cpp sequence; each other child takes a sequence no child kept (a
        parent's without children first, then one never used, in order), emptied, with a copy of its parent's
        cells (seq_cp: metadata only, the cache is unified); the sequences no child took are emptied."""
        parents = [x for x in slots if x is not None]
        having = {id(f.parent) for f in forks}
        held = {p.slot for p in parents}
        free = [p.slot for p in parents if id(p) not in having] + \
               [entry.first_seq + s for s in range(len(slots)) if entry.first_seq + s not in held]
        taken: set[int] = set()
        children = []
        for f in forks:
            p = f.parent
            seq = p.slot
            if seq in taken:
                seq = free.pop(0)
                ctx.seq_rm(seq)
                ctx.seq_cp(p.slot, seq)
            taken.add(seq)
            children.append(Live(p.req, seq, None, p.max_tokens, p.t_start, p.prompt_ms, p.t_first, pos=p.pos,
                                 records=p.records + [f.record], pending=f.token,
                                 hist=entry.histories.child(p.hist, f.token), kv_hist=p.hist, score=f.score))
        for seq in free:
            ctx.seq_rm(seq)
        for p in parents:
            p.close()
        slots[:] = children + [None] * (len(slots) - len(children))
        return children

    @staticmethod
    def _hold(ctx: Context, entry: Entry, slots: list[Live | None]) -> None:
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
                add_counts(entry.counts, history_copies=1)

    def _retire(self, ctx: Context, entry: Entry, slots: list[Live | None]) -> Iterator[Sample]:
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

    def _pick(self, live: Live, row: np.ndarray, row_stats: RowStats) -> Pick:
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
        k = live.sampler.prefilter_k if self.prefilter and not blocked else 0
        top = row_stats.top_k_list(k) if k else None  # None: a tie among the k+1 largest, the full row
        if live.grammar is None:
            token, sampled_lp, n_cand = live.sampler.choose(row, buffers, top, None if blocked else row_stats.dist_block_sums,
                                                            row_stats.ranks)
            known = buffers.pick
            return Pick(token, sampled_lp, n_cand, blocked, None, top is not None,
                        (known.logit, known.rank) if known.rank else None)
        # grammar.py: the chain's pick, resampled under the grammar when it does not fit
        if grammar_buffers is None:
            grammar_buffers = self._grammar_buffers = Candidates(self.model.n_vocab)
        survivors, sel, removed = constrained_apply(live.sampler, live.grammar, row, buffers, grammar_buffers, top,
                                                    None if blocked else row_stats.lse)
        if sel is None:  # a dead end: no token to record or accept (_record ends the sample)
            return Pick(NO_TOKEN, 0.0, 0, blocked, removed, False, None)
        return Pick(*live.sampler.outcome(survivors, sel), blocked, removed, False, None)

    def _picks(self, live: list[Live], rows: list[np.ndarray], stats: list[RowStats]) -> list[Pick]:
        """_pick of every sequence of a step, spread over the thread pool when there is one (the chain's native
        code and numpy's passes release the GIL); the same results in the same order as one by one."""
        if self._pool is None or len(live) < 2:
            return [self._pick(*a) for a in zip(live, rows, stats)]
        return list(self._pool.map(self._pick, live, rows, stats))

    def block_stats(self, block: np.ndarray) -> list[RowStats]:
        """block_stats of a step's rows, split by rows over the thread pool (at CHUNK row groups: each row's
        numbers are computed exactly as in one call)."""
        n = block.shape[0]
        per = max(1, CHUNK // max(block.shape[1], 1))
        if self._pool is None or n < 2 * per:
            return block_stats(block, self.top_n, self._floor_n, reuse=True)
        cut = -(-(n // 2) // per) * per
        parts = self._pool.map(lambda b: block_stats(b, self.top_n, self._floor_n, reuse=True), (block[:cut], block[cut:]))
        return [st for part in parts for st in part]

    def _record(self, live: Live, raw: np.ndarray, row_stats: RowStats, pick: Pick) -> None:
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

    def _sample(self, live: Live) -> Sample:
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

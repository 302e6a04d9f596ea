"""The decoding engine: many sequences decoded together, one exact TokenRecord per generated token.

    requests ──► queue (ordered by prompt) ──► P slots of one llama.cpp context (unified KV cache)
                                               │
         a free slot takes the next request:   │  same prompt still in the slot  -> nothing to do
                                               │  same prompt held by another slot -> seq_cp(0..len)
                                               │  otherwise                       -> prefill it once
         every step: one llama_decode with one token per live sequence; its output rows, one contiguous
         [n_outputs, n_vocab] block (Context.logits_block), get their statistics at once:
             block ──► block_stats: per row lse, entropy, the sorted top list, rank candidates [stats.py: one C
                       call for the whole block, kernels.block_pass, into arrays kept from step to step (reuse);
                       numpy's passes without the kernel]
         then per sequence:
             raw row ──► candidate array ──► its own native sampler chain [sampler.Sampler.choose]
                         -> chosen token, survivors (candidates), sampled_logprob
                         (a top-k chain whose earlier stages leave the logits alone is fed only the row's
                         top k, taken from block_stats' candidates, when its k+1 largest logits are all
                         different: the same survivors and pick, sampler._prefilter_k says why; 0.76 ->
                         0.05 ms a token at 262k, top_k 40; one C call, kernels.pick_ids, which also ranks
                         the pick from the top list. Over a large survivor set dist's pick is made
                         in numpy when it provably is dist's, sampler.dist_select: 2.9 -> ~1 ms a token
                         on an untruncated 262k chain, the sampled logprob included)
                     └─► the row's statistics for the chosen token (logprob, rank) -> TokenRecord
         a finished sequence (EOG, stop string, max_tokens) frees its slot but keeps its prompt
         cells, so the next request with the same prompt starts without any prefill.

Fidelity: the chain is the one llama-cpp-python builds, applied to the same raw logits, and its
accept() sees only generated tokens, as in `Llama.generate`. With one slot, the same flash-attention
setting and the same prompt tokens, the tokens equal `create_completion`'s (tests check this).
Batched logits can differ from single-sequence ones by a few hundredths of a nat on quantized
weights (the repacked Q4_K and non-flash attention kernels change with the batch shape);
`n_parallel=1` is the exact, slow path.

The prompt's last-row logits are copied once per prompt (n_vocab floats) and reused by every
sequence of that prompt for its first token; nothing of size context × vocabulary is ever kept.
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

from llamalens.errors import InvalidSettings
from llamalens.records import Sample, Timing, TokenRecord, alternatives
from llamalens.core.strategies import banned_tokens
from llamalens.core.runtime import Context, Model, round_ctx
from llamalens.core.grammar import constrained_apply
from llamalens.core.sampler import Candidates, GrammarSampler, Sampler, prefilter_k
from llamalens.settings import SamplingSettings
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
        if self.n_logprobs < 0:
            out.append(f"logprobs {self.n_logprobs!r} is out of range (must be >= 0)")
        if any(s == "" for s in self.stop):
            out.append("an empty --stop string would stop at once; remove it")
        return out


@dataclass
class _Live:
    req: Request
    slot: int
    sampler: Sampler
    max_tokens: int
    t_start: float
    prompt_ms: float = 0.0
    t_first: float = 0.0
    pos: int = 0  # position of the next token to decode
    records: list[TokenRecord] = field(default_factory=list)
    text: bytearray = field(default_factory=bytearray)
    pending: int | None = None  # token sampled but not yet decoded
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
        # gain is measured on a quiet 2-core machine (issue 21: none could be; same records either way, tested)
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
        remaining = Counter(tuple(r.prompt_tokens) for r in reqs)
        n_par = min(self.n_parallel, len(reqs))
        ctx_len = self.model.options.ctx
        max_prompt = max(len(r.prompt_tokens) for r in reqs)
        max_new = max(min(r.max_tokens, ctx_len - len(r.prompt_tokens)) for r in reqs)
        n_prompts = min(len(order), n_par)
        cells = n_prompts * max_prompt + n_par * (max_new + 1) + 1
        cells = max(cells, max_prompt + max_new + 1)
        # the objects alive before the run stay out of the collector's passes while it runs: a full collection over a
        # large heap (numpy, pandas, a notebook's) paused a 32k step by 28 ms; the run's own garbage is still collected
        gc.freeze()
        try:
            with self.model.context(n_ctx=round_ctx(cells), n_seq_max=n_par) as ctx:
                yield from self._loop(ctx, queue, remaining, n_par, ctx_len, on_token)
        finally:
            gc.unfreeze()

    # -- the loop ------------------------------------------------------------------------------
    def _loop(self, ctx: Context, queue, remaining, n_par, ctx_len, on_token) -> Iterator[Sample]:
        slots: list[_Live | None] = [None] * n_par
        slot_prompt: list[tuple | None] = [None] * n_par
        first_rows: dict[tuple, np.ndarray] = {}
        first_stats: dict[tuple, RowStats] = {}  # of each first row: computed once, shared by its sequences
        intern: dict[tuple, int] = {}  # (parent history id, token) or ("prompt", tokens) -> history id
        parent: dict[int, int] = {}
        groups: list[list[_Live]] = []  # sequences sharing one history: decoded once, by groups[i][0]
        self._top_n = max((r.n_logprobs for r in queue), default=0)
        ks = {prefilter_k(s, self.model) for s in {r.settings for r in queue if not r.grammar}} if self.prefilter else ()
        self._floor_n = max(ks, default=0) + 1  # block_stats' candidates then hold the top k + 1 of every row
        if self.analysis_threads > 1 and n_par > 1:
            self._pool = ThreadPoolExecutor(self.analysis_threads, thread_name_prefix="llamalens-analysis")
        try:
            while queue or any(slots):
                # 1. fill free slots; a new sequence's first token comes from its prompt's row
                rows: dict[int, np.ndarray] = {}
                row_stats: dict[int, RowStats] = {}  # by slot; members of a group share their leader's
                for s in range(n_par):
                    if slots[s] is None and queue:
                        req = queue.popleft()
                        key = tuple(req.prompt_tokens)
                        t0 = time.perf_counter()
                        if slot_prompt[s] != key:
                            ctx.seq_rm(s)
                            donor = next((t for t in range(n_par) if slot_prompt[t] == key), None)
                            if donor is not None and key in first_rows:
                                ctx.seq_cp(donor, s, 0, len(key))
                                self.stats["prompt_copies"] += 1
                            else:
                                first_rows[key] = ctx.prefill(req.prompt_tokens, seq=s)
                                first_stats[key] = block_stats(first_rows[key], self._top_n, self._floor_n)[0]
                                self.stats["prefills"] += 1
                                self.stats["prompt_tokens"] += len(key)
                            slot_prompt[s] = key
                        root = intern.setdefault(("prompt", key), len(intern))
                        live = _Live(req, s, Sampler.for_sequence(req.settings, self.model, req.prompt_tokens),
                                     max_tokens=min(req.max_tokens, ctx_len - len(key)), t_start=t0,
                                     pos=len(key), hist=root, kv_hist=root,
                                     grammar=GrammarSampler(self.model, req.grammar) if req.grammar else None)
                        live.prompt_ms = (time.perf_counter() - t0) * 1000
                        slots[s] = live
                        remaining[key] -= 1
                        rows[s] = first_rows[key]
                        row_stats[s] = first_stats[key]
                # 2. one decode: one token per group of identical histories; members share the row
                if groups:
                    leaders = [g[0] for g in groups]
                    ctx.decode([b.pending for b in leaders], [b.pos for b in leaders], [b.slot for b in leaders],
                               [1] * len(leaders))
                    self.stats["decodes"] += 1
                    self.stats["decoded_tokens"] += len(leaders)
                    self.stats["fanned_out_tokens"] += sum(len(g) - 1 for g in groups)
                    block = ctx.logits_block(len(leaders))  # the decode's output rows, one contiguous block
                    block_rows = self._block_stats(block)  # every row's statistics in one go (stats.py)
                    for i, g in enumerate(groups):
                        g[0].kv_hist = g[0].hist
                        for b in g:
                            b.pos += 1
                            b.pending = None
                            rows[b.slot], row_stats[b.slot] = block[i], block_rows[i]
                # 3. each sequence's own sampler chain on its row; the record from the row's statistics
                step = [slots[s] for s in rows]
                picks = self._picks(step, list(rows.values()), [row_stats[s] for s in rows])
                for live, row, pick in zip(step, rows.values(), picks):
                    self._record(live, row, row_stats[live.slot], pick)
                    if live.pending is not None:
                        h = intern.setdefault((live.hist, live.pending), len(intern))
                        parent[h] = live.hist
                        live.hist = h
                    if on_token:
                        on_token(1)
                for key in [k for k, n in remaining.items() if n <= 0 and k in first_rows]:
                    del first_rows[key], first_stats[key]
                # 4. group the live sequences by history; a group's leader must hold its parent's cells
                by_hist: dict[int, list[_Live]] = {}
                for live in slots:
                    if live is not None and live.pending is not None:
                        by_hist.setdefault(live.hist, []).append(live)
                groups = []
                for h, members in by_hist.items():
                    need = parent[h]
                    members.sort(key=lambda b: b.kv_hist != need)
                    lead = members[0]
                    if lead.kv_hist != need:  # the old leader went another way: give this one the cells
                        src = next(x for x in slots if x is not None and x.kv_hist == need)
                        plen = len(lead.req.prompt_tokens)
                        ctx.seq_rm(lead.slot, plen, -1)
                        ctx.seq_cp(src.slot, lead.slot, plen, -1)
                        lead.kv_hist = need
                        self.stats["history_copies"] += 1
                    groups.append(members)
                # 5. retire finished sequences, keeping their prompt cells for the next request
                for s in range(n_par):
                    live = slots[s]
                    if live is not None and live.finish is not None:
                        ctx.seq_rm(s, len(live.req.prompt_tokens), -1)
                        live.close()
                        slots[s] = None
                        yield self._sample(live)
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None
            for live in slots:
                if live is not None:
                    live.close()

    def _step(self, live: _Live, row: np.ndarray, row_stats: RowStats) -> None:
        """Sample the next token of one sequence from its raw logits row and record it."""
        self._record(live, row, row_stats, self._pick(live, row, row_stats))

    def _candidates(self) -> tuple[Candidates, Candidates | None]:
        """The calling thread's llama_token_data buffers (the engine's own on the thread that made it)."""
        if threading.get_ident() == self._owner:
            return self._buffers, self._grammar_buffers
        b = getattr(self._local, "bufs", None)
        if b is None:
            b = self._local.bufs = (Candidates(self.model.n_vocab), Candidates(self.model.n_vocab))
        return b

    def _pick(self, live: _Live, row: np.ndarray, row_stats: RowStats) -> tuple:
        """The chain's choice for one sequence: what needs the row, the chain and nothing shared, so the
        sequences of a step can run it on different threads (_picks). The chain's state changes only in
        _record (accept), on the engine's thread, in slot order."""
        req = live.req
        n_gram = req.settings.no_repeat_ngram
        blocked = sorted(banned_tokens(req.prompt_tokens + [r.id for r in live.records], n_gram)) if n_gram else []
        if blocked:  # no-repeat-ngram (issue 17): banned before the chain; the raw row (shared) stays as it is
            row = row.copy()
            row[blocked] = -np.inf
        buffers, grammar_buffers = self._candidates()
        removed, top = None, None
        if live.grammar is None:
            k = live.sampler.prefilter_k if self.prefilter and not blocked else 0
            top = row_stats.top_k_list(k) if k else None  # None: a tie among the k+1 largest, the full row
            token, sampled_lp, n_cand = live.sampler.choose(row, buffers, top, None if blocked else row_stats.dist_block_sums,
                                                            row_stats.ranks)
            known = buffers.pick
            return token, sampled_lp, n_cand, blocked, removed, top is not None, (known.logit, known.rank) if (
                known.rank) else None
        # grammar.py: the chain's pick, resampled under the grammar when it does not fit
        if grammar_buffers is None:
            grammar_buffers = self._grammar_buffers = Candidates(self.model.n_vocab)
        survivors, sel, removed = constrained_apply(live.sampler, live.grammar, row, buffers, grammar_buffers)
        return *live.sampler.outcome(survivors, sel), blocked, removed, False, None

    def _picks(self, live: list[_Live], rows: list[np.ndarray], stats: list[RowStats]) -> list[tuple]:
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

    def _record(self, live: _Live, raw: np.ndarray, row_stats: RowStats, pick: tuple) -> None:
        """The TokenRecord of a pick (in slot order, on the engine's thread): accept, statistics, stop checks."""
        model, req = self.model, live.req
        token, sampled_lp, n_cand, blocked, removed, prefiltered, known = pick
        self.stats["prefiltered"] += prefiltered
        if live.grammar is not None:
            live.removed.append(removed)
            live.grammar.accept(token)
        live.sampler.accept(token)
        st = row_stats.for_token(raw, token) if known is None else row_stats.chosen(*known)  # (raw logit, rank)
        if live.t_first == 0.0:
            live.t_first = time.perf_counter()
        text, hex_bytes = model.token_text(token)
        eog = model.is_eog(token)
        live.records.append(TokenRecord(
            position=len(live.records), id=token, text=text, bytes=hex_bytes,
            logprob=st.logprob, sampled_logprob=sampled_lp, rank=st.rank, entropy=st.entropy, candidates=n_cand,
            top=alternatives(model.token_text, *st.top_lists(req.n_logprobs)), eog=eog,
            blocked=blocked,
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
    req = Request(prompt, settings or SamplingSettings(), max_tokens, n_logprobs, tuple(stop))
    return next(iter(Engine(model, 1).run([req])))

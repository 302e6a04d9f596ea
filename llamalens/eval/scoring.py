"""Log-likelihoods of (context, continuation) token pairs, the way lm-evaluation-harness asks for them.

A pair scores continuation tokens c[0..m-1] after context tokens x[0..n-1]: the model reads x + c[:-1] and
the row after x[-1] scores c[0], the row after c[j] scores c[j+1]. The logprob of a pair is the sum of the
raw log-softmax of those rows at the continuation's tokens; it is greedy when every one of those tokens is
its row's argmax (the lowest id among equal maxima, as torch.argmax and numpy.argmax pick).

Two ways of decoding, the same figures up to the CPU kernels' batch-shape noise (docs/eval.md):

  exact     every pair decoded alone, x + c[:-1] as one sequence from position 0 in --batch-sized pieces,
            only the continuation's rows asked for: what a plain forward pass over the joined tokens
            (llama-cpp-python's Llama.eval) computes.
  batched   pairs grouped by their context: a context is decoded once into a sequence, its KV cells copied
            (metadata only, a unified cache) to one sequence per further continuation, and the continuations
            of many contexts decoded together, up to `batch_size` sequences a wave. Rows wanted per decode
            call are bounded (ROW_BYTES), since llama.cpp keeps every wanted row of a call (n_vocab floats).

Nothing here knows lm-eval: lm_tokens.py turns its requests into pairs, harness.py is its model class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from llamalens.core.runtime import Context, Model, round_ctx
from llamalens.core.stats import block_stats

ROW_BYTES = 128 << 20  # the logits one decode call may ask for: 128 rows of a 262k vocabulary, 1024 of a 32k one


@dataclass(frozen=True)
class Pair:
    """One loglikelihood request in tokens: the context read, the continuation scored (at least one token)."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


@dataclass
class PairScore:
    """A scored continuation: per token its logprob, rank and its row's entropy, and the row's argmax and that
    token's logprob."""

    tokens: list[int]
    logprobs: list[float] = field(default_factory=list)
    top: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)

    @property
    def logprob(self) -> float:
        return float(sum(self.logprobs))

    @property
    def is_greedy(self) -> bool:
        return all(t == a for t, a in zip(self.tokens, self.top))

    def add(self, lp: float, top: int, top_lp: float, rank: int, entropy: float) -> None:
        self.logprobs.append(lp)
        self.top.append(top)
        self.top_logprobs.append(top_lp)
        self.ranks.append(rank)
        self.entropies.append(entropy)


def rows_per_call(model: Model) -> int:
    """How many logits rows one decode call may ask for (at most --batch)."""
    return max(1, min(int(model.options.batch), ROW_BYTES // (4 * model.n_vocab)))


def _outputs(ctx: Context, n: int) -> np.ndarray:
    """The last decode's n output rows, in batch order (a copy when they are not one block)."""
    return np.stack([ctx.logits(j - n) for j in range(n)]) if n > 1 else ctx.logits(-1)[None, :]


def _take(block: np.ndarray, targets: list[list[tuple[PairScore, int]]]) -> None:
    """Score the rows of a [rows, n_vocab] block of raw logits: row i scores each of targets[i] (a pair, its
    token); a context's last row scores the first token of every continuation after it."""
    for st, row, scored in zip(block_stats(block, 1), block, targets):
        top = int(st.top_ids[0])
        for ps, tok in scored:
            ps.add(float(row[tok]) - st.lse, top, float(row[top]) - st.lse, st.for_token(row, tok).rank, st.entropy)


def score_pairs(model: Model, pairs: list[Pair], exact: bool = False, batch_size: int = 32,
                on_pair: Callable[[int], None] | None = None) -> list[PairScore]:
    """The scores of `pairs`, in order (see the module docstring for exact and batched).

    Every pair must fit the context: len(context) + len(continuation) - 1 <= model.options.ctx (lm_tokens.py
    truncates lm-eval's requests to that, as lm-eval's own backends do). `on_pair(k)`: k pairs done so far."""
    if not pairs:
        return []
    out = [PairScore(list(p.continuation)) for p in pairs]
    if exact:
        _score_alone(model, pairs, out, on_pair)
    else:
        _score_shared(model, pairs, out, max(1, int(batch_size)), on_pair)
    return out


def _score_alone(model: Model, pairs: list[Pair], out: list[PairScore], on_pair) -> None:
    n_batch = max(1, int(model.options.batch))
    longest = max(len(p.context) + len(p.continuation) - 1 for p in pairs)
    with model.context(n_ctx=round_ctx(longest), n_batch=n_batch) as ctx:
        for k, (p, ps) in enumerate(zip(pairs, out)):
            ctx.clear()
            ids = list(p.context) + list(p.continuation[:-1])
            first = len(p.context) - 1  # the first row wanted: the context's last token's
            for b0 in range(0, len(ids), n_batch):
                chunk = ids[b0 : b0 + n_batch]
                outs = [1 if b0 + i >= first else 0 for i in range(len(chunk))]
                ctx.decode(chunk, range(b0, b0 + len(chunk)), [0] * len(chunk), outs)
                wanted = [b0 + i - first for i, o in enumerate(outs) if o]  # index of the scored continuation token
                if wanted:
                    _take(_outputs(ctx, len(wanted)), [[(ps, p.continuation[j])] for j in wanted])
            if on_pair:
                on_pair(k + 1)


@dataclass
class _Group:
    context: tuple[int, ...]
    members: list[int]  # indices into the pairs

    def cells(self, pairs: list[Pair]) -> int:
        return len(self.context) + sum(len(pairs[i].continuation) - 1 for i in self.members)


def _waves(pairs: list[Pair], batch_size: int, cell_budget: int) -> list[list[_Group]]:
    """Pairs grouped by context (first-seen order), the groups dealt into waves of at most batch_size sequences
    (one a pair) and cell_budget KV cells; a group larger than either is a wave alone, split by sequences."""
    groups: dict[tuple[int, ...], _Group] = {}
    for i, p in enumerate(pairs):
        groups.setdefault(p.context, _Group(p.context, [])).members.append(i)
    waves, cur, seqs, cells = [], [], 0, 0
    for g in groups.values():
        for s in range(0, len(g.members), batch_size):  # a context with more continuations than sequences
            part = _Group(g.context, g.members[s : s + batch_size])
            need = part.cells(pairs)
            if cur and (seqs + len(part.members) > batch_size or cells + need > cell_budget):
                waves.append(cur)
                cur, seqs, cells = [], 0, 0
            cur.append(part)
            seqs, cells = seqs + len(part.members), cells + need
    if cur:
        waves.append(cur)
    return waves


def _score_shared(model: Model, pairs: list[Pair], out: list[PairScore], batch_size: int, on_pair) -> None:
    n_batch = max(int(model.options.batch), batch_size)
    biggest = max(len(p.context) + len(p.continuation) - 1 for p in pairs)
    budget = max(biggest, min(sum(len(p.context) + len(p.continuation) for p in pairs), 4 * n_batch))
    waves = _waves(pairs, batch_size, budget)
    n_cells = max(_wave_cells(w, pairs) for w in waves)
    done = 0
    with model.context(n_ctx=round_ctx(n_cells + 1), n_seq_max=batch_size, n_batch=n_batch) as ctx:
        for wave in waves:
            _decode_wave(model, ctx, wave, pairs, out, n_batch)
            done += sum(len(g.members) for g in wave)
            if on_pair:
                on_pair(done)


def _wave_cells(wave: list[_Group], pairs: list[Pair]) -> int:
    return sum(g.cells(pairs) for g in wave)


def _decode_wave(model: Model, ctx: Context, wave: list[_Group], pairs: list[Pair], out: list[PairScore],
                 n_batch: int) -> None:
    """One wave: every context into the first sequence of its group (its last row kept), copied to the group's
    other sequences, then every continuation's tokens but the last, all rows kept."""
    ctx.clear()
    seq, firsts, items = 0, [], []
    for g in wave:
        firsts.append((seq, g))
        items += [(t, j, seq, j == len(g.context) - 1) for j, t in enumerate(g.context)]
        seq += len(g.members)
    last_rows = {}
    for chunk_start in range(0, len(items), n_batch):
        chunk = items[chunk_start : chunk_start + n_batch]
        ctx.decode([c[0] for c in chunk], [c[1] for c in chunk], [c[2] for c in chunk], [int(c[3]) for c in chunk])
        kept = [c[2] for c in chunk if c[3]]
        if kept:
            for s, row in zip(kept, _outputs(ctx, len(kept))):
                last_rows[s] = row.copy()
    follow = []  # (token, position, sequence, pair index, index of the token scored from its row)
    for s0, g in firsts:
        row = last_rows[s0]
        _take(row[None, :], [[(out[i], pairs[i].continuation[0]) for i in g.members]])
        for k, i in enumerate(g.members):
            if k:
                ctx.seq_cp(s0, s0 + k, 0, len(g.context))
            cont = pairs[i].continuation
            follow += [(t, len(g.context) + j, s0 + k, i, j + 1) for j, t in enumerate(cont[:-1])]
    step = min(n_batch, rows_per_call(model))
    for b0 in range(0, len(follow), step):
        chunk = follow[b0 : b0 + step]
        ctx.decode([c[0] for c in chunk], [c[1] for c in chunk], [c[2] for c in chunk], [1] * len(chunk))
        _take(ctx.logits_block(len(chunk)), [[(out[c[3]], pairs[c[3]].continuation[c[4]])] for c in chunk])

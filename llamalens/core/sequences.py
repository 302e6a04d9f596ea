"""What the decode scheduler (core/engine.py) and its entry policies (core/entries.py, core/beam.py, core/held.py)
share: a request, a live sequence in a slot, a pick, a fork, and the interned token histories.

    Request     one completion to generate (prompt, settings, limits)
    Live        a sequence in one of the scheduler's slots: its llama.cpp sequence id, position, pending token,
                history ids, records so far, its own sampler chain (none for beam search, which picks jointly)
    Pick        one sequence's choice at one step from its native chain: what its TokenRecord is made of
    Fork        a policy's choice that a sequence goes on with one more token (beam search: a kept candidate)
    Histories   token sequences as ids, (parent id, token) -> id, so identical histories share one row
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llamalens.core.sampler import GrammarSampler, Sampler
from llamalens.records import TokenRecord
from llamalens.settings import SamplingSettings


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
class Live:
    """A sequence in a slot of the scheduler."""

    req: Request
    slot: int  # the llama.cpp sequence id it decodes in
    sampler: Sampler | None  # its own native chain; None when its policy picks for it (beam search)
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
    score: float = 0.0  # its policy's running score (beam search: the sum of its tokens' raw logprobs)

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
        if self.grammar is not None:
            self.grammar.close()


NO_TOKEN = -1  # a Pick's token when the grammar left nothing to pick


@dataclass(frozen=True)
class Pick:
    """One sequence's choice at one step from its own chain (Engine.choose), what its TokenRecord is made of."""

    token: int
    sampled_logprob: float  # among the chain's survivors, after temperature (0.0 greedy)
    candidates: int  # how many survivors
    blocked: list[int]  # tokens no-repeat-ngram banned before the chain
    removed: float | None  # raw mass the grammar forbade (None without a grammar)
    prefiltered: bool  # the chain was fed only the row's top k (sampler.prefilter_k)
    known: tuple[float, int] | None  # the pick's raw logit and rank when the prefiltered pick ranked it


@dataclass(frozen=True)
class Fork:
    """A policy's choice that `parent` goes on with `token` (Engine.fork): the child's record of it and score."""

    parent: Live
    token: int
    record: TokenRecord
    score: float


class Histories:
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


def add_counts(counts: dict, **amounts: int) -> None:
    """Add to decode counters (a Counter or a plain dict: a key appears when first added to, even by 0)."""
    for k, v in amounts.items():
        counts[k] = counts.get(k, 0) + v

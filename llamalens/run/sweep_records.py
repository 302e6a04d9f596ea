"""What a sweep's sample records in samples.extra beyond its tokens, typed and versioned (SweepExtra):

    strategy         a beam search's result (BeamExtra: its hypotheses, what each step kept, dropped and finished,
                     its decode counts), or a best-of-N sample's draws (BestOfExtra); None for one plain draw
    grammar_removed  the raw probability mass the grammar forbade at each token (None without a grammar)
    blocked          the ids no-repeat-ngram banned, by token position (only where it banned any)

A sample with none of these stores no extra at all. Written with "version" (EXTRA_VERSION); a dict without one was
written before the records were typed, holds the same keys and reads as version 1; a newer version is a clear
StoreError. to_dict() writes the keys in the order they were always stored in (`export` writes samples.extra as
it is stored).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llamalens.errors import StoreError

EXTRA_VERSION = 1


@dataclass(frozen=True)
class BeamHypothesis:
    """A returned hypothesis of a beam search (core/beam.py's Hypothesis, as stored)."""

    ids: list[int]
    sum_logprob: float
    length: int
    score: float
    finish: str
    step: int
    text: str = ""

    def to_dict(self) -> dict:
        return {"ids": list(self.ids), "sum_logprob": self.sum_logprob, "length": self.length, "score": self.score,
                "finish": self.finish, "step": self.step, "text": self.text}

    @classmethod
    def from_dict(cls, d: dict) -> "BeamHypothesis":
        return cls(list(d.get("ids", [])), d["sum_logprob"], d["length"], d["score"], d["finish"], d["step"],
                   d.get("text", ""))


@dataclass(frozen=True)
class BeamStep:
    """One step of a beam search: the beams it kept ([parent beam, token, sum logprob]), the beams it dropped,
    the hypotheses it finished ([beam, sum logprob, score]), the last kept candidate's sum, the tokens banned."""

    step: int
    live: list[list] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    finished: list[list] = field(default_factory=list)
    cutoff: float | None = None
    blocked: int = 0

    def to_dict(self) -> dict:
        return {"step": self.step, "live": self.live, "dropped": self.dropped, "finished": self.finished,
                "cutoff": self.cutoff, "blocked": self.blocked}

    @classmethod
    def from_dict(cls, d: dict) -> "BeamStep":
        return cls(d["step"], list(d.get("live", [])), list(d.get("dropped", [])), list(d.get("finished", [])),
                   d.get("cutoff"), d.get("blocked", 0))


@dataclass(frozen=True)
class BeamExtra:
    """A beam search's result beyond its best hypothesis's tokens."""

    hypotheses: list[BeamHypothesis]
    steps: list[BeamStep]
    decode_calls: int | None = None
    scored_tokens: int | None = None

    def to_dict(self) -> dict:
        return {"strategy": "beam", "hypotheses": [h.to_dict() for h in self.hypotheses],
                "steps": [s.to_dict() for s in self.steps], "decode_calls": self.decode_calls,
                "scored_tokens": self.scored_tokens}

    @classmethod
    def from_dict(cls, d: dict) -> "BeamExtra":
        return cls([BeamHypothesis.from_dict(h) for h in d.get("hypotheses", [])],
                   [BeamStep.from_dict(s) for s in d.get("steps", [])], d.get("decode_calls"), d.get("scored_tokens"))


@dataclass(frozen=True)
class Draw:
    """One draw of a best-of-N sample: its seed, sequence figures, its rank by the sample's criterion and by the
    other one (`other`: "mean" when ranked by sum, else "sum")."""

    draw: int
    seed: int | None
    seq_logprob: float
    mean_logprob: float
    length: int
    rank: int
    rank_by_other: int
    other: str
    text: str

    def to_dict(self) -> dict:
        return {"draw": self.draw, "seed": self.seed, "seq_logprob": self.seq_logprob,
                "mean_logprob": self.mean_logprob, "length": self.length, "rank": self.rank,
                f"rank_by_{self.other}": self.rank_by_other, "text": self.text}

    @classmethod
    def from_dict(cls, d: dict) -> "Draw":
        other = "mean" if "rank_by_mean" in d else "sum"
        return cls(d["draw"], d.get("seed"), d["seq_logprob"], d["mean_logprob"], d["length"], d["rank"],
                   d.get(f"rank_by_{other}", 0), other, d.get("text", ""))


@dataclass(frozen=True)
class BestOfExtra:
    """A best-of-N sample: every draw, which one won by `by` ("sum" or "mean"), and its rank by the other."""

    by: str
    winner: int
    winner_rank_by_other: int
    draws: list[Draw]

    def to_dict(self) -> dict:
        return {"strategy": "best_of", "by": self.by, "winner": self.winner,
                "winner_rank_by_other": self.winner_rank_by_other, "draws": [d.to_dict() for d in self.draws]}

    @classmethod
    def from_dict(cls, d: dict) -> "BestOfExtra":
        return cls(d["by"], d["winner"], d["winner_rank_by_other"], [Draw.from_dict(x) for x in d.get("draws", [])])


@dataclass(frozen=True)
class SweepExtra:
    """What a sweep's sample records beyond its tokens (module docstring)."""

    strategy: BeamExtra | BestOfExtra | None = None
    grammar_removed: list[float] | None = None
    blocked: dict[int, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict | None:
        """The stored dict; None when there is nothing to store."""
        d = self.strategy.to_dict() if self.strategy is not None else {}
        if self.grammar_removed is not None:
            d["grammar_removed"] = list(self.grammar_removed)
        if self.blocked:
            d["blocked"] = {str(pos): list(ids) for pos, ids in sorted(self.blocked.items())}
        return {"version": EXTRA_VERSION, **d} if d else None

    @classmethod
    def from_dict(cls, d: dict | None) -> "SweepExtra":
        d = d or {}
        v = d.get("version", 1)
        if not isinstance(v, int) or v > EXTRA_VERSION:
            raise StoreError(f"a sweep sample's record of version {v!r} was written by a newer llamalens (this one "
                             f"reads up to version {EXTRA_VERSION}); upgrade llamalens to read it")
        kind = d.get("strategy")
        strategy = BeamExtra.from_dict(d) if kind == "beam" else BestOfExtra.from_dict(d) if kind == "best_of" else None
        removed = d.get("grammar_removed")
        return cls(strategy, None if removed is None else [float(r) for r in removed],
                   {int(pos): list(ids) for pos, ids in (d.get("blocked") or {}).items()})

    @property
    def beam(self) -> BeamExtra | None:
        return self.strategy if isinstance(self.strategy, BeamExtra) else None

    @property
    def best_of(self) -> BestOfExtra | None:
        return self.strategy if isinstance(self.strategy, BestOfExtra) else None

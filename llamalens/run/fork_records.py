"""A fork run's typed records: how a completion's outcome is read, and what each sample of the run records in
samples.extra beyond its tokens.

    sample 0, the base path   BaseExtra: the plan's settings (PlanSettings, its OutcomeSpec), the Cost estimate,
                              the base path's own outcome, and the decode counters (summed over resumes)
    every other sample        Continuation: the position t, the forced token w (id, text, bytes, raw p(w), whether
                              it is the base path's own choice), the sample number j and its seed, and the outcome
                              read from its whole completion once it is decoded

Both are versioned (EXTRA_VERSION, under "version"): a dict without a version is one written before the records
were typed, which holds the same keys, and reads as version 1; a newer version than this llamalens knows is a
clear StoreError. to_dict() writes the keys in the order they have always been stored in, so that `export`, which
writes samples.extra as it is stored, gives what it gave.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from llamalens.errors import StoreError
from llamalens.limits import time_limit
from llamalens.run.fork_analysis import NONE
from llamalens.visible import visible

EXTRA_VERSION = 1
OUTCOME_SECONDS = 2.0  # the most one --outcome regex may take on one completion


def _version(d: dict, what: str) -> int:
    v = d.get("version", 1)
    if not isinstance(v, int) or v > EXTRA_VERSION:
        raise StoreError(f"a {what} record of version {v!r} was written by a newer llamalens (this one reads up to "
                         f"version {EXTRA_VERSION}); upgrade llamalens to read it")
    return v


# -- outcomes ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OutcomeSpec:
    """How a completion's outcome is read: `regex` (first match, its group 1 if any), `options` (the option
    stated first, whole word, case-insensitive) or `first_line` (the first non-empty line, normalised)."""

    mode: str = "first_line"
    regex: str = ""
    options: tuple[str, ...] = ()

    def problems(self) -> list[str]:
        if self.mode == "regex":
            try:
                re.compile(self.regex)
            except re.error as e:
                return [f"--outcome {self.regex!r} is not a valid regular expression ({e}); fix it or quote it"]
            if not self.regex:
                return ["--outcome is empty; give a regular expression, e.g. --outcome 'answer is (\\w+)'"]
        elif self.mode == "options":
            if len(self.options) < 2 or any(not o.strip() for o in self.options):
                return ["--options needs at least two non-empty comma-separated options, e.g. --options yes,no"]
        elif self.mode != "first_line":
            return [f"unknown outcome mode {self.mode!r}"]
        return []

    def extract(self, text: str) -> str:
        if self.mode == "regex":
            with time_limit(OUTCOME_SECONDS, f"--outcome {visible(self.regex)!r} on one completion",
                            "simplify the regular expression (nested repeats such as (a+)+ can backtrack for ever)"):
                m = re.search(self.regex, text)
            got = (m.group(1) if m.re.groups else m.group(0)) if m else None
            return NONE if got is None else got  # a group that took no part in the match: no outcome
        if self.mode == "options":
            best = None
            for opt in self.options:
                m = re.search(r"(?<!\w)" + re.escape(opt.strip()) + r"(?!\w)", text, flags=re.IGNORECASE)
                if m and (best is None or m.start() < best[0]):
                    best = (m.start(), opt.strip())
            return best[1] if best else NONE
        for line in text.splitlines():
            norm = " ".join(line.split()).strip(" .,;:!?\"'").lower()
            if norm:
                return norm
        return NONE

    def to_dict(self) -> dict:
        return {"mode": self.mode, "regex": self.regex, "options": list(self.options)}

    @classmethod
    def from_dict(cls, d: dict) -> "OutcomeSpec":
        return cls(d.get("mode", "first_line"), d.get("regex", ""), tuple(d.get("options", ())))

    def describe(self) -> str:
        if self.mode == "regex":
            return f"first match of /{self.regex}/"
        if self.mode == "options":
            return "first of " + ", ".join(self.options)
        return "first line, normalised"

    @property
    def declared(self) -> tuple[str, ...]:
        """The outcomes named up front (--options), shown even when no continuation reached them."""
        return tuple(o.strip() for o in self.options) if self.mode == "options" else ()


# -- what the base path's sample records ---------------------------------------------------------------
@dataclass(frozen=True)
class PlanSettings:
    """The settings a fork run's plan was made with (ForkSpec's, as stored with the base path)."""

    outcome: OutcomeSpec = field(default_factory=OutcomeSpec)
    sampled_base: bool = False
    samples: int = 4
    alternatives: int = 3
    min_prob: float = 0.05
    positions: tuple[int, int] | None = None
    max_sequences: int = 2000

    def to_dict(self) -> dict:
        return {"outcome": self.outcome.to_dict(), "sampled_base": self.sampled_base, "samples": self.samples,
                "alternatives": self.alternatives, "min_prob": self.min_prob,
                "positions": list(self.positions) if self.positions else None, "max_sequences": self.max_sequences}

    @classmethod
    def from_dict(cls, d: dict) -> "PlanSettings":
        pos = d.get("positions")
        return cls(OutcomeSpec.from_dict(d.get("outcome") or {}), bool(d.get("sampled_base", False)),
                   d.get("samples", 4), d.get("alternatives", 3), d.get("min_prob", 0.05),
                   tuple(pos) if pos else None, d.get("max_sequences", 2000))


@dataclass(frozen=True)
class Cost:
    sequences: int
    positions: int
    tokens: int  # at most, to generate
    prefill: int  # prefill tokens the batched path decodes: prompt + base once, one forced token per (t, w)
    naive_prefill: int  # positions x alternatives x samples x prefix length

    def seconds(self, tokens_per_s: float) -> float:
        return self.tokens / tokens_per_s if tokens_per_s > 0 else float("nan")

    def to_dict(self) -> dict:
        return {"sequences": self.sequences, "positions": self.positions, "tokens": self.tokens,
                "prefill": self.prefill, "naive_prefill": self.naive_prefill}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Cost | None":
        """None for a run stored without its estimate."""
        if not d:
            return None
        return cls(d.get("sequences", 0), d.get("positions", 0), d.get("tokens", 0), d.get("prefill", 0),
                   d.get("naive_prefill", 0))


@dataclass(frozen=True)
class BaseExtra:
    """What the base path's sample (sample 0) records beyond its tokens."""

    plan: PlanSettings
    cost: Cost | None
    outcome: str | None  # the base path's own outcome (None: stored without one)
    decode_stats: dict[str, int] = field(default_factory=dict)  # the decode counters, summed over resumes

    def to_dict(self) -> dict:
        d = {"role": "base", "version": EXTRA_VERSION, "fork": self.plan.to_dict(),
             "cost": self.cost.to_dict() if self.cost else {}, "outcome": self.outcome}
        if self.decode_stats:
            d["decode_stats"] = dict(self.decode_stats)
        return d

    def columns(self) -> dict:
        """Its values of the export's fork columns (fork.FORK_COLUMNS' keys)."""
        return {"role": "base", "outcome": self.outcome}

    @classmethod
    def from_dict(cls, d: dict | None) -> "BaseExtra":
        d = d or {}
        _version(d, "fork base path")
        return cls(PlanSettings.from_dict(d.get("fork") or {}), Cost.from_dict(d.get("cost")), d.get("outcome"),
                   dict(d.get("decode_stats") or {}))


# -- what each continuation records --------------------------------------------------------------------
@dataclass(frozen=True)
class Continuation:
    """One planned continuation: base[:position] + forced token, continued with its own seed."""

    position: int
    forced_token: int
    forced_text: str
    forced_bytes: str  # hex of the forced token's exact bytes
    prob: float  # its raw probability at that position
    chosen: bool  # the base path's own token there
    sample: int  # j: the j-th continuation of this (position, forced token)
    seed: int
    outcome: str | None = None  # read from its whole completion once decoded

    @property
    def branch(self) -> tuple[int, int]:
        return self.position, self.forced_token

    @property
    def forced_visible(self) -> str:
        return visible(self.forced_text, self.forced_bytes)

    def to_dict(self) -> dict:
        d = {"role": "continuation", "version": EXTRA_VERSION, "position": self.position,
             "forced_token": self.forced_token, "forced_text": self.forced_text, "forced_bytes": self.forced_bytes,
             "prob": self.prob, "chosen": self.chosen, "sample": self.sample, "seed": self.seed}
        if self.outcome is not None:
            d["outcome"] = self.outcome
        return d

    def columns(self) -> dict:
        """Its values of the export's fork columns (fork.FORK_COLUMNS' keys)."""
        return {**self.to_dict(), "outcome": self.outcome}

    @classmethod
    def from_dict(cls, d: dict) -> "Continuation":
        _version(d, "fork continuation")
        return cls(d["position"], d["forced_token"], d.get("forced_text", ""), d.get("forced_bytes", ""),
                   d.get("prob", float("nan")), bool(d.get("chosen", False)), d.get("sample", 0), d.get("seed", 0),
                   d.get("outcome"))


def is_continuation(extra: dict | None) -> bool:
    """A sample of a fork run that is a continuation (not the base path)."""
    return (extra or {}).get("role") == "continuation"


def sample_record(extra: dict | None) -> "Continuation | BaseExtra":
    """A fork run's sample's record: a continuation's, or the base path's."""
    return Continuation.from_dict(extra) if is_continuation(extra) else BaseExtra.from_dict(extra)

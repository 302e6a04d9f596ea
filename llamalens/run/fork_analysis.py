"""Forking-paths analysis, pure: outcome distributions along a base path, their jumps, change points and
whether a jump exceeds the sampling noise (Bigelow et al., "Forking Paths in Neural Text Generation",
ICLR 2025). No model here: fork.py decodes the continuations; this module only counts their outcomes.

    per analysed position t of the base path, its branches w (the chosen token and the kept alternatives),
    each with the raw probability p(w) and the outcomes of its S continuations
      ──► o_t = Σ_w p̃(w) · hist_w / n_w        p̃ = p renormalised over the kept branches
      ──► the series o_0 .. o_{T-1}, then o_end = the base path's own outcome (every token fixed)
      ──► jump_i = TV(o_{i-1}, o_i) = ½ Σ_k |o_{i-1,k} - o_{i,k}|,  i = 1..T
      ──► noise from the samples' posterior: each branch's outcome distribution is drawn B times from
          Dirichlet(counts + 1/K) over the K outcomes seen in the run (one pseudo-count spread over them,
          Jeffreys' prior for two outcomes; a Bayesian bootstrap that widens as samples shrink: 4
          continuations that all agree leave real doubt, where resampling them with replacement saw
          none), o*_t recomputed from the draws; the jump's centred replicates
          ½ Σ_k |(o*_{i-1} - ō*_{i-1}) - (o*_i - ō*_i)|  give what noise alone makes of a jump: its 95th
          percentile is the jump's noise level, and the share of replicates at least as large as the jump
          its p-value
      ──► change points of the series (exact optimal partitioning, l2 cost, min segment 1; see
          change_points) with a BIC penalty
          K · log(T+1) · σ̂² (σ̂²: the mean posterior variance of a component of o_t, floored at 1e-4
          so that a noise-free series is not split at float-level differences)

A jump between analysed positions a < b is attributed to the token at a: from o_a to o_b the tokens a..b-1
of the base path were fixed, and with every position analysed that is the token at a alone. A forking
token is a change point whose jump exceeds its noise level (and is not zero).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

NONE = "none"  # the outcome of a continuation nothing matched
N_BOOT = 400
ALPHA = 0.05
MIN_VARIANCE = 1e-4
PRIOR = 1.0  # the Dirichlet prior's total pseudo-count on a branch's outcome distribution, spread over the outcomes seen


@dataclass
class Branch:
    """One alternative at one position: its token, raw probability and the outcomes of its continuations."""

    position: int
    token: int
    text: str  # made visible by the caller
    prob: float  # raw (pre-sampler) probability at that position
    chosen: bool  # the base path's own token
    outcomes: list[str] = field(default_factory=list)
    example: str = ""  # one continuation's text

    def histogram(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.outcomes:
            out[o] = out.get(o, 0) + 1
        return out


@dataclass
class Jump:
    index: int  # i in the series: between o_{i-1} and o_i
    position: int  # the base token the jump is attributed to (the earlier of the two analysed positions)
    size: float  # total-variation distance
    noise95: float  # 95th percentile of the posterior's centred replicates
    p_value: float
    change_point: bool
    samples: tuple[int, int] = (0, 0)  # continuations behind o_{i-1} and o_i (o_end: the base path, 0)

    @property
    def significant(self) -> bool:
        return self.size > 1e-12 and self.size > self.noise95

    @property
    def forking(self) -> bool:
        return self.change_point and self.significant


@dataclass
class ForkAnalysis:
    labels: list[str]  # outcome categories, most probable overall first
    positions: list[int]  # analysed positions (the series' rows, before o_end)
    series: np.ndarray  # (len(positions) + 1, len(labels)): o_t rows, then o_end
    jumps: list[Jump]
    base_outcome: str
    branches: list[list[Branch]]  # per analysed position
    penalty: float
    declared: tuple[str, ...] = ()  # the outcomes asked for (--options): labels even at probability 0

    @property
    def forking(self) -> list[Jump]:
        return [j for j in self.jumps if j.forking]

    def jump_at(self, position: int) -> Jump | None:
        return next((j for j in self.jumps if j.position == position), None)

    def distribution(self, row: int) -> dict[str, float]:
        return {lab: float(v) for lab, v in zip(self.labels, self.series[row])}

    def to_dict(self) -> dict:
        return {
            "labels": self.labels, "declared": list(self.declared), "base_outcome": self.base_outcome,
            "penalty": self.penalty,
            "positions": [{"position": p, "distribution": self.distribution(i),
                           "branches": [{"token": b.token, "text": b.text, "prob": b.prob, "chosen": b.chosen,
                                         "histogram": b.histogram(), "example": b.example} for b in self.branches[i]]}
                          for i, p in enumerate(self.positions)],
            "end": self.distribution(len(self.positions)),
            "jumps": [{"position": j.position, "size": j.size, "noise95": j.noise95, "p_value": j.p_value,
                       "samples": list(j.samples), "change_point": j.change_point, "significant": j.significant,
                       "forking": j.forking}
                      for j in self.jumps],
            "forking_positions": [j.position for j in self.forking],
        }


def outcome_distribution(branches: list[Branch], labels: list[str]) -> np.ndarray:
    """o_t over `labels`: the branches' outcome histograms weighted by p(w), renormalised over the branches
    that have outcomes (a branch none of whose continuations is done yet carries no weight)."""
    row = np.zeros(len(labels))
    idx = {lab: k for k, lab in enumerate(labels)}
    kept = [b for b in branches if b.outcomes]
    total = sum(b.prob for b in kept)
    for b in kept:
        w = b.prob / total if total > 0 else 1.0 / len(kept)
        for o in b.outcomes:
            row[idx[o]] += w / len(b.outcomes)
    return row


def tv(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Total-variation distance along the last axis, rounded to 12 decimals (two equal distributions summed in
    different orders differ by ~1e-16, which the report would show as a jump)."""
    return np.round(0.5 * np.abs(np.asarray(a) - np.asarray(b)).sum(axis=-1), 12)


def _labels(branches: list[list[Branch]], base_outcome: str, declared: tuple[str, ...] = ()) -> list[str]:
    """Every outcome seen, and every declared one (--options) even where no continuation produced it: most
    probable overall first, declared ones in their order among equals."""
    mass: dict[str, float] = {base_outcome: 0.0, **{d: 0.0 for d in declared if d != base_outcome}}
    for group in branches:
        for b in group:
            for o in b.outcomes:
                mass[o] = mass.get(o, 0.0) + b.prob / len(b.outcomes)
    order = {d: i for i, d in enumerate(declared)}
    return sorted(mass, key=lambda k: (-mass[k], k == NONE, order.get(k, len(order)), k))


def _seen(branches: list[list[Branch]], base_outcome: str, labels: list[str]) -> np.ndarray:
    """Which labels some continuation (or the base path) produced: the noise estimate counts only these, so a
    declared option that never came up leaves every figure as it was without it."""
    seen = {base_outcome} | {o for group in branches for b in group for o in b.outcomes}
    return np.array([lab in seen for lab in labels])


def _posterior(branches: list[list[Branch]], labels: list[str], seen: np.ndarray, n_boot: int, rng) -> np.ndarray:
    """(n_boot, T, K): o_t recomputed with every branch's outcome distribution drawn from its posterior,
    Dirichlet(counts + PRIOR) over the outcomes seen in the run (the others stay at 0)."""
    idx = {lab: k for k, lab in enumerate(labels)}
    cols = np.flatnonzero(seen)
    out = np.zeros((n_boot, len(branches), len(labels)))
    for t, group in enumerate(branches):
        kept = [b for b in group if b.outcomes]
        total = sum(b.prob for b in kept)
        for b in kept:
            w = b.prob / total if total > 0 else 1.0 / len(kept)
            counts = np.bincount([idx[o] for o in b.outcomes], minlength=len(labels))[cols]
            out[:, t, cols] += w * rng.dirichlet(counts + PRIOR / len(cols), size=n_boot)
    return out


def continuations(group: list[Branch]) -> int:
    """How many continuations an o_t rests on."""
    return sum(len(b.outcomes) for b in group)


def change_points(series: np.ndarray, penalty: float) -> list[int]:
    """Row indices where a new segment starts: the exact optimal partition of the rows into segments of
    constant mean, minimising Σ_segments Σ_rows ||y - segment mean||² + penalty × (number of segments).

    Optimal partitioning (Jackson et al., 2005), by dynamic programming over segment ends: F(0) = 0,
    F(t) = min_s F(s) + cost(s, t) + penalty, cost from cumulative sums in O(1). O(T²) for T rows: a few
    hundred positions take milliseconds. PELT (Killick et al., 2012; the `ruptures` library) finds the same
    optimum with pruning; ruptures would bring scipy along, whose import alone took ~10 s here.
    """
    y = np.asarray(series, dtype=float)
    n = len(y)
    if n < 2:
        return []
    cs = np.vstack([np.zeros(y.shape[1]), np.cumsum(y, axis=0)])
    cs2 = np.concatenate([[0.0], np.cumsum((y * y).sum(axis=1))])
    best = np.zeros(n + 1)
    start = np.zeros(n + 1, dtype=int)
    for t in range(1, n + 1):
        s = np.arange(t)
        length = t - s
        seg = cs[t] - cs[s]
        cost = cs2[t] - cs2[s] - (seg * seg).sum(axis=1) / length
        total = best[s] + np.maximum(cost, 0.0) + penalty
        k = int(np.argmin(total))  # ties: the earliest start, i.e. the fewest segments
        best[t], start[t] = total[k], k
    cuts, t = [], n
    while t > 0:
        t = start[t]
        if t > 0:
            cuts.append(int(t))
    return sorted(cuts)


def analyse(branches: list[list[Branch]], positions: list[int], base_outcome: str, n_boot: int = N_BOOT,
            seed: int = 0, declared: tuple[str, ...] = ()) -> ForkAnalysis:
    """The outcome series, its jumps with their noise levels, and the change points (see the module docstring).
    `declared`: outcomes asked for (--options), each a label, at probability 0 where nothing produced it."""
    if len(branches) != len(positions):
        raise ValueError(f"{len(branches)} branch groups for {len(positions)} positions")
    labels = _labels(branches, base_outcome, declared)
    seen = _seen(branches, base_outcome, labels)
    end = np.zeros(len(labels))
    end[labels.index(base_outcome)] = 1.0
    series = np.vstack([outcome_distribution(g, labels) for g in branches] + [end]) if branches else end[None, :]
    rng = np.random.default_rng(seed)
    boot = _posterior(branches, labels, seen, n_boot, rng) if int(seen.sum()) > 1 else \
        np.broadcast_to(series[:-1], (n_boot, len(branches), len(labels)))  # one outcome only: nothing can move
    boot = np.concatenate([boot, np.broadcast_to(end, (n_boot, 1, len(labels)))], axis=1)  # o_end has no noise
    centred = boot - boot.mean(axis=0, keepdims=True)
    sigma2 = float(centred[:, :-1, seen].var(axis=0).mean()) if branches else 0.0
    penalty = int(seen.sum()) * np.log(len(series)) * max(sigma2, MIN_VARIANCE)
    cps = set(change_points(series, penalty))
    jumps = []
    n = [continuations(g) for g in branches] + [0]
    for i in range(1, len(series)):
        size = float(tv(series[i - 1], series[i]))
        null = tv(centred[:, i - 1, :], centred[:, i, :])
        jumps.append(Jump(i, positions[i - 1], size, float(np.quantile(null, 1 - ALPHA)),
                          float((null >= size - 1e-12).mean()), i in cps, (n[i - 1], n[i])))
    return ForkAnalysis(labels, list(positions), series, jumps, base_outcome, branches, float(penalty), tuple(declared))

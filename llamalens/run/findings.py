"""What a sweep run found, computed from its records alone (pure: no model, no rendering).

    LoadedRun ──► findings(run) ──► Findings
        groups       configurations whose chains are provably the same on this run, one group each
        texts        each prompt's distinct texts, with the configurations and seeds that produced them
        axes         per grid axis: the pairs of configurations that differ only in it, and whether the text changed
        splits       where the seeds of one (non-deterministic) configuration drew different tokens
        differences  pairs of groups whose mean logprobs differ by more than the noise floor, largest first
        surprising   the least likely tokens the run chose, each text prefix once

"Provably the same" is checked on the records, never assumed from the settings: a configuration is
deterministic on this run when every token it recorded had one candidate left after the sampler chain
(greedy by T=0, or a truncation that kept one token at every position), and two deterministic
configurations with the same strategy that chose the same tokens for every prompt and seed made the same
picks from the same histories: their records are the same decode.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from llamalens.run.loaded import SETTINGS, STRATEGY_COLUMNS, LoadedRun, seed_splits, varying_axes

# the short names a configuration's settings go by in labels (SamplingSettings.label's spelling)
SHORT = {"temperature": "T", "top_k": "k", "top_p": "p", "typical_p": "typ", "repeat_penalty": "rep",
         "frequency_penalty": "freq", "presence_penalty": "pres"}
SURPRISING = 5  # how many of the least likely chosen tokens the findings list


@dataclass(frozen=True)
class ConfigGroup:
    """Configurations that are one chain on this run (`configs[0]` stands for them)."""

    configs: tuple[int, ...]
    deterministic: bool  # one candidate at every recorded token: the seed cannot matter


@dataclass(frozen=True)
class DistinctText:
    """One prompt's text as some samples produced it."""

    prompt_idx: int
    ids: tuple[int, ...]
    text: str
    bytes: str  # the tokens' exact bytes, hex (a text may end inside a character)
    samples: tuple[tuple[int, int, int], ...]  # (sample_idx, config_idx, seed) of each sample that produced it


@dataclass(frozen=True)
class AxisEffect:
    """What changing one axis did: each pair of configurations that differ only in it, and whether any prompt
    and seed gave a different text."""

    axis: str
    pairs: tuple[tuple[int, int, bool], ...]  # (config a, config b, text changed)

    @property
    def changed(self) -> int:
        return sum(c for _, _, c in self.pairs)


@dataclass(frozen=True)
class SeedSplit:
    prompt_idx: int
    config_idx: int
    seeds: int
    distinct: int
    positions: tuple[int, ...]  # where the seeds drew different tokens


@dataclass(frozen=True)
class Difference:
    a: int  # config_idx standing for its group, the likelier of the two
    b: int
    delta: float  # mean logprob of a minus that of b, > 0


@dataclass(frozen=True)
class Surprise:
    sample_idx: int
    prompt_idx: int
    config_idx: int
    position: int
    token_id: int
    text: str
    bytes: str
    prob: float
    rank: int
    before: str  # the text generated before it (its tail is what a reader needs)


@dataclass
class Findings:
    groups: list[ConfigGroup]
    texts: list[DistinctText]
    axes: list[AxisEffect]
    splits: list[SeedSplit]
    differences: list[Difference]
    noise: float | None  # the threshold differences were held to (max |Δ logprob| of the noise floor)
    surprising: list[Surprise] = field(default_factory=list)

    def group_of(self, config_idx: int) -> ConfigGroup:
        return next(g for g in self.groups if config_idx in g.configs)


def _sequences(run: LoadedRun) -> dict[int, dict[tuple[int, int], tuple[int, ...]]]:
    """Per configuration: (prompt_idx, seed) -> the token ids it chose."""
    out: dict[int, dict[tuple[int, int], tuple[int, ...]]] = {}
    for s in run.samples:
        out.setdefault(s.config_idx, {})[(s.prompt_idx, s.seed)] = tuple(t.id for t in run.by_sample.get(s.sample_idx, []))
    return out


def deterministic(run: LoadedRun, config_idx: int) -> bool:
    """Whether every token the configuration recorded had one candidate left (and it recorded any)."""
    toks = [t for s in run.samples if s.config_idx == config_idx for t in run.by_sample.get(s.sample_idx, [])]
    return bool(toks) and all(t.candidates == 1 for t in toks)


def equivalent_groups(run: LoadedRun) -> list[ConfigGroup]:
    """The run's configurations grouped where their chains are provably the same on this run (module docstring);
    every other configuration is a group of its own. Groups are ordered by their first configuration."""
    seqs = _sequences(run)
    groups: dict[object, list[int]] = {}
    det: dict[int, bool] = {}
    for ci in sorted(seqs):
        det[ci] = deterministic(run, ci)
        cfg = run.configs[ci]
        key = (("same", tuple(getattr(cfg, c) for c in STRATEGY_COLUMNS), tuple(sorted(seqs[ci].items())))
               if det[ci] else ("own", ci))
        groups.setdefault(key, []).append(ci)
    return sorted((ConfigGroup(tuple(cs), det[cs[0]]) for cs in groups.values()), key=lambda g: g.configs[0])


def distinct_texts(run: LoadedRun) -> list[DistinctText]:
    """Each prompt's distinct texts (by token ids), the most produced first, with who produced them."""
    by: dict[tuple[int, tuple[int, ...]], list] = {}
    text: dict[tuple[int, tuple[int, ...]], tuple[str, str]] = {}
    for s in sorted(run.samples, key=lambda s: (s.prompt_idx, s.config_idx, s.seed)):
        toks = run.by_sample.get(s.sample_idx, [])
        key = (s.prompt_idx, tuple(t.id for t in toks))
        by.setdefault(key, []).append((s.sample_idx, s.config_idx, s.seed))
        text.setdefault(key, (s.text, "".join(t.bytes for t in toks if not t.eog)))
    order = sorted(by, key=lambda k: (k[0], -len(by[k]), by[k][0]))
    return [DistinctText(p, ids, *text[(p, ids)], tuple(by[(p, ids)])) for p, ids in order]


def axis_effects(run: LoadedRun) -> list[AxisEffect]:
    """For each axis that varies: the pairs of configurations equal in every other setting, and whether their
    texts differ for some prompt and seed they share."""
    seqs = _sequences(run)
    present = sorted(seqs)
    out = []
    for axis in varying_axes(run.configs, SETTINGS):
        pairs = []
        for i, a in enumerate(present):
            for b in present[i + 1:]:
                ca, cb = run.configs[a], run.configs[b]
                if getattr(ca, axis) == getattr(cb, axis) or ca.with_(**{axis: getattr(cb, axis)}) != cb:
                    continue
                shared = seqs[a].keys() & seqs[b].keys()
                pairs.append((a, b, any(seqs[a][k] != seqs[b][k] for k in shared)))
        out.append(AxisEffect(axis, tuple(pairs)))
    return out


def moving_axes(run: LoadedRun, effects: list[AxisEffect], column: str) -> list[str]:
    """The axes along which a summary column moves: some pair of configurations that differ in that axis alone
    differs in it (by more than float noise). A heatmap over any other axis would only repeat its cells."""
    values = {int(r.config_idx): float(getattr(r, column)) for r in run.summary.itertuples()}
    out = []
    for e in effects:
        if any(abs(values[a] - values[b]) > 1e-9 or (values[a] != values[a]) != (values[b] != values[b])
               for a, b, _ in e.pairs if a in values and b in values):
            out.append(e.axis)
    return out


def seed_split_list(run: LoadedRun, groups: list[ConfigGroup]) -> list[SeedSplit]:
    """Where the seeds of each non-deterministic configuration (with more than one seed) split."""
    seqs = _sequences(run)
    out = []
    for g in groups:
        if g.deterministic:
            continue
        ci = g.configs[0]
        for p in sorted({p for p, _ in seqs.get(ci, {})}):
            runs = [ids for (pp, _), ids in sorted(seqs[ci].items()) if pp == p]
            if len(runs) > 1:
                distinct, at = seed_splits([list(r) for r in runs])
                out.append(SeedSplit(p, ci, len(runs), distinct, tuple(at)))
    return out


def differences(run: LoadedRun, groups: list[ConfigGroup], noise: float | None) -> list[Difference]:
    """Pairs of groups whose mean logprobs differ by more than `noise` (0 when None), largest first."""
    means = {int(r.config_idx): float(r.mean_logprob) for r in run.summary.itertuples()}
    reps = [g.configs[0] for g in groups if g.configs[0] in means]
    out = []
    for i, a in enumerate(reps):
        for b in reps[i + 1:]:
            hi, lo = (a, b) if means[a] >= means[b] else (b, a)
            d = means[hi] - means[lo]
            if d == d and d > (noise or 0.0):
                out.append(Difference(hi, lo, d))
    return sorted(out, key=lambda d: -d.delta)


def surprising(run: LoadedRun, n: int = SURPRISING) -> list[Surprise]:
    """The `n` least likely tokens the run chose (raw probability), each prompt and text prefix once: identical
    texts from several configurations or seeds count as one."""
    seen, found = set(), []
    for s in run.samples:
        toks = run.by_sample.get(s.sample_idx, [])
        prefix = s.prompt_idx  # a running hash of the prompt and the tokens so far: linear in a sample's length
        for t in toks:
            prefix = hash((prefix, t.id))
            if t.eog:
                continue
            key = (s.prompt_idx, t.position, prefix)
            if key in seen:
                continue
            seen.add(key)
            found.append(Surprise(s.sample_idx, s.prompt_idx, s.config_idx, t.position, t.id, t.text, t.bytes,
                                  t.prob, t.rank, ""))
    found = sorted(found, key=lambda f: (f.prob, f.sample_idx, f.position))[:n]
    texts = {s.sample_idx: run.by_sample.get(s.sample_idx, []) for s in run.samples}
    return [replace(f, before="".join(x.text for x in texts[f.sample_idx] if x.position < f.position)) for f in found]


def noise_threshold(run: LoadedRun) -> float | None:
    """The noise floor's max |Δ logprob| (None for a run without one: --exact, or nothing batched)."""
    nf = run.info.noise
    return float(nf["max_abs_dlogprob"]) if nf and nf.get("tokens") else None


def findings(run: LoadedRun) -> Findings:
    """Everything the findings block of a run's report says (module docstring)."""
    groups = equivalent_groups(run)
    noise = noise_threshold(run)
    return Findings(groups, distinct_texts(run), axis_effects(run), seed_split_list(run, groups),
                    differences(run, groups, noise), noise, surprising(run))


def short_label(cfg, axes: list[str]) -> str:
    """A configuration named by the given axes only, e.g. 'T=0 k=2 p=0.01' (what tells it apart in its run)."""
    return " ".join(f"{SHORT.get(a, a)}={_value(getattr(cfg, a))}" for a in axes) or cfg.label(seed=False)


def _value(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)

"""The top of a sweep run's report: what was found (in words, from run/findings.py) and the distinct texts.

    Findings ──► Names (what each configuration and group is called on the page)
             ──► findings_blocks: bullets, the most surprising tokens
             ──► texts_blocks: per prompt, each distinct text once, with who produced it
"""

from __future__ import annotations

from llamalens.run.findings import Findings, ConfigGroup, short_label
from llamalens.run.loaded import SETTINGS, LoadedRun, varying_axes
from llamalens.reports.document import Bullets, Heading, Para, Table
from llamalens.visible import prob_text, visible

MAX_LISTED = 4  # pairs named per axis before "…"
MAX_TEXT_CHARS = 400


class Names:
    """How the page names configurations: by the settings that vary in the run, and a group by its first member
    plus how many it stands for."""

    def __init__(self, run: LoadedRun, found: Findings):
        self.run, self.found = run, found
        self.axes = varying_axes(run.configs, SETTINGS)

    def config(self, ci: int, axes: list[str] | None = None) -> str:
        """A configuration by the settings that vary (strategies: its whole label, which names only the
        settings its strategy uses)."""
        cfg = self.run.configs[ci]
        axes = self.axes if axes is None else axes
        return short_label(cfg, axes) if axes and not self.run.strategies else cfg.label(seed=False)

    def group(self, g: ConfigGroup) -> str:
        more = len(g.configs) - 1
        return self.config(g.configs[0]) + (f" (+{more} equivalent)" if more else "")

    def group_row(self, g: ConfigGroup) -> str:
        """The summary row's label: every setting the group stands for."""
        if len(g.configs) == 1:
            return self.run.configs[g.configs[0]].label(seed=False)
        how = "one candidate at every token" if g.deterministic else "the same records"
        return f"{len(g.configs)} settings, one chain on this run ({how}): " + ", ".join(
            self.config(c) for c in g.configs)

    def of_config(self, ci: int) -> str:
        return self.group(self.found.group_of(ci))


def _overview(run: LoadedRun, found: Findings) -> str:
    info, opts = run.info, run.info.options
    n_texts = len(found.texts)
    chains = len(found.groups)
    return (f"{info.n_prompts} prompt{'s' if info.n_prompts != 1 else ''} × {info.n_configs} configuration"
            f"{'s' if info.n_configs != 1 else ''} × {len(opts.seeds)} seed{'s' if len(opts.seeds) != 1 else ''}: "
            f"{len(run.samples)} samples of up to {opts.max_tokens} tokens gave {n_texts} distinct text"
            f"{'s' if n_texts != 1 else ''}, from {chains} distinct chain{'s' if chains != 1 else ''}.")


def _groups(names: Names, found: Findings) -> list[str]:
    out = []
    n = len(names.run.configs)
    for g in found.groups:
        if len(g.configs) > 1:
            out.append(f"{len(g.configs)} of the {n} configurations are one chain on this run: "
                       f"{', '.join(names.config(c) for c in g.configs)}. "
                       + ("Every token they chose had one candidate left after the sampler chain (greedy), so the seed "
                          "did not matter and they chose the same tokens; " if g.deterministic else "")
                       + "they are one row below.")
    return out


def _axes(names: Names, found: Findings) -> list[str]:
    changed, still = [], []
    for eff in found.axes:
        if not eff.pairs:
            continue
        if eff.changed:
            others = [a for a in names.axes if a != eff.axis]
            where = [names.config(a, others) for a, _, c in eff.pairs if c]
            listed = "; ".join(w for w in where[:MAX_LISTED] if w) + (" …" if len(where) > MAX_LISTED else "")
            changed.append(f"{eff.axis} ({eff.changed} of {len(eff.pairs)} pairs"
                           + (f": at {listed}" if listed else "") + ")")
        else:
            still.append(f"{eff.axis} ({len(eff.pairs)} pair{'s' if len(eff.pairs) != 1 else ''})")
    out = []
    if changed:
        out.append("Changed the text (pairs of configurations that differ in that setting alone): " + ", ".join(changed)
                   + ".")
    if still:
        out.append("Changed no text: " + ", ".join(still) + ".")
    return out


def _splits(names: Names, found: Findings) -> list[str]:
    if all(g.deterministic for g in found.groups):
        return ["Every configuration was deterministic on this run (one candidate at every token): the seeds changed "
                "nothing."]
    split = [s for s in found.splits if s.distinct > 1]
    if not split and found.splits:
        return ["The seeds never split: every sampling configuration gave one text per prompt."]
    parts = [f"{names.of_config(s.config_idx)}" + (f" on prompt {s.prompt_idx}" if names.run.info.n_prompts > 1 else "")
             + f" at token {', '.join(map(str, s.positions[:3]))}{' …' if len(s.positions) > 3 else ''} "
             f"({s.distinct} texts from {s.seeds} seeds)" for s in split]
    return ["The seeds split under " + "; ".join(parts) + "."] if parts else []


def _differences(names: Names, found: Findings) -> list[str]:
    reps = len(found.groups)
    if reps < 2:
        return []
    noise = ("zero (no noise floor was measured: nothing was batched)" if found.noise is None
             else "zero (batching moved no logprob on this run)" if found.noise == 0
             else f"the noise floor ({found.noise:.3f} nats)")
    if not found.differences:
        return [f"No two distinct chains' mean logprobs differ by more than {noise}."]
    means = {int(r.config_idx): float(r.mean_logprob) for r in names.run.summary.itertuples()}
    d = found.differences[0]
    pairs = reps * (reps - 1) // 2
    return [f"Largest difference in mean logprob beyond {noise}: {names.of_config(d.a)} {means[d.a]:.3f} against "
            f"{names.of_config(d.b)} {means[d.b]:.3f}, {d.delta:.3f} nats; {len(found.differences)} of {pairs} pairs "
            "of distinct chains differ by more than it."]


def findings_blocks(doc, run: LoadedRun, found: Findings, names: Names) -> None:
    """The findings block: what the run shows, in sentences, and its most surprising tokens."""
    doc.add(Heading("Findings"))
    doc.add(Bullets([_overview(run, found), *_groups(names, found), *_axes(names, found), *_splits(names, found),
                     *_differences(names, found)]))
    if found.surprising:
        doc.add(Table(["token", "p", "rank", "after", "configuration", "sample"],
                      [[visible(s.text, s.bytes), prob_text(s.prob), s.rank,
                        "…" + visible(s.before[-60:], edge_spaces=False) if len(s.before) > 60
                        else visible(s.before, edge_spaces=False) or "(the first token)",
                        names.of_config(s.config_idx), s.sample_idx] for s in found.surprising],
                      caption="The least likely tokens the run chose (raw probability and rank among all tokens), "
                              "each text prefix once.", sortable=False))


def texts_blocks(doc, run: LoadedRun, found: Findings, names: Names) -> None:
    """Each prompt's distinct texts, the most produced first, with the configurations and seeds behind each."""
    doc.add(Heading("Texts"))
    prompts = dict(sorted({(s.prompt_idx, s.prompt) for s in run.samples}))
    for p_idx, prompt in prompts.items():
        texts = [t for t in found.texts if t.prompt_idx == p_idx]
        rows = [[len(t.samples), _cut(visible(t.text, t.bytes, edge_spaces=False)) + mark, produced_by(names, t.samples)]
                for t, mark in zip(texts, retokenized(texts))]
        doc.add(Para(f"Prompt {p_idx}: {visible(prompt, edge_spaces=False)}", "p"))
        doc.add(Table(["samples", "text", "produced by"], rows, sortable=False))


def retokenized(texts) -> list[str]:
    """A mark for each distinct text (distinct by token ids) whose bytes an earlier one already spelled: the same
    text reached through other tokens (" Yes" as one token, or as " " and "Yes"), '' for the others."""
    seen: set[str] = set()
    marks = []
    for t in texts:
        marks.append(" (the same text as above, in other tokens)" if t.bytes in seen else "")
        seen.add(t.bytes)
    return marks


MAX_NAMED_GROUPS = 3  # a text made by more groups than this names its configurations by number


def produced_by(names: Names, samples) -> str:
    """Which groups made a text, and with which seeds ('every seed' when the group is deterministic); past
    MAX_NAMED_GROUPS groups, the configurations by number (the summary's '#') and the seeds."""
    by: dict[ConfigGroup, list[int]] = {}
    for _, ci, seed in samples:
        by.setdefault(names.found.group_of(ci), []).append(seed)
    if len(by) > MAX_NAMED_GROUPS:
        configs, seeds = {ci for _, ci, _ in samples}, {seed for _, _, seed in samples}
        return (f"{len(configs)} configurations ({numbers(configs)}), seed{'s' if len(seeds) > 1 else ''} "
                f"{numbers(seeds)}")
    return "; ".join(f"{names.group(g)}, " + ("every seed" if g.deterministic else
                                              f"seed{'s' if len(set(seeds)) > 1 else ''} "
                                              f"{', '.join(map(str, sorted(set(seeds))))}")
                     for g, seeds in by.items())


def numbers(configs, nobreak: bool = False) -> str:
    """Configuration numbers with runs shortened: (0, 1, 2, 3, 6) -> '0–3, 6' (`nobreak`: a word joiner after
    the dash, so that a page does not break a range there)."""
    out, run = [], []
    for c in sorted(configs):
        if run and c != run[-1] + 1:
            out.append(run)
            run = []
        run.append(c)
    if run:
        out.append(run)
    dash = "–\u2060" if nobreak else "–"
    return ", ".join(f"{r[0]}{dash}{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in out)


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TEXT_CHARS else text[: MAX_TEXT_CHARS - 1] + "…"

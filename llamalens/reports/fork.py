"""The report of a fork run: the base path coloured by how far the outcome distribution moves at each token
(hover: the branches there, their probabilities, outcome histograms and one continuation each), the
stacked outcome distributions o_t with the change points, and the table of forking tokens.

Only data is collected here; document.py writes the markup (every text escaped there)."""

from __future__ import annotations

from llamalens.visible import label, prob_text, visible
from llamalens.reports.document import Bullets, Document, Figure, Folded, Heading, KeyValues, Para, Strips, Table, \
    TokenView, fork_class, prob_class
from llamalens.reports.run import describe_noise
from llamalens.reports.texts import model_line

EXAMPLE_CHARS = 160
TOP_JUMPS = 15


def histogram_text(hist: dict[str, int]) -> str:
    return ", ".join(f"{visible(k)} {v}" for k, v in sorted(hist.items(), key=lambda kv: -kv[1]))


def distribution_text(dist: dict[str, float], most: int = 3, always: tuple[str, ...] = ()) -> str:
    """The `most` likeliest outcomes with their probabilities, and every outcome in `always` (the declared
    --options) even at 0, so that an option the model never produced reads as asked and not produced."""
    items = sorted(((k, v) for k, v in dist.items() if v > 0), key=lambda kv: -kv[1])
    top = items[:most]
    top += [(k, dist.get(k, 0.0)) for k in always if k not in {k for k, _ in top}]
    shown = ", ".join(f"{visible(k)} {v:.2f}" for k, v in top)
    rest = len([k for k, _ in items if k not in {k for k, _ in top}])
    return shown + (f" (+{rest} more)" if rest else "")


def prefill_line(stats: dict, cost) -> str:
    """What sharing the base path saved in prefill (stats: the decode counters; cost: the run's fork Cost, or None)."""
    naive = cost.naive_prefill if cost else None
    done = stats.get("prefill_tokens")
    if not naive or not done:
        return "–"
    return (f"{done:,} prompt/prefix tokens decoded for {cost.sequences:,} continuations; "
            f"prefilling each continuation's prefix on its own would decode {naive:,} ({_times(naive / done)})")


def _times(ratio: float) -> str:
    """A ratio in words that never reads "0× as many" (a short path can save nothing)."""
    if ratio >= 1.05:
        return f"{ratio:.{0 if ratio >= 10 else 1}f}× as many"
    return "about as many" if ratio > 0.95 else f"{1 / ratio:.1f}× fewer"


def fork_document(fr) -> Document:
    """A fork run (fork.ForkRun) as a report document, its sections in the order the page shows them: findings,
    the base path, o_t along it, the forking and per-position tables, how it was made (folded)."""
    from llamalens.reports import plots

    a, info = fr.analysis, fr.info
    doc = Document(f"llamalens fork: run {info.id}" + (f" ({label(info.name)})" if info.name else ""),
                   fields=["p", "outcome shift (TV)", "noise (95%)", "o_t", "forking"],
                   alt_titles=["branches: p(w), outcomes of its continuations", "one continuation per branch"],
                   modes=[("fork", "outcome shift"), ("prob", "probability")])
    if info.status != "done":
        doc.add(Para(f"run {info.id} is {info.status}: only finished continuations are counted; "
                     f"resume with `llamalens fork --resume {info.id}`", "warn"))
    _findings(doc, fr)
    doc.add(Heading("The base path"))
    doc.add(Para("Each token is coloured by how far the outcome distribution moves from that position to the next "
                 "analysed one (total variation: 0 = not at all, 1 = a different answer for sure). Hover a token for "
                 "its branches: the alternatives, their raw probabilities and what their continuations answered.",
                 "note"))
    views = []
    row_of = {p: i for i, p in enumerate(a.positions)}
    for t in fr.base_tokens:
        i = row_of.get(t.position)
        j = a.jump_at(t.position)
        shift = j.size if j else 0.0
        alts, examples = [], []
        if i is not None:
            for b in a.branches[i]:
                alts.append((b.text + (" (chosen)" if b.chosen else ""), f"{prob_text(b.prob, 3)}: {histogram_text(b.histogram())}"))
                examples.append((b.text, b.example[:EXAMPLE_CHARS] + ("…" if len(b.example) > EXAMPLE_CHARS else "")))
        views.append(TokenView(
            visible(t.text, t.bytes), t.id, f"{fork_class(shift)} {prob_class(t.prob)}",
            [prob_text(t.prob), f"{shift:.3f}" if j else "–", f"{j.noise95:.3f}" if j else "–",
             distribution_text(a.distribution(i), always=a.declared) if i is not None else "not analysed",
             ("yes" if j.forking else "no") if j else "–"],
            [alts, examples], notable=shift, newline=bytes.fromhex(t.bytes).endswith(b"\n"),
            mark="forking token" if j and j.forking else "", plain=visible(t.text, t.bytes, edge_spaces=False)))
    doc.add(Strips("Base path", [("base", views)], context=visible(info.options.prompts[0], edge_spaces=False)
                   if info.options.prompts else ""))
    doc.add(Heading("Outcome distribution along the base path"))
    cps = [j.index for j in a.jumps if j.change_point]
    doc.add(Figure(plots.outcome_areas(a.positions, a.series, [visible(x) for x in a.labels], cps,
                                       [j.index for j in a.forking],
                                       [_tok(fr, p) for p in a.positions]),
                   "outcomes",
                   "o_t: the share of each outcome among the continuations from position t (branches weighted by "
                   "their raw probability); 'end' is the base path's own outcome. Dashed lines: change points of "
                   "the series; red lines: forking tokens (a change point whose jump exceeds the noise). "
                   "A line after a token means choosing that token moved the distribution."))
    _forking_table(doc, fr)
    _per_position(doc, fr)
    doc.add(_made(fr))
    return doc


def _findings(doc: Document, fr) -> None:
    """What was found first: the base path's outcome, each forking token with the move it makes (or the largest
    move and why it is not one)."""
    a = fr.analysis
    found = [f"Outcome read as {fr.outcome.describe()}; the base path ({len(fr.base_tokens)} tokens, "
             f"{'sampled' if fr.plan.sampled_base else 'greedy'}) ends in: {visible(a.base_outcome)}."]
    for j in a.forking:
        found.append(f"Forking token {j.position} {_tok(fr, j.position)}: the outcome distribution moves from "
                     f"{distribution_text(a.distribution(j.index - 1), always=a.declared)} to "
                     f"{distribution_text(a.distribution(j.index), always=a.declared)} (TV {j.size:.2f} > noise "
                     f"{j.noise95:.2f}, on {'+'.join(map(str, j.samples))} continuations).")
    if not a.forking:
        top = max(a.jumps, key=lambda j: j.size, default=None)
        found.append("No token forks the outcome" + (
            f": the largest move, TV {top.size:.2f} after token {top.position} {_tok(fr, top.position)}, is within "
            f"what the samples' noise makes ({top.noise95:.2f})." if top is not None and top.size > 0 else "."))
    doc.add(Heading("Findings"), Bullets(found))


def _made(fr) -> Folded:
    """How the run was made, folded at the end: model, prompt, branches, status, prefill, noise floor."""
    a, info = fr.analysis, fr.info
    made = Folded("How this was made: model, prompt, branches, prefill, noise floor")
    n_cont = sum(len(b.outcomes) for g in a.branches for b in g)
    made.add(KeyValues([
        ("model", model_line(info.model)),
        ("prompt", visible(info.options.prompts[0], edge_spaces=False) if info.options.prompts else ""),
        ("outcome", fr.outcome.describe()),
        ("base path", f"{len(fr.base_tokens)} tokens, {'sampled' if fr.plan.sampled_base else 'greedy'}; "
                      f"its outcome: {visible(a.base_outcome)}"),
        ("branches", f"chosen token + top {fr.plan.alternatives} alternatives with p >= {fr.plan.min_prob}, "
                     f"{fr.plan.samples} continuation(s) each; {n_cont:,} continuations at {len(a.positions)} "
                     "positions"),
        ("status", f"{info.status}, {info.n_done}/{info.n_samples} sequences"
                   + (", batched" if not info.options.exact else ", exact (one sequence at a time)")),
        ("prefill", prefill_line(fr.stats, fr.cost)),
        ("forking tokens", ", ".join(f"{j.position} {_tok(fr, j.position)} "
                                     f"(TV {j.size:.2f})" for j in a.forking) or "none"),
    ]))
    noise = describe_noise(info.noise, compared=None)
    if noise:
        made.add(Para(noise + ". Continuations are batched; their logprobs carry this noise, their outcomes are "
                      "counted as decoded.", "note"))
    return made


def _forking_table(doc: Document, fr) -> None:
    """The largest jumps of the outcome distribution, with their noise and the continuations behind them."""
    a = fr.analysis
    doc.add(Heading("Forking tokens"))
    top = sorted(a.jumps, key=lambda j: -j.size)[:TOP_JUMPS]
    rows = [[j.position, _tok(fr, j.position), j.size, j.noise95, j.p_value, "+".join(map(str, j.samples)),
             "yes" if j.change_point else "", "yes" if j.forking else "",
             distribution_text(a.distribution(j.index - 1), always=a.declared),
             distribution_text(a.distribution(j.index), always=a.declared)]
            for j in top if j.size > 0]
    if rows:
        doc.add(Table(["position", "token", "jump (TV)", "noise 95%", "p", "continuations", "change point",
                       "forking", "o before", "o after"], rows,
                      caption="The largest moves of the outcome distribution, each attributed to the token after "
                              "which it happens. noise 95%: what the samples' uncertainty makes of a jump that is "
                              "not there (each branch's outcomes redrawn from their Dirichlet posterior; it widens "
                              "as samples shrink); p: the share of such jumps at least as large; continuations: "
                              "how many the two distributions rest on."))
    else:
        doc.add(Para("The outcome distribution does not move along the base path: no token forks it.", "note"))


def _per_position(doc: Document, fr) -> None:
    """The table of every analysed position: its token, branches, continuations and o_t."""
    a = fr.analysis
    doc.add(Heading("Per position"))
    doc.add(Table(["position", "token", "p", "branches", "continuations", "o_t"],
                  [[p, _tok(fr, p), _prob(fr, p), len(a.branches[i]), sum(len(b.outcomes) for b in a.branches[i]),
                    distribution_text(a.distribution(i), most=5, always=a.declared)]
                   for i, p in enumerate(a.positions)]))


def _tok(fr, position: int) -> str:
    t = fr.base_tokens[position] if position < len(fr.base_tokens) else None
    return visible(t.text, t.bytes) if t else "?"


def _prob(fr, position: int) -> float:
    return fr.base_tokens[position].prob if position < len(fr.base_tokens) else float("nan")


def write_fork_report(store, info, path, fmt, *, write, answer: str | None = None, **_options) -> None:
    """A fork run's report written to `path` (the fork kind's report, run/kinds.py), its texts' confidence folded
    at the end (`answer`: the regex of the answer span); the sweep report's options (metric, sampler view) do not
    apply."""
    from llamalens.reports.confidence import folded_confidence
    from llamalens.reports.document import check_writable, report_format
    from llamalens.run.confidence import confidence_table
    from llamalens.run.fork import load_fork
    from llamalens.run.loaded import load_run

    report_format(path, fmt)
    check_writable(path)
    doc = fork_document(load_fork(store, info.id))
    made = doc.blocks.pop()  # how it was made stays last
    folded_confidence(doc, confidence_table(load_run(store, info.id), answer), answer)
    doc.add(made)
    write(doc, path, fmt)

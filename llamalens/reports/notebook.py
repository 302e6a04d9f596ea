"""Rich display in Jupyter / VS Code: the `_repr_html_` of results, made from the reports' own documents.

    Sample, NextToken, SamplerView, Score, Choice, Comparison, Run ──► a Document built here from the
    report builders (texts.py, run.py, fork.py) ──► document.to_html (the one renderer) ──► frame()

frame() puts the whole page in an <iframe srcdoc="...">: the page's stylesheet, script and element ids stay
inside it (several results on one notebook page never clash, and the notebook's own styles are untouched),
it needs no network (inline CSS, inline SVG, no src or href to fetch; its Content-Security-Policy forbids
loading anything), and the hover tooltips work as in the report. Escaping: to_html escapes every text,
and the page is escaped once more as the attribute's value.
"""

from __future__ import annotations

import html

from llamalens.reports.document import Document, Figure, Heading, KeyValues, Para, Strips, Table, to_html
from llamalens.visible import terminal_safe


def frame(doc: Document) -> str:
    """The document's HTML page in a self-sizing iframe (it grows to its content once loaded)."""
    page = to_html(doc)
    height = _guess_height(doc)
    title = html.escape(terminal_safe(doc.title), quote=True)
    return (f'<iframe srcdoc="{html.escape(page, quote=True)}" title="{title}" '
            f'style="width:100%;height:{height}px;border:1px solid #ddd;border-radius:4px" '
            # shrink, then read the content's height (a document is never shorter than its frame)
            "onload=\"try{this.style.height='8px';"
            "this.style.height=(this.contentDocument.documentElement.scrollHeight+4)+'px'}catch(e){}\">"
            "</iframe>")


def _guess_height(doc: Document) -> int:
    """A starting height until the frame measures itself (where a sanitizer strips onload, it stays)."""
    h = 70
    for b in doc.blocks:
        if isinstance(b, Figure):
            h += int(b.fig.get_size_inches()[1] * 96) + 30
        elif isinstance(b, Table):
            h += 40 + 24 * len(b.rows)
        elif isinstance(b, KeyValues):
            h += 24 * len(b.rows)
        elif isinstance(b, Strips):
            h += 80 + 40 * len(b.rows)
        else:
            h += 36
    return min(h, 1400)


def sample_document(sample) -> Document:
    """A generated completion: its settings and the text coloured by each token's probability (hover: the
    token's figures and its top alternatives), as the run report's token strips."""
    from llamalens.settings import SamplingSettings
    from llamalens.reports.run import TOKEN_FIELDS, keeps_raw_top, token_view
    from llamalens.visible import visible

    doc = Document("llamalens generate", fields=TOKEN_FIELDS,
                   alt_titles=["top alternatives (raw distribution; kept: survived the sampler chain)"])
    tm = sample.timing
    try:
        settings = SamplingSettings(**sample.settings)
        label, kept = settings.label(), keeps_raw_top(settings, bool(getattr(sample, "grammar_removed", None)))
    except (TypeError, ValueError):
        label, kept = str(sample.settings), False
    doc.add(KeyValues([("settings", label), ("finish", f"{sample.finish_reason}; {len(sample.tokens)} tokens, "
                                                       f"{tm.tokens_per_s:.1f} tokens/s")]))
    doc.add(Strips("The completion, coloured by probability", [("completion", [token_view(t, survivors=kept) for t in sample.tokens])],
                   context=visible(sample.prompt, edge_spaces=False)))
    return doc


def next_token_document(nt) -> Document:
    """The next-token distribution: the top-N raw probabilities as bars and a table."""
    from llamalens.visible import visible
    from llamalens.reports import plots

    doc = Document("llamalens next", fields=[], alt_titles=[])
    doc.add(KeyValues([("prompt", nt.prompt), ("prompt tokens", str(nt.prompt_tokens)),
                       ("entropy", f"{nt.entropy:.4f} nats"),
                       ("shown", f"{sum(a.prob for a in nt.top):.1%} of the probability in the top {len(nt.top)}")]))
    labels = [visible(a.text, a.bytes) for a in nt.top]
    doc.add(Figure(plots.top_tokens(labels, [a.prob for a in nt.top]), "next_token",
                   "Raw probability (softmax of the logits) of the top tokens."))
    doc.add(Table(["rank", "token", "p", "logprob", "id"],
                  [[i, lab, a.prob, a.logprob, a.id] for i, (lab, a) in enumerate(zip(labels, nt.top), 1)]))
    return doc


def sampler_view_document(view) -> Document:
    """The raw top tokens and the same tokens after each sampler chain (bars and tables, as `next`'s report)."""
    from llamalens.reports.texts import sampler_blocks

    doc = Document(f"llamalens next: {len(view.chains)} sampler settings", fields=[], alt_titles=[])
    doc.add(KeyValues([("prompt", view.prompt), ("position", str(view.position)),
                       ("entropy", f"{view.entropy:.4f} nats (raw distribution)")]))
    sampler_blocks(doc, view)
    return doc


def choice_document(choice) -> Document:
    from llamalens.visible import visible

    doc = Document(f"llamalens choose: {len(choice.options)} options", fields=[], alt_titles=[])
    doc.add(KeyValues([("prompt", choice.prompt), ("normalize", choice.normalize)]))
    for note in choice.notes:
        doc.add(Para(note, "note"))
    doc.add(Table(["rank", "option", f"score ({choice.normalize})", "logprob", "tokens", "share", "margin"],
                  [[i, visible(o.option, edge_spaces=False), o.score(choice.normalize), o.total, len(o.tokens), p, m]
                   for i, (o, m, p) in enumerate(zip(choice.options, choice.margins(), choice.probabilities()), 1)],
                  caption="share = softmax of the scores over these options; margin = lead over the next option."))
    return doc


def run_document(run) -> Document:
    """A Run in a notebook: its kind's display (run/kinds.py)."""
    from llamalens.run.kinds import kind

    return kind(run.kind).hook("notebook")(run)


def fork_run_document(run) -> Document:
    """A fork Run in a notebook: its whole report."""
    from llamalens.reports.fork import fork_document
    from llamalens.run.fork import load_fork

    return fork_document(load_fork(run.store, run.id))


def sweep_run_document(run) -> Document:
    """A sweep Run in a notebook: the report's first sections in its order (what was found, each distinct text
    once, the summary per distinct chain, the strategy comparison when the run has one), and how it was made,
    folded, last."""
    from llamalens.reports.run import RunReport

    if not run.loaded.samples:
        doc = Document(f"llamalens run {run.id}", fields=[], alt_titles=[])
        doc.add(Para(f"run {run.id} has no finished samples yet ({run.info.status})", "warn"))
        return doc
    rep = RunReport(run.loaded, None, 0, None, "mean_logprob")
    for section in (rep.status, rep.findings, rep.texts, rep.summary, rep.strategies):
        section()
    rep.doc.add(Heading("More", 3), Para("run.report('run.html') writes the whole report: every sample's tokens "
                                        "coloured, each answer's confidence, the plots over the grid and along the "
                                        "sequence, seeds, the sampler view and timing.", "note"))
    rep.header()
    return rep.doc


def score_document(res) -> Document:
    from llamalens.reports.texts import score_document as build

    return build(res)


def compare_document(cmp) -> Document:
    from llamalens.reports.texts import compare_document as build

    return build(cmp)


def lens_document(result) -> Document:
    from llamalens.reports.lens import lens_document as build

    return build(result)


def ladder_document(ladder) -> Document:
    from llamalens.reports.ladder import ladder_document as build

    return build(ladder)


def html_of(kind: str, obj) -> str:
    """`_repr_html_` of a result: kind is one of sample, next_token, sampler_view, choice, run, score, compare,
    ladder."""
    return frame(_BUILDERS[kind](obj))


_BUILDERS = {"sample": sample_document, "next_token": next_token_document, "sampler_view": sampler_view_document,
             "choice": choice_document, "run": run_document, "score": score_document, "compare": compare_document,
             "lens": lens_document,
             "calibration": lambda res: _calibration(res), "ladder": ladder_document}


def _calibration(res) -> Document:
    from llamalens.reports.confidence import calibration_document

    return calibration_document(res)


def run_html(run) -> str:
    return html_of("run", run)

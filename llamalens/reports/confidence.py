"""The confidence section of every run's report (how sure the model was of each answer), and the report of
`calibrate` (whether those measures predict correctness on a labelled set)."""

from __future__ import annotations

import math

from llamalens.core.confidence import MEASURES
from llamalens.reports.document import Document, Folded, Heading, Para, Table, fmt
from llamalens.reports.findings import numbers
from llamalens.reports.texts import plain
from llamalens.visible import visible

MAX_ROWS = 50  # rows of a run report's confidence table (`export` has every sample)
ANSWER_CHARS = 60


def measures_caption() -> str:
    """What each measure is, higher or lower meaning surer (one caption for every table of them)."""
    return "; ".join(f"{m.label}: {m.what} ({'higher' if m.higher else 'lower'} = surer)" for m in MEASURES) + "."


def _answer(text) -> str:
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return "– (no match)"
    shown = visible(str(text).strip(), edge_spaces=False)
    return shown if len(shown) <= ANSWER_CHARS else shown[: ANSWER_CHARS - 1] + "…"


def confidence_blocks(doc: Document, table, answer: str | None) -> None:
    """A run's confidence table (run/confidence.py's): a row per sample, samples shown alike sharing one, the first
    MAX_ROWS rows."""
    if table.empty:
        return
    doc.add(Heading("How sure the model was of each answer"))
    if answer:
        span = f"over the answer span that --answer {visible(answer, edge_spaces=False)} picks out (its first match, group 1 if any)"
    else:
        span = "over the whole text (end-of-generation token included; --answer REGEX narrows them to the answer span)"
    doc.add(Para(f"Each sample's confidence measures, {span}. 'distinct' and 'clusters H' are of the samples of the "
                 "same prompt and configuration (its seeds): distinct answers / answers, and the entropy (nats) of "
                 "their lexical clusters (equal after lowercasing and dropping punctuation; no NLI model judges "
                 "meaning). Whether a measure predicts correctness for this model is what `llamalens calibrate` "
                 "measures on a labelled set."))
    from llamalens.run.confidence import alike

    groups = alike(table, lambda r: (r.prompt_idx, _answer(r.answer), r.span_tokens,
                                     *(plain(getattr(r, m.name)) for m in MEASURES),
                                     f"{round(r.distinct_share * r.answers)}/{r.answers}", plain(r.cluster_entropy)))
    rows = [[len(who), shown[0], numbers({c for c, _ in who}, nobreak=True), numbers({s for _, s in who}, nobreak=True),
             *shown[1:]] for shown, who in groups[:MAX_ROWS]]
    more = f" The first {MAX_ROWS} of {len(groups)} rows; `llamalens export` has every sample." \
        if len(groups) > MAX_ROWS else ""
    same = " Samples whose answer and figures are the same (a greedy chain's seeds, configurations that are one " \
           "chain) share a row." if len(groups) < len(table) else ""
    doc.add(Table(["samples", "prompt", "config", "seed", "answer", "tokens", *(m.label for m in MEASURES),
                   "distinct", "clusters H"], rows, caption=measures_caption() + same + more))


def folded_confidence(doc: Document, table, answer: str | None) -> None:
    """The same section folded (the reports of forks and trees, whose texts are continuations or branches)."""
    if table.empty:
        return
    box = Document(doc.title)
    confidence_blocks(box, table, answer)
    folded = Folded(f"How sure the model was of each text ({len(table)} samples)")
    folded.add(*box.blocks)
    doc.add(folded)


# -- calibrate's report ---------------------------------------------------------------------------------------------
def calibration_document(res) -> Document:
    """`calibrate`'s report: per model, which measure predicts correctness best, every measure's figures side by
    side, the reliability diagrams and the accuracy-vs-coverage curves, and the items."""
    from llamalens.reports.document import KeyValues

    doc = Document(f"llamalens calibrate: {len(res.models)} model(s) on {res.n_items} questions", fields=[],
                   alt_titles=[])
    doc.add(KeyValues([("labelled set", visible(res.source, edge_spaces=False)), ("questions", str(res.n_items)),
                       ("answer span", f"--answer {visible(res.answer, edge_spaces=False)}" if res.answer
                        else "the whole generated text"),
                       ("reliability bins", f"{res.bins} of equal width: [0, {1 / res.bins:g}), … , "
                                            f"[{1 - 1 / res.bins:g}, 1]")]))
    doc.add(Heading("Which measure predicts correctness"))
    doc.add(Para(_best_line(res)))
    doc.add(Table(["model", "questions", "measure", "n", "accuracy", "AUROC", "PRR", "ECE", "Brier"],
                  [[_model_name(m), f.kind, _label(f.measure), f.n, plain(f.accuracy), plain(f.auroc), plain(f.prr),
                    plain(f.ece), plain(f.brier)] for m in res.models for f in m.fits],
                  caption="AUROC: the chance that a right answer scores surer than a wrong one (0.5 = no signal). "
                          "PRR: prediction-rejection ratio, 1 = rejecting the least sure rejects the errors first, "
                          "0 = chance. ECE and Brier: of the probability each measure implies (" + _implied() + "). "
                          "Choice and generated questions are fitted apart (one measure has different scales on "
                          "each); n: the questions where the measure is defined."))
    for m in res.models:
        for kind in m.kinds():
            _model_kind(doc, res, m, kind)
        doc.add(_items_table(m))
    return doc


def _model_name(m) -> str:
    return visible(m.model.get("name", "?"), edge_spaces=False) + f" ({m.model.get('quantization', '?')})"


def _model_kind(doc: Document, res, m, kind: str) -> None:
    """One model on one kind of question: its reliability diagrams and its accuracy-vs-coverage curves."""
    from llamalens.reports import plots
    from llamalens.reports.document import Figure

    fits = [f for f in m.fits if f.kind == kind]
    acc = m.accuracy_of(kind)
    doc.add(Heading(f"{_model_name(m)}, {kind} questions: accuracy {acc:.1%}", 3))
    doc.add(Figure(plots.reliability_diagrams([(_label(f.measure), f.bins, f"ECE {f.ece:.3f}, n {f.n}") for f in fits],
                                              res.bins), f"reliability_{len(doc.blocks)}",
                   caption="Reliability diagrams: per bin of the implied probability, the share of right answers; on "
                           "the diagonal a measure means what it says."))
    both = [f for f in fits if f.auroc == f.auroc]
    if both:
        y = sorted((r.correct for r in m.items if r.kind == kind), reverse=True)
        oracle = [sum(y[:k + 1]) / (k + 1) for k in range(len(y))]
        doc.add(Figure(plots.coverage_curves({_label(f.measure): f.coverage for f in both}, acc, oracle),
                       f"coverage_{len(doc.blocks)}",
                       caption="Selective answering: answer only the surest questions by each measure."))


def _label(name: str) -> str:
    from llamalens.looks.calibrate import measure

    return measure(name).label


def _implied() -> str:
    from llamalens.looks.calibrate import ALL_MEASURES

    return "; ".join(f"{m.label}: {m.implies}" for m in ALL_MEASURES)


def _best_line(res) -> str:
    parts = []
    for m in res.models:
        for kind in m.kinds():
            best = m.best(kind)
            head = f"{_model_name(m)} on {kind} questions (accuracy {m.accuracy_of(kind):.1%})"
            if best is None:
                parts.append(f"{head}: no measure can be judged (every answer right, or every one wrong)")
            else:
                parts.append(f"{head}: {_label(best.measure)} predicts correctness best (AUROC {best.auroc:.3f}, "
                             f"PRR {fmt(best.prr)} over {best.n} questions)")
    return "; ".join(parts) + "."


def _items_table(m) -> Folded:
    box = Folded(f"The {len(m.items)} questions and answers")
    box.add(Table(["line", "kind", "question", "answer", "right", "option p", "seq lp", "H mean"],
                  [[r.line, r.kind, _answer(r.question), _answer(r.prediction), "yes" if r.correct else "no",
                    r.measures.get("option_prob"), r.measures.get("seq_logprob"), r.measures.get("mean_entropy")]
                   for r in m.items]))
    return box

"""The confidence section of every run's report (how sure the model was of each answer), and the report of
`calibrate` (whether those measures predict correctness on a labelled set)."""

from __future__ import annotations

import math

from llamalens.core.confidence import MEASURES
from llamalens.reports.document import Document, Folded, Heading, Para, Table
from llamalens.reports.texts import plain
from llamalens.visible import visible

MAX_ROWS = 300  # samples listed in a run report's confidence table (`export` has every one)
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
    """A run's per-sample confidence table (run/confidence.py's), the first MAX_ROWS samples."""
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
    rows = []
    for r in table.head(MAX_ROWS).itertuples():
        rows.append([r.sample_idx, r.prompt_idx, r.config_idx, r.seed, _answer(r.answer), r.span_tokens,
                     *(plain(getattr(r, m.name)) for m in MEASURES),
                     f"{round(r.distinct_share * r.answers)}/{r.answers}", plain(r.cluster_entropy)])
    more = f" The first {MAX_ROWS} of {len(table)} samples; `llamalens export` has every one." if len(table) > MAX_ROWS \
        else ""
    doc.add(Table(["sample", "prompt", "config", "seed", "answer", "tokens", *(m.label for m in MEASURES), "distinct",
                   "clusters H"], rows, caption=measures_caption() + more))


def folded_confidence(doc: Document, table, answer: str | None) -> None:
    """The same section folded (the reports of forks and trees, whose texts are continuations or branches)."""
    if table.empty:
        return
    box = Document(doc.title)
    confidence_blocks(box, table, answer)
    folded = Folded(f"How sure the model was of each text ({len(table)} samples)")
    folded.add(*box.blocks)
    doc.add(folded)

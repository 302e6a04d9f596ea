"""The report of a tree run (branches explored in `llamalens serve`): the branches as a table, then each
branch's path coloured by probability, where it left its parent marked."""

from __future__ import annotations

from llamalens.reports.document import Document, Heading, KeyValues, Strips, Table, TokenView, gltr_class, prob_class
from llamalens.reports.texts import model_line
from llamalens.visible import visible


def _view(t, mark: str = "") -> TokenView:
    return TokenView(visible(t.text, t.bytes), t.id, f"{prob_class(t.prob)} {gltr_class(t.rank)}",
                     [f"{t.prob:.4f}", f"{t.logprob:.4f}", str(t.rank), f"{t.entropy:.3f}"],
                     [[(visible(a.text, a.bytes), f"{a.prob:.4f}") for a in t.top]], notable=-t.logprob,
                     newline=bytes.fromhex(t.bytes).endswith(b"\n"), mark=mark)


def tree_document(tree) -> Document:
    """A loaded tree (run/tree.py Tree), or a Run of kind tree (its notebook display)."""
    if not hasattr(tree, "branches"):
        from llamalens.run.tree import load_tree

        tree = load_tree(tree.store, tree.id)
    info = tree.info
    doc = Document(f"llamalens tree {info.id}: {len(tree.branches)} branch(es)", fields=["p", "logprob", "rank", "entropy"],
                   alt_titles=["top alternatives"])
    doc.add(KeyValues([("model", model_line(info.model)), ("status", info.status), ("prompt", visible(tree.prompt[-300:]))]))
    rows, strips = [], []
    for i, b in sorted(tree.branches.items()):
        path = tree.path(i)
        lps = [t.logprob for t in path]
        forced = visible("".join(t.text for t in b.forced))
        rows.append([i, "" if b.parent is None else f"{b.parent} @ {b.at}", forced, len(path),
                     round(sum(lps), 4), round(sum(lps) / len(lps), 4) if lps else "", b.finish_reason or b.status,
                     b.settings.label()])
        start = 0 if b.at is None else b.at
        strips.append((f"branch {i}", [_view(t, "⑂" if b.parent is not None and k == start else "")
                                       for k, t in enumerate(path)]))
    doc.add(Heading("Branches"))
    doc.add(Table(["branch", "from (branch @ position)", "forced", "tokens", "sequence logprob", "mean logprob",
                   "finish", "settings"], rows))
    doc.add(Heading("The branches' texts"))
    doc.add(Strips("Branches", strips, context=visible(tree.prompt[-300:])))
    return doc


def write_tree_report(store, info, path, fmt, *, write, answer: str | None = None, **_options) -> None:
    """A tree run's report written to `path` (the tree kind's report, run/kinds.py), its branches' confidence
    folded at the end (`answer`: the regex of the answer span)."""
    from llamalens.reports.confidence import folded_confidence
    from llamalens.reports.document import check_writable, report_format
    from llamalens.run.confidence import confidence_table
    from llamalens.run.loaded import load_run
    from llamalens.run.tree import load_tree

    report_format(path, fmt)
    check_writable(path)
    doc = tree_document(load_tree(store, info.id))
    folded_confidence(doc, confidence_table(load_run(store, info.id), answer), answer)
    write(doc, path, fmt)

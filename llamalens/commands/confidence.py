"""How sure the model was of its answers: the confidence table that `show` prints for every run kind, and
`calibrate`, which checks on a labelled set whether those measures mean anything for this model."""

from __future__ import annotations

import click

from llamalens.commands.output import print_table, say

SHOWN_SAMPLES = 30  # confidence rows `show` prints (--json and `export` have every sample)
ANSWER_CHARS = 28

answer_option = click.option(
    "--answer", "answer", default=None, metavar="REGEX",
    help="The confidence measures over the answer span only: the first match of REGEX in each text (its group 1 when "
         "it has one); without it, over the whole text.")


def confidence_rows(store, run_id, answer: str | None):
    """A stored run's confidence table (run/confidence.py), whatever its kind."""
    from llamalens.run.confidence import confidence_table
    from llamalens.run.loaded import load_run

    return confidence_table(load_run(store, run_id), answer)


def confidence_json(store, run_id, answer: str | None) -> dict:
    """What `show --json` adds under "confidence": the span rule and one row per sample."""
    from llamalens.commands.output import records

    return {"answer": answer, "samples": records(confidence_rows(store, run_id, answer))}


def show_answer_confidence(store, run_id, answer: str | None) -> None:
    """Print each sample's confidence (the first SHOWN_SAMPLES), and how its prompt's seeds agree."""
    from llamalens.core.confidence import MEASURES
    from llamalens.visible import visible

    table = confidence_rows(store, run_id, answer)
    if table.empty:
        return
    span = f"the answer span (--answer {visible(answer)!s})" if answer else "the whole text"
    say(f"confidence of each answer, over {span}; 'agree': distinct answers / answers of the same prompt and "
        "configuration, and their lexical-cluster entropy (nats):")
    rows = [("#", "cfg", "seed", "answer", "tokens", *(m.label for m in MEASURES), "distinct", "clusters H")]
    for r in table.head(SHOWN_SAMPLES).itertuples():
        text = "–" if r.answer is None else visible(r.answer.strip(), edge_spaces=False)
        text = text if len(text) <= ANSWER_CHARS else text[: ANSWER_CHARS - 1] + "…"
        rows.append((r.sample_idx, r.config_idx, r.seed, text, r.span_tokens,
                     *(_num(getattr(r, m.name)) for m in MEASURES),
                     f"{round(r.distinct_share * r.answers)}/{r.answers}", _num(r.cluster_entropy)))
    print_table(rows, right={0, 1, 2, 4, *range(5, 5 + len(MEASURES) + 2)})
    if len(table) > SHOWN_SAMPLES:
        say(f"... {len(table) - SHOWN_SAMPLES} more samples: `llamalens show {run_id} --json` or `export` has each")
    say("higher = surer: seq lp, min p, margin, Rényi, FR; lower = surer: ppl, H mean, H max (docs/confidence.md)")


def _num(v) -> str:
    if v != v:
        return "–"
    if abs(v) >= 1000:
        return f"{v:.3g}"
    return f"{v:.4f}" if 0 < abs(v) < 0.01 else f"{v:.3f}"

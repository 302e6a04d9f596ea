"""How sure the model was of its answers: the confidence table that `show` prints for every run kind, and
`calibrate`, which checks on a labelled set whether those measures mean anything for this model."""

from __future__ import annotations

import click

from llamalens.commands.options import GroupedCommand, json_option, pop_model_options, report_option, runtime_options
from llamalens.commands.output import check_report_path, fail_cleanly, json_out, load_model, print_table, say, \
    write_report

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


def show_answer_confidence(store, run_id, answer: str | None, only: set[int] | None = None,
                           rest: str = "samples") -> None:
    """Print each sample's confidence (the first SHOWN_SAMPLES), and how its prompt's seeds agree. `only`: print
    the rows of these sample_idx alone, then how many others (`rest` names them) there are and where each is."""
    from llamalens.core.confidence import MEASURES
    from llamalens.reports.findings import numbers
    from llamalens.run.confidence import alike
    from llamalens.visible import visible

    table = confidence_rows(store, run_id, answer)
    hidden = 0 if only is None else int((~table.sample_idx.isin(sorted(only))).sum())
    if hidden:
        table = table[table.sample_idx.isin(sorted(only))]
    if table.empty:
        return
    span = f"the answer span (--answer {visible(answer)!s})" if answer else "the whole text"
    say(f"confidence of each answer, over {span}; 'agree': distinct answers / answers of the same prompt and "
        "configuration, and their lexical-cluster entropy (nats):")
    groups = alike(table, lambda r: (r.prompt_idx, _answer(r.answer), r.span_tokens, *(_num(getattr(r, m.name)) for m in MEASURES),
                                     f"{round(r.distinct_share * r.answers)}/{r.answers}", _num(r.cluster_entropy)))
    rows = [("n", "cfg", "seed", "answer", "tokens", *(m.label for m in MEASURES), "distinct", "clusters H")]
    for shown, who in groups[:SHOWN_SAMPLES]:
        rows.append((len(who), numbers({c for c, _ in who}), numbers({s for _, s in who}), *shown[1:]))
    print_table(rows, right={0, 4, *range(5, 5 + len(MEASURES) + 2)})
    if len(groups) > SHOWN_SAMPLES:
        say(f"... {len(groups) - SHOWN_SAMPLES} more rows: `llamalens show {run_id} --json` or `export` has each sample")
    if hidden:
        say(f"... and {hidden} {rest}: `llamalens show {run_id} --json`, `export` or `report` has each one's confidence")
    if len(groups) < len(table):
        say("n: samples with this answer and these figures (a greedy chain's seeds, configurations that are one chain)")
    say("higher = surer: seq lp, min p, margin, Rényi, FR; lower = surer: ppl, H mean, H max (docs/confidence.md)")


def _answer(text) -> str:
    from llamalens.visible import visible

    if not isinstance(text, str):  # no match of --answer: None, or nan once the column is in a DataFrame
        return "–"
    text = visible(text.strip(), edge_spaces=False)
    return text if len(text) <= ANSWER_CHARS else text[: ANSWER_CHARS - 1] + "…"


def _num(v) -> str:
    if v != v:
        return "–"
    if abs(v) >= 1000:
        return f"{v:.3g}"
    return f"{v:.4f}" if 0 < abs(v) < 0.01 else f"{v:.3f}"


@click.command(cls=GroupedCommand)
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--model", "-m", "models", multiple=True,
              help="GGUF path or model name; repeat to calibrate several side by side (quantizations) [default: the "
                   "embedded Gemma 3 270M Q4_K_M].")
@answer_option
@click.option("--match", type=click.Choice(["exact", "prefix", "contains", "regex"]), default="contains",
              show_default=True, help="How a generated answer is matched to its reference (a line's own \"match\" "
                                      "wins): normalized text equal, starting with it, containing its words, or a regex.")
@click.option("--max-tokens", "-n", type=click.IntRange(1, 256), default=16, show_default=True,
              help="Most tokens generated per reference question (greedy).")
@click.option("--stop", multiple=True, help="Stop generating an answer at this text (repeat) [default: a newline].")
@click.option("--normalize", type=click.Choice(["none", "token", "byte"]), default="none", show_default=True,
              help="Choice questions: rank options by total logprob, or per token / per byte (as `choose`).")
@click.option("--bins", type=click.IntRange(2, 50), default=10, show_default=True,
              help="Equal-width bins of the reliability diagram and the ECE.")
@click.option("--parallel", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Reference questions generated together.")
@report_option("Also write the report: reliability diagrams, accuracy-vs-coverage curves (FILE.html or FILE.md).")
@json_option
@runtime_options
@fail_cleanly
def calibrate(file, models, answer, match, max_tokens, stop, normalize, bins, parallel, report_path, as_json, **kw):
    """Whether the confidence measures predict correctness, on a labelled set: accuracy, AUROC, ECE, Brier, PRR.

    FILE: JSON lines, {"question", "options": [...], "answer": INDEX or TEXT} (scored as `choose` scores them) or
    {"question", "reference": TEXT or [...]} (generated greedily, then matched). docs/confidence.md has the details.

    \b
    llamalens calibrate examples/calibration.jsonl --report calib.html
    llamalens calibrate qa.jsonl -m model-q8_0.gguf -m model-q4_k_m.gguf --answer '^ *([A-Za-z ]+)' --json
    """
    from contextlib import contextmanager

    from llamalens.looks.calibrate import calibrate as run, model_cells

    check_report_path(report_path)
    options = pop_model_options(kw)

    @contextmanager
    def load(name):
        loaded = load_model(name, options, sequences=parallel, cells=model_cells(max_tokens, parallel))
        try:
            yield loaded
        finally:
            loaded.close()

    res = run(file, models or (None,), load, answer=answer, match=match, max_tokens=max_tokens,
              stop=tuple(stop) or ("\n",), normalize=normalize, bins=bins, parallel=parallel,
              on_model=lambda m: say(f"calibrating {m.info.name} ...", err=True))
    if as_json:
        json_out(res.to_dict())
    else:
        print_calibration(res)
    if report_path:
        from llamalens.reports.confidence import calibration_document

        write_report(calibration_document(res), report_path)


def print_calibration(res) -> None:
    """Per model: accuracy, the best measure, and each measure's figures."""
    from llamalens.looks.calibrate import measure

    for m in res.models:
        name = f"{m.model.get('name')} ({m.model.get('quantization')})"
        for kind in m.kinds():
            best = m.best(kind)
            say(f"{name}, {kind} questions: accuracy {m.accuracy_of(kind):.1%}; best predictor of correctness: "
                + (f"{measure(best.measure).label} (AUROC {best.auroc:.3f})" if best
                   else "none (every answer right, or every one wrong)"))
            rows = [("measure", "n", "AUROC", "PRR", "ECE", "Brier")]
            for f in m.fits:
                if f.kind == kind:
                    rows.append((measure(f.measure).label, f.n, _num(f.auroc), _num(f.prr), _num(f.ece), _num(f.brier)))
            print_table(rows, right={1, 2, 3, 4, 5})
    say(f"ECE over {res.bins} equal-width bins of each measure's implied probability; AUROC 0.5 and PRR 0 = no "
        "signal (docs/confidence.md)")

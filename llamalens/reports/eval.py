"""The report of an eval run (run/evaluation.py): each task's metrics per model, each model's speed and noise
floor, its closest calls (the questions whose best two options are nearest, each option with the tokens that
carried its log-likelihood), and the questions the models answer differently."""

from __future__ import annotations

from llamalens.reports.document import Document, Heading, KeyValues, Para, Table
from llamalens.visible import visible

CLOSEST = 20  # closest calls listed per model
CONTEXT_CHARS = 160  # the end of a question shown


def _tokens(toks) -> str:
    """An option's tokens with their logprobs; a token that was not its row's argmax is marked with *."""
    return " ".join(f"{visible(t.text)}({t.logprob:.2f}{'' if t.top and t.top[0].id == t.id else '*'})" for t in toks)


def _tail(text: str) -> str:
    return visible(("…" + text[-CONTEXT_CHARS:]) if len(text) > CONTEXT_CHARS else text, edge_spaces=False)


def eval_document(run, tokens: dict) -> Document:
    """An EvalRun (run/evaluation.py) and its token records by sample as a report document."""
    n = len(run.models)
    doc = Document(f"llamalens eval (run {run.info.id})")
    spec = run.spec
    doc.add(KeyValues([
        ("tasks", ", ".join(visible(t) for t in spec["tasks"])),
        ("models", "; ".join(f"{k}: {visible(run.model_name(k))} ({visible(str((m.get('info') or {}).get('quantization')))})"
                             for k, m in enumerate(run.models))),
        ("mode", "exact (every request decoded alone)" if spec["exact"] else
         f"batched ({spec['batch_size']} sequences a decode; a few requests a chunk re-scored alone)"),
        ("options", f"limit {spec['limit']}, few-shot {spec['num_fewshot']}, chat template "
                    f"{'on' if spec['apply_chat_template'] else 'off'}, lm-eval {spec.get('lm_eval')}"),
        ("status", run.info.status)]))
    doc.add(Heading("Metrics"))
    doc.add(Table(["task", "metric", *(f"{k}: {visible(run.model_name(k))}" for k in range(n))],
                  [[visible(t), visible(m), *("" if v is None else round(v, 6) for v in vals)]
                   for t, m, vals in run.metrics()]))
    for k in range(n):
        b = run.backend(k)
        floor = b["noise_floor"]
        doc.add(Heading(f"Model {k}: {visible(run.model_name(k))}"))
        doc.add(Para(f"{sum(b['requests'].values())} requests in {b['seconds']:.1f} s. " + (
            f"Noise floor {floor:.4f} nats (the largest batched-vs-alone difference over {b['noise_pairs']} requests "
            f"re-scored alone); {len(b['close_calls'])} question(s) decided by less." if floor is not None
            else "Exact mode: no noise floor.")))
        calls = run.questions(k)[:CLOSEST]
        if calls:
            rows = []
            for c in calls:
                for j, o in enumerate(c.options):
                    rows.append([visible(c.task), c.doc, _tail(c.context) if j == 0 else "",
                                 ("→ " if j == c.chosen else "") + visible(o.continuation or ""), round(o.logprob, 4),
                                 _tokens(tokens.get(o.sample_idx, [])), round(c.margin, 4) if j == 0 else "",
                                 ("yes" if c.below_floor else "no") if j == 0 else ""])
            doc.add(Table(["task", "doc", "question (end)", "option (→ chosen)", "loglikelihood",
                           "tokens (logprob; * not the argmax)", "margin", "below noise floor"], rows,
                          f"The {len(calls)} closest calls: the questions whose best two options are nearest.",
                          sortable=False))
    if n > 1:
        dis = run.disagreements()
        doc.add(Heading("Where the models disagree"))
        doc.add(Para(f"{len(dis)} question(s) answered differently."))
        if dis:
            doc.add(Table(["task", "doc", "question (end)", *(f"{k}: chosen (margin)" for k in range(n))],
                          [[visible(d["task"]), d["doc"], _tail(d["context"]),
                            *(f"{visible(d['options'][c])} ({m:.3f})" for c, m in zip(d["chosen"], d["margins"]))]
                           for d in dis]))
    return doc


def write_eval_report(store, info, path, fmt, *, write, **_options) -> None:
    """An eval run's report written to `path` (the eval kind's report, run/kinds.py)."""
    from llamalens.reports.document import check_writable, report_format
    from llamalens.run.evaluation import load_eval

    report_format(path, fmt)
    check_writable(path)
    write(eval_document(load_eval(store, info.id), store.tokens_by_sample(info.id)), path, fmt)


def eval_run_document(run) -> Document:
    """A Run of kind eval in a notebook: its report."""
    from llamalens.run.evaluation import load_eval

    return eval_document(load_eval(run.store, run.id), run.store.tokens_by_sample(run.id))

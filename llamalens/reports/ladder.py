"""The report of a compare run (run/ladder.py): the ladder table and chart, then each compared model's full
llama-perplexity statistics and the positions where it drifts most from the base."""

from __future__ import annotations

from llamalens.reports.document import Document, Figure, Heading, KeyValues, Para, Table
from llamalens.reports.texts import model_line
from llamalens.visible import prob_text, visible

GIB = 2**30
FLIPS_LISTED = 50  # flipped answers listed per model


def ladder_figure(ladder):
    """The ladder chart: mean and 99% KLD of each compared model against its file size."""
    from llamalens.reports import plots

    models = [m for m in ladder.by_size() if m.index in ladder.drift]
    stats = [ladder.stats(m.index) for m in models]
    return plots.ladder([visible(m.quantization, edge_spaces=False) for m in models],
                        [m.file_size / GIB for m in models], [s["kld_mean"] for s in stats],
                        [s["kld_p99"] for s in stats], visible(ladder.base.quantization, edge_spaces=False))


def ladder_document(ladder) -> Document:
    from llamalens.looks.kld_stats import statistic_lines

    rows = ladder.table()
    worst_q = rows[0]["quantization"] if rows else "?"
    n = len(ladder.models) - 1
    doc = Document(f"llamalens compare: {n} model{'s' if n != 1 else ''} against "
                   f"{ladder.base.quantization}", fields=[], alt_titles=[])
    doc.add(KeyValues([("base", model_line(ladder.base.info)),
                       ("run", f"{ladder.info.id} ({ladder.info.status})"),
                       ("tokens", ladder.describe_tokens())]))
    for note in ladder.notes:
        doc.add(Para(note, "note"))
    if not ladder.complete:
        doc.add(Para("This comparison is not finished: the figures cover the windows saved so far "
                     f"(`llamalens compare --resume {ladder.info.id}` finishes it).", "warn"))
    if rows:
        _ladder_blocks(doc, ladder, rows, worst_q)
    if ladder.flips is not None:
        flip_blocks(doc, ladder.flips, [m.index for m in ladder.by_size()])
    if ladder.draft:
        draft_blocks(doc, ladder)
    for m in ladder.by_size():
        if m.index not in ladder.drift:
            continue
        doc.add(Heading(f"{visible(m.quantization, edge_spaces=False)}: {visible(m.name, edge_spaces=False)}", 2))
        doc.add(Para(model_line(m.info), "note"))
        doc.add(Table(["statistic", "value"], [list(x) for x in statistic_lines(ladder.stats(m.index))],
                      caption="As llama-perplexity --kl-divergence prints them (Q = this model), from float32 "
                              "logits of both models.", sortable=False))
        doc.add(Table(["position", "token", "KLD", "p base", "p model", "base's top", "model's top"], [
            [ladder.where(p), visible(p["text"], p["bytes"]), p["kld"], prob_text(_p(p["lp_base"])),
             prob_text(_p(p["lp_q"])), _alts(p["top_base"]), _alts(p["top_q"])] for p in ladder.worst(m.index, 10)],
            caption="The positions where this model drifts most from the base."))
    return doc


def _ladder_blocks(doc: Document, ladder, rows: list[dict], worst_q: str) -> None:
    from llamalens.reports import plots

    doc.add(Heading("The ladder"))
    doc.add(Table(["model", "quantization", "size (GiB)", "bits per weight", "PPL", "PPL ratio", "mean KLD",
                   "± KLD", "99% KLD", "max KLD", "RMS Δp", "same top"],
                  [[visible(r["model"], edge_spaces=False), visible(r["quantization"], edge_spaces=False),
                    round(r["file_size"] / GIB, 3), round(r["bpw"], 3), r["ppl"], r["ppl_ratio"], r["kld_mean"],
                    r["kld_error"], r["kld_p99"], r["kld_max"], r["dp_rms"], r["same_top"]] for r in rows],
                  caption="Compared models by file size, smallest first. KLD = KL(A‖B), A the base and B the "
                          "compared model, over the whole vocabulary in nats per token; bits per weight from each file's header; Δp = p(model) − "
                          "p(base) of the actual token; same top = share of tokens where both rank the same token "
                          f"first. The smallest here: {visible(worst_q, edge_spaces=False)}.", sortable=True))
    doc.add(Figure(ladder_figure(ladder), "ladder", "Mean and 99th-percentile KL divergence against file size."))
    doc.add(Figure(plots.histograms({visible(m.quantization, edge_spaces=False) + f" ({m.index})":
                                     ladder.drift[m.index].kld for m in ladder.by_size() if m.index in ladder.drift},
                                    "KL(base‖model) per token (nats)"),
                   "kld_histogram", "Distribution of per-token KL divergence, per model."))


def _p(lp: float) -> float:
    import math

    return math.exp(lp)


def _alts(alts: list) -> str:
    return "  ".join(f"{visible(text, hexb)} {prob_text(_p(lp), 3)}" for _i, text, hexb, lp in alts[:3])


def flip_blocks(doc: Document, flips, order: list[int]) -> None:
    """Answers that change against the base's (looks/flips.py): the share per model, then its flipped answers."""
    doc.add(Heading("Flips: answers that change"))
    doc.add(Para(flips.describe(), "note"))
    doc.add(Table(flips.header(), [[visible(str(c), edge_spaces=False) for c in r] for r in flips.rows(order)],
                  caption="Per compared model (by file size): greedy answers that differ from the base's, the "
                          "median generated token where they first differ, multiple-choice picks that flip, and "
                          "the accuracy where the questions give the right answer.", sortable=False))
    for k in order:
        details = [d for i in range(len(flips.questions)) if (d := flips.detail(k, i)) and d["flipped"]]
        if not details:
            continue
        m = flips.models[k]
        rows = []
        for d in details[:FLIPS_LISTED]:
            q = flips.questions[d["question"]]
            if q.options:
                rows.append([d["question"], visible(q.prompt), visible(d["base_pick"]), visible(d["pick"]), ""])
            else:
                rows.append([d["question"], visible(q.prompt), visible(d["base_text"]), visible(d["text"]),
                             f"{d['at']}: {_token(d['base_token'])} → {_token(d['token'])}"])
        doc.add(Table(["#", "prompt", "base's answer", "this model's answer", "first differs at"], rows,
                      caption=f"{visible(str(m.get('quantization')), edge_spaces=False)} "
                              f"({visible(str(m.get('name')), edge_spaces=False)}): the answers that flip"
                              + (f" (the first {FLIPS_LISTED} of {len(details)})" if len(details) > FLIPS_LISTED
                                 else "") + "."))


def draft_blocks(doc: Document, ladder) -> None:
    """The compared models as drafts for the base (looks/draft.py): acceptance and tokens per round."""
    from llamalens.looks.draft import DRAFT_LENGTHS

    doc.add(Heading("Draft models: expected acceptance"))
    doc.add(Para("α = Σ min(p_target, p_draft) over the vocabulary, per token (the base is the target): the chance "
                 "that speculative sampling accepts a token the draft sampled. Accepted drafts per round of γ: iid = "
                 "α(1−α^γ)/(1−α) with the mean α (positions assumed independent); along the text = the mean over "
                 "start positions of Σ_i Π_j α (the text taken as what the target would generate); greedy = "
                 "llama-speculative's rounds with --temp 0 replayed on the text (exact on the target's own greedy "
                 "output).", "note"))
    for m in ladder.by_size():
        if m.index not in ladder.drift:
            continue
        d = ladder.draft_stats(m.index)
        doc.add(Table(["draft length", "accepted / round (iid)", "along the text", "greedy accept rate",
                       "greedy tokens / round"],
                      [[g, r["iid_accepted"], r["text_accepted"], r["greedy_accept_rate"], r["greedy_tokens_per_round"]]
                       for g, r in zip(DRAFT_LENGTHS, d["rounds"])],
                      caption=f"{visible(m.name, edge_spaces=False)} as a draft: mean α {d['accept_mean']:.4f} ± "
                              f"{d['accept_error']:.4f}, median {d['accept_median']:.4f}, 10% {d['accept_p10']:.4f}; "
                              f"greedy acceptance (the draft's top token is the text's) {d['greedy_accept']:.4f}.",
                      sortable=False))


def _token(t) -> str:
    return "[end]" if t is None else visible(t)


def ladder_run_document(run) -> Document:
    """A Run of kind compare (its notebook display)."""
    from llamalens.run.ladder import load_ladder

    return ladder_document(load_ladder(run.store, run.id))


def write_ladder_report(store, info, path, fmt, *, write, **_options) -> None:
    """A compare run's report written to `path` (the compare kind's report, run/kinds.py)."""
    from llamalens.reports.document import check_writable, report_format
    from llamalens.run.ladder import load_ladder

    report_format(path, fmt)
    check_writable(path)
    write(ladder_document(load_ladder(store, info.id)), path, fmt)

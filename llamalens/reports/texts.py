"""Reports of one-shot analyses: a scored text, a model comparison, embeddings, and `next`'s sampler
view, plus the pieces the run report shares with them (model line, sampler blocks).

Each builder takes the analysis's typed result and returns a Document; nothing here writes markup.
"""

from __future__ import annotations

import math

import numpy as np

from llamalens.modelfiles.find import ModelInfo
from llamalens.visible import label, prob_text, visible
from llamalens.reports.document import MAX_STRIP_TOKENS, Document, Figure, Folded, Heading, KeyValues, Para, Strips, Table, TokenView, \
    gltr_class, kld_class, kld_scale, prob_class


def plain(v):
    """numpy / pandas scalars to plain Python for the renderers."""
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    return v


def next_document(view, model: dict, chat=None) -> Document:
    """`llamalens next` with sampler settings: the raw next-token distribution and each chain's result."""
    doc = Document(f"llamalens next: {len(view.chains)} sampler settings", fields=[], alt_titles=[])
    doc.add(KeyValues([("model", model_line(model)), ("prompt", view.prompt),
                       ("entropy", f"{view.entropy:.4f} nats (raw distribution)")]))
    if chat:
        chat_blocks(doc, [chat])
    doc.add(Para("The raw top tokens after the prompt, and the same tokens' probabilities after each sampler chain "
                 f"({chain_stages_text(view)}): temperature rescales the logits before the softmax, the "
                 "truncating samplers remove tokens and the rest are renormalised.", "note"))
    sampler_blocks(doc, view)
    return doc


def chat_blocks(doc: Document, chats: list) -> None:
    """The rendered chat prompts, as the model reads them: special tokens in ⟦ ⟧, and where the reply starts."""
    doc.add(Heading("Chat prompt" + ("s" if len(chats) > 1 else ""), 3))
    doc.add(Para("Each conversation rendered with its chat template, token by token as the model reads it: special "
                 "tokens in ⟦ ⟧, ⏎ a newline. The assistant's reply starts at ▶reply; everything analysed here is "
                 "in the reply.", "note"))
    for w in dict.fromkeys(c.warning() for c in chats if c.warning()):
        doc.add(Para(w[0].upper() + w[1:], "warn"))
    doc.add(Table(["#", "template", "messages", "tokens", "prompt as the model reads it"],
                  [[i, c.template, len(c.messages), c.n_tokens, visible(c.shown, edge_spaces=False) + " \u25b6reply"]
                   for i, c in enumerate(chats)], sortable=False))


def model_line(m: ModelInfo | dict, with_path: bool = True) -> str:
    """One line naming a model: display name, architecture, size, quantization, vocabulary (and its file)."""
    m = m if isinstance(m, ModelInfo) else ModelInfo.from_dict(m)
    line = visible(f"{m.display_name or m.name} ({m.architecture}, {m.size_label} parameters, {m.quantization}, "
                   f"vocabulary {m.vocab_size or 0:,})", edge_spaces=False)
    return f"{line} — {visible(m.path, edge_spaces=False)}" if with_path else line


def _limited(items: list, what: str, doc: Document) -> list:
    if len(items) > MAX_STRIP_TOKENS:
        doc.add(Para(f"The text view shows the first {MAX_STRIP_TOKENS:,} of {len(items):,} {what}; --json has all.",
                     "warn"))
        return items[:MAX_STRIP_TOKENS]
    return items


def score_document(res, chat=None) -> Document:
    """A scored text: totals, surprise along the text, the text coloured by probability / GLTR rank."""
    from llamalens.reports import plots

    doc = Document(f"llamalens score: perplexity {res.perplexity:.3f}", fields=["p", "logprob", "rank", "entropy"],
                   alt_titles=["top alternatives"])
    tot = res.totals()
    doc.add(KeyValues([
        ("model", model_line(res.model)),
        ("protocol", f"{res.protocol}, ctx {res.ctx}" + (f", stride {res.stride}" if res.stride else "")
         + f", {res.windows} window(s)"),
        ("tokens", f"{tot['tokens']:,} in the text, {tot['scored']:,} scored, {tot['unscored']:,} not scored"),
        ("mean NLL", f"{tot['mean_nll']:.5f} nats per token"),
        ("perplexity", f"{tot['perplexity']:.4f} ± {tot['perplexity_error']:.4f}"),
        ("bits per byte", f"{tot['bits_per_byte']:.5f} (over {tot['scored_bytes']:,} bytes)"),
        ("speed", f"{tot['tokens_per_s']:.0f} tokens/s"),
    ]))
    for note in res.notes:
        doc.add(Para(note, "note"))
    if chat:
        chat_blocks(doc, [chat])
    doc.add(Heading("Surprise along the text"))
    doc.add(Figure(plots.series([-t.logprob for t in res.tokens], "surprise (nats)"), "surprise",
                   "Negative logprob of each scored token."))
    doc.add(Figure(plots.histogram([t.rank for t in res.tokens], "rank of the actual token", log_x=True), "ranks",
                   "How often the actual token was the model's 1st, 10th, 100th... choice (GLTR's view)."))
    doc.add(Heading("The text"))
    views = [TokenView(visible(t.text, t.bytes), t.id, f"{prob_class(t.prob)} {gltr_class(t.rank)}",
                       [prob_text(t.prob), f"{t.logprob:.4f}", str(t.rank), f"{t.entropy:.3f}"],
                       [[(visible(a.text, a.bytes), prob_text(a.prob)) for a in t.top]], notable=-t.logprob,
                       newline=bytes.fromhex(t.bytes).endswith(b"\n"), plain=visible(t.text, t.bytes, edge_spaces=False))
             for t in _limited(res.tokens, "scored tokens", doc)]
    doc.add(Strips("Scored tokens", [("text", views)]))
    return doc


def compare_document(cmp) -> Document:
    """Two models on the same tokens: llama-perplexity-style statistics, KLD along the text, the text by KLD."""
    from llamalens.reports import plots

    s = cmp.summary()
    doc = Document(f"llamalens compare: mean KLD {s['kld_mean']:.5f}", fields=["KLD", "p A", "p B", "Δp", "same top"],
                   alt_titles=["model A's top", "model B's top"],
                   modes=[("kld", "KL divergence"), ("prob", "p under B"), ("same", "same top?")],
                   kld_scale=kld_scale([p.kld for p in cmp.positions]))
    doc.add(KeyValues([("model A (reference)", model_line(cmp.model_a)), ("model B", model_line(cmp.model_b)),
                       ("tokens", f"{s['tokens']:,} ({cmp.source}, protocol {cmp.protocol}, ctx {cmp.ctx})"),
                       ("time", f"{cmp.seconds:.1f} s")]))
    for note in cmp.notes:
        doc.add(Para(note, "note"))
    doc.add(Heading("Summary"))
    doc.add(Table(["statistic", "value"], [
        ["PPL(A)", s["ppl_a"]], ["PPL(B)", s["ppl_b"]], ["PPL(B)/PPL(A)", s["ppl_ratio"]],
        ["ln(PPL(B)/PPL(A))", s["ln_ppl_ratio"]], ["mean KLD", s["kld_mean"]], ["KLD standard error", s["kld_error"]],
        ["median KLD", s["kld_median"]], ["KLD 90%", s["kld_p90"]], ["KLD 95%", s["kld_p95"]], ["KLD 99%", s["kld_p99"]],
        ["KLD 99.9%", s["kld_p99_9"]], ["max KLD", s["kld_max"]], ["mean Δp (B − A)", s["dp_mean"]],
        ["RMS Δp", s["dp_rms"]], ["Δp 1%", s["dp_p1"]], ["Δp 5%", s["dp_p5"]], ["median Δp", s["dp_median"]],
        ["Δp 95%", s["dp_p95"]], ["Δp 99%", s["dp_p99"]], ["same top token", s["same_top"]],
    ], caption="KLD = KL(A‖B) over the whole vocabulary, nats per token; Δp = p_B − p_A of the actual token.",
        sortable=False))
    doc.add(Heading("Along the text"))
    doc.add(Figure(plots.series([p.kld for p in cmp.positions], "KL(A‖B) (nats)", log=True), "kld_series",
                   "Per-token KL divergence."))
    doc.add(Figure(plots.histogram([p.kld for p in cmp.positions], "KL(A‖B) per token (nats)", log_x=True),
                   "kld_histogram", "Distribution of per-token KL divergence."))
    doc.add(Heading(f"The {min(20, len(cmp.positions))} positions where the models disagree most"))
    doc.add(Table(["position", "sample", "token", "KLD", "p A", "p B", "top A", "top B"], [
        [p.position, "" if p.sample is None else p.sample, visible(p.text, p.bytes), p.kld, p.p_a, p.p_b,
         "  ".join(f"{visible(a.text, a.bytes)} {prob_text(a.prob, 3)}" for a in p.top_a[:3]),
         "  ".join(f"{visible(a.text, a.bytes)} {prob_text(a.prob, 3)}" for a in p.top_b[:3])] for p in cmp.worst(20)]))
    doc.add(Heading("The text by divergence"))
    by_sample: dict = {}
    for p in _limited(cmp.positions, "compared tokens", doc):
        by_sample.setdefault(p.sample, []).append(p)
    rows = []
    for sample, ps in by_sample.items():
        views = [TokenView(visible(p.text, p.bytes), p.id,
                           f"{kld_class(p.kld, doc.kld_scale)} {prob_class(p.p_b)} {'st1' if p.same_top else 'st0'}",
                           [f"{p.kld:.6f}", prob_text(p.p_a), prob_text(p.p_b), f"{p.dp:+.4f}",
                            "yes" if p.same_top else "no"],
                           [[(visible(a.text, a.bytes), prob_text(a.prob)) for a in p.top_a],
                            [(visible(a.text, a.bytes), prob_text(a.prob)) for a in p.top_b]],
                           notable=p.kld, newline=bytes.fromhex(p.bytes).endswith(b"\n"),
                           plain=visible(p.text, p.bytes, edge_spaces=False)) for p in ps]
        rows.append(("text" if sample is None else f"sample #{sample}", views))
    doc.add(Strips("Tokens coloured by KL divergence", rows))
    return doc


def embed_document(es, query: str | None = None, ranking=None, categories: list[str] | None = None,
                   projection=None) -> Document:
    """Embeddings of some texts: the cosine matrix as a heatmap (grouped by category when there are
    categories), how the categories hold together, the 2-D map (embed_map.embedding_map's DataFrame),
    nearest neighbours, most similar pairs."""
    from llamalens.reports import plots

    cos = es.cosine()
    doc = Document(f"llamalens embed: {len(es.texts)} texts", fields=[], alt_titles=[])
    made = Folded("How this was made: model, pooling, vectors")  # the set-up last, folded: results first
    made.add(KeyValues([
        ("model", model_line(es.model)),
        ("pooling", es.pooling),
        ("vectors", f"{len(es.texts)} × {es.vectors.shape[1]} (float32), in {es.seconds:.2f} s, "
                    + ("one text per decode" if es.parallel == 1 else
                       f"up to {es.parallel} texts per decode (vectors carry llama.cpp's batch noise)")),
    ] + ([("categories", f"{len(set(categories))}")] if categories else [])))
    for note in es.notes:
        doc.add(Para(note, "warn"))
    labels = [f"{i + 1}. {label(t, 28)}" for i, t in enumerate(es.texts)]
    if query is not None and ranking is not None:
        doc.add(Heading("Ranked by similarity to the query"))
        doc.add(Para(f"Query: {query}"))
        doc.add(Table(["rank", "cosine", "#", "text"],
                      [[r, f"{s:.4f}", k + 1, es.texts[k]] for r, (k, s) in enumerate(ranking, 1)]))
    if 1 < len(es.texts) <= 60:
        doc.add(Heading("Cosine similarity"))
        if categories:
            from llamalens.looks.embed_map import category_order

            order = category_order(categories)
            doc.add(Figure(plots.similarity(cos[np.ix_(order, order)], [labels[i] for i in order],
                                            [categories[i] for i in order]), "similarity",
                           "Cosine similarity of each pair of texts, grouped by category (outlined blocks on the "
                           "diagonal; numbers are the texts' order in the input). Bright blocks mean the model puts "
                           "a category's texts together. The colour scale spans the off-diagonal values."))
        else:
            doc.add(Figure(plots.similarity(cos, labels), "similarity",
                           "Cosine similarity of each pair of texts (colour scale spans the off-diagonal values)."))
    if categories and len(es.texts) > 1:
        _category_blocks(doc, es, categories)
    if projection is not None:
        _map_blocks(doc, projection)
    if len(es.texts) > 1:
        doc.add(Heading("Nearest neighbours"))
        doc.add(Table(["#", "text", "tokens", "nearest", "cosine"],
                      [[i + 1, t, n, f"{j + 1}. {es.texts[j]}", f"{c:.4f}"]
                       for i, (t, n, (j, c)) in enumerate(zip(es.texts, es.n_tokens, es.nearest()))]))
        doc.add(Heading("Most similar pairs"))
        doc.add(Table(["cosine", "text", "text"],
                      [[f"{c:.4f}", f"{i + 1}. {es.texts[i]}", f"{j + 1}. {es.texts[j]}"] for i, j, c in es.pairs(50)]))
    doc.add(made)
    return doc


def _category_blocks(doc: Document, es, categories: list[str]) -> None:
    from llamalens.looks.embed_map import category_summary

    summary = category_summary(es, categories)
    doc.add(Heading("Categories"))
    doc.add(Table(["category", "texts", "mean cosine within", "mean cosine to the others", "nearest neighbour inside",
                   "by chance"],
                  [[r.category, plain(r.texts), plain(r.within), plain(r.between), plain(r.nearest_inside),
                    round(float(r.chance), 2)] for r in summary.itertuples()],
                  caption="Within: over the category's pairs. Nearest neighbour inside: its texts whose most similar "
                          "other text is in the same category; by chance: what a random neighbour would give."))
    inside, chance = int(summary.nearest_inside.sum()), float(summary.chance.sum())
    doc.add(Para(f"{inside} of {len(es.texts)} texts have their nearest neighbour in their own category "
                 f"(chance: {chance:.1f})."))


def _map_blocks(doc: Document, frame) -> None:
    from llamalens.reports import plots

    method = frame.attrs.get("method", "pca")
    cats = list(frame.category) if frame.category.notna().all() else None
    labels = [label(t, 24) for t in frame.term]
    if method == "tsne":
        title = "Map (t-SNE)"
        axes = ("t-SNE 1", "t-SNE 2")
        caption = (f"t-SNE of the unit vectors (scikit-learn, perplexity {frame.attrs['perplexity']:g}, seed "
                   f"{frame.attrs['seed']}): near points are similar texts; distances between clusters and the axes "
                   "mean little.")
    else:
        ev = frame.attrs.get("explained") or [float("nan")] * 2
        title = "Map (PCA)"
        axes = (f"PC1 ({ev[0]:.1%} of the variance)", f"PC2 ({ev[1]:.1%})")
        caption = (f"The unit vectors on their first two principal components, which explain {ev[0]:.1%} and "
                   f"{ev[1]:.1%} of their variance.")
    doc.add(Heading(title))
    doc.add(Figure(plots.embedding_map(frame.x, frame.y, labels, cats, *axes), f"map_{method}", caption))
    doc.add(Table(["#", "text", "category", "x", "y"],
                  [[i + 1, r.term, r.category or "", float(r.x), float(r.y)]
                   for i, r in enumerate(frame.itertuples())]))


def chain_stages_text(view) -> str:
    """The chains' stages for a paragraph: create_completion's fixed order, or each llama.cpp order shown."""
    orders = []
    for c in view.chains:
        names = " → ".join(s.stage for s in c.stages[1:])
        if names and names not in orders:
            orders.append(names)
    if all(c.settings.get("chain", "llama-cpp-python") == "llama-cpp-python" for c in view.chains):
        return "penalties → top_k → typical_p → top_p → min_p → temperature"
    return "; ".join(orders) if len(orders) <= 2 else "each chain's stages in its order, as the table below lists them"


def _tok(t: dict) -> str:
    return visible(t["text"], t["bytes"])


def effect_text(stage: str, e: dict) -> str:
    """One line saying what a stage did at the position (distribution.stage_effect)."""
    if stage in ("logit_bias", "penalties", "dry"):
        if not e["moved"]:
            return "moved no logit" + (" (no repeat long enough)" if stage == "dry" else "")
        shown = ", ".join(f"{_tok(t)} " + ("banned" if t["banned"] else f"{t['delta']:+.3f}") for t in e["tokens"])
        more = f" (the first {len(e['tokens'])} shown)" if e["moved"] > len(e["tokens"]) else ""
        verb = "penalised" if stage != "logit_bias" else "moved"
        return f"{verb} {e['moved']} token{'s' if e['moved'] != 1 else ''}{more}, logit change: {shown}"
    if stage == "xtc":
        if not e["fired"]:
            return f"did not fire: {e['why']}"
        shown = ", ".join(f"{_tok(t)} (p {t['p']:.3f})" for t in e["removed"])
        return (f"fired: removed {e['n_removed']} of the {e['above']} tokens at or above p {e['threshold']:g} (it "
                f"keeps the least likely of them): {shown}")
    if stage == "mirostat":
        cut = (f"kept the {e['kept']:,} tokens whose surprise −log₂ p is at most μ" if e["version"] == 2 else
               f"kept the top k = {e['kept']:,} (k from μ and the estimated Zipf exponent)")
        mu = f"μ = {e['mu']:.4f} bits (τ {e['tau']:g}, η {e['eta']:g}); " if e["mu"] is not None else ""
        return f"mirostat {e['version']}: {mu}{cut}" + (f"; μ {e['why']}" if e["why"] else "")
    return ""


def effect_rows(view) -> list[list[str]]:
    """[configuration, stage, what it did] for each stage that acted on its own at the view's position (the
    penalties only when they moved a logit: create_completion's chain always has them; XTC not when it is off)."""
    return [[c.label, s.stage, effect_text(s.stage, s.effect)] for c in view.chains for s in c.stages
            if s.effect is not None and (s.stage != "penalties" or s.effect["moved"])
            and not (s.stage == "xtc" and (s.effect["why"] or "").startswith("off"))]


def sampler_blocks(doc: Document, view) -> None:
    """A SamplerView as a figure (raw vs after each chain) and tables (stages, what the stateful stages did at
    this position, final probabilities)."""
    from llamalens.reports import plots

    labels = [visible(a.text, a.bytes) for a in view.top]
    doc.add(Figure(plots.sampler_stages(labels, [math.exp(a.logprob) for a in view.top],
                                        [(c.label, c.final.probs, c.final.survivors) for c in view.chains]),
                   "sampler_view", "Grey: raw probability. Colour: probability after the configuration's whole chain."))
    rows = []
    for c in view.chains:
        rows.append([c.label] + [f"{s.stage}: {s.survivors:,}" for s in c.stages[1:]])
    width = max(len(r) for r in rows)
    doc.add(Table(["configuration"] + [f"stage {i}" for i in range(1, width)], rows, sortable=False,
                  caption="Candidates left after each stage of the chain (greedy keeps only the argmax)."))
    acts = effect_rows(view)
    if acts:
        doc.add(Table(["configuration", "stage", "what it did at this position"], acts, sortable=False,
                      caption="The stages that act on their own, at this position: the logits that logit bias, the "
                              "penalties and DRY moved (after − before), whether XTC fired and what it removed, "
                              "mirostat's μ and its cut. Each chain has first been fed the prompt and the tokens "
                              "generated before this position, as in generation."))
    head = ["token", "raw p"] + [c.label for c in view.chains]
    trows = [[lab, math.exp(a.logprob)] + [c.final.probs[i] for c in view.chains]
             for i, (lab, a) in enumerate(zip(labels, view.top))]
    doc.add(Table(head, trows, caption="Probability of each raw top token after each configuration's chain "
                                       "(0 = filtered out)."))

"""Report builders: collect a run's (or a scored text's, or a comparison's) data into a report.Document.

    run_document(store, run)  1 header  2 summary table + heatmaps  3 token strips per prompt
                              4 per-position plots  5 seeds  6 sampler view  7 timing
    text_document(...)        a scored text or a model comparison: totals, plots, one coloured strip

Everything numeric comes from analysis.py (pure functions over the store) or from the records;
nothing here writes markup. The sampler view needs the model (one prefill); without it the section
says why it is missing.
"""

from __future__ import annotations

import datetime
import math

import numpy as np

from . import analysis as A
from .display import visible
from .records import TokenRecord
from .report import (MAX_PLOT_PROMPTS, MAX_SAMPLER_CHAINS, MAX_STRIP_TOKENS, Document, Figure, Heading, KeyValues,
                     Para, Strips, Table, TokenView, fmt, gltr_class, prob_class)
from .store import Store

HEATMAP_METRICS = ("mean_logprob", "mean_entropy", "mean_candidates", "distinct_completions")
METRICS = HEATMAP_METRICS + ("perplexity", "distinct_2", "mean_rank", "tokens_per_s")
TOKEN_FIELDS = ["p", "logprob", "rank", "entropy", "candidates", "p sampled"]


def token_view(t: TokenRecord, mark: str = "") -> TokenView:
    raw = bytes.fromhex(t.bytes)
    text = visible(t.text, t.bytes) + (" [end]" if t.eog else "")
    return TokenView(
        text=text, id=t.id, classes=f"{prob_class(t.prob)} {gltr_class(t.rank)}",
        values=[f"{t.prob:.4f}", f"{t.logprob:.4f}", str(t.rank), f"{t.entropy:.3f}", f"{t.candidates:,}",
                f"{math.exp(t.sampled_logprob):.4f}"],
        alts=[[(visible(a.text, a.bytes), f"{a.prob:.4f}") for a in t.top]],
        notable=1.0 - t.prob, newline=raw.endswith(b"\n"), mark=mark)


def _when(ts) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "–"


def run_document(store: Store, run_id, model=None, position: int = 0, sample_idx: int | None = None,
                 metric: str = "mean_logprob") -> Document:
    from .errors import InvalidInput

    info = store.run(run_id)
    rid = info.id
    samples = store.samples(rid)
    if not samples:
        raise InvalidInput(f"run {rid} has no finished samples yet; nothing to report "
                           f"(resume it with `llamalens sweep --resume {rid}`)")
    if metric not in METRICS:
        raise InvalidInput(f"unknown metric {metric!r}; choose one of: {', '.join(METRICS)}")
    configs = store.configs(rid)
    tokens = A.token_table(store, rid)
    stable = A.sample_table(store, rid)
    summ = A.summary(tokens, stable, configs)
    by_sample: dict[int, list[TokenRecord]] = {}
    for idx, t in store.tokens(rid):
        by_sample.setdefault(idx, []).append(t)
    labels = {int(r.config_idx): r.label for r in summ.itertuples()}
    varying = A.varying_axes(configs)
    m = info.model
    doc = Document(f"llamalens run {rid}" + (f" ({info.name})" if info.name else ""), fields=TOKEN_FIELDS,
                   alt_titles=["top alternatives (raw distribution)"])

    # 1. header -----------------------------------------------------------------------------------
    if info.status != "done" or info.n_done < info.n_samples:
        doc.add(Para(f"This run is {info.status}: {info.n_done} of {info.n_samples} samples are finished, and this "
                     f"report shows only those. Finish it with `llamalens sweep --resume {rid}`.", "warn"))
    n_tok = int(len(tokens))
    done_at = [s["completed"] for s in samples if s.get("completed")]
    end = info.finished or (max(done_at) if done_at else None)
    dur = (end - info.created) if end else float("nan")
    opts = info.options
    fixed = {k: v for k, v in configs[0].items() if k not in varying and k != "seed"}
    hw = info.hardware
    doc.add(KeyValues([
        ("model", f"{m.get('display_name') or m.get('name')} ({m.get('architecture')}, {m.get('size_label')} parameters, "
                  f"{m.get('quantization')}, vocabulary {m.get('vocab_size') or '?':,})"),
        ("model file", f"{m.get('path')} ({(m.get('file_size') or 0) / 2**20:,.1f} MiB, sha256 {info.model_hash[:16]})"),
        ("versions", ", ".join(f"{k} {v}" for k, v in info.versions.items())),
        ("hardware", f"{hw.get('threads')} threads, {hw.get('gpu_layers')} GPU layers, flash attention "
                     f"{hw.get('flash_attn')}, {hw.get('machine')} {hw.get('system')}; "
                     f"{opts.get('parallel')} sequences per batch{' (exact mode)' if opts.get('exact') else ''}"),
        ("prompts", f"{info.n_prompts}"),
        ("grid", (", ".join(f"{a} ∈ {{{', '.join(fmt(v) for v in sorted({c[a] for c in configs}))}}}" for a in varying)
                  or "one configuration") + f"; {info.n_configs} configurations × seeds {opts.get('seeds')}"),
        ("fixed settings", ", ".join(f"{k}={fmt(v)}" for k, v in fixed.items())),
        ("generation", f"up to {opts.get('max_tokens')} tokens, {opts.get('n_logprobs')} alternatives kept per token"
                       + (f", stop at {opts.get('stop')}" if opts.get("stop") else "")),
        ("started / finished", f"{_when(info.created)} / {_when(info.finished)}"),
        ("duration", f"{dur:.1f} s for {len(samples)} samples, {n_tok:,} tokens: "
                     f"{n_tok / dur if dur > 0 else float('nan'):.1f} tokens/s overall"),
        ("command", info.command or "–"),
    ]))
    nf = info.noise
    if nf and nf.get("tokens"):
        doc.add(Para(f"Noise floor: re-decoding {nf['tokens']} tokens of {nf['samples']} samples one at a time moved "
                     f"logprobs by {nf['mean_abs_dlogprob']:.4f} nats on average (max {nf['max_abs_dlogprob']:.4f}); "
                     f"top-1 agreement {nf['top1_agreement']:.1%}. Differences in mean logprob smaller than "
                     f"{nf['max_abs_dlogprob']:.4f} between configurations are within batching noise.", "note"))
    prompts = sorted({(s["prompt_idx"], s["prompt"]) for s in samples})
    doc.add(Table(["#", "prompt"], [[p, visible(t, edge_spaces=False)] for p, t in prompts], sortable=False))

    # 2. summary + heatmaps --------------------------------------------------------------------------
    doc.add(Heading("Summary per configuration"))
    cols = ["config_idx", "label", "samples", "tokens", "mean_logprob", "perplexity", "mean_entropy", "mean_candidates",
            "distinct_completions", "distinct_2", "mean_rank", "tokens_per_s"]
    doc.add(Table(["#", "configuration", "samples", "tokens", "mean logprob", "perplexity", "entropy", "candidates",
                   "distinct", "distinct-2", "mean rank", "tok/s"],
                  [[_py(r[c]) for c in cols] for _, r in summ.iterrows()],
                  caption="Means over generated tokens (end-of-generation tokens excluded); "
                          "'distinct' = distinct completions per prompt across seeds."))
    if varying and len(summ) > 1:
        x, y, panel = varying[0], (varying[1] if len(varying) > 1 else None), varying[2:]
        shown = [metric] + [mm for mm in HEATMAP_METRICS if mm != metric]
        from . import plots

        for mm in shown[:3]:
            doc.add(Figure(plots.heatmaps(summ, mm, x, y, panel), f"heatmap_{mm}",
                           f"{mm.replace('_', ' ')} over {x}" + (f" × {y}" if y else "")
                           + (f", one panel per {', '.join(panel)}" if panel else "")))

    # 3. token strips per prompt ----------------------------------------------------------------------
    doc.add(Heading("Token views"))
    doc.add(Para("Each token is coloured by the probability the model gave it (green = sure, red = unsure) or by its "
                 "rank among all tokens (GLTR). Hover or focus a token for its top alternatives, rank, entropy and "
                 "candidate-set size. A red bar marks the first token where a sample differs from the first sample of its "
                 "prompt.", "note"))
    by_prompt: dict[int, list[dict]] = {}
    for s in samples:
        by_prompt.setdefault(s["prompt_idx"], []).append(s)
    budget = MAX_STRIP_TOKENS
    left_out = 0
    for p_idx, group in sorted(by_prompt.items()):
        group.sort(key=lambda s: (s["config_idx"], s["seed"]))
        ref = [t.id for t in by_sample.get(group[0]["sample_idx"], [])]
        rows = []
        for s in group:
            toks = by_sample.get(s["sample_idx"], [])
            if budget - len(toks) < 0:
                left_out += 1
                continue
            budget -= len(toks)
            ids = [t.id for t in toks]
            div = A.first_divergence(ref, ids) if rows else None
            views = [token_view(t, mark=f"differs from the first sample from token {t.position}"
                                if div is not None and t.position == div else "") for t in toks]
            label = f"#{s['sample_idx']} · {labels.get(s['config_idx'], s['config_idx'])} · seed {s['seed']} · " \
                    f"{s['finish_reason']}" + (f" · differs at {div}" if div is not None else "")
            rows.append((label, views))
        if rows:
            doc.add(Strips(f"Prompt {p_idx}", rows, context=visible(group[0]["prompt"], edge_spaces=False)))
    if left_out:
        doc.add(Para(f"{left_out} samples are not shown as token views (report limit {MAX_STRIP_TOKENS:,} tokens); "
                     f"`llamalens export {rid} --format jsonl` has every token.", "warn"))

    # 4. per-position plots -----------------------------------------------------------------------------
    doc.add(Heading("Along the sequence"))
    from . import plots

    for p_idx, _ in prompts[:MAX_PLOT_PROMPTS]:
        curves = A.position_curves(tokens, p_idx)
        data = {f"#{ci} {labels.get(ci, ci)}": {"prob": c["prob"].to_numpy(), "entropy": c["entropy"].to_numpy(),
                                                "candidates": c["candidates"].to_numpy()}
                for ci, c in sorted(curves.items())}
        doc.add(Figure(plots.positions(data), f"positions_prompt{p_idx}",
                       f"Prompt {p_idx}: probability of the chosen token, entropy and candidate-set size at each "
                       f"position (mean over seeds), one series per configuration."))
    if len(prompts) > MAX_PLOT_PROMPTS:
        doc.add(Para(f"Plots of prompts {MAX_PLOT_PROMPTS}..{len(prompts) - 1} are left out.", "note"))

    # 5. seeds ------------------------------------------------------------------------------------------
    doc.add(Heading("Seeds"))
    rows = []
    for p_idx, group in sorted(by_prompt.items()):
        by_cfg: dict[int, list] = {}
        for s in group:
            by_cfg.setdefault(s["config_idx"], []).append([t.id for t in by_sample.get(s["sample_idx"], [])])
        for ci, seqs in sorted(by_cfg.items()):
            distinct, splits = A.seed_splits(seqs)
            rows.append([p_idx, ci, labels.get(ci, ""), len(seqs), distinct,
                         ", ".join(map(str, splits[:12])) + (" …" if len(splits) > 12 else "") or "never"])
    doc.add(Table(["prompt", "#", "configuration", "seeds", "distinct completions", "split at token"], rows,
                  caption="Where the completions of one configuration split: positions where the seeds first drew "
                          "different tokens."))

    # 6. sampler view -------------------------------------------------------------------------------------
    doc.add(Heading("How the samplers reshape the distribution"))
    _sampler_section(doc, store, rid, samples, by_sample, configs, model, position, sample_idx)

    # 7. timing -------------------------------------------------------------------------------------------
    doc.add(Heading("Timing"))
    rows = []
    for ci, g in stable.groupby("config_idx"):
        rows.append([int(ci), labels.get(int(ci), ""), len(g), _py(g.first_token_ms.mean()),
                     _py(g.first_token_ms.median()), _py(g.tokens_per_s.mean())])
    doc.add(Table(["#", "configuration", "samples", "first token ms (mean)", "first token ms (median)",
                   "tokens/s per sequence"], rows,
                  caption="Time to first token counts from when the sample got a batch slot (prefill or prompt copy "
                          "included). Sequences share each decode call, so per-sequence tokens/s is lower than the "
                          "run's overall rate in the header."))
    return doc


def _sampler_section(doc, store, rid, samples, by_sample, configs, model, position, sample_idx):
    from .errors import InvalidInput
    from .settings import SamplingSettings
    from .views import sampler_view

    if sample_idx is None:
        pick = samples[0]
    else:
        pick = next((s for s in samples if s["sample_idx"] == sample_idx), None)
        if pick is None:
            raise InvalidInput(f"--sample {sample_idx}: run {rid} has no finished sample {sample_idx}")
    toks = by_sample.get(pick["sample_idx"], [])
    if position < 0 or position > len(toks):
        raise InvalidInput(f"--position {position}: sample {pick['sample_idx']} has {len(toks)} tokens; "
                           f"choose 0..{len(toks)}")
    if model is None:
        doc.add(Para("Left out: this view needs the model's logits, and the model was not loaded (its file is "
                     "missing, or --no-model was given); pass --model PATH to `llamalens report`.", "warn"))
        return
    cfgs = [SamplingSettings.from_dict(c) for c in configs]
    seen, distinct = set(), []
    for c in cfgs:  # seeds do not change the reshaping
        key = c.label().rsplit(" seed=", 1)[0]
        if key not in seen:
            seen.add(key)
            distinct.append(c)
    view = sampler_view(model, pick["prompt"], [t.id for t in toks[:position]], distinct[:MAX_SAMPLER_CHAINS])
    history = "".join(visible(t.text, t.bytes, edge_spaces=False) for t in toks[:position])
    doc.add(Para(f"Position {position} of sample #{pick['sample_idx']} (prompt {pick['prompt_idx']}"
                 + (f", after the generated text “{history}”" if history else ", the first generated token")
                 + f"): the raw top-{len(view.top)} next tokens (entropy {view.entropy:.3f} nats) and what each "
                 "configuration's sampler chain (penalties → top_k → typical_p → top_p → min_p → temperature) makes "
                 "of the same logits. Pick another with `llamalens report --position N --sample IDX`.", "note"))
    _sampler_blocks(doc, view)
    if len(configs) > MAX_SAMPLER_CHAINS:
        doc.add(Para(f"Only the first {MAX_SAMPLER_CHAINS} distinct configurations are shown.", "note"))


def _sampler_blocks(doc: Document, view) -> None:
    """A SamplerView as a figure (raw vs after each chain) and two tables (stages, final probabilities)."""
    from . import plots

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
    head = ["token", "raw p"] + [c.label for c in view.chains]
    trows = [[lab, math.exp(a.logprob)] + [c.final.probs[i] for c in view.chains]
             for i, (lab, a) in enumerate(zip(labels, view.top))]
    doc.add(Table(head, trows, caption="Probability of each raw top token after each configuration's chain "
                                       "(0 = filtered out)."))


def next_document(view, model: dict) -> Document:
    """`llamalens next` with sampler settings: the raw next-token distribution and each chain's result."""
    doc = Document(f"llamalens next: {len(view.chains)} sampler settings", fields=[], alt_titles=[])
    doc.add(KeyValues([("model", _model_line(model)), ("prompt", view.prompt),
                       ("entropy", f"{view.entropy:.4f} nats (raw distribution)")]))
    doc.add(Para("The raw top tokens after the prompt, and the same tokens' probabilities after each sampler chain "
                 "(top_k → top_p → min_p → temperature): temperature rescales the logits before the softmax, the "
                 "truncating samplers remove tokens and the rest are renormalised.", "note"))
    _sampler_blocks(doc, view)
    return doc


def _py(v):
    """numpy / pandas scalars to plain Python for the renderers."""
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    return v


# -- scored texts and model comparisons ------------------------------------------------------------------
def _model_line(m: dict) -> str:
    return (f"{m.get('display_name') or m.get('name')} ({m.get('architecture')}, {m.get('size_label')}, "
            f"{m.get('quantization')}, vocabulary {m.get('vocab_size') or 0:,}) — {m.get('path')}")


def _limited(items: list, what: str, doc: Document) -> list:
    if len(items) > MAX_STRIP_TOKENS:
        doc.add(Para(f"The text view shows the first {MAX_STRIP_TOKENS:,} of {len(items):,} {what}; --json has all.",
                     "warn"))
        return items[:MAX_STRIP_TOKENS]
    return items


def score_document(res) -> Document:
    """A scored text: totals, surprise along the text, the text coloured by probability / GLTR rank."""
    from . import plots

    doc = Document(f"llamalens score: perplexity {res.perplexity:.3f}", fields=["p", "logprob", "rank", "entropy"],
                   alt_titles=["top alternatives"])
    tot = res.totals()
    doc.add(KeyValues([
        ("model", _model_line(res.model)),
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
    doc.add(Heading("Surprise along the text"))
    doc.add(Figure(plots.series([-t.logprob for t in res.tokens], "surprise (nats)"), "surprise",
                   "Negative logprob of each scored token."))
    doc.add(Figure(plots.histogram([t.rank for t in res.tokens], "rank of the actual token", log_x=True), "ranks",
                   "How often the actual token was the model's 1st, 10th, 100th... choice (GLTR's view)."))
    doc.add(Heading("The text"))
    views = [TokenView(visible(t.text, t.bytes), t.id, f"{prob_class(t.prob)} {gltr_class(t.rank)}",
                       [f"{t.prob:.4f}", f"{t.logprob:.4f}", str(t.rank), f"{t.entropy:.3f}"],
                       [[(visible(a.text, a.bytes), f"{a.prob:.4f}") for a in t.top]], notable=-t.logprob,
                       newline=bytes.fromhex(t.bytes).endswith(b"\n"))
             for t in _limited(res.tokens, "scored tokens", doc)]
    doc.add(Strips("Scored tokens", [("text", views)]))
    return doc


def compare_document(cmp) -> Document:
    """Two models on the same tokens: llama-perplexity-style statistics, KLD along the text, the text by KLD."""
    from . import plots
    from .report import kld_class

    s = cmp.summary()
    doc = Document(f"llamalens compare: mean KLD {s['kld_mean']:.5f}", fields=["KLD", "p A", "p B", "Δp", "same top"],
                   alt_titles=["model A's top", "model B's top"],
                   modes=[("kld", "KL divergence"), ("prob", "p under B"), ("same", "same top?")])
    doc.add(KeyValues([("model A (reference)", _model_line(cmp.model_a)), ("model B", _model_line(cmp.model_b)),
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
         "  ".join(f"{visible(a.text, a.bytes)} {a.prob:.3f}" for a in p.top_a[:3]),
         "  ".join(f"{visible(a.text, a.bytes)} {a.prob:.3f}" for a in p.top_b[:3])] for p in cmp.worst(20)]))
    doc.add(Heading("The text by divergence"))
    by_sample: dict = {}
    for p in _limited(cmp.positions, "compared tokens", doc):
        by_sample.setdefault(p.sample, []).append(p)
    rows = []
    for sample, ps in by_sample.items():
        views = [TokenView(visible(p.text, p.bytes), p.id,
                           f"{kld_class(p.kld)} {prob_class(p.p_b)} {'st1' if p.same_top else 'st0'}",
                           [f"{p.kld:.6f}", f"{p.p_a:.4f}", f"{p.p_b:.4f}", f"{p.dp:+.4f}", "yes" if p.same_top else "no"],
                           [[(visible(a.text, a.bytes), f"{a.prob:.4f}") for a in p.top_a],
                            [(visible(a.text, a.bytes), f"{a.prob:.4f}") for a in p.top_b]],
                           notable=p.kld, newline=bytes.fromhex(p.bytes).endswith(b"\n")) for p in ps]
        rows.append(("text" if sample is None else f"sample #{sample}", views))
    doc.add(Strips("Tokens coloured by KL divergence", rows))
    return doc


def embed_document(es, query: str | None = None, ranking=None) -> Document:
    """Embeddings of some texts: the cosine matrix as a heatmap, nearest neighbours, most similar pairs."""
    from . import plots
    from .display import label

    cos = es.cosine()
    doc = Document(f"llamalens embed: {len(es.texts)} texts", fields=[], alt_titles=[])
    doc.add(KeyValues([
        ("model", _model_line(es.model)),
        ("pooling", es.pooling),
        ("vectors", f"{len(es.texts)} × {es.vectors.shape[1]} (float32), in {es.seconds:.2f} s, "
                    + ("one text per decode" if es.parallel == 1 else
                       f"up to {es.parallel} texts per decode (vectors carry llama.cpp's batch noise)")),
    ]))
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
        doc.add(Figure(plots.similarity(cos, labels), "similarity",
                       "Cosine similarity of each pair of texts (colour scale spans the off-diagonal values)."))
    if len(es.texts) > 1:
        doc.add(Heading("Nearest neighbours"))
        doc.add(Table(["#", "text", "tokens", "nearest", "cosine"],
                      [[i + 1, t, n, f"{j + 1}. {es.texts[j]}", f"{c:.4f}"]
                       for i, (t, n, (j, c)) in enumerate(zip(es.texts, es.n_tokens, es.nearest()))]))
        doc.add(Heading("Most similar pairs"))
        doc.add(Table(["cosine", "text", "text"],
                      [[f"{c:.4f}", f"{i + 1}. {es.texts[i]}", f"{j + 1}. {es.texts[j]}"] for i, j, c in es.pairs(50)]))
    return doc

"""The report of a sweep run: one small builder per section, all fed by one LoadedRun.

    load_run(store, id) ──► RunReport(run, model, position, sample_idx, metric)
        findings    what the run shows, in sentences (run/findings.py computes it; reports/findings.py words it)
        texts       each prompt's distinct texts once, with the configurations and seeds behind each
        summary     one row per distinct chain (equivalent configurations grouped)
        strips      each distinct text's tokens, coloured, with tooltips; first divergence marked
        heatmaps    each figure over the grid axes along which it moves
        positions   p(chosen), entropy, candidates along the sequence, per distinct chain
        seeds       distinct completions and where the seeds split
        samplers    how each distinct chain reshapes one raw distribution (needs the model)
        timing      time to first token, tokens/s
        made        folded: model, versions, hardware, build, grid, duration, command, noise floor, prompts
    ──► Document (reports/document.py renders it)

Everything numeric comes from run/loaded.py, run/findings.py or the records; nothing here writes markup.
The sampler section needs the model (one prefill); without it the section says why it is missing.
"""

from __future__ import annotations

import datetime
import math

from llamalens.run import loaded as analysis
from llamalens.run.findings import findings, moving_axes
from llamalens.run.loaded import LoadedRun, load_run
from llamalens.run.sweep_records import SweepExtra
from llamalens.errors import InvalidInput
from llamalens.records import StoredSample, TokenRecord
from llamalens.visible import prob_text, size_text, visible
from llamalens.reports.document import (MAX_PLOT_PROMPTS, MAX_SAMPLER_CHAINS, MAX_STRIP_TOKENS, Document, Figure, Folded,
                                        Heading, KeyValues, Para, Strips, Table, TokenView, fmt, gltr_class, prob_class)
from llamalens.reports.findings import Names, findings_blocks, numbers, produced_by, texts_blocks
from llamalens.reports.texts import chain_stages_text, chat_blocks, model_line, plain, sampler_blocks

HEATMAP_METRICS = ("mean_logprob", "mean_entropy", "mean_candidates", "distinct_completions")
METRICS = HEATMAP_METRICS + ("perplexity", "distinct_2", "mean_rank", "tokens_per_s")
TOKEN_FIELDS = ["p", "logprob", "rank", "entropy", "candidates", "p sampled", "blocked (no-repeat-ngram)"]


def check_request(info, metric: str) -> None:
    """Whether a run's report can be made (it has finished samples, the metric exists): before any work."""
    if info.n_done == 0:
        raise InvalidInput(f"run {info.id} has no finished samples yet; nothing to report "
                           f"(resume it with `llamalens sweep --resume {info.id}`)")
    if metric not in METRICS:
        raise InvalidInput(f"unknown metric {metric!r}; choose one of: {', '.join(METRICS)}")


def token_view(t: TokenRecord, mark: str = "", survivors: bool = False) -> TokenView:
    """A token for a strip: in prose its real text, in the tooltip its visible form and figures. `survivors`:
    the chain keeps the raw top `candidates` tokens (no penalty, grammar or llama.cpp stage reorders or drops
    them), so each alternative is marked by whether it survived."""
    end = " [end]" if t.eog else ""
    kept = [("✓ kept" if i < t.candidates else "cut") if survivors else "" for i in range(len(t.top))]
    return TokenView(
        text=visible(t.text, t.bytes) + end, id=t.id, classes=f"{prob_class(t.prob)} {gltr_class(t.rank)}",
        values=[prob_text(t.prob), f"{t.logprob:.4f}", str(t.rank), f"{t.entropy:.3f}", f"{t.candidates:,}",
                prob_text(math.exp(t.sampled_logprob)), " ".join(str(i) for i in t.blocked) or "–"],
        alts=[[(visible(a.text, a.bytes), prob_text(a.prob), k) for a, k in zip(t.top, kept)]],
        notable=1.0 - t.prob, newline=bytes.fromhex(t.bytes).endswith(b"\n"), mark=mark,
        plain=visible(t.text, t.bytes, edge_spaces=False) + end)


def keeps_raw_top(cfg, grammar: bool) -> bool:
    """Whether a configuration's candidates are the raw distribution's top ones: top-k, top-p and min-p keep a
    prefix of the sorted tokens; a penalty, a grammar, typical-p (it keeps the tokens nearest the entropy) or a
    llama.cpp stage such as XTC (it removes top tokens) need not."""
    return (not grammar and cfg.chain == "llama-cpp-python" and cfg.typical_p == 1.0 and cfg.repeat_penalty == 1.0
            and not cfg.frequency_penalty and not cfg.presence_penalty and cfg.strategy == "sample"
            and not cfg.no_repeat_ngram)


def describe_noise(nf: dict | None, compared: str | None = "configurations' mean logprobs") -> str | None:
    """The noise floor in words, exactly as far as it goes (show and the report print this); None where nothing
    was measured (an --exact run, or nothing batched).

    Two claims, tested on every sample of batched runs against their --exact twins: a configuration's mean
    logprob moves by less than the recorded max |Δ logprob| (so differences between `compared` below it are
    noise; None for a run with nothing to compare, such as a fork), and a single token's logprob moves by more
    than the recorded 95th percentile about 1 time in 20. The max is no bound for single tokens: a few move by
    more than the re-decoded sample showed. Where batching moved nothing, the sentence says so and no more. Figures
    taken from an earlier run (run/noise.py's reuse) name it.
    """
    if not nf or not nf.get("tokens"):
        return None
    what = f"re-decoding {nf['tokens']} tokens of {nf['samples']} samples one at a time"
    label = "noise floor"
    if nf.get("reused_from") is not None:  # run/noise.py: an earlier run's, the same in all but its seeds
        label = (f"noise floor (measured by run {nf['reused_from']}: the same model file, llama.cpp build, options, "
                 "prompts and settings; only the seeds differ)")
    top = nf["max_abs_dlogprob"]
    if top == 0:
        return f"{label}: {what} gave the same logprobs: batching moved none here"
    head = f"{label}: {what} moved their logprobs by {nf['mean_abs_dlogprob']:.4f} nats on average"
    p95 = nf.get("p95_abs_dlogprob")
    spread = f", 95th percentile {p95:.4f}" if p95 is not None else ""
    tokens = (f"a single token's logprob moves by more than {p95:.4f} about 1 time in 20, and can move by more "
              f"than {top:.4f}") if p95 is not None else ""
    means = f"Differences between {compared} below {top:.4f} are within batching noise" if compared else ""
    claims = "; ".join(c for c in (means, tokens) if c)
    claims = claims[0].upper() + claims[1:] + f" (estimated from {nf['tokens']} tokens)" if claims else ""
    return f"{head}{spread}, max {top:.4f}; top-1 agreement {nf['top1_agreement']:.1%}" + (f". {claims}" if claims else "")


def resume_note(info) -> str:
    """What a resumed run's numbers can be trusted for (show and the report say the same)."""
    times = f"{info.resumes} time{'s' if info.resumes != 1 else ''}"
    if info.options.exact:
        return (f"This run was resumed {times}. It is an --exact run (one sequence at a time), so every sample equals "
                "the one an uninterrupted run would have made.")
    return (f"This run was resumed {times}. Samples decoded in batches after a resume equal an uninterrupted run's "
            "only when the interruption fell on a batch boundary (then the same tokens, logprobs within ~1e-4 nats: "
            "the resumed context lays out its KV cache anew); otherwise their batches were composed differently, "
            "logprobs move within the noise floor and a sampled token can differ. --exact runs are identical always.")


def _when(ts) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "–"


def run_document(run: LoadedRun, model=None, position: int = 0, sample_idx: int | None = None,
                 metric: str = "mean_logprob", answer: str | None = None) -> Document:
    """The whole report of a run (`model`: a loaded Model for the sampler section, or None; `answer`: the regex of
    the answer span its confidence section measures)."""
    check_request(run.info, metric)
    report = RunReport(run, model, position, sample_idx, metric)
    report.answer = answer
    return report.document()


class RunReport:
    """Builds each section of a run's report into one Document."""

    def __init__(self, run: LoadedRun, model, position: int, sample_idx: int | None, metric: str):
        self.run, self.model, self.position, self.sample_idx, self.metric = run, model, position, sample_idx, metric
        self.answer: str | None = None
        self.labels = run.labels()
        self.by_prompt: dict[int, list[StoredSample]] = {}
        for s in sorted(run.samples, key=lambda s: (s.prompt_idx, s.config_idx, s.seed)):
            self.by_prompt.setdefault(s.prompt_idx, []).append(s)
        self.prompts = sorted({(s.prompt_idx, s.prompt) for s in run.samples})
        info = run.info
        name = f" ({visible(info.name, edge_spaces=False)})" if info.name else ""
        self.found = findings(run)
        self.names = Names(run, self.found)
        self.doc = Document(f"llamalens run {info.id}{name}", fields=TOKEN_FIELDS,
                            alt_titles=["top alternatives (raw distribution; kept: survived the sampler chain)"])

    def document(self) -> Document:
        for section in (self.status, self.findings, self.texts, self.confidence, self.summary, self.grammar, self.strategies,
                        self.strips,
                        self.heatmaps, self.positions, self.seeds, self.samplers, self.timing, self.header):
            section()
        return self.doc

    def status(self) -> None:
        info = self.run.info
        if info.status != "done" or info.n_done < info.n_samples:
            self.doc.add(Para(f"This run is {info.status}: {info.n_done} of {info.n_samples} samples are finished, and "
                              f"this report shows only those. Finish it with `llamalens sweep --resume {info.id}`.",
                              "warn"))

    def findings(self) -> None:
        findings_blocks(self.doc, self.run, self.found, self.names)

    def texts(self) -> None:
        texts_blocks(self.doc, self.run, self.found, self.names)

    def confidence(self) -> None:
        from llamalens.reports.confidence import confidence_blocks
        from llamalens.run.confidence import confidence_table

        confidence_blocks(self.doc, confidence_table(self.run, self.answer), self.answer)

    def ids(self, s: StoredSample) -> list[int]:
        return [t.id for t in self.run.by_sample.get(s.sample_idx, [])]

    # -- last: how this was made, folded ------------------------------------------------------------------
    def header(self) -> None:
        run = self.run
        info, opts, hw, m = run.info, run.info.options, run.info.hardware, run.info.model
        doc = Folded("How this was made: model, settings, build, command, noise floor, prompts")
        self.doc.add(doc)
        n_tok = int(len(run.tokens))
        done_at = [s.completed for s in run.samples if s.completed]
        end = info.finished or (max(done_at) if done_at else None)
        dur = (end - info.created) if end else float("nan")
        # every setting that differs (strategies, llama.cpp's samplers too), so none is shown as fixed
        varying = analysis.varying_axes(run.configs, analysis.SETTINGS)
        fixed = {k: v for k, v in run.configs[0].to_dict().items() if k not in varying and k != "seed"}
        grid = ", ".join(f"{a} ∈ {{{', '.join(fmt(v) for v in sorted({getattr(c, a) for c in run.configs}))}}}"
                         for a in varying) or "one configuration"
        doc.add(KeyValues([
            ("model", model_line(m, with_path=False)),
            ("model file", f"{visible(m.path, edge_spaces=False)} ({size_text(m.file_size)}, sha256 {info.model_hash[:16]})"),
            ("versions", ", ".join(f"{k} {v}" for k, v in info.versions.items())),
            ("hardware", f"{hw.threads} threads, {hw.gpu_layers} GPU layers, flash attention {hw.flash_attn}, "
                         f"{hw.machine} {hw.system}; {opts.parallel} sequences per batch"
                         f"{' (exact mode)' if opts.exact else ''}"),
            ("context options", context_options(opts.model_options)),
            ("llama.cpp build", (hw.llama_cpp_system_info or "–")
             + (f"; built with {hw.cmake_args}" if hw.cmake_args else "")),
            ("prompts", f"{info.n_prompts}"),
            ("grid", f"{grid}; {info.n_configs} configurations × seeds {list(opts.seeds)}"),
            ("fixed settings", ", ".join(f"{k}={fmt(v)}" for k, v in fixed.items())),
            ("generation", f"up to {opts.max_tokens} tokens, {opts.n_logprobs} alternatives kept per token"
                           + (f", stop at {list(opts.stop)}" if opts.stop else "")),
            ("started / finished", f"{_when(info.created)} / {_when(info.finished)}"),
            ("duration", f"{dur:.1f} s for {len(run.samples)} samples, {n_tok:,} tokens: "
                         f"{n_tok / dur if dur > 0 else float('nan'):.1f} tokens/s overall"),
            ("command", visible(info.command, edge_spaces=False) if info.command else "–"),
        ]))
        if info.resumes:
            doc.add(Para(resume_note(info), "note"))
        noise = describe_noise(info.noise)
        if noise:
            doc.add(Para(noise[0].upper() + noise[1:], "note"))
        doc.add(Table(["#", "prompt"], [[p, visible(t, edge_spaces=False)] for p, t in self.prompts], sortable=False))
        if opts.chats:
            from llamalens.core.chat import ChatPrompt

            chat_blocks(doc, [ChatPrompt(**dict(c, messages=tuple(c["messages"]))) for c in opts.chats])

    # -- 2. summary + heatmaps -------------------------------------------------------------------------
    def summary(self) -> None:
        doc, summ = self.doc, self.run.summary
        doc.add(Heading("Summary per distinct chain"))
        cols = ["mean_logprob", "perplexity", "mean_entropy", "mean_candidates", "distinct_completions", "distinct_2",
                "mean_rank", "tokens_per_s"]
        by = {int(r["config_idx"]): r for _, r in summ.iterrows()}
        rows = []
        for g in self.found.groups:
            members = [by[c] for c in g.configs if c in by]
            if not members:
                continue
            r = members[0]  # the group's records are the same decode: its figures are its first member's
            rows.append([numbers(g.configs, nobreak=True), self.names.group_row(g), sum(int(m["samples"]) for m in members),
                         sum(int(m["tokens"]) for m in members)] + [plain(r[c]) for c in cols])
        doc.add(Table(["#", "configuration", "samples", "tokens", "mean logprob", "perplexity", "entropy", "candidates",
                       "distinct", "distinct-2 across seeds", "mean rank", "tok/s"], rows,
                      caption="Means over generated tokens (end-of-generation tokens excluded); 'distinct' = distinct "
                              "completions per prompt across seeds; 'distinct-2 across seeds' = distinct bigrams over "
                              "all of a configuration's samples. Configurations that are one chain on this run (one "
                              "candidate at every token, the same tokens for every prompt and seed) share a row."))

    # -- 3b. heatmaps over the grid, after the texts ------------------------------------------------------
    def heatmaps(self) -> None:
        doc, summ = self.doc, self.run.summary
        if len(summ) < 2 or analysis.varying_axes(self.run.configs, analysis.STRATEGY_COLUMNS):
            return  # strategies ignore some settings: a heatmap over those would mix them; see the next section
        from llamalens.reports import plots

        grid_axes = analysis.varying_axes(self.run.configs)
        shown = [self.metric] + [mm for mm in HEATMAP_METRICS if mm != self.metric]
        drawn = 0
        for mm in shown:
            moving = set(moving_axes(self.run, self.found.axes, mm))
            axes = [a for a in grid_axes if a in moving]  # only the axes along which this figure moves
            if not axes or drawn == 3:
                continue
            if not drawn:
                doc.add(Heading("Over the grid"))
            drawn += 1
            x, y, panel = axes[0], (axes[1] if len(axes) > 1 else None), axes[2:]
            doc.add(Figure(plots.heatmaps(summ, mm, x, y, panel), f"heatmap_{mm}",
                           f"{mm.replace('_', ' ')} over {x}" + (f" × {y}" if y else "")
                           + (f", one panel per {', '.join(panel)}" if panel else "")
                           + _fixed_note(grid_axes, axes)))

    # -- 2b. where a grammar fought the model -----------------------------------------------------------
    def grammar(self) -> None:
        from llamalens.core.grammar import fight

        spec = self.run.info.options.grammar
        f = fight(self.run.samples, self.run.by_sample, k=15) if spec else None
        if f is None:
            return
        doc = self.doc
        doc.add(Heading("Where the constraint fought the model"))
        doc.add(Para(f"Every sample was constrained by {visible(spec['source'], edge_spaces=False)}. At each token, "
                     "'removed' is the share of the raw probability (softmax of the logits, before any sampler) on "
                     f"tokens the grammar forbade: {f.mean:.1%} on average over {f.tokens:,} tokens.", "note"))
        doc.add(Table(["#", "configuration", "mean removed"],
                      [[c, self.labels[c], f"{m:.2%}"] for c, m in f.mean_by_config.items()]))
        doc.add(Table(["sample", "configuration", "position", "token", "removed"],
                      [[s, c, pos, visible(text, hx), f"{r:.2%}"] for s, c, pos, text, hx, r in f.worst],
                      caption="The positions where the grammar removed the most."))
        doc.add(Table(["grammar (GBNF)"], [[visible(spec["gbnf"], edge_spaces=False)]], sortable=False))

    # -- 2b. decoding strategies side by side -------------------------------------------------
    def strategies(self) -> None:
        run, doc = self.run, self.doc
        if not run.strategies:
            return
        from llamalens.reports import plots

        doc.add(Heading("Decoding strategies side by side"))
        doc.add(Table([h for _, h in analysis.STRATEGY_TABLE],
                      [[plain(r[c]) for c, _ in analysis.STRATEGY_TABLE] for _, r in run.summary.iterrows()],
                      caption="Means over each configuration's samples. seq logprob: sum of the raw logprobs of a "
                              "sample's tokens; distinct-1/2: distinct unigrams/bigrams of one sample over all of "
                              "them; rep-4: share of its 4-grams that repeat an earlier one. Beam search finds "
                              "likelier (higher seq logprob) but more repetitive text; sampling less likely, more "
                              "varied."))
        st = run.samples_table
        points = {f"#{ci} {self.labels.get(int(ci), ci)}": (g.distinct_2.tolist(), g.seq_logprob.tolist())
                  for ci, g in st.groupby("config_idx")}
        doc.add(Figure(plots.strategy_scatter(points, "distinct-2 (within the sample)", "sequence logprob (nats)"),
                       "strategy_scatter", "Every sample's sequence logprob against its distinct-2, one colour per "
                       "configuration: up is likelier, right is less repetitive."))
        self._beams()
        self._best_of()

    def _beams(self) -> None:
        rows, prune, seen = [], [], set()
        for s in self.run.samples:
            x = SweepExtra.from_dict(s.extra).beam
            key = (s.prompt_idx, s.config_idx)
            if x is None or key in seen:
                continue
            seen.add(key)
            name = f"#{s.sample_idx} · {self.labels.get(s.config_idx, s.config_idx)}"
            for rank, h in enumerate(x.hypotheses, 1):
                rows.append([name, s.prompt_idx, rank, plain(h.score), plain(h.sum_logprob), h.length, h.finish, h.step,
                             visible(h.text, edge_spaces=False)])
            dropped = [(st.step, len(st.dropped)) for st in x.steps if st.dropped]
            finished = sum(len(st.finished) for st in x.steps)
            prune.append([name, s.prompt_idx, len(x.steps), x.decode_calls, x.scored_tokens,
                          sum(n for _, n in dropped), ", ".join(f"{t}:{n}" for t, n in dropped[:16])
                          + (" …" if len(dropped) > 16 else "") or "never", finished,
                          sum(st.blocked for st in x.steps)])
        if not rows:
            return
        self.doc.add(Table(["sample", "prompt", "rank", "score", "sum logprob", "length", "finish", "step", "text"],
                           rows, caption="Beam search: every returned hypothesis, best first. score = sum logprob / "
                                         "length^length_penalty (length: generated tokens before the end token). "
                                         "Seeds of one beam configuration share one search."))
        self.doc.add(Table(["sample", "prompt", "steps", "decode calls", "beam tokens scored", "beams pruned",
                            "pruned at step:count", "hypotheses finished", "tokens blocked"], prune,
                           caption="Where the beams pruned each other: at each step a beam none of whose "
                                   "continuations ranked among the best is dropped, and its KV sequence goes to "
                                   "another beam's fork."))

    def _best_of(self) -> None:
        rows = []
        for s in self.run.samples:
            x = SweepExtra.from_dict(s.extra).best_of
            if x is None:
                continue
            d = x.draws[x.winner]
            rows.append([s.sample_idx, self.labels.get(s.config_idx, s.config_idx), s.seed, len(x.draws), x.by,
                         x.winner, plain(d.seq_logprob), plain(d.mean_logprob), x.winner_rank_by_other,
                         visible(d.text, edge_spaces=False)])
        if rows:
            self.doc.add(Table(["sample", "configuration", "seed", "draws", "ranked by", "winning draw",
                                "seq logprob", "mean logprob", "its rank by the other", "text"], rows,
                               caption="Best-of-N: the draw with the best sequence (or mean) logprob is the sample; "
                                       "'its rank by the other' is where the winner ranks under the other criterion."))

    # -- 3. token strips per prompt --------------------------------------------------------------------
    def strips(self) -> None:
        doc = self.doc
        doc.add(Heading("Token views"))
        doc.add(Para("Each distinct text once, with how many samples produced it. Each token is coloured by the "
                     "probability the model gave it (green = sure, red = unsure) or by its rank among all tokens (GLTR). "
                     "Hover or focus a token for its top alternatives, rank, entropy and candidate-set size; click it "
                     "to pin that pop-up. A red bar marks the first token where a text differs from the first text of "
                     "its prompt.", "note"))
        budget, left_out = MAX_STRIP_TOKENS, 0
        by_idx = {s.sample_idx: s for s in self.run.samples}
        grammar = bool(self.run.info.options.grammar)
        for p_idx, group in self.by_prompt.items():
            ref, rows = None, []
            for t in (t for t in self.found.texts if t.prompt_idx == p_idx):
                first = by_idx[t.samples[0][0]]
                toks = self.run.by_sample.get(first.sample_idx, [])
                if budget - len(toks) < 0:
                    left_out += len(t.samples)
                    continue
                budget -= len(toks)
                div = analysis.first_divergence(ref, list(t.ids)) if ref is not None else None
                ref = list(t.ids) if ref is None else ref
                keeps = keeps_raw_top(self.run.configs[first.config_idx], grammar)
                views = [token_view(tk, mark=f"differs from the first text from token {tk.position}"
                                    if div is not None and tk.position == div else "", survivors=keeps) for tk in toks]
                label = (f"#{first.sample_idx} · ×{len(t.samples)} · {produced_by(self.names, t.samples)} · "
                         f"{first.finish_reason}" + (f" · differs at {div}" if div is not None else ""))
                rows.append((label, views))
            if rows:
                doc.add(Strips(f"Prompt {p_idx}", rows, context=visible(group[0].prompt, edge_spaces=False)))
        if left_out:
            doc.add(Para(f"{left_out} samples are not shown as token views (report limit {MAX_STRIP_TOKENS:,} tokens); "
                         f"`llamalens export {self.run.id} --format jsonl` has every token.", "warn"))

    # -- 4. per-position plots ---------------------------------------------------------------------------
    def positions(self) -> None:
        from llamalens.reports import plots

        doc = self.doc
        doc.add(Heading("Along the sequence"))
        reps = {g.configs[0]: self.names.group(g) for g in self.found.groups}
        for p_idx, _ in self.prompts[:MAX_PLOT_PROMPTS]:
            curves = analysis.position_curves(self.run.tokens, p_idx)
            data = {f"#{ci} {reps[ci]}": {"prob": c["prob"].to_numpy(), "entropy": c["entropy"].to_numpy(),
                                          "candidates": c["candidates"].to_numpy()}
                    for ci, c in sorted(curves.items()) if ci in reps}
            doc.add(Figure(plots.positions(data), f"positions_prompt{p_idx}",
                           f"Prompt {p_idx}: probability of the chosen token, entropy and candidate-set size at each "
                           f"position (mean over seeds), one series per distinct chain."))
        if len(self.prompts) > MAX_PLOT_PROMPTS:
            doc.add(Para(f"Plots of prompts {MAX_PLOT_PROMPTS}..{len(self.prompts) - 1} are left out.", "note"))

    # -- 5. seeds ----------------------------------------------------------------------------------------
    def seeds(self) -> None:
        self.doc.add(Heading("Seeds"))
        rows = []
        for p_idx, group in self.by_prompt.items():
            for g in self.found.groups:
                seqs = [self.ids(s) for s in group if s.config_idx in g.configs]
                if not seqs:
                    continue
                distinct, splits = analysis.seed_splits(seqs)
                rows.append([p_idx, numbers(g.configs, nobreak=True), self.names.group(g), len(seqs), distinct,
                             ", ".join(map(str, splits[:12])) + (" …" if len(splits) > 12 else "") or "never"])
        self.doc.add(Table(["prompt", "#", "configuration", "samples", "distinct completions", "split at token"], rows,
                           caption="Where the completions of one chain split: positions where its samples (its seeds, "
                                   "and its equivalent configurations) first drew different tokens."))

    # -- 6. sampler view -----------------------------------------------------------------------------------
    def samplers(self) -> None:
        from llamalens.looks.next_token import sampler_view

        doc, run = self.doc, self.run
        doc.add(Heading("How the samplers reshape the distribution"))
        if self.sample_idx is None:
            pick = run.samples[0]
        else:
            pick = next((s for s in run.samples if s.sample_idx == self.sample_idx), None)
            if pick is None:
                raise InvalidInput(f"--sample {self.sample_idx}: run {run.id} has no finished sample {self.sample_idx}")
        toks = run.by_sample.get(pick.sample_idx, [])
        position = self.position
        if position < 0 or position > len(toks):
            raise InvalidInput(f"--position {position}: sample {pick.sample_idx} has {len(toks)} tokens; "
                               f"choose 0..{len(toks)}")
        if self.model is None:
            doc.add(Para("Left out: this view needs the model's logits, and the model was not loaded (its file is "
                         "missing, or --no-model was given); pass --model PATH to `llamalens report`.", "warn"))
            return
        distinct, seen = [], set()
        for g in self.found.groups:  # one chain per group; configurations that differ only in seed reshape alike
            ci = g.configs[0]
            if self.labels[ci] not in seen:
                seen.add(self.labels[ci])
                distinct.append(run.configs[ci])
        view = sampler_view(self.model, pick.prompt, [t.id for t in toks[:position]], distinct[:MAX_SAMPLER_CHAINS])
        history = "".join(visible(t.text, t.bytes, edge_spaces=False) for t in toks[:position])
        doc.add(Para(f"Position {position} of sample #{pick.sample_idx} (prompt {pick.prompt_idx}"
                     + (f", after the generated text “{history}”" if history else ", the first generated token")
                     + f"): the raw top-{len(view.top)} next tokens (entropy {view.entropy:.3f} nats) and what each "
                     f"configuration's sampler chain ({chain_stages_text(view)}) makes of the same logits. Pick "
                     "another with `llamalens report --position N --sample IDX`.",
                     "note"))
        sampler_blocks(doc, view)
        if len(distinct) > MAX_SAMPLER_CHAINS:
            doc.add(Para(f"Only the first {MAX_SAMPLER_CHAINS} distinct configurations are shown.", "note"))

    # -- 7. timing -------------------------------------------------------------------------------------------
    def timing(self) -> None:
        self.doc.add(Heading("Timing"))
        rows = []
        for ci, g in self.run.samples_table.groupby("config_idx"):
            rows.append([int(ci), self.labels.get(int(ci), ""), len(g), plain(g.first_token_ms.mean()),
                         plain(g.first_token_ms.median()), plain(g.tokens_per_s.mean())])
        self.doc.add(Table(["#", "configuration", "samples", "first token ms (mean)", "first token ms (median)",
                            "tokens/s per sequence"], rows,
                           caption="Time to first token counts from when the sample got a batch slot (prefill or "
                                   "prompt copy included). Sequences share each decode call, so per-sequence tokens/s "
                                   "is lower than the run's overall rate in the header."))


def _fixed_note(grid_axes: list[str], axes: list[str]) -> str:
    rest = [a for a in grid_axes if a not in axes]
    return f"; {', '.join(rest)} left out: changing {'it' if len(rest) == 1 else 'them'} alone does not move it" \
        if rest else ""


def context_options(mo) -> str:
    """The context options that move the numbers (README, noise floor), e.g. 'flash-attn auto, swa-full on, ...'."""
    return (f"flash-attn {mo.flash_attn}, swa-full {mo.swa_full}, repack {mo.repack}, batch {mo.batch}, "
            f"ubatch {mo.ubatch or mo.batch}, server-prefill {mo.server_prefill}")


def write_run_report(store, info, path, fmt, *, loaded=None, model=None, position: int = 0, sample=None,
                     metric: str = "mean_logprob", load_model: bool = True, say, loader=None, write,
                     answer: str | None = None) -> None:
    """A sweep run's report written to `path` (the sweep kind's report, run/kinds.py): the sampler view
    decodes with `model` (a loaded Model or a file), else the run's own file unless load_model is False;
    `loader(file, options)` loads a file (the CLI's memory check), `write(doc, path, fmt)` writes."""
    from llamalens.core.runtime import Model
    from llamalens.reports.document import check_writable, report_format
    from llamalens.run.lifecycle import check_run_model, report_model

    check_request(info, metric)
    report_format(path, fmt)
    check_writable(path)
    if info.status != "done" or info.n_done < info.n_samples:
        say(f"warning: run {info.id} is {info.status} ({info.n_done}/{info.n_samples} samples); the report shows the "
            "finished samples only")
    if loaded is None:
        loaded = load_run(store, info.id)
    if isinstance(model, Model):
        check_run_model(store, info, model)
        write(run_document(loaded, model, position, sample, metric, answer), path, fmt)
        return
    viewer = None
    if load_model:
        file, options = report_model(info, model)
        if file is None:
            say(f"warning: the run's model {info.model.path} is not there; the sampler view is left out "
                "(pass --model PATH)")
        else:
            from llamalens.modelfiles.find import resolve_source
            from llamalens.modelfiles.memory import checked_load

            viewer = loader(file, options) if loader else checked_load(resolve_source(file), options)
            check_run_model(store, info, viewer)
    try:
        write(run_document(loaded, viewer, position, sample, metric, answer), path, fmt)
    finally:
        if viewer is not None and loader is None:
            viewer.close()

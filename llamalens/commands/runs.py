"""Sweeps and the run store: sweep, presets, runs, show, report, export."""

from __future__ import annotations

import datetime
import sys

import click

from llamalens.commands.options import GroupedCommand, AXIS_HELP, axis_options, chain_option, chat_options, grammar_options, json_option, model_option, \
    pop_axes, pop_chat, pop_grammar, pop_model_options, pop_ray, pop_strategy, ray_options, report_option, runtime_options, \
    store_option, strategy_options
from llamalens.commands.output import (ray_executor, check_report_path, fail_cleanly, given_options, json_out, load_model, print_table, records, say,
                                       shell_command, sweep_progress, until_done, write_report)
from llamalens.commands.confidence import answer_option, confidence_json, show_answer_confidence


# what a resumed run takes from the store; giving any of these with --resume is refused, not ignored
RUN_DEFINED = ("prompts", "prompts_file", "chat", "system", "chat_template", "messages_file", "grammar_file",
               "json_schema_file", "seeds", "seed_list", "max_tokens", "logprobs", "stop", "preset", "grid_file",
               "name", "parallel", "exact", "ctx", "batch", "flash_attn", "gpu_layers", "early_stopping", "num_return",
               "best_of_by", "chain", "ubatch", "swa_full", "repack", "server_prefill")


@click.command(cls=GroupedCommand)
@click.argument("prompts", nargs=-1)
@click.option("--prompts-file", type=click.Path(dir_okay=False),
              help="One prompt per line (.txt) or JSON lines with a \"prompt\" field (.jsonl).")
@axis_options(*AXIS_HELP)
@strategy_options
@chain_option
@click.option("--seeds", type=int, default=None, help="Seeds 0..N-1 for every configuration.")
@click.option("--seed", "seed_list", default=None, help="Explicit seeds, e.g. 1,2,3.")
@click.option("--max-tokens", "-n", type=int, default=32, show_default=True, help="Tokens to generate per sample.")
@click.option("--logprobs", type=int, default=5, show_default=True, help="Top alternatives kept per token.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--preset", type=str, default=None, help="Base settings: see `llamalens presets`.")
@click.option("--grid", "grid_file", default=None, help="TOML grid file, or FILE:NAME for one of its grids.")
@click.option("--name", default=None, help="A name for the run.")
@click.option("--parallel", type=click.IntRange(1, 256), default=None,
              help="Sequences decoded together per llama_decode call [default: 32, or fewer by halves when the memory "
                   "estimate of 32 does not fit the RAM available].")
@click.option("--exact", is_flag=True, help="One sequence at a time: numbers identical to `llamalens generate`.")
@click.option("--resume", "resume_id", default=None, help="Finish an interrupted run (its missing samples only).")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")
@report_option("Also write the run's report (FILE.html or FILE.md) when it finishes.")
@chat_options
@grammar_options
@ray_options
@store_option
@model_option
@runtime_options
@fail_cleanly
def sweep(prompts, prompts_file, chain, seeds, seed_list, max_tokens, logprobs, stop, preset, grid_file, name, parallel,
          exact, resume_id, as_json, report_path, store_path, model, **kw):
    """Run PROMPTS across a grid of sampling settings and seeds; every token is stored.

    \b
    llamalens sweep "Once upon a time" -t 0,0.7,1.0 --top-k 2,40 --top-p 0.01,0.95 --seeds 3
    llamalens sweep --prompts-file prompts.txt --preset balanced --seeds 5 --name my-run
    llamalens sweep --resume 7          # after Ctrl-C, a kill or a crash
    llamalens sweep --messages chats.jsonl --chat-template gemma -t 0,0.7 --seeds 2
    llamalens sweep "The future of AI is" --strategy greedy,beam,sample --beams 5 --no-repeat-ngram 0,2 -t 0.7
    llamalens sweep "Once upon a time" --preset llama-server --dry-multiplier 0,0.8 --xtc-probability 0,0.5
    llamalens sweep --prompts-file prompts.txt -t 0,0.7 --seeds 50 --threads 4 --ray auto   # on a Ray cluster

    --chain llama.cpp (or --preset llama-server) samples as llama-server does, with its context options.
    """
    from llamalens.run import grid
    from llamalens.inputs import read_prompts
    from llamalens.store import Store
    from llamalens.run.lifecycle import resume_target
    from llamalens.run.requests import SweepRequest
    from llamalens.run.sweep import DEFAULT_PARALLEL, SweepSpec, execute

    axes_text = pop_axes(kw)
    chat = pop_chat(kw)
    grammar_spec = pop_grammar(kw)
    fixed = pop_strategy(kw)
    ray_address, workers = pop_ray(kw)
    if resume_id is not None:
        conflicts = given_options(click.get_current_context(), RUN_DEFINED + tuple("ax_" + a for a in axes_text))
        if conflicts:
            raise click.UsageError(f"--resume finishes a run with its own stored settings; {', '.join(conflicts)} "
                                   "would be ignored: drop them, or start a new sweep")
    check_report_path(report_path)
    store = Store(store_path)
    if resume_id is not None:
        run_id, model_path, options = resume_target(store, resume_id, model)
        loaded = load_model(model_path, options)
        info = store.run(run_id)
        say(f"resuming run {run_id}: {info.n_samples - info.n_done} of {info.n_samples} samples to go", err=True)
    else:
        prompts = tuple(prompts) + (tuple(read_prompts(prompts_file)) if prompts_file else ())
        convs = chat.conversations(prompts) if chat.on else None
        if not prompts and not convs:
            raise click.UsageError("give at least one PROMPT, --prompts-file or --messages")
        chain = grid.chain_of(preset, chain)
        spec = SweepSpec(list(prompts), grid.build_configs(preset, grid_file, axes_text, fixed, chain),
                         grid.parse_seeds(seeds, seed_list), max_tokens, logprobs, tuple(stop), name, exact,
                         parallel or DEFAULT_PARALLEL)
        req = SweepRequest(spec, convs, chat.template, grammar_spec)
        req.check()
        options = pop_model_options(kw, chain)
        if parallel is None and not options.force and (note := req.fit_parallel(model, options)):
            say(f"note: {note}", err=True)
        n_par, cells = req.sizing(options.ctx)
        loaded = load_model(model, options, sequences=n_par, cells=cells)
        run_id = req.start(loaded, store, shell_command(["llamalens"] + sys.argv[1:]),
                           lambda note: say(f"note: {note}", err=True))
        if req.chats:
            from llamalens.commands.look import warn_chat

            warn_chat(req.chats)
            say(f"chat: {len(req.chats)} conversation(s) rendered with {req.chats[0].template}; the analysis covers "
                "the replies", err=True)
        say(f"run {run_id}: {len(spec.prompts)} prompt(s) x {len(spec.configs)} configuration(s) x "
            f"{len(spec.seeds)} seed(s) = {spec.n_samples} sequences, up to {spec.n_samples * max_tokens:,} "
            f"tokens, {n_par} per batch; store {store.path}", err=True)
    executor = ray_executor(ray_address, workers)
    until_done(lambda: execute(loaded, store, run_id, sweep_progress(), executor))
    run = _show_run(store, run_id, as_json)
    if report_path:
        _report(run, report_path, None, loaded)


@click.command(cls=GroupedCommand)
def presets():
    """List the named presets for `sweep --preset`.

    \b
    llamalens sweep "Once upon a time" --preset balanced --seeds 3
    """
    from llamalens.run.grid import PRESETS
    from llamalens.settings import SamplingSettings

    for name, values in PRESETS.items():
        say(f"{name:<18} {SamplingSettings(**values).label(seed=False)}")


@click.command(cls=GroupedCommand)
@json_option
@store_option
@fail_cleanly
def runs(as_json, store_path):
    """List the runs in the store: id, name, kind, status, model, grid, samples done, workers, date.

    \b
    llamalens runs --store runs.db
    """
    from llamalens.store import Store, StoreMissing, default_store_path

    try:
        store = Store(store_path, read_only=True)
        path, infos = store.path, store.runs()
    except StoreMissing:  # no store there yet: no runs, and nothing is created
        path, infos = store_path or default_store_path(), []
    if as_json:
        return json_out([r.listing() for r in infos])
    if not infos:
        return say(f"no runs in {path}; start one with `llamalens sweep`")
    rows = [("id", "name", "kind", "status", "model", "prompts", "grid", "samples", "workers", "date")]
    for r in infos:
        rows.append((r.id, r.name or "", r.kind, r.status, r.model.name, r.n_prompts, r.n_configs, f"{r.n_done}/{r.n_samples}",
                     r.hardware.workers, datetime.datetime.fromtimestamp(r.created).strftime("%Y-%m-%d %H:%M")))
    print_table(rows, right={0, 5, 6, 8})


@click.command(cls=GroupedCommand)
@click.argument("run_id")
@click.option("--texts", is_flag=True, help="Every distinct text in full, with the configurations and seeds that "
                                            "produced it (without it: the first few, shortened).")
@answer_option
@json_option
@store_option
@fail_cleanly
def show(run_id, texts, answer, as_json, store_path):
    """Summary of a run per configuration: logprob, perplexity, entropy, candidates, diversity, speed; then its
    distinct texts.

    \b
    llamalens show tales --texts
    """
    from llamalens.store import Store

    _show_run(Store(store_path, read_only=True), run_id, as_json, texts=texts, answer=answer)


def _show_run(store, run_id, as_json, texts: bool = False, answer: str | None = None):
    """Print a run's summary as its kind shows it (run/kinds.py), with each sample's confidence
    (commands/confidence.py); return what it loaded (a report made next reads nothing again)."""
    from llamalens.core.confidence import check_answer_regex
    from llamalens.run.kinds import kind

    check_answer_regex(answer)
    return kind(store.run(run_id).kind).hook("show")(store, run_id, as_json, texts=texts, answer=answer)


SHORT_TEXTS = 6  # distinct texts per prompt that `show` and a sweep's end print without --texts
SHORT_CHARS = 72


def show_texts(run, full: bool) -> None:
    """Each prompt's distinct texts, the most produced first, with the configurations and seeds behind each:
    all of them in full, or the first SHORT_TEXTS shortened to SHORT_CHARS characters."""
    from llamalens.run.findings import findings
    from llamalens.reports.findings import Names, produced_by, retokenized
    from llamalens.visible import visible

    found = findings(run)
    names = Names(run, found)
    prompts = dict(sorted({(s.prompt_idx, s.prompt) for s in run.samples}))
    for p_idx, prompt in prompts.items():
        texts = [t for t in found.texts if t.prompt_idx == p_idx]
        n = sum(len(t.samples) for t in texts)
        say(f"texts of prompt {p_idx} ({visible(prompt, edge_spaces=False)!s}): {len(texts)} distinct of {n} samples")
        rows = [("samples", "text", "produced by")]
        marks = retokenized(texts)
        for t, mark in zip(texts if full else texts[:SHORT_TEXTS], marks):
            shown = visible(t.text, t.bytes, edge_spaces=False)
            if not full and len(shown) > SHORT_CHARS:
                shown = shown[: SHORT_CHARS - 1] + "…"
            rows.append((f"×{len(t.samples)}", shown + mark, produced_by(names, t.samples)))
        print_table(rows, right={0})
        if not full and len(texts) > SHORT_TEXTS:
            say(f"... {len(texts) - SHORT_TEXTS} more: `llamalens show {run.id} --texts`")


def _show_groups(run) -> None:
    """Name the configurations that are one chain on this run (run/findings.py)."""
    from llamalens.run.findings import equivalent_groups
    from llamalens.reports.findings import numbers

    for g in equivalent_groups(run):
        if len(g.configs) > 1:
            how = "every token they chose had one candidate left" if g.deterministic else "the same records"
            say(f"configurations {numbers(g.configs)} are one chain on this run ({how}, the same tokens for every "
                "prompt and seed)")


def show_sweep(store, run_id, as_json, texts: bool = False, answer: str | None = None):
    """Print a sweep run's summary: per configuration, then strategies, noise floor, grammar, resumes, and the
    distinct texts (all in full with `texts`)."""
    from llamalens.run.loaded import STRATEGY_TABLE, load_run
    from llamalens.reports.run import context_options, describe_noise

    run = load_run(store, run_id)
    info, summ = run.info, run.summary
    if as_json:
        out = {"run": info.to_dict(), "summary": records(summ)}
        if texts:
            from llamalens.run.findings import distinct_texts

            out["texts"] = [{"prompt_idx": t.prompt_idx, "text": t.text, "token_ids": list(t.ids),
                             "samples": [{"sample_idx": i, "config_idx": c, "seed": sd} for i, c, sd in t.samples]}
                            for t in distinct_texts(run)]
        json_out({**out, "confidence": confidence_json(store, run_id, answer)})
        return run
    say(f"run {info.id} {info.name or ''} [{info.status}] model {info.model.name} ({info.model.quantization}), "
               f"{info.n_done}/{info.n_samples} samples, {context_options(info.options.model_options)}, "
               f"{info.options.parallel} per batch")
    rows = [("#", "configuration", "samples", "mean lp", "ppl", "entropy", "cand", "distinct", "dist-2 seeds", "rank",
             "tok/s")]
    for r in summ.itertuples():
        rows.append((r.config_idx, r.label, r.samples, f"{r.mean_logprob:.3f}", f"{r.perplexity:.2f}",
                     f"{r.mean_entropy:.3f}", f"{r.mean_candidates:.1f}", f"{r.distinct_completions:.1f}",
                     f"{r.distinct_2:.2f}", f"{r.mean_rank:.1f}", f"{r.tokens_per_s:.1f}"))
    print_table(rows, right=set(range(2, 11)) | {0})
    say("dist-2 seeds: distinct bigrams over all of a configuration's samples")
    _show_groups(run)
    if run.strategies:
        say("decoding strategies (means over samples; distinct-n and rep-4 within each sample):")
        rows = [tuple(h for _, h in STRATEGY_TABLE)]
        for r in summ.itertuples():
            rows.append(tuple(v if isinstance(v, (int, str)) else f"{v:.3f}"
                              for v in (getattr(r, c) for c, _ in STRATEGY_TABLE)))
        print_table(rows, right=set(range(2, len(STRATEGY_TABLE))) | {0})
    noise = describe_noise(info.noise)
    if noise:
        say(noise)
    if info.options.grammar:
        _show_grammar(run)
    if info.resumes:
        from llamalens.reports.run import resume_note

        say(f"note: {resume_note(info)}")
    if run.samples:
        show_answer_confidence(store, run_id, answer)
        show_texts(run, texts)  # the texts last: what a sweep ends with
    if info.status != "done":
        say(f"run {info.id} is {info.status}: resume with `llamalens sweep --resume {info.id}`")
    return run


def _show_grammar(run) -> None:
    from llamalens.core.grammar import fight
    from llamalens.visible import visible

    f = fight(run.samples, run.by_sample, k=5)
    if f is None:
        return
    say(f"grammar ({run.info.options.grammar['source']}): it removed {f.mean:.1%} of the raw probability mass per "
        "token on average (" + ", ".join(f"config {c} {m:.1%}" for c, m in f.mean_by_config.items())
        + "); where it fought the model most: "
        + ", ".join(f"sample {s} #{pos} {visible(text, hx)} {r:.1%}" for s, _c, pos, text, hx, r in f.worst))


@click.command(cls=GroupedCommand)
@click.argument("run_id")
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False),
              help="FILE.html or FILE.md (default: the run's name, or run-ID, .html in this folder).")
@click.option("--format", "fmt", default=None, help="html or md (default: from the file name).")
@click.option("--metric", default="mean_logprob", show_default=True,
              help="Metric of the first heatmap (mean_logprob, mean_entropy, mean_candidates, distinct_completions, "
                   "perplexity, distinct_2, mean_rank, tokens_per_s).")
@click.option("--position", type=int, default=0, show_default=True,
              help="Generated-token position of the sampler view (0 = the first generated token).")
@click.option("--sample", "sample_idx", type=int, default=None, help="Sample whose history the sampler view uses.")
@click.option("--model", "-m", default=None, help="Model for the sampler view (default: the run's model file).")
@click.option("--no-model", is_flag=True, help="Do not load the model: leave out the sampler view.")
@answer_option
@store_option
@fail_cleanly
def report(run_id, output, fmt, metric, position, sample_idx, model, no_model, answer, store_path):
    """Write a run's report: one self-contained HTML page, or Markdown with PNG plots beside it.

    \b
    llamalens report my-run                 # writes my-run.html
    llamalens report 7 -o run7.md --metric mean_entropy --position 3
    """
    from llamalens.api import report as write_run_report
    from llamalens.store import Store

    if output is None:
        output = default_report_path(Store(store_path, read_only=True).run(run_id), fmt)

    write_run_report(run_id, output, store=store_path, fmt=fmt, metric=metric, position=position, sample=sample_idx,
                     model=model, load_model=not no_model, on_note=lambda note: say(note, err=True),
                     loader=load_model, writer=_write, answer=answer)


def default_report_path(info, fmt: str | None = None) -> str:
    """The report's file when -o is not given: the run's name (characters unsafe in a file name replaced), or
    run-ID for a run without one, with .html (or .md with --format md)."""
    import re

    stem = re.sub(r"[^\w.-]+", "_", info.name).strip("._") if info.name else ""
    return f"{stem or f'run-{info.id}'}.{'md' if fmt == 'md' else 'html'}"


def _write(doc, output, fmt) -> None:
    say("writing the report ...", err=True)
    write_report(doc, output, fmt)


def _report(run, output, fmt, model, **options) -> None:
    from llamalens.reports.run import run_document

    _write(run_document(run, model=model, **options), output, fmt)


@click.command(cls=GroupedCommand)
@click.argument("run_id")
@click.option("--format", "fmt", type=click.Choice(["csv", "parquet", "jsonl"]), required=True,
              help="csv / parquet: one row per token; jsonl: one sample per line, OpenAI logprobs shape.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output file.")
@click.option("--excel-safe", is_flag=True,
              help="csv: prefix text cells that begin with =, +, - or @ with an apostrophe, so that a spreadsheet "
                   "does not run them as formulas (the text then no longer round-trips; the bytes column does).")
@answer_option
@store_option
@fail_cleanly
def export(run_id, fmt, output, excel_safe, answer, store_path):
    """Write a run's token table (csv, parquet) or its samples in OpenAI logprobs shape (jsonl).

    \b
    llamalens export tales --format csv -o tokens.csv
    """
    from llamalens.run.loaded import export_run, load_run
    from llamalens.store import Store

    run = load_run(Store(store_path, read_only=True), run_id)
    n = export_run(run, fmt, output, excel_safe, answer)
    say(f"wrote {n} {'samples' if fmt == 'jsonl' else 'tokens'} of run {run.id} to {output}", err=True)

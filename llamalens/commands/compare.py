"""compare: models against a base on the same tokens (a compare run: run/compare.py, read back as run/ladder.py),
and the summary `show` prints of a compare run."""

from __future__ import annotations

import sys

import click

from llamalens.commands.options import GroupedCommand, pop_model_options, pop_ray, ray_options, runtime_options, \
    store_option, text_options
from llamalens.commands.output import alternatives, no_answer, check_report_path, fail_cleanly, given_options, json_out, \
    load_model, print_table, say, shell_command, sweep_progress, until_done, window_progress, write_report

# what a resumed compare run takes from the store; giving any of these with --resume is refused, not ignored
RUN_DEFINED = ("text", "file", "raw_bytes", "protocol", "stride", "model_paths", "run_id", "name", "ctx", "batch",
               "flash_attn", "gpu_layers", "ubatch", "swa_full", "repack", "prompts_path", "choices", "normalize",
               "max_tokens", "draft")


@click.command(cls=GroupedCommand)
@text_options
@click.option("--model", "-m", "model_paths", multiple=True,
              help="The base model first, then each model to compare with it (repeat); with --run, the models to "
                   "compare with the run's own (the base).")
@click.option("--run", "run_id", default=None, help="Compare on the generated tokens of a stored run (a sweep, a "
                                                          "chat run), each after its own prompt.")
@click.option("--top", type=click.IntRange(1, 50), default=20, show_default=True,
              help="Positions of most disagreement to list (per model).")
@click.option("--name", default=None, help="A name for the compare run.")
@click.option("--resume", "resume_id", default=None, help="Finish an interrupted compare run (its missing windows "
                                                           "only).")
@click.option("--prompts", "prompts_path", default=None, type=click.Path(dir_okay=False),
              help="Flips: prompts every model answers greedily (one a line), or questions (.jsonl: \"prompt\", "
                   "\"options\", \"answer\"); how many answers differ from the base's.")
@click.option("--option", "choices", multiple=True,
              help="With --prompts: every prompt is a multiple-choice question with these options (repeat).")
@click.option("--normalize", type=click.Choice(["none", "token", "byte"]), default="none", show_default=True,
              help="How options are ranked, as choose: total logprob, or per token / byte.")
@click.option("--max-tokens", type=click.IntRange(1, 1024), default=32, show_default=True,
              help="Tokens of each greedy answer to --prompts, at most.")
@click.option("--draft", is_flag=True,
              help="Draft models for speculative decoding: the base is the target, each other model a draft; adds "
                   "the expected acceptance Σ min(p_target, p_draft) and accepted tokens per round, draft lengths "
                   "1-8.")
@click.option("--chart", "chart_path", default=None, type=click.Path(dir_okay=False),
              help="Also write the ladder chart (mean and 99% KLD against file size) as a PNG.")
@ray_options
@store_option
@runtime_options
@fail_cleanly
def compare(text, file, raw_bytes, protocol, stride, as_json, report_path, model_paths, run_id, top, name, resume_id,
            prompts_path, choices, normalize, max_tokens, draft, chart_path, store_path, **kw):
    """How far models drift from a base model on the same tokens: KL divergence, Δp, same top token.

    Any number of models against the first (the base), on the same windows of a text: every figure
    llama-perplexity --kl-divergence prints, per model, and the ladder (the models by file size with
    their bits per weight, and a chart of KLD against size). The comparison is a run in the store:
    an interrupted one resumes with --resume, and `show` / `report` read it back.

    \b
    llamalens compare -m model-f16.gguf -m q8_0.gguf -m q4_k_m.gguf -m q2_k.gguf --file wiki.test.raw --report ladder.html
    llamalens compare -m model-q8_0.gguf -m model-q4_k_m.gguf --file wiki.test.raw --ctx 512 --protocol llama-perplexity
    llamalens compare -m model-f16.gguf -m q4_k_m.gguf --prompts questions.jsonl   # answers that flip
    llamalens compare --run 7 -m small-model.gguf --draft   # how much of a draft model run 7's model would accept
    llamalens compare --resume 9                         # after Ctrl-C, a kill or a crash
    llamalens compare --run 7 -m q4_k_m.gguf -m q2_k.gguf   # the quants on run 7's answers (its model the base)
    llamalens compare -m A.gguf -m B.gguf --file corpus.txt --ctx 512 --threads 4 --ray auto   # on a Ray cluster
    """
    from llamalens.looks.requests import CompareRequest
    from llamalens.store import Store

    ctx = click.get_current_context()
    ray_address, workers = pop_ray(kw)
    check_report_path(report_path)
    _check_chart_path(chart_path)
    if resume_id is not None:
        conflicts = given_options(ctx, RUN_DEFINED)
        if conflicts:
            raise click.UsageError(f"--resume finishes a compare run with its own stored models, text and settings; "
                                   f"{', '.join(conflicts)} would be ignored: drop them, or start a new comparison")
        return _resume(Store(store_path), resume_id, as_json, report_path, chart_path, top)
    from llamalens.commands.score import read_text
    from llamalens.looks.flips import read_questions

    if choices and not prompts_path:
        raise click.UsageError("--option makes each prompt of --prompts a multiple-choice question: give --prompts")
    questions = read_questions(prompts_path, tuple(choices)) if prompts_path else []
    if run_id is not None:
        _check_on_run(ctx, text, file, ray_address, questions)
        paths = [Store(store_path, read_only=True).run(run_id).model.path] + list(model_paths)
        req = CompareRequest(paths, run=run_id, name=name, draft=draft)
    else:
        source = read_text(text, file, raw_bytes) if text is not None or file or not questions else None
        req = CompareRequest(list(model_paths), source, protocol=protocol, stride=stride, name=name,
                             questions=questions, max_tokens=max_tokens, normalize=normalize, draft=draft)
    req.check()
    options = pop_model_options(kw)
    if ray_address is not None:
        if questions:
            raise click.UsageError("--ray compares two models on a text; --prompts answers in a compare run in this "
                                   "process: drop one")
        return _pairwise_on_ray(req, options, ray_address, workers, as_json, report_path, top)
    store = Store(store_path)
    base = load_model(str(req.files[0]), options, rows=options.batch)
    say(f"checking {len(req.files) - 1} model(s) against {req.files[0].name} ...", err=True)
    run_id = req.start(base, store, shell_command(["llamalens"] + sys.argv[1:]), lambda n: say(f"note: {n}", err=True))
    info = store.run(run_id)
    say(f"compare run {run_id}: {len(req.files) - 1} model(s) against {req.files[0].name}, {info.n_samples - 1} "
        f"unit(s) to decode (a model on a window, or a model's answer); store {store.path}", err=True)
    _finish(base, store, run_id, as_json, report_path, chart_path, top)


def _check_on_run(ctx, text, file, ray_address, questions) -> None:
    """compare --run takes its tokens from the run: no text, windows, questions or Ray."""
    if text is not None or file:
        raise click.UsageError("give TEXT, --file or --run, not several")
    if ray_address is not None:
        raise click.UsageError("--ray compares the windows of a text; --run compares a run's samples in this "
                               "process: drop --ray")
    if questions:
        raise click.UsageError("--prompts is answered in a compare run on a text (or alone), not with --run; drop one")
    windows = given_options(ctx, ("protocol", "stride"))
    if windows:
        raise click.UsageError(f"--run compares each sample whole (its prompt, then its generated tokens): "
                               f"{', '.join(windows)} would be ignored; drop it")


def _check_chart_path(chart_path) -> None:
    if chart_path:
        from llamalens.reports.document import check_writable

        if not str(chart_path).lower().endswith(".png"):
            raise click.UsageError(f"--chart {chart_path}: the chart is written as a PNG; name the file FILE.png")
        check_writable(chart_path)


def _resume(store, resume_id, as_json, report_path, chart_path, top) -> None:
    from llamalens.run.lifecycle import resume_target

    run_id, model_path, options = resume_target(store, resume_id, kind="compare")
    base = load_model(model_path, options, rows=options.batch)
    info = store.run(run_id)
    say(f"resuming compare run {run_id}: {info.n_samples - info.n_done} of {info.n_samples - 1} model windows to go",
        err=True)
    _finish(base, store, run_id, as_json, report_path, chart_path, top)


def _finish(base, store, run_id, as_json, report_path, chart_path, top) -> None:
    """Decode what is pending of a compare run, then print it (and write its report and chart)."""
    from llamalens.looks.requests import CompareRequest

    until_done(lambda: CompareRequest.execute(base, store, run_id, sweep_progress(
        lambda p: f"{p.done - 1}/{p.total - 1} units")))
    ladder = show_compare(store, run_id, as_json, top=top)
    if report_path:
        from llamalens.reports.ladder import ladder_document

        write_report(ladder_document(ladder), report_path)
    if chart_path:
        from llamalens.reports import plots
        from llamalens.reports.ladder import ladder_figure

        with open(chart_path, "wb") as f:
            f.write(plots.png(ladder_figure(ladder), dpi=130))
        say(f"wrote {chart_path}", err=True)


def show_compare(store, run_id, as_json, texts: bool = False, top: int = 10, answer: str | None = None):
    """Print a compare run: the ladder, every model's llama-perplexity statistics and where it drifts most from the
    base (`texts`: the compared text is the run's sample 0; `export` writes it). Returns the Ladder."""
    no_answer(answer, run_id, "a compare run")
    from llamalens.looks.kld_stats import statistic_lines
    from llamalens.run.ladder import load_ladder
    from llamalens.visible import prob_text, visible

    ladder = load_ladder(store, run_id)
    if as_json:
        d = ladder.to_dict()
        if len(ladder.models) == 2 and 1 in ladder.drift:  # two models: the pairwise compare's summary too
            s = ladder.stats(1)
            d["summary"] = dict(s, ppl_a=s["ppl_base"], ppl_b=s["ppl_q"])
        json_out(d)
        return ladder
    for note in ladder.notes:
        say(f"note: {note}", err=True)
    info = ladder.info
    say(f"compare run {info.id} {visible(info.name or '')} [{info.status}]: {len(ladder.models) - 1} model(s) against "
        f"{visible(ladder.base.name)} ({visible(ladder.base.quantization)}); {ladder.describe_tokens()}")
    rows = [("model", "quant", "size GiB", "bpw", "PPL", "PPL ratio", "mean KLD", "99% KLD", "max KLD", "RMS Δp",
             "same top token")]
    for r in ladder.table():
        rows.append((visible(r["model"]), visible(r["quantization"]), f"{r['file_size'] / 2**30:.3f}",
                     f"{r['bpw']:.3f}", f"{r['ppl']:.4f}", f"{r['ppl_ratio']:.5f}", f"{r['kld_mean']:.6f}",
                     f"{r['kld_p99']:.6f}", f"{r['kld_max']:.4f}", f"{r['dp_rms'] * 100:.3f}%",
                     f"{r['same_top'] * 100:.2f}%"))
    if len(rows) > 1:
        print_table(rows, right=set(range(2, 11)))
    if ladder.flips is not None:
        _show_flips(ladder, top)
    if ladder.draft:
        _show_draft(ladder)
    for m in ladder.by_size():
        if m.index not in ladder.drift:
            continue
        say("")
        say(f"== {visible(m.quantization)} ({visible(m.name)}) against the base: llama-perplexity's statistics")
        print_table([("statistic", "value")] + statistic_lines(ladder.stats(m.index)), right={1})
        worst = ladder.worst(m.index, top)
        say(f"the {len(worst)} positions where it drifts most from the base:")
        print_table([("pos", "token", "KLD", "p base", "p model", "base's top", "model's top")] + [
            (ladder.where(p), visible(p["text"], p["bytes"]), f"{p['kld']:.5f}", prob_text(_exp(p["lp_base"])),
             prob_text(_exp(p["lp_q"])), _alts(p["top_base"]), _alts(p["top_q"])) for p in worst], right={0, 2, 3, 4})
    if texts:
        say(f"--- the compared text is sample 0 of run {info.id}: `llamalens export {info.id}`")
    if not ladder.complete:
        say(f"this comparison is not finished: resume it with `llamalens compare --resume {info.id}`", err=True)
    return ladder


def _show_flips(ladder, top: int) -> None:
    """The flips table (answers that differ from the base's), then per model the first `top` flipped answers."""
    from llamalens.visible import visible

    flips = ladder.flips
    order = [m.index for m in ladder.by_size()]
    say("")
    say("== flips: answers that change against the base's")
    print_table([flips.header()] + [[visible(str(c)) for c in r] for r in flips.rows(order)], right={2, 3, 4})
    say(flips.describe())
    for k in order:
        flipped = [d for i in range(len(flips.questions)) if (d := flips.detail(k, i)) and d["flipped"]][:top]
        if not flipped:
            continue
        say(f"-- {visible(ladder.models[k].quantization)} ({visible(ladder.models[k].name)}): "
            f"{len(flipped)} flipped answer(s) shown")
        rows = [("#", "prompt", "base", "this model", "at")]
        for d in flipped:
            q = flips.questions[d["question"]]
            if q.options:
                rows.append((d["question"], visible(_cut(q.prompt)), visible(d["base_pick"]), visible(d["pick"]), ""))
            else:
                rows.append((d["question"], visible(_cut(q.prompt)), visible(_cut(d["base_text"])),
                             visible(_cut(d["text"])), f"{d['at']}: {_tok(d['base_token'])} → {_tok(d['token'])}"))
        print_table(rows, right={0})


def _show_draft(ladder) -> None:
    """Per draft model: its acceptance by the target (the base) and the expected tokens per round."""
    from llamalens.looks.draft import DRAFT_LENGTHS
    from llamalens.visible import visible

    for m in ladder.by_size():
        if m.index not in ladder.drift:
            continue
        d = ladder.draft_stats(m.index)
        say("")
        say(f"== {visible(m.name)} as a draft for {visible(ladder.base.name)}: mean acceptance Σ min(p_target, "
            f"p_draft) {d['accept_mean']:.4f} ± {d['accept_error']:.4f} (10/50/90%: {d['accept_p10']:.3f} / "
            f"{d['accept_median']:.3f} / {d['accept_p90']:.3f}); greedy (the draft's top token is the text's) "
            f"{d['greedy_accept']:.4f}")
        rows = [("draft length", "accepted/round (iid)", "along the text", "greedy: accept rate", "greedy: tokens/round")]
        for g, r in zip(DRAFT_LENGTHS, d["rounds"]):
            rows.append((g, f"{r['iid_accepted']:.3f}", f"{r['text_accepted']:.3f}",
                         f"{r['greedy_accept_rate'] * 100:.2f}%", f"{r['greedy_tokens_per_round']:.3f}"))
        print_table(rows, right=set(range(5)))
    say("iid: α(1−α^γ)/(1−α) with α the mean acceptance, positions assumed independent; along the text: each "
        "start position's Σ_i Π_j α (the text taken as what the target would generate); greedy: llama-speculative's "
        "rounds with --temp 0 replayed on the text (exact when it is the target's greedy output). docs/compare.md")


def _cut(s: str, n: int = 40) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _tok(t) -> str:
    from llamalens.visible import visible

    return "[end]" if t is None else visible(t)


def _exp(lp: float) -> float:
    import math

    return math.exp(lp)


def _alts(alts: list) -> str:
    from llamalens.visible import prob_text, visible

    return "  ".join(f"{visible(text, hexb)} {prob_text(_exp(lp), 3)}" for _i, text, hexb, lp in alts[:3])


def _pairwise_on_ray(req, options, ray_address, workers, as_json, report_path, top) -> None:
    from llamalens.run.ray import ray_comparer

    req.check_pairwise("--ray")
    a, b = (load_model(str(p), options, rows=options.batch) for p in req.files)
    scorer = ray_comparer(a, b, ray_address, workers, lambda note: say(f"ray: {note}", err=True),
                          window_progress("comparing"))
    _show_pairwise([req.pairwise(a, b, options.ctx, window_progress("comparing"), scorer)], as_json, report_path, top)


def _show_pairwise(results, as_json, report_path, top) -> None:
    for res in results:
        for note in res.notes:
            say(f"note: {note}", err=True)
    if as_json:
        json_out(results[0].to_dict() if len(results) == 1 else {"comparisons": [r.to_dict() for r in results]})
    else:
        for res in results:
            _print_comparison(res, top)
    if report_path:
        from llamalens.reports.texts import compare_document

        if len(results) > 1:
            say(f"note: --report shows the first comparison ({results[0].model_b.get('name')}); --json has all",
                err=True)
        write_report(compare_document(results[0]), report_path)


def _print_comparison(res, top) -> None:
    from llamalens.visible import prob_text, visible

    s = res.summary()
    say(f"A = {res.model_a.get('name')} ({res.model_a.get('quantization')}), B = {res.model_b.get('name')} "
        f"({res.model_b.get('quantization')}); {s['tokens']} tokens ({res.source}, {res.protocol}, ctx {res.ctx})")
    lines = [
        ("PPL(A)", f"{s['ppl_a']:.4f}"), ("PPL(B)", f"{s['ppl_b']:.4f}"),
        ("PPL(B)/PPL(A)", f"{s['ppl_ratio']:.5f}"), ("ln(PPL(B)/PPL(A))", f"{s['ln_ppl_ratio']:+.5f}"),
        ("mean KLD(A||B)", f"{s['kld_mean']:.6f} ± {s['kld_error']:.6f}"),
        ("KLD median / 90% / 95% / 99% / 99.9% / max",
         " / ".join(f"{s[k]:.6f}" for k in ("kld_median", "kld_p90", "kld_p95", "kld_p99", "kld_p99_9", "kld_max"))),
        ("mean Δp (B-A)", f"{s['dp_mean'] * 100:+.3f} ± {s['dp_error'] * 100:.3f} %"),
        ("RMS Δp", f"{s['dp_rms'] * 100:.3f} %"),
        ("Δp 1% / 5% / median / 95% / 99%",
         " / ".join(f"{s[k] * 100:+.3f}%" for k in ("dp_p1", "dp_p5", "dp_median", "dp_p95", "dp_p99"))),
        ("same top token", f"{s['same_top'] * 100:.2f} ± {s['same_top_error'] * 100:.2f} %"),
    ]
    print_table([("statistic", "value")] + lines)
    say("")
    rows = [("pos", "sample", "token", "KLD", "p A", "p B", "top A", "top B")]
    for p in res.worst(top):
        rows.append((p.position, "" if p.sample is None else p.sample, visible(p.text, p.bytes), f"{p.kld:.5f}",
                     prob_text(p.p_a), prob_text(p.p_b), alternatives(p.top_a[:3]), alternatives(p.top_b[:3])))
    say(f"the {len(rows) - 1} positions where the models disagree most:")
    print_table(rows, right={0, 1, 3, 4, 5})

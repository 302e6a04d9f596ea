"""Teacher-forced analyses: score, choose, compare."""

from __future__ import annotations

import click

from llamalens.commands.options import GroupedCommand, chat_options, json_option, model_options, pop_chat, pop_model_options, pop_ray, ray_options, \
    runtime_options, store_option, text_options
from llamalens.commands.output import say, alternatives, check_report_path, fail_cleanly, json_out, load_model, print_confidence, \
    print_table, window_progress, write_report


def _text(text, file, raw_bytes):
    """TEXT or --file (UTF-8, or any bytes with --raw-bytes; '-' = stdin)."""
    from llamalens.inputs import read_text_file

    if text is not None and file:
        raise click.UsageError("give TEXT or --file, not both")
    if text is None and not file:
        raise click.UsageError("give a TEXT argument or --file FILE")
    if text is not None:
        return text.encode("utf-8") if raw_bytes else text
    return read_text_file(file, raw_bytes)


def _notes(notes) -> None:
    for note in notes:
        say(f"note: {note}", err=True)


@click.command(cls=GroupedCommand)
@text_options
@click.option("--logprobs", type=click.IntRange(0, 100), default=5, show_default=True,
              help="Top alternatives kept per token.")
@click.option("--all", "show_all", is_flag=True,
              help="Print every token (default: all when <= 100, else the most surprising).")
@click.option("--text", "as_text", is_flag=True, help="Print the text coloured by each token's probability.")
@chat_options
@ray_options
@model_options
@fail_cleanly
def score(text, file, raw_bytes, protocol, stride, as_json, report_path, logprobs, show_all, as_text, model, **kw):
    """How surprised the model is by a text: per-token logprob, rank, entropy; perplexity, bits per byte.

    With --messages, the assistant's reply is scored after the rest of the conversation (rendered with the
    chat template): the file's last message when it is the assistant's, or TEXT / --file as the reply.

    \b
    llamalens score "The quick brown fox jumps over the lazy dog."
    llamalens score --file wiki.test.raw --protocol llama-perplexity --ctx 512
    llamalens score --messages chat.jsonl --chat-template gemma
    llamalens score --file corpus.txt --ctx 512 --threads 4 --ray auto   # windows shared out on a Ray cluster
    """
    from llamalens.looks.score import score_text

    chat = pop_chat(kw)
    ray_address, workers = pop_ray(kw)
    if chat.on:
        if ray_address is not None:
            raise click.UsageError("--ray scores the windows of a text; a chat reply is one window: drop --ray")
        return _score_reply(chat, text, file, raw_bytes, as_json, report_path, logprobs, show_all, as_text, model, kw)
    data = _text(text, file, raw_bytes)
    check_report_path(report_path)
    options = pop_model_options(kw)
    loaded = load_model(model, options, rows=options.batch)  # every token of a window is scored
    scorer = None
    if ray_address is not None:
        from llamalens.run.ray import ray_scorer

        scorer = ray_scorer(loaded, ray_address, workers, lambda note: say(f"ray: {note}", err=True),
                            window_progress("scoring"))
    res = score_text(loaded, data, loaded.options.ctx, protocol, stride, logprobs, window_progress("scoring"), scorer)
    _show_scores(res, as_json, as_text, show_all, report_path)


def _score_reply(chat, text, file, raw_bytes, as_json, report_path, logprobs, show_all, as_text, model, kw):
    """score --messages: the assistant's reply after its conversation."""
    from llamalens.commands.look import warn_chat
    from llamalens.core.chat import render
    from llamalens.looks.score import score_reply

    if not chat.messages_file:
        raise click.UsageError("score --chat needs the conversation the reply follows: --messages FILE (.jsonl)")
    if raw_bytes:
        raise click.UsageError("--raw-bytes does not apply to a chat reply (it is text in a conversation)")
    conv = chat.single(None, "score")
    if text is not None or file:
        reply = _text(text, file, False)
    elif conv[-1]["role"] == "assistant":
        conv, reply = conv[:-1], conv[-1]["content"]
    else:
        raise click.UsageError(f"the conversation in {chat.messages_file} ends with a {conv[-1]['role']} message: "
                               "give the assistant's reply as TEXT or --file, or end the conversation with it")
    check_report_path(report_path)
    loaded = load_model(model, pop_model_options(kw))
    rendered = render(loaded, conv, chat.template)
    warn_chat([rendered])
    _show_scores(score_reply(loaded, rendered.text, reply, logprobs), as_json, as_text, show_all, report_path, rendered)


def _show_scores(res, as_json, as_text, show_all, report_path, rendered=None) -> None:
    from llamalens.commands.look import with_chat

    _notes(res.notes)
    if as_json:
        json_out(with_chat(res.to_dict(), rendered))
    elif as_text:
        if res.protocol != "full":
            say(f"note: {res.protocol} scores part of each window; only the scored tokens are shown", err=True)
        print_confidence("", res.tokens)
    else:
        _print_scores(res, show_all)
    if report_path:
        from llamalens.reports.texts import score_document

        write_report(score_document(res, rendered), report_path)


def _print_scores(res, show_all: bool) -> None:
    from llamalens.visible import prob_text, visible

    toks = res.tokens
    shown = toks if show_all or len(toks) <= 100 else sorted(toks, key=lambda t: t.logprob)[:15]
    rows = [("#", "token", "prob", "logprob", "rank", "entropy", "top alternatives")]
    rows += [(t.position, visible(t.text, t.bytes), prob_text(t.prob), f"{t.logprob:.4f}", t.rank, f"{t.entropy:.3f}",
              alternatives(t.top)) for t in shown]
    if shown is not toks:
        say(f"the {len(shown)} most surprising of {len(toks)} tokens (--all for every one, --json for all data):")
    print_table(rows, right={0, 2, 3, 4, 5})
    tot = res.totals()
    say(f"{tot['scored']} of {tot['tokens']} tokens scored ({res.protocol}, ctx {res.ctx}, {res.windows} "
               f"window{'s' if res.windows != 1 else ''}): mean NLL {tot['mean_nll']:.4f} nats, perplexity "
               f"{tot['perplexity']:.4f} ± {tot['perplexity_error']:.4f}, {tot['bits_per_byte']:.4f} bits per "
               f"byte; {tot['tokens_per_s']:.0f} tokens/s")


@click.command(cls=GroupedCommand)
@click.argument("prompt", required=False)
@click.option("--option", "options", multiple=True, help="A continuation to score (repeat, at least twice).")
@click.option("--normalize", type=click.Choice(["none", "token", "byte"]), default="none", show_default=True,
              help="Rank by total logprob, or per token / per byte (fairer across lengths).")
@click.option("--no-space", is_flag=True, help="Append options as given (default: a space joins prompt and option).")
@json_option
@chat_options
@model_options
@fail_cleanly
def choose(prompt, options, normalize, no_space, as_json, model, **kw):
    """Rank continuations of PROMPT by likelihood: zero-shot classification, multiple choice.

    \b
    llamalens choose "The capital of France is" --option Paris --option London --option Berlin
    llamalens choose "Review: great film! Sentiment:" --option positive --option negative --normalize token
    llamalens choose --chat "Is the sky blue? Answer yes or no." --chat-template gemma --option yes --option no
    """
    from llamalens.looks.choose import check_options
    from llamalens.looks.choose import choose as rank_options
    from llamalens.visible import visible
    from llamalens.commands.look import chat_prompt, with_chat

    chat = pop_chat(kw)
    conv = chat.single(prompt, "choose")
    check_options(list(options))
    loaded = load_model(model, pop_model_options(kw))
    rendered = chat_prompt(loaded, conv, chat)
    if rendered:  # the options are the assistant's reply: they follow the rendered prompt as they are
        prompt, no_space = rendered.text, True
    res = rank_options(loaded, prompt, list(options), normalize, space=not no_space)
    _notes(res.notes)
    if as_json:
        return json_out(with_chat(res.to_dict(), rendered))
    rows = [("rank", "option", f"score ({normalize})", "logprob", "tokens", "per token", "per byte", "share", "margin",
             "token logprobs")]
    for i, (o, m, p) in enumerate(zip(res.options, res.margins(), res.probabilities()), 1):
        per = "  ".join(f"{visible(t.text, t.bytes)} {t.logprob:.3f}" for t in o.tokens)
        rows.append((i, visible(o.option, edge_spaces=False), f"{o.score(normalize):.4f}", f"{o.total:.4f}",
                     len(o.tokens), f"{o.total / len(o.tokens):.4f}", f"{o.total / max(o.n_bytes, 1):.4f}", f"{p:.1%}",
                     "" if m != m else f"+{m:.4f}", per))
    print_table(rows, right={0, 2, 3, 4, 5, 6, 7, 8})
    say(f"share = softmax of the scores over these options; margin = lead over the next option "
               f"({'nats' if normalize == 'none' else 'nats per ' + normalize})")


@click.command(cls=GroupedCommand)
@text_options
@click.option("--model", "-m", "model_paths", multiple=True, required=True,
              help="Model A (the reference), then model B; with --run, just B (A is the run's model).")
@click.option("--run", "run_id", default=None, help="Compare on the generated tokens of a stored sweep.")
@click.option("--top", type=click.IntRange(1, 50), default=20, show_default=True,
              help="Positions of most disagreement to list.")
@ray_options
@store_option
@runtime_options
@fail_cleanly
def compare(text, file, raw_bytes, protocol, stride, as_json, report_path, model_paths, run_id, top, store_path, **kw):
    """How far model B drifts from model A on the same tokens: KL divergence, Δp, same top token.

    Quantization drift (a Q4_K_M against its Q8_0), or a fine-tune against its base.

    \b
    llamalens compare -m model-q8_0.gguf -m model-q4_k_m.gguf --file wiki.test.raw --ctx 512
    llamalens compare --run 7 -m model-q2_k.gguf        # what B thinks of run 7's text
    llamalens compare -m A.gguf -m B.gguf --file corpus.txt --ctx 512 --threads 4 --ray auto   # on a Ray cluster
    """
    from llamalens.looks.compare import compare_pair, compare_run, compare_text
    from llamalens.store import Store

    store = data = None
    ray_address, workers = pop_ray(kw)
    if run_id is not None:
        if text is not None or file:
            raise click.UsageError("give TEXT, --file or --run, not several")
        if ray_address is not None:
            raise click.UsageError("--ray compares the windows of a text; --run compares a run's samples in this "
                                   "process: drop --ray")
        store = Store(store_path, read_only=True)
        if len(model_paths) == 1:
            model_paths = (store.run(run_id).model.path,) + tuple(model_paths)
    else:
        data = _text(text, file, raw_bytes)
    path_a, path_b = compare_pair(model_paths)
    check_report_path(report_path)
    options = pop_model_options(kw)
    a, b = load_model(str(path_a), options, rows=options.batch), load_model(str(path_b), options, rows=options.batch)
    if store is not None:
        res = compare_run(a, b, store, run_id, on_progress=window_progress("comparing samples"))
    else:
        scorer = None
        if ray_address is not None:
            from llamalens.run.ray import ray_comparer

            scorer = ray_comparer(a, b, ray_address, workers, lambda note: say(f"ray: {note}", err=True),
                                  window_progress("comparing"))
        res = compare_text(a, b, data, options.ctx, protocol, stride, on_progress=window_progress("comparing"),
                           scorer=scorer)
    _notes(res.notes)
    if as_json:
        json_out(res.to_dict())
    else:
        _print_comparison(res, top)
    if report_path:
        from llamalens.reports.texts import compare_document

        write_report(compare_document(res), report_path)


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

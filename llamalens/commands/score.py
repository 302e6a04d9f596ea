"""Teacher-forced analyses: score and choose (compare: commands/compare.py)."""

from __future__ import annotations

import click

from llamalens.commands.options import GroupedCommand, chat_options, json_option, model_options, pop_chat, pop_model_options, pop_ray, ray_options, \
    text_options
from llamalens.commands.output import say, alternatives, check_report_path, fail_cleanly, json_out, load_model, print_confidence, \
    print_table, window_progress, write_report


def read_text(text, file, raw_bytes):
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
    from llamalens.looks.requests import ScoreRequest

    chat = pop_chat(kw)
    ray_address, workers = pop_ray(kw)
    if chat.on:
        if ray_address is not None:
            raise click.UsageError("--ray scores the windows of a text; a chat reply is one window: drop --ray")
        return _score_reply(chat, text, file, raw_bytes, as_json, report_path, logprobs, show_all, as_text, model, kw)
    req = ScoreRequest(read_text(text, file, raw_bytes), protocol, stride, logprobs)
    req.check()
    check_report_path(report_path)
    options = pop_model_options(kw)
    loaded = load_model(model, options, rows=options.batch)  # every token of a window is scored
    scorer = None
    if ray_address is not None:
        from llamalens.run.ray import ray_scorer

        scorer = ray_scorer(loaded, ray_address, workers, lambda note: say(f"ray: {note}", err=True),
                            window_progress("scoring"))
    res = req.run(loaded, window_progress("scoring"), scorer)
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
        reply = read_text(text, file, False)
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
    from llamalens.looks.requests import ChooseRequest
    from llamalens.visible import visible
    from llamalens.commands.look import chat_prompt, with_chat

    chat = pop_chat(kw)
    conv = chat.single(prompt, "choose")
    req = ChooseRequest(prompt or "", list(options), normalize, space=not no_space)
    req.check()
    loaded = load_model(model, pop_model_options(kw))
    rendered = chat_prompt(loaded, conv, chat)
    if rendered:  # the options are the assistant's reply: they follow the rendered prompt as they are
        req.prompt, req.space = rendered.text, False
    res = req.run(loaded)
    _notes(res.notes)
    if as_json:
        return json_out(with_chat(res.to_dict(), rendered))
    rows = [("rank", "option", f"score ({normalize})", "logprob", "tokens", "per token", "per byte", "share", "margin",
             "token logprobs")]
    for i, (o, m, p) in enumerate(zip(res.options, res.margins(), res.probabilities()), 1):
        per = "  ".join(f"{visible(t.text, t.bytes)} {t.logprob:.3f}" for t in o.tokens)
        rows.append((i, visible(o.option, edge_spaces=False), f"{o.score(normalize):.4f}", f"{o.total:.4f}",
                     len(o.tokens), f"{o.total / len(o.tokens):.4f}", f"{o.total / max(o.n_bytes, 1):.4f}", _share(p),
                     "" if m != m else f"+{m:.4f}", per))
    print_table(rows, right={0, 2, 3, 4, 5, 6, 7, 8})
    say(f"share = softmax of the scores over these options; margin = lead over the next option "
               f"({'nats' if normalize == 'none' else 'nats per ' + normalize})")


def _share(p: float) -> str:
    """An option's share as a percentage, never a nonzero one as 0.0%."""
    return "0%" if p == 0 else "<0.1%" if p < 0.0005 else f"{p:.1%}"

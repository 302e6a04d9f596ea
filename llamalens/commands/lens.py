"""lens: what each layer of the model would predict at each position of a prompt (the logit lens); and the
summary that `show` prints of a stored lens run."""

from __future__ import annotations

import sys

import click

from llamalens.commands.options import GroupedCommand, json_option, pop_model_options, report_option, \
    runtime_options, store_option
from llamalens.commands.output import check_report_path, fail_cleanly, json_out, load_model, no_answer, print_table, say, \
    shell_command

SHOWN_POSITIONS = 8  # columns of the terminal's layer x position table
SHOWN_HEADS = 8  # columns of the terminal's attention table


@click.command(cls=GroupedCommand)
@click.argument("prompt")
@click.option("--target", "targets", multiple=True,
              help="A token to follow through the layers: its probability and rank at every cell (repeatable).")
@click.option("--positions", default=None,
              help="Prompt positions to look at: '0,4,-1', '2:10' (a slice) [default: the last 32].")
@click.option("--layers", default=None, help="Layers to look at, as --positions [default: all; the last always].")
@click.option("--top", type=click.IntRange(1, 50), default=5, show_default=True, help="Top tokens kept per cell.")
@click.option("--attention", default=None, metavar="POSITION",
              help="Also record each layer's attention weights per head at this prompt position (-1: the last "
                   "token); sets --flash-attn off, which never forms them.")
@click.option("--name", default=None, help="A name for the stored run.")
@json_option
@report_option()
@store_option
@click.option("--model", "-m", "model_paths", multiple=True,
              help="GGUF path or model name [default: $LLAMALENS_MODEL, else the embedded Gemma 3 270M Q4_K_M]; give "
                   "two (-m A -m B, e.g. two quantizations of one model) to compare their lenses layer by layer.")
@runtime_options
@fail_cleanly
def lens(prompt, targets, positions, layers, top, attention, name, as_json, report_path, store_path, model_paths, **kw):
    """The logit lens: each layer's next-token distribution at each position of PROMPT.

    Each layer's residual stream, read during one ordinary decode, goes through the model's own final norm and
    output matrix (read from the GGUF, with llama.cpp's arithmetic): its top tokens, entropy, KL to the model's
    final distribution, and the rank of the final answer and of each --target. The last layer reproduces the
    model's logits; the difference is measured and shown on every run. Stored as a run (show, report, export).

    \b
    llamalens lens "The Eiffel Tower is in the city of" --target " Paris" --report lens.html
    llamalens lens "2 + 2 =" --positions -1 --layers 8: --top 10 --json
    llamalens lens "The capital of France is" -m model-q8_0.gguf -m model-q2_k.gguf --report two.html

    With two models, each cell also holds the second model's lens there and KL(A || B) between the two (A the
    first -m, as llama-perplexity's KL divergence), and `show` / the report give, per layer, where their top
    tokens agree and how far apart they are: where in depth quantization makes them part.
    """
    from llamalens.run.lens import LensSpec, lens_of, save
    from llamalens.store import Store

    spec = LensSpec(prompt, list(targets), positions, layers, top, attention).check()
    first, second = _models(model_paths)
    check_report_path(report_path)
    options = pop_model_options(kw)
    if attention is not None and options.flash_attn != "off":
        from dataclasses import replace

        say("note: --attention sets --flash-attn off (flash attention never forms the attention weights)", err=True)
        options = replace(options, flash_attn="off")
    store = Store(store_path)
    models = [first] if second is None else [first, second]
    with lens_of(models, spec, lambda m, need: load_model(m, options, rows=128, analysis=need),
                 lambda text: say(text, err=True)) as (loaded, result):
        save(store, loaded, result, name, shell_command(["llamalens"] + sys.argv[1:]))
    _print(result, as_json)
    if report_path:
        from llamalens.commands.output import write_report
        from llamalens.reports.lens import lens_document

        write_report(lens_document(result), report_path)


def _models(model_paths) -> tuple:
    """(the model, the second model or None) from the -m options: none (the default model), one or two."""
    from llamalens.errors import InvalidInput
    from llamalens.looks.compare import compare_pair

    if len(model_paths) > 2:
        raise InvalidInput(f"the lens takes one model, or two to compare (-m A -m B); got {len(model_paths)}")
    if len(model_paths) < 2:
        return (model_paths[0] if model_paths else None), None
    a, b = compare_pair(model_paths)
    return str(a), str(b)


def _print(result, as_json: bool) -> None:
    from llamalens.visible import prob_text, visible

    if as_json:
        return json_out(result.to_dict())
    for note in result.notes:
        say(f"note: {note}", err=True)
    shown = result.positions[-SHOWN_POSITIONS:]
    rows = [("layer", *[f"{p.position}:{visible(p.token)[:10]}" for p in shown])]
    for k, layer in enumerate(result.layers):
        tops = [p.layers[k].top[0] for p in shown]
        rows.append((layer, *[f"{visible(t.text)[:12]} {prob_text(t.prob, 2)}" for t in tops]))
    say(f"top token (probability) per layer at the last {len(shown)} of {len(result.positions)} positions looked at:")
    print_table(rows, right={0})
    say("settles at layer: " + ", ".join(f"{p.position}:{'-' if p.settles_at is None else p.settles_at}"
                                         for p in result.positions))
    last = result.positions[-1]
    for q, t in enumerate(result.targets):
        path = " ".join(f"{c.layer}:{c.target[q].rank}" for c in last.layers)
        say(f"target {visible(t['text'])} at position {last.position}, rank by layer: {path}; final p = "
            f"{prob_text(last.layers[-1].target[q].prob)}")
    if result.other is not None:
        _print_pair(result)
    if result.attention is not None:
        _print_attention(result)
    check = result.final_check
    say(f"last layer vs the model's own logits: max |Δ logprob| {check['max_abs_logprob_diff']:.2e} nats, "
        f"same top 10: {'yes' if check['same_top10'] else 'NO'}"
        + ("" if result.run_id is None else f"; saved as run {result.run_id}"))


def _print_attention(result) -> None:
    from llamalens.visible import visible

    att = result.attention
    say(f"attention at position {att['position']} ({visible(result.tokens[att['position']])}), per layer: each head's "
        "most attended position, token and weight:")
    n_head = len(att["layers"][0]["heads"])
    rows = [("layer", *[f"head {h}" for h in range(min(n_head, SHOWN_HEADS))])]
    for a in att["layers"]:
        best = [max(range(len(row)), key=row.__getitem__) for row in a["heads"][:SHOWN_HEADS]]
        rows.append((a["layer"], *[f"{k} {visible(result.tokens[k])[:10]} {row[k]:.2f}"
                                   for k, row in zip(best, a["heads"])]))
    print_table(rows, right={0})
    if n_head > SHOWN_HEADS:
        say(f"(the first {SHOWN_HEADS} of {n_head} heads; --json, the report and export have all)")


def _print_pair(result) -> None:
    from llamalens.visible import visible

    other = result.other
    m = other["model"]
    say(f"against model B {visible(m.get('name') or '')} ({m.get('quantization')}): KL(A || B) between the two lenses over the "
        f"{len(result.positions)} positions, and the share whose top tokens agree, by layer:")
    rows = [("layer", "mean KL", "max KL", "same top")]
    rows += [(r["layer"], f"{r['mean_kl']:.4f}", f"{r['max_kl']:.4f}", f"{r['same_top']:.0%}")
             for r in result.by_layer()]
    print_table(rows, right={0, 1, 2, 3})
    check = other["final_check"]
    say(f"model B's last layer vs its own logits: max |Δ logprob| {check['max_abs_logprob_diff']:.2e} nats, "
        f"same top 10: {'yes' if check['same_top10'] else 'NO'}")


def show_lens(store, run_id, as_json, texts: bool = False, answer: str | None = None):
    """`show` of a lens run: the same summary the command printed (the lens kind's show, run/kinds.py)."""
    no_answer(answer, run_id, "a lens run")
    from llamalens.run.lens import load_lens

    result = load_lens(store, run_id)
    _print(result, as_json)
    return result

"""lens: what each layer of the model would predict at each position of a prompt (the logit lens); and the
summary that `show` prints of a stored lens run."""

from __future__ import annotations

import sys

import click

from llamalens.commands.options import GroupedCommand, json_option, model_options, pop_model_options, report_option, \
    store_option
from llamalens.commands.output import check_report_path, fail_cleanly, json_out, load_model, no_answer, print_table, say, \
    shell_command

SHOWN_POSITIONS = 8  # columns of the terminal's layer x position table


@click.command(cls=GroupedCommand)
@click.argument("prompt")
@click.option("--target", "targets", multiple=True,
              help="A token to follow through the layers: its probability and rank at every cell (repeatable).")
@click.option("--positions", default=None,
              help="Prompt positions to look at: '0,4,-1', '2:10' (a slice) [default: the last 32].")
@click.option("--layers", default=None, help="Layers to look at, as --positions [default: all; the last always].")
@click.option("--top", type=click.IntRange(1, 50), default=5, show_default=True, help="Top tokens kept per cell.")
@click.option("--name", default=None, help="A name for the stored run.")
@json_option
@report_option()
@store_option
@model_options
@fail_cleanly
def lens(prompt, targets, positions, layers, top, name, as_json, report_path, store_path, model, **kw):
    """The logit lens: each layer's next-token distribution at each position of PROMPT.

    Each layer's residual stream, read during one ordinary decode, goes through the model's own final norm and
    output matrix (read from the GGUF, with llama.cpp's arithmetic): its top tokens, entropy, KL to the model's
    final distribution, and the rank of the final answer and of each --target. The last layer reproduces the
    model's logits; the difference is measured and shown on every run. Stored as a run (show, report, export).

    \b
    llamalens lens "The Eiffel Tower is in the city of" --target " Paris" --report lens.html
    llamalens lens "2 + 2 =" --positions -1 --layers 8: --top 10 --json
    """
    from llamalens.run.lens import LensSpec, lens as run_lens, save
    from llamalens.store import Store

    spec = LensSpec(prompt, list(targets), positions, layers, top).check()
    check_report_path(report_path)
    options = pop_model_options(kw)
    store = Store(store_path)
    loaded = load_model(model, options, rows=128)
    result = run_lens(loaded, spec)
    save(store, loaded, result, name, shell_command(["llamalens"] + sys.argv[1:]))
    _print(result, as_json)
    if report_path:
        from llamalens.commands.output import write_report
        from llamalens.reports.lens import lens_document

        write_report(lens_document(result), report_path)


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
    check = result.final_check
    say(f"last layer vs the model's own logits: max |Δ logprob| {check['max_abs_logprob_diff']:.2e} nats, "
        f"same top 10: {'yes' if check['same_top10'] else 'NO'}"
        + ("" if result.run_id is None else f"; saved as run {result.run_id}"))


def show_lens(store, run_id, as_json, texts: bool = False, answer: str | None = None):
    """`show` of a lens run: the same summary the command printed (the lens kind's show, run/kinds.py)."""
    no_answer(answer, run_id, "a lens run")
    from llamalens.run.lens import load_lens

    result = load_lens(store, run_id)
    _print(result, as_json)
    return result

"""fork: the tokens where a model's answer is decided (forking-paths analysis; llamalens/run/fork.py)."""

from __future__ import annotations

import sys

import click

from llamalens.commands.options import GroupedCommand, chat_options, json_option, model_options, pop_chat, pop_model_options, pop_ray, pop_sampling, \
    ray_options, report_option, sampling_options, store_option
from llamalens.commands.output import (check_report_path, fail_cleanly, given_options, json_out, load_model, print_table, ray_executor,
                                       say, shell_command, sweep_progress, until_done, write_report)
from llamalens.commands.confidence import confidence_json, show_answer_confidence

# what a resumed fork run takes from the store; giving any of these with --resume is refused, not ignored
RUN_DEFINED = ("prompt", "outcome", "options_list", "first_line", "samples", "alternatives", "min_prob", "positions",
               "max_tokens", "stop", "parallel", "exact", "max_sequences", "name", "ctx", "batch", "flash_attn",
               "gpu_layers", "temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty",
               "frequency_penalty", "presence_penalty", "seed", "chat", "system", "chat_template", "messages_file",
               "no_repeat_ngram", "ubatch", "swa_full", "repack", "server_prefill")


@click.command("fork", cls=GroupedCommand)
@click.argument("prompt", required=False)
@click.option("--outcome", default=None, help="Outcome = first match of this regex in the completion (its group 1 "
                                              "if it has one).")
@click.option("--options", "options_list", default=None, help="Outcome = which of these comma-separated options "
                                                              "the completion states first, e.g. yes,no.")
@click.option("--outcome-first-line", "first_line", is_flag=True,
              help="Outcome = the completion's first non-empty line, normalised (the default).")
@click.option("--samples", type=int, default=4, show_default=True, help="Continuations per branch.")
@click.option("--alternatives", type=int, default=3, show_default=True,
              help="Top alternatives tried at each position (besides the chosen token).")
@click.option("--min-prob", type=float, default=0.05, show_default=True,
              help="Only alternatives with at least this raw probability.")
@click.option("--positions", default="all", show_default=True, help="Base-path positions to analyse: all, N or N-M.")
@click.option("--max-tokens", "-n", type=int, default=24, show_default=True,
              help="Length of the base path; every continuation ends by the same total length.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--parallel", type=click.IntRange(1, 255), default=32, show_default=True,
              help="Continuations decoded together per llama_decode call.")
@click.option("--exact", is_flag=True, help="One continuation at a time: tokens identical to `generate` from the "
                                            "same prefix and seed.")
@click.option("--max-sequences", type=click.IntRange(1), default=2000, show_default=True,
              help="Refuse a plan with more continuations than this.")
@click.option("--name", default=None, help="A name for the run.")
@click.option("--resume", "resume_id", default=None, help="Finish an interrupted fork run (its missing "
                                                           "continuations only).")
@sampling_options
@chat_options
@ray_options
@json_option
@report_option("Also write the fork report (FILE.html or FILE.md).")
@store_option
@model_options
@fail_cleanly
def fork(prompt, outcome, options_list, first_line, samples, alternatives, min_prob, positions, max_tokens, stop,
         parallel, exact, max_sequences, name, resume_id, as_json, report_path, store_path, model, **kw):
    """Find the tokens of a completion where the answer is decided (forking tokens).

    The base path is one completion of PROMPT (greedy; sampled with the run's settings when --seed is
    given). At each position, the chosen token and its top alternatives are each continued --samples
    times; the outcome of every continuation is read (--options, --outcome or its first line), and the
    outcome distribution o_t is tracked along the path. Where it jumps by more than the sampling noise,
    at a change point, the token there is a forking token.

    \b
    llamalens fork "Q: Is a bat a bird or a mammal? A:" --options bird,mammal -n 12 --report fork.html
    llamalens fork "The best pet is a" --outcome "^ *(\\w+)" --samples 8 --positions 0-9
    llamalens fork --chat "Is a bat a bird or a mammal?" -m gemma-3-270m-it.gguf --options bird,mammal  # an instruction-tuned model
    llamalens fork --resume 12          # after Ctrl-C, a kill or a crash
    llamalens fork "The best pet is a" --samples 8 --threads 8 --ray auto   # continuations on a Ray cluster
    """
    from llamalens.run.fork import ForkSpec, OutcomeSpec, check_spec, execute_fork, parse_positions, resume_target
    from llamalens.run.requests import ForkRequest
    from llamalens.store import Store

    ctx = click.get_current_context()
    chat = pop_chat(kw)
    ray_address, workers = pop_ray(kw)  # before any work: a bad address, or no Ray, fails here
    conv = None
    if resume_id is not None:
        conflicts = given_options(ctx, RUN_DEFINED)
        if conflicts:
            raise click.UsageError(f"--resume finishes a run with its own stored settings; {', '.join(conflicts)} "
                                   "would be ignored: drop them, or start a new fork run")
    elif not prompt and not chat.on:
        raise click.UsageError("give a PROMPT (or --resume RUN)")
    else:
        conv = chat.single(prompt, "fork")
    check_report_path(report_path)
    if resume_id is None:
        modes = [m for m, given in (("--outcome", outcome is not None), ("--options", options_list is not None),
                                    ("--outcome-first-line", first_line)) if given]
        if len(modes) > 1:
            raise click.UsageError(f"{' and '.join(modes)} are different ways to read the outcome: give one")
        spec_outcome = (OutcomeSpec("regex", regex=outcome) if outcome is not None else
                        OutcomeSpec("options", options=tuple(o.strip() for o in options_list.split(",")))
                        if options_list is not None else OutcomeSpec())
        sampled = bool(given_options(ctx, ["seed"]))  # --seed given: the base path is sampled with it
        spec = ForkSpec(prompt or "", pop_sampling(kw), spec_outcome, sampled, samples, alternatives, min_prob,
                        parse_positions(positions), max_tokens, tuple(stop), parallel, exact, max_sequences, name)
        check_spec(spec)  # before loading the model: bad input fails fast
    store = Store(store_path)
    if resume_id is not None:
        run_id, model_path, options = resume_target(store, resume_id, model)
        loaded = load_model(model_path, options)
        info = store.run(run_id)
        say(f"resuming fork run {run_id}: {info.n_samples - info.n_done} of {info.n_samples - 1} continuations to go",
            err=True)
    else:
        req = ForkRequest(spec, conv, chat.template)
        sequences, cells = req.sizing()
        loaded = load_model(model, pop_model_options(kw), sequences=sequences, cells=cells)
        req.render(loaded)
        if req.rendered is not None:
            from llamalens.commands.look import announce_chat

            announce_chat(req.rendered)
        say("decoding the base path ...", err=True)
        run_id, cost = req.start(loaded, store, shell_command(["llamalens"] + sys.argv[1:]),
                                 lambda note: say(f"note: {note}", err=True))
        from llamalens.run.fork import batch_rate

        n_batch = 1 if exact else min(parallel, cost.sequences)
        rate = batch_rate(loaded, loaded.prompt_tokens(spec.prompt), n_batch)
        say(f"run {run_id}: {cost.positions} positions, {cost.sequences:,} continuations, up to {cost.tokens:,} tokens "
            f"({n_batch} per batch); prefill {cost.prefill:,} tokens instead of {cost.naive_prefill:,}; about "
            f"{cost.seconds(rate):.0f} s at the measured {rate:.0f} tokens/s; store {store.path}", err=True)
    executor = ray_executor(ray_address, workers)
    until_done(lambda: execute_fork(loaded, store, run_id, sweep_progress(
        lambda p: f"positions {p.positions_done}/{p.positions_total}, {p.done}/{p.total} continuations"), executor))
    fr = show_fork(store, run_id, as_json)
    if report_path:
        write_fork_report(fr, report_path)


def write_fork_report(fr, report_path, fmt=None) -> None:
    from llamalens.reports.fork import fork_document

    say("writing the report ...", err=True)
    write_report(fork_document(fr), report_path, fmt)


def show_fork(store, run_id, as_json, texts: bool = False, answer: str | None = None):
    """Print a fork run's summary (the forking tokens and the outcome distributions); return the ForkRun.
    `texts`: a fork's texts are its continuations, which `export` writes; the summary says so."""
    from llamalens.run.fork import load_fork
    from llamalens.run.fork_analysis import continuations
    from llamalens.reports.fork import distribution_text, prefill_line
    from llamalens.reports.run import describe_noise
    from llamalens.visible import prob_text, visible

    fr = load_fork(store, run_id)
    info, a = fr.info, fr.analysis
    if as_json:
        json_out({"run": info.to_dict(), "fork": a.to_dict(), "base_text": fr.base.text, "decode_stats": fr.stats,
                  "cost": fr.cost.to_dict() if fr.cost else {}, "confidence": confidence_json(store, run_id, answer)})
        return fr
    say(f"fork run {info.id} {info.name or ''} [{info.status}] model {info.model.name}, {info.n_done - 1}/"
        f"{info.n_samples - 1} continuations at {len(a.positions)} positions; outcome: {fr.outcome.describe()}")
    say(f"base path ({len(fr.base_tokens)} tokens): {fr.base.text!r} -> {a.base_outcome}")
    rows = [("pos", "token", "p", "branches", "n", "o_t", "jump", "noise95", "forking")]
    for i, p in enumerate(a.positions):
        j = a.jump_at(p)
        t = fr.base_tokens[p]
        rows.append((p, visible(t.text, t.bytes), prob_text(t.prob, 3), len(a.branches[i]), continuations(a.branches[i]),
                     distribution_text(a.distribution(i), always=a.declared),
                     f"{j.size:.3f}" if j else "", f"{j.noise95:.3f}" if j else "",
                     "FORK" if j and j.forking else ("cp" if j and j.change_point else "")))
    print_table(rows, right={0, 2, 3, 4, 6, 7})
    forks = a.forking
    say("forking tokens: " + (", ".join(f"{j.position} {visible(fr.base_tokens[j.position].text, fr.base_tokens[j.position].bytes)!s}"
                                         f" (TV {j.size:.2f} > noise {j.noise95:.2f} on {'+'.join(map(str, j.samples))})"
                                         for j in forks) or "none")
        + "; n: the continuations each o_t rests on (the noise level widens as they shrink)")
    say(f"prefill: {prefill_line(fr.stats, fr.cost)}")
    noise = describe_noise(info.noise, compared=None)
    if noise:
        say(noise)
    show_answer_confidence(store, run_id, answer, only={fr.base.sample_idx}, rest="continuations")  # the base path's row
    if texts:
        say(f"--texts: a fork run's texts are its {info.n_done - 1} continuations; "
            f"`llamalens export {info.id} --format jsonl -o FILE` writes each with its position and outcome")
    if info.status != "done":
        say(f"run {info.id} is {info.status}: resume with `llamalens fork --resume {info.id}`")
    return fr

"""eval: lm-evaluation-harness tasks scored by llamalens (llamalens/eval/)."""

from __future__ import annotations

import click

import sys

from llamalens.commands.options import GroupedCommand, json_option, pop_model_options, runtime_options, store_option
from llamalens.commands.output import fail_cleanly, given_options, json_out, no_answer, print_table, say, \
    shell_command, sweep_progress, until_done
from llamalens.visible import visible


@click.command("eval", cls=GroupedCommand)
@click.option("--tasks", "-t", "tasks", default=None,
              help="lm-eval task names, comma-separated (lm-eval's own, the shipped llamalens_capitals and "
                   "llamalens_fables, or yours with --include-path).")
@click.option("--limit", type=float, default=None, help="Documents per task (a fraction below 1: that share of them).")
@click.option("--num-fewshot", type=int, default=None, help="Examples put before each question (default: the task's).")
@click.option("--output-path", type=click.Path(file_okay=False), default=None,
              help="Folder for lm-eval's own results file (and sample files with --log-samples).")
@click.option("--include-path", type=click.Path(file_okay=False), default=None,
              help="A folder of task YAMLs of your own (a local JSON/JSONL dataset runs offline).")
@click.option("--log-samples", is_flag=True, help="Write every document's requests and responses (needs --output-path).")
@click.option("--batch-size", type=click.IntRange(1, 256), default=None,
              help="Sequences decoded together [default: 32; 1 with --exact].")
@click.option("--exact", is_flag=True,
              help="Decode every request alone, as one forward pass over its tokens: the plain figures, slower.")
@click.option("--apply-chat-template", is_flag=True,
              help="Render each prompt with the model's chat template (--chat-template NAME or FILE for another).")
@click.option("--chat-template", default=None, help="A template name or Jinja file for --apply-chat-template.")
@click.option("--model", "-m", "models", multiple=True,
              help="GGUF path or model name; repeat to evaluate several side by side (quants of one model) [default: "
                   "the embedded Gemma 3 270M Q4_K_M].")
@click.option("--name", default=None, help="A name for the eval run.")
@click.option("--resume", "resume_id", default=None, help="Finish an interrupted eval run (its missing requests, then "
                                                           "the metrics).")
@json_option
@store_option
@runtime_options
@fail_cleanly
def eval_cmd(tasks, limit, num_fewshot, output_path, include_path, log_samples, batch_size, exact,
             apply_chat_template, chat_template, models, name, resume_id, as_json, store_path, **kw):
    """Benchmark models on lm-evaluation-harness tasks, with llamalens's exact log-likelihoods.

    Prints lm-eval's table; in the default (batched) mode also the noise floor (the largest difference
    between a batched and an exact score among re-scored requests) and the questions decided by less.
    The evaluation is a run in the store, every request's tokens with it: `show`, `report` and `export`
    read it back, and an interrupted one finishes with --resume. Several -m: each task's metrics per model
    side by side, and the questions the models answer differently.
    Needs the 'eval' extra: pip install 'llamalens[eval]'.

    \b
    llamalens eval --tasks llamalens_capitals
    llamalens eval --tasks llamalens_capitals,llamalens_fables --exact --output-path results/
    llamalens eval --tasks my_task --include-path tasks/ --limit 50 --num-fewshot 5 -m qwen2.5-0.5b
    llamalens eval --tasks llamalens_capitals -m model-q4_k_m.gguf -m model-q2_k.gguf
    llamalens eval --resume 12          # after Ctrl-C, a kill or a crash
    """
    from llamalens.eval.run import EvalRequest, resume_run, run_request
    from llamalens.store import Store

    announce = lambda m: say(f"evaluating with {m.path.name}", err=True)  # noqa: E731
    done: list = []
    if resume_id is not None:
        conflicts = given_options(click.get_current_context(), RUN_DEFINED)
        if conflicts:
            raise click.UsageError(f"--resume finishes an eval run with its own stored tasks, models and settings; "
                                   f"{', '.join(conflicts)} would be ignored: drop them, or start a new eval")
        until_done(lambda: done.append(resume_run(Store(store_path), resume_id, on_model=announce,
                                                  on_progress=sweep_progress(_requests), output_path=output_path,
                                                  log_samples=log_samples)))
        res = done[0]
    else:
        if not tasks:
            raise click.UsageError("give --tasks NAME[,NAME...] (or --resume RUN)")
        options = pop_model_options(kw)
        request = EvalRequest([t for t in tasks.split(",")], model=list(models) or [None], limit=_limit(limit),
                              num_fewshot=num_fewshot, output_path=output_path, include_path=include_path,
                              log_samples=log_samples, batch_size=batch_size, apply_chat_template=apply_chat_template,
                              chat_template=chat_template, exact=exact, model_options=options.to_dict())
        until_done(lambda: done.append(run_request(request, Store(store_path), name,
                                                   shell_command(["llamalens"] + sys.argv[1:]), announce,
                                                   sweep_progress(_requests))))
    res = done[0]
    if as_json:
        json_out(res.to_dict())
        return
    if len(res.models) == 1:
        say(res.table())
    show_eval(Store(store_path, read_only=True), res.run_id, False)
    for f in res.files:
        say(f"wrote {f}", err=True)


# what a resumed eval takes from the store; giving any of these with --resume is refused, not ignored
RUN_DEFINED = ("tasks", "limit", "num_fewshot", "include_path", "batch_size", "exact", "apply_chat_template",
               "chat_template", "models", "name", "ctx", "batch", "flash_attn", "gpu_layers", "ubatch", "swa_full",
               "repack")


def _requests(prog) -> str:
    return f"{prog.done}/{prog.total} requests"


def _limit(limit):
    """--limit as lm-eval takes it: a whole number of documents, or a fraction of them."""
    return int(limit) if limit is not None and limit >= 1 and float(limit).is_integer() else limit  # inf stays inf


SHOWN = 10  # closest calls and disagreements printed


def show_eval(store, run_id, as_json, texts: bool = False, answer: str | None = None):
    """`show` of an eval run (the eval kind's show, run/kinds.py): each task's metrics per model, each model's
    requests, speed and noise floor, its closest calls, and the questions the models answer differently."""
    from llamalens.run.evaluation import load_eval

    no_answer(answer, run_id, "an eval run")
    run = load_eval(store, run_id)
    n = len(run.models)
    if as_json:
        json_out({"run": run.info.to_dict(), "metrics": [{"task": t, "metric": m, "values": v}
                                                         for t, m, v in run.metrics()],
                  "models": [{"name": run.model_name(k), **run.backend(k)} for k in range(n)],
                  "disagreements": run.disagreements()})
        return run
    info = run.info
    say(f"run {info.id} {visible(info.name or '')} [{info.status}] eval of {visible(', '.join(run.spec['tasks']))}: "
        f"{n} model(s), "
        f"{'exact' if run.spec['exact'] else 'batched, batch size ' + str(run.spec['batch_size'])}")
    if run.metrics():
        print_table([("task", "metric", *(f"{k}: {run.model_name(k)}" for k in range(n)))]
                    + [(t, m, *(_number(v) for v in vals)) for t, m, vals in run.metrics()],
                    right=set(range(2, 2 + n)))
    for k in range(n):
        _backend(run.backend(k), f"{k}: {visible(run.model_name(k))}: " if n > 1 else "")
        calls = [c for c in run.questions(k) if c.below_floor] or run.questions(k)[:3]
        for c in calls[:SHOWN]:
            say(f"  {visible(c.task)} document {c.doc}: best two options {c.margin:.4f} nats apart"
                + (" (less than the noise floor)" if c.below_floor else ""))
    dis = run.disagreements()
    if n > 1:
        say(f"{len(dis)} question(s) answered differently by the models" + (":" if dis else ""))
        for d in dis[:SHOWN]:
            chosen = ", ".join(f"{k}: {visible(d['options'][c])} ({m:.3f})"
                               for k, (c, m) in enumerate(zip(d["chosen"], d["margins"])))
            say(f"  {visible(d['task'])} document {d['doc']}: {chosen}")
    return run


def _number(v) -> str:
    return "" if v is None else f"{v:.4f}" if abs(v) < 1e6 else f"{v:.4g}"


def _backend(stats: dict, head: str = "") -> None:
    rate = stats.get("requests_per_s")
    say(f"{head}{sum(stats['requests'].values())} requests in {stats['seconds']:.1f} s"
        + (f", {rate:.1f} requests/s" if rate else ""))
    if stats["noise_floor"] is not None:
        calls = stats["close_calls"]
        say(f"noise floor: batched scores differ from exact ones by up to {stats['noise_floor']:.4f} nats "
            f"({stats['noise_pairs']} requests re-scored alone); {len(calls)} question(s) decided by less"
            + ("; --exact gives the plain figures" if calls else ""))
    for note in stats["notes"]:
        say(f"note: {note}", err=True)

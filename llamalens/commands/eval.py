"""eval: lm-evaluation-harness tasks scored by llamalens (llamalens/eval/)."""

from __future__ import annotations

import click

from llamalens.commands.options import GroupedCommand, json_option, model_options, pop_model_options
from llamalens.commands.output import fail_cleanly, json_out, say


@click.command("eval", cls=GroupedCommand)
@click.option("--tasks", "-t", "tasks", required=True,
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
@json_option
@model_options
@fail_cleanly
def eval_cmd(tasks, limit, num_fewshot, output_path, include_path, log_samples, batch_size, exact,
             apply_chat_template, chat_template, as_json, model, **kw):
    """Benchmark a model on lm-evaluation-harness tasks, with llamalens's exact log-likelihoods.

    Prints lm-eval's table; in the default (batched) mode also the noise floor (the largest difference
    between a batched and an exact score among re-scored requests) and the questions decided by less.
    Needs the 'eval' extra: pip install 'llamalens[eval]'.

    \b
    llamalens eval --tasks llamalens_capitals
    llamalens eval --tasks llamalens_capitals,llamalens_fables --exact --output-path results/
    llamalens eval --tasks my_task --include-path tasks/ --limit 50 --num-fewshot 5 -m qwen2.5-0.5b
    """
    from llamalens.eval.run import EvalRequest, run_request

    options = pop_model_options(kw)
    request = EvalRequest([t for t in tasks.split(",")], model=model, limit=_limit(limit), num_fewshot=num_fewshot,
                          output_path=output_path, include_path=include_path, log_samples=log_samples,
                          batch_size=batch_size, apply_chat_template=apply_chat_template,
                          chat_template=chat_template, exact=exact, model_options=options.to_dict())
    res = run_request(request, on_model=lambda lm: say(f"evaluating with {lm.model.path.name} "
                                                    f"({'exact' if lm.exact else f'batch size {lm.batch_size}'})",
                                                    err=True))
    if as_json:
        json_out(res.to_dict())
        return
    say(res.table())
    _backend(res.stats)
    for f in res.files:
        say(f"wrote {f}", err=True)


def _limit(limit):
    """--limit as lm-eval takes it: a whole number of documents, or a fraction of them."""
    return int(limit) if limit is not None and limit >= 1 and float(limit).is_integer() else limit  # inf stays inf


def _backend(stats: dict) -> None:
    rate = stats.get("requests_per_s")
    say(f"{sum(stats['requests'].values())} requests ({stats['pairs']} decoded) in {stats['seconds']:.1f} s"
        + (f", {rate:.1f} requests/s" if rate else ""))
    if stats["noise_floor"] is not None:
        calls = stats["close_calls"]
        say(f"noise floor: batched scores differ from exact ones by up to {stats['noise_floor']:.4f} nats "
            f"({stats['noise_pairs']} requests re-scored alone); {len(calls)} question(s) decided by less"
            + ("; --exact gives the plain figures" if calls else ""))
        for task, doc, margin in sorted(calls, key=lambda c: c[2])[:10]:
            say(f"  {task} document {doc}: best two options {margin:.4f} nats apart")
    for note in stats["notes"]:
        say(f"note: {note}", err=True)

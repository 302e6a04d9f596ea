"""Looking at a model: models, tokenize, next, generate."""

from __future__ import annotations

import math

import click

from .options import axis_options, chain_option, json_option, llama_cpp_sampling_options, model_options, pop_axes, \
    pop_model_options, pop_sampling, report_option, sampling_options
from .output import say, alternatives, check_report_path, fail_cleanly, fmt_size, json_out, load_model, print_confidence, \
    print_table, write_report

MAX_NEXT_COLUMNS = 12


@click.command()
@json_option
@fail_cleanly
def models(as_json):
    """List the GGUF models found (./models, the checkout's models/, $LLAMALENS_MODELS, the default).

    Read from each file's header: no weights are loaded. --json also gives the llama.cpp build (the CPU
    features it uses, and the CMake flags scripts/install.sh built it with).
    """
    from ..models import list_models
    from ..runtime import build_info

    found = list_models()
    if as_json:
        return json_out({"build": build_info(), "models": [m.to_dict() for m in found]})
    if not found:
        return say("no models found; put .gguf files in ./models or set LLAMALENS_MODELS (see models/README.md)")
    rows = [("name", "arch", "size", "quant", "vocab", "ctx", "file", "path")]
    for m in found:
        rows.append((m.name + (" (default)" if m.default else ""), m.architecture, m.size_label, m.quantization,
                     f"{m.vocab_size:,}" if m.vocab_size else "?", f"{m.context_length:,}" if m.context_length else "?",
                     fmt_size(m.file_size), m.path))
    print_table(rows)


@click.command()
@click.argument("text")
@click.option("--bos", is_flag=True, help="Add the model's BOS token as a prompt would.")
@json_option
@model_options
@fail_cleanly
def tokenize(text, bos, as_json, model, **kw):
    """Split TEXT into tokens: each token's id, text and exact bytes."""
    from ..distribution import tokenize as split
    from ..visible import visible

    tokens = split(load_model(model, pop_model_options(kw)), text, add_bos=bos)
    if as_json:
        return json_out({"text": text, "count": len(tokens), "tokens": [t.to_dict() for t in tokens]})
    print_table([("#", "id", "token", "bytes")] + [(t.index, t.id, visible(t.text, t.bytes), t.bytes) for t in tokens],
                right={0, 1})
    say(f"{len(tokens)} tokens, {len(text.encode('utf-8'))} bytes")


@click.command("next")
@click.argument("prompt")
@click.option("--top", type=click.IntRange(1, 1000), default=10, show_default=True, help="How many tokens to show.")
@axis_options("temperature", "top_k", "top_p", "min_p", help_prefix="Also show the distribution after each value: ")
@json_option
@report_option("With sampler settings: also write a report with the bar charts (FILE.html or FILE.md).")
@model_options
@fail_cleanly
def next_cmd(prompt, top, as_json, report_path, model, **kw):
    """The distribution of the token after PROMPT: top N with probabilities, and the entropy.

    With sampler settings, one more column per combination of them: the same tokens' probabilities
    after llama.cpp's sampler chain (top_k -> top_p -> min_p -> temperature) - the softmax-with-
    temperature lesson on real logits. Settings not given are off (temperature 1, no truncation).

    \b
    llamalens next "The capital of France is" --top 10
    llamalens next "The capital of France is" -t 0.5,1,2
    llamalens next "The capital of France is" -t 0.7 --top-k 2 --top-p 0.5,0.95
    """
    from .. import grid
    from ..settings import NEUTRAL, changes_label

    axes = grid.parse_axes(pop_axes(kw))
    configs = grid.expand(axes, NEUTRAL) if axes else []
    if configs:
        grid.check(configs, [0])
        if len(configs) > MAX_NEXT_COLUMNS:
            raise click.UsageError(f"{len(configs)} combinations of settings is more columns than a table can show "
                                   f"(at most {MAX_NEXT_COLUMNS}); give fewer values, or use `llamalens sweep ... "
                                   "--report FILE` for a whole grid")
    elif report_path:
        raise click.UsageError("--report shows how sampler settings reshape the distribution: give -t, --top-k, "
                               "--top-p or --min-p values too")
    check_report_path(report_path)
    loaded = load_model(model, pop_model_options(kw))
    if not configs:
        return _print_next(loaded, prompt, top, as_json)
    from ..distribution import sampler_view
    from ..reports.texts import next_document

    view = sampler_view(loaded, prompt, [], configs, top, labels=[changes_label(c) for c in configs])
    if report_path:
        write_report(next_document(view, loaded.describe()), report_path)
    if as_json:
        return json_out(view.to_dict())
    _print_sampler_view(view, loaded.n_vocab)


def _print_next(model, prompt, top, as_json) -> None:
    from ..distribution import next_token
    from ..visible import visible

    nt = next_token(model, prompt, top)
    if as_json:
        return json_out(nt.to_dict())
    rows = [("rank", "token", "prob", "logprob", "id")]
    for i, a in enumerate(nt.top, 1):
        rows.append((i, visible(a.text, a.bytes), f"{math.exp(a.logprob):.4f}", f"{a.logprob:.4f}", a.id))
    print_table(rows, right={0, 2, 3, 4})
    shown = sum(math.exp(a.logprob) for a in nt.top)
    say(f"entropy {nt.entropy:.4f} nats; these {len(nt.top)} tokens hold {shown:.1%} of the probability")


def _print_sampler_view(view, n_vocab: int) -> None:
    from ..visible import visible

    rows = [("rank", "token", "raw") + tuple(ch.label for ch in view.chains)]
    for i, a in enumerate(view.top):
        rows.append((i + 1, visible(a.text, a.bytes), f"{math.exp(a.logprob):.4f}")
                    + tuple(f"{ch.final.probs[i]:.4f}" if ch.final.probs[i] > 0 else "-" for ch in view.chains))
    rows.append(("", "tokens left", f"{n_vocab:,}") + tuple(f"{ch.final.survivors:,}" for ch in view.chains))
    print_table(rows, right=set(range(0, 3 + len(view.chains))) - {1})
    say(f"raw = softmax of the logits (entropy {view.entropy:.4f} nats); each column = the same tokens after "
               "that sampler chain; - = removed")


@click.command()
@click.argument("prompt")
@sampling_options
@chain_option
@llama_cpp_sampling_options
@click.option("--max-tokens", "-n", type=int, default=16, show_default=True, help="Tokens to generate.")
@click.option("--logprobs", type=int, default=5, show_default=True, help="Top alternatives per token.")
@click.option("--stop", multiple=True, help="Stop at this string (repeatable).")
@click.option("--text", "as_text", is_flag=True, help="Print the text coloured by each token's probability.")
@json_option
@model_options
@fail_cleanly
def generate(prompt, chain, max_tokens, logprobs, stop, as_text, as_json, model, **kw):
    """Generate from PROMPT and show each token: probability, rank, entropy, candidates, alternatives.

    --chain llama.cpp samples as llama-server does (its samplers, its defaults, its context options):

    \b
    llamalens generate "Once upon a time" --chain llama.cpp --dry-multiplier 0.8 --xtc-probability 0.5
    """
    from ..engine import Engine, Request, context_notes
    from ..errors import InvalidSettings

    req = Request(prompt, pop_sampling(kw, chain), max_tokens, logprobs, tuple(stop))
    problems = req.problems()
    if problems:  # before loading the model: bad input fails fast
        raise InvalidSettings("; ".join(problems))
    loaded = load_model(model, pop_model_options(kw, chain))
    engine = Engine(loaded, 1)
    for note in context_notes(engine.prepare([req]), loaded.options.ctx):
        say(f"note: {note}", err=True)
    sample = next(iter(engine.run([req])))
    if as_json:
        d = sample.to_dict()
        return json_out({"model": loaded.describe(), "prompt": prompt, "settings": d["settings"], "text": d["text"],
                         "finish_reason": d["finish_reason"], "tokens": d["tokens"], "timing": d["timing"]})
    if as_text:
        return print_confidence(prompt, [t for t in sample.tokens if not t.eog])
    _print_sample(sample)


def _print_sample(sample) -> None:
    from ..visible import visible

    rows = [("#", "token", "prob", "logprob", "rank", "entropy", "cand", "sampled p", "top alternatives")]
    for t in sample.tokens:
        rows.append((t.position, visible(t.text, t.bytes) + (" [end]" if t.eog else ""), f"{t.prob:.4f}",
                     f"{t.logprob:.4f}", t.rank, f"{t.entropy:.3f}", t.candidates,
                     f"{math.exp(t.sampled_logprob):.4f}", alternatives(t.top)))
    print_table(rows, right={0, 2, 3, 4, 5, 6, 7})
    say("")
    say(f"text: {sample.prompt}\u2502{sample.text}")
    tm = sample.timing
    say(f"finish: {sample.finish_reason}; {tm.generated_tokens} tokens; prompt {tm.prompt_tokens} tokens; "
               f"first token {tm.first_token_ms:.0f} ms; {tm.tokens_per_s:.1f} tokens/s")

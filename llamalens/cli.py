"""The command line: thin click commands over the Python API.

Each command parses options, calls one library function, and prints. Data goes to stdout (a table,
or JSON with --json), status to stderr. Library errors (LlamalensError) become one-line
`Error: ...` messages with exit status 1; click's own usage errors exit 2. Heavy modules (llama_cpp,
numpy, matplotlib) are imported inside commands so that `llamalens --help` is instant.
"""

from __future__ import annotations

import functools
import json
import math
import sys

import click

from . import __version__
from .errors import LlamalensError


def _fail_cleanly(fn):
    """Turn library errors into click errors and Ctrl-C into a clean exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LlamalensError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def model_options(fn):
    """--model, --gpu-layers, --ctx, --threads, --batch, --flash-attn: shared by every model command."""
    opts = [
        click.option("--model", "-m", default=None, envvar="LLAMALENS_MODEL", show_envvar=True,
                     help="GGUF path or model name (see `llamalens models`); default: embedded Gemma 3 270M Q4_K_M."),
        click.option("--gpu-layers", type=int, default=0, show_default=True,
                     help="Layers to offload to the GPU (-1 = all); needs a CUDA or Metal build."),
        click.option("--ctx", type=int, default=2048, show_default=True,
                     help="Context window per sequence: prompt + generated tokens."),
        click.option("--threads", type=int, default=None, help="CPU threads (default: all cores)."),
        click.option("--batch", type=int, default=512, show_default=True, help="Prompt tokens per decode call."),
        click.option("--flash-attn", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                     help="llama.cpp's flash attention setting (changes logits slightly; recorded per run)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _load(model, gpu_layers, ctx, threads, batch, flash_attn):
    from .models import resolve_model
    from .runtime import Model, ModelOptions

    path = resolve_model(model)
    click.echo(f"loading {path.name} ...", err=True)
    return Model(path, ModelOptions(gpu_layers=gpu_layers, ctx=ctx, threads=threads, batch=batch,
                                    flash_attn=flash_attn))


def _model_from(kw):
    return _load(kw.pop("model"), kw.pop("gpu_layers"), kw.pop("ctx"), kw.pop("threads"), kw.pop("batch"),
                 kw.pop("flash_attn"))


def _json_out(obj) -> None:
    click.echo(json.dumps(obj, ensure_ascii=False, indent=2))


def _fmt_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llamalens")
def main():
    """llamalens: what a language model thinks, token by token (local GGUF models, llama.cpp).

    \b
    Quick start (embedded Gemma 3 270M model):
      llamalens next "The capital of France is"
      llamalens generate "Once upon a time" --temperature 0.7 --logprobs 5
      llamalens tokenize "Preposterous, I'm flabbergasted!"
    """


# -- models -----------------------------------------------------------------------------------
@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_fail_cleanly
def models(as_json):
    """List the GGUF models found (./models, the checkout's models/, $LLAMALENS_MODELS, the default).

    Read from each file's header: no weights are loaded.
    """
    from .models import list_models

    found = list_models()
    if as_json:
        _json_out([m.to_dict() for m in found])
        return
    if not found:
        click.echo("no models found; put .gguf files in ./models or set LLAMALENS_MODELS (see models/README.md)")
        return
    rows = [("name", "arch", "size", "quant", "vocab", "ctx", "file", "path")]
    for m in found:
        rows.append((m.name + (" (default)" if m.default else ""), m.architecture, m.size_label, m.quantization,
                     f"{m.vocab_size:,}" if m.vocab_size else "?", f"{m.context_length:,}" if m.context_length else "?",
                     _fmt_size(m.file_size), m.path))
    _print_table(rows)


def _print_table(rows, right: set[int] = frozenset()) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        click.echo("  ".join(cells).rstrip())
        if j == 0:
            click.echo("  ".join("-" * w for w in widths))


# -- tokenize ---------------------------------------------------------------------------------
@main.command()
@click.argument("text")
@click.option("--bos", is_flag=True, help="Add the model's BOS token as a prompt would.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@model_options
@_fail_cleanly
def tokenize(text, bos, as_json, **kw):
    """Split TEXT into tokens: each token's id, text and exact bytes."""
    from .display import visible
    from .views import tokenize as tok

    model = _model_from(kw)
    tokens = tok(model, text, add_bos=bos)
    if as_json:
        _json_out({"text": text, "count": len(tokens), "tokens": [t.to_dict() for t in tokens]})
        return
    rows = [("#", "id", "token", "bytes")]
    rows += [(t.index, t.id, visible(t.text, t.bytes), t.bytes) for t in tokens]
    _print_table(rows, right={0, 1})
    click.echo(f"{len(tokens)} tokens, {len(text.encode('utf-8'))} bytes")


# -- next -------------------------------------------------------------------------------------
@main.command("next")
@click.argument("prompt")
@click.option("--top", type=click.IntRange(1, 1000), default=10, show_default=True, help="How many tokens to show.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@model_options
@_fail_cleanly
def next_cmd(prompt, top, as_json, **kw):
    """The distribution of the token after PROMPT: top N with probabilities, and the entropy."""
    from .display import visible
    from .views import next_token

    model = _model_from(kw)
    nt = next_token(model, prompt, top)
    if as_json:
        _json_out(nt.to_dict())
        return
    rows = [("rank", "token", "prob", "logprob", "id")]
    for i, a in enumerate(nt.top, 1):
        rows.append((i, visible(a.text, a.bytes), f"{math.exp(a.logprob):.4f}", f"{a.logprob:.4f}", a.id))
    _print_table(rows, right={0, 2, 3, 4})
    shown = sum(math.exp(a.logprob) for a in nt.top)
    click.echo(f"entropy {nt.entropy:.4f} nats; these {len(nt.top)} tokens hold {shown:.1%} of the probability")


# -- generate ---------------------------------------------------------------------------------
def sampling_options(fn):
    from .settings import SamplingSettings as S

    d = S()
    opts = [
        click.option("--temperature", "-t", type=float, default=d.temperature, show_default=True,
                     help="0 = greedy."),
        click.option("--top-k", type=int, default=d.top_k, show_default=True, help="0 = off."),
        click.option("--top-p", type=float, default=d.top_p, show_default=True, help="1 = off."),
        click.option("--min-p", type=float, default=d.min_p, show_default=True, help="0 = off."),
        click.option("--typical-p", type=float, default=d.typical_p, show_default=True, help="1 = off."),
        click.option("--repeat-penalty", type=float, default=d.repeat_penalty, show_default=True, help="1 = off."),
        click.option("--frequency-penalty", type=float, default=d.frequency_penalty, show_default=True),
        click.option("--presence-penalty", type=float, default=d.presence_penalty, show_default=True),
        click.option("--seed", type=int, default=d.seed, show_default=True),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@main.command()
@click.argument("prompt")
@sampling_options
@click.option("--max-tokens", "-n", type=int, default=16, show_default=True, help="Tokens to generate.")
@click.option("--logprobs", type=int, default=5, show_default=True, help="Top alternatives per token.")
@click.option("--stop", multiple=True, help="Stop at this string (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@model_options
@_fail_cleanly
def generate(prompt, max_tokens, logprobs, stop, as_json, **kw):
    """Generate from PROMPT and show each token: probability, rank, entropy, candidates, alternatives."""
    from .engine import Engine, Request
    from .settings import SamplingSettings

    settings = SamplingSettings(**{k: kw.pop(k) for k in list(kw) if k in SamplingSettings.__dataclass_fields__})
    req = Request(prompt, settings, max_tokens, logprobs, tuple(stop))
    problems = req.problems()
    if problems:  # before loading the model: bad input fails fast
        raise click.ClickException("; ".join(problems))
    model = _model_from(kw)
    sample = next(iter(Engine(model, 1).run([req])))
    if as_json:
        d = sample.to_dict()
        _json_out({"model": model.describe(), "prompt": prompt, "settings": d["settings"], "text": d["text"],
                   "finish_reason": d["finish_reason"], "tokens": d["tokens"], "timing": d["timing"]})
        return
    _print_sample(sample)


def _print_sample(sample) -> None:
    from .display import visible

    rows = [("#", "token", "prob", "logprob", "rank", "entropy", "cand", "sampled p", "top alternatives")]
    for t in sample.tokens:
        alts = "  ".join(f"{visible(a.text, a.bytes)} {math.exp(a.logprob):.3f}" for a in t.top)
        rows.append((t.position, visible(t.text, t.bytes) + (" [end]" if t.eog else ""), f"{t.prob:.4f}",
                     f"{t.logprob:.4f}", t.rank, f"{t.entropy:.3f}", t.candidates,
                     f"{math.exp(t.sampled_logprob):.4f}", alts))
    _print_table(rows, right={0, 2, 3, 4, 5, 6, 7})
    click.echo("")
    click.echo(f"text: {sample.prompt}\u2502{sample.text}")
    tm = sample.timing
    click.echo(f"finish: {sample.finish_reason}; {tm.generated_tokens} tokens; prompt {tm.prompt_tokens} tokens; "
               f"first token {tm.first_token_ms:.0f} ms; {tm.tokens_per_s:.1f} tokens/s")


if __name__ == "__main__":  # pragma: no cover
    main()

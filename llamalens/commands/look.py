"""Looking at a model: models, tokenize, next, generate."""

from __future__ import annotations

import math

import click

from llamalens.commands.options import GroupedCommand, axis_options, chain_option, chat_options, grammar_options, json_option, \
    llama_cpp_fixed_options, llama_cpp_sampling_options, model_options, pop_axes, pop_chat, pop_grammar, pop_model_options, pop_sampling, \
    report_option, sampling_options
from llamalens.modelfiles.memory import available_ram, for_model as fit_estimate, gb, laptops
from llamalens.settings import ModelOptions, SamplingSettings
from llamalens.commands.output import say, alternatives, check_report_path, fail_cleanly, fmt_size, json_out, load_model, \
    print_confidence, print_table, write_report

MAX_NEXT_COLUMNS = 12


@click.command(cls=GroupedCommand)
@click.argument("name", required=False)
@click.option("--fit", is_flag=True, help="Also estimate the RAM each model needs (default settings, or those given) "
                                          "against the RAM available now.")
@click.option("--ctx", type=int, default=ModelOptions().ctx, show_default=True, help="Context for the estimate.")
@click.option("--batch", type=int, default=ModelOptions().batch, show_default=True, help="Batch for the estimate.")
@click.option("--parallel", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Sequences decoded side by side, for the estimate.")
@json_option
@fail_cleanly
def models(name, fit, ctx, batch, parallel, as_json):
    """List the GGUF models found, or describe NAME: ./models, the checkout's models/, $LLAMALENS_MODELS, the
    stores of Ollama, LM Studio, the Hugging Face cache and llama.cpp's cache, and the default.

    Read from each file's header: no weights are loaded, nothing is downloaded. The `source` column is the
    name --model takes. --json also gives the llama.cpp build (the CPU features it uses, and the CMake flags
    scripts/install.sh built it with); NAME --json and --fit add the memory estimate.

    \b
    llamalens models --fit
    llamalens models ollama:llama3.2:3b --json
    """
    from llamalens.modelfiles.find import list_models, model_info, resolve_source
    from llamalens.modelfiles.gguf_header import read_header
    from llamalens.core.runtime import build_info

    options = ModelOptions(ctx=ctx, batch=batch)
    if name:
        found = resolve_source(name)
        info = model_info(found.path, default=found.store == "default", found=found).to_dict()
        est = fit_estimate(found, options, sequences=parallel)
        header = read_header(found.path)
        laptop_rows = laptops(header, options, weights=found.size)
        if as_json:
            return json_out({"build": build_info(), "model": info, "memory_estimate": est.to_dict(),
                             "laptops": laptop_rows})
        for key in ("source", "store", "path", "architecture", "size_label", "quantization", "parts", "digest"):
            if info[key] not in ("", None, 1) or key == "parts" and info[key] > 1:
                say(f"{key:<13} {info[key]}")
        say(f"{'file':<13} {fmt_size(info['file_size'])}")
        _say_fit(est, name)
        return _say_laptops(laptop_rows, options)
    found = list_models()
    fits = {}
    if fit:
        from llamalens.modelfiles.find import found_for
        fits = {m.path: fit_estimate(found_for(m), options, sequences=parallel) for m in found
                if not m.architecture.startswith("invalid")}
    if as_json:
        rows = [{**m.to_dict(), **({"memory_estimate": fits[m.path].to_dict()} if m.path in fits else {})}
                for m in found]
        return json_out({"build": build_info(), "models": rows})
    if not found:
        return say("no models found; put .gguf files in ./models or set LLAMALENS_MODELS (see models/README.md)")
    head = ("source", "arch", "size", "quant", "vocab", "ctx", "file") + (("needs", "fits") if fit else ()) + ("path",)
    rows = [head]
    for m in found:
        est = fits.get(m.path)
        cells = ((gb(est.total), {True: "yes", False: "NO", None: "?"}[est.fits]) if est else ("", "")) if fit else ()
        rows.append((m.name + (" (default)" if m.default else ""), m.architecture, m.size_label, m.quantization,
                     f"{m.vocab_size:,}" if m.vocab_size else "?", f"{m.context_length:,}" if m.context_length else "?",
                     fmt_size(m.file_size) + (f" in {m.parts} parts" if m.parts > 1 else "")) + cells + (m.path,))
    print_table(rows)
    if fit:
        say(f"estimated for --ctx {ctx} --batch {batch}, {parallel} sequence(s); {gb(available_ram())} RAM available")


@click.command(cls=GroupedCommand)
@click.argument("src")
@click.argument("dst", type=click.Path(dir_okay=False))
@click.argument("kind", metavar="TYPE")
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True, help="CPU threads (0 = all cores).")
@json_option
@fail_cleanly
def quantize(src, dst, kind, threads, as_json):
    """Write DST: the model SRC (a GGUF path or a model name, as --model takes) quantized to TYPE (Q8_0, Q4_K_M,
    Q2_K, ...) by llama.cpp's own quantizer: the second file `compare` measures against SRC. When SRC is
    itself quantized, says that the result is no better a reference than SRC.

    \b
    llamalens quantize default model-q2_k.gguf Q2_K
    """
    from pathlib import Path

    from llamalens.core.runtime import quantize as quantize_file, quantized_source_note
    from llamalens.errors import InvalidInput
    from llamalens.modelfiles.find import resolve_model

    source, out = resolve_model(src), Path(dst)
    if out.exists():
        raise InvalidInput(f"{out} exists; choose another name or remove it first")
    if not (out.parent if str(out.parent) else Path(".")).is_dir():
        raise InvalidInput(f"cannot write {out}: folder {out.parent} does not exist")
    note = quantized_source_note(source, kind)
    say(f"quantizing {source.name} to {kind.upper()} ...", err=True)
    quantize_file(source, out, kind, threads)
    result = {"source": str(source), "output": str(out), "type": kind.upper(), "source_size": source.stat().st_size,
              "size": out.stat().st_size, "note": note}
    if as_json:
        return json_out(result)
    say(f"wrote {out} ({fmt_size(result['size'])}, from {fmt_size(result['source_size'])})")
    if note:
        say(f"note: {note}")


def _say_laptops(rows, options) -> None:
    """The largest context a sequence that fits on laptops of 8, 16 and 32 GB, by sequences side by side."""
    say(f"\nlaptops: the largest --ctx that fits in three quarters of the RAM (--batch {options.batch}, "
        f"flash attention {options.flash_attn})")
    counts = list(rows[0]["contexts"])
    table = [("RAM",) + tuple(f"{n} sequence{'s' * (n > 1)}" for n in counts)]
    for r in rows:
        table.append((f"{r['ram_gb']} GiB",) + tuple(f"{c:,}" if c else "does not fit" for c in r["contexts"].values()))
    print_table(table, right=set(range(1, len(counts) + 1)))


def _say_fit(est, name) -> None:
    say(f"{'memory':<13} {est.breakdown()} (--ctx {est.ctx}, --batch {est.batch}, {est.sequences} sequence(s))")
    if est.weights_gpu:
        say(f"{'VRAM':<13} {gb(est.weights_gpu)} of weights on the GPU (not checked)")
    if est.repacked:
        say(f"{'peak RSS':<13} {gb(est.peak)}: {gb(est.repacked)} of weights are repacked for this CPU, and their mapped "
            "file pages stay resident until the kernel reclaims them")
    verdict = {True: "fits", False: "does NOT fit", None: "unknown"}[est.fits]
    say(f"{'available':<13} {gb(est.available)}: {verdict}")


@click.command(cls=GroupedCommand)
@click.argument("text")
@click.option("--bos", is_flag=True, help="Add the model's BOS token as a prompt would.")
@json_option
@model_options
@fail_cleanly
def tokenize(text, bos, as_json, model, **kw):
    """Split TEXT into tokens: each token's id, text and exact bytes.

    \b
    llamalens tokenize "Preposterous, I'm flabbergasted!"
    """
    from llamalens.looks.next_token import tokenize as split
    from llamalens.visible import visible

    tokens = split(load_model(model, pop_model_options(kw)), text, add_bos=bos)
    if as_json:
        return json_out({"text": text, "count": len(tokens), "tokens": [t.to_dict() for t in tokens]})
    print_table([("#", "id", "token", "bytes")] + [(t.index, t.id, visible(t.text, t.bytes), t.bytes) for t in tokens],
                right={0, 1})
    say(f"{len(tokens)} tokens, {len(text.encode('utf-8'))} bytes")


# next's sampler settings given as lists (one column per combination); the llama.cpp chain's others take one value
NEXT_AXES = ("temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty", "dry_multiplier", "dry_base",
             "dry_allowed_length", "xtc_probability", "xtc_threshold", "top_n_sigma", "dynatemp_range", "mirostat",
             "mirostat_tau", "samplers")


@click.command("next", cls=GroupedCommand)
@click.argument("prompt", required=False)
@click.option("--top", type=click.IntRange(1, 1000), default=10, show_default=True, help="How many tokens to show.")
@axis_options(*NEXT_AXES)
@chain_option
@llama_cpp_fixed_options(*NEXT_AXES)
@click.option("--seed", type=int, default=None, help="Seed of the chain's random draws (XTC's) [default: "
                                                      f"{SamplingSettings().seed}].")
@json_option
@report_option("With sampler settings: also write a report with the bar charts (FILE.html or FILE.md).")
@chat_options
@grammar_options
@model_options
@fail_cleanly
def next_cmd(prompt, top, chain, as_json, report_path, model, **kw):
    """The distribution of the token after PROMPT: top N with probabilities, and the entropy.

    With sampler settings, one more column per combination of them: the same tokens' probabilities
    after llama.cpp's sampler chain (top_k -> top_p -> min_p -> temperature) - the softmax-with-
    temperature lesson on real logits. Settings not given are off (temperature 1, no truncation).

    --chain llama.cpp shows what llama-server's chain (DRY, XTC, top-n-sigma, dynamic temperature, mirostat,
    logit bias, ...; its stage order, its context options) makes of the distribution: settings not given are
    llama-server's defaults, and with no sampler setting at all one column shows its default chain. Below the
    table: what DRY, XTC and mirostat did there.

    \b
    llamalens next "The capital of France is" --top 10
    llamalens next "The capital of France is" -t 0.5,1,2
    llamalens next "The capital of France is" -t 0.7 --top-k 2 --top-p 0.5,0.95
    llamalens next "The capital of France is" --chain llama.cpp --xtc-probability 0,1 --xtc-threshold 0.05
    llamalens next --chat "What is the capital of France?" --chat-template gemma
    """
    from llamalens.run import grid
    chat = pop_chat(kw)
    conv = chat.single(prompt, "next")
    spec = pop_grammar(kw)
    axes = grid.parse_axes(pop_axes(kw))
    given = pop_sampling(kw, chain)  # --seed and the llama.cpp chain's one-value settings
    configs = next_configs(axes, given, chain)
    if spec and (configs or report_path):
        raise click.UsageError("next --grammar shows the distribution before and after the grammar; leave out the "
                               "sampler settings, --chain and --report (sweep --grammar runs a grid under a grammar)")
    if configs:
        grid.check(configs, [given.seed])
        if len(configs) > MAX_NEXT_COLUMNS:
            raise click.UsageError(f"{len(configs)} combinations of settings is more columns than a table can show "
                                   f"(at most {MAX_NEXT_COLUMNS}); give fewer values, or use `llamalens sweep ... "
                                   "--report FILE` for a whole grid")
    elif report_path:
        raise click.UsageError("--report shows how sampler settings reshape the distribution: give -t, --top-k, "
                               "--top-p or --min-p values too (or --chain llama.cpp)")
    check_report_path(report_path)
    loaded = load_model(model, pop_model_options(kw, chain))
    rendered = chat_prompt(loaded, conv, chat)
    prompt = rendered.text if rendered else prompt
    if spec:
        return _print_next_grammar(loaded, prompt, top, spec, as_json, rendered)
    if not configs:
        return _print_next(loaded, prompt, top, as_json, rendered)
    from llamalens.looks.next_token import sampler_view
    from llamalens.reports.texts import next_document

    view = sampler_view(loaded, prompt, [], configs, top, labels=[next_label(c) for c in configs])
    if report_path:
        write_report(next_document(view, loaded.describe(), rendered), report_path)
    if as_json:
        return json_out(with_chat(view.to_dict(), rendered))
    _print_sampler_view(view, loaded.n_vocab)


def next_configs(axes: dict, given, chain: str | None) -> list:
    """next's columns: the axes' product over the settings given (the llama.cpp chain: llama-server's defaults for
    the others, and its default chain alone when no axis is given; create_completion's: NEUTRAL's)."""
    from llamalens.run import grid
    from llamalens.settings import NEUTRAL

    if chain == "llama.cpp":
        return grid.expand(axes, given) if axes else [given]
    base = given.with_(**{f: getattr(NEUTRAL, f) for f in ("temperature", "top_k", "top_p", "min_p")})
    return grid.expand(axes, base) if axes else []


def next_label(settings) -> str:
    """A column's label: what differs from the distribution's neutral settings, or for the llama.cpp chain from
    llama-server's defaults."""
    from llamalens.settings import changes_label, llama_cpp_label

    if settings.chain != "llama.cpp":
        return changes_label(settings)
    return (changes_label(settings, SamplingSettings(chain="llama.cpp", seed=settings.seed)) + " "
            + llama_cpp_label(settings)).strip()


def chat_prompt(model, conv, chat):
    """The rendered conversation (chat.ChatPrompt), or None without the chat options; says what was rendered."""
    if conv is None:
        return None
    from llamalens.core.chat import render

    rendered = render(model, conv, chat.template)
    announce_chat(rendered)
    return rendered


def announce_chat(rendered) -> None:
    """Say on stderr which template rendered the conversation and how long the prompt it made is (and warn when
    the template's markers are plain text to the model)."""
    say(f"chat ({rendered.template}): the prompt is {rendered.n_tokens} tokens; the reply starts after it",
        err=True)
    warn_chat([rendered])


def warn_chat(rendered: list) -> None:
    """A warning on stderr for each distinct template whose markers are not special tokens of the model."""
    for w in dict.fromkeys(r.warning() for r in rendered if r.warning()):
        say(f"warning: {w}", err=True)


def with_chat(d: dict, rendered) -> dict:
    """A JSON result with the conversation it came from (when it did)."""
    return dict(d, chat=rendered.to_dict()) if rendered else d


def _print_next(model, prompt, top, as_json, rendered=None) -> None:
    from llamalens.looks.next_token import next_token
    from llamalens.visible import visible

    nt = next_token(model, prompt, top)
    if as_json:
        return json_out(with_chat(nt.to_dict(), rendered))
    rows = [("rank", "token", "prob", "logprob", "id")]
    for i, a in enumerate(nt.top, 1):
        rows.append((i, visible(a.text, a.bytes), f"{math.exp(a.logprob):.4f}", f"{a.logprob:.4f}", a.id))
    print_table(rows, right={0, 2, 3, 4})
    shown = sum(math.exp(a.logprob) for a in nt.top)
    say(f"entropy {nt.entropy:.4f} nats; these {len(nt.top)} tokens hold {shown:.1%} of the probability")


def _print_next_grammar(model, prompt, top, spec, as_json, rendered) -> None:
    from llamalens.core.grammar import next_under_grammar
    from llamalens.visible import prob_text, visible

    view = next_under_grammar(model, prompt, spec, top)
    if as_json:
        return json_out(with_chat({"prompt": prompt, "grammar": spec.to_dict(), "removed": view.removed,
                                   "allowed": view.allowed,
                                   "top": [{"id": i, "text": model.token_text(i)[0], "bytes": model.token_text(i)[1],
                                            "logprob": lp, "prob": math.exp(lp), "prob_under_grammar": g}
                                           for i, lp, g in view.rows]}, rendered))
    rows = [("token", "raw p", "under grammar", "id")]
    for i, lp, g in view.rows:
        rows.append((visible(*model.token_text(i)), prob_text(math.exp(lp)), prob_text(g) if g > 0 else "-", i))
    print_table(rows, right={1, 2, 3})
    say(f"the grammar ({spec.source}) allows {view.allowed:,} of {model.n_vocab:,} tokens here and removes "
        f"{view.removed:.2%} of the raw probability mass; 'under grammar' = renormalised over what it allows, "
        "- = forbidden")


def _print_sampler_view(view, n_vocab: int) -> None:
    from llamalens.visible import prob_text, visible

    rows = [("rank", "token", "raw") + tuple(ch.label for ch in view.chains)]
    for i, a in enumerate(view.top):
        rows.append((i + 1, visible(a.text, a.bytes), prob_text(math.exp(a.logprob)))
                    + tuple(prob_text(ch.final.probs[i]) if ch.final.probs[i] > 0 else "-" for ch in view.chains))
    rows.append(("", "tokens left", f"{n_vocab:,}") + tuple(f"{ch.final.survivors:,}" for ch in view.chains))
    print_table(rows, right=set(range(0, 3 + len(view.chains))) - {1})
    say(f"raw = softmax of the logits (entropy {view.entropy:.4f} nats); each column = the same tokens after "
               "that sampler chain; - = removed")
    from llamalens.reports.texts import effect_rows

    for label, stage, what in effect_rows(view):  # what the stages that act on their own did here
        say(f"{label} | {stage}: {what}")


@click.command(cls=GroupedCommand)
@click.argument("prompt", required=False)
@sampling_options
@chain_option
@llama_cpp_sampling_options
@click.option("--max-tokens", "-n", type=int, default=16, show_default=True, help="Tokens to generate.")
@click.option("--logprobs", type=click.IntRange(0, 100), default=5, show_default=True, help="Top alternatives per token.")
@click.option("--stop", multiple=True, help="Stop at this string (repeatable).")
@click.option("--text", "as_text", is_flag=True, help="Print the text coloured by each token's probability.")
@report_option("Also write the completion as a page (FILE.html or FILE.md): each token coloured, its pop-up on hover.")
@json_option
@chat_options
@grammar_options
@model_options
@fail_cleanly
def generate(prompt, chain, max_tokens, logprobs, stop, as_text, report_path, as_json, model, **kw):
    """Generate from PROMPT and show each token: probability, rank, entropy, candidates, alternatives.

    --chain llama.cpp samples as llama-server does (its samplers, its defaults, its context options).

    \b
    llamalens generate "Once upon a time" --temperature 0.7 --logprobs 5
    llamalens generate "Once upon a time" --chain llama.cpp --dry-multiplier 0.8 --xtc-probability 0.5
    llamalens generate --chat "Name a colour." --system "Answer in one word." -m gemma-3-270m-it-Q4_K_M.gguf -t 0
    llamalens generate "A person, as JSON:" --json-schema person.json -n 40
    llamalens generate "Once upon a time" -n 32 --report tale.html
    """
    from llamalens.core.engine import Engine, Request, context_notes
    from llamalens.errors import InvalidSettings

    chat = pop_chat(kw)
    conv = chat.single(prompt, "generate")
    spec = pop_grammar(kw)
    req = Request(prompt or "", pop_sampling(kw, chain), max_tokens, logprobs, tuple(stop),
                  grammar=spec.gbnf if spec else None)
    problems = req.problems()
    if problems:  # before loading the model: bad input fails fast
        raise InvalidSettings("; ".join(problems))
    check_report_path(report_path)
    loaded = load_model(model, pop_model_options(kw, chain))
    rendered = chat_prompt(loaded, conv, chat)
    if rendered:
        req.prompt = rendered.text
    engine = Engine(loaded, 1)
    for note in context_notes(engine.prepare([req]), loaded.options.ctx):
        say(f"note: {note}", err=True)
    sample = next(iter(engine.run([req])))
    if report_path:
        from llamalens.reports.notebook import sample_document

        write_report(sample_document(sample), report_path)
    if as_json:
        d = sample.to_dict()
        out = {"model": loaded.describe(), "prompt": req.prompt, "settings": d["settings"], "text": d["text"],
               "finish_reason": d["finish_reason"], "tokens": d["tokens"], "timing": d["timing"]}
        if spec:
            out["grammar"] = dict(spec.to_dict(), mean_removed=sum(sample.grammar_removed) / len(sample.tokens))
        return json_out(with_chat(out, rendered))
    if as_text:
        return print_confidence(req.prompt, [t for t in sample.tokens if not t.eog])
    _print_sample(sample)


def _print_sample(sample) -> None:
    from llamalens.visible import prob_text, visible

    removed = sample.grammar_removed
    rows = [("#", "token", "prob", "logprob", "rank", "entropy", "cand", "sampled p", "top alternatives")
            + (("removed",) if removed is not None else ())]
    for t in sample.tokens:
        rows.append((t.position, visible(t.text, t.bytes) + (" [end]" if t.eog else ""), prob_text(t.prob),
                     f"{t.logprob:.4f}", t.rank, f"{t.entropy:.3f}", t.candidates,
                     prob_text(math.exp(t.sampled_logprob)), alternatives(t.top))
                    + ((f"{removed[t.position]:.1%}",) if removed is not None else ()))
    print_table(rows, right={0, 2, 3, 4, 5, 6, 7, 9})
    if removed is not None:
        from llamalens.core.grammar import describe_removed

        say(describe_removed(removed, [visible(t.text, t.bytes) for t in sample.tokens])
            + " (removed = raw probability the grammar forbade at that token)")
    say("")
    say(f"text: {sample.prompt}\u2502{sample.text}")
    tm = sample.timing
    say(f"finish: {sample.finish_reason}; {tm.generated_tokens} tokens; prompt {tm.prompt_tokens} tokens; "
               f"first token {tm.first_token_ms:.0f} ms; {tm.tokens_per_s:.1f} tokens/s")
    if sample.finish_reason == "grammar":
        say("the grammar allowed no further token that the sampler chain could pick (it was complete and "
            "end-of-generation was banned, or the model's vocabulary cannot spell what it asks for)")

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


def runtime_options(fn):
    """--gpu-layers, --ctx, --threads, --batch, --flash-attn: how a model is run."""
    opts = [
        click.option("--gpu-layers", type=int, default=0, show_default=True,
                     help="Layers to offload to the GPU (-1 = all); needs a CUDA or Metal build."),
        click.option("--ctx", type=int, default=2048, show_default=True,
                     help="Context window per sequence: prompt + generated tokens (scoring: the window size)."),
        click.option("--threads", type=int, default=None, help="CPU threads (default: all cores)."),
        click.option("--batch", type=int, default=512, show_default=True, help="Prompt tokens per decode call."),
        click.option("--flash-attn", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                     help="llama.cpp's flash attention setting (changes logits slightly; recorded per run)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def model_options(fn):
    """--model plus the runtime options: shared by every single-model command."""
    fn = runtime_options(fn)
    return click.option("--model", "-m", default=None, envvar="LLAMALENS_MODEL", show_envvar=True,
                        help="GGUF path or model name (see `llamalens models`); default: embedded Gemma 3 270M "
                             "Q4_K_M.")(fn)


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
      llamalens sweep "The capital of France is" -t 0,0.7 --top-k 2,40 --seeds 2 --report report.html
      llamalens score "The quick brown fox jumps over the lazy dog."
      llamalens choose "The capital of France is" --option Paris --option London
      llamalens embed king queen man woman apple banana
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


def _pop_axes(kw: dict) -> dict:
    """Take the grid-axis options (click names ax_<setting>) out of a command's kwargs: {setting: text}."""
    return {k[3:]: kw.pop(k) for k in list(kw) if k.startswith("ax_")}


# -- next -------------------------------------------------------------------------------------
MAX_NEXT_COLUMNS = 12


@main.command("next")
@click.argument("prompt")
@click.option("--top", type=click.IntRange(1, 1000), default=10, show_default=True, help="How many tokens to show.")
@click.option("--temperature", "-t", "ax_temperature",
              help="Also show the distribution after each temperature, e.g. 0.5,1,2 (0 = greedy).")
@click.option("--top-k", "ax_top_k", help="... after top_k, e.g. 2,40.")
@click.option("--top-p", "ax_top_p", help="... after top_p, e.g. 0.01,0.9.")
@click.option("--min-p", "ax_min_p", help="... after min_p, e.g. 0.05.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--report", "report_path", default=None, type=click.Path(dir_okay=False),
              help="With sampler settings: also write a report with the bar charts (FILE.html or FILE.md).")
@model_options
@_fail_cleanly
def next_cmd(prompt, top, as_json, report_path, **kw):
    """The distribution of the token after PROMPT: top N with probabilities, and the entropy.

    With sampler settings, one more column per combination of them: the same tokens' probabilities
    after llama.cpp's sampler chain (top_k -> top_p -> min_p -> temperature) - the softmax-with-
    temperature lesson on real logits. Settings not given are off (temperature 1, no truncation).

    \b
    llamalens next "The capital of France is" --top 10
    llamalens next "The capital of France is" -t 0.5,1,2
    llamalens next "The capital of France is" -t 0.7 --top-k 2 --top-p 0.5,0.95
    """
    from . import grid as G
    from .display import visible
    from .settings import NEUTRAL, changes_label

    axes = G.parse_axes(_pop_axes(kw))
    configs = G.expand(axes, NEUTRAL) if axes else []
    if configs:
        G.check(configs, [0])
        if len(configs) > MAX_NEXT_COLUMNS:
            raise click.UsageError(f"{len(configs)} combinations of settings is more columns than a table can show "
                                   f"(at most {MAX_NEXT_COLUMNS}); give fewer values, or use `llamalens sweep ... "
                                   "--report FILE` for a whole grid")
    if report_path and not configs:
        raise click.UsageError("--report shows how sampler settings reshape the distribution: give -t, --top-k, "
                               "--top-p or --min-p values too")
    _check_report_path(report_path)
    model = _model_from(kw)
    if not configs:
        from .views import next_token

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
        return
    from .views import sampler_view

    view = sampler_view(model, prompt, [], configs, top)
    labels = [changes_label(c) for c in configs]
    for chain, lab in zip(view.chains, labels):
        chain.label = lab
    if report_path:
        from .documents import next_document

        _write_doc(next_document(view, model.describe()), report_path)
    if as_json:
        _json_out(view.to_dict())
        return
    rows = [("rank", "token", "raw") + tuple(labels)]
    for i, a in enumerate(view.top):
        rows.append((i + 1, visible(a.text, a.bytes), f"{math.exp(a.logprob):.4f}")
                    + tuple(f"{ch.final.probs[i]:.4f}" if ch.final.probs[i] > 0 else "-" for ch in view.chains))
    rows.append(("", "tokens left", f"{model.n_vocab:,}") + tuple(f"{ch.final.survivors:,}" for ch in view.chains))
    _print_table(rows, right=set(range(0, 3 + len(labels))) - {1})
    click.echo(f"raw = softmax of the logits (entropy {view.entropy:.4f} nats); each column = the same tokens after "
               "that sampler chain; - = removed")


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
@click.option("--text", "as_text", is_flag=True, help="Print the text coloured by each token's probability.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@model_options
@_fail_cleanly
def generate(prompt, max_tokens, logprobs, stop, as_text, as_json, **kw):
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
    if as_text:
        _print_confidence(prompt, [t for t in sample.tokens if not t.eog])
        return
    _print_sample(sample)


def _print_confidence(prefix: str, tokens) -> None:
    """Text coloured by the probability of each token (background colour; a legend follows). Without a
    colour terminal the text is printed plain, with the legend saying so."""
    from .display import CONFIDENCE, confidence_bucket, flowing

    out = [click.style(flowing(prefix), dim=True)] if prefix else []
    for t in tokens:
        _, _, rgb = CONFIDENCE[confidence_bucket(t.prob)]
        for k, line in enumerate(flowing(t.text, t.bytes).split("\n")):
            if k:
                out.append("\n")
            if line:
                out.append(click.style(line, bg=rgb, fg="black"))
    click.echo("".join(out))
    legend = "  ".join(click.style(f" {name} ", bg=rgb, fg="black") for _, name, rgb in CONFIDENCE)
    click.echo(f"\nprobability of each token: {legend}" + ("" if sys.stdout.isatty() else
               "  (colours show on a terminal; --json has every number)"))


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


# -- sweeps and the run store ----------------------------------------------------------------
def _store(path):
    from .store import Store

    return Store(path)


store_option = click.option("--store", "store_path", default=None, envvar="LLAMALENS_STORE", show_envvar=True,
                            help="Run store (SQLite); default ~/.local/share/llamalens/runs.db.")


def _read_prompts(path: str) -> list[str]:
    from pathlib import Path

    from .errors import InvalidInput

    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise InvalidInput(f"--prompts-file: file not found: {p}") from None
    except OSError as e:
        raise InvalidInput(f"--prompts-file: cannot read {p} ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInput(f"--prompts-file: {p} is not UTF-8 (byte {e.start}); save it as UTF-8") from None
    prompts = []
    if p.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                prompts.append(str(obj["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InvalidInput(f"--prompts-file: {p} line {n} is not a JSON object with a \"prompt\" field; "
                                   'fix it, e.g. {"prompt": "Once upon a time"}') from None
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InvalidInput(f"--prompts-file: {p} holds no prompts; one per line (.txt) or JSON lines (.jsonl)")
    return prompts


def _progress_printer():
    state = {"last": 0.0}

    def show(prog):
        import time as _t

        now = _t.monotonic()
        if now - state["last"] < 0.2 and prog.done < prog.total:
            return
        state["last"] = now
        eta = "?" if prog.eta != prog.eta else f"{prog.eta:.0f}s"
        width = 24
        filled = int(width * prog.done / max(prog.total, 1))
        click.echo(f"\r[{'#' * filled}{'.' * (width - filled)}] {prog.done}/{prog.total} sequences  "
                   f"{prog.tokens_per_s:6.1f} tok/s  ETA {eta}   ", err=True, nl=prog.done >= prog.total)

    return show


@main.command()
@click.argument("prompts", nargs=-1)
@click.option("--prompts-file", type=click.Path(dir_okay=False), help="One prompt per line (.txt) or JSON lines with a \"prompt\" field (.jsonl).")
@click.option("--temperature", "-t", "ax_temperature", help="Comma-separated values, e.g. 0,0.7,1.0.")
@click.option("--top-k", "ax_top_k", help="e.g. 2,40")
@click.option("--top-p", "ax_top_p", help="e.g. 0.01,0.95")
@click.option("--min-p", "ax_min_p")
@click.option("--typical-p", "ax_typical_p")
@click.option("--repeat-penalty", "ax_repeat_penalty")
@click.option("--seeds", type=int, default=None, help="Seeds 0..N-1 for every configuration.")
@click.option("--seed", "seed_list", default=None, help="Explicit seeds, e.g. 1,2,3.")
@click.option("--max-tokens", "-n", type=int, default=32, show_default=True)
@click.option("--logprobs", type=int, default=5, show_default=True, help="Top alternatives kept per token.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--preset", type=str, default=None, help="Base settings: see `llamalens presets`.")
@click.option("--grid", "grid_file", default=None, help="TOML grid file, or FILE:NAME for one of its grids.")
@click.option("--name", default=None, help="A name for the run.")
@click.option("--parallel", type=click.IntRange(1, 256), default=32, show_default=True,
              help="Sequences decoded together per llama_decode call.")
@click.option("--exact", is_flag=True, help="One sequence at a time: numbers identical to `llamalens generate`.")
@click.option("--resume", "resume_id", default=None, help="Finish an interrupted run (its missing samples only).")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")
@click.option("--report", "report_path", default=None, type=click.Path(dir_okay=False),
              help="Also write the run's report (FILE.html or FILE.md) when it finishes.")
@store_option
@model_options
@_fail_cleanly
def sweep(prompts, prompts_file, seeds, seed_list, max_tokens, logprobs, stop, preset, grid_file, name, parallel,
          exact, resume_id, as_json, report_path, store_path, **kw):
    """Run PROMPTS across a grid of sampling settings and seeds; every token is stored.

    \b
    llamalens sweep "Once upon a time" -t 0,0.7,1.0 --top-k 2,40 --top-p 0.01,0.95 --seeds 3
    llamalens sweep --prompts-file prompts.txt --preset balanced --seeds 5 --name my-run
    llamalens sweep --resume 7          # after Ctrl-C, a kill or a crash
    """
    import signal

    from . import grid as G
    from .settings import SamplingSettings
    from .sweep import SweepInterrupted, SweepSpec, execute, start_sweep

    axes_text = _pop_axes(kw)
    if report_path:  # a bad report path fails now, not after the sweep
        from .report import check_writable, report_format

        report_format(report_path, None)
        check_writable(report_path)
    store = _store(store_path)
    if resume_id is not None:
        info = store.run(resume_id)
        if info.status == "done" and info.n_done == info.n_samples:
            raise click.ClickException(f"run {info.id} is already complete ({info.n_done}/{info.n_samples} samples); "
                                       "nothing to resume")
        mo = info.options.get("model_options", {})
        if kw["model"] is None:
            kw["model"] = info.model.get("path")
        for k in ("ctx", "threads", "batch", "flash_attn", "gpu_layers"):
            if k in mo:
                kw[k] = mo[k]
        model = _model_from(kw)
        run_id = info.id
        click.echo(f"resuming run {run_id}: {info.n_samples - info.n_done} of {info.n_samples} samples to go", err=True)
    else:
        if prompts_file:
            prompts = tuple(prompts) + tuple(_read_prompts(prompts_file))
        if not prompts:
            raise click.UsageError("give at least one PROMPT or --prompts-file")
        if preset is not None and preset not in G.PRESETS:
            raise click.BadParameter(f"unknown preset {preset!r}; presets: {', '.join(G.PRESETS)}", param_hint="--preset")
        base = SamplingSettings(**G.PRESETS[preset]) if preset else SamplingSettings()
        configs = []
        if grid_file:
            for _gname, axes, fixed in G.load_grid_file(grid_file):
                configs += G.expand(axes, base.with_(**fixed))
        axes = G.parse_axes(axes_text)
        if axes or not configs:
            configs = [c2 for c in (configs or [base]) for c2 in G.expand(axes, c)]
        seed_values = G.parse_seeds(seeds, seed_list)
        G.check(configs, seed_values)
        spec = SweepSpec(list(prompts), configs, seed_values, max_tokens, logprobs, tuple(stop), name, exact, parallel)
        model = _model_from(kw)
        run_id = start_sweep(model, store, spec, command=" ".join(["llamalens"] + sys.argv[1:]))
        click.echo(f"run {run_id}: {len(spec.prompts)} prompt(s) x {len(configs)} configuration(s) x "
                   f"{len(seed_values)} seed(s) = {spec.n_samples} sequences, up to {spec.n_samples * max_tokens:,} "
                   f"tokens, {1 if exact else min(parallel, spec.n_samples)} per batch; store {store.path}", err=True)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        execute(model, store, run_id, _progress_printer())
    except SweepInterrupted as e:
        click.echo("", err=True)
        raise click.ClickException(str(e)) from None
    finally:
        signal.signal(signal.SIGTERM, old)
    _show_run(store, run_id, as_json)
    if report_path:
        _write_report(store, run_id, report_path, None, model)


def _write_report(store, run_id, output, fmt, model, **options) -> None:
    from . import report
    from .documents import run_document

    click.echo("writing the report ...", err=True)
    doc = run_document(store, run_id, model=model, **options)
    files = report.write(doc, output, fmt)
    size = sum(f.stat().st_size for f in files)
    extra = f" and {len(files) - 1} images in {files[1].parent}" if len(files) > 1 else ""
    click.echo(f"wrote {files[0]} ({size / 1e6:.2f} MB){extra}", err=True)


@main.command()
def presets():
    """List the named presets for `sweep --preset`."""
    from .grid import PRESETS
    from .settings import SamplingSettings

    for name, values in PRESETS.items():
        click.echo(f"{name:<18} {SamplingSettings(**values).label().rsplit(' seed=', 1)[0]}")


@main.command()
@click.option("--json", "as_json", is_flag=True)
@store_option
@_fail_cleanly
def runs(as_json, store_path):
    """List the runs in the store."""
    import datetime

    store = _store(store_path)
    infos = store.runs()
    if as_json:
        _json_out([{"id": r.id, "name": r.name, "status": r.status, "model": r.model.get("name"),
                    "prompts": r.n_prompts, "configs": r.n_configs, "samples_done": r.n_done,
                    "samples_total": r.n_samples, "created": r.created} for r in infos])
        return
    if not infos:
        click.echo(f"no runs in {store.path}; start one with `llamalens sweep`")
        return
    rows = [("id", "name", "status", "model", "prompts", "grid", "samples", "date")]
    for r in infos:
        rows.append((r.id, r.name or "", r.status, r.model.get("name", "?"), r.n_prompts, r.n_configs,
                     f"{r.n_done}/{r.n_samples}",
                     datetime.datetime.fromtimestamp(r.created).strftime("%Y-%m-%d %H:%M")))
    _print_table(rows, right={0, 4, 5})


def _show_run(store, run_id, as_json):
    from .analysis import sample_table, summary, token_table

    info = store.run(run_id)
    summ = summary(token_table(store, info.id), sample_table(store, info.id), store.configs(info.id))
    if as_json:
        _json_out({"run": info.to_dict(), "summary": json.loads(summ.to_json(orient="records"))})
        return
    click.echo(f"run {info.id} {info.name or ''} [{info.status}] model {info.model.get('name')} "
               f"({info.model.get('quantization')}), {info.n_done}/{info.n_samples} samples, "
               f"flash-attn {info.hardware.get('flash_attn')}, {info.options.get('parallel')} per batch")
    rows = [("#", "configuration", "samples", "mean lp", "ppl", "entropy", "cand", "distinct", "dist-2", "rank",
             "tok/s")]
    for r in summ.itertuples():
        rows.append((r.config_idx, r.label, r.samples, f"{r.mean_logprob:.3f}", f"{r.perplexity:.2f}",
                     f"{r.mean_entropy:.3f}", f"{r.mean_candidates:.1f}", f"{r.distinct_completions:.1f}",
                     f"{r.distinct_2:.2f}", f"{r.mean_rank:.1f}", f"{r.tokens_per_s:.1f}"))
    _print_table(rows, right=set(range(2, 11)) | {0})
    nf = info.noise
    if nf and nf.get("tokens"):
        click.echo(f"noise floor: re-decoding {nf['tokens']} tokens of {nf['samples']} samples one at a time moved "
                   f"logprobs by {nf['mean_abs_dlogprob']:.4f} nats on average (max {nf['max_abs_dlogprob']:.4f}), "
                   f"top-1 agreement {nf['top1_agreement']:.1%}; mean-logprob differences below "
                   f"{nf['max_abs_dlogprob']:.4f} between configurations are noise")
    if info.status != "done":
        click.echo(f"run {info.id} is {info.status}: resume with `llamalens sweep --resume {info.id}`")


@main.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True)
@store_option
@_fail_cleanly
def show(run_id, as_json, store_path):
    """Summary of a run per configuration: logprob, perplexity, entropy, candidates, diversity, speed."""
    _show_run(_store(store_path), run_id, as_json)


@main.command()
@click.argument("run_id")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="FILE.html or FILE.md.")
@click.option("--format", "fmt", default=None, help="html or md (default: from the file name).")
@click.option("--metric", default="mean_logprob", show_default=True,
              help="Metric of the first heatmap (mean_logprob, mean_entropy, mean_candidates, distinct_completions, "
                   "perplexity, distinct_2, mean_rank, tokens_per_s).")
@click.option("--position", type=int, default=0, show_default=True,
              help="Generated-token position of the sampler view (0 = the first generated token).")
@click.option("--sample", "sample_idx", type=int, default=None, help="Sample whose history the sampler view uses.")
@click.option("--model", "-m", default=None, help="Model for the sampler view (default: the run's model file).")
@click.option("--no-model", is_flag=True, help="Do not load the model: leave out the sampler view.")
@store_option
@_fail_cleanly
def report(run_id, output, fmt, metric, position, sample_idx, model, no_model, store_path):
    """Write a run's report: one self-contained HTML page, or Markdown with PNG plots beside it.

    \b
    llamalens report 7 -o run7.html
    llamalens report my-run -o run.md --metric mean_entropy --position 3
    """
    from pathlib import Path

    from . import report as R
    from .documents import METRICS

    store = _store(store_path)
    info = store.run(run_id)
    if info.n_done == 0:
        raise click.ClickException(f"run {info.id} has no finished samples; nothing to report "
                                   f"(resume it with `llamalens sweep --resume {info.id}`)")
    R.report_format(output, fmt)
    R.check_writable(output)
    if metric not in METRICS:
        raise click.BadParameter(f"unknown metric {metric!r}; choose one of: {', '.join(METRICS)}", param_hint="--metric")
    if info.status != "done" or info.n_done < info.n_samples:
        click.echo(f"warning: run {info.id} is {info.status} ({info.n_done}/{info.n_samples} samples); "
                   "the report shows the finished samples only", err=True)
    loaded = None
    if not no_model:
        path = model or info.model.get("path")
        if model is None and not (path and Path(path).is_file()):
            click.echo(f"warning: the run's model {path} is not there; the sampler view is left out "
                       "(pass --model PATH)", err=True)
        else:
            mo = info.options.get("model_options", {})
            loaded = _load(path, mo.get("gpu_layers", 0), mo.get("ctx", 2048), mo.get("threads"),
                           mo.get("batch", 512), mo.get("flash_attn", "auto"))
            if info.model_hash and store.model_hash(loaded.path) != info.model_hash:
                raise click.ClickException(f"{loaded.path} is not the model of run {info.id} "
                                           f"({info.model.get('path')}); pass that model or --no-model")
    _write_report(store, info.id, output, fmt, loaded, position=position, sample_idx=sample_idx, metric=metric)


@main.command()
@click.argument("run_id")
@click.option("--format", "fmt", type=click.Choice(["csv", "parquet", "jsonl"]), required=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output file.")
@store_option
@_fail_cleanly
def export(run_id, fmt, output, store_path):
    """Write a run's token table (csv, parquet) or its samples in OpenAI logprobs shape (jsonl)."""
    from pathlib import Path

    from .analysis import openai_logprobs, token_table

    store = _store(store_path)
    info = store.run(run_id)
    out = Path(output)
    tmp = out.with_name(out.name + ".part")
    try:
        if fmt == "jsonl":
            n = 0
            with open(tmp, "w", encoding="utf-8") as f:
                for obj in openai_logprobs(store, info.id):
                    f.write(json.dumps(obj, ensure_ascii=False) + "\n")
                    n += 1
        else:
            df = token_table(store, info.id)
            n = len(df)
            if fmt == "csv":
                df.to_csv(tmp, index=False)
            else:
                try:
                    df.to_parquet(tmp, index=False)
                except ImportError:
                    raise click.ClickException("parquet needs pyarrow: pip install pyarrow (or use --format csv)") from None
        tmp.replace(out)
    except OSError as e:
        raise click.ClickException(f"cannot write {out} ({e.strerror}); choose a writable path") from None
    click.echo(f"wrote {n} {'samples' if fmt == 'jsonl' else 'tokens'} of run {info.id} to {out}", err=True)


# -- score / choose / compare ------------------------------------------------------------------
def _read_text(text, file, raw_bytes):
    """TEXT or --file (UTF-8, or any bytes with --raw-bytes; '-' = stdin)."""
    from pathlib import Path

    from .errors import InvalidInput

    if text is not None and file:
        raise click.UsageError("give TEXT or --file, not both")
    if text is None and not file:
        raise click.UsageError("give a TEXT argument or --file FILE")
    if text is not None:
        return text.encode("utf-8") if raw_bytes else text
    try:
        raw = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    except FileNotFoundError:
        raise InvalidInput(f"--file: file not found: {file}") from None
    except IsADirectoryError:
        raise InvalidInput(f"--file: {file} is a directory; give a text file") from None
    except OSError as e:
        raise InvalidInput(f"--file: cannot read {file} ({e.strerror})") from None
    if raw_bytes:
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInput(f"--file: {file} is not UTF-8 (byte 0x{raw[e.start]:02X} at offset {e.start}); convert it "
                           f"(e.g. iconv -f latin1 -t utf-8 {file}) or pass --raw-bytes to score its bytes as they "
                           "are") from None


def _check_report_path(report_path):
    if report_path:
        from .report import check_writable, report_format

        report_format(report_path, None)
        check_writable(report_path)


def _write_doc(doc, report_path):
    from . import report

    files = report.write(doc, report_path)
    extra = f" and {len(files) - 1} images in {files[1].parent}" if len(files) > 1 else ""
    click.echo(f"wrote {files[0]} ({sum(f.stat().st_size for f in files) / 1e6:.2f} MB){extra}", err=True)


def _window_progress(what):
    def show(k, n):
        if n > 1:
            click.echo(f"\r{what}: window {k}/{n}", err=True, nl=k >= n)

    return show


text_options = [
    click.argument("text", required=False),
    click.option("--file", "-f", "file", default=None, help="Read the text from a file ('-' = stdin), UTF-8."),
    click.option("--raw-bytes", is_flag=True, help="Tokenize the input's bytes as they are (for non-UTF-8 files)."),
    click.option("--protocol", type=click.Choice(["full", "llama-perplexity"]), default="full", show_default=True,
                 help="full: every token, overlapping windows; llama-perplexity: exactly as llama.cpp's tool."),
    click.option("--stride", type=int, default=None,
                 help="full protocol: new tokens per window (default ctx/2); each token keeps >= ctx-1-stride of context."),
    click.option("--json", "as_json", is_flag=True, help="Machine-readable output."),
    click.option("--report", "report_path", default=None, type=click.Path(dir_okay=False),
                 help="Also write a report (FILE.html or FILE.md)."),
]


def _text_options(fn):
    for opt in reversed(text_options):
        fn = opt(fn)
    return fn


@main.command()
@_text_options
@click.option("--logprobs", type=click.IntRange(0, 100), default=5, show_default=True,
              help="Top alternatives kept per token.")
@click.option("--all", "show_all", is_flag=True, help="Print every token (default: all when <= 100, else the most surprising).")
@click.option("--text", "as_text", is_flag=True, help="Print the text coloured by each token's probability.")
@model_options
@_fail_cleanly
def score(text, file, raw_bytes, protocol, stride, as_json, report_path, logprobs, show_all, as_text, **kw):
    """How surprised the model is by a text: per-token logprob, rank, entropy; perplexity, bits per byte.

    \b
    llamalens score "The quick brown fox jumps over the lazy dog."
    llamalens score --file wiki.test.raw --protocol llama-perplexity --ctx 512
    """
    from .display import visible
    from .score import score_text

    data = _read_text(text, file, raw_bytes)
    _check_report_path(report_path)
    model = _model_from(kw)
    res = score_text(model, data, model.options.ctx, protocol, stride, logprobs, _window_progress("scoring"))
    for note in res.notes:
        click.echo(f"note: {note}", err=True)
    if as_json:
        _json_out(res.to_dict())
    elif as_text:
        if res.protocol != "full":
            click.echo(f"note: {res.protocol} scores part of each window; only the scored tokens are shown", err=True)
        _print_confidence("", res.tokens)
    else:
        toks = res.tokens
        shown = toks if show_all or len(toks) <= 100 else sorted(toks, key=lambda t: t.logprob)[:15]
        rows = [("#", "token", "prob", "logprob", "rank", "entropy", "top alternatives")]
        for t in shown:
            alts = "  ".join(f"{visible(a.text, a.bytes)} {math.exp(a.logprob):.3f}" for a in t.top)
            rows.append((t.position, visible(t.text, t.bytes), f"{t.prob:.4f}", f"{t.logprob:.4f}", t.rank,
                         f"{t.entropy:.3f}", alts))
        if shown is not toks:
            click.echo(f"the {len(shown)} most surprising of {len(toks)} tokens (--all for every one, --json for all data):")
        _print_table(rows, right={0, 2, 3, 4, 5})
        tot = res.totals()
        click.echo(f"{tot['scored']} of {tot['tokens']} tokens scored ({res.protocol}, ctx {res.ctx}, {res.windows} "
                   f"window{'s' if res.windows != 1 else ''}): mean NLL {tot['mean_nll']:.4f} nats, perplexity "
                   f"{tot['perplexity']:.4f} ± {tot['perplexity_error']:.4f}, {tot['bits_per_byte']:.4f} bits per "
                   f"byte; {tot['tokens_per_s']:.0f} tokens/s")
    if report_path:
        from .documents import score_document

        _write_doc(score_document(res), report_path)


@main.command()
@click.argument("prompt")
@click.option("--option", "options", multiple=True, help="A continuation to score (repeat, at least twice).")
@click.option("--normalize", type=click.Choice(["none", "token", "byte"]), default="none", show_default=True,
              help="Rank by total logprob, or per token / per byte (fairer across lengths).")
@click.option("--no-space", is_flag=True, help="Append options as given (default: a space joins prompt and option).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@model_options
@_fail_cleanly
def choose(prompt, options, normalize, no_space, as_json, **kw):
    """Rank continuations of PROMPT by likelihood: zero-shot classification, multiple choice.

    \b
    llamalens choose "The capital of France is" --option Paris --option London --option Berlin
    llamalens choose "Review: great film! Sentiment:" --option positive --option negative --normalize token
    """
    from .display import visible
    from .errors import InvalidInput
    from .score import choose as choose_fn

    if len(options) < 2:
        raise InvalidInput(f"give at least two --option values to choose between (got {len(options)})")
    model = _model_from(kw)
    res = choose_fn(model, prompt, list(options), normalize, space=not no_space)
    for note in res.notes:
        click.echo(f"note: {note}", err=True)
    if as_json:
        _json_out(res.to_dict())
        return
    rows = [("rank", "option", f"score ({normalize})", "logprob", "tokens", "per token", "per byte", "share", "margin",
             "token logprobs")]
    for i, (o, m, p) in enumerate(zip(res.options, res.margins(), res.probabilities()), 1):
        per = "  ".join(f"{visible(t.text, t.bytes)} {t.logprob:.3f}" for t in o.tokens)
        rows.append((i, visible(o.option, edge_spaces=False), f"{o.score(normalize):.4f}", f"{o.total:.4f}",
                     len(o.tokens), f"{o.total / len(o.tokens):.4f}", f"{o.total / max(o.n_bytes, 1):.4f}", f"{p:.1%}",
                     "" if m != m else f"+{m:.4f}", per))
    _print_table(rows, right={0, 2, 3, 4, 5, 6, 7, 8})
    click.echo(f"share = softmax of the scores over these options; margin = lead over the next option "
               f"({'nats' if normalize == 'none' else 'nats per ' + normalize})")


@main.command()
@_text_options
@click.option("--model", "-m", "model_paths", multiple=True, required=True,
              help="Model A (the reference), then model B; with --run, just B (A is the run's model).")
@click.option("--run", "run_id", default=None, help="Compare on the generated tokens of a stored sweep.")
@click.option("--top", type=click.IntRange(1, 50), default=20, show_default=True, help="Positions of most disagreement to list.")
@store_option
@runtime_options
@_fail_cleanly
def compare(text, file, raw_bytes, protocol, stride, as_json, report_path, model_paths, run_id, top, store_path, **kw):
    """How far model B drifts from model A on the same tokens: KL divergence, Δp, same top token.

    Quantization drift (a Q4_K_M against its Q8_0), or a fine-tune against its base.

    \b
    llamalens compare -m model-q8_0.gguf -m model-q4_k_m.gguf --file wiki.test.raw --ctx 512
    llamalens compare --run 7 -m model-q2_k.gguf        # what B thinks of run 7's text
    """
    from .errors import InvalidInput
    from .models import resolve_model
    from .score import compare_run, compare_text, same_file

    store = None
    if run_id is not None:
        if text is not None or file:
            raise click.UsageError("give TEXT, --file or --run, not several")
        store = _store(store_path)
        info = store.run(run_id)
        if len(model_paths) == 1:
            model_paths = (info.model.get("path"),) + tuple(model_paths)
        data = None
    else:
        data = _read_text(text, file, raw_bytes)
    if len(model_paths) != 2:
        raise InvalidInput(f"give exactly two models: --model A --model B (got {len(model_paths)})")
    pa, pb = resolve_model(model_paths[0]), resolve_model(model_paths[1])
    if same_file(pa, pb):
        raise InvalidInput(f"--model {pa} is given twice: the KL divergence of a model with itself is 0 by construction; "
                           "pass two different files")
    _check_report_path(report_path)
    opts = dict(kw)
    a = _load(str(pa), opts["gpu_layers"], opts["ctx"], opts["threads"], opts["batch"], opts["flash_attn"])
    b = _load(str(pb), opts["gpu_layers"], opts["ctx"], opts["threads"], opts["batch"], opts["flash_attn"])
    if store is not None:
        res = compare_run(a, b, store, run_id, on_progress=_window_progress("comparing samples"))
    else:
        res = compare_text(a, b, data, a.options.ctx, protocol, stride, on_progress=_window_progress("comparing"))
    for note in res.notes:
        click.echo(f"note: {note}", err=True)
    if as_json:
        _json_out(res.to_dict())
    else:
        _print_comparison(res, top)
    if report_path:
        from .documents import compare_document

        _write_doc(compare_document(res), report_path)


def _print_comparison(res, top) -> None:
    from .display import visible

    s = res.summary()
    na, nb = res.model_a.get("name"), res.model_b.get("name")
    click.echo(f"A = {na} ({res.model_a.get('quantization')}), B = {nb} ({res.model_b.get('quantization')}); "
               f"{s['tokens']} tokens ({res.source}, {res.protocol}, ctx {res.ctx})")
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
    _print_table([("statistic", "value")] + lines)
    click.echo("")
    rows = [("pos", "sample", "token", "KLD", "p A", "p B", "top A", "top B")]
    for p in res.worst(top):
        rows.append((p.position, "" if p.sample is None else p.sample, visible(p.text, p.bytes), f"{p.kld:.5f}",
                     f"{p.p_a:.4f}", f"{p.p_b:.4f}",
                     "  ".join(f"{visible(x.text, x.bytes)} {x.prob:.3f}" for x in p.top_a[:3]),
                     "  ".join(f"{visible(x.text, x.bytes)} {x.prob:.3f}" for x in p.top_b[:3])))
    click.echo(f"the {len(rows) - 1} positions where the models disagree most:")
    _print_table(rows, right={0, 1, 3, 4, 5})


# -- embed ------------------------------------------------------------------------------------
MAX_MATRIX = 12  # texts up to which the terminal shows the whole cosine matrix


@main.command()
@click.argument("texts", nargs=-1)
@click.option("--file", "-f", "file", default=None, help="More texts, one per line ('-' = stdin); blank lines skipped.")
@click.option("--query", "-q", default=None, help="Rank the texts by similarity to this one.")
@click.option("--pooling", type=click.Choice(["model", "mean", "mean-all", "last", "first"]), default="model",
              show_default=True, help="model: what the GGUF declares, else mean over the text's tokens (BOS left out); "
                                      "mean-all: llama.cpp's MEAN (BOS in); last; first (CLS).")
@click.option("--parallel", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Texts per decode: faster for many texts; above 1, vectors move by llama.cpp's batch noise.")
@click.option("--pairs", type=click.IntRange(0, 10000), default=10, show_default=True,
              help="Most similar pairs to list.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (cosine matrix included).")
@click.option("--vectors", is_flag=True, help="With --json: include every vector.")
@click.option("--report", "report_path", default=None, type=click.Path(dir_okay=False),
              help="Also write a report (FILE.html or FILE.md): heatmap, neighbours, pairs.")
@model_options
@_fail_cleanly
def embed(texts, file, query, pooling, parallel, pairs, as_json, vectors, report_path, **kw):
    """Embed TEXTS and compare them by cosine similarity: matrix, nearest neighbours, most similar pairs.

    \b
    llamalens embed king queen man woman apple banana
    llamalens embed --file terms.txt --query "a fruit" --report terms.html
    """
    from .embed import check_texts, embed_texts
    from .errors import InvalidInput

    items = list(texts)
    if file:
        items += [line for line in _read_text(None, file, False).splitlines() if line.strip()]
    if query is None and len(items) < 2:
        raise InvalidInput(f"give at least two texts to compare (got {len(items)}), or --query and one text or more")
    if query is not None and not items:
        raise InvalidInput("--query needs texts to rank: give them as arguments or with --file")
    if vectors and not as_json:
        raise click.UsageError("--vectors adds the vectors to the JSON output: give --json too")
    everything = ([query] if query is not None else []) + items
    check_texts(everything)
    _check_report_path(report_path)
    model = _model_from(kw)
    progress = (lambda k, n: click.echo(f"\rembedding: {k}/{n} texts", err=True, nl=k >= n)) if len(items) > 50 else None
    es = embed_texts(model, everything, pooling, parallel, progress)
    ranking = None
    if query is not None:
        from dataclasses import replace

        qvec = es.vectors[0]
        es = replace(es, texts=es.texts[1:], n_tokens=es.n_tokens[1:], vectors=es.vectors[1:])
        ranking = es.rank(qvec)
    for note in es.notes:
        click.echo(f"note: {note}", err=True)
    if as_json:
        d = es.to_dict(vectors)
        if query is not None:
            d["query"] = {"text": query, "ranking": [{"index": k, "text": es.texts[k], "cosine": c} for k, c in ranking]}
            if vectors:
                d["query"]["vector"] = [float(x) for x in qvec]
        _json_out(d)
    else:
        _print_embeddings(es, query, ranking, pairs)
    if report_path:
        from .documents import embed_document

        _write_doc(embed_document(es, query, ranking), report_path)


def _print_embeddings(es, query, ranking, pairs) -> None:
    from .display import label

    n = len(es.texts)
    click.echo(f"{n + (query is not None)} texts embedded ({es.vectors.shape[1]} dimensions, pooling {es.pooling}"
               f"{'' if es.parallel == 1 else f', {es.parallel} per decode'}) in {es.seconds:.2f} s")
    if ranking is not None:
        click.echo(f"by cosine similarity to {label(query, 60)!s}:")
        _print_table([("rank", "cosine", "text")] + [(r, f"{c:.4f}", label(es.texts[k], 60))
                                                     for r, (k, c) in enumerate(ranking, 1)], right={0, 1})
        return
    cos = es.cosine()
    if n <= MAX_MATRIX:
        names = [label(t, 16) for t in es.texts]
        click.echo("cosine similarity:")
        rows = [("",) + tuple(f"{i + 1}" for i in range(n))]
        rows += [(f"{i + 1} {names[i]}",) + tuple("" if i == j else f"{cos[i, j]:.3f}" for j in range(n))
                 for i in range(n)]
        _print_table(rows, right=set(range(1, n + 1)))
        click.echo("")
    rows = [("#", "text", "tokens", "nearest", "cosine")]
    rows += [(i + 1, label(t, 40), nt, f"{j + 1} {label(es.texts[j], 30)}", f"{c:.4f}")
             for i, (t, nt, (j, c)) in enumerate(zip(es.texts, es.n_tokens, es.nearest()))]
    _print_table(rows, right={0, 2, 4})
    if pairs and n > 2:
        click.echo("")
        click.echo(f"the {min(pairs, n * (n - 1) // 2)} most similar pairs:")
        _print_table([("cosine", "text", "text")] + [(f"{c:.4f}", f"{i + 1} {label(es.texts[i], 40)}",
                                                      f"{j + 1} {label(es.texts[j], 40)}") for i, j, c in es.pairs(pairs)],
                     right={0})


if __name__ == "__main__":  # pragma: no cover
    main()

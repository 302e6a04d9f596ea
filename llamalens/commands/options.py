"""Option decorators shared by the commands. Defaults come from the typed settings records
(ModelOptions(), SamplingSettings()), so each default is written once, in settings.py."""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import click

from llamalens.errors import InvalidSettings
from llamalens.settings import CHAINS, SERVER_CONTEXT, ModelOptions, SamplingSettings


def _stack(*opts):
    def decorate(fn):
        for opt in reversed(opts):
            fn = opt(fn)
        return fn
    return decorate


def _folded(label: str, decorator):
    """DECORATOR, its options marked as folded out of the short --help under LABEL (GroupedCommand)."""
    def decorate(fn):
        before = len(getattr(fn, "__click_params__", ()))
        fn = decorator(fn)
        for param in fn.__click_params__[before:]:
            param.folded = label
        return fn
    return decorate


json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")

store_option = click.option("--store", "store_path", default=None, envvar="LLAMALENS_STORE", show_envvar=True,
                            help="Run store (SQLite); default ~/.local/share/llamalens/runs.db.")


def report_option(help: str = "Also write a report (FILE.html or FILE.md)."):
    return click.option("--report", "report_path", default=None, type=click.Path(dir_okay=False), help=help)


_mo = ModelOptions()
RUNTIME_HELP = {
    "gpu_layers": "Layers to offload to the GPU (-1 = all); needs a CUDA or Metal build.",
    "ctx": "Context window per sequence: prompt + generated tokens (scoring: the window size).",
    "threads": "CPU threads (default: all cores).",
    "batch": "Prompt tokens per decode call.",
    "flash_attn": "llama.cpp's flash attention setting (changes logits slightly; recorded per run).",
    # --- loading and the memory check ---
    "mmap": "Map the model file (--no-mmap reads it into memory instead); recorded per run.",
    "mlock": "Lock the weights in RAM so they are never swapped out; recorded per run.",
    "force": "Load even when the memory estimate says the model will not fit in RAM.",
    # --- end of loading and the memory check ---
    "ubatch": "Physical batch (micro-batch) size [default: --batch; 512 with --chain llama.cpp].",
    "swa_full": "Full-size sliding-window KV cache [default: on, as Llama(); off with --chain llama.cpp, as "
                "llama-server].",
    "repack": "Weight repacking into CPU-friendly layouts (llama-server's --repack/--no-repack) [default: on].",
    "server_prefill": "Decode prompts in llama-server's pieces (SWA models with a small SWA cache) [default: off; "
                      "on with --chain llama.cpp].",
}
# the options whose default follows the chain: llama-server's with --chain llama.cpp (settings.SERVER_CONTEXT)
CHAIN_DEFAULTED = ("batch", "ubatch", "swa_full", "repack", "server_prefill")
runtime_options = _folded("model loading", _stack(
    click.option("--gpu-layers", type=int, default=_mo.gpu_layers, show_default=True, help=RUNTIME_HELP["gpu_layers"]),
    click.option("--ctx", type=int, default=_mo.ctx, show_default=True, help=RUNTIME_HELP["ctx"]),
    click.option("--threads", type=int, default=_mo.threads, help=RUNTIME_HELP["threads"]),
    click.option("--batch", type=int, default=None, help=RUNTIME_HELP["batch"] + f" [default: {_mo.batch}; "
                 f"{SERVER_CONTEXT['batch']} with --chain llama.cpp]"),
    click.option("--flash-attn", type=click.Choice(["auto", "on", "off"]), default=_mo.flash_attn, show_default=True,
                 help=RUNTIME_HELP["flash_attn"]),
    click.option("--ubatch", type=int, default=None, help=RUNTIME_HELP["ubatch"]),
    click.option("--swa-full", type=click.Choice(["on", "off"]), default=None, help=RUNTIME_HELP["swa_full"]),
    click.option("--repack", type=click.Choice(["on", "off"]), default=None, help=RUNTIME_HELP["repack"]),
    click.option("--server-prefill", type=click.Choice(["on", "off"]), default=None,
                 help=RUNTIME_HELP["server_prefill"]),
    # --- loading and the memory check ---
    click.option("--mmap/--no-mmap", default=_mo.mmap, show_default=True, help=RUNTIME_HELP["mmap"]),
    click.option("--mlock", is_flag=True, default=_mo.mlock, help=RUNTIME_HELP["mlock"]),
    click.option("--force", is_flag=True, default=_mo.force, help=RUNTIME_HELP["force"]),
    # --- end of loading and the memory check ---
))
"""--gpu-layers, --ctx, --threads, --batch, --flash-attn, --ubatch, --swa-full, --repack, --server-prefill,
--mmap/--no-mmap, --mlock, --force: how a model is loaded and run (ModelOptions)."""

model_option = click.option("--model", "-m", default=None, envvar="LLAMALENS_MODEL", show_envvar=True,
                            help="GGUF path or model name (see `llamalens models`); default: embedded Gemma 3 270M "
                                 "Q4_K_M.")


def model_options(fn):
    """--model plus the runtime options: shared by every single-model command."""
    return model_option(runtime_options(fn))


def pop_model_options(kw: dict, chain: str | None = None) -> ModelOptions:
    """Take the runtime options out of a command's kwargs as one ModelOptions; those not given default to
    llama-server's with the llama.cpp chain (so its users get their server's numbers), else to ModelOptions'."""
    given = {name: kw.pop(name) for name in RUNTIME_HELP}
    defaults = SERVER_CONTEXT if chain == "llama.cpp" else ModelOptions().to_dict()
    for name in CHAIN_DEFAULTED:
        if given[name] is None:
            given[name] = defaults.get(name)
    return ModelOptions(**given)


chain_option = click.option("--chain", type=click.Choice(CHAINS), default=None,
                            help="Sampler chain: llama-cpp-python (create_completion's, the default) or llama.cpp "
                                 "(llama-server's, with its samplers and context defaults).")


def parse_logit_bias(items) -> tuple:
    """--logit-bias KEY=BIAS (repeatable): KEY a token id or a text (tokenized as llama-server does), BIAS a
    number, or false / -inf to ban it."""
    out = []
    for item in items or ():
        key, sep, bias = str(item).rpartition("=")
        if not sep or not key:
            raise InvalidSettings(f"--logit-bias {item!r}: give TOKEN=BIAS, e.g. 1000=-5 or ' mat'=false")
        b = bias.strip().lower()
        try:
            value = -float("inf") if b in ("false", "-inf") else float(b)
        except ValueError:
            raise InvalidSettings(f"--logit-bias {item!r}: {bias!r} is not a number (or false to ban)") from None
        out.append((int(key) if key.strip().lstrip("-").isdigit() else key, value))
    return tuple(out)


_ss = SamplingSettings()
sampling_options = _stack(
    click.option("--temperature", "-t", type=float, default=_ss.temperature, show_default=True, help="0 = greedy."),
    click.option("--top-k", type=int, default=_ss.top_k, show_default=True, help="0 = off."),
    click.option("--top-p", type=float, default=_ss.top_p, show_default=True, help="1 = off."),
    click.option("--min-p", type=float, default=_ss.min_p, show_default=True, help="0 = off."),
    click.option("--typical-p", type=float, default=_ss.typical_p, show_default=True, help="1 = off."),
    click.option("--repeat-penalty", type=float, default=_ss.repeat_penalty, show_default=True, help="1 = off."),
    click.option("--frequency-penalty", type=float, default=_ss.frequency_penalty, show_default=True,
                 help="Subtracted per earlier occurrence of a token (0 = off)."),
    click.option("--presence-penalty", type=float, default=_ss.presence_penalty, show_default=True,
                 help="Subtracted once from every token already present (0 = off)."),
    click.option("--seed", type=int, default=_ss.seed, show_default=True, help="Seed of the sampler's random draws."),
    # -- decoding strategy --
    click.option("--no-repeat-ngram", type=int, default=_ss.no_repeat_ngram, show_default=True,
                 help="Never produce an n-gram already in the prompt + output (0 = off)."),
)
"""One value per sampling setting (SamplingSettings' fields): generate."""


_lc = SamplingSettings(chain="llama.cpp")
_LLAMA_CPP_OPTIONS = {
    "samplers": click.option("--samplers", default=None, help=f"llama.cpp chain: stage order, llama-server's names "
                             f"[default: {_lc.samplers}]."),
    "min_keep": click.option("--min-keep", type=int, default=None,
                             help="llama.cpp chain: samplers keep at least N [default: 0]."),
    "dry_multiplier": click.option("--dry-multiplier", type=float, default=None,
                                   help="DRY repetition penalty (0 = off) [default: 0]."),
    "dry_base": click.option("--dry-base", type=float, default=None, help=f"DRY base (>= 1) [default: {_lc.dry_base}]."),
    "dry_allowed_length": click.option("--dry-allowed-length", type=int, default=None,
                                       help=f"DRY: repeats longer than this are penalised [default: "
                                            f"{_lc.dry_allowed_length}]."),
    "dry_penalty_last_n": click.option("--dry-penalty-last-n", type=int, default=None,
                                       help=f"DRY: tokens scanned (0 = off) [default: {_lc.dry_penalty_last_n}]."),
    "dry_sequence_breakers": click.option("--dry-sequence-breaker", "dry_sequence_breakers", multiple=True,
                                          help="DRY sequence breaker (repeatable; replaces llama-server's newline : "
                                               "\" *)."),
    "xtc_probability": click.option("--xtc-probability", type=float, default=None,
                                    help="XTC: chance it fires (0 = off) [default: 0]."),
    "xtc_threshold": click.option("--xtc-threshold", type=float, default=None,
                                  help=f"XTC: tokens above this p are removed, but the least likely [default: "
                                       f"{_lc.xtc_threshold}]."),
    "top_n_sigma": click.option("--top-n-sigma", type=float, default=None,
                                help="Keep logits within n sigma of the top (<= 0 = off)."),
    "dynatemp_range": click.option("--dynatemp-range", type=float, default=None,
                                   help="Dynamic temperature: T ± range (0 = off)."),
    "dynatemp_exponent": click.option("--dynatemp-exponent", type=float, default=None,
                                      help="Dynamic temperature exponent [default: 1]."),
    "mirostat": click.option("--mirostat", type=click.IntRange(0, 2), default=None,
                             help="0 = off, 1 = Mirostat, 2 = Mirostat 2.0."),
    "mirostat_tau": click.option("--mirostat-tau", type=float, default=None,
                                 help=f"Mirostat target entropy [default: {_lc.mirostat_tau}]."),
    "mirostat_eta": click.option("--mirostat-eta", type=float, default=None,
                                 help=f"Mirostat learning rate [default: {_lc.mirostat_eta}]."),
    "adaptive_target": click.option("--adaptive-target", type=float, default=None,
                                    help="adaptive-p target (< 0 = off; stage adaptive_p)."),
    "adaptive_decay": click.option("--adaptive-decay", type=float, default=None,
                                   help=f"adaptive-p decay [default: {_lc.adaptive_decay}]."),
    "logit_bias": click.option("--logit-bias", "logit_bias", multiple=True,
                               help="TOKEN=BIAS (repeatable): a token id or text, a number or false (ban)."),
    "ignore_eos": click.option("--ignore-eos", is_flag=True, default=None,
                               help="Ban end-of-generation tokens (as llama-server)."),
}
llama_cpp_sampling_options = _folded("llama.cpp chain", _stack(*_LLAMA_CPP_OPTIONS.values()))
"""The llama.cpp chain's own settings, one value each (generate); not given = llama-server's default."""


def llama_cpp_fixed_options(*axes: str):
    """The llama.cpp chain's settings that are not among `axes`, one value each (next: the others are axes)."""
    return _folded("llama.cpp chain", _stack(*(opt for name, opt in _LLAMA_CPP_OPTIONS.items() if name not in axes)))


def pop_sampling(kw: dict, chain: str | None = None) -> SamplingSettings:
    values = {k: kw.pop(k) for k in list(kw) if k in SamplingSettings.__dataclass_fields__}
    values["logit_bias"] = parse_logit_bias(values.get("logit_bias"))
    if not values.get("dry_sequence_breakers"):
        values.pop("dry_sequence_breakers", None)
    if chain:
        values["chain"] = chain
    return SamplingSettings(**{k: v for k, v in values.items() if v is not None})


AXIS_HELP = {
    "temperature": "Comma-separated values, e.g. 0,0.7,1.0 (0 = greedy).",
    "top_k": "e.g. 2,40 (0 = off).",
    "top_p": "e.g. 0.01,0.95 (1 = off).",
    "min_p": "e.g. 0,0.05 (0 = off).",
    "typical_p": "e.g. 0.5,1 (1 = off).",
    "repeat_penalty": "e.g. 1,1.3 (1 = off).",
    # -- decoding strategy --
    "strategy": "Decoding strategies, e.g. greedy,beam,sample (sample = the sampler chain).",
    "beams": "Beam widths for --strategy beam, e.g. 3,5 (num_beams; default 5).",
    "length_penalty": "Beam score = sum logprob / length^LP, e.g. 0.6,1.0 (0 = plain sum; default 1).",
    "no_repeat_ngram": "Block repeated n-grams, e.g. 0,2 (0 = off; every strategy).",
    "best_of": "Sampling: keep the best of N draws by sequence logprob, e.g. 1,8.",
    "dry_multiplier": "llama.cpp chain: e.g. 0,0.8 (0 = off).",
    "dry_base": "llama.cpp chain: e.g. 1.75,2.",
    "dry_allowed_length": "llama.cpp chain: e.g. 2,4.",
    "xtc_probability": "llama.cpp chain: e.g. 0,0.5 (0 = off).",
    "xtc_threshold": "llama.cpp chain: e.g. 0.1,0.2.",
    "top_n_sigma": "llama.cpp chain: e.g. -1,1 (<= 0 = off).",
    "dynatemp_range": "llama.cpp chain: e.g. 0,0.5 (0 = off).",
    "mirostat": "llama.cpp chain: e.g. 0,2 (0 = off).",
    "mirostat_tau": "llama.cpp chain: e.g. 3,5.",
    "samplers": "llama.cpp chain: orders, e.g. \"top_k;temperature\",\"min_p;temperature\".",
}

strategy_options = _stack(
    click.option("--early-stopping", type=click.Choice(["false", "true", "never"]),
                 default=_ss.early_stopping, show_default=True,
                 help="Beam search stop rule (transformers' early_stopping): true = once BEAMS hypotheses end."),
    click.option("--num-return", type=int, default=_ss.num_return, show_default=True,
                 help="Beam hypotheses kept per sample, best first (num_return_sequences, <= beams)."),
    click.option("--best-of-by", type=click.Choice(["sum", "mean"]), default=_ss.best_of_by, show_default=True,
                 help="Rank best-of draws by sequence (sum) or mean logprob."),
)
"""--early-stopping, --num-return, --best-of-by: fixed decoding-strategy settings of a sweep."""


def pop_strategy(kw: dict) -> dict:
    """The fixed decoding-strategy settings a user gave (defaults left out)."""
    out = {k: kw.pop(k) for k in ("early_stopping", "num_return", "best_of_by")}
    return {k: v for k, v in out.items() if v != getattr(_ss, k)}


def axis_options(*names: str, help_prefix: str = ""):
    """Grid axes as comma-separated lists (click names ax_<setting>; pop_axes collects them)."""
    opts = []
    for name in names:
        flags = ["--" + name.replace("_", "-")] + (["-t"] if name == "temperature" else [])
        opt = click.option(*flags, "ax_" + name, default=None, help=help_prefix + AXIS_HELP[name])
        opts.append(_folded("llama.cpp chain", opt) if name in _LLAMA_CPP_OPTIONS else opt)
    return _stack(*opts)


def pop_axes(kw: dict) -> dict[str, str | None]:
    """Take the grid-axis options out of a command's kwargs: {setting: text or None}."""
    return {k[3:]: kw.pop(k) for k in list(kw) if k.startswith("ax_")}


text_options = _stack(
    click.argument("text", required=False),
    click.option("--file", "-f", "file", default=None, help="Read the text from a file ('-' = stdin), UTF-8."),
    click.option("--raw-bytes", is_flag=True, help="Tokenize the input's bytes as they are (for non-UTF-8 files)."),
    click.option("--protocol", type=click.Choice(["full", "llama-perplexity"]), default="full", show_default=True,
                 help="full: every token, overlapping windows; llama-perplexity: exactly as llama.cpp's tool."),
    click.option("--stride", type=int, default=None,
                 help="full protocol: new tokens per window (default ctx/2); each token keeps >= ctx-1-stride of "
                      "context."),
    json_option,
    report_option(),
)
"""TEXT or --file, --raw-bytes, --protocol, --stride, --json, --report: score and compare."""


chat_options = _stack(
    click.option("--chat", is_flag=True,
                 help="Apply the model's chat template: PROMPT is the user's message, and what follows it is the "
                      "assistant's reply (the only part analysed)."),
    click.option("--system", default=None, help="A system message before the conversation (implies --chat)."),
    click.option("--chat-template", default=None,
                 help="A Jinja template FILE, or NAME of one of llama.cpp's built-in templates (chatml, gemma, "
                      "llama3, ...) instead of the model's own (implies --chat)."),
    click.option("--messages", "messages_file", default=None, type=click.Path(dir_okay=False),
                 help='Conversations from a .jsonl file, one per line: {"messages": [{"role": "user", "content": '
                      '"..."}]} (implies --chat).'),
)
"""--chat, --system, --chat-template, --messages: prompts as conversations (llamalens/core/chat.py)."""


@dataclass(frozen=True)
class ChatOptions:
    """What the chat options asked for; `on` is False when none was given."""

    on: bool = False
    system: str | None = None
    template: str | None = None
    messages_file: str | None = None

    def conversations(self, prompts) -> list[tuple]:
        """The conversations of PROMPT(S) (user messages) and --messages, read before any model is loaded."""
        from llamalens.core.chat import conversations

        return conversations(prompts, self.system, self.messages_file)

    def single(self, prompt: str | None, command: str):
        """The one conversation a command works on (None without the chat options; then PROMPT is needed)."""
        if not self.on:
            if prompt is None:
                raise click.UsageError("give a PROMPT (or a conversation: --chat PROMPT, --messages FILE)")
            return None
        if prompt is not None and self.messages_file:
            raise click.UsageError("give PROMPT or --messages FILE, not both")
        if prompt is None and not self.messages_file:
            raise click.UsageError("--chat needs the user's message as PROMPT, or --messages FILE")
        convs = self.conversations([prompt] if prompt is not None else [])
        if len(convs) != 1:
            raise click.UsageError(f"{command} works on one conversation, and {self.messages_file} holds {len(convs)}; "
                                   "keep one line, or use `llamalens sweep --messages FILE` for all of them")
        return convs[0]


def pop_chat(kw: dict) -> ChatOptions:
    chat, system, template, messages_file = (kw.pop(k) for k in ("chat", "system", "chat_template", "messages_file"))
    on = bool(chat or system is not None or template or messages_file)
    if template is not None:  # a mistyped name fails now, not after the model has loaded
        from llamalens.core.chat import check_template_name

        check_template_name(template)
    return ChatOptions(on, system, template, messages_file)


grammar_options = _stack(
    click.option("--grammar", "grammar_file", default=None, type=click.Path(dir_okay=False),
                 help="Constrain the reply with a GBNF grammar FILE (llama.cpp's format; start rule root)."),
    click.option("--json-schema", "json_schema_file", default=None, type=click.Path(dir_okay=False),
                 help="Constrain the reply to JSON fitting this schema FILE (converted to a grammar; see the README)."),
)
"""--grammar, --json-schema: constrained generation (llamalens/core/grammar.py)."""


def pop_grammar(kw: dict):
    """The grammar the options name (grammar.GrammarSpec), read now, or None."""
    from llamalens.core.grammar import read_grammar

    return read_grammar(kw.pop("grammar_file"), kw.pop("json_schema_file"))


ray_options = _folded("Ray", _stack(
    click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
                 help="Decode on Ray workers (pip install 'llamalens[ray]'): --ray alone starts a local Ray for the run, "
                      "--ray auto joins the cluster of `ray start`, or HOST:PORT / ray://HOST:PORT. "
                      "Put a bare --ray after the prompts."),
    click.option("--workers", type=click.IntRange(1, 4096), default=None,
                 help="Ray workers (one model each, --threads CPUs each; default: as many as the cluster's CPUs allow)."),
))


def pop_ray(kw: dict) -> tuple[str | None, int | None]:
    """(--ray address or None, --workers); --workers without --ray is refused."""
    address, workers = kw.pop("ray_address"), kw.pop("workers")
    if workers is not None and address is None:
        raise click.UsageError("--workers applies to Ray runs: add --ray (a local Ray) or --ray auto (a cluster)")
    if address is not None:  # a bad address or no Ray fails now, before a model is loaded or a run planned
        from llamalens.run.ray import check_ray

        check_ray(address)
    return address, workers


# -- help in groups ---------------------------------------------------------------------------------------------
def _names(decorator) -> frozenset[str]:
    """The parameter names a shared option decorator adds."""
    def probe():
        pass

    decorator(probe)
    return frozenset(p.name for p in getattr(probe, "__click_params__", []))


HELP_GROUPS = (  # (section title, its parameter names), in the order `--help` lists them after the command's own
    ("Settings to compare (comma-separated: one configuration per value)", None),  # the ax_* options
    ("Sampling", _names(sampling_options) | _names(strategy_options) | {"chain"}),
    ("llama.cpp chain (with --chain llama.cpp)", _names(llama_cpp_sampling_options)),
    ("Chat", _names(chat_options)),
    ("Grammar", _names(grammar_options)),
    ("Model", _names(model_options)),
    ("Ray", _names(ray_options)),
    ("Output", frozenset({"as_json", "report_path", "store_path"})),
)


def help_group(name: str) -> str:
    """The help section an option is listed under ('Options': the command's own)."""
    for title, names in HELP_GROUPS:
        if (name.startswith("ax_") if names is None else name in names):
            return title
    return "Options"


# The short --help leaves out the options marked folded (_folded: how a model is loaded but --model, the llama.cpp
# chain's own settings, as one value or as a sweep axis, and Ray); --help-all lists them.
_HELP_ALL = "llamalens.help_all"
_EXTRA = re.compile(r"\s*(\[[^\]]*\]\s*)+$")  # click's "[default: ...]  [env var: ...]" after the help text


def _show_all_help(ctx, param, value) -> None:
    if value and not ctx.resilient_parsing:
        ctx.meta[_HELP_ALL] = True
        click.echo(ctx.get_help(), color=ctx.color)
        ctx.exit()


def _one_line(text: str, width: int) -> str:
    """TEXT cut to WIDTH: whole if it fits, else its first sentence (with the default, if that still fits),
    else cut at a word with an ellipsis."""
    if len(text) <= width:
        return text
    m = _EXTRA.search(text)
    body, extra = (text[:m.start()], "  " + m.group().strip()) if m else (text, "")
    first = _balanced(re.split(r"(?<=\.)\s+(?=[A-Z])|;\s", body, maxsplit=1)[0])
    for candidate in (first + extra, first):
        if len(candidate) <= width:
            return candidate
    return _balanced(first[:width - 1].rsplit(" ", 1)[0]).rstrip(",;:") + "…"


def _balanced(text: str) -> str:
    """TEXT without a trailing bracket or parenthesis it opens and does not close."""
    for left, right in ("()", "[]", "{}"):
        if text.count(left) > text.count(right):
            text = text[:text.rindex(left)].rstrip()
    return text


def _short_text(text: str) -> str:
    """A command's help text for the short --help: its first paragraph and its first example."""
    paragraphs = inspect.cleandoc(text).split("\n\n")
    examples = [p.splitlines()[1] for p in paragraphs if p.startswith("\b\n")]
    return paragraphs[0] + (f"\n\n\b\n{examples[0]}" if examples else "")


class GroupedCommand(click.Command):
    """A command whose --help is short: its first paragraph and example, then its options in groups (its own
    first, then sampling, chat, grammar, model and output: HELP_GROUPS), one line each, without the folded
    groups; --help-all gives the whole text, every option and every line of its description."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.params.append(click.Option(["--help-all"], is_flag=True, expose_value=False, is_eager=True,
                                        callback=_show_all_help,
                                        help="Every option and example, in full."))

    def format_help_text(self, ctx, formatter) -> None:
        if ctx.meta.get(_HELP_ALL) or not self.help:
            return super().format_help_text(ctx, formatter)
        formatter.write_paragraph()
        with formatter.indentation():
            formatter.write_text(_short_text(self.help))

    def format_options(self, ctx, formatter) -> None:
        full = ctx.meta.get(_HELP_ALL, False)
        sections: dict[str, list] = {}
        folded = []
        for param in self.get_params(ctx):
            record = None if isinstance(param, click.Argument) else param.get_help_record(ctx)
            if record and not full and getattr(param, "folded", None):
                folded.append(param.folded)
            elif record:
                sections.setdefault(help_group(param.name), []).append(record)
        hidden = bool(folded) or _short_text(self.help or "") != inspect.cleandoc(self.help or "")
        for title in ["Options"] + [t for t, _ in HELP_GROUPS]:
            rows = sections.get(title)
            if rows and not full:
                col = min(max(len(opts) for opts, _ in rows), 30)
                width = max(formatter.width - formatter.current_indent - 4 - col, 20)
                short = [(opts, _one_line(text, width)) for opts, text in rows]
                hidden, rows = hidden or short != rows, short
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)
        if hidden and not full:
            formatter.write_paragraph()
            groups = ", ".join(dict.fromkeys(folded))
            more = f"{len(folded)} more options ({groups}), every" if folded else "Every"
            formatter.write_text(f"{more} example and each description in full: llamalens {ctx.info_name} --help-all")

"""The Python API of the commands: one call per command, the same library code the CLI runs.

    ll.sweep(prompts, grid=..., seeds=...)   ──► run.requests.SweepRequest: start + execute ──► Run
    ll.open_run(id or name) / ll.runs()      ──► store.Store ──► Run / DataFrame
    ll.score(text) / ll.choose / ll.compare  ──► score.score_text / choose / compare_text | compare_run
    ll.report(run, path)                     ──► the run kind's report (run/kinds.py)
    ll.fork(prompt, options=...)             ──► run.requests.ForkRequest: start + execute ──► Run (kind 'fork')

Design:
  * `model=` takes a loaded Model (ll.load_model: load once, use it in every cell) or what `--model` takes
    (a path, a name, None for $LLAMALENS_MODEL or the embedded default); a model loaded here is loaded
    with the same memory check as the CLI (memory.checked_load, sized as the command sizes it) and closed
    when the call returns.
  * `store=` is a path (None: $LLAMALENS_STORE or the default store) or a Store.
  * `progress=True` shows a tqdm bar (tqdm.auto: a widget in Jupyter, a text bar on a terminal); False is
    silent. Notes a command prints on stderr (a context too short for max_tokens...) become warnings.
  * Errors are the library's own classes (LlamalensError and its subclasses), with the fix in the message.
  * Results are typed records with to_dict() and, where tabular, to_pandas(); Run wraps analysis.LoadedRun
    (the rows `show`, `export` and the report are built from) with its DataFrames and methods.
  * Rich display (`_repr_html_`) is the report's own rendering: reports/notebook.py.
"""

from __future__ import annotations

import os
from pathlib import Path

from llamalens.api_support import model_of, note, progress_bar, store_of, sweep_ticks, warn_chat, window_ticks
from llamalens.arguments import list_of_texts, model_options as checked_options, optional, paths, text_list, whole
from llamalens.errors import InvalidArgument, InvalidInput, InvalidSettings
from llamalens.settings import SamplingSettings

__all__ = ["Run", "sweep", "open_run", "runs", "score", "choose", "compare", "report", "fork", "sampler_view", "calibrate"]


# -- runs ------------------------------------------------------------------------------------------
class Run:
    """A stored run (a sweep's, or a fork's): its settings, DataFrames, and its report.

    DataFrames (columns declared once in llamalens.run.loaded):
      tokens   one row per generated token (analysis.TOKEN_COLUMNS): run_id, sample_idx, prompt_idx, config_idx,
               seed, the settings (temperature, top_k, top_p, min_p, typical_p, repeat_penalty; with decoding
               strategies also strategy, beams, length_penalty, no_repeat_ngram, best_of), position, token_id,
               text, bytes (hex), logprob, prob, sampled_logprob, rank, entropy, candidates, eog, renyi (and blocked)
      samples  one row per finished sample (analysis.SAMPLE_COLUMNS): sample_idx, prompt_idx, config_idx, seed,
               prompt, text, finish_reason, tokens, tokens_per_s, first_token_ms, seq_logprob, mean_logprob,
               perplexity, distinct_1, distinct_2, rep_4, length
      confidence(answer=None)  one row per sample: its answer and confidence measures (run/confidence.py)
      summary  one row per configuration (analysis.SUMMARY_COLUMNS): config_idx, label, the settings, samples,
               tokens, mean_logprob, perplexity, mean_entropy, mean_candidates, distinct_completions, distinct_2,
               mean_rank, tokens_per_s (with strategies also their settings and seq_logprob, sample_distinct_1,
               sample_distinct_2, rep_4, length)
    Other attributes: id, name, kind, status, info (store.RunInfo), configs (SamplingSettings, by config_idx),
    noise_floor (the batched-vs-single re-decode figures: samples, tokens, mean/p95/p99/max |Δ logprob|,
    top1_agreement; reused_from: the run that measured them, when taken from one), loaded (the analysis.LoadedRun).
    """

    def __init__(self, loaded, store):
        self.loaded = loaded
        self.store = store

    @property
    def id(self) -> int:
        return self.loaded.info.id

    @property
    def info(self):
        return self.loaded.info

    @property
    def name(self) -> str | None:
        return self.info.name

    @property
    def kind(self) -> str:
        return self.info.kind

    @property
    def status(self) -> str:
        return self.info.status

    @property
    def configs(self) -> list[SamplingSettings]:
        return list(self.loaded.configs)

    @property
    def tokens(self):
        """pandas DataFrame, one row per generated token (see the class docstring for the columns)."""
        return self.loaded.tokens

    @property
    def samples(self):
        """pandas DataFrame, one row per finished sample (see the class docstring for the columns)."""
        return self.loaded.samples_table

    @property
    def summary(self):
        """pandas DataFrame, one row per configuration (what `llamalens show` prints)."""
        return self.loaded.summary

    @property
    def noise_floor(self) -> dict:
        """The run's noise floor (run/noise.py): {} before it was measured."""
        return dict(self.info.noise or {})

    def confidence(self, answer: str | None = None):
        """pandas DataFrame, one row per finished sample: its answer, how sure the model was of it and how its prompt's
        seeds agree (run/confidence.py), over the span the `answer` regex picks out, else the whole text (show --answer)."""
        from llamalens.run.confidence import confidence_table

        return confidence_table(self.loaded, answer)

    def export(self, path, fmt: str | None = None, excel_safe: bool = False, answer: str | None = None) -> int:
        """Write the token table (.csv, .parquet) or the samples in OpenAI logprobs shape (.jsonl), as
        `llamalens export`; `fmt` defaults to the file's suffix; excel_safe as --excel-safe; answer as --answer.
        Returns the rows written."""
        from llamalens.run.loaded import EXPORT_FORMATS, export_run

        fmt = fmt or Path(path).suffix.lower().lstrip(".")
        if fmt not in EXPORT_FORMATS:
            raise InvalidInput(f"cannot tell the export format from {str(path)!r}; name it .csv, .parquet or .jsonl, "
                               "or pass fmt=")
        return export_run(self.loaded, fmt, path, excel_safe, answer)

    def report(self, path, **options) -> Path:
        """Write the run's report (FILE.html or FILE.md), as `llamalens report`; see ll.report for options."""
        return report(self, path, **options)

    def to_dict(self) -> dict:
        """The run's info and its summary rows, as `llamalens show --json` prints them."""
        from llamalens.run.loaded import json_records

        return {"run": self.info.to_dict(), "summary": json_records(self.summary)}

    def to_pandas(self):
        """The summary DataFrame."""
        return self.summary

    def __repr__(self) -> str:
        i = self.info
        name = f" {i.name!r}" if i.name else ""
        return (f"<Run {i.id}{name} [{i.status}] {i.kind}, model {i.model.name}: {i.n_prompts} prompt(s) x "
                f"{i.n_configs} configuration(s), {i.n_done}/{i.n_samples} samples>")

    def _repr_html_(self) -> str:
        from llamalens.reports.notebook import run_html

        return run_html(self)


def _load(store, run_id) -> Run:
    from llamalens.run.loaded import load_run

    return Run(load_run(store, run_id), store)


def open_run(id_or_name, store=None) -> Run:
    """A stored run by id or name (what `llamalens show RUN` reads)."""
    st = store_of(store, read_only=True)
    return _load(st, st.run(id_or_name).id)


def runs(store=None):
    """The runs in the store as a pandas DataFrame (the columns of `llamalens runs --json`): id, name, kind,
    status, model, prompts, configs, samples_done, samples_total, created (a pandas Timestamp)."""
    import pandas as pd

    from llamalens.store import StoreMissing

    try:
        infos = store_of(store, read_only=True).runs()
    except StoreMissing:  # no store yet: no runs (and nothing created)
        infos = []
    df = pd.DataFrame([r.listing() for r in infos], columns=RUN_COLUMNS)
    df["created"] = pd.to_datetime(df["created"], unit="s")
    return df


RUN_COLUMNS = ["id", "name", "kind", "status", "model", "prompts", "configs", "samples_done", "samples_total",
               "workers", "created"]


def _configs(grid, preset: str | None, chain: str | None) -> list[SamplingSettings]:
    """A sweep's configurations from what Python gives: None (the preset or the defaults), a SamplingSettings or a
    list of them, a TOML grid file (path, or 'FILE:NAME'), or {setting: values} (a list, one value, or the CLI's
    '0,0.7' text) expanded as the CLI's axes are (grid.build_configs)."""
    from llamalens.run import grid as grids
    if isinstance(grid, SamplingSettings):
        return [grid]
    if isinstance(grid, (list, tuple)) and grid and all(isinstance(c, SamplingSettings) for c in grid):
        return list(grid)
    if grid is None or isinstance(grid, dict):
        axes = {}
        for name, values in (grid or {}).items():
            if name not in grids.AXES:
                raise InvalidSettings(f"grid: {name!r} is not a sweep axis; axes: {', '.join(grids.AXES)}")
            axes[name] = (grids.parse_axis(name, values) if isinstance(values, str) else
                          list(values) if isinstance(values, (list, tuple, range)) else [values])
        return grids.build_configs(preset, None, None, None, grids.chain_of(preset, chain), axes=axes)
    if isinstance(grid, (str, os.PathLike)):
        return grids.build_configs(preset, str(grid), None, None, grids.chain_of(preset, chain))
    raise InvalidSettings(f"grid={grid!r}: give {{setting: values}}, a SamplingSettings or a list of them, or a TOML "
                          "grid file's path")


def sweep(prompts=(), grid=None, *, seeds=1, max_tokens: int = 32, logprobs: int = 5, stop=(), preset: str | None = None,
          chain: str | None = None, name: str | None = None, parallel: int | None = None, exact: bool = False, model=None,
          store=None, progress: bool = True, chat: bool = False, system: str | None = None, messages=None,
          chat_template: str | None = None, grammar: str | None = None, json_schema: str | None = None,
          ray=None, workers: int | None = None, **model_options) -> Run:
    """Run prompts across a grid of sampling settings and seeds, store every token: `llamalens sweep`.

    prompts: one text or a list. grid: {setting: values} such as {"temperature": [0, 0.7], "top_k": [2, 40]}
    (every axis of `llamalens sweep`, strategies too), a SamplingSettings, a list of them, or a TOML grid file.
    seeds: N (seeds 0..N-1) or a list of seeds. preset / chain: as --preset / --chain. model: a loaded Model or
    a path / name (then model_options such as ctx=, batch= apply). store: a path or a Store.
    Chat (as --chat, --system, --messages, --chat-template): chat=True sends each prompt as a user message
    through the model's chat template (or chat_template: a file or a built-in name); messages: OpenAI-style
    conversations (a list of message lists) or a .jsonl file of them; the analysis covers the replies.
    grammar / json_schema: a GBNF file or a JSON-schema file that constrains every reply (--grammar,
    --json-schema). ray: a Ray cluster's address ("auto", HOST:PORT; True: a local one) decodes on its workers
    (workers= of them), as --ray. parallel: sequences a batch (default 32, or fewer by halves when the memory
    estimate of 32 does not fit the RAM available; a warning says so). An interrupted run is finished by
    ll.resume(run).

    >>> run = ll.sweep("The capital of France is", {"temperature": [0, 0.7]}, seeds=2)  # doctest: +SKIP
    >>> run.summary[["label", "mean_logprob", "distinct_completions"]]                  # doctest: +SKIP
    """
    from llamalens.core.grammar import read_grammar
    from llamalens.core.runtime import Model, ModelOptions
    from llamalens.run.requests import SweepRequest
    from llamalens.run.sweep import DEFAULT_PARALLEL, SweepSpec

    prompts = [prompts] if isinstance(prompts, str) else text_list(prompts, "prompts")
    stop = text_list(stop, "stop")
    paths(chat_template=chat_template, grammar=grammar, json_schema=json_schema)
    optional(name, "name", (str,), "a text")
    optional(system, "system", (str,), "a text")
    for value, what in ((max_tokens, "max_tokens"), (logprobs, "logprobs"), (parallel, "parallel")):
        if value is not None or what != "parallel":
            whole(value, what, 0 if what == "logprobs" else 1)
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise InvalidSettings(f"seeds={seeds} must be >= 1 (or a list of seeds)")
        from llamalens.run.grid import parse_seeds

        seed_values = parse_seeds(seeds, None)  # bounded before the list is made
    elif isinstance(seeds, (list, tuple, range)) and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        seed_values = list(seeds)
    else:
        raise InvalidSettings(f"seeds={seeds!r}: give a number of seeds (N: seeds 0..N-1) or a list of integer seeds")
    spec = SweepSpec(prompts, _configs(grid, preset, chain), seed_values, max_tokens, logprobs, tuple(stop), name,
                     exact, parallel or DEFAULT_PARALLEL)
    req = SweepRequest(spec, _conversations(prompts, chat, system, messages, chat_template), chat_template,
                       read_grammar(grammar, json_schema))
    req.check()
    executor = _ray(ray, workers)  # Ray checked before a run is stored
    st = store_of(store)
    if parallel is None and not isinstance(model, Model) and not model_options.get("force"):
        if said := req.fit_parallel(model, checked_options(model_options)):
            note(said)
    n_par, cells = req.sizing(model_options.get("ctx", ModelOptions().ctx))
    with model_of(model, model_options, sequences=n_par, cells=cells) as loaded:
        run_id = req.start(loaded, st, f"python: llamalens.sweep({len(prompts)} prompt(s))", note)
        warn_chat(req.chats)
        with progress_bar(progress, req.spec.n_samples, f"run {run_id}", "seq") as bar:
            req.execute(loaded, st, run_id, sweep_ticks(bar), executor)
    return _load(st, run_id)


def _ray(address, workers):
    """The executor of ray= (an address, or "auto" / True for the local cluster): the work on Ray workers."""
    if address is None or address is False:
        return None
    from llamalens.run.ray import RayExecutor, check_ray

    address = "local" if address is True else str(address)
    check_ray(address)
    return RayExecutor(address, workers, note)


def _conversations(prompts: list, chat: bool, system, messages, chat_template) -> list | None:
    """The conversations a chat sweep decodes (chat.conversations), None when no chat parameter is given."""
    from llamalens.core.chat import check_template_name, conversations

    if not (chat or system is not None or messages is not None or chat_template):
        return None
    check_template_name(chat_template)
    return conversations(prompts, system, messages, "messages=")


def resume(run, *, store=None, model=None, progress: bool = True) -> Run:
    """Finish an interrupted sweep (Ctrl-C, a kill, a crash) with its own stored settings: `llamalens sweep
    --resume RUN`. run: a Run or a run id / name in `store`; model: another path to the same file (its sha256
    is checked) or a loaded Model of it."""
    from llamalens.core.runtime import Model
    from llamalens.run.sweep import execute, resume_target

    st = run.store if isinstance(run, Run) else store_of(store)
    info = st.run(run.id if isinstance(run, Run) else run)
    run_id, path, options = resume_target(st, info.id, None if isinstance(model, Model) else model)
    with model_of(model if isinstance(model, Model) else path, {} if isinstance(model, Model) else options.to_dict()
                ) as loaded:
        with progress_bar(progress, info.n_samples, f"run {run_id}", "seq", initial=info.n_done) as bar:
            execute(loaded, st, run_id, sweep_ticks(bar))
    return _load(st, run_id)


def report(run, path, *, store=None, fmt: str | None = None, metric: str = "mean_logprob", position: int = 0,
           sample: int | None = None, model=None, load_model: bool = True, on_note=None, loader=None,
           writer=None, answer: str | None = None) -> Path:
    """Write a run's report, as `llamalens report`: one self-contained HTML page, or Markdown with PNG plots.

    run: a Run, or a run id / name in `store`. The sampler view loads the run's model file (or `model`: a
    loaded Model or a path) unless load_model=False; metric, position, sample, answer: as --metric, --position,
    --sample, --answer. Returns the report's path. The CLI's hooks: `on_note` hears the warnings (default: Python
    warnings), `loader(file, options)` loads a model file, `writer(doc, path, fmt)` writes the document.
    """
    from llamalens.run.confidence import check_answer_applies
    from llamalens.run.kinds import kind

    optional(path, "path", (str, os.PathLike), "the report's file, e.g. 'run.html' or 'run.md'", none_ok=False)
    st = run.store if isinstance(run, Run) else store_of(store, read_only=True)
    info = st.run(run.id if isinstance(run, Run) else run)
    check_answer_applies(info, answer)
    kind(info.kind).hook("report")(st, info, path, fmt, loaded=run.loaded if isinstance(run, Run) else None,
                                   model=model, position=position, sample=sample, metric=metric,
                                   load_model=load_model, say=on_note or note, loader=loader, write=writer or _write,
                                   answer=answer)
    return Path(path)


def _write(doc, path, fmt) -> None:
    from llamalens.reports.document import write

    write(doc, path, fmt)


# -- one-shot analyses -----------------------------------------------------------------------------
def score(text, *, model=None, protocol: str = "full", stride: int | None = None, logprobs: int = 5,
          progress: bool = False, **model_options):
    """How surprised the model is by a text, as `llamalens score`: a Score (score.ScoreResult) with per-token
    logprob, rank, entropy and alternatives, .perplexity, .nll, .bits_per_byte, .totals(), .to_pandas().

    text: str, or bytes (scored as they are, like --raw-bytes). protocol: "full" (every token, overlapping
    windows of the context) or "llama-perplexity" (exactly as llama.cpp's tool).

    >>> ll.score("The quick brown fox jumps over the lazy dog.").perplexity  # doctest: +SKIP
    """
    from llamalens.looks.requests import ScoreRequest

    req = ScoreRequest(text, protocol, stride, logprobs)
    req.check()
    batch = model_options.get("batch")
    with model_of(model, model_options, rows=batch or _default("batch")) as loaded:
        with progress_bar(progress, 1, "scoring", "window") as bar:
            return req.run(loaded, window_ticks(bar))


def _default(option: str):
    from llamalens.core.runtime import ModelOptions

    return getattr(ModelOptions(), option)


def choose(prompt: str, options, *, normalize: str = "none", space: bool = True, model=None, **model_options):
    """Rank continuations of a prompt by likelihood, as `llamalens choose`: a Choice (best first), with
    .probabilities(), .margins(), .to_dict(), .to_pandas().

    normalize: "none" (total logprob), "token" or "byte" (per token / per byte); space: join prompt and option
    with a space (False: --no-space).

    >>> ll.choose("The capital of France is", ["Paris", "London"]).options[0].option  # doctest: +SKIP
    'Paris'
    """
    from llamalens.looks.requests import ChooseRequest

    req = ChooseRequest(prompt, list_of_texts(options, "options", '["Paris", "London"]'), normalize, space)
    req.check()
    with model_of(model, model_options) as loaded:
        return req.run(loaded)


def calibrate(path, models=(None,), *, answer: str | None = None, match: str = "contains", max_tokens: int = 16,
              stop=("\n",), normalize: str = "none", bins: int = 10, parallel: int = 8, **model_options):
    """Whether the confidence measures predict correctness on a labelled set, as `llamalens calibrate`: a
    looks.calibrate.Calibration (per model, each measure's figures; .to_dict(), .to_pandas(); in a notebook its
    report). `models`: a list of what model= takes, side by side; the rest as the command's options."""
    from llamalens.looks.calibrate import calibrate as run, model_cells

    optional(path, "path", (str, os.PathLike), "the labelled set's file, e.g. 'qa.jsonl'", none_ok=False)
    if isinstance(models, (str, os.PathLike)) or not isinstance(models, (list, tuple)) or not models:
        raise InvalidArgument(f"models={models!r:.60}: give a list of models (paths, names, loaded Models or None)")
    cells = model_cells(max_tokens, parallel) if isinstance(max_tokens, int) and isinstance(parallel, int) else None
    return run(path, models, lambda m: model_of(m, model_options, sequences=parallel, cells=cells), answer=answer,
               match=match, max_tokens=max_tokens, stop=tuple(stop), normalize=normalize, bins=bins, parallel=parallel)


def compare(model_a=None, model_b=None, *, models=None, text=None, run=None, store=None, protocol: str = "full",
            stride: int | None = None, name: str | None = None, progress: bool = False, **model_options):
    """How far models drift from a base on the same tokens, as `llamalens compare`.

    models=[base, q1, q2, ...] with text= (or run=, a stored run's generated tokens): a compare run in the store
    (resumable; `llamalens compare --resume`), read back as a Ladder (run/ladder.py): .table() the models by file
    size, .stats(k) every figure llama-perplexity --kl-divergence prints for model k, .worst(k), .to_pandas().
    Paths or names; the base first.

    model_a, model_b: two models (loaded Models, or paths / names) compared in memory: a Comparison with
    .summary() (the same figures), .worst(k), .positions, .to_pandas(). text: a str or bytes; or run: a Run / run
    id (model B on that sweep's generated tokens; model_a None = the run's model).

    >>> ll.compare(models=["gemma-f16.gguf", "gemma-q8_0.gguf", "gemma-q4_0.gguf"], text=text).table()  # doctest: +SKIP
    """
    from llamalens.core.runtime import Model
    from llamalens.looks.requests import CompareRequest

    if models is not None:
        return _compare_run(models, text, run, store, protocol, stride, name, progress, model_options)
    st = None
    if run is not None:
        st = run.store if isinstance(run, Run) else store_of(store, read_only=True)
        run = run.id if isinstance(run, Run) else run
        if model_a is None:
            model_a = st.run(run).model.path
    req = CompareRequest([model_a, model_b], text, run, protocol, stride)
    req.check()
    loaded_given = [isinstance(m, Model) for m in (model_a, model_b)]
    model_a, model_b = (m if given else str(f) for m, given, f in zip((model_a, model_b), loaded_given, req.files))
    rows = model_options.get("batch") or _default("batch")
    with model_of(model_a, model_options if not loaded_given[0] else {}, rows=rows) as a, \
            model_of(model_b, model_options if not loaded_given[1] else {}, rows=rows) as b:
        with progress_bar(progress, 1, "comparing", "window" if run is None else "sample") as bar:
            if run is not None:
                return req.on_run(a, b, st, on_progress=window_ticks(bar))
            ctx = model_options.get("ctx") or min(a.options.ctx, b.options.ctx)
            return req.pairwise(a, b, ctx, on_progress=window_ticks(bar))


def _compare_run(models, text, run, store, protocol, stride, name, progress, model_options):
    """ll.compare(models=[...], text=...): a compare run, planned, decoded and read back."""
    from llamalens.looks.requests import CompareRequest

    run = run.id if isinstance(run, Run) else run
    if isinstance(models, (str, bytes, os.PathLike)) or not isinstance(models, (list, tuple)) or not all(
            isinstance(m, (str, os.PathLike)) for m in models):
        raise InvalidArgument(f"models={models!r:.60}: give a list of model paths or names, the base first, e.g. "
                              'models=["base.gguf", "q4.gguf"]')
    req = CompareRequest([str(m) for m in models], text, run, protocol=protocol, stride=stride, name=name)
    req.check()
    st = store_of(store)
    with model_of(str(req.files[0]), model_options, rows=model_options.get("batch") or _default("batch")) as base:
        run_id = req.start(base, st, "ll.compare", note)
        with progress_bar(progress, st.run(run_id).n_samples - 1, "comparing", "unit") as bar:
            req.execute(base, st, run_id, sweep_ticks(bar))
    return req.result(st, run_id)


def sampler_view(model, prompt: str, settings, *, top: int = 10, history=()):
    """The next-token distribution after prompt (+ history token ids) raw, and after each setting's sampler chain,
    as `llamalens next -t ...`: a distribution.SamplerView (bars of raw vs after the chain in a notebook).

    settings: a SamplingSettings, a list of them, or {setting: values} expanded as a grid over neutral
    settings (temperature 1, no truncation), e.g. {"temperature": [0.5, 1, 2]}.
    """
    from llamalens.run import grid as grids
    from llamalens.looks.next_token import sampler_view as view
    from llamalens.settings import NEUTRAL, changes_label

    if not isinstance(prompt, str):
        raise InvalidArgument(f"prompt={prompt!r:.40}: give the prompt as a str")
    if isinstance(settings, dict):
        configs = grids.expand({k: (list(v) if isinstance(v, (list, tuple)) else [v]) for k, v in settings.items()},
                               NEUTRAL)
        labels = [changes_label(c) for c in configs]
    else:
        configs = [settings] if isinstance(settings, SamplingSettings) else list(settings) if isinstance(
            settings, (list, tuple)) else []
        if not configs or not all(isinstance(c, SamplingSettings) for c in configs):
            raise InvalidArgument(f"settings={settings!r:.60}: give a SamplingSettings, a list of them, or "
                                  '{setting: values} such as {"temperature": [0.5, 1]}')
        labels = None
    grids.check(configs, [0])
    with model_of(model, {}) as loaded:
        return view(loaded, prompt, list(history), configs, top, labels=labels)


def fork(prompt: str | None = None, *, options=None, outcome: str | None = None,
         settings: SamplingSettings | None = None, sampled_base: bool = False, samples: int = 4, alternatives: int = 3,
         min_prob: float = 0.05, positions=None, max_tokens: int = 24, stop=(), parallel: int = 32, exact: bool = False,
         max_sequences: int = 2000, name: str | None = None, model=None, store=None, progress: bool = True,
         chat: bool = False, system: str | None = None, messages=None, chat_template: str | None = None, ray=None,
         workers: int | None = None, **model_options) -> Run:
    """Find the tokens of a completion where the answer is decided, as `llamalens fork`: a Run of kind 'fork'
    (its report and notebook display are the fork report; run.fork.load_fork(run.store, run.id) has the analysis).

    options: the outcomes to look for (a list or "yes,no"); or outcome: a regex (its group 1 if it has one);
    neither: the completion's first line. positions: None (all), N, or (N, M). settings: the continuations'
    sampling settings (the base path is greedy unless sampled_base=True). Chat (as --chat, --system,
    --messages, --chat-template): chat=True sends prompt as a user message through the model's template, or
    messages= gives one conversation (a message list); the base path is the reply. ray / workers: as in sweep().
    """
    from llamalens.run.fork import ForkSpec, OutcomeSpec, parse_positions
    from llamalens.run.requests import ForkRequest

    if options is not None and outcome is not None:
        raise InvalidInput("options= and outcome= are different ways to read the outcome: give one")
    optional(outcome, "outcome", (str,), "a regular expression as a str")
    optional(name, "name", (str,), "a text")
    optional(system, "system", (str,), "a text")
    paths(chat_template=chat_template)
    if isinstance(positions, tuple) and not (len(positions) == 2 and all(
            isinstance(p, int) and not isinstance(p, bool) for p in positions)):
        raise InvalidArgument(f"positions={positions!r:.40}: give None (all), N, (N, M) of whole numbers, or 'N-M'")
    if isinstance(options, str):
        options = options.split(",")
    if prompt is not None and not isinstance(prompt, str):
        raise InvalidArgument(f"prompt={prompt!r:.40}: give the prompt as a str")
    if settings is not None and not isinstance(settings, SamplingSettings):
        raise InvalidArgument(f"settings={settings!r:.60}: give a SamplingSettings (e.g. "
                              "ll.SamplingSettings(temperature=0.8)) or None")
    for value, what in ((samples, "samples"), (alternatives, "alternatives"), (max_tokens, "max_tokens"),
                        (parallel, "parallel"), (max_sequences, "max_sequences")):
        whole(value, what)
    spec_outcome = (OutcomeSpec("regex", regex=outcome) if outcome is not None else
                    OutcomeSpec("options", options=tuple(o.strip() for o in text_list(options, "options")))
                    if options is not None else OutcomeSpec())
    span = positions if positions is None or isinstance(positions, tuple) else parse_positions(str(positions))
    spec = ForkSpec(prompt or "", settings or SamplingSettings(), spec_outcome, sampled_base, samples, alternatives,
                    min_prob, span, max_tokens, tuple(text_list(stop, "stop")), parallel, exact, max_sequences, name)
    one = isinstance(messages, (list, tuple)) and bool(messages) and isinstance(messages[0], dict)  # a message list
    convs = _conversations([prompt] if prompt is not None else [], chat, system, [messages] if one else messages,
                           chat_template)
    if convs is not None and len(convs) != 1:
        raise InvalidInput(f"fork works on one conversation; messages= holds {len(convs)}")
    req = ForkRequest(spec, convs[0] if convs else None, chat_template)
    req.check()
    executor = _ray(ray, workers)  # Ray checked before a run is stored
    st = store_of(store)
    sequences, cells = req.sizing()
    with model_of(model, model_options, sequences=sequences, cells=cells) as loaded:
        req.render(loaded)
        warn_chat([req.rendered] if req.rendered is not None else [])
        run_id, cost = req.start(loaded, st, "python: llamalens.fork(...)", note)
        with progress_bar(progress, cost.sequences, f"fork run {run_id}", "seq") as bar:
            req.execute(loaded, st, run_id, sweep_ticks(bar), executor)
    return _load(st, run_id)


def lens(prompt: str, *, target=(), positions: str | None = None, layers: str | None = None, top: int = 5,
         attention=None, model=None, store=None, name: str | None = None, save: bool = True, **model_options):
    """The logit lens of a prompt, as `llamalens lens`: a LensResult (run/lens.py) whose positions hold, per
    layer, the top tokens, entropy, KL to the model's final distribution and the rank of each target;
    .to_pandas() a row per (position, layer) cell. Stored as a run of kind "lens" unless save=False.

    target: a text or a list of texts; positions / layers: "0,4,-1", "2:10" (None: the last 32 positions, every
    layer); attention: a position (-1: the last) whose weights per layer and head .to_pandas("attention") gives;
    model=[A, B]: two models' lenses compared layer by layer (KL(A || B) and B's top tokens in every cell).

    >>> ll.lens("The Eiffel Tower is in the city of", target=" Paris").to_pandas()  # doctest: +SKIP
    """
    from llamalens.run.lens import LensSpec, lens_of, save as save_lens

    targets = [target] if isinstance(target, str) else list(target)
    spec = LensSpec(prompt, targets, positions, layers, whole(top, "top"), None if attention is None else str(attention)).check()
    st, models = store_of(store) if save else None, list(model) if isinstance(model, (list, tuple)) else [model]
    with lens_of(models, spec, lambda m, need: model_of(m, model_options, rows=128, analysis=need)) as (loaded, result):
        if st is not None:
            save_lens(st, loaded, result, name, f"ll.lens({prompt!r:.80})")
    return result

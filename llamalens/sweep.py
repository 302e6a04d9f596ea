"""Grid sweeps: plan every sample in the store, decode them batched, save each as it completes.

    spec ──► plan (prompt × config × seed, all 'pending' in the store) ──► Engine(n_parallel)
         ──► each finished Sample saved in its own transaction ──► noise floor ──► run 'done'

Resume: `resume_target` says which model file and options an interrupted run needs, and `execute`
reloads the run's configs and options and decodes only its pending samples, with their stored seeds.
Completed samples are never rewritten.

Noise floor: batched logits differ from single-sequence ones (on quantized weights the CPU kernels
change with the batch shape, and so does the non-flash attention path), so every run
re-decodes the chosen tokens of a few of its samples one at a time (teacher-forced, exactly the
path of `llamalens generate`) and records mean / max |Δ logprob| and top-1 agreement. Differences
between configurations smaller than that are noise, and `show` and the report say so.
`exact=True` decodes one sequence at a time: identical to `generate`, at the cost of speed.
"""

from __future__ import annotations

import json
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from .beam import beam_search
from .decoding import blocked_extra, draw_seed, pick_best_of
from .engine import Engine, Request, context_notes
from .errors import InvalidSettings, StoreError
from .records import Hardware, RunOptions
from .runtime import Model, build_info, library_versions, round_ctx
from .settings import ModelOptions, SamplingSettings
from .stats import RowStats
from .store import RunInfo, Store, StoreFull

DEFAULT_PARALLEL = 32
NOISE_SAMPLES = 3


@dataclass
class SweepSpec:
    prompts: list[str]
    configs: list[SamplingSettings]
    seeds: list[int]
    max_tokens: int = 32
    n_logprobs: int = 5
    stop: tuple[str, ...] = ()
    name: str | None = None
    exact: bool = False
    parallel: int = DEFAULT_PARALLEL
    chats: list[dict] = field(default_factory=list)  # per prompt, the conversation it was rendered from (chat.py)
    grammar: dict | None = None  # grammar.GrammarSpec.to_dict(): every sample constrained by it

    def plan(self) -> list[tuple[int, int, int, str]]:
        return [(p, c, s, prompt) for p, prompt in enumerate(self.prompts) for c in range(len(self.configs))
                for s in self.seeds]

    @property
    def n_samples(self) -> int:
        return len(self.prompts) * len(self.configs) * len(self.seeds)


@dataclass
class Progress:
    done: int
    total: int
    tokens: int
    elapsed: float
    saved: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float:
        return self.elapsed / self.done * (self.total - self.done) if self.done else float("nan")


class SweepInterrupted(Exception):
    """A sweep stopped before its end (Ctrl-C, SIGTERM, a full disk); what was committed is saved."""

    def __init__(self, run_id: int, done: int, total: int, why: str = "interrupted"):
        super().__init__(f"{why}: {done}/{total} samples of run {run_id} are saved; "
                         f"resume with: llamalens sweep --resume {run_id}")
        self.run_id, self.done, self.total = run_id, done, total
        self.by_signal = why == "interrupted"  # Ctrl-C / SIGTERM, not a full disk


def hardware(model: Model) -> Hardware:
    build = build_info()
    return Hardware(threads=model.options.threads_or_default(), gpu_layers=model.options.gpu_layers,
                    flash_attn=model.options.flash_attn, machine=platform.machine(), system=platform.system(),
                    llama_cpp_system_info=build["system_info"], cmake_args=build["cmake_args"])


def check_spec(model: Model, spec: SweepSpec) -> list[str]:
    """Every bad value and too-long prompt fails here, before the store changes; returns notes to show
    (a context too short for max_tokens)."""
    if spec.stop and any(c.strategy == "beam" for c in spec.configs):
        raise InvalidSettings("--stop does not apply to beam search (its beams end at the end-of-generation token "
                              "or max-tokens); drop --stop, or the beam strategy")
    if spec.grammar and any(c.strategy == "beam" for c in spec.configs):
        raise InvalidSettings("a grammar does not apply to beam search (its beams are not constrained); drop "
                              "--grammar / --json-schema, or the beam strategy")
    gbnf = spec.grammar["gbnf"] if spec.grammar else None
    reqs = [Request(prompt, spec.configs[c].with_(seed=s), spec.max_tokens, spec.n_logprobs, spec.stop, grammar=gbnf)
            for p, c, s, prompt in spec.plan()]
    return context_notes(Engine(model, 1).prepare(reqs), model.options.ctx)


def sizing(prompts, convs, n_configs: int, n_seeds: int, max_tokens: int, parallel: int, exact: bool,
           ctx: int) -> tuple[int, int]:
    """(sequences per batch, KV cells in all) for the memory check before a sweep's model is loaded.

    KV cells: at most (prompt bytes + BOS/EOS + max_tokens + 1) per sequence, within ctx; a conversation's
    template adds its markers (64 bytes a message is generous for llama.cpp's built-in templates)."""
    n_par = 1 if exact else min(parallel, len(convs if convs else prompts) * n_configs * n_seeds)
    lengths = [len(p.encode("utf-8")) for p in prompts] + [
        sum(len(str(m.get("content", "")).encode("utf-8")) + 64 for m in c) for c in convs or []]
    per_seq = min(ctx, max(lengths) + 3 + max_tokens)
    return n_par, n_par * per_seq


def start_sweep(model: Model, store: Store, spec: SweepSpec, command: str = "",
                on_note: Callable[[str], None] | None = None) -> int:
    """Validate, plan and record a run (all samples pending); return its id. Nothing is decoded yet.
    `on_note` hears what check_spec has to say (a context too short for max_tokens)."""
    for note in check_spec(model, spec):
        if on_note:
            on_note(note)
    options = RunOptions(max_tokens=spec.max_tokens, n_logprobs=spec.n_logprobs, stop=tuple(spec.stop),
                         exact=spec.exact, parallel=1 if spec.exact else spec.parallel, prompts=tuple(spec.prompts),
                         seeds=tuple(spec.seeds), model_options=model.options, chats=tuple(spec.chats),
                         grammar=spec.grammar)
    return store.create_run(name=spec.name, command=command, model=model.describe(),
                            model_hash=store.model_hash(model.path), versions=library_versions(),
                            hardware=hardware(model), options=options, configs=spec.configs, plan=spec.plan())


def resume_target(store: Store, run_id, model: str | None = None, kind: str = "sweep"
                  ) -> tuple[int, str, ModelOptions]:
    """(run id, model path, model options) to finish an interrupted run of `kind`: its own file and options
    unless `model` names another file (execute() then checks that file's hash against the run's)."""
    info = store.run(run_id)
    check_resumable(info, kind)
    return info.id, model or info.model.path, info.options.model_options


def check_resumable(info: RunInfo, kind: str = "sweep") -> None:
    """An interrupted run of `kind` (each kind resumes with its own command)."""
    if info.kind != kind:
        raise StoreError(f"run {info.id} is a {info.kind} run, not a {kind} run; resume it with "
                         f"`llamalens {info.kind} --resume {info.id}`")
    if info.status == "done" and info.n_done == info.n_samples:
        raise StoreError(f"run {info.id} is already complete ({info.n_done}/{info.n_samples} samples); "
                         "nothing to resume")


def report_model(info: RunInfo, model: str | None = None) -> tuple[str | None, ModelOptions]:
    """(model file, options) for a run's sampler view: `model` if given, else the run's own file while it
    is still there (None when it is not), with the options the run was made with."""
    if model is None and not (info.model.path and Path(info.model.path).is_file()):
        return None, info.options.model_options
    return model or info.model.path, info.options.model_options


def check_run_model(store: Store, info: RunInfo, model: Model) -> None:
    """A loaded model must be the file the run was made with (same sha256), or its numbers would mix."""
    if info.model_hash and info.model_hash != store.model_hash(model.path):
        raise StoreError(f"{model.path} is not the model of run {info.id}: that was {info.model.path} "
                         f"(sha256 {info.model_hash[:12]}); pass --model {info.model.path}")


def execute(model: Model, store: Store, run_id: int,
            on_progress: Callable[[Progress], None] | None = None) -> Progress:
    """Decode the pending samples of a run, saving each as it completes; then measure the noise floor."""
    info = store.run(run_id)
    check_resumable(info)
    check_run_model(store, info, model)
    configs = store.configs(run_id)
    prog = Progress(info.n_done, info.n_samples, 0, 0.0)
    with writing(store, run_id, prog) as writer:
        save = saver(store, run_id, writer, prog, on_progress)
        for sample, extra, n_tokens in decode(model, store.pending(run_id), configs, info.options):
            save(sample, extra, n_tokens)
        finish(model, store, run_id)
    return prog


def saver(store: Store, run_id: int, writer: int, prog: Progress, on_progress=None):
    """save(sample, extra, tokens decoded): commit one finished sample (keyed by its sample_idx) and count it."""
    t0 = time.perf_counter() - prog.elapsed

    def save(sample, extra, n_tokens):
        store.save_sample(run_id, sample.key, sample, writer, extra=extra or None)
        prog.done += 1
        prog.tokens += n_tokens
        prog.elapsed = time.perf_counter() - t0
        prog.saved.append(sample.key)
        if on_progress:
            on_progress(prog)

    return save


def finish(model: Model, store: Store, run_id: int) -> None:
    """Measure the noise floor of a run whose samples are all in, and mark it done."""
    store.set_status(run_id, "done", noise=noise_floor(model, store, run_id))


def decode(model: Model, pending, configs, opts: RunOptions):
    """Decode these pending samples (StoredSample) of a run made with `opts`; yield (sample keyed by its
    sample_idx, what it records in samples.extra, tokens decoded for it) as each one is finished."""
    reqs, beams, draws = plan_requests(pending, configs, opts)
    engine = Engine(model, opts.parallel)
    for sample in engine.run(reqs):
        if isinstance(sample.key, tuple):  # one draw of a best-of-N sample: yielded when all N are in
            idx, i = sample.key
            got, cfg = draws[idx]
            got[i] = sample
            if len(got) < cfg.best_of:
                continue
            win, extra = pick_best_of([got[k] for k in range(cfg.best_of)], cfg.best_of_by, cfg.to_dict())
            win.key = idx
            yield win, {**extra, **sample_extra(win)}, sum(len(d.tokens) for d in got.values())
        else:
            yield sample, sample_extra(sample), len(sample.tokens)
    done_beams: dict[tuple, object] = {}  # beam search is deterministic: one search serves every seed
    for s, cfg in beams:
        key = (s.prompt, json.dumps(cfg.with_(seed=0).to_dict(), sort_keys=True))
        if key not in done_beams:
            done_beams[key] = beam_search(model, s.prompt, cfg, opts.max_tokens, opts.n_logprobs, exact=opts.exact)
        res = done_beams[key]
        sample = replace(res.sample, key=s.sample_idx, settings=cfg.to_dict())  # a copy: one search, many seeds
        yield sample, {**res.extra(model), **blocked_extra(sample.tokens)}, res.scored_tokens


@contextmanager
def writing(store: Store, run_id: int, prog: Progress, interrupted: type = SweepInterrupted,
            on_stop: Callable[[], None] | None = None):
    """Decode into a run as its registered writer (status 'running'). Ctrl-C / SIGTERM or a full disk marks the
    run interrupted (after `on_stop`, on Ctrl-C) and raises `interrupted` with the resume command; the writer
    is always released."""
    writer = store.claim(run_id)
    try:
        store.set_status(run_id, "running")
        yield writer
    except KeyboardInterrupt:
        if on_stop:
            on_stop()
        _stopped(store, run_id)
        raise interrupted(run_id, prog.done, prog.total) from None
    except StoreFull as e:
        _stopped(store, run_id)
        raise interrupted(run_id, prog.done, prog.total, f"{e}; free some space, then resume. Stopped") from None
    finally:
        try:
            store.release(writer)
        except Exception:  # noqa: BLE001 - a full disk may refuse even this; the writer then reads as gone
            pass


def sample_extra(sample) -> dict:
    """What a sampled sample records beyond its tokens: the grammar's removed mass per token, the ids
    no-repeat-ngram banned."""
    extra = {"grammar_removed": sample.grammar_removed} if sample.grammar_removed is not None else {}
    return {**extra, **blocked_extra(sample.tokens)}


def plan_requests(pending, configs, opts):
    """The engine's requests (a best-of-N sample is N of them, keyed (sample_idx, draw)), the beam searches
    [(sample, settings)], and the best-of draws still to collect {sample_idx: ({}, settings)}."""
    reqs, beams, draws = [], [], {}
    gbnf = opts.grammar["gbnf"] if opts.grammar else None
    for s in pending:
        cfg = configs[s.config_idx].with_(seed=s.seed)
        if cfg.strategy == "beam":
            beams.append((s, cfg))
        elif cfg.best_of > 1:
            draws[s.sample_idx] = ({}, cfg)
            reqs += [Request(s.prompt, cfg.with_(seed=draw_seed(s.seed, i, cfg.best_of)), opts.max_tokens,
                             opts.n_logprobs, opts.stop, key=(s.sample_idx, i), grammar=gbnf) for i in range(cfg.best_of)]
        else:
            reqs.append(Request(s.prompt, cfg, opts.max_tokens, opts.n_logprobs, opts.stop, key=s.sample_idx,
                                grammar=gbnf))
    return reqs, beams, draws


def _stopped(store: Store, run_id: int) -> None:
    """Mark a run interrupted (best effort: on a full disk the writer's end marks it so instead)."""
    try:
        store.set_status(run_id, "interrupted")
    except Exception:  # noqa: BLE001
        pass


def noise_floor(model: Model, store: Store, run_id: int, k: int = NOISE_SAMPLES) -> dict:
    """Re-decode the chosen tokens of k samples one at a time; compare with the stored (batched) values.

    Records how many tokens the figures rest on and the distribution of |Δ logprob|: mean, 95th and 99th
    percentile, max; and top-1 agreement. What they claim is in reports.run.describe_noise.
    """
    samples = store.samples(run_id)
    if not samples:
        return {"samples": 0}
    picks = noise_samples(samples, k)
    deltas, agree = [], 0
    for s in picks:
        toks = [t for _, t in store.tokens(run_id, s.sample_idx)]
        agree += against_rescored(toks, rescore(model, s.prompt, [t.id for t in toks]), deltas)
    return noise_figures(len(picks), deltas, agree)


def against_rescored(toks, ref, deltas: list) -> int:
    """Append |Δ logprob| of each stored token against its one-at-a-time re-decode (`ref`: rescore's
    (logprob, top-1 id) pairs) to `deltas`; the number of tokens whose stored top-1 is the re-decoded one
    (a record without a top list counts its own token when it was rank 1)."""
    agree = 0
    for t, (lp, top1) in zip(toks, ref):
        deltas.append(abs(t.logprob - lp))
        agree += int((t.top[0].id if t.top else (t.id if t.rank == 1 else -1)) == top1)
    return agree


def noise_figures(n_samples: int, deltas: list, agree: int) -> dict:
    """The noise-floor figures stored with a run: how many samples and tokens they rest on, the
    distribution of |Δ logprob| (mean, 95th and 99th percentile, max) and the top-1 agreement."""
    if not deltas:
        return {"samples": 0}
    d = np.array(deltas)
    return {"samples": n_samples, "tokens": len(d), "mean_abs_dlogprob": float(d.mean()),
            "p95_abs_dlogprob": float(np.quantile(d, 0.95)), "p99_abs_dlogprob": float(np.quantile(d, 0.99)),
            "max_abs_dlogprob": float(d.max()), "top1_agreement": agree / len(d)}


def noise_samples(samples: list, k: int = NOISE_SAMPLES, most: int = 8) -> list:
    """The samples to re-decode: one of each configuration (up to `most`), taken from different prompts and
    seeds in turn, and at least k in all, spread over the run."""
    by_config: dict[int, list] = {}
    for s in samples:
        by_config.setdefault(s.config_idx, []).append(s)
    picks = [group[i % len(group)] for i, (_, group) in enumerate(sorted(by_config.items())[:most])]
    for i in np.unique(np.linspace(0, len(samples) - 1, min(k, len(samples))).astype(int)):
        if len(picks) >= k:
            break
        if samples[int(i)] not in picks:
            picks.append(samples[int(i)])
    return picks


def rescore(model: Model, prompt: str, token_ids: list[int], prompt_tokens: list[int] | None = None
            ) -> list[tuple[float, int]]:
    """(raw logprob, top-1 id) of each given token, decoded one at a time after the prompt (or after
    `prompt_tokens`, when given: a fork continuation's prefix)."""
    ptoks = prompt_tokens if prompt_tokens is not None else model.prompt_tokens(prompt)
    out = []
    with model.context(n_ctx=round_ctx(len(ptoks) + len(token_ids) + 1)) as ctx:
        row = ctx.prefill(ptoks)
        pos = len(ptoks)
        for i, tok in enumerate(token_ids):
            st = RowStats.of(row, tok, 1)
            out.append((st.logprob, int(st.top_ids[0])))
            if i + 1 < len(token_ids):
                ctx.decode([tok], [pos], [0], [1])
                row = ctx.logits(0)
                pos += 1
    return out


def run_sweep(model: Model, store: Store, spec: SweepSpec, command: str = "",
              on_progress: Callable[[Progress], None] | None = None) -> int:
    run_id = start_sweep(model, store, spec, command)
    execute(model, store, run_id, on_progress)
    return run_id

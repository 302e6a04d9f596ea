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
from dataclasses import dataclass, field, replace
from typing import Callable


from llamalens.core.beam import beam_search
from llamalens.core.strategies import draw_seed, pick_best_of
from llamalens.core.engine import Engine, Request, context_notes
from llamalens.errors import InvalidSettings
from llamalens.records import Hardware, RunOptions
from llamalens.core.runtime import Model, build_info, library_versions
from llamalens.settings import SamplingSettings
from llamalens.run import lifecycle
from llamalens.run.sweep_records import BeamExtra, BeamHypothesis, BeamStep, BestOfExtra, SweepExtra
from llamalens.run.lifecycle import (DEFAULT_PARALLEL, Progress, RunInterrupted, Work, check_resumable,  # noqa: F401
                                     check_run_model, report_model, resume_target)
from llamalens.run.noise import sweep_noise
from llamalens.store import RunInfo, Store

MAX_LOGPROBS = 100  # alternatives a run stores per token (as score --logprobs); the library's generate() takes more


class SweepInterrupted(RunInterrupted):
    """A sweep stopped before its end; what was committed is saved (the message names `sweep --resume`)."""


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


def hardware(model: Model) -> Hardware:
    build = build_info()
    return Hardware(threads=model.options.threads_or_default(), gpu_layers=model.options.gpu_layers,
                    flash_attn=model.options.flash_attn, machine=platform.machine(), system=platform.system(),
                    llama_cpp_system_info=build["system_info"], cmake_args=build["cmake_args"])


def check_spec(model: Model, spec: SweepSpec) -> list[str]:
    """Every bad value and too-long prompt fails here, before the store changes; returns notes to show
    (a context too short for max_tokens)."""
    if not isinstance(spec.n_logprobs, int) or not 0 <= spec.n_logprobs <= MAX_LOGPROBS:
        raise InvalidSettings(f"--logprobs {spec.n_logprobs!r} is out of range (0..{MAX_LOGPROBS}): every token of a "
                              "run stores that many alternatives")
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


class SweepKind:
    """The sweep run kind: a run's pending samples decoded by the engine (best-of-N draws collected, beam
    searches run once per prompt and settings), each saved with what it records beyond its tokens."""

    name = "sweep"
    interrupted = SweepInterrupted

    def pending(self, model: Model, store: Store, info: RunInfo) -> Work:
        def save(writer: int, result, prog: Progress) -> tuple[int, int]:
            sample, extra, n_tokens = result
            store.save_sample(info.id, sample.key, sample, writer, extra=extra or None)
            return sample.key, n_tokens

        return Work(store.pending(info.id), save, Progress(info.n_done, info.n_samples, 0, 0.0),
                    (store.configs(info.id), info.options))

    def decode(self, model: Model, items: list, shared: tuple, stats: dict):
        configs, opts = shared
        return decode(model, items, configs, opts)

    def chunks(self, items: list, size: int) -> list[list]:
        return lifecycle.chunks(items, size)  # a chunk: samples of one prompt (its prefill shared)

    def keep_stats(self, store: Store, run_id: int, stats: dict) -> None:
        pass

    def finish(self, model: Model, store: Store, run_id: int, work: Work) -> None:
        """Measure the noise floor of a run whose samples are all in (or take an earlier run's of the same model,
        build and batch shape: run/noise.py), and mark it done."""
        store.set_status(run_id, "done", noise=sweep_noise(model, store, run_id))


SWEEP = SweepKind()


def execute(model: Model, store: Store, run_id: int, on_progress: Callable[[Progress], None] | None = None,
            executor=None) -> Progress:
    """Decode the pending samples of a sweep run (here, or with `executor`: run/ray.py), saving each as it
    completes; then measure the noise floor (run/lifecycle.py)."""
    return lifecycle.execute(SWEEP, model, store, run_id, on_progress, executor)


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
            yield win, sample_extra(win, BestOfExtra.from_dict(extra)), sum(len(d.tokens) for d in got.values())
        else:
            yield sample, sample_extra(sample), len(sample.tokens)
    done_beams: dict[tuple, object] = {}  # beam search is deterministic: one search serves every seed
    for s, cfg in beams:
        key = (s.prompt, json.dumps(cfg.with_(seed=0).to_dict(), sort_keys=True))
        if key not in done_beams:
            done_beams[key] = beam_search(model, s.prompt, cfg, opts.max_tokens, opts.n_logprobs, exact=opts.exact)
        res = done_beams[key]
        sample = replace(res.sample, key=s.sample_idx, settings=cfg.to_dict())  # a copy: one search, many seeds
        yield sample, sample_extra(sample, beam_extra(model, res)), res.scored_tokens


def sample_extra(sample, strategy: BeamExtra | BestOfExtra | None = None) -> dict | None:
    """What a sample records beyond its tokens (SweepExtra, as stored; None: nothing): its strategy's result,
    the grammar's removed mass per token, the ids no-repeat-ngram banned."""
    blocked = {t.position: list(t.blocked) for t in sample.tokens if t.blocked}
    return SweepExtra(strategy, sample.grammar_removed, blocked).to_dict()


def beam_extra(model: Model, res) -> BeamExtra:
    """A beam search's result (core/beam.py's BeamResult) as a sweep sample records it."""
    return BeamExtra([BeamHypothesis(**h.to_dict(model)) for h in res.hypotheses], [BeamStep(**st) for st in res.steps],
                     res.decode_calls, res.scored_tokens)


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


def run_sweep(model: Model, store: Store, spec: SweepSpec, command: str = "",
              on_progress: Callable[[Progress], None] | None = None) -> int:
    run_id = start_sweep(model, store, spec, command)
    execute(model, store, run_id, on_progress)
    return run_id

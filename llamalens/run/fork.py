"""`llamalens fork`: plan, decode and store the continuations of a forking-paths analysis.

    prompt ──► base path (one completion: greedy, or sampled with the run's settings and --seed; the exact
               single-sequence path of `generate`), with the top alternatives at every position
           ──► plan: for each analysed position t, the chosen token and every alternative w among the top
               --alternatives with raw p(w) >= --min-prob, --samples continuations each: all planned in the
               store at once (samples.extra = role, position, forced token, p(w), sample number)
           ──► decode the pending continuations (below), each saved with its outcome as it finishes
           ──► forking.analyse (pure): o_t, jumps, posterior noise, change points

Decoding (the batched path). One context: sequence 0 holds the KV cells of prompt + base path, decoded
once. A continuation of (t, w) takes a free sequence: `seq_cp(0, s, 0, L+t)` gives it the shared prefix
(metadata only: the KV cache is unified), and its forced token w waits, like a sampled token, for its row.
Every step, one llama_decode call serves every live continuation, continuations of several positions in one
batch, up to --parallel, with one row per distinct history: histories are interned by their token sequence
(the base path's prefixes a chain of ids, a continuation's root the id of prompt + base[:t] + [w], each token
sampled a child id), so continuations whose histories are identical share one row, whatever position or
branch they started from: the continuations of one (t, w) that sampled the same tokens so far (a peaked
distribution), and a continuation that follows the base path and then picks w at t with the continuations
of (t, w). The shared row is decoded at the first one's sequence and its cell copied to the others
(`fanned_out_tokens` counts the rows served so); the cells below it are the same tokens at the same
positions in every member, so they hold what the first one's do. A history on the base path itself
(prompt + base[:k]: the chosen branch's forced token, a continuation that keeps to the base path) needs no
decode at all: its row is the base path's prefill's, kept for positions t0+1..(BASE_ROWS_BYTES, 64 MiB, of
rows: 64 positions at a 262k vocabulary; beyond them rows are decoded), its cell copied from sequence 0
(`base_rows_reused`). When every continuation fits in the slots, the continuations of position t enter at
step t - t0, so that their histories are as long as the earlier positions' continuations' in each step and
identical ones meet; with more continuations than slots they enter as slots free, by position. A finished
continuation frees its sequence (`seq_rm`). Prefill work is thus the prompt + base path once plus one
forced token per (t, w) at most (`forced_tokens`: decoded rows holding some continuation's forced token),
against L+t+1 tokens per continuation if each were prefilled on its own (both counted and stored with the
run); `decoded_tokens` counts the rows decoded. All of these rows are batched rows (the noise floor's
re-decoding one at a time measures them). `--exact` decodes one continuation at a time through the
engine's single-sequence path (prefix prefilled once per (t, w)): token for token what `generate` gives for
that prefix and seed.

Sampling: a continuation is sampled with the run's settings and its own seed, settings.seed + 1 + j for
sample j, the same j at every position (common random numbers: the difference between two positions is
not blurred by different draws). Like `generate`, its sampler sees only the tokens it generates. The
whole completion (base[:t] + w + continuation) is at most --max-tokens tokens, as long as the base path
may be, so a continuation gets max_tokens - t - 1 tokens; a forced end-of-generation token, or no
tokens left, ends it at once. Its outcome is read from that whole completion text, stored as the
sample's text.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import numpy as np

from llamalens.core.engine import Engine, Request
from llamalens.errors import InvalidSettings, StoreError
from llamalens.run.fork_analysis import NONE, Branch, ForkAnalysis, analyse
from llamalens.run.fork_records import (BaseExtra, Continuation, Cost, OutcomeSpec, PlanSettings,
                                        is_continuation, sample_record)
from llamalens.records import RunOptions, Sample, StoredSample, Timing, TokenRecord
from llamalens.core.runtime import Model, library_versions, round_ctx
from llamalens.settings import SamplingSettings
from llamalens.core.stats import RowStats
from llamalens.store import RunInfo, Store
from llamalens.visible import visible
from llamalens.run import lifecycle
from llamalens.run.lifecycle import Progress, RunInterrupted, Work
from llamalens.run.lifecycle import resume_target as lifecycle_resume_target
from llamalens.run.noise import against_rescored, noise_figures, rescore
from llamalens.run.sweep import hardware

KIND = "fork"
NOISE_CONTINUATIONS = 3
MAX_ALTERNATIVES = 100  # alternatives tried per position (each is stored with every token's top list)
MAX_PLAN = 1_000_000  # continuations in one run, at most (--max-sequences)
MAX_SEQUENCES = 256  # llama.cpp's llama_max_parallel_sequences()
BASE_ROWS_BYTES = 64 << 20  # at most this much of the base path's prefill rows is kept (as much again in llama.cpp's
# output buffer while the prefill runs): n_vocab x 4 bytes a row, 64 rows at Gemma 3's 262k vocabulary


# -- the plan ----------------------------------------------------------------------------------------
@dataclass
class ForkSpec:
    prompt: str
    settings: SamplingSettings  # of the continuations (and of a sampled base path)
    outcome: OutcomeSpec = field(default_factory=OutcomeSpec)
    sampled_base: bool = False  # False: the base path is greedy
    samples: int = 4
    alternatives: int = 3
    min_prob: float = 0.05
    positions: tuple[int, int] | None = None  # inclusive range of base positions; None = all
    max_tokens: int = 24
    stop: tuple[str, ...] = ()
    parallel: int = 32
    exact: bool = False
    max_sequences: int = 2000
    name: str | None = None

    def problems(self) -> list[str]:
        out = self.settings.problems() + self.outcome.problems()
        if not isinstance(self.samples, int) or self.samples < 1:
            out.append(f"--samples {self.samples!r} is out of range (must be >= 1)")
        if not isinstance(self.alternatives, int) or not 1 <= self.alternatives <= MAX_ALTERNATIVES:
            out.append(f"--alternatives {self.alternatives!r} is out of range (1..{MAX_ALTERNATIVES})")
        if not isinstance(self.max_sequences, int) or not 1 <= self.max_sequences <= MAX_PLAN:
            out.append(f"--max-sequences {self.max_sequences!r} is out of range (1..{MAX_PLAN:,})")
        elif isinstance(self.samples, int) and self.samples > self.max_sequences:
            out.append(f"--samples {self.samples:,} continues each branch that many times, more than --max-sequences "
                       f"{self.max_sequences:,} allows in all; lower --samples or raise --max-sequences")
        if not 0.0 <= self.min_prob <= 1.0:
            out.append(f"--min-prob {self.min_prob!r} is out of range (0..1)")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            out.append(f"--max-tokens {self.max_tokens!r} is out of range (must be >= 1)")
        if self.positions is not None and not 0 <= self.positions[0] <= self.positions[1]:
            out.append(f"--positions {self.positions[0]}-{self.positions[1]} is not a range N-M with 0 <= N <= M")
        if any(s == "" for s in self.stop):
            out.append("an empty --stop string would stop at once; remove it")
        return out

    @property
    def n_logprobs(self) -> int:
        return max(self.alternatives, 5)

    @property
    def base_settings(self) -> SamplingSettings:
        return self.settings if self.sampled_base else self.settings.with_(temperature=0.0)

    @property
    def plan_settings(self) -> PlanSettings:
        """What the base path's sample keeps of these settings."""
        return PlanSettings(self.outcome, self.sampled_base, self.samples, self.alternatives, self.min_prob,
                            self.positions, self.max_sequences)

    def to_dict(self) -> dict:
        return self.plan_settings.to_dict()


def parse_positions(text: str | None) -> tuple[int, int] | None:
    """'all' (or None) -> None; 'N-M' or 'N' -> (N, M)."""
    if text is None or text.strip().lower() == "all":
        return None
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+))?\s*", text)
    if not m:
        raise InvalidSettings(f"--positions {text!r} is not 'all', N or N-M (base-path positions from 0), e.g. 0-9")
    a = int(m.group(1))
    b = int(m.group(2)) if m.group(2) is not None else a
    if b < a:
        raise InvalidSettings(f"--positions {text!r}: the range ends before it starts; write N-M with N <= M")
    return a, b


def plan_continuations(base: Sample, spec: ForkSpec) -> list[Continuation]:
    """Every continuation to decode, as each stores it: position, forced token, p(w), sample j and its seed."""
    n = len(base.tokens)
    lo, hi = spec.positions if spec.positions else (0, n - 1)
    if lo >= n:
        raise InvalidSettings(f"--positions starts at {lo} but the base path has {n} tokens (0..{n - 1}); "
                              "lower it or raise --max-tokens")
    by_position = []
    for t in range(lo, min(hi, n - 1) + 1):
        rec = base.tokens[t]
        branches = [(rec.id, rec.text, rec.bytes, rec.prob, True)]
        for a in rec.top[: spec.alternatives]:
            if a.id != rec.id and a.prob >= spec.min_prob:
                branches.append((a.id, a.text, a.bytes, a.prob, False))
        by_position.append((t, branches))
    needed = sum(len(b) for _, b in by_position) * spec.samples
    if needed > spec.max_sequences:  # counted before the plan is built: it may not fit in memory
        raise InvalidSettings(
            f"the analysis needs {needed:,} continuations, more than --max-sequences {spec.max_sequences:,}; "
            "lower --samples or --alternatives, raise --min-prob, narrow --positions, or raise --max-sequences")
    out = []
    for t, branches in by_position:
        for tok, text, hex_bytes, p, chosen in branches:
            for j in range(spec.samples):
                out.append(Continuation(t, tok, text, hex_bytes, p, chosen, j, spec.settings.seed + 1 + j))
    return out


def estimate(n_prompt: int, n_base: int, plan: list[Continuation], max_tokens: int) -> Cost:
    return Cost(len(plan), len({x.position for x in plan}), sum(max(max_tokens - x.position - 1, 0) for x in plan),
                n_prompt + n_base + len({x.branch for x in plan}), sum(n_prompt + x.position + 1 for x in plan))


def batch_rate(model: Model, prompt_ids: list[int], n_par: int, steps: int = 2) -> float:
    """Aggregate tokens/s of `steps` decode steps of n_par sequences after the prompt (each row's statistics
    included): the rate the cost estimate uses. The first step warms up and is not timed."""
    n_par = max(1, min(n_par, MAX_SEQUENCES))
    L = len(prompt_ids)
    with model.context(n_ctx=round_ctx(L + n_par * (steps + 1) + 1), n_seq_max=n_par) as ctx:
        tok = int(np.argmax(ctx.prefill(prompt_ids, seq=0)))
        for s in range(1, n_par):
            ctx.seq_cp(0, s, 0, L)
        t0 = time.perf_counter()
        for k in range(steps + 1):
            if k == 1:
                t0 = time.perf_counter()
            ctx.decode([tok] * n_par, [L + k] * n_par, list(range(n_par)), [1] * n_par)
            for i in range(n_par):
                RowStats.of(ctx.logits(i), None, 5)
        return n_par * steps / max(time.perf_counter() - t0, 1e-9)


# -- starting and running a run -------------------------------------------------------------------------
def base_path(model: Model, spec: ForkSpec) -> Sample:
    """The base completion, by the exact single-sequence path (as `generate`)."""
    req = Request(spec.prompt, spec.base_settings, spec.max_tokens, spec.n_logprobs, spec.stop)
    return next(iter(Engine(model, 1).run([req])))


def check_spec(spec: ForkSpec) -> None:
    problems = spec.problems()
    if problems:
        raise InvalidSettings("; ".join(problems))


def start_fork(model: Model, store: Store, spec: ForkSpec, command: str = "",
               base: Sample | None = None, on_note: Callable[[str], None] | None = None) -> tuple[int, Cost]:
    """Decode the base path, plan every continuation (all pending) and store the run; nothing else decoded.
    `on_note` hears what is worth saying first (a context too short for max_tokens)."""
    from llamalens.core.engine import context_notes

    check_spec(spec)
    if base is None and on_note is not None:
        req = Request(spec.prompt, spec.base_settings, spec.max_tokens, spec.n_logprobs, spec.stop)
        for note in context_notes(Engine(model, 1).prepare([req]), model.options.ctx):
            on_note(note)
    base = base or base_path(model, spec)
    plan = plan_continuations(base, spec)
    cost = estimate(len(base.prompt_token_ids), len(base.tokens), plan, spec.max_tokens)
    options = RunOptions(max_tokens=spec.max_tokens, n_logprobs=spec.n_logprobs, stop=tuple(spec.stop),
                         exact=spec.exact, parallel=1 if spec.exact else spec.parallel, prompts=(spec.prompt,),
                         seeds=tuple(sorted({x.seed for x in plan})), model_options=model.options)
    base_extra = BaseExtra(spec.plan_settings, cost, spec.outcome.extract(base.text)).to_dict()
    run_id = store.create_run(
        name=spec.name, command=command, model=model.describe(), model_hash=store.model_hash(model.path),
        versions=library_versions(), hardware=hardware(model), options=options,
        configs=[spec.settings, spec.base_settings],
        plan=[(0, 1, spec.base_settings.seed, spec.prompt)] + [(0, 0, x.seed, spec.prompt) for x in plan],
        kind=KIND, extras=[base_extra] + [x.to_dict() for x in plan], first=(0, base, base_extra))  # the run exists with its base or not at all
    return run_id, cost


def _full_text(model: Model, prefix_ids: list[int], forced: int, cont: Sample, stop: tuple[str, ...]) -> str:
    """The whole completion: base[:t] + w + the continuation (cut at a stop string), decoded once."""
    cont_bytes = b"".join(model.piece(t.id, special=False) for t in cont.tokens if not t.eog)
    cuts = [cont_bytes.find(s.encode("utf-8")) for s in stop]
    cuts = [c for c in cuts if c != -1]
    if cuts:
        cont_bytes = cont_bytes[: min(cuts)]
    head = b"".join(model.piece(i, special=False) for i in prefix_ids)
    forced_bytes = b"" if model.is_eog(forced) else model.piece(forced, special=False)
    return (head + forced_bytes + cont_bytes).decode("utf-8", errors="replace")


def _ended(req: Request, finish: str) -> Sample:
    """A continuation that ends at its forced token (end of generation, or no tokens left)."""
    return Sample(req.prompt, list(req.prompt_tokens), req.settings.to_dict(), 0, "", finish, [],
                  Timing(len(req.prompt_tokens), 0, 0.0, 0.0, 0.0), key=req.key)


def decode_continuations(model: Model, prompt_ids: list[int], base_ids: list[int], requests: list[Request],
                         parallel: int, stats: dict | None = None, share: bool = True) -> Iterator[Sample]:
    """Decode continuations (Request.prompt_tokens = prompt + base[:t] + [w], w no end-of-generation token,
    max_tokens >= 1) batched, sharing the base path's cells; yield each Sample as it finishes. See the module
    docstring: the engine's scheduler decodes them (Engine.run_continuations), up to `parallel` at once (sequence 0
    holds the base path), with up to BASE_ROWS_BYTES of the base path's prefill rows kept; the decode counters are
    added to `stats`. share=False decodes as before the shared histories (one root per (t, w), every row decoded, no
    entry schedule): the comparison the tests and the bench make."""
    engine = Engine(model, min(parallel, MAX_SEQUENCES - 1))
    yield from engine.run_continuations(prompt_ids, base_ids, requests, base_rows=BASE_ROWS_BYTES // (4 * model.n_vocab),
                                        share=share, stats=stats)


def _requests(store: Store, run_id: int, base_ids: list[int], prompt_ids: list[int],
              opts: RunOptions, settings: SamplingSettings) -> list[Request]:
    reqs = []
    for s in store.pending(run_id):
        if not is_continuation(s.extra):
            continue
        x = Continuation.from_dict(s.extra)
        t = x.position
        reqs.append(Request(s.prompt, settings.with_(seed=s.seed), max(opts.max_tokens - t - 1, 0), opts.n_logprobs,
                            opts.stop, key=s.sample_idx, prompt_tokens=prompt_ids + base_ids[:t] + [x.forced_token]))
    return reqs


def decode_chunk(model: Model, prompt_ids: list[int], base_ids: list[int], requests: list[Request],
                 opts: RunOptions, stats: dict) -> Iterator[Sample]:
    """Decode these continuations (none ending at its forced token) as the run's options say: --exact one at a
    time through the engine's single-sequence path, else batched over the shared base path; the decode counters
    are added to `stats`. What one process runs on the whole run, and a Ray worker on its chunk."""
    if not opts.exact:
        yield from decode_continuations(model, prompt_ids, base_ids, requests, opts.parallel, stats)
        return
    engine = Engine(model, 1)
    if requests:
        yield from engine.run(requests)
    for k in ("decodes", "decoded_tokens"):
        stats[k] = stats.get(k, 0) + engine.stats[k]
    stats["prefill_tokens"] = stats.get("prefill_tokens", 0) + engine.stats["prompt_tokens"]


class ForkKind:
    """The fork run kind: the pending continuations of a forking-paths analysis, decoded over the shared base
    path (decode_chunk), each saved with the outcome read from its whole completion."""

    name = KIND

    def pending(self, model: Model, store: Store, info) -> Work:
        run_id, opts = info.id, info.options
        settings, _base_settings = store.configs(run_id)
        all_samples = store.samples(run_id, only_done=False)
        base_row = all_samples[0]
        if base_row.status != "done":
            raise StoreError(f"run {run_id} has no base path stored (it was stopped while planning); start it again")
        base_extra = BaseExtra.from_dict(base_row.extra)
        outcome = base_extra.plan.outcome
        base_ids = [t.id for _, t in store.tokens(run_id, 0)]
        prompt_ids = model.prompt_tokens(opts.prompts[0])
        reqs = _requests(store, run_id, base_ids, prompt_ids, opts, settings)
        cont = {s.sample_idx: Continuation.from_dict(s.extra) for s in all_samples if is_continuation(s.extra)}
        left: dict[int, int] = {}  # continuations still to come, by position
        for s in all_samples:
            if s.sample_idx in cont and s.status != "done":
                left[cont[s.sample_idx].position] = left.get(cont[s.sample_idx].position, 0) + 1
        positions = {x.position for x in cont.values()}
        prog = Progress(len(cont) - len(reqs), len(cont), 0, 0.0, positions_done=len(positions) - len(left),
                        positions_total=len(positions))

        def save(writer: int, sample: Sample, prog: Progress) -> tuple[int, int]:
            x = cont[sample.key]
            t = x.position
            text = _full_text(model, base_ids[:t], x.forced_token, sample, opts.stop)
            done = replace(x, outcome=outcome.extract(text))
            store.save_sample(run_id, sample.key, replace(sample, text=text), writer, extra=done.to_dict())
            left[t] -= 1
            if left[t] == 0:
                prog.positions_done += 1
            return sample.key, len(sample.tokens)

        ends = [model.is_eog(r.prompt_tokens[-1]) or r.max_tokens <= 0 for r in reqs]
        done = [_ended(r, "stop" if model.is_eog(r.prompt_tokens[-1]) else "length") for r, e in zip(reqs, ends) if e]
        return Work([r for r, e in zip(reqs, ends) if not e], save, prog, (prompt_ids, base_ids, opts), done,
                    dict(base_extra.decode_stats))

    def decode(self, model: Model, items: list, shared: tuple, stats: dict) -> Iterator[Sample]:
        prompt_ids, base_ids, opts = shared
        return decode_chunk(model, prompt_ids, base_ids, items, opts, stats)

    def chunks(self, items: list, size: int) -> list[list]:
        # a position's continuations share their prefix: whole positions, small ones packed up to a batch
        return lifecycle.chunks(items, size, key=lambda r: len(r.prompt_tokens), pack=True)

    def keep_stats(self, store: Store, run_id: int, stats: dict) -> None:
        """Keep the decode counters with the base sample (summed over resumes)."""
        x = BaseExtra.from_dict(store.samples(run_id, only_done=False)[0].extra)
        store.set_extra(run_id, 0, replace(x, decode_stats={k: int(v) for k, v in stats.items()}).to_dict())

    def finish(self, model: Model, store: Store, run_id: int, work: Work) -> None:
        prompt_ids, base_ids, _opts = work.shared
        store.set_status(run_id, "done", noise=fork_noise(model, store, run_id, base_ids, prompt_ids))


class ForkInterrupted(RunInterrupted):
    """A fork run stopped before its end; what was committed is saved (the message names `fork --resume`)."""

    unit = "continuations"


ForkKind.interrupted = ForkInterrupted
FORK = ForkKind()


def execute_fork(model: Model, store: Store, run_id: int, on_progress: Callable[[Progress], None] | None = None,
                 executor=None) -> Progress:
    """Decode the pending continuations of a fork run (here, or with `executor`: run/ray.py), saving each with
    its outcome as it finishes (run/lifecycle.py)."""
    return lifecycle.execute(FORK, model, store, run_id, on_progress, executor)


def fork_noise(model: Model, store: Store, run_id: int, base_ids: list[int], prompt_ids: list[int],
               k: int = NOISE_CONTINUATIONS) -> dict:
    """Re-decode k continuations' tokens one at a time after their prefix; compare with the stored values
    (the same figures as a sweep's noise floor)."""
    conts = [s for s in store.samples(run_id) if is_continuation(s.extra)]
    with_tokens = [s for s in conts if s.timing and s.timing.generated_tokens > 0]
    picks = [with_tokens[int(i)] for i in np.unique(np.linspace(0, len(with_tokens) - 1, min(k, len(with_tokens))
                                                                ).astype(int))] if with_tokens else []
    deltas, agree = [], 0
    for s in picks:
        toks = [t for _, t in store.tokens(run_id, s.sample_idx)]
        x = Continuation.from_dict(s.extra)
        ref = rescore(model, s.prompt, [t.id for t in toks], prompt_ids + base_ids[:x.position] + [x.forced_token])
        agree += against_rescored(toks, ref, deltas)
    return noise_figures(len(picks), deltas, agree)


# a fork run's per-sample columns in the token table (fork_records' Continuation and BaseExtra): the base path's rows have
# role "base" and its outcome, the others are empty there
FORK_COLUMNS = {"role": ("fork_role", "string"), "position": ("fork_position", "Int64"),
                "forced_token": ("forced_token", "Int64"), "forced_text": ("forced_text", "string"),
                "forced_bytes": ("forced_bytes", "string"), "prob": ("forced_prob", "Float64"),
                "chosen": ("forced_chosen", "boolean"), "sample": ("continuation", "Int64"),
                "outcome": ("outcome", "string")}


def with_fork_columns(run, tokens):
    """A fork run's token table (a loaded run's DataFrame) with each token's sample's fork columns
    (FORK_COLUMNS), after sample_idx's: what `export` writes for a fork run."""
    import pandas as pd

    values = {s.sample_idx: sample_record(s.extra).columns() for s in run.samples}
    extras = pd.DataFrame([{"sample_idx": i, **{col: v.get(key) for key, (col, _) in FORK_COLUMNS.items()}}
                           for i, v in values.items()], columns=["sample_idx"] + [c for c, _ in FORK_COLUMNS.values()])
    extras = extras.astype({col: kind for col, kind in FORK_COLUMNS.values()})
    out = tokens.merge(extras, on="sample_idx", how="left", validate="many_to_one")
    at = list(tokens.columns).index("sample_idx") + 1
    names = [c for c, _ in FORK_COLUMNS.values()]
    rest = [c for c in tokens.columns if c not in names]
    return out[rest[:at] + names + rest[at:]]


# -- reading a fork run back ---------------------------------------------------------------------------
@dataclass
class ForkRun:
    """A stored fork run read back: its base path, its settings and the analysis of its finished continuations."""

    info: RunInfo
    base: StoredSample
    base_tokens: list[TokenRecord]
    plan: PlanSettings  # the settings the plan was made with
    outcome: OutcomeSpec
    analysis: ForkAnalysis
    stats: dict[str, int]  # decode counters (decode_continuations' keys), summed over resumes
    cost: Cost | None  # as planned (None: stored without it)


def load_fork(store: Store, run_id) -> ForkRun:
    """A fork run from the store, analysed from its finished continuations (pending ones carry no weight)."""
    info = store.run(run_id)
    if info.kind != KIND:
        raise StoreError(f"run {info.id} is a {info.kind} run, not a fork run")
    samples = store.samples(info.id, only_done=False)
    base = samples[0]
    tokens = store.tokens_by_sample(info.id)
    base_extra = BaseExtra.from_dict(base.extra)
    groups: dict[int, dict[int, Branch]] = {}
    for s in samples[1:]:
        x = Continuation.from_dict(s.extra)
        g = groups.setdefault(x.position, {})
        b = g.get(x.forced_token)
        if b is None:
            b = g[x.forced_token] = Branch(x.position, x.forced_token, x.forced_visible, x.prob, x.chosen)
        if s.status == "done":
            b.outcomes.append(NONE if x.outcome is None else x.outcome)  # None: stored by older versions
            if not b.example:
                cont = "".join(visible(t.text, t.bytes) for t in tokens.get(s.sample_idx, []) if not t.eog)
                b.example = b.text + cont
    positions = sorted(t for t, g in groups.items() if any(b.outcomes for b in g.values()))
    branches = [sorted(groups[t].values(), key=lambda b: (not b.chosen, -b.prob)) for t in positions]
    spec = base_extra.plan.outcome
    base_outcome = base_extra.outcome
    analysis = analyse(branches, positions, NONE if base_outcome is None else base_outcome, declared=spec.declared)
    return ForkRun(info, base, tokens.get(0, []), base_extra.plan, spec, analysis, base_extra.decode_stats,
                   base_extra.cost)


def resume_target(store: Store, run_id, model: str | None = None):
    """(run id, model path, model options) to finish an interrupted fork run."""
    return lifecycle_resume_target(store, run_id, model, kind=KIND)

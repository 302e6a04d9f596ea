"""Eval runs: lm-evaluation-harness requests scored by one or more models, every token stored, resumable.

    plan (llamalens/eval/run.py: lm-eval builds each model's requests)
         ──► sample 0: the spec (tasks, lm-eval's options, every model's file, sha256 and header, the mode);
             one pending sample per (model k, request): prompt = its context (a rolling request's text), extra =
             its type, task, document, index among its type's requests, chunk, continuation or gen_kwargs
         ──► decode (this kind), a chunk at a time: requests of one model and one type, CHUNK[type] of them in plan
             order; each saved with its token records (logprob, rank, entropy, the row's argmax) and its answer
             (logprob and is_greedy, or the generated text) in samples.extra
         ──► lm-eval's metrics (llamalens/eval/run.py replays the stored answers to lm-eval), stored in the spec
         ──► load_eval: the run read back for `show`, `report` and `export`: metrics per model, the noise floor,
             the closest calls, where the models disagree

Resuming. A chunk is decoded whole or again: a resumed run re-decodes every chunk that still has a pending request
(saving only those), so every request is scored in the batch it was planned in, and an interrupted eval finishes
with the numbers an uninterrupted one gives. Only two models are loaded at once: the run's own (the first) and the
one whose chunks are being decoded.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

from llamalens.core.runtime import Model
from llamalens.errors import StoreError
from llamalens.records import Sample, Timing
from llamalens.run.lifecycle import Progress, RunInterrupted, Work, planned_model
from llamalens.store import RunInfo, Store

KIND = "eval"
EXTRA_VERSION = 1
TYPES = ("loglikelihood", "loglikelihood_rolling", "generate_until")
CHUNK = {"loglikelihood": 256, "loglikelihood_rolling": 16, "generate_until": 32}  # requests decoded together
MAX_REQUESTS = 200_000  # stored requests of one run, all models together


@dataclass(frozen=True)
class Planned:
    """One request as lm-eval made it: its type, task, document, index among the requests of its type, and its
    arguments ((context, continuation), (text,), or (context, gen_kwargs))."""

    type: str
    task: str
    doc: int
    idx: int
    args: tuple


def where(task: str, doc) -> str:
    return f"task {task!r}, document {doc}"


# -- starting a run -------------------------------------------------------------------------------------
def start_eval(store: Store, base: Model, spec: dict, plans: list[list[Planned]], name: str | None,
               command: str) -> int:
    """Plan an eval run: sample 0 the spec (done), then one pending sample per (model, request)."""
    from llamalens.core.runtime import library_versions
    from llamalens.records import RunOptions
    from llamalens.run.sweep import hardware
    from llamalens.settings import SamplingSettings

    n = sum(len(p) for p in plans)
    if n > MAX_REQUESTS:
        raise StoreError(f"{n} requests are more than one eval run stores ({MAX_REQUESTS}); lower --limit or run "
                         "fewer tasks or models at once")
    plan, extras = [(0, 0, 0, "")], [None]
    for k, requests in enumerate(plans):
        for r in requests:
            extras.append({"eval": EXTRA_VERSION, "role": "request", "model": k, "type": r.type, "task": r.task,
                           "doc": r.doc, "idx": r.idx, "chunk": chunk_of(r.type, r.idx),
                           **({"continuation": r.args[1]} if r.type == "loglikelihood" else {}),
                           **({"gen_kwargs": r.args[1]} if r.type == "generate_until" else {})})
            plan.append((k, 0, 0, r.args[0]))
    first = Sample("", [], {}, 0, "", "stop", [], Timing(0, 0, 0.0, 0.0, 0.0))
    extras[0] = {**spec, "eval": EXTRA_VERSION, "role": "spec"}
    return store.create_run(name=name, command=command, model=base.describe(), model_hash=spec["models"][0]["sha256"],
                            versions=library_versions(), hardware=hardware(base),
                            options=RunOptions(max_tokens=0, n_logprobs=1, model_options=base.options),
                            configs=[SamplingSettings()], plan=plan, kind=KIND, extras=extras,
                            first=(0, first, extras[0]))


def chunk_of(type_: str, i: int) -> str:
    """The chunk of the i-th request of a type (of one model): requests decoded together."""
    return f"{type_}:{i // CHUNK[type_]}"


def read_spec(store: Store, run_id: int) -> dict:
    first = store.samples(run_id, only_done=False)[:1]
    x = first[0].extra if first else None
    if not x or x.get("role") != "spec":
        raise StoreError(f"run {run_id} has no eval spec (sample 0); it was not written by `llamalens eval`")
    return x


# -- decoding ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    sample_idx: int
    model: int
    chunk: str
    type: str
    task: str
    doc: int
    args: tuple
    pending: bool


def _item(s) -> Item:
    x = s.extra
    second = (x["continuation"],) if x["type"] == "loglikelihood" else \
        (x["gen_kwargs"],) if x["type"] == "generate_until" else ()
    return Item(s.sample_idx, int(x["model"]), x["chunk"], x["type"], x["task"], x["doc"], (s.prompt, *second),
                s.status == "pending")


def score_chunk(model: Model, items: list[Item], spec: dict) -> list:
    """Outcomes (eval/requests.py) of one chunk's requests, in order."""
    from llamalens.eval import requests as scored

    args, name = [it.args for it in items], (lambda i: where(items[i].task, items[i].doc))
    exact, batch, length = bool(spec["exact"]), int(spec["batch_size"]), int(spec["max_length"])
    if items[0].type == "loglikelihood":
        return scored.loglikelihood(model, args, length, name, exact, batch)
    if items[0].type == "loglikelihood_rolling":
        return scored.rolling(model, [a[0] for a in args], length, exact, batch)
    return scored.generations(model, args, length, name, batch)


def decode(base: Model, items: list[Item], spec: dict, stats: dict):
    """Every chunk with a pending request, model by model; yields (sample_idx, outcome, seconds) of the pending."""
    chunks: dict[int, dict[str, list[Item]]] = {}
    for it in items:
        chunks.setdefault(it.model, {}).setdefault(it.chunk, []).append(it)
    for k in sorted(chunks):
        model = base if k == 0 else load_model(spec["models"][k], base)
        try:
            for chunk in chunks[k].values():
                t0 = time.perf_counter()
                outs = score_chunk(model, chunk, spec)
                share = (time.perf_counter() - t0) / len(chunk)
                stats["chunks"] = stats.get("chunks", 0) + 1
                yield from ((it.sample_idx, o, share) for it, o in zip(chunk, outs) if it.pending)
        finally:
            if model is not base:
                model.close()


def load_model(entry: dict, base: Model) -> Model:
    """A further model of the run, with the run's options; refused when its file changed since it was planned."""
    return planned_model(entry, base, "eval run", "eval")


class EvalInterrupted(RunInterrupted):
    unit = "requests"


class EvalKind:
    """The eval run kind: requests scored a chunk at a time (module docstring); the run is done when lm-eval's
    metrics are stored (llamalens/eval/run.py)."""

    name = KIND
    interrupted = EvalInterrupted

    def pending(self, model: Model, store: Store, info: RunInfo) -> Work:
        spec = read_spec(store, info.id)
        samples = [s for s in store.samples(info.id, only_done=False) if s.extra and s.extra.get("role") == "request"]
        open_chunks = {(int(s.extra["model"]), s.extra["chunk"]) for s in samples if s.status == "pending"}
        items = [_item(s) for s in samples if (int(s.extra["model"]), s.extra["chunk"]) in open_chunks]
        planned = {s.sample_idx: s for s in samples}

        def save(writer: int, result, prog: Progress) -> tuple[int, int]:
            sample_idx, o, seconds = result
            s = planned[sample_idx]
            extra = {**s.extra, "logprob": o.logprob, "is_greedy": o.is_greedy, "exact": o.exact,
                     "context_tokens": o.context_tokens, "notes": o.notes}
            text = o.text if o.text is not None else s.extra.get("continuation", "")
            sample = Sample(s.prompt, [], {}, 0, text, "stop", o.tokens,
                            Timing(o.context_tokens, len(o.tokens), 0.0, 0.0, seconds * 1e3))
            store.save_sample(info.id, sample_idx, sample, writer, extra=extra)
            return sample_idx, len(o.tokens)

        return Work(items, save, Progress(info.n_done, info.n_samples, 0, 0.0), (spec,))

    def decode(self, model: Model, items: list, shared: tuple, stats: dict):
        return decode(model, items, shared[0], stats)

    def chunks(self, items: list, size: int) -> list[list]:
        return [items]

    def keep_stats(self, store: Store, run_id: int, stats: dict) -> None:
        pass

    def finish(self, model: Model, store: Store, run_id: int, work: Work) -> None:
        pass  # done once lm-eval's metrics are stored (eval/run.py)


EVAL = EvalKind()


# -- a run read back ----------------------------------------------------------------------------------------
@dataclass
class Request:
    """One stored request and its answer (None while pending)."""

    sample_idx: int
    model: int
    type: str
    task: str
    doc: int
    idx: int
    context: str
    continuation: str | None
    logprob: float | None
    is_greedy: bool | None
    exact: float | None
    text: str | None
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.logprob is not None or self.text is not None


@dataclass
class CloseCall:
    """A question of a model: its options' log-likelihoods, the best two's margin, and whether the noise floor is
    larger than the margin."""

    task: str
    doc: int
    context: str
    options: list[Request]  # in the task's order
    margin: float
    below_floor: bool

    @property
    def chosen(self) -> int:
        """The option lm-eval's acc picks: the largest log-likelihood, the first among equals."""
        lps = [r.logprob for r in self.options]
        return lps.index(max(lps))


@dataclass
class EvalRun:
    """An eval run read back: the spec, every request per model, lm-eval's results per model."""

    info: RunInfo
    spec: dict
    requests: list[list[Request]]  # per model, in plan order

    @property
    def models(self) -> list[dict]:
        return self.spec["models"]

    def model_name(self, k: int) -> str:
        info = self.models[k].get("info") or {}
        return str(info.get("name") or os.path.basename(self.models[k]["path"]))

    def results(self, k: int) -> dict | None:
        """lm-eval's results dict of model k (None until its metrics are stored)."""
        return (self.spec.get("results") or {}).get(str(k))

    def noise(self, k: int) -> tuple[float | None, int]:
        """(noise floor, requests re-scored alone) of model k: the largest |batched - alone| logprob difference."""
        diffs = [abs(r.logprob - r.exact) for r in self.requests[k] if r.exact is not None and r.logprob is not None]
        return (max(diffs) if diffs else None), len(diffs)

    def questions(self, k: int) -> list[CloseCall]:
        """Model k's multiple-choice questions (a context with several scored options), the closest first."""
        floor = self.noise(k)[0]
        groups: dict = {}
        for r in self.requests[k]:
            if r.type == "loglikelihood" and r.logprob is not None:
                groups.setdefault((r.task, r.doc, r.context), []).append(r)
        out = []
        for (task, doc, context), opts in groups.items():
            if len(opts) > 1:
                best = sorted((o.logprob for o in opts), reverse=True)
                margin = best[0] - best[1]
                out.append(CloseCall(task, doc, context, opts, margin, floor is not None and margin < floor))
        return sorted(out, key=lambda c: c.margin)

    def backend(self, k: int) -> dict:
        """The backend's figures of model k, as the harness reports them (EvalStats.to_dict's keys)."""
        reqs = [r for r in self.requests[k] if r.done]
        counts: dict = {}
        for r in reqs:
            counts[r.type] = counts.get(r.type, 0) + 1
        seconds = sum(r.seconds for r in reqs)
        floor, n = self.noise(k)
        from llamalens.eval.lm_tokens import Encoded

        notes = Encoded(merged_at={i for i, r in enumerate(reqs) if "merged" in r.notes},
                        truncated_at={i for i, r in enumerate(reqs) if "truncated" in r.notes}).notes()
        return {"requests": counts, "pairs": len(reqs), "contexts": len({r.context for r in reqs}), "seconds": seconds,
                "requests_per_s": len(reqs) / seconds if seconds else None, "noise_floor": floor, "noise_pairs": n,
                "close_calls": [[c.task, c.doc, c.margin] for c in self.questions(k) if c.below_floor],
                "notes": notes}

    def metrics(self) -> list[tuple[str, str, list]]:
        """(task, metric, [value per model]) of every metric lm-eval reported, the tasks in the run's order."""
        rows: dict = {}
        for k in range(len(self.models)):
            for task, values in ((self.results(k) or {}).get("results") or {}).items():
                for name, v in values.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and "," in name and "_stderr" not in name:
                        rows.setdefault((task, name), [None] * len(self.models))[k] = v
        return [(t, m, vals) for (t, m), vals in rows.items()]

    def disagreements(self) -> list[dict]:
        """The questions the models answer differently: per (task, document), each model's chosen option and
        margin; with one model, none."""
        if len(self.models) < 2:
            return []
        per_model = [{(c.task, c.doc): c for c in self.questions(k)} for k in range(len(self.models))]
        out = []
        for key, first in per_model[0].items():
            calls = [m.get(key) for m in per_model]
            if all(c is not None for c in calls) and len({c.chosen for c in calls}) > 1:
                out.append({"task": key[0], "doc": key[1], "context": first.context,
                            "options": [o.continuation for o in first.options],
                            "chosen": [c.chosen for c in calls], "margins": [c.margin for c in calls]})
        return sorted(out, key=lambda d: (d["task"], d["doc"]))


def load_eval(store: Store, run_id) -> EvalRun:
    info = store.run(run_id)
    if info.kind != KIND:
        raise StoreError(f"run {info.id} is a {info.kind} run, not an eval run")
    spec = read_spec(store, info.id)
    requests: list[list[Request]] = [[] for _ in spec["models"]]
    for s in store.samples(info.id, only_done=False):
        x = s.extra or {}
        if x.get("role") != "request":
            continue
        done = s.status == "done"
        requests[int(x["model"])].append(Request(
            s.sample_idx, int(x["model"]), x["type"], x["task"], x["doc"], int(x["idx"]), s.prompt,
            x.get("continuation"), x.get("logprob") if done else None, x.get("is_greedy") if done else None,
            x.get("exact") if done else None, s.text if done and x["type"] == "generate_until" else None,
            (s.timing.total_ms / 1e3) if done and s.timing else 0.0, list(x.get("notes") or [])))
    return EvalRun(info, spec, requests)


EVAL_TOKEN_COLUMNS = ["run_id", "model", "model_name", "quantization", "task", "doc", "type", "request", "sample_idx",
                      "option", "position", "token_id", "text", "bytes", "logprob", "prob", "rank", "entropy",
                      "argmax_id", "argmax_text", "argmax_logprob", "is_greedy", "request_logprob", "request_is_greedy"]


def with_eval_columns(run, _tokens=None):
    """What `export` writes for an eval run (the eval kind's token_columns): one row per stored token of every
    request of every model, with its request's task, document and answer (a run.loaded.LoadedRun)."""
    import pandas as pd

    spec = next((s.extra for s in run.samples if s.extra and s.extra.get("role") == "spec"), {"models": []})
    rows = []
    for s in run.samples:
        x = s.extra or {}
        if x.get("role") != "request":
            continue
        info = spec["models"][int(x["model"])].get("info") or {}
        head = [run.id, int(x["model"]), info.get("name"), info.get("quantization"), x["task"], x["doc"], x["type"],
                int(x["idx"]), s.sample_idx, x.get("continuation")]
        for t in run.by_sample.get(s.sample_idx, []):
            top = t.top[0] if t.top else None
            rows.append(head + [t.position, t.id, t.text, t.bytes, t.logprob, math.exp(t.logprob), t.rank, t.entropy,
                                top.id if top else None, top.text if top else None, top.logprob if top else None,
                                bool(top and top.id == t.id), x.get("logprob"), x.get("is_greedy")])
    return pd.DataFrame(rows, columns=EVAL_TOKEN_COLUMNS)

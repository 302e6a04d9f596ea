"""Compare runs: several models against one base on the same windows of a text, as a resumable run.

    text ──► token stream and windows (looks/windows.py: `full` or `llama-perplexity`), checked once
         ──► plan: one unit per (compared model k >= 1, window w), all pending; sample 0 holds the spec
             (every model's file, sha256, header; the stream; the windows), saved at once
         ──► decode, a block of windows at a time (below); each unit saved as it finishes
         ──► run/ladder.py reads the units back: llama-perplexity's statistics per model, the ladder

Memory. Only two models are ever loaded: the base (the run's model, loaded by the caller) and one compared
model at a time. The base's rows are not kept in memory. The block's first compared model decodes each window
alongside the base (both rows in lockstep, as the pairwise compare does), and the base's raw float32 rows are
written to a spill file as they come (in $TMPDIR, deleted at the end of the block), with each row's log-sum-exp
and top tokens in memory; then each other compared model is loaded in turn, decodes the block's windows, and
reads the base rows back one at a time, in order, into one reused row. Peak memory is thus the base + the
largest compared model + one window's decode of each (llama.cpp's output buffers) + a few rows, whatever the
number of models or the length of the text; with one compared model nothing is spilled. A block holds as many
windows as SPILL_MAX_BYTES (or half the free space in $TMPDIR) allows; a text too long for one block loads each
compared model once per block.

Per token the numbers are the pairwise `compare`'s (looks/compare.py), from the same raw float32 rows:
KL(base‖Q) = Σ p_base (a − b) − (lse_a − lse_b), the logprob of the actual token under each model, and whether
both rank the same token first. A unit stores them as arrays (base64 in samples.extra) plus its windows'
most divergent positions with both models' top tokens.

Resuming. The spill is per session: a resumed run decodes the base again for the blocks that still have
pending units (the same rows: same model, windows and batch shape), then only the missing units.
"""

from __future__ import annotations

import base64
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llamalens.core.runtime import Model, library_versions
from llamalens.core.stats import RowStats
from llamalens.errors import InvalidInput, StoreError
from llamalens.looks.compare import check_same_vocab, kl_rows
from llamalens.looks.windows import Window, check_protocol, check_text, plan_windows, rows, text_stream, window_ctx
from llamalens.records import RunOptions, Sample, Timing
from llamalens.run.lifecycle import Progress, RunInterrupted, Work, planned_model
from llamalens.run.sweep import hardware
from llamalens.settings import SamplingSettings
from llamalens.store import RunInfo, Store

KIND = "compare"
EXTRA_VERSION = 1
SPILL_MAX_BYTES = 16 << 30  # base rows on disk at once, at most (a block of windows)
WORST_KEPT = 50  # most divergent positions kept per unit (compare --top's maximum)
N_TOP = 5  # top tokens kept of both models at those positions
MAX_MODELS = 64


@dataclass
class CompareSpec:
    """What a compare run compares: model files (the base first), on a text's windows."""

    models: list[str]  # paths: base, then the compared models
    ctx: int
    protocol: str = "full"
    stride: int | None = None
    name: str | None = None
    questions: list = field(default_factory=list)  # looks/flips.Question: answered by every model, the base too
    max_tokens: int = 32  # of a greedy answer
    normalize: str = "none"  # how a question's options are ranked (choose's --normalize)
    run: int | None = None  # compare on this stored run's generated tokens instead of a text
    draft: bool = False  # the compared models are drafts for the base: each token's acceptance too (looks/draft.py)


@dataclass
class UnitResult:
    """One compared model on one window: per scored token, its text position, KL(base‖Q), both logprobs of the
    actual token, and whether both models' top token is the same; plus the most divergent positions."""

    sample_idx: int
    model: int
    window: int
    positions: np.ndarray
    kld: np.ndarray
    lp_q: np.ndarray
    lp_base: np.ndarray
    same_top: np.ndarray
    worst: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    accept: np.ndarray | None = None  # --draft: Σ min(p_base, p_q) per token
    hit: np.ndarray | None = None  # --draft: whether the compared model's top token is the text's token

    def to_extra(self) -> dict:
        out = {"compare": EXTRA_VERSION, "role": "unit", "model": self.model, "window": self.window,
               "positions": pack(self.positions, np.int64), "kld": pack(self.kld, np.float64),
               "lp_q": pack(self.lp_q, np.float64), "lp_base": pack(self.lp_base, np.float64),
               "same_top": pack(self.same_top, np.uint8), "worst": self.worst, "seconds": self.seconds}
        if self.accept is not None:
            out.update(accept=pack(self.accept, np.float64), hit=pack(self.hit, np.uint8))
        return out

    @property
    def n_scored(self) -> int:
        return len(self.kld)

    @classmethod
    def from_extra(cls, sample_idx: int, x: dict) -> "UnitResult":
        return cls(sample_idx, int(x["model"]), int(x["window"]), unpack(x["positions"], np.int64),
                   unpack(x["kld"], np.float64), unpack(x["lp_q"], np.float64), unpack(x["lp_base"], np.float64),
                   unpack(x["same_top"], np.uint8).astype(bool), list(x.get("worst", [])), float(x.get("seconds", 0)),
                   unpack(x["accept"], np.float64) if "accept" in x else None,
                   unpack(x["hit"], np.uint8).astype(bool) if "hit" in x else None)


def pack(a, dtype) -> str:
    """An array as base64 of its little-endian bytes (exact, and a third of the size of JSON numbers)."""
    return base64.b64encode(np.ascontiguousarray(a, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()).decode()


def unpack(s: str, dtype) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)


def bits_per_weight(header) -> float:
    """Bits per weight of a GGUF file: its tensors' bytes × 8 over their elements (as llama.cpp's loader
    prints 'BPW')."""
    n = sum(t.n_elements for t in header.tensors)
    return 8.0 * sum(t.n_bytes for t in header.tensors) / n if n else math.nan


def model_entry(store: Store, model: Model) -> dict:
    """What the run records of one model: its header's description, file sha256 and bits per weight."""
    return {"path": str(model.path), "sha256": store.model_hash(model.path), "info": model.describe(),
            "bpw": bits_per_weight(model.header)}


# -- starting a run -------------------------------------------------------------------------------------
def check_models(paths: list) -> list[Path]:
    """The model files of a comparison, resolved: a base and at least one other, every file distinct."""
    from llamalens.looks.compare import same_file
    from llamalens.modelfiles.find import resolve_model

    if len(paths) < 2:
        raise InvalidInput(f"give a base model and at least one model to compare with it: --model BASE --model Q "
                           f"[--model Q2 ...] (got {len(paths)}); with exactly two models, the second is compared "
                           "with the first")
    if len(paths) > MAX_MODELS:
        raise InvalidInput(f"{len(paths)} models are more than one comparison takes ({MAX_MODELS}); split them")
    files = [resolve_model(p) for p in paths]
    for i, a in enumerate(files):
        for b in files[:i]:
            if same_file(a, b):
                raise InvalidInput(f"--model {a} is given twice: the KL divergence of a model with itself is 0 by "
                                   "construction; pass different files")
    return files


def start_compare(base: Model, store: Store, spec: CompareSpec, text: str | bytes | None, command: str = "",
                  on_note=None) -> int:
    """Check the text and every model against the base (vocabulary, tokenization: each compared model is loaded
    and closed in turn), then plan the run: sample 0 the spec, one pending unit per (model, window), and one per
    (model, question) when there are questions (the base answers them too)."""
    stream, off, notes, windows, source = [], 0, [], [], None
    if spec.run is not None:
        stream, windows, source = run_windows(base, store, spec.run)
    elif text is not None:
        stream, off = check_text(base, text)
        notes = check_protocol(len(stream), spec.ctx, spec.protocol, spec.stride, base.n_ctx_train)
        windows = plan_windows(len(stream), spec.ctx, spec.protocol, spec.stride, bos=off == 1)
    entries = [model_entry(store, base)]
    for path in spec.models[1:]:
        with Model(path, base.options) as q:
            check_same_vocab(base, q)
            if text is not None:
                if text_stream(q, text)[0] != stream:
                    raise InvalidInput(f"{base.path.name} and {q.path.name} tokenize this text differently; they "
                                       "cannot be compared token by token")
                notes += [n for n in check_protocol(len(stream), spec.ctx, spec.protocol, spec.stride,
                                                    q.n_ctx_train) if n not in notes]
            entries.append(model_entry(store, q))
    for note in notes:
        if on_note:
            on_note(note)
    text = "" if text is None else text
    n_bytes = len(text.encode("utf-8") if isinstance(text, str) else text)
    spec_extra = {"compare": EXTRA_VERSION, "role": "spec", "models": entries, "ctx": spec.ctx,
                  "protocol": "run" if source else spec.protocol,
                  "stride": spec.stride if spec.protocol == "full" and not source else None,
                  "stream": stream, "offset": off, "n_bytes": n_bytes, "notes": notes,
                  "windows": [[w.start, w.length, w.first, w.bos_first] for w in windows],
                  "questions": [q.to_dict() for q in spec.questions], "max_tokens": spec.max_tokens,
                  "normalize": spec.normalize, "source": source, "draft": spec.draft}
    units = [(k, w) for k in range(1, len(entries)) for w in range(len(windows))]
    answers = [(k, i) for k in range(len(entries)) for i in range(len(spec.questions))]
    shown = text if isinstance(text, str) else text.decode("utf-8", errors="replace")
    plan = ([(0, 0, 0, shown)] + [(k, 0, w, "") for k, w in units]
            + [(k, 1, i, spec.questions[i].prompt) for k, i in answers])
    extras = ([spec_extra] + [{"compare": EXTRA_VERSION, "role": "unit", "model": k, "window": w} for k, w in units]
              + [{"compare": EXTRA_VERSION, "role": "answer", "model": k, "question": i} for k, i in answers])
    spec_sample = Sample(shown, [], {}, 0, "", "stop", [], Timing(len(stream), 0, 0.0, 0.0, 0.0))
    return store.create_run(name=spec.name, command=command, model=base.describe(),
                            model_hash=entries[0]["sha256"], versions=library_versions(), hardware=hardware(base),
                            options=RunOptions(max_tokens=spec.max_tokens, n_logprobs=N_TOP,
                                               model_options=base.options),
                            configs=[SamplingSettings(), SamplingSettings(temperature=0)],  # 1: the answers (greedy)
                            plan=plan, kind=KIND, extras=extras, first=(0, spec_sample, spec_extra))


def run_windows(base: Model, store: Store, run_id) -> tuple[list[int], list[Window], dict]:
    """(stream, windows, source) of a stored run's generated tokens: each sample with generated tokens is one
    window, its prompt (tokenized by the base, as the run's model read it: chat runs hold the rendered prompt)
    then its tokens, only the generated ones scored; `source` maps the windows back to the run's samples."""
    info = store.run(run_id)
    toks = store.tokens_by_sample(info.id)
    stream: list[int] = []
    windows, samples = [], []
    for s in store.samples(info.id):
        gen = [t.id for t in toks.get(s.sample_idx, [])]
        if not gen:
            continue
        ptoks = base.prompt_tokens(s.prompt)
        base.check_fits(len(ptoks) + len(gen) - 1, base.options.ctx)
        samples.append([s.sample_idx, len(stream), len(ptoks)])
        windows.append(Window(len(stream), len(ptoks) + len(gen), len(ptoks)))
        stream += ptoks + gen
    if not windows:
        raise InvalidInput(f"run {info.id} has no finished samples with generated tokens to compare on")
    return stream, windows, {"run": info.id, "name": info.name, "kind": info.kind, "samples": samples}


def read_spec(store: Store, run_id: int) -> dict:
    """Sample 0's spec of a compare run."""
    first = store.samples(run_id, only_done=False)[:1]
    x = first[0].extra if first else None
    if not x or x.get("role") != "spec":
        raise StoreError(f"run {run_id} has no compare spec (sample 0); it was not written by `llamalens compare`")
    return x


def spec_windows(spec: dict) -> list[Window]:
    return [Window(*w) for w in spec["windows"]]


# -- the spill: a block's base rows on disk ----------------------------------------------------------------
class Spill:
    """The base model's raw rows of a block of windows, written in order to a temporary file (float32), each row's
    log-sum-exp, logprob of the actual token and top tokens kept in memory; read back in the same order."""

    def __init__(self, n_vocab: int, directory: str | None = None):
        self.n_vocab = n_vocab
        self.file = tempfile.TemporaryFile(dir=directory, prefix="llamalens-compare-")  # gone when closed
        self.index: dict[int, tuple[int, list[tuple[float, float, np.ndarray, np.ndarray]]]] = {}
        self.row = np.empty(n_vocab, dtype=np.float32)

    def start(self, window: int) -> None:
        """The rows that follow are this window's."""
        self.file.seek(0, os.SEEK_END)
        self.index[window] = (self.file.tell(), [])
        self._open = window

    def add(self, row: np.ndarray, stats: tuple) -> None:
        row.tofile(self.file)
        self.index[self._open][1].append(stats)

    def read(self, window: int):
        """(row, lse, logprob of the actual token, top ids, top logprobs) of each base row of a window, in order;
        the row is one reused buffer, valid until the next item."""
        start, stats = self.index[window]
        self.file.flush()
        self.file.seek(start)
        view = memoryview(self.row).cast("B")
        for st in stats:
            if self.file.readinto(view) != view.nbytes:
                raise StoreError("the spill file of the base model's rows was cut short (disk full?)")
            yield (self.row, *st)

    def close(self) -> None:
        self.file.close()


def spill_budget(directory: str | None = None) -> int:
    """Bytes of base rows one block may spill: SPILL_MAX_BYTES, or half the free space in the spill directory."""
    free = shutil.disk_usage(directory or tempfile.gettempdir()).free
    return min(SPILL_MAX_BYTES, free // 2)


def blocks(windows: list[Window], needed: list[int], n_vocab: int, budget: int) -> list[list[int]]:
    """The windows that still have pending units, in consecutive blocks whose scored rows fit the budget."""
    out: list[list[int]] = []
    used = 0
    for w in needed:
        size = (windows[w].length - windows[w].first + 1) * n_vocab * 4
        if size > budget:
            raise StoreError(f"one window's base rows take {size / 2**30:.2f} GiB on disk and only "
                             f"{budget / 2**30:.2f} GiB may be spilled in {tempfile.gettempdir()}; free some space "
                             "or point TMPDIR at a larger disk (or lower --ctx)")
        if not out or used + size > budget:
            out.append([])
            used = 0
        out[-1].append(w)
        used += size
    return out


# -- decoding a unit -------------------------------------------------------------------------------------
def base_rows(base: Model, stream: list[int], w: Window, n_ctx: int, spill: Spill | None = None, window: int = 0):
    """(row, lse, logprob of the actual token, top ids, top logprobs) of each scored base row of a window as it is
    decoded; each row also written to the spill when one is given (for the models compared after this one)."""
    if spill is not None:
        spill.start(window)
    for s_idx, row in rows(base, stream, [w], n_ctx=n_ctx):
        st = RowStats.of(row, stream[s_idx], N_TOP)
        stats = (st.lse, st.logprob, st.top_ids[:N_TOP].copy(), st.top_logprobs[:N_TOP].copy())
        if spill is not None:
            spill.add(row, stats)
        yield (row, *stats)


def compare_window(q: Model, base_iter, stream: list[int], w: Window, window: int, n_ctx: int, offset: int,
                   sample_idx: int, k: int, draft: bool = False) -> UnitResult:
    """Model q on one window against the base's rows of that window, as `base_iter` gives them: decoded alongside
    (base_rows) or read back from the spill (Spill.read)."""
    try:
        return _compare_window(q, base_iter, stream, w, window, n_ctx, offset, sample_idx, k, draft)
    finally:
        base_iter.close()  # the base's context (decoded alongside) is freed now, not when collected


def _compare_window(q, base_iter, stream, w, window, n_ctx, offset, sample_idx, k, draft) -> UnitResult:
    from llamalens.looks.draft import acceptance

    t0 = time.perf_counter()
    pos, kld, lp_q, lp_b, same, tops, accept, hit = [], [], [], [], [], [], [], []
    for (s_idx, b), (a, lse_a, lp_a, ids_a, lps_a) in zip(rows(q, stream, [w], n_ctx=n_ctx), base_iter):
        tok = stream[s_idx]
        sb = RowStats.of(b, tok, N_TOP)
        pos.append(s_idx - offset)
        kld.append(kl_rows(a, lse_a, b, sb.lse))
        if draft:
            accept.append(acceptance(a, lse_a, b, sb.lse))
            hit.append(int(sb.top_ids[0]) == tok)
        lp_q.append(sb.logprob)
        lp_b.append(lp_a)
        same.append(int(ids_a[0]) == int(sb.top_ids[0]))
        tops.append((ids_a, lps_a, sb.top_ids[:N_TOP].copy(), sb.top_logprobs[:N_TOP].copy()))
    kld_a = np.array(kld)
    worst = [_worst_entry(q, stream, pos[i] + offset, pos[i], kld_a[i], lp_q[i], lp_b[i], tops[i])
             for i in np.argsort(-kld_a, kind="stable")[:WORST_KEPT]]
    return UnitResult(sample_idx, k, window, np.array(pos), kld_a, np.array(lp_q), np.array(lp_b),
                      np.array(same, dtype=bool), worst, time.perf_counter() - t0,
                      np.array(accept) if draft else None, np.array(hit, dtype=bool) if draft else None)


def _worst_entry(q: Model, stream, s_idx: int, position: int, kld: float, lp_q: float, lp_b: float, tops) -> dict:
    ids_a, lps_a, ids_b, lps_b = tops

    def alts(ids, lps):
        return [[int(i), *q.token_text(int(i)), float(lp)] for i, lp in zip(ids, lps)]

    tok = stream[s_idx]
    return {"position": position, "id": tok, "text": q.token_text(tok)[0], "bytes": q.token_text(tok)[1],
            "kld": float(kld), "lp_q": float(lp_q), "lp_base": float(lp_b), "top_base": alts(ids_a, lps_a),
            "top_q": alts(ids_b, lps_b)}


def decode(base: Model, items: list, spec: dict, stats: dict):
    """Every pending unit (sample_idx, model k, "unit" or "answer", window or question): the base's answers first,
    then the windows a block at a time (module docstring): the block's first compared model decodes alongside the
    base, whose rows are spilled for the others; then each other compared model is loaded in turn and reads them
    back. A compared model answers its questions the first time it is loaded (or, with no window left to decode,
    is loaded for them alone)."""
    from llamalens.looks.flips import Question
    from llamalens.run.answers import answer_units

    questions = [Question.from_dict(q) for q in spec.get("questions", [])]
    asks: dict[int, dict[int, int]] = {}  # model -> {question: sample_idx}
    for sample_idx, k, role, i in items:
        if role == "answer":
            asks.setdefault(k, {})[i] = sample_idx

    def answers_of(model: Model, k: int):
        return answer_units(model, k, asks.pop(k, {}), questions, int(spec.get("max_tokens", 0)))

    yield from answers_of(base, 0)
    windows = [(s, k, w) for s, k, role, w in items if role == "unit"]
    if windows:
        yield from _decode_windows(base, windows, spec, stats, answers_of)
    for k in sorted(asks):
        with load_compared(spec["models"][k], base) as q:
            yield from answers_of(q, k)


def _decode_windows(base: Model, items: list, spec: dict, stats: dict, answers_of):
    windows, stream, offset = spec_windows(spec), spec["stream"], spec["offset"]
    draft = bool(spec.get("draft"))
    n_ctx = window_ctx(windows)  # every window in a context of the same size, as the pairwise compare
    needed = sorted({w for _, _, w in items})
    for block in blocks(windows, needed, base.n_vocab, spill_budget()):
        pending: dict[int, dict[int, int]] = {}  # model -> {window: sample_idx}
        in_block = set(block)
        for sample_idx, k, w in items:
            if w in in_block:
                pending.setdefault(k, {})[w] = sample_idx
        first, *rest = sorted(pending)
        spill = Spill(base.n_vocab) if rest else None
        try:
            with load_compared(spec["models"][first], base) as q:
                for w in block:
                    along = base_rows(base, stream, windows[w], n_ctx, spill, w)
                    if w in pending[first]:
                        yield compare_window(q, along, stream, windows[w], w, n_ctx, offset, pending[first][w], first,
                                             draft)
                    elif spill is not None:  # resumed: this model's unit is saved, the others still need the rows
                        for _ in along:
                            pass
                yield from answers_of(q, first)
            stats["base_windows"] = stats.get("base_windows", 0) + len(block)
            for k in rest:
                with load_compared(spec["models"][k], base) as q:
                    for w, sample_idx in pending[k].items():
                        yield compare_window(q, spill.read(w), stream, windows[w], w, n_ctx, offset, sample_idx, k,
                                             draft)
                    yield from answers_of(q, k)
        finally:
            if spill is not None:
                spill.close()


def load_compared(entry: dict, base: Model) -> Model:
    """A compared model, with the base's options; refused when its file changed since the run was planned."""
    return planned_model(entry, base, "comparison", "comparison")


class CompareInterrupted(RunInterrupted):
    unit = "units (model windows, answers)"


class CompareKind:
    """The compare run kind: units of (compared model, window), decoded a block of windows at a time."""

    name = KIND
    interrupted = CompareInterrupted

    def pending(self, model: Model, store: Store, info: RunInfo) -> Work:
        spec = read_spec(store, info.id)
        items = [(s.sample_idx, int(s.extra["model"]), s.extra["role"],
                  int(s.extra["window"] if s.extra["role"] == "unit" else s.extra["question"]))
                 for s in store.pending(info.id)]

        def save(writer: int, result, prog: Progress) -> tuple[int, int]:  # a UnitResult or an AnswerResult
            sample = Sample("", [], {}, 0, "", "stop", [], Timing(0, result.n_scored, 0.0, 0.0, result.seconds * 1e3))
            store.save_sample(info.id, result.sample_idx, sample, writer, extra=result.to_extra())
            return result.sample_idx, result.n_scored

        return Work(items, save, Progress(info.n_done, info.n_samples, 0, 0.0), (spec,))

    def decode(self, model: Model, items: list, shared: tuple, stats: dict):
        return decode(model, items, shared[0], stats)

    def chunks(self, items: list, size: int) -> list[list]:
        return [items]

    def keep_stats(self, store: Store, run_id: int, stats: dict) -> None:
        pass

    def finish(self, model: Model, store: Store, run_id: int, work: Work) -> None:
        store.set_status(run_id, "done")


COMPARE = CompareKind()


def execute_compare(base: Model, store: Store, run_id: int, on_progress=None) -> Progress:
    """Decode a compare run's pending units (its base loaded: the run's model), saving each as it finishes."""
    from llamalens.run import lifecycle

    return lifecycle.execute(COMPARE, base, store, run_id, on_progress)

"""`compare` of two models on the same tokens: per-token KL divergence, Δp and same top token.

KL divergence, per position, over the whole vocabulary, in nats:
    KL(A‖B) = Σ pA (lpA − lpB) = Σ pA (a − b) − (lseA − lseB)      (a, b raw logits; lse log-sum-exp)
which is exactly 0 for identical rows. Nothing of size tokens × vocabulary is kept: both models' rows are
walked in lockstep (looks/windows.py's rows()) and per-token numbers only are kept, so peak memory does not
grow with the text. Several models against one base: run/compare.py.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from llamalens.errors import InvalidInput
from llamalens.records import Alternative, Rich, alternatives
from llamalens.core.runtime import Model
from llamalens.core.stats import RowStats
from llamalens.looks.windows import Window, check_protocol, check_text, plan_windows, rows, text_stream, window_ctx


@dataclass
class PositionDiff:
    position: int  # text token position (or generated position for --run)
    id: int
    text: str
    bytes: str
    kld: float
    p_a: float
    p_b: float
    top_a: list[Alternative]
    top_b: list[Alternative]
    sample: int | None = None  # the stored sample, for --run
    lp_a: float = math.nan  # the logprobs p_a and p_b are the exp of (the statistics use them: exact)
    lp_b: float = math.nan

    @property
    def dp(self) -> float:
        return self.p_b - self.p_a

    @property
    def same_top(self) -> bool:
        return bool(self.top_a and self.top_b and self.top_a[0].id == self.top_b[0].id)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(dp=self.dp, same_top=self.same_top)
        return d


def kl_rows(a: np.ndarray, lse_a: float, b: np.ndarray, lse_b: float) -> float:
    """KL(A‖B) over the whole vocabulary from two raw rows and their log-sum-exps (module docstring)."""
    pa = np.exp(a - np.float32(lse_a))
    return max(0.0, float(np.sum(pa * (a - b), dtype=np.float64)) - (lse_a - lse_b))


def kl_from_stats(a: np.ndarray, sa: RowStats, b: np.ndarray, sb: RowStats) -> float:
    return kl_rows(a, sa.lse, b, sb.lse)


@dataclass
class Comparison(Rich):
    """Model B against model A on the same tokens (ll.compare, `llamalens compare`): summary() has the figures
    llama-perplexity --kl-divergence prints. to_pandas(): one row per position: position, sample, token_id,
    text, bytes, kld, p_a, p_b, dp, same_top; in a notebook, the compare report."""

    _display = "compare"
    model_a: dict
    model_b: dict
    protocol: str
    ctx: int
    positions: list[PositionDiff]
    nll_a: float
    nll_b: float
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    source: str = "text"  # "text" or "run N"

    def summary(self) -> dict:
        """Every figure llama-perplexity --kl-divergence prints (looks/kld_stats.py), from our per-token values;
        ppl_a / ppl_b are PPL(base) / PPL(Q) under the names of A and B."""
        from llamalens.looks.kld_stats import kld_statistics

        ps = self.positions
        s = kld_statistics([-p.lp_b for p in ps], [-p.lp_a for p in ps], [p.kld for p in ps],
                           [p.same_top for p in ps])
        return dict(s, ppl_a=s["ppl_base"], ppl_b=s["ppl_q"])

    def worst(self, k: int = 20) -> list[PositionDiff]:
        return sorted(self.positions, key=lambda p: -p.kld)[:k]

    def to_dict(self, with_positions: bool = True) -> dict:
        d = {"model_a": self.model_a, "model_b": self.model_b, "protocol": self.protocol, "ctx": self.ctx,
             "source": self.source, "summary": self.summary(), "notes": self.notes,
             "worst": [p.to_dict() for p in self.worst()]}
        if with_positions:
            d["positions"] = [p.to_dict() for p in self.positions]
        return d

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame([[p.position, p.sample, p.id, p.text, p.bytes, p.kld, p.p_a, p.p_b, p.dp, p.same_top]
                             for p in self.positions], columns=COMPARISON_COLUMNS)

    def __repr__(self) -> str:
        s = self.summary()
        return (f"<Comparison {self.model_b.get('name')} vs {self.model_a.get('name')} on {s['tokens']} tokens "
                f"({self.source}): mean KLD {s['kld_mean']:.6f}, PPL ratio {s['ppl_ratio']:.5f}, same top "
                f"{s['same_top']:.2%}>")


COMPARISON_COLUMNS = ["position", "sample", "token_id", "text", "bytes", "kld", "p_a", "p_b", "dp", "same_top"]


def check_same_vocab(a: Model, b: Model) -> None:
    ta = a.header.get("tokenizer.ggml.model")
    tb = b.header.get("tokenizer.ggml.model")
    problem = a.n_vocab != b.n_vocab or ta != tb
    if not problem:  # same size and kind: spot-check the tokens themselves
        probe = np.unique(np.linspace(0, a.n_vocab - 1, 97).astype(int))
        problem = any(a.piece(int(i)) != b.piece(int(i)) for i in probe) or a.bos != b.bos
    if problem:
        raise InvalidInput(f"the models do not share a vocabulary: {a.path.name} has a {ta!r} tokenizer with "
                           f"{a.n_vocab:,} tokens, {b.path.name} a {tb!r} tokenizer with {b.n_vocab:,}; KL divergence "
                           "needs the same tokens on both sides (compare quantizations or fine-tunes of one model)")


def compare_pair(models) -> tuple:
    """The two model files of a comparison (A, B), resolved; refused unless exactly two distinct files."""
    from llamalens.modelfiles.find import resolve_model

    if len(models) != 2:
        raise InvalidInput(f"give exactly two models: --model A --model B (got {len(models)})")
    a, b = resolve_model(models[0]), resolve_model(models[1])
    if same_file(a, b):
        raise InvalidInput(f"--model {a} is given twice: the KL divergence of a model with itself is 0 by construction; "
                           "pass two different files")
    return a, b


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def compare_windows(a: Model, b: Model, stream: list[int], windows: list[Window], offset: int, n_top: int,
                     out: list[PositionDiff], nll: list[list[float]], sample: int | None = None,
                     on_window=None, alternate: bool = False, n_ctx: int | None = None) -> None:
    """Both models' rows for the same windows: in lockstep (both resident), or, with `alternate`, one window
    of A (its scored rows buffered) then the same window of B, so only one model's weights are hot at a time.
    `n_ctx`: as for rows()."""

    def pair_rows():
        if not alternate:
            yield from zip(rows(a, stream, windows, on_window, n_ctx), rows(b, stream, windows, n_ctx=n_ctx))
            return
        for k, w in enumerate(windows):
            n = n_ctx or window_ctx([w])
            buf = [(i, r.copy()) for i, r in rows(a, stream, [w], n_ctx=n)]
            yield from zip(buf, rows(b, stream, [w], n_ctx=n))
            if on_window:
                on_window(k + 1)

    for (ia, ra), (ib, rb) in pair_rows():
        assert ia == ib
        tok = stream[ia]
        sa, sb = RowStats.of(ra, tok, n_top), RowStats.of(rb, tok, n_top)
        out.append(PositionDiff(ia - offset, tok, *a.token_text(tok),
                                kl_from_stats(ra, sa, rb, sb), math.exp(sa.logprob), math.exp(sb.logprob),
                                alternatives(a.token_text, sa.top_ids, sa.top_logprobs),
                                alternatives(b.token_text, sb.top_ids, sb.top_logprobs), sample, sa.logprob,
                                sb.logprob))
        nll[0].append(-sa.logprob)
        nll[1].append(-sb.logprob)


def both_fit(a: Model, b: Model) -> bool:
    """Whether both models' weights fit in available memory at once (else compare alternates per window)."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return True  # not Linux: trust the OS's paging
    need = a.info.file_size + b.info.file_size
    return need < 0.8 * avail


def compare_text(a: Model, b: Model, text: str | bytes, ctx: int | None = None, protocol: str = "full",
                 stride: int | None = None, n_top: int = 5, on_progress=None, alternate: bool | None = None,
                 scorer: Callable | None = None) -> Comparison:
    """Per-token KL(A‖B), Δp and same-top over a text, both models' rows streamed in lockstep.
    `scorer(stream, off, windows, n_top, n_ctx)` -> (positions, [nll A, nll B]) compares the windows elsewhere
    (distributed.py: on Ray)."""
    check_same_vocab(a, b)
    ctx = ctx or min(a.options.ctx, b.options.ctx)
    stream, off = check_text(a, text)
    if text_stream(b, text)[0] != stream:
        raise InvalidInput(f"{a.path.name} and {b.path.name} tokenize this text differently; they cannot be compared "
                           "token by token")
    notes = check_protocol(len(stream), ctx, protocol, stride, min(a.n_ctx_train, b.n_ctx_train))
    windows = plan_windows(len(stream), ctx, protocol, stride, bos=off == 1)
    t0 = time.perf_counter()
    positions: list[PositionDiff] = []
    nll: list[list[float]] = [[], []]
    if alternate is None:
        alternate = scorer is None and not both_fit(a, b)
    if alternate:
        notes.append("the two models do not both fit in memory: compared one window of each at a time")
    if scorer is not None:
        positions, nll = scorer(stream, off, windows, n_top, window_ctx(windows))
    else:
        compare_windows(a, b, stream, windows, off, n_top, positions, nll,
                         on_window=on_progress and (lambda k: on_progress(k, len(windows))), alternate=alternate)
    return Comparison(a.describe(), b.describe(), protocol, ctx, positions, float(np.mean(nll[0])),
                      float(np.mean(nll[1])), notes, time.perf_counter() - t0)


def compare_run(a: Model, b: Model, store, run_id, n_top: int = 5, on_progress=None) -> Comparison:
    """What model B thinks of the generated tokens of a stored sweep (A: the run's model)."""
    check_same_vocab(a, b)
    info = store.run(run_id)
    samples = store.samples(info.id)
    if not samples:
        raise InvalidInput(f"run {info.id} has no finished samples to compare on")
    toks = store.tokens_by_sample(info.id)
    t0 = time.perf_counter()
    positions: list[PositionDiff] = []
    nll: list[list[float]] = [[], []]
    for k, s in enumerate(samples):
        gen = [t.id for t in toks.get(s.sample_idx, [])]
        if not gen:
            continue
        ptoks = a.prompt_tokens(s.prompt)
        stream = ptoks + gen
        a.check_fits(len(stream) - 1, a.options.ctx)
        compare_windows(a, b, stream, [Window(0, len(stream), len(ptoks))], len(ptoks), n_top, positions, nll,
                         sample=s.sample_idx)
        if on_progress:
            on_progress(k + 1, len(samples))
    return Comparison(a.describe(), b.describe(), "run", a.options.ctx, positions, float(np.mean(nll[0])),
                      float(np.mean(nll[1])), [], time.perf_counter() - t0, source=f"run {info.id}")

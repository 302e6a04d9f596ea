"""Pure numerics on logits rows: no llama.cpp, no I/O. Everything here is checked in tests against a
plain float64 log-softmax.

The hot path is `block_stats(block, n_top)`, run once per decode step on the [n_outputs, n_vocab]
float32 block of output rows (262,144 logits a row for Gemma 3); `RowStats.of` is the same for one row.
It takes a handful of vectorised passes and no full sort:
    m      = max(logits)
    e      = exp(logits - m)                    (float32)
    s      = sum(e)                             (float64 accumulation)
    lse    = m + log(s)                         log-sum-exp: logprob(i) = logits[i] - lse
    H      = log(s) - (e · (logits - m)) / s    entropy in nats = -sum p log p
    top N  = a floor from every 64th logit (block_stats says why it is safe), the ids at or above it
             (about 64 N), sorted by (-logit, id)
    rank   = 1 + count(logits > logits[chosen]), counted among those candidates when the chosen token
             is one of them, else over the row
llama-cpp-python instead sorts the whole vocabulary in Python per token (about 194 ms at 262k).

Every pass writes into per-thread scratch arrays of n_vocab entries, allocated once. Fresh 1-2 MB
temporaries can be served by mmap and handed back to the kernel on free, and then the page faults cost
more than the arithmetic (at 262k, three times the cost of the pass itself). The rank comes from a floor and
the candidates above it rather than a partition of a copy; the sums stay float64 (float32 ones err by 2e-6 nats).
"""

from __future__ import annotations

import ctypes
import math
import threading
from dataclasses import dataclass, field

import numpy as np

from llamalens.core import kernels
def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-softmax of a row (or of each row of a 2-D array)."""
    x = np.asarray(logits, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    return x - (m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True)))


def logsumexp(x: np.ndarray) -> float:
    """float64 log-sum-exp of a vector (the ndarray methods, not np.max / np.sum: the same reductions without
    numpy's Python wrappers, which a pick paid for in the cold cache after each decode)."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return -math.inf
    m = float(x.max())
    return m + math.log(float(np.exp(x - m).sum()))


def entropy(logits: np.ndarray) -> float:
    lp = log_softmax(logits)
    return float(-np.sum(np.exp(lp) * lp))


_scratch = threading.local()
_F32 = np.dtype(np.float32)
CHUNK = 1 << 18  # elements per pass of block_stats: a 262k row alone, eight rows of a 32k vocabulary (1 MB float32)
SUBSAMPLE = 64  # block_stats looks for the top-N threshold in every 64th logit first


def _buffers(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two float32 arrays and a bool array of n entries, owned by the calling thread, reused."""
    b = getattr(_scratch, "bufs", None)
    if b is None or b[0].shape[0] != n:
        b = _scratch.bufs = (np.empty(n, np.float32), np.empty(n, np.float32), np.empty(n, np.bool_))
    return b


def _chunk_buffers(rows: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """block_stats' scratch: [rows, n] float32 twice and bool once, per thread, reused while the shape holds."""
    b = getattr(_scratch, "chunk", None)
    if b is None or b[0].shape != (rows, n):
        b = _scratch.chunk = (np.empty((rows, n), np.float32), np.empty((rows, n), np.float32),
                              np.empty((rows, n), np.bool_))
    return b


def top_ids(logits: np.ndarray, n: int, scratch: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Ids of the n largest logits, largest first; ties broken by smaller id.

    `scratch`: a float array and a bool array the size of `logits` to work in (nothing else is allocated
    at that size)."""
    size = logits.shape[-1]
    n = min(n, size)
    if n <= 0:
        return np.empty(0, dtype=np.int64)
    work, mask = scratch if scratch is not None else (np.empty(size, logits.dtype), np.empty(size, np.bool_))
    np.copyto(work, logits)
    work.partition(size - n)
    np.greater_equal(logits, work[size - n], out=mask)  # the n largest, and any tied with the n-th
    cand = np.flatnonzero(mask)
    order = np.lexsort((cand, -logits[cand].astype(np.float64)))[:n]
    return cand[order]


def lse32(x: np.ndarray) -> float:
    """log-sum-exp of a float32 vector (a strided field of a structured array will do) the way RowStats computes a
    row's: exp in float32, sums in float64, in this thread's scratch array (one max pass, one subtract, one exp,
    one sum; 0.4 ms against `logsumexp`'s 0.7 ms on 262k entries)."""
    if x.size == 0:
        return -math.inf
    e = _buffers(x.shape[0])[1]
    if x.dtype != np.float32 or not x.flags.c_contiguous:  # one strided read, then contiguous passes
        np.copyto(e, x, casting="same_kind")
        x = e
    m = x.max()
    if not np.isfinite(m):
        return float(m)
    np.subtract(x, m, out=e)
    np.exp(e, out=e)
    return float(m) + math.log(float(np.sum(e, dtype=np.float64)))


def block_stats(block: np.ndarray, n_top: int, n_floor: int = 0, reuse: bool = False) -> list["RowStats"]:
    """RowStats (no chosen token yet: see for_token) of every row of a [rows, n_vocab] float32 block at once.
    `n_floor` > n_top makes the row's sorted top list hold its n_floor largest logits (RowStats.top_k_ids needs
    k + 1 of them); the top N and ranks do not change with it.

    With k = max(n_top, n_floor), for each row:
        m = max; t0 = the k-th largest of every 64th logit, a floor <= the row's k-th largest (a subset's k-th
        largest never exceeds the whole row's)
        one pass: sh = x - m | e = exp(sh) | s = sum e (float64) | sum e * sh (float64) | candidates x >= t0
        the top list: the k largest candidates sorted by (-logit, id) (the candidates hold the top k and their
        ties, about 64 k entries); the top N is its head.
    All of it in one C call for the whole block (kernels.block_pass: each row read from memory once), or else in
    numpy's passes, CHUNK elements at a time (_numpy_block_pass). The candidates and the top list are kept with the
    row: a chosen token gets its rank from them without a pass over the row (for_token). One call for the whole
    block, not one per row: at a 32k vocabulary the Python around a call per row cost as much as the arithmetic.

    `reuse` (the engine's per-step statistics): the RowStats' arrays are this thread's kept ones for the block's
    shape (kernels.block_pass), valid until the next reusing call of that shape; made once, not per step."""
    if block.dtype is not _F32 or not block.flags.c_contiguous:  # (a cheap test: the engine's blocks pass it)
        block = np.ascontiguousarray(block, dtype=np.float32)
    if block.ndim == 1:
        block = block[None, :]
    n_rows, size = block.shape
    k = max(1, min(max(n_top, n_floor), size))
    stride = max(1, min(SUBSAMPLE, size // (8 * k)))
    if kernels.LIB is not None:
        bp = kernels.block_pass(block, stride, k, reuse)
    else:
        bp = _numpy_block_pass(block, stride, k)
    n = min(n_top, k) if n_top > 0 else 0
    views = bp.rows.get(n)  # each row's views of the pass's arrays (kept with a reused pass)
    if views is None:
        views = bp.rows[n] = _row_views(bp, n, k, native=reuse and kernels.LIB is not None)
    scalars = bp.rows.get("scalars")  # ctypes views of a reused pass's per-row numbers: lists without numpy
    if scalars is None and reuse and kernels.LIB is not None:
        scalars = bp.rows["scalars"] = [np.ctypeslib.as_ctypes(a) for a in (bp.off, bp.entropy, bp.lse, bp.floor,
                                                                              bp.strict)]
    if scalars is not None:
        off, ent, lses, floors, strict = (a[:] for a in scalars)
    else:
        off, ent, lses, floors, strict = (a.tolist() for a in (bp.off, bp.entropy, bp.lse, bp.floor, bp.strict))
    cand = bp.cand
    out = []
    # a row of -inf (everything banned) or with +inf / nan has lse nan: it is taken the plain way
    for i, (h, lse, fl, run) in enumerate(zip(ent, lses, floors, strict)):
        ids, top_lp, tid, tv, bsums, native = views[i]
        out.append(RowStats(math.nan, 0, h, lse, ids, top_lp, fl, cand[off[i]:off[i + 1]], k, tid, tv, bsums, run,
                            native) if lse == lse else RowStats.of_plain(block[i], n_top))
    return out


def _row_views(bp: kernels.BlockPass, n: int, k: int, native: bool) -> list[tuple]:
    """Each row's views of a block pass's arrays, for its RowStats: the top n ids (int64) and logprobs, the top
    list's ids and logits, the block sums, and with `native` the top list's ids and logprobs as ctypes arrays over
    the same memory and its logits' address (RowStats.top_lists and .ranks, which need no numpy call)."""
    ids, top_lp, tid, tv, bsums = bp.top_ids64[:, :n], bp.top_lp[:, :n], bp.top_ids, bp.top_logits, bp.block_sums
    out = []
    for i in range(bp.m.shape[0]):
        nat = None
        if native:
            nat = ((ctypes.c_int64 * k).from_buffer(bp.top_ids64[i]), (ctypes.c_double * k).from_buffer(bp.top_lp[i]),
                   (kernels.address(tv[i]), k))
        out.append((ids[i], top_lp[i], tid[i], tv[i], None if bsums is None else bsums[i], nat))
    return out


def _numpy_block_pass(block: np.ndarray, stride: int, k: int) -> kernels.BlockPass:
    """kernels.block_pass's results in numpy (no C kernel): CHUNK elements of the block at a time; block_sums None."""
    n_rows, size = block.shape
    per = max(1, CHUNK // max(size, 1))
    m, floor, sums = np.empty(n_rows, np.float32), np.full(n_rows, np.nan, np.float32), np.full((n_rows, 2), np.nan)
    tid, tv = np.zeros((n_rows, k), np.int32), np.full((n_rows, k), -np.inf, np.float32)
    lse, ent, top_lp = np.full(n_rows, np.nan), np.full(n_rows, np.nan), np.full((n_rows, k), np.nan)
    strict = np.zeros(n_rows, np.int64)
    cands: list[np.ndarray] = []
    for r0 in range(0, n_rows, per):
        x = block[r0 : r0 + per]
        m[r0 : r0 + x.shape[0]] = x.max(axis=1)
        sub = x[:, ::stride]
        fl = np.partition(sub, sub.shape[1] - k, axis=1)[:, sub.shape[1] - k]
        s, es, cand = _numpy_passes(x, m[r0 : r0 + x.shape[0]], fl, _chunk_buffers(per, size))
        for j in range(x.shape[0]):
            r = r0 + j
            if not math.isfinite(float(m[r])):
                cands.append(np.empty(0, np.int32))
                continue
            floor[r], sums[r] = fl[j], (s[j], es[j])
            c = cand[j].astype(np.int32)
            cl = x[j, c]
            if c.shape[0] > 4 * k:  # sort only the top k and their ties (the same order as sorting all)
                at = c.shape[0] - k
                sel = np.flatnonzero(cl >= np.partition(cl, at)[at])
                order = sel[np.lexsort((c[sel], -cl[sel].astype(np.float64)))[:k]]
            else:
                order = np.lexsort((c, -cl.astype(np.float64)))[:k]
            tid[r], tv[r] = c[order], cl[order]
            log_s = math.log(float(s[j]))  # the C kernel's float64 operations, in its order
            lse[r] = float(m[r]) + log_s
            ent[r] = max(log_s - float(es[j]) / float(s[j]), 0.0)
            top_lp[r] = tv[r].astype(np.float64) - lse[r]
            down = np.flatnonzero(~(tv[r][:-1] > tv[r][1:]))  # where the head stops strictly decreasing
            strict[r] = int(down[0]) + 1 if down.size else k
            cands.append(c)
    off = np.zeros(n_rows + 1, np.int64)
    np.cumsum([c.shape[0] for c in cands], out=off[1:])
    return kernels.BlockPass(m, floor, sums, None, np.concatenate(cands) if cands else np.empty(0, np.int32), off,
                             tid, tv, lse, ent, top_lp, strict, tid.astype(np.int64))


def _numpy_passes(x: np.ndarray, m: np.ndarray, floor: np.ndarray, bufs) -> tuple[np.ndarray, np.ndarray, list]:
    """block_stats' passes over a chunk of rows in numpy: (sum of e, sum of e * (x - m), the candidates of each row)
    with e = exp(x - m) in float32 and float64 sums."""
    r = x.shape[0]
    sh, e, mask = (b[:r] for b in bufs)
    np.subtract(x, m[:, None], out=sh)
    np.exp(sh, out=e)
    s = np.sum(e, axis=1, dtype=np.float64)
    # not np.dot / einsum with BLAS: OpenBLAS worker threads then busy-wait and steal the cores
    # llama.cpp's next decode needs (measured: a decode three times slower on 2 cores)
    with np.errstate(invalid="ignore"):
        np.multiply(e, sh, out=e)
    es = np.sum(e, axis=1, dtype=np.float64)
    for i in np.flatnonzero(~np.isfinite(es)):  # -inf logits (banned tokens): their 0 * -inf terms are 0, not nan
        keep = np.isfinite(sh[i])
        es[i] = float(np.sum(e[i][keep], dtype=np.float64))
    np.greater_equal(x, floor[:, None], out=mask)
    return s, es, [np.flatnonzero(mask[i]) for i in range(r)]  # (np.nonzero of the 2-D mask is 8x slower)


def work_array(name: str, n: int, dtype=np.float32) -> np.ndarray:
    """A work array of n entries, this thread's, reused under its name while it is large enough (a fresh 1 MB
    array per row or pick costs more in page faults than the arithmetic): kernels.block_pass's candidates and
    subsample, dist.dist_select's terms, a temperature's row (kernels.work_buffer, without the address)."""
    return kernels.work_buffer(name, n, dtype)[0]


@dataclass(slots=True)
class RowStats:
    """A row's statistics (read-only by convention: slots and no frozen checks, so that making one per step costs
    0.3 us instead of 1.8 us, and far less in the cold cache after a decode)."""

    logprob: float  # of the chosen token
    rank: int
    entropy: float
    lse: float  # log-sum-exp of the row: logprob(i) = logits[i] - lse
    top_ids: np.ndarray
    top_logprobs: np.ndarray
    # block_stats' candidates: the ids of every logit >= _floor of the row (a token at or above it is ranked among
    # them), and the top list: the row's _floor_n largest logits sorted by (-logit, id), their ids and logits
    _floor: float = field(default=math.inf, repr=False, compare=False)
    _cand_ids: np.ndarray | None = field(default=None, repr=False, compare=False)
    _floor_n: int = field(default=0, repr=False, compare=False)
    _top_ids: np.ndarray | None = field(default=None, repr=False, compare=False)
    _top_logits: np.ndarray | None = field(default=None, repr=False, compare=False)
    # the C pass's sums of exp(logit - max) per kernels.DIST_BLOCK logits: dist_select's at temperature 1
    _block_sums: np.ndarray | None = field(default=None, repr=False, compare=False)
    # how many of the top list's head strictly decrease (the k + 1 largest are all different when k < _strict)
    _strict: int = field(default=0, repr=False, compare=False)
    # a reused block pass's row (block_stats): the top list's ids and logprobs as ctypes arrays, and `ranks`
    _native: tuple | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, logits: np.ndarray, chosen: int | None, n_top: int) -> "RowStats":
        st = block_stats(logits, n_top)[0]
        return st if chosen is None else st.for_token(logits, chosen)

    @classmethod
    def of_plain(cls, logits: np.ndarray, n_top: int) -> "RowStats":
        """One row, pass by pass: for rows whose maximum is not finite, which block_stats hands on."""
        shifted, e, mask = _buffers(logits.shape[0])
        m = float(logits.max())
        np.subtract(logits, np.float32(m), out=shifted)
        np.exp(shifted, out=e)
        s = float(np.sum(e, dtype=np.float64))
        lse = m + math.log(s)
        np.multiply(e, shifted, out=e)
        h = math.log(s) - float(np.sum(e, dtype=np.float64)) / s
        ids = top_ids(logits, n_top, (shifted, mask))
        return cls(math.nan, 0, max(h, 0.0), lse, ids, logits[ids].astype(np.float64) - lse)

    def for_token(self, logits: np.ndarray, chosen: int) -> "RowStats":
        """The same row's statistics for a chosen token (row-level work is not repeated; a token among the
        candidates is ranked from them alone)."""
        c = logits[chosen]
        tv = self._top_logits
        if tv is not None and c >= tv[-1]:  # every logit above c is then in the top list
            rank = int(np.count_nonzero(tv > c)) + 1
        elif self._cand_ids is not None and c >= self._floor:
            rank = int(np.count_nonzero(logits[self._cand_ids] > c)) + 1
        else:
            rank = int(np.count_nonzero(np.greater(logits, c, out=_buffers(logits.shape[0])[2]))) + 1
        return self.chosen(float(c), rank)

    def chosen(self, logit: float, rank: int) -> "RowStats":
        """for_token's result for a token whose raw logit and rank are known already (kernels.pick_ids ranks the
        prefilter's pick from the same top list, in C)."""
        return RowStats(logit - self.lse, rank, self.entropy, self.lse, self.top_ids, self.top_logprobs, self._floor,
                        self._cand_ids, self._floor_n, self._top_ids, self._top_logits, self._block_sums,
                        self._strict, self._native)

    @property
    def ranks(self) -> tuple[int, int] | None:
        """(address of the top list's float32 logits, their count) for kernels.pick_ids to rank a pick with; None
        unless the row comes from a reused block pass."""
        return None if self._native is None else self._native[2]

    def top_lists(self, n: int) -> tuple[list[int], list[float]]:
        """The top n ids and logprobs as Python lists (a record's alternatives; n <= len(top_ids)): read from the
        ctypes arrays of a reused block pass, else converted from the arrays."""
        n = min(n, len(self.top_ids))
        if self._native is not None:
            return self._native[0][:n], self._native[1][:n]
        return self.top_ids[:n].tolist(), self.top_logprobs[:n].tolist()

    @property
    def dist_block_sums(self) -> np.ndarray | None:
        """The row's float64 sums of exp(logit - max) per kernels.DIST_BLOCK logits, made by the C pass (None on
        numpy's path): what dist.dist_select takes at temperature 1 instead of a pass of its own over the row."""
        return self._block_sums

    def top_k_ids(self, k: int) -> np.ndarray | None:
        """Ids of the row's k largest logits in id order, when those k+1 largest are all different (so the k-th
        is strictly above the rest and no two of the top k tie); None otherwise, or when the candidates do not
        cover k+1 logits. The sampler prefilter (sampler.prefilter_k) is exact only then."""
        top = self.top_k_list(k)
        return None if top is None else np.sort(top).astype(np.int32)

    def top_k_list(self, k: int) -> np.ndarray | None:
        """top_k_ids' tokens as the top list holds them, by logit (an int32 view; Candidates.fill_ids sorts them):
        a test of integers, no numpy call, in the cold cache just after a decode."""
        if self._top_ids is None or not 0 < k < self._floor_n or k >= self._strict:
            return None
        return self._top_ids[:k]


def kl_divergence(logits_p: np.ndarray, logits_q: np.ndarray) -> float:
    """KL(P || Q) in nats between the softmax distributions of two logits rows."""
    lp, lq = log_softmax(logits_p), log_softmax(logits_q)
    return float(np.sum(np.exp(lp) * (lp - lq)))


def perplexity(logprobs) -> float:
    lps = np.asarray(list(logprobs), dtype=np.float64)
    return float(math.exp(-lps.mean())) if lps.size else math.nan


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """The softmax-with-temperature lesson: probabilities of logits / T (T=0 -> one-hot argmax)."""
    x = np.asarray(logits, dtype=np.float64)
    if temperature == 0:
        out = np.zeros_like(x)
        out[int(np.argmax(x))] = 1.0
        return out
    return np.exp(log_softmax(x / temperature))


EXACT_SURVIVORS = kernels.EXACT_SURVIVORS  # up to this many survivors the sampled logprob is float64 throughout


def sampled_logprob(survivors: np.ndarray, sel: int) -> float:
    """log p of the chosen survivor under the softmax of the survivors' logits (after temperature): float64 for a
    truncated set; for a bigger one (an untruncated chain keeps all 262k) exp in float32 with float64 sums, as
    RowStats computes a row's log-sum-exp (0.6 ms instead of 0.8-2.7 ms on 262k survivors; |error| 3.6e-9 nats
    measured, tests/test_engine.py). A truncated set of llama_token_data (the chain's survivors) goes to the C
    kernel when it is built (kernels.survivor_lp: the same float64 steps with libm's exp, bit for bit what numpy
    gives where its exp is libm's; within 2e-15 nats of numpy's AVX-512 exp)."""
    if kernels.LIB is not None and kernels.survivor_lp_takes(survivors, sel):
        return kernels.survivor_lp(survivors, sel)  # the same float64 steps in C (libm's exp)
    logits = survivors["logit"]
    if len(logits) <= EXACT_SURVIVORS:
        logits = logits.astype(np.float64)
        return float(logits[sel] - logsumexp(logits))
    return float(logits[sel]) - lse32(logits)

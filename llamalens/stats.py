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
more than the arithmetic: RowStats.of alone at 262k took 3.4 ms with temporaries, 1.2 ms with scratch
arrays. (Inside a generate run the end-to-end difference was within this machine's noise.) The floor
instead of a partition of a copy, and the rank from the candidates, took a 262k row from 1.1-1.5 ms to
0.9 ms (issue 21); the float64 sums stay (float32 ones err by 2e-6 nats).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np

from . import kernels


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-softmax of a row (or of each row of a 2-D array)."""
    x = np.asarray(logits, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    return x - (m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True)))


def logsumexp(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return -math.inf
    m = float(np.max(x))
    return m + math.log(float(np.sum(np.exp(x - m))))


def entropy(logits: np.ndarray) -> float:
    lp = log_softmax(logits)
    return float(-np.sum(np.exp(lp) * lp))


_scratch = threading.local()
CHUNK = 1 << 18  # elements per pass of block_stats: a 262k row alone, eight rows of a 32k vocabulary (1 MB float32)
SUBSAMPLE = 64  # block_stats looks for the top-N threshold in every 64th logit first
_NO_IDS = np.empty(0, dtype=np.int64)


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


def block_stats(block: np.ndarray, n_top: int, n_floor: int = 0) -> list["RowStats"]:
    """RowStats (no chosen token yet: see for_token) of every row of a [rows, n_vocab] float32 block at once.
    `n_floor` > n_top makes the candidates cover the row's n_floor largest logits (RowStats.top_k_ids needs
    k + 1 of them); the top N and ranks do not change with it.

    Rows are taken CHUNK elements at a time (one 262k row, or eight 32k ones):
        m = max per row; t0 = the N-th largest of every 64th logit, a floor <= the row's N-th largest (a subset's
        N-th largest never exceeds the whole row's)
        then one C pass per row (kernels.py, _kernels.c), or else numpy's passes over the chunk:
            sh = x - m | e = exp(sh) | s = sum e (float64) | e *= sh; sum (float64) | mask x >= t0
        top N: the candidates x >= t0 hold the top N and their ties, about 64 N entries: only those are sorted
        by (-logit, id).
    The candidates are kept with the row: a chosen token at or above t0 gets its rank from them, without a pass
    over the row (for_token). At 262k logits a row takes ~1.2 ms in numpy, ~0.2 ms with the C pass."""
    block = np.ascontiguousarray(block, dtype=np.float32)
    if block.ndim == 1:
        block = block[None, :]
    n_rows, size = block.shape
    k = max(1, min(max(n_top, n_floor), size))
    stride = max(1, min(SUBSAMPLE, size // (8 * k)))
    per = max(1, CHUNK // max(size, 1))
    out: list[RowStats] = []
    lib = kernels.LIB
    for r0 in range(0, n_rows, per):
        x = block[r0 : r0 + per]
        r = x.shape[0]
        m = x.max(axis=1)
        sub = x[:, ::stride]
        floor = np.partition(sub, sub.shape[1] - k, axis=1)[:, sub.shape[1] - k]
        block_sums = None
        if lib is not None:  # the C pass (kernels.py): exp, both sums, the candidates and dist's block sums
            sums, cands = np.empty((r, 2)), []
            block_sums = np.empty((r, -(-size // kernels.DIST_BLOCK)))
            work = work_array("cand", size, np.int32)
            for i in range(r):
                if math.isfinite(float(m[i])):
                    nc = kernels.row_pass(x[i], float(m[i]), float(floor[i]), sums[i], work, block_sums[i])
                    cands.append(work[:nc].astype(np.intp))
                else:
                    cands.append(_NO_IDS)
            s, es = sums[:, 0], sums[:, 1]
        else:
            s, es, cands = _numpy_passes(x, m, floor, _chunk_buffers(per, size))
        for i in range(r):
            mi = float(m[i])
            if not math.isfinite(mi):  # a row of -inf (everything banned) or with +inf / nan: the plain way
                out.append(RowStats.of_plain(x[i], n_top))
                continue
            log_s = math.log(float(s[i]))
            lse = mi + log_s
            h = log_s - float(es[i]) / float(s[i])
            cand = cands[i]
            cand_logits = x[i, cand]
            if n_top <= 0:
                order = _NO_IDS
            elif cand.shape[0] > 4 * n_top:  # sort only the top N and their ties (the same order as sorting all)
                at = cand.shape[0] - n_top
                sel = np.flatnonzero(cand_logits >= np.partition(cand_logits, at)[at])
                order = sel[np.lexsort((cand[sel], -cand_logits[sel].astype(np.float64)))[:n_top]]
            else:
                order = np.lexsort((cand, -cand_logits.astype(np.float64)))[:n_top]
            ids = cand[order].astype(np.int64)
            out.append(RowStats(math.nan, 0, max(h, 0.0), lse, ids, cand_logits[order].astype(np.float64) - lse,
                                _floor=float(floor[i]), _cand_logits=cand_logits, _cand_ids=cand, _floor_n=k,
                                _block_sums=None if block_sums is None else block_sums[i]))
    return out


def _numpy_passes(x: np.ndarray, m: np.ndarray, floor: np.ndarray, bufs) -> tuple[np.ndarray, np.ndarray, list]:
    """block_stats' passes over a chunk of rows in numpy: (sum of e, sum of e * (x - m), the candidates of each row)
    with e = exp(x - m) in float32 and float64 sums."""
    r = x.shape[0]
    sh, e, mask = (b[:r] for b in bufs)
    np.subtract(x, m[:, None], out=sh)
    np.exp(sh, out=e)
    s = np.sum(e, axis=1, dtype=np.float64)
    # not np.dot / einsum with BLAS: OpenBLAS worker threads then busy-wait and steal the cores
    # llama.cpp's next decode needs (measured: decode 15 -> 45 ms/token on 2 cores)
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
    array per row or pick costs more in page faults than the arithmetic): the C pass's candidate indices,
    sampler.dist_select's terms, a temperature's row."""
    buf = getattr(_scratch, name, None)
    if buf is None or buf.shape[0] < n or buf.dtype != dtype:
        buf = np.empty(max(n, 1), dtype)
        setattr(_scratch, name, buf)
    return buf[:n]


@dataclass(frozen=True)
class RowStats:
    logprob: float  # of the chosen token
    rank: int
    entropy: float
    lse: float  # log-sum-exp of the row: logprob(i) = logits[i] - lse
    top_ids: np.ndarray
    top_logprobs: np.ndarray
    # block_stats' candidates: every logit >= _floor of the row (so a token at or above it is ranked among them)
    _floor: float = field(default=math.inf, repr=False, compare=False)
    _cand_logits: np.ndarray | None = field(default=None, repr=False, compare=False)
    _cand_ids: np.ndarray | None = field(default=None, repr=False, compare=False)
    _floor_n: int = field(default=0, repr=False, compare=False)  # the candidates hold the row's _floor_n largest
    # the C pass's sums of exp(logit - max) per kernels.DIST_BLOCK logits: dist_select's at temperature 1
    _block_sums: np.ndarray | None = field(default=None, repr=False, compare=False)

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
        if self._cand_logits is not None and c >= self._floor:
            rank = int(np.count_nonzero(self._cand_logits > c)) + 1
        else:
            rank = int(np.count_nonzero(np.greater(logits, c, out=_buffers(logits.shape[0])[2]))) + 1
        return RowStats(float(c) - self.lse, rank, self.entropy, self.lse, self.top_ids, self.top_logprobs,
                        self._floor, self._cand_logits, self._cand_ids, self._floor_n, self._block_sums)

    @property
    def dist_block_sums(self) -> np.ndarray | None:
        """The row's float64 sums of exp(logit - max) per kernels.DIST_BLOCK logits, made by the C pass (None on
        numpy's path): what sampler.dist_select takes at temperature 1 instead of a pass of its own over the row."""
        return self._block_sums

    def top_k_ids(self, k: int) -> np.ndarray | None:
        """Ids of the row's k largest logits in id order, when those k+1 largest are all different (so the k-th
        is strictly above the rest and no two of the top k tie); None otherwise, or when the candidates do not
        cover k+1 logits. The sampler prefilter (sampler.prefilter_k) is exact only then."""
        c = self._cand_logits
        if c is None or not 0 < k < self._floor_n or c.shape[0] <= k:
            return None
        at = c.shape[0] - k - 1
        top = np.argpartition(c, at)[at:]  # positions of the k+1 largest (ties at the edge: any of them)
        v = np.sort(c[top])
        if not np.all(v[1:] > v[:-1]):  # two equal among the k+1 largest (-inf ones included)
            return None
        return np.sort(self._cand_ids[top[c[top] > v[0]]]).astype(np.int32)


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


EXACT_SURVIVORS = 4096  # up to this many survivors the sampled logprob is summed in float64 throughout


def sampled_logprob(survivors: np.ndarray, sel: int) -> float:
    """log p of the chosen survivor under the softmax of the survivors' logits (after temperature): float64 for a
    truncated set; for a bigger one (an untruncated chain keeps all 262k) exp in float32 with float64 sums, as
    RowStats computes a row's log-sum-exp (0.6 ms instead of 0.8-2.7 ms on 262k survivors; |error| 3.6e-9 nats
    measured, tests/test_engine.py)."""
    logits = survivors["logit"]
    if len(logits) <= EXACT_SURVIVORS:
        logits = logits.astype(np.float64)
        return float(logits[sel] - logsumexp(logits))
    return float(logits[sel]) - lse32(logits)

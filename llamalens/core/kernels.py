"""The optional C kernels of llamalens/core/_kernels.c, through ctypes: a decode step's rows for block_stats (max, floor,
one pass for the sums and candidates, the top k), and dist_select's exp and block sums.

    LIB: the loaded library, or None: not built (setup.py builds it when a C compiler is there; the build is
         optional), a CPU without AVX2 and FMA, or LLAMALENS_NO_KERNELS=1 (then stats.py's numpy passes run, to
         within float rounding the same numbers: tests check both against float64).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_P = ctypes.c_void_p


# llama.cpp's llama_token_data: {int32 id; float logit; float p} (the C side's ll_token_data)
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)
EXACT_SURVIVORS = 4096  # ll_survivor_lp's most survivors (LL_EXACT), stats.sampled_logprob's float64 bound


class PickResult(ctypes.Structure):
    """ll_pick_ids' other results: how many survivors the chain left, the selected index among them, the pick's
    log-probability among them (float64), the chosen token's raw logit and its rank in the row (0: not known)."""

    _fields_ = [("survivors", ctypes.c_int64), ("selected", ctypes.c_int64), ("lp", ctypes.c_double),
                ("logit", ctypes.c_double), ("rank", ctypes.c_int64)]


def _load() -> ctypes.CDLL | None:
    if os.environ.get("LLAMALENS_NO_KERNELS", "").strip() not in ("", "0"):
        return None
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_kernels{suffix}"
        if path.exists():
            try:
                lib = ctypes.CDLL(str(path))
            except OSError:
                return None
            lib.ll_available.restype = ctypes.c_int
            lib.ll_row_pass.argtypes = [_P, ctypes.c_int64, ctypes.c_float, ctypes.c_float, _P, _P, ctypes.c_int64, _P]
            lib.ll_row_pass.restype = ctypes.c_int64
            i64 = ctypes.c_int64
            lib.ll_block_stats.argtypes = [_P, _P]
            lib.ll_block_stats.restype = i64
            lib.ll_fill_ids.argtypes = [_P, _P, i64, _P]
            lib.ll_fill_ids.restype = None
            lib.ll_exp_f32.argtypes = [_P, ctypes.c_int64, _P]
            lib.ll_exp_f32.restype = None
            lib.ll_survivor_lp.argtypes = [_P, i64, i64]
            lib.ll_survivor_lp.restype = ctypes.c_double
            lib.ll_pick_ids.argtypes = [_P, _P, i64, _P, _P, _P, _P, ctypes.c_int, _P, i64, ctypes.POINTER(PickResult)]
            lib.ll_pick_ids.restype = i64
            return lib if lib.ll_available() else None
    return None


LIB = _load()
DIST_BLOCK = 2048  # dist.dist_select's blocks (a multiple of 16: the row pass makes their sums too)
EXP_ULPS = 2.0  # the most the kernel's exp differs from exp (1.26 ulp measured over every float32 in [-87.33, 0])


_work = threading.local()
_from_buffer, _addressof = ctypes.c_char.from_buffer, ctypes.addressof
_F32 = np.dtype(np.float32)


def work_buffer(name: str, n: int, dtype=np.float32) -> tuple[np.ndarray, int]:
    """A work array of n entries, this thread's, reused under its name while it is large enough, and its address
    (kept with it: numpy's `.ctypes.data` runs Python code of numpy's, 20 us in the cold cache after a decode)."""
    got = getattr(_work, name, None)
    if got is None or got[0].shape[0] < n or got[0].dtype != dtype:
        buf = np.empty(max(n, 1), dtype)
        got = (buf, buf.ctypes.data)
        setattr(_work, name, got)
    return got[0][:n], got[1]


def address(x: np.ndarray) -> int:
    """The address of a C-contiguous array's data: through the buffer protocol in C (0.4 us) when the array is
    writable, else numpy's `.ctypes.data` (2 us, and Python code of numpy's to bring into a cold cache)."""
    try:
        return _addressof(_from_buffer(x))
    except (TypeError, ValueError):
        return x.ctypes.data


def _check(x: np.ndarray, dtype, n: int | None = None) -> None:
    """What the C side reads: a C-contiguous vector of this dtype (at least n entries), shorter than 2^31."""
    if x.dtype != dtype or x.ndim != 1 or not x.flags.c_contiguous or x.shape[0] >= 2 ** 31 or (
            n is not None and x.shape[0] < n):
        raise ValueError(f"the kernel needs a C-contiguous {np.dtype(dtype).name} vector"
                         f"{f' of at least {n} entries' if n is not None else ''}, got {x.dtype} {x.shape}")


def row_pass(row: np.ndarray, m: float, floor: float, sums: np.ndarray, cand: np.ndarray,
             block_sums: np.ndarray | None = None) -> int:
    """For a C-contiguous float32 row whose maximum is m: sums[0] = sum exp(row - m), sums[1] = sum exp(row - m) *
    (row - m) (float64), cand[:count] = the indices where row >= floor; returns count. `sums`: 2 float64, `cand`:
    int32, at least the row's length; `block_sums` (float64, one per DIST_BLOCK entries): exp_block_sums' values,
    from the same pass."""
    _check(row, np.float32)
    _check(sums, np.float64, 2)
    _check(cand, np.int32, row.shape[0])
    bs = None
    if block_sums is not None:
        _check(block_sums, np.float64, -(-row.shape[0] // DIST_BLOCK))
        bs = block_sums.ctypes.data
    return int(LIB.ll_row_pass(row.ctypes.data, row.shape[0], m, floor, sums.ctypes.data, cand.ctypes.data,
                               DIST_BLOCK if bs else 0, bs))


@dataclass
class BlockPass:
    """What block_pass gives for each row r of a [rows, n] block: the max m[r] (NaN when the row holds one), the
    floor (the k-th largest of every stride-th logit; NaN where m is not finite), sums[r] = (sum e, sum e * (x - m)),
    the block sums (rows x ceil(n / DIST_BLOCK)), the candidates (x >= floor, increasing ids)
    cand[off[r]:off[r + 1]], the row's k largest candidates by (logit descending, id ascending): top_ids[r] (int32;
    top_ids64[r] the same as int64), top_logits[r], and in float64 the row's log-sum-exp lse[r] = m + log(sum e), its
    entropy max(log(sum e) - sum e * (x - m) / sum e, 0) and the top list's logprobs top_lp[r] = top_logits[r] -
    lse[r]; strict[r], how many of the top list's head strictly decrease. Rows whose m is not finite have lse NaN,
    strict 0 and nothing else filled in. `rows`: stats.block_stats' per-row views, kept with a reused pass."""

    m: np.ndarray
    floor: np.ndarray
    sums: np.ndarray
    block_sums: np.ndarray | None
    cand: np.ndarray
    off: np.ndarray
    top_ids: np.ndarray
    top_logits: np.ndarray
    lse: np.ndarray
    entropy: np.ndarray
    top_lp: np.ndarray
    strict: np.ndarray
    top_ids64: np.ndarray
    rows: dict = field(default_factory=dict)


# block_pass's outputs, packed in one buffer in this order (float64 and int64 first, so that every part stays
# aligned): (name, dtype, shape(rows, n, k))
_PARTS = (("sums", np.float64, lambda r, n, k: (r, 2)), ("block_sums", np.float64, lambda r, n, k: (r, -(-n // DIST_BLOCK))),
          ("lse", np.float64, lambda r, n, k: (r,)), ("entropy", np.float64, lambda r, n, k: (r,)),
          ("top_lp", np.float64, lambda r, n, k: (r, k)), ("off", np.int64, lambda r, n, k: (r + 1,)),
          ("strict", np.int64, lambda r, n, k: (r,)), ("top_ids64", np.int64, lambda r, n, k: (r, k)),
          ("m", np.float32, lambda r, n, k: (r,)), ("floor", np.float32, lambda r, n, k: (r,)),
          ("top_ids", np.int32, lambda r, n, k: (r, k)), ("top_logits", np.float32, lambda r, n, k: (r, k)))
# ll_block_stats' order of the addresses after the scratch (the candidates' go between bsums and cand_off)
_ARG_ORDER = ("m", "floor", "sums", "block_sums", "cand", "off", "top_ids", "top_logits", "lse", "entropy", "top_lp",
              "strict", "top_ids64")


def _layout(rows: int, n: int, k: int) -> tuple[int, list[tuple[str, type, tuple, int]]]:
    """_PARTS for a shape: (the buffer's size in bytes, [(name, dtype, shape, byte offset)])."""
    out, at = [], 0
    for name, dt, shape in _PARTS:
        sh = shape(rows, n, k)
        out.append((name, dt, sh, at))
        at += math.prod(sh) * np.dtype(dt).itemsize
    return at, out


_LAYOUTS: dict[tuple[int, int, int], tuple[int, list]] = {}  # made once per shape: a fresh pass per scored token


def _new_pass(rows: int, n: int, stride: int, k: int, own: bool) -> tuple[BlockPass, np.ndarray, np.ndarray, tuple]:
    """A BlockPass over one fresh buffer, its ll_block_stats argument array, the candidates' array, and what the
    arguments point into (to keep alive with them). `own`: the candidates and the subsample in arrays of their
    own (a kept pass), else in this thread's work arrays (used at once)."""
    size, parts = _LAYOUTS.get((rows, n, k)) or _LAYOUTS.setdefault((rows, n, k), _layout(rows, n, k))
    buf = np.empty(size, np.uint8)
    base = address(buf)
    views = {name: np.ndarray(shape, dt, buf, at) for name, dt, shape, at in parts}
    addr = {name: base + at for name, _, _, at in parts}
    ns = -(-n // stride)
    if own:
        cand, sub = np.empty(max(rows * n, 1), np.int32), np.empty(ns, np.float32)
        addr["cand"], sub_at = address(cand), address(sub)
    else:
        (cand, addr["cand"]), (sub, sub_at) = work_buffer("block_cand", rows * n, np.int32), work_buffer("subsample", ns)
    args = np.array([rows, n, stride, k, DIST_BLOCK, sub_at] + [addr[name] for name in _ARG_ORDER], np.int64)
    return BlockPass(cand=cand, **views), args, cand, (buf, sub)


def block_pass(block: np.ndarray, stride: int, k: int, reuse: bool = False) -> BlockPass:
    """ll_block_stats on a C-contiguous float32 [rows, n] block (1 <= k <= ceil(n / stride)).

    By default every result is a fresh array (the candidates copied out of this thread's work array), so it
    outlives the next call. With `reuse` the results are this thread's kept arrays for (rows, n, stride, k), the
    same BlockPass object each time, overwritten by the next reusing call of that shape on this thread: the
    engine's per-step statistics, which live for one step. Their buffer, views and argument array are made once,
    and the C call takes one argument array: a step's Python around the C call took 80-90 us of its 140 at a
    32k vocabulary (one row, in the cold cache just after a decode), and ctypes converted 19 arguments."""
    if (block.dtype is not _F32 and block.dtype != _F32) or block.ndim != 2 or not block.flags.c_contiguous or (
            block.shape[1] >= 2 ** 31):
        raise ValueError(f"block_pass needs a C-contiguous float32 [rows, n] block, got {block.dtype} {block.shape}")
    rows, n = block.shape
    ns = -(-n // stride)
    if not 1 <= k <= ns:
        raise ValueError(f"block_pass: k {k} must be in 1..{ns} (the subsample's size)")
    if not reuse:
        bp, args, cand, _keep = _new_pass(rows, n, stride, k, own=False)
        bp.cand = cand[:LIB.ll_block_stats(address(block), address(args))].copy()
        return bp
    kept = getattr(_work, "passes", None)
    if kept is None:
        kept = _work.passes = {}
    got = kept.get((rows, n, stride, k))
    if got is None:
        if len(kept) >= 64:  # a sweep's shapes: rows 1..parallel, one k
            kept.clear()
        bp, args, cand, keep = _new_pass(rows, n, stride, k, own=True)
        got = kept[rows, n, stride, k] = (bp, cand, address(args), (args, keep))
    bp, cand, args_at, _keep = got
    bp.cand = cand[:LIB.ll_block_stats(address(block), args_at)]
    return bp


def fill_ids(row: np.ndarray, ids: np.ndarray, out_at: int) -> None:
    """ll_fill_ids: llama_token_data (id, row[id], 0) of the int32 ids (any order) at out_at, sorted by id; the
    caller's buffer holds at least len(ids) entries and row every id."""
    LIB.ll_fill_ids(address(row), address(ids), ids.shape[0], out_at)


def survivor_lp_takes(survivors: np.ndarray, sel: int) -> bool:
    """Whether survivor_lp takes these: a C-contiguous TOKEN_DATA vector of 1..EXACT_SURVIVORS entries and an
    index into it."""
    return survivors.dtype == TOKEN_DATA and survivors.ndim == 1 and survivors.flags.c_contiguous and (
        0 < survivors.shape[0] <= EXACT_SURVIVORS) and 0 <= sel < survivors.shape[0]


def survivor_lp(survivors: np.ndarray, sel: int) -> float:
    """ll_survivor_lp: log p of survivors[sel] under the softmax of the survivors' logits, float64 (what
    survivor_lp_takes accepts)."""
    if not survivor_lp_takes(survivors, sel):
        raise ValueError(f"survivor_lp needs a C-contiguous llama_token_data vector of 1..{EXACT_SURVIVORS} entries "
                         f"and an index into it, got {survivors.dtype} {survivors.shape} and {sel}")
    return LIB.ll_survivor_lp(survivors.ctypes.data, survivors.shape[0], sel)


_APPLY: list[int] = []  # llama_sampler_apply's address, taken once


def pick_ids(lib, row: np.ndarray, ids: np.ndarray, buf_at: int, chain_at: int, dist_at: int | None, want_lp: bool,
             ranks: tuple[int, int] | None, out: PickResult) -> int:
    """ll_pick_ids: the prefiltered pick in one call (fill the ids' llama_token_data at buf_at, apply the chain at
    chain_at and then the dist at dist_at, take the pick's log-probability when want_lp, rank the chosen token in
    the row's top list `ranks` = (address of its float32 logits, descending; how many)) through llama-cpp-python's
    library `lib`; the chosen token, or -1 when the survivors are out of ll_pick_ids' range (out says how many).
    row: C-contiguous float32 holding every id; ids: C-contiguous int32; the buffer holds at least len(ids)."""
    if not _APPLY:
        _APPLY.append(ctypes.cast(lib.llama_sampler_apply, ctypes.c_void_p).value)
    tv_at, ntv = ranks if ranks is not None else (None, 0)
    return LIB.ll_pick_ids(address(row), address(ids), ids.shape[0], buf_at, _APPLY[0], chain_at, dist_at, want_lp,
                           tv_at, ntv, out)


def exp_f32(d: np.ndarray) -> np.ndarray:
    """The kernel's float32 exp of a float32 array of differences d <= 0 (its domain: above 88 it overflows
    without a clamp; below -87.33 it gives 0). Its accuracy is tested against float64."""
    d = np.ascontiguousarray(d, dtype=np.float32)
    out = np.empty_like(d)
    LIB.ll_exp_f32(d.ctypes.data, d.size, out.ctypes.data)
    return out


def exp_block_sums(x: np.ndarray, m: float, block: int) -> np.ndarray:
    """float64 sums of exp(x - m) (the difference in float32, the kernel's exp) over blocks of `block` entries of a
    C-contiguous float32 vector whose maximum m is finite, the last block shorter: the row pass with a floor of
    +inf, which no entry reaches (so its candidate buffer needs no room)."""
    _check(x, np.float32)
    if not math.isfinite(m):
        raise ValueError(f"exp_block_sums needs the row's finite maximum, got {m}")
    out, sums, none = np.empty(-(-x.shape[0] // block)), np.empty(2), np.empty(1, np.int32)
    LIB.ll_row_pass(x.ctypes.data, x.shape[0], m, math.inf, sums.ctypes.data, none.ctypes.data, block, out.ctypes.data)
    return out

"""The optional C kernels of llamalens/_kernels.c, through ctypes: a decode step's rows for block_stats (max, floor,
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_P = ctypes.c_void_p


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
            lib.ll_block_stats.argtypes = [_P, i64, i64, i64, i64, i64] + [_P] * 13
            lib.ll_block_stats.restype = i64
            lib.ll_fill_ids.argtypes = [_P, _P, i64, _P]
            lib.ll_fill_ids.restype = None
            lib.ll_exp_f32.argtypes = [_P, ctypes.c_int64, _P]
            lib.ll_exp_f32.restype = None
            return lib if lib.ll_available() else None
    return None


LIB = _load()
DIST_BLOCK = 2048  # sampler.dist_select's blocks (a multiple of 16: the row pass makes their sums too)
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
    cand[off[r]:off[r + 1]], the row's k largest candidates by (logit descending, id ascending): top_ids[r],
    top_logits[r], and in float64 the row's log-sum-exp lse[r] = m + log(sum e), its entropy
    max(log(sum e) - sum e * (x - m) / sum e, 0) and the top list's logprobs top_lp[r] = top_logits[r] - lse[r];
    strict[r], how many of the top list's head strictly decrease. Rows whose m is not finite have lse NaN, strict 0
    and nothing else filled in."""

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


def _layout(rows: int, n: int, k: int) -> tuple[int, list[tuple[int, type, tuple]]]:
    """block_pass's outputs packed in one buffer: (its size in bytes, [(offset, dtype, shape)] in BlockPass's
    order less the candidates), float64 first so that every part stays aligned."""
    f32, f64, i32, i64 = np.float32, np.float64, np.int32, np.int64
    parts = [("sums", f64, (rows, 2)), ("block_sums", f64, (rows, -(-n // DIST_BLOCK))), ("lse", f64, (rows,)),
             ("entropy", f64, (rows,)), ("top_lp", f64, (rows, k)), ("off", i64, (rows + 1,)), ("strict", i64, (rows,)),
             ("m", f32, (rows,)),
             ("floor", f32, (rows,)), ("top_ids", i32, (rows, k)), ("top_logits", f32, (rows, k))]
    out, at = {}, 0
    for name, dt, shape in parts:
        out[name] = (at, dt, shape)
        at += int(np.prod(shape)) * np.dtype(dt).itemsize
    order = ("m", "floor", "sums", "block_sums", "off", "top_ids", "top_logits", "lse", "entropy", "top_lp", "strict")
    return at, [out[name] for name in order]


_LAYOUTS: dict[tuple[int, int, int], tuple[int, list]] = {}


def block_pass(block: np.ndarray, stride: int, k: int) -> BlockPass:
    """ll_block_stats on a C-contiguous float32 [rows, n] block (1 <= k <= ceil(n / stride)); every result is a
    fresh array (the candidates copied out of this thread's work array), so it outlives the next call. The results
    share one fresh buffer, and the work arrays' addresses are kept: a step's Python around the C call took 60 us
    of its 90 (32k vocabulary, one row; in the cold cache just after a decode, 100 of 150)."""
    if (block.dtype is not _F32 and block.dtype != _F32) or block.ndim != 2 or not block.flags.c_contiguous or (
            block.shape[1] >= 2 ** 31):
        raise ValueError(f"block_pass needs a C-contiguous float32 [rows, n] block, got {block.dtype} {block.shape}")
    rows, n = block.shape
    ns = -(-n // stride)
    if not 1 <= k <= ns:
        raise ValueError(f"block_pass: k {k} must be in 1..{ns} (the subsample's size)")
    size, parts = _LAYOUTS.get((rows, n, k)) or _LAYOUTS.setdefault((rows, n, k), _layout(rows, n, k))
    buf = np.empty(size, np.uint8)
    base = address(buf)
    m, floor, sums, bsums, off, tid, tv, lse, ent, top_lp, strict = (np.ndarray(shape, dt, buf, at)
                                                                     for at, dt, shape in parts)
    cand, cand_at = work_buffer("block_cand", rows * n, np.int32)
    a = [base + at for at, _, _ in parts]
    total = LIB.ll_block_stats(address(block), rows, n, stride, k, DIST_BLOCK, work_buffer("subsample", ns)[1],
                               a[0], a[1], a[2], a[3], cand_at, a[4], a[5], a[6], a[7], a[8], a[9], a[10])
    return BlockPass(m, floor, sums, bsums, cand[:total].copy(), off, tid, tv, lse, ent, top_lp, strict)


def fill_ids(row: np.ndarray, ids: np.ndarray, out_at: int) -> None:
    """ll_fill_ids: llama_token_data (id, row[id], 0) of the int32 ids (any order) at out_at, sorted by id; the
    caller's buffer holds at least len(ids) entries and row every id."""
    LIB.ll_fill_ids(address(row), address(ids), ids.shape[0], out_at)


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

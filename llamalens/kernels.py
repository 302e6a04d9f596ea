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
            lib.ll_block_stats.argtypes = [_P, i64, i64, i64, i64, i64] + [_P] * 9
            lib.ll_block_stats.restype = i64
            lib.ll_exp_f32.argtypes = [_P, ctypes.c_int64, _P]
            lib.ll_exp_f32.restype = None
            return lib if lib.ll_available() else None
    return None


LIB = _load()
DIST_BLOCK = 2048  # sampler.dist_select's blocks (a multiple of 16: the row pass makes their sums too)
EXP_ULPS = 2.0  # the most the kernel's exp differs from exp (1.26 ulp measured over every float32 in [-87.33, 0])


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
    cand[off[r]:off[r + 1]], and the row's k largest candidates by (logit descending, id ascending): top_ids[r],
    top_logits[r]. Rows whose m is not finite have nothing else filled in."""

    m: np.ndarray
    floor: np.ndarray
    sums: np.ndarray
    block_sums: np.ndarray
    cand: np.ndarray
    off: np.ndarray
    top_ids: np.ndarray
    top_logits: np.ndarray


def block_pass(block: np.ndarray, stride: int, k: int) -> BlockPass:
    """ll_block_stats on a C-contiguous float32 [rows, n] block (1 <= k <= ceil(n / stride)); every result is a
    fresh array (the candidates copied out of this thread's work array), so it outlives the next call."""
    if block.dtype != np.float32 or block.ndim != 2 or not block.flags.c_contiguous or block.shape[1] >= 2 ** 31:
        raise ValueError(f"block_pass needs a C-contiguous float32 [rows, n] block, got {block.dtype} {block.shape}")
    rows, n = block.shape
    ns = -(-n // stride)
    if not 1 <= k <= ns:
        raise ValueError(f"block_pass: k {k} must be in 1..{ns} (the subsample's size)")
    from .stats import work_array  # stats imports this module

    f32, f64, i32 = np.float32, np.float64, np.int32
    m, floor, sums = np.empty(rows, f32), np.empty(rows, f32), np.empty((rows, 2), f64)
    bsums, off = np.empty((rows, -(-n // DIST_BLOCK)), f64), np.empty(rows + 1, np.int64)
    tid, tv = np.empty((rows, k), i32), np.empty((rows, k), f32)
    cand = work_array("block_cand", rows * n, i32)
    total = LIB.ll_block_stats(block.ctypes.data, rows, n, stride, k, DIST_BLOCK, work_array("subsample", ns).ctypes.data,
                               m.ctypes.data, floor.ctypes.data, sums.ctypes.data, bsums.ctypes.data, cand.ctypes.data,
                               off.ctypes.data, tid.ctypes.data, tv.ctypes.data)
    return BlockPass(m, floor, sums, bsums, cand[:total].copy(), off, tid, tv)


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

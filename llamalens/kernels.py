"""The optional C kernels of llamalens/_kernels.c, through ctypes: one pass over a logits row for block_stats, and
dist_select's exp and block sums.

    LIB: the loaded library, or None: not built (setup.py builds it when a C compiler is there; the build is
         optional), a CPU without AVX2 and FMA, or LLAMALENS_NO_KERNELS=1 (then stats.py's numpy passes run, to
         within float rounding the same numbers: tests check both against float64).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import math
import os
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

"""dist's pick made in numpy, when it provably is the pick llama.cpp's dist sampler makes (Sampler.choose, the
engine's path): pure numerics over a row, no llama.cpp handle.

dist's pick over a large candidate set (an untruncated chain keeps all 262,144 tokens: llama.cpp's scalar
expf loop and running sum cost ~2.4 ms a token) is made in numpy when it is provably the same pick, by
`Sampler.choose`:
    the chain without its dist ──► survivors ──► dist_select(logits, Draws.next())
        certain ──► that index (dist's own RNG advanced by one draw on a 1-entry array, to stay in step)
        a draw too close to a boundary to tell ──► llama.cpp's dist on the survivors (Draws advanced)
Draws replays dist's random numbers (std::mt19937 seeded with the seed, one generate_canonical<double>
of two 32-bit outputs per pick, libstdc++). dist_select takes dist's float32 differences, a float32 exp (the C
kernel's, else numpy's) and float64 sums, and picks the first token whose running sum reaches sum * r, as dist
does; dist's expf and that exp each lie within a few ulp of the exact exp (EXPF_ULPS, kernels.EXP_ULPS or
NUMPY_EXP_ULPS), the sums on both sides within n*2^-53 of the total, and a pick is taken only when the draw is
farther than twice that from both edges of the chosen token's interval (else the native dist decides).
"""

from __future__ import annotations

import math

import numpy as np

from llamalens.core import kernels
from llamalens.core.stats import work_array

EXPF_ULPS = 1.0  # the most dist's expf may differ from exp: faithful rounding (glibc's and musl's expf: 0.502 ulp)
NUMPY_EXP_ULPS = 3.0  # numpy's float32 exp: 2.54 ulp at most over every float32 in [-104, 0] (measured, AVX-512 and AVX2)
_BLOCK = kernels.DIST_BLOCK  # dist_select's running sum: block sums, then one block's cumulative sum


class Draws:
    """dist's random numbers: std::mt19937(seed) (numpy's MT19937, the same generator, given the state that
    std::mt19937's init_genrand seeding makes) and per pick std::uniform_real_distribution<double>(0, 1), which in libstdc++ is
    generate_canonical<double, 53>: (g1 + g2 * 2^32) / 2^64 of two 32-bit outputs, below 1."""

    def __init__(self, seed: int):
        self.seed = int(seed) & 0xFFFFFFFF
        self._bits = None  # the generator's state is made at the first next(): a chain may never need it
        self._skipped = 0

    def skip(self) -> None:
        """A draw dist made itself: passed over here."""
        if self._bits is None:
            self._skipped += 1
        else:
            self._bits.random_raw(2)

    def next(self) -> float:
        if self._bits is None:
            self._start()
        g1, g2 = self._bits.random_raw(2)
        r = (float(g1) + float(g2) * 4294967296.0) / 18446744073709551616.0
        return r if r < 1.0 else math.nextafter(1.0, 0.0)

    def _start(self) -> None:
        key, x = np.empty(624, np.uint32), self.seed
        for i in range(624):  # init_genrand(seed), as std::mt19937's constructor seeds its state (0.4 ms)
            key[i] = x
            x = (1812433253 * (x ^ (x >> 30)) + i + 1) & 0xFFFFFFFF
        self._bits = np.random.MT19937()
        self._bits.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": 624}}  # 624: twist first
        if self._skipped:
            self._bits.random_raw(2 * self._skipped)


def dist_select(logits: np.ndarray, r: float, block_sums: np.ndarray | None = None) -> tuple[int | None, float]:
    """llama.cpp's dist pick over these logits (float32) for its draw r: the first index whose running sum of
    expf(logit - max) reaches sum * r. Returns (index, log-sum-exp of the logits); the index is None when the
    draw lies too close to the edge of a token's interval for the sums here to say which token dist's choose
    (then dist must run; measured 28-33 draws in 8,000 at temperature 1 on 262k tokens, 4-5% at 1.5).

    The same float32 differences d_i = logit_i - max as dist's, a float32 exp of them (y_i: the C kernel's,
    kernels.py, else numpy's), block sums and one block's running sum in float64. The bound: that exp and
    dist's expf each lie within a few ulp of exp(d_i) (kernels.EXP_ULPS or NUMPY_EXP_ULPS, and EXPF_ULPS), so
    |y_i - p_i| <= (both) * 2^-23 * y_i, plus 2^-126 near the subnormals; dist's sequential double sums and the
    float64 sums here each differ from the exact sums of their terms by under n * 2^-53 of the total. A pick is
    returned only with a margin of twice all that on both sides. The log-sum-exp is max + log(sum y): within
    2e-8 nats of float64 (as RowStats' lse is). `block_sums`: these logits' sums per kernels.DIST_BLOCK from the
    C row pass (RowStats.dist_block_sums, the same exp), when the caller has them: then only one block is exp'd."""
    logits = np.ascontiguousarray(logits, dtype=np.float32)  # dist's values, and its max among them
    n = logits.shape[0]
    mx = logits.max()
    if not math.isfinite(float(mx)):
        return None, math.nan
    lib = kernels.LIB
    if lib is not None and block_sums is not None:  # the row pass made them (kernels.py)
        sums, ulps = block_sums, kernels.EXP_ULPS
    elif lib is not None:  # the C kernel: exp and block sums in one pass
        sums, ulps = kernels.exp_block_sums(logits, float(mx), _BLOCK), kernels.EXP_ULPS
    else:
        y = work_array("dist", n)
        np.subtract(logits, mx, out=y)  # float32, as dist's `logit - max_l`
        np.exp(y, out=y)
        full = n - n % _BLOCK
        sums, ulps = y[:full].reshape(-1, _BLOCK).sum(axis=1, dtype=np.float64), NUMPY_EXP_ULPS
        if full < n:
            sums = np.append(sums, y[full:].sum(dtype=np.float64))
    cum = np.cumsum(sums)
    total = float(cum[-1])
    lse = float(mx) + math.log(total)
    target = total * r
    j = min(int(np.searchsorted(cum, target, "left")), len(cum) - 1)
    base = float(cum[j - 1]) if j else 0.0
    if lib is not None:  # that block's terms again, the same exp of the same float32 differences
        part = kernels.exp_f32(logits[j * _BLOCK:(j + 1) * _BLOCK] - mx)
    else:
        part = y[j * _BLOCK:(j + 1) * _BLOCK]
    run = np.cumsum(part, dtype=np.float64)
    run += base
    k = int(np.searchsorted(run, target, "left"))
    if k == run.shape[0]:
        return None, lse
    i = j * _BLOCK + k
    lo, hi = (float(run[k - 1]) if k else base), float(run[k])
    eps = 1.01 * (ulps + EXPF_ULPS) * 2.0 ** -23 * total + n * 2.0 ** -52 * total + n * 2.0 ** -126
    margin = 2 * eps + 2.0 ** -50 * total
    if hi - target <= margin or (i > 0 and target - lo <= margin):
        return None, lse
    return i, lse

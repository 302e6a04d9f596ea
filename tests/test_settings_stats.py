import math

import numpy as np
import pytest

from llamalens.errors import InvalidSettings
from llamalens.settings import SamplingSettings
from llamalens.core.stats import (RowStats, apply_temperature, block_stats, entropy, kl_divergence, log_softmax, lse32,
                             top_ids)
from reference import log_softmax as reference_log_softmax

import llamalens.core.kernels as kernels
from conftest import require


@pytest.mark.parametrize("change, word", [
    ({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top-p"), ({"top_p": 1.5}, "top-p"),
    ({"min_p": -0.01}, "min-p"), ({"min_p": 1.01}, "min-p"), ({"typical_p": 2.0}, "typical-p"),
    ({"top_k": -1}, "top-k"), ({"repeat_penalty": 0.0}, "repeat-penalty"), ({"seed": -1}, "seed"),
    ({"temperature": float("nan")}, "temperature"),
])
def test_each_bad_setting_is_named(change, word):
    with pytest.raises(InvalidSettings, match=word):
        SamplingSettings(**change).validate()


def test_all_problems_reported_at_once():
    problems = SamplingSettings(temperature=-1, top_p=2).problems()
    assert len(problems) == 2


def test_defaults_are_create_completion_defaults():
    s = SamplingSettings()
    assert (s.temperature, s.top_k, s.top_p, s.min_p, s.typical_p, s.repeat_penalty) == (0.8, 40, 0.95, 0.05, 1.0, 1.0)
    assert s.validate() is s


def test_row_stats_match_float64_log_softmax(row_kernel):
    rng = np.random.default_rng(0)
    for n in (7, 1000, 262144):
        row = (rng.standard_normal(n) * 4).astype(np.float32)
        chosen = int(rng.integers(n))
        st = RowStats.of(row, chosen, 10)
        ref = reference_log_softmax(row)
        assert abs(st.logprob - ref[chosen]) < 1e-7  # float32 exp pass; the spec asks 1e-5
        assert abs(st.entropy - float(-(np.exp(ref) * ref).sum())) < 1e-6
        assert abs(entropy(row) - float(-(np.exp(ref) * ref).sum())) < 1e-6
        assert st.rank == 1 + int(np.sum(ref > ref[chosen]))
        order = np.argsort(-ref, kind="stable")[: min(10, n)]
        assert list(st.top_ids) == list(order)
        assert np.allclose(st.top_logprobs, ref[order], atol=1e-7)


@pytest.mark.parametrize("n_rows, n_vocab", [(32, 32000), (4, 262144), (9, 300), (3, 13)])
def test_block_stats_against_float64(n_rows, n_vocab, row_kernel):
    """One decode step's rows at once, against numpy's float64 log-softmax of the raw logits. Errors measured
    on these blocks (float32 exp, float64 sums; the C pass and numpy's alike): log-sum-exp, logprob and top
    logprobs <= 3.2e-8 nats, entropy <= 8.0e-8; the tolerances are 10x that (3e-7, 8e-7)."""
    rng = np.random.default_rng(n_vocab)
    block = (rng.standard_normal((n_rows, n_vocab)) * rng.uniform(1, 8, (n_rows, 1))).astype(np.float32)
    block[1] = np.round(block[1])  # coarse logits: many ties at the top-N cut
    block[2, rng.integers(n_vocab, size=n_vocab // 3)] = -np.inf  # banned tokens
    block[3 % n_rows, :] = -np.inf
    block[3 % n_rows, 7] = 1.5  # a single allowed token
    stats = block_stats(block, 10)
    assert len(stats) == n_rows
    for i, st in enumerate(stats):
        row = block[i]
        ref = reference_log_softmax(row.astype(np.float64))
        finite = np.isfinite(ref)
        h = float(-(np.exp(ref[finite]) * ref[finite]).sum())
        assert abs(st.entropy - h) < 8e-7
        x = row[np.isfinite(row)].astype(np.float64)
        lse_ref = x.max() + np.log(np.exp(x - x.max()).sum())
        assert abs(lse32(row) - lse_ref) < 3e-7 and abs(st.lse - lse_ref) < 3e-7
        order = np.lexsort((np.arange(n_vocab), -row.astype(np.float64)))[:10]
        assert list(st.top_ids) == list(order)
        assert np.allclose(st.top_logprobs, ref[order], atol=3e-7, rtol=0)
        # chosen tokens among the candidates (ranked from them) and far below them (a pass over the row)
        for chosen in (int(order[0]), int(order[-1]), int(np.argmin(np.where(finite, row, np.inf))),
                       int(rng.integers(n_vocab))):
            if not finite[chosen]:
                continue
            got = st.for_token(row, chosen)
            assert got.rank == 1 + int(np.sum(row > row[chosen]))
            assert abs(got.logprob - ref[chosen]) < 3e-7
            same = RowStats.of(row, chosen, 10)
            assert (same.rank, same.logprob, same.entropy, list(same.top_ids)) == (
                got.rank, got.logprob, got.entropy, list(got.top_ids))


def test_rank_from_top_list_candidates_and_row(row_kernel):
    """for_token ranks a chosen token three ways: from the sorted top list (at or above its last logit), from the
    candidates (at or above the floor), or over the whole row; each against a count over the row, with ties."""
    rng = np.random.default_rng(11)
    row = np.round(rng.standard_normal(40000) * 6, 1).astype(np.float32)  # coarse: ties everywhere
    st = block_stats(row, 5, 41)[0]
    top_last, floor = float(st._top_logits[-1]), st._floor
    assert floor < top_last and st._cand_ids.shape[0] > 41
    below_top = [int(i) for i in st._cand_ids if row[i] < top_last][:20]
    below_floor = [int(i) for i in np.flatnonzero(row < floor)[:20]]
    in_top = [int(i) for i in st._top_ids] + [int(i) for i in np.flatnonzero(row == top_last)]
    assert below_top and below_floor
    for chosen in in_top + below_top + below_floor:
        assert st.for_token(row, chosen).rank == 1 + int(np.sum(row > row[chosen])), chosen


def test_top_ids_breaks_ties_by_id():
    row = np.array([1.0, 3.0, 3.0, 0.0, 3.0], dtype=np.float32)
    assert list(top_ids(row, 3)) == [1, 2, 4]
    # ties across the cut: the smallest ids win, as a full stable sort would pick them
    row = np.array([4.0, 9.0, 4.0, 4.0, 1.0, 4.0, 4.0], dtype=np.float32)
    assert list(top_ids(row, 3)) == [1, 0, 2]
    rng = np.random.default_rng(1)
    for _ in range(50):  # coarse values: many ties, like logits of heavily quantized weights
        row = rng.integers(-4, 5, size=int(rng.integers(1, 400))).astype(np.float32)
        n = int(rng.integers(1, 30))
        assert list(top_ids(row, n)) == list(np.lexsort((np.arange(len(row)), -row))[:n])


def test_row_stats_results_survive_later_calls():
    """RowStats.of works in reused scratch arrays: what it returned must not change with the next call."""
    rng = np.random.default_rng(2)
    a, b = (rng.standard_normal(5000) * 3).astype(np.float32), (rng.standard_normal(5000) * 3).astype(np.float32)
    sa = RowStats.of(a, 3, 8)
    ids, lps = sa.top_ids.copy(), sa.top_logprobs.copy()
    RowStats.of(b, 4, 8)
    assert np.array_equal(sa.top_ids, ids) and np.array_equal(sa.top_logprobs, lps)
    assert RowStats.of(a, 3, 8).rank == sa.rank == sa.for_token(a, 3).rank


def test_temperature_and_kl():
    logits = np.array([2.0, 1.0, 0.0])
    assert np.allclose(apply_temperature(logits, 1.0), np.exp(log_softmax(logits)))
    assert list(apply_temperature(logits, 0)) == [1.0, 0.0, 0.0]
    hot = apply_temperature(logits, 100.0)
    assert hot.max() - hot.min() < 0.01
    assert kl_divergence(logits, logits) == pytest.approx(0.0, abs=1e-12)
    p, q = np.exp(log_softmax(logits)), np.exp(log_softmax(logits[::-1]))
    assert kl_divergence(logits, logits[::-1]) == pytest.approx(float(np.sum(p * np.log(p / q))))
    assert math.isclose(entropy(np.zeros(4)), math.log(4))


def test_top_k_ids_only_without_ties():
    """RowStats.top_k_ids: the k largest in id order when the k+1 largest are all different, else None (a tie
    inside the top k, across its edge, among -inf logits, or candidates that do not cover k+1)."""
    rng = np.random.default_rng(5)
    row = (rng.standard_normal(262144) * 3).astype(np.float32)
    order = np.argsort(-row, kind="stable")
    for k in (1, 40, 300):
        ids = block_stats(row, 5, k + 1)[0].top_k_ids(k)
        assert ids.dtype == np.int32 and np.array_equal(ids, np.sort(order[:k]))
    assert block_stats(row, 5)[0].top_k_ids(40) is None  # the floor covers only the top 5
    for a, b in ((10, 20), (39, 40), (0, 1)):  # ties: inside, at the edge (40th = 41st), at the top
        tied = row.copy()
        tied[order[b]] = tied[order[a]]
        assert block_stats(tied, 5, 41)[0].top_k_ids(40) is None
    tied = row.copy()
    tied[order[41]] = tied[order[40]]  # below the 41st: no effect
    assert np.array_equal(block_stats(tied, 5, 41)[0].top_k_ids(40), np.sort(order[:40]))
    small = np.full(50, -np.inf, np.float32)
    small[:3] = [1.0, 2.0, 3.0]  # banned tokens: the 4th and 5th largest are -inf, a tie
    assert block_stats(small, 5, 5)[0].top_k_ids(4) is None
    assert np.array_equal(block_stats(small, 5, 4)[0].top_k_ids(3), [0, 1, 2])
    assert np.array_equal(block_stats(small, 5, 3)[0].top_k_ids(2), [1, 2])


def test_kernel_exp_within_two_ulp():
    """The C pass's exp against float64's over 4M float32 values spread over [-87.34, 0] (every float32 there,
    measured once: 1.26 ulp at most) and every one in [-1, 0] of a coarser grid; the bound asked: 2 ulp."""
    require(kernels.LIB, "llamalens' C kernel (llamalens/core/_kernels.c)", "pip install -e . builds it")
    rng = np.random.default_rng(3)
    d = np.concatenate([rng.uniform(-87.33, 0, 3_000_000), -np.arange(1_000_000) / 1e6, [0.0, -1e-30, -87.336]])
    d = d.astype(np.float32)
    got = kernels.exp_f32(d).astype(np.float64)
    ref = np.exp(d.astype(np.float64))
    ulp = np.spacing(np.maximum(ref.astype(np.float32), np.float32(2.0 ** -126))).astype(np.float64)
    assert float(np.max(np.abs(got - ref) / ulp)) <= 2.0
    assert kernels.exp_f32(np.array([-np.inf, -88.0, -100.0], np.float32)).tolist() == [0.0, 0.0, 0.0]


def test_c_pass_and_numpy_agree():
    """The same block through both paths: the same candidates, top N and ranks; sums within float rounding (the
    two differ by the exp's ulp and the order of float64 additions: measured <= 2.2e-8 nats (lse), 6.4e-8 (entropy);
    tolerance 6e-7)."""
    require(kernels.LIB, "llamalens' C kernel (llamalens/core/_kernels.c)", "pip install -e . builds it")
    rng = np.random.default_rng(8)
    block = (rng.standard_normal((16, 50000)) * 5).astype(np.float32)
    block[2, ::3] = -np.inf
    block[5] = np.round(block[5])
    c_pass = block_stats(block, 8, 41)
    lib, kernels.LIB = kernels.LIB, None
    try:
        plain = block_stats(block, 8, 41)
    finally:
        kernels.LIB = lib
    for a, b in zip(c_pass, plain):
        assert np.array_equal(a._cand_ids, b._cand_ids) and np.array_equal(a.top_ids, b.top_ids)
        assert np.array_equal(a._top_ids, b._top_ids) and np.array_equal(a._top_logits, b._top_logits)
        assert a._floor == b._floor
        assert abs(a.lse - b.lse) < 6e-7 and abs(a.entropy - b.entropy) < 6e-7
        assert np.array_equal(a.top_k_ids(40), b.top_k_ids(40)) and a._strict == b._strict
        assert np.array_equal(a.top_k_list(40), b.top_k_list(40))


def test_fill_ids_sorts_and_fills_like_numpy():
    """Candidates.fill_ids: the C fill (ll_fill_ids) and numpy's give the same llama_token_data, in id order, from ids
    in any order (the prefilter hands it the top list by logit), over a buffer that held other entries before."""
    require(kernels.LIB, "llamalens' C kernel (llamalens/core/_kernels.c)", "pip install -e . builds it")
    from llamalens.core.sampler import Candidates

    rng = np.random.default_rng(11)
    row = (rng.standard_normal(32000) * 4).astype(np.float32)
    for ids in (rng.permutation(32000)[:41].astype(np.int32), np.array([7], np.int32), np.arange(1024)[::-1].copy()):
        c_buf, np_buf = Candidates(32000), Candidates(32000)
        c_buf.fill(row[::-1].copy())
        got = c_buf.fill_ids(row, ids).copy()
        lib, kernels.LIB = kernels.LIB, None
        try:
            plain = np_buf.fill_ids(row, ids).copy()
        finally:
            kernels.LIB = lib
        assert got.tobytes() == plain.tobytes()
        assert got["id"].tolist() == sorted(ids.tolist()) and got["logit"].tolist() == row[np.sort(ids)].tolist()
        assert not got["p"].any()


def test_kernel_paths_agree():
    """The C pass with AVX-512 (where the CPU has it) and with AVX2 alone (LLAMALENS_KERNELS_AVX2=1, in a fresh
    process): the same exp values, so the same candidates; sums in another order of float64 additions (measured
    1e-15 apart relative; tolerance 1e-12)."""
    require(kernels.LIB, "llamalens' C kernel (llamalens/core/_kernels.c)", "pip install -e . builds it")
    import json
    import os
    import subprocess
    import sys

    code = ("import json, numpy as np, sys; from llamalens.core import kernels; "
            "x = (np.random.default_rng(4).standard_normal(100003) * 4).astype(np.float32); x[::11] = -np.inf; "
            "s = np.empty(2); c = np.empty(x.size, np.int32); n = kernels.row_pass(x, float(x.max()), 7.0, s, c); "
            "sys.stdout.write(json.dumps([kernels.LIB.ll_available(), s.tolist(), c[:n].tolist()]))")
    runs = []
    for avx2 in ("0", "1"):
        env = dict(os.environ, LLAMALENS_KERNELS_AVX2=avx2)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
        runs.append(json.loads(out))
    (level_a, sums_a, cand_a), (level_b, sums_b, cand_b) = runs
    assert level_b == 1 and level_a >= 1
    assert cand_a == cand_b and len(cand_a) > 0
    assert np.allclose(sums_a, sums_b, rtol=1e-12, atol=0)


def test_kernel_wrappers_refuse_what_the_c_side_cannot_read():
    """The ctypes wrappers check dtype, layout and room before the C side reads or writes (a float64 row read as
    float32, or a short candidate buffer, would be wrong numbers or a heap overflow)."""
    require(kernels.LIB, "llamalens' C kernel (llamalens/core/_kernels.c)", "pip install -e . builds it")
    row, sums = np.zeros(16, np.float32), np.empty(2)
    for bad in (lambda: kernels.row_pass(row.astype(np.float64), 0.0, 0.0, sums, np.empty(16, np.int32)),
                lambda: kernels.row_pass(row, 0.0, 0.0, sums, np.empty(8, np.int32)),
                lambda: kernels.row_pass(np.zeros(32, np.float32)[::2], 0.0, 0.0, sums, np.empty(16, np.int32)),
                lambda: kernels.exp_block_sums(np.ones(8), 1.0, 8)):
        with pytest.raises(ValueError, match="C-contiguous"):
            bad()
    assert kernels.row_pass(row, 0.0, 0.0, sums, np.empty(16, np.int32)) == 16 and sums.tolist() == [16.0, 0.0]


def test_block_stats_of_read_only_strided_and_float64_blocks():
    """The C pass takes a block's address through the buffer protocol, which refuses read-only arrays
    (kernels.address then asks numpy); a Fortran-ordered or float64 block is copied to C float32 first. Every
    one gives the numbers of the plain block."""
    require(kernels.LIB, "llamalens' C kernel (llamalens/core/_kernels.c)", "pip install -e . builds it")
    block = (np.random.default_rng(12).standard_normal((3, 20000)) * 3).astype(np.float32)
    read_only = block.copy()
    read_only.setflags(write=False)
    assert kernels.address(read_only) == read_only.ctypes.data and kernels.address(block) == block.ctypes.data
    ref = block_stats(block, 5, 41)
    for other in (read_only, np.asfortranarray(block), block.astype(np.float64)):
        for a, b in zip(ref, block_stats(other, 5, 41)):
            assert (a.lse, a.entropy, a._strict) == (b.lse, b.entropy, b._strict)
            assert a.top_ids.tolist() == b.top_ids.tolist() and a.top_logprobs.tolist() == b.top_logprobs.tolist()


def test_survivor_lp_is_libm_exp_in_numpys_summation_order():
    """ll_survivor_lp (a pick's log-probability among the chain's survivors, stats.sampled_logprob's C path): float64
    with libm's exp, summed in numpy's pairwise order, so it equals, bit for bit, the same steps in Python (math.exp,
    np.sum) at every length up to its bound, the 8-sum and halving cut-offs included. numpy's own float64 exp is its
    AVX-512 loop on such a CPU, off by an ulp for some inputs: measured 1.8e-15 nats at most from that path; the
    tolerance is 10x."""
    require(kernels.LIB, "llamalens' C kernel (llamalens/core/_kernels.c)", "pip install -e . builds it")
    from llamalens.core.stats import sampled_logprob

    rng = np.random.default_rng(5)
    for n in [*range(1, 140), 255, 256, 257, 1000, 1024, 4095, kernels.EXACT_SURVIVORS]:
        surv = np.zeros(n, kernels.TOKEN_DATA)
        surv["id"] = rng.permutation(n)
        surv["logit"] = rng.normal(0, 4, n).astype(np.float32)
        sel = int(rng.integers(n))
        x = surv["logit"].astype(np.float64)
        m = float(x.max())
        same_steps = float(x[sel] - (m + math.log(float(np.sum(np.array([math.exp(v - m) for v in x]))))))
        got = kernels.survivor_lp(surv, sel)
        assert got == same_steps and sampled_logprob(surv, sel) == got
        assert abs(got - float(x[sel] - (m + math.log(float(np.exp(x - m).sum()))))) < 2e-14
    with pytest.raises(ValueError, match="llama_token_data"):
        kernels.survivor_lp(np.zeros(kernels.EXACT_SURVIVORS + 1, kernels.TOKEN_DATA), 0)


def test_reused_block_pass_keeps_its_arrays_and_gives_the_fresh_numbers():
    """block_stats(reuse=True), the engine's per-step statistics: the same numbers as a fresh pass, in this thread's
    kept arrays for the shape (the same BlockPass object again, overwritten by the next call of that shape, left
    alone by a call of another shape); top_lists and ranks read its ctypes views, which hold what the arrays
    hold."""
    require(kernels.LIB, "llamalens' C kernel (llamalens/core/_kernels.c)", "pip install -e . builds it")
    rng = np.random.default_rng(21)
    a, b = ((rng.standard_normal((2, 32000)) * 4).astype(np.float32) for _ in range(2))
    other = (rng.standard_normal((1, 32000)) * 4).astype(np.float32)

    def numbers(stats):
        return [(s.lse, s.entropy, s._floor, s._strict, s.top_ids.tolist(), s.top_logprobs.tolist(),
                 s._top_ids.tolist(), s._top_logits.tolist(), s._cand_ids.tolist(), s._block_sums.tolist())
                for s in stats]

    fresh_a, fresh_b = numbers(block_stats(a, 5, 41)), numbers(block_stats(b, 5, 41))
    kept_a = block_stats(a, 5, 41, reuse=True)
    assert numbers(kept_a) == fresh_a
    first = kernels.block_pass(a, 1, 41, reuse=True)
    assert kernels.block_pass(a, 1, 41, reuse=True) is first  # kept per shape
    kept_a = block_stats(a, 5, 41, reuse=True)
    block_stats(other, 5, 41, reuse=True)  # another shape: its own arrays
    assert numbers(kept_a) == fresh_a
    kept_b = block_stats(b, 5, 41, reuse=True)
    assert numbers(kept_b) == fresh_b  # and kept_a's arrays now hold b's: valid for one step only
    assert [s.top_logprobs.tolist() for s in kept_a] == [f[5] for f in fresh_b] != [f[5] for f in fresh_a]
    for s in kept_b:
        ids, lps = s.top_lists(5)
        assert ids == s.top_ids.tolist() and lps == s.top_logprobs.tolist()
        assert s.top_lists(99) == (ids, lps)  # at most the top n it holds
        assert s.ranks == (s._top_logits.ctypes.data, 41)
    plain = block_stats(b, 5, 41)[0]
    assert plain.ranks is None and plain.top_lists(3) == (fresh_b[0][4][:3], fresh_b[0][5][:3])

"""dist's pick made in numpy (dist.Draws, dist.dist_select, Sampler.choose) against llama.cpp's own dist:
the same random numbers, the same picks, and the same records through the engine."""

import numpy as np
import pytest

import llamalens.core.sampler as sampler_mod
from llamalens.core.engine import Engine, Request
from llamalens.core.sampler import Candidates, Draws, Sampler, dist_select
from llamalens.settings import SamplingSettings
from reference import log_softmax

UNTRUNCATED = dict(top_k=0, top_p=1.0, min_p=0.0)


@pytest.mark.parametrize("seed", [0, 1, 42, 2**32 - 2])
def test_draws_replay_dist(seed):
    """With n equal logits every p is exactly 1 and the sums are exact, so llama.cpp's dist picks
    ceil(n * r) - 1 for its draw r: its picks, read back, must be Draws' numbers."""
    n = 1024
    native = Sampler(SamplingSettings(seed=seed, temperature=1.0, **UNTRUNCATED), n)
    draws = Draws(seed)
    row = np.zeros(n, dtype=np.float32)
    for _ in range(300):
        _, sel = native.apply(row)
        assert sel == int(np.ceil(n * draws.next())) - 1


def _rows(rng):
    """Random rows of a 262k and a 5k vocabulary at several spreads, one with -inf logits (as a logit bias leaves)."""
    rows = [rng.standard_normal(262144).astype(np.float32) * s for s in (1.0, 3.0, 6.0)]
    rows.append((rng.standard_normal(5000) * 4).astype(np.float32))
    banned = rows[1].copy()
    banned[rng.choice(banned.shape[0], 5000, replace=False)] = -np.inf
    return rows + [banned]


def _check_against_dist(row, seed, n_draws=200) -> int:
    """dist_select against llama.cpp's dist on one row, draw by draw: every pick it is sure of must be dist's,
    with a log-sum-exp within 4e-8 nats of float64's (numpy's float32 exp: measured 3.5e-9 at most). How many it
    was sure of."""
    settings = SamplingSettings(seed=seed, temperature=1.0, **UNTRUNCATED)
    native, draws = Sampler(settings, row.shape[0]), Draws(seed)
    finite = row[np.isfinite(row)].astype(np.float64)
    lse = finite.max() + np.log(np.exp(finite - finite.max()).sum())
    sure = 0
    for _ in range(n_draws):
        i, got_lse = dist_select(row, draws.next())
        survivors, sel = native.apply(row)
        assert int(survivors["id"][sel]) == sel  # the untruncated chain keeps the id order
        assert abs(got_lse - lse) < 4e-8  # sure or not
        if i is not None:
            sure += 1
            assert i == sel
    return sure


def test_dist_select_picks_what_dist_picks(row_kernel):
    """Random rows, from flat (N(0, 1) over 262k tokens: each token's interval is ~4e-6 of the mass, and dist_select
    is unsure of ~30% of draws, measured) to peaked; one with -inf logits."""
    rng = np.random.default_rng(5)
    for j, row in enumerate(_rows(rng)):
        sure = _check_against_dist(row, 100 + j)
        assert sure >= 100, f"row {j}: dist_select was sure of only {sure} of 200 draws"


def test_dist_select_is_sure_on_model_rows(gemma, row_kernel):
    """On the default model's rows at temperature 1 dist_select decides nearly every draw itself (unsure of
    1-15 of 2,000 measured on four prompts; the test asks for >= 97%), and always as dist does."""
    for i, prompt in enumerate(["The history of the printing press begins", "Q: Is 17 a prime number? A:"]):
        with gemma.context(n_ctx=64) as ctx:
            row = ctx.prefill(gemma.prompt_tokens(prompt)).copy()
        assert _check_against_dist(row, 7 + i, 300) >= 291


def _engine_records(model, settings_list, prompt, n=12):
    reqs = [Request(prompt, s, max_tokens=n, n_logprobs=3, key=i) for i, s in enumerate(settings_list)]
    return {s.key: s for s in Engine(model, len(reqs)).run(reqs)}


@pytest.mark.parametrize("chain", [
    dict(temperature=1.0, **UNTRUNCATED),  # a temperature-only chain: no llama_token_data array at all
    dict(temperature=1.5, **UNTRUNCATED),
    dict(temperature=0.9, repeat_penalty=1.2, **UNTRUNCATED),  # penalties first: the array, then dist_select
    dict(temperature=1.0, chain="llama.cpp", **UNTRUNCATED),  # llama-server's chain (logit bias, DRY, XTC...)
], ids=["t1", "t1.5", "penalties", "llama.cpp"])
def test_engine_records_equal_with_native_dist(gemma, monkeypatch, chain):
    """A batched sweep's records are the same with dist_select as with llama.cpp's dist for every pick (the
    sampled logprob: numpy's float32 exp with float64 sums on both sides, measured 3.6e-9 apart at most before
    dist_select took dist's float32 differences; tolerance 4e-8)."""
    settings = [SamplingSettings(seed=seed, **chain) for seed in range(4)]
    prompt = "The history of the printing press begins"
    ours = _engine_records(gemma, settings, prompt)
    monkeypatch.setattr(sampler_mod, "REPLICA_MIN", 10**9)  # every pick by llama.cpp's dist
    native = _engine_records(gemma, settings, prompt)
    for key, s in ours.items():
        ref = native[key]
        assert [t.id for t in s.tokens] == [t.id for t in ref.tokens]
        assert [t.logprob for t in s.tokens] == [t.logprob for t in ref.tokens]
        assert [t.candidates for t in s.tokens] == [t.candidates for t in ref.tokens]
        for a, b in zip(s.tokens, ref.tokens):
            assert abs(a.sampled_logprob - b.sampled_logprob) < 4e-8


def test_sampled_logprob_of_a_temperature_only_chain(gemma, row_kernel):
    """Sampler.choose's sampled logprob on the whole vocabulary is the float64 log-softmax of row / T at the
    chosen token (numpy's float32 exp, float64 sums: measured |error| up to 3.5e-9 nats; tolerance 4e-8)."""
    with gemma.context(n_ctx=64) as ctx:
        row = ctx.prefill(gemma.prompt_tokens("Once upon a time")).copy()
    s = SamplingSettings(seed=9, temperature=0.7, **UNTRUNCATED)
    smp, buf = Sampler(s, gemma.n_vocab), Candidates(gemma.n_vocab)
    ref = log_softmax((row / np.float32(0.7)).astype(np.float64))
    for _ in range(20):
        token, lp, n = smp.choose(row, buf)
        assert n == gemma.n_vocab and abs(lp - ref[token]) < 4e-8


def test_choose_takes_a_row_as_the_chain_sees_it():
    """A float64 row is picked as its float32 values (what the llama_token_data array holds): a row far from 0,
    where float64 and float32 logits differ, gets apply's picks (before the cast 14 of 40 differed)."""
    row = 1e5 + 3 * np.random.default_rng(2).standard_normal(262144)
    s = SamplingSettings(seed=4, temperature=1.0, **UNTRUNCATED)
    ours, native = Sampler(s, row.shape[0]), Sampler(s, row.shape[0])
    buf = Candidates(row.shape[0])
    for _ in range(40):
        token, _, _ = ours.choose(row, buf)
        survivors, sel = native.apply(row.astype(np.float32))
        assert token == int(survivors["id"][sel])


def test_dist_select_takes_float32_values(row_kernel):
    """A float64 row is picked as its float32 values, the maximum included (taken before the cast, it made 4 of
    2,000 sure picks differ from the float32 row's: review)."""
    x64 = np.random.default_rng(0).standard_normal(4096) * 3 + 1000.0
    x32 = x64.astype(np.float32)
    for r in np.linspace(0.001, 0.999, 500):
        assert dist_select(x64, r) == dist_select(x32, r)


def test_dist_select_with_the_row_pass_block_sums():
    """At temperature 1 the engine hands dist_select the block sums block_stats' C pass made (RowStats.dist_block_sums):
    the same sums as dist_select's own pass but for the order of float64 additions (measured 2e-16 apart relative;
    tolerance 1e-12), and the same picks, with llama.cpp's dist the judge of every sure one."""
    from conftest import require
    from llamalens.core import kernels
    from llamalens.core.stats import block_stats

    require(kernels.LIB, "llamalens' C kernel (llamalens/core/_kernels.c)", "pip install -e . builds it")
    rng = np.random.default_rng(11)
    for row in (rng.standard_normal(262144).astype(np.float32) * 3, (rng.standard_normal(32000) * 2).astype(np.float32)):
        bs = block_stats(row[None, :], 5)[0].dist_block_sums
        own = kernels.exp_block_sums(row, float(row.max()), kernels.DIST_BLOCK)
        assert np.allclose(bs, own, rtol=1e-12, atol=0)
        settings = SamplingSettings(seed=3, temperature=1.0, **UNTRUNCATED)
        native, draws = Sampler(settings, row.shape[0]), Draws(3)
        sure = 0
        for _ in range(150):
            r = draws.next()
            i, lse = dist_select(row, r, bs)
            j, lse2 = dist_select(row, r)
            survivors, sel = native.apply(row)
            assert abs(lse - lse2) < 1e-12
            if i is not None:
                sure += 1
                assert i == sel and (j is None or j == i)
        assert sure >= 75

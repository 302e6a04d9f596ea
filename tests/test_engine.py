"""The engine against llama-cpp-python itself: same tokens, raw logprobs equal to log-softmax of the
raw logits (Llama.scores rows) within 1e-5, and top alternatives equal to top_logprobs."""


import numpy as np
import pytest

from llamalens.core.engine import Engine, Request, generate
from llamalens.settings import SamplingSettings
from reference import log_softmax

CASES = [
    SamplingSettings(seed=1),
    SamplingSettings(seed=2, temperature=1.3, top_k=0, top_p=1.0, min_p=0.0),
    SamplingSettings(seed=8, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),  # dist_select on 262k tokens
    SamplingSettings(temperature=0.0),
    SamplingSettings(seed=5, top_k=2),
    SamplingSettings(seed=6, top_p=0.5, min_p=0.1, typical_p=0.9),
    SamplingSettings(seed=7, repeat_penalty=1.5, frequency_penalty=0.3, presence_penalty=0.2),
]


def _reference(ll, prompt, s: SamplingSettings, n, logprobs):
    out = ll.create_completion(prompt, max_tokens=n, seed=s.seed, logprobs=logprobs, temperature=s.temperature,
                               top_k=s.top_k, top_p=s.top_p, min_p=s.min_p, typical_p=s.typical_p,
                               repeat_penalty=s.repeat_penalty, frequency_penalty=s.frequency_penalty,
                               presence_penalty=s.presence_penalty)
    return out["choices"][0]


def _check_against_llama(model, ll, prompt, s, n=12, logprobs=4):
    ours = generate(model, prompt, s, max_tokens=n, n_logprobs=logprobs)
    ref = _reference(ll, prompt, s, n, logprobs)
    n_prompt = len(model.prompt_tokens(prompt))
    ids = [t.id for t in ours.tokens if not t.eog]
    # Llama keeps the tokens it evaluated: all but the last one sampled.
    ref_ids = list(ll._input_ids[n_prompt:n_prompt + len(ids)])
    n_ref = len(ref["logprobs"]["token_logprobs"])
    assert ids[: len(ref_ids)] == ref_ids and len(ref_ids) >= len(ids) - 1, f"tokens differ for {s.label()}"
    # llama-cpp-python drops invalid UTF-8 (errors="ignore"); we show U+FFFD and keep exact bytes per token
    if n_ref == len(ids):
        assert ours.text.replace("\ufffd", "") == ref["text"]
    else:
        # llama-cpp-python skips its max_tokens check while a UTF-8 character is incomplete and so
        # overshoots; llamalens stops at exactly max_tokens. Everything before that point agrees.
        assert n_ref > len(ids) == n and ref["text"].startswith(ours.text.replace("\ufffd", ""))
    assert ours.finish_reason == ref["finish_reason"]
    raw = ll.scores[n_prompt - 1:n_prompt - 1 + len(ids)]
    for i, t in enumerate(ours.tokens[: len(ids)]):
        lsm = log_softmax(raw[i])
        assert abs(t.logprob - lsm[t.id]) < 1e-5
        assert abs(t.logprob - float(ref["logprobs"]["token_logprobs"][i])) < 1e-5
        assert t.rank == 1 + int(np.sum(lsm > lsm[t.id]))
        assert abs(t.entropy - float(-(np.exp(lsm) * lsm).sum())) < 1e-5
        # top alternatives: every string key of llama-cpp-python that does not collide has our value
        texts = [a.text for a in t.top]
        for key, value in ref["logprobs"]["top_logprobs"][i].items():
            matches = [a for a in t.top if a.text == key]
            if len(matches) == 1 and texts.count(key) == 1:
                assert abs(matches[0].logprob - float(value)) < 1e-5
        assert [a.id for a in t.top] == list(np.argsort(-lsm, kind="stable")[:logprobs])
    return ours


@pytest.fixture(scope="module")
def tiny_llama(tiny_path):
    from llama_cpp import Llama

    return Llama(str(tiny_path), logits_all=True, n_ctx=256, verbose=False, flash_attn=False)


@pytest.mark.parametrize("s", CASES, ids=lambda s: s.label())
def test_tiny_matches_llama_cpp_python(tiny, tiny_llama, s):
    _check_against_llama(tiny, tiny_llama, "the cat sat on the", s, n=24)


@pytest.mark.parametrize("s", CASES, ids=lambda s: s.label())
def test_default_model_matches_llama_cpp_python(gemma, gemma_llama, s):
    _check_against_llama(gemma, gemma_llama, "The capital of France is", s, n=12)


def test_equal_text_tokens_both_kept(tiny):
    # token 27+259 ("a") and byte token <0x61> decode to the same text: both must be listed by id
    seen = {}
    for seed in range(6):
        smp = generate(tiny, "a a a", SamplingSettings(seed=seed), max_tokens=8, n_logprobs=40)
        for t in smp.tokens:
            texts = [a.text for a in t.top]
            dup = {x for x in texts if texts.count(x) > 1}
            for x in dup:
                seen[x] = sorted(a.id for a in t.top if a.text == x)
    assert seen, "expected colliding texts among 40 alternatives of a 312-token vocabulary"
    assert all(len(ids) >= 2 and len(set(ids)) == len(ids) for ids in seen.values())


def test_sampler_views(tiny):
    greedy = generate(tiny, "the cat", SamplingSettings(temperature=0), max_tokens=6)
    assert all(t.candidates == 1 and t.sampled_logprob == 0.0 and t.rank == 1 for t in greedy.tokens)
    k2 = generate(tiny, "the cat", SamplingSettings(top_k=2, seed=3), max_tokens=12)
    assert all(1 <= t.candidates <= 2 and t.rank <= 2 for t in k2.tokens)
    p01 = generate(tiny, "the cat", SamplingSettings(top_p=0.01, seed=3), max_tokens=12)
    assert all(t.candidates == 1 and t.rank == 1 and t.sampled_logprob == pytest.approx(0.0, abs=1e-6)
               for t in p01.tokens)


def test_sampled_logprob_is_temperature_softmax(tiny):
    """With no truncation, the sampled distribution is softmax(logits / T) over the whole vocabulary."""
    T = 0.6
    s = SamplingSettings(temperature=T, top_k=0, top_p=1.0, min_p=0.0, seed=11)
    smp = generate(tiny, "hello", s, max_tokens=10, n_logprobs=tiny.n_vocab)
    for t in smp.tokens:
        raw = np.full(tiny.n_vocab, -np.inf)
        for a in t.top:
            raw[a.id] = a.logprob  # full raw log-distribution, recovered from the top list
        expected = log_softmax(raw / T)[t.id]
        assert t.candidates == tiny.n_vocab
        assert t.sampled_logprob == pytest.approx(expected, abs=1e-5)


def test_stop_strings_and_limits(tiny):
    s = SamplingSettings(seed=4, top_k=5)
    free = generate(tiny, "the cat", s, max_tokens=30)
    assert free.finish_reason == "length" and len(free.tokens) == 30
    raw = b"".join(tiny.piece(t.id, special=False) for t in free.tokens)
    j, stop = next((j, t.text) for j, t in enumerate(free.tokens)
                   if j >= 3 and t.text.strip() and t.text.isascii() and t.text.isprintable())
    cut = generate(tiny, "the cat", s, max_tokens=30, stop=[stop])
    assert cut.finish_reason == "stop"
    at = raw.index(stop.encode())
    assert cut.text == raw[:at].decode("utf-8", errors="replace")
    assert [t.id for t in cut.tokens] == [t.id for t in free.tokens[: len(cut.tokens)]]
    assert len(cut.tokens) <= j + 1


def test_bytes_are_exact_and_lossless(tiny):
    smp = generate(tiny, "the", SamplingSettings(seed=9, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0),
                   max_tokens=40)
    joined = b"".join(bytes.fromhex(t.bytes) for t in smp.tokens if not t.eog and t.id not in (0, 1, 2))
    assert joined.decode("utf-8", errors="replace") == smp.text or smp.finish_reason == "stop"
    assert any(len(t.bytes) == 2 and int(t.bytes, 16) >= 0x80 for t in smp.tokens), "expected partial UTF-8 bytes"


def test_batched_equals_single_on_f32(tiny):
    """The tiny model is F32: decoding 6 sequences per batch must give the same tokens as one at a time."""
    reqs = [Request("the cat sat", s, 16, 3, key=i) for i, s in enumerate(CASES)]
    single = {smp.key: smp for smp in Engine(tiny, 1).run([Request(r.prompt, r.settings, 16, 3, key=r.key) for r in reqs])}
    eng = Engine(tiny, 6)
    batched = {smp.key: smp for smp in eng.run(reqs)}
    assert eng.stats["prefills"] == 1 and eng.stats["prompt_copies"] == 5
    for k in single:
        assert [t.id for t in batched[k].tokens] == [t.id for t in single[k].tokens]
        assert max(abs(a.logprob - b.logprob) for a, b in zip(batched[k].tokens, single[k].tokens)) < 2e-3


def test_slot_reuse_keeps_every_sample(tiny):
    prompts = ["the cat", "the dog", "hello world"]
    reqs = [Request(p, SamplingSettings(seed=s), 5 + s, 2, key=(p, s)) for p in prompts for s in range(5)]
    eng = Engine(tiny, 4)
    out = list(eng.run(reqs))
    assert sorted(o.key for o in out) == sorted(r.key for r in reqs)
    for o in out:
        assert o.prompt == o.key[0]
        single = generate(tiny, o.prompt, SamplingSettings(seed=o.key[1]), max_tokens=5 + o.key[1], n_logprobs=2)
        assert [t.id for t in o.tokens] == [t.id for t in single.tokens]
    assert eng.stats["prefills"] <= len(prompts) * 2


def test_identical_sequences_are_decoded_once(tiny):
    """Greedy settings that differ only in truncation, and sampled ones whose chains have not yet
    diverged, share one decode per step; every sample still equals its own single run."""
    settings = [SamplingSettings(temperature=0, top_k=k) for k in (2, 40)]
    settings += [SamplingSettings(temperature=t, top_p=0.05, seed=3) for t in (0.3, 0.9)]
    reqs = [Request("the cat", s, 12, 3, key=i) for i, s in enumerate(settings)]
    eng = Engine(tiny, 4)
    out = {smp.key: smp for smp in eng.run(reqs)}
    assert eng.stats["fanned_out_tokens"] >= 2 * 11
    assert eng.stats["decoded_tokens"] + eng.stats["fanned_out_tokens"] == sum(len(o.tokens) for o in out.values()) - 4
    for i, s in enumerate(settings):
        ref = generate(tiny, "the cat", s, max_tokens=12, n_logprobs=3)
        assert [t.id for t in out[i].tokens] == [t.id for t in ref.tokens]
        assert [t.candidates for t in out[i].tokens] == [t.candidates for t in ref.tokens]


def test_logits_block_is_the_rows_of_the_decode(tiny):
    """Context.logits_block: the decode's output rows as one [n, n_vocab] block, row i the same as logits(i)."""
    toks = tiny.prompt_tokens("the cat sat")
    with tiny.context(n_ctx=256, n_seq_max=3) as ctx:
        for s in range(3):
            ctx.prefill(toks, seq=s)
        ctx.decode([toks[1], toks[2], toks[0]], [len(toks)] * 3, [0, 1, 2], [1, 1, 1])
        block = ctx.logits_block(3)
        assert block.shape == (3, tiny.n_vocab)
        for i in range(3):
            assert np.array_equal(block[i], ctx.logits(i))
        assert not np.array_equal(block[0], block[1])


def test_sampled_logprob_of_a_large_survivor_set():
    """Above EXACT_SURVIVORS survivors the sampled logprob's log-sum-exp runs in float32 (exp) with float64 sums:
    measured |error| against a float64 log-softmax 3.6e-9 nats on 262,144 survivors; the tolerance is 10x."""
    from llamalens.core.stats import EXACT_SURVIVORS, sampled_logprob
    from llamalens.core.sampler import TOKEN_DATA

    rng = np.random.default_rng(3)
    for n in (EXACT_SURVIVORS, 262144):
        surv = np.zeros(n, dtype=TOKEN_DATA)
        surv["id"] = rng.permutation(n)
        surv["logit"] = rng.standard_normal(n) * 5
        for sel in (0, int(np.argmax(surv["logit"])), n - 1):
            ref = log_softmax(surv["logit"].astype(np.float64))[sel]
            assert abs(sampled_logprob(surv, sel) - ref) < 4e-8


def _records_with_and_without_prefilter(model, settings, prompt, n=10, par=8):
    """The same requests through the engine with the top-k prefilter on and off (the full-array chain)."""
    out = []
    for on in (True, False):
        eng = Engine(model, par)
        eng.prefilter = on
        reqs = [Request(prompt, s, max_tokens=n, n_logprobs=3, key=i) for i, s in enumerate(settings)]
        samples = sorted(eng.run(reqs), key=lambda x: x.key)
        out.append(([x.tokens for x in samples], eng.stats["prefiltered"]))
    return out


PREFILTER_CASES = [  # top_k 40 (std::partial_sort), 200 (bucket sort), the llama.cpp chain, typical/top_p/min_p after
    *[SamplingSettings(seed=s, temperature=1.0) for s in range(3)],
    *[SamplingSettings(seed=s, temperature=1.5, top_k=200, top_p=1.0, min_p=0.0) for s in range(2)],
    SamplingSettings(seed=9, top_k=7, top_p=0.5, min_p=0.1, typical_p=0.9),
    *[SamplingSettings(seed=s, temperature=1.2, chain="llama.cpp", xtc_probability=0.5) for s in range(2)],
]


@pytest.mark.parametrize("which", ["tiny", "gemma"])
def test_top_k_prefilter_gives_the_full_chains_records(request, which):
    """Feeding the chain only the row's top k (sampler.prefilter_k) changes no record: the same tokens, survivors'
    count, sampled logprob (float64 both ways, compared exactly) and statistics as the full-array chain."""
    model = request.getfixturevalue(which)
    (on, n_on), (off, n_off) = _records_with_and_without_prefilter(model, PREFILTER_CASES, "The cat sat on the")
    assert on == off
    assert n_off == 0 and n_on > 0.9 * sum(len(t) for t in on)  # the fast path was taken (no ties here)


@pytest.mark.parametrize("k", [2, 3])
def test_top_k_prefilter_falls_back_on_ties(tmp_path, k):
    """A model whose tokens 2i and 2i+1 share their output row: every logit has an equal twin, so the top k+1
    hold a tie, inside the top k (k=2: a twin pair) or across its edge (k=3: the 3rd and 4th). Fed only the top
    k, llama.cpp's non-stable partial sort may order the twins another way (a random 262k row with a tied top
    40 gave other survivors' order for 20 seeds of 20); the engine must take the full row every time."""
    from llamalens.core.runtime import Model, ModelOptions
    from tiny_gguf import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "tied.gguf", tied_pairs=True)
    with Model(path, ModelOptions(ctx=256, flash_attn="off")) as m:
        with m.context(n_ctx=64) as ctx:
            row = ctx.prefill(m.prompt_tokens("the cat"))
        assert np.array_equal(row[0::2], row[1::2])  # the ties are really there, bit for bit
        settings = [SamplingSettings(seed=s, temperature=1.0, top_k=k, top_p=1.0, min_p=0.0) for s in range(4)]
        (on, n_on), (off, _) = _records_with_and_without_prefilter(m, settings, "the cat", n=8, par=4)
    assert n_on == 0 and on == off


def test_analysis_threads_change_nothing(tiny):
    """A step's picks and block statistics on 2 Python threads (Engine.analysis_threads) give the records of one
    thread, in the same order; untruncated, truncated (prefiltered), penalties and a grammar."""
    settings = [SamplingSettings(seed=s, temperature=1.3, top_k=0, top_p=1.0, min_p=0.0) for s in range(3)] + [
        SamplingSettings(seed=s) for s in range(3)] + [SamplingSettings(seed=4, repeat_penalty=1.3)]
    out = []
    for threads in (1, 2):
        eng = Engine(tiny, 8)
        eng.analysis_threads = threads
        reqs = [Request("the cat", s, max_tokens=10, key=i) for i, s in enumerate(settings)]
        reqs.append(Request("the cat", SamplingSettings(seed=8), max_tokens=6, key=99, grammar='root ::= " the" [a-z ]*'))
        out.append([(x.key, x.tokens) for x in eng.run(reqs)])
    assert out[0] == out[1]

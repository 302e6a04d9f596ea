"""score / choose / compare: alignment, both protocols and KLD against llama-cpp-python's own logits and
numpy; quantization drift ordering on real copies of the default model; every bad input."""

import math
import re

import numpy as np
import pytest

from llamalens.errors import InvalidInput
from llamalens.core.runtime import Model, ModelOptions
from llamalens.looks.choose import choose
from llamalens.looks.compare import compare_run, compare_text
from llamalens.looks.score import plan_windows, score_text
from reference import full_windows, kl_divergence, log_softmax
from clirun import cli

TEXT = ("The quick brown fox jumps over the lazy dog. It was a bright cold day in April, and the clocks were "
        "striking thirteen. Call me Ishmael. Some years ago, never mind how long precisely, having little or no "
        "money in my purse, I thought I would sail about a little and see the watery part of the world.")


@pytest.fixture(scope="module")
def gemma_q2_path(gemma_path, tmp_path_factory):
    from llamalens.core.runtime import quantize

    return quantize(gemma_path, tmp_path_factory.mktemp("q2") / "gemma-3-270m-q2_k.gguf", "Q2_K")


def _llama_rows(llm, ids):
    """Raw logits of every position of ids, decoded by llama-cpp-python's own Llama.eval."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def test_window_plans():
    # full: every stream token after BOS scored exactly once, each with >= ctx-1-stride context
    for n, ctx, stride in [(10, 4, 2), (100, 16, 8), (100, 16, 15), (17, 16, 1), (5, 8, 4)]:
        ws = plan_windows(n, ctx, "full", stride, bos=True)
        scored = [w.start + j for w in ws for j in range(w.first, w.length)]
        assert scored == list(range(1, n)), (n, ctx, stride)
        assert all(w.length <= ctx for w in ws)
        assert all(w.first - 1 >= ctx - 1 - stride for w in ws[1:] if w.length == ctx)
    # llama-perplexity: floor(n/ctx) chunks, second halves scored, partial chunk dropped
    ws = plan_windows(70, 16, "llama-perplexity", bos=True)
    assert [(w.start, w.length, w.first, w.bos_first) for w in ws] == [(i * 16, 16, 9, True) for i in range(4)]


def test_score_alignment_matches_llama_cpp(gemma, gemma_llama):
    """Token i of the text is scored by the row before it; the first one from the BOS row (never dropped)."""
    res = score_text(gemma, TEXT, ctx=512, n_logprobs=5)
    ids = gemma.tokenize(TEXT, add_bos=False, special=False)
    stream = [gemma.bos] + ids
    assert [t.id for t in res.tokens] == ids and res.unscored == [] and res.tokens[0].position == 0
    lp = log_softmax(_llama_rows(gemma_llama, stream))
    want = np.array([lp[i, stream[i + 1]] for i in range(len(ids))])
    got = np.array([t.logprob for t in res.tokens])
    # measured (AVX2 / AVX-512 builds): max |Δ| 3.4e-8 / 2.9e-8 nats, perplexity 2.4e-9 / 4.0e-9 relative (same
    # kernels, float64 log-softmax): bounds about 10x the larger
    assert np.max(np.abs(got - want)) < 4e-7, np.max(np.abs(got - want))
    assert res.perplexity == pytest.approx(math.exp(-want.mean()), rel=4e-8)
    ranks = [int((lp[i] > lp[i, stream[i + 1]]).sum()) + 1 for i in range(len(ids))]
    assert [t.rank for t in res.tokens] == ranks
    assert res.bits_per_byte == pytest.approx(-got.sum() / math.log(2) / len(TEXT.encode()), rel=1e-12)


def test_full_protocol_windows_match_direct_computation(gemma, gemma_llama):
    """With windows of 32 and stride 12, each token's logprob is the one llama-cpp-python gives for the same window."""
    ctx, stride = 32, 12
    res = score_text(gemma, TEXT, ctx=ctx, stride=stride)
    stream = [gemma.bos] + gemma.tokenize(TEXT, add_bos=False, special=False)
    assert len(res.tokens) == len(stream) - 1 and res.windows > 3
    got = {t.position: t.logprob for t in res.tokens}
    windows = full_windows(len(stream), ctx, stride)  # written out in tests/reference.py, not plan_windows
    assert [(w.start, w.length, w.first, w.bos_first) for w in plan_windows(len(stream), ctx, "full", stride)] == windows
    for start, length, first, bos_first in windows:
        ids = stream[start : start + length]
        if bos_first:
            ids = [gemma.bos] + ids[1:]
        lp = log_softmax(_llama_rows(gemma_llama, ids))
        for j in range(first, length):
            assert abs(got[start + j - 1] - lp[j - 1, stream[start + j]]) < 3e-7  # measured max 2.9e-8


def test_llama_perplexity_protocol(gemma, gemma_llama):
    """Chunks of ctx, BOS first, second half scored, partial chunk dropped; needs 2*ctx tokens."""
    ctx = 24
    text = TEXT * 2
    res = score_text(gemma, text, ctx=ctx, protocol="llama-perplexity")
    stream = [gemma.bos] + gemma.tokenize(text, add_bos=False, special=False)
    n_chunk = len(stream) // ctx
    nll, count = 0.0, 0
    for c in range(n_chunk):
        ids = stream[c * ctx : (c + 1) * ctx]
        lp = log_softmax(_llama_rows(gemma_llama, [gemma.bos] + ids[1:]))
        for j in range(ctx // 2, ctx - 1):
            nll -= lp[j, ids[j + 1]]
            count += 1
    assert len(res.tokens) == count == n_chunk * (ctx - 1 - ctx // 2)
    assert res.perplexity == pytest.approx(math.exp(nll / count), rel=4.5e-8)  # measured 2.7e-9 / 4.4e-9
    assert any("partial chunk" in n for n in res.notes) == (len(stream) % ctx != 0)
    with pytest.raises(InvalidInput, match=r"needs at least 2048 \(as llama-perplexity itself does\)"):
        score_text(gemma, TEXT, ctx=1024, protocol="llama-perplexity")


MEASURED_CHOOSE = 1e-8  # measured 9.1e-10 against llama-cpp-python; about 10x


def test_choose_ranks_the_right_continuation(gemma, gemma_llama):
    res = choose(gemma, "The capital of France is", ["London", "Paris", "Berlin"])
    assert res.options[0].option == "Paris" and res.margins()[0] > 0.5
    assert res.options[0].continuation == " Paris"
    res = choose(gemma, "Students go to school to get an", ["educion", "education"], normalize="token")
    assert [o.option for o in res.options] == ["education", "educion"] and res.margins()[0] > 1
    # each option's logprob equals llama-cpp-python's logprob of the option after the prompt, as one text
    ptoks = gemma.prompt_tokens("The capital of France is")
    whole = gemma.prompt_tokens("The capital of France is Paris")
    lp = log_softmax(_llama_rows(gemma_llama, whole[:-1])[-1])[whole[-1]]
    assert len(whole) == len(ptoks) + 1
    paris = next(o for o in choose(gemma, "The capital of France is", ["Paris", "Rome"]).options if o.option == "Paris")
    assert paris.total == pytest.approx(lp, abs=MEASURED_CHOOSE)


def test_kld_of_a_model_with_itself_is_zero(gemma, gemma_path):
    with Model(gemma_path, ModelOptions(ctx=512, flash_attn="off")) as other:
        cmp = compare_text(gemma, other, TEXT, ctx=64, stride=32)
    s = cmp.summary()
    assert s["kld_mean"] == 0.0 and s["kld_max"] == 0.0 and s["same_top"] == 1.0 and s["ppl_ratio"] == 1.0


def test_quantization_drift_order_and_numpy(gemma, gemma_llama, gemma_q8_path, gemma_q2_path):
    from llama_cpp import Llama

    opts = ModelOptions(ctx=512, flash_attn="off")
    with Model(gemma_q8_path, opts) as q8, Model(gemma_q2_path, opts) as q2:
        c8 = compare_text(gemma, q8, TEXT, ctx=512)
        c2 = compare_text(gemma, q2, TEXT, ctx=512)
        alt = compare_text(gemma, q8, TEXT, ctx=512, alternate=True)
    s8, s2 = c8.summary(), c2.summary()
    assert 0 < s8["kld_mean"] < s2["kld_mean"] / 5, (s8["kld_mean"], s2["kld_mean"])
    assert s8["same_top"] > s2["same_top"]
    assert [p.kld for p in alt.positions] == [p.kld for p in c8.positions]  # alternating = lockstep
    # KLD, Δp and both perplexities from llama-cpp-python's raw logits and a plain numpy formula
    stream = [gemma.bos] + gemma.tokenize(TEXT, add_bos=False, special=False)
    ref_b = Llama(str(gemma_q8_path), logits_all=True, n_ctx=512, verbose=False, flash_attn=False)
    la, lb = _llama_rows(gemma_llama, stream), _llama_rows(ref_b, stream)
    kld = np.array([kl_divergence(la[i], lb[i]) for i in range(len(stream) - 1)])
    ours = np.array([p.kld for p in c8.positions])
    # measured on the AVX2 / AVX-512 builds: max 7.5e-7 / 6.5e-7 (mean KLD 0.0107 / 0.0101), mean 6.1e-10 /
    # 2.5e-8; perplexities 3.7e-9 / 4.5e-9 relative; Δp 1.3e-8 / 1.4e-8: bounds 10x the larger
    assert np.max(np.abs(ours - kld)) < 8e-6 and abs(ours.mean() - kld.mean()) < 2.5e-7
    lpa, lpb = log_softmax(la), log_softmax(lb)
    nll_a = -np.mean([lpa[i, stream[i + 1]] for i in range(len(stream) - 1)])
    nll_b = -np.mean([lpb[i, stream[i + 1]] for i in range(len(stream) - 1)])
    assert s8["ppl_a"] == pytest.approx(math.exp(nll_a), rel=5e-8)
    assert s8["ppl_b"] == pytest.approx(math.exp(nll_b), rel=5e-8)
    dp = np.array([math.exp(lpb[i, stream[i + 1]]) - math.exp(lpa[i, stream[i + 1]]) for i in range(len(stream) - 1)])
    assert np.max(np.abs(np.array([p.dp for p in c8.positions]) - dp)) < 1.5e-7
    assert [p.position for p in c8.worst(3)] == list(np.argsort(-ours, kind="stable")[:3])


def test_compare_on_a_stored_run(gemma, gemma_llama, gemma_path, gemma_q8_path, tmp_path):
    from llamalens.run import grid
    from llamalens.store import Store
    from llamalens.run.sweep import SweepSpec, run_sweep

    store = Store(tmp_path / "runs.db")
    rid = run_sweep(gemma, store, SweepSpec(["Once upon a time"], grid.expand({"temperature": [0.0, 0.8]}), [0],
                                            max_tokens=8, parallel=1, exact=True))
    with Model(gemma_path, ModelOptions(ctx=512, flash_attn="off")) as same:
        cmp = compare_run(gemma, same, store, rid)
    stored = [t.logprob for _, t in store.tokens(rid)]
    assert len(cmp.positions) == len(stored) and cmp.summary()["kld_max"] == 0.0
    # model A's view of its own tokens is what the sweep stored, up to the batch-shape noise floor (the sweep
    # decoded one token at a time, compare decodes each sample in one batch, and the CPU kernels change with the
    # batch shape). Measured mean 0.059, max 0.173 nats; the bounds are about twice that (10x would be no check)
    d = np.abs(np.array([math.log(p.p_a) for p in cmp.positions]) - np.array(stored))
    assert d.mean() < 0.1 and d.max() < 0.35, d
    # against an outside reference with compare's own batch shape: llama-cpp-python evaluating each sample's prompt
    # and tokens in one batch (flash attention off in both)
    worst = 0.0
    for s in store.samples(rid):
        ids = gemma_llama.tokenize(s.prompt.encode(), add_bos=True, special=False)
        gen = [t.id for _, t in store.tokens(rid, s.sample_idx)]
        gemma_llama.reset()
        gemma_llama.eval(ids + gen)
        rows = log_softmax(np.array(gemma_llama.scores[len(ids) - 1: len(ids) - 1 + len(gen)]))
        got = [p.lp_a for p in cmp.positions if p.sample == s.sample_idx]
        worst = max(worst, max(abs(a - row[t]) for a, row, t in zip(got, rows, gen)))
    assert worst < 2e-7, worst  # measured 1.6e-8 (the batch-shape noise above is 0.17): bound 10x
    assert [p.position for p in cmp.positions] == [t.position for _, t in store.tokens(rid)]
    res = cli("compare", "--run", rid, "-m", gemma_q8_path, "--store", store.path, "--ctx", 512, "--flash-attn", "off")
    assert "mean KLD" in res.output and "compare run" in res.output and "1 model(s) against" in res.output


def test_cli_score_choose_compare_and_reports(gemma_path, gemma_q8_path, tmp_path):
    res = cli("score", "The quick brown fox jumps over the lazy dog.", "--report", tmp_path / "s.html")
    assert "perplexity" in res.output and (tmp_path / "s.html").exists()
    res = cli("score", "--file", _write(tmp_path / "t.txt", TEXT), "--json")
    assert '"perplexity"' in res.output
    res = cli("choose", "The capital of France is", "--option", "London", "--option", "Paris")
    assert re.search(r"^\s*1\s+Paris", res.output, re.M)
    res = cli("compare", "-m", gemma_path, "-m", gemma_q8_path, TEXT, "--ctx", 256, "--report", tmp_path / "c.md")
    assert "same top token" in res.output and (tmp_path / "c_files" / "kld_histogram.png").exists()
    page_md = (tmp_path / "c.md").read_text()
    assert "KL(A‖B)" in page_md


def _write(path, text, binary=False):
    path.write_bytes(text) if binary else path.write_text(text, encoding="utf-8")
    return path


def test_bad_input(gemma_path, gemma_q8_path, tiny_path, tmp_path):
    latin = _write(tmp_path / "latin.txt", "caf\xe9 cr\xe8me".encode("latin-1"), binary=True)
    cases = [
        (["score", ""], "the text is empty"),
        (["score", "Hi"], "scoring needs at least 2 tokens"),
        (["score"], "give a TEXT argument or --file"),
        (["score", "--file", tmp_path / "nope.txt"], "file not found"),
        (["score", "--file", latin], r"not UTF-8 \(byte 0xE9 at offset 3\).*--raw-bytes"),
        (["score", TEXT, "--ctx", 1], "--ctx 1 is too small"),
        (["score", TEXT, "--stride", 0, "--ctx", 64], "--stride 0 is out of range"),
        (["score", TEXT, "--protocol", "llama-perplexity", "--ctx", 512], "needs at least 1024"),
        (["choose", "The capital of France is", "--option", "Paris"], "at least two --option"),
        (["compare", "-m", gemma_path, "-m", gemma_path, TEXT], "KL divergence of a model with itself is 0"),
        (["compare", "-m", gemma_path, "-m", tiny_path, TEXT], "do not share a vocabulary.*262,144.*312"),
        (["compare", "-m", gemma_path, TEXT], "exactly two models"),
    ]
    for args, msg in cases:
        res = cli(*args, ok=False)
        assert res.exit_code != 0 and re.search(msg, res.output), (args, res.output)
    res = cli("score", "--file", latin, "--raw-bytes")
    assert "tokens scored" in res.output
    res = cli("score", TEXT, "--ctx", 40000)
    assert "larger than the model's training context (32768)" in res.output


def test_same_figure_as_llama_perplexity(gemma_path, tmp_path, llama_perplexity):
    """llama.cpp's own tool and `score --protocol llama-perplexity` print the same perplexity."""
    import subprocess

    text = (TEXT + "\n") * 6
    f = _write(tmp_path / "text.txt", text)
    ctx = 128
    out = subprocess.run([llama_perplexity, "-m", str(gemma_path), "-f", str(f), "-c", str(ctx), "-b",
                          str(ctx), "-t", "2", "-fa", "on"], capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log)
    assert m, log[-3000:]
    chunks = [float(x) for x in re.findall(r"\[\d+\]([0-9.]+),?", log)]
    with Model(gemma_path, ModelOptions(ctx=ctx, batch=ctx, threads=2, flash_attn="on")) as model:
        res = score_text(model, text, ctx=ctx, protocol="llama-perplexity")
    assert f"{res.perplexity:.4f}" == m.group(1), (res.perplexity, m.group(1))
    assert res.perplexity_error == pytest.approx(float(m.group(2)), abs=2e-4)
    # the running estimate after each chunk, as the tool prints it
    per_chunk = ctx - 1 - ctx // 2
    running = [math.exp(-np.mean([t.logprob for t in res.tokens[: (k + 1) * per_chunk]])) for k in range(len(chunks))]
    assert [f"{r:.4f}" for r in running] == [f"{c:.4f}" for c in chunks]


def test_same_statistics_as_llama_perplexity_kl_divergence(gemma_path, gemma_q8_path, tmp_path, llama_perplexity):
    """`compare --protocol llama-perplexity` against `llama-perplexity --kl-divergence` (base = Q8_0).

    The tool stores the base model's log-probabilities in 16 bits, so every figure that involves the base
    carries a small rounding (about 5e-6 relative in PPL, 1% in KLD); model B's perplexity, computed from
    live logits on both sides, agrees to every printed digit."""
    import subprocess

    text = (TEXT + "\n") * 6
    f = _write(tmp_path / "text.txt", text)
    ctx = 128
    common = ["-f", str(f), "-c", str(ctx), "-b", str(ctx), "-t", "2", "-fa", "on",
              "--kl-divergence-base", str(tmp_path / "base.kld")]
    tool = llama_perplexity
    subprocess.run([tool, "-m", str(gemma_q8_path)] + common, capture_output=True, timeout=600, check=True)
    out = subprocess.run([tool, "-m", str(gemma_path), "--kl-divergence"] + common, capture_output=True, text=True,
                         timeout=600)
    log = out.stdout + out.stderr

    def stat(label):
        m = re.search(re.escape(label) + r"\s*:\s*(-?[0-9.]+)", log)
        assert m, (label, log[-3000:])
        return float(m.group(1))

    opts = ModelOptions(ctx=ctx, batch=ctx, threads=2, flash_attn="on")
    with Model(gemma_q8_path, opts) as a, Model(gemma_path, opts) as b:
        s = compare_text(a, b, text, ctx=ctx, protocol="llama-perplexity").summary()
    assert f"{s['ppl_b']:.6f}" == f"{stat('Mean PPL(Q)'):.6f}"
    assert s["ppl_a"] == pytest.approx(stat("Mean PPL(base)"), rel=2e-5)
    assert s["ln_ppl_ratio"] == pytest.approx(stat("Mean ln(PPL(Q)/PPL(base))"), abs=3e-5)
    assert s["dp_mean"] * 100 == pytest.approx(stat("Mean    Δp"), abs=2e-3)
    assert s["dp_rms"] * 100 == pytest.approx(stat("RMS Δp"), abs=2e-3)
    assert f"{s['same_top'] * 100:.3f}" == f"{stat('Same top p'):.3f}"
    # the tool stores the base's logprobs in 16 bits: measured 0.08% apart; the README promises within 1%
    assert s["kld_mean"] == pytest.approx(stat("Mean    KLD"), rel=0.01)
    assert s["kld_max"] == pytest.approx(stat("Maximum KLD"), rel=0.01)

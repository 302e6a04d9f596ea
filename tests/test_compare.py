"""compare with any number of models: the statistics against textbook formulas and against llama-perplexity
--kl-divergence itself; the compare run against the pairwise compare (blocks of spilled base rows, resume after
an interruption); the ladder, its report and chart; every bad input."""

import json
import math
import re
import subprocess

import numpy as np
import pytest

import llamalens as ll
from llamalens.looks.kld_stats import LLAMA_PERPLEXITY_LINES, WITH_ERROR, kld_statistics
from clirun import cli

TEXT = "the cat sat on the mat and the dog is in it. " * 4


@pytest.fixture(scope="module")
def tiny_quants(tiny_path, tmp_path_factory):
    """Q8_0 and Q4_0 copies of the tiny model: three models with one vocabulary, of different sizes."""
    from llamalens.core.runtime import quantize

    d = tmp_path_factory.mktemp("tiny_quants")
    return [quantize(tiny_path, d / f"tiny-{k}.gguf", k) for k in ("Q8_0", "Q4_0")]


def test_statistics_follow_the_textbook_formulas():
    """kld_statistics against plain numpy: means and standard errors, Pearson correlation, percentiles by linear
    interpolation, the uncertainty of a difference of correlated means."""
    rng = np.random.default_rng(7)
    n = 1000
    nll_b = rng.gamma(2.0, 1.0, n)
    nll_q = nll_b + rng.normal(0.1, 0.3, n)
    kld = rng.exponential(0.05, n)
    same = rng.random(n) < 0.9
    s = kld_statistics(nll_q, nll_b, kld, same)
    se = lambda x: x.std(ddof=1) / math.sqrt(n)  # noqa: E731
    assert s["tokens"] == n
    assert s["ppl_q"] == pytest.approx(math.exp(nll_q.mean()), rel=1e-12)
    assert s["ppl_q_error"] == pytest.approx(math.exp(nll_q.mean()) * se(nll_q), rel=1e-9)
    assert s["ln_ppl_correlation"] == pytest.approx(np.corrcoef(nll_q, nll_b)[0, 1], rel=1e-9)
    assert s["ln_ppl_ratio"] == pytest.approx(nll_q.mean() - nll_b.mean(), rel=1e-12)
    assert s["ln_ppl_ratio_error"] == pytest.approx(se(nll_q - nll_b), rel=1e-9)
    assert s["ppl_ratio_error"] == pytest.approx(s["ppl_ratio"] * se(nll_q - nll_b), rel=1e-9)
    assert s["kld_mean"] == pytest.approx(kld.mean(), rel=1e-12) and s["kld_error"] == pytest.approx(se(kld), rel=1e-9)
    for key, q in (("kld_p99_9", 99.9), ("kld_p99", 99), ("kld_median", 50), ("kld_p10", 10), ("kld_p0_1", 0.1)):
        assert s[key] == pytest.approx(np.percentile(kld, q), rel=1e-12), key
    assert s["kld_max"] == kld.max() and s["kld_min"] == kld.min()
    dp = np.exp(-nll_q) - np.exp(-nll_b)
    assert s["dp_mean"] == pytest.approx(dp.mean(), rel=1e-12) and s["dp_error"] == pytest.approx(se(dp), rel=1e-9)
    for key, q in (("dp_p75", 75), ("dp_p25", 25), ("dp_p1", 1)):
        assert s[key] == pytest.approx(np.percentile(dp, q), rel=1e-12), key
    assert s["dp_rms"] == pytest.approx(math.sqrt((dp**2).mean()), rel=1e-12)
    assert s["dp_rms_error"] == pytest.approx(se(dp**2) / (2 * math.sqrt((dp**2).mean())), rel=1e-9)
    assert s["same_top"] == same.mean() and s["same_top_error"] == pytest.approx(se(same.astype(float)), rel=1e-9)
    # llama-perplexity gives no uncertainty from 10 values or fewer
    assert kld_statistics(nll_q[:10], nll_b[:10], kld[:10], same[:10])["kld_error"] == 0.0


def _per_token(ladder, k):
    d = ladder.drift[k]
    return d.positions.tolist(), d.kld.tolist(), d.lp_q.tolist(), d.lp_base.tolist(), d.same_top.tolist()


def test_compare_run_equals_the_pairwise_compare_in_blocks_and_after_resume(tiny_path, tiny_quants, tmp_path,
                                                                          monkeypatch):
    """Three models on windows of 16 (stride 6): every compared model's per-token values are the pairwise
    compare's exactly (the same float32 rows), whether the base's rows are spilled in one block or in blocks of
    two windows; a run interrupted after two units resumes to the same numbers."""
    from llamalens.core.runtime import Model, ModelOptions
    from llamalens.looks.compare import compare_text
    from llamalens.run import compare as run_compare
    from llamalens.run.ladder import load_ladder
    from llamalens.store import Store

    models = [str(tiny_path)] + [str(q) for q in tiny_quants]
    opts = dict(ctx=16, stride=6)
    whole = ll.compare(models=models, text=TEXT, store=tmp_path / "a.db", **opts)
    assert whole.complete and whole.n_windows > 4 and len(whole.drift) == 2
    mo = ModelOptions(ctx=16)
    with Model(tiny_path, mo) as a:
        for k, q in enumerate(tiny_quants, 1):
            with Model(q, mo) as b:
                pair = compare_text(a, b, TEXT, ctx=16, stride=6)
            got = _per_token(whole, k)
            assert got[0] == [p.position for p in pair.positions]
            assert got[1] == [p.kld for p in pair.positions]
            assert got[2] == [p.lp_b for p in pair.positions] and got[3] == [p.lp_a for p in pair.positions]
            assert got[4] == [p.same_top for p in pair.positions]
            assert whole.stats(k) == {key: v for key, v in pair.summary().items() if key not in ("ppl_a", "ppl_b")}
    assert whole.stats(2)["kld_mean"] > whole.stats(1)["kld_mean"] > 0  # Q4_0 drifts further than Q8_0

    # blocks of two windows' rows, and an interruption after the second unit saved
    row_bytes = 4 * Model(tiny_path, mo).n_vocab
    monkeypatch.setattr(run_compare, "SPILL_MAX_BYTES", 2 * 16 * row_bytes)
    saved = []
    real = run_compare.compare_window

    def stop_after_two(*args, **kwargs):
        if len(saved) == 2:
            raise KeyboardInterrupt
        saved.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(run_compare, "compare_window", stop_after_two)
    with pytest.raises(run_compare.CompareInterrupted, match=r"resume with: llamalens compare --resume \d+"):
        ll.compare(models=models, text=TEXT, store=tmp_path / "b.db", **opts)
    store = Store(tmp_path / "b.db")
    rid = store.runs()[-1].id
    part = load_ladder(store, rid)
    assert not part.complete and part.info.status == "interrupted" and part.drift[1].windows_done == 2
    decoded = []

    def counted(*args, **kwargs):
        decoded.append(args[-1])  # the model of the unit
        return real(*args, **kwargs)

    monkeypatch.setattr(run_compare, "compare_window", counted)
    res = cli("compare", "--resume", rid, "--store", tmp_path / "b.db", "--json")
    assert len(decoded) == 2 * whole.n_windows - 2  # only the units that were not saved
    resumed = load_ladder(Store(tmp_path / "b.db"), rid)
    assert resumed.complete and resumed.info.status == "done"
    for k in (1, 2):
        assert _per_token(resumed, k) == _per_token(whole, k)
    assert json.loads(res.stdout)["ladder"] == whole.to_dict()["ladder"]


def test_cli_ladder_show_report_and_chart(tiny_path, tiny_quants, tmp_path):
    """The ladder sorted by file size with bits per weight from the header; `show` and `report` read the run
    back through its kind; --chart writes the ladder as a PNG; --name names the run."""
    from llamalens.modelfiles.gguf_header import read_header

    db = tmp_path / "c.db"
    res = cli("compare", "-m", tiny_path, "-m", tiny_quants[0], "-m", tiny_quants[1], TEXT, "--ctx", 32, "--store", db,
              "--name", "ladder<b>", "--top", 3, "--report", tmp_path / "l.html", "--chart", tmp_path / "l.png")
    table = re.search(r"^model +quant .*\n-[- ]+\n(.*)\n(.*)\n", res.output, re.M)
    assert [line.split()[1] for line in table.groups()] == ["Q4_0", "Q8_0"], res.output  # smallest file first
    assert "Same top p" in res.output and "Mean PPL(Q)-PPL(base)" in res.output
    assert (tmp_path / "l.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "l.html").read_text()
    assert "The ladder" in page and "ladder<b>" not in page and "99% KLD" in page
    out = json.loads(cli("show", "ladder<b>", "--store", db, "--json").stdout)
    header = read_header(tiny_quants[1])
    bpw = 8 * sum(t.n_bytes for t in header.tensors) / sum(t.n_elements for t in header.tensors)
    q4 = next(m for m in out["models"] if m["quantization"] == "Q4_0")
    assert q4["bpw"] == pytest.approx(bpw) and 4.0 < bpw < 6.0 and len(q4["worst"]) == 20
    assert [r["quantization"] for r in out["ladder"]] == ["Q4_0", "Q8_0"]
    cli("export", "ladder<b>", "--store", db, "--format", "csv", "-o", tmp_path / "tokens.csv")
    import pandas as pd

    exported = pd.read_csv(tmp_path / "tokens.csv")
    assert len(exported) == 2 * q4["statistics"]["tokens"] and set(exported.quantization) == {"Q8_0", "Q4_0"}
    q4_rows = exported[exported.quantization == "Q4_0"]
    assert q4_rows.kld.mean() == pytest.approx(q4["statistics"]["kld_mean"], rel=1e-12)
    cli("report", "ladder<b>", "--store", db, "-o", tmp_path / "again.md")
    assert "The ladder" in (tmp_path / "again.md").read_text()
    assert (tmp_path / "again_files" / "ladder.png").exists()


def test_compare_bad_input(tiny_path, tiny_quants, tmp_path):
    db = tmp_path / "bad.db"
    cases = [
        (["compare", "-m", tiny_path, TEXT], "at least one model to compare with it"),
        (["compare", "-m", tiny_path, "-m", tiny_quants[0], "-m", tiny_path, TEXT], "is given twice"),
        (["compare", "-m", tiny_path, "-m", tiny_quants[0], TEXT, "--chart", tmp_path / "x.svg"], "as a PNG"),
        (["compare", "--resume", 1, "-m", tiny_path, "--store", db], "--resume finishes a compare run"),
        (["compare", "-m", tiny_path, "-m", tiny_quants[0], TEXT, "--run", 1], "not several"),
        (["compare", "--resume", 99, "--store", db], "no run"),
    ]
    cli("compare", "-m", tiny_path, "-m", tiny_quants[0], TEXT, "--ctx", 64, "--store", db)
    cases.append((["compare", "--resume", 1, "--store", db], "already complete"))
    for args, msg in cases:
        res = cli(*args, ok=False)
        assert res.exit_code != 0 and re.search(msg, res.output), (args, res.output)
    with pytest.raises(ll.InvalidArgument, match="list of model paths"):
        ll.compare(models=str(tiny_path), text=TEXT)


def _llama_rows(path, ids):
    """llama-cpp-python's raw logits for every position of `ids` (one sequence, logits_all), as float64."""
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False)
    llm.eval(ids)
    rows = np.array(llm.scores[: len(ids)], dtype=np.float64)
    llm.close()
    return rows


def _log_softmax(x):
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def test_compare_on_a_run_with_several_models(tiny_path, tiny_quants, tmp_path):
    """compare --run RUN -m Q1 -m Q2: a compare run on the run's generated tokens, the run's model the base; each
    model's KL divergence and logprobs at every generated token against llama-cpp-python's logits of the sample
    (prompt + generated tokens) in numpy; the worst positions named by sample; export's sample column."""
    from llamalens.store import Store

    db = tmp_path / "r.db"
    run = ll.sweep("the cat", {"temperature": [0.0, 0.9]}, seeds=1, max_tokens=6, model=str(tiny_path),
                   store=db, progress=False, ctx=64)
    out = json.loads(cli("compare", "--run", run.id, "-m", tiny_quants[0], "-m", tiny_quants[1], "--store", db,
                         "--flash-attn", "off", "--json").stdout)  # llama-cpp-python's default attention
    assert out["source"]["run"] == run.id and out["protocol"] == "run"
    assert [r["quantization"] for r in out["ladder"]] == ["Q4_0", "Q8_0"]
    store = Store(db, read_only=True)
    toks = store.tokens_by_sample(run.id)
    samples = store.samples(run.id)
    assert all(r["tokens"] == 12 for r in out["ladder"]) and sum(len(t) for t in toks.values()) == 12
    from llama_cpp import Llama

    tokenizer = Llama(str(tiny_path), n_ctx=64, verbose=False, vocab_only=True)
    ref = {1: [], 2: []}
    for s in samples:
        ptoks = tokenizer.tokenize(s.prompt.encode(), add_bos=True, special=True)
        gen = [t.id for t in toks[s.sample_idx]]
        ids = ptoks + gen
        la = _log_softmax(_llama_rows(tiny_path, ids))[len(ptoks) - 1 : len(ids) - 1]
        for k, q in enumerate(tiny_quants, 1):
            lb = _log_softmax(_llama_rows(q, ids))[len(ptoks) - 1 : len(ids) - 1]
            kl = (np.exp(la) * (la - lb)).sum(axis=1)
            ref[k] += [(s.sample_idx, j, kl[j], lb[j, t], la[j, t]) for j, t in enumerate(gen)]
    cli("export", run.id + 1, "--store", db, "--format", "csv", "-o", tmp_path / "t.csv")
    import pandas as pd

    t = pd.read_csv(tmp_path / "t.csv")
    for k in (1, 2):
        rows = t[(t.row == "kld") & (t.model == k)].sort_values(["sample", "position"])
        assert list(zip(rows["sample"], rows.position)) == [(r[0], r[1]) for r in ref[k]]
        # measured against llama-cpp-python's logits in float64: KLD within 1.5e-6 absolute at a KLD of 4.5 (3.4e-7
        # relative) and 7.5e-8 absolute on the small ones; logprobs within 1.5e-8; bounds about 10x
        assert rows.kld.to_numpy() == pytest.approx([r[2] for r in ref[k]], rel=4e-6, abs=8e-7)
        assert rows.logprob_q.to_numpy() == pytest.approx([r[3] for r in ref[k]], abs=2e-7)
        assert rows.logprob_base.to_numpy() == pytest.approx([r[4] for r in ref[k]], abs=2e-7)
    worst = out["models"][1]["worst"][0]  # Q4_0: its most divergent token, named by sample and position
    top = max(ref[2], key=lambda r: r[2])
    assert (worst["sample"], worst["position"]) == (top[0], top[1])
    # the same from Python: a compare run on the run's tokens, read back as a Ladder
    again = ll.compare(models=[str(tiny_path), str(tiny_quants[0])], run=run, store=db, flash_attn="off")
    assert again.source["run"] == run.id
    assert again.drift[1].kld.tolist() == pytest.approx([r[2] for r in ref[1]], rel=4e-6, abs=8e-7)


# -- against llama.cpp's own tool ------------------------------------------------------------------------
def _tool_figures(log: str) -> dict:
    """Every figure of the tool's summary by our key, and each ± by the key of our uncertainty."""
    out = {}
    for label, key, _unit in LLAMA_PERPLEXITY_LINES:
        m = re.search(re.escape(label) + r"\s*:\s*(-?[0-9.]+)(?:\s*±\s*([0-9.]+))?", log)
        assert m, (label, log[-3000:])
        out[key] = float(m.group(1))
        if key in WITH_ERROR:
            assert m.group(2), (label, "no ±")
            out[WITH_ERROR[key]] = float(m.group(2))
    return out


# How far our figures (float32 logits of both models) are from llama-perplexity's (the base's log-probabilities
# stored in 16 bits, terms with log p_base < -16 left out of the KLD), measured on this test's text (252 scored
# tokens, base = the default Q4_K_M, Q8_0 and Q4_0 copies; AVX-512 build):
#   PPL(Q): 1.0e-7 relative (the tool sums float32 per-token NLLs); PPL(base) 1.1e-6 relative; correlation 0.004
#   points; ln ratio, ratio, difference <= 1.9e-6; mean KLD 0.09-0.26 % relative; KLD percentiles <= 1e-4 plus
#   0.9 % of the value (up to 8 % on the lowest percentiles, whose values are below 1e-4); Δp figures within
#   5e-4 percentage points (its printed digit); same top p to the printed digit. The uncertainties (±): within
#   0.3 % of the tool's (most of it the tool's printed digits).
# The bounds are about 10x these.
def _bound(key: str, tool: float) -> float:
    if key == "ppl_q":
        return 1e-6 * tool
    if key in ("ppl_base", "ppl_ratio"):
        return 1.2e-5 * tool
    if key in ("ln_ppl_ratio", "ppl_diff"):
        return 2e-5
    if key == "ln_ppl_correlation":
        return 0.04  # percentage points
    if key == "kld_mean":
        return 0.026 * tool
    if key.startswith("kld_"):
        return 0.02 * abs(tool) + 1e-4
    return 5e-3  # Δp figures, in percentage points


def test_every_statistic_against_llama_perplexity(gemma_path, gemma_q8_path, gemma_q4_0_path, tmp_path,
                                                  llama_perplexity):
    """`compare -m default -m Q8_0 -m Q4_0 --protocol llama-perplexity` against `llama-perplexity
    --kl-divergence-base` (the default model, once) then `--kl-divergence` with each quant: every figure."""
    text = (("The quick brown fox jumps over the lazy dog. It was a bright cold day in April, and the clocks were "
             "striking thirteen. Call me Ishmael. Some years ago, never mind how long precisely, having little or no "
             "money in my purse, I thought I would sail about a little and see the watery part of the world.")
            + "\n") * 8
    f = tmp_path / "text.txt"
    f.write_text(text, encoding="utf-8")
    ctx = 128
    common = ["-f", str(f), "-c", str(ctx), "-b", str(ctx), "-t", "2", "-fa", "on",
              "--kl-divergence-base", str(tmp_path / "base.kld")]
    subprocess.run([llama_perplexity, "-m", str(gemma_path)] + common, capture_output=True, timeout=600, check=True)
    tool = {}
    for q in (gemma_q8_path, gemma_q4_0_path):
        out = subprocess.run([llama_perplexity, "-m", str(q), "--kl-divergence"] + common, capture_output=True,
                             text=True, timeout=600)
        tool[q.name] = _tool_figures(out.stdout + out.stderr)
    res = cli("compare", "-m", gemma_path, "-m", gemma_q8_path, "-m", gemma_q4_0_path, "--file", f, "--ctx", ctx,
              "--batch", ctx, "--threads", 2, "--flash-attn", "on", "--protocol", "llama-perplexity", "--json",
              "--store", tmp_path / "c.db")
    ours = {Path_name(m["path"]): m["statistics"] for m in json.loads(res.stdout)["models"]}
    for name, figures in tool.items():
        s = ours[name]
        assert s["tokens"] == 252
        for label, key, unit in LLAMA_PERPLEXITY_LINES:
            mine = s[key] * (100 if unit else 1)
            assert abs(mine - figures[key]) <= _bound(key, figures[key]), (name, label, mine, figures[key])
            if key in WITH_ERROR:
                err, tool_err = s[WITH_ERROR[key]] * (100 if unit else 1), figures[WITH_ERROR[key]]
                assert abs(err - tool_err) <= 0.03 * tool_err + (5e-4 if unit else 5e-7), (name, label, err, tool_err)
        assert f"{s['same_top'] * 100:.3f}" == f"{figures['same_top']:.3f}"  # the same tokens, counted alike


def Path_name(p: str) -> str:
    from pathlib import Path

    return Path(p).name


def test_a_planned_model_gone_or_changed_is_refused(tmp_path):
    """A further model of a compare or eval run is loaded only as planned: a file that is gone, or whose sha256
    moved since planning, is refused before any load, in the run's own words."""
    from llamalens.errors import StoreError
    from llamalens.run.compare import load_compared
    from llamalens.run.evaluation import load_model

    f = tmp_path / "q.gguf"
    f.write_bytes(b"GGUF then something else")
    for load, run, again in ((load_compared, "comparison", "comparison"), (load_model, "eval run", "eval")):
        with pytest.raises(StoreError, match=f"a model of this {run}, is gone"):
            load({"path": str(tmp_path / "missing.gguf"), "sha256": "0" * 64}, None)
        with pytest.raises(StoreError, match=f"changed since this {run} was planned .*start a new {again}$"):
            load({"path": str(f), "sha256": "0" * 64}, None)

"""The sampler view of the llama.cpp chain (the report's sampler section and `next --chain llama.cpp`): every
stage's candidates, and what the stages that act on their own did at the position, each checked against a
reference computed here from the raw logits and the vendored llama-sampler.cpp's formulas:

- DRY: the penalty of every token, from a brute-force search for the repeats that emitting it would extend,
  multiplier * base^(length - allowed_length) (llama_sampler_dry_apply), on a history that holds the repeat;
- XTC at probability 1 with a fixed seed: fires and removes every token at or above the threshold but the least
  likely of them (llama_sample_xtc_apply);
- Mirostat 1 and 2: μ replayed along a sequence the same chain generated (μ0 = 2τ, μ -= η (surprise - τ) with
  the surprise of the picked token after the cut), and the cut (1: top k from μ; 2: -log2 p <= μ).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from llamalens.looks.next_token import sampler_view
from llamalens.core.engine import Engine, Request, generate
from llamalens.settings import SamplingSettings

from test_options import cli, js

OFF = dict(top_k=0, top_p=1.0, min_p=0.0)  # no truncation before the stage under test


def dry_reference(tokens: list[int], multiplier: float, base: float, allowed: int) -> dict[int, float]:
    """token -> DRY penalty: for every earlier token i, the length of the repeat that ends at i and equals the
    context's end (the longest common suffix of tokens[:i+1] and tokens); emitting tokens[i+1] would extend it.
    No sequence breaker in the context (the test checks), so repeats are not cut."""
    n, longest = len(tokens), {}
    if n <= allowed:
        return {}
    for i in range(n - 1):
        k = 0
        while i - k >= 0 and tokens[i - k] == tokens[n - 1 - k]:
            k += 1
        if k >= allowed:
            nxt = tokens[i + 1]
            longest[nxt] = max(longest.get(nxt, 0), k)
    return {t: multiplier * base ** (k - allowed) for t, k in longest.items()}


def test_dry_penalises_what_the_history_repeats(gemma):
    """The repeat is completed by the history (the generated tokens before the position), so DRY sees it only
    if the history was fed to it; the penalised tokens and amounts equal the formula's."""
    prompt, history = "Then the cat sat. the cat ran. the dog sat.", gemma.tokenize(" the cat", add_bos=False)
    cfg = SamplingSettings(chain="llama.cpp", dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2, seed=5, **OFF)
    view = sampler_view(gemma, prompt, history, [cfg], top=20)
    (chain,) = view.chains
    dry = next(s for s in chain.stages if s.stage == "dry")
    context = gemma.prompt_tokens(prompt) + history
    breakers = ("\n", ":", '"', "*")  # llama-server's default sequence breakers
    assert not any(b in gemma.token_text(t)[0] for t in context for b in breakers)
    want = dry_reference(context, 0.8, 1.75, 2)
    assert len(set(want.values())) >= 2, "the prompt should make DRY penalise tokens by different amounts"
    got = {t["id"]: -t["delta"] for t in dry.effect["tokens"]}
    assert dry.effect["moved"] == len(want) and set(got) == set(want)
    for t, pen in want.items():  # float32 logits of ~25 minus a float32 penalty: measured 7.6e-7; bound 1e-5
        assert got[t] == pytest.approx(pen, abs=1e-5)
    # the probabilities after DRY: softmax(raw - penalty), compared as ratios to the top survivor (raw logprobs)
    lp = np.array([a.logprob for a in view.top]) - np.array([want.get(a.id, 0.0) for a in view.top])
    q = np.array(dry.probs)
    j = int(np.argmax(q))
    expect = np.exp(lp - lp[j]) * q[j]
    assert np.allclose(q, expect, rtol=0, atol=1e-6)  # measured 5.6e-8 (float32 logits)
    without = sampler_view(gemma, prompt, [], [cfg], top=5).chains[0]
    assert next(s for s in without.stages if s.stage == "dry").effect["moved"] != dry.effect["moved"]


def test_xtc_at_probability_one_removes_all_but_the_least_likely_above(gemma):
    """XTC at probability 1 (seeded) fires at every position; with nothing before it, its input is the raw
    distribution, so it removes each raw token with p >= threshold but the least likely of them."""
    prompt, threshold = "Once upon a time", 0.03
    history = gemma.tokenize(" there was a", add_bos=False)  # replayed: XTC's draws at the earlier positions
    cfg = SamplingSettings(chain="llama.cpp", xtc_probability=1.0, xtc_threshold=threshold, seed=11, **OFF)
    view = sampler_view(gemma, prompt, history, [cfg, cfg.with_(xtc_probability=0.0)], top=20)
    stages = {s.stage: s for s in view.chains[0].stages}
    raw = np.exp([a.logprob for a in view.top])
    above = [a.id for a, p in zip(view.top, raw) if p >= threshold]
    assert len(above) >= 2 and raw[len(above)] < threshold  # all of them among the top 20
    e = stages["xtc"].effect
    assert e["fired"] and e["why"] is None and e["above"] == len(above)
    assert [t["id"] for t in e["removed"]] == above[:-1]
    assert stages["xtc"].survivors == gemma.n_vocab - (len(above) - 1)
    gone = raw[: len(above) - 1].sum()
    want = np.where(np.arange(len(raw)) < len(above) - 1, 0.0, raw / (1 - gone))
    assert np.allclose(stages["xtc"].probs, want, rtol=0, atol=1e-8)  # measured 1.0e-9
    for t, p in zip(e["removed"], raw):
        assert t["p"] == pytest.approx(p, abs=1e-8)  # measured 8.3e-10
    # at probability 0 it never fires, and says why
    xtc = next(s for s in view.chains[1].stages if s.stage == "xtc")
    assert not xtc.effect["fired"] and "off" in xtc.effect["why"] and xtc.survivors == gemma.n_vocab


def mirostat_reference(version: int, rows_lp: list[np.ndarray], picked: list[int], T: float, tau: float,
                       eta: float, m: int = 100):
    """(μ before the last row, tokens kept at the last row): temperature, then Mirostat as the vendored
    llama_sampler_mirostat_apply (1: top k from μ and the Zipf exponent s estimated on the m most likely) or
    llama_sampler_mirostat_v2_apply (2: the tokens with -log2 p <= μ, at least one) do it, along the picked tokens."""
    mu = 2 * tau
    for j, lp in enumerate(rows_lp):
        z = lp / T
        p = np.exp(z - z.max())
        p /= p.sum()
        order = np.lexsort((np.arange(len(p)), -p))
        ps = p[order]
        if version == 1:
            i = np.arange(min(m - 1, len(ps) - 1))
            t_i, b_i = np.log((i + 2) / (i + 1)), np.log(ps[i] / ps[i + 1])
            s_hat = (t_i * b_i).sum() / (t_i * t_i).sum()
            eps = s_hat - 1
            n = max(int((eps * 2 ** mu / (1 - len(p) ** -eps)) ** (1 / s_hat)), 1)
        else:
            over = -np.log2(ps) > mu
            n = max(1, int(np.argmax(over)) if over.any() else len(ps))
        if j == len(rows_lp) - 1:
            return mu, n
        kept = ps[:n] / ps[:n].sum()
        mu -= eta * (-math.log2(kept[int(np.flatnonzero(order[:n] == picked[j])[0])]) - tau)


@pytest.mark.parametrize("version", [1, 2])
def test_mirostat_mu_along_its_own_generation(tiny, version):
    """μ read at position k of a sequence the same chain and seed generated equals μ replayed with the formula
    on the sequence's full raw distributions; so does the cut. A history the chain did not sample: μ is not
    shown, and the reason is."""
    s = SamplingSettings(chain="llama.cpp", mirostat=version, mirostat_tau=3.0, mirostat_eta=0.2, temperature=0.9,
                         seed=4)
    prompt, k = "the cat", 6
    smp = generate(tiny, prompt, s, max_tokens=k, n_logprobs=tiny.n_vocab)
    ids = [t.id for t in smp.tokens]
    rows = []
    for t in smp.tokens:
        lp = np.full(tiny.n_vocab, -np.inf)
        for a in t.top:
            lp[a.id] = a.logprob  # the full raw log-distribution at that position
        rows.append(lp)
    view = sampler_view(tiny, prompt, ids[: k - 1], [s], top=10)
    miro = view.chains[0].stages[-1]
    assert [st.stage for st in view.chains[0].stages] == ["raw", "temperature", "mirostat"]
    mu, kept = mirostat_reference(version, rows, ids, 0.9, 3.0, 0.2)
    assert miro.effect["why"] is None and miro.effect["mu"] != pytest.approx(6.0)  # it moved from 2τ
    assert miro.effect["mu"] == pytest.approx(mu, abs=3e-6)  # float32 in llama.cpp: measured 2.9e-7 (1), 3.0e-7 (2)
    assert miro.effect["kept"] == miro.survivors == kept
    unlikely = [int(np.argmin(r)) for r in rows[:3]]  # tokens mirostat would hardly pick
    other = sampler_view(tiny, prompt, unlikely, [s], top=5).chains[0].stages[-1]
    assert other.effect["mu"] is None and "not sampled by this configuration" in other.effect["why"]


def test_next_chain_llama_cpp(tiny_path, tiny, tmp_path):
    """`next --chain llama.cpp`: llama-server's default chain alone without axes; axes over the llama.cpp settings
    give one column each, equal to sampler_view of the same settings; the stages' effects are printed."""
    d = js("next", "the cat sat on the mat. the cat sat on the", "--model", tiny_path, "--chain", "llama.cpp",
           "--top", 5, "--flash-attn", "off", "--swa-full", "on")
    (chain,) = d["chains"]
    assert chain["settings"]["chain"] == "llama.cpp" and chain["stages"][-1]["stage"] == "temperature"
    assert [st["stage"] for st in chain["stages"]][1:] == ["penalties", "dry", "top_n_sigma", "top_k", "typ_p",
                                                           "top_p", "min_p", "xtc", "temperature"]
    args = ("next", "the cat sat on the mat. the cat sat on the", "--model", tiny_path, "--chain", "llama.cpp",
            "--top", 8, "--flash-attn", "off", "--swa-full", "on", "--xtc-probability", "0,1", "--xtc-threshold",
            "0.004", "--dry-multiplier", "0.8", "--dry-allowed-length", "1", "--seed", 9, "--top-k", 0, "--top-p", 1,
            "--min-p", 0, "--min-keep", 1, "--mirostat-eta", "0.1")
    d = js(*args)
    assert len(d["chains"]) == 2
    cfgs = [SamplingSettings(chain="llama.cpp", xtc_probability=p, xtc_threshold=0.004, dry_multiplier=0.8,
                             dry_allowed_length=1, seed=9, top_k=0, top_p=1.0, min_p=0.0, min_keep=1) for p in (0.0, 1.0)]
    with_model = sampler_view(tiny, "the cat sat on the mat. the cat sat on the", [], cfgs, top=8)
    for got, want in zip(d["chains"], with_model.chains):
        assert got["settings"] == json.loads(json.dumps(want.settings))
        assert np.allclose(got["stages"][-1]["probs"], want.final.probs, atol=1e-6)
    dry = next(st for st in d["chains"][1]["stages"] if st["stage"] == "dry")["effect"]
    assert dry["moved"] >= 1 and all(t["delta"] < 0 for t in dry["tokens"])
    assert next(st for st in d["chains"][1]["stages"] if st["stage"] == "xtc")["effect"]["fired"]
    out = cli(*args[:-2]).stdout
    assert "| dry: penalised" in out and "| xtc: fired: removed" in out and "xtc: did not fire: off" not in out
    res = cli("next", "the cat", "--model", tiny_path, "--dry-multiplier", "0.8", ok=False)
    assert res.exit_code != 0 and "--chain llama.cpp" in res.output and "Traceback" not in res.output
    report = tmp_path / "next.html"
    cli("next", "the cat", "--model", tiny_path, "--chain", "llama.cpp", "--mirostat", "2", "--report", report)
    html = report.read_text(encoding="utf-8")
    assert "mirostat 2: μ = 10.0000 bits" in html and "penalties → top_k → typical_p" not in html


def test_dry_during_generation_against_a_numpy_dry(tmp_path):
    """Greedy generation through the llama.cpp chain with DRY: at every step the chosen token is the argmax of
    llama-cpp-python's raw logits minus dry_reference's penalties over the prompt and the tokens generated so far
    (llama-server's chain sees the prompt). The prompt repeats its start after the model's own greedy continuation
    of it, so what DRY penalises depends on the chain having seen the prompt; DRY changes the pick at some steps
    (the check has teeth). The tiny model without byte tokens: its word pieces hold no sequence breaker, which dry_reference
    leaves out."""
    from llama_cpp import Llama

    from llamalens.core.runtime import Model, ModelOptions
    from tiny_gguf import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "small.gguf", byte_tokens=False)
    llm = Llama(str(path), n_ctx=256, logits_all=True, verbose=False, flash_attn=False)
    start = "the cat sat on"
    cfg = SamplingSettings(chain="llama.cpp", dry_multiplier=5.0, dry_base=2.0, dry_allowed_length=1,
                           dry_penalty_last_n=128, temperature=0.0, seed=1, **OFF)
    with Model(path, ModelOptions(ctx=256, flash_attn="off")) as model:
        greedy = generate(model, start, SamplingSettings(temperature=0.0), max_tokens=8, n_logprobs=1)
        head = model.prompt_tokens(start)
        context = head + [t.id for t in greedy.tokens] + head[1:]  # BOS, start, its continuation, start again
        (sample,) = Engine(model, 1).run([Request(start, cfg, 40, 1, prompt_tokens=list(context))])
        texts = [model.token_text(i)[0] for i in range(model.n_vocab)]
    assert len(context) + len(sample.tokens) < cfg.dry_penalty_last_n  # the whole context is in DRY's window
    assert not any(b in t for t in texts for b in cfg.dry_sequence_breakers)
    changed = []
    for t in sample.tokens:
        llm.reset()
        llm.eval(context)
        raw = np.array(llm.scores[len(context) - 1], dtype=np.float64)
        pen = dry_reference(context, 5.0, 2.0, 1)
        after = raw - np.array([pen.get(i, 0.0) for i in range(len(raw))])
        best = np.flatnonzero(after >= after.max() - 1e-4)  # float32 logits: a near tie may go either way
        assert t.id in best, (len(context), t.id, int(np.argmax(after)))
        changed.append(int(np.argmax(raw)) != t.id)
        context = context + [t.id]
        if t.eog:
            break
    assert sum(changed) >= 2  # measured 3

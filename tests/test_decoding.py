"""Decoding strategies: beam search against exhaustive search and greedy, no-repeat-ngram
blocking (greedy, sampling, beams), best-of-N, the strategy axes of a sweep, and what show / export / the
report make of them. References are computed here: numpy log-softmax of logits decoded one sequence at a
time (tests/reference.py), brute-force n-gram checks, and the engine's own greedy path."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from llamalens.run import grid
from llamalens.core.beam import beam_search
from llamalens.cli import main
from llamalens.core.strategies import banned_tokens, distinct_n, hypothesis_score, repeated_ngrams, sequence_metrics
from llamalens.core.engine import generate
from llamalens.errors import InvalidSettings
from llamalens.core.runtime import Model, ModelOptions, round_ctx
from llamalens.settings import SamplingSettings
from llamalens.store import Store
from llamalens.run.sweep import SweepSpec, execute, start_sweep
from reference import log_softmax
from tiny_gguf import write_tiny_gguf

BEAM = SamplingSettings(strategy="beam")


def run(*args, ok=True):
    res = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, res.output
    return res


def bigrams(ids):
    return [tuple(ids[i:i + 2]) for i in range(len(ids) - 1)]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The tiny model without its 256 byte tokens: a 56-token vocabulary, one beam per token."""
    path = write_tiny_gguf(tmp_path_factory.mktemp("small") / "small.gguf", byte_tokens=False)
    with Model(path, ModelOptions(ctx=256, flash_attn="off")) as m:
        yield m


# -- pure functions ---------------------------------------------------------------------------------
def test_banned_tokens_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(200):
        hist = rng.integers(0, 4, size=int(rng.integers(0, 12))).tolist()
        for n in (1, 2, 3):
            ref = {t for t in range(4) if len(hist) + 1 >= n and any(
                tuple(hist[i:i + n]) == tuple(hist[len(hist) + 1 - n:] + [t]) for i in range(len(hist) - n + 1))}
            assert banned_tokens(hist, n) == ref, (hist, n)
    assert banned_tokens([1, 2, 3], 0) == set()


def test_sequence_metrics_by_hand():
    ids = [5, 6, 5, 6, 5, 6, 7]
    m = sequence_metrics([-1.0] * 7 + [-0.5], ids + [2], [False] * 7 + [True])
    assert m["seq_logprob"] == -7.5 and m["length"] == 8 and m["mean_logprob"] == -7.5 / 8
    assert m["distinct_1"] == 3 / 7 and m["distinct_2"] == 3 / 6  # (5,6) (6,5) (6,7)
    # 4-grams 5656 6565 5656 6567: the third repeats the first
    assert repeated_ngrams(ids, 4) == 1 and m["rep_4"] == 1 / 4
    assert distinct_n([1, 1, 1], 2) == 0.5
    assert math.isnan(distinct_n([1], 2))
    assert hypothesis_score(-6.0, 3, 1.0) == -2.0 and hypothesis_score(-6.0, 3, 0.0) == -6.0
    assert hypothesis_score(-1.0, 0, 2.0) == -1.0  # length 0 counts as 1 (transformers divides by zero)


# -- beam search ------------------------------------------------------------------------------------
def _rows_one_at_a_time(model, prompt_ids, prefixes):
    """float64 log-softmax of the next-token row after prompt + each prefix, each prefix decoded alone (one
    sequence, one token per decode call) after the prompt's cells."""
    out = {}
    longest = max(len(p) for p in prefixes)
    with model.context(n_ctx=round_ctx(len(prompt_ids) + longest + 1)) as ctx:
        row = ctx.prefill(prompt_ids)
        for pre in prefixes:
            ctx.seq_rm(0, len(prompt_ids), -1)
            r = row
            for i, tok in enumerate(pre):
                ctx.decode([tok], [len(prompt_ids) + i], [0], [1])
                r = ctx.logits(0)
            out[tuple(pre)] = log_softmax(r)
    return out


def test_beam_with_a_beam_per_token_finds_the_exhaustive_optimum(small):
    """Depth 2, beams = vocabulary size, length_penalty 0 (score = sum of logprobs): every first token is
    kept, so the best of all V x V continuations (or an end token at once) must come out on top."""
    prompt = "the cat"
    ptoks = small.prompt_tokens(prompt)
    V, eos = small.n_vocab, small.eos
    rows = _rows_one_at_a_time(small, ptoks, [()] + [(a,) for a in range(V) if not small.is_eog(a)])
    best, best_seq = -math.inf, None
    for a in range(V):
        first = rows[()][a]
        if small.is_eog(a):
            cand = [(first, (a,))]
        else:
            second = rows[(a,)]
            b = int(np.argmax(second))
            cand = [(first + second[b], (a, b))]
        for score, seq in cand:
            if score > best:
                best, best_seq = score, seq
    s = BEAM.with_(beams=V, length_penalty=0.0, num_return=3)
    res = beam_search(small, prompt, s, max_tokens=2, n_logprobs=2, exact=True)
    assert tuple(t.id for t in res.sample.tokens) == best_seq
    # one sequence at a time on both sides; RowStats' float32 exp against float64: measured |d| 4.4e-7
    assert abs(res.hypotheses[0].score - best) < 5e-6
    assert eos not in [t.id for t in res.sample.tokens[:-1]]
    # batched: all beams in one decode call per step, the same answer
    batched = beam_search(small, prompt, s, max_tokens=2, n_logprobs=2)
    assert [t.id for t in batched.sample.tokens] == list(best_seq)
    assert abs(batched.hypotheses[0].score - best) < 2e-5  # measured 1.2e-6
    assert batched.decode_calls == 1 and res.decode_calls == V - 1  # one step decoded, every live beam in one call


def test_beam_width_one_is_greedy(tiny):
    for prompt in ("the cat", "hello"):
        g = generate(tiny, prompt, SamplingSettings(temperature=0), max_tokens=12, n_logprobs=3)
        b = beam_search(tiny, prompt, BEAM.with_(beams=1), max_tokens=12, n_logprobs=3)
        assert [t.id for t in b.sample.tokens] == [t.id for t in g.tokens]
        assert b.sample.text == g.text
        assert [t.logprob for t in b.sample.tokens] == pytest.approx([t.logprob for t in g.tokens], abs=1e-6)


@pytest.mark.parametrize("lp", [0.0, 0.6, 2.0])
def test_beam_scores_are_sums_of_recorded_logprobs_with_the_length_penalty(tiny, lp):
    res = beam_search(tiny, "the cat", BEAM.with_(beams=4, length_penalty=lp, num_return=4), max_tokens=10,
                      n_logprobs=2)
    assert len(res.hypotheses) == 4
    scores = [h.score for h in res.hypotheses]
    assert scores == sorted(scores, reverse=True)
    for h in res.hypotheses:
        total = sum(t.logprob for t in h.tokens)
        n = len(h.tokens) - (1 if h.tokens[-1].eog else 0)  # the end token's logprob counts, not its length
        assert h.length == n and abs(h.sum_logprob - total) < 1e-9
        assert abs(h.score - total / max(n, 1) ** lp) < 1e-9
    # and the recorded logprobs are the model's: the best hypothesis re-decoded one token at a time, numpy
    # log-softmax (batched F32 against single: measured |d| ~1e-6)
    h = res.hypotheses[0]
    ref = _rows_one_at_a_time(tiny, tiny.prompt_tokens("the cat"), [[t.id for t in h.tokens[:i]]
                                                                    for i in range(len(h.tokens))])
    for i, t in enumerate(h.tokens):
        assert abs(t.logprob - ref[tuple(x.id for x in h.tokens[:i])][t.id]) < 1e-5


def test_beam_finds_likelier_text_than_greedy_and_forks_share_cells(tiny):
    g = generate(tiny, "hello", SamplingSettings(temperature=0), max_tokens=16)
    b = beam_search(tiny, "hello", BEAM.with_(beams=5, length_penalty=0.0), max_tokens=16)
    assert sum(t.logprob for t in b.sample.tokens) >= sum(t.logprob for t in g.tokens) - 1e-9
    assert b.decode_calls <= 15 and b.scored_tokens <= 5 * 15  # one decode call per step for every beam
    assert any(st["dropped"] for st in b.steps)  # beams pruned each other somewhere, and it is recorded
    for st in b.steps:
        assert len(st["live"]) <= 5 and all(0 <= p < 5 for p, _, _ in st["live"])


def test_early_stopping_rules(tiny):
    """true stops once `beams` hypotheses ended; never / false search at least as long (transformers)."""
    out = {}
    for rule in ("true", "false", "never"):
        out[rule] = beam_search(tiny, "the", BEAM.with_(beams=3, early_stopping=rule), max_tokens=24)
    assert len(out["true"].steps) <= len(out["false"].steps) <= len(out["never"].steps)
    assert out["never"].hypotheses[0].score >= out["true"].hypotheses[0].score - 1e-9


# -- no-repeat-ngram --------------------------------------------------------------------------------
LOOP = "I enjoy walking with my cute dog"  # greedy loops on the default model: "I'm not a fan of the dog park, ..."


def test_no_repeat_ngram_on_the_default_model(gemma):
    ptoks = gemma.prompt_tokens(LOOP)
    plain = generate(gemma, LOOP, SamplingSettings(temperature=0), max_tokens=20)
    ids = [t.id for t in plain.tokens]
    grams = bigrams(ptoks + ids)
    assert len(set(grams)) < len(grams), "greedy no longer loops on this prompt; pick another"
    blocked = generate(gemma, LOOP, SamplingSettings(temperature=0, no_repeat_ngram=2), max_tokens=20)
    bids = [t.id for t in blocked.tokens]
    grams = bigrams(ptoks + bids)
    assert len(set(grams)) == len(grams)
    # the first difference is a block: greedy's token there is among the blocked ones, and every blocked id
    # is one that would have repeated a bigram
    first = next(i for i, (a, b) in enumerate(zip(ids, bids)) if a != b)
    assert ids[first] in blocked.tokens[first].blocked
    for i, t in enumerate(blocked.tokens):
        assert set(t.blocked) == banned_tokens(ptoks + bids[:i], 2)
        assert t.id not in t.blocked
        assert t.rank >= 1 and t.logprob <= 0  # still the raw distribution's figures


def test_no_repeat_ngram_with_sampling_and_beams(tiny):
    ptoks = tiny.prompt_tokens("the cat")
    for s in (SamplingSettings(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=3, no_repeat_ngram=2),
              BEAM.with_(beams=4, no_repeat_ngram=2)):
        if s.strategy == "beam":
            toks = beam_search(tiny, "the cat", s, max_tokens=30).sample.tokens
        else:
            toks = generate(tiny, "the cat", s, max_tokens=30).tokens
        ids = ptoks + [t.id for t in toks]
        assert len(set(bigrams(ids))) == len(bigrams(ids))
    for n in (3,):
        toks = beam_search(tiny, "the cat", BEAM.with_(beams=3, no_repeat_ngram=n), max_tokens=30).sample.tokens
        ids = ptoks + [t.id for t in toks]
        assert repeated_ngrams(ids, 3) == 0


# -- settings, grid, sweep ----------------------------------------------------------------------------
def test_strategy_axes_normalize_and_dedupe():
    axes = grid.parse_axes({"strategy": "greedy,beam,sample", "beams": "3,5", "no_repeat_ngram": "0,2",
                            "temperature": "0.7", "best_of": None})
    configs = grid.expand(axes)
    labels = [c.label(seed=False) for c in configs]
    assert len(configs) == len(set(configs)) == 2 + 4 + 2  # greedy ignores --beams; sample ignores beams
    assert "greedy" in labels and "beam=5 lp=1 no-repeat=2" in labels
    assert all(c.temperature == 0.0 for c in configs if c.strategy != "sample")
    assert grid.build_configs("beam5-norepeat")[0].label(seed=False) == "beam=5 lp=1 early=true no-repeat=2"
    with pytest.raises(InvalidSettings, match="strategy 'bogus'.*greedy, beam"):
        grid.check(grid.expand({"strategy": ["bogus"]}), [0])
    with pytest.raises(InvalidSettings, match="num-return 6 .*beams"):
        SamplingSettings(strategy="beam", beams=5, num_return=6).validate()
    with pytest.raises(InvalidSettings, match="beams 0"):
        grid.check(grid.expand({"strategy": ["beam"], "beams": [0]}), [0])


def test_grid_file_with_strategies(tmp_path):
    f = tmp_path / "g.toml"
    f.write_text('[grid.d]\nstrategy = ["greedy", "beam"]\nno_repeat_ngram = [0, 2]\n'
                 'fixed = { early_stopping = "true" }\n')
    configs = grid.build_configs(None, str(f))
    assert {c.label(seed=False) for c in configs} == {"greedy", "greedy no-repeat=2", "beam=5 lp=1 early=true",
                                                      "beam=5 lp=1 early=true no-repeat=2"}
    f.write_text('[grid.d]\nstrategy = [1]\n')
    with pytest.raises(InvalidSettings, match="not a text"):
        grid.load_grid_file(str(f))


def _mixed(**kw):
    configs = grid.expand({"strategy": ["greedy", "beam", "sample"], "beams": [3], "no_repeat_ngram": [0, 2],
                           "best_of": [1, 3], "temperature": [0.9]})
    return SweepSpec(prompts=["the cat", "hello"], configs=configs, seeds=[1, 2], max_tokens=8, n_logprobs=2,
                     **kw)


def test_mixed_sweep_exact_equals_one_at_a_time_and_resumes(tiny, tmp_path):
    """An --exact mixed grid: every sample equals its strategy run alone; interrupted and resumed, the same."""
    store = Store(tmp_path / "s.db")
    spec = _mixed(exact=True)
    run_id = start_sweep(tiny, store, spec)
    calls = []

    def stop_after_3(prog):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    from llamalens.run.sweep import SweepInterrupted

    with pytest.raises(SweepInterrupted):
        execute(tiny, store, run_id, stop_after_3)
    assert store.run(run_id).n_done == 3
    execute(tiny, store, run_id)
    info = store.run(run_id)
    assert (info.status, info.n_done, info.kind) == ("done", info.n_samples, "sweep")
    kinds = set()
    for s in store.samples(run_id):
        cfg = spec.configs[s.config_idx].with_(seed=s.seed)
        got = [t for _, t in store.tokens(run_id, s.sample_idx)]
        if cfg.strategy == "beam":
            ref = beam_search(tiny, s.prompt, cfg, max_tokens=8, n_logprobs=2, exact=True)
            assert s.extra["strategy"] == "beam" and len(s.extra["hypotheses"]) == 1
            assert s.extra["hypotheses"][0]["ids"] == [t.id for t in ref.sample.tokens]
            ref_tokens, ref_text = ref.sample.tokens, ref.sample.text
            kinds.add("beam")
        elif cfg.best_of > 1:
            from llamalens.core.strategies import draw_seed

            draws = [generate(tiny, s.prompt, cfg.with_(seed=draw_seed(s.seed, i, 3)), max_tokens=8, n_logprobs=2)
                     for i in range(3)]
            sums = [sum(t.logprob for t in d.tokens) for d in draws]
            win = int(np.argmax(sums))
            assert s.extra["winner"] == win and [d["rank"] for d in s.extra["draws"]][win] == 1
            assert [d["seq_logprob"] for d in s.extra["draws"]] == pytest.approx(sums, abs=1e-9)
            ref_tokens, ref_text = draws[win].tokens, draws[win].text
            kinds.add("best_of")
        else:
            ref = generate(tiny, s.prompt, cfg, max_tokens=8, n_logprobs=2)
            ref_tokens, ref_text = ref.tokens, ref.text
            kinds.add(cfg.strategy)
        assert [t.id for t in got] == [t.id for t in ref_tokens] and s.text == ref_text
        assert all(abs(a.logprob - b.logprob) < 1e-9 for a, b in zip(got, ref_tokens))
    assert kinds == {"beam", "best_of", "greedy", "sample"}


def test_stop_strings_are_refused_with_beams(tiny, tmp_path):
    with pytest.raises(InvalidSettings, match="--stop does not apply to beam search"):
        start_sweep(tiny, Store(tmp_path / "s.db"), _mixed(stop=("x",)))


def test_cli_strategies_show_export_report(tiny_path, tmp_path):
    store = tmp_path / "s.db"
    res = run("sweep", "the cat", "--strategy", "greedy,beam,sample", "--beams", "3", "--length-penalty", "0.6,1.0",
              "--no-repeat-ngram", "0,2", "--best-of", "1,2", "--best-of-by", "mean", "--early-stopping", "never",
              "--num-return", "2", "-t", "0.8", "--seeds", "2", "-n", "6", "--store", store, "-m", tiny_path,
              "--report", tmp_path / "d.html")
    assert "decoding strategies" in res.output and "beam=3 lp=0.6 early=never return=2 no-repeat=2" in res.output
    html = (tmp_path / "d.html").read_text()
    assert "Decoding strategies side by side" in html and "pruned at step" in html and "Best-of-N" in html
    # the header's grid names the strategy axis; no fixed setting claims a strategy
    assert "strategy ∈ {" in html and "strategy=" not in html.split("fixed settings", 1)[1].split("</tr>", 1)[0]
    run("export", "1", "--format", "jsonl", "-o", tmp_path / "x.jsonl", "--store", store)
    rows = [json.loads(line) for line in (tmp_path / "x.jsonl").read_text().splitlines()]
    beams = [r for r in rows if r["settings"].get("strategy") == "beam"]
    assert beams and all(len(r["extra"]["hypotheses"]) == 2 for r in beams)
    blocked = [r for r in rows if r["settings"].get("no_repeat_ngram") == 2]
    assert any(t["blocked"] for r in blocked for t in r["tokens"])
    run("export", "1", "--format", "csv", "-o", tmp_path / "x.csv", "--store", store)
    import pandas as pd

    df = pd.read_csv(tmp_path / "x.csv")
    assert {"strategy", "beams", "no_repeat_ngram", "blocked"} <= set(df.columns)
    res = run("generate", "the cat", "-m", tiny_path, "-t", "0", "--no-repeat-ngram", "2", "-n", "8", "--json")
    out = json.loads(res.output[res.output.index("{"):])
    assert out["settings"]["no_repeat_ngram"] == 2
    ids = [t["id"] for t in out["tokens"]]
    assert len(set(bigrams(ids))) == len(ids) - 1
    bad = run("sweep", "x", "--strategy", "beams", "-m", tiny_path, "--store", store, ok=False)
    assert bad.exit_code != 0 and "strategy 'beams' is out of range" in bad.output and "Traceback" not in bad.output


# -- beam results as stored ----------------------------------------------------------------------------
# tests/data/beams-tiny.json holds beam_search's results on the tiny models, as the search gave them when it had a
# decode loop of its own (before it became a policy of the engine's scheduler); rewrite it (beam_digests below)
# only when the search's results change on purpose.
BEAM_CASES = [  # (model, prompt, settings, max_tokens, n_logprobs, exact)
    ("tiny", "the cat", dict(beams=4, length_penalty=0.6, num_return=4), 10, 2, False),
    ("tiny", "the cat", dict(beams=4, length_penalty=2.0, num_return=4), 10, 2, True),
    ("tiny", "the", dict(beams=3, early_stopping="never"), 24, 2, False),
    ("tiny", "the cat", dict(beams=3, no_repeat_ngram=2), 30, 2, False),
    ("small", "hello", dict(beams=8, no_repeat_ngram=1), 40, 1, False),
]


def beam_digests(models: dict, search=beam_search) -> list[dict]:
    """Everything a beam search returns but its timings, per BEAM_CASES case (floats as JSON keeps them: exactly)."""
    def tokens(recs):
        return [[t.id, t.logprob, t.rank, t.entropy, t.candidates, [a.id for a in t.top], t.blocked] for t in recs]

    out = []
    for name, prompt, kw, max_tokens, n_logprobs, exact in BEAM_CASES:
        m = models[name]
        r = search(m, prompt, BEAM.with_(**kw), max_tokens=max_tokens, n_logprobs=n_logprobs, exact=exact)
        out.append({"text": r.sample.text, "finish": r.sample.finish_reason, "tokens": tokens(r.sample.tokens),
                    "hypotheses": [dict(h.to_dict(m), tokens=tokens(h.tokens)) for h in r.hypotheses],
                    "steps": r.steps, "decode_calls": r.decode_calls, "scored_tokens": r.scored_tokens})
    return out


def _close(a, b, path="") -> None:
    """a == b, floats within 1e-5 (measured here: identical; the margin is for another CPU's float32 kernels)."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-5), path
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    else:
        assert a == b, path


def test_beam_results_equal_the_stored_ones(tiny, small):
    from conftest import ROOT

    stored = json.loads((ROOT / "tests" / "data" / "beams-tiny.json").read_text())
    got = json.loads(json.dumps(beam_digests({"tiny": tiny, "small": small})))
    assert len(got) == len(stored) == len(BEAM_CASES)
    for i, (g, s) in enumerate(zip(got, stored)):
        _close(g, s, f"case {i}")

"""Confidence measures and calibration, each against an independent computation: the per-token Rényi divergence
from the model's own logits (llama-cpp-python's Llama.scores) in float64, the per-sample measures from the same
rows, AUROC / Brier / reliability bins against scikit-learn, ECE and PRR by hand; then the store, `show`, `export`,
the report, the API and `calibrate` end to end."""

from __future__ import annotations

import json
import re
import math

import numpy as np
import pytest
from click.testing import CliRunner

from llamalens.cli import main
from llamalens.core import calibration as cal
from llamalens.core import confidence as conf
from llamalens.core.engine import generate
from llamalens.errors import InvalidInput
from llamalens.records import Alternative, TokenRecord
from llamalens.settings import SamplingSettings
from reference import log_softmax


def _renyi_ref(logits) -> float:
    """D_1/2(p || uniform) = log V - 2 log sum sqrt(p), float64 from the raw logits."""
    lsm = log_softmax(logits)
    return float(math.log(len(lsm)) - 2 * math.log(np.exp(lsm / 2).sum()))


def _fr_ref(logits) -> float:
    """The Fisher–Rao distance 2 arccos(sum sqrt(p_i / V)), float64."""
    lsm = log_softmax(logits)
    return float(2 * math.acos(min(1.0, np.exp(lsm / 2).sum() / math.sqrt(len(lsm)))))


# -- one row ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [312, 32000, 262144])
def test_renyi_of_a_row_matches_float64(n, row_kernel):
    """The C pass and numpy's against float64 from the logits: a flat row, a spread one, a peaked one, one with banned
    (-inf) tokens. Measured: at most 3.3e-8 nats apart (float32 exp terms, float64 sums); tolerance 5e-7."""
    from llamalens.core.stats import logsumexp

    rng = np.random.default_rng(n)
    rows = [np.zeros(n, np.float32), (rng.standard_normal(n) * 3).astype(np.float32),
            (rng.standard_normal(n) * 30).astype(np.float32)]
    banned = (rng.standard_normal(n) * 2).astype(np.float32)
    banned[::3] = -np.inf
    rows.append(banned)
    for row in rows:
        lse = logsumexp(row.astype(np.float64))
        got = conf.renyi_to_uniform(row, lse, native=row_kernel == "C kernel")
        finite = row[np.isfinite(row)]
        want = _renyi_ref(finite) + math.log(n / len(finite))  # banned tokens: p = 0, still counted in V
        assert abs(got - want) < 5e-7, (n, got, want)
        assert abs(conf.fisher_rao(got) - 2 * math.acos(math.exp(-want / 2))) < 5e-6
    assert conf.renyi_to_uniform(rows[0], float("nan")) is None


def test_kernel_and_numpy_agree_on_a_row():
    """The two passes of one row (float32 exp terms within 2 ulp of each other, float64 sums): measured 2.4e-8
    relative apart; tolerance 3e-7."""
    rng = np.random.default_rng(7)
    row = (rng.standard_normal(262144) * 4).astype(np.float32)
    c = float(row.max()) + 3.0
    a, b = conf.half_sum(row, c, native=True), conf.half_sum(row, c, native=False)
    assert abs(a - b) <= 3e-7 * b


# -- the engine's records against the model's own logits ------------------------------------------------------------
def _eval_rows(ll, prompt_ids, ids):
    """llama-cpp-python's raw logits row before each generated token (Llama.scores, logits_all): the prompt, then
    one token a call, as a generation decodes them."""
    ll.reset()
    ll.eval(list(prompt_ids))
    for t in ids[:-1]:
        ll.eval([t])
    n = len(prompt_ids)
    return np.array(ll.scores[n - 1:n - 1 + len(ids)], dtype=np.float64)


def _check_sample(model, ll, prompt, settings, n):
    """Each token's Rényi and the sample's measures against numpy on llama-cpp-python's rows, decoded one token a
    call as the engine decodes them. Measured: Rényi within 4.5e-8 nats (tiny model) and 3.9e-8 (Gemma), logprobs
    within 4.2e-8, entropies within 5.1e-8; tolerance 5e-7 a token (sums: 5e-7 a token)."""
    s = generate(model, prompt, settings, max_tokens=n, n_logprobs=4)
    toks = s.tokens
    rows = _eval_rows(ll, s.prompt_token_ids, [t.id for t in toks])
    lsm = [log_softmax(r) for r in rows]
    for t, r in zip(toks, rows):
        assert t.renyi is not None and abs(t.renyi - _renyi_ref(r)) < 5e-7
    m = conf.sample_measures(toks)
    lp = np.array([row[t.id] for t, row in zip(toks, lsm)])
    ent = np.array([-(np.exp(row) * row).sum() for row in lsm])
    top2 = [np.sort(np.exp(row))[-2:] for row in lsm]
    assert abs(m["seq_logprob"] - lp.sum()) < 5e-7 * len(toks)
    assert abs(m["perplexity"] - math.exp(-lp.mean())) < 5e-7 * m["perplexity"]
    assert abs(m["mean_entropy"] - ent.mean()) < 5e-7 and abs(m["max_entropy"] - ent.max()) < 5e-7
    assert abs(m["min_prob"] - np.exp(lp.min())) < 5e-7
    assert abs(m["mean_margin"] - np.mean([b - a for a, b in top2])) < 5e-7
    assert abs(m["mean_renyi"] - np.mean([_renyi_ref(r) for r in rows])) < 5e-7
    assert abs(m["mean_fisher_rao"] - np.mean([_fr_ref(r) for r in rows])) < 5e-7
    return s


@pytest.fixture(scope="module")
def tiny_llama(tiny_path):
    from llama_cpp import Llama

    return Llama(str(tiny_path), logits_all=True, n_ctx=256, verbose=False, flash_attn=False)


@pytest.mark.parametrize("settings", [SamplingSettings(temperature=0), SamplingSettings(seed=3, top_k=0, top_p=1.0)])
def test_tiny_measures_match_llama_cpp_python(tiny, tiny_llama, settings):
    _check_sample(tiny, tiny_llama, "Hello", settings, 12)


def test_default_model_measures_match_llama_cpp_python(gemma, gemma_llama):
    s = _check_sample(gemma, gemma_llama, "Q: What is the capital of France?\nA:", SamplingSettings(temperature=0), 8)
    assert all(0 < t.renyi < math.log(gemma.n_vocab) for t in s.tokens)


# -- spans and agreement (pure) --------------------------------------------------------------------------------------
def _rec(pos, text, lp, top=()) -> TokenRecord:
    raw = text.encode()
    return TokenRecord(pos, pos, text, raw.hex(), lp, 0.0, 1, 0.5 + pos, 1,
                       [Alternative(i, "x", "78", v) for i, v in enumerate(top)], renyi=1.0 + pos)


def test_answer_span_picks_the_tokens_of_the_match():
    toks = [_rec(0, " The", -0.1), _rec(1, " answer", -0.2), _rec(2, " is", -0.3), _rec(3, " Par", -1.0),
            _rec(4, "is", -0.5), _rec(5, ".", -0.05)]
    span, text = conf.answer_span(toks, r"answer is (\w+)")
    assert text == "Paris" and [t.position for t in span] == [3, 4]
    m = conf.sample_measures(span)
    assert m["seq_logprob"] == pytest.approx(-1.5) and m["min_prob"] == pytest.approx(math.exp(-1.0))
    assert m["mean_renyi"] == pytest.approx(4.5) and m["max_entropy"] == pytest.approx(4.5)
    assert math.isnan(m["mean_margin"])  # no stored alternatives: no margin, not a wrong one
    assert conf.answer_span(toks, r"(\d+)") == ([], None)
    whole, text = conf.answer_span(toks, None)
    assert len(whole) == 6 and text == " The answer is Paris."
    # a match inside one token takes that token
    span, text = conf.answer_span(toks, "swe")
    assert [t.position for t in span] == [1] and text == "swe"
    with pytest.raises(InvalidInput, match="not a valid regular expression"):
        conf.check_answer_regex("(")


def test_agreement_of_a_prompts_answers():
    a = conf.agreement(["Paris", "Paris.", " paris", "London"])
    assert a["distinct_share"] == pytest.approx(4 / 4)  # exact texts: four different strings
    # lexical clusters: {paris: 3, london: 1}
    assert a["cluster_entropy"] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    same = conf.agreement(["yes", "yes"])
    assert same["distinct_share"] == 0.5 and same["cluster_entropy"] == 0.0


# -- calibration figures ---------------------------------------------------------------------------------------------
def test_calibration_figures_match_scikit_learn():
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss, roc_auc_score

    rng = np.random.default_rng(3)
    p = rng.random(400)
    y = (rng.random(400) < p).astype(int)
    ties = np.round(p, 1)  # ties, for the AUROC's tie rule
    assert cal.auroc(ties, y) == pytest.approx(roc_auc_score(y, ties), abs=1e-12)
    assert cal.auroc(p, y) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert cal.brier(p, y) == pytest.approx(brier_score_loss(y, p), abs=1e-12)
    bins = cal.reliability(p, y, 10)  # no value on an edge: scikit-learn puts an edge in the lower bin, we the upper
    acc, mean = calibration_curve(y, p, n_bins=10, strategy="uniform")
    assert [b.accuracy for b in bins if b.n] == pytest.approx(acc.tolist())
    assert [b.mean_prob for b in bins if b.n] == pytest.approx(mean.tolist())
    counts = np.histogram(p, bins=10, range=(0, 1))[0]
    manual = sum(c / 400 * abs(a - m) for c, a, m in zip(counts[counts > 0], acc, mean))
    assert cal.ece(bins) == pytest.approx(manual, abs=1e-12)


def test_prr_and_coverage_by_hand():
    y = [1, 0, 1, 1, 0]
    s = [0.9, 0.8, 0.7, 0.2, 0.1]
    # kept k = 1..5 best-first: 1/1, 1/2, 2/3, 3/4, 3/5
    assert cal.coverage_curve(s, y).tolist() == pytest.approx([1, 1 / 2, 2 / 3, 3 / 4, 3 / 5])
    a_score = np.mean([1, 1 / 2, 2 / 3, 3 / 4, 3 / 5])
    a_oracle = np.mean([1, 1, 1, 3 / 4, 3 / 5])
    assert cal.prr(s, y) == pytest.approx((a_score - 0.6) / (a_oracle - 0.6))
    assert cal.prr(y, y) == pytest.approx(1.0)
    # a tie counts at its mean accuracy, whatever the sort's order
    assert cal.coverage_curve([0.5, 0.5], [1, 0]).tolist() == pytest.approx([0.5, 0.5])
    assert math.isnan(cal.prr([0.1, 0.2], [1, 1])) and math.isnan(cal.auroc([0.1, 0.2], [0, 0]))


# -- a stored run: store, show, export, report, API ------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_store(tiny_path, tmp_path_factory):
    store = tmp_path_factory.mktemp("conf") / "runs.db"
    r = CliRunner().invoke(main, ["sweep", "Hello", "-t", "0,1.0", "--top-k", "0", "--top-p", "1.0", "--seeds", "3",
                                  "-n", "8", "--name", "conf", "--store", str(store), "-m", str(tiny_path)])
    assert r.exit_code == 0, r.output
    return store


def test_a_run_carries_confidence_everywhere(run_store, tmp_path):
    import llamalens as ll

    run = ll.open_run("conf", store=str(run_store))
    table = run.confidence()
    assert len(table) == 6 and table.mean_renyi.notna().all()
    for s in run.loaded.samples:  # the stored figure is the one the sample's tokens give
        m = conf.sample_measures(run.loaded.by_sample[s.sample_idx])
        row = table[table.sample_idx == s.sample_idx].iloc[0]
        assert row.seq_logprob == pytest.approx(m["seq_logprob"]) and row.mean_renyi == pytest.approx(m["mean_renyi"])
    greedy = table[table.config_idx == 0]
    assert (greedy.distinct_share == 1 / 3).all() and (greedy.cluster_entropy == 0).all()
    r = CliRunner().invoke(main, ["show", "conf", "--store", str(run_store), "--json", "--answer", r"(\S+)"])
    shown = json.loads(r.output)["confidence"]
    assert shown["answer"] == r"(\S+)" and len(shown["samples"]) == 6
    r = CliRunner().invoke(main, ["show", "conf", "--store", str(run_store)])
    assert r.exit_code == 0 and "confidence of each answer" in r.output and "Rényi" in r.output
    out = tmp_path / "t.jsonl"
    r = CliRunner().invoke(main, ["export", "conf", "--store", str(run_store), "--format", "jsonl", "-o", str(out)])
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert all(x["confidence"]["mean_fisher_rao"] > 0 for x in lines)
    csv_out = tmp_path / "t.csv"
    r = CliRunner().invoke(main, ["export", "conf", "--store", str(run_store), "--format", "csv", "-o", str(csv_out),
                                  "--answer", "(l+)"])
    assert r.exit_code == 0, r.output
    import pandas as pd

    df = pd.read_csv(csv_out)
    assert {"renyi", "conf_seq_logprob", "conf_mean_renyi", "conf_answer"} <= set(df.columns)
    html = tmp_path / "r.html"
    r = CliRunner().invoke(main, ["report", "conf", "--store", str(run_store), "--no-model", "-o", str(html)])
    assert r.exit_code == 0 and "How sure the model was of each answer" in html.read_text()
    r = CliRunner().invoke(main, ["show", "conf", "--store", str(run_store), "--answer", "("])
    assert r.exit_code == 1 and "not a valid regular expression" in r.output
    # an --answer that the greedy samples' text matches and some other does not: that one has no answer span
    # (nan in the table's text column once others have one), shown as "–"
    word = next(w for w in re.findall(r"[a-z]+", greedy.answer.iloc[0]) if any(w not in a for a in table.answer))
    r = CliRunner().invoke(main, ["show", "conf", "--store", str(run_store), "--answer", f"({word})"])
    assert r.exit_code == 0, r.output
    rows = r.output.split("confidence of each answer", 1)[1].splitlines()
    assert any(" – " in line and line.split()[0].isdigit() for line in rows), r.output


def test_an_older_store_reads_without_the_new_column(tmp_path):
    """The 0.1.0 store (tests/data) has no tokens.renyi: its runs read, with Rényi and Fisher–Rao as nan."""
    import shutil
    from pathlib import Path

    import llamalens as ll

    src = next(Path(__file__).parent.joinpath("data").glob("*.db"))
    copy = tmp_path / src.name
    shutil.copy(src, copy)
    run = ll.open_run(ll.runs(store=str(copy)).id.iloc[0], store=str(copy))
    table = run.confidence()
    assert len(table) and table.mean_renyi.isna().all() and table.seq_logprob.notna().all()


# -- calibrate -------------------------------------------------------------------------------------------------------
def _write(path, lines):
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_calibrate_refuses_bad_files(tmp_path):
    from llamalens.looks.calibrate import read_items

    cases = [
        ([{"question": "q", "options": ["a", "b"], "answer": 2}, {"question": "q", "reference": "a"}], "index 0..1"),
        ([{"question": "q", "options": ["a"], "answer": 0}, {"question": "q", "reference": "a"}], "give 2 to"),
        ([{"question": "q", "options": ["a", "b"], "reference": "a"}, {"question": "q", "reference": "a"}], "not both"),
        ([{"question": "", "reference": "a"}, {"question": "q", "reference": "a"}], "non-empty \"question\""),
        ([{"question": "q", "reference": "a", "match": "fuzzy"}, {"question": "q", "reference": "a"}], "is not one of"),
        ([{"question": "q", "reference": "("}, {"question": "q", "reference": "a", "match": "regex"}], None),
        ([{"question": "q", "reference": "a"}], "at least 2"),
    ]
    for lines, message in cases:
        p = _write(tmp_path / "bad.jsonl", lines)
        if message is None:
            read_items(p)  # "(" is plain text under "contains"
            continue
        with pytest.raises(InvalidInput, match=message):
            read_items(p)
    with pytest.raises(InvalidInput, match="not a valid regular expression"):
        read_items(_write(tmp_path / "re.jsonl", [{"question": "q", "reference": "(", "match": "regex"},
                                                  {"question": "q", "reference": "a"}]))
    (tmp_path / "junk.jsonl").write_text("{not json\n")
    r = CliRunner().invoke(main, ["calibrate", str(tmp_path / "junk.jsonl")])
    assert r.exit_code == 1 and "is not JSON" in r.output


def test_matching_rules():
    from llamalens.looks.calibrate import matches

    assert matches(" The capital is Paris.", ("paris",), "contains")
    assert not matches(" Parisian food", ("paris",), "contains")
    assert matches("Paris, of course", ("Paris",), "prefix") and not matches("in Paris", ("Paris",), "prefix")
    assert matches(" paris! ", ("Paris",), "exact") and not matches("Paris France", ("Paris",), "exact")
    assert matches("year 1945", (r"19\d\d",), "regex") and not matches(None, ("a",), "contains")


def test_calibrate_end_to_end_on_the_tiny_model(tiny_path, tmp_path):
    """Choice items scored as `choose` scores them, reference items generated greedily: each item's measures are
    those of its tokens; the figures are core/calibration's of them."""
    import llamalens as ll
    from llamalens.looks.calibrate import ALL_MEASURES

    lines = [{"question": "Hello", "options": ["a", "b", "c"], "answer": i % 3} for i in range(6)]
    lines += [{"question": f"Hello {w}", "reference": w} for w in ("a", "b", "the", "x")]
    f = _write(tmp_path / "set.jsonl", lines)
    res = ll.calibrate(str(f), [str(tiny_path)], max_tokens=4)
    m = res.models[0]
    assert len(m.items) == 10 and [r.kind for r in m.items] == ["choice"] * 6 + ["generated"] * 4
    choice = ll.choose("Hello", ["a", "b", "c"], model=str(tiny_path))
    first = m.items[0]
    assert first.prediction == choice.options[0].option
    assert first.measures["option_prob"] == pytest.approx(choice.probabilities()[0])
    assert first.correct == (choice.options[0].option == "a")
    for f_ in m.fits:  # each kind of question fitted apart
        vals = [r.measures[f_.measure] if r.kind == f_.kind else math.nan for r in m.items]
        keep = [i for i, v in enumerate(vals) if v == v]
        assert f_.n == len(keep) > 0
        if f_.n and 0 < sum(m.items[i].correct for i in keep) < f_.n:
            sign = 1 if next(x for x in ALL_MEASURES if x.name == f_.measure).higher else -1
            assert f_.auroc == pytest.approx(cal.auroc([sign * vals[i] for i in keep],
                                                       [m.items[i].correct for i in keep]))
    assert {(f_.kind, f_.measure) for f_ in m.fits} == {("choice", x.name) for x in ALL_MEASURES[:-2]} | \
        {("generated", x.name) for x in ALL_MEASURES[2:]}  # no Rényi for choices (no full row), no option p generated
    assert {f_.n for f_ in m.fits} == {6, 4}
    out = tmp_path / "calib.md"
    r = CliRunner().invoke(main, ["calibrate", str(f), "-m", str(tiny_path), "-m", str(tiny_path), "-n", "4",
                                  "--bins", "5", "--match", "prefix", "--answer", r"(\S+)", "--stop", ".",
                                  "--normalize", "token", "--parallel", "2", "--report", str(out), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert len(d["models"]) == 2 and d["bins"] == 5 and len(d["models"][0]["measures"][0]["bins"]) == 5
    assert "reliability" in out.read_text() and list(tmp_path.glob("calib_files/*.png"))


def test_a_fork_run_shows_and_reports_its_texts_confidence(tiny_path, tmp_path):
    """Another run kind: a fork's base path and continuations each get their confidence in show, --json and the
    report, from the same table."""
    store = str(tmp_path / "f.db")
    r = CliRunner().invoke(main, ["fork", "Hello", "--outcome", r"(\w+)", "--samples", "2", "--positions", "0-1",
                                  "-n", "4", "-m", str(tiny_path), "--store", store, "--name", "fk"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["show", "fk", "--store", store, "--json"])
    rows = json.loads(r.output)["confidence"]["samples"]
    import llamalens as ll

    table = ll.open_run("fk", store=store).confidence()
    assert len(rows) == len(table) > 1 and [x["seq_logprob"] for x in rows] == pytest.approx(table.seq_logprob.tolist())
    r = CliRunner().invoke(main, ["show", "fk", "--store", store])
    assert "confidence of each answer" in r.output
    out = tmp_path / "fk.html"
    r = CliRunner().invoke(main, ["report", "fk", "--store", store, "-o", str(out)])
    assert r.exit_code == 0 and "How sure the model was of each text" in out.read_text()

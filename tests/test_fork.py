"""`llamalens fork`: outcomes, the outcome distributions and their jumps recomputed here with numpy
from what the store holds, continuations equal to `generate` from the same prefix, synthetic cases whose
forking tokens are known by construction, kill -9 and resume, the report in Chromium, bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from browser import Browser
from llamalens.core.engine import Engine, Request
from llamalens.run.fork import ForkSpec, OutcomeSpec, execute_fork, load_fork, parse_positions, start_fork
from llamalens.run.fork_analysis import Branch, analyse
from llamalens.settings import SamplingSettings
from llamalens.store import Store
from llamalens.run.noise import rescore
from clirun import cli

BAT = "Q: Is a bat a bird or a mammal? A:"  # greedy: " A bat is a mammal." (the README's example)
FIRST_CHAR = r"(?s)^(.)"  # the completion's first character: decided by the token at position 0


# -- references, written here ---------------------------------------------------------------------------
def ref_outcome_options(text: str, options: list[str]) -> str:
    """The option whose first whole-word, case-insensitive occurrence comes first."""
    best = None
    low = text.lower()
    for opt in options:
        for m in re.finditer(re.escape(opt.lower()), low):
            a, b = m.start(), m.end()
            if (a == 0 or not low[a - 1].isalnum() and low[a - 1] != "_") and \
                    (b == len(low) or not low[b].isalnum() and low[b] != "_"):
                if best is None or a < best[0]:
                    best = (a, opt)
                break
    return best[1] if best else "none"


def ref_series(samples: list, base_outcome: str, outcome_of) -> tuple[list[int], list[str], np.ndarray]:
    """o_t from the stored continuations: per position, Σ_w p(w)/Σp · histogram_w / n_w; then o_end."""
    by_pos: dict[int, dict[int, list]] = {}
    for s in samples:
        x = s.extra
        if x.get("role") == "continuation":
            by_pos.setdefault(x["position"], {}).setdefault(x["forced_token"], []).append((x["prob"], outcome_of(s)))
    labels = sorted({o for g in by_pos.values() for lst in g.values() for _, o in lst} | {base_outcome})
    rows = []
    for t in sorted(by_pos):
        row = np.zeros(len(labels))
        total = sum(lst[0][0] for lst in by_pos[t].values())
        for lst in by_pos[t].values():
            for p, o in lst:
                row[labels.index(o)] += p / total / len(lst)
        rows.append(row)
    rows.append(np.eye(len(labels))[labels.index(base_outcome)])
    return sorted(by_pos), labels, np.array(rows)


def as_matrix(fork_json: dict, labels: list[str]) -> np.ndarray:
    rows = [p["distribution"] for p in fork_json["positions"]] + [fork_json["end"]]
    return np.array([[r.get(lab, 0.0) for lab in labels] for r in rows])


# -- 1. pure parts ---------------------------------------------------------------------------------------
def test_outcome_extraction():
    opts = OutcomeSpec("options", options=("yes", "no"))
    assert opts.extract(" No, it is not. Yes it is.") == "no"
    assert opts.extract(" I know nothing; yes.") == "yes"  # 'no' inside 'know' / 'nothing' is no answer
    assert opts.extract(" maybe") == "none"
    assert OutcomeSpec("regex", regex=r"is (\w+)").extract("it is prime, is it") == "prime"  # group 1
    assert OutcomeSpec("regex", regex=r"\d+").extract("about 42 or 43") == "42"  # the whole match
    assert OutcomeSpec("regex", regex=r"\d+").extract("none here") == "none"
    assert OutcomeSpec().extract("\n\n  The  Answer:  Yes!\nmore") == "the answer:  yes".replace("  ", " ")
    assert OutcomeSpec().extract(" \n ") == "none"
    for text in [" No, it is not. Yes it is.", "yes", "nope, no", "NO!", "a yes-man says no"]:
        assert opts.extract(text) == ref_outcome_options(text, ["yes", "no"])
    assert parse_positions("all") is None and parse_positions("3") == (3, 3) and parse_positions("2-7") == (2, 7)


def test_analysis_of_known_series():
    """Hand-made branches: o_t and the jumps against numpy; a fixed answer forks nowhere; a first token that
    decides it forks exactly there; a jump smaller than its bootstrap noise is no forking token."""
    def b(t, p, outs, chosen=False):
        return Branch(t, 0, "x", p, chosen, list(outs))

    fixed = [[b(t, 0.7, "AAAA", True), b(t, 0.3, "AAAA")] for t in range(5)]
    a = analyse(fixed, list(range(5)), "A")
    assert np.allclose(a.series, 1.0) and a.forking == [] and all(j.size < 1e-12 for j in a.jumps)

    def first_decides(n):
        return [[b(0, 0.6, "A" * n, True), b(0, 0.2, "B" * n), b(0, 0.1, "C" * n)]] + \
            [[b(t, 0.8, "A" * n, True), b(t, 0.1, "A" * n)] for t in range(1, 6)]

    first = first_decides(8)
    a = analyse(first, list(range(6)), "A")
    o0 = np.array([0.6, 0.2, 0.1]) / 0.9
    assert np.allclose(a.series[0], o0) and a.labels == ["A", "B", "C"]
    assert [j.position for j in a.forking] == [0]
    assert a.jumps[0].size == pytest.approx(0.5 * (abs(o0[0] - 1) + o0[1] + o0[2]), abs=1e-12)

    # declared outcomes (--options) are labels even where no continuation produced them, at probability 0, and
    # every other figure is what it was without them
    d = analyse(first, list(range(6)), "A", declared=("Z", "B", "Y"))
    assert d.labels == ["A", "B", "C", "Z", "Y"] and np.allclose(d.series[:, 3:], 0.0)
    assert np.allclose(d.series[:, :3], a.series) and d.penalty == a.penalty
    assert [(j.size, j.noise95, j.change_point) for j in d.jumps] == [(j.size, j.noise95, j.change_point) for j in a.jumps]
    assert all(set(d.to_dict()["positions"][i]["distribution"]) >= {"Z", "Y"} for i in range(6))

    # the noise level rests on the samples: continuations that all agree still leave doubt, which shrinks as they
    # grow (resampling 2 unanimous samples with replacement would say there is none); each jump says how many
    # continuations its two o_t rest on; the same 1/3 jump is no forking token on 2 samples a branch
    few, many = analyse(first_decides(2), list(range(6)), "A"), analyse(first_decides(16), list(range(6)), "A")
    assert few.jumps[1].size == 0 and few.jumps[1].noise95 > 0.3 > a.jumps[1].noise95 > many.jumps[1].noise95 > 0
    assert few.jumps[0].samples == (6, 4) and a.jumps[0].samples == (24, 16) and a.jumps[-1].samples == (16, 0)
    assert few.forking == [] and [j.position for j in many.forking] == [0]
    flip = analyse([[b(t, 1.0, ("Y" if t < 3 else "N") * 2, True)] for t in range(6)], list(range(6)), "N")
    assert [j.position for j in flip.forking] == [2]  # a full flip is beyond the noise even on 2 samples

    # one continuation in four says B at one position: a bump that resampling four samples makes easily
    noisy = [[b(t, 1.0, "AAAB" if t == 2 else "AAAA", True)] for t in range(5)]
    a = analyse(noisy, list(range(5)), "A")
    assert a.jumps[1].size == pytest.approx(0.25) and a.jumps[1].noise95 >= 0.25 and a.forking == []


# -- 2. the default model: a factual prompt with --options -------------------------------------------------
@pytest.fixture(scope="module")
def bat_run(gemma_path, tmp_path_factory):
    db = tmp_path_factory.mktemp("fork") / "f.db"
    res = cli("fork", BAT, "--options", "bird,mammal", "-n", 8, "--samples", 2, "--alternatives", 2, "--min-prob", 0.02,
              "--positions", "0-4", "--parallel", 16, "--name", "bat", "--json", "--store", db,
              "--model", gemma_path, "--flash-attn", "off", "--ctx", 512)
    return db, json.loads(res.stdout)


@pytest.mark.slow
def test_factual_prompt_distributions_match_the_stored_continuations(bat_run):
    db, out = bat_run
    store = Store(db)
    info = store.run("bat")
    assert info.kind == "fork" and info.status == "done" and info.n_done == info.n_samples
    samples = store.samples(info.id)
    base = samples[0]
    fork = out["fork"]
    assert sum(fork["positions"][0]["distribution"].values()) == pytest.approx(1.0, abs=1e-12)
    # every stored outcome is what the outcome rule gives for the stored text (the rule re-implemented here)
    for s in samples[1:]:
        assert s.extra["outcome"] == ref_outcome_options(s.text, ["bird", "mammal"])
    assert base.extra["outcome"] == ref_outcome_options(base.text, ["bird", "mammal"])
    # the answer is named at position 4 (" A bat is a| mammal"): there each branch's forced token decides its outcome
    assert base.extra["outcome"] == "mammal" and base.text.startswith(" A bat is a mammal")
    named = {s.extra["outcome"] for s in samples[1:] if s.extra["position"] == 4 and s.text.startswith(" A bat is a bird")}
    assert named == {"bird"} and {s.extra["outcome"] for s in samples[1:] if s.extra["position"] == 4
                                  and s.text.startswith(" A bat is a mammal")} == {"mammal"}
    # a continuation's text starts with the base path's first t tokens and its forced token
    base_tokens = [t for _, t in store.tokens(info.id, 0)]
    for s in samples[1:]:
        head = "".join(t.text for t in base_tokens[: s.extra["position"]])
        assert s.text.startswith(head)
    positions, labels, ref = ref_series(samples, base.extra["outcome"], lambda s: s.extra["outcome"])
    assert positions == [p["position"] for p in fork["positions"]] == [0, 1, 2, 3, 4]
    got = as_matrix(fork, labels)
    assert np.allclose(got, ref, atol=1e-12)
    assert np.allclose(got.sum(axis=1), 1.0, atol=1e-12)
    # the forking table: each jump is the TV between consecutive rows; forking = change point and above noise
    tv = 0.5 * np.abs(np.diff(ref, axis=0)).sum(axis=1)
    jumps = fork["jumps"]
    assert np.allclose([j["size"] for j in jumps], tv, atol=1e-12)
    assert [j["position"] for j in jumps] == positions
    assert fork["forking_positions"] == [j["position"] for j in jumps
                                         if j["change_point"] and j["size"] > j["noise95"] and j["size"] > 0]
    # prefill: prompt + base once, plus one forced token per branch group, far below the naive count
    stats, cost = out["decode_stats"], out["cost"]
    assert stats["prefill_tokens"] <= cost["prefill"] and cost["naive_prefill"] > 5 * stats["prefill_tokens"]


@pytest.mark.slow
def test_runs_show_export_and_report_understand_fork_runs(bat_run, tmp_path):
    db, out = bat_run
    runs = json.loads(cli("runs", "--json", "--store", db).stdout)
    assert runs[0]["kind"] == "fork" and runs[0]["status"] == "done"
    shown = cli("show", "bat", "--store", db).stdout
    assert "forking tokens:" in shown and "fork run" in shown and "prefill:" in shown
    as_json = json.loads(cli("show", "bat", "--json", "--store", db).stdout)
    assert as_json["fork"] == out["fork"]
    # the confidence table: the base path's row alone, the continuations counted; --json has every sample's
    n = len(Store(db).samples(Store(db).run("bat").id))
    assert len(as_json["confidence"]["samples"]) == n > 2
    table = shown.split("confidence of each answer", 1)[1]
    rows = [line for line in table.splitlines() if re.match(r"\d+ +\d+ +\d+ +\S", line)]
    assert len(rows) == 1 and "A bat is a mammal" in rows[0], table
    assert f"... and {n - 1} continuations: `llamalens show" in table
    cli("export", "bat", "--format", "jsonl", "-o", tmp_path / "f.jsonl", "--store", db)
    lines = [json.loads(x) for x in (tmp_path / "f.jsonl").read_text(encoding="utf-8").splitlines()]
    assert lines[0]["extra"]["role"] == "base" and {x["extra"]["role"] for x in lines[1:]} == {"continuation"}
    cli("export", "bat", "--format", "csv", "-o", tmp_path / "f.csv", "--store", db)
    cli("report", "bat", "-o", tmp_path / "f.md", "--store", db)
    assert "Forking tokens" in (tmp_path / "f.md").read_text(encoding="utf-8")


# -- 3. continuations are `generate` from the same prefix + forced token --------------------------------------
@pytest.mark.slow
def test_continuations_equal_generate_exact_and_batched_within_noise(gemma, tmp_path):
    n = 5
    spec = dict(prompt=BAT, settings=SamplingSettings(temperature=0.9), outcome=OutcomeSpec("options", options=("bird", "mammal")),
                samples=2, alternatives=2, min_prob=0.02, positions=(0, 1), max_tokens=n)
    store = Store(tmp_path / "e.db")
    runs = {}
    for exact in (True, False):
        rid, _ = start_fork(gemma, store, ForkSpec(**spec, exact=exact, parallel=8))
        execute_fork(gemma, store, rid)
        runs[exact] = rid
    prompt_ids = gemma.prompt_tokens(BAT)
    base_ids = [t.id for _, t in store.tokens(runs[True], 0)]
    # the base path is `generate` (greedy) of the prompt
    from llamalens.core.engine import generate
    assert [t.id for t in generate(gemma, BAT, SamplingSettings(temperature=0), max_tokens=n).tokens] == base_ids
    # exact: each continuation is the single-sequence engine (what `generate` runs) from prefix + forced token
    conts = store.samples(runs[True])[1:]
    reqs = [Request(BAT, spec["settings"].with_(seed=s.seed), n - s.extra["position"] - 1, 5, key=s.sample_idx,
                    prompt_tokens=prompt_ids + base_ids[: s.extra["position"]] + [s.extra["forced_token"]])
            for s in conts if n - s.extra["position"] - 1 > 0]
    refs = {r.key: r for r in Engine(gemma, 1).run(reqs)}
    assert len(refs) == len(conts) > 4
    exact_toks, worst = store.tokens_by_sample(runs[True]), 0.0
    for s in conts:
        got, ref = exact_toks.get(s.sample_idx, []), refs[s.sample_idx]
        assert [t.id for t in got] == [t.id for t in ref.tokens]
        assert [t.logprob for t in got] == [t.logprob for t in ref.tokens]
    # batched: the same plan; each continuation's logprobs against its own tokens re-decoded one at a time
    batched = store.tokens_by_sample(runs[False])
    for s in store.samples(runs[False])[1:]:
        toks = batched.get(s.sample_idx, [])
        if not toks:
            continue
        x = s.extra
        ref = rescore(gemma, BAT, [t.id for t in toks], prompt_ids + base_ids[: x["position"]] + [x["forced_token"]])
        worst = max(worst, max(abs(t.logprob - lp) for t, (lp, _) in zip(toks, ref)))
    print(f"batched continuations: max |Δ logprob| {worst:.4f} against one sequence at a time")
    # measured here: max 0.14 nats (NOTES.md §6: batched Q4_K_M rows move by up to 0.17); 10x would be more
    # than most tokens' whole logprob, so the bound is 1 nat: a wrong prefix or position moves them by more
    assert worst < 1.0
    assert store.run(runs[False]).noise["tokens"] > 0


# -- 3b. shared rows: identical histories decoded once, the base path's rows from its prefill -----------------
def _continuations_of(model, base, prompt_ids, temperature, alternatives=2, samples=2):
    """Every position's chosen token + top alternatives, `samples` seeds each (as plan_continuations plans them)."""
    base_ids, n = [t.id for t in base.tokens], len(base.tokens)
    out = []
    for t, rec in enumerate(base.tokens[:-1]):
        for w in [rec.id] + [a.id for a in rec.top if a.id != rec.id][:alternatives]:
            for j in range(samples):
                out.append(Request("the cat", SamplingSettings(temperature=temperature, seed=1 + j), n - t - 1, 5,
                                   key=len(out), prompt_tokens=prompt_ids + base_ids[:t] + [w]))
    return out


@pytest.mark.parametrize("parallel", [8, 255])  # 8: more continuations than slots; 255: all at once, by position
def test_shared_rows_give_the_records_of_each_continuation_decoded_alone(tiny_path, monkeypatch, parallel):
    """At a low temperature the continuations mostly keep to the base path and to each other: fewer rows are
    decoded than without the sharing (every row a continuation uses is decoded, taken from the prefill or shared,
    and counted once), and every continuation's tokens and logprobs are those of the single-sequence engine run
    on its own prefix + forced token, which shares nothing. Again with the kept prefill rows capped at 3."""
    import importlib

    from llamalens.core.engine import generate
    from llamalens.core.runtime import Model, ModelOptions

    fork_module = importlib.import_module("llamalens.run.fork")  # (llamalens.run.fork is also the name of a function)
    with Model(tiny_path, ModelOptions(ctx=256, flash_attn="off", threads=1)) as m:
        base = generate(m, "the cat", SamplingSettings(temperature=0), max_tokens=12)
        prompt_ids, base_ids = base.prompt_token_ids, [t.id for t in base.tokens]
        alone = {s.key: s for s in Engine(m, 1).run(_continuations_of(m, base, prompt_ids, 0.5))}
        runs, stats = {}, {}
        for label, share, cap in [("old", False, None), ("shared", True, None), ("capped", True, 3 * 4 * m.n_vocab)]:
            if cap:
                monkeypatch.setattr(fork_module, "BASE_ROWS_BYTES", cap)
            stats[label] = {}
            runs[label] = {s.key: s for s in fork_module.decode_continuations(
                m, prompt_ids, base_ids, _continuations_of(m, base, prompt_ids, 0.5), parallel, stats[label],
                share=share)}
    for label, got in runs.items():
        st = stats[label]
        assert st["decoded_tokens"] + st.get("base_rows_reused", 0) + st["fanned_out_tokens"] == \
            sum(len(s.tokens) for s in got.values()), label  # each token sampled from exactly one row
        assert got.keys() == alone.keys()
        for k, ref in alone.items():
            assert [t.id for t in got[k].tokens] == [t.id for t in ref.tokens], (label, k)
            # measured: max |Δ logprob| 1.1e-3 against the single-sequence rows (batch shapes, non-flash attention)
            assert np.allclose([t.logprob for t in got[k].tokens], [t.logprob for t in ref.tokens], atol=0.01)
    old, new, capped = stats["old"], stats["shared"], stats["capped"]
    n_chosen = len(base_ids) - 1  # one chosen branch per position: its forced token's row is the prefill's
    assert new["base_rows_reused"] >= n_chosen and 0 < capped["base_rows_reused"] < new["base_rows_reused"]
    assert new["decoded_tokens"] < capped["decoded_tokens"] < old["decoded_tokens"]
    assert new["forced_tokens"] < old["forced_tokens"] and old["base_rows_reused"] == 0
    print(f"parallel {parallel}: rows decoded {old['decoded_tokens']} -> {new['decoded_tokens']} "
          f"({new['base_rows_reused']} from the prefill, {new['fanned_out_tokens']} shared)")


# -- 4. synthetic cases: the answer's fork known by construction (tiny model, first character) -------------
def _first_char_run(tiny_path, tmp_path, positions):
    db = tmp_path / f"s{positions}.db"
    cli("fork", "the cat", "--outcome", FIRST_CHAR, "--min-prob", 0, "--alternatives", 4, "--samples", 6, "-n", 6,
        "--positions", positions, "--store", db, "--model", tiny_path, "--ctx", 256, "--temperature", 1.0,
        "--threads", 1)
    return Store(db), load_fork(Store(db), 1)


def test_declared_options_appear_at_probability_zero(tiny_path, tmp_path):
    """An option the model never produces is in `labels` and in every position's distribution, in show, --json and
    the report."""
    never = "Canberra"
    args = ("fork", "the cat", "--options", f"the,{never}", "--min-prob", 0, "--alternatives", 2, "--samples", 2,
            "-n", 4, "--positions", "0-2", "--store", tmp_path / "o.db", "--model", tiny_path, "--ctx", 256,
            "--threads", 1)
    data = json.loads(cli(*args, "--json", "--report", tmp_path / "o.html").stdout)["fork"]
    assert never in data["labels"] and data["declared"] == ["the", never]
    assert all(p["distribution"][never] == 0.0 for p in data["positions"]) and data["end"][never] == 0.0
    shown = cli("show", 1, "--store", tmp_path / "o.db").output
    positions = shown.split("forking tokens:")[0]  # the positions table, not the confidence table after it
    rows = [line for line in positions.splitlines() if re.match(r"\s*\d+\s", line)]
    assert len(rows) == 3 and all(f"{never} 0.00" in line for line in rows)
    page = (tmp_path / "o.html").read_text(encoding="utf-8")
    assert page.count(f"{never} 0.00") >= 3
    # results first: the findings open the page, the set-up is folded at its end
    made = page.index('<details class="made"><summary>How this was made')
    assert page.index("<h2>Findings</h2>") < page.index("<h2>The base path</h2>") < page.rindex("<h2>") < made
    assert "the base path (4 tokens, greedy) ends in" in page
    # every outcome recomputed from token bytes, not from the stored text: a continuation is the base path's
    # tokens before its position, its forced token (bytes from llama-cpp-python's vocabulary), then its own tokens
    from llama_cpp import Llama

    llm = Llama(str(tiny_path), n_ctx=64, verbose=False, vocab_only=True)
    store = Store(tmp_path / "o.db")
    samples = store.samples(1)

    def raw(s):
        return b"".join(bytes.fromhex(t.bytes) for _, t in store.tokens(1, s.sample_idx) if not t.eog)

    base = raw(samples[0])
    base_pieces = [bytes.fromhex(t.bytes) for _, t in store.tokens(1, 0)]
    assert samples[0].extra["outcome"] == ref_outcome_options(base.decode("utf-8", "replace"), ["the", never])
    outcomes = set()
    for s in samples[1:]:
        x = s.extra
        text = b"".join(base_pieces[: x["position"]]) + llm.detokenize([x["forced_token"]]) + raw(s)
        assert x["outcome"] == ref_outcome_options(text.decode("utf-8", "replace"), ["the", never]), (x, text)
        outcomes.add(x["outcome"])
    assert outcomes == {"the", "none"}  # both kinds occur, so a wrong rule shows


def test_a_fixed_answer_has_no_forking_token(tiny_path, tmp_path):
    """From position 1 on, the first character is already fixed by the base path's token 0: nothing forks."""
    store, fr = _first_char_run(tiny_path, tmp_path, "1-5")
    a = fr.analysis
    assert a.positions == [1, 2, 3, 4, 5]
    assert fr.base_tokens[0].text and np.allclose(a.series.max(axis=1), 1.0) and a.forking == []


def test_a_first_token_that_decides_is_the_one_forking_token(tiny_path, tmp_path):
    store, fr = _first_char_run(tiny_path, tmp_path, "all")
    a = fr.analysis
    base0 = fr.base_tokens[0]
    assert base0.text, "the base path's first token must carry a character"
    # the expected jump, from the alternatives at position 0 alone: the mass whose first character differs
    alts = [(s.extra["prob"], s.extra["forced_text"]) for s in store.samples(1)[1:] if s.extra["position"] == 0
            and s.extra["sample"] == 0]
    total = sum(p for p, _ in alts)
    differ = sum(p for p, text in alts if text and text[0] != base0.text[0]) / total
    assert differ > 0.05, "precondition: some alternative at position 0 starts with another character"
    assert [j.position for j in a.forking] == [0]
    assert a.jumps[0].size == pytest.approx(differ, abs=1e-9)
    assert all(j.size < 1e-12 for j in a.jumps[1:])


# -- 5. kill -9, then --resume: equal to an uninterrupted run ---------------------------------------------------
def test_resume_after_kill_9_equals_an_uninterrupted_run(tiny_path, tmp_path):
    args = ["the cat", "--outcome", FIRST_CHAR, "--min-prob", 0, "--alternatives", 3, "--samples", 6, "-n", 16,
            "--exact", "--temperature", 1.0, "--model", str(tiny_path), "--ctx", 256, "--threads", 1]
    db = tmp_path / "k.db"
    proc = subprocess.Popen([sys.executable, "-m", "llamalens", "fork", *map(str, args), "--store", str(db)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:  # until it has committed a continuation, not for a fixed time
            time.sleep(0.05)
            try:
                if Store(db).run(1).n_done >= 2:
                    break
            except Exception:  # noqa: BLE001 - not planned yet
                pass
            assert proc.poll() is None, proc.communicate()
    finally:
        proc.kill()
        proc.wait(timeout=30)
    info = Store(db).run(1)
    assert info.status == "interrupted" and 2 <= info.n_done < info.n_samples
    assert "llamalens fork --resume 1" in cli("show", 1, "--store", db).stdout
    res = cli("fork", "--resume", 1, "--store", db)
    assert "resuming fork run 1" in res.output
    twin = tmp_path / "u.db"
    cli("fork", *args, "--store", twin)
    a, b = Store(db), Store(twin)
    assert a.run(1).status == "done"
    key = [(s.sample_idx, s.text, s.extra["outcome"], s.seed) for s in a.samples(1)]
    assert key == [(s.sample_idx, s.text, s.extra["outcome"], s.seed) for s in b.samples(1)]
    ta, tb = a.tokens_by_sample(1), b.tokens_by_sample(1)
    assert {k: [(t.id, t.logprob) for t in v] for k, v in ta.items()} == \
        {k: [(t.id, t.logprob) for t in v] for k, v in tb.items()}
    assert load_fork(a, 1).analysis.to_dict() == load_fork(b, 1).analysis.to_dict()


# -- 6. the report, in Chromium ---------------------------------------------------------------------------------
def test_fork_report_in_chromium(tiny_path, tmp_path, chromium_path):
    hostile = "<script>alert(1)</script> \x1b[31m"
    out = tmp_path / "fork.html"
    # a first-character jump of 0.185 at token 0: beyond the noise on 12 samples a branch (not on 2 or 6)
    cli("fork", hostile, "--outcome", FIRST_CHAR, "--min-prob", 0, "--samples", 12, "-n", 5, "--stop", "zzz",
        "--report", out, "--store", tmp_path / "r.db", "--model", tiny_path, "--ctx", 256, "--threads", 1)
    page_text = out.read_text(encoding="utf-8")
    assert "<script>alert(1)</script>" not in page_text and page_text.count("<script") == 2
    with Browser() as b:
        page = b.open(out)
        assert page.problems() == []
        assert page.eval("document.body.dataset.mode") == "fork"
        assert page.eval("document.querySelectorAll('.tk').length") == 5
        assert page.eval("document.querySelectorAll('svg').length") >= 1
        page.hover(".tk", 0)
        tip = page.eval("document.getElementById('tip').innerText")
        assert "(chosen)" in tip and "outcome shift" in tip and "one continuation per branch" in tip
        assert "forking token" in page.eval("document.querySelector('.mk') ? document.querySelector('.mk').title : ''")
        page.screenshot(tmp_path / "fork.png")
        assert (tmp_path / "fork.png").stat().st_size > 10_000


# -- 7. bad input: one clear line, no traceback -------------------------------------------------------------------
@pytest.mark.parametrize("args,words", [
    (["--outcome", "(unclosed"], "not a valid regular expression"),
    (["--options", "yes"], "at least two"),
    (["--outcome", "x", "--options", "a,b"], "give one"),
    (["--outcome-first-line", "--options", "a,b"], "give one"),
    (["--positions", "3-1"], "ends before it starts"),
    (["--positions", "x"], "is not 'all', N or N-M"),
    (["--samples", "0"], "--samples 0 is out of range"),
    (["--max-sequences", "3"], "more than --max-sequences 3"),
    (["--positions", "50-60"], "the base path has"),
])
def test_bad_input_is_one_clear_line(tiny_path, tmp_path, args, words):
    res = cli("fork", "the cat", *args, "-n", 4, "--store", tmp_path / "b.db", "--model", tiny_path, "--ctx", 256,
              "--threads", 1, ok=False)
    assert res.exit_code in (1, 2) and words in res.output and "Traceback" not in res.output


def test_resume_refuses_other_runs_and_settings(tiny_path, tmp_path):
    db = tmp_path / "o.db"
    cli("sweep", "the cat", "-n", 2, "--store", db, "--model", tiny_path, "--threads", 1)
    res = cli("fork", "--resume", 1, "--store", db, ok=False)
    assert res.exit_code == 1 and "not a fork run" in res.output
    res = cli("fork", "--resume", 1, "--samples", 3, "--store", db, ok=False)
    assert res.exit_code == 2 and "--samples" in res.output
    assert "give a PROMPT" in cli("fork", "--store", db, ok=False).output
    cli("fork", "the cat", "-n", 2, "--samples", 1, "--positions", "0", "--store", db, "--model", tiny_path,
        "--ctx", 256, "--threads", 1)
    res = cli("sweep", "--resume", 2, "--store", db, ok=False)  # and the other way round
    assert res.exit_code == 1 and "not a sweep run" in res.output and "llamalens fork --resume 2" in res.output


def test_change_points_are_the_optimal_partition():
    """The dynamic programme against every partition of small random series, written out here."""
    from itertools import combinations

    from llamalens.run.fork_analysis import change_points

    rng = np.random.default_rng(1)
    for _ in range(30):
        n, k = int(rng.integers(2, 8)), int(rng.integers(1, 4))
        y = rng.dirichlet(np.ones(k), size=n)
        pen = float(rng.choice([1e-4, 0.01, 0.1, 1.0]))

        def objective(cuts, y=y, n=n, pen=pen):
            bounds = [0, *cuts, n]
            return sum(((y[a:b] - y[a:b].mean(axis=0)) ** 2).sum() for a, b in zip(bounds, bounds[1:])) \
                + pen * (len(cuts) + 1)

        best = min(objective(list(c)) for r in range(n) for c in combinations(range(1, n), r))
        assert objective(change_points(y, pen)) == pytest.approx(best, abs=1e-12)


def test_seed_samples_the_base_path(tiny, tiny_path, tmp_path):
    """--seed given: the base path is sampled with the run's settings and that seed (as `generate` samples it);
    without it the base path is greedy; --outcome-first-line is the default outcome."""
    from llamalens.core.engine import generate

    db = tmp_path / "seed.db"
    for extra in (["--seed", 3], ["--outcome-first-line"]):
        cli("fork", "the cat", "-n", 5, "--samples", 1, "--positions", "0-1", "--temperature", 1.2, "--top-k", 0,
            *extra, "--store", db, "--model", tiny_path, "--ctx", 256, "--flash-attn", "off", "--threads", 1)
    store = Store(db)
    sampled = generate(tiny, "the cat", SamplingSettings(temperature=1.2, top_k=0, seed=3), max_tokens=5)
    greedy = generate(tiny, "the cat", SamplingSettings(temperature=0), max_tokens=5)
    assert [t.id for _, t in store.tokens(1, 0)] == [t.id for t in sampled.tokens]
    assert [t.id for _, t in store.tokens(2, 0)] == [t.id for t in greedy.tokens]
    assert sampled.text != greedy.text  # the check can tell the two apart
    assert store.samples(2)[0].extra["fork"]["outcome"]["mode"] == "first_line"
    assert store.configs(1)[1].temperature == 1.2 and store.configs(2)[1].temperature == 0


def test_chat_forks_the_assistants_reply(tmp_path):
    """--chat: the base path is the assistant's reply to the rendered conversation (the prompt is the text
    llama-cpp-python's Jinja2ChatFormatter renders), greedy like `generate --chat -t 0`; --resume refuses chat options."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from tiny_gguf import TINY_CHAT_TEMPLATE, write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "tiny-chat.gguf", chat_template=TINY_CHAT_TEMPLATE)
    db = tmp_path / "chat.db"
    cli("fork", "the cat", "--chat", "--system", "hello", "-n", 4, "--samples", 1, "--positions", "0-1",
        "--store", db, "--model", path, "--ctx", 256, "--flash-attn", "off", "--threads", 1)
    messages = [{"role": "system", "content": "hello"}, {"role": "user", "content": "the cat"}]
    expected = Jinja2ChatFormatter(TINY_CHAT_TEMPLATE, eos_token="</s>", bos_token="<s>")(messages=messages).prompt
    base = Store(db).samples(1)[0]
    assert base.prompt == expected.removeprefix("<s>")  # llamalens adds BOS when it tokenizes, as llama-server does
    gen = json.loads(cli("generate", "the cat", "--chat", "--system", "hello", "-t", 0, "-n", 4, "--json",
                         "--model", path, "--ctx", 256, "--flash-attn", "off").stdout)
    assert [t.id for _, t in Store(db).tokens(1, 0)] == [t["id"] for t in gen["tokens"]]
    res = cli("fork", "--resume", 1, "--chat", "--store", db, ok=False)
    assert res.exit_code == 2 and "--chat" in res.output


def test_outcome_plot_legend_keeps_every_outcome():
    """An outcome is untrusted text: one starting with '_' (which matplotlib drops from automatic legends) and
    one holding markup are both in the legend, as written."""
    from llamalens.reports.plots import outcome_areas

    fig = outcome_areas([0, 1], np.array([[0.5, 0.5], [1.0, 0.0], [1.0, 0.0]]), ["_yes", "<b>no</b>"], [], [],
                        ["a", "b"])
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["_yes", "<b>no</b>"]

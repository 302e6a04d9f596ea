"""compare --prompts: every model's greedy answer and multiple-choice pick, against references computed with
llama-cpp-python alone (argmax of its raw logits token by token; log-softmax of its logits summed over each
option's tokens), and the flips (answers that differ from the base's) counted from those references."""

import json
import re

import numpy as np
import pytest

from clirun import cli

TEXT = "the cat sat on the mat and the dog is in it. " * 2
QUESTIONS = [
    {"prompt": "the cat", "options": ["sat", "dog", "mat"], "answer": "sat"},
    {"prompt": "the dog is", "options": ["in", "on", "it"]},
    {"prompt": "and the", "options": ["mat", "cat"], "answer": "cat"},
    {"prompt": "the mat"},
    {"prompt": "on the dog"},
    {"prompt": "it. the"},
]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def tiny_quants(tiny_path, tmp_path_factory):
    from llamalens.core.runtime import quantize

    d = tmp_path_factory.mktemp("flip_quants")
    return [quantize(tiny_path, d / f"tiny-{k}.gguf", k) for k in ("Q8_0", "Q4_0")]


def _llama(path, n_ctx=128):
    from llama_cpp import Llama

    return Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False)


def greedy_reference(llm, prompt: str, max_tokens: int) -> list[int]:
    """Greedy decoding by hand on llama-cpp-python: the argmax of the raw logits after each token, until an
    end-of-generation token or max_tokens (the prompt tokenized as create_completion does: BOS, specials)."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    llm.reset()
    llm.eval(llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True))
    out = []
    for _ in range(max_tokens):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if llama_cpp.llama_vocab_is_eog(vocab, t):
            break
        out.append(t)
        llm.eval([t])
    return out


def option_logprobs(llm, prompt: str, options: list[str]) -> list[float]:
    """Each option's total logprob after the prompt (a space between): log-softmax (float64) of llama-cpp-python's
    raw logits, each option decoded alone after the prompt."""
    ptoks = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    out = []
    for o in options:
        whole = llm.tokenize(f"{prompt} {o}".encode("utf-8"), add_bos=True, special=True)
        assert whole[: len(ptoks)] == ptoks  # no merge across the boundary in these texts
        otoks = whole[len(ptoks):]
        llm.reset()
        llm.eval(whole)
        total = 0.0
        for j, t in enumerate(otoks):
            row = llm.scores[len(ptoks) - 1 + j].astype(np.float64)
            total += row[t] - (row.max() + np.log(np.exp(row - row.max()).sum()))
        out.append(total)
    return out


def first_diff(a, b):
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return n if n is not None or len(a) == len(b) else min(len(a), len(b))


def test_flips_against_llama_cpp_python(tiny_path, tiny_quants, tmp_path):
    """Three tiny models (F32, Q8_0, Q4_0) on a text and six questions (three with options): each model's greedy
    answer is llama-cpp-python's argmax decoding token for token, each option's logprob its log-softmax sum, and
    the flips, first differing tokens and accuracies shown by show --json / export are those the references give."""
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS), encoding="utf-8")
    db = tmp_path / "f.db"
    models = [tiny_path] + list(tiny_quants)
    cli("compare", *[x for m in models for x in ("-m", m)], TEXT, "--ctx", 32, "--prompts", qfile, "--max-tokens",
        MAX_TOKENS, "--flash-attn", "off", "--store", db)  # llama-cpp-python's default attention, as the reference
    out = json.loads(cli("show", "1", "--store", db, "--json").stdout)
    flips = out["flips"]
    assert out["ladder"] and len(flips["models"]) == 2  # the KLD ladder and the flips in one run

    ref_answers, ref_picks = [], []
    for m in models:
        llm = _llama(m)
        ref_answers.append([greedy_reference(llm, q["prompt"], MAX_TOKENS) if "options" not in q else None
                            for q in QUESTIONS])
        scores = [option_logprobs(llm, q["prompt"], q["options"]) if "options" in q else None for q in QUESTIONS]
        ref_picks.append([None if s is None else int(np.argmax(s)) for s in scores])
        llm.close()
        # every option's stored logprob against the reference: measured differences up to 1.9e-6 nats (the options
        # decoded together in one batch, the reference one at a time); bound 2e-5. (With flash attention on, the
        # tiny model's option logprobs move by up to 7e-3 nats: its logits are large.)
        stored = _stored_answers(db, models.index(m))
        for i, s in enumerate(scores):
            if s is not None:
                assert stored[i]["scores"] == pytest.approx(s, abs=2e-5), (m, i)
            else:
                assert stored[i]["tokens"] == ref_answers[-1][i], (m, i)  # greedy: the same tokens exactly

    by_quant = {m["model"]: m for m in flips["models"]}
    for k in (1, 2):
        s = by_quant[k]
        open_q = [i for i, q in enumerate(QUESTIONS) if "options" not in q]
        pick_q = [i for i, q in enumerate(QUESTIONS) if "options" in q]
        diffs = {i: first_diff(ref_answers[0][i], ref_answers[k][i]) for i in open_q}
        assert s["prompts"] == len(open_q) and s["answers_differ"] == sum(d is not None for d in diffs.values())
        assert s["picks_flipped"] == sum(ref_picks[0][i] != ref_picks[k][i] for i in pick_q)
        graded = [i for i in pick_q if "answer" in QUESTIONS[i]]
        right = sum(QUESTIONS[i]["options"][ref_picks[k][i]] == QUESTIONS[i]["answer"] for i in graded)
        assert s["graded"] == len(graded) and s["accuracy"] == pytest.approx(right / len(graded))
        for d in s["details"]:
            if d["question"] in diffs:
                assert d["at"] == diffs[d["question"]]
            else:
                assert d["pick"] == QUESTIONS[d["question"]]["options"][ref_picks[k][d["question"]]]
    assert by_quant[2]["answers_differ"] >= 1  # Q4_0 of the tiny model changes some answer (else nothing is tested)

    # export: one row per answer token (flipped from the first differing token on) and per pick
    import pandas as pd

    cli("export", "1", "--store", db, "--format", "csv", "-o", tmp_path / "t.csv")
    t = pd.read_csv(tmp_path / "t.csv")
    assert set(t.row) == {"kld", "answer", "pick"}
    for k in (1, 2):
        for i, at in ((i, first_diff(ref_answers[0][i], ref_answers[k][i])) for i in range(len(QUESTIONS))
                      if ref_answers[0][i] is not None):
            rows = t[(t.row == "answer") & (t.model == k) & (t.question == i)].sort_values("position")
            assert rows.token_id.tolist() == ref_answers[k][i]
            assert rows.flipped.tolist() == [at is not None and j >= at for j in range(len(rows))]
    picks = t[t.row == "pick"]
    assert len(picks) == 3 * 3 and set(picks.text) <= {o for q in QUESTIONS for o in q.get("options", [])}


def _stored_answers(db, k: int) -> dict:
    from llamalens.store import Store

    return {s.extra["question"]: s.extra["answer"] for s in Store(db, read_only=True).samples(1)
            if s.extra and s.extra.get("role") == "answer" and s.extra["model"] == k}


def test_flips_alone_option_for_every_prompt_report_and_resume(tiny_path, tiny_quants, tmp_path, monkeypatch):
    """--prompts without a text (answers only), --option for every line of a .txt; an interrupted run resumes
    with only the missing answers decoded, to the same answers; the report shows the flips with the prompts
    escaped."""
    from llamalens.run import answers as run_answers

    pfile = tmp_path / "p.txt"
    pfile.write_text("the cat <b>\nthe dog is <b>\nand the mat <b>\n", encoding="utf-8")
    args = ["compare", "-m", tiny_path, "-m", tiny_quants[1], "--prompts", pfile, "--option", "sat", "--option",
            "in", "--normalize", "token", "--ctx", 32]
    whole = json.loads(cli(*args, "--store", tmp_path / "a.db", "--json").stdout)
    assert whole["ladder"] == [] and whole["flips"]["models"][0]["questions"] == 3

    real = run_answers.answer
    done = []

    def stop_after_four(*a, **kw):
        if len(done) == 4:
            raise KeyboardInterrupt
        done.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(run_answers, "answer", stop_after_four)
    res = cli(*args, "--store", tmp_path / "b.db", ok=False)
    assert res.exit_code != 0 and "--resume" in res.output
    done.clear()
    monkeypatch.setattr(run_answers, "answer", lambda *a, **kw: (done.append(1), real(*a, **kw))[1])
    resumed = json.loads(cli("compare", "--resume", 1, "--store", tmp_path / "b.db", "--json").stdout)
    assert len(done) == 2  # 2 models x 3 questions, 4 saved before the interruption
    assert resumed["flips"]["models"] == whole["flips"]["models"]
    cli("report", "1", "--store", tmp_path / "a.db", "-o", tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert whole["flips"]["models"][0]["picks_flipped"] >= 1  # a flipped answer is listed, its prompt escaped
    assert "Flips: answers that change" in page and "is &lt;b&gt;" in page and "is <b>" not in page


def test_flip_bad_input(tiny_path, tiny_quants, tmp_path, monkeypatch):
    from llamalens.run import ray as run_ray

    monkeypatch.setattr(run_ray, "check_ray", lambda address: None)  # --ray's address is not what is refused here
    m = ["-m", tiny_path, "-m", tiny_quants[0]]
    bad = tmp_path / "bad.jsonl"
    cases = [
        ('{"prompt": "a", "options": ["x", "y"], "answer": "z"}', "is not one of the options"),
        ('{"prompt": "a", "options": ["x"]}', "at least two options"),
        ('{"prompt": "a", "options": ["x", "x"]}', "given twice"),
        ('{"prompt": "a", "options": "x"}', "list of strings"),
        ('{"text": "a"}', 'a "prompt" string'),
        ("", "holds no prompts"),
    ]
    for line, msg in cases:
        bad.write_text(line + "\n", encoding="utf-8")
        res = cli("compare", *m, "--prompts", bad, "--store", tmp_path / "x.db", ok=False)
        assert res.exit_code != 0 and re.search(msg, res.output), (line, res.output)
    good = tmp_path / "p.txt"
    good.write_text("the cat\n", encoding="utf-8")
    for args, msg in [
        (["compare", *m, TEXT, "--option", "a", "--option", "b"], "give --prompts"),
        (["compare", "-m", tiny_quants[0], "--run", 1, "--prompts", good], "not with --run"),
        (["compare", *m, "--prompts", good, "--max-tokens", 0], "0 is not in the range"),
        (["compare", *m, "--prompts", good, "--ray", "auto"], "drop one"),
    ]:
        res = cli(*args, "--store", tmp_path / "x.db", ok=False)
        assert res.exit_code != 0 and re.search(msg, res.output), (args, res.output)


def test_greedy_answers_on_the_default_model_against_llama_cpp_python(gemma_path, gemma_q4_0_path, tmp_path):
    """The default model and its Q4_0 copy answer three prompts greedily: each answer's text is
    llama-cpp-python's create_completion(temperature=0) text, and a flip is counted where those texts differ."""
    from llama_cpp import Llama

    prompts = ["The capital of France is", "Two plus two equals", "The opposite of hot is"]
    pfile = tmp_path / "p.txt"
    pfile.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    out = json.loads(cli("compare", "-m", gemma_path, "-m", gemma_q4_0_path, "--prompts", pfile, "--max-tokens", 12,
                         "--ctx", 128, "--store", tmp_path / "g.db", "--json").stdout)
    texts = {}
    for k, path in enumerate((gemma_path, gemma_q4_0_path)):
        llm = Llama(str(path), n_ctx=128, verbose=False)
        texts[k] = [llm.create_completion(p, max_tokens=12, temperature=0)["choices"][0]["text"] for p in prompts]
        llm.close()
    details = out["flips"]["models"][0]["details"]
    assert [d["base_text"] for d in details] == texts[0] and [d["text"] for d in details] == texts[1]
    assert out["flips"]["models"][0]["answers_differ"] == sum(a != b for a, b in zip(texts[0], texts[1]))

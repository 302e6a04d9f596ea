"""llamalens as an lm-evaluation-harness backend (llamalens/eval/), checked against references computed apart
from it: lm-eval's own tokenization boundary and rolling windows, llama-cpp-python's logits (log-softmax in
float64, tests/reference.py), `llamalens score` and `llamalens generate`.

The local tasks live in tests/data/eval_tasks (a task YAML with `dataset_path: json` and relative
`data_files`: the tests run from that folder)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from clirun import cli
from reference import log_softmax

lm_eval = pytest.importorskip("lm_eval")  # the 'eval' extra (scripts/install.sh --test installs it; CI fails a skip)


def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _llama_logprobs(llm, context, continuation):
    """(sum of logprobs, greedy) of continuation tokens after context tokens: llama-cpp-python decodes the joined
    tokens as one sequence, log-softmax in float64 of its raw logits."""
    ids = list(context) + list(continuation)
    llm.reset()
    llm.eval(ids[:-1])
    rows = np.array(llm.scores[: len(ids) - 1], dtype=np.float64)
    n = len(context)
    lp = log_softmax(rows[n - 1 :])
    return (float(sum(lp[j, t] for j, t in enumerate(continuation))),
            all(int(np.argmax(rows[n - 1 + j])) == t for j, t in enumerate(continuation)))


# -- lm-eval's semantics, without a model ----------------------------------------------------------------
def test_rolling_windows_are_lm_evals_own():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from llamalens.eval.lm_tokens import rolling_windows

    for n in (0, 1, 2, 5, 7, 8, 9, 16, 17, 40):
        for max_len in (1, 2, 3, 8, 16):
            toks = list(range(100, 100 + n))
            ref = [make_disjoint_window(w) for w in get_rolling_token_windows(toks, 7, max_len, 1)]
            ours = [(list(p.context), list(p.continuation)) for p in rolling_windows(toks, 7, max_len)]
            assert ours == ref, (n, max_len)


class _Capture:
    """lm-eval's TemplateLM with a tokenizer that is the model's (BOS + llama.cpp tokens): its own
    loglikelihood() splits context and continuation, and this captures the token pairs it makes."""

    def __new__(cls, model):
        from lm_eval.api.model import TemplateLM

        class Capture(TemplateLM):
            eot_token_id = property(lambda self: model.eos)
            prefix_token_id = property(lambda self: model.bos)

            def tok_encode(self, string, add_special_tokens=None, **kw):
                bos = [model.bos] if add_special_tokens is not False else []
                return bos + model.tokenize(string, add_bos=False, special=True)

            def _loglikelihood_tokens(self, requests, **kw):
                return [(tuple(c), tuple(x)) for _, c, x in requests]

            loglikelihood_rolling = generate_until = None

        return Capture()


def test_the_context_continuation_boundary_is_lm_evals(tiny):
    from llamalens.eval.lm_tokens import encode_pair

    reqs = [("the cat", " sat"), ("the cat ", "sat on"), ("the cat  ", " sat"), ("", "the cat"), ("a", " mat and dog")]

    class R:
        def __init__(self, args):
            self.args = args

    ref = _Capture(tiny).loglikelihood([R(a) for a in reqs], disable_tqdm=True)
    for (context, continuation), (rc, rx) in zip(reqs, ref):
        c, x, merged = encode_pair(tiny, context, continuation)
        assert (tuple(c), tuple(x)) == (rc, rx) and not merged, (context, continuation)
    # the trailing space moved: the continuation starts with it, the context has none
    c, x, _ = encode_pair(tiny, "the cat ", "sat")
    assert tiny.piece(x[0]).startswith(b" ") and not tiny.piece(c[-1]).endswith(b" ")


def test_a_long_request_keeps_its_newest_tokens_and_a_bad_one_names_its_document(tiny):
    from llamalens.errors import InvalidInput
    from llamalens.eval.lm_tokens import encode_requests

    text = "the cat sat on a mat and the dog ran far away " * 4
    enc = encode_requests(tiny, [(text, " cat"), ("the", " cat")], 12, lambda i: f"document {i}")
    assert enc.truncated_at == {0} and len(enc.pairs[0].context) + len(enc.pairs[0].continuation) - 1 == 12
    full = tiny.prompt_tokens(text.rstrip())  # the trailing space moved into the continuation
    assert list(enc.pairs[0].context) == full[-len(enc.pairs[0].context):]  # the oldest tokens went
    assert "longer than the context" in enc.notes()[0]
    with pytest.raises(InvalidInput, match="document 1: the continuation is empty"):
        encode_requests(tiny, [("the", " cat"), ("the cat", "")], 64, lambda i: f"document {i}")
    with pytest.raises(InvalidInput, match="document 0: the continuation alone is"):
        encode_requests(tiny, [("the", " cat" * 20)], 8, lambda i: f"document {i}")


# -- the scorer on the tiny model -------------------------------------------------------------------------
def _tiny_pairs(model):
    import random

    from llamalens.eval.scoring import Pair

    rng, words, pairs = random.Random(1), "the cat sat on a mat and dog ran far away".split(), []
    for _ in range(8):
        context = " ".join(rng.choice(words) for _ in range(rng.randint(3, 30)))
        ctx = model.prompt_tokens(context)
        for _ in range(rng.randint(1, 5)):
            whole = model.prompt_tokens(context + " " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 6))))
            pairs.append(Pair(tuple(ctx), tuple(whole[len(ctx):])))
    return pairs


def test_scores_equal_llama_cpp_pythons_and_batching_only_moves_them_by_noise(tiny, tiny_path):
    from llama_cpp import Llama

    from llamalens.eval.scoring import score_pairs

    pairs = _tiny_pairs(tiny)
    llm = Llama(str(tiny_path), logits_all=True, n_ctx=256, verbose=False, flash_attn=False)
    ref = [_llama_logprobs(llm, p.context, p.continuation) for p in pairs]
    exact = score_pairs(tiny, pairs, exact=True)
    # measured: max 1.2e-6 against llama-cpp-python (float32 rows, float64 sums); bound about 10x
    assert max(abs(s.logprob - r[0]) for s, r in zip(exact, ref)) < 1e-5
    assert [s.is_greedy for s in exact] == [r[1] for r in ref]
    assert [len(s.logprobs) for s in exact] == [len(p.continuation) for p in pairs]
    for batch in (64, 3, 1):  # contexts shared, several documents a decode: measured max 8.3e-4 (batch 8)
        shared = score_pairs(tiny, pairs, batch_size=batch)
        assert max(abs(a.logprob - b.logprob) for a, b in zip(shared, exact)) < 1e-2, batch
        assert [len(s.logprobs) for s in shared] == [len(p.continuation) for p in pairs]


def test_python_api_and_lm_evals_registry(tiny, in_tasks):
    import lm_eval.api.registry as registry
    from importlib.metadata import EntryPoint

    import llamalens as ll
    from llamalens.eval.harness import LlamalensLM

    assert registry.get_model("llamalens") is LlamalensLM
    # pyproject's entry point, as lm-eval's plugin discovery loads it: the same class
    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    target = text.split('[project.entry-points."lm_eval.models"]')[1].split('llamalens = "')[1].split('"')[0]
    assert EntryPoint("llamalens", target, "lm_eval.models").load() is LlamalensLM
    lm = ll.eval_model(model=tiny, exact=True)
    out = lm_eval.simple_evaluate(model=lm, tasks=["ll_test_mc"], task_manager=lm_eval.tasks.TaskManager(
        include_path=str(in_tasks)), limit=2)
    assert out["results"]["ll_test_mc"]["acc,none"] in (0.0, 0.5, 1.0)
    assert lm.stats.requests == {"loglikelihood": 6} and lm.stats.noise_floor is None
    with pytest.raises(ll.InvalidInput, match="model options"):
        ll.eval_model(model=tiny, ctx=64)


def test_bad_input_gets_a_message_naming_the_fix(tiny_path, in_tasks, monkeypatch):
    import sys

    from llamalens.eval.generation import settings_of
    from llamalens.errors import InvalidInput, MissingExtra
    from llamalens.eval.run import EvalRequest

    res = cli("eval", "--tasks", "no_such_task", "--include-path", in_tasks, "-m", tiny_path, ok=False)
    assert res.exit_code != 0 and "unknown task(s): no_such_task" in res.output and "Traceback" not in res.output
    res = cli("eval", "--tasks", "ll_test_mc", "--log-samples", "-m", tiny_path, ok=False)
    assert res.exit_code != 0 and "into --output-path: give one" in res.output
    res = cli("eval", "--tasks", "ll_test_mc", "--num-fewshot", "99", "-m", tiny_path, ok=False)
    assert res.exit_code != 0 and "--num-fewshot 99 is out of range" in res.output
    for limit in ("inf", "nan", "-1"):  # infinity passed '> 0' and failed in lm-eval's int(limit): OverflowError
        res = cli("eval", "--tasks", "ll_test_mc", "--include-path", in_tasks, "--limit", limit, "-m", tiny_path, ok=False)
        assert res.exit_code == 1 and "must be a number > 0" in res.output, res.output
    with pytest.raises(InvalidInput, match="num_beams"):
        settings_of({"until": ["\n"], "num_beams": 4}, "task 't', document 3")
    assert settings_of({"until": "\n", "max_gen_toks": 5}, "x")[1:] == (("\n",), 5)
    assert settings_of({"do_sample": True, "temperature": 0.5}, "x")[0].temperature == 0.5
    assert settings_of({"do_sample": False, "temperature": 0.5}, "x")[0].temperature == 0.0
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(MissingExtra, match=r"llamalens\[eval\]"):
        EvalRequest(["ll_test_mc"]).check()


# -- the default model, through the command -----------------------------------------------------------------
def _samples(folder: Path, task: str) -> list[dict]:
    (path,) = folder.rglob(f"samples_{task}_*.jsonl")
    return sorted(_jsonl(path), key=lambda s: s["doc_id"])


def test_eval_on_the_default_model_equals_the_references(gemma, gemma_llama, gemma_path, in_tasks, tmp_path):
    """--exact: every option's loglikelihood and is_greedy from llama-cpp-python's logits, the accuracy from
    them; the rolling loglikelihood from the same windows (and `llamalens score` where one window holds the
    text); generate_until's text as `llamalens generate` makes it."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from llamalens.core.engine import generate
    from llamalens.eval.lm_tokens import encode_pair
    from llamalens.looks.score import score_text
    from llamalens.settings import SamplingSettings

    out = tmp_path / "out"
    res = cli("eval", "--tasks", "ll_test_mc,ll_test_rolling,ll_test_gen", "--include-path", in_tasks, "--exact",
              "--output-path", out, "--log-samples", "--limit", 3, "--batch-size", 1, "-m", gemma_path,
              "--ctx", 48, "--flash-attn", "off")
    assert res.exit_code == 0, res.output
    assert "ll_test_mc" in res.output and "acc" in res.output and "requests" in res.output
    # multiple choice: each option against llama-cpp-python
    correct = []
    for s in _samples(out, "ll_test_mc"):
        lls = []
        args = [(a["arg_0"], a["arg_1"]) for a in s["arguments"].values()]
        for (context, continuation), resp in zip(args, s["resps"]):
            c, x, _ = encode_pair(gemma, context, continuation)
            ref_ll, ref_greedy = _llama_logprobs(gemma_llama, c, x)
            ll, greedy = resp[0]
            assert abs(float(ll) - ref_ll) < 1e-4 and (greedy in (True, "True")) == ref_greedy  # measured 7.4e-9
            lls.append(ref_ll)
        correct.append(int(np.argmax(lls)) == int(s["target"]))
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    assert results["ll_test_mc"]["acc,none"] == pytest.approx(np.mean(correct))
    # rolling: lm-eval's own windows of --ctx 48 tokens, each scored by llama-cpp-python
    for s in _samples(out, "ll_test_rolling"):
        text = s["doc"]["text"]
        toks = gemma.tokenize(text, add_bos=False, special=True)
        windows = [make_disjoint_window(w) for w in get_rolling_token_windows(toks, gemma.bos, 48, 1)]
        ref = sum(_llama_logprobs(gemma_llama, c, x)[0] for c, x in windows)
        assert abs(float(s["resps"][0][0]) - ref) < 1e-4 * len(windows), (len(toks), len(windows))
        if len(windows) == 1:  # one window holds the text: `llamalens score` over it scores the same tokens
            scored = score_text(gemma, text, ctx=len(toks) + 1)
            assert [t.id for t in scored.tokens] == toks
            # score decodes the window's last token too (lm-eval and llama-cpp-python's reference above do not):
            # one more token in the batch moves the CPU kernels' figures (../docs/eval.md). Measured 0.116 nats
            # in all over 22 tokens (0.0053 a token); bound about 10x a token. An alignment off by one costs nats.
            assert abs(sum(t.logprob for t in scored.tokens) - ref) < 0.05 * len(toks)
    assert {len(gemma.tokenize(d["text"], add_bos=False)) > 48 for d in _jsonl(in_tasks / "rolling.jsonl")} == {True, False}
    # generate_until: `llamalens generate`'s greedy text, cut before the first stop string
    for s in _samples(out, "ll_test_gen"):
        sample = generate(gemma, s["arguments"]["gen_args_0"]["arg_0"], SamplingSettings(temperature=0),
                          max_tokens=12, n_logprobs=0, stop=["\n", "."])
        assert s["resps"][0][0] == sample.text
        assert "\n" not in sample.text and "." not in sample.text


def test_batched_eval_records_its_noise_floor(gemma_path, in_tasks):
    """The default, batched: the noise floor is the largest batched-vs-exact difference among the re-scored
    requests, and every question decided by less is listed."""
    import llamalens as ll

    res = ll.evaluate(["ll_test_mc"], include_path=str(in_tasks), model=gemma_path, ctx=128, flash_attn="off")
    exact = ll.evaluate(["ll_test_mc"], include_path=str(in_tasks), model=gemma_path, ctx=128, flash_attn="off",
                        exact=True)
    from llamalens.run.evaluation import load_eval
    from llamalens.store import Store

    st = res.stats
    pairs = [(r, e) for r, e in zip(load_eval(Store(), res.run_id).requests[0],
                                    load_eval(Store(), exact.run_id).requests[0]) if r.exact is not None]
    assert st["noise_pairs"] == len(pairs) == 4 and st["noise_floor"] is not None and exact.stats["noise_floor"] is None
    # a request re-scored alone is the exact run's figure (both decode it alone): bound 1e-6
    assert all(abs(r.exact - e.logprob) < 1e-6 for r, e in pairs)
    assert st["noise_floor"] == pytest.approx(max(abs(r.logprob - e.logprob) for r, e in pairs), abs=1e-6)
    margins = {}
    for s in res.samples["ll_test_mc"]:
        lls = sorted((r[0][0] for r in s["resps"]), reverse=True)
        margins[s["doc_id"]] = lls[0] - lls[1]
    assert sorted(d for _, d, _ in st["close_calls"]) == sorted(d for d, m in margins.items() if m < st["noise_floor"])
    assert math.isfinite(res.metric("ll_test_mc", "acc"))


def test_chat_template_prompts_and_json_output(tiny_path, in_tasks, tmp_path):
    """--apply-chat-template renders each context with the template (--chat-template FILE), lm-eval's sample
    files show it, and --json prints lm-eval's results with the backend's figures."""
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}[assistant]{% endif %}")
    out = tmp_path / "out"
    res = cli("eval", "--tasks", "ll_test_mc", "--include-path", in_tasks, "--limit", 2, "--apply-chat-template",
              "--chat-template", template, "--json", "--output-path", out, "--log-samples", "-m", tiny_path,
              "--batch-size", 4)
    data = json.loads(res.stdout)
    assert set(data["results"]) == {"ll_test_mc"} and data["backend"]["requests"] == {"loglikelihood": 6}
    assert data["backend"]["noise_pairs"] == 4 and any(f.endswith(".jsonl") for f in data["files"])
    contexts = [a["arg_0"] for s in _samples(out, "ll_test_mc") for a in s["arguments"].values()]
    assert contexts and all(c.startswith("[user] ") and c.endswith("[assistant]") for c in contexts)


def test_no_git_complaint_outside_a_checkout(tiny_path, in_tasks, monkeypatch, capfd):
    """Run where git finds no repository (its search stopped at the task folder's parent), eval prints no "fatal: not
    a git repository" (lm-eval asks git for the working directory's commit)."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(in_tasks.parent))
    cli("eval", "--tasks", "ll_test_mc", "--include-path", in_tasks, "--limit", 2, "-m", tiny_path, "--batch-size", 4)
    assert "not a git repository" not in capfd.readouterr().err

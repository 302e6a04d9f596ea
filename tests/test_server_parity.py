"""Token for token with llama-server (tests/server.py starts a real one): a GBNF grammar on the default model,
greedy and sampled with a seed, and --chat against /v1/chat/completions on a tiny GGUF with its own template.

The server is pinned to what llamalens's context does (flash attention off, the full SWA cache, one slot,
no prompt cache) and to samplers llamalens's chain reproduces: its default chain with DRY, XTC and
top-n-sigma off is top_k -> typ_p -> top_p -> min_p -> temperature -> dist(seed), the same stages in the same
order as llama-cpp-python's, so the same settings and seed must choose the same tokens."""

from __future__ import annotations

import math

import pytest

from llamalens.core.chat import render
from llamalens.core.engine import Engine, Request
from llamalens.core.runtime import Model, ModelOptions
from llamalens.settings import SamplingSettings
from server import llama_server
from tiny_gguf import TINY_CHAT_TEMPLATE, write_tiny_gguf

# measured: after the position's shift (see assert_same) the logprobs agree within 3.6e-7 (the server's float32
# values), post-sampling probabilities exactly: bound 4e-6
TOL = 4e-6
GBNF = 'root ::= "{" ws "\\"answer\\":" ws ("\\"yes\\"" | "\\"no\\"" | "\\"maybe\\"") ws "}"\nws ::= [ ]?\n'
PROMPT = "Is the sky blue? Reply in JSON:"
SETTINGS = [SamplingSettings(temperature=0.0), SamplingSettings(temperature=1.3, top_k=40, top_p=0.95, min_p=0.0,
                                                                seed=3)]


def server_body(s: SamplingSettings) -> dict:
    return {"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "min_p": s.min_p,
            "typical_p": s.typical_p, "repeat_penalty": s.repeat_penalty, "repeat_last_n": s.penalty_last_n,
            "frequency_penalty": s.frequency_penalty, "presence_penalty": s.presence_penalty, "seed": s.seed,
            "dry_multiplier": 0.0, "xtc_probability": 0.0, "top_n_sigma": -1.0, "cache_prompt": False}


def assert_same(entries: list[dict], sample, n_top: int) -> None:
    """The server's per-token entries (id, logprob, top_logprobs) against a llamalens Sample."""
    toks = sample.tokens
    assert [e["id"] for e in entries] == [t.id for t in toks][: len(entries)]
    assert len(entries) >= len(toks) - 1  # the server may leave out the end-of-generation token
    for e, t in zip(entries, toks):
        assert [a["id"] for a in e["top_logprobs"][:n_top]] == [a.id for a in t.top[:n_top]]
        # a documented difference: the server normalises with a float32 running sum over the whole vocabulary
        # (get_token_probabilities, `cum_sum += p`), which moves every logprob of a position by the same amount
        # (measured up to 9.8e-4 on Gemma's 262k tokens; bound 10x). Logits that differed would not move all
        # tokens alike, so past that one shift the values must agree within TOL.
        shift = e["top_logprobs"][0]["logprob"] - t.top[0].logprob
        assert abs(shift) < 1e-2
        assert abs(e["logprob"] - t.logprob - shift) < TOL
        for a, b in zip(e["top_logprobs"], t.top):
            assert abs(a["logprob"] - b.logprob - shift) < TOL


def test_grammar_token_for_token(gemma_path):
    with Model(gemma_path, ModelOptions(ctx=512, flash_attn="off")) as model, \
            llama_server(gemma_path, "--ctx-size", "512", "--parallel", "1", "--flash-attn", "off", "--swa-full",
                         timeout=180) as srv:
        for s in SETTINGS:
            sample = next(iter(Engine(model, 1).run([Request(PROMPT, s, 16, 3, grammar=GBNF)])))
            body = dict(server_body(s), prompt=PROMPT, n_predict=16, n_probs=3, grammar=GBNF)
            raw = srv.post("/completion", body)
            assert raw["content"] == sample.text
            assert_same(raw["completion_probabilities"], sample, 3)
            # after the chain: the chosen token's probability in the distribution it was drawn from
            post = srv.post("/completion", dict(body, post_sampling_probs=True))["completion_probabilities"]
            assert [e["id"] for e in post] == [e["id"] for e in raw["completion_probabilities"]]
            for e, t in zip(post, sample.tokens):
                assert abs(e["prob"] - math.exp(t.sampled_logprob)) < TOL
            assert max(sample.grammar_removed) > 0.5  # the grammar did reject the model's own choices


@pytest.fixture(scope="module")
def chat_path(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("chat") / "tiny-chat.gguf", chat_template=TINY_CHAT_TEMPLATE)


def test_chat_against_chat_completions(chat_path):
    messages = [{"role": "system", "content": "  hello  "}, {"role": "user", "content": "the cat sat"},
                {"role": "assistant", "content": "on the mat"}, {"role": "user", "content": "and the dog?"}]
    with Model(chat_path, ModelOptions(ctx=256, flash_attn="off")) as model, \
            llama_server(chat_path, "--ctx-size", "256", "--parallel", "1", "--flash-attn", "off", "--jinja",
                         timeout=60) as srv:
        rendered = render(model, messages)
        # the server's own rendering (its C++ Jinja engine) and tokens
        served = srv.post("/apply-template", {"messages": messages})["prompt"]
        assert served in (rendered.text, "<s>" + rendered.text)
        ids = srv.post("/tokenize", {"content": served, "add_special": not served.startswith("<s>"),
                                     "parse_special": True})["tokens"]
        assert ids == model.prompt_tokens(rendered.text)
        s = SamplingSettings(temperature=0.0)
        sample = next(iter(Engine(model, 1).run([Request(rendered.text, s, 8, 5)])))
        reply = srv.post("/v1/chat/completions", dict(server_body(s), messages=messages, max_tokens=8, logprobs=True,
                                                      top_logprobs=5))
        assert reply["choices"][0]["message"]["content"] == sample.text
        assert_same(reply["choices"][0]["logprobs"]["content"], sample, 5)
